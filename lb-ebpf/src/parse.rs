//! Bounds-checked packet access and header parsing.
//!
//! Every read goes through [`ptr_at`], which proves to the verifier that the access lies inside
//! the packet. Parsing never fails hard: an error names the counter of the reason the packet is
//! passed to the kernel stack untouched.

use aya_ebpf::programs::XdpContext;
use core::mem::{offset_of, size_of};
use lb_common::{counters, FlowKey, FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP, PROTO_UDP};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// IPv6 extension headers we step over (hop-by-hop, routing, destination options, and the
/// authentication header, whose length counts 4-byte units) and the fragment header, which
/// ends the walk (ports unknown).
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// Bounded walk: more extension headers than this before TCP/UDP is not traffic we serve.
const IPV6_MAX_EXT_HEADERS: usize = 4;

const IPV4_MF_OR_OFFSET: u16 = 0x3fff;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Returns a pointer to a `T` at `offset` bytes into the packet, or `Err` if it does not fit.
///
/// `data_end` is read with a volatile load on purpose: otherwise LLVM may prove this check
/// redundant from earlier length comparisons (e.g. IP length <= frame length) and delete it,
/// and the verifier, which cannot follow that reasoning, rejects the program.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    // SAFETY: reading a field of the context the kernel passed us.
    let end = unsafe { core::ptr::read_volatile(&(*ctx.ctx).data_end) } as usize;
    if start + offset + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// A header inside the packet, by reference: copying headers to the stack would exhaust the
/// 512-byte BPF stack once everything is inlined. Header types are byte arrays (alignment 1).
#[inline(always)]
pub fn header<'a, T>(ctx: &XdpContext, offset: usize) -> Result<&'a T, ()> {
    // SAFETY: ptr_at proved the bytes are inside the packet, which outlives the program run.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { &*p })
}

/// What the load balancer needs to know about a packet.
pub struct Packet {
    /// Length of the Ethernet header including a VLAN tag: 14 or 18.
    pub l2_len: usize,
    /// The 5-tuple, already in the flow table's key layout (ports in network byte order).
    pub key: FlowKey,
    /// IP packet length from the header (excludes Ethernet padding).
    pub l3_len: u32,
    /// IPv4 TOS or IPv6 traffic class, copied to an outer header.
    pub tos: u8,
    pub tcp_flags: u8,
}

impl Packet {
    pub fn is_tcp_syn_only(&self) -> bool {
        self.key.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
    pub fn is_tcp_ack_only(&self) -> bool {
        self.key.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK
    }
    pub fn is_tcp_fin(&self) -> bool {
        self.key.proto == PROTO_TCP && self.tcp_flags & TCP_FIN != 0
    }
    pub fn is_tcp_rst(&self) -> bool {
        self.key.proto == PROTO_TCP && self.tcp_flags & TCP_RST != 0
    }
}

/// Parses Ethernet with at most one VLAN tag; returns (ethertype, L2 header length).
#[inline(always)]
pub fn parse_l2(ctx: &XdpContext) -> Result<(u16, usize), u32> {
    let eth: &EthHdr = header(ctx, 0).map_err(|_| counters::PASS_MALFORMED)?;
    let ether_type = u16::from_be(eth.ether_type);
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: &VlanHdr = header(ctx, EthHdr::LEN).map_err(|_| counters::PASS_MALFORMED)?;
        return Ok((u16::from_be(vlan.ether_type), EthHdr::LEN + VlanHdr::LEN));
    }
    Ok((ether_type, EthHdr::LEN))
}

/// Parses a packet down to its ports. `Err` carries the pass-reason counter.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, u32> {
    parse_to_l4(ctx).map(|(pkt, _)| pkt)
}

/// [`parse`], and where the TCP/UDP header starts (`nat` rewrites ports and checksums
/// there). Kept out of [`Packet`]: a larger `Packet` costs the balancer's stack.
#[inline(always)]
pub fn parse_to_l4(ctx: &XdpContext) -> Result<(Packet, usize), u32> {
    let (ether_type, l2_len) = parse_l2(ctx)?;
    match ether_type {
        ETH_P_IPV4 => parse_ipv4(ctx, l2_len),
        ETH_P_IPV6 => parse_ipv6(ctx, l2_len),
        _ => Err(counters::PASS_NOT_IP),
    }
}

