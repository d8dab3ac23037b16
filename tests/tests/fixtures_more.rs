//! The remaining paths of the LB and decap programs, with exact expected bytes: IPv6 extension
//! headers, IPv4 options, VLAN tags and Ethernet padding under `ipip`, backends going down or
//! drained, flow-table contents, weighted spread and determinism across instances.

use lb_common::{counters::*, AddrKey, FLOW_ACK_SEEN, FLOW_FIN_SEEN, FLOW_PINNED, FLOW_SYN_SEEN};
use lb_userspace::{
    dataplane::Role,
    model::{Forwarding, Protocol, Services},
    state::{addr_bytes, BackendStatus},
    stats::monotonic_seconds,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use xdplb_tests::fixture::*;
use xdplb_tests::{
    harness::{vip_spec, Action, Fixture, Harness, CLIENT_MAC, LB_MAC},
    packet::{hex_diff, l4_offset, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const WEB4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const WEB6: &str = "2001:db8::10";
const TUN4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 40);
const TUN46: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);

/// One VIP of each kind the fixtures below need, each with one backend.
fn services() -> Services {
    use Forwarding::*;
    use Protocol::*;
    Services {
        settings: settings(SEED),
        vips: vec![
            vip_spec(
                "web4",
                vip(IpAddr::V4(WEB4), 80, Tcp),
                Dsr,
                13,
                &[(v4(10, 1, 0, 11), mac(0x11), 100)],
            ),
            vip_spec(
                "web6",
                vip(v6(WEB6), 80, Tcp),
                Dsr,
                13,
                &[(v6("2001:db8:1::11"), mac(0x14), 100)],
            ),
            vip_spec(
                "tun4",
                vip(IpAddr::V4(TUN4), 80, Tcp),
                Ipip,
                13,
                &[(v4(10, 2, 0, 11), mac(0x21), 100)],
            ),
            vip_spec(
                "tun46",
                vip(IpAddr::V4(TUN46), 80, Tcp),
                Ipip,
                13,
                &[(v6("2001:db8:2::12"), mac(0x23), 100)],
            ),
        ],
    }
}

fn lb() -> Harness {
    let mut harness = Harness::new(Role::Balancer);
    harness.apply(&services());
    harness
}

/// Address of the backend the VIP's active Maglev table gives this flow hash.
fn ring_choice(lb: &Harness, vip_name: &str, hash: u32) -> IpAddr {
    let vip = lb
        .live()
        .vips
        .values()
        .find(|v| v.name == vip_name)
        .unwrap();
    let id = vip.table()[(hash % vip.meta.ring_size) as usize];
    vip.backends
        .iter()
        .find_map(|(addr, backend)| (backend.id == id).then_some(*addr))
        .unwrap()
}

fn backend_id(lb: &Harness, vip_name: &str, addr: IpAddr) -> u32 {
    let vip = lb
        .live()
        .vips
        .values()
        .find(|v| v.name == vip_name)
        .unwrap();
    vip.backends[&addr].id
}

/// Whether every slot of the VIP's active table holds this backend.
fn ring_holds_only(lb: &Harness, vip_name: &str, addr: IpAddr) -> bool {
    let id = backend_id(lb, vip_name, addr);
    let vip = lb
        .live()
        .vips
        .values()
        .find(|v| v.name == vip_name)
        .unwrap();
    vip.table().iter().all(|slot| *slot == id)
}

/// The 4in4 packet the LB sends to tun4's backend for `inner`, Ethernet header left to the
/// caller.
fn tun4_outer(inner: &Packet, sport: u16) -> Packet {
    let h = hash(IpAddr::V4(CLIENT4), IpAddr::V4(TUN4), sport, 80, 6);
    Packet::new()
        .ipv4(outer_src_v4(h), Ipv4Addr::new(10, 2, 0, 11))
        .tos(0x28)
        .df()
        .ttl(64)
        .ip_in_ip(&inner.build())
}

/// The 4in6 packet the LB sends to tun46's backend for `inner`.
fn tun46_outer(inner: &Packet, sport: u16) -> Packet {
    let h = hash(IpAddr::V4(CLIENT4), IpAddr::V4(TUN46), sport, 80, 6);
    Packet::new()
        .ipv6(outer_src_v6(h), "2001:db8:2::12".parse().unwrap())
        .tos(0x28)
        .flow_label(h & 0xf_ffff)
        .ttl(64)
        .ip_in_ip(&inner.build())
}

#[test]
fn ipv6_extension_headers_are_walked_up_to_four() {
    let hbh_dst = tcp6(WEB6, 45001, 80, TCP_SYN)
        .hop_by_hop(&[0x05, 0x02, 0x00, 0x00]) // router alert
        .dest_opts(&[0x1e, 0x03, 0xaa, 0xbb, 0xcc]);
    let four = tcp6(WEB6, 45002, 80, TCP_SYN)
        .hop_by_hop(&[])
        .dest_opts(&[])
        .routing(4, 0, &[0; 4])
        .dest_opts(&[]);
    let five = tcp6(WEB6, 45003, 80, TCP_SYN)
        .hop_by_hop(&[])
        .dest_opts(&[])
        .routing(4, 0, &[0; 4])
        .dest_opts(&[])
        .dest_opts(&[]);
    let fragment_after_four = tcp6(WEB6, 45004, 80, TCP_SYN)
        .hop_by_hop(&[])
        .dest_opts(&[])
        .routing(4, 0, &[0; 4])
        .dest_opts(&[])
        .fragment(0, true, 7);
    assert_eq!(l4_offset(&from_client(&four)), 14 + 40 + 4 * 8);
    lb().check_all(&[
        Fixture {
            description: "hop-by-hop + destination options before TCP: forwarded, MACs only",
            input: from_client(&hbh_dst),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x14), &hbh_dst.build())),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "four extension headers (the most the program walks): forwarded",
            input: from_client(&four),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x14), &four.build())),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "first fragment (fragment header, TCP inside): passed as a fragment",
            input: from_client(&tcp6(WEB6, 45005, 80, TCP_SYN).fragment(0, true, 9)),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_FRAGMENT, 1)],
        },
        Fixture {
            description: "later fragment after a hop-by-hop header: passed as a fragment",
            input: from_client(
                &Packet::new()
                    .ipv6(CLIENT6, WEB6.parse().unwrap())
                    .hop_by_hop(&[])
                    .fragment(185, false, 9)
                    .protocol(6)
                    .payload(&[0xab; 24]),
            ),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_FRAGMENT, 1)],
        },
        Fixture {
            description: "five extension headers: the walk stops at the fifth, which is \
                          neither TCP nor UDP",
            input: from_client(&five),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_NOT_TCP_UDP, 1)],
        },
        Fixture {
            description: "fragment header as fifth header: never reached, so not counted \
                          as a fragment",
            input: from_client(&fragment_after_four),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_NOT_TCP_UDP, 1)],
        },
    ]);
}

