//! Connection stats in a lab: the daemon's /metrics endpoint scraped from the client's
//! namespace with a plain HTTP/1.1 GET and parsed with `prometheus-parse`, `xdplb stats` and
//! `xdplb flows`, all checked against traffic the test generated and counted itself.
//!
//! About the parser: the daemon answers OpenMetrics text. prometheus-parse reads the
//! Prometheus text format; it skips the final `# EOF` line by itself (the line matches none of
//! its rules, so nothing is stripped), but it does not know that an OpenMetrics counter family
//! `# TYPE x counter` has samples named `x_total`, nor the `info` type: those samples come out
//! untyped. Values are unaffected; the declared types are checked on the raw text instead.

use anyhow::{Context as _, Result};
use prometheus_parse::{Sample, Scrape, Value as Metric};
use serde_json::Value;
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};
use xdplb_tests::lab::{addr, backend4, stream, who, Daemon, Lab, Process, CLIENT4, LB4};

const WEB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const DNS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
const BACKENDS: usize = 3;
/// Configured weights of the web VIP's backends (the dns VIP, least-conn, uses the default,
/// 100).
const WEB_WEIGHTS: [u32; BACKENDS] = [100, 100, 50];
const METRICS_PORT: u16 = 9650;
const STATS_INTERVAL: Duration = Duration::from_millis(500);
/// Longest any wait polls before failing.
const WAIT_LIMIT: Duration = Duration::from_secs(20);
/// The answer of a lab server to any datagram is its name; we send "NAME": 4 bytes of
/// payload, so every datagram is a 32-byte IPv4 packet (20 + 8 + 4), as the LB counts bytes.
const DATAGRAM: &[u8] = b"NAME";
const DATAGRAM_IP_BYTES: u64 = 20 + 8 + 4;

fn web() -> SocketAddr {
    addr(WEB, 80)
}

fn dns() -> SocketAddr {
    addr(DNS, 53)
}

fn metrics_addr() -> SocketAddr {
    addr(LB4, METRICS_PORT)
}

fn services() -> String {
    let mut text = format!(
        "[[vip]]\nname = \"web\"\naddress = \"{WEB}\"\nport = 80\nring_size = 1021\n\
         [vip.health]\nkind = \"tcp\"\ninterval = \"300ms\"\ntimeout = \"200ms\"\nrise = 1\n\
         fall = 2\n"
    );
    for (n, weight) in WEB_WEIGHTS.iter().enumerate() {
        text.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\nweight = {weight}\n",
            backend4(n)
        ));
    }
    text.push_str(&format!(
        "[[vip]]\nname = \"dns\"\naddress = \"{DNS}\"\nport = 53\nprotocol = \"udp\"\n\
         scheduler = \"least-conn\"\nring_size = 1021\n"
    ));
    for n in 0..BACKENDS {
        text.push_str(&format!("[[vip.backend]]\naddress = \"{}\"\n", backend4(n)));
    }
    text
}

/// Fields drop in order: daemon, servers, lab.
struct Setup {
    daemon: Daemon,
    _servers: Vec<Process>,
    lab: Lab,
}

/// A lab whose backends serve TCP on 80 and UDP on 53, and the daemon with the metrics
/// endpoint on the LB's lab address, every web backend checked up.
fn setup() -> Setup {
    let lab = Lab::new(BACKENDS).expect("lab");
    let mut servers = Vec::new();
    for (n, host) in lab.backends.iter().enumerate() {
        let name = format!("b{n}");
        servers.push(host.serve(&name, "0.0.0.0:80", "tcp").unwrap());
        servers.push(host.serve(&name, "0.0.0.0:53", "udp").unwrap());
    }
    // Servers first, so the first health checks find them.
    lab.client
        .ns
        .enter(|| {
            for n in 0..BACKENDS {
                let deadline = Instant::now() + WAIT_LIMIT;
                while who(addr(backend4(n), 80)).is_err() {
                    assert!(Instant::now() < deadline, "b{n} does not serve");
                    thread::sleep(Duration::from_millis(20));
                }
            }
        })
        .unwrap();
    // Announcing on (into a table of the lab's LB namespace), so xdplb_vip_announced is served.
    let settings = format!(
        "metrics_listen = \"{}\"\nstats_interval = \"{}ms\"\n[daemon.announce]\ntable = 4244\n",
        metrics_addr(),
        STATS_INTERVAL.as_millis()
    );
    let daemon = Daemon::start(&lab, &settings, &services()).expect("daemon");
    daemon
        .wait_status("every web backend up", |s| {
            s["vips"][0]["backends"]
                .as_array()
                .is_some_and(|b| b.iter().all(|b| b["health"] == "up"))
        })
        .unwrap();
    Setup {
        daemon,
        _servers: servers,
        lab,
    }
}

