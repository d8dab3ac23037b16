//! Round robin and least connections: the exact backend sequence new flows get, the counts
//! least-conn keeps on the packet path, and established flows keeping their backend.
//!
//! Both schedulers keep per-CPU state (round robin's turn, least-conn's tie-break start), and
//! `BPF_PROG_TEST_RUN` runs on the calling CPU: every test pins its thread to one CPU first.

use lb_common::{counters::*, FLOW_COUNTED, PROTO_TCP};
use lb_userspace::{
    dataplane::Role,
    model::{Forwarding, Protocol, Services},
    scheduler::{self, Scheduler},
    state::{vip_key, BackendStatus},
    stats::monotonic_seconds,
};
use std::net::{IpAddr, Ipv4Addr};
use xdplb_tests::fixture::*;
use xdplb_tests::{
    harness::{pin_to_one_cpu, vip_spec, Action, Fixture, Harness, LB_MAC},
    packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const RR_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 70);
const LC_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);

/// Round robin over weights 1:1:2 and least-conn over three equal backends.
fn services() -> Services {
    // (name, VIP, scheduler, backend subnet, (address's last byte, MAC's last byte, weight)
    // of each backend): 10.7.0.11 has MAC ..:11.
    let vips = [
        (
            "rr",
            RR_VIP,
            Scheduler::RoundRobin,
            7,
            [(11, 0x11, 100), (12, 0x12, 100), (13, 0x13, 200)],
        ),
        (
            "lc",
            LC_VIP,
            Scheduler::LeastConn,
            8,
            [(21, 0x21, 100), (22, 0x22, 100), (23, 0x23, 100)],
        ),
    ];
    Services {
        settings: settings(SEED),
        vips: vips
            .into_iter()
            .map(|(name, address, scheduler, subnet, backends)| {
                let backends: Vec<(IpAddr, [u8; 6], u32)> = backends
                    .iter()
                    .map(|(last, mac_last, weight)| {
                        (v4(10, subnet, 0, *last), mac(*mac_last), *weight)
                    })
                    .collect();
                let vip_address = vip(IpAddr::V4(address), 80, Protocol::Tcp);
                let mut spec = vip_spec(name, vip_address, Forwarding::Dsr, 13, &backends);
                spec.scheduler = scheduler;
                spec
            })
            .collect(),
    }
}

fn lb() -> Harness {
    pin_to_one_cpu();
    let mut harness = Harness::new(Role::Balancer);
    harness.apply(&services());
    harness
}

/// A client segment of flow `sport` to `vip`, and the fixture saying it goes to `backend`.
fn to_backend(
    description: &'static str,
    vip: Ipv4Addr,
    sport: u16,
    flags: u8,
    backend: u8,
    counters: &'static [(u32, u64)],
) -> Fixture {
    let segment = tcp4(vip, sport, 80, flags);
    Fixture {
        description,
        input: from_client(&segment),
        action: Action::Tx,
        output: Some(framed(LB_MAC, mac(backend), &segment.build())),
        counters,
    }
}

const NEW: &[(u32, u64)] = &[(FLOW_MISS, 1)];
/// A flow's first hit (its second packet) also pins it (the flood defence).
const HIT: &[(u32, u64)] = &[(FLOW_HIT, 1), (FLOOD_PINNED, 1)];
/// Later hits of a pinned flow.
const PINNED_HIT: &[(u32, u64)] = &[(FLOW_HIT, 1)];

