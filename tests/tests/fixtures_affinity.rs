//! Client affinity: with `affinity = "client"` the ring is indexed by the client address alone
//! (IPv6: its /64, or its /128), so every connection of a client lands on one backend; the
//! choice is the same on every LB instance, and a drain moves only the drained backend's
//! clients. Each expected backend is predicted from the Maglev table the daemon wrote and
//! lb-common's hash, then checked against the bytes the program sends.

use lb_common::{counters::*, AFFINITY_CLIENT, AFFINITY_CLIENT_V6_HOST};
use lb_userspace::{
    dataplane::Role,
    model::{Affinity, Forwarding, Protocol, Services, VipSpec},
    state::BackendStatus,
};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};
use xdplb_tests::fixture::*;
use xdplb_tests::{
    harness::{vip_spec, Action, Fixture, Harness, CLIENT_MAC, LB_MAC},
    packet::{Packet, TCP_SYN},
};

const WEB4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const GAME4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const WEB6: &str = "2001:db8::10";
const WEB6_HOST: &str = "2001:db8::11";
const PLAIN4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 12);
const RING: u32 = 1021;

fn backends4() -> Vec<(IpAddr, [u8; 6], u32)> {
    (1..=4).map(|i| (v4(10, 1, 0, i), mac(i), 100)).collect()
}

fn backends6() -> Vec<(IpAddr, [u8; 6], u32)> {
    (1..=4)
        .map(|i| (v6(&format!("2001:db8:1::{i}")), mac(0x60 + i), 100))
        .collect()
}

fn with_affinity(mut spec: VipSpec, affinity: Affinity) -> VipSpec {
    spec.affinity = affinity;
    spec
}

fn services() -> Services {
    use Forwarding::Dsr;
    use Protocol::*;
    let client = Affinity::Client { ipv6_host: false };
    Services {
        settings: settings(SEED),
        vips: vec![
            with_affinity(
                vip_spec("web", vip(WEB4.into(), 80, Tcp), Dsr, RING, &backends4()),
                client,
            ),
            // Same backends, UDP: the same Maglev table, so a client meets its TCP backend.
            with_affinity(
                vip_spec(
                    "game",
                    vip(GAME4.into(), 7777, Udp),
                    Dsr,
                    RING,
                    &backends4(),
                ),
                client,
            ),
            with_affinity(
                vip_spec("web6", vip(v6(WEB6), 80, Tcp), Dsr, RING, &backends6()),
                client,
            ),
            with_affinity(
                vip_spec(
                    "web6host",
                    vip(v6(WEB6_HOST), 80, Tcp),
                    Dsr,
                    RING,
                    &backends6(),
                ),
                Affinity::Client { ipv6_host: true },
            ),
            vip_spec(
                "plain",
                vip(PLAIN4.into(), 80, Tcp),
                Dsr,
                RING,
                &backends4(),
            ),
        ],
    }
}

fn lb(services: &Services) -> Harness {
    let mut harness = Harness::new(Role::Balancer);
    harness.apply(services);
    harness
}

/// The backend MAC the ring gives `client` on `vip_name` with client affinity.
fn predicted_mac(
    lb: &Harness,
    services: &Services,
    vip_name: &str,
    client: IpAddr,
    affinity: u8,
) -> [u8; 6] {
    let spec = services.vips.iter().find(|v| v.name == vip_name).unwrap();
    let live = lb
        .live()
        .vips
        .values()
        .find(|v| v.name == vip_name)
        .unwrap();
    let key = flow_key(
        client,
        spec.vip.addr,
        1,
        spec.vip.port,
        spec.vip.protocol.number(),
    );
    let slot = lb_common::client_hash(&key, SEED, affinity) % live.meta.ring_size;
    let id = live.table()[slot as usize];
    let addr = live.backends.iter().find(|(_, b)| b.id == id).unwrap().0;
    spec.backends
        .iter()
        .find(|b| b.addr == *addr)
        .unwrap()
        .mac
        .unwrap()
        .0
}

