//! The connection log's kernel side: which packets put which record in the rings, field by
//! field; the budget drops records and counts them, never packets; a ring the daemon reads
//! too late keeps its newest records and the reader counts the overwritten ones.

use lb_common::{
    counters::*, LogBudget, LogRecord, FAMILY_IPV4, FAMILY_IPV6, LOG_BLOCKED, LOG_DENIED, LOG_NEW,
    LOG_RATE_LIMITED, LOG_RECORDS_PER_CPU, LOG_REHASH, NO_BACKEND, PROTO_TCP, PROTO_UDP,
};
use lb_userspace::{
    acl::{AclSpec, SourceEntry},
    clock::tick_ns,
    connlog::{monotonic_ns, LogRing, LogSpec},
    dataplane::Role,
    limits::LimitsSpec,
    model::{Forwarding, Protocol, Services},
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use xdplb_tests::fixture::*;
use xdplb_tests::{
    harness::{pin_to_one_cpu, vip_spec, Action, Fixture, Harness, LB_MAC},
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_SYN},
};

const WEB4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const OPEN4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const WEB6: &str = "2001:db8::10";
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const DENIED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);
const BLOCKED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
const CLIENT6: &str = "2001:db8:c::7";

/// "web" (IPv4, with a deny ACL and a limit of one new flow per source) and its IPv6 twin,
/// and "open" (no filter, UDP too).
fn services() -> Services {
    let mut web = vip_spec(
        "web",
        vip(IpAddr::V4(WEB4), 80, Protocol::Tcp),
        Forwarding::Dsr,
        13,
        &[(v4(10, 1, 0, 11), mac(0x11), 100)],
    );
    web.acl = AclSpec {
        allow: None,
        deny: vec!["198.51.100.128/25".parse().unwrap()],
    };
    web.limits = Some(LimitsSpec {
        per_source: Some(1),
        burst: Some(1),
        total: None,
    });
    Services {
        settings: settings(SEED),
        vips: vec![
            web,
            vip_spec(
                "web6",
                vip(v6(WEB6), 80, Protocol::Tcp),
                Forwarding::Dsr,
                13,
                &[(v6("2001:db8:1::11"), mac(0x14), 100)],
            ),
            vip_spec(
                "open",
                vip(IpAddr::V4(OPEN4), 0, Protocol::Tcp),
                Forwarding::Dsr,
                13,
                &[(v4(10, 1, 0, 12), mac(0x12), 100)],
            ),
            vip_spec(
                "open-udp",
                vip(IpAddr::V4(OPEN4), 53, Protocol::Udp),
                Forwarding::Dsr,
                13,
                &[(v4(10, 1, 0, 13), mac(0x13), 100)],
            ),
        ],
    }
}

fn budget(max_per_second: u32) -> Option<LogBudget> {
    Some(
        LogSpec {
            path: None,
            max_per_second,
        }
        .budget(),
    )
}

