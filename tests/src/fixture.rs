//! Shared vocabulary of the packet fixtures: addresses, packets as the client sends them, and
//! the exact headers the program must produce (computed with the same lb-common functions
//! the kernel uses).

use crate::{
    harness::{vip_spec, Harness, CLIENT_MAC, LB_MAC},
    packet::Packet,
};
use lb_common::FlowKey;
use lb_userspace::{
    dataplane::Role,
    model::{DataPathSettings, Forwarding, Prefix, Protocol, Services, VipAddr},
    state::{addr_bytes, addr_key},
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
/// The hash seed fixtures configure, so expected outer headers can be computed.
pub const SEED: u32 = 0x5eed;

pub fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

pub fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse().unwrap())
}

/// A backend MAC, distinct per `last`.
pub fn mac(last: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x0b, last]
}

pub fn vip(addr: IpAddr, port: u16, protocol: Protocol) -> VipAddr {
    VipAddr {
        addr,
        port,
        protocol,
    }
}

/// One `dsr` VIP, web on 192.0.2.10:80/tcp (ring 13), with one backend.
pub fn one_web_backend(backend: IpAddr, backend_mac: [u8; 6]) -> Services {
    Services {
        vips: vec![vip_spec(
            "web",
            vip(v4(192, 0, 2, 10), 80, Protocol::Tcp),
            Forwarding::Dsr,
            13,
            &[(backend, backend_mac, 100)],
        )],
        ..Services::default()
    }
}

/// One VIP of each kind with one backend each: dsr web4 (80/tcp), any4 (port 0), dns4
/// (53/udp), web6, ipip tun4 (4in4), tun6 (6in6), tun46 (4in6), and empty (only a weight-0
/// backend), ring 13.
pub fn every_mode() -> Services {
    use Forwarding::*;
    use Protocol::*;
    Services {
        settings: settings(SEED),
        vips: vec![
            vip_spec(
                "web4",
                vip(v4(192, 0, 2, 10), 80, Tcp),
                Dsr,
                13,
                &[(v4(10, 1, 0, 11), mac(0x11), 100)],
            ),
            vip_spec(
                "any4",
                vip(v4(192, 0, 2, 20), 0, Tcp),
                Dsr,
                13,
                &[(v4(10, 1, 0, 12), mac(0x12), 100)],
            ),
            vip_spec(
                "dns4",
                vip(v4(192, 0, 2, 30), 53, Udp),
                Dsr,
                13,
                &[(v4(10, 1, 0, 13), mac(0x13), 100)],
            ),
            vip_spec(
                "web6",
                vip(v6("2001:db8::10"), 80, Tcp),
                Dsr,
                13,
                &[(v6("2001:db8:1::11"), mac(0x14), 100)],
            ),
            vip_spec(
                "tun4",
                vip(v4(192, 0, 2, 40), 80, Tcp),
                Ipip,
                13,
                &[(v4(10, 2, 0, 11), mac(0x21), 100)],
            ),
            vip_spec(
                "tun6",
                vip(v6("2001:db8::40"), 80, Tcp),
                Ipip,
                13,
                &[(v6("2001:db8:2::11"), mac(0x22), 100)],
            ),
            vip_spec(
                "tun46",
                vip(v4(192, 0, 2, 50), 80, Tcp),
                Ipip,
                13,
                &[(v6("2001:db8:2::12"), mac(0x23), 100)],
            ),
            vip_spec(
                "empty",
                vip(v4(192, 0, 2, 60), 80, Tcp),
                Dsr,
                13,
                &[(v4(10, 1, 0, 14), mac(0x15), 0)],
            ),
        ],
    }
}

/// The decap program as the `ipip` backends of [`every_mode`] run it: their tunnel endpoints
/// local, the tunnelled VIPs served.
pub fn every_mode_backends_decap() -> Harness {
    let mut decap = Harness::new(Role::Decap);
    decap
        .dataplane
        .set_decap_local(&[
            addr_key(v4(10, 2, 0, 11)),
            addr_key(v6("2001:db8:2::11")),
            addr_key(v6("2001:db8:2::12")),
        ])
        .unwrap();
    decap
        .dataplane
        .set_decap_vips(&[
            addr_key(v4(192, 0, 2, 40)),
            addr_key(v6("2001:db8::40")),
            addr_key(v4(192, 0, 2, 50)),
        ])
        .unwrap();
    decap
}

