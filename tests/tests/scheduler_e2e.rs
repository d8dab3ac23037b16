//! Round robin and least connections end to end: the real daemon in a lab of namespaces, real
//! TCP servers and clients. Round robin's weighted shares, least-conn steering new connections
//! away from a backend holding long ones and evening out once they close, and drains and a
//! failed backend behaving as with Maglev.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, TcpStream},
    time::Duration,
};
use xdplb_tests::lab::{addr, backend4, serve_tcp, who, Daemon, Lab};

const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// VIP "web" with `scheduler`, TCP health checks (fast, so a failure shows within a second),
/// and backends b0..b2 of the given weights.
fn services(scheduler: &str, weights: [u32; 3]) -> String {
    let mut text = format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP4}\"\nport = 80\nscheduler = \"{scheduler}\"\n\
         ring_size = 1021\n[vip.health]\nkind = \"tcp\"\ninterval = \"200ms\"\n\
         timeout = \"150ms\"\nrise = 1\nfall = 2\n"
    );
    for (n, weight) in weights.iter().enumerate() {
        text += &format!(
            "[[vip.backend]]\naddress = \"{}\"\nweight = {weight}\n",
            backend4(n)
        );
    }
    text
}

fn wait_available(daemon: &Daemon, n: u64) {
    daemon
        .wait_status(&format!("{n} backends available"), |s| {
            s["vips"][0]["available"].as_u64() == Some(n)
        })
        .unwrap();
}

/// `n` short connections, one after the other: backend name -> connections.
fn short_connections(lab: &Lab, n: usize) -> BTreeMap<String, usize> {
    let names = lab
        .client
        .ns
        .enter(|| {
            (0..n)
                .map(|_| who(addr(VIP4, 80)).expect("connect to the VIP"))
                .collect::<Vec<_>>()
        })
        .unwrap();
    let mut counts = BTreeMap::new();
    for name in names {
        *counts.entry(name).or_default() += 1;
    }
    counts
}

fn count(counts: &BTreeMap<String, usize>, name: &str) -> usize {
    counts.get(name).copied().unwrap_or(0)
}

#[test]
fn round_robin_1_1_2_gives_exact_shares_and_skips_drained_and_failed_backends() {
    let lab = Lab::new(3).unwrap();
    let mut servers = serve_tcp(&lab);
    let daemon = Daemon::start(&lab, "", &services("round-robin", [1, 1, 2])).unwrap();
    wait_available(&daemon, 3);
    let status = daemon.cli(&["status"]).unwrap();
    assert!(status.contains("round-robin"), "{status}");

    // Each CPU of the LB walks the turn b2 b0 b1 b2 on its own: over 400 connections every
    // backend is within one turn per CPU of its share.
    let counts = short_connections(&lab, 400);
    eprintln!("round robin over 400 connections: {counts:?}");
    for (name, expected) in [("b0", 25.0), ("b1", 25.0), ("b2", 50.0)] {
        let share = 100.0 * count(&counts, name) as f64 / 400.0;
        assert!(
            (share - expected).abs() <= 1.0,
            "{name} got {share:.2}% of new connections, expected {expected}% +- 1: {counts:?}"
        );
    }

    // Drained b2: the turn is b0 b1.
    daemon
        .cli(&["drain", "web", &backend4(2).to_string()])
        .unwrap();
    wait_available(&daemon, 2);
    let counts = short_connections(&lab, 40);
    assert_eq!(
        count(&counts, "b2"),
        0,
        "drained b2 got new connections: {counts:?}"
    );
    for name in ["b0", "b1"] {
        assert!(count(&counts, name).abs_diff(20) <= 2, "{name}: {counts:?}");
    }
    daemon
        .cli(&["undrain", "web", &backend4(2).to_string()])
        .unwrap();
    wait_available(&daemon, 3);

    // b1 fails its health checks: it leaves the turn.
    drop(servers.remove(1));
    wait_available(&daemon, 2);
    let counts = short_connections(&lab, 60);
    assert_eq!(
        count(&counts, "b1"),
        0,
        "failed b1 got new connections: {counts:?}"
    );
    assert!(
        count(&counts, "b0").abs_diff(20) <= 2 && count(&counts, "b2").abs_diff(40) <= 2,
        "expected 1:2 between b0 and b2: {counts:?}"
    );
}

/// A connection held open: the server streams `request` slowly, the client reads nothing but
/// the name. Dropping it sends the client's FIN.
fn held_connection(request: &str) -> (String, TcpStream) {
    let mut stream = TcpStream::connect_timeout(&addr(VIP4, 80), Duration::from_secs(2))
        .expect("connect to the VIP");
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut name = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut name)
        .unwrap();
    (name.trim().to_string(), stream)
}

