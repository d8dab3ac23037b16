//! The filter stage and the flood defence, with exact expected output and counters: source
//! ACLs, the blocklist (per VIP and for every VIP), new-flow limits (per source, IPv6 by
//! /64, per VIP), and the pinned table that floods cannot flush.

use lb_common::{counters::*, FLOW_PINNED};
use lb_userspace::{
    acl::{AclSpec, SourceEntry},
    dataplane::Role,
    limits::LimitsSpec,
    model::{Forwarding, Prefix, Protocol, Services, VipSpec},
    state::BackendStatus,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use xdplb_tests::fixture::*;
use xdplb_tests::{
    harness::{vip_spec, Action, Fixture, Harness, LB_MAC},
    packet::{Packet, TCP_ACK, TCP_SYN},
};

const WEB4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const OPEN4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const WEB6: &str = "2001:db8::10";

fn prefixes(list: &[&str]) -> Vec<Prefix> {
    list.iter().map(|p| p.parse().unwrap()).collect()
}

/// "web" (IPv4 and IPv6 variants) with the given filter; "open", another VIP, without any.
fn services(acl: AclSpec, limits: Option<LimitsSpec>) -> Services {
    let with = |mut spec: VipSpec| {
        spec.acl = acl.clone();
        spec.limits = limits;
        spec
    };
    Services {
        settings: settings(SEED),
        vips: vec![
            with(vip_spec(
                "web",
                vip(IpAddr::V4(WEB4), 80, Protocol::Tcp),
                Forwarding::Dsr,
                13,
                &[(v4(10, 1, 0, 11), mac(0x11), 100)],
            )),
            with(vip_spec(
                "web6",
                vip(v6(WEB6), 80, Protocol::Tcp),
                Forwarding::Dsr,
                13,
                &[(v6("2001:db8:1::11"), mac(0x14), 100)],
            )),
            vip_spec(
                "open",
                vip(IpAddr::V4(OPEN4), 80, Protocol::Tcp),
                Forwarding::Dsr,
                13,
                &[(v4(10, 1, 0, 12), mac(0x12), 100)],
            ),
        ],
    }
}

fn lb(services: &Services) -> Harness {
    let mut lb = Harness::new(Role::Balancer);
    lb.apply(services);
    lb
}

fn syn4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16) -> Packet {
    seg4(src, dst, sport, TCP_SYN)
}

fn seg4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, flags: u8) -> Packet {
    Packet::new()
        .ipv4(src, dst)
        .tos(0x28)
        .tcp(sport, 80)
        .flags(flags)
        .seq(1000)
}

fn syn6(src: &str, sport: u16) -> Packet {
    Packet::new()
        .ipv6(src.parse::<Ipv6Addr>().unwrap(), WEB6.parse().unwrap())
        .tcp(sport, 80)
        .flags(TCP_SYN)
        .seq(1000)
}

/// Forwarded to the backend with MAC `backend` (dsr: only the MACs change).
fn forwarded(
    description: &'static str,
    packet: &Packet,
    backend: u8,
    counters: &'static [(u32, u64)],
) -> Fixture {
    Fixture {
        description,
        input: from_client(packet),
        action: Action::Tx,
        output: Some(framed(LB_MAC, mac(backend), &packet.build())),
        counters,
    }
}

fn dropped(description: &'static str, packet: &Packet, counters: &'static [(u32, u64)]) -> Fixture {
    Fixture {
        description,
        input: from_client(packet),
        action: Action::Drop,
        output: None,
        counters,
    }
}

fn vip_id(lb: &Harness, name: &str) -> u32 {
    lb.live()
        .vips
        .values()
        .find(|v| v.name == name)
        .expect("VIP")
        .meta
        .vip_id
}

const ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const DENIED_INSIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);

fn web_acl() -> AclSpec {
    AclSpec {
        allow: Some(prefixes(&["198.51.100.0/24", "2001:db8:c::/48"])),
        deny: prefixes(&["198.51.100.128/25"]),
    }
}

