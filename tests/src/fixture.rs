//! Shared vocabulary of the packet fixtures: addresses, packets as the client sends them, and
//! the exact headers the program must produce (computed with the same lb-common functions
//! the kernel uses).

use crate::{
    harness::{vip_spec, CLIENT_MAC, LB_MAC},
    packet::Packet,
};
use lb_common::FlowKey;
use lb_userspace::{
    model::{DataPathSettings, Forwarding, Prefix, Protocol, Services, VipAddr},
    state::addr_bytes,
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
