//! ICMP for VIP traffic, so path MTU discovery works through the load balancer.
//!
//! * Errors about a VIP's flow (destination unreachable incl. fragmentation needed, packet too
//!   big, time exceeded) are addressed to the VIP, because the packet they quote is a backend's
//!   reply. They go to the backend that owns the quoted connection (its tuple reversed: flow
//!   table, then ring), in the VIP's forwarding mode. Without this a backend never learns a
//!   smaller path MTU and large replies stall for ever.
//! * `nat` VIPs: errors about a nat connection are translated (see [`crate::nat`]), both
//!   those sent to the VIP and those a backend or a router sends to a nat address.
//! * A client packet too big to encapsulate (`ipip`) is answered from here with "fragmentation
//!   needed" (IPv4 with DF) or "packet too big" (IPv6) carrying the MTU left for the inner
//!   packet, rate limited per CPU (Katran's `send_icmp_too_big` does the same).
//!
//! Echo and every other non-error ICMP stay with the host.

use crate::{
    counters,
    forward::{self, ipv4_checksum, OUTER_TTL},
    lookup,
    maps::{CONFIG, ICMP_TOO_BIG_RATE},
    parse::{frame_len, header, parse_l2, ptr_at, Packet, ETH_P_IPV4, ETH_P_IPV6},
    pass,
};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_csum_diff, bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    counters as idx, Backend, FlowKey, VipMeta, CONFIG_HAS_NAT, FAMILY_IPV4, FAMILY_IPV6,
    IPV4_HEADER_LEN, IPV6_HEADER_LEN, MODE_NAT, PROTO_TCP, PROTO_UDP,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMP_HEADER_LEN: usize = 8;
/// Bytes of the refused packet quoted in a "too big" reply: its IP header and, even with the
/// longest IPv4 options, the transport ports and sequence number the client's stack matches.
/// Fixed, so the checksum is taken over a constant length (`bpf_csum_diff` needs one).
pub const TOO_BIG_QUOTE_V4: usize = 128;
pub const TOO_BIG_QUOTE_V6: usize = 256;
/// Internetwork-control precedence, as Linux sends its own ICMP errors.
const ICMP_TOS: u8 = 0xc0;
const IPV4_DF: u16 = 0x4000;

/// An ICMP error about a TCP/UDP flow.
struct FlowError {
    /// The ICMP packet, as [`forward::to_backend`] needs it, but keyed by the quoted packet's
    /// tuple reversed (client -> VIP): the flow the error is about.
    packet: Packet,
    /// The flow's hash (picks the `ipip` outer source, as for the flow's own packets).
    hash: u32,
    seed: u32,
}

/// Sends an ICMP error about a VIP's flow to that flow's backend. Anything else is passed.
#[inline(always)]
pub fn forward_error(ctx: &XdpContext) -> u32 {
    let Some(mut error) = flow_error(ctx) else {
        return pass(idx::PASS_NOT_TCP_UDP);
    };
    let config = CONFIG.get(0);
    let (seed, flags) = config.map_or((0, 0), |c| (c.hash_seed, c.flags));
    let Some(vip) = lookup::find_vip(&error.packet.key, flags) else {
        // About a packet the LB sent to a nat backend: addressed to a nat address.
        if flags & CONFIG_HAS_NAT != 0 {
            let reason = crate::nat::hand_off(
                ctx,
                Some(&error.packet),
                crate::nat::ERROR_FROM_BACKEND,
                crate::nat::NO_CHOICE,
            );
            counters::global(reason);
            return xdp_action::XDP_DROP;
        }
        return pass(idx::PASS_NOT_VIP);
    };
    let hash = lookup::FlowHash::new(&error.packet.key, config);
    let Some((backend_id, backend)) = lookup::flow_backend(&error.packet.key, &hash, vip) else {
        return pass(idx::PASS_ICMP_NO_BACKEND);
    };
    if vip.mode == MODE_NAT {
        let with = crate::nat::HandOff {
            backend_id,
            vip_id: vip.vip_id,
            new_flow: false,
            rehash: false,
            hash: hash.get(),
        };
        let reason =
            crate::nat::hand_off(ctx, Some(&error.packet), crate::nat::ERROR_TO_BACKEND, with);
        return counters::sent_to_backend(
            vip.vip_id,
            backend_id,
            error.packet.l3_len,
            false,
            Err(reason),
        );
    }
    (error.hash, error.seed) = (hash.get(), seed);
    let sent = sent_from_word(send(ctx, &error, vip, backend));
    if sent.is_ok() {
        counters::global(idx::ICMP_ERROR_FORWARDED);
    }
    counters::sent_to_backend(vip.vip_id, backend_id, error.packet.l3_len, false, sent)
}

