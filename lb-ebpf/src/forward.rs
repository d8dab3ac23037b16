//! Sending a packet to its backend: MAC rewrite (`dsr`), IPIP encapsulation (`ipip`) or
//! address translation (`nat`, see [`crate::nat`]), then out of the same interface (`XDP_TX`)
//! or another one (`XDP_REDIRECT`).

use crate::{
    lookup::{Choice, FlowHash},
    maps::{CONFIG, TX_PORTS},
    parse::{ptr_at, Packet, ETH_P_IPV4, ETH_P_IPV6},
};
use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    counters, Backend, LbConfig, VipMeta, FAMILY_IPV6, IPV4_HEADER_LEN, IPV6_HEADER_LEN, MODE_IPIP,
    MODE_NAT, PROTO_IPIP, PROTO_IPV6,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

pub const OUTER_TTL: u8 = 64;
const IPV4_DF: [u8; 2] = [0x40, 0x00];

/// Rewrites the Ethernet addresses toward the backend (or its next hop): three 32-bit
/// stores (a byte array copy compiles to twelve byte stores).
#[inline(always)]
fn set_macs(ctx: &XdpContext, backend: &Backend) -> Result<(), u32> {
    let macs = ptr_at::<[u8; 12]>(ctx, 0).map_err(|_| counters::DROP_INTERNAL)?;
    let [a, b, c] = backend.mac_words();
    // SAFETY: the 12 bytes were bounds checked by ptr_at.
    unsafe {
        store(macs.cast(), 0, a);
        store(macs.cast(), 4, b);
        store(macs.cast(), 8, c);
    }
    Ok(())
}

/// Stores `value` at `base + offset` in the packet, aligned or not (see [`crate::parse::load`]).
///
/// # Safety
/// `base + offset + size_of::<T>()` must lie inside bytes checked with [`ptr_at`].
#[inline(always)]
unsafe fn store<T: Copy>(base: *mut u8, offset: usize, value: T) {
    // SAFETY: see above.
    unsafe { core::ptr::write(base.add(offset) as *mut T, value) }
}

/// The action that sends the rewritten frame toward `backend`.
#[inline(always)]
fn transmit(ctx: &XdpContext, backend: &Backend) -> Result<u32, u32> {
    out_of(ctx, backend.tx_ifindex)
}

/// The action that sends the rewritten frame out of `ifindex` (0: where it came in).
#[inline(always)]
pub fn out_of(ctx: &XdpContext, ifindex: u32) -> Result<u32, u32> {
    if ifindex == 0 || ifindex as usize == ctx.ingress_ifindex() {
        return Ok(xdp_action::XDP_TX);
    }
    // On a missing port the helper returns the low bits of the flags: XDP_DROP, counted below.
    TX_PORTS
        .redirect(ifindex, xdp_action::XDP_DROP as u64)
        .map_err(|_| counters::DROP_INTERNAL)
}

/// Sends the packet to the chosen backend the way `vip` forwards. `hash` gives the flow hash
/// on demand (`outer()`: outer source and flow label of `ipip`, the one the flow's entry
/// stores on a hit; `get()`: first port slot of `nat`; `dsr` never computes it). `nat`
/// continues in its own program (a tail call that returns only on failure).
#[inline(always)]
pub fn to_backend(
    ctx: &XdpContext,
    pkt: &Packet,
    vip: &VipMeta,
    choice: &Choice,
    hash: &FlowHash,
) -> Result<u32, u32> {
    if vip.mode == MODE_NAT {
        let with = crate::nat::HandOff {
            backend_id: choice.backend_id,
            vip_id: vip.vip_id,
            new_flow: choice.new_flow,
            rehash: choice.rehash,
            hash: hash.outer(),
        };
        return Err(crate::nat::hand_off(
            ctx,
            None,
            crate::nat::TO_BACKEND,
            with,
        ));
    }
    dsr_or_ipip(ctx, pkt, vip, choice.backend, hash)
}

/// [`to_backend`] for a VIP that does not use `nat` (ICMP errors about a nat connection are
/// translated by [`crate::nat`] instead).
#[inline(always)]
pub fn dsr_or_ipip(
    ctx: &XdpContext,
    pkt: &Packet,
    vip: &VipMeta,
    backend: &Backend,
    hash: &FlowHash,
) -> Result<u32, u32> {
    if vip.mode == MODE_IPIP {
        ipip(ctx, pkt, backend, hash.outer())
    } else {
        dsr(ctx, backend)
    }
}

/// Bytes the encapsulation toward `backend` adds.
#[inline(always)]
pub fn outer_len(backend: &Backend) -> u32 {
    if backend.family == FAMILY_IPV6 {
        IPV6_HEADER_LEN
    } else {
        IPV4_HEADER_LEN
    }
}

/// MAC rewrite toward `backend` and send: all of `dsr`, the last step of `nat`.
#[inline(always)]
pub fn dsr(ctx: &XdpContext, backend: &Backend) -> Result<u32, u32> {
    set_macs(ctx, backend)?;
    transmit(ctx, backend)
}