#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// A `u16`/`u32` field at `offset` in a header already proven to lie inside the packet, read
/// with one load instead of one per byte (network-types' fields are byte arrays, alignment
/// 1, which LLVM's BPF backend splits into byte loads, shifts and ors). Packet fields are
/// often not aligned to their size (an IPv4 address at frame offset 26): the BPF loads of
/// packet data this compiles to accept that on the architectures XDP runs on (the verifier
/// rejects a misaligned packet access only where the CPU lacks efficient unaligned access).
///
/// # Safety
/// `base + offset + size_of::<T>()` must lie inside a header checked with [`ptr_at`].
#[inline(always)]
pub unsafe fn load<T: Copy>(base: *const u8, offset: usize) -> T {
    // SAFETY: see above; `T` is a plain integer, every bit pattern is valid.
    unsafe { core::ptr::read(base.add(offset) as *const T) }
}

/// Stores a 32-bit word of the packet into the flow key at byte `offset` (a multiple of 4:
/// the key is 8-byte aligned, so this is one aligned store).
#[inline(always)]
fn set_key_word(key: &mut FlowKey, offset: usize, word: u32) {
    // SAFETY: inside the key and aligned (FlowKey is `align(8)`, offset a multiple of 4).
    unsafe { *((key as *mut FlowKey as *mut u8).add(offset) as *mut u32) = word }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l2_len: usize) -> Result<(Packet, usize), u32> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, l2_len).map_err(|_| counters::PASS_MALFORMED)? as *const u8;
    // SAFETY: all fields read below lie inside the 20 bytes ptr_at checked.
    let (vihl, tos, tot_len, frags, proto) = unsafe {
        (
            load::<u8>(ip, offset_of!(Ipv4Hdr, vihl)),
            load::<u8>(ip, offset_of!(Ipv4Hdr, tos)),
            load::<u16>(ip, offset_of!(Ipv4Hdr, tot_len)),
            load::<u16>(ip, offset_of!(Ipv4Hdr, frags)),
            load::<u8>(ip, offset_of!(Ipv4Hdr, proto)),
        )
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let l3_len = u16::from_be(tot_len) as usize;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || l3_len < ihl || l2_len + l3_len > frame_len(ctx) {
        return Err(counters::PASS_MALFORMED);
    }
    // Every fragment goes to the stack: later fragments carry no ports, so a first fragment
    // forwarded alone could never be reassembled by the backend.
    if u16::from_be(frags) & IPV4_MF_OR_OFFSET != 0 {
        return Err(counters::PASS_FRAGMENT);
    }
    let mut pkt = Packet {
        l2_len,
        key: FlowKey {
            proto,
            family: FAMILY_IPV4,
            ..FlowKey::default()
        },
        l3_len: l3_len as u32,
        tos,
        tcp_flags: 0,
    };
    // SAFETY: inside the checked header.
    let (src, dst) = unsafe {
        (
            load::<u32>(ip, offset_of!(Ipv4Hdr, src_addr)),
            load::<u32>(ip, offset_of!(Ipv4Hdr, dst_addr)),
        )
    };
    set_key_word(&mut pkt.key, offset_of!(FlowKey, src), src);
    set_key_word(&mut pkt.key, offset_of!(FlowKey, dst), dst);
    parse_l4(ctx, l2_len + ihl, &mut pkt)?;
    Ok((pkt, l2_len + ihl))
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l2_len: usize) -> Result<(Packet, usize), u32> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, l2_len).map_err(|_| counters::PASS_MALFORMED)? as *const u8;
    // SAFETY: inside the 40 bytes ptr_at checked.
    let (vcf, payload_len, next_hdr) = unsafe {
        (
            load::<[u8; 2]>(ip, offset_of!(Ipv6Hdr, vcf)),
            load::<u16>(ip, offset_of!(Ipv6Hdr, payload_len)),
            load::<u8>(ip, offset_of!(Ipv6Hdr, next_hdr)),
        )
    };
    let l3_len = Ipv6Hdr::LEN + u16::from_be(payload_len) as usize;
    if vcf[0] >> 4 != 6 || l2_len + l3_len > frame_len(ctx) {
        return Err(counters::PASS_MALFORMED);
    }
    let mut next = next_hdr;
    let mut offset = l2_len + Ipv6Hdr::LEN;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        let hdr_len = match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AUTH => {
                let ext: &[u8; 2] = header(ctx, offset).map_err(|_| counters::PASS_MALFORMED)?;
                let this = next;
                next = ext[0];
                if this == IPV6_AUTH {
                    (ext[1] as usize + 2) * 4
                } else {
                    (ext[1] as usize + 1) * 8
                }
            }
            IPV6_FRAGMENT => return Err(counters::PASS_FRAGMENT),
            _ => break,
        };
        offset += hdr_len;
    }
    let mut pkt = Packet {
        l2_len,
        key: FlowKey {
            proto: next,
            family: FAMILY_IPV6,
            ..FlowKey::default()
        },
        l3_len: l3_len as u32,
        tos: (vcf[0] << 4) | (vcf[1] >> 4),
        tcp_flags: 0,
    };
    let mut i = 0;
    while i < 16 {
        // SAFETY: inside the checked header.
        let (src, dst) = unsafe {
            (
                load::<u32>(ip, offset_of!(Ipv6Hdr, src_addr) + i),
                load::<u32>(ip, offset_of!(Ipv6Hdr, dst_addr) + i),
            )
        };
        set_key_word(&mut pkt.key, offset_of!(FlowKey, src) + i, src);
        set_key_word(&mut pkt.key, offset_of!(FlowKey, dst) + i, dst);
        i += 4;
    }
    parse_l4(ctx, offset, &mut pkt)?;
    Ok((pkt, offset))
}

