//! Next-hop resolution against real routes and neighbours, in namespaces built per test:
//!
//! ```text
//!  backend ns                lb ns (the resolver runs here)              router ns
//!  eth0 10.1.0.11  <-veth->  eth0 10.1.0.1    eth1 10.2.0.1   <-veth->  eth0 10.2.0.254
//!       fd00:1::11                fd00:1::1        fd00:2::1 (mtu 1400)       fd00:2::fe
//!                            10.9.0.0/24 via 10.2.0.254, fd00:9::/64 via fd00:2::fe
//! ```

use lb_userspace::{
    model::{BackendSpec, Mac},
    net::HostResolver,
    state::{NextHop, Resolve},
};
use std::{
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};
use xdplb_tests::lab::{sh, Netns};

const LB_ETH0_MAC: &str = "02:00:00:00:01:01";
const BACKEND_MAC: &str = "02:00:00:00:01:11";
const LB_ETH1_MAC: &str = "02:00:00:00:02:01";
const ROUTER_MAC: &str = "02:00:00:00:02:fe";

fn ip(args: &str) {
    sh(&format!("ip {args}")).unwrap_or_else(|e| panic!("{e} (tests must run as root)"));
}

/// The namespaces of one test; deleted on drop, also when the test fails.
struct Lab {
    lb: Netns,
    _backend: Netns,
    _router: Netns,
}

impl Lab {
    fn new(test: &str) -> Lab {
        let name = |role: &str| format!("xdplb-net-{}-{test}-{role}", std::process::id());
        let ns = |role: &str| Netns::new(&name(role)).expect("namespace");
        let lab = Lab {
            lb: ns("lb"),
            _backend: ns("backend"),
            _router: ns("router"),
        };
        let (lb, backend, router) = (&lab.lb.name, &lab._backend.name, &lab._router.name);
        let veth = |dev: &str, mac: &str, peer_ns: &str, peer_mac: &str, mtu: u16| {
            ip(&format!(
                "-n {lb} link add {dev} address {mac} mtu {mtu} type veth \
                 peer name eth0 address {peer_mac} mtu {mtu} netns {peer_ns}"
            ));
            ip(&format!("-n {lb} link set {dev} up"));
            ip(&format!("-n {peer_ns} link set eth0 up"));
        };
        veth("eth0", LB_ETH0_MAC, backend, BACKEND_MAC, 1500);
        veth("eth1", LB_ETH1_MAC, router, ROUTER_MAC, 1400);
        // `nodad`: usable at once, not after duplicate address detection.
        for (ns, dev, v4, v6) in [
            (lb, "eth0", "10.1.0.1/24", "fd00:1::1/64"),
            (backend, "eth0", "10.1.0.11/24", "fd00:1::11/64"),
            (lb, "eth1", "10.2.0.1/24", "fd00:2::1/64"),
            (router, "eth0", "10.2.0.254/24", "fd00:2::fe/64"),
        ] {
            ip(&format!("-n {ns} addr add {v4} dev {dev}"));
            ip(&format!("-n {ns} addr add {v6} dev {dev} nodad"));
        }
        ip(&format!("-n {lb} route add 10.9.0.0/24 via 10.2.0.254"));
        ip(&format!("-n {lb} route add fd00:9::/64 via fd00:2::fe"));
        lab
    }

    /// Runs `f` on a thread inside the LB namespace (the resolver's netlink socket opens there).
    fn in_lb<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.lb.enter(f).expect("running in the LB namespace")
    }

    fn ifindex(&self, dev: &str) -> u32 {
        let line = sh(&format!("ip -n {} -o link show {dev}", self.lb.name)).expect("ip link");
        let index = line.split(':').next().unwrap_or_default();
        index
            .parse()
            .unwrap_or_else(|_| panic!("no ifindex for {dev}: {line}"))
    }
}

fn mac(s: &str) -> Mac {
    s.parse().unwrap()
}

fn backend(addr: &str, mac: Option<&str>) -> BackendSpec {
    BackendSpec {
        port: None,
        addr: addr.parse::<IpAddr>().unwrap(),
        weight: 100,
        mac: mac.map(self::mac),
        health_port: None,
    }
}

fn interfaces(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
}

