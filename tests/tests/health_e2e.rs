//! Health checks that steer the rings, in a lab with real servers: a backend's server stops,
//! answers 503, comes back. Within the documented bound (`interval * fall + timeout`, plus a
//! margin) the daemon must take it out of the ring; from then on no new connection may reach
//! it or fail, and it must come back after `rise` successes. Also `on_all_down` ("keep" serves
//! the last healthy set, "drop" drops new flows) and the transition counters in /metrics.
//!
//! Measured times are printed (`-- --nocapture` shows them).

use anyhow::{bail, Context as _, Result};
use serde_json::Value;
use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};
use xdplb_tests::lab::{addr, backend4, server_binary, who, Daemon, Host, Lab, Process, LB4};

const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const BACKENDS: usize = 3;
const METRICS_PORT: u16 = 9650;

// The checks under test: short, so the bounds below are short too.
const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_millis(100);
const RISE: u32 = 2;
const FALL: u32 = 2;

/// Added to the documented bound `interval * fall + timeout` (500 ms here), for:
/// * the schedule's jitter: each period is the interval ±10 %, +40 ms over two periods;
/// * the daemon handling the event: one `apply` (a Maglev table of 1021 slots, a map update);
/// * our observation: `xdplb status --json` polled every 20 ms, each poll a debug-build CLI
///   process (~10-30 ms when idle);
/// * a loaded 2-core machine running two labs (two daemons, six servers, two client loops):
///   every step above can wait for a CPU.
///
/// Measured: 0.22-0.55 s, also with two CPU hogs running (see the printed values), so 1.5 s is
/// generous, yet the total (2 s) stays well under what a mis-applied config would give (the
/// default checks, 1 s * 3 + 0.5 s, need 3.5 s).
const MARGIN: Duration = Duration::from_millis(1500);

/// Longest any wait polls before failing (not the asserted bound: that is checked on the
/// measured time, so a slow transition is reported with its duration).
const WAIT_LIMIT: Duration = Duration::from_secs(20);

fn vip() -> SocketAddr {
    addr(VIP, 80)
}

/// `interval * n + timeout`: the documented time for `n` consecutive check outcomes.
fn documented_bound(n: u32) -> Duration {
    INTERVAL * n + TIMEOUT
}

/// The web VIP with `BACKENDS` backends and the given check keys (`kind = ...` and more).
fn web(check: &str) -> String {
    let mut text = format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP}\"\nport = 80\nring_size = 1021\n\
         [vip.health]\n{check}\ninterval = \"{}ms\"\ntimeout = \"{}ms\"\nrise = {RISE}\n\
         fall = {FALL}\n",
        INTERVAL.as_millis(),
        TIMEOUT.as_millis()
    );
    for n in 0..BACKENDS {
        text.push_str(&format!("[[vip.backend]]\naddress = \"{}\"\n", backend4(n)));
    }
    text
}

const TCP_CHECK: &str = "kind = \"tcp\"";
const HTTP_CHECK: &str = "kind = \"http\"\npath = \"/healthz\"";

fn daemon_settings() -> String {
    format!("metrics_listen = \"{LB4}:{METRICS_PORT}\"\nstats_interval = \"200ms\"\n")
}

/// A directory for the servers' status files, removed on drop.
struct StatusFiles(PathBuf);

impl StatusFiles {
    fn new(lab: &Lab) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-status", lab.id));
        std::fs::create_dir_all(&dir).unwrap();
        let files = Self(dir);
        for n in 0..BACKENDS {
            files.set(n, 200);
        }
        files
    }

    fn file(&self, n: usize) -> PathBuf {
        self.0.join(format!("b{n}"))
    }

    /// Sets the HTTP status backend `n` answers. Written to a temporary file and renamed, so
    /// the server never reads a half-written file (which it would take for 200).
    fn set(&self, n: usize, status: u16) {
        let tmp = self.0.join(format!("b{n}.tmp"));
        std::fs::write(&tmp, status.to_string()).unwrap();
        std::fs::rename(&tmp, self.file(n)).unwrap();
    }

    fn set_all(&self, status: u16) {
        for n in 0..BACKENDS {
            self.set(n, status);
        }
    }
}

