//! Reading the flow table back: every flow the program inserted, exactly once (the batch
//! reader walks buckets with a cursor; a bug there loses or repeats entries).

use lb_userspace::dataplane::Role;
use std::{collections::BTreeSet, net::Ipv4Addr};
use xdplb_tests::fixture::one_web_backend;
use xdplb_tests::{
    harness::{Action, Harness, CLIENT_MAC, LB_MAC},
    packet::{Packet, TCP_SYN},
};

#[test]
fn flows_lists_every_inserted_flow_once() {
    let vip = Ipv4Addr::new(192, 0, 2, 10);
    let mut lb = Harness::new(Role::Balancer);
    lb.apply(&one_web_backend(
        "10.1.0.11".parse().unwrap(),
        [2, 0, 0, 0, 0, 0x11],
    ));

    // More flows than one batch holds (1024), fewer than the table holds (4096).
    let mut sent = BTreeSet::new();
    for client in 1..=3u8 {
        for port in 0..1200u16 {
            let src = Ipv4Addr::new(198, 51, 100, client);
            let syn = Packet::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv4(src, vip)
                .tcp(10_000 + port, 80)
                .flags(TCP_SYN)
                .build();
            assert_eq!(lb.run(&syn).action, Action::Tx as u32);
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
    assert_eq!(unique, sent, "every flow listed");
}