#[test]
fn source_acl_allows_denies_and_leaves_other_vips_alone() {
    let mut lb = lb(&services(web_acl(), None));
    lb.check_all(&[
        forwarded(
            "allowed IPv4 source (inside allow_sources)",
            &syn4(ALLOWED, WEB4, 46001),
            0x11,
            &[(FLOW_MISS, 1)],
        ),
        dropped(
            "source inside allow and deny: deny wins",
            &syn4(DENIED_INSIDE, WEB4, 46002),
            &[(DROP_SOURCE_DENIED, 1)],
        ),
        dropped(
            "source outside the allow list",
            &syn4(OUTSIDE, WEB4, 46003),
            &[(DROP_SOURCE_DENIED, 1)],
        ),
        forwarded(
            "allowed IPv6 source (2001:db8:c::/48)",
            &syn6("2001:db8:c::7", 46004),
            0x14,
            &[(FLOW_MISS, 1)],
        ),
        dropped(
            "IPv6 source outside the allow list",
            &syn6("2001:db8:d::7", 46005),
            &[(DROP_SOURCE_DENIED, 1)],
        ),
        forwarded(
            "the same outside source to a VIP without ACL",
            &syn4(OUTSIDE, OPEN4, 46006),
            0x12,
            &[(FLOW_MISS, 1)],
        ),
    ]);
    let drops = lb.dataplane.vip_drops(vip_id(&lb, "web")).unwrap();
    assert_eq!(drops.source_denied, 2, "{drops:?}");
    let drops = lb.dataplane.vip_drops(vip_id(&lb, "open")).unwrap();
    assert_eq!(drops.source_denied, 0);
}

#[test]
fn a_reload_that_denies_a_source_stops_its_established_flow() {
    let mut lb = lb(&services(AclSpec::default(), None));
    lb.check_all(&[forwarded(
        "no ACL yet: SYN forwarded",
        &syn4(ALLOWED, WEB4, 46101),
        0x11,
        &[(FLOW_MISS, 1)],
    )]);
    lb.apply(&services(
        AclSpec {
            allow: None,
            deny: prefixes(&["198.51.100.0/24"]),
        },
        None,
    ));
    lb.check_all(&[
        dropped(
            "deny_sources now covers it: its established flow's ACK is dropped",
            &seg4(ALLOWED, WEB4, 46101, TCP_ACK),
            &[(DROP_SOURCE_DENIED, 1)],
        ),
        forwarded(
            "other sources: allowed (deny list only)",
            &syn4(OUTSIDE, WEB4, 46102),
            0x11,
            &[(FLOW_MISS, 1)],
        ),
    ]);
    // Removing the ACL again lets the flow continue on its backend.
    lb.apply(&services(AclSpec::default(), None));
    lb.check_all(&[forwarded(
        "ACL removed: the flow continues",
        &seg4(ALLOWED, WEB4, 46101, TCP_ACK),
        0x11,
        &[(FLOW_HIT, 1), (FLOOD_PINNED, 1)],
    )]);
}

fn block(vip: Option<&str>, prefix: &str) -> (Option<String>, SourceEntry) {
    (
        vip.map(str::to_string),
        SourceEntry::of(&prefix.parse().unwrap()),
    )
}

