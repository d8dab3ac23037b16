//! The connection log end to end, in namespaces with the real daemon, real TCP servers and a
//! real client: 500 connections give 500 `new` records matching what the client saw (its
//! ports, the backends that answered), in the file, in `xdplb log` and live in
//! `xdplb log --follow`; denied and rate-limited connections are logged as such; the file
//! survives a logrotate-style rename + reload, and records keep the names of their time; a
//! spoofed flood beyond the budget leaves forwarding and the daemon responsive and is counted.

use lb_userspace::connlog::Entry;
use socket2::{Domain, Socket, Type};
use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};
use xdplb_tests::{
    lab::{
        addr, backend4, send_raw_v4, two_subnet_lab, web_and_other, xdplb_binary, Daemon, Lab,
        Process, CLIENT4, CLIENT_B,
    },
    packet::{Packet, TCP_SYN},
};

const WEB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const OTHER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
/// How long records may take to reach the file or the daemon's memory (drained every 10 ms,
/// written in batches; generous for a shared CPU).
const SETTLE: Duration = Duration::from_secs(20);

/// "web" (with `web_keys`) and "other" on every backend.
fn services(backends: usize, web_keys: &str) -> String {
    web_and_other(WEB, OTHER, backends, web_keys)
}

/// The lab, TCP servers `b<n>` on every backend, the client also at 10.0.5.10.
fn lab(backends: usize) -> (Lab, Vec<Process>) {
    two_subnet_lab(backends)
}

/// The log file of the daemon the lab `id` will run (inside its directory, removed with it).
fn log_path(lab: &Lab) -> PathBuf {
    std::env::temp_dir()
        .join(&lab.id)
        .join("log")
        .join("connections.jsonl")
}

fn start(lab: &Lab, log_keys: &str, services: &str, backends: usize) -> Daemon {
    let daemon = Daemon::start(lab, &format!("[daemon.log]\n{log_keys}\n"), services).unwrap();
    daemon.wait_available(backends).unwrap();
    daemon
}

/// A connection from `src` (port chosen by the kernel): (client port, backend name), or the
/// error (a filtered SYN times out).
fn connect(src: IpAddr, dst: SocketAddr, timeout: Duration) -> io::Result<(u16, String)> {
    connect_from(SocketAddr::new(src, 0), dst, timeout)
}

/// The same from a given source port: the kernel reuses a port whose connection the server
/// closed at once, and a tuple reused after its FIN is a `rehash`, not a `new` flow.
fn connect_from(src: SocketAddr, dst: SocketAddr, timeout: Duration) -> io::Result<(u16, String)> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    socket.bind(&src.into())?;
    socket.connect_timeout(&dst.into(), timeout)?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let port = stream.local_addr()?.port();
    stream.write_all(b"NAME\n")?;
    let mut name = String::new();
    BufReader::new(stream).read_line(&mut name)?;
    Ok((port, name.trim().to_string()))
}

fn read_entries(path: &Path) -> Vec<Entry> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?}: {e}")))
        .collect()
}

/// Waits (bounded) until `entries()` satisfies `ready`; returns the last entries read.
fn wait_entries(
    what: &str,
    entries: impl Fn() -> Vec<Entry>,
    ready: impl Fn(&[Entry]) -> bool,
) -> Vec<Entry> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = entries();
        if ready(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; have {} records: {:#?}",
            now.len(),
            now.iter().rev().take(5).collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// `xdplb log --json` with `args`.
fn cli_entries(daemon: &Daemon, args: &[&str]) -> Vec<Entry> {
    let mut all = vec!["log", "--json"];
    all.extend_from_slice(args);
    daemon
        .cli(&all)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// client port -> backend address, from records of `event` for `vip` by the lab's client.
fn by_port(entries: &[Entry], vip: &str, client: Ipv4Addr) -> BTreeMap<u16, IpAddr> {
    entries
        .iter()
        .filter(|e| e.event == "new" && e.vip == vip)
        .filter_map(|e| {
            let (ip, port) = e.client.rsplit_once(':')?;
            (ip == client.to_string()).then(|| (port.parse().unwrap(), e.backend.unwrap()))
        })
        .collect()
}

/// `xdplb log --follow --json`, its lines sent to the returned channel as they come.
fn follow(daemon: &Daemon, args: &[&str]) -> (Process, mpsc::Receiver<Entry>) {
    let mut child = Command::new(xdplb_binary())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["log", "--follow", "--json", "-n", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                return;
            }
        }
    });
    (Process(child), rx)
}

