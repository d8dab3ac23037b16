//! The daemon in a lab: drain, reload and `kill -9` + restart while traffic flows, with real
//! TCP servers and clients. No established connection may break: every transfer must deliver
//! its exact byte count.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};
use xdplb_tests::lab::{self, addr, backend4, who, xdplb_binary, Daemon, Lab, Process};

const VIP: &str = "192.0.2.10";
/// A transfer long enough to span the event under test: 3 MB at 600 kB/s = 5 s.
const TRANSFER: u64 = 3_000_000;
const RATE: u64 = 600_000;

fn vip() -> SocketAddr {
    addr(VIP.parse::<std::net::Ipv4Addr>().unwrap(), 80)
}

fn web(backends: usize) -> String {
    let mut text =
        format!("[[vip]]\nname = \"web\"\naddress = \"{VIP}\"\nport = 80\nring_size = 1021\n");
    for n in 0..backends {
        text.push_str(&format!("[[vip.backend]]\naddress = \"{}\"\n", backend4(n)));
    }
    text
}

/// A lab with `n` backends serving TCP on port 80 and the daemon up with `configured`
/// backends resolved.
fn lab_with_daemon(n: usize, configured: usize) -> (Lab, Vec<Process>, Daemon) {
    lab_with_daemon_keys(n, configured, "")
}

/// [`lab_with_daemon`] with extra `[daemon]` keys.
fn lab_with_daemon_keys(
    n: usize,
    configured: usize,
    daemon_keys: &str,
) -> (Lab, Vec<Process>, Daemon) {
    let lab = Lab::new(n).expect("lab");
    let servers = lab
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| b.serve(&format!("b{i}"), "0.0.0.0:80", "tcp").unwrap())
        .collect();
    let daemon = Daemon::start(&lab, daemon_keys, &web(configured)).expect("daemon");
    wait_available(&daemon, configured);
    (lab, servers, daemon)
}

fn wait_available(daemon: &Daemon, n: usize) {
    daemon
        .wait_status(&format!("{n} backends available"), |s| {
            s["vips"][0]["available"].as_u64() == Some(n as u64)
        })
        .unwrap();
}

/// Names of the backends that answer `count` new connections.
fn spread(lab: &Lab, count: usize) -> Vec<String> {
    lab.client
        .ns
        .enter(|| {
            (0..count)
                .map(|_| who(vip()).expect("connect to the VIP"))
                .collect()
        })
        .unwrap()
}

/// [`lab::with_transfer`] of [`TRANSFER`] bytes at [`RATE`] from the VIP.
fn with_transfer(lab: &Lab, during: impl FnOnce(&str, &dyn Fn() -> bool)) {
    lab::with_transfer(lab, vip(), (TRANSFER, RATE), during)
}

#[test]
fn drain_moves_new_connections_while_a_long_transfer_continues() {
    let (lab, _servers, daemon) = lab_with_daemon(3, 3);
    let names = spread(&lab, 30);
    for b in ["b0", "b1", "b2"] {
        assert!(
            names.iter().any(|n| n == b),
            "{b} got none of 30 connections: {names:?}"
        );
    }
    let mut drained = String::new();
    with_transfer(&lab, |backend, _| {
        drained = backend.to_string();
        let out = daemon.cli(&["drain", "web", backend]).unwrap();
        assert!(out.contains("drained"), "{out}");
        let name = format!(
            "b{}",
            backend.rsplit('.').next().unwrap().parse::<u8>().unwrap() - 11
        );
        let names = spread(&lab, 60);
        assert!(
            !names.contains(&name),
            "a new connection reached drained {name}: {names:?}"
        );
        let status = daemon.cli(&["status"]).unwrap();
        assert!(status.contains("draining"), "{status}");
    });
    // The transfer finished and the client closed: nothing active remains.
    let waited = daemon
        .cli(&["drain", "web", &drained, "--wait", "--timeout", "20s"])
        .unwrap();
    assert!(waited.contains("has no active flow"), "{waited}");
    // Drains persist in the state dir and survive a restart.
    let mut daemon = daemon;
    daemon.kill();
    daemon.restart().unwrap();
    let status = daemon.cli(&["status", "--json"]).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let drained_after_restart = status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["address"] == drained.as_str() && b["drained"] == true);
    assert!(drained_after_restart, "{status}");
    daemon.cli(&["undrain", "web", &drained]).unwrap();
    wait_available(&daemon, 3);
}

/// `drain --wait` issued right after a download started on the backend, before any flow-table
/// scan could see it, must wait for the download to end. It used to trust the last scan, older
/// than the flow, and return at once with "no active flow".
#[test]
fn drain_wait_waits_for_a_stream_started_just_before_the_drain() {
    // Scans every 5 s: the one before the drain almost surely predates the stream.
    let (lab, _servers, daemon) = lab_with_daemon_keys(2, 2, "stats_interval = \"5s\"\n");
    with_transfer(&lab, |backend, transfer_ended| {
        let started = Instant::now();
        let waited = daemon
            .cli(&["drain", "web", backend, "--wait", "--timeout", "30s"])
            .unwrap();
        let waited_for = started.elapsed();
        assert!(
            transfer_ended(),
            "drain --wait returned after {waited_for:?} while the transfer still ran:\n{waited}"
        );
        // The server paces the transfer: it cannot end sooner.
        let transfer_time = Duration::from_secs_f64(TRANSFER as f64 / RATE as f64);
        assert!(
            waited_for >= transfer_time * 9 / 10,
            "{waited_for:?}\n{waited}"
        );
        assert!(waited.contains("has no active flow"), "{waited}");
    });
    let status = daemon.cli(&["status", "--json"]).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let complete = status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["drain_complete"] == true)
        .count();
    assert_eq!(complete, 1, "{status}");
}

