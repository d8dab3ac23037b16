//! Backend side of `ipip`: strips the outer header of tunnelled packets addressed to this host
//! for a VIP served here, and hands the inner packet to the stack. Backends without the
//! kernel's ipip module (or that prefer XDP's cost) serve `ipip` VIPs with it.

use crate::{
    counters,
    maps::{DECAP_LOCAL, DECAP_VIPS},
    parse::{header, parse_l2, ptr_at, ETH_P_IPV4, ETH_P_IPV6},
};
use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    counters as idx, AddrKey, FAMILY_IPV4, FAMILY_IPV6, IPV4_HEADER_LEN, IPV6_HEADER_LEN,
    PROTO_IPIP, PROTO_IPV6,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

fn addr_key(family: u8, addr: &[u8]) -> AddrKey {
    let mut key = AddrKey {
        family,
        ..AddrKey::default()
    };
    if family == FAMILY_IPV4 {
        key.addr[..4].copy_from_slice(&addr[..4]);
    } else {
        key.addr.copy_from_slice(&addr[..16]);
    }
    key
}

/// Outer and inner family plus the outer header length of a tunnel packet, if it is one.
struct Tunnel {
    outer: AddrKey,
    inner_family: u8,
    outer_len: usize,
}

#[inline(always)]
fn tunnel(ctx: &XdpContext, ether_type: u16, l2_len: usize) -> Option<Tunnel> {
    let (outer, proto, outer_len) = match ether_type {
        ETH_P_IPV4 => {
            let ip: &Ipv4Hdr = header(ctx, l2_len).ok()?;
            // Our encapsulation never adds options, so any IHL but 5 is not ours.
            if ip.vihl != 0x45 || u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
                return None;
            }
            (
                addr_key(FAMILY_IPV4, &ip.dst_addr),
                ip.proto,
                IPV4_HEADER_LEN,
            )
        }
        ETH_P_IPV6 => {
            let ip: &Ipv6Hdr = header(ctx, l2_len).ok()?;
            (
                addr_key(FAMILY_IPV6, &ip.dst_addr),
                ip.next_hdr,
                IPV6_HEADER_LEN,
            )
        }
        _ => return None,
    };
    let inner_family = match proto {
        PROTO_IPIP => FAMILY_IPV4,
        PROTO_IPV6 => FAMILY_IPV6,
        _ => return None,
    };
    Some(Tunnel {
        outer,
        inner_family,
        outer_len: outer_len as usize,
    })
}

/// Inner destination address of the tunnelled packet.
#[inline(always)]
fn inner_destination(ctx: &XdpContext, offset: usize, family: u8) -> Option<AddrKey> {
    if family == FAMILY_IPV4 {
        let ip: &Ipv4Hdr = header(ctx, offset).ok()?;
        Some(addr_key(FAMILY_IPV4, &ip.dst_addr))
    } else {
        let ip: &Ipv6Hdr = header(ctx, offset).ok()?;
        Some(addr_key(FAMILY_IPV6, &ip.dst_addr))
    }
}

pub fn run(ctx: &XdpContext) -> u32 {
    let Ok((ether_type, l2_len)) = parse_l2(ctx) else {
        return xdp_action::XDP_PASS;
    };
    let Some(tunnel) = tunnel(ctx, ether_type, l2_len) else {
        return xdp_action::XDP_PASS;
    };
    let Some(inner) = inner_destination(ctx, l2_len + tunnel.outer_len, tunnel.inner_family) else {
        counters::global(idx::DECAP_NOT_OURS);
        return xdp_action::XDP_PASS;
    };
    // SAFETY: lookups only; nothing is kept.
    let ours =
        unsafe { DECAP_LOCAL.get(&tunnel.outer).is_some() && DECAP_VIPS.get(&inner).is_some() };
    if !ours {
        counters::global(idx::DECAP_NOT_OURS);
        return xdp_action::XDP_PASS;
    }
    match strip(ctx, l2_len, tunnel.outer_len, tunnel.inner_family) {
        Ok(()) => {
            counters::global(idx::DECAP_OK);
            xdp_action::XDP_PASS
        }
        Err(()) => {
            counters::global(idx::DROP_INTERNAL);
            xdp_action::XDP_DROP
        }
    }
}

/// Moves the Ethernet header (and VLAN tag) over the outer IP header, then drops the front.
#[inline(always)]
fn strip(ctx: &XdpContext, l2_len: usize, outer_len: usize, inner_family: u8) -> Result<(), ()> {
    let ether_type = if inner_family == FAMILY_IPV6 {
        ETH_P_IPV6
    } else {
        ETH_P_IPV4
    };
    let macs = ptr_at::<[u8; 12]>(ctx, 0)?;
    let new_macs = ptr_at::<[u8; 12]>(ctx, outer_len)?;
    // SAFETY: both ranges bounds checked; they do not overlap because outer_len >= 20.
    unsafe { *new_macs = *macs };
    if l2_len > 14 {
        let tag = ptr_at::<[u8; 4]>(ctx, 12)?;
        let new_tag = ptr_at::<[u8; 4]>(ctx, outer_len + 12)?;
        // SAFETY: as above.
        unsafe { *new_tag = *tag };
    }
    let new_ether_type = ptr_at::<[u8; 2]>(ctx, outer_len + l2_len - 2)?;
    // SAFETY: bounds checked.
    unsafe { *new_ether_type = ether_type.to_be_bytes() };
    // SAFETY: shrinking the head by a length we proved is in the packet.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return Err(());
    }
    Ok(())
}
