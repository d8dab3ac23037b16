//! `cargo xtask demo`: the load balancer at work in a lab of network namespaces, narrated.
//!
//! A client, the LB running the real `xdplb` daemon with a real config file, and three backends
//! serving HTTP. The `web` VIP is forwarded by direct server return (backends hold it on `lo`);
//! the `api` VIP reaches the same servers through IPv6 tunnels that the backends strip with
//! `xdplb decap`. Steps: traffic spreads, a drain under a running download, a server failure
//! caught by health checks, stats and metrics, and the tunnelled VIP.
//!
//! Everything is removed on exit, also on failure and on Ctrl-C; `--keep` leaves the lab
//! running and prints how to use it and how to remove it.
//!
//! Usage: `xdplb-demo [--keep]` (as root; `XDPLB_BIN` names the xdplb binary).

use anyhow::{bail, ensure, Context as _, Result};
use lb_userspace::api::{BackendStatus, StatusReport, VipStatus};
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, IsTerminal, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};
use xdplb_tests::lab::{addr, xdplb_binary, Daemon, Host, Lab, Process};

const WEB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const API: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x20);
const METRICS_PORT: u16 = 9650;
/// The download of step 2: 2.5 MB at 500 kB/s, 5 seconds.
const DOWNLOAD: u64 = 2_500_000;
const DOWNLOAD_RATE: u64 = 500_000;

/// Set by SIGINT/SIGTERM; every wait and request loop checks it, so the demo stops promptly and
/// the lab's drops remove everything.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let keep = match args.as_slice() {
        [] => false,
        [flag] if flag == "--keep" => true,
        [flag] if flag == "-h" || flag == "--help" => {
            println!("usage: xdplb-demo [--keep]\n\n  --keep  leave the lab running at the end and print how to use and remove it");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("usage: xdplb-demo [--keep]");
            return ExitCode::from(2);
        }
    };
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("xdplb-demo needs root: it creates network namespaces and loads XDP programs");
        return ExitCode::FAILURE;
    }
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    let started = Instant::now();
    let result = run(keep);
    if INTERRUPTED.load(Ordering::SeqCst) {
        eprintln!("\ninterrupted: the lab has been removed");
        return ExitCode::from(130);
    }
    match result {
        Ok(()) => {
            if !keep {
                println!(
                    "\nDone in {:.0} s; the lab has been removed.",
                    started.elapsed().as_secs_f64()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}\n(the lab has been removed)");
            ExitCode::FAILURE
        }
    }
}

/// Terminal styling, only when stdout is a terminal.
struct Style {
    bold: &'static str,
    dim: &'static str,
    reset: &'static str,
}

impl Style {
    fn new() -> Self {
        if std::io::stdout().is_terminal() {
            Self {
                bold: "\x1b[1m",
                dim: "\x1b[2m",
                reset: "\x1b[0m",
            }
        } else {
            Self {
                bold: "",
                dim: "",
                reset: "",
            }
        }
    }

    fn heading(&self, text: &str) {
        println!("\n{}{text}{}", self.bold, self.reset);
        println!("{}", "─".repeat(text.chars().count()));
    }

    /// A command line as a person would type it, then its output indented.
    fn command(&self, line: &str, output: &str) {
        println!("  {}$ {line}{}", self.dim, self.reset);
        indented(output, "    ");
    }
}

fn indented(text: &str, indent: &str) {
    for line in text.lines() {
        println!("{indent}{line}");
    }
}

/// The lab, the daemon and the processes on the hosts. Fields drop in declaration order: the
/// processes, then the daemon, then the namespaces they run in.
struct Demo {
    decaps: Vec<Process>,
    servers: Vec<Process>,
    daemon: Daemon,
    lab: Lab,
    style: Style,
}