impl Drop for StatusFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The lab server of backend `n` on port 80, answering HTTP with the status in
/// `status_file` (`Host::serve` has no status file argument).
fn serve(host: &Host, n: usize, status_file: &Path) -> Process {
    let name = format!("b{n}");
    let file = status_file.display().to_string();
    Process(
        host.ns
            .spawn(&server_binary(), &[&name, "0.0.0.0:80", "tcp", &file])
            .unwrap(),
    )
}

/// Waits until every backend's server accepts connections, so the daemon's first checks
/// never see a server that is still starting.
fn wait_listening(lab: &Lab) {
    lab.client
        .ns
        .enter(|| {
            for n in 0..lab.backends.len() {
                let deadline = Instant::now() + WAIT_LIMIT;
                while who(addr(backend4(n), 80)).is_err() {
                    assert!(Instant::now() < deadline, "b{n} does not serve");
                    thread::sleep(Duration::from_millis(20));
                }
            }
        })
        .unwrap();
}

/// A lab whose backends serve HTTP with status files, and the daemon up with every backend
/// checked up. Fields drop in order: daemon, servers, lab, files.
struct Setup {
    daemon: Daemon,
    servers: Vec<Process>,
    lab: Lab,
    files: StatusFiles,
}

fn lab_with_daemon(check: &str) -> Setup {
    let lab = Lab::new(BACKENDS).expect("lab");
    let files = StatusFiles::new(&lab);
    let servers = lab
        .backends
        .iter()
        .enumerate()
        .map(|(n, host)| serve(host, n, &files.file(n)))
        .collect();
    wait_listening(&lab);
    let daemon = Daemon::start(&lab, &daemon_settings(), &web(check)).expect("daemon");
    wait_for(&daemon, "every backend up", |s| {
        (0..BACKENDS).all(|n| is_up(backend(s, n)))
    });
    Setup {
        daemon,
        servers,
        lab,
        files,
    }
}

/// Backend `n` of the web VIP in `xdplb status --json`.
fn backend(status: &Value, n: usize) -> &Value {
    let address = backend4(n).to_string();
    status["vips"][0]["backends"]
        .as_array()
        .and_then(|list| list.iter().find(|b| b["address"] == address.as_str()))
        .unwrap_or_else(|| panic!("no backend {address} in {status}"))
}

/// Checked down and out of the ring (the maps are written before `live` changes, so a status
/// saying weight 0 means new flows already avoid the backend).
fn is_down(b: &Value) -> bool {
    b["health"] == "down" && b["effective_weight"] == 0
}

fn is_up(b: &Value) -> bool {
    b["health"] == "up" && b["effective_weight"].as_u64().unwrap_or(0) > 0
}

/// The end of a [`wait_for`].
struct Waited {
    /// From the call to the first status satisfying the condition.
    took: Duration,
    status: Value,
    /// When the last poll that did not satisfy it was sent (the call's start if none): the
    /// daemon had not changed yet at that instant.
    last_miss: Instant,
}