#[test]
fn blocklist_drops_every_packet_of_the_source_and_counts_them() {
    let services = services(AclSpec::default(), None);
    let mut lb = lb(&services);
    lb.check_all(&[forwarded(
        "before the block: a flow from 203.0.113.5",
        &syn4(OUTSIDE, WEB4, 46201),
        0x11,
        &[(FLOW_MISS, 1)],
    )]);
    lb.blocked = [
        block(None, "203.0.113.0/24"),
        block(Some("web"), "198.51.100.7/32"),
    ]
    .into();
    lb.apply(&services);
    let not_a_vip = Ipv4Addr::new(192, 0, 2, 99);
    lb.check_all(&[
        dropped(
            "blocked for every VIP: its established flow stops",
            &seg4(OUTSIDE, WEB4, 46201, TCP_ACK),
            &[(DROP_BLOCKED, 1)],
        ),
        dropped(
            "blocked for every VIP: another VIP too",
            &syn4(OUTSIDE, OPEN4, 46202),
            &[(DROP_BLOCKED, 1)],
        ),
        Fixture {
            description: "never the host's own traffic: to a non-VIP address it passes",
            input: from_client(&syn4(OUTSIDE, not_a_vip, 46203)),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_NOT_VIP, 1)],
        },
        dropped(
            "blocked for web only: web drops it",
            &syn4(ALLOWED, WEB4, 46204),
            &[(DROP_BLOCKED, 1)],
        ),
        forwarded(
            "blocked for web only: open serves it",
            &syn4(ALLOWED, OPEN4, 46205),
            0x12,
            &[(FLOW_MISS, 1)],
        ),
    ]);
    let counts: Vec<(u32, u32, u64)> = lb
        .dataplane
        .blocklist()
        .unwrap()
        .iter()
        .map(|(key, packets)| {
            let (scope, entry) = SourceEntry::from_key(key);
            (scope, entry.len, *packets)
        })
        .collect();
    let web = vip_id(&lb, "web");
    assert!(counts.contains(&(u32::MAX, 32 + 96 + 24, 2)), "{counts:?}");
    assert!(counts.contains(&(web, 32 + 128, 1)), "{counts:?}");
    let drops = lb.dataplane.vip_drops(web).unwrap();
    assert_eq!(drops.blocked, 2);

    lb.blocked.clear();
    lb.apply(&services);
    lb.check_all(&[forwarded(
        "unblocked: a new connection is served",
        &syn4(OUTSIDE, WEB4, 46206),
        0x11,
        &[(FLOW_MISS, 1)],
    )]);
}

fn limits(per_source: Option<u32>, burst: Option<u32>, total: Option<u32>) -> Option<LimitsSpec> {
    Some(LimitsSpec {
        per_source,
        burst,
        total,
    })
}

// The limits below admit one or two new flows per second: a fixture run takes milliseconds,
// so no token comes back while it runs.

#[test]
fn per_source_limit_refuses_new_flows_over_it_never_established_ones() {
    let mut lb = lb(&services(
        AclSpec::default(),
        limits(Some(1), Some(2), None),
    ));
    let other = Ipv4Addr::new(198, 51, 100, 8);
    lb.check_all(&[
        forwarded(
            "new flow 1 of the source: under the limit",
            &syn4(ALLOWED, WEB4, 46301),
            0x11,
            &[(FLOW_MISS, 1)],
        ),
        forwarded(
            "new flow 2: within the burst of 2",
            &syn4(ALLOWED, WEB4, 46302),
            0x11,
            &[(FLOW_MISS, 1)],
        ),
        dropped(
            "new flow 3: over the per-source limit",
            &syn4(ALLOWED, WEB4, 46303),
            &[(FLOW_MISS, 1), (DROP_RATE_LIMITED_SOURCE, 1)],
        ),
        forwarded(
            "established flow 1 of the same source: never limited",
            &seg4(ALLOWED, WEB4, 46301, TCP_ACK),
            0x11,
            &[(FLOW_HIT, 1), (FLOOD_PINNED, 1)],
        ),
        forwarded(
            "another source: its own bucket",
            &syn4(other, WEB4, 46304),
            0x11,
            &[(FLOW_MISS, 1)],
        ),
        forwarded(
            "a VIP without limits",
            &syn4(ALLOWED, OPEN4, 46305),
            0x12,
            &[(FLOW_MISS, 1)],
        ),
    ]);
    let drops = lb.dataplane.vip_drops(vip_id(&lb, "web")).unwrap();
    assert_eq!(drops.rate_limited_source, 1);
}