/// [`forward::dsr_or_ipip`] as a BPF-to-BPF call, so the encapsulation code is not inlined a
/// second time into the program's main path (its size costs TCP/UDP packets instruction-cache
/// misses, measurably).
/// The result comes back as one word ([`sent_from_word`]): returned through a pointer, LLVM
/// may hand the caller's stack address back in R0, which the verifier refuses.
#[inline(never)]
fn send(ctx: &XdpContext, error: &FlowError, vip: &VipMeta, backend: &Backend) -> u64 {
    let hash = lookup::FlowHash::known(&error.packet.key, error.seed, error.hash);
    match forward::dsr_or_ipip(ctx, &error.packet, vip, backend, &hash) {
        Ok(action) => action as u64,
        Err(reason) => SEND_FAILED | reason as u64,
    }
}

/// Marks a failure reason in [`send`]'s word.
const SEND_FAILED: u64 = 1 << 32;

#[inline(always)]
fn sent_from_word(word: u64) -> Result<u32, u32> {
    if word & SEND_FAILED != 0 {
        Err(word as u32)
    } else {
        Ok(word as u32)
    }
}

#[inline(always)]
fn flow_error(ctx: &XdpContext) -> Option<FlowError> {
    let (ether_type, l2_len) = parse_l2(ctx).ok()?;
    // parse::parse already checked the outer IP header (version, lengths, not a fragment).
    let (family, ip_len, l3_len, tos) = match ether_type {
        ETH_P_IPV4 => {
            let ip: &Ipv4Hdr = header(ctx, l2_len).ok()?;
            let icmp: &[u8; 2] = header(ctx, l2_len + ihl(ip.vihl)).ok()?;
            if ip.proto != PROTO_ICMP || !matches!(icmp[0], ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED)
            {
                return None;
            }
            let l3_len = u16::from_be_bytes(ip.tot_len) as usize;
            (FAMILY_IPV4, ihl(ip.vihl), l3_len, ip.tos)
        }
        ETH_P_IPV6 => {
            let ip: &Ipv6Hdr = header(ctx, l2_len).ok()?;
            let icmp: &[u8; 2] = header(ctx, l2_len + Ipv6Hdr::LEN).ok()?;
            // Errors carry no extension headers before ICMPv6 in practice; others are passed.
            if ip.next_hdr != PROTO_ICMPV6
                || !matches!(
                    icmp[0],
                    ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED
                )
            {
                return None;
            }
            let l3_len = Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize;
            (
                FAMILY_IPV6,
                Ipv6Hdr::LEN,
                l3_len,
                (ip.vcf[0] << 4) | (ip.vcf[1] >> 4),
            )
        }
        _ => return None,
    };
    let quoted = l2_len + ip_len + ICMP_HEADER_LEN;
    let mut flow = FlowKey {
        family,
        ..FlowKey::default()
    };
    // The quoted packet went VIP -> client: its destination is the flow's source.
    let ports_at = if family == FAMILY_IPV4 {
        let inner: &Ipv4Hdr = header(ctx, quoted).ok()?;
        if inner.vihl >> 4 != 4 || ihl(inner.vihl) < Ipv4Hdr::LEN {
            return None;
        }
        flow.proto = inner.proto;
        flow.src[..4].copy_from_slice(&inner.dst_addr);
        flow.dst[..4].copy_from_slice(&inner.src_addr);
        quoted + ihl(inner.vihl)
    } else {
        let inner: &Ipv6Hdr = header(ctx, quoted).ok()?;
        if inner.vcf[0] >> 4 != 6 {
            return None;
        }
        flow.proto = inner.next_hdr;
        flow.src = inner.dst_addr;
        flow.dst = inner.src_addr;
        quoted + Ipv6Hdr::LEN
    };
    if flow.proto != PROTO_TCP && flow.proto != PROTO_UDP || ports_at + 4 > l2_len + l3_len {
        return None;
    }
    let ports: &[u8; 4] = header(ctx, ports_at).ok()?;
    flow.sport = u16::from_ne_bytes([ports[2], ports[3]]);
    flow.dport = u16::from_ne_bytes([ports[0], ports[1]]);
    Some(FlowError {
        packet: Packet {
            l2_len,
            key: flow,
            l3_len: l3_len as u32,
            tos,
            tcp_flags: 0,
        },
        hash: 0,
        seed: 0,
    })
}

#[inline(always)]
fn ihl(vihl: u8) -> usize {
    ((vihl & 0x0f) as usize) * 4
}

