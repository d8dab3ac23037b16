//! `forwarding = "nat"` end to end: the real daemon in a lab, backends that hold no VIP, have
//! no sysctl changed and a default route that does not point at the LB, serving on port 8080
//! behind VIP port 80 (UDP: 8080 behind 53). Weighted spread with zero failures over IPv4,
//! IPv6 and UDP; the backends see the LB's address as the peer; the LB's own stack does not
//! see the nat'ed traffic; a drain and a `kill -9` + restart during downloads lose no byte.

use anyhow::{Context as _, Result};
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    thread,
    time::Duration,
};
use xdplb_tests::lab::{
    self, addr, backend4, backend6, udp_name, who, Daemon, Lab, Process, LB4, LB6,
};

const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10);
const WEIGHTS: [u32; 3] = [1, 1, 2];

/// A nat `[[vip]]` with backends on port 8080 and TCP health checks (which must go to 8080:
/// nothing listens on the VIP's port on the backends).
fn nat_vip(name: &str, address: IpAddr, port: u16, protocol: &str, backends: &[IpAddr]) -> String {
    let mut text = format!(
        "[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = {port}\nprotocol = \"{protocol}\"\n\
         forwarding = \"nat\"\nring_size = 1021\n[vip.health]\nkind = \"tcp\"\ninterval = \"1s\"\n"
    );
    for (backend, weight) in backends.iter().zip(WEIGHTS) {
        text.push_str(&format!(
            "[[vip.backend]]\naddress = \"{backend}\"\nport = 8080\nweight = {weight}\n"
        ));
    }
    text
}

/// A lab whose backends serve TCP and UDP on 8080 only, with a default route elsewhere, and
/// the daemon with four nat VIPs: web4 and web6 (80/tcp), dns4 and dns6 (53/udp).
fn nat_lab() -> (Lab, Vec<Process>, Daemon) {
    let lab = Lab::with_plain_backends(3).expect("lab");
    let mut servers = Vec::new();
    for (n, b) in lab.backends.iter().enumerate() {
        // The default route points at a router that is not the LB (and does not exist): the
        // replies reach the LB only because they are addressed to it.
        b.ns.exec("ip route add default via 10.0.0.254 && ip -6 route add default via fd00::fe")
            .unwrap();
        servers.push(b.serve(&format!("b{n}"), "[::]:8080", "tcp").unwrap());
        servers.push(b.serve(&format!("b{n}"), "[::]:8080", "udp").unwrap());
        b.wait_sockets(1, 1).unwrap();
    }
    let v4: Vec<IpAddr> = (0..3).map(|n| backend4(n).into()).collect();
    let v6: Vec<IpAddr> = (0..3).map(|n| backend6(n).into()).collect();
    let services = nat_vip("web4", VIP4.into(), 80, "tcp", &v4)
        + &nat_vip("web6", VIP6.into(), 80, "tcp", &v6)
        + &nat_vip("dns4", VIP4.into(), 53, "udp", &v4)
        + &nat_vip("dns6", VIP6.into(), 53, "udp", &v6);
    let daemon = Daemon::start(&lab, "", &services).expect("daemon");
    for vip in ["web4", "web6", "dns4", "dns6"] {
        daemon
            .wait_status(
                &format!("{vip}: 3 backends up (checked on port 8080)"),
                |s| {
                    s["vips"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|v| v["name"] == vip && v["available"].as_u64() == Some(3))
                },
            )
            .unwrap();
    }
    (lab, servers, daemon)
}

/// The backend's name and the peer it saw for one connection to `vip`.
fn peer(vip: SocketAddr) -> Result<(String, SocketAddr)> {
    let mut stream = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"PEER\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let (name, peer) = line.trim().split_once(' ').context("name and peer")?;
    Ok((name.to_string(), peer.parse()?))
}

/// `count` requests from the client over 4 threads: backend name -> answers; every failure
/// fails the test.
fn spread(
    lab: &Lab,
    count: usize,
    ask: fn(SocketAddr) -> Result<String>,
    vip: SocketAddr,
) -> BTreeMap<String, usize> {
    const THREADS: usize = 4;
    let mut counts = BTreeMap::new();
    thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                scope.spawn(|| {
                    lab.client
                        .ns
                        .enter(|| {
                            (0..count / THREADS)
                                .map(|i| ask(vip).map_err(|e| format!("request {i}: {e}")))
                                .collect::<Vec<_>>()
                        })
                        .unwrap()
                })
            })
            .collect();
        for worker in workers {
            for answer in worker.join().unwrap() {
                *counts
                    .entry(answer.expect("no request may fail"))
                    .or_default() += 1;
            }
        }
    });
    counts
}

fn assert_weighted(what: &str, counts: &BTreeMap<String, usize>) {
    let total: usize = counts.values().sum();
    eprintln!("{what}: {counts:?} of {total}");
    for (name, expected) in [("b0", 25.0), ("b1", 25.0), ("b2", 50.0)] {
        let share = 100.0 * *counts.get(name).unwrap_or(&0) as f64 / total as f64;
        assert!(
            (share - expected).abs() <= 5.0,
            "{what}: {name} got {share:.1}%, expected {expected}% +- 5: {counts:?}"
        );
    }
}