#[test]
fn round_robin_takes_backends_in_weighted_turn() {
    let mut lb = lb();
    // Smooth weighted round robin over 1:1:2 (by address: .11, .12, .13): .13 .11 .12 .13.
    let turn = [0x13, 0x11, 0x12, 0x13];
    let fixtures: Vec<Fixture> = turn
        .iter()
        .chain(&turn)
        .enumerate()
        .map(|(i, backend)| {
            to_backend(
                "round robin: a new flow takes the next backend of the weighted turn",
                RR_VIP,
                41000 + i as u16,
                TCP_SYN,
                *backend,
                NEW,
            )
        })
        .collect();
    lb.check_all(&fixtures);
    lb.check_all(&[
        to_backend(
            "round robin: an established flow keeps its backend, and takes no turn",
            RR_VIP,
            41001,
            TCP_ACK,
            0x11,
            HIT,
        ),
        to_backend(
            "round robin: the next new flow continues the turn",
            RR_VIP,
            41100,
            TCP_SYN,
            0x13,
            NEW,
        ),
    ]);
}

#[test]
fn round_robin_leaves_drained_backends_out_of_the_turn() {
    let mut lb = lb();
    lb.check(&to_backend(
        "round robin: first flow",
        RR_VIP,
        42000,
        TCP_SYN,
        0x13,
        NEW,
    ))
    .unwrap();
    lb.status.insert(
        ("rr".into(), v4(10, 7, 0, 13)),
        BackendStatus {
            drained: true,
            ..BackendStatus::default()
        },
    );
    lb.apply(&services());
    // The turn is now .11 .12, and this CPU's cursor (at 1) carries on in it.
    lb.check_all(&[
        to_backend(
            "round robin: drained backend keeps its established flow",
            RR_VIP,
            42000,
            TCP_ACK,
            0x13,
            HIT,
        ),
        to_backend(
            "round robin, drained .13: .12",
            RR_VIP,
            42001,
            TCP_SYN,
            0x12,
            NEW,
        ),
        to_backend(
            "round robin, drained .13: .11",
            RR_VIP,
            42002,
            TCP_SYN,
            0x11,
            NEW,
        ),
        to_backend(
            "round robin, drained .13: .12",
            RR_VIP,
            42003,
            TCP_SYN,
            0x12,
            NEW,
        ),
    ]);
}

/// Active connections least-conn counts for each backend of "lc", in address order.
fn counts(lb: &Harness) -> Vec<i64> {
    let vip = &lb.live().vips[&vip_key(&vip(IpAddr::V4(LC_VIP), 80, Protocol::Tcp))];
    vip.backends
        .values()
        .map(|b| lb.dataplane.active_conns(b.id).unwrap())
        .collect()
}

#[test]
fn least_conn_picks_the_least_loaded_and_counts_on_the_packet_path() {
    let mut lb = lb();
    // All idle: ties go to the first backend after the one chosen last, so equal backends take
    // turns; then the least loaded wins.
    lb.check_all(&[
        to_backend(
            "least-conn, all at 0: .21",
            LC_VIP,
            43001,
            TCP_SYN,
            0x21,
            NEW,
        ),
        to_backend(
            "least-conn, .21 has 1: .22",
            LC_VIP,
            43002,
            TCP_SYN,
            0x22,
            NEW,
        ),
        to_backend(
            "least-conn, .23 is the only one at 0",
            LC_VIP,
            43003,
            TCP_SYN,
            0x23,
            NEW,
        ),
        to_backend(
            "least-conn, all at 1: .21",
            LC_VIP,
            43004,
            TCP_SYN,
            0x21,
            NEW,
        ),
    ]);
    assert_eq!(counts(&lb), [2, 1, 1], "one count per new flow");
    lb.check_all(&[
        to_backend(
            "least-conn: established flow, no count",
            LC_VIP,
            43001,
            TCP_ACK,
            0x21,
            HIT,
        ),
        to_backend(
            "least-conn: the client's FIN gives the count back",
            LC_VIP,
            43001,
            TCP_FIN | TCP_ACK,
            0x21,
            PINNED_HIT,
        ),
        to_backend(
            "least-conn: a retransmitted FIN gives nothing more",
            LC_VIP,
            43001,
            TCP_FIN | TCP_ACK,
            0x21,
            PINNED_HIT,
        ),
        to_backend(
            "least-conn: the client's RST gives the count back",
            LC_VIP,
            43002,
            TCP_RST,
            0x22,
            HIT,
        ),
    ]);
    assert_eq!(
        counts(&lb),
        [1, 0, 1],
        "FIN and RST each gave one count back, once"
    );
    lb.check_all(&[
        to_backend(
            "least-conn: .22 is the least loaded",
            LC_VIP,
            43005,
            TCP_SYN,
            0x22,
            NEW,
        ),
        to_backend(
            "least-conn: all at 1 again, .23 is next after .22",
            LC_VIP,
            43006,
            TCP_SYN,
            0x23,
            NEW,
        ),
        to_backend(
            "least-conn: .21 and .22 hold 1, .23 holds 2: .21",
            LC_VIP,
            43007,
            TCP_SYN,
            0x21,
            NEW,
        ),
    ]);
    assert_eq!(counts(&lb), [2, 1, 2]);
    let closed = lb
        .dataplane
        .flow(&flow_key(
            IpAddr::V4(CLIENT4),
            IpAddr::V4(LC_VIP),
            43001,
            80,
            PROTO_TCP,
        ))
        .unwrap()
        .expect("the closed flow's entry stays");
    assert_eq!(
        closed.state & FLOW_COUNTED,
        0,
        "a closed flow holds no count"
    );
}

