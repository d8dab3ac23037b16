//! Every forwarding path of the LB program and the decap program, with exact expected bytes.

use lb_common::counters::*;
use lb_userspace::{
    dataplane::Role,
    model::{Forwarding, Protocol, Services},
    state::BackendStatus,
};
use std::net::{IpAddr, Ipv4Addr};
use xdplb_tests::fixture::*;
use xdplb_tests::{
    harness::{vip_spec, Action, Fixture, Harness, CLIENT_MAC, LB_MAC},
    packet::{checksum_ok_ipv4_header, Packet, TCP_ACK, TCP_PSH, TCP_SYN},
};

fn lb() -> Harness {
    let mut harness = Harness::new(Role::Balancer);
    harness.apply(&every_mode());
    harness
}

#[test]
fn dsr_rewrites_only_the_macs() {
    let syn = tcp4(Ipv4Addr::new(192, 0, 2, 10), 40001, 80, TCP_SYN);
    let any_port = tcp4(Ipv4Addr::new(192, 0, 2, 20), 40002, 8443, TCP_SYN);
    let udp = Packet::new()
        .ipv4(CLIENT4, Ipv4Addr::new(192, 0, 2, 30))
        .udp(40003, 53)
        .payload(b"\x12\x34query");
    let syn6 = tcp6("2001:db8::10", 40004, 80, TCP_SYN);
    let vlan_in = Packet::new()
        .eth(CLIENT_MAC, LB_MAC)
        .vlan(100)
        .ipv4(CLIENT4, Ipv4Addr::new(192, 0, 2, 10))
        .tcp(40005, 80)
        .flags(TCP_SYN)
        .build();
    let vlan_out = Packet::new()
        .eth(LB_MAC, mac(0x11))
        .vlan(100)
        .ipv4(CLIENT4, Ipv4Addr::new(192, 0, 2, 10))
        .tcp(40005, 80)
        .flags(TCP_SYN)
        .build();
    lb().check_all(&[
        Fixture {
            description: "IPv4 TCP SYN to a dsr VIP: MACs rewritten, nothing else",
            input: from_client(&syn),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x11), &syn.build())),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "port-0 VIP takes any port",
            input: from_client(&any_port),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x12), &any_port.build())),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "UDP to a UDP VIP",
            input: from_client(&udp),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x13), &udp.build())),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "IPv6 TCP SYN to a dsr VIP",
            input: from_client(&syn6),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x14), &syn6.build())),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "VLAN-tagged SYN: tag kept, MACs rewritten",
            input: vlan_in,
            action: Action::Tx,
            output: Some(vlan_out),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "VIP whose only backend has weight 0: dropped, counted",
            input: from_client(&tcp4(Ipv4Addr::new(192, 0, 2, 60), 40006, 80, TCP_SYN)),
            action: Action::Drop,
            output: None,
            counters: &[(FLOW_MISS, 1), (DROP_NO_BACKEND, 1)],
        },
    ]);
}

/// The three encapsulations, as the backend will receive them.
fn encapsulated() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let tun4 = Ipv4Addr::new(192, 0, 2, 40);
    let inner4 = tcp4(tun4, 41001, 80, TCP_SYN).payload(b"hello");
    let h = hash(IpAddr::V4(CLIENT4), IpAddr::V4(tun4), 41001, 80, 6);
    let out4in4 = Packet::new()
        .eth(LB_MAC, mac(0x21))
        .ipv4(outer_src_v4(h), Ipv4Addr::new(10, 2, 0, 11))
        .tos(0x28)
        .df()
        .ttl(64)
        .ip_in_ip(&inner4.build())
        .build();

    let inner6 = tcp6("2001:db8::40", 41002, 80, TCP_SYN).payload(b"hello");
    let h = hash(IpAddr::V6(CLIENT6), v6("2001:db8::40"), 41002, 80, 6);
    let out6in6 = Packet::new()
        .eth(LB_MAC, mac(0x22))
        .ipv6(outer_src_v6(h), "2001:db8:2::11".parse().unwrap())
        .tos(0x28)
        .flow_label(h & 0xfffff)
        .ttl(64)
        .ip_in_ip(&inner6.build())
        .build();

    let tun46 = Ipv4Addr::new(192, 0, 2, 50);
    let inner46 = tcp4(tun46, 41003, 80, TCP_SYN).payload(b"hello");
    let h = hash(IpAddr::V4(CLIENT4), IpAddr::V4(tun46), 41003, 80, 6);
    let out4in6 = Packet::new()
        .eth(LB_MAC, mac(0x23))
        .ipv6(outer_src_v6(h), "2001:db8:2::12".parse().unwrap())
        .tos(0x28)
        .flow_label(h & 0xfffff)
        .ttl(64)
        .ip_in_ip(&inner46.build())
        .build();
    vec![
        ("4in4", from_client(&inner4), out4in4),
        ("6in6", from_client(&inner6), out6in6),
        ("4in6", from_client(&inner46), out4in6),
    ]
}

