//! Packet builder and hex diff for XDP packet tests.
//!
//! A test describes its input and its expected output with the same builder, runs the
//! program with `BPF_PROG_TEST_RUN`, and compares bytes with [`hex_diff`]. Lengths and
//! checksums are filled in by [`Packet::build`]; the result is a plain `Vec<u8>`, so a test
//! that wants a malformed packet corrupts it afterwards (see [`l3_offset`], [`l4_offset`]).
//!
//! Layer methods (`eth`, `vlan`, `ipv4`, `ipv6`, `tcp`, `udp`, `icmp`, ...) choose the
//! layers; field methods (`ttl`, `df`, `seq`, `flags`, ...) change the IP or transport layer
//! chosen so far and panic, at the caller's line, when that layer is missing.
//!
//! ```
//! use std::net::Ipv4Addr;
//! use xdplb_tests::packet::{hex_diff, Packet, TCP_SYN};
//!
//! const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
//! const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
//! const NEXTHOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
//! let (client, vip) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 100));
//!
//! let input = Packet::new()
//!     .eth(CLIENT_MAC, LB_MAC)
//!     .ipv4(client, vip)
//!     .tcp(40000, 80)
//!     .flags(TCP_SYN)
//!     .seq(1)
//!     .payload(b"hello")
//!     .build();
//!
//! // The load balancer's output: the client's IP packet (no Ethernet) inside IPIP.
//! let inner = Packet::new().ipv4(client, vip).tcp(40000, 80).flags(TCP_SYN).seq(1)
//!     .payload(b"hello").build();
//! let expected = Packet::new()
//!     .eth(LB_MAC, NEXTHOP_MAC)
//!     .ipv4(Ipv4Addr::new(172, 16, 0, 1), Ipv4Addr::new(10, 1, 0, 7))
//!     .df()
//!     .ip_in_ip(&inner)
//!     .build();
//!
//! assert_eq!(expected[14 + 9], 4); // IPv4 protocol: IPIP
//! assert_eq!(hex_diff(&input[14..], &inner), None);
//! ```

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// TCP flag bits, combined with `|` and passed to [`Packet::flags`].
pub const TCP_FIN: u8 = 0x01;
/// See [`TCP_FIN`].
pub const TCP_SYN: u8 = 0x02;
/// See [`TCP_FIN`].
pub const TCP_RST: u8 = 0x04;
/// See [`TCP_FIN`].
pub const TCP_PSH: u8 = 0x08;
/// See [`TCP_FIN`].
pub const TCP_ACK: u8 = 0x10;
/// See [`TCP_FIN`].
pub const TCP_URG: u8 = 0x20;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_IPV6: u16 = 0x86dd;

const PROTO_HOPOPTS: u8 = 0;
const PROTO_ICMP: u8 = 1;
const PROTO_IPIP: u8 = 4;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_IPV6: u8 = 41;
const PROTO_ROUTING: u8 = 43;
const PROTO_FRAGMENT: u8 = 44;
const PROTO_ICMPV6: u8 = 58;
const PROTO_DSTOPTS: u8 = 60;

/// Builder for one packet; see the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Packet {
    /// (source, destination).
    eth: Option<([u8; 6], [u8; 6])>,
    vlan_tci: Option<u16>,
    ethertype: Option<u16>,
    l3: Option<L3>,
    l4: Option<L4>,
    payload: Vec<u8>,
}

#[derive(Clone, Debug)]
enum L3 {
    Ip(Ip),
    /// Anything that is not IP (ARP included) is carried as finished bytes.
    Raw(u16, Vec<u8>),
}

/// One struct for both versions keeps the shared setters (`ttl`, `tos`, `protocol`) trivial;
/// version-specific setters check the version instead.
#[derive(Clone, Debug)]
struct Ip {
    src: IpAddr,
    dst: IpAddr,
    tos: u8,
    ttl: u8,
    protocol: Option<u8>,
    id: u16,
    /// The IPv4 flags + fragment offset word.
    frag: u16,
    options: Vec<u8>,
    flow_label: u32,
    /// IPv6 extension headers as (own protocol number, encoded header whose first byte,
    /// the next-header field, is filled in by `build` once the chain is known).
    ext: Vec<(u8, Vec<u8>)>,
}

#[derive(Clone, Debug)]
enum L4 {
    Tcp(Tcp),
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMPv4 or ICMPv6, decided by the IP layer.
    Icmp {
        typ: u8,
        code: u8,
        rest: [u8; 4],
    },
}

#[derive(Clone, Debug)]
struct Tcp {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    options: Vec<u8>,
}

impl Packet {
    /// An empty packet; add layers with the methods below.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ethernet header. Arguments are (source, destination), like [`Packet::ipv4`], although
    /// the wire order is destination first. Without this call `build` returns the L3 packet.
    pub fn eth(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.eth = Some((src, dst));
        self
    }

    /// One 802.1Q tag with this TCI (priority bits included; `vlan(100)` is VLAN 100).
    pub fn vlan(mut self, tci: u16) -> Self {
        self.vlan_tci = Some(tci);
        self
    }

    /// Overrides the ethertype that is otherwise derived from the L3 layer. With no L3 layer
    /// it is required, and [`Packet::payload`] then follows the Ethernet header directly.
    pub fn ethertype(mut self, ethertype: u16) -> Self {
        self.ethertype = Some(ethertype);
        self
    }