fn syn_from(client: IpAddr, vip: IpAddr, sport: u16) -> Packet {
    match (client, vip) {
        (IpAddr::V4(c), IpAddr::V4(v)) => Packet::new().ipv4(c, v),
        (IpAddr::V6(c), IpAddr::V6(v)) => Packet::new().ipv6(c, v),
        _ => unreachable!("one family"),
    }
    .tcp(sport, 80)
    .flags(TCP_SYN)
}

/// The destination MAC the program sends `packet` to (it must be forwarded).
fn sent_to(lb: &mut Harness, packet: &Packet) -> [u8; 6] {
    let out = lb.run(&from_client(packet));
    assert_eq!(out.action, Action::Tx as u32, "forwarded");
    out.output[..6].try_into().unwrap()
}

fn client4(i: u8) -> IpAddr {
    v4(198, 51, 100, i)
}

#[test]
fn all_connections_of_a_client_land_on_its_backend() {
    let services = services();
    let mut lb = lb(&services);
    let client: IpAddr = CLIENT4.into();
    let want = predicted_mac(&lb, &services, "web", client, AFFINITY_CLIENT);
    // 200 connections, each a new 5-tuple: exact bytes for each, all to one backend.
    let fixtures: Vec<Fixture> = (0..200u16)
        .map(|i| {
            let syn = tcp4(WEB4, 20000 + i, 80, TCP_SYN);
            Fixture {
                description: "client affinity: a new connection of the same client",
                input: from_client(&syn),
                action: Action::Tx,
                output: Some(framed(LB_MAC, want, &syn.build())),
                counters: &[(FLOW_MISS, 1)],
            }
        })
        .collect();
    lb.check_all(&fixtures);

    // The UDP VIP with the same backends sends this client to the same backend.
    let udp = Packet::new()
        .ipv4(CLIENT4, GAME4)
        .udp(5000, 7777)
        .payload(b"join");
    lb.check_all(&[Fixture {
        description: "client affinity: the client's UDP flow meets its TCP backend",
        input: from_client(&udp),
        action: Action::Tx,
        output: Some(framed(LB_MAC, want, &udp.build())),
        counters: &[(FLOW_MISS, 1)],
    }]);

    // Without affinity the same 200 connections spread over every backend.
    let spread: BTreeSet<[u8; 6]> = (0..200u16)
        .map(|i| sent_to(&mut lb, &tcp4(PLAIN4, 20000 + i, 80, TCP_SYN)))
        .collect();
    assert_eq!(
        spread.len(),
        4,
        "connection affinity spreads a client's connections"
    );
}

#[test]
fn clients_spread_and_two_instances_agree() {
    let services = services();
    let mut first = lb(&services);
    let mut second = lb(&services);
    let mut per_backend: BTreeMap<[u8; 6], usize> = BTreeMap::new();
    for i in 1..=60u8 {
        let client = client4(i);
        let want = predicted_mac(&first, &services, "web", client, AFFINITY_CLIENT);
        for sport in [30000, 30001, 30002] {
            let syn = syn_from(client, WEB4.into(), sport);
            assert_eq!(sent_to(&mut first, &syn), want, "{client} on instance 1");
            assert_eq!(sent_to(&mut second, &syn), want, "{client} on instance 2");
        }
        *per_backend.entry(want).or_default() += 1;
    }
    // 60 clients over 4 equal backends: every backend gets some (15 expected each).
    assert_eq!(per_backend.len(), 4, "{per_backend:?}");
    assert!(per_backend.values().all(|n| *n >= 5), "{per_backend:?}");
}