/// A response to [`http_get`].
struct Response {
    status: u16,
    /// Header lines, names lowercased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` over HTTP/1.1 from the current namespace (bounded by timeouts), reading the
/// body by Content-Length, chunks, or to the end.
fn http_get(to: SocketAddr, path: &str) -> Result<Response> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nUser-Agent: xdplb-tests\r\nConnection: close\r\n\r\n"
    )?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("status line {line:?}"))?
        .parse()?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').context("header without ':'")?;
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut response = Response {
        status,
        headers,
        body: String::new(),
    };
    let mut body = Vec::new();
    if response.header("transfer-encoding") == Some("chunked") {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16)?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            reader.read_line(&mut line)?;
        }
    } else if let Some(length) = response.header("content-length") {
        body.resize(length.parse()?, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    response.body = String::from_utf8(body)?;
    Ok(response)
}

/// One scrape of /metrics: the raw text and its parse.
struct Metrics {
    text: String,
    scrape: Scrape,
}

impl Metrics {
    /// The samples named `name` (histograms: by their base name).
    fn all(&self, name: &str) -> Vec<&Sample> {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .collect()
    }

    /// The value of sample `name` with exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.all(name)
            .into_iter()
            .find(|s| {
                s.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            })
            .map(value)
    }

    /// Like [`get`](Self::get) but the sample must exist.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{}", self.text))
    }

    fn backend(&self, name: &str, vip: &str, n: usize) -> f64 {
        let backend = backend4(n).to_string();
        self.value(name, &[("vip", vip), ("backend", &backend)])
    }

    fn vip(&self, name: &str, vip: &str) -> f64 {
        self.value(name, &[("vip", vip)])
    }
}

/// A single-valued sample's value; prometheus-parse reads OpenMetrics counters as untyped.
fn value(sample: &Sample) -> f64 {
    match sample.value {
        Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => v,
        ref other => panic!("{} is not single-valued: {other:?}", sample.metric),
    }
}

/// Scrapes /metrics from the client's namespace.
fn scrape(lab: &Lab) -> Metrics {
    let response = lab
        .client
        .ns
        .enter(|| http_get(metrics_addr(), "/metrics"))
        .unwrap()
        .expect("GET /metrics");
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        response.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(response.body.ends_with("# EOF\n"), "{}", response.body);
    let scrape = Scrape::parse(response.body.lines().map(|l| Ok(l.to_string()))).unwrap();
    Metrics {
        text: response.body,
        scrape,
    }
}

/// Scrapes until `ready` (the next stats samples arriving), at most `WAIT_LIMIT`.
fn wait_metrics(lab: &Lab, what: &str, ready: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let metrics = scrape(lab);
        if ready(&metrics) {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            metrics.text
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn stats_json(daemon: &Daemon) -> Value {
    serde_json::from_str(&daemon.cli(&["stats", "--json"]).unwrap()).unwrap()
}

fn find<'a>(list: &'a Value, key: &str, value: &str) -> &'a Value {
    list.as_array()
        .and_then(|l| l.iter().find(|v| v[key] == value))
        .unwrap_or_else(|| panic!("no {key} = {value} in {list}"))
}

/// Runs `during(serving backend's index)` while a transfer of `bytes` at `rate` runs from
/// the client to the web VIP, then checks the transfer got every byte.
fn with_transfer<R>(lab: &Lab, bytes: u64, rate: u64, during: impl FnOnce(usize) -> R) -> R {
    let (tx, rx) = mpsc::channel();
    thread::scope(|scope| {
        let transfer = scope.spawn(|| {
            lab.client
                .ns
                .enter(|| {
                    stream(web(), bytes, rate, |name| {
                        tx.send(name.to_string()).unwrap()
                    })
                })
                .unwrap()
        });
        // Bounded by the transfer's own timeouts (connect 2 s, read 10 s).
        let serving = rx
            .recv_timeout(Duration::from_secs(15))
            .expect("transfer started");
        let result = during(serving[1..].parse().unwrap());
        let (name, received) = transfer.join().unwrap().expect("transfer broke");
        assert_eq!((name, received), (serving, bytes));
        result
    })
}

