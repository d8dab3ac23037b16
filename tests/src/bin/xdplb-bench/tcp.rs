//! TCP connections per second and request latency: the real daemon (`xdplb run`) in `dsr` and
//! in `nat` next to HAProxy in `mode tcp` and to an nftables DNAT + SNAT balancer (the two an
//! operator with unmodified backends would otherwise use), all on the LB's namespace, in the
//! same lab (client, LB and two backends on one bridge), with the same backends and client.
//!
//! The client runs in the client namespace: 2 threads, each doing connect + `NAME\n` + read
//! to EOF + close in a loop for [`DURATION`], recording each request's latency.

use crate::report::{Cdf, Figure, Report};
use anyhow::{bail, Context as _, Result};
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};
use xdplb_tests::lab::{self, Daemon, Lab, Process};

const DURATION: Duration = Duration::from_secs(3);
const WARMUP: Duration = Duration::from_millis(300);
const THREADS: usize = 2;
const BACKENDS: usize = 2;
const XDPLB_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const HAPROXY_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
const NAT_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 30);
const NFT_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 40);
/// The nftables balancer's SNAT source: an address of the LB no earlier run used, so the
/// backends' TIME_WAIT entries from the HAProxy run (from the LB's own address and
/// ephemeral ports, which SNAT would keep) cannot collide with its connections.
const NFT_SNAT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);

/// What one system did.
struct Outcome {
    requests: u64,
    errors: u64,
    seconds: f64,
    /// Sorted.
    latencies_us: Vec<f64>,
    per_backend: Vec<(String, u64)>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    fn percentile(&self, p: f64) -> f64 {
        let n = self.latencies_us.len();
        if n == 0 {
            return f64::NAN;
        }
        self.latencies_us[((n as f64 * p).ceil() as usize).clamp(1, n) - 1]
    }
}

/// One request; returns the backend's name.
fn request(vip: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&vip, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_nodelay(true)?;
    stream.write_all(b"NAME\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    if answer.is_empty() {
        bail!("empty answer");
    }
    Ok(answer.trim().to_string())
}

/// Waits (bounded) until `vip` answers.
fn wait_serving(lab: &Lab, vip: SocketAddr, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if lab.client.ns.enter(|| request(vip))?.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} did not answer on {vip} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn load(lab: &Lab, vip: SocketAddr) -> Result<Outcome> {
    lab.client.ns.enter(|| {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..THREADS)
                .map(|_| {
                    scope.spawn(move || {
                        let start = Instant::now();
                        let mut latencies = Vec::with_capacity(100_000);
                        let mut errors = 0u64;
                        let mut names: Vec<(String, u64)> = Vec::new();
                        let mut measured_from = None;
                        while start.elapsed() < WARMUP + DURATION {
                            let t = Instant::now();
                            let result = request(vip);
                            let took = t.elapsed();
                            if start.elapsed() < WARMUP {
                                continue;
                            }
                            measured_from.get_or_insert(t);
                            match result {
                                Ok(name) => {
                                    latencies.push(took.as_secs_f64() * 1e6);
                                    match names.iter_mut().find(|(n, _)| *n == name) {
                                        Some((_, count)) => *count += 1,
                                        None => names.push((name, 1)),
                                    }
                                }
                                Err(_) => errors += 1,
                            }
                        }
                        let seconds = measured_from
                            .map(|t| t.elapsed().as_secs_f64())
                            .unwrap_or(f64::NAN);
                        (latencies, errors, names, seconds)
                    })
                })
                .collect();
            let mut all = Outcome {
                requests: 0,
                errors: 0,
                seconds: 0.0,
                latencies_us: Vec::new(),
                per_backend: Vec::new(),
            };
            for worker in workers {
                let (latencies, errors, names, seconds) =
                    worker.join().expect("client thread panicked");
                all.requests += latencies.len() as u64;
                all.errors += errors;
                all.seconds = all.seconds.max(seconds);
                all.latencies_us.extend(latencies);
                for (name, count) in names {
                    match all.per_backend.iter_mut().find(|(n, _)| *n == name) {
                        Some((_, c)) => *c += count,
                        None => all.per_backend.push((name, count)),
                    }
                }
            }
            all.latencies_us.sort_by(f64::total_cmp);
            all.per_backend.sort();
            all
        })
    })
}

fn print(what: &str, o: &Outcome) {
    println!(
        "  {what}: {:.0} requests/s, p50 {:.0} µs, p99 {:.0} µs, {} errors, per backend {:?}",
        o.rate(),
        o.percentile(0.50),
        o.percentile(0.99),
        o.errors,
        o.per_backend
    );
}