    /// IPv4 header: TTL 64, id 0, no flags, no options.
    pub fn ipv4(self, src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        self.ip(src.into(), dst.into())
    }

    /// IPv6 header: hop limit 64, traffic class and flow label 0, no extension headers.
    pub fn ipv6(self, src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        self.ip(src.into(), dst.into())
    }

    fn ip(mut self, src: IpAddr, dst: IpAddr) -> Self {
        self.l3 = Some(L3::Ip(Ip {
            src,
            dst,
            tos: 0,
            ttl: 64,
            protocol: None,
            id: 0,
            frag: 0,
            options: Vec::new(),
            flow_label: 0,
            ext: Vec::new(),
        }));
        self
    }

    /// ARP request (Ethernet/IPv4) from `sender` asking for `target`; ethertype 0x0806.
    pub fn arp_request(mut self, sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Self {
        let mut arp = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
        arp.extend(sender_mac);
        arp.extend(sender.octets());
        arp.extend([0; 6]);
        arp.extend(target.octets());
        self.l3 = Some(L3::Raw(ETH_P_ARP, arp));
        self
    }

    /// A non-IP L3 layer given as raw bytes, e.g. `raw_l3(0x88cc, b"junk")` for LLDP.
    pub fn raw_l3(mut self, ethertype: u16, bytes: &[u8]) -> Self {
        self.l3 = Some(L3::Raw(ethertype, bytes.to_vec()));
        self
    }

    /// IPv4 TTL or IPv6 hop limit.
    #[track_caller]
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ip_mut().ttl = ttl;
        self
    }

    /// IPv4 TOS or IPv6 traffic class (DSCP and ECN).
    #[track_caller]
    pub fn tos(mut self, tos: u8) -> Self {
        self.ip_mut().tos = tos;
        self
    }

    /// IPv4 protocol or IPv6 upper-layer next header, overriding the one derived from the
    /// transport layer. Required when there is no transport layer; the transport checksum,
    /// if any, still uses the transport's own protocol number.
    #[track_caller]
    pub fn protocol(mut self, protocol: u8) -> Self {
        self.ip_mut().protocol = Some(protocol);
        self
    }

    /// IPv4 identification.
    #[track_caller]
    pub fn id(mut self, id: u16) -> Self {
        self.ipv4_mut().id = id;
        self
    }

    /// Sets IPv4 Don't Fragment.
    #[track_caller]
    pub fn df(mut self) -> Self {
        self.ipv4_mut().frag |= 0x4000;
        self
    }

    /// Sets IPv4 More Fragments.
    #[track_caller]
    pub fn mf(mut self) -> Self {
        self.ipv4_mut().frag |= 0x2000;
        self
    }

    /// IPv4 fragment offset in 8-byte units (the raw 13-bit field).
    #[track_caller]
    pub fn frag_offset(mut self, units: u16) -> Self {
        assert!(
            units <= 0x1fff,
            "fragment offset {units} does not fit 13 bits"
        );
        let ip = self.ipv4_mut();
        ip.frag = ip.frag & 0xe000 | units;
        self
    }

    /// IPv4 options, zero-padded (End of Options List) to 4 bytes; IHL follows.
    #[track_caller]
    pub fn ipv4_options(mut self, options: &[u8]) -> Self {
        assert!(options.len() <= 40, "IPv4 options are at most 40 bytes");
        self.ipv4_mut().options = options.to_vec();
        self
    }

    /// IPv6 flow label (20 bits).
    #[track_caller]
    pub fn flow_label(mut self, label: u32) -> Self {
        assert!(
            label <= 0xf_ffff,
            "flow label {label:#x} does not fit 20 bits"
        );
        self.ipv6_mut().flow_label = label;
        self
    }

    /// Appends an IPv6 hop-by-hop options header holding these TLV options, PadN-padded.
    /// Extension headers are chained in call order.
    #[track_caller]
    pub fn hop_by_hop(mut self, options: &[u8]) -> Self {
        self.ipv6_mut()
            .ext
            .push((PROTO_HOPOPTS, tlv_ext_header(options)));
        self
    }

    /// Appends an IPv6 destination options header; see [`Packet::hop_by_hop`].
    #[track_caller]
    pub fn dest_opts(mut self, options: &[u8]) -> Self {
        self.ipv6_mut()
            .ext
            .push((PROTO_DSTOPTS, tlv_ext_header(options)));
        self
    }

    /// Appends an IPv6 routing header; `data` follows the segments-left byte (for types 0
    /// and 2 it starts with 4 reserved bytes) and is zero-padded to a multiple of 8 bytes.
    /// Checksums keep using the IPv6 header's destination, not the routing header's final one.
    #[track_caller]
    pub fn routing(mut self, routing_type: u8, segments_left: u8, data: &[u8]) -> Self {
        let mut h = vec![0, 0, routing_type, segments_left];
        h.extend(data);
        h.resize(h.len().next_multiple_of(8), 0);
        h[1] = ext_len_field(h.len());
        self.ipv6_mut().ext.push((PROTO_ROUTING, h));
        self
    }

    /// Appends an IPv6 fragment header; `offset` is in 8-byte units (13 bits).
    #[track_caller]
    pub fn fragment(mut self, offset: u16, more: bool, id: u32) -> Self {
        assert!(
            offset <= 0x1fff,
            "fragment offset {offset} does not fit 13 bits"
        );
        let mut h = vec![0, 0];
        h.extend((offset << 3 | u16::from(more)).to_be_bytes());
        h.extend(id.to_be_bytes());
        self.ipv6_mut().ext.push((PROTO_FRAGMENT, h));
        self
    }