#[test]
fn udp_datagrams_are_counted_exactly_per_backend() {
    const SOCKETS: usize = 20;
    const PER_SOCKET: usize = 5;
    const N: u64 = (SOCKETS * PER_SOCKET) as u64;
    let mut setup = setup();
    let Setup { lab, daemon, .. } = &mut setup;
    let lab = &*lab;
    // While TCP traffic runs on the other VIP.
    let (answers, flows) = with_transfer(lab, 1_500_000, 500_000, |_| {
        lab.client
            .ns
            .enter(|| {
                // One socket per flow, all open at once so their source ports differ.
                let sockets: Vec<UdpSocket> = (0..SOCKETS)
                    .map(|_| {
                        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
                        socket
                            .set_read_timeout(Some(Duration::from_secs(2)))
                            .unwrap();
                        socket
                    })
                    .collect();
                let mut answers: BTreeMap<String, u64> = BTreeMap::new();
                let mut flows: BTreeMap<String, u64> = BTreeMap::new();
                for socket in &sockets {
                    let mut first = None;
                    for _ in 0..PER_SOCKET {
                        // One datagram, one answer: nothing queues, nothing is lost.
                        socket.send_to(DATAGRAM, dns()).unwrap();
                        let mut buf = [0u8; 64];
                        // (From the backend's own address: the lab server answers from its
                        // socket bound to 0.0.0.0, so the kernel picks the source.)
                        let (n, _) = socket.recv_from(&mut buf).expect("an answer");
                        let name = String::from_utf8_lossy(&buf[..n]).into_owned();
                        *answers.entry(name.clone()).or_default() += 1;
                        // A flow sticks to its backend.
                        assert_eq!(first.get_or_insert(name.clone()), &name);
                    }
                    *flows.entry(first.unwrap()).or_default() += 1;
                }
                (answers, flows)
            })
            .unwrap()
    });
    assert_eq!(answers.values().sum::<u64>(), N);
    println!("measured: answers per backend {answers:?}, flows {flows:?}");

    let metrics = wait_metrics(lab, "the datagrams sampled", |m| {
        m.get("xdplb_vip_packets_total", &[("vip", "dns")]) >= Some(N as f64)
    });
    let check = |metrics: &Metrics| {
        assert_eq!(metrics.vip("xdplb_vip_packets_total", "dns"), N as f64);
        assert_eq!(
            metrics.vip("xdplb_vip_bytes_total", "dns"),
            (N * DATAGRAM_IP_BYTES) as f64
        );
        assert_eq!(
            metrics.vip("xdplb_vip_new_flows_total", "dns"),
            SOCKETS as f64
        );
        assert_eq!(metrics.vip("xdplb_vip_dropped_total", "dns"), 0.0);
        let mut sum = 0.0;
        for n in 0..BACKENDS {
            let name = format!("b{n}");
            let answered = answers.get(&name).copied().unwrap_or(0);
            let packets = metrics.backend("xdplb_backend_packets_total", "dns", n);
            assert_eq!(packets, answered as f64, "{name}: packets vs answers");
            assert_eq!(
                metrics.backend("xdplb_backend_bytes_total", "dns", n),
                (answered * DATAGRAM_IP_BYTES) as f64,
                "{name}: bytes"
            );
            assert_eq!(
                metrics.backend("xdplb_backend_new_flows_total", "dns", n),
                flows.get(&name).copied().unwrap_or(0) as f64,
                "{name}: new flows"
            );
            sum += packets;
        }
        assert_eq!(sum, N as f64);
    };
    check(&metrics);
    // Two samples later nothing else was counted.
    thread::sleep(STATS_INTERVAL * 2 + Duration::from_millis(100));
    check(&scrape(lab));

    // A restart adopts the pinned maps: the totals continue from the kernel's values.
    daemon.kill();
    daemon.restart().unwrap();
    let metrics = wait_metrics(lab, "the first sample after the restart", |m| {
        m.get("xdplb_vip_packets_total", &[("vip", "dns")])
            .is_some()
    });
    check(&metrics);
}

