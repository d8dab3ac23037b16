//! TCP connections per second and request latency: the real daemon (`xdplb run`) in `dsr` and
//! in `nat` next to HAProxy in `mode tcp` and to an nftables DNAT + SNAT balancer (the two an
//! operator with unmodified backends would otherwise use), all on the LB's namespace, in the
//! same lab (client, LB and two backends on one bridge), with the same backends and client.
//!
//! The backends are nginx (event-driven, as real web servers are: a server that starts a
//! thread per connection spends more per connection than the LBs measured here and hides their
//! differences), answering `GET /` with their name. The client is [`load`]: closed loops of
//! connect + request + read to EOF + close, at each of [`CONCURRENCIES`], every system at the
//! same ones. A load balancer's connections/s is its capacity, so the figures are at
//! [`TARGET_CONCURRENCY`] and nat's targets are checked at every [`SATURATED`] concurrency,
//! where every system saturates this lab; the lowest concurrency is the latency-bound
//! reference the earlier bench measured.
//!
//! The machine is shared, so the systems are measured in [`ROUNDS`] interleaved rounds (each
//! round every system at every concurrency, the starting system rotated), and each figure
//! pools its rounds: a burst of outside load falls on every system alike.

use crate::{
    load::{self, Outcome, Window},
    others::Others,
    report::{Cdf, Figure, Report},
};
use anyhow::{bail, Context as _, Result};
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};
use xdplb_tests::lab::{self, Daemon, Lab, Netns, Process};

const ROUNDS: usize = 4;
const WINDOW: Window = Window {
    warmup: Duration::from_millis(200),
    measured: Duration::from_secs(1),
};
/// Connections in flight. 2 is what the earlier bench measured (2 blocking client threads).
const CONCURRENCIES: &[usize] = &[2, 16, 64];
/// Where the main figures are taken, the same for every system: 32 per core of this machine,
/// past the point (16) where every system here stops gaining.
const TARGET_CONCURRENCY: usize = 64;
/// Both saturate every system, and HAProxy serves somewhat more at 16 than at 64 here, so
/// nat's targets are checked at both: met only where met at each.
const SATURATED: &[usize] = &[16, TARGET_CONCURRENCY];
const BACKENDS: usize = 2;
const DSR_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const HAPROXY_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
const NAT_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 30);
const NFT_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 40);
/// The sources toward the backends: HAProxy connects from the LB's own address (10.0.0.2);
/// nftables and xdplb nat each get addresses of their own, so no system's connection can
/// meet another's TIME_WAIT entry on a backend (same 4-tuple, unrelated timestamps: the
/// backend refuses the SYN, `TcpExtPAWSTimewait`, and the client waits for a retransmit).
const NFT_SNAT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);
/// xdplb nat's source in round `round`: one per round, because each round starts a new daemon
/// with empty nat state. A running daemon keeps a closed connection's (address, port) for
/// `nat_tcp_closing_timeout` (120 s), longer than the backend's TIME_WAIT (60 s), and a
/// restarted one keeps its pinned state; a daemon started afresh on the same address would
/// reuse tuples the backends still hold in TIME_WAIT and measure the lab's restarts instead.
fn nat_source(round: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 60 + round as u8)
}

/// The systems measured, in the order of the report.
#[derive(Clone, Copy, PartialEq, Eq)]
enum System {
    Dsr,
    Nat,
    Haproxy,
    Nftables,
}

impl System {
    const ALL: [System; 4] = [System::Dsr, System::Nat, System::Haproxy, System::Nftables];

    fn name(self) -> &'static str {
        match self {
            System::Dsr => "xdplb dsr",
            System::Nat => "xdplb nat",
            System::Haproxy => "HAProxy mode tcp",
            System::Nftables => "nftables DNAT + SNAT",
        }
    }

    /// Its key in bench/results.json.
    fn key(self) -> &'static str {
        match self {
            System::Dsr => "xdplb",
            System::Nat => "xdplb_nat",
            System::Haproxy => "haproxy",
            System::Nftables => "nftables",
        }
    }

    fn vip(self) -> SocketAddr {
        let address = match self {
            System::Dsr => DSR_VIP,
            System::Nat => NAT_VIP,
            System::Haproxy => HAPROXY_VIP,
            System::Nftables => NFT_VIP,
        };
        SocketAddr::from((address, 80))
    }
}