/// Prepends an outer IPv4 or IPv6 header addressed to the backend (4in4, 6in6, 4in6).
/// `Err(PASS_TOO_BIG)` leaves the packet untouched (see `icmp::too_big`).
#[inline(always)]
fn ipip(ctx: &XdpContext, pkt: &Packet, backend: &Backend, hash: u32) -> Result<u32, u32> {
    let Some(config) = CONFIG.get(0) else {
        return Err(counters::DROP_INTERNAL);
    };
    let outer_len = outer_len(backend);
    if pkt.l3_len + outer_len > backend.mtu as u32 {
        return Err(counters::PASS_TOO_BIG);
    }
    // SAFETY: helper call on our own context; it fails cleanly when there is no headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return Err(counters::DROP_INTERNAL);
    }
    // The Ethernet header (and VLAN tag) moves to the new start; MACs are rewritten anyway,
    // so only the tag needs copying.
    let l2_len = pkt.l2_len;
    if l2_len > 14 {
        let tag =
            ptr_at::<[u8; 4]>(ctx, outer_len as usize + 12).map_err(|_| counters::DROP_INTERNAL)?;
        let new_tag = ptr_at::<[u8; 4]>(ctx, 12).map_err(|_| counters::DROP_INTERNAL)?;
        // SAFETY: both bounds checked; they do not overlap (outer_len >= 20).
        unsafe { *new_tag = *tag };
    }
    set_macs(ctx, backend)?;
    let ether_type = ptr_at::<[u8; 2]>(ctx, l2_len - 2).map_err(|_| counters::DROP_INTERNAL)?;
    let inner_proto = if pkt.key.family == FAMILY_IPV6 {
        PROTO_IPV6
    } else {
        PROTO_IPIP
    };
    if backend.family == FAMILY_IPV6 {
        // SAFETY: bounds checked.
        unsafe { *ether_type = ETH_P_IPV6.to_be_bytes() };
        let outer = ptr_at::<Ipv6Hdr>(ctx, l2_len).map_err(|_| counters::DROP_INTERNAL)?;
        // SAFETY: bounds checked.
        unsafe { write_ipv6(&mut *outer, pkt, backend, config, hash, inner_proto) };
    } else {
        // SAFETY: bounds checked.
        unsafe { *ether_type = ETH_P_IPV4.to_be_bytes() };
        let outer = ptr_at::<Ipv4Hdr>(ctx, l2_len).map_err(|_| counters::DROP_INTERNAL)?;
        // SAFETY: bounds checked.
        unsafe { write_ipv4(outer.cast(), pkt, backend, config, hash, inner_proto) };
    }
    transmit(ctx, backend)
}

/// The outer IPv4 header as five 32-bit words built in registers and stored once each, its
/// checksum summed from the same words (RFC 1071: the one's complement sum of little-endian
/// words, stored little-endian, gives the same bytes as the big-endian sum; bpfel is
/// little-endian), instead of field-by-field byte stores and a re-read of the header.
///
/// # Safety
/// `outer` must point at 20 bytes checked with [`ptr_at`].
#[inline(always)]
unsafe fn write_ipv4(
    outer: *mut u8,
    pkt: &Packet,
    backend: &Backend,
    config: &LbConfig,
    hash: u32,
    inner_proto: u8,
) {
    let total_len = ((pkt.l3_len + IPV4_HEADER_LEN) as u16).to_be_bytes();
    let version_tos_len = u32::from_ne_bytes([0x45, pkt.tos, total_len[0], total_len[1]]);
    let id_frags = u32::from_ne_bytes([0, 0, IPV4_DF[0], IPV4_DF[1]]);
    let ttl_proto = u32::from_ne_bytes([OUTER_TTL, inner_proto, 0, 0]);
    let src = u32::from_ne_bytes(lb_common::ipip_source(
        &config.ipip_src_v4,
        &config.ipip_src_v4_host_mask,
        hash,
    ));
    let dst = u32::from_ne_bytes([
        backend.addr[0],
        backend.addr[1],
        backend.addr[2],
        backend.addr[3],
    ]);
    let mut sum = version_tos_len as u64 + id_frags as u64 + ttl_proto as u64;
    sum += src as u64 + dst as u64;
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let check = !(sum as u16);
    // SAFETY: the caller checked the 20 bytes.
    unsafe {
        store(outer, 0, version_tos_len);
        store(outer, 4, id_frags);
        store(outer, 8, ttl_proto | (check as u32) << 16);
        store(outer, 12, src);
        store(outer, 16, dst);
    }
}

#[inline(always)]
fn write_ipv6(
    outer: &mut Ipv6Hdr,
    pkt: &Packet,
    backend: &Backend,
    config: &LbConfig,
    hash: u32,
    inner_proto: u8,
) {
    // Version 6, the inner traffic class, and the flow hash as flow label (ECMP and RSS use it).
    let label = hash & 0x000f_ffff;
    outer.vcf = ((6u32 << 28) | ((pkt.tos as u32) << 20) | label).to_be_bytes();
    outer.payload_len = (pkt.l3_len as u16).to_be_bytes();
    outer.next_hdr = inner_proto;
    outer.hop_limit = OUTER_TTL;
    outer.src_addr =
        lb_common::ipip_source(&config.ipip_src_v6, &config.ipip_src_v6_host_mask, hash);
    outer.dst_addr = backend.addr;
}

/// RFC 1071 checksum of a 20-byte IPv4 header whose checksum field is zero.
#[inline(always)]
pub fn ipv4_checksum(header: &Ipv4Hdr) -> u16 {
    // SAFETY: Ipv4Hdr is 20 plain bytes.
    let bytes: &[u8; 20] = unsafe { &*(header as *const Ipv4Hdr as *const [u8; 20]) };
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
