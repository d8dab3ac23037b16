//! Checks against real loopback servers; intervals of 50-100 ms keep each test under a second or
//! two, and every wait is bounded.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    slice,
    sync::{
        atomic::{AtomicU16, AtomicUsize, Ordering::SeqCst},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc::{self, UnboundedReceiver},
    task::JoinHandle,
    time::{sleep, timeout},
};

use super::*;
use crate::model::{Forwarding, OnAllDown, Protocol, VipAddr};

const INTERVAL: Duration = Duration::from_millis(50);
/// Longest wait for anything the checks should cause.
const PATIENCE: Duration = Duration::from_secs(3);

/// What the test server does with each connection.
#[derive(Clone, Copy)]
enum Mode {
    /// Accept and close.
    Accept,
    /// Answer an HTTP request with `Server::status`.
    Http,
    /// Accept and never answer.
    Silent,
}

struct Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    status: Arc<AtomicU16>,
    last_request: Arc<Mutex<String>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(mode: Mode) -> Self {
        Self::bind("127.0.0.1:0".parse().unwrap(), mode)
            .await
            .unwrap()
    }

    async fn bind(addr: SocketAddr, mode: Mode) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let status = Arc::new(AtomicU16::new(200));
        let last_request = Arc::new(Mutex::new(String::new()));
        let task = tokio::spawn({
            let (accepted, status, last_request) =
                (accepted.clone(), status.clone(), last_request.clone());
            async move {
                // Silent connections stay open until the server stops.
                let mut held = Vec::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    accepted.fetch_add(1, SeqCst);
                    match mode {
                        Mode::Accept => drop(stream),
                        Mode::Silent => held.push(stream),
                        Mode::Http => {
                            tokio::spawn(serve(stream, status.clone(), last_request.clone()));
                        }
                    }
                }
            }
        });
        Ok(Self {
            addr,
            accepted,
            status,
            last_request,
            task,
        })
    }

    fn accepted(&self) -> usize {
        self.accepted.load(SeqCst)
    }

    fn last_request(&self) -> String {
        self.last_request.lock().unwrap().clone()
    }

    /// Closes the listener, so later connections are refused.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Waits (bounded) until at least `n` connections were accepted.
    async fn wait_for_connections(&self, n: usize) {
        timeout(PATIENCE, async {
            while self.accepted() < n {
                sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("fewer than {n} connections within {PATIENCE:?}"));
    }
}

async fn serve(mut stream: TcpStream, status: Arc<AtomicU16>, last_request: Arc<Mutex<String>>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    let read_headers = async {
        while !request.ends_with(b"\r\n\r\n") && request.len() < 4096 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        true
    };
    // TCP checks connect and reset without sending anything.
    if !matches!(timeout(PATIENCE, read_headers).await, Ok(true)) {
        return;
    }
    *last_request.lock().unwrap() = String::from_utf8_lossy(&request).into_owned();
    let response = format!(
        "HTTP/1.1 {} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        status.load(SeqCst)
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

fn spec(kind: CheckKind, rise: u32, fall: u32) -> HealthSpec {
    HealthSpec {
        kind,
        port: None,
        interval: INTERVAL,
        timeout: Duration::from_millis(500),
        rise,
        fall,
        on_all_down: OnAllDown::Keep,
    }
}

fn http(path: &str, expect_status: u16, host: Option<&str>) -> CheckKind {
    CheckKind::Http {
        path: path.into(),
        expect_status,
        host: host.map(Into::into),
        tls: None,
    }
}

fn backend(addr: IpAddr, health_port: Option<u16>) -> BackendSpec {
    BackendSpec {
        port: None,
        addr,
        weight: 1,
        mac: None,
        health_port,
    }
}

fn vip(name: &str, port: u16, health: HealthSpec, backends: Vec<BackendSpec>) -> VipSpec {
    VipSpec {
        name: name.into(),
        vip: VipAddr {
            addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            port,
            protocol: Protocol::Tcp,
        },
        forwarding: Forwarding::Dsr,
        scheduler: Default::default(),
        affinity: Default::default(),
        ring_size: 251,
        health,
        backends,
        acl: Default::default(),
        limits: None,
        announce: Default::default(),
    }
}

/// A VIP on the server's port with the server as its only backend.
fn vip_for(server: SocketAddr, health: HealthSpec) -> VipSpec {
    vip(
        "web",
        server.port(),
        health,
        vec![backend(server.ip(), None)],
    )
}

fn ignore_checks() -> CheckObserver {
    Arc::new(|_, _, _, _| {})
}

async fn next_event(events: &mut UnboundedReceiver<HealthEvent>) -> HealthEvent {
    timeout(PATIENCE, events.recv())
        .await
        .unwrap_or_else(|_| panic!("no health event within {PATIENCE:?}"))
        .expect("event channel closed")
}

#[tokio::test]
async fn tcp_check_rises_then_falls_with_refused() {
    let server = Server::start(Mode::Accept).await;
    let successes = Arc::new(AtomicUsize::new(0));
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut monitor = HealthMonitor::new(tx, {
        let successes = successes.clone();
        Arc::new(move |_, _, _, ok| {
            if ok {
                successes.fetch_add(1, SeqCst);
            }
        })
    });
    let web = vip_for(server.addr, spec(CheckKind::Tcp, 3, 2));
    let backend = &web.backends[0];
    monitor.sync(slice::from_ref(&web));
    assert_eq!(monitor.status(&web, backend).state, State::Unknown);

    let up = next_event(&mut events).await;
    assert_eq!(
        (up.from, up.to, up.reason.as_deref()),
        (State::Unknown, State::Up, None)
    );
    assert!(up.applies_to(&web, backend));
    // The observer ran before the state machine saw the check.
    assert!(
        successes.load(SeqCst) >= 3,
        "up after fewer than rise checks"
    );
    let status = monitor.status(&web, backend);
    assert_eq!(status.state, State::Up);
    assert!(status.last_latency.is_some() && status.last_failure.is_none());
    let up_since = status.since.unwrap();

    server.stop().await;
    let down = next_event(&mut events).await;
    assert_eq!((down.from, down.to), (State::Up, State::Down));
    let reason = down.reason.unwrap();
    assert!(reason.contains("refused"), "{reason}");
    let status = monitor.status(&web, backend);
    assert_eq!(status.state, State::Down);
    assert!(status.since.unwrap() > up_since);
    assert_eq!(status.last_failure.unwrap().reason, reason);
}

#[tokio::test]
async fn http_check_follows_the_status_while_tcp_still_connects() {
    let server = Server::start(Mode::Http).await;
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut monitor = HealthMonitor::new(tx, ignore_checks());
    let web = vip_for(server.addr, spec(http("/healthz", 200, None), 2, 2));
    let raw = vip_for(server.addr, spec(CheckKind::Tcp, 2, 2));
    let backend = &web.backends[0];
    monitor.sync(&[web.clone(), raw.clone()]);
    assert_eq!(
        monitor.targets().count(),
        2,
        "different checks, different targets"
    );

    for _ in 0..2 {
        assert_eq!(next_event(&mut events).await.to, State::Up);
    }
    let request = server.last_request();
    assert!(
        request.starts_with("GET /healthz HTTP/1.1\r\n"),
        "{request:?}"
    );
    for header in [
        format!("Host: {}", server.addr),
        "User-Agent: xdplb-health".into(),
        "Connection: close".into(),
    ] {
        assert!(
            request.contains(&format!("\r\n{header}\r\n")),
            "{request:?}"
        );
    }

    server.status.store(503, SeqCst);
    let down = next_event(&mut events).await;
    assert_eq!(Some(&down.target), CheckTarget::of(&web, backend).as_ref());
    assert_eq!(
        (down.to, down.reason.as_deref()),
        (State::Down, Some("HTTP 503"))
    );
    assert!(!down.applies_to(&raw, backend));
    // The TCP check of the same port kept succeeding.
    sleep(INTERVAL * 3).await;
    assert!(events.try_recv().is_err(), "unexpected transition");
    assert_eq!(monitor.status(&raw, backend).state, State::Up);
    let status = monitor.status(&web, backend);
    assert_eq!(status.state, State::Down);
    assert_eq!(status.last_failure.unwrap().reason, "HTTP 503");
}

#[tokio::test]
async fn http_check_over_ipv6_with_host_and_expected_status() {
    let Ok(server) = Server::bind("[::1]:0".parse().unwrap(), Mode::Http).await else {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    };
    server.status.store(204, SeqCst);
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut monitor = HealthMonitor::new(tx, ignore_checks());
    let web = vip_for(
        server.addr,
        spec(http("/ready?full=1", 204, Some("svc.example")), 1, 1),
    );
    monitor.sync(slice::from_ref(&web));
    assert_eq!(next_event(&mut events).await.to, State::Up);
    let request = server.last_request();
    assert!(
        request.starts_with("GET /ready?full=1 HTTP/1.1\r\nHost: svc.example\r\n"),
        "{request:?}"
    );
    // The expected status is the only good one, even a 200.
    server.status.store(200, SeqCst);
    let down = next_event(&mut events).await;
    assert_eq!(down.reason.as_deref(), Some("HTTP 200"));
}

#[tokio::test]
async fn silent_server_times_out() {
    let server = Server::start(Mode::Silent).await;
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut monitor = HealthMonitor::new(tx, ignore_checks());
    let mut health = spec(http("/", 200, None), 1, 1);
    health.interval = Duration::from_millis(150);
    health.timeout = Duration::from_millis(100);
    let web = vip_for(server.addr, health);
    monitor.sync(slice::from_ref(&web));

    let down = next_event(&mut events).await;
    assert_eq!((down.from, down.to), (State::Unknown, State::Down));
    assert_eq!(
        down.reason.as_deref(),
        Some("HTTP: timeout waiting for the status line")
    );
    let latency = monitor.status(&web, &web.backends[0]).last_latency.unwrap();
    assert!(latency >= Duration::from_millis(100), "{latency:?}");
    assert!(server.accepted() >= 1, "the connection itself succeeded");
}

#[tokio::test]
async fn a_backend_shared_by_vips_is_probed_once() {
    let server = Server::start(Mode::Accept).await;
    let (tx, mut events) = mpsc::unbounded_channel();
    let observed_vips = Arc::new(Mutex::new(Vec::new()));
    let mut monitor = HealthMonitor::new(tx, {
        let observed_vips = observed_vips.clone();
        Arc::new(move |_, vips, _, _| *observed_vips.lock().unwrap() = vips.to_vec())
    });
    let ip = server.addr.ip();
    let interval = Duration::from_millis(100);
    // The same check reached two ways (the VIP's health port, a backend override), with
    // different thresholds: one target, two state machines.
    let mut health = spec(CheckKind::Tcp, 1, 1);
    health.interval = interval;
    health.port = Some(server.addr.port());
    let a = vip("a", 80, health.clone(), vec![backend(ip, None)]);
    health.port = None;
    health.rise = 2;
    let b = vip(
        "b",
        443,
        health,
        vec![backend(ip, Some(server.addr.port()))],
    );
    let vips = [a.clone(), b.clone()];
    monitor.sync(&vips);
    assert_eq!(monitor.targets().count(), 1);

    let period = Duration::from_secs(1);
    sleep(period).await;
    // One stream: about period / interval = 10 connections; two streams would make about 20.
    let connections = server.accepted();
    assert!((5..=12).contains(&connections), "{connections} connections");

    let mut ups = [next_event(&mut events).await, next_event(&mut events).await];
    ups.sort_by_key(|e| e.thresholds.rise);
    assert!(ups.iter().all(|e| e.to == State::Up));
    // Each event names the VIPs it concerns; each check is reported once for both.
    assert_eq!(
        (&*ups[0].vips, &*ups[1].vips),
        (&["a".into()][..], &["b".into()][..])
    );
    assert_eq!(*observed_vips.lock().unwrap(), ["a", "b"]);
    assert!(ups[0].applies_to(&a, &a.backends[0]) && !ups[0].applies_to(&b, &b.backends[0]));
    assert!(ups[1].applies_to(&b, &b.backends[0]));
    let since = monitor.status(&b, &b.backends[0]).since;

    // Syncing the same VIPs again keeps the running check and its state.
    monitor.sync(&vips);
    assert_eq!(monitor.targets().count(), 1);
    let status = monitor.status(&b, &b.backends[0]);
    assert_eq!((status.state, status.since), (State::Up, since));
    sleep(INTERVAL * 3).await;
    assert!(events.try_recv().is_err(), "unexpected transition");

    // Dropping one of the VIPs keeps the target and the other VIP's state.
    let a_since = monitor.status(&a, &a.backends[0]).since;
    monitor.sync(slice::from_ref(&a));
    assert_eq!(monitor.targets().count(), 1);
    assert_eq!(monitor.status(&a, &a.backends[0]).since, a_since);
    assert_eq!(
        monitor.status(&b, &b.backends[0]),
        BackendHealth::unchecked(State::Unknown)
    );
}

#[tokio::test]
async fn removing_a_vip_stops_its_checks() {
    let (kept_server, gone_server) = (
        Server::start(Mode::Accept).await,
        Server::start(Mode::Accept).await,
    );
    let (tx, _events) = mpsc::unbounded_channel();
    let mut monitor = HealthMonitor::new(tx, ignore_checks());
    let kept = vip_for(kept_server.addr, spec(CheckKind::Tcp, 1, 1));
    let gone = vip_for(gone_server.addr, spec(CheckKind::Tcp, 1, 1));
    monitor.sync(&[kept.clone(), gone.clone()]);
    gone_server.wait_for_connections(2).await;

    monitor.sync(slice::from_ref(&kept));
    assert_eq!(monitor.targets().count(), 1);
    assert_eq!(
        monitor.status(&gone, &gone.backends[0]),
        BackendHealth::unchecked(State::Unknown)
    );
    // Let a connection that was already under way land.
    sleep(INTERVAL * 2).await;
    let (kept_before, gone_before) = (kept_server.accepted(), gone_server.accepted());
    sleep(INTERVAL * 6).await;
    assert_eq!(
        gone_server.accepted(),
        gone_before,
        "removed target still probed"
    );
    assert!(kept_server.accepted() > kept_before, "kept target stopped");
}

#[tokio::test]
async fn dropping_the_monitor_stops_every_check() {
    let server = Server::start(Mode::Accept).await;
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut monitor = HealthMonitor::new(tx, ignore_checks());
    monitor.sync(&[vip_for(server.addr, spec(CheckKind::Tcp, 1, 1))]);
    server.wait_for_connections(2).await;

    drop(monitor);
    // Each task holds a sender: the channel closes once they are all gone.
    timeout(PATIENCE, async { while events.recv().await.is_some() {} })
        .await
        .expect("check tasks outlived the monitor");
    sleep(INTERVAL * 2).await;
    let before = server.accepted();
    sleep(INTERVAL * 6).await;
    assert_eq!(server.accepted(), before);
}

#[tokio::test]
async fn kind_none_is_up_without_a_task() {
    let (tx, _events) = mpsc::unbounded_channel();
    let mut monitor = HealthMonitor::new(tx, ignore_checks());
    let web = vip(
        "web",
        80,
        HealthSpec::default(),
        vec![backend(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), None)],
    );
    monitor.sync(slice::from_ref(&web));
    assert_eq!(monitor.targets().count(), 0);
    assert_eq!(
        monitor.status(&web, &web.backends[0]),
        BackendHealth::unchecked(State::Up)
    );
}

#[tokio::test]
async fn a_backend_presumed_down_needs_rise_successes() {
    let server = Server::start(Mode::Accept).await;
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut monitor = HealthMonitor::new(tx, ignore_checks());
    let web = vip_for(server.addr, spec(CheckKind::Tcp, 2, 2));
    let backend = &web.backends[0];
    monitor.presume_down(&web, backend);
    monitor.sync(slice::from_ref(&web));
    let status = monitor.status(&web, backend);
    assert_eq!(
        status.state,
        State::Down,
        "down from the start, not unknown"
    );
    assert!(status.last_failure.unwrap().reason.contains("restart"));
    let up = next_event(&mut events).await;
    assert_eq!((up.from, up.to), (State::Down, State::Up));
    // The presumption is used once: a later new check of another VIP starts unknown.
    let other = vip(
        "other",
        server.addr.port(),
        spec(CheckKind::Tcp, 5, 2),
        web.backends.clone(),
    );
    monitor.sync(&[web.clone(), other.clone()]);
    assert_eq!(monitor.status(&other, backend).state, State::Unknown);
}

#[tokio::test]
async fn tuning_a_check_keeps_a_down_backend_down() {
    let server = Server::start(Mode::Accept).await;
    let addr = server.addr;
    server.stop().await;
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut monitor = HealthMonitor::new(tx, ignore_checks());
    let web = vip_for(addr, spec(CheckKind::Tcp, 2, 1));
    monitor.sync(slice::from_ref(&web));
    let down = next_event(&mut events).await;
    assert_eq!(down.to, State::Down);
    // Only the check's parameters change: a new target on the same address and port.
    let mut tuned = web.clone();
    tuned.health.timeout = Duration::from_millis(300);
    tuned.health.kind = http("/health", 200, None);
    monitor.sync(slice::from_ref(&tuned));
    assert_eq!(monitor.targets().count(), 1);
    let status = monitor.status(&tuned, &tuned.backends[0]);
    assert_eq!(status.state, State::Down, "kept across the reload");
    // New thresholds are a new state machine: unknown.
    let mut rethought = tuned.clone();
    rethought.health.rise = 3;
    monitor.sync(slice::from_ref(&rethought));
    assert_eq!(
        monitor.status(&rethought, &rethought.backends[0]).state,
        State::Unknown
    );
}
