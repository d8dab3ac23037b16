//! `forwarding = "nat"`: both directions, IPv4 and IPv6, TCP and UDP, with exact bytes. Every
//! expected packet is built from scratch by the packet builder, which computes every checksum
//! itself, so the incremental updates of the data path are checked against full sums. Also:
//! port exhaustion (counted, dropped, never shared), reuse of an expired port, and ICMP
//! errors translated in both directions.

use lb_common::{counters::*, NAT_DEFAULT_PORT_MAX, NAT_DEFAULT_PORT_MIN, PROTO_TCP, PROTO_UDP};
use lb_userspace::{
    dataplane::Role,
    model::{Forwarding, Protocol, Services, VipSpec},
    nat::NatSpec,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use xdplb_tests::fixture::*;
use xdplb_tests::{
    harness::{vip_spec, Action, Fixture, Harness, CLIENT_MAC, LB_MAC},
    packet::{Packet, TCP_ACK, TCP_PSH, TCP_SYN},
};

const WEB4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 70);
const DNS4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 71);
const WEB6: &str = "2001:db8::70";
const DNS6: &str = "2001:db8::71";
/// The LB's nat sources (`nat_source_v4/v6`).
const NAT4: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 1);
const NAT6: &str = "2001:db8:3::1";
const WEB4_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 11);
const DNS4_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 12);
const WEB6_BACKEND: &str = "2001:db8:3::11";
const DNS6_BACKEND: &str = "2001:db8:3::12";
/// A router between the LB and the backends, and one toward the clients.
const ROUTER4: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 254);
const ROUTER6: &str = "2001:db8:3::fe";
const CLIENT_ROUTER4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn nat_vip(name: &str, vip: VipAddrSpec, backend: IpAddr, last: u8, port: u16) -> VipSpec {
    let mut spec = vip_spec(
        name,
        xdplb_tests::fixture::vip(vip.0, vip.1, vip.2),
        Forwarding::Nat,
        13,
        &[(backend, mac(last), 100)],
    );
    spec.backends[0].port = Some(port);
    spec
}

type VipAddrSpec = (IpAddr, u16, Protocol);

/// Four nat VIPs (web on 80 -> 8080, dns on 53 -> 5353, IPv4 and IPv6), one backend each,
/// nat sources 10.3.0.1 and 2001:db8:3::1, ports `ports`.
fn services(ports: (u16, u16)) -> Services {
    let mut settings = settings(SEED);
    settings.nat = NatSpec {
        sources_v4: vec![NAT4],
        sources_v6: vec![ip6(NAT6)],
        ports,
        ..NatSpec::default()
    };
    Services {
        settings,
        vips: vec![
            nat_vip(
                "web4",
                (IpAddr::V4(WEB4), 80, Protocol::Tcp),
                IpAddr::V4(WEB4_BACKEND),
                0x31,
                8080,
            ),
            nat_vip(
                "dns4",
                (IpAddr::V4(DNS4), 53, Protocol::Udp),
                IpAddr::V4(DNS4_BACKEND),
                0x32,
                5353,
            ),
            nat_vip(
                "web6",
                (v6(WEB6), 80, Protocol::Tcp),
                v6(WEB6_BACKEND),
                0x33,
                8080,
            ),
            nat_vip(
                "dns6",
                (v6(DNS6), 53, Protocol::Udp),
                v6(DNS6_BACKEND),
                0x34,
                5353,
            ),
        ],
    }
}

fn lb_with_ports(ports: (u16, u16)) -> Harness {
    let mut harness = Harness::new(Role::Balancer);
    harness.apply(&services(ports));
    harness
}

fn lb() -> Harness {
    lb_with_ports((NAT_DEFAULT_PORT_MIN, NAT_DEFAULT_PORT_MAX))
}

/// The nat port the kernel's first probe takes for a client flow (default port range).
fn nat_port(client: IpAddr, vip: IpAddr, sport: u16, dport: u16, proto: u8) -> u16 {
    lb_common::nat_slot(
        hash(client, vip, sport, dport, proto),
        0,
        NAT_DEFAULT_PORT_MIN,
        NAT_DEFAULT_PORT_MAX,
        1,
    )
    .1
}

/// A frame from a backend (or a router on its side) to the LB.
fn from_backend(last: u8, l3: &[u8]) -> Vec<u8> {
    framed(mac(last), LB_MAC, l3)
}

/// One connection in both directions: (description, input, expected output) x 4.
struct Conversation {
    client_out: Vec<u8>,
    to_backend: Vec<u8>,
    backend_reply: Vec<u8>,
    to_client: Vec<u8>,
}