#[test]
fn ipv6_sources_are_limited_per_64() {
    let mut lb = lb(&services(
        AclSpec::default(),
        limits(Some(1), Some(1), None),
    ));
    lb.check_all(&[
        forwarded(
            "2001:db8:c::7: first new flow of its /64",
            &syn6("2001:db8:c::7", 46401),
            0x14,
            &[(FLOW_MISS, 1)],
        ),
        dropped(
            "2001:db8:c::8: same /64, over the limit",
            &syn6("2001:db8:c::8", 46402),
            &[(FLOW_MISS, 1), (DROP_RATE_LIMITED_SOURCE, 1)],
        ),
        forwarded(
            "2001:db8:c:1::7: another /64",
            &syn6("2001:db8:c:1::7", 46403),
            0x14,
            &[(FLOW_MISS, 1)],
        ),
    ]);
}

#[test]
fn vip_total_limit_applies_over_all_sources() {
    let mut lb = lb(&services(AclSpec::default(), limits(None, None, Some(2))));
    let src = |last| Ipv4Addr::new(198, 51, 100, last);
    lb.check_all(&[
        forwarded(
            "source 1: under the VIP limit",
            &syn4(src(1), WEB4, 46501),
            0x11,
            &[(FLOW_MISS, 1)],
        ),
        forwarded(
            "source 2: under the VIP limit",
            &syn4(src(2), WEB4, 46502),
            0x11,
            &[(FLOW_MISS, 1)],
        ),
        dropped(
            "source 3: over the VIP's total",
            &syn4(src(3), WEB4, 46503),
            &[(FLOW_MISS, 1), (DROP_RATE_LIMITED_TOTAL, 1)],
        ),
    ]);
    let drops = lb.dataplane.vip_drops(vip_id(&lb, "web")).unwrap();
    assert_eq!(drops.rate_limited_total, 1);
}

/// Sends `tuples` spoofed tuples from 10.200.0.0/16, SYN then ACK each (the pattern that
/// flushes the flow table's sets), through the real program.
fn flood(lb: &mut Harness, tuples: u32) {
    for i in 0..tuples {
        let src = Ipv4Addr::from(0x0ac8_0000 + (i >> 8));
        let sport = 1024 + (i & 0xff) as u16;
        for flags in [TCP_SYN, TCP_ACK] {
            let out = lb.run(&from_client(&seg4(src, WEB4, sport, flags)));
            assert_eq!(
                out.action,
                Action::Tx as u32,
                "flood packet {i} not forwarded"
            );
        }
    }
}

