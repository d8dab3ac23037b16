//! ICMP for VIP traffic: errors about a VIP's flow reach the flow's backend (dsr, ipip, and
//! through the backend's decap program), and packets too big for the tunnel are answered with
//! "fragmentation needed" / "packet too big". Exact bytes, checksums included.

use lb_common::counters::*;
use lb_userspace::{
    dataplane::Role,
    model::{Forwarding, Protocol, Services},
    state::BackendStatus,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use xdplb_tests::fixture::*;
use xdplb_tests::{
    harness::{vip_spec, Action, Fixture, Harness, CLIENT_MAC, LB_MAC, MTU},
    packet::{Packet, TCP_ACK, TCP_PSH, TCP_SYN},
};

/// A router on the path between a backend and the client.
const ROUTER4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
const WEB4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const DNS4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 30);
const TUN4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 40);
const TUN46: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);
const EMPTY4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 60);

fn lb() -> Harness {
    let mut harness = Harness::new(Role::Balancer);
    harness.apply(&every_mode());
    harness
}

/// A backend's reply to the client (what a router quotes): VIP:vport -> client:cport.
fn reply4(vip: Ipv4Addr, vport: u16, cport: u16) -> Vec<u8> {
    Packet::new()
        .ipv4(vip, CLIENT4)
        .df()
        .tcp(vport, cport)
        .flags(TCP_ACK | TCP_PSH)
        .seq(5000)
        .payload(&[0x42; 1400])
        .build()
}

fn reply6(vip: &str, vport: u16, cport: u16) -> Vec<u8> {
    Packet::new()
        .ipv6(vip.parse().unwrap(), CLIENT6)
        .tcp(vport, cport)
        .flags(TCP_ACK | TCP_PSH)
        .seq(5000)
        .payload(&[0x42; 1400])
        .build()
}

/// "Fragmentation needed, next-hop MTU 1400" from the router to the quoted packet's source,
/// quoting its first 548 bytes (576 in all), as routers do.
fn frag_needed(quoted: &[u8]) -> Packet {
    let dst = Ipv4Addr::new(quoted[12], quoted[13], quoted[14], quoted[15]);
    Packet::new()
        .ipv4(ROUTER4, dst)
        .tos(0xc0)
        .icmp(3, 4, [0, 0, 0x05, 0x78])
        .payload(&quoted[..548])
}

/// "Packet too big, MTU 1400" quoting as much as fits in 1280 bytes.
fn packet_too_big(quoted: &[u8]) -> Packet {
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&quoted[8..24]).unwrap());
    Packet::new()
        .ipv6(ROUTER6, dst)
        .icmp(2, 0, 1400u32.to_be_bytes())
        .payload(&quoted[..1280 - 48])
}

fn from_router(icmp: &Packet) -> Vec<u8> {
    from_client(icmp)
}

#[test]
fn icmp_errors_about_a_vip_flow_reach_its_backend() {
    let time_exceeded = Packet::new()
        .ipv4(ROUTER4, WEB4)
        .icmp(11, 0, [0; 4])
        .payload(&reply4(WEB4, 80, 40001)[..28]);
    let port_unreachable_udp = Packet::new()
        .ipv4(ROUTER4, DNS4)
        .icmp(3, 3, [0; 4])
        .payload(
            &Packet::new()
                .ipv4(DNS4, CLIENT4)
                .udp(53, 40002)
                .payload(b"answer")
                .build(),
        );
    let frag4 = frag_needed(&reply4(WEB4, 80, 40001));
    let ptb6 = packet_too_big(&reply6("2001:db8::10", 80, 40003));
    let forwarded = &[(ICMP_ERROR_FORWARDED, 1)][..];
    lb().check_all(&[
        Fixture {
            description: "dsr: fragmentation needed about web4's flow: MACs to its backend",
            input: from_router(&frag4),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x11), &frag4.build())),
            counters: forwarded,
        },
        Fixture {
            description: "dsr: ICMPv6 packet too big about web6's flow: to its backend",
            input: from_router(&ptb6),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x14), &ptb6.build())),
            counters: forwarded,
        },
        Fixture {
            description: "dsr: time exceeded quoting only the IP header and 8 bytes",
            input: from_router(&time_exceeded),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x11), &time_exceeded.build())),
            counters: forwarded,
        },
        Fixture {
            description: "dsr: port unreachable about a UDP VIP's flow",
            input: from_router(&port_unreachable_udp),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x13), &port_unreachable_udp.build())),
            counters: forwarded,
        },
    ]);
}

