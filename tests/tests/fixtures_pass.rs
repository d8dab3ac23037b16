//! Packets the load balancer must leave alone: passed to the stack untouched, each counted
//! under its reason.

use lb_common::counters::*;
use lb_userspace::{
    dataplane::Role,
    model::{Forwarding, Protocol, Services, VipAddr},
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use xdplb_tests::{
    harness::{vip_spec, Action, Fixture, Harness, CLIENT_MAC, LB_MAC},
    packet::{Packet, TCP_SYN},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const OTHER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];

fn harness() -> Harness {
    let mut harness = Harness::new(Role::Balancer);
    let vip = VipAddr {
        addr: IpAddr::V4(VIP),
        port: 80,
        protocol: Protocol::Tcp,
    };
    harness.apply(&Services {
        vips: vec![vip_spec(
            "web",
            vip,
            Forwarding::Dsr,
            13,
            &[(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 11)), BACKEND_MAC, 100)],
        )],
        ..Services::default()
    });
    harness
}

fn to_vip() -> Packet {
    Packet::new().eth(CLIENT_MAC, LB_MAC).ipv4(CLIENT, VIP)
}

#[test]
fn non_lb_traffic_is_passed_untouched_and_counted() {
    let mut bad_ihl = to_vip().tcp(40000, 80).flags(TCP_SYN).build();
    bad_ihl[14] = 0x44; // IHL 4: a 16-byte IPv4 header cannot exist

    let mut vlan_without_tag = Packet::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ethertype(0x8100)
        .build();
    vlan_without_tag.truncate(14);
    let mut ipv4_cut_short = to_vip().tcp(40000, 80).build();
    ipv4_cut_short.truncate(14 + 10);

    let fixtures = [
        Fixture {
            description: "ARP request for the VIP",
            input: Packet::new()
                .eth(CLIENT_MAC, [0xff; 6])
                .arp_request(CLIENT_MAC, CLIENT, VIP)
                .build(),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_NOT_IP, 1)],
        },
        Fixture {
            description: "IPv6 neighbour solicitation (ICMPv6 135)",
            input: Packet::new()
                .eth(CLIENT_MAC, [0x33, 0x33, 0xff, 0, 0, 0x10])
                .ipv6(
                    "2001:db8::7".parse::<Ipv6Addr>().unwrap(),
                    "ff02::1:ff00:10".parse::<Ipv6Addr>().unwrap(),
                )
                .ttl(255)
                .icmp(135, 0, [0; 4])
                .payload(&"2001:db8::10".parse::<Ipv6Addr>().unwrap().octets())
                .build(),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_NOT_TCP_UDP, 1)],
        },
        Fixture {
            description: "LLDP-like junk (ethertype 0x88cc)",
            input: Packet::new()
                .eth(CLIENT_MAC, [0x01, 0x80, 0xc2, 0, 0, 0x0e])
                .raw_l3(
                    0x88cc,
                    &[0x02, 0x07, 0x04, 0xde, 0xad, 0xbe, 0xef, 0x00, 0x01],
                )
                .build(),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_NOT_IP, 1)],
        },
        Fixture {
            description: "truncated Ethernet: VLAN ethertype without its tag",
            input: vlan_without_tag,
            action: Action::Pass,
            output: None,
            counters: &[(PASS_MALFORMED, 1)],
        },
        Fixture {
            description: "IPv4 header cut short after 10 bytes",
            input: ipv4_cut_short,
            action: Action::Pass,
            output: None,
            counters: &[(PASS_MALFORMED, 1)],
        },
        Fixture {
            description: "IPv4 to the VIP with IHL 4 (bad header length)",
            input: bad_ihl,
            action: Action::Pass,
            output: None,
            counters: &[(PASS_MALFORMED, 1)],
        },
        Fixture {
            description: "IPv4 first fragment to the VIP (more-fragments set)",
            input: to_vip().mf().tcp(40000, 80).flags(TCP_SYN).build(),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_FRAGMENT, 1)],
        },
        Fixture {
            description: "IPv4 later fragment to the VIP (offset 185, no ports)",
            input: to_vip()
                .frag_offset(185)
                .protocol(6)
                .payload(&[0xab; 24])
                .build(),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_FRAGMENT, 1)],
        },
        Fixture {
            description: "TCP SYN to an address that is not a VIP",
            input: Packet::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv4(CLIENT, OTHER)
                .tcp(40000, 80)
                .flags(TCP_SYN)
                .build(),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_NOT_VIP, 1)],
        },
        Fixture {
            description: "TCP SYN to the VIP address on a port that is not served",
            input: to_vip().tcp(40000, 443).flags(TCP_SYN).build(),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_NOT_VIP, 1)],
        },
        Fixture {
            description: "UDP to the VIP's TCP port (protocol must match)",
            input: to_vip().udp(40000, 80).payload(b"dns?").build(),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_NOT_VIP, 1)],
        },
        Fixture {
            description: "ICMP echo to the VIP",
            input: to_vip().icmp_echo_request(1, 1).build(),
            action: Action::Pass,
            output: None,
            counters: &[(PASS_NOT_TCP_UDP, 1)],
        },
    ];
    harness().check_all(&fixtures);
}

/// The runner itself must notice a one-byte difference, or every fixture above proves nothing.
#[test]
fn runner_rejects_a_one_byte_difference() {
    let mut harness = harness();
    let input = to_vip().tcp(40000, 443).build();
    let mut wrong = input.clone();
    let last = wrong.len() - 1;
    wrong[last] ^= 0x01;
    let mismatch = harness
        .check(&Fixture {
            description: "expected output off by one byte",
            input,
            action: Action::Pass,
            output: Some(wrong),
            counters: &[(PASS_NOT_VIP, 1)],
        })
        .expect_err("a one-byte difference must fail the fixture");
    assert!(
        mismatch.0.contains("first difference at offset"),
        "{mismatch:?}"
    );
}