#[test]
fn ipip_prepends_an_exact_outer_header() {
    let fixtures: Vec<Fixture> = encapsulated()
        .into_iter()
        .map(|(kind, input, output)| Fixture {
            description: match kind {
                "4in4" => "ipip 4in4: outer IPv4 from the source pool to the backend",
                "6in6" => "ipip 6in6: outer IPv6 with the flow hash as flow label",
                _ => "ipip 4in6: IPv4 VIP, IPv6 backend",
            },
            input,
            action: Action::Tx,
            output: Some(output),
            counters: &[(FLOW_MISS, 1)],
        })
        .collect();
    lb().check_all(&fixtures);
}

#[test]
fn ipip_outer_ipv4_header_field_by_field() {
    let mut lb = lb();
    let (_, input, _) = encapsulated().remove(0);
    let out = lb.run(&input);
    assert_eq!(out.action, Action::Tx as u32);
    let outer = &out.output[14..34];
    assert_eq!(outer[0], 0x45, "version 4, IHL 5");
    assert_eq!(outer[1], 0x28, "TOS copied from the inner header");
    let inner_len = input.len() - 14;
    assert_eq!(
        u16::from_be_bytes([outer[2], outer[3]]) as usize,
        inner_len + 20,
        "total length"
    );
    assert_eq!(&outer[6..8], &[0x40, 0], "DF, no fragment offset");
    assert_eq!(outer[8], 64, "TTL");
    assert_eq!(outer[9], 4, "protocol IPIP");
    assert!(checksum_ok_ipv4_header(outer), "header checksum");
    assert_eq!(&outer[12..14], &[172, 16], "source inside 172.16.0.0/16");
    assert_eq!(&outer[16..20], &[10, 2, 0, 11], "destination = backend");
    assert_eq!(&out.output[34..], &input[14..], "inner packet unchanged");

    // Other flows get other outer sources, so a backend's RSS can spread them.
    let sources: std::collections::BTreeSet<[u8; 4]> = (0..32u16)
        .map(|i| {
            let inner = tcp4(Ipv4Addr::new(192, 0, 2, 40), 42000 + i, 80, TCP_SYN);
            let out = lb.run(&from_client(&inner));
            out.output[26..30].try_into().unwrap()
        })
        .collect();
    assert!(
        sources.len() >= 30,
        "32 flows used only {} outer sources",
        sources.len()
    );
}

#[test]
fn ipip_too_big_for_the_mtu_is_passed_untouched() {
    // 1490 bytes of IP + 20 bytes of outer header > MTU 1500.
    let inner = tcp4(Ipv4Addr::new(192, 0, 2, 40), 41010, 80, TCP_ACK).payload(&[0x5a; 1450]);
    lb().check_all(&[Fixture {
        description: "ipip: would exceed the MTU once encapsulated",
        input: from_client(&inner),
        action: Action::Pass,
        output: None,
        counters: &[(FLOW_MISS, 1), (PASS_TOO_BIG, 1)],
    }]);
}