#[test]
fn reload_under_traffic_breaks_no_connection() {
    let (lab, _servers, daemon) = lab_with_daemon(4, 3);
    with_transfer(&lab, |_, _| {
        // Add the fourth backend.
        std::fs::write(
            &daemon.config,
            std::fs::read_to_string(&daemon.config).unwrap()
                + &format!("[[vip.backend]]\naddress = \"{}\"\n", backend4(3)),
        )
        .unwrap();
        let out = daemon.cli(&["reload"]).unwrap();
        assert!(out.contains("reloaded"), "{out}");
        wait_available(&daemon, 4);

        // A broken file is rejected with its reason; the running config keeps serving.
        let good = std::fs::read_to_string(&daemon.config).unwrap();
        std::fs::write(
            &daemon.config,
            good.replace("ring_size = 1021\n", "ring_size = 1000\n"),
        )
        .unwrap();
        let err = daemon.cli(&["reload"]).unwrap_err().to_string();
        assert!(err.contains("ring_size") && err.contains("prime"), "{err}");
        std::fs::write(&daemon.config, good).unwrap();
        wait_available(&daemon, 4);
    });
    let names = spread(&lab, 60);
    assert!(
        names.iter().any(|n| n == "b3"),
        "the added backend got no connection: {names:?}"
    );
}

#[test]
fn kill_9_and_restart_keep_a_transfer_running() {
    let (lab, _servers, mut daemon) = lab_with_daemon(3, 3);
    with_transfer(&lab, |backend, _| {
        // Drained first, so the transfer's backend is no longer the ring's choice: if the
        // restart lost it even briefly, the flow would re-hash elsewhere and be reset.
        daemon.cli(&["drain", "web", backend]).unwrap();
        daemon.kill();
        // Forwarding continues without the daemon: the pinned program and maps stay.
        let names = spread(&lab, 5);
        assert_eq!(names.len(), 5);
        // A restarted daemon that cannot resolve a neighbour at once must keep the next hops
        // the data path uses, not drop the backends.
        lab.lb.ns.exec("ip neigh flush dev eth0").unwrap();
        daemon.restart().unwrap();
        let status = daemon.cli(&["status", "--json"]).unwrap();
        assert!(status.contains("adopted"), "{status}");
    });
    assert_eq!(spread(&lab, 10).len(), 10);
}

#[test]
fn cli_errors_are_one_clear_line() {
    let (lab, _servers, daemon) = lab_with_daemon(1, 1);
    // A second daemon on the same state is refused before it touches anything.
    let second = lab.lb.ns.exec(&format!(
        "{} run -c {} 2>&1; echo exit=$?",
        xdplb_binary().display(),
        daemon.config.display()
    ));
    let second = second.unwrap();
    assert!(
        second.contains("already uses state_dir") && second.contains("exit=1"),
        "{second}"
    );
    let err = daemon
        .cli(&["drain", "nope", "10.0.0.11"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no VIP \"nope\"") && err.contains("web"),
        "{err}"
    );
    let err = daemon
        .cli(&["drain", "web", "10.0.0.99"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("has no backend 10.0.0.99"), "{err}");
    let mut stopped = daemon;
    stopped.kill();
    let err = stopped.cli(&["status"]).unwrap_err().to_string();
    assert!(err.contains("not running"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// A backend's MAC changes (here: the LB's neighbour entry is replaced, as a gratuitous ARP
/// would): the netlink notification makes the daemon resolve again and write the new MAC,
/// without waiting for its periodic refresh. A deleted entry keeps the last good MAC.
#[test]
fn a_neighbour_change_reaches_the_data_path_from_its_notification() {
    let (lab, _servers, daemon) = lab_with_daemon(1, 1);
    let backend = backend4(0);
    let next_hop = || -> String {
        let status: serde_json::Value =
            serde_json::from_str(&daemon.cli(&["status", "--json"]).unwrap()).unwrap();
        status["vips"][0]["backends"][0]["next_hop"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let wait_next_hop = |mac: &str| -> Duration {
        let start = std::time::Instant::now();
        while !next_hop().starts_with(mac) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "next hop still {} instead of {mac}",
                next_hop()
            );
            thread::sleep(Duration::from_millis(10));
        }
        start.elapsed()
    };
    let real_mac = lab.backends[0]
        .ns
        .exec("cat /sys/class/net/eth0/address")
        .unwrap()
        .trim()
        .to_string();
    wait_next_hop(&real_mac);

    let moved = "02:00:00:00:00:77";
    lab.lb
        .ns
        .exec(&format!(
            "ip neigh replace {backend} lladdr {moved} dev eth0 nud reachable"
        ))
        .unwrap();
    let took = wait_next_hop(moved);
    eprintln!("new MAC in the data path {took:?} after the neighbour change");
    assert!(
        daemon.log().contains("neighbour change: resolving again"),
        "the change was not applied from its notification; log:\n{}",
        daemon.log()
    );

    // A deleted (or failed) entry: the last good MAC stays while ARP runs again, which finds
    // the real backend and its MAC, and connections work.
    lab.lb
        .ns
        .exec(&format!("ip neigh del {backend} dev eth0"))
        .unwrap();
    wait_next_hop(&real_mac);
    assert_eq!(spread(&lab, 3), ["b0", "b0", "b0"]);
}