/// The ICMP errors of the `ipip` cases and what the backend receives: outer header from the
/// flow's hash (the quoted tuple reversed), exactly as the flow's own packets.
fn tunnelled_errors() -> Vec<(&'static str, Packet, Vec<u8>)> {
    let error4 = frag_needed(&reply4(TUN4, 80, 41001));
    let h = hash(CLIENT4.into(), TUN4.into(), 41001, 80, 6);
    let out4in4 = Packet::new()
        .eth(LB_MAC, mac(0x21))
        .ipv4(outer_src_v4(h), Ipv4Addr::new(10, 2, 0, 11))
        .tos(0xc0)
        .df()
        .ip_in_ip(&error4.build())
        .build();

    let error6 = packet_too_big(&reply6("2001:db8::40", 80, 41002));
    let h = hash(CLIENT6.into(), v6("2001:db8::40"), 41002, 80, 6);
    let out6in6 = Packet::new()
        .eth(LB_MAC, mac(0x22))
        .ipv6(outer_src_v6(h), "2001:db8:2::11".parse().unwrap())
        .flow_label(h & 0xfffff)
        .ip_in_ip(&error6.build())
        .build();

    let error46 = frag_needed(&reply4(TUN46, 80, 41003));
    let h = hash(CLIENT4.into(), TUN46.into(), 41003, 80, 6);
    let out4in6 = Packet::new()
        .eth(LB_MAC, mac(0x23))
        .ipv6(outer_src_v6(h), "2001:db8:2::12".parse().unwrap())
        .tos(0xc0)
        .flow_label(h & 0xfffff)
        .ip_in_ip(&error46.build())
        .build();
    vec![
        ("4in4", error4, out4in4),
        ("6in6", error6, out6in6),
        ("4in6", error46, out4in6),
    ]
}

#[test]
fn icmp_errors_to_an_ipip_vip_are_encapsulated_like_the_flow() {
    let fixtures: Vec<Fixture> = tunnelled_errors()
        .into_iter()
        .map(|(kind, error, output)| Fixture {
            description: match kind {
                "4in4" => "ipip 4in4: fragmentation needed encapsulated to the flow's backend",
                "6in6" => "ipip 6in6: packet too big encapsulated to the flow's backend",
                _ => "ipip 4in6: fragmentation needed to an IPv6 backend",
            },
            input: from_router(&error),
            action: Action::Tx,
            output: Some(output),
            counters: &[(ICMP_ERROR_FORWARDED, 1)],
        })
        .collect();
    lb().check_all(&fixtures);
}

#[test]
fn decap_delivers_a_forwarded_icmp_error_to_the_backend_stack() {
    let mut decap = every_mode_backends_decap();
    let fixtures: Vec<Fixture> = tunnelled_errors()
        .into_iter()
        .map(|(kind, error, tunnelled)| {
            let backend_mac = match kind {
                "4in4" => mac(0x21),
                "6in6" => mac(0x22),
                _ => mac(0x23),
            };
            Fixture {
                description: match kind {
                    "4in4" => "decap 4in4: the ICMP error's destination is the VIP: stripped",
                    "6in6" => "decap 6in6: packet too big stripped",
                    _ => "decap 4in6: fragmentation needed stripped",
                },
                input: tunnelled,
                action: Action::Pass,
                output: Some(framed(LB_MAC, backend_mac, &error.build())),
                counters: &[(DECAP_OK, 1)],
            }
        })
        .collect();
    decap.check_all(&fixtures);
}

#[test]
fn icmp_that_is_not_an_error_about_a_vip_flow_stays_with_the_host() {
    let not_vip = frag_needed(&reply4(Ipv4Addr::new(192, 0, 2, 99), 80, 40001));
    let wrong_port = frag_needed(&reply4(WEB4, 8080, 40001));
    let empty = frag_needed(&reply4(EMPTY4, 80, 40001));
    let cut = Packet::new()
        .ipv4(ROUTER4, WEB4)
        .icmp(3, 4, [0, 0, 0x05, 0x78])
        .payload(&reply4(WEB4, 80, 40001)[..22]);
    let redirect = Packet::new()
        .ipv4(ROUTER4, WEB4)
        .icmp(5, 1, [10, 0, 0, 1])
        .payload(&reply4(WEB4, 80, 40001)[..28]);
    let echo6 = Packet::new()
        .ipv6(CLIENT6, "2001:db8::10".parse().unwrap())
        .icmp_echo_request(7, 1);
    let pass = |description, input: Vec<u8>, counters| Fixture {
        description,
        input,
        action: Action::Pass,
        output: None,
        counters,
    };
    lb().check_all(&[
        pass(
            "error about a flow of an address that is no VIP",
            from_router(&not_vip),
            &[(PASS_NOT_VIP, 1)],
        ),
        pass(
            "error about a port the VIP does not serve",
            from_router(&wrong_port),
            &[(PASS_NOT_VIP, 1)],
        ),
        pass(
            "error about a VIP without backends",
            from_router(&empty),
            &[(PASS_ICMP_NO_BACKEND, 1)],
        ),
        pass(
            "quote cut before the ports",
            from_router(&cut),
            &[(PASS_NOT_TCP_UDP, 1)],
        ),
        pass(
            "redirect (not an error we forward)",
            from_router(&redirect),
            &[(PASS_NOT_TCP_UDP, 1)],
        ),
        pass(
            "ICMPv6 echo to a VIP",
            from_client(&echo6),
            &[(PASS_NOT_TCP_UDP, 1)],
        ),
    ]);
}