/// An IPv6 authentication header (RFC 4302) before `tcp`: its length field counts 4-byte
/// units minus 2. 24 bytes: next header, length 4, reserved, SPI, sequence, 12-byte ICV.
fn with_auth_header(ip: Packet, tcp: &Packet) -> Packet {
    let segment = tcp.build()[40..].to_vec();
    let mut ah = vec![6, 4, 0, 0];
    ah.extend(0x1234_5678u32.to_be_bytes()); // SPI
    ah.extend(1u32.to_be_bytes()); // sequence number
    ah.extend([0x5a; 12]); // ICV
    ip.protocol(51).payload(&ah).payload(&segment)
}

#[test]
fn ipv6_authentication_header_is_stepped_over() {
    let web6: Ipv6Addr = WEB6.parse().unwrap();
    let ah = with_auth_header(
        Packet::new().ipv6(CLIENT6, web6),
        &tcp6(WEB6, 45101, 80, TCP_SYN),
    );
    let hbh_ah = with_auth_header(
        // 16 bytes: a length field of 1, where the two formulas disagree.
        Packet::new()
            .ipv6(CLIENT6, web6)
            .hop_by_hop(&[0x1e, 0x08, 1, 2, 3, 4, 5, 6, 7, 8]),
        &tcp6(WEB6, 45102, 80, TCP_SYN),
    );
    lb().check_all(&[
        Fixture {
            description: "authentication header (24 bytes) before TCP: forwarded",
            input: from_client(&ah),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x14), &ah.build())),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "16-byte hop-by-hop header, then authentication header: forwarded",
            input: from_client(&hbh_ah),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x14), &hbh_ah.build())),
            counters: &[(FLOW_MISS, 1)],
        },
    ]);
}

