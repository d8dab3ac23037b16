//! The daemon survives what a production host does to it: its interface deleted and created
//! again, a reload requested during start-up, `kill -9` with a dead backend, an
//! `overrides.json` emptied by a power loss. Real daemon, real servers and clients in
//! namespaces; every wait is bounded.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    time::{Duration, Instant},
};
use xdplb_tests::lab::{addr, backend4, Daemon, Lab, Process};

const VIP: &str = "192.0.2.10";
/// `/healthz` on the LB's loopback: the test deletes the interface that holds the LB's
/// address.
const METRICS: &str = "127.0.0.1:9464";
/// Longest wait for anything the daemon should do by itself.
const PATIENCE: Duration = Duration::from_secs(20);

fn vip() -> SocketAddr {
    addr(VIP.parse::<std::net::Ipv4Addr>().unwrap(), 80)
}

/// The web VIP with `backends` backends and `extra` keys (a `[vip.health]` table).
fn web(backends: usize, extra: &str) -> String {
    let mut text = format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP}\"\nport = 80\nring_size = 1021\n{extra}"
    );
    for n in 0..backends {
        text.push_str(&format!("[[vip.backend]]\naddress = \"{}\"\n", backend4(n)));
    }
    text
}

/// Servers on the first `serving` backends of `lab`.
fn serve(lab: &Lab, serving: usize) -> Vec<Process> {
    lab.backends[..serving]
        .iter()
        .enumerate()
        .map(|(i, b)| b.serve(&format!("b{i}"), "0.0.0.0:80", "tcp").unwrap())
        .collect()
}

fn wait_available(daemon: &Daemon, n: usize) {
    daemon
        .wait_status(&format!("{n} backends available"), |s| {
            s["vips"][0]["available"].as_u64() == Some(n as u64)
        })
        .unwrap();
}

/// `count` new connections from the client: the backends' names, or the errors.
fn connect(lab: &Lab, count: usize) -> Vec<Result<String, String>> {
    lab.connect(vip(), count)
}

/// `count` new connections, every one served; the backends' names.
fn all_served(lab: &Lab, count: usize) -> Vec<String> {
    let results = connect(lab, count);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    results.into_iter().map(Result::unwrap).collect()
}

/// The status code of `/healthz`, asked inside the LB's namespace.
fn healthz(lab: &Lab) -> u16 {
    lab.lb
        .ns
        .enter(|| -> std::io::Result<u16> {
            let mut stream =
                TcpStream::connect_timeout(&METRICS.parse().unwrap(), Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response
                .split(' ')
                .nth(1)
                .and_then(|code| code.parse().ok())
                .unwrap_or(0))
        })
        .unwrap()
        .expect("/healthz answers")
}