#[test]
fn least_conn_counts_a_flow_again_when_it_comes_back_from_idle() {
    let mut lb = lb();
    lb.check(&to_backend(
        "least-conn: first flow",
        LC_VIP,
        44001,
        TCP_SYN,
        0x21,
        NEW,
    ))
    .unwrap();
    // What the daemon's reconciliation does to a flow idle past the timeout.
    let key = flow_key(
        IpAddr::V4(CLIENT4),
        IpAddr::V4(LC_VIP),
        44001,
        80,
        PROTO_TCP,
    );
    let mut flow = lb.dataplane.flow(&key).unwrap().unwrap();
    assert_ne!(flow.state & FLOW_COUNTED, 0);
    flow.state &= !FLOW_COUNTED;
    assert!(lb.dataplane.update_flow(&key, &flow).unwrap());
    let id = flow.backend_id;
    lb.dataplane.add_active_conns(id, -1).unwrap();
    assert_eq!(counts(&lb), [0, 0, 0]);
    lb.check(&to_backend(
        "least-conn: an uncounted open flow's next packet counts it again",
        LC_VIP,
        44001,
        TCP_ACK,
        0x21,
        HIT,
    ))
    .unwrap();
    assert_eq!(counts(&lb), [1, 0, 0]);
}

#[test]
fn least_conn_skips_drained_backends_and_weighs_counts() {
    let mut lb = lb();
    lb.status.insert(
        ("lc".into(), v4(10, 8, 0, 21)),
        BackendStatus {
            drained: true,
            ..BackendStatus::default()
        },
    );
    let mut services = services();
    // .23 weighs 3 times .22: it takes 3 flows for each of .22's.
    services.vips[1].backends[2].weight = 300;
    lb.apply(&services);
    let fixtures: Vec<Fixture> = [0x22, 0x23, 0x23, 0x23, 0x22, 0x23, 0x23, 0x23]
        .iter()
        .enumerate()
        .map(|(i, backend)| {
            to_backend(
                "least-conn 1:3, .21 drained: fewest connections per weight",
                LC_VIP,
                45000 + i as u16,
                TCP_SYN,
                *backend,
                NEW,
            )
        })
        .collect();
    lb.check_all(&fixtures);
    assert_eq!(counts(&lb), [0, 2, 6]);
}