#[test]
fn ipv4_options_are_carried_unchanged() {
    // Router alert plus a no-op: 8 bytes of options, IHL 7.
    let options = [0x94, 0x04, 0x00, 0x00, 0x01];
    let dsr = tcp4(WEB4, 45201, 80, TCP_SYN).ipv4_options(&options);
    let tunnelled = tcp4(TUN4, 45202, 80, TCP_SYN)
        .ipv4_options(&options)
        .payload(b"hello");
    assert_eq!(tunnelled.build()[0], 0x47, "IHL 7");
    lb().check_all(&[
        Fixture {
            description: "IPv4 with options to a dsr VIP: MACs rewritten, nothing else",
            input: from_client(&dsr),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x11), &dsr.build())),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "IPv4 with options to an ipip VIP: options inside, outer IHL 5",
            input: from_client(&tunnelled),
            action: Action::Tx,
            output: Some(framed(
                LB_MAC,
                mac(0x21),
                &tun4_outer(&tunnelled, 45202).build(),
            )),
            counters: &[(FLOW_MISS, 1)],
        },
    ]);
}

/// The decap program of the host behind tun4 and tun46.
fn decap() -> Harness {
    let key = |addr: IpAddr| {
        let (addr, family) = addr_bytes(addr);
        AddrKey {
            addr,
            family,
            _pad: [0; 3],
        }
    };
    let mut decap = Harness::new(Role::Decap);
    decap
        .dataplane
        .set_decap_local(&[key(v4(10, 2, 0, 11)), key(v6("2001:db8:2::12"))])
        .unwrap();
    decap
        .dataplane
        .set_decap_vips(&[key(IpAddr::V4(TUN4)), key(IpAddr::V4(TUN46))])
        .unwrap();
    decap
}

#[test]
fn vlan_tag_survives_encapsulation_and_decapsulation() {
    // Priority 1, VLAN 100.
    const TCI: u16 = 0x2064;
    let to_tun4 = tcp4(TUN4, 45301, 80, TCP_SYN).payload(b"hello");
    let to_tun46 = tcp4(TUN46, 45302, 80, TCP_SYN).payload(b"hello");
    let tagged = |inner: &Packet| vlan_framed(CLIENT_MAC, LB_MAC, Some(TCI), &inner.build());
    let out4in4 = vlan_framed(
        LB_MAC,
        mac(0x21),
        Some(TCI),
        &tun4_outer(&to_tun4, 45301).build(),
    );
    let out4in6 = vlan_framed(
        LB_MAC,
        mac(0x23),
        Some(TCI),
        &tun46_outer(&to_tun46, 45302).build(),
    );
    // 802.1ad (outer tag, TPID 0x88a8) is parsed like 802.1Q and kept as it is.
    let mut qinq_in = tagged(&tcp4(WEB4, 45303, 80, TCP_SYN));
    qinq_in[12..14].copy_from_slice(&[0x88, 0xa8]);
    let mut qinq_out = qinq_in.clone();
    qinq_out[..12].copy_from_slice(&[mac(0x11), LB_MAC].concat());

    lb().check_all(&[
        Fixture {
            description: "VLAN-tagged SYN to an ipip VIP (4in4): tag kept, ethertype IPv4",
            input: tagged(&to_tun4),
            action: Action::Tx,
            output: Some(out4in4.clone()),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "VLAN-tagged SYN to an ipip VIP (4in6): tag kept, ethertype IPv6",
            input: tagged(&to_tun46),
            action: Action::Tx,
            output: Some(out4in6.clone()),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "802.1ad-tagged SYN to a dsr VIP: tag kept, MACs rewritten",
            input: qinq_in,
            action: Action::Tx,
            output: Some(qinq_out),
            counters: &[(FLOW_MISS, 1)],
        },
    ]);
    decap().check_all(&[
        Fixture {
            description: "decap of a VLAN-tagged 4in4 packet: tag kept, ethertype IPv4",
            input: out4in4,
            action: Action::Pass,
            output: Some(vlan_framed(LB_MAC, mac(0x21), Some(TCI), &to_tun4.build())),
            counters: &[(DECAP_OK, 1)],
        },
        Fixture {
            description: "decap of a VLAN-tagged 4in6 packet: tag kept, ethertype back to IPv4",
            input: out4in6,
            action: Action::Pass,
            output: Some(vlan_framed(LB_MAC, mac(0x23), Some(TCI), &to_tun46.build())),
            counters: &[(DECAP_OK, 1)],
        },
    ]);
}