#[test]
fn icmp_error_follows_the_flow_table_before_the_ring() {
    use Protocol::Tcp;
    let web = vip(WEB4.into(), 80, Tcp);
    let one = |backends: &[(IpAddr, [u8; 6], u32)]| Services {
        settings: settings(SEED),
        vips: vec![vip_spec("web", web, Forwarding::Dsr, 13, backends)],
    };
    let a = (v4(10, 1, 0, 11), mac(0x11), 100);
    let b = (v4(10, 1, 0, 12), mac(0x12), 100);
    let syn = tcp4(WEB4, 43001, 80, TCP_SYN);
    let mut lb = Harness::new(Role::Balancer);
    lb.apply(&one(&[a]));
    assert_eq!(lb.run(&from_client(&syn)).action, Action::Tx as u32);
    // Drain A and add B: the ring holds only B, the flow table still says A.
    lb.status.insert(
        ("web".into(), a.0),
        BackendStatus {
            drained: true,
            ..BackendStatus::default()
        },
    );
    lb.apply(&one(&[a, b]));
    let known = frag_needed(&reply4(WEB4, 80, 43001));
    let unknown = frag_needed(&reply4(WEB4, 80, 43002));
    lb.check_all(&[
        Fixture {
            description: "error about an established flow: its backend A, not the ring's B",
            input: from_router(&known),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x11), &known.build())),
            counters: &[(ICMP_ERROR_FORWARDED, 1)],
        },
        Fixture {
            description: "error about a flow this LB never saw: the ring's choice, B",
            input: from_router(&unknown),
            action: Action::Tx,
            output: Some(framed(LB_MAC, mac(0x12), &unknown.build())),
            counters: &[(ICMP_ERROR_FORWARDED, 1)],
        },
    ]);
    // The error neither created nor refreshed a flow entry.
    let flow = flow_key(CLIENT4.into(), WEB4.into(), 43002, 80, 6);
    assert_eq!(lb.dataplane.flow(&flow).unwrap(), None);
}

/// A client packet of `len` IP bytes to `dst`, with DF (IPv4).
fn big4(dst: Ipv4Addr, sport: u16, len: usize) -> Packet {
    tcp4(dst, sport, 80, TCP_ACK)
        .df()
        .payload(&vec![0x5a; len - 40])
}

fn big6(dst: &str, sport: u16, len: usize) -> Packet {
    tcp6(dst, sport, 80, TCP_ACK).payload(&vec![0x5a; len - 60])
}