fn tcp_conversation(v6_family: bool, sport: u16, flags: u8, payload: &[u8]) -> Conversation {
    let (client, vip, nat, backend, last) = if v6_family {
        (
            IpAddr::V6(CLIENT6),
            v6(WEB6),
            v6(NAT6),
            v6(WEB6_BACKEND),
            0x33,
        )
    } else {
        (
            IpAddr::V4(CLIENT4),
            IpAddr::V4(WEB4),
            IpAddr::V4(NAT4),
            IpAddr::V4(WEB4_BACKEND),
            0x31,
        )
    };
    let port = nat_port(client, vip, sport, 80, PROTO_TCP);
    let segment = |src: IpAddr, dst: IpAddr, sp: u16, dp: u16, fl: u8, seq: u32| {
        ip(src, dst)
            .tos(0x28)
            .tcp(sp, dp)
            .flags(fl)
            .seq(seq)
            .payload(payload)
            .build()
    };
    Conversation {
        client_out: framed(
            CLIENT_MAC,
            LB_MAC,
            &segment(client, vip, sport, 80, flags, 1000),
        ),
        to_backend: framed(
            LB_MAC,
            mac(last),
            &segment(nat, backend, port, 8080, flags, 1000),
        ),
        backend_reply: from_backend(
            last,
            &segment(backend, nat, 8080, port, TCP_ACK | TCP_PSH, 7000),
        ),
        to_client: framed(
            LB_MAC,
            CLIENT_MAC,
            &segment(vip, client, 80, sport, TCP_ACK | TCP_PSH, 7000),
        ),
    }
}

fn udp_conversation(v6_family: bool, sport: u16) -> Conversation {
    let (client, vip, nat, backend, last) = if v6_family {
        (
            IpAddr::V6(CLIENT6),
            v6(DNS6),
            v6(NAT6),
            v6(DNS6_BACKEND),
            0x34,
        )
    } else {
        (
            IpAddr::V4(CLIENT4),
            IpAddr::V4(DNS4),
            IpAddr::V4(NAT4),
            IpAddr::V4(DNS4_BACKEND),
            0x32,
        )
    };
    let port = nat_port(client, vip, sport, 53, PROTO_UDP);
    let datagram = |src: IpAddr, dst: IpAddr, sp: u16, dp: u16, body: &[u8]| {
        ip(src, dst).udp(sp, dp).payload(body).build()
    };
    Conversation {
        client_out: framed(
            CLIENT_MAC,
            LB_MAC,
            &datagram(client, vip, sport, 53, b"\x12\x34query"),
        ),
        to_backend: framed(
            LB_MAC,
            mac(last),
            &datagram(nat, backend, port, 5353, b"\x12\x34query"),
        ),
        backend_reply: from_backend(
            last,
            &datagram(backend, nat, 5353, port, b"\x12\x34answer!"),
        ),
        to_client: framed(
            LB_MAC,
            CLIENT_MAC,
            &datagram(vip, client, 53, sport, b"\x12\x34answer!"),
        ),
    }
}

fn ip(src: IpAddr, dst: IpAddr) -> Packet {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Packet::new().ipv4(s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => Packet::new().ipv6(s, d),
        _ => panic!("mixed families"),
    }
}

/// The fixtures of one conversation: first packet (new flow), the reply, a second packet
/// (same translation, flow hit).
fn both_ways(name: &'static str, first: Conversation, second: Conversation) -> Vec<Fixture> {
    vec![
        Fixture {
            description: name,
            input: first.client_out,
            action: Action::Tx,
            output: Some(first.to_backend),
            counters: &[(FLOW_MISS, 1), (NAT_NEW, 1)],
        },
        Fixture {
            description: "... the backend's reply, translated back to the client's hop",
            input: first.backend_reply,
            action: Action::Tx,
            output: Some(first.to_client),
            counters: &[(NAT_REPLY, 1)],
        },
        Fixture {
            description: "... the client's next packet keeps its nat address and port",
            input: second.client_out,
            action: Action::Tx,
            output: Some(second.to_backend),
            // A flow's second packet pins it (the flood defence), as in every mode.
            counters: &[(FLOW_HIT, 1), (FLOOD_PINNED, 1)],
        },
    ]
}