#[test]
fn ethernet_padding_follows_the_encapsulated_packet() {
    // A minimum frame (60 bytes without FCS): 14 + 40-byte SYN + 6 bytes of padding. The
    // program takes lengths from the IP header and keeps trailing bytes at the end of the frame.
    let padding = [0xee; 6];
    let padded = |inner: &Packet| [from_client(inner), padding.to_vec()].concat();
    let syn_dsr = tcp4(WEB4, 45401, 80, TCP_SYN);
    let syn4 = tcp4(TUN4, 45402, 80, TCP_SYN);
    let syn46 = tcp4(TUN46, 45403, 80, TCP_SYN);
    assert_eq!(padded(&syn4).len(), 60);

    let out4in4 = framed(LB_MAC, mac(0x21), &tun4_outer(&syn4, 45402).build());
    let out4in6 = framed(LB_MAC, mac(0x23), &tun46_outer(&syn46, 45403).build());
    assert_eq!(&out4in4[16..18], &60u16.to_be_bytes(), "outer total length");
    assert_eq!(
        &out4in6[18..20],
        &40u16.to_be_bytes(),
        "outer payload length"
    );
    lb().check_all(&[
        Fixture {
            description: "padded SYN to a dsr VIP: MACs rewritten, padding kept",
            input: padded(&syn_dsr),
            action: Action::Tx,
            output: Some(
                [
                    framed(LB_MAC, mac(0x11), &syn_dsr.build()),
                    padding.to_vec(),
                ]
                .concat(),
            ),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "padded SYN to an ipip VIP (4in4): outer length excludes the padding, \
                          which ends the frame",
            input: padded(&syn4),
            action: Action::Tx,
            output: Some([out4in4, padding.to_vec()].concat()),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "padded SYN to an ipip VIP (4in6): same with an IPv6 outer header",
            input: padded(&syn46),
            action: Action::Tx,
            output: Some([out4in6, padding.to_vec()].concat()),
            counters: &[(FLOW_MISS, 1)],
        },
    ]);
}

/// Two VIPs, UDP and TCP, each with backends A and B.
fn two_backend_services() -> Services {
    use Protocol::*;
    Services {
        settings: settings(SEED),
        vips: vec![
            vip_spec(
                "dns",
                vip(v4(192, 0, 2, 30), 53, Udp),
                Forwarding::Dsr,
                13,
                &[
                    (v4(10, 3, 0, 1), mac(0x31), 100),
                    (v4(10, 3, 0, 2), mac(0x32), 100),
                ],
            ),
            vip_spec(
                "web",
                vip(IpAddr::V4(WEB4), 80, Tcp),
                Forwarding::Dsr,
                13,
                &[
                    (v4(10, 3, 0, 3), mac(0x33), 100),
                    (v4(10, 3, 0, 4), mac(0x34), 100),
                ],
            ),
        ],
    }
}

/// A flow to `vip_name` that its ring sends to `backend`.
struct FlowTo<'a> {
    vip_name: &'a str,
    dst: Ipv4Addr,
    dport: u16,
    proto: u8,
    backend: IpAddr,
}

/// The first source port from `from` whose flow the ring sends to the backend.
fn port_landing_on(lb: &Harness, flow: &FlowTo, from: u16) -> u16 {
    (from..)
        .find(|sport| {
            let h = hash(
                IpAddr::V4(CLIENT4),
                IpAddr::V4(flow.dst),
                *sport,
                flow.dport,
                flow.proto,
            );
            ring_choice(lb, flow.vip_name, h) == flow.backend
        })
        .unwrap()
}