/// The daemon with one VIP forwarding in `forwarding` (`dsr` backends hold the VIP: the lab
/// puts it on their `lo`; `nat` backends need nothing).
fn xdplb_run(lab: &Lab, forwarding: &str, vip: Ipv4Addr) -> Result<Outcome> {
    let mut services = format!(
        "[[vip]]\nname = \"web\"\naddress = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\n\
         forwarding = \"{forwarding}\"\nring_size = 1021\n"
    );
    for (n, backend) in lab.backends.iter().enumerate() {
        let mac = backend.ns.exec("cat /sys/class/net/eth0/address")?;
        services += &format!(
            "[[vip.backend]]\naddress = \"{}\"\nmac = \"{}\"\n",
            lab::backend4(n),
            mac.trim()
        );
    }
    let daemon = Daemon::start(lab, "", &services).context("starting xdplb run")?;
    let vip = SocketAddr::from((vip, 80));
    wait_serving(lab, vip, "xdplb")?;
    let outcome = load(lab, vip)?;
    print(&format!("xdplb {forwarding}"), &outcome);
    drop(daemon);
    Ok(outcome)
}

/// An nftables balancer on the LB's stack: DNAT to a random backend (`numgen`), SNAT to the
/// LB (so, like `nat`, backends need nothing), conntrack keeping each connection.
fn nft_run(lab: &Lab) -> Result<Outcome> {
    let map: Vec<String> = (0..lab.backends.len())
        .map(|n| format!("{n} : {}", lab::backend4(n)))
        .collect();
    let ruleset = format!(
        "table ip xdplb_bench_tcp {{\n\
           chain prerouting {{\n\
             type nat hook prerouting priority dstnat; policy accept;\n\
             ip daddr {NFT_VIP} tcp dport 80 dnat to numgen random mod {} map {{ {} }}\n\
           }}\n\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             ct status dnat snat to {}\n\
           }}\n\
         }}\n",
        lab.backends.len(),
        map.join(", "),
        NFT_SNAT,
    );
    let file = std::env::temp_dir().join(format!("{}-tcp-nft.conf", lab.id));
    std::fs::write(&file, ruleset)?;
    let loaded = lab.lb.ns.exec(&format!(
        // Forwarding back out of the interface a packet came in on would otherwise send the
        // client ICMP redirects toward the backends.
        "ip addr add {NFT_SNAT}/24 dev eth0 && \
         sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.send_redirects=0 \
         net.ipv4.conf.eth0.send_redirects=0 && nft -f {}",
        file.display()
    ));
    let _ = std::fs::remove_file(&file);
    loaded.context("loading the nftables DNAT + SNAT ruleset (is nftables installed?)")?;
    let vip = SocketAddr::from((NFT_VIP, 80));
    let result = wait_serving(lab, vip, "nftables").and_then(|()| load(lab, vip));
    let _ = lab.lb.ns.exec("nft delete table ip xdplb_bench_tcp");
    let outcome = result?;
    print("nftables DNAT + SNAT", &outcome);
    Ok(outcome)
}

fn haproxy_run(lab: &Lab) -> Result<Outcome> {
    lab.lb
        .ns
        .exec(&format!("ip addr add {HAPROXY_VIP}/32 dev lo"))?;
    let servers: String = (0..lab.backends.len())
        .map(|n| format!("    server b{n} {}:80\n", lab::backend4(n)))
        .collect();
    let config = format!(
        "global\n    maxconn 8000\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n\
         frontend bench\n    bind {HAPROXY_VIP}:80\n    default_backend servers\n\
         backend servers\n    balance roundrobin\n{servers}"
    );
    let path = std::env::temp_dir().join(format!("{}-haproxy.cfg", lab.id));
    std::fs::write(&path, config)?;
    let haproxy = Process(
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.lb.ns.name,
                "haproxy",
                "-q",
                "-db",
                "-f",
            ])
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting haproxy (is it installed? `cargo xtask bench` installs it)")?,
    );
    let vip = SocketAddr::from((HAPROXY_VIP, 80));
    let result = wait_serving(lab, vip, "haproxy").and_then(|()| load(lab, vip));
    drop(haproxy);
    let _ = std::fs::remove_file(&path);
    let outcome = result?;
    print("HAProxy mode tcp", &outcome);
    Ok(outcome)
}