#[test]
fn nat_translates_both_directions_with_exact_checksums() {
    let mut fixtures = Vec::new();
    fixtures.extend(both_ways(
        "IPv4 TCP SYN to a nat VIP: destination backend:8080, source the nat address",
        tcp_conversation(false, 40001, TCP_SYN, b""),
        tcp_conversation(false, 40001, TCP_ACK | TCP_PSH, b"GET / HTTP/1.1\r\n\r\n"),
    ));
    fixtures.extend(both_ways(
        "IPv6 TCP SYN to a nat VIP",
        tcp_conversation(true, 40002, TCP_SYN, b""),
        tcp_conversation(true, 40002, TCP_ACK | TCP_PSH, b"GET / HTTP/1.1\r\n\r\n"),
    ));
    fixtures.extend(both_ways(
        "IPv4 UDP to a nat VIP: port 53 -> 5353",
        udp_conversation(false, 40003),
        udp_conversation(false, 40003),
    ));
    fixtures.extend(both_ways(
        "IPv6 UDP to a nat VIP (its checksum is mandatory)",
        udp_conversation(true, 40004),
        udp_conversation(true, 40004),
    ));
    // IPv4 UDP without a checksum keeps none.
    let no_checksum = |mut frame: Vec<u8>| {
        let at = xdplb_tests::packet::l4_offset(&frame) + 6;
        frame[at..at + 2].copy_from_slice(&[0, 0]);
        frame
    };
    let udp = udp_conversation(false, 40005);
    fixtures.push(Fixture {
        description: "IPv4 UDP without checksum: translated, checksum stays 0",
        input: no_checksum(udp.client_out),
        action: Action::Tx,
        output: Some(no_checksum(udp.to_backend)),
        counters: &[(FLOW_MISS, 1), (NAT_NEW, 1)],
    });
    fixtures.push(Fixture {
        description: "a packet to the nat address that belongs to no nat connection (the LB's own traffic) goes to the stack",
        input: from_backend(
            0x31,
            &Packet::new()
                .ipv4(WEB4_BACKEND, NAT4)
                .tcp(8080, 45000)
                .flags(TCP_ACK)
                .build(),
        ),
        action: Action::Pass,
        output: None,
        counters: &[(PASS_NOT_VIP, 1)],
    });
    lb().check_all(&fixtures);
}

/// A TCP SYN from the client's port `sport` to web4.
fn syn4(sport: u16) -> Vec<u8> {
    from_client(&tcp4(WEB4, sport, 80, TCP_SYN))
}

fn to_backend4(port: u16) -> Vec<u8> {
    framed(
        LB_MAC,
        mac(0x31),
        &Packet::new()
            .ipv4(NAT4, WEB4_BACKEND)
            .tos(0x28)
            .tcp(port, 8080)
            .flags(TCP_SYN)
            .seq(1000)
            .build(),
    )
}

#[test]
fn an_exhausted_port_range_drops_the_new_flow_and_an_expired_port_is_reused() {
    // One nat port: the second connection cannot have it while the first lives.
    let mut lb = lb_with_ports((2000, 2000));
    lb.check_all(&[
        Fixture {
            description: "first connection takes the only port",
            input: syn4(41001),
            action: Action::Tx,
            output: Some(to_backend4(2000)),
            counters: &[(FLOW_MISS, 1), (NAT_NEW, 1)],
        },
        Fixture {
            description: "second connection: no free port, dropped and counted",
            input: syn4(41002),
            action: Action::Drop,
            output: None,
            counters: &[(FLOW_MISS, 1), (DROP_NAT_EXHAUSTED, 1)],
        },
    ]);
    // The first connection falls silent for longer than the TCP timeout (900 s).
    let (reverse, mut state) = lb.dataplane.nat_connections().unwrap()[0];
    assert_eq!(u16::from_be(reverse.dport), 2000);
    state.last_seen = state.last_seen.wrapping_sub(901);
    lb.dataplane
        .update_nat_connection(&reverse, &state)
        .unwrap();
    lb.check_all(&[
        Fixture {
            description: "second connection retried: takes over the expired port",
            input: syn4(41002),
            action: Action::Tx,
            output: Some(to_backend4(2000)),
            counters: &[(FLOW_HIT, 1), (FLOOD_PINNED, 1), (NAT_RECLAIMED, 1), (NAT_NEW, 1)],
        },
        Fixture {
            description: "the expired connection comes back: its port is someone else's now, so it is dropped, never sent with the same port",
            input: from_client(&tcp4(WEB4, 41001, 80, TCP_ACK)),
            action: Action::Drop,
            output: None,
            counters: &[(FLOW_HIT, 1), (FLOOD_PINNED, 1), (DROP_NAT_EXHAUSTED, 1)],
        },
    ]);
    let connections = lb.dataplane.nat_connections().unwrap();
    assert_eq!(connections.len(), 1, "one owner per nat port");
    assert_eq!(u16::from_be(connections[0].1.client_port), 41002);
}