#[test]
fn ipv6_clients_are_grouped_by_their_64_or_told_apart_by_address() {
    let services = services();
    let mut lb = lb(&services);
    let host =
        |prefix: u16, iid: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xc, prefix, 0, 0, 0, iid));
    // Same /64, different interface ids: one client for /64 affinity.
    for prefix in 0..8u16 {
        let want = predicted_mac(&lb, &services, "web6", host(prefix, 1), AFFINITY_CLIENT);
        for iid in 1..=8u16 {
            let syn = syn_from(host(prefix, iid), v6(WEB6), 31000 + iid);
            assert_eq!(sent_to(&mut lb, &syn), want, "/64 {prefix}, host {iid}");
        }
    }
    // With affinity_ipv6_prefix = 128 the hosts of one /64 are separate clients, each stable.
    let mut seen = BTreeSet::new();
    for iid in 1..=32u16 {
        let client = host(0, iid);
        let want = predicted_mac(&lb, &services, "web6host", client, AFFINITY_CLIENT_V6_HOST);
        for sport in [32000, 32001] {
            assert_eq!(
                sent_to(&mut lb, &syn_from(client, v6(WEB6_HOST), sport)),
                want
            );
        }
        seen.insert(want);
    }
    assert!(
        seen.len() >= 3,
        "32 hosts of one /64 on {} backends",
        seen.len()
    );
}

#[test]
fn a_drain_moves_only_the_drained_backends_clients() {
    let services = services();
    let mut lb = lb(&services);
    let clients: Vec<IpAddr> = (1..=60).map(client4).collect();
    let before: Vec<[u8; 6]> = clients
        .iter()
        .map(|c| sent_to(&mut lb, &syn_from(*c, WEB4.into(), 40000)))
        .collect();
    let drained = before[0];
    let drained_addr = backends4().into_iter().find(|b| b.1 == drained).unwrap().0;
    lb.status.insert(
        ("web".into(), drained_addr),
        BackendStatus {
            drained: true,
            ..BackendStatus::default()
        },
    );
    lb.apply(&services);
    let mut moved = 0;
    for (client, old) in clients.iter().zip(&before) {
        // A new connection (fresh port): the ring decides.
        let new = sent_to(&mut lb, &syn_from(*client, WEB4.into(), 40001));
        if *old == drained {
            assert_ne!(new, drained, "{client} still sent to the drained backend");
            moved += 1;
        } else {
            assert_eq!(new, *old, "{client} moved although its backend stayed");
        }
        // The established connection stays where it was (flow table, per 5-tuple).
        let established = syn_from(*client, WEB4.into(), 40000).flags(0x10);
        assert_eq!(
            sent_to(&mut lb, &established),
            *old,
            "{client}'s connection moved"
        );
    }
    assert!(moved > 0);
    // The drained backend's clients land on one new backend each, still all connections.
    let c = clients[0];
    let again: BTreeSet<[u8; 6]> = (0..20u16)
        .map(|i| sent_to(&mut lb, &syn_from(c, WEB4.into(), 41000 + i)))
        .collect();
    assert_eq!(again.len(), 1, "after the drain, {c} still has one backend");
}

#[test]
fn icmp_error_about_an_unknown_flow_follows_the_client() {
    let services = services();
    let mut lb = lb(&services);
    let want = predicted_mac(&lb, &services, "web", CLIENT4.into(), AFFINITY_CLIENT);
    let quoted = Packet::new()
        .ipv4(WEB4, CLIENT4)
        .tcp(80, 50000)
        .flags(0x10)
        .payload(&[1; 64])
        .build();
    let error = Packet::new()
        .ipv4(Ipv4Addr::new(203, 0, 113, 1), WEB4)
        .icmp(3, 4, [0, 0, 5, 0x78])
        .payload(&quoted);
    let input = Packet::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(Ipv4Addr::new(203, 0, 113, 1), WEB4)
        .icmp(3, 4, [0, 0, 5, 0x78])
        .payload(&quoted)
        .build();
    lb.check_all(&[Fixture {
        description: "client affinity: an ICMP error about a flow this LB never saw goes to the client's backend",
        input,
        action: Action::Tx,
        output: Some(framed(LB_MAC, want, &error.build())),
        counters: &[(ICMP_ERROR_FORWARDED, 1)],
    }]);
}