    /// TCP header: seq and ack 0, no flags, window 65535, no options.
    #[track_caller]
    pub fn tcp(mut self, sport: u16, dport: u16) -> Self {
        self.ip_mut();
        self.l4 = Some(L4::Tcp(Tcp {
            sport,
            dport,
            seq: 0,
            ack: 0,
            flags: 0,
            window: 65535,
            options: Vec::new(),
        }));
        self
    }

    /// TCP flags, e.g. `TCP_SYN | TCP_ACK`.
    #[track_caller]
    pub fn flags(mut self, flags: u8) -> Self {
        self.tcp_mut().flags = flags;
        self
    }

    /// TCP sequence number.
    #[track_caller]
    pub fn seq(mut self, seq: u32) -> Self {
        self.tcp_mut().seq = seq;
        self
    }

    /// TCP acknowledgement number (does not set [`TCP_ACK`]).
    #[track_caller]
    pub fn ack(mut self, ack: u32) -> Self {
        self.tcp_mut().ack = ack;
        self
    }

    /// TCP window.
    #[track_caller]
    pub fn window(mut self, window: u16) -> Self {
        self.tcp_mut().window = window;
        self
    }

    /// TCP options, zero-padded (End of Option List) to 4 bytes; data offset follows.
    #[track_caller]
    pub fn tcp_options(mut self, options: &[u8]) -> Self {
        assert!(options.len() <= 40, "TCP options are at most 40 bytes");
        self.tcp_mut().options = options.to_vec();
        self
    }

    /// UDP header.
    #[track_caller]
    pub fn udp(mut self, sport: u16, dport: u16) -> Self {
        self.ip_mut();
        self.l4 = Some(L4::Udp { sport, dport });
        self
    }

    /// ICMP header (ICMPv6 over IPv6): type, code and the 4 type-specific bytes that follow
    /// the checksum. The message body is [`Packet::payload`], e.g. a neighbour solicitation
    /// is `icmp(135, 0, [0; 4]).payload(&target.octets())`.
    #[track_caller]
    pub fn icmp(mut self, typ: u8, code: u8, rest: [u8; 4]) -> Self {
        self.ip_mut();
        self.l4 = Some(L4::Icmp { typ, code, rest });
        self
    }

    /// ICMP echo request: type 8, or 128 over IPv6.
    #[track_caller]
    pub fn icmp_echo_request(self, id: u16, seq: u16) -> Self {
        let typ = if self.is_ipv6() { 128 } else { 8 };
        self.icmp(typ, 0, echo_rest(id, seq))
    }

    /// ICMP echo reply: type 0, or 129 over IPv6.
    #[track_caller]
    pub fn icmp_echo_reply(self, id: u16, seq: u16) -> Self {
        let typ = if self.is_ipv6() { 129 } else { 0 };
        self.icmp(typ, 0, echo_rest(id, seq))
    }

    /// Makes the IP packet `inner` (e.g. built without [`Packet::eth`]) the payload, with
    /// protocol 4 (IPv4 inside) or 41 (IPv6 inside) taken from its version nibble.
    #[track_caller]
    pub fn ip_in_ip(self, inner: &[u8]) -> Self {
        let protocol = match inner.first().map(|b| b >> 4) {
            Some(4) => PROTO_IPIP,
            Some(6) => PROTO_IPV6,
            v => panic!("ip_in_ip: inner packet is not IPv4 or IPv6 (version {v:?})"),
        };
        self.protocol(protocol).payload(inner)
    }

    /// Appends bytes after the last header (transport, IP, raw L3 or Ethernet).
    pub fn payload(mut self, bytes: &[u8]) -> Self {
        self.payload.extend_from_slice(bytes);
        self
    }

    /// The packet bytes with lengths and checksums filled in. No padding to the Ethernet
    /// minimum frame size is added.
    #[track_caller]
    pub fn build(&self) -> Vec<u8> {
        let l3 = match &self.l3 {
            Some(L3::Ip(ip)) => ip.build(self.l4.as_ref(), &self.payload),
            Some(L3::Raw(_, bytes)) => [bytes.as_slice(), &self.payload].concat(),
            None => self.payload.clone(),
        };
        let Some((src, dst)) = self.eth else {
            assert!(self.vlan_tci.is_none(), "vlan() needs eth()");
            return l3;
        };
        let ethertype = self.ethertype.unwrap_or_else(|| match &self.l3 {
            Some(L3::Ip(ip)) if ip.src.is_ipv4() => ETH_P_IPV4,
            Some(L3::Ip(_)) => ETH_P_IPV6,
            Some(L3::Raw(ethertype, _)) => *ethertype,
            None => panic!("eth() without an L3 layer needs ethertype()"),
        });
        let mut frame = [dst, src].concat();
        if let Some(tci) = self.vlan_tci {
            frame.extend(ETH_P_8021Q.to_be_bytes());
            frame.extend(tci.to_be_bytes());
        }
        frame.extend(ethertype.to_be_bytes());
        frame.extend(l3);
        frame
    }

    fn is_ipv6(&self) -> bool {
        matches!(&self.l3, Some(L3::Ip(ip)) if ip.src.is_ipv6())
    }