#[test]
fn a_drained_backend_gets_no_new_flows_and_keeps_counting_its_established_one() {
    const CONNECTIONS: usize = 60;
    let Setup { lab, daemon, .. } = &setup();
    // 4 MB at 500 kB/s: 8 s, longer than everything below.
    let drained = with_transfer(lab, 4_000_000, 500_000, |drained| {
        let address = backend4(drained).to_string();
        let labels = [("vip", "web"), ("backend", address.as_str())];
        daemon.cli(&["drain", "web", &address]).unwrap();
        let before = wait_metrics(lab, "the drain exported", |m| {
            m.get("xdplb_backend_drained", &labels) == Some(1.0)
                && m.get("xdplb_backend_weight", &labels) == Some(0.0)
        });
        assert!(
            before.value("xdplb_backend_active_flows", &labels) >= 1.0,
            "the transfer is an active flow of b{drained}"
        );
        assert_eq!(
            before.value("xdplb_backend_drain_complete", &labels),
            0.0,
            "drain complete while the transfer runs"
        );
        assert!(before.get("xdplb_active_flows_age_seconds", &[]) >= Some(0.0));

        let names: Vec<String> = lab
            .client
            .ns
            .enter(|| (0..CONNECTIONS).map(|_| who(web()).unwrap()).collect())
            .unwrap();
        let drained_name = format!("b{drained}");
        assert!(!names.contains(&drained_name), "{names:?}");

        let vip_flows = before.vip("xdplb_vip_new_flows_total", "web");
        let after = wait_metrics(lab, "the connections sampled", |m| {
            m.get("xdplb_vip_new_flows_total", &[("vip", "web")])
                >= Some(vip_flows + CONNECTIONS as f64)
        });
        assert_eq!(
            after.vip("xdplb_vip_new_flows_total", "web"),
            vip_flows + CONNECTIONS as f64,
            "exactly one new flow per connection"
        );
        for n in 0..BACKENDS {
            let flows = |m: &Metrics| m.backend("xdplb_backend_new_flows_total", "web", n);
            let got = names
                .iter()
                .filter(|name| **name == format!("b{n}"))
                .count();
            println!(
                "measured: b{n}: new flows {} -> {} ({got} connections answered)",
                flows(&before),
                flows(&after)
            );
            assert_eq!(flows(&after) - flows(&before), got as f64, "b{n}");
            if n != drained {
                assert!(got > 0, "b{n} got none of {CONNECTIONS} connections");
            }
        }
        // The established transfer keeps flowing through the drained backend: the client's
        // ACKs are forwarded to it.
        let packets = |m: &Metrics| m.backend("xdplb_backend_packets_total", "web", drained);
        assert!(
            packets(&after) > packets(&before),
            "no packet counted for the drained backend's transfer"
        );

        // The same from `xdplb stats --json`: no new-flow rate, but a packet rate.
        let stats = stats_json(daemon);
        let b = find(
            &find(&stats["vips"], "name", "web")["backends"],
            "address",
            &address,
        );
        assert_eq!(b["rates"]["new_flows"], 0.0, "{b}");
        assert!(b["rates"]["packets"].as_f64() > Some(0.0), "{b}");
        assert_eq!(b["drained"], true);
        drained
    });
    // The transfer ended (the client closed, FIN seen): the drain is complete.
    let address = backend4(drained).to_string();
    let labels = [("vip", "web"), ("backend", address.as_str())];
    wait_metrics(lab, "no active flow left on the drained backend", |m| {
        m.get("xdplb_backend_active_flows", &labels) == Some(0.0)
            && m.get("xdplb_backend_drained", &labels) == Some(1.0)
            && m.get("xdplb_backend_drain_complete", &labels) == Some(1.0)
    });
}

/// The metric tables of docs/metrics.md: (sample name, type, label names).
fn documented_metrics() -> Vec<(String, String, Vec<String>)> {
    let docs = include_str!("../../docs/metrics.md");
    let mut metrics = Vec::new();
    for line in docs.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "| `name` | type | labels | meaning |"
        if cells.len() < 5 {
            continue;
        }
        let (name, kind, labels) = (cells[1], cells[2], cells[3]);
        let Some(name) = name
            .strip_prefix("`xdplb_")
            .and_then(|n| n.strip_suffix('`'))
        else {
            continue;
        };
        if !["counter", "gauge", "histogram", "info"].contains(&kind) {
            continue;
        }
        let labels = labels
            .split(',')
            .map(|l| l.trim().trim_matches('`'))
            .filter(|l| !l.is_empty() && *l != "—")
            .map(String::from)
            .collect();
        metrics.push((format!("xdplb_{name}"), kind.to_string(), labels));
    }
    metrics
}

/// The documented label values: (sample name, label, value), from the "Label values today"
/// table (`| metric | label="value" | meaning |`, the metric cell empty on continued rows).
fn documented_label_values() -> Vec<(String, String, String)> {
    let docs = include_str!("../../docs/metrics.md");
    let mut values = Vec::new();
    let mut metric = String::new();
    for line in docs.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() != 5 {
            continue;
        }
        if let Some(name) = cells[1].strip_prefix('`').and_then(|n| n.strip_suffix('`')) {
            metric = name.to_string();
        } else if !cells[1].is_empty() {
            continue;
        }
        let Some((label, value)) = cells[2]
            .strip_prefix('`')
            .and_then(|c| c.strip_suffix("\"`"))
            .and_then(|c| c.split_once("=\""))
        else {
            continue;
        };
        values.push((metric.clone(), label.to_string(), value.to_string()));
    }
    values
}