#[test]
fn connlog_five_hundred_connections_give_five_hundred_records_as_the_client_saw_them() {
    const CONNECTIONS: usize = 500;
    let (lab, _servers) = lab(2);
    let path = log_path(&lab);
    let mut daemon = start(
        &lab,
        &format!("path = \"{}\"", path.display()),
        &services(2, ""),
        2,
    );
    // Followed from before the first connection: records must arrive live. Connections to
    // "other" until one shows up say the follower is subscribed.
    let (_follower, live) = follow(&daemon, &[]);
    let deadline = Instant::now() + SETTLE;
    loop {
        assert!(
            Instant::now() < deadline,
            "xdplb log --follow shows nothing"
        );
        lab.client
            .ns
            .enter(|| connect(IpAddr::V4(CLIENT4), addr(OTHER, 80), Duration::from_secs(2)))
            .unwrap()
            .unwrap();
        if live.recv_timeout(Duration::from_millis(500)).is_ok() {
            break;
        }
    }
    while live.recv_timeout(Duration::from_millis(200)).is_ok() {}
    let seen: BTreeMap<u16, IpAddr> = lab
        .client
        .ns
        .enter(|| {
            (0..CONNECTIONS)
                .map(|i| {
                    let src = addr(CLIENT4, 20_000 + i as u16);
                    let (port, name) = connect_from(src, addr(WEB, 80), Duration::from_secs(2))
                        .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                    let n: usize = name.trim_start_matches('b').parse().unwrap();
                    (port, IpAddr::V4(backend4(n)))
                })
                .collect()
        })
        .unwrap();
    assert_eq!(seen.len(), CONNECTIONS, "client ports repeat");
    assert!(
        seen.values().any(|b| *b == IpAddr::V4(backend4(0)))
            && seen.values().any(|b| *b == IpAddr::V4(backend4(1))),
        "both backends answered"
    );

    // Live: every record through the follower, without a file read.
    let deadline = Instant::now() + SETTLE;
    let mut followed = Vec::new();
    while followed.len() < CONNECTIONS {
        let left = deadline.saturating_duration_since(Instant::now());
        match live.recv_timeout(left) {
            Ok(entry) => followed.push(entry),
            Err(e) => panic!(
                "--follow gave {} of {CONNECTIONS} records: {e}",
                followed.len()
            ),
        }
    }
    assert_eq!(by_port(&followed, "web", CLIENT4), seen, "--follow");

    let web_records = |entries: Vec<Entry>| -> Vec<Entry> {
        entries.into_iter().filter(|e| e.vip == "web").collect()
    };
    let in_file = wait_entries(
        "500 records in the file",
        || web_records(read_entries(&path)),
        |e| e.len() >= CONNECTIONS,
    );
    assert_eq!(in_file.len(), CONNECTIONS, "one record per connection");
    assert_eq!(by_port(&in_file, "web", CLIENT4), seen, "the file");
    for entry in &in_file {
        assert_eq!(
            (entry.proto.as_str(), entry.port, entry.forwarding.as_str()),
            ("tcp", 80, "dsr"),
            "{entry:?}"
        );
        assert!(
            entry.time.ends_with('Z') && entry.time.len() == "2026-11-30T07:00:00.123456789Z".len(),
            "RFC 3339 with nanoseconds: {entry:?}"
        );
    }
    let from_cli = cli_entries(&daemon, &["-n", "1000", "--vip", "web", "--event", "new"]);
    assert_eq!(
        from_cli.len(),
        CONNECTIONS,
        "xdplb log --vip web --event new"
    );
    assert_eq!(by_port(&from_cli, "web", CLIENT4), seen, "xdplb log");
    let table = daemon.cli(&["log", "-n", "3"]).unwrap();
    assert!(
        table.starts_with("TIME") && table.lines().count() == 4 && table.contains(" new "),
        "{table}"
    );

    // kill -9 and a restart: the new daemon adopts the pinned ring and appends to the file.
    daemon.kill();
    daemon.restart().unwrap();
    daemon.wait_available(2).unwrap();
    let src = addr(CLIENT4, 20_000 + CONNECTIONS as u16);
    let (port, _) = lab
        .client
        .ns
        .enter(|| connect_from(src, addr(WEB, 80), Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    let client = format!("{CLIENT4}:{port}");
    let after = wait_entries(
        "a record after the restart",
        || web_records(read_entries(&path)),
        |e| e.iter().any(|e| e.client == client),
    );
    assert_eq!(after.len(), CONNECTIONS + 1, "appended to the same file");
}

#[test]
fn connlog_denials_limits_rotation_and_renames_are_logged_as_they_happened() {
    let (lab, _servers) = lab(1);
    let path = log_path(&lab);
    let web_keys = "deny_sources = [\"10.0.5.0/24\"]\n[vip.limits]\nnew_flows_per_source = 1\nnew_flows_burst = 1";
    let text = services(1, web_keys);
    let daemon = start(&lab, &format!("path = \"{}\"", path.display()), &text, 1);
    let quick = Duration::from_millis(400);
    let (denied, limited) = lab
        .client
        .ns
        .enter(|| {
            let denied = connect(IpAddr::V4(CLIENT_B), addr(WEB, 80), quick);
            // One new flow per second: the first passes, the next ones (at once) do not.
            let results: Vec<_> = (0..3)
                .map(|_| connect(IpAddr::V4(CLIENT4), addr(WEB, 80), quick).is_ok())
                .collect();
            (denied, results)
        })
        .unwrap();
    assert!(denied.is_err(), "10.0.5.10 is denied");
    assert!(limited[0], "the first connection is within the limit");
    assert!(
        limited[1..].iter().any(|ok| !ok),
        "later ones are limited: {limited:?}"
    );
    let before = wait_entries(
        "denied and rate-limited records",
        || read_entries(&path),
        |e| e.iter().any(|e| e.event == "denied") && e.iter().any(|e| e.event == "rate_limited"),
    );
    let denied = before.iter().find(|e| e.event == "denied").unwrap();
    assert!(denied.client.starts_with("10.0.5.10:"), "{denied:?}");
    assert_eq!((denied.vip.as_str(), denied.backend), ("web", None));
    let limited = before.iter().find(|e| e.event == "rate_limited").unwrap();
    assert!(limited.client.starts_with("10.0.0.10:"), "{limited:?}");
    assert_eq!(limited.limit.as_deref(), Some("source"));
    let only_denied = cli_entries(&daemon, &["--event", "denied"]);
    assert!(
        !only_denied.is_empty() && only_denied.iter().all(|e| e.event == "denied"),
        "{only_denied:?}"
    );

    // A record of "other" before the reload that renames it.
    let (old_port, _) = lab
        .client
        .ns
        .enter(|| connect(IpAddr::V4(CLIENT4), addr(OTHER, 80), quick))
        .unwrap()
        .unwrap();
    let old_client = format!("{CLIENT4}:{old_port}");
    wait_entries(
        "the record of the connection to other",
        || read_entries(&path),
        |e| e.iter().any(|e| e.client == old_client),
    );
    // logrotate: rename, then reload (which also renames "other").
    let rotated = path.with_extension("jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    let renamed = std::fs::read_to_string(&daemon.config)
        .unwrap()
        .replace("name = \"other\"", "name = \"renamed\"");
    std::fs::write(&daemon.config, renamed).unwrap();
    daemon.cli(&["reload"]).unwrap();
    let (new_port, _) = lab
        .client
        .ns
        .enter(|| connect(IpAddr::V4(CLIENT4), addr(OTHER, 80), quick))
        .unwrap()
        .unwrap();
    let new_client = format!("{CLIENT4}:{new_port}");
    let after = wait_entries(
        "the new connection's record in a new file",
        || read_entries(&path),
        |e| e.iter().any(|e| e.client == new_client),
    );
    assert!(
        after.iter().all(|e| e.client != old_client),
        "the new file has only records after the reload: {after:?}"
    );
    assert_eq!(
        after.iter().find(|e| e.client == new_client).unwrap().vip,
        "renamed"
    );
    let old = read_entries(&rotated);
    let old_record = old.iter().find(|e| e.client == old_client).unwrap();
    assert_eq!(
        old_record.vip, "other",
        "the rotated file is left as it was"
    );
    assert!(old.iter().all(|e| e.client != new_client));
    // The daemon's memory keeps both names too: each record decoded with the names of its time.
    let both = cli_entries(&daemon, &["-n", "1000"]);
    let vip_of = |client: &str| {
        both.iter()
            .find(|e| e.client == client)
            .map(|e| e.vip.clone())
    };
    assert_eq!(vip_of(&old_client).as_deref(), Some("other"));
    assert_eq!(vip_of(&new_client).as_deref(), Some("renamed"));
    // A SIGHUP reopens as well.
    std::fs::rename(&path, path.with_extension("jsonl.2")).unwrap();
    let pid = daemon.process.as_ref().unwrap().id() as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + SETTLE;
    let mut hup_client = String::new();
    // The reopen happens once the signal is handled: retry until a record lands in a new file.
    while !read_entries(&path).iter().any(|e| e.client == hup_client) {
        assert!(
            Instant::now() < deadline,
            "no new file after SIGHUP:\n{}",
            daemon.log()
        );
        let (port, _) = lab
            .client
            .ns
            .enter(|| connect(IpAddr::V4(CLIENT4), addr(OTHER, 80), quick))
            .unwrap()
            .unwrap();
        hup_client = format!("{CLIENT4}:{port}");
        thread::sleep(Duration::from_millis(200));
    }

    // A reload without [daemon.log] turns the log off: xdplb log says so.
    let section = format!("[daemon.log]\npath = \"{}\"\n", path.display());
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    assert!(config.contains(&section), "{config}");
    std::fs::write(&daemon.config, config.replace(&section, "")).unwrap();
    daemon.cli(&["reload"]).unwrap();
    let off = daemon.cli(&["log"]).unwrap_err().to_string();
    assert!(
        off.contains("the connection log is off: add a [daemon.log] section"),
        "{off}"
    );
}

/// The daemon's global counter `name` (from `xdplb stats --json`).
fn global(daemon: &Daemon, name: &str) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&daemon.cli(&["stats", "--json"]).unwrap()).unwrap();
    stats["global"]
        .as_array()
        .and_then(|g| g.iter().find(|c| c["name"] == name))
        .and_then(|c| c["total"].as_u64())
        .unwrap_or_else(|| panic!("no counter {name} in {stats}"))
}

#[test]
fn connlog_a_flood_beyond_the_budget_is_counted_and_forwarding_and_the_daemon_stay_responsive() {
    const BUDGET: u64 = 200;
    const FLOOD: u32 = 30_000;
    let (lab, _servers) = lab(1);
    let daemon = start(
        &lab,
        &format!("max_per_second = {BUDGET}"),
        &services(1, ""),
        1,
    );
    let started = Instant::now();
    let (sent, during) = thread::scope(|scope| {
        let flood = scope.spawn(|| {
            // Fresh spoofed SYNs: each one a new flow, each one a record the budget refuses.
            let packets = (0..FLOOD).map(|i| {
                Packet::new()
                    .ipv4(Ipv4Addr::from(0x0ac8_0000 + (i >> 8)), WEB)
                    .tcp(1024 + (i & 0xff) as u16, 80)
                    .flags(TCP_SYN)
                    .seq(i)
                    .build()
            });
            lab.client
                .ns
                .enter(|| send_raw_v4(WEB, packets, Instant::now() + Duration::from_secs(30)))
                .unwrap()
                .unwrap()
        });
        // Meanwhile: real connections and the admin API answer.
        let mut during = Vec::new();
        while !flood.is_finished() && during.len() < 50 {
            let served = lab
                .client
                .ns
                .enter(|| {
                    connect(IpAddr::V4(CLIENT4), addr(WEB, 80), Duration::from_secs(2)).is_ok()
                })
                .unwrap();
            let asked = Instant::now();
            let status = daemon.cli(&["status", "--json"]).is_ok();
            during.push((served, status, asked.elapsed()));
        }
        (flood.join().unwrap(), during)
    });
    let flooded_for = started.elapsed();
    assert!(
        sent >= u64::from(FLOOD) * 9 / 10,
        "only {sent} flood packets sent"
    );
    assert!(
        !during.is_empty(),
        "the flood ended before a connection was tried"
    );
    assert!(
        during
            .iter()
            .all(|(served, status, took)| *served && *status && *took < Duration::from_secs(2)),
        "connections and status during the flood: {during:?}"
    );
    // Burst of one second's worth, then the rate: everything else counted.
    let allowed = BUDGET + BUDGET * (flooded_for.as_secs() + 2);
    let mut dropped = 0;
    let deadline = Instant::now() + SETTLE;
    while dropped + allowed < sent {
        assert!(
            Instant::now() < deadline,
            "{dropped} budget drops counted for {sent} flood packets ({flooded_for:?})"
        );
        thread::sleep(Duration::from_millis(200));
        dropped = global(&daemon, "log_records_dropped_budget");
    }
    // Nothing lost but to the budget (no ring overrun): each flood record either was over
    // it or reached the reader, once the reader had its next pass.
    let deadline = Instant::now() + SETTLE;
    let records = loop {
        let records = cli_entries(&daemon, &["-n", "100000"]);
        dropped = global(&daemon, "log_records_dropped_budget");
        if records.len() as u64 + dropped >= sent || Instant::now() >= deadline {
            break records;
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert!(
        records.len() as u64 + dropped >= sent,
        "{} records logged and {dropped} over the budget for {sent} flood packets",
        records.len()
    );
    assert!(
        (records.len() as u64) <= allowed + during.len() as u64,
        "{} records passed a budget of {BUDGET}/s over {flooded_for:?}",
        records.len()
    );
    eprintln!(
        "flood: {sent} SYNs in {flooded_for:?}; {dropped} records over the budget, {} logged; {} connections during it, all served",
        records.len(),
        during.len()
    );
    assert!(
        lab.client
            .ns
            .enter(|| connect(IpAddr::V4(CLIENT4), addr(WEB, 80), Duration::from_secs(2)).is_ok())
            .unwrap(),
        "served after the flood"
    );
}