#[test]
fn the_sweep_deletes_expired_connections_and_their_translations() {
    let mut lb = lb();
    lb.check_all(&[Fixture {
        description: "a connection",
        input: syn4(42001),
        action: Action::Tx,
        output: Some(to_backend4(nat_port(
            IpAddr::V4(CLIENT4),
            IpAddr::V4(WEB4),
            42001,
            80,
            PROTO_TCP,
        ))),
        counters: &[(FLOW_MISS, 1), (NAT_NEW, 1)],
    }]);
    let (_, state) = lb.dataplane.nat_connections().unwrap()[0];
    let fresh = lb_userspace::nat::sweep(&mut lb.dataplane, state.last_seen + 900).unwrap();
    assert_eq!((fresh.connections, fresh.expired), (1, 0));
    let swept = lb_userspace::nat::sweep(&mut lb.dataplane, state.last_seen + 901).unwrap();
    assert_eq!((swept.connections, swept.expired), (1, 1));
    assert!(lb.dataplane.nat_connections().unwrap().is_empty());
    assert!(lb.dataplane.nat_translations().unwrap().is_empty());
}

/// An ICMP error about `quoted` (an IP packet) from `src` to `dst`.
fn icmp_error(
    src: IpAddr,
    dst: IpAddr,
    typ: u8,
    code: u8,
    rest: [u8; 4],
    quoted: &[u8],
) -> Vec<u8> {
    ip(src, dst).icmp(typ, code, rest).payload(quoted).build()
}

fn l3(frame: &[u8]) -> Vec<u8> {
    frame[xdplb_tests::packet::l3_offset(frame)..].to_vec()
}