/// Reads the ports (both at once: they sit in the key in packet order) and the TCP flags.
/// Headers must end inside the IP packet, not in Ethernet padding after it.
#[inline(always)]
fn parse_l4(ctx: &XdpContext, offset: usize, pkt: &mut Packet) -> Result<(), u32> {
    let l3_end = pkt.l2_len + pkt.l3_len as usize;
    let ports = match pkt.key.proto {
        PROTO_TCP => {
            if offset + TcpHdr::LEN > l3_end {
                return Err(counters::PASS_MALFORMED);
            }
            let tcp =
                ptr_at::<TcpHdr>(ctx, offset).map_err(|_| counters::PASS_MALFORMED)? as *const u8;
            // SAFETY: inside the 20 bytes ptr_at checked. The bitfield's two bytes are the
            // data offset (high nibble), then the flags (FIN, SYN, RST, PSH, ACK... from bit 0).
            let (ports, doff, flags) = unsafe {
                (
                    load::<u32>(tcp, offset_of!(TcpHdr, source)),
                    load::<u8>(tcp, offset_of!(TcpHdr, _bitfield_1)),
                    load::<u8>(tcp, offset_of!(TcpHdr, _bitfield_1) + 1),
                )
            };
            if ((doff >> 4) as usize) * 4 < TcpHdr::LEN {
                return Err(counters::PASS_MALFORMED);
            }
            pkt.tcp_flags = flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK);
            ports
        }
        PROTO_UDP => {
            if offset + UdpHdr::LEN > l3_end {
                return Err(counters::PASS_MALFORMED);
            }
            let udp =
                ptr_at::<UdpHdr>(ctx, offset).map_err(|_| counters::PASS_MALFORMED)? as *const u8;
            // SAFETY: inside the 8 bytes ptr_at checked.
            unsafe { load::<u32>(udp, offset_of!(UdpHdr, src)) }
        }
        _ => return Err(counters::PASS_NOT_TCP_UDP),
    };
    set_key_word(&mut pkt.key, offset_of!(FlowKey, sport), ports);
    Ok(())
}
