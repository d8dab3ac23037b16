//! Two-armed set-ups: when the next hop toward a backend is on another interface than the
//! packet came in on, the packet leaves through XDP_REDIRECT via the TX_PORTS device map.

use lb_common::counters::*;
use lb_userspace::{
    dataplane::Role,
    model::{BackendSpec, Mac},
    net::interface_index,
    state::{NextHop, Resolve},
};
use std::net::Ipv4Addr;
use xdplb_tests::fixture::one_web_backend;
use xdplb_tests::{
    harness::{Action, Fixture, Harness, CLIENT_MAC, LB_MAC, MTU},
    lab::Netns,
    packet::{Packet, TCP_SYN},
};

const EGRESS_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xee, 0x01];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0x11];

/// Resolves every backend to the other arm (`egress`).
struct OtherArm {
    egress: u32,
}

impl Resolve for OtherArm {
    fn next_hop(&self, _: &BackendSpec) -> Result<NextHop, String> {
        Ok(NextHop {
            src: None,
            dst_mac: Mac(BACKEND_MAC),
            src_mac: Mac(EGRESS_MAC),
            ifindex: self.egress,
            mtu: MTU,
        })
    }
}

#[test]
fn backend_on_another_interface_is_reached_by_redirect() {
    let ns = Netns::new(&format!("xdplb-redir-{}", std::process::id())).unwrap();
    ns.exec(
        "ip link add arm1 type veth peer name arm1p && ip link set arm1 up && ip link set arm1p up",
    )
    .unwrap();
    ns.enter(|| {
        let egress = interface_index("arm1").unwrap();
        let vip = Ipv4Addr::new(192, 0, 2, 10);
        let mut lb = Harness::new(Role::Balancer);
        lb.dataplane.add_tx_port(egress).unwrap();
        lb.apply_with(
            &one_web_backend("10.9.0.11".parse().unwrap(), BACKEND_MAC),
            &OtherArm { egress },
        );
        let l3 = Packet::new()
            .ipv4(Ipv4Addr::new(198, 51, 100, 7), vip)
            .tcp(40000, 80)
            .flags(TCP_SYN);
        let input = Packet::new()
            .eth(CLIENT_MAC, LB_MAC)
            .ipv4(Ipv4Addr::new(198, 51, 100, 7), vip)
            .tcp(40000, 80)
            .flags(TCP_SYN)
            .build();
        let mut output = input.clone();
        output[..6].copy_from_slice(&BACKEND_MAC);
        output[6..12].copy_from_slice(&EGRESS_MAC);
        assert_eq!(&output[14..], &l3.build()[..]);
        lb.check_all(&[Fixture {
            description: "next hop on the other arm: MACs of that arm, XDP_REDIRECT",
            input,
            action: Action::Redirect,
            output: Some(output),
            counters: &[(FLOW_MISS, 1)],
        }]);
    })
    .unwrap();
}