/// Retries a connection through the VIP until one succeeds; the time it took.
fn until_traffic_flows(lab: &Lab) -> Duration {
    let start = Instant::now();
    while connect(lab, 1)[0].is_err() {
        assert!(
            start.elapsed() < PATIENCE,
            "no traffic through the VIP {PATIENCE:?} after the interface came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
fn a_recreated_interface_gets_the_program_back_at_run_time_and_at_start() {
    let lab = Lab::new(2).expect("lab");
    let _servers = serve(&lab, 2);
    let mut daemon = Daemon::start(
        &lab,
        &format!("metrics_listen = \"{METRICS}\"\n"),
        &web(2, ""),
    )
    .unwrap();
    wait_available(&daemon, 2);
    all_served(&lab, 10);
    assert_eq!(healthz(&lab), 200);

    // Deleted: status and /healthz say the LB is not balancing.
    let mac = lab.delete_interface(&lab.lb).unwrap();
    daemon
        .wait_status("eth0 reported without its program", |s| {
            s["detached"][0]
                .as_str()
                .is_some_and(|d| d.starts_with("eth0: no XDP program"))
        })
        .unwrap();
    let text = daemon.cli(&["status"]).unwrap();
    assert!(text.contains("NOT BALANCING: eth0"), "{text}");
    assert_eq!(healthz(&lab), 503);

    // Back (same MAC and addresses, as after a driver reload): attached again by itself.
    lab.restore_interface(&lab.lb, &mac).unwrap();
    let took = until_traffic_flows(&lab);
    println!("traffic through the VIP again {took:?} after the interface came back");
    // The bound; it takes about a millisecond (the next hops move to the new
    // interface at once), so only lost SYNs on a loaded machine come near it.
    assert!(took < Duration::from_secs(2), "{took:?}");
    let names = all_served(&lab, 20);
    for b in ["b0", "b1"] {
        assert!(
            names.iter().any(|n| n == b),
            "{b} got none of 20 connections: {names:?}"
        );
    }
    let status = daemon.cli(&["status", "--json"]).unwrap();
    assert!(!status.contains("detached"), "{status}");
    assert_eq!(healthz(&lab), 200);

    // Re-created while the daemon is down: the pinned link is severed, and start replaces it
    // (it used to abort with "Link has been severed").
    daemon.kill();
    let mac = lab.delete_interface(&lab.lb).unwrap();
    lab.restore_interface(&lab.lb, &mac).unwrap();
    daemon.restart().unwrap();
    wait_available(&daemon, 2);
    assert!(
        daemon.log().contains("pinned XDP link was severed"),
        "{}",
        daemon.log()
    );
    let took = until_traffic_flows(&lab);
    println!("traffic through the VIP {took:?} after the restart");
    all_served(&lab, 10);
}

#[test]
fn a_sighup_during_start_up_reloads_once_started() {
    let lab = Lab::new(2).expect("lab");
    let _servers = serve(&lab, 2);
    let mut daemon = Daemon::start(&lab, "", &web(1, "")).unwrap();
    wait_available(&daemon, 1);
    daemon.kill();
    let notify_path = daemon.dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    daemon.spawn(&[("NOTIFY_SOCKET", &notify_path)]).unwrap();
    let pid = daemon.process.as_ref().unwrap().id();
    // `ip netns exec` becomes xdplb (exec): signal xdplb, not ip.
    let exec_deadline = Instant::now() + PATIENCE;
    while !std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.ends_with("xdplb")) {
        assert!(Instant::now() < exec_deadline, "xdplb never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    let mut buf = [0; 256];
    notify.set_nonblocking(true).unwrap();
    assert!(
        notify
            .recv(&mut buf)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "READY came within 50 ms: the SIGHUP would not fall into start-up"
    );
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);

    notify.set_nonblocking(false).unwrap();
    notify.set_read_timeout(Some(PATIENCE)).unwrap();
    let len = notify.recv(&mut buf).expect("READY from the daemon");
    let message = String::from_utf8_lossy(&buf[..len]).into_owned();
    assert_eq!(message.trim(), "READY=1");
    // Ready means ready: the admin socket answers at once.
    daemon.cli(&["status"]).unwrap();
    // The reload asked for during start-up runs once it is done.
    let deadline = Instant::now() + PATIENCE;
    while !daemon.log().contains("SIGHUP: reloaded") {
        assert!(
            daemon
                .process
                .as_mut()
                .unwrap()
                .try_wait()
                .unwrap()
                .is_none(),
            "the daemon died: {}",
            daemon.log()
        );
        assert!(Instant::now() < deadline, "no reload: {}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = daemon.log();
    let running = log.find("xdplb running").expect("started");
    assert!(log.find("SIGHUP: reloaded").unwrap() > running, "{log}");
    assert!(daemon
        .process
        .as_mut()
        .unwrap()
        .try_wait()
        .unwrap()
        .is_none());
    wait_available(&daemon, 1);
    all_served(&lab, 20);
}

#[test]
fn a_backend_down_before_kill_9_gets_no_connection_after_the_restart() {
    let lab = Lab::new(3).expect("lab");
    // b2 serves nothing: connections to it are refused.
    let _servers = serve(&lab, 2);
    // Slow checks, so that without the adopted state a dead backend would be in the ring for
    // the first seconds after the restart.
    let check = "[vip.health]\nkind = \"tcp\"\ninterval = \"2s\"\ntimeout = \"500ms\"\nrise = 2\nfall = 3\n";
    let mut daemon = Daemon::start(&lab, "", &web(3, check)).unwrap();
    let dead = backend4(2).to_string();
    daemon
        .wait_status("b2 down", |s| {
            s["vips"][0]["backends"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b["address"] == dead.as_str() && b["health"] == "down")
        })
        .unwrap();
    wait_available(&daemon, 2);

    daemon.kill();
    daemon.restart().unwrap();
    let results = connect(&lab, 20);
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(
        failed, 0,
        "failed connections right after the restart: {results:?}"
    );
    let status = daemon.cli(&["status", "--json"]).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let b2 = status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == dead.as_str())
        .unwrap()
        .clone();
    assert_eq!(b2["health"], "down", "{b2}");
    assert_eq!(b2["effective_weight"], 0, "{b2}");
}

#[test]
fn an_empty_overrides_file_is_set_aside_and_the_daemon_starts() {
    let lab = Lab::new(2).expect("lab");
    let _servers = serve(&lab, 2);
    let mut daemon = Daemon::start(&lab, "", &web(2, "")).unwrap();
    wait_available(&daemon, 2);
    let drained = backend4(0).to_string();
    daemon.cli(&["drain", "web", &drained]).unwrap();
    wait_available(&daemon, 1);
    daemon.kill();
    // What a power loss used to leave: the rename on disk, the data not.
    let state = daemon.dir.join("state");
    std::fs::write(state.join("overrides.json"), "").unwrap();

    daemon.restart().unwrap();
    let log = daemon.log();
    assert!(
        log.contains("overrides.json") && log.contains("WITHOUT drains"),
        "{log}"
    );
    let aside: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("overrides.json.unreadable-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    // Started without the drain (it was lost with the file), serving both backends.
    wait_available(&daemon, 2);
    all_served(&lab, 20);
    // And saving works again.
    daemon.cli(&["drain", "web", &drained]).unwrap();
    wait_available(&daemon, 1);
    let saved = std::fs::read_to_string(state.join("overrides.json")).unwrap();
    assert!(saved.contains(&drained), "{saved}");
}

#[test]
fn decap_follows_its_interface_when_it_is_created_again() {
    let lab = Lab::new(1).expect("lab");
    let backend = &lab.backends[0];
    let mut decap = backend
        .decap(&[backend.ip4.into()], &[VIP.parse().unwrap()])
        .unwrap();
    let mac = lab.delete_interface(backend).unwrap();
    lab.restore_interface(backend, &mac).unwrap();
    let deadline = Instant::now() + PATIENCE;
    while !backend
        .ns
        .exec("ip link show dev eth0")
        .unwrap()
        .contains("prog/xdp")
    {
        assert!(
            decap.0.try_wait().unwrap().is_none(),
            "xdplb decap exited when its interface went away"
        );
        assert!(
            Instant::now() < deadline,
            "the decap program was not attached again within {PATIENCE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(decap.0.try_wait().unwrap().is_none());
}