#[test]
fn the_endpoint_serves_every_documented_metric_and_healthz() {
    let Setup { lab, .. } = &setup();
    let healthz = lab
        .client
        .ns
        .enter(|| http_get(metrics_addr(), "/healthz"))
        .unwrap()
        .unwrap();
    assert_eq!((healthz.status, healthz.body.as_str()), (200, "ok\n"));

    // Some traffic, so every forwarding counter moves.
    const CONNECTIONS: usize = 10;
    lab.client
        .ns
        .enter(|| {
            for _ in 0..CONNECTIONS {
                who(web()).unwrap();
            }
            xdplb_tests::lab::who_udp(dns()).unwrap();
        })
        .unwrap();
    let metrics = wait_metrics(lab, "the traffic sampled", |m| {
        m.get("xdplb_vip_new_flows_total", &[("vip", "web")]) == Some(CONNECTIONS as f64)
            && m.get("xdplb_vip_new_flows_total", &[("vip", "dns")]) == Some(1.0)
    });

    let documented = documented_metrics();
    assert!(documented.len() >= 20, "docs parsed badly: {documented:?}");
    for (name, kind, labels) in &documented {
        // The family as declared: counters without `_total`, info without `_info`.
        let family = match kind.as_str() {
            "counter" => name.strip_suffix("_total").unwrap(),
            "info" => name.strip_suffix("_info").unwrap(),
            _ => name,
        };
        assert!(
            metrics
                .text
                .contains(&format!("\n# TYPE {family} {kind}\n")),
            "{name} is not declared a {kind}:\n{}",
            metrics.text
        );
        let samples = metrics.all(name);
        assert!(!samples.is_empty(), "no {name}:\n{}", metrics.text);
        let expected: BTreeSet<&str> = labels.iter().map(String::as_str).collect();
        for sample in samples {
            let got: BTreeSet<&str> = sample.labels.keys().map(String::as_str).collect();
            assert_eq!(got, expected, "labels of {name}");
        }
    }
    let values = documented_label_values();
    assert!(values.len() >= 15, "docs parsed badly: {values:?}");
    for (name, label, value) in &values {
        assert!(
            metrics.get(name, &[(label, value)]).is_some(),
            "no {name}{{{label}=\"{value}\"}}:\n{}",
            metrics.text
        );
    }

    // A few values we know.
    for (n, weight) in WEB_WEIGHTS.into_iter().enumerate() {
        assert_eq!(metrics.backend("xdplb_backend_up", "web", n), 1.0);
        assert_eq!(
            metrics.backend("xdplb_backend_weight", "web", n),
            f64::from(weight)
        );
        assert_eq!(metrics.backend("xdplb_backend_weight", "dns", n), 100.0);
        assert_eq!(metrics.backend("xdplb_backend_drained", "web", n), 0.0);
        // Every connection closed (FIN seen): nothing active on web.
        assert_eq!(metrics.backend("xdplb_backend_active_flows", "web", n), 0.0);
        // unknown -> up, once.
        let backend = backend4(n).to_string();
        assert_eq!(
            metrics.value(
                "xdplb_health_transitions_total",
                &[("vip", "web"), ("backend", &backend), ("to", "up")]
            ),
            1.0
        );
    }
    let active_dns: f64 = (0..BACKENDS)
        .map(|n| metrics.backend("xdplb_backend_active_flows", "dns", n))
        .sum();
    assert_eq!(active_dns, 1.0, "the UDP flow is active");
    // dns is least-conn: its one flow holds one count; web (maglev) exports no counts.
    let counted_dns: f64 = (0..BACKENDS)
        .map(|n| metrics.backend("xdplb_backend_scheduler_connections", "dns", n))
        .sum();
    assert_eq!(counted_dns, 1.0, "the UDP flow is counted");
    assert!(!metrics
        .text
        .contains("xdplb_backend_scheduler_connections{vip=\"web\""));
    for (vip, scheduler) in [("web", "maglev"), ("dns", "least-conn")] {
        assert_eq!(
            metrics.value(
                "xdplb_vip_scheduler",
                &[("vip", vip), ("scheduler", scheduler)]
            ),
            1.0
        );
    }
    // Each connection is at least SYN, ACK + request, FIN, ACK: 4 packets sent with XDP_TX.
    let tx = metrics.value("xdplb_xdp_actions_total", &[("action", "tx")]);
    assert!(tx >= (4 * CONNECTIONS + 1) as f64, "tx {tx}");
    assert!(metrics.value("xdplb_packets_passed_total", &[("reason", "not_vip")]) > 0.0);
    let entries = metrics.value("xdplb_flow_table_entries", &[]);
    assert!(
        entries >= (CONNECTIONS + 1) as f64,
        "flow table entries {entries}"
    );
    assert_eq!(
        metrics.value(
            "xdplb_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    let checks = metrics
        .all("xdplb_health_check_duration_seconds")
        .into_iter()
        .find(|s| s.labels.get("vip") == Some("web") && s.labels.get("result") == Some("ok"))
        .expect("web's check histogram");
    let Metric::Histogram(buckets) = &checks.value else {
        panic!("not a histogram: {checks:?}");
    };
    let count = metrics.value(
        "xdplb_health_check_duration_seconds_count",
        &[("vip", "web"), ("result", "ok")],
    );
    assert!(count >= BACKENDS as f64, "{count} checks");
    assert_eq!(
        buckets.last().map(|b| (b.less_than, b.count)),
        Some((f64::INFINITY, count))
    );
    // The documented buckets: 0.1 ms to 1 s, then +Inf.
    let bounds: Vec<f64> = buckets.iter().map(|b| b.less_than).collect();
    assert_eq!(
        bounds,
        [
            0.0001,
            0.00025,
            0.0005,
            0.001,
            0.0025,
            0.005,
            0.01,
            0.025,
            0.05,
            0.1,
            0.25,
            0.5,
            1.0,
            f64::INFINITY
        ]
    );
    assert!(
        !metrics.text.contains("vip=\"dns\",result="),
        "dns is not checked"
    );

    // docs: action="drop" is the sum of the drop reasons, action="pass" of the pass reasons.
    // The counters are read one by one, so a packet may land between two reads: retry.
    let mut sums = Vec::new();
    let consistent = (0..20).any(|_| {
        let m = scrape(lab);
        let sum = |family: &str| -> f64 { m.all(family).into_iter().map(value).sum() };
        let got = (
            m.value("xdplb_xdp_actions_total", &[("action", "drop")]),
            sum("xdplb_packets_dropped_total"),
            m.value("xdplb_xdp_actions_total", &[("action", "pass")]),
            sum("xdplb_packets_passed_total"),
        );
        sums.push(got);
        thread::sleep(STATS_INTERVAL / 2);
        got.0 == got.1 && got.2 == got.3
    });
    assert!(consistent, "(drop, dropped, pass, passed): {sums:?}");
}

/// Opens `count` connections to the web VIP that stay open (a slow transfer each): the local
/// port of each and the backend that answered.
fn open_connections(count: usize) -> Vec<(TcpStream, u16, String)> {
    (0..count)
        .map(|_| {
            let mut stream = TcpStream::connect_timeout(&web(), Duration::from_secs(2)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            // 200 kB at 20 kB/s: 10 s, it fits in the socket buffers unread.
            stream.write_all(b"STREAM 200000 20000\n").unwrap();
            let mut name = Vec::new();
            let mut byte = [0u8; 1];
            while byte[0] != b'\n' {
                stream.read_exact(&mut byte).unwrap();
                name.push(byte[0]);
            }
            let name = String::from_utf8(name).unwrap().trim().to_string();
            let port = stream.local_addr().unwrap().port();
            (stream, port, name)
        })
        .collect()
}

/// `xdplb flows web [--backend B] --json`: (client port, backend, protocol, state) of the
/// client's flows.
fn flows(daemon: &Daemon, backend: Option<&str>) -> Vec<(u16, String, String, String)> {
    let mut args = vec!["flows", "web", "--json", "--limit", "100000"];
    if let Some(backend) = backend {
        args.extend(["--backend", backend]);
    }
    let list: Value = serde_json::from_str(&daemon.cli(&args).unwrap()).unwrap();
    list["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| {
            assert_eq!(f["vip"], "web", "{f}");
            let (ip, port) = f["client"].as_str()?.rsplit_once(':')?;
            (ip == CLIENT4.to_string()).then(|| {
                (
                    port.parse().unwrap(),
                    f["backend"].as_str().unwrap().to_string(),
                    f["protocol"].as_str().unwrap().to_string(),
                    f["state"].as_str().unwrap().to_string(),
                )
            })
        })
        .collect()
}

#[test]
fn stats_and_flows_show_the_live_traffic() {
    const OPEN: usize = 9;
    let Setup { lab, daemon, .. } = &setup();
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        // Datagrams to the dns VIP every 10 ms (at most 2000, at most 30 s) while we look.
        let udp = scope.spawn(|| {
            lab.client
                .ns
                .enter(|| {
                    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let mut sent = 0;
                    while !stop.load(Ordering::Relaxed) && sent < 2000 && Instant::now() < deadline
                    {
                        socket.send_to(DATAGRAM, dns()).unwrap();
                        sent += 1;
                        thread::sleep(Duration::from_millis(10));
                    }
                })
                .unwrap()
        });
        let open = lab.client.ns.enter(|| open_connections(OPEN)).unwrap();

        // Rates need two samples with traffic between them (before the first sample, the
        // snapshot is empty).
        let deadline = Instant::now() + WAIT_LIMIT;
        let stats = loop {
            let stats = stats_json(daemon);
            let rate = |vip: &str| {
                stats["vips"]
                    .as_array()?
                    .iter()
                    .find(|v| v["name"] == vip)?["rates"]["packets"]
                    .as_f64()
            };
            if rate("web") > Some(0.0) && rate("dns") > Some(0.0) {
                break stats;
            }
            assert!(Instant::now() < deadline, "no rates: {stats}");
            thread::sleep(STATS_INTERVAL / 2);
        };
        for (vip, address) in [("web", "192.0.2.10:80/tcp"), ("dns", "192.0.2.53:53/udp")] {
            let v = find(&stats["vips"], "name", vip);
            assert_eq!(v["address"], address);
            assert!(v["rates"]["bytes"].as_f64() > Some(0.0), "{v}");
            for n in 0..BACKENDS {
                find(&v["backends"], "address", &backend4(n).to_string());
            }
        }
        let web_stats = find(&stats["vips"], "name", "web");
        assert_eq!(web_stats["active_flows"], OPEN, "{web_stats}");
        // Rates are over the time between the last two samples: about stats_interval.
        let interval = stats["interval_s"].as_f64().unwrap();
        assert!(interval > 0.0 && interval <= 2.0, "{stats}");

        let table = daemon.cli(&["stats"]).unwrap();
        println!("{table}");
        let rows: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[0][..2], ["VIP", "/"], "{table}");
        for (vip, address) in [("web", "192.0.2.10:80/tcp"), ("dns", "192.0.2.53:53/udp")] {
            let row = rows
                .iter()
                .find(|r| r[..2] == [vip, address])
                .unwrap_or_else(|| panic!("no {vip} row:\n{table}"));
            // Columns from the end: PKT/S BYTE/S NEW/S PACKETS BYTES.
            assert_ne!(row[row.len() - 5], "0", "{vip} PKT/S:\n{table}");
        }
        let backend_rows = rows.iter().filter(|r| r.first() == Some(&"->")).count();
        assert_eq!(backend_rows, 2 * BACKENDS, "{table}");
        assert!(
            table
                .trim_end()
                .lines()
                .last()
                .unwrap()
                .starts_with("flow table: "),
            "{table}"
        );

        // Every open connection is listed with the backend that answered it, and the
        // per-backend filter returns exactly its connections.
        let ours: BTreeMap<u16, String> = open
            .iter()
            .map(|(_, port, name)| (*port, backend4(name[1..].parse().unwrap()).to_string()))
            .collect();
        let listed: BTreeMap<u16, String> = flows(daemon, None)
            .into_iter()
            .filter(|(port, ..)| ours.contains_key(port))
            .map(|(port, backend, protocol, _)| {
                assert_eq!(protocol, "tcp");
                (port, backend)
            })
            .collect();
        assert_eq!(listed, ours);
        for n in 0..BACKENDS {
            let backend = backend4(n).to_string();
            let filtered: BTreeSet<u16> = flows(daemon, Some(&backend))
                .into_iter()
                .map(|(port, listed_backend, ..)| {
                    assert_eq!(listed_backend, backend);
                    port
                })
                .filter(|port| ours.contains_key(port))
                .collect();
            let expected: BTreeSet<u16> = ours
                .iter()
                .filter(|(_, b)| **b == backend)
                .map(|(port, _)| *port)
                .collect();
            assert_eq!(filtered, expected, "flows --backend {backend}");
        }
        stop.store(true, Ordering::Relaxed);
        udp.join().unwrap();
        drop(open);
    });
}