#[test]
fn udp_flow_leaves_a_down_backend_tcp_flow_stays() {
    let dns = Ipv4Addr::new(192, 0, 2, 30);
    let (dns_a, dns_b) = (v4(10, 3, 0, 1), v4(10, 3, 0, 2));
    let (web_a, web_b) = (v4(10, 3, 0, 3), v4(10, 3, 0, 4));
    let mut lb = Harness::new(Role::Balancer);
    lb.apply(&two_backend_services());

    let to_dns_a = FlowTo {
        vip_name: "dns",
        dst: dns,
        dport: 53,
        proto: 17,
        backend: dns_a,
    };
    let to_web_a = FlowTo {
        vip_name: "web",
        dst: WEB4,
        dport: 80,
        proto: 6,
        backend: web_a,
    };
    let udp_port = port_landing_on(&lb, &to_dns_a, 50000);
    let tcp_port = port_landing_on(&lb, &to_web_a, 50000);
    // Another TCP flow that would go to A, started only once A is down.
    let new_syn = tcp4(
        WEB4,
        port_landing_on(&lb, &to_web_a, tcp_port + 1),
        80,
        TCP_SYN,
    );
    let query = Packet::new()
        .ipv4(CLIENT4, dns)
        .udp(udp_port, 53)
        .payload(b"\x12\x34query");
    let syn = tcp4(WEB4, tcp_port, 80, TCP_SYN);
    let ack = tcp4(WEB4, tcp_port, 80, TCP_ACK).payload(b"GET /");
    lb.check_all(&[
        Fixture {
            description: "UDP flow, backend A up: A",
            input: from_client(&query),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x31), &query.build())),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "TCP SYN, backend A up: A",
            input: from_client(&syn),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x33), &syn.build())),
            counters: &[(FLOW_MISS, 1)],
        },
    ]);

    // A fails its health checks in both VIPs: out of the rings, still present.
    for (name, addr) in [("dns", dns_a), ("web", web_a)] {
        let down = BackendStatus {
            down: true,
            ..BackendStatus::default()
        };
        lb.status.insert((name.to_string(), addr), down);
    }
    lb.apply(&two_backend_services());
    assert!(ring_holds_only(&lb, "dns", dns_b));
    assert!(ring_holds_only(&lb, "web", web_b));
    lb.check_all(&[
        Fixture {
            description: "UDP flow whose backend is down: re-hashed to B",
            input: from_client(&query),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x32), &query.build())),
            counters: &[(FLOW_REHASH, 1)],
        },
        Fixture {
            description: "the same UDP flow again: stays on B (and pinned)",
            input: from_client(&query),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x32), &query.build())),
            counters: &[(FLOW_HIT, 1), (FLOOD_PINNED, 1)],
        },
        Fixture {
            description: "established TCP flow whose backend is down: stays on A (and pinned)",
            input: from_client(&ack),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x33), &ack.build())),
            counters: &[(FLOW_HIT, 1), (FLOOD_PINNED, 1)],
        },
        Fixture {
            description: "new TCP flow the ring used to give A: B",
            input: from_client(&new_syn),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x34), &new_syn.build())),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "a SYN on the down backend's flow (the client reusing a port A reset, \
                          which the LB never sees): re-picked, B",
            input: from_client(&syn),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x34), &syn.build())),
            counters: &[(FLOW_REHASH, 1)],
        },
    ]);
    let entry = lb
        .dataplane
        .flow(&flow_key(
            IpAddr::V4(CLIENT4),
            IpAddr::V4(dns),
            udp_port,
            53,
            17,
        ))
        .unwrap()
        .expect("UDP flow entry");
    assert_eq!(entry.backend_id, backend_id(&lb, "dns", dns_b));
}