    #[track_caller]
    fn ip_mut(&mut self) -> &mut Ip {
        match &mut self.l3 {
            Some(L3::Ip(ip)) => ip,
            _ => panic!("this needs an IP layer: call ipv4() or ipv6() first"),
        }
    }

    #[track_caller]
    fn ipv4_mut(&mut self) -> &mut Ip {
        let ip = self.ip_mut();
        assert!(ip.src.is_ipv4(), "this is an IPv4 field: call ipv4() first");
        ip
    }

    #[track_caller]
    fn ipv6_mut(&mut self) -> &mut Ip {
        let ip = self.ip_mut();
        assert!(ip.src.is_ipv6(), "this is an IPv6 field: call ipv6() first");
        ip
    }

    #[track_caller]
    fn tcp_mut(&mut self) -> &mut Tcp {
        match &mut self.l4 {
            Some(L4::Tcp(tcp)) => tcp,
            _ => panic!("this is a TCP field: call tcp() first"),
        }
    }
}

impl Ip {
    #[track_caller]
    fn build(&self, l4: Option<&L4>, payload: &[u8]) -> Vec<u8> {
        let segment = l4.map_or_else(|| payload.to_vec(), |l4| l4.segment(self, payload));
        let protocol = self
            .protocol
            .or(l4.map(|l4| l4.protocol(self)))
            .expect("no transport layer: set the IP protocol with protocol()");
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut options = self.options.clone();
                options.resize(options.len().next_multiple_of(4), 0);
                let header_len = 20 + options.len();
                let total = u16::try_from(header_len + segment.len())
                    .expect("IPv4 packet longer than 65535 bytes");
                let mut h = vec![0x40 | (header_len / 4) as u8, self.tos];
                h.extend(total.to_be_bytes());
                h.extend(self.id.to_be_bytes());
                h.extend(self.frag.to_be_bytes());
                h.extend([self.ttl, protocol, 0, 0]);
                h.extend(src.octets());
                h.extend(dst.octets());
                h.extend(options);
                let sum = internet_checksum(&h);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                h.extend(segment);
                h
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut ext = Vec::new();
                for (i, (_, header)) in self.ext.iter().enumerate() {
                    let next = self.ext.get(i + 1).map_or(protocol, |(p, _)| *p);
                    ext.push(next);
                    ext.extend(&header[1..]);
                }
                let payload_len = u16::try_from(ext.len() + segment.len())
                    .expect("IPv6 payload longer than 65535 bytes");
                let first = self.ext.first().map_or(protocol, |(p, _)| *p);
                let word = 6 << 28 | u32::from(self.tos) << 20 | self.flow_label;
                let mut h = word.to_be_bytes().to_vec();
                h.extend(payload_len.to_be_bytes());
                h.extend([first, self.ttl]);
                h.extend(src.octets());
                h.extend(dst.octets());
                h.extend(ext);
                h.extend(segment);
                h
            }
            _ => unreachable!("ipv4()/ipv6() take addresses of one family"),
        }
    }

    /// Checksum of `segment` preceded by the IPv4 or IPv6 pseudo-header.
    fn pseudo_checksum(&self, protocol: u8, segment: &[u8]) -> u16 {
        let mut data = Vec::with_capacity(40 + segment.len());
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                data.extend(src.octets());
                data.extend(dst.octets());
                data.extend([0, protocol]);
                data.extend((segment.len() as u16).to_be_bytes());
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                data.extend(src.octets());
                data.extend(dst.octets());
                data.extend((segment.len() as u32).to_be_bytes());
                data.extend([0, 0, 0, protocol]);
            }
            _ => unreachable!("ipv4()/ipv6() take addresses of one family"),
        }
        data.extend_from_slice(segment);
        internet_checksum(&data)
    }
}

impl L4 {
    fn protocol(&self, ip: &Ip) -> u8 {
        match self {
            L4::Tcp(_) => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
            L4::Icmp { .. } if ip.src.is_ipv6() => PROTO_ICMPV6,
            L4::Icmp { .. } => PROTO_ICMP,
        }
    }