fn run(keep: bool) -> Result<()> {
    let style = Style::new();
    println!(
        "{}xdplb demo{}: an XDP layer-4 load balancer, in a lab of network namespaces",
        style.bold, style.reset
    );
    let lab = Lab::new(3).context("building the lab")?;
    check_interrupted()?;
    let mut servers = Vec::new();
    let mut decaps = Vec::new();
    for (n, b) in lab.backends.iter().enumerate() {
        servers.push(b.serve(&format!("b{n}"), "[::]:80", "tcp")?);
        decaps.push(b.decap(&[b.ip6.into()], &[API.into()])?);
    }
    print_topology(&lab, &style);
    let daemon = Daemon::start_on(&lab.lb.ns, &lab.id, &daemon_keys(&lab), &services(&lab))
        .context("starting the daemon")?;
    let mut demo = Demo {
        decaps,
        servers,
        daemon,
        lab,
        style,
    };
    let result = demo.steps();
    if result.is_err() && !INTERRUPTED.load(Ordering::SeqCst) {
        // What the daemon saw is most of the diagnosis, and it goes with the lab.
        let log = demo.daemon.log();
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("\ndaemon log (last lines):");
        for line in &lines[lines.len().saturating_sub(20)..] {
            eprintln!("  {line}");
        }
    }
    result?;
    if keep {
        demo.keep();
    }
    Ok(())
}

fn print_topology(lab: &Lab, style: &Style) {
    style.heading("The lab");
    println!(
        "  One bridge, every address inside the lab's own namespaces ({}-*):",
        lab.id
    );
    println!();
    println!("    client   {:<11} {}", lab.client.ip4, lab.client.ip6);
    println!(
        "    lb       {:<11} {}   xdplb run: XDP on eth0",
        lab.lb.ip4, lab.lb.ip6
    );
    for (n, b) in lab.backends.iter().enumerate() {
        println!(
            "    b{n}       {:<11} {}  HTTP server on port 80, the VIPs on lo, xdplb decap on eth0",
            b.ip4, b.ip6
        );
    }
    println!();
    println!("  The client routes the VIPs {WEB} (web, direct server return) and {API} (api,");
    println!("  IP-in-IPv6 tunnels) via the LB; backends answer the client directly.");
}

/// The `[daemon]` keys after the interface and paths the lab sets.
fn daemon_keys(lab: &Lab) -> String {
    format!(
        "# Small maps: a lab has few flows.\nflow_table_size = 65536\nmax_vips = 8\n\
         max_backends = 64\nmax_ring_size = 1021\n\
         # Prometheus metrics on the LB's lab address.\nmetrics_listen = \"{}\"\n",
        addr(lab.lb.ip4, METRICS_PORT)
    )
}

fn services(lab: &Lab) -> String {
    let mut text = format!(
        "# Web: direct server return. The LB only rewrites MAC addresses; backends hold the\n\
         # VIP on lo and answer the client themselves.\n\
         [[vip]]\nname = \"web\"\naddress = \"{WEB}\"\nport = 80\nforwarding = \"dsr\"\n\
         ring_size = 1021\n\
         [vip.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"500ms\"\n\
         timeout = \"300ms\"\nrise = 2\nfall = 2\n"
    );
    for b in &lab.backends {
        text += &format!("[[vip.backend]]\naddress = \"{}\"\n", b.ip4);
    }
    text += &format!(
        "\n# Api: the same servers through IPv6-in-IPv6 tunnels (6in6) to each backend's own\n\
         # address; `xdplb decap` on the backends strips the outer header.\n\
         [[vip]]\nname = \"api\"\naddress = \"{API}\"\nport = 80\nforwarding = \"ipip\"\n\
         ring_size = 1021\n\
         [vip.health]\nkind = \"tcp\"\ninterval = \"500ms\"\ntimeout = \"300ms\"\n\
         rise = 2\nfall = 2\n"
    );
    for b in &lab.backends {
        text += &format!("[[vip.backend]]\naddress = \"{}\"\n", b.ip6);
    }
    text
}

/// An HTTP/1.0 reply of the lab server.
struct Reply {
    status: u16,
    /// The `X-Backend` header: which backend answered.
    backend: String,
    body_bytes: u64,
}

/// `GET path` from `target`; `headers` gets the backend's name as soon as the headers are in.
fn http_get(target: SocketAddr, path: &str, headers: impl FnOnce(&str)) -> Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: demo\r\n\r\n")?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP status line: {line:?}"))?;
    let mut backend = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("x-backend") {
                backend = value.trim().to_string();
            }
        }
    }
    headers(&backend);
    let mut body_bytes = 0;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf)? {
            0 => break,
            n => body_bytes += n as u64,
        }
    }
    Ok(Reply {
        status,
        backend,
        body_bytes,
    })
}