/// TCP segments and UDP datagrams the LB's own stack received (IPv4 and IPv6).
fn stack_received(lab: &Lab) -> u64 {
    let snmp = lab
        .lb
        .ns
        .exec("cat /proc/net/snmp /proc/net/snmp6")
        .unwrap();
    let lines: Vec<&str> = snmp.lines().collect();
    let mut total = 0;
    // /proc/net/snmp: a header line of names, then a line of values, per protocol.
    for pair in lines.windows(2) {
        for (proto, field) in [("Tcp:", "InSegs"), ("Udp:", "InDatagrams")] {
            if pair[0].starts_with(proto) && pair[1].starts_with(proto) {
                let names: Vec<&str> = pair[0].split_whitespace().collect();
                let values: Vec<&str> = pair[1].split_whitespace().collect();
                let at = names.iter().position(|n| *n == field).unwrap();
                total += values[at].parse::<u64>().unwrap();
            }
        }
    }
    for line in &lines {
        if let Some(v) = line.strip_prefix("Udp6InDatagrams") {
            total += v.trim().parse::<u64>().unwrap();
        }
    }
    total
}

#[test]
fn nat_spreads_by_weight_hides_the_client_and_bypasses_the_lb_stack() {
    let (lab, _servers, daemon) = nat_lab();
    let before = stack_received(&lab);
    assert_weighted("IPv4 TCP", &spread(&lab, 2000, who, addr(VIP4, 80)));
    assert_weighted("IPv6 TCP", &spread(&lab, 2000, who, addr(VIP6, 80)));
    assert_weighted("IPv4 UDP", &spread(&lab, 2000, udp_name, addr(VIP4, 53)));
    assert_weighted("IPv6 UDP", &spread(&lab, 2000, udp_name, addr(VIP6, 53)));
    let during = stack_received(&lab) - before;
    // 4,000 TCP connections are at least 20,000 segments through the LB and 4,000 datagrams;
    // its own stack only takes its health checks' replies (9 checks a second, a few
    // segments each).
    eprintln!("the LB's stack received {during} TCP segments and UDP datagrams meanwhile");
    assert!(
        during < 2_000,
        "the LB's own stack received {during} segments/datagrams: nat traffic reached it"
    );

    // The backends see the LB's own address (the route's source toward them), never the client.
    for (vip, lb) in [
        (addr(VIP4, 80), IpAddr::from(LB4)),
        (addr(VIP6, 80), LB6.into()),
    ] {
        let (name, seen) = lab.client.ns.enter(|| peer(vip)).unwrap().unwrap();
        assert_eq!(
            seen.ip().to_canonical(),
            lb,
            "{name} saw {seen} as the peer of a connection to {vip}"
        );
        assert!((1024..=32767).contains(&seen.port()), "nat port {seen}");
    }
    // `xdplb flows` shows the nat address and port of each connection.
    let listing = daemon.cli(&["flows", "web4"]).unwrap();
    assert!(
        listing.contains("NAT") && listing.contains("10.0.0.2:"),
        "{listing}"
    );
}

/// A download from web4 in flight while `during(serving backend address)` runs; it must
/// deliver every byte from the backend it started on.
fn with_transfer(lab: &Lab, during: impl FnOnce(&str)) {
    lab::with_transfer(lab, addr(VIP4, 80), (3_000_000, 600_000), |backend, _| {
        during(backend)
    })
}

#[test]
fn nat_downloads_survive_a_drain_and_a_kill_9_restart() {
    let (lab, _servers, mut daemon) = nat_lab();
    let mut drained_backend = String::new();
    with_transfer(&lab, |backend| {
        drained_backend = backend.to_string();
        daemon.cli(&["drain", "web4", backend]).unwrap();
        let names = lab.connect(addr(VIP4, 80), 20);
        let drained = format!(
            "b{}",
            lab.backends
                .iter()
                .position(|b| b.ip4.to_string() == backend)
                .unwrap()
        );
        assert!(
            names
                .iter()
                .all(|n| n.as_ref().is_ok_and(|n| *n != drained)),
            "new connections must avoid drained {drained}: {names:?}"
        );
    });
    daemon.cli(&["undrain", "web4", &drained_backend]).unwrap();
    with_transfer(&lab, |backend| {
        // Drained first: were the restart to lose the flow, it would re-hash elsewhere.
        daemon.cli(&["drain", "web4", backend]).unwrap();
        daemon.kill();
        // Forwarding (and nat) continues without the daemon.
        let names = lab.connect(addr(VIP4, 80), 5);
        assert!(names.iter().all(Result::is_ok), "{names:?}");
        daemon.restart().unwrap();
        let status = daemon.cli(&["status", "--json"]).unwrap();
        assert!(status.contains("adopted"), "{status}");
    });
    let names = lab.connect(addr(VIP4, 80), 10);
    assert!(names.iter().all(Result::is_ok), "{names:?}");
}
