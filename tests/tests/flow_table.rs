//! The flow table (a set-associative array, four slots per set): reading it back lists every
//! flow it holds exactly once, and a full set gives up its least valuable entry: an ended
//! flow, then a handshake that never completed, then the least recently seen established
//! flow; never a flow it could keep.

use lb_common::{counters, flow_set_first_slot, flow_slots, flow_table_hash, FLOW_WAYS, PROTO_TCP};
use lb_userspace::dataplane::Role;
use std::{collections::BTreeSet, net::Ipv4Addr};
use xdplb_tests::fixture::{flow_key, one_web_backend};
use xdplb_tests::{
    harness::{Action, Harness, CLIENT_MAC, LB_MAC},
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_SYN},
};

const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

fn balancer() -> Harness {
    let mut lb = Harness::new(Role::Balancer);
    lb.apply(&one_web_backend(
        "10.1.0.11".parse().unwrap(),
        [2, 0, 0, 0, 0, 0x11],
    ));
    lb
}

fn segment(src: Ipv4Addr, sport: u16, flags: u8) -> Vec<u8> {
    Packet::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(src, VIP)
        .tcp(sport, 80)
        .flags(flags)
        .build()
}

fn send(lb: &mut Harness, src: Ipv4Addr, sport: u16, flags: u8) {
    assert_eq!(
        lb.run(&segment(src, sport, flags)).action,
        Action::Tx as u32
    );
}

fn held(lb: &Harness, sport: u16) -> bool {
    let key = flow_key(CLIENT.into(), VIP.into(), sport, 80, PROTO_TCP);
    lb.dataplane.flow(&key).unwrap().is_some()
}

fn evicted(lb: &Harness) -> u64 {
    lb.global_counters()[counters::FLOW_EVICTED as usize]
}

/// Client ports whose flows from [`CLIENT`] share one set of the harness's table.
fn ports_in_one_set(lb: &Harness, count: usize) -> Vec<u16> {
    let set_mask = flow_slots(lb.dataplane.sizes().flow_table_size) / FLOW_WAYS - 1;
    let set_of = |port: u16| {
        let key = flow_key(CLIENT.into(), VIP.into(), port, 80, PROTO_TCP);
        flow_set_first_slot(flow_table_hash(&key), set_mask)
    };
    let target = set_of(20_000);
    let ports: Vec<u16> = (20_000..u16::MAX)
        .filter(|&port| set_of(port) == target)
        .take(count)
        .collect();
    assert_eq!(ports.len(), count, "not enough colliding ports");
    ports
}

#[test]
fn flows_lists_every_held_flow_once() {
    let mut lb = balancer();
    // Nearly as many flows as slots (4096): some sets overflow, and each overflow is counted.
    let mut sent = BTreeSet::new();
    for client in 1..=3u8 {
        for port in 0..1200u16 {
            send(
                &mut lb,
                Ipv4Addr::new(198, 51, 100, client),
                10_000 + port,
                TCP_SYN,
            );
            sent.insert((client, 10_000 + port));
        }
    }
    let flows = lb.dataplane.flows().unwrap();
    let listed: Vec<(u8, u16)> = flows
        .iter()
        .map(|(key, _)| (key.src[3], u16::from_be(key.sport)))
        .collect();
    let unique: BTreeSet<(u8, u16)> = listed.iter().copied().collect();
    assert_eq!(listed.len(), unique.len(), "no flow listed twice");
    assert!(unique.is_subset(&sent), "only flows that were sent");
    assert_eq!(
        listed.len() as u64 + evicted(&lb),
        sent.len() as u64,
        "every flow sent is either listed or counted as evicted"
    );
    assert!(
        listed.len() > 3000,
        "only {} of 3600 flows held",
        listed.len()
    );
    for (key, value) in &flows {
        assert_eq!(
            lb.dataplane.flow(key).unwrap(),
            Some(*value),
            "found by its set"
        );
    }
}