/// Counts per backend of `count` requests to `target`; failed requests are counted under "".
fn spread(lab: &Lab, target: SocketAddr, count: usize) -> Result<BTreeMap<String, usize>> {
    lab.client.ns.enter(|| -> Result<BTreeMap<String, usize>> {
        let mut counts = BTreeMap::new();
        for _ in 0..count {
            check_interrupted()?;
            let name = match http_get(target, "/", |_| {}) {
                Ok(reply) if reply.status == 200 => reply.backend,
                _ => String::new(),
            };
            *counts.entry(name).or_default() += 1;
        }
        Ok(counts)
    })?
}

/// Waits (at most `limit`) until `ready` holds for the daemon's status.
fn wait_status(
    daemon: &Daemon,
    what: &str,
    limit: Duration,
    ready: impl Fn(&StatusReport) -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        check_interrupted()?;
        if ready(&status(daemon)?) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn status(daemon: &Daemon) -> Result<StatusReport> {
    serde_json::from_str(&daemon.cli(&["status", "--json"])?).context("parsing xdplb status")
}

/// Every backend of every VIP passed its health checks and takes new flows.
fn all_up(report: &StatusReport) -> bool {
    report
        .vips
        .iter()
        .all(|v| v.available == v.backends.len() && v.backends.iter().all(|b| b.health == "up"))
}

fn vip<'a>(report: &'a StatusReport, name: &str) -> Option<&'a VipStatus> {
    report.vips.iter().find(|v| v.name == name)
}

fn backend<'a>(
    report: &'a StatusReport,
    vip_name: &str,
    addr: IpAddr,
) -> Option<&'a BackendStatus> {
    vip(report, vip_name)?
        .backends
        .iter()
        .find(|b| b.address == addr)
}