    /// Header and payload with length and checksum filled in.
    fn segment(&self, ip: &Ip, payload: &[u8]) -> Vec<u8> {
        let mut s = Vec::with_capacity(60 + payload.len());
        let checksum_at = match self {
            L4::Tcp(t) => {
                let mut options = t.options.clone();
                options.resize(options.len().next_multiple_of(4), 0);
                let data_offset = ((20 + options.len()) / 4) as u8;
                s.extend(t.sport.to_be_bytes());
                s.extend(t.dport.to_be_bytes());
                s.extend(t.seq.to_be_bytes());
                s.extend(t.ack.to_be_bytes());
                s.extend([data_offset << 4, t.flags]);
                s.extend(t.window.to_be_bytes());
                s.extend([0; 4]); // checksum, urgent pointer
                s.extend(options);
                16
            }
            L4::Udp { sport, dport } => {
                let len = u16::try_from(8 + payload.len()).expect("UDP datagram too long");
                s.extend(sport.to_be_bytes());
                s.extend(dport.to_be_bytes());
                s.extend(len.to_be_bytes());
                s.extend([0; 2]);
                6
            }
            L4::Icmp { typ, code, rest } => {
                s.extend([*typ, *code, 0, 0]);
                s.extend(rest);
                2
            }
        };
        s.extend_from_slice(payload);
        let protocol = self.protocol(ip);
        let sum = match self {
            // Zero means "no checksum" in UDP, so a computed zero is sent as all ones.
            L4::Udp { .. } => match ip.pseudo_checksum(protocol, &s) {
                0 => 0xffff,
                sum => sum,
            },
            // ICMPv4, unlike ICMPv6, has no pseudo-header.
            L4::Icmp { .. } if protocol == PROTO_ICMP => internet_checksum(&s),
            _ => ip.pseudo_checksum(protocol, &s),
        };
        s[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
        s
    }
}

fn echo_rest(id: u16, seq: u16) -> [u8; 4] {
    (u32::from(id) << 16 | u32::from(seq)).to_be_bytes()
}

/// Hop-by-hop / destination options header: TLV options padded to 8 bytes with Pad1/PadN.
fn tlv_ext_header(options: &[u8]) -> Vec<u8> {
    let mut h = vec![0, 0];
    h.extend(options);
    match h.len().next_multiple_of(8) - h.len() {
        0 => {}
        1 => h.push(0),
        n => {
            h.extend([1, n as u8 - 2]);
            h.resize(h.len() + n - 2, 0);
        }
    }
    h[1] = ext_len_field(h.len());
    h
}

/// The "Hdr Ext Len" field: length in 8-byte units, not counting the first 8 bytes.
#[track_caller]
fn ext_len_field(len: usize) -> u8 {
    u8::try_from(len / 8 - 1).expect("IPv6 extension header longer than 2048 bytes")
}

/// RFC 1071 Internet checksum of `data` (odd length padded with a zero byte), as a number
/// to store big-endian. Over data that already holds a correct checksum it returns 0.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u64 = data
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether the IPv4 header at the start of `ip` (options included, per IHL) has a
/// correct checksum.
pub fn checksum_ok_ipv4_header(ip: &[u8]) -> bool {
    let header_len = ip.first().map_or(0, |b| usize::from(b & 0x0f) * 4);
    header_len >= 20 && ip.len() >= header_len && internet_checksum(&ip[..header_len]) == 0
}

/// Offset of the L3 header in an Ethernet frame, after the 802.1Q tag if there is one.
pub fn l3_offset(frame: &[u8]) -> usize {
    if frame[12..14] == ETH_P_8021Q.to_be_bytes() {
        18
    } else {
        14
    }
}

/// Offset of the transport header (or of the inner packet of IP-in-IP) in an Ethernet
/// frame carrying IPv4 or IPv6: after IPv4 options and IPv6 extension headers.
#[track_caller]
pub fn l4_offset(frame: &[u8]) -> usize {
    let l3 = l3_offset(frame);
    match frame[l3] >> 4 {
        4 => l3 + usize::from(frame[l3] & 0x0f) * 4,
        6 => {
            let (mut next, mut at) = (frame[l3 + 6], l3 + 40);
            while matches!(
                next,
                PROTO_HOPOPTS | PROTO_ROUTING | PROTO_DSTOPTS | PROTO_FRAGMENT
            ) {
                let len = match next {
                    PROTO_FRAGMENT => 8,
                    _ => (usize::from(frame[at + 1]) + 1) * 8,
                };
                next = frame[at];
                at += len;
            }
            at
        }
        v => panic!("l4_offset: IP version {v} at offset {l3}"),
    }
}

/// `None` if the packets are equal, otherwise a report with both lengths, the first
/// differing offset, and side-by-side 16-byte rows around each difference, differing bytes
/// in brackets. A byte missing from the shorter packet is left blank.
pub fn hex_diff(expected: &[u8], actual: &[u8]) -> Option<String> {
    let len = expected.len().max(actual.len());
    let differs = |i: usize| expected.get(i) != actual.get(i);
    let first = (0..len).find(|&i| differs(i))?;
    let rows = len.div_ceil(16);
    let row_differs = |row: usize| (row * 16..(row + 1) * 16).any(differs);
    // One row of context either side places a difference within its header.
    let shown = |row: usize| (row.saturating_sub(1)..(row + 2).min(rows)).any(row_differs);

    let mut out = format!(
        "packets differ: expected {} bytes, actual {} bytes, first difference at offset {first} ({first:#06x})\n",
        expected.len(),
        actual.len()
    );
    let _ = writeln!(out, "offset {:<64} | actual", " expected");
    let mut skipped = false;
    for row in 0..rows {
        if !shown(row) {
            skipped = true;
            continue;
        }
        if std::mem::take(&mut skipped) {
            out.push_str("...\n");
        }
        let line = format!(
            "{:#06x} {} | {}",
            row * 16,
            hex_row(expected, actual, row),
            hex_row(actual, expected, row)
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if skipped {
        out.push_str("...\n");
    }
    Some(out)
}

/// Row `row` of `bytes` as 4-character cells: " xx " when it matches `other`, "[xx]" when not.
fn hex_row(bytes: &[u8], other: &[u8], row: usize) -> String {
    (row * 16..(row + 1) * 16)
        .map(|i| match bytes.get(i) {
            Some(b) if other.get(i) == Some(b) => format!(" {b:02x} "),
            Some(b) => format!("[{b:02x}]"),
            None => "    ".to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    const B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
    const V4_SRC: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const V4_DST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
    const V6_SRC: Ipv6Addr = Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 1);
    const V6_DST: Ipv6Addr = Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0x100);

    /// Whitespace-separated hex bytes, so vectors can be laid out one header per line.
    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    #[track_caller]
    fn assert_bytes(expected: &[u8], actual: &[u8]) {
        if let Some(diff) = hex_diff(expected, actual) {
            panic!("{diff}");
        }
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: these words sum to ddf2, so the checksum is its complement.
        assert_eq!(internet_checksum(&hex("00 01 f2 03 f4 f5 f6 f7")), !0xddf2);
        // An odd trailing byte counts as the high byte of a zero-padded word.
        assert_eq!(internet_checksum(&[0x01]), !0x0100);
    }

    // Expected vectors were computed independently with a small Python struct script.

    #[test]
    fn ipv4_tcp_vector() {
        let pkt = Packet::new()
            .eth(A_MAC, B_MAC)
            .ipv4(V4_SRC, V4_DST)
            .tcp(40000, 80)
            .flags(TCP_SYN)
            .seq(1)
            .payload(b"hello")
            .build();
        let expected = hex("
            02 00 00 00 00 02  02 00 00 00 00 01  08 00
            45 00 00 2d 00 00 00 00 40 06 66 67 0a 00 00 01 0a 00 00 64
            9c 40 00 50 00 00 00 01 00 00 00 00 50 02 ff ff bb 15 00 00
            68 65 6c 6c 6f");
        assert_bytes(&expected, &pkt);
        assert!(checksum_ok_ipv4_header(&pkt[14..]));
    }

    #[test]
    fn ipv6_udp_vector() {
        let pkt = Packet::new()
            .eth(A_MAC, B_MAC)
            .ipv6(V6_SRC, V6_DST)
            .tos(0x10)
            .flow_label(0x12345)
            .udp(5353, 53)
            .payload(b"xdplb")
            .build();
        let expected = hex("
            02 00 00 00 00 02  02 00 00 00 00 01  86 dd
            61 01 23 45 00 0d 11 40
            fc 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01
            fc 00 00 00 00 00 00 00 00 00 00 00 00 00 01 00
            14 e9 00 35 00 0d a6 e2
            78 64 70 6c 62");
        assert_bytes(&expected, &pkt);
    }

    #[test]
    fn icmpv6_neighbour_solicitation_vector() {
        let target = V6_DST.octets();
        let source_lladdr_option = [[1, 1].as_slice(), &A_MAC].concat();
        let pkt = Packet::new()
            .eth(A_MAC, [0x33, 0x33, 0xff, 0x00, 0x01, 0x00])
            .ipv6(
                Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
                Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 0x100),
            )
            .ttl(255)
            .icmp(135, 0, [0; 4])
            .payload(&target)
            .payload(&source_lladdr_option)
            .build();
        let expected = hex("
            33 33 ff 00 01 00  02 00 00 00 00 01  86 dd
            60 00 00 00 00 20 3a ff
            fe 80 00 00 00 00 00 00 00 00 00 00 00 00 00 01
            ff 02 00 00 00 00 00 00 00 00 00 01 ff 00 01 00
            87 00 7b 1b 00 00 00 00
            fc 00 00 00 00 00 00 00 00 00 00 00 00 00 01 00
            01 01 02 00 00 00 00 01");
        assert_bytes(&expected, &pkt);
    }

    #[test]
    fn icmpv4_echo() {
        let request = Packet::new()
            .ipv4(V4_SRC, V4_DST)
            .icmp_echo_request(0x1234, 1)
            .payload(b"ping")
            .build();
        assert_eq!(request[9], 1);
        assert_bytes(&hex("08 00 06 fa 12 34 00 01 70 69 6e 67"), &request[20..]);
        let reply = Packet::new()
            .ipv4(V4_DST, V4_SRC)
            .icmp_echo_reply(0x1234, 1)
            .build();
        assert_eq!(reply[20], 0);
        assert_eq!(internet_checksum(&reply[20..]), 0);
        let reply6 = Packet::new()
            .ipv6(V6_DST, V6_SRC)
            .icmp_echo_reply(7, 1)
            .build();
        assert_eq!((reply6[6], reply6[40]), (58, 129));
    }

    #[test]
    fn transport_checksums_verify_over_pseudo_header() {
        for pkt in [
            Packet::new().ipv4(V4_SRC, V4_DST).udp(1, 2).payload(b"odd"),
            Packet::new()
                .ipv6(V6_SRC, V6_DST)
                .tcp(1, 2)
                .flags(TCP_ACK | TCP_PSH)
                .ack(7)
                .tcp_options(&[2, 4, 0x05, 0xb4, 1]),
        ] {
            let bytes = pkt.build();
            let (header_len, pseudo) = if bytes[0] >> 4 == 4 {
                let l4_len = bytes.len() as u16 - 20;
                (
                    20,
                    [&bytes[12..20], &[0, bytes[9]], &l4_len.to_be_bytes()[..]].concat(),
                )
            } else {
                let l4_len = bytes.len() as u32 - 40;
                (
                    40,
                    [&bytes[8..40], &l4_len.to_be_bytes(), &[0, 0, 0, bytes[6]]].concat(),
                )
            };
            assert_eq!(
                internet_checksum(&[&pseudo, &bytes[header_len..]].concat()),
                0
            );
        }
    }

    #[test]
    fn tcp_options_set_data_offset() {
        let pkt = Packet::new()
            .ipv4(V4_SRC, V4_DST)
            .tcp(1, 2)
            .window(1024)
            .tcp_options(&[2, 4, 0x05, 0xb4, 1])
            .build();
        assert_eq!(pkt[20 + 12], 7 << 4); // 20 + 5 options padded to 8 = 28 bytes
        assert_eq!(&pkt[20 + 14..20 + 16], &1024u16.to_be_bytes());
        assert_eq!(&pkt[40..], &[2, 4, 0x05, 0xb4, 1, 0, 0, 0]);
    }

    #[test]
    fn vlan_layout() {
        let pkt = Packet::new()
            .eth(A_MAC, B_MAC)
            .vlan(100)
            .ipv4(V4_SRC, V4_DST)
            .udp(1, 2)
            .build();
        assert_eq!(&pkt[..12], &[B_MAC, A_MAC].concat());
        assert_eq!(&pkt[12..18], &[0x81, 0x00, 0x00, 0x64, 0x08, 0x00]);
        assert_eq!(l3_offset(&pkt), 18);
        assert_eq!(l4_offset(&pkt), 38);
        assert_eq!(pkt.len(), 18 + 20 + 8);
    }

    #[test]
    fn ipv4_options_set_ihl() {
        let pkt = Packet::new()
            .eth(A_MAC, B_MAC)
            .ipv4(V4_SRC, V4_DST)
            .tos(0xb8)
            .id(0x1234)
            .mf()
            .frag_offset(185)
            .ipv4_options(&[0x94, 0x04, 0x00]) // router alert, short by one byte
            .udp(1, 2)
            .build();
        let ip = &pkt[14..];
        assert_eq!(ip[0], 0x46);
        assert_eq!(ip[1], 0xb8);
        assert_eq!(&ip[2..4], &(24u16 + 8).to_be_bytes());
        assert_eq!(&ip[4..8], &[0x12, 0x34, 0x20, 185]);
        assert_eq!(&ip[20..24], &[0x94, 0x04, 0x00, 0x00]);
        assert!(checksum_ok_ipv4_header(ip));
        assert_eq!(l4_offset(&pkt), 14 + 24);
    }

    #[test]
    fn corrupted_ipv4_header_fails_checksum() {
        let mut pkt = Packet::new()
            .ipv4(V4_SRC, V4_DST)
            .df()
            .protocol(253)
            .build();
        assert_eq!(pkt.len(), 20);
        assert_eq!((pkt[6], pkt[9]), (0x40, 253));
        assert!(checksum_ok_ipv4_header(&pkt));
        pkt[8] -= 1;
        assert!(!checksum_ok_ipv4_header(&pkt));
        pkt[0] = 0x44; // IHL below the minimum
        assert!(!checksum_ok_ipv4_header(&pkt));
    }

    #[test]
    fn ipv6_extension_headers_chain() {
        let pkt = Packet::new()
            .eth(A_MAC, B_MAC)
            .ipv6(V6_SRC, V6_DST)
            .hop_by_hop(&[])
            .routing(4, 0, &[0; 4])
            .dest_opts(&[0x05, 0x02, 0x00, 0x00, 0x01]) // 7 bytes: one byte of Pad1
            .fragment(3, true, 0xdead_beef)
            .udp(1, 2)
            .payload(b"x")
            .build();
        let ip = &pkt[14..];
        assert_eq!(ip[6], PROTO_HOPOPTS);
        assert_bytes(&hex("2b 00 01 04 00 00 00 00"), &ip[40..48]); // PadN of 4
        assert_bytes(&hex("3c 00 04 00 00 00 00 00"), &ip[48..56]);
        assert_bytes(&hex("2c 00 05 02 00 00 01 00"), &ip[56..64]);
        assert_bytes(&hex("11 00 00 19 de ad be ef"), &ip[64..72]);
        assert_eq!(&ip[4..6], &(32u16 + 9).to_be_bytes());
        assert_eq!(l4_offset(&pkt), 14 + 72);
        assert_eq!(&ip[72 + 4..72 + 6], &9u16.to_be_bytes());
        let pseudo = [&ip[8..40], &[0, 0, 0, 9, 0, 0, 0, 17]].concat();
        assert_eq!(internet_checksum(&[&pseudo, &ip[72..]].concat()), 0);
    }

    #[test]
    fn long_options_and_routing_data_grow_the_length_field() {
        let pkt = Packet::new()
            .ipv6(V6_SRC, V6_DST)
            .hop_by_hop(&[0x1e, 8, 0, 0, 0, 0, 0, 0, 0, 0]) // 12 bytes, PadN of 4 to 16
            .routing(2, 1, &[&[0; 4], &V6_DST.octets()[..]].concat())
            .protocol(59)
            .build();
        assert_eq!(
            (pkt[40], pkt[41], pkt[52], pkt[53]),
            (PROTO_ROUTING, 1, 1, 2)
        );
        assert_eq!((pkt[56], pkt[57], pkt[58], pkt[59]), (59, 2, 2, 1));
        assert_eq!(pkt.len(), 40 + 16 + 24);
    }

    #[test]
    fn ip_in_ip_protocols() {
        let inner4 = Packet::new().ipv4(V4_SRC, V4_DST).tcp(1, 2).build();
        let inner6 = Packet::new().ipv6(V6_SRC, V6_DST).udp(1, 2).build();
        let outer4 = Ipv4Addr::new(172, 16, 0, 1);
        let outer6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);

        let four_in_four = Packet::new()
            .eth(B_MAC, A_MAC)
            .ipv4(outer4, V4_DST)
            .df()
            .ip_in_ip(&inner4)
            .build();
        assert_eq!(four_in_four[14 + 9], 4);
        assert_eq!(
            &four_in_four[16..18],
            &(20 + inner4.len() as u16).to_be_bytes()
        );
        assert!(checksum_ok_ipv4_header(&four_in_four[14..]));
        assert_eq!(&four_in_four[l4_offset(&four_in_four)..], &inner4[..]);

        let six_in_six = Packet::new().ipv6(outer6, V6_DST).ip_in_ip(&inner6).build();
        assert_eq!(six_in_six[6], 41);
        assert_eq!(&six_in_six[4..6], &(inner6.len() as u16).to_be_bytes());
        assert_eq!(&six_in_six[40..], &inner6[..]);

        let four_in_six = Packet::new()
            .eth(B_MAC, A_MAC)
            .ipv6(outer6, V6_DST)
            .ip_in_ip(&inner4)
            .build();
        assert_eq!(
            (&four_in_six[12..14], four_in_six[14 + 6]),
            (&[0x86, 0xdd][..], 4)
        );
        assert_eq!(&four_in_six[14 + 40..], &inner4[..]);
    }

    #[test]
    #[should_panic(expected = "not IPv4 or IPv6")]
    fn ip_in_ip_rejects_non_ip() {
        Packet::new().ipv4(V4_SRC, V4_DST).ip_in_ip(&[0x12, 0x34]);
    }

    #[test]
    #[should_panic(expected = "IPv6 field")]
    fn ipv6_setter_on_ipv4_panics() {
        Packet::new().ipv4(V4_SRC, V4_DST).flow_label(1);
    }

    #[test]
    fn non_ip_layers() {
        let arp = Packet::new()
            .eth(A_MAC, [0xff; 6])
            .arp_request(A_MAC, V4_SRC, V4_DST)
            .build();
        let expected = hex("
            ff ff ff ff ff ff  02 00 00 00 00 01  08 06
            00 01 08 00 06 04 00 01  02 00 00 00 00 01 0a 00 00 01
            00 00 00 00 00 00 0a 00 00 64");
        assert_bytes(&expected, &arp);

        let lldp = Packet::new()
            .eth(A_MAC, B_MAC)
            .raw_l3(0x88cc, b"junk")
            .build();
        assert_eq!(&lldp[12..], b"\x88\xccjunk");

        let truncated = Packet::new()
            .eth(A_MAC, B_MAC)
            .ethertype(0x0800)
            .payload(&[0x45])
            .build();
        assert_eq!(&truncated[12..], &[0x08, 0x00, 0x45]);
    }

    #[test]
    fn hex_diff_equal_is_none() {
        let pkt = Packet::new()
            .eth(A_MAC, B_MAC)
            .ipv4(V4_SRC, V4_DST)
            .udp(1, 2)
            .build();
        assert_eq!(hex_diff(&pkt, &pkt), None);
    }

    #[test]
    fn hex_diff_one_byte() {
        let expected: Vec<u8> = (0..100).collect();
        let mut actual = expected.clone();
        actual[50] = 0xff;
        let diff = hex_diff(&expected, &actual).unwrap();
        assert_eq!(
            diff,
            "packets differ: expected 100 bytes, actual 100 bytes, first difference at offset 50 (0x0032)\n\
             offset  expected                                                        | actual\n\
             ...\n\
             0x0020  20  21  22  23  24  25  26  27  28  29  2a  2b  2c  2d  2e  2f  |  20  21  22  23  24  25  26  27  28  29  2a  2b  2c  2d  2e  2f\n\
             0x0030  30  31 [32] 33  34  35  36  37  38  39  3a  3b  3c  3d  3e  3f  |  30  31 [ff] 33  34  35  36  37  38  39  3a  3b  3c  3d  3e  3f\n\
             0x0040  40  41  42  43  44  45  46  47  48  49  4a  4b  4c  4d  4e  4f  |  40  41  42  43  44  45  46  47  48  49  4a  4b  4c  4d  4e  4f\n\
             ...\n"
        );
    }

    #[test]
    fn hex_diff_lengths() {
        let long: Vec<u8> = (0..20).collect();
        let short = &long[..18];
        assert_eq!(
            hex_diff(&long, short).unwrap(),
            "packets differ: expected 20 bytes, actual 18 bytes, first difference at offset 18 (0x0012)\n\
             offset  expected                                                        | actual\n\
             0x0000  00  01  02  03  04  05  06  07  08  09  0a  0b  0c  0d  0e  0f  |  00  01  02  03  04  05  06  07  08  09  0a  0b  0c  0d  0e  0f\n\
             0x0010  10  11 [12][13]                                                 |  10  11\n"
        );
        let diff = hex_diff(short, &long).unwrap();
        assert!(diff.starts_with(
            "packets differ: expected 18 bytes, actual 20 bytes, first difference at offset 18"
        ));
        assert!(diff.ends_with("0x0010  10  11                                                          |  10  11 [12][13]\n"));
        // A packet against nothing, e.g. when the program dropped instead of forwarding.
        assert!(hex_diff(&[], &long)
            .unwrap()
            .contains("expected 0 bytes, actual 20 bytes, first difference at offset 0 "));
    }
}