#[test]
fn a_full_set_evicts_ended_then_half_open_then_oldest_flows() {
    let mut lb = balancer();
    let ports = ports_in_one_set(&lb, 6);
    let (established, half_open, ended, newcomers) =
        (&ports[0..2], ports[2], ports[3], &ports[4..6]);
    for &port in established {
        send(&mut lb, CLIENT, port, TCP_SYN);
        send(&mut lb, CLIENT, port, TCP_ACK);
    }
    send(&mut lb, CLIENT, half_open, TCP_SYN);
    send(&mut lb, CLIENT, ended, TCP_SYN);
    send(&mut lb, CLIENT, ended, TCP_ACK);
    send(&mut lb, CLIENT, ended, TCP_FIN | TCP_ACK);
    assert!(
        ports[..4].iter().all(|&p| held(&lb, p)),
        "four flows fill the set"
    );
    assert_eq!(evicted(&lb), 0);

    send(&mut lb, CLIENT, newcomers[0], TCP_SYN);
    assert!(!held(&lb, ended), "the ended flow goes first");
    assert!(held(&lb, half_open) && held(&lb, newcomers[0]));
    assert_eq!(evicted(&lb), 1);

    // Both half-open entries outrank nothing but each other: the older one goes (the ports
    // were sent in this order within the same second, so the first slot of the two).
    send(&mut lb, CLIENT, newcomers[1], TCP_SYN);
    assert!(
        !held(&lb, half_open) || !held(&lb, newcomers[0]),
        "a half-open flow goes next"
    );
    assert!(
        established.iter().all(|&p| held(&lb, p)),
        "established flows stay while the set has half-open ones"
    );
    assert!(held(&lb, newcomers[1]));
    assert_eq!(evicted(&lb), 2);
}

#[test]
fn a_syn_flood_into_one_set_never_evicts_its_established_flows() {
    let mut lb = balancer();
    let ports = ports_in_one_set(&lb, 3 + 30);
    let (established, flood) = ports.split_at(3);
    for &port in established {
        send(&mut lb, CLIENT, port, TCP_SYN);
        send(&mut lb, CLIENT, port, TCP_ACK);
    }
    for &port in flood {
        send(&mut lb, CLIENT, port, TCP_SYN);
    }
    assert!(established.iter().all(|&p| held(&lb, p)));
    assert!(
        held(&lb, *flood.last().unwrap()),
        "the newest SYN has a slot"
    );
    assert_eq!(
        evicted(&lb),
        flood.len() as u64 - 1,
        "each later SYN evicted one"
    );
}

#[test]
fn the_table_hash_spreads_flows_evenly_over_sets() {
    // 40,960 flows over 4,096 sets, 10 per set on average, in the patterns real traffic has:
    // one client's successive ports, many IPv4 clients on one port, IPv6 clients. Poisson(10)
    // puts at most about 25 in the fullest of 4,096 sets and leaves none empty.
    const SETS: u32 = 4096;
    let patterns: [Box<dyn Fn(u32) -> lb_common::FlowKey>; 3] = [
        Box::new(|i| flow_key(CLIENT.into(), VIP.into(), 20_000 + i as u16, 80, PROTO_TCP)),
        Box::new(|i| {
            let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i);
            flow_key(src.into(), VIP.into(), 40_000, 443, PROTO_TCP)
        }),
        Box::new(|i| {
            let src = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, (i >> 8) as u16, 0, 0, 0, i as u16);
            let vip = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
            flow_key(src.into(), vip.into(), 50_000, 80, PROTO_TCP)
        }),
    ];
    for (n, key_of) in patterns.iter().enumerate() {
        let mut per_set = vec![0u32; SETS as usize];
        for i in 0..SETS * 10 {
            per_set[(flow_table_hash(&key_of(i)) & (SETS - 1)) as usize] += 1;
        }
        let (min, max) = (per_set.iter().min().unwrap(), per_set.iter().max().unwrap());
        assert!(
            *min >= 1 && *max <= 30,
            "pattern {n}: sets hold {min} to {max} flows"
        );
    }
}