pub fn run(report: &mut Report) -> Result<()> {
    println!(
        "TCP connections: {THREADS} client threads, {} s each, {BACKENDS} backends",
        DURATION.as_secs()
    );
    let lab = Lab::new(BACKENDS).context("building the lab")?;
    let mut servers = Vec::new();
    for (n, backend) in lab.backends.iter().enumerate() {
        servers.push(backend.serve(&format!("b{n}"), "0.0.0.0:80", "tcp")?);
    }
    for backend in &lab.backends {
        backend.wait_sockets(1, 0)?;
    }
    let xdplb = xdplb_run(&lab, "dsr", XDPLB_VIP)?;
    let nat = xdplb_run(&lab, "nat", NAT_VIP)?;
    let haproxy = haproxy_run(&lab)?;
    let nft = nft_run(&lab)?;
    drop(servers);
    drop(lab);
    for (o, what) in [
        (&xdplb, "xdplb dsr"),
        (&nat, "xdplb nat"),
        (&haproxy, "HAProxy"),
        (&nft, "nftables"),
    ] {
        if o.requests == 0 || o.errors * 100 > o.requests {
            bail!(
                "{what}: {} requests, {} errors: the lab is not serving",
                o.requests,
                o.errors
            );
        }
    }

    let section = report.section("TCP connections (real daemon vs HAProxy and nftables)");
    let measures = "connect + request line + response + close, 2 client threads, 3 s; client, LB and backends in namespaces on one bridge";
    let rate_ratio = xdplb.rate() / haproxy.rate();
    let p99_ratio = xdplb.percentile(0.99) / haproxy.percentile(0.99);
    section.push(
        Figure::new(
            "tcp.xdplb_rate",
            "xdplb dsr: connections/s",
            xdplb.rate(),
            "conn/s",
            measures,
        )
        .ratio(rate_ratio, "HAProxy")
        .target(">= HAProxy", rate_ratio >= 1.0),
    );
    section.push(Figure::new(
        "tcp.xdplb_p50",
        "xdplb dsr: request latency p50",
        xdplb.percentile(0.5),
        "µs",
        "per request, same runs",
    ));
    section.push(
        Figure::new(
            "tcp.xdplb_p99",
            "xdplb dsr: request latency p99",
            xdplb.percentile(0.99),
            "µs",
            "per request, same runs",
        )
        .ratio(p99_ratio, "HAProxy")
        .target("< HAProxy", p99_ratio < 1.0),
    );
    let nat_rate_ratio = nat.rate() / haproxy.rate();
    let nat_p99_ratio = nat.percentile(0.99) / haproxy.percentile(0.99);
    section.push(
        Figure::new(
            "tcp.nat_rate",
            "xdplb nat: connections/s",
            nat.rate(),
            "conn/s",
            "as above, backends unmodified: both directions translated in XDP",
        )
        .ratio(nat_rate_ratio, "HAProxy")
        .target(">= 1.5x HAProxy", nat_rate_ratio >= 1.5),
    );
    section.push(Figure::new(
        "tcp.nat_p50",
        "xdplb nat: request latency p50",
        nat.percentile(0.5),
        "µs",
        "per request, same runs",
    ));
    section.push(
        Figure::new(
            "tcp.nat_p99",
            "xdplb nat: request latency p99",
            nat.percentile(0.99),
            "µs",
            "per request, same runs",
        )
        .ratio(nat_p99_ratio, "HAProxy")
        .target("< HAProxy", nat_p99_ratio < 1.0),
    );
    section.push(
        Figure::new(
            "tcp.nft_rate",
            "nftables DNAT + SNAT: connections/s",
            nft.rate(),
            "conn/s",
            "numgen random over the backends, SNAT to a second address of the LB, conntrack, on the LB's stack",
        )
        .ratio(nat.rate() / nft.rate(), "xdplb nat"),
    );
    section.push(Figure::new(
        "tcp.nft_p99",
        "nftables DNAT + SNAT: request latency p99",
        nft.percentile(0.99),
        "µs",
        "per request",
    ));
    section.push(Figure::new(
        "tcp.haproxy_rate",
        "HAProxy mode tcp: connections/s",
        haproxy.rate(),
        "conn/s",
        "HAProxy 2.6 (2 threads) on the LB namespace, roundrobin, same backends and client",
    ));
    section.push(Figure::new(
        "tcp.haproxy_p50",
        "HAProxy mode tcp: request latency p50",
        haproxy.percentile(0.5),
        "µs",
        "per request",
    ));
    section.push(Figure::new(
        "tcp.haproxy_p99",
        "HAProxy mode tcp: request latency p99",
        haproxy.percentile(0.99),
        "µs",
        "per request",
    ));
    let summary = |o: &Outcome| {
        serde_json::json!({
            "requests": o.requests,
            "errors": o.errors,
            "seconds": o.seconds,
            "p50_us": o.percentile(0.5),
            "p90_us": o.percentile(0.9),
            "p99_us": o.percentile(0.99),
            "max_us": o.latencies_us.last(),
            "per_backend": o.per_backend.iter().map(|(n, c)| (n.clone(), serde_json::json!(c))).collect::<serde_json::Map<_, _>>(),
        })
    };
    report.data.insert(
        "tcp".into(),
        serde_json::json!({
            "xdplb": summary(&xdplb),
            "xdplb_nat": summary(&nat),
            "haproxy": summary(&haproxy),
            "nftables": summary(&nft),
        }),
    );
    report.cdfs.push(Cdf {
        name: "xdplb dsr".into(),
        sorted_us: xdplb.latencies_us,
    });
    report.cdfs.push(Cdf {
        name: "xdplb nat".into(),
        sorted_us: nat.latencies_us,
    });
    report.cdfs.push(Cdf {
        name: "HAProxy mode tcp".into(),
        sorted_us: haproxy.latencies_us,
    });
    report.cdfs.push(Cdf {
        name: "nftables DNAT + SNAT".into(),
        sorted_us: nft.latencies_us,
    });
    Ok(())
}