/// A balancer with the log on (budget `max_per_second`) and 203.0.113.0/24 blocked for web;
/// the test stays on one CPU, so its records are in one ring, in order.
fn lb(max_per_second: u32) -> (Harness, LogRing) {
    pin_to_one_cpu();
    let mut lb = Harness::new(Role::Balancer);
    lb.log = budget(max_per_second);
    lb.blocked = [(
        Some("web".to_string()),
        SourceEntry::of(&"203.0.113.0/24".parse().unwrap()),
    )]
    .into();
    lb.apply(&services());
    let ring = lb.dataplane.take_events().expect("the ring");
    (lb, ring)
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Packet {
    Packet::new()
        .ipv4(src, dst)
        .tcp(sport, dport)
        .flags(flags)
        .seq(1000)
}

fn forwarded(
    description: &'static str,
    packet: Packet,
    backend: u8,
    counters: &'static [(u32, u64)],
) -> Fixture {
    Fixture {
        description,
        input: from_client(&packet),
        action: Action::Tx,
        output: Some(framed(LB_MAC, mac(backend), &packet.build())),
        counters,
    }
}

fn dropped(description: &'static str, packet: Packet, counters: &'static [(u32, u64)]) -> Fixture {
    Fixture {
        description,
        input: from_client(&packet),
        action: Action::Drop,
        output: None,
        counters,
    }
}

fn ids(lb: &Harness, vip: &str) -> (u32, u32) {
    let live = lb.live().vips.values().find(|v| v.name == vip).unwrap();
    let backend = live.backends.values().next().unwrap().id;
    (live.meta.vip_id, backend)
}

/// Every record not read yet, oldest first; none lost.
fn drain(ring: &mut LogRing) -> Vec<LogRecord> {
    let mut records = Vec::new();
    assert_eq!(ring.read(&mut records), 0, "records lost");
    records
}

fn v4_bytes(addr: Ipv4Addr) -> [u8; 16] {
    let mut bytes = [0; 16];
    bytes[..4].copy_from_slice(&addr.octets());
    bytes
}

struct Expected {
    event: u8,
    vip: (u32, u32),
    backend: bool,
    client: [u8; 16],
    family: u8,
    proto: u8,
    sport: u16,
    dport: u16,
    reason: u32,
}

impl Expected {
    fn record(&self, time_ns: u64) -> LogRecord {
        LogRecord {
            time_ns,
            client: self.client,
            nat_addr: [0; 16],
            vip_id: self.vip.0,
            backend_id: if self.backend { self.vip.1 } else { NO_BACKEND },
            client_port: self.sport.to_be(),
            nat_port: 0,
            vip_port: self.dport.to_be(),
            event: self.event,
            proto: self.proto,
            family: self.family,
            reason: self.reason as u8,
            _pad: [0; 6],
        }
    }
}

#[test]
fn connlog_each_event_kind_puts_one_exact_record_in_the_ring() {
    let (mut lb, mut ring) = lb(20_000);
    let web = ids(&lb, "web");
    let web6 = ids(&lb, "web6");
    let open = ids(&lb, "open");
    let open_udp = ids(&lb, "open-udp");
    let start = monotonic_ns();
    lb.check_all(&[
        forwarded(
            "new flow: a record",
            tcp(CLIENT, WEB4, 40001, 80, TCP_SYN),
            0x11,
            &[(FLOW_MISS, 1)],
        ),
        forwarded(
            "the flow's next packet: no record",
            tcp(CLIENT, WEB4, 40001, 80, TCP_ACK),
            0x11,
            &[(FLOW_HIT, 1), (FLOOD_PINNED, 1)],
        ),
        dropped(
            "a second new flow from the source: over its limit",
            tcp(CLIENT, WEB4, 40002, 80, TCP_SYN),
            &[(FLOW_MISS, 1), (DROP_RATE_LIMITED_SOURCE, 1)],
        ),
        dropped(
            "denied by the ACL",
            tcp(DENIED, WEB4, 40003, 80, TCP_SYN),
            &[(DROP_SOURCE_DENIED, 1)],
        ),
        dropped(
            "blocked, also mid-flow (an ACK)",
            tcp(BLOCKED, WEB4, 40004, 80, TCP_ACK),
            &[(DROP_BLOCKED, 1)],
        ),
        forwarded(
            "IPv6 new flow",
            Packet::new()
                .ipv6(CLIENT6.parse::<Ipv6Addr>().unwrap(), WEB6.parse().unwrap())
                .tcp(40005, 80)
                .flags(TCP_SYN)
                .seq(1000),
            0x14,
            &[(FLOW_MISS, 1)],
        ),
        forwarded(
            "all-ports VIP: the destination port is recorded",
            tcp(BLOCKED, OPEN4, 40006, 8443, TCP_SYN),
            0x12,
            &[(FLOW_MISS, 1)],
        ),
        forwarded(
            "its FIN: no record",
            tcp(BLOCKED, OPEN4, 40006, 8443, TCP_FIN | TCP_ACK),
            0x12,
            &[(FLOW_HIT, 1), (FLOOD_PINNED, 1)],
        ),
        forwarded(
            "a SYN reusing the closed tuple: re-picked, a rehash record",
            tcp(BLOCKED, OPEN4, 40006, 8443, TCP_SYN),
            0x12,
            &[(FLOW_REHASH, 1)],
        ),
        forwarded(
            "UDP new flow",
            Packet::new()
                .ipv4(CLIENT, OPEN4)
                .udp(40007, 53)
                .payload(b"q"),
            0x13,
            &[(FLOW_MISS, 1)],
        ),
        Fixture {
            description: "not a VIP: nothing",
            input: from_client(&tcp(
                CLIENT,
                Ipv4Addr::new(192, 0, 2, 99),
                40008,
                80,
                TCP_SYN,
            )),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_NOT_VIP, 1)],
        },
    ]);
    let end = monotonic_ns();
    let v4 = |event, vip, backend, client, sport, dport, reason| Expected {
        event,
        vip,
        backend,
        client: v4_bytes(client),
        family: FAMILY_IPV4,
        proto: PROTO_TCP,
        sport,
        dport,
        reason,
    };
    let expected = [
        v4(LOG_NEW, web, true, CLIENT, 40001, 80, 0),
        v4(
            LOG_RATE_LIMITED,
            web,
            false,
            CLIENT,
            40002,
            80,
            DROP_RATE_LIMITED_SOURCE,
        ),
        v4(
            LOG_DENIED,
            web,
            false,
            DENIED,
            40003,
            80,
            DROP_SOURCE_DENIED,
        ),
        v4(LOG_BLOCKED, web, false, BLOCKED, 40004, 80, DROP_BLOCKED),
        Expected {
            client: CLIENT6.parse::<Ipv6Addr>().unwrap().octets(),
            family: FAMILY_IPV6,
            ..v4(LOG_NEW, web6, true, CLIENT, 40005, 80, 0)
        },
        v4(LOG_NEW, open, true, BLOCKED, 40006, 8443, 0),
        v4(LOG_REHASH, open, true, BLOCKED, 40006, 8443, 0),
        Expected {
            proto: PROTO_UDP,
            ..v4(LOG_NEW, open_udp, true, CLIENT, 40007, 53, 0)
        },
    ];
    let records = drain(&mut ring);
    assert_eq!(records.len(), expected.len(), "{records:#?}");
    // Record times come from jiffies: a tick's resolution, and up to a tick more behind from
    // relating jiffies to CLOCK_MONOTONIC through the coarse clock.
    let tick = tick_ns();
    let mut last = start - 2 * tick;
    for (record, want) in records.iter().zip(&expected) {
        assert!(
            (last..=end + tick).contains(&record.time_ns),
            "times are monotonic and within the test ({last}..={end} + {tick}): {record:?}"
        );
        last = record.time_ns;
        assert_eq!(*record, want.record(record.time_ns));
    }
}