#[test]
fn a_pinned_flow_survives_a_flood_that_flushes_the_flow_table() {
    let a = v4(10, 1, 0, 11);
    let mut services = services(AclSpec::default(), None);
    // Budget for every flood tuple: the pinned table fills up, and what is pinned stays.
    services.settings.flood.pins_per_second = 10_000_000;
    services.vips[0]
        .backends
        .push(lb_userspace::model::BackendSpec {
            port: None,
            addr: v4(10, 1, 0, 13),
            weight: 0,
            mac: Some(lb_userspace::model::Mac(mac(0x13))),
            health_port: None,
        });
    let mut lb = lb(&services);
    let key = flow_key(IpAddr::V4(ALLOWED), IpAddr::V4(WEB4), 46601, 80, 6);
    lb.check_all(&[
        forwarded(
            "SYN: new flow, not pinned yet",
            &syn4(ALLOWED, WEB4, 46601),
            0x11,
            &[(FLOW_MISS, 1)],
        ),
        forwarded(
            "ACK: second packet, pinned",
            &seg4(ALLOWED, WEB4, 46601, TCP_ACK),
            0x11,
            &[(FLOW_HIT, 1), (FLOOD_PINNED, 1)],
        ),
    ]);
    assert_ne!(
        lb.dataplane.flow(&key).unwrap().unwrap().state & FLOW_PINNED,
        0
    );
    lb.check_all(&[
        forwarded(
            "second flow: SYN",
            &syn4(ALLOWED, WEB4, 46603),
            0x11,
            &[(FLOW_MISS, 1)],
        ),
        forwarded(
            "second flow: ACK, pinned",
            &seg4(ALLOWED, WEB4, 46603, TCP_ACK),
            0x11,
            &[(FLOW_HIT, 1), (FLOOD_PINNED, 1)],
        ),
    ]);
    // Drain A: new flows would now go to the other backend, only the flow table keeps A.
    lb.status.insert(
        ("web".into(), a),
        BackendStatus {
            drained: true,
            ..BackendStatus::default()
        },
    );
    services.vips[0].backends[1].weight = 100;
    lb.apply(&services);

    let before = lb.global_counters();
    flood(&mut lb, 12_000);
    let after = lb.global_counters();
    let moved = |i: u32| after[i as usize] - before[i as usize];
    assert_eq!(
        lb.dataplane.flow(&key).unwrap(),
        None,
        "12,000 SYN+ACK tuples evict the idle flow from the 4,096-slot table"
    );
    assert_eq!(moved(FLOOD_PINNED), 4096 - 2, "the pinned table filled up");
    assert_eq!(
        moved(FLOOD_PIN_FAILED),
        12_000 - 4094,
        "then pins fail, nothing is evicted"
    );

    lb.check_all(&[
        forwarded(
            "after the flood: the idle flow is restored to its drained backend A",
            &seg4(ALLOWED, WEB4, 46601, TCP_ACK),
            0x11,
            // The flood's entries fill every set: coming back takes one's slot.
            &[(FLOOD_RESTORED, 1), (FLOW_HIT, 1), (FLOW_EVICTED, 1)],
        ),
        forwarded(
            "a SYN on the evicted, pinned second flow: a new connection, the ring picks B",
            &syn4(ALLOWED, WEB4, 46603),
            0x13,
            &[(FLOW_MISS, 1), (FLOW_EVICTED, 1)],
        ),
        forwarded(
            "a new client after the flood: served (by the ring: B)",
            &syn4(OUTSIDE, WEB4, 46602),
            0x13,
            &[(FLOW_MISS, 1), (FLOW_EVICTED, 1)],
        ),
        forwarded(
            "its second packet: forwarded, the full pinned table refuses the pin",
            &seg4(OUTSIDE, WEB4, 46602, TCP_ACK),
            0x13,
            &[(FLOW_HIT, 1), (FLOOD_PIN_FAILED, 1)],
        ),
    ]);
}

#[test]
fn pins_over_the_budget_are_deferred_until_it_refills() {
    let mut services = services(AclSpec::default(), None);
    services.settings.flood.pins_per_second = 1;
    let mut lb = lb(&services);
    let other = Ipv4Addr::new(198, 51, 100, 8);
    lb.check_all(&[
        forwarded(
            "flow 1: SYN",
            &syn4(ALLOWED, WEB4, 46701),
            0x11,
            &[(FLOW_MISS, 1)],
        ),
        forwarded(
            "flow 1: ACK, pinned (the budget's one pin)",
            &seg4(ALLOWED, WEB4, 46701, TCP_ACK),
            0x11,
            &[(FLOW_HIT, 1), (FLOOD_PINNED, 1)],
        ),
        forwarded(
            "flow 2: SYN",
            &syn4(other, WEB4, 46702),
            0x11,
            &[(FLOW_MISS, 1)],
        ),
        forwarded(
            "flow 2: ACK, budget spent: deferred",
            &seg4(other, WEB4, 46702, TCP_ACK),
            0x11,
            &[(FLOW_HIT, 1), (FLOOD_PIN_DEFERRED, 1)],
        ),
        forwarded(
            "flow 2: next packet, still deferred (retried, not forgotten)",
            &seg4(other, WEB4, 46702, TCP_ACK),
            0x11,
            &[(FLOW_HIT, 1), (FLOOD_PIN_DEFERRED, 1)],
        ),
        forwarded(
            "flow 1: pinned already, nothing more to do",
            &seg4(ALLOWED, WEB4, 46701, TCP_ACK),
            0x11,
            &[(FLOW_HIT, 1)],
        ),
    ]);
}