#[test]
fn reopened_connection_goes_to_the_ring_not_the_drained_backend() {
    let (web_a, web_b) = (v4(10, 3, 0, 3), v4(10, 3, 0, 4));
    let mut lb = Harness::new(Role::Balancer);
    lb.apply(&two_backend_services());
    let to_web_a = FlowTo {
        vip_name: "web",
        dst: WEB4,
        dport: 80,
        proto: 6,
        backend: web_a,
    };
    let sport = port_landing_on(&lb, &to_web_a, 50000);
    let packet = |flags| tcp4(WEB4, sport, 80, flags);
    let to = |backend_mac, flags, description, counter| Fixture {
        description,
        input: from_client(&packet(flags)),
        action: Action::Tx,
        output: Some(framed(LB_MAC, backend_mac, &packet(flags).build())),
        counters: counter,
    };
    lb.check_all(&[to(mac(0x33), TCP_SYN, "SYN: A", &[(FLOW_MISS, 1)])]);

    // A drained by the operator: no new connections, established ones continue.
    let drained = BackendStatus {
        drained: true,
        ..BackendStatus::default()
    };
    lb.status.insert(("web".to_string(), web_a), drained);
    lb.apply(&two_backend_services());
    assert!(ring_holds_only(&lb, "web", web_b));
    lb.check_all(&[
        to(
            mac(0x33),
            TCP_SYN,
            "SYN retransmitted, connection not ended: still A (second packet: pinned)",
            &[(FLOW_HIT, 1), (FLOOD_PINNED, 1)],
        ),
        to(mac(0x33), TCP_FIN | TCP_ACK, "FIN: A", &[(FLOW_HIT, 1)]),
        to(mac(0x33), TCP_RST, "RST: A", &[(FLOW_HIT, 1)]),
        to(
            mac(0x34),
            TCP_SYN,
            "new SYN on the ended connection's tuple: the ring's choice, B",
            &[(FLOW_REHASH, 1)],
        ),
        to(
            mac(0x34),
            TCP_ACK,
            "its ACK: B (the pinned copy followed the re-pick: no new pin)",
            &[(FLOW_HIT, 1)],
        ),
    ]);
    let key = flow_key(IpAddr::V4(CLIENT4), IpAddr::V4(WEB4), sport, 80, 6);
    let entry = lb.dataplane.flow(&key).unwrap().expect("flow entry");
    assert_eq!(entry.backend_id, backend_id(&lb, "web", web_b));
    assert_eq!(
        entry.state,
        FLOW_SYN_SEEN | FLOW_ACK_SEEN | FLOW_PINNED,
        "state restarts with the new connection: its SYN and ACK, no FIN or RST"
    );
    // An eviction now would restore B, not the ended connection's A.
    let pinned = lb.dataplane.pinned().unwrap();
    let copy = pinned
        .iter()
        .find(|(k, _)| *k == key)
        .expect("pinned copy")
        .1;
    assert_eq!(copy, entry, "the pinned copy is the flow-table entry");
}

#[test]
fn flow_entry_records_state_backend_and_times() {
    let mut lb = lb();
    let key = flow_key(IpAddr::V4(CLIENT4), IpAddr::V4(WEB4), 45501, 80, 6);
    assert_eq!(lb.dataplane.flow(&key).unwrap(), None);
    let syn = from_client(&tcp4(WEB4, 45501, 80, TCP_SYN));
    let before = monotonic_seconds();
    assert_eq!(lb.run(&syn).action, Action::Tx as u32);
    let after = monotonic_seconds();
    let after_syn = lb.dataplane.flow(&key).unwrap().expect("entry after SYN");
    assert_eq!(after_syn.state, FLOW_SYN_SEEN);
    // The data path reads the time through jiffies: the same seconds as userspace's clock
    // (a tick behind at most, so never after it).
    assert!(
        (before.saturating_sub(1)..=after).contains(&after_syn.created),
        "created {} outside [{before} - 1, {after}]",
        after_syn.created
    );

    let fin = from_client(&tcp4(WEB4, 45501, 80, TCP_FIN | TCP_ACK));
    assert_eq!(lb.run(&fin).action, Action::Tx as u32);
    let entry = lb.dataplane.flow(&key).unwrap().expect("entry after FIN");
    assert_eq!(
        entry.state,
        FLOW_SYN_SEEN | FLOW_ACK_SEEN | FLOW_FIN_SEEN | FLOW_PINNED,
        "its second packet pinned it"
    );
    assert_eq!(entry.backend_id, backend_id(&lb, "web4", v4(10, 1, 0, 11)));
    assert_eq!(entry.created, after_syn.created, "created is kept");
    assert!(entry.created > 0, "seconds of CLOCK_MONOTONIC");
    assert!(entry.created <= entry.last_seen);
    assert!(entry.last_seen - entry.created <= 5, "{entry:?}");
}