impl Demo {
    /// The backend host the lab server `name` ("b1") runs on.
    fn host(&self, name: &str) -> Result<&Host> {
        name.strip_prefix('b')
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| self.lab.backends.get(n))
            .with_context(|| format!("unknown backend name {name:?}"))
    }

    /// `xdplb ARGS` against the demo's daemon, shown with its output.
    fn xdplb(&self, args: &[&str]) -> Result<String> {
        check_interrupted()?;
        let output = self.daemon.cli(args)?;
        self.style
            .command(&format!("xdplb {}", args.join(" ")), &output);
        Ok(output)
    }

    /// Prints per-backend counts as a bar chart, each backend named with its address of the
    /// VIP's family; failures (name "") are shown as such.
    fn print_counts(&self, counts: &BTreeMap<String, usize>, v6: bool) {
        let total: usize = counts.values().sum();
        for (n, b) in self.lab.backends.iter().enumerate() {
            let name = format!("b{n}");
            let address = if v6 {
                b.ip6.to_string()
            } else {
                b.ip4.to_string()
            };
            let count = counts.get(&name).copied().unwrap_or(0);
            let share = 100.0 * count as f64 / total.max(1) as f64;
            let bar = "█".repeat((40 * count).div_ceil(total.max(1)));
            println!("    {name}  {address:<10} {count:>5} {share:>6.1}%  {bar}");
        }
        if let Some(failed) = counts.get("") {
            println!("    failed          {failed:>5}");
        }
    }

    fn steps(&mut self) -> Result<()> {
        let style = &self.style;
        style.heading("The configuration");
        println!("  {}:", self.daemon.config.display());
        println!();
        indented(&std::fs::read_to_string(&self.daemon.config)?, "    │ ");
        let up = wait_status(
            &self.daemon,
            "every backend to pass its health checks",
            Duration::from_secs(20),
            all_up,
        )?;
        println!(
            "\n  The daemon is running (pid {}); all backends passed their health checks after {:.1} s.",
            self.daemon.process.as_ref().map_or(0, |p| p.id()),
            up.as_secs_f64()
        );

        self.step_spread()?;
        self.step_drain()?;
        self.step_failure()?;
        self.step_stats()?;
        self.step_ipip()
    }

    fn step_spread(&self) -> Result<()> {
        self.style
            .heading("1. New connections spread over the backends");
        println!("  300 HTTP requests from the client to http://{WEB}/, each a new connection:");
        println!("  the XDP program hashes it onto a Maglev table of the healthy backends.\n");
        let counts = spread(&self.lab, addr(WEB, 80), 300)?;
        self.print_counts(&counts, false);
        ensure!(!counts.contains_key(""), "some requests failed");
        println!();
        self.xdplb(&["status"])?;
        Ok(())
    }

    fn step_drain(&self) -> Result<()> {
        self.style
            .heading("2. Draining a backend while a download from it runs");
        println!(
            "  The client starts downloading {DOWNLOAD} bytes at {DOWNLOAD_RATE} bytes/s (GET /bytes/{DOWNLOAD}/{DOWNLOAD_RATE})."
        );
        let (tx, rx) = mpsc::channel();
        thread::scope(|scope| -> Result<()> {
            let started = Instant::now();
            let download = scope.spawn(|| {
                self.lab.client.ns.enter(|| {
                    http_get(
                        addr(WEB, 80),
                        &format!("/bytes/{DOWNLOAD}/{DOWNLOAD_RATE}"),
                        |name| {
                            let _ = tx.send(name.to_string());
                        },
                    )
                })
            });
            let name = rx
                .recv_timeout(Duration::from_secs(5))
                .context("the download did not start")?;
            let target = self.host(&name)?.ip4.to_string();
            println!("  It is served by {name} ({target}). Drain {name}:\n");
            self.xdplb(&["drain", "web", &target])?;
            println!("\n  100 new requests meanwhile: none goes to {name}.\n");
            let counts = spread(&self.lab, addr(WEB, 80), 100)?;
            self.print_counts(&counts, false);
            ensure!(
                !counts.contains_key(&name) && !counts.contains_key(""),
                "new requests reached the drained {name} or failed"
            );
            println!("\n  Waiting for {name}'s last flow (the download) to end:\n");
            let wait = self
                .daemon
                .cli(&["drain", "web", &target, "--wait", "--timeout", "30s"])?;
            // --wait prints a progress line every half second; repeats are folded.
            let mut folded: Vec<(String, usize)> = Vec::new();
            for line in wait.lines() {
                match folded.last_mut() {
                    Some((last, n)) if last == line => *n += 1,
                    _ => folded.push((line.to_string(), 1)),
                }
            }
            let shown: Vec<String> = folded
                .iter()
                .map(|(line, n)| match n {
                    1 => line.clone(),
                    n => format!("{line}   (x{n})"),
                })
                .collect();
            self.style.command(
                &format!("xdplb drain web {target} --wait --timeout 30s"),
                &shown.join("\n"),
            );
            let reply = download
                .join()
                .map_err(|_| anyhow::anyhow!("the download thread panicked"))???;
            println!(
                "\n  The download finished: {} of {DOWNLOAD} bytes from {} in {:.1} s, unbroken by the drain.\n",
                reply.body_bytes,
                reply.backend,
                started.elapsed().as_secs_f64()
            );
            ensure!(
                reply.body_bytes == DOWNLOAD && reply.backend == name,
                "the download was cut short"
            );
            self.xdplb(&["undrain", "web", &target])?;
            Ok(())
        })
    }

    fn step_failure(&mut self) -> Result<()> {
        let n = self.lab.backends.len() - 1;
        let name = format!("b{n}");
        let target: IpAddr = self.lab.backends[n].ip4.into();
        self.style.heading(&format!(
            "3. {name}'s server stops: health checks take it out"
        ));
        println!(
            "  The server process on {name} is killed. `web` checks GET /healthz every 500 ms;"
        );
        println!("  two failures in a row mark a backend down and rebuild the table without it.\n");
        self.servers[n].0.kill()?;
        let took = wait_status(
            &self.daemon,
            &format!("{name} to be marked down"),
            Duration::from_secs(10),
            |s| backend(s, "web", target).is_some_and(|b| b.health == "down"),
        )?;
        println!("  Marked down {:.1} s later:\n", took.as_secs_f64());
        let report = status(&self.daemon)?;
        let down = backend(&report, "web", target).context("backend missing from status")?;
        self.xdplb(&["status"])?;
        println!(
            "\n  {name}: health {}, reason: {}",
            down.health,
            down.last_failure.as_deref().unwrap_or("(none)")
        );
        println!("\n  100 new requests: every one succeeds, on the others.\n");
        let counts = spread(&self.lab, addr(WEB, 80), 100)?;
        self.print_counts(&counts, false);
        ensure!(!counts.contains_key(""), "requests failed with {name} down");

        println!("\n  The server starts again; two passed checks bring {name} back.");
        self.servers[n] = self.lab.backends[n].serve(&name, "[::]:80", "tcp")?;
        let took = wait_status(
            &self.daemon,
            &format!("{name} to be up again"),
            Duration::from_secs(10),
            all_up,
        )?;
        println!("  Up again after {:.1} s.", took.as_secs_f64());
        Ok(())
    }

    fn step_stats(&self) -> Result<()> {
        self.style
            .heading("4. Counters: xdplb stats and Prometheus metrics");
        // The daemon reads the counters every stats_interval (1 s): let it see the last step.
        thread::sleep(Duration::from_millis(1100));
        check_interrupted()?;
        self.xdplb(&["stats"])?;
        let metrics = addr(self.lab.lb.ip4, METRICS_PORT);
        println!("\n  An excerpt of http://{metrics}/metrics, fetched from the client:\n");
        let text = self.lab.client.ns.enter(|| -> Result<String> {
            let mut stream = TcpStream::connect_timeout(&metrics, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(stream, "GET /metrics HTTP/1.0\r\nHost: {metrics}\r\n\r\n")?;
            let mut text = String::new();
            stream.read_to_string(&mut text)?;
            Ok(text)
        })??;
        let interesting = [
            "xdplb_vip_new_flows_total",
            "xdplb_backend_new_flows_total{vip=\"web\"",
            "xdplb_xdp_actions_total{action=\"tx\"",
            "xdplb_xdp_actions_total{action=\"pass\"",
            "xdplb_flow_lookups_total",
            "xdplb_health_transitions_total{vip=\"web\"",
            "xdplb_flow_table_entries",
        ];
        let excerpt: Vec<&str> = text
            .lines()
            .filter(|l| interesting.iter().any(|p| l.starts_with(p)))
            .take(18)
            .collect();
        ensure!(!excerpt.is_empty(), "no xdplb metrics in:\n{text}");
        indented(&excerpt.join("\n"), "    ");
        Ok(())
    }

    fn step_ipip(&self) -> Result<()> {
        self.style
            .heading("5. The tunnelled VIP: api over IPv6-in-IPv6");
        println!(
            "  150 requests to http://[{API}]/: the LB wraps each packet in an IPv6 header to"
        );
        println!(
            "  the chosen backend's own address; xdplb decap on the backend strips it, and the"
        );
        println!("  backend answers the client directly.\n");
        let counts = spread(&self.lab, addr(API, 80), 150)?;
        self.print_counts(&counts, true);
        ensure!(!counts.contains_key(""), "requests to the api VIP failed");
        println!();
        self.xdplb(&["flows", "api", "--limit", "5"])?;
        Ok(())
    }

    /// Leaves everything running and says how to use it and remove it.
    fn keep(self) {
        let Demo {
            lab,
            daemon,
            servers,
            decaps,
            style,
        } = self;
        let client = lab.client.ns.name.clone();
        let lb = lab.lb.ns.name.clone();
        let socket = daemon.socket.display().to_string();
        let xdplb = std::fs::canonicalize(xdplb_binary()).unwrap_or_else(|_| xdplb_binary());
        let metrics = addr(lab.lb.ip4, METRICS_PORT);
        let processes = servers.into_iter().chain(decaps).collect();
        let cleanup = lab.leave_running(vec![daemon], processes);
        style.heading("The lab stays up (--keep)");
        println!("  A shell on the client, then requests to the VIPs:");
        println!("    ip netns exec {client} bash");
        println!("    curl http://{WEB}/   curl 'http://[{API}]/'   curl http://{metrics}/metrics");
        println!("  The daemon (in {lb}) and its admin socket, from any shell:");
        println!("    {} --socket {socket} status", xdplb.display());
        println!("    {} --socket {socket} stats --watch", xdplb.display());
        println!("  Remove everything:");
        println!("    {cleanup}");
    }
}