#[test]
fn too_big_to_encapsulate_is_answered_with_icmp() {
    let fits = big4(TUN4, 45000, 1480);
    let df4 = from_client(&big4(TUN4, 45001, 1500));
    let v6 = from_client(&big6("2001:db8::40", 45002, 1500));
    let df46 = from_client(&big4(TUN46, 45003, 1500));
    let no_df = from_client(&tcp4(TUN4, 45004, 80, TCP_ACK).payload(&[0x5a; 1460]));
    let vlan = Packet::new()
        .eth(CLIENT_MAC, LB_MAC)
        .vlan(100)
        .ipv4(CLIENT4, TUN4)
        .df()
        .tcp(45005, 80)
        .flags(TCP_ACK)
        .payload(&[0x5a; 1460])
        .build();
    let sent = &[(FLOW_MISS, 1), (ICMP_TOO_BIG_SENT, 1)][..];
    let mut lb = lb();
    lb.check_all(&[
        Fixture {
            description:
                "IPv4 with DF, 1500 bytes into a 20-byte tunnel: fragmentation needed, MTU 1480",
            output: Some(too_big_reply(&df4, MTU - 20)),
            input: df4,
            action: Action::Tx,
            counters: sent,
        },
        Fixture {
            description: "IPv6, 1500 bytes into a 40-byte tunnel: packet too big, MTU 1460",
            output: Some(too_big_reply(&v6, MTU - 40)),
            input: v6,
            action: Action::Tx,
            counters: sent,
        },
        Fixture {
            description: "IPv4 with DF into an IPv6 tunnel (4in6): MTU 1460",
            output: Some(too_big_reply(&df46, MTU - 40)),
            input: df46,
            action: Action::Tx,
            counters: sent,
        },
        Fixture {
            description: "VLAN-tagged: the reply keeps the tag",
            output: Some(too_big_reply(&vlan, MTU - 20)),
            input: vlan,
            action: Action::Tx,
            counters: sent,
        },
        Fixture {
            description: "IPv4 without DF: passed as before (the stack may fragment)",
            input: no_df,
            action: Action::Pass,
            output: None,
            counters: &[(FLOW_MISS, 1), (PASS_TOO_BIG, 1)],
        },
    ]);
    // One byte less fits: encapsulated (the boundary is exact).
    let out = lb.run(&from_client(&fits));
    assert_eq!(out.action, Action::Tx as u32);
    assert_eq!(out.output.len(), 14 + 20 + 1480);

    // The reply itself, field by field, against an independent reading of the bytes.
    let reply = too_big_reply(&from_client(&big4(TUN4, 45006, 1500)), 1480);
    assert_eq!(&reply[..6], &CLIENT_MAC, "back to the hop it came from");
    assert_eq!(&reply[26..30], &TUN4.octets(), "from the VIP");
    assert_eq!(&reply[30..34], &CLIENT4.octets(), "to the client");
    assert_eq!(
        &reply[34..36],
        &[3, 4],
        "destination unreachable, fragmentation needed"
    );
    assert_eq!(&reply[40..42], &1480u16.to_be_bytes(), "next-hop MTU");
    assert_eq!(reply.len(), 14 + 20 + 8 + 128);
}

#[test]
fn too_big_replies_are_rate_limited_per_cpu() {
    // The limit is per CPU: stay on one for the whole test.
    // SAFETY: plain libc call on this thread with a zeroed, then filled, CPU set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
    let mut services = every_mode();
    services.settings.icmp_too_big_rate = 1;
    let mut lb = Harness::new(Role::Balancer);
    lb.apply(&services);
    let first = from_client(&big4(TUN4, 46001, 1500));
    let second = from_client(&big4(TUN4, 46002, 1500));
    lb.check_all(&[
        Fixture {
            description: "rate 1/s: the first reply is sent",
            output: Some(too_big_reply(&first, MTU - 20)),
            input: first,
            action: Action::Tx,
            counters: &[(FLOW_MISS, 1), (ICMP_TOO_BIG_SENT, 1)],
        },
        Fixture {
            description: "rate 1/s: the second within the second is dropped and counted",
            input: second,
            action: Action::Drop,
            output: None,
            counters: &[(FLOW_MISS, 1), (DROP_TOO_BIG_RATE_LIMITED, 1)],
        },
    ]);
}

#[test]
fn icmp_error_to_a_least_conn_vip_follows_only_the_flow_table() {
    use lb_userspace::scheduler::Scheduler;
    let mut web = vip_spec(
        "web",
        vip(WEB4.into(), 80, Protocol::Tcp),
        Forwarding::Dsr,
        13,
        &[
            (v4(10, 1, 0, 11), mac(0x11), 100),
            (v4(10, 1, 0, 12), mac(0x12), 100),
        ],
    );
    web.scheduler = Scheduler::LeastConn;
    let mut lb = Harness::new(Role::Balancer);
    lb.apply(&Services {
        settings: settings(SEED),
        vips: vec![web],
    });
    let syn = tcp4(WEB4, 43101, 80, TCP_SYN);
    let first = lb.run(&from_client(&syn));
    assert_eq!(first.action, Action::Tx as u32);
    let chosen = first.output[..6].to_vec();
    let known = frag_needed(&reply4(WEB4, 80, 43101));
    let unknown = frag_needed(&reply4(WEB4, 80, 43102));
    lb.check_all(&[
        Fixture {
            description: "error about a flow least-conn placed: the flow's backend",
            input: from_router(&known),
            action: Action::Tx,
            output: Some(framed(LB_MAC, chosen.try_into().unwrap(), &known.build())),
            counters: &[(ICMP_ERROR_FORWARDED, 1)],
        },
        Fixture {
            // Its ring half is a backend list, not a hash table: no slot names the backend.
            description: "error about a flow this LB never saw: left to the host",
            input: from_router(&unknown),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_ICMP_NO_BACKEND, 1)],
        },
    ]);
}