#[test]
fn weighted_backends_share_flows_by_weight() {
    let backends = [
        (v4(10, 4, 0, 1), mac(0x41), 1),
        (v4(10, 4, 0, 2), mac(0x42), 1),
        (v4(10, 4, 0, 3), mac(0x43), 2),
    ];
    let mut lb = Harness::new(Role::Balancer);
    lb.apply(&Services {
        settings: settings(SEED),
        vips: vec![vip_spec(
            "weighted",
            vip(IpAddr::V4(WEB4), 80, Protocol::Tcp),
            Forwarding::Dsr,
            1021,
            &backends,
        )],
    });
    const FLOWS: u16 = 4000;
    let before = lb.global_counters();
    let mut per_backend = [0u32; 3];
    for sport in 10_000..10_000 + FLOWS {
        let h = hash(IpAddr::V4(CLIENT4), IpAddr::V4(WEB4), sport, 80, 6);
        let chosen = ring_choice(&lb, "weighted", h);
        let index = backends.iter().position(|b| b.0 == chosen).unwrap();
        per_backend[index] += 1;
        for flags in [TCP_SYN, TCP_ACK] {
            let packet = tcp4(WEB4, sport, 80, flags);
            let out = lb.run(&from_client(&packet));
            let expected = framed(LB_MAC, backends[index].1, &packet.build());
            assert_eq!(out.action, Action::Tx as u32);
            if let Some(diff) = hex_diff(&expected, &out.output) {
                panic!("flow {sport}, flags {flags:#x}: not the ring's backend:\n{diff}");
            }
        }
    }
    let after = lb.global_counters();
    let moved = |index: u32| after[index as usize] - before[index as usize];
    assert_eq!(
        (moved(FLOW_MISS), moved(FLOW_HIT)),
        (FLOWS.into(), FLOWS.into()),
        "each SYN a miss, each second packet a hit"
    );
    let shares = per_backend.map(|n| f64::from(n) * 100.0 / f64::from(FLOWS));
    eprintln!("weights 1:1:2 over {FLOWS} flows: {shares:.1?} %");
    for (share, want) in shares.iter().zip([25.0, 25.0, 50.0]) {
        assert!((share - want).abs() <= 5.0, "{shares:?} vs 25/25/50");
    }
}

#[test]
fn instances_with_the_same_seed_choose_the_same_backends() {
    let backends: Vec<_> = (1..=5)
        .map(|i| (v4(10, 5, 0, i), mac(0x50 + i), 100))
        .collect();
    let instance = |seed| {
        let mut lb = Harness::new(Role::Balancer);
        lb.apply(&Services {
            settings: settings(seed),
            vips: vec![vip_spec(
                "tun",
                vip(IpAddr::V4(TUN4), 80, Protocol::Tcp),
                Forwarding::Ipip,
                1021,
                &backends,
            )],
        });
        lb
    };
    let (mut first, mut second, mut reseeded) = (instance(SEED), instance(SEED), instance(1));
    let mut moved = 0;
    for sport in 20_000..20_500 {
        let input = from_client(&tcp4(TUN4, sport, 80, TCP_SYN));
        let a = first.run(&input);
        let b = second.run(&input);
        assert_eq!(a.action, Action::Tx as u32);
        // Same backend, and the same outer source and header: byte for byte the same frame.
        if let Some(diff) = hex_diff(&a.output, &b.output) {
            panic!("flow {sport}: instances with the same seed disagree:\n{diff}");
        }
        let c = reseeded.run(&input);
        assert_eq!(c.action, Action::Tx as u32);
        moved += usize::from(a.output[..6] != c.output[..6]);
    }
    eprintln!("another seed moves {moved} of 500 flows to another backend");
    assert!(moved > 250, "another seed moved only {moved} of 500 flows");
}

/// Ports are read from the IP packet only: bytes after its end (Ethernet padding) that look
/// like a TCP header must not be taken for one.
#[test]
fn transport_header_must_lie_inside_the_ip_packet() {
    let syn = tcp4(WEB4, 45200, 80, TCP_SYN).build();
    // An IPv4 header claiming total length 20 (no payload), protocol TCP, then the SYN's
    // TCP header as trailing bytes.
    let mut l3 = syn[..20].to_vec();
    l3[2..4].copy_from_slice(&20u16.to_be_bytes());
    l3[10..12].fill(0);
    let checksum = xdplb_tests::packet::internet_checksum(&l3);
    l3[10..12].copy_from_slice(&checksum.to_be_bytes());
    l3.extend_from_slice(&syn[20..]);
    lb().check_all(&[Fixture {
        description: "IPv4 without payload, a TCP header in the padding after it",
        input: framed(CLIENT_MAC, LB_MAC, &l3),
        action: Action::Pass,
        output: None,
        counters: &[(PASS_MALFORMED, 1)],
    }]);
}