#[test]
fn icmp_errors_about_nat_connections_are_translated_both_ways() {
    let mut lb = lb();
    let udp4 = udp_conversation(false, 43001);
    let tcp4c = tcp_conversation(false, 43002, TCP_SYN, b"");
    let tcp6c = tcp_conversation(true, 43003, TCP_SYN, b"");
    let big4 = tcp_conversation(false, 43002, TCP_ACK | TCP_PSH, &[0x42; 1400]);
    let big6 = tcp_conversation(true, 43003, TCP_ACK | TCP_PSH, &[0x42; 1400]);
    let mtu = [0, 0, 0x05, 0x00];
    let mtu6 = 1280u32.to_be_bytes();
    let fixtures = vec![
        Fixture {
            description: "setup: a UDP connection",
            input: udp4.client_out.clone(),
            action: Action::Tx,
            output: Some(udp4.to_backend.clone()),
            counters: &[(FLOW_MISS, 1), (NAT_NEW, 1)],
        },
        Fixture {
            description: "port unreachable from the backend: to the client, from the VIP, quoting the client's own datagram",
            input: from_backend(
                0x32,
                &icmp_error(
                    IpAddr::V4(DNS4_BACKEND),
                    IpAddr::V4(NAT4),
                    3,
                    3,
                    [0; 4],
                    &l3(&udp4.to_backend),
                ),
            ),
            action: Action::Tx,
            output: Some(framed(
                LB_MAC,
                CLIENT_MAC,
                &icmp_error(
                    IpAddr::V4(DNS4),
                    IpAddr::V4(CLIENT4),
                    3,
                    3,
                    [0; 4],
                    &l3(&udp4.client_out),
                ),
            )),
            counters: &[(NAT_ICMP_TO_CLIENT, 1)],
        },
        Fixture {
            description: "setup: an IPv4 TCP connection",
            input: tcp4c.client_out.clone(),
            action: Action::Tx,
            output: Some(tcp4c.to_backend.clone()),
            counters: &[(FLOW_MISS, 1), (NAT_NEW, 1)],
        },
        Fixture {
            description: "fragmentation needed from a router toward the backend, quoting 28 bytes: to the client about its own segment",
            input: framed(
                mac(0x31),
                LB_MAC,
                &icmp_error(
                    IpAddr::V4(ROUTER4),
                    IpAddr::V4(NAT4),
                    3,
                    4,
                    mtu,
                    &l3(&big4.to_backend)[..28],
                ),
            ),
            action: Action::Tx,
            output: Some(framed(
                LB_MAC,
                CLIENT_MAC,
                &icmp_error(
                    IpAddr::V4(WEB4),
                    IpAddr::V4(CLIENT4),
                    3,
                    4,
                    mtu,
                    &l3(&big4.client_out)[..28],
                ),
            )),
            counters: &[(NAT_ICMP_TO_CLIENT, 1)],
        },
        Fixture {
            description: "fragmentation needed from a router toward the client, about the reply: to the backend, from the nat address, quoting the backend's segment in full",
            input: framed(
                CLIENT_MAC,
                LB_MAC,
                &icmp_error(
                    IpAddr::V4(CLIENT_ROUTER4),
                    IpAddr::V4(WEB4),
                    3,
                    4,
                    mtu,
                    &l3(&big4.to_client),
                ),
            ),
            action: Action::Tx,
            output: Some(framed(
                LB_MAC,
                mac(0x31),
                &icmp_error(
                    IpAddr::V4(NAT4),
                    IpAddr::V4(WEB4_BACKEND),
                    3,
                    4,
                    mtu,
                    &l3(&big4.backend_reply),
                ),
            )),
            counters: &[(NAT_ICMP_TO_BACKEND, 1)],
        },
        Fixture {
            description: "setup: an IPv6 TCP connection",
            input: tcp6c.client_out.clone(),
            action: Action::Tx,
            output: Some(tcp6c.to_backend.clone()),
            counters: &[(FLOW_MISS, 1), (NAT_NEW, 1)],
        },
        Fixture {
            description: "IPv6 packet too big from a router toward the backend: to the client (ICMPv6 checksum over the new addresses)",
            input: framed(
                mac(0x33),
                LB_MAC,
                &icmp_error(
                    v6(ROUTER6),
                    v6(NAT6),
                    2,
                    0,
                    mtu6,
                    &l3(&big6.to_backend),
                ),
            ),
            action: Action::Tx,
            output: Some(framed(
                LB_MAC,
                CLIENT_MAC,
                &icmp_error(
                    v6(WEB6),
                    IpAddr::V6(CLIENT6),
                    2,
                    0,
                    mtu6,
                    &l3(&big6.client_out),
                ),
            )),
            counters: &[(NAT_ICMP_TO_CLIENT, 1)],
        },
        Fixture {
            description: "IPv6 packet too big toward the client, about the reply: to the backend",
            input: framed(
                CLIENT_MAC,
                LB_MAC,
                &icmp_error(
                    v6("2001:db8:ff::1"),
                    v6(WEB6),
                    2,
                    0,
                    mtu6,
                    &l3(&big6.to_client),
                ),
            ),
            action: Action::Tx,
            output: Some(framed(
                LB_MAC,
                mac(0x33),
                &icmp_error(
                    v6(NAT6),
                    v6(WEB6_BACKEND),
                    2,
                    0,
                    mtu6,
                    &l3(&big6.backend_reply),
                ),
            )),
            counters: &[(NAT_ICMP_TO_BACKEND, 1)],
        },
    ];
    lb.check_all(&fixtures);
}

#[test]
fn a_port_0_nat_vip_keeps_the_clients_destination_port() {
    let any4 = Ipv4Addr::new(192, 0, 2, 72);
    let backend = Ipv4Addr::new(10, 3, 0, 13);
    let mut services = services((NAT_DEFAULT_PORT_MIN, NAT_DEFAULT_PORT_MAX));
    services.vips = vec![vip_spec(
        "any4",
        xdplb_tests::fixture::vip(IpAddr::V4(any4), 0, Protocol::Tcp),
        Forwarding::Nat,
        13,
        &[(IpAddr::V4(backend), mac(0x35), 100)],
    )];
    let mut lb = Harness::new(Role::Balancer);
    lb.apply(&services);
    let port = nat_port(
        IpAddr::V4(CLIENT4),
        IpAddr::V4(any4),
        44001,
        8443,
        PROTO_TCP,
    );
    lb.check_all(&[Fixture {
        description: "port-0 nat VIP: to the backend on the port the client asked for",
        input: from_client(&tcp4(any4, 44001, 8443, TCP_SYN)),
        action: Action::Tx,
        output: Some(framed(
            LB_MAC,
            mac(0x35),
            &Packet::new()
                .ipv4(NAT4, backend)
                .tos(0x28)
                .tcp(port, 8443)
                .flags(TCP_SYN)
                .seq(1000)
                .build(),
        )),
        counters: &[(FLOW_MISS, 1), (NAT_NEW, 1)],
    }]);
}