/// `xdplb flows` documents the states "syn", "established", "fin", "rst": a connection that
/// completed its handshake and exchanged data is established. (Before 78fc7b7 every flow opened
/// by a SYN stayed "syn" for its whole life: FLOW_SYN_SEEN was never superseded.)
#[test]
fn flows_of_open_connections_are_established() {
    let Setup { lab, daemon, .. } = &setup();
    let open = lab.client.ns.enter(|| open_connections(3)).unwrap();
    let ports: BTreeSet<u16> = open.iter().map(|(_, port, _)| *port).collect();
    let states: Vec<(u16, String)> = flows(daemon, None)
        .into_iter()
        .filter(|(port, ..)| ports.contains(port))
        .map(|(port, _, _, state)| (port, state))
        .collect();
    assert_eq!(states.len(), ports.len(), "{states:?}");
    for (port, state) in &states {
        assert_eq!(state, "established", "flow from port {port}: {states:?}");
    }
    drop(open);
}

/// Metric names in a PromQL text: `xdplb_` and the identifier characters after it.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("xdplb_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

#[test]
fn the_grafana_dashboard_uses_documented_metrics_only() {
    let text = include_str!("../../dist/grafana/xdplb.json");
    let dashboard: Value = serde_json::from_str(text).expect("dist/grafana/xdplb.json is JSON");
    let documented = documented_metrics();
    let known = |name: &str| {
        documented.iter().any(|(doc, kind, _)| {
            doc == name
                || (kind == "histogram"
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| name.strip_suffix(suffix) == Some(doc)))
        })
    };
    // Every query, and the template variables' queries.
    let mut exprs = Vec::new();
    fn collect(value: &Value, exprs: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr" | "query" | "definition", Value::String(s)) => {
                            exprs.push(s.clone())
                        }
                        ("query", Value::Object(q)) => {
                            if let Some(Value::String(s)) = q.get("query") {
                                exprs.push(s.clone());
                            }
                        }
                        _ => collect(v, exprs),
                    }
                }
            }
            Value::Array(list) => list.iter().for_each(|v| collect(v, exprs)),
            _ => {}
        }
    }
    collect(&dashboard, &mut exprs);
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    // Everything the text mentions, not only queries, must be a real metric.
    let mentioned = metric_names(text);
    for name in &mentioned {
        assert!(known(name), "{name} is not documented in docs/metrics.md");
    }
    for wanted in [
        "xdplb_backend_bytes_total",
        "xdplb_backend_packets_total",
        "xdplb_backend_new_flows_total",
        "xdplb_backend_active_flows",
        "xdplb_backend_up",
        "xdplb_backend_weight",
        "xdplb_packets_dropped_total",
        "xdplb_packets_passed_total",
        "xdplb_xdp_actions_total",
        "xdplb_flow_table_entries",
        "xdplb_health_check_duration_seconds_bucket",
        "xdplb_vip_packets_total",
    ] {
        assert!(used.contains(wanted), "no panel queries {wanted}");
    }

    assert!(dashboard["schemaVersion"].as_u64() >= Some(36));
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no template variable {name}"))
    };
    assert_eq!(variable("DS_PROMETHEUS")["type"], "datasource");
    assert_eq!(variable("DS_PROMETHEUS")["query"], "prometheus");
    let vip = variable("vip");
    assert_eq!(vip["type"], "query");
    assert!(
        vip["definition"]
            .as_str()
            .is_some_and(|d| d.contains("label_values(xdplb_vip_packets_total, vip)")),
        "{vip}"
    );
    // Every panel and query reads from the templated datasource.
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id: {panel}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}");
        }
    }
}

/// Guards the helpers above against a silent no-op: the doc parsers find what they should.
#[test]
fn the_docs_parsers_find_the_tables() {
    let documented = documented_metrics();
    let names: Vec<&str> = documented.iter().map(|(n, ..)| n.as_str()).collect();
    for name in [
        "xdplb_backend_packets_total",
        "xdplb_vip_dropped_total",
        "xdplb_flow_table_entries",
        "xdplb_health_check_duration_seconds",
        "xdplb_build_info",
    ] {
        assert!(names.contains(&name), "{name} not parsed: {names:?}");
    }
    let (_, kind, labels) = documented
        .iter()
        .find(|(n, ..)| n == "xdplb_health_transitions_total")
        .unwrap();
    assert_eq!(
        (kind.as_str(), labels.as_slice()),
        (
            "counter",
            &["vip".to_string(), "backend".into(), "to".into()][..]
        )
    );
    let values = documented_label_values();
    assert!(values.contains(&(
        "xdplb_xdp_actions_total".into(),
        "action".into(),
        "tx".into()
    )));
    assert!(values.contains(&(
        "xdplb_decap_packets_total".into(),
        "result".into(),
        "not_ours".into()
    )));
}