/// What is set up on the LB for one turn of a round (dsr and nat share the daemon).
#[derive(Clone, Copy)]
enum Turn {
    /// The daemon, with the dsr and the nat VIP.
    Xdplb,
    /// HAProxy alone: no XDP program on the LB, no nftables ruleset.
    Haproxy,
    Nftables,
}

impl Turn {
    const ALL: [Turn; 3] = [Turn::Xdplb, Turn::Haproxy, Turn::Nftables];
}

/// Every window of one system at one concurrency, one per round.
struct Runs {
    system: System,
    concurrency: usize,
    rounds: Vec<Outcome>,
}

impl Runs {
    /// The rounds as one outcome: requests and seconds summed, latencies together.
    fn pooled(&self) -> Outcome {
        let mut all = Outcome {
            concurrency: self.concurrency,
            ..Outcome::default()
        };
        for round in &self.rounds {
            all.others_cpu += round.others_cpu * round.seconds;
            all.requests += round.requests;
            all.errors += round.errors;
            all.seconds += round.seconds;
            all.latencies_us.extend(&round.latencies_us);
            for (name, count) in &round.per_backend {
                *all.per_backend.entry(name.clone()).or_default() += count;
            }
            if all.first_error.is_none() {
                all.first_error.clone_from(&round.first_error);
            }
        }
        all.others_cpu /= all.seconds;
        all.latencies_us.sort_by(f64::total_cmp);
        all
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// nginx on a backend: stopped, and its files removed, on drop.
struct Nginx {
    process: Option<Process>,
    dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        drop(self.process.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Backend `n` of the lab: nginx in one process (no master: killing it ends the server),
/// answering every request with `b<n>`.
fn nginx(lab: &Lab, n: usize) -> Result<Nginx> {
    let dir = std::env::temp_dir().join(format!("{}-nginx-b{n}", lab.id));
    std::fs::create_dir_all(&dir)?;
    // The guard exists first, so a failed start still removes the directory.
    let mut nginx = Nginx { process: None, dir };
    let config = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
         error_log stderr error;\nevents {{ worker_connections 4096; }}\n\
         http {{\n    access_log off;\n    client_body_temp_path {dir}/body;\n\
         \x20   proxy_temp_path {dir}/proxy;\n\
         \x20   server {{\n        listen 80 backlog=4096;\n        return 200 \"b{n}\\n\";\n    }}\n}}\n",
        dir = nginx.dir.display()
    );
    let path = nginx.dir.join("nginx.conf");
    std::fs::write(&path, config)?;
    let process = lab.backends[n]
        .ns
        .spawn(
            Path::new("nginx"),
            &[
                "-e",
                "stderr",
                "-p",
                &nginx.dir.to_string_lossy(),
                "-c",
                &path.to_string_lossy(),
            ],
        )
        .context("starting nginx (is nginx-light installed? `cargo xtask bench` installs it)")?;
    nginx.process = Some(Process(process));
    Ok(nginx)
}

/// Waits (bounded) until `system` answers.
fn wait_serving(lab: &Lab, system: System) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = load::probe(&lab.client.ns, system.vip());
        if answer.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not answer on {} within 20 s: {answer:?}",
                system.name(),
                system.vip()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (bounded) until `iface` in `ns` has no XDP program: HAProxy and nftables are
/// measured on the plain stack, without xdplb on the LB's interface or the lab's pass program
/// on its bridge port.
fn wait_detached(ns: &Netns, iface: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while ns
        .exec(&format!("ip link show dev {iface}"))?
        .contains("xdp")
    {
        if Instant::now() > deadline {
            bail!(
                "an XDP program was still on {iface} in {} after 10 s",
                ns.name
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The daemon with a `dsr` and a `nat` VIP over the same backends (`dsr` backends hold the
/// VIPs: the lab puts them on their `lo`; `nat` needs nothing on them).
fn start_xdplb(lab: &Lab, round: usize) -> Result<Daemon> {
    let mut services = String::new();
    for (name, forwarding, address) in [("web", "dsr", DSR_VIP), ("webnat", "nat", NAT_VIP)] {
        services += &format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = 80\nprotocol = \"tcp\"\n\
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
    }
    Daemon::start(
        lab,
        &format!("nat_source_v4 = [\"{}\"]\n", nat_source(round)),
        &services,
    )
    .context("starting xdplb run")
}

/// HAProxy with one thread per core (`nbthread`), as an operator would run it; it stays up
/// for the whole section (idle while the others are measured).
fn start_haproxy(lab: &Lab) -> Result<Process> {
    lab.lb
        .ns
        .exec(&format!("ip addr add {HAPROXY_VIP}/32 dev lo"))?;
    let servers: String = (0..lab.backends.len())
        .map(|n| format!("    server b{n} {}:80\n", lab::backend4(n)))
        .collect();
    let config = format!(
        "global\n    maxconn 8000\n    nbthread {}\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n\
         frontend bench\n    bind {HAPROXY_VIP}:80\n    default_backend servers\n\
         backend servers\n    balance roundrobin\n{servers}",
        cores()
    );
    let path = std::env::temp_dir().join(format!("{}-haproxy.cfg", lab.id));
    std::fs::write(&path, config)?;
    let haproxy = lab
        .lb
        .ns
        .spawn(
            Path::new("haproxy"),
            &["-q", "-db", "-f", &path.to_string_lossy()],
        )
        .map(Process)
        .context("starting haproxy (is it installed? `cargo xtask bench` installs it)");
    // HAProxy has read its configuration once it answers; the file can go now or on failure.
    let answered = haproxy.and_then(|h| wait_serving(lab, System::Haproxy).map(|()| h));
    let _ = std::fs::remove_file(&path);
    answered
}

/// An nftables balancer on the LB's stack: DNAT to a random backend (`numgen`), SNAT to the
/// LB (so, like `nat`, backends need nothing), conntrack keeping each connection. The ruleset
/// is removed on drop.
struct Nftables<'a>(&'a Lab);

impl<'a> Nftables<'a> {
    fn load(lab: &'a Lab) -> Result<Self> {
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
                 ct status dnat snat to {NFT_SNAT}\n\
               }}\n\
             }}\n",
            lab.backends.len(),
            map.join(", "),
        );
        let file = std::env::temp_dir().join(format!("{}-tcp-nft.conf", lab.id));
        std::fs::write(&file, ruleset)?;
        let loaded = lab.lb.ns.exec(&format!("nft -f {}", file.display()));
        let _ = std::fs::remove_file(&file);
        loaded.context("loading the nftables DNAT + SNAT ruleset (is nftables installed?)")?;
        Ok(Self(lab))
    }
}

impl Drop for Nftables<'_> {
    fn drop(&mut self) {
        let _ = self.0.lb.ns.exec("nft delete table ip xdplb_bench_tcp");
    }
}

/// One window of `system` at every concurrency, appended to `runs`.
fn measure(lab: &Lab, system: System, runs: &mut [Runs]) -> Result<()> {
    wait_serving(lab, system)?;
    for run in runs.iter_mut().filter(|r| r.system == system) {
        let others = Others::start(lab)?;
        let mut o = load::run(&lab.client.ns, system.vip(), run.concurrency, WINDOW)?;
        o.others_cpu = others.share()?;
        println!(
            "  {}, {} in flight: {:.0} connections/s, p50 {:.0} µs, p99 {:.0} µs, {} errors, per backend {:?}, others {:.0} % CPU",
            system.name(),
            run.concurrency,
            o.rate(),
            o.percentile(0.50),
            o.percentile(0.99),
            o.errors,
            o.per_backend,
            o.others_cpu * 100.0
        );
        run.rounds.push(o);
    }
    Ok(())
}

/// Every system at every concurrency, [`ROUNDS`] times, interleaved.
fn measure_all(lab: &Lab) -> Result<Vec<Runs>> {
    // The LB's configuration for every system, set once: the addresses the systems connect
    // to backends from, and forwarding (nftables) without ICMP redirects (forwarding back out
    // of the interface a packet came in on would send the client redirects to the backends).
    let nat_sources: String = (0..ROUNDS)
        .map(|round| format!("ip addr add {}/24 dev eth0 && ", nat_source(round)))
        .collect();
    lab.lb.ns.exec(&format!(
        "ip addr add {NFT_SNAT}/24 dev eth0 && {nat_sources}\
         sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.send_redirects=0 \
         net.ipv4.conf.eth0.send_redirects=0"
    ))?;
    let mut runs: Vec<Runs> = System::ALL
        .iter()
        .flat_map(|&system| {
            CONCURRENCIES.iter().map(move |&concurrency| Runs {
                system,
                concurrency,
                rounds: Vec::with_capacity(ROUNDS),
            })
        })
        .collect();
    // XDP_TX needs the lab's pass program on the LB's bridge port; the others run without.
    lab.lb_port_pass(false)?;
    wait_detached(&lab.switch, "p-lb")?;
    let _haproxy = start_haproxy(lab)?;
    for round in 0..ROUNDS {
        println!(" round {}", round + 1);
        for turn in Turn::ALL.iter().cycle().skip(round).take(Turn::ALL.len()) {
            match turn {
                Turn::Xdplb => {
                    lab.lb_port_pass(true)?;
                    let daemon = start_xdplb(lab, round)?;
                    measure(lab, System::Dsr, &mut runs)?;
                    measure(lab, System::Nat, &mut runs)?;
                    drop(daemon);
                    lab.lb_port_pass(false)?;
                    wait_detached(&lab.lb.ns, "eth0")?;
                    wait_detached(&lab.switch, "p-lb")?;
                }
                Turn::Haproxy => measure(lab, System::Haproxy, &mut runs)?,
                Turn::Nftables => {
                    let _ruleset = Nftables::load(lab)?;
                    measure(lab, System::Nftables, &mut runs)?;
                }
            }
        }
    }
    Ok(runs)
}

/// What work outside the lab took meanwhile, for a figure's text.
fn outside(o: &Outcome) -> String {
    format!(
        "; work outside the lab took {:.0} % of the CPU meanwhile",
        o.others_cpu * 100.0
    )
}

/// Figures of one system at one concurrency, for bench/results.json.
fn summary(runs: &Runs) -> serde_json::Value {
    let o = runs.pooled();
    serde_json::json!({
        "concurrency": o.concurrency,
        "requests": o.requests,
        "errors": o.errors,
        "seconds": o.seconds,
        "rate": o.rate(),
        "rate_per_round": runs.rounds.iter().map(Outcome::rate).collect::<Vec<_>>(),
        "p50_us": o.percentile(0.5),
        "p90_us": o.percentile(0.9),
        "p99_us": o.percentile(0.99),
        "max_us": o.latencies_us.last(),
        "others_cpu": o.others_cpu,
        "per_backend": o.per_backend,
    })
}

pub fn run(report: &mut Report) -> Result<()> {
    println!(
        "TCP connections: {CONCURRENCIES:?} connections in flight, {ROUNDS} interleaved rounds of \
         {} s per system and concurrency, {BACKENDS} nginx backends, {} client threads",
        WINDOW.measured.as_secs_f64(),
        load::CLIENT_THREADS
    );
    let lab = Lab::new(BACKENDS).context("building the lab")?;
    // The switch is a plain bridge: with br_netfilter's defaults every bridged frame also
    // goes through the switch namespace's IP hooks, a cost no real switch adds (about 8 % of
    // all CPU samples at saturation here, the same for every system).
    lab.switch.exec(
        "sysctl -qw net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0 \
         net.bridge.bridge-nf-call-arptables=0",
    )?;
    let servers = (0..BACKENDS)
        .map(|n| nginx(&lab, n))
        .collect::<Result<Vec<_>>>()?;
    for backend in &lab.backends {
        backend.wait_sockets(1, 0)?;
    }
    let runs = measure_all(&lab);
    drop(servers);
    drop(lab);
    let runs = runs?;
    for runs in &runs {
        let o = runs.pooled();
        o.check(runs.system.name())?;
        if o.per_backend.len() != BACKENDS {
            bail!(
                "{} at {} connections: answers came from {:?}, not from all {BACKENDS} backends",
                runs.system.name(),
                o.concurrency,
                o.per_backend
            );
        }
    }
    let pooled = |system: System, concurrency: usize| {
        runs.iter()
            .find(|r| r.system == system && r.concurrency == concurrency)
            .expect("every system is measured at every concurrency")
            .pooled()
    };
    let [dsr, nat, haproxy, nft] = System::ALL.map(|s| pooled(s, TARGET_CONCURRENCY));
    // Per round, to show the spread of the target's ratio.
    let round_ratios: Vec<String> = runs
        .iter()
        .find(|r| r.system == System::Nat && r.concurrency == TARGET_CONCURRENCY)
        .expect("nat measured")
        .rounds
        .iter()
        .zip(
            &runs
                .iter()
                .find(|r| r.system == System::Haproxy && r.concurrency == TARGET_CONCURRENCY)
                .expect("HAProxy measured")
                .rounds,
        )
        .map(|(nat, haproxy)| format!("{:.2}x", nat.rate() / haproxy.rate()))
        .collect();

    let section = report.section("TCP connections (real daemon vs HAProxy and nftables)");
    let measures = format!(
        "{TARGET_CONCURRENCY} connections in flight (closed loops: connect + GET + read to EOF + \
         close), {ROUNDS} interleaved rounds of {} s; client, LB and 2 nginx backends in \
         namespaces on one bridge",
        WINDOW.measured.as_secs_f64()
    );
    let rate_ratio = dsr.rate() / haproxy.rate();
    let p99_ratio = dsr.percentile(0.99) / haproxy.percentile(0.99);
    section.push(
        Figure::new(
            "tcp.xdplb_rate",
            "xdplb dsr: connections/s",
            dsr.rate(),
            "conn/s",
            &format!("{measures}{}", outside(&dsr)),
        )
        .ratio(rate_ratio, "HAProxy")
        .target(">= HAProxy", rate_ratio >= 1.0),
    );
    section.push(Figure::new(
        "tcp.xdplb_p50",
        "xdplb dsr: request latency p50",
        dsr.percentile(0.5),
        "µs",
        "per request, same runs",
    ));
    section.push(
        Figure::new(
            "tcp.xdplb_p99",
            "xdplb dsr: request latency p99",
            dsr.percentile(0.99),
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
            &format!(
                "as above, backends unmodified: both directions translated in XDP; per round {}{}",
                round_ratios.join(", "),
                outside(&nat)
            ),
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
            &format!(
                "numgen random over the backends, SNAT to a second address of the LB, conntrack, \
                 on the LB's stack{}",
                outside(&nft)
            ),
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
        &format!(
            "HAProxy 2.6 (nbthread {}) on the LB namespace, roundrobin, same backends and \
             client{}",
            cores(),
            outside(&haproxy)
        ),
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
    // The other concurrencies, for reference (at 2, each connection's round trips bound the
    // rate, not the systems' cost).
    for runs in runs.iter().filter(|r| r.concurrency != TARGET_CONCURRENCY) {
        let o = runs.pooled();
        let figure = Figure::new(
            &format!("tcp.c{}.{}_rate", o.concurrency, runs.system.key()),
            &format!(
                "{}: connections/s, {} in flight",
                runs.system.name(),
                o.concurrency
            ),
            o.rate(),
            "conn/s",
            &format!(
                "same lab, client and rounds; p50 {:.0} µs, p99 {:.0} µs{}",
                o.percentile(0.5),
                o.percentile(0.99),
                outside(&o)
            ),
        );
        if runs.system != System::Nat {
            section.push(figure);
            continue;
        }
        // nat's ratio at every concurrency, and its targets where the lab is saturated too.
        let haproxy = pooled(System::Haproxy, o.concurrency);
        let rate_ratio = o.rate() / haproxy.rate();
        let p99_ratio = o.percentile(0.99) / haproxy.percentile(0.99);
        let figure = figure.ratio(rate_ratio, "HAProxy");
        if !SATURATED.contains(&o.concurrency) {
            section.push(figure);
            continue;
        }
        section.push(figure.target(">= 1.5x HAProxy", rate_ratio >= 1.5));
        section.push(
            Figure::new(
                &format!("tcp.c{}.nat_p99", o.concurrency),
                &format!(
                    "xdplb nat: request latency p99, {} in flight",
                    o.concurrency
                ),
                o.percentile(0.99),
                "µs",
                &format!("HAProxy's: {:.0} µs", haproxy.percentile(0.99)),
            )
            .ratio(p99_ratio, "HAProxy")
            .target("< HAProxy", p99_ratio < 1.0),
        );
    }
    report.data.insert(
        "tcp".into(),
        serde_json::Value::Object(
            System::ALL
                .iter()
                .map(|system| {
                    let of_system = runs.iter().filter(|r| r.system == *system);
                    (
                        system.key().to_string(),
                        serde_json::Value::Array(of_system.map(summary).collect()),
                    )
                })
                .collect(),
        ),
    );
    for (system, o) in System::ALL.into_iter().zip([dsr, nat, haproxy, nft]) {
        report.cdfs.push(Cdf {
            name: format!("{} ({TARGET_CONCURRENCY} in flight)", system.name()),
            sorted_us: o.latencies_us,
        });
    }
    Ok(())
}