/// A long connection the client keeps busy acknowledging (100 bytes/s for minutes).
fn long_connection() -> (String, TcpStream) {
    held_connection("STREAM 100000 100\n")
}

/// Least-conn CONNS of backend `n` in `xdplb status --json`.
fn connections(status: &serde_json::Value, n: usize) -> Option<i64> {
    status["vips"][0]["backends"][n]["scheduler_connections"].as_i64()
}

/// Least-conn CONNS summed over the backends.
fn all_connections(status: &serde_json::Value) -> i64 {
    (0..3).filter_map(|n| connections(status, n)).sum()
}

#[test]
fn least_conn_steers_new_connections_away_from_a_loaded_backend() {
    let lab = Lab::new(3).unwrap();
    let _servers = serve_tcp(&lab);
    let daemon = Daemon::start(&lab, "", &services("least-conn", [1, 1, 1])).unwrap();
    wait_available(&daemon, 3);

    // 20 long connections, all on b0: the others are drained while they open.
    for n in [1, 2] {
        daemon
            .cli(&["drain", "web", &backend4(n).to_string()])
            .unwrap();
    }
    wait_available(&daemon, 1);
    let long: Vec<(String, TcpStream)> = lab
        .client
        .ns
        .enter(|| (0..20).map(|_| long_connection()).collect())
        .unwrap();
    assert!(
        long.iter().all(|(name, _)| name == "b0"),
        "drained backends got new connections: {:?}",
        long.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    for n in [1, 2] {
        daemon
            .cli(&["undrain", "web", &backend4(n).to_string()])
            .unwrap();
    }
    wait_available(&daemon, 3);
    daemon
        .wait_status("b0's count at 20", |s| connections(s, 0) == Some(20))
        .unwrap();
    let status = daemon.cli(&["status"]).unwrap();
    assert!(
        status.contains("least-conn") && status.contains("CONNS"),
        "{status}"
    );

    // The next short connections go to the idle backends.
    let counts = short_connections(&lab, 60);
    eprintln!("least-conn with b0 holding 20: {counts:?}");
    assert!(
        count(&counts, "b0") <= 6,
        "b0 holds 20 connections yet got {} of 60 new ones: {counts:?}",
        count(&counts, "b0")
    );
    // Tied at 0 each time, b1 and b2 take turns (per CPU of the LB).
    assert!(
        count(&counts, "b1").abs_diff(count(&counts, "b2")) <= 4,
        "b1 and b2 should share the short connections evenly: {counts:?}"
    );

    // The long connections close (the client's FIN): counts go back, the spread evens out.
    drop(long);
    daemon
        .wait_status("b0's count back to 0", |s| connections(s, 0) == Some(0))
        .unwrap();
    let counts = short_connections(&lab, 60);
    eprintln!("least-conn, all idle again: {counts:?}");
    for name in ["b0", "b1", "b2"] {
        assert!(
            count(&counts, name) >= 12,
            "{name} got {} of 60 once the load was even: {counts:?}",
            count(&counts, name)
        );
    }
}

#[test]
fn least_conn_gives_idle_connections_back_and_counts_them_again() {
    let lab = Lab::new(3).unwrap();
    let _servers = serve_tcp(&lab);
    let daemon = Daemon::start(
        &lab,
        "idle_timeout = \"5s\"\nstats_interval = \"500ms\"\n",
        &services("least-conn", [1, 1, 1]),
    )
    .unwrap();
    wait_available(&daemon, 3);
    // The server sends its name and one 1 KiB chunk, then waits ~17 minutes before the next:
    // once the client has acknowledged the chunk, the flows are idle.
    let mut idle: Vec<(String, TcpStream)> = lab
        .client
        .ns
        .enter(|| (0..6).map(|_| held_connection("STREAM 2048 1\n")).collect())
        .unwrap();
    daemon
        .wait_status("6 connections counted", |s| all_connections(s) == 6)
        .unwrap();
    // Past idle_timeout (5 s), the daemon's flow scan gives their counts back.
    daemon
        .wait_status("idle connections given back", |s| all_connections(s) == 0)
        .unwrap();
    // A packet from the client: the connection is active again and counted again.
    for (_, stream) in &mut idle {
        stream.write_all(b"x").unwrap();
    }
    daemon
        .wait_status("6 connections counted again", |s| all_connections(s) == 6)
        .unwrap();
    // The client closes them: its FIN gives each count back, once.
    drop(idle);
    daemon
        .wait_status("all given back", |s| all_connections(s) == 0)
        .unwrap();
}