#[test]
fn decap_restores_the_inner_packet() {
    let mut decap = every_mode_backends_decap();
    let mut fixtures: Vec<Fixture> = encapsulated()
        .into_iter()
        .map(|(kind, client_frame, tunnelled)| {
            let (description, backend_mac) = match kind {
                "4in4" => ("decap 4in4", mac(0x21)),
                "6in6" => ("decap 6in6", mac(0x22)),
                _ => ("decap 4in6", mac(0x23)),
            };
            Fixture {
                description,
                input: tunnelled,
                action: Action::Pass,
                // The frame keeps the tunnel's MACs; after them comes the client's packet.
                output: Some(framed(LB_MAC, backend_mac, &client_frame[14..])),
                counters: &[(DECAP_OK, 1)],
            }
        })
        .collect();
    let (_, _, mut not_local) = encapsulated().remove(0);
    not_local[14 + 19] = 99; // outer destination 10.2.0.99: not this host
    let (_, client_frame, _) = encapsulated().remove(0);
    fixtures.push(Fixture {
        description: "decap: outer destination is not a local address: untouched",
        input: not_local,
        action: Action::Pass,
        output: None,
        counters: &[(DECAP_NOT_OURS, 1)],
    });
    fixtures.push(Fixture {
        description: "decap: plain (not tunnelled) traffic is untouched and not counted",
        input: client_frame,
        action: Action::Pass,
        output: None,
        counters: &[],
    });
    decap.check_all(&fixtures);
}

#[test]
fn established_flow_keeps_its_backend_when_the_ring_changes() {
    use Protocol::Tcp;
    let web = vip(v4(192, 0, 2, 10), 80, Tcp);
    let one = |backends: &[(IpAddr, [u8; 6], u32)]| Services {
        settings: settings(SEED),
        vips: vec![vip_spec("web", web, Forwarding::Dsr, 13, backends)],
    };
    let a = (v4(10, 1, 0, 11), mac(0x11), 100);
    let b = (v4(10, 1, 0, 12), mac(0x12), 100);
    let dst = Ipv4Addr::new(192, 0, 2, 10);
    let syn = tcp4(dst, 43001, 80, TCP_SYN);
    let ack = tcp4(dst, 43001, 80, TCP_ACK | TCP_PSH).payload(b"GET /");
    let other = tcp4(dst, 43002, 80, TCP_SYN);

    let mut lb = Harness::new(Role::Balancer);
    lb.apply(&one(&[a]));
    lb.check_all(&[Fixture {
        description: "SYN while A is the only backend: A",
        input: from_client(&syn),
        action: Action::Tx,
        output: Some(framed(LB_MAC, mac(0x11), &syn.build())),
        counters: &[(FLOW_MISS, 1)],
    }]);

    // Drain A and add B: the ring now holds only B.
    lb.status.insert(
        ("web".into(), a.0),
        BackendStatus {
            drained: true,
            ..BackendStatus::default()
        },
    );
    lb.apply(&one(&[a, b]));
    let vip = lb.live().vips.values().next().unwrap();
    let b_id = vip.backends[&b.0].id;
    assert!(
        vip.table().iter().all(|id| *id == b_id),
        "ring holds only B"
    );
    lb.check_all(&[
        Fixture {
            description: "same flow's ACK after the ring changed: still A (and pinned)",
            input: from_client(&ack),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x11), &ack.build())),
            counters: &[(FLOW_HIT, 1), (FLOOD_PINNED, 1)],
        },
        Fixture {
            description: "a new flow goes to B",
            input: from_client(&other),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x12), &other.build())),
            counters: &[(FLOW_MISS, 1)],
        },
    ]);

    // Remove A entirely: its flow re-hashes to B.
    lb.apply(&one(&[b]));
    lb.check_all(&[Fixture {
        description: "flow whose backend was removed re-hashes",
        input: from_client(&ack),
        action: Action::Tx,
        output: Some(framed(LB_MAC, mac(0x12), &ack.build())),
        counters: &[(FLOW_REHASH, 1)],
    }]);
}