/// Outer source pools with host bits, so the flow hash visibly lands in the outer header.
pub fn settings(hash_seed: u32) -> DataPathSettings {
    DataPathSettings {
        hash_seed,
        ipip_source_v4: "172.16.0.0/16".parse::<Prefix>().unwrap(),
        ipip_source_v6: "fd00:1b::/96".parse::<Prefix>().unwrap(),
        ..DataPathSettings::default()
    }
}

pub fn flow_key(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> FlowKey {
    let (src, family) = addr_bytes(src);
    let (dst, _) = addr_bytes(dst);
    FlowKey {
        src,
        dst,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        family,
        _pad: [0; 2],
    }
}

/// The flow hash the kernel computes for a packet with [`SEED`].
pub fn hash(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> u32 {
    lb_common::flow_hash(&flow_key(src, dst, sport, dport, proto), SEED)
}

/// Outer IPv4 source from 172.16.0.0/16 for a flow hash.
pub fn outer_src_v4(hash: u32) -> Ipv4Addr {
    Ipv4Addr::from(lb_common::ipip_source(
        &[172, 16, 0, 0],
        &[0, 0, 0xff, 0xff],
        hash,
    ))
}

/// Outer IPv6 source from fd00:1b::/96 for a flow hash.
pub fn outer_src_v6(hash: u32) -> Ipv6Addr {
    let prefix: Ipv6Addr = "fd00:1b::".parse().unwrap();
    let mut mask = [0u8; 16];
    mask[12..].fill(0xff);
    Ipv6Addr::from(lb_common::ipip_source(&prefix.octets(), &mask, hash))
}

/// A client TCP segment to `dst` (TOS 0x28, so its copy into outer headers shows).
pub fn tcp4(dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Packet {
    Packet::new()
        .ipv4(CLIENT4, dst)
        .tos(0x28)
        .tcp(sport, dport)
        .flags(flags)
        .seq(1000)
}

pub fn tcp6(dst: &str, sport: u16, dport: u16, flags: u8) -> Packet {
    Packet::new()
        .ipv6(CLIENT6, dst.parse().unwrap())
        .tos(0x28)
        .tcp(sport, dport)
        .flags(flags)
        .seq(1000)
}

/// `inner` framed as it arrives from the client.
pub fn from_client(inner: &Packet) -> Vec<u8> {
    framed(CLIENT_MAC, LB_MAC, &inner.build())
}

pub fn framed(src: [u8; 6], dst: [u8; 6], l3: &[u8]) -> Vec<u8> {
    vlan_framed(src, dst, None, l3)
}

/// An Ethernet frame around an IP packet, with an 802.1Q tag if `tci` is given.
pub fn vlan_framed(src: [u8; 6], dst: [u8; 6], tci: Option<u16>, l3: &[u8]) -> Vec<u8> {
    let ether_type: u16 = if l3[0] >> 4 == 6 { 0x86dd } else { 0x0800 };
    let mut frame = [dst, src].concat();
    if let Some(tci) = tci {
        frame.extend(0x8100u16.to_be_bytes());
        frame.extend(tci.to_be_bytes());
    }
    frame.extend(ether_type.to_be_bytes());
    frame.extend(l3);
    frame
}

/// Bytes of the refused packet an ICMP "too big" reply quotes (the kernel's constants).
pub const TOO_BIG_QUOTE_V4: usize = 128;
pub const TOO_BIG_QUOTE_V6: usize = 256;

/// What the LB answers to `frame`, a client packet too big for an `ipip` tunnel that leaves
/// `mtu` bytes for the inner packet: ICMP "fragmentation needed" (IPv4) or "packet too big"
/// (IPv6) from the VIP to the client, quoting the packet's first bytes, sent back to the MAC
/// it came from (VLAN tag kept).
pub fn too_big_reply(frame: &[u8], mtu: u16) -> Vec<u8> {
    let l2 = crate::packet::l3_offset(frame);
    let ip = &frame[l2..];
    let l3 = if ip[0] >> 4 == 4 {
        let client = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let vip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let mtu = mtu.to_be_bytes();
        Packet::new()
            .ipv4(vip, client)
            .tos(0xc0)
            .icmp(3, 4, [0, 0, mtu[0], mtu[1]])
            .payload(&ip[..TOO_BIG_QUOTE_V4])
            .build()
    } else {
        let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&ip[at..at + 16]).unwrap());
        Packet::new()
            .ipv6(addr(24), addr(8))
            .icmp(2, 0, u32::from(mtu).to_be_bytes())
            .payload(&ip[..TOO_BIG_QUOTE_V6])
            .build()
    };
    [&frame[6..12], &frame[..6], &frame[12..l2], &l3].concat()
}