#[test]
fn least_conn_shares_ties_exactly_around_a_loaded_backend() {
    let mut lb = lb();
    let drained = |lb: &mut Harness, drained: bool| {
        for last in [22, 23] {
            lb.status.insert(
                ("lc".into(), v4(10, 8, 0, last)),
                BackendStatus {
                    drained,
                    ..BackendStatus::default()
                },
            );
        }
        lb.apply(&services());
    };
    drained(&mut lb, true);
    let long: Vec<Fixture> = (0..3)
        .map(|i| {
            to_backend(
                "least-conn, .22 and .23 drained: .21",
                LC_VIP,
                46000 + i,
                TCP_SYN,
                0x21,
                NEW,
            )
        })
        .collect();
    lb.check_all(&long);
    drained(&mut lb, false);
    assert_eq!(counts(&lb), [3, 0, 0]);
    // Short connections (SYN, then the client's FIN): .22 and .23 tie at 0 each time and take
    // turns, whichever backend the scan starts at.
    let mut fixtures = Vec::new();
    for (i, backend) in [0x22, 0x23, 0x22, 0x23, 0x22, 0x23].into_iter().enumerate() {
        let sport = 46100 + i as u16;
        fixtures.push(to_backend(
            "least-conn, .21 loaded: .22 and .23 alternate",
            LC_VIP,
            sport,
            TCP_SYN,
            backend,
            NEW,
        ));
        fixtures.push(to_backend(
            "least-conn: the short connection closes",
            LC_VIP,
            sport,
            TCP_FIN | TCP_ACK,
            backend,
            HIT,
        ));
    }
    lb.check_all(&fixtures);
    assert_eq!(counts(&lb), [3, 0, 0]);
}

#[test]
fn evicted_flows_give_their_counts_back_and_the_scan_settles_idle_ones() {
    let mut lb = lb();
    // More new flows than the 4,096-slot flow table holds: each eviction of an entry that
    // holds a count gives it back.
    const FLOWS: u16 = 6000;
    let before = lb.global_counters()[FLOW_EVICTED as usize];
    for i in 0..FLOWS {
        let syn = tcp4(LC_VIP, 10000 + i, 80, TCP_SYN);
        assert_eq!(lb.run(&from_client(&syn)).action, Action::Tx as u32);
    }
    let evicted = lb.global_counters()[FLOW_EVICTED as usize] - before;
    let live = lb.live().clone();
    let flows = lb.dataplane.flows().unwrap();
    let mut held = [0i64; 3];
    let ids: Vec<u32> = live.vips[&vip_key(&vip(IpAddr::V4(LC_VIP), 80, Protocol::Tcp))]
        .backends
        .values()
        .map(|b| b.id)
        .collect();
    for (_, flow) in &flows {
        if let Some(n) = ids.iter().position(|id| *id == flow.backend_id) {
            held[n] += i64::from(flow.state & FLOW_COUNTED != 0);
        }
    }
    assert_eq!(
        held.iter().sum::<i64>() + evicted as i64,
        i64::from(FLOWS),
        "every flow is held or was evicted: {held:?}, {evicted} evicted"
    );
    assert!(evicted > 0, "the table evicted some");
    assert_eq!(counts(&lb), held, "evicted entries gave their counts back");
    let now = monotonic_seconds();
    scheduler::settle_counts(&mut lb.dataplane, &live, &flows, now, 300).unwrap();
    assert_eq!(
        counts(&lb),
        held,
        "the scan agrees: counts are the counted entries found"
    );

    // Ten seconds later with a 5 s idle timeout, every one of them is idle: counts go back and
    // the entries no longer hold one.
    scheduler::settle_counts(&mut lb.dataplane, &live, &flows, now + 10, 5).unwrap();
    assert_eq!(counts(&lb), [0, 0, 0]);
    let counted = lb
        .dataplane
        .flows()
        .unwrap()
        .iter()
        .filter(|(_, flow)| flow.state & FLOW_COUNTED != 0)
        .count();
    assert_eq!(
        counted, 0,
        "idle entries were rewritten without FLOW_COUNTED"
    );
}