/// The first call finds no neighbour entry and starts ARP/ND; later ones succeed (within 3 s).
fn resolve_after_arp(resolver: &HostResolver, backend: &BackendSpec, hop: &str) -> NextHop {
    let first = resolver.next_hop(backend).unwrap_err();
    assert!(
        first.starts_with("no neighbour entry for ") && first.contains(hop),
        "first call: {first}"
    );
    assert!(
        first.ends_with("(ARP/ND in progress)"),
        "first call: {first}"
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match resolver.next_hop(backend) {
            Ok(next_hop) => return next_hop,
            Err(e) if Instant::now() < deadline => {
                assert!(e.contains("ARP/ND in progress"), "while resolving: {e}");
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("still unresolved after 3 s: {e}"),
        }
    }
}

/// `src`: the LB's own address on the route toward the backend (the default nat source).
fn on_link(test: &str, addr: &str, src: &str) {
    let lab = Lab::new(test);
    let hop = lab.in_lb(|| {
        let resolver = HostResolver::new(&interfaces(&["eth0", "eth1"])).unwrap();
        resolve_after_arp(&resolver, &backend(addr, None), addr)
    });
    let want = NextHop {
        src: Some(src.parse().unwrap()),
        dst_mac: mac(BACKEND_MAC),
        src_mac: mac(LB_ETH0_MAC),
        ifindex: lab.ifindex("eth0"),
        mtu: 1500,
    };
    assert_eq!(hop, want);
}

#[test]
fn on_link_ipv4_backend_resolves_after_arp() {
    on_link("v4", "10.1.0.11", "10.1.0.1");
}

#[test]
fn on_link_ipv6_backend_resolves_after_nd() {
    on_link("v6", "fd00:1::11", "fd00:1::1");
}

#[test]
fn backend_behind_a_gateway_gets_the_gateway_mac() {
    let lab = Lab::new("gw");
    let hops = lab.in_lb(|| {
        let resolver = HostResolver::new(&interfaces(&["eth0", "eth1"])).unwrap();
        [("10.9.0.5", "10.2.0.254"), ("fd00:9::5", "fd00:2::fe")]
            .map(|(addr, gateway)| resolve_after_arp(&resolver, &backend(addr, None), gateway))
    });
    let want = |src: &str| NextHop {
        src: Some(src.parse().unwrap()),
        dst_mac: mac(ROUTER_MAC),
        src_mac: mac(LB_ETH1_MAC),
        ifindex: lab.ifindex("eth1"),
        mtu: 1400,
    };
    assert_eq!(hops, [want("10.2.0.1"), want("fd00:2::1")]);
}

#[test]
fn configured_mac_skips_the_neighbour_lookup() {
    let lab = Lab::new("mac");
    // Nobody holds 10.1.0.99: without the override there would be no neighbour entry.
    let hop = lab.in_lb(|| {
        let resolver = HostResolver::new(&interfaces(&["eth0"])).unwrap();
        resolver.next_hop(&backend("10.1.0.99", Some("02:00:00:00:00:99")))
    });
    let want = NextHop {
        src: Some("10.1.0.1".parse().unwrap()),
        dst_mac: mac("02:00:00:00:00:99"),
        src_mac: mac(LB_ETH0_MAC),
        ifindex: lab.ifindex("eth0"),
        mtu: 1500,
    };
    assert_eq!(hop, Ok(want));
}

#[test]
fn route_through_an_interface_without_xdp_is_refused() {
    let lab = Lab::new("noxdp");
    let err = lab.in_lb(|| {
        let resolver = HostResolver::new(&interfaces(&["eth0"])).unwrap();
        resolver.next_hop(&backend("10.9.0.5", None)).unwrap_err()
    });
    assert_eq!(
        err,
        "route to 10.9.0.5 leaves through eth1, which has no XDP program attached: \
         add it to daemon.interfaces"
    );
}

#[test]
fn unknown_interface_is_refused() {
    let lab = Lab::new("noif");
    let err = lab.in_lb(|| {
        HostResolver::new(&interfaces(&["eth0", "eth7"]))
            .unwrap_err()
            .to_string()
    });
    assert_eq!(
        err,
        "interface eth7 does not exist in this network namespace: check daemon.interfaces"
    );
}