#[test]
fn per_vip_and_per_backend_counters_add_up() {
    let mut lb = lb();
    let dst = Ipv4Addr::new(192, 0, 2, 10);
    let mut bytes = 0u64;
    for i in 0..5u16 {
        let pkt = tcp4(dst, 44000, 80, if i == 0 { TCP_SYN } else { TCP_ACK })
            .payload(&vec![1; i as usize * 10]);
        bytes += pkt.build().len() as u64;
        assert_eq!(lb.run(&from_client(&pkt)).action, Action::Tx as u32);
    }
    let vip = &lb
        .live()
        .vips
        .values()
        .find(|v| v.name == "web4")
        .unwrap()
        .clone();
    let backend = vip.backends.values().next().unwrap();
    for counters in [
        lb.dataplane.vip_counters(vip.meta.vip_id).unwrap(),
        lb.dataplane.backend_counters(backend.id).unwrap(),
    ] {
        assert_eq!(counters.packets, 5);
        assert_eq!(counters.bytes, bytes);
        assert_eq!(counters.new_flows, 1);
        assert_eq!(counters.not_forwarded, 0);
    }
    let empty = lb
        .live()
        .vips
        .values()
        .find(|v| v.name == "empty")
        .unwrap()
        .meta
        .vip_id;
    lb.run(&from_client(&tcp4(
        Ipv4Addr::new(192, 0, 2, 60),
        44001,
        80,
        TCP_SYN,
    )));
    let counters = lb.dataplane.vip_counters(empty).unwrap();
    assert_eq!((counters.packets, counters.not_forwarded), (0, 1));
}

/// A flow hit finds its VIP through the flow's backend (`VIP_SLOTS`), and only while that
/// slot is exactly the packet's VIP: a VIP that changes mode forwards its established flows
/// the new way, a port-0 VIP's flow moves to an exact VIP added later, and back when that VIP
/// is removed.
#[test]
fn flow_hits_follow_the_vip_that_owns_the_packet_now() {
    use Forwarding::*;
    let mut lb = lb();
    let web = Ipv4Addr::new(192, 0, 2, 10);
    let any = Ipv4Addr::new(192, 0, 2, 20);
    let web_ack = tcp4(web, 40101, 80, TCP_ACK | TCP_PSH).payload(b"get");
    let any_ack = tcp4(any, 40102, 8443, TCP_ACK | TCP_PSH).payload(b"get");
    lb.check_all(&[
        Fixture {
            description: "flow of a dsr VIP started",
            input: from_client(&tcp4(web, 40101, 80, TCP_SYN)),
            action: Action::Tx,
            output: Some(framed(
                LB_MAC,
                mac(0x11),
                &tcp4(web, 40101, 80, TCP_SYN).build(),
            )),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "flow of a port-0 VIP started",
            input: from_client(&tcp4(any, 40102, 8443, TCP_SYN)),
            action: Action::Tx,
            output: Some(framed(
                LB_MAC,
                mac(0x12),
                &tcp4(any, 40102, 8443, TCP_SYN).build(),
            )),
            counters: &[(FLOW_MISS, 1)],
        },
        Fixture {
            description: "port-0 VIP flow hit",
            input: from_client(&any_ack),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x12), &any_ack.build())),
            counters: &[(FLOW_HIT, 1), (FLOOD_PINNED, 1)],
        },
    ]);

    let mut services = every_mode();
    services.vips[0].forwarding = Ipip;
    services.vips.push(vip_spec(
        "exact",
        vip(IpAddr::V4(any), 8443, Protocol::Tcp),
        Dsr,
        13,
        &[(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 16)), mac(0x16), 100)],
    ));
    lb.apply(&services);
    let h = hash(IpAddr::V4(CLIENT4), IpAddr::V4(web), 40101, 80, 6);
    let web_tunnelled = Packet::new()
        .eth(LB_MAC, mac(0x11))
        .ipv4(outer_src_v4(h), Ipv4Addr::new(10, 1, 0, 11))
        .tos(0x28)
        .df()
        .ttl(64)
        .ip_in_ip(&web_ack.build())
        .build();
    lb.check_all(&[
        Fixture {
            description: "the VIP is ipip now: its established flow is encapsulated",
            input: from_client(&web_ack),
            action: Action::Tx,
            output: Some(web_tunnelled),
            counters: &[(FLOW_HIT, 1), (FLOOD_PINNED, 1)],
        },
        Fixture {
            description: "an exact VIP now owns the port-0 VIP's flow: its backend takes it",
            input: from_client(&any_ack),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x16), &any_ack.build())),
            counters: &[(FLOW_REHASH, 1)],
        },
    ]);

    services.vips.pop();
    lb.apply(&services);
    lb.check_all(&[Fixture {
        description: "the exact VIP removed: the port-0 VIP takes the flow back",
        input: from_client(&any_ack),
        action: Action::Tx,
        output: Some(framed(LB_MAC, mac(0x12), &any_ack.build())),
        counters: &[(FLOW_REHASH, 1)],
    }]);
}