#[test]
fn connlog_with_the_log_off_nothing_is_recorded() {
    let (mut lb, mut ring) = lb(20_000);
    lb.log = None;
    lb.apply(&services());
    lb.check_all(&[
        forwarded(
            "new flow",
            tcp(CLIENT, WEB4, 41001, 80, TCP_SYN),
            0x11,
            &[(FLOW_MISS, 1)],
        ),
        dropped(
            "denied",
            tcp(DENIED, WEB4, 41002, 80, TCP_SYN),
            &[(DROP_SOURCE_DENIED, 1)],
        ),
    ]);
    assert_eq!(drain(&mut ring), []);
}

#[test]
fn connlog_records_over_the_budget_are_counted_and_the_packets_still_forwarded() {
    // Two per second, bursts of one second's worth: two records, then the budget is spent.
    let (mut lb, mut ring) = lb(2);
    lb.check_all(&[
        forwarded(
            "first new flow: recorded",
            tcp(CLIENT, OPEN4, 42001, 80, TCP_SYN),
            0x12,
            &[(FLOW_MISS, 1)],
        ),
        forwarded(
            "second: recorded",
            tcp(CLIENT, OPEN4, 42002, 80, TCP_SYN),
            0x12,
            &[(FLOW_MISS, 1)],
        ),
        forwarded(
            "third: forwarded, its record over the budget",
            tcp(CLIENT, OPEN4, 42003, 80, TCP_SYN),
            0x12,
            &[(FLOW_MISS, 1), (LOG_RECORDS_DROPPED_BUDGET, 1)],
        ),
        dropped(
            "a denied packet over the budget: dropped as before, its record counted",
            tcp(DENIED, WEB4, 42004, 80, TCP_SYN),
            &[(DROP_SOURCE_DENIED, 1), (LOG_RECORDS_DROPPED_BUDGET, 1)],
        ),
    ]);
    let ports: Vec<u16> = drain(&mut ring)
        .iter()
        .map(|r| u16::from_be(r.client_port))
        .collect();
    assert_eq!(ports, [42001, 42002]);
}