/// A client packet that does not fit the tunnel to `backend`: answered with ICMP when the
/// client can act on it (IPv6, or IPv4 with DF), else passed as before. Not inlined, like [`forward_error`].
#[inline(never)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, backend: &Backend) -> u32 {
    let mtu = (backend.mtu as u32).saturating_sub(forward::outer_len(backend));
    let quote = if pkt.key.family == FAMILY_IPV6 {
        TOO_BIG_QUOTE_V6
    } else {
        TOO_BIG_QUOTE_V4
    };
    // Only a tiny configured MTU makes a refused packet shorter than the quote, and a frame
    // this large carries no Ethernet padding (anything after the IP packet is not ours to cut).
    if (pkt.key.family == FAMILY_IPV4 && !dont_fragment(ctx, pkt.l2_len))
        || (pkt.l3_len as usize) < quote
        || pkt.l2_len + pkt.l3_len as usize != frame_len(ctx)
    {
        return pass(idx::PASS_TOO_BIG);
    }
    if !rate_allows() {
        counters::global(idx::DROP_TOO_BIG_RATE_LIMITED);
        return xdp_action::XDP_DROP;
    }
    let written = if pkt.key.family == FAMILY_IPV6 {
        reply_v6(ctx, pkt, mtu)
    } else {
        reply_v4(ctx, pkt, mtu as u16)
    };
    match written {
        Ok(()) => {
            counters::global(idx::ICMP_TOO_BIG_SENT);
            xdp_action::XDP_TX
        }
        Err(()) => {
            counters::global(idx::DROP_INTERNAL);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn dont_fragment(ctx: &XdpContext, l2_len: usize) -> bool {
    header::<Ipv4Hdr>(ctx, l2_len).is_ok_and(|ip| u16::from_be_bytes(ip.frags) & IPV4_DF != 0)
}

/// Generic cell rate algorithm on a per-CPU "theoretical arrival time": one reply per
/// 1/rate seconds, with a burst of one second's worth. Lock-free, one u64 per CPU.
#[inline(always)]
fn rate_allows() -> bool {
    let per_sec = CONFIG.get(0).map_or(0, |c| c.icmp_too_big_per_sec) as u64;
    let Some(tat) = ICMP_TOO_BIG_RATE.get_ptr_mut(0) else {
        return false;
    };
    if per_sec == 0 {
        return false;
    }
    let interval = 1_000_000_000 / per_sec;
    // SAFETY: helper without arguments; per-CPU slot written only by this CPU.
    let now = unsafe { bpf_ktime_get_ns() };
    let tat = unsafe { &mut *tat };
    let next = if *tat > now { *tat } else { now };
    if next - now > 1_000_000_000 - interval {
        return false;
    }
    *tat = next + interval;
    true
}

/// Turns the frame into "fragmentation needed" from the VIP to the client: cut to the quote,
/// prepend IPv4 + ICMP headers, swap MACs. Layout after: L2 | IPv4 | ICMP | quote.
#[inline(always)]
fn reply_v4(ctx: &XdpContext, pkt: &Packet, mtu: u16) -> Result<(), ()> {
    const ADDED: usize = IPV4_HEADER_LEN as usize + ICMP_HEADER_LEN;
    let l2_len = pkt.l2_len;
    make_room(ctx, pkt, TOO_BIG_QUOTE_V4, ADDED, ETH_P_IPV4)?;
    let quoted: &Ipv4Hdr = header(ctx, l2_len + ADDED)?;
    let ip = ptr_at::<Ipv4Hdr>(ctx, l2_len)?;
    // SAFETY: bounds checked; the new header lies before the quote, they do not overlap.
    let ip = unsafe { &mut *ip };
    ip.vihl = 0x45;
    ip.tos = ICMP_TOS;
    ip.tot_len = ((ADDED + TOO_BIG_QUOTE_V4) as u16).to_be_bytes();
    ip.id = [0, 0];
    ip.frags = [0, 0];
    ip.ttl = OUTER_TTL;
    ip.proto = PROTO_ICMP;
    ip.check = [0, 0];
    ip.src_addr = quoted.dst_addr;
    ip.dst_addr = quoted.src_addr;
    ip.check = ipv4_checksum(ip).to_be_bytes();
    let message =
        ptr_at::<[u8; ICMP_HEADER_LEN + TOO_BIG_QUOTE_V4]>(ctx, l2_len + IPV4_HEADER_LEN as usize)?;
    // SAFETY: bounds checked.
    let message = unsafe { &mut *message };
    let mtu = mtu.to_be_bytes();
    message[..ICMP_HEADER_LEN].copy_from_slice(&[
        ICMP_DEST_UNREACH,
        ICMP_FRAG_NEEDED,
        0,
        0,
        0,
        0,
        mtu[0],
        mtu[1],
    ]);
    let sum = csum(
        message.as_mut_ptr(),
        (ICMP_HEADER_LEN + TOO_BIG_QUOTE_V4) as u32,
        0,
    )?;
    let check = fold(sum as u64).to_ne_bytes();
    message[2] = check[0];
    message[3] = check[1];
    Ok(())
}

/// Like [`reply_v4`] for IPv6: "packet too big", checksum over the pseudo-header too.
#[inline(always)]
fn reply_v6(ctx: &XdpContext, pkt: &Packet, mtu: u32) -> Result<(), ()> {
    const ADDED: usize = IPV6_HEADER_LEN as usize + ICMP_HEADER_LEN;
    const MESSAGE_LEN: usize = ICMP_HEADER_LEN + TOO_BIG_QUOTE_V6;
    let l2_len = pkt.l2_len;
    make_room(ctx, pkt, TOO_BIG_QUOTE_V6, ADDED, ETH_P_IPV6)?;
    let quoted: &Ipv6Hdr = header(ctx, l2_len + ADDED)?;
    let ip = ptr_at::<Ipv6Hdr>(ctx, l2_len)?;
    // SAFETY: bounds checked; the new header lies before the quote, they do not overlap.
    let ip = unsafe { &mut *ip };
    ip.vcf = [0x60, 0, 0, 0];
    ip.payload_len = (MESSAGE_LEN as u16).to_be_bytes();
    ip.next_hdr = PROTO_ICMPV6;
    ip.hop_limit = OUTER_TTL;
    ip.src_addr = quoted.dst_addr;
    ip.dst_addr = quoted.src_addr;
    let addresses = ptr_at::<[u8; 32]>(ctx, l2_len + 8)?;
    let message = ptr_at::<[u8; MESSAGE_LEN]>(ctx, l2_len + IPV6_HEADER_LEN as usize)?;
    // SAFETY: bounds checked.
    let message = unsafe { &mut *message };
    let mtu = mtu.to_be_bytes();
    message[..ICMP_HEADER_LEN].copy_from_slice(&[
        ICMPV6_PACKET_TOO_BIG,
        0,
        0,
        0,
        mtu[0],
        mtu[1],
        mtu[2],
        mtu[3],
    ]);
    // Pseudo-header: addresses, then upper-layer length and next header as 32-bit words.
    let sum = csum(addresses as *mut u8, 32, 0)?;
    let sum = csum(message.as_mut_ptr(), MESSAGE_LEN as u32, sum)? as u64
        + u16::from_ne_bytes((MESSAGE_LEN as u16).to_be_bytes()) as u64
        + u16::from_ne_bytes((PROTO_ICMPV6 as u16).to_be_bytes()) as u64;
    let check = fold(sum).to_ne_bytes();
    message[2] = check[0];
    message[3] = check[1];
    Ok(())
}

/// Cuts the frame to L2 + `quote` bytes of its IP packet and opens `added` bytes between the
/// L2 header and the quote; the L2 header moves to the front with its MACs swapped, so
/// `XDP_TX` returns the frame to the hop it came from.
#[inline(always)]
fn make_room(
    ctx: &XdpContext,
    pkt: &Packet,
    quote: usize,
    added: usize,
    ether_type: u16,
) -> Result<(), ()> {
    let l2_len = pkt.l2_len;
    // The frame ends with the IP packet (checked by the caller).
    let cut = pkt.l3_len as i32 - quote as i32;
    // SAFETY: helpers on our own context; they fail cleanly on a bad length.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -cut) } != 0
        || unsafe { bpf_xdp_adjust_head(ctx.ctx, -(added as i32)) } != 0
    {
        return Err(());
    }
    let old_macs = ptr_at::<[u8; 12]>(ctx, added)?;
    let macs = ptr_at::<[u8; 12]>(ctx, 0)?;
    // SAFETY: both bounds checked; they do not overlap (added >= 28).
    let (old_macs, macs) = unsafe { (&*old_macs, &mut *macs) };
    macs[..6].copy_from_slice(&old_macs[6..]);
    macs[6..].copy_from_slice(&old_macs[..6]);
    if l2_len > 14 {
        let tag = ptr_at::<[u8; 4]>(ctx, added + 12)?;
        let new_tag = ptr_at::<[u8; 4]>(ctx, 12)?;
        // SAFETY: as above.
        unsafe { *new_tag = *tag };
    }
    let new_ether_type = ptr_at::<[u8; 2]>(ctx, l2_len - 2)?;
    // SAFETY: bounds checked.
    unsafe { *new_ether_type = ether_type.to_be_bytes() };
    Ok(())
}

/// One's complement sum of `len` bytes (a multiple of 4) the caller bounds-checked, added to
/// `seed`, in the byte order of the data (store the folded result with `to_ne_bytes`).
#[inline(always)]
fn csum(data: *mut u8, len: u32, seed: u32) -> Result<u32, ()> {
    // SAFETY: the caller proved `len` bytes at `data` are inside the packet.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, data as *mut u32, len, seed) };
    if sum < 0 {
        return Err(());
    }
    Ok(sum as u32)
}

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