/// Polls `xdplb status --json` every 20 ms until `ready`. Fails after `WAIT_LIMIT` with the
/// daemon's log.
fn wait_for(daemon: &Daemon, what: &str, ready: impl Fn(&Value) -> bool) -> Waited {
    let start = Instant::now();
    let mut last_miss = start;
    loop {
        let sent = Instant::now();
        if let Ok(text) = daemon.cli(&["status", "--json"]) {
            let status: Value = serde_json::from_str(&text).unwrap();
            if ready(&status) {
                return Waited {
                    took: start.elapsed(),
                    status,
                    last_miss,
                };
            }
            last_miss = sent;
        }
        assert!(
            start.elapsed() < WAIT_LIMIT,
            "timed out waiting for {what}; log:\n{}",
            daemon.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn assert_within(what: &str, took: Duration, documented: Duration) {
    let bound = documented + MARGIN;
    println!(
        "measured: {what}: {} ms (documented bound {} ms, asserted {} ms)",
        took.as_millis(),
        documented.as_millis(),
        bound.as_millis()
    );
    assert!(
        took <= bound,
        "{what} took {took:?}, more than {documented:?} + {MARGIN:?}"
    );
}

/// Backend names answering `count` new connections to the VIP; failures as `Err`.
fn spread(lab: &Lab, count: usize) -> Vec<Result<String, String>> {
    lab.connect(vip(), count)
}

/// One connection attempt of the client loop.
struct Attempt {
    start: Instant,
    end: Instant,
    /// The client's port, once connected.
    port: Option<u16>,
    result: Result<String, String>,
}

/// [`who`], telling the client's port and which step failed.
fn ask_name(to: SocketAddr) -> (Option<u16>, Result<String, String>) {
    let mut stream = match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
        Ok(stream) => stream,
        Err(e) => return (None, Err(format!("connect: {e}"))),
    };
    let port = stream.local_addr().ok().map(|a| a.port());
    let result = (|| -> std::io::Result<String> {
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"NAME\n")?;
        let mut name = String::new();
        BufReader::new(&stream).read_line(&mut name)?;
        Ok(name.trim().to_string())
    })();
    (port, result.map_err(|e| format!("after connecting: {e}")))
}

/// Connects to the VIP over and over (one short connection every 5 ms) until `stop`, at most
/// `MAX_ATTEMPTS` times and for at most `WAIT_LIMIT * 3`.
fn hammer(lab: &Lab, stop: &AtomicBool) -> Vec<Attempt> {
    const MAX_ATTEMPTS: usize = 6000;
    let deadline = Instant::now() + WAIT_LIMIT * 3;
    lab.client
        .ns
        .enter(|| {
            let mut attempts = Vec::new();
            while !stop.load(Ordering::Relaxed)
                && attempts.len() < MAX_ATTEMPTS
                && Instant::now() < deadline
            {
                let start = Instant::now();
                let (port, result) = ask_name(vip());
                let end = Instant::now();
                attempts.push(Attempt {
                    start,
                    end,
                    port,
                    result,
                });
                thread::sleep(Duration::from_millis(5));
            }
            attempts
        })
        .unwrap()
}

/// Sets its flag when dropped, e.g. while a failed assertion unwinds.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// `GET path` over HTTP/1.1 from the current namespace: (status code, body).
fn http_get(to: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8(response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no end of headers")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("chunked response: not expected for a fixed-size body");
    }
    Ok((status, body.to_string()))
}

/// Scrapes /metrics from the client's namespace.
fn scrape(lab: &Lab) -> prometheus_parse::Scrape {
    let (status, body) = lab
        .client
        .ns
        .enter(|| http_get(addr(LB4, METRICS_PORT), "/metrics"))
        .unwrap()
        .expect("scraping /metrics");
    assert_eq!(status, 200, "{body}");
    // prometheus-parse ignores the OpenMetrics `# EOF` line (it matches no rule).
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of the sample `name` with exactly these labels, if present. prometheus-parse
/// reads OpenMetrics counters (`# TYPE x counter`, samples `x_total`) as untyped.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    use prometheus_parse::Value::{Counter, Gauge, Untyped};
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .map(|s| match s.value {
            Counter(v) | Gauge(v) | Untyped(v) => v,
            _ => panic!("{name} is not a single value"),
        })
}

/// Scrapes until `ready` holds (bounded), e.g. until the next stats sample is exported.
fn wait_metrics(lab: &Lab, what: &str, ready: impl Fn(&prometheus_parse::Scrape) -> bool) {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let scrape = scrape(lab);
        if ready(&scrape) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:#?}",
            scrape.samples
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Stops backend 0's server while a client keeps connecting, then starts it again.
fn stop_and_restart(check: &str) {
    let mut setup = lab_with_daemon(check);
    let Setup {
        daemon,
        servers,
        lab,
        files,
    } = &mut setup;
    let (daemon, lab, files) = (&*daemon, &*lab, &*files);
    let b0 = backend4(0).to_string();
    let stop = AtomicBool::new(false);
    let mut times = Times::default();
    let attempts = thread::scope(|scope| {
        let client = scope.spawn(|| hammer(lab, &stop));
        // Stops the client also when an assertion below fails (the scope waits for it).
        let _stop = StopOnDrop(&stop);
        // Let the client run against a healthy VIP first.
        thread::sleep(Duration::from_millis(300));

        let server = &mut servers[0].0;
        // Taken before the signal: an attempt the kill resets may end before `wait` returns.
        times.kill = Instant::now();
        server.kill().unwrap();
        server.wait().unwrap();
        let Waited { took, status, .. } = wait_for(daemon, "b0 down", |s| is_down(backend(s, 0)));
        times.down = Instant::now();
        assert_within(
            "server stopped -> status down",
            took,
            documented_bound(FALL),
        );
        let failure = backend(&status, 0)["last_failure"].as_str().unwrap_or("");
        assert!(failure.contains("refused"), "last_failure: {failure:?}");
        assert_eq!(status["vips"][0]["available"], BACKENDS - 1);

        // The transition is counted, and the exported state follows at the next sample.
        wait_metrics(lab, "b0 counted down", |m| {
            let down = [("vip", "web"), ("backend", b0.as_str()), ("to", "down")];
            let labels = [("vip", "web"), ("backend", b0.as_str())];
            let failed = [("vip", "web"), ("result", "fail")];
            sample(m, "xdplb_health_transitions_total", &down) == Some(1.0)
                && sample(m, "xdplb_backend_up", &labels) == Some(0.0)
                && sample(m, "xdplb_backend_weight", &labels) == Some(0.0)
                // The failed checks' durations are observed too.
                && sample(m, "xdplb_health_check_duration_seconds_count", &failed)
                    >= Some(f64::from(FALL))
        });

        // Clients keep connecting while b0 is down.
        thread::sleep(Duration::from_secs(1));

        servers[0] = serve(&lab.backends[0], 0, &files.file(0));
        times.restart = Instant::now();
        let waited = wait_for(daemon, "b0 up", |s| is_up(backend(s, 0)));
        times.up = Instant::now();
        times.still_down = waited.last_miss;
        let took = waited.took;
        // The server's start (a process spawn) counts against the margin.
        assert_within(
            "server restarted -> status up",
            took,
            documented_bound(RISE),
        );
        wait_metrics(lab, "b0 counted up", |m| {
            let up = [("vip", "web"), ("backend", b0.as_str()), ("to", "up")];
            let labels = [("vip", "web"), ("backend", b0.as_str())];
            // unknown -> up at start, then down -> up.
            sample(m, "xdplb_health_transitions_total", &up) == Some(2.0)
                && sample(m, "xdplb_backend_up", &labels) == Some(1.0)
        });

        thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        client.join().unwrap()
    });
    times.log = daemon.log();
    times.flows = daemon.cli(&["flows", "--limit", "100000"]).unwrap();
    times.check(&attempts);
}

/// When the events of [`stop_and_restart`] happened.
struct Times {
    kill: Instant,
    down: Instant,
    restart: Instant,
    /// The last status poll that still saw b0 down was sent then: the ring had no b0 yet.
    still_down: Instant,
    up: Instant,
    log: String,
    flows: String,
}

impl Default for Times {
    fn default() -> Self {
        let now = Instant::now();
        Self {
            kill: now,
            down: now,
            restart: now,
            still_down: now,
            up: now,
            log: String::new(),
            flows: String::new(),
        }
    }
}

impl Times {
    /// What the client saw: nothing failed before the stop or after the verdict, nothing
    /// reached b0 while it was down, and b0 got connections again after recovering.
    fn check(&self, attempts: &[Attempt]) {
        let during = |from: Instant, to: Option<Instant>| -> Vec<&Attempt> {
            attempts
                .iter()
                .filter(|a| a.start >= from && to.is_none_or(|to| a.start < to))
                .collect()
        };
        let failed = |list: &[&Attempt]| list.iter().filter(|a| a.result.is_err()).count();
        // Over before the stop; an attempt under way when the server died may be reset.
        let (before, window): (Vec<&Attempt>, Vec<&Attempt>) = attempts
            .iter()
            .filter(|a| a.start < self.down)
            .partition(|a| a.end < self.kill);
        let down = during(self.down, Some(self.restart));
        let coming_back = during(self.restart, Some(self.up));
        let after = during(self.up, None);
        println!(
            "measured: {} attempts: {} before the stop, {} between the stop and the verdict \
             ({} failed: b0's share), {} while down, {} while b0 restarted ({} surely before \
             it was back), {} after",
            attempts.len(),
            before.len(),
            window.len(),
            failed(&window),
            down.len(),
            coming_back.len(),
            coming_back
                .iter()
                .filter(|a| a.end <= self.still_down)
                .count(),
            after.len()
        );
        // From the verdict on, nothing may fail: not while b0 is down, not while it returns.
        let late = during(self.down, None);
        for (list, when) in [
            (&before, "before the server stopped"),
            (&late, "after b0 was marked down"),
        ] {
            let failures: Vec<&&Attempt> = list.iter().filter(|a| a.result.is_err()).collect();
            if failures.is_empty() {
                continue;
            }
            let t0 = attempts[0].start;
            for a in &failures {
                println!(
                    "failed attempt at +{:?}..+{:?} from port {:?}: {:?}",
                    a.start - t0,
                    a.end - t0,
                    a.port,
                    a.result
                );
            }
            println!("daemon log:\n{}\nflows:\n{}", self.log, self.flows);
            panic!("{} connections failed {when}", failures.len());
        }
        assert!(
            down.len() >= 20,
            "too few attempts while down: {}",
            down.len()
        );
        // While b0 restarts it serves again, but it is not back in the ring until the daemon
        // says so: connections over before the last poll that saw it down did not reach it.
        let out_of_ring: Vec<&&Attempt> = coming_back
            .iter()
            .filter(|a| a.end <= self.still_down)
            .collect();
        assert!(
            !out_of_ring.iter().any(|a| a.result.as_deref() == Ok("b0")),
            "a new connection reached b0 before it was back up"
        );
        assert!(after.len() >= 20, "too few attempts after recovery");
        assert!(
            after.iter().any(|a| a.result.as_deref() == Ok("b0")),
            "b0 got none of {} connections after coming back",
            after.len()
        );
    }
}

#[test]
fn tcp_check_takes_a_stopped_server_out_and_back_without_failing_a_client() {
    stop_and_restart(TCP_CHECK);
}

#[test]
fn http_check_takes_a_stopped_server_out_and_back_without_failing_a_client() {
    stop_and_restart(HTTP_CHECK);
}

#[test]
fn http_503_takes_a_backend_out_while_tcp_still_connects() {
    let Setup {
        lab, daemon, files, ..
    } = &lab_with_daemon(HTTP_CHECK);

    files.set(0, 503);
    let Waited { took, status, .. } = wait_for(daemon, "b0 down", |s| is_down(backend(s, 0)));
    assert_within("503 -> status down", took, documented_bound(FALL));
    let failure = backend(&status, 0)["last_failure"].as_str().unwrap_or("");
    assert!(failure.contains("503"), "last_failure: {failure:?}");

    // The server still accepts connections: only the check's status is bad.
    let (direct, http) = lab
        .client
        .ns
        .enter(|| {
            (
                who(addr(backend4(0), 80)).unwrap(),
                http_get(addr(backend4(0), 80), "/healthz").unwrap().0,
            )
        })
        .unwrap();
    assert_eq!((direct.as_str(), http), ("b0", 503));

    let names = spread(lab, 60);
    assert!(
        names.iter().all(|n| matches!(n, Ok(n) if n != "b0")),
        "while b0 answers 503: {names:?}"
    );

    files.set(0, 200);
    let took = wait_for(daemon, "b0 up", |s| is_up(backend(s, 0))).took;
    assert_within("200 -> status up", took, documented_bound(RISE));
    let names = spread(lab, 60);
    assert!(names.iter().all(Result::is_ok), "{names:?}");
    assert!(
        names.iter().any(|n| n.as_deref() == Ok("b0")),
        "b0 got none of 60 connections after recovering: {names:?}"
    );
}

fn all_down(s: &Value) -> bool {
    (0..BACKENDS).all(|n| backend(s, n)["health"] == "down")
}

#[test]
fn on_all_down_keep_serves_the_last_healthy_set() {
    // "keep" is the default.
    let Setup {
        lab, daemon, files, ..
    } = &lab_with_daemon(HTTP_CHECK);
    // Every check fails while every server still serves.
    files.set_all(503);
    let Waited { took, status, .. } = wait_for(daemon, "every backend down", all_down);
    println!("measured: all 503 -> all down: {} ms", took.as_millis());
    let kept: BTreeSet<String> = (0..BACKENDS)
        .filter(|&n| backend(&status, n)["effective_weight"].as_u64() > Some(0))
        .map(|n| format!("b{n}"))
        .collect();
    assert!(
        !kept.is_empty(),
        "keep left no backend in the ring: {status}"
    );
    assert_eq!(status["vips"][0]["available"], kept.len(), "{status}");

    // New connections still succeed, on the kept set only.
    for name in spread(lab, 60) {
        match name {
            Ok(name) => assert!(kept.contains(&name), "{name} is not in {kept:?}"),
            Err(e) => panic!("a connection failed with every backend down and keep: {e}"),
        }
    }
    // Every backend is exported down although traffic still flows.
    wait_metrics(lab, "backends exported down", |m| {
        (0..BACKENDS).all(|n| {
            let b = backend4(n).to_string();
            sample(m, "xdplb_backend_up", &[("vip", "web"), ("backend", &b)]) == Some(0.0)
        })
    });

    files.set_all(200);
    wait_for(daemon, "every backend up", |s| {
        (0..BACKENDS).all(|n| is_up(backend(s, n)))
    });
    let names = spread(lab, 60);
    assert!(names.iter().all(Result::is_ok), "{names:?}");
}

#[test]
fn on_all_down_drop_drops_new_flows() {
    let Setup {
        lab, daemon, files, ..
    } = &lab_with_daemon(&format!("{HTTP_CHECK}\non_all_down = \"drop\""));
    files.set_all(503);
    let took = wait_for(daemon, "every backend down and out", |s| {
        all_down(s) && s["vips"][0]["available"] == 0
    })
    .took;
    println!("measured: all 503 -> all down: {} ms", took.as_millis());

    // SYNs are dropped: connecting times out (a refusal would mean a backend answered).
    const ATTEMPTS: usize = 5;
    let connect_timeout = Duration::from_millis(300);
    let results = lab
        .client
        .ns
        .enter(|| {
            (0..ATTEMPTS)
                .map(|_| TcpStream::connect_timeout(&vip(), connect_timeout).map(|_| ()))
                .collect::<Vec<_>>()
        })
        .unwrap();
    for result in &results {
        match result {
            Err(e) if e.kind() == ErrorKind::TimedOut => {}
            other => panic!("expected a timeout with on_all_down = drop, got {other:?}"),
        }
    }
    // Counted as dropped for lack of a backend.
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let stats: Value =
            serde_json::from_str(&daemon.cli(&["stats", "--json"]).unwrap()).unwrap();
        let no_backend = stats["global"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "drop_no_backend")
            .and_then(|c| c["total"].as_u64());
        let not_forwarded = stats["vips"][0]["totals"]["not_forwarded"].as_u64();
        if no_backend >= Some(ATTEMPTS as u64) && not_forwarded >= Some(ATTEMPTS as u64) {
            break;
        }
        assert!(Instant::now() < deadline, "drops not counted: {stats}");
        thread::sleep(Duration::from_millis(100));
    }

    // One backend recovering takes every new flow.
    files.set(1, 200);
    wait_for(daemon, "b1 up", |s| is_up(backend(s, 1)));
    let names = spread(lab, 30);
    assert!(names.iter().all(|n| n.as_deref() == Ok("b1")), "{names:?}");
}