#[test]
fn connlog_a_ring_read_too_late_keeps_the_newest_records_and_counts_the_rest() {
    let (mut lb, mut ring) = lb(10_000_000);
    let capacity = LOG_RECORDS_PER_CPU as usize;
    let sent = capacity + 100;
    let client = |i: usize| Ipv4Addr::from(0xc633_0000 + i as u32);
    for i in 0..sent {
        let outcome = lb.run(&from_client(&tcp(client(i), OPEN4, 43000, 80, TCP_SYN)));
        assert_eq!(
            outcome.action,
            Action::Tx as u32,
            "packet {i} not forwarded"
        );
    }
    let mut records = Vec::new();
    let lost = ring.read(&mut records);
    // A full ring's oldest slot is where its CPU writes next, maybe at this very moment: the
    // reader cannot tell, so that record counts as lost too.
    let kept = capacity - 1;
    assert_eq!(lost as usize, sent - kept);
    let clients: Vec<[u8; 16]> = records.iter().map(|r| r.client).collect();
    let newest: Vec<[u8; 16]> = (sent - kept..sent).map(|i| v4_bytes(client(i))).collect();
    assert_eq!(clients, newest);
    // Read to the head: the next read starts after it.
    assert_eq!(drain(&mut ring), []);
    lb.run(&from_client(&tcp(client(sent), OPEN4, 43000, 80, TCP_SYN)));
    let next: Vec<[u8; 16]> = drain(&mut ring).iter().map(|r| r.client).collect();
    assert_eq!(next, [v4_bytes(client(sent))]);
}

#[test]
fn connlog_a_nat_flow_is_recorded_with_the_nat_address_and_port_it_was_given() {
    const NAT_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 70);
    const NAT_SOURCE: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 1);
    pin_to_one_cpu();
    let mut services = Services {
        settings: settings(SEED),
        vips: vec![vip_spec(
            "nat",
            vip(IpAddr::V4(NAT_VIP), 80, Protocol::Tcp),
            Forwarding::Nat,
            13,
            &[(v4(10, 3, 0, 11), mac(0x31), 100)],
        )],
    };
    services.vips[0].backends[0].port = Some(8080);
    services.settings.nat.sources_v4 = vec![NAT_SOURCE];
    let mut lb = Harness::new(Role::Balancer);
    lb.log = budget(20_000);
    lb.apply(&services);
    let mut ring = lb.dataplane.take_events().expect("the ring");
    let ids = ids(&lb, "nat");

    let syn = lb.run(&from_client(&tcp(CLIENT, NAT_VIP, 40001, 80, TCP_SYN)));
    assert_eq!(
        syn.action,
        Action::Tx as u32,
        "the SYN is sent to the backend"
    );
    let ack = lb.run(&from_client(&tcp(CLIENT, NAT_VIP, 40001, 80, TCP_ACK)));
    assert_eq!(ack.action, Action::Tx as u32, "and so is its next packet");
    // The translated SYN: Ethernet (14), IPv4 (20), then the TCP ports.
    let ip = &syn.output[14..34];
    assert_eq!(ip[12..16], NAT_SOURCE.octets(), "sent from the nat source");
    let nat_port = u16::from_be_bytes([syn.output[34], syn.output[35]]);

    let records = drain(&mut ring);
    assert_eq!(
        records.len(),
        1,
        "one record for the new flow: {records:#?}"
    );
    let want = LogRecord {
        time_ns: records[0].time_ns,
        nat_addr: v4_bytes(NAT_SOURCE),
        nat_port: nat_port.to_be(),
        ..Expected {
            event: LOG_NEW,
            vip: ids,
            backend: true,
            client: v4_bytes(CLIENT),
            family: FAMILY_IPV4,
            proto: PROTO_TCP,
            sport: 40001,
            dport: 80,
            reason: 0,
        }
        .record(0)
    };
    assert_eq!(records[0], want);
}
