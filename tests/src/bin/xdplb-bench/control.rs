//! Control plane: Maglev build time, applying 1,000 VIPs into real maps, map memory at 1M
//! flows, the health checker's CPU for 1,000 backends (tcp and https checks), the cost of
//! next-hop resolution, and how long `/healthz` waits while a reload of 1,000 backends runs.

use crate::report::{Figure, Report};
use anyhow::{bail, ensure, Context as _, Result};
use aya::programs::{TestRun, TestRunOptions};
use lb_userspace::{
    dataplane::{Dataplane, Role, Sizes},
    maglev::{self, MaglevBackend},
    model::{BackendSpec, Forwarding, Mac, Protocol, Services, VipAddr},
    net::HostResolver,
    state::{self, Change, Live, Resolve},
};
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};
use xdplb_tests::{
    harness::{vip_spec, ConfiguredMacs, CLIENT_MAC, LB_MAC},
    lab::{sh, xdplb_binary, Netns},
    packet::{Packet, TCP_SYN},
    pki::{Ca, ServerCert},
};

const MAGLEV_M: u32 = 65_537;
const APPLY_VIPS: usize = 1_000;
const APPLY_BACKENDS: usize = 10;
/// Ring size per VIP in the 1,000-VIP config: prime, ~100 slots per backend.
const APPLY_RING: u32 = 1021;
const FLOWS: u32 = 1 << 20;
const HEALTH_BACKENDS: usize = 1_000;
const HEALTH_WINDOW: Duration = Duration::from_secs(10);
const HEALTH_PORT: u16 = 8080;
/// Where the https checks go: a TLS server answering `200` to every request.
const HTTPS_PORT: u16 = 8443;
/// Threads of that server doing handshakes (the daemon's CPU is what is measured).
const HTTPS_WORKERS: usize = 2;
const STARTUP_BACKENDS: usize = 100;
const STARTUP_WINDOW: Duration = Duration::from_secs(15);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn maglev(report: &mut Report) -> Result<()> {
    let section = report.section("Control plane");
    for n in [10usize, 100, 1000] {
        let keys: Vec<String> = (0..n)
            .map(|i| format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256))
            .collect();
        let backends: Vec<MaglevBackend<'_>> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| MaglevBackend {
                key: key.as_bytes(),
                id: i as u32,
                weight: 100,
            })
            .collect();
        let runs = if n >= 1000 { 5 } else { 9 };
        let mut times = Vec::new();
        for run in 0..runs {
            let start = Instant::now();
            let table = maglev::build_table(&backends, MAGLEV_M, run)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
            ensure!(table.len() == MAGLEV_M as usize, "table of {}", table.len());
        }
        let ms = median(times);
        println!("  Maglev M = {MAGLEV_M}, N = {n}: {ms:.2} ms");
        let mut figure = Figure::new(
            &format!("control.maglev_n{n}"),
            &format!("Maglev table build, M = 65537, N = {n}"),
            ms,
            "ms",
            "lb_userspace::maglev::build_table, equal weights, median of 5-9 builds",
        );
        if n == 100 {
            figure = figure.target("< 5 ms", ms < 5.0);
        }
        section.push(figure);
    }
    Ok(())
}

/// The 1,000-VIP config: VIP i is 198.19.(i / 256).(i % 256):80, backends 10.(i / 256).(i %
/// 256).(1..=10), each with a MAC so no neighbour lookup is involved.
fn many_vips() -> Services {
    let vips = (0..APPLY_VIPS)
        .map(|i| {
            let (hi, lo) = ((i / 256) as u8, (i % 256) as u8);
            let backends: Vec<(IpAddr, [u8; 6], u32)> = (0..APPLY_BACKENDS as u8)
                .map(|b| {
                    (
                        IpAddr::V4(Ipv4Addr::new(10, hi, lo, b + 1)),
                        [0x02, 0x0b, hi, lo, b + 1, 0],
                        100,
                    )
                })
                .collect();
            vip_spec(
                &format!("vip{i}"),
                VipAddr {
                    addr: IpAddr::V4(Ipv4Addr::new(198, 19, hi, lo)),
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                Forwarding::Dsr,
                APPLY_RING,
                &backends,
            )
        })
        .collect();
    Services {
        vips,
        ..Services::default()
    }
}

fn apply_many(report: &mut Report) -> Result<()> {
    let sizes = Sizes {
        nat_table_size: lb_common::DEFAULT_NAT_TABLE_SIZE,
        max_vips: APPLY_VIPS as u32,
        max_backends: (APPLY_VIPS * APPLY_BACKENDS) as u32,
        max_ring_size: APPLY_RING,
        flow_table_size: 1024,
    };
    let services = many_vips();
    let mut dataplane = Dataplane::load(Role::Balancer, sizes, None)?;
    let start = Instant::now();
    let target = state::target(&services, |_, _| Default::default(), &ConfiguredMacs)?;
    let (changes, live) = state::plan(&Live::empty(sizes), &target)?;
    let planned = start.elapsed();
    state::apply(&mut dataplane, &changes)?;
    let total = start.elapsed();
    let ring_writes: usize = state::ring_slot_writes(&changes);
    let map_writes = changes.len()
        - changes
            .iter()
            .filter(|c| matches!(c, Change::WriteRing(_)))
            .count()
        + ring_writes;

    // Check: every VIP is in the map, and the last one forwards a SYN to one of its backends.
    ensure!(
        dataplane.vips()?.len() == APPLY_VIPS,
        "not every VIP was written"
    );
    let last = APPLY_VIPS - 1;
    let (hi, lo) = ((last / 256) as u8, (last % 256) as u8);
    let frame = Packet::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(
            Ipv4Addr::new(198, 51, 100, 1),
            Ipv4Addr::new(198, 19, hi, lo),
        )
        .tcp(40000, 80)
        .flags(TCP_SYN)
        .build();
    let mut out = vec![0u8; frame.len() + 64];
    let result = dataplane.program().test_run(TestRunOptions {
        data_in: Some(&frame),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    })?;
    ensure!(
        result.return_value == 3,
        "VIP {last} did not forward (action {})",
        result.return_value
    );
    ensure!(
        out[..4] == [0x02, 0x0b, hi, lo],
        "VIP {last} forwarded to a MAC that is not its backend's"
    );

    // An incremental change: one backend of one VIP re-weighted.
    let mut changed = services.clone();
    changed.vips[500].backends[3].weight = 300;
    let start = Instant::now();
    let target = state::target(&changed, |_, _| Default::default(), &ConfiguredMacs)?;
    let (changes, _) = state::plan(&live, &target)?;
    state::apply(&mut dataplane, &changes)?;
    let incremental = start.elapsed();
    drop(dataplane);

    let secs = total.as_secs_f64();
    let write_secs = (total - planned).as_secs_f64();
    let syscall_writes = map_writes - ring_writes;
    println!(
        "  apply {APPLY_VIPS} VIPs x {APPLY_BACKENDS} backends (ring {APPLY_RING}): {secs:.2} s \
         (target+plan {:.2} s, writes {write_secs:.3} s: {ring_writes} ring slots + \
         {syscall_writes} other map writes); one re-weight: {:.1} ms",
        planned.as_secs_f64(),
        incremental.as_secs_f64() * 1e3
    );
    // The default ring size: target + plan are pure, so they run without maps (the ring map
    // for 1,000 VIPs x 65537 slots x 2 halves would take 1 GiB).
    let big = Sizes {
        max_ring_size: MAGLEV_M,
        ..sizes
    };
    let mut big_services = services.clone();
    for vip in &mut big_services.vips {
        vip.ring_size = MAGLEV_M;
    }
    let start = Instant::now();
    let target = state::target(&big_services, |_, _| Default::default(), &ConfiguredMacs)?;
    let (big_changes, _) = state::plan(&Live::empty(big), &target)?;
    let big_plan = start.elapsed().as_secs_f64();
    let big_slots: usize = state::ring_slot_writes(&big_changes);
    drop(big_changes);
    println!("  target + plan of the same config with ring_size {MAGLEV_M}: {big_plan:.2} s ({big_slots} slots)");
    let section = report.section("Control plane");
    section.push(
        Figure::new(
            "control.apply_1000_vips",
            "apply 1,000 VIPs x 10 backends (ring_size 1021)",
            secs,
            "s",
            "state::target + plan + apply into freshly loaded maps (Dataplane::load, max_vips 1000, max_backends 10000), configured MACs; checked: 1000 VIPs in the map, last VIP forwards",
        )
        .target("< 2 s", secs < 2.0),
    );
    section.push(Figure::new(
        "control.apply_plan_share",
        "  of which target + plan (Maglev tables, diff)",
        planned.as_secs_f64(),
        "s",
        "pure computation: 1,000 Maglev tables of 1021 slots",
    ));
    section.push(Figure::new(
        "control.apply_writes",
        "  of which map writes",
        write_secs,
        "s",
        &format!(
            "{ring_writes} ring slots stored through the mmap'ed ring array (BPF_F_MMAPABLE) + {syscall_writes} bpf_map_update_elem syscalls (VIPs, backends, counters)"
        ),
    ));
    section.push(Figure::new(
        "control.plan_default_ring",
        "  target + plan of the same config with ring_size 65537",
        big_plan,
        "s",
        &format!(
            "measured without maps ({big_slots} slots; the ring map would take 1 GiB); the writes are mmap stores, so this is about the whole apply"
        ),
    ));
    section.push(Figure::new(
        "control.apply_incremental",
        "re-weight one backend of one VIP (of 1,000)",
        incremental.as_secs_f64() * 1e3,
        "ms",
        "target + plan + apply of the whole config again; only the changed VIP's differing ring slots are written",
    ));
    report.data.insert(
        "apply".into(),
        serde_json::json!({
            "vips": APPLY_VIPS, "backends_per_vip": APPLY_BACKENDS, "ring_size": APPLY_RING,
            "plan_seconds_ring_65537": big_plan,
            "map_writes": map_writes, "ring_slot_writes": ring_writes,
            "seconds": secs, "plan_seconds": planned.as_secs_f64(),
        }),
    );
    Ok(())
}

/// Every BPF map fd of this process: fd -> fdinfo fields.
fn map_fds() -> Result<BTreeMap<i32, BTreeMap<String, String>>> {
    let mut maps = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.to_string_lossy() != "anon_inode:bpf-map" {
            continue;
        }
        let fd: i32 = entry.file_name().to_string_lossy().parse()?;
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        let fields = info
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        maps.insert(fd, fields);
    }
    Ok(maps)
}

fn memory(report: &mut Report) -> Result<()> {
    let sizes = Sizes {
        flow_table_size: FLOWS,
        ..Sizes::default()
    };
    let before = map_fds()?;
    let mut dataplane = Dataplane::load(Role::Balancer, sizes, None)?;
    let services = Services {
        vips: vec![vip_spec(
            "web",
            VipAddr {
                addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
                port: 80,
                protocol: Protocol::Tcp,
            },
            Forwarding::Dsr,
            maglev::DEFAULT_RING_SIZE,
            &[
                (
                    IpAddr::V4(Ipv4Addr::new(10, 1, 0, 11)),
                    [2, 0, 0, 0, 0x0b, 0x11],
                    100,
                ),
                (
                    IpAddr::V4(Ipv4Addr::new(10, 1, 0, 12)),
                    [2, 0, 0, 0, 0x0b, 0x12],
                    100,
                ),
            ],
        )],
        ..Services::default()
    };
    let target = state::target(&services, |_, _| Default::default(), &ConfiguredMacs)?;
    let (changes, _) = state::plan(&Live::empty(sizes), &target)?;
    state::apply(&mut dataplane, &changes)?;
    let mine: Vec<BTreeMap<String, String>> = map_fds()?
        .into_iter()
        .filter(|(fd, _)| !before.contains_key(fd))
        .map(|(_, info)| info)
        .collect();

    // Fill the flow table: one new flow per call (fresh source address and port).
    let mut frame = Packet::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(Ipv4Addr::new(100, 64, 0, 0), Ipv4Addr::new(192, 0, 2, 10))
        .tcp(1024, 80)
        .flags(TCP_SYN)
        .build();
    let mut out = vec![0u8; frame.len() + 64];
    let start = Instant::now();
    for i in 0..FLOWS {
        frame[26..30].copy_from_slice(&(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i).to_be_bytes());
        let result = dataplane.program().test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })?;
        if result.return_value != 3 {
            bail!("new flow {i}: action {}", result.return_value);
        }
    }
    let fill = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let entries = dataplane.flows()?.len();
    let listing = start.elapsed().as_secs_f64();
    let counters = dataplane.global_counters()?;
    let evicted = counters[lb_common::counters::FLOW_EVICTED as usize];
    drop(dataplane);

    let mut total = 0u64;
    let mut per_map = Vec::new();
    // The dataplane holds some maps through two fds (e.g. the pinned-flow map, for batch reads).
    let mut seen = std::collections::BTreeSet::new();
    for info in &mine {
        let memlock: u64 = info
            .get("memlock")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let id: u32 = info.get("map_id").and_then(|v| v.parse().ok()).unwrap_or(0);
        if !seen.insert(id) {
            continue;
        }
        let name = aya::maps::MapInfo::from_id(id)
            .ok()
            .and_then(|i| i.name_as_str().map(str::to_string))
            .unwrap_or_else(|| format!("id {id}"));
        total += memlock;
        per_map.push((
            name,
            memlock,
            info.get("max_entries").cloned().unwrap_or_default(),
        ));
    }
    per_map.sort_by_key(|m| std::cmp::Reverse(m.1));
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "  maps at {entries} flows: {:.1} MiB ({}); filled in {fill:.1} s, listed in {listing:.1} s",
        mib(total),
        per_map
            .iter()
            .take(4)
            .map(|(n, b, _)| format!("{n} {:.1} MiB", mib(*b)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // As many flows as slots: four-way sets overflow first (a Poisson(4) set holds on
    // average 3.22 of its flows), so about 80 % stay, and every other one was an eviction.
    ensure!(
        entries as f64 > FLOWS as f64 * 0.75 && entries as u64 + evicted == FLOWS as u64,
        "the flow table holds {entries} entries and counted {evicted} evictions after {FLOWS} new flows"
    );
    let flows_map = per_map
        .iter()
        .find(|(n, _, _)| n.starts_with("FLOWS"))
        .map(|(_, b, _)| *b)
        .unwrap_or(0);
    let section = report.section("Control plane");
    section.push(Figure::new(
        "control.memory_1m_flows",
        "map memory with 1M flows (default sizes)",
        mib(total),
        "MiB",
        &format!(
            "sum of memlock in /proc/self/fdinfo of the balancer's {} maps, flow_table_size 1,048,576 filled to {entries} entries by TestRun new-flow calls; max_vips 64 x max_ring_size 65537 rings",
            per_map.len()
        ),
    ));
    section.push(Figure::new(
        "control.memory_flows_map",
        "  of which the flow table (set-associative array, 64-byte slots)",
        mib(flows_map),
        "MiB",
        &format!(
            "{:.0} bytes per slot, {:.0} per flow held",
            flows_map as f64 / FLOWS as f64,
            flows_map as f64 / entries.max(1) as f64
        ),
    ));
    section.push(Figure::new(
        "control.flow_listing",
        "list 1M flows (Dataplane::flows, as `xdplb flows`)",
        listing,
        "s",
        "Dataplane::flows: a scan of the flow table's mapping",
    ));
    report.data.insert(
        "memory".into(),
        serde_json::json!({
            "flow_entries": entries,
            "evicted": evicted,
            "fill_seconds": fill,
            "maps": per_map.iter().map(|(n, b, e)| serde_json::json!({"name": n, "memlock": b, "max_entries": e})).collect::<Vec<_>>(),
        }),
    );
    Ok(())
}

/// `xdplb run` in its own namespace, killed and cleaned up on drop.
struct HealthDaemon {
    child: Child,
    dir: PathBuf,
}

/// How a measured daemon runs.
#[derive(Clone, Copy)]
struct DaemonSetup<'a> {
    /// Health check kind: "tcp", "https" or "none".
    kind: &'a str,
    /// Port every backend is checked on.
    port: u16,
    backends: usize,
    /// Thresholds; huge ones keep every backend "unknown", so no transition (and no apply it
    /// triggers) happens during the measurement.
    rise: u32,
    /// `daemon.metrics_listen`, when the measurement asks `/healthz`.
    metrics_listen: Option<&'a str>,
}

impl HealthDaemon {
    fn start(ns: &Netns, dir: &Path, setup: &DaemonSetup<'_>) -> Result<Self> {
        let DaemonSetup {
            kind,
            port,
            backends,
            rise,
            metrics_listen,
        } = *setup;
        std::fs::create_dir_all(dir)?;
        let bpffs = dir.join("bpffs");
        std::fs::create_dir_all(&bpffs)?;
        sh(&format!("mount -t bpf bpf {}", bpffs.display()))?;
        let socket = dir.join("admin.sock");
        let mut config = format!(
            "[daemon]\ninterfaces = [\"eth0\"]\nadmin_socket = \"{}\"\nstate_dir = \"{}\"\n\
             pin_dir = \"{}\"\nflow_table_size = 1024\nmax_vips = 128\nmax_backends = 1024\n\
             max_ring_size = 1021\n",
            socket.display(),
            dir.join("state").display(),
            bpffs.join("xdplb").display()
        );
        if let Some(listen) = metrics_listen {
            config += &format!("metrics_listen = \"{listen}\"\n");
        }
        for v in 0..backends / 10 {
            config += &format!(
                "[[vip]]\nname = \"v{v}\"\naddress = \"192.0.2.{}\"\nport = 80\nprotocol = \"tcp\"\n\
                 forwarding = \"dsr\"\nring_size = 1021\n\
                 [vip.health]\nkind = \"{kind}\"\nport = {port}\ninterval = \"1s\"\n\
                 timeout = \"500ms\"\nrise = {rise}\nfall = {rise}\n",
                v + 1
            );
            for b in 0..10 {
                config += &format!(
                    "[[vip.backend]]\naddress = \"127.1.{v}.{}\"\nmac = \"02:00:00:00:00:01\"\n",
                    b + 1
                );
            }
        }
        let path = dir.join("xdplb.toml");
        std::fs::write(&path, config)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "env", "XDPLB_LOG=error"])
            .arg(std::fs::canonicalize(xdplb_binary())?)
            .args(["run", "-c"])
            .arg(&path)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(dir.join("daemon.log"))?)
            .spawn()
            .context("starting xdplb run")?;
        let mut daemon = Self {
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = Command::new(xdplb_binary())
                .arg("--socket")
                .arg(&socket)
                .arg("status")
                .output()?;
            if status.status.success() {
                break;
            }
            if let Some(exit) = daemon.child.try_wait()? {
                bail!(
                    "xdplb run exited ({exit}): {}",
                    std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("xdplb run did not come up in 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = &mut daemon;
        Ok(daemon)
    }

    /// `xdplb <args>` against this daemon.
    fn cli(&self, args: &[&str]) -> Result<()> {
        let out = Command::new(xdplb_binary())
            .arg("--socket")
            .arg(self.dir.join("admin.sock"))
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "xdplb {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// User + system CPU seconds of the daemon so far.
    fn cpu_seconds(&self) -> Result<f64> {
        Ok(self.cpu()?.0)
    }

    /// CPU seconds (user + system) so far: (the daemon's, its waited-for children's).
    fn cpu(&self) -> Result<(f64, f64)> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name, which is in parentheses and may contain spaces.
        let rest = stat.rsplit_once(')').context("malformed stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| -> Result<u64> { Ok(fields[i].parse::<u64>()?) };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok((
            (field(11)? + field(12)?) as f64 / hz,
            (field(13)? + field(14)?) as f64 / hz,
        ))
    }
}

impl Drop for HealthDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = sh(&format!("umount -l {}", self.dir.join("bpffs").display()));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP server on HEALTH_PORT for every 127.x address of `ns` that accepts and closes,
/// counting connections, until `stop`.
fn health_server(ns: &Netns, stop: &AtomicBool, accepted: &AtomicU64) -> Result<()> {
    ns.enter(|| -> Result<()> {
        let listener = TcpListener::bind(("0.0.0.0", HEALTH_PORT))?;
        listener.set_nonblocking(true)?;
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok(_) => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    })?
}

/// A TLS server on HTTPS_PORT for every 127.x address of `ns`: [`HTTPS_WORKERS`] threads
/// complete the handshakes and answer each request with `200`, counting the answers, until
/// `stop`.
fn https_server(
    ns: &Netns,
    config: &Arc<rustls::ServerConfig>,
    stop: &AtomicBool,
    answered: &AtomicU64,
) -> Result<()> {
    ns.enter(|| -> Result<()> {
        let listener = TcpListener::bind(("0.0.0.0", HTTPS_PORT))?;
        listener.set_nonblocking(true)?;
        let (tx, rx) = mpsc::channel::<TcpStream>();
        let rx = Mutex::new(rx);
        std::thread::scope(|scope| -> Result<()> {
            for _ in 0..HTTPS_WORKERS {
                scope.spawn(|| loop {
                    let next = rx.lock().map(|rx| rx.recv());
                    let Ok(Ok(stream)) = next else { break };
                    if answer_https(stream, config).is_ok() {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            let accepting = (|| -> Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => tx.send(stream)?,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(())
            })();
            // Closing the channel ends the workers.
            drop(tx);
            accepting
        })
    })?
}

/// One https check's connection: the handshake, the request head, a `200`.
fn answer_https(stream: TcpStream, config: &Arc<rustls::ServerConfig>) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let connection = rustls::ServerConnection::new(config.clone())?;
    let mut tls = rustls::StreamOwned::new(connection, stream);
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf)?;
        ensure!(n > 0 && head.len() < 16 * 1024, "no complete request");
        head.extend_from_slice(&buf[..n]);
    }
    tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    tls.flush()?;
    Ok(())
}

/// Daemon CPU over [`HEALTH_WINDOW`] with checks of `kind` on `port`, after `warmup`: (% of
/// one core, checks the backends answered in the window).
fn daemon_cpu(
    ns: &Netns,
    kind: &str,
    port: u16,
    warmup: Duration,
    accepted: &AtomicU64,
) -> Result<(f64, u64)> {
    let dir = std::env::temp_dir().join(format!("{}-{kind}", ns.name));
    let setup = DaemonSetup {
        kind,
        port,
        backends: HEALTH_BACKENDS,
        rise: 1_000_000,
        metrics_listen: None,
    };
    let daemon = HealthDaemon::start(ns, &dir, &setup)?;
    std::thread::sleep(warmup);
    let (cpu0, conns0, t0) = (
        daemon.cpu_seconds()?,
        accepted.load(Ordering::Relaxed),
        Instant::now(),
    );
    std::thread::sleep(HEALTH_WINDOW);
    let (cpu1, conns1) = (daemon.cpu_seconds()?, accepted.load(Ordering::Relaxed));
    let percent = (cpu1 - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    Ok((percent, conns1 - conns0))
}

fn health(report: &mut Report) -> Result<()> {
    let ns = Netns::new(&format!("xh{}", std::process::id() % 100_000))?;
    ns.exec(
        "ip link add eth0 type veth peer name eth1 && ip link set eth0 up && ip link set eth1 up && \
         ip addr add 10.9.0.2/24 dev eth0",
    )?;
    let stop = AtomicBool::new(false);
    let accepted = AtomicU64::new(0);
    let (baseline, checked, startup) = std::thread::scope(|scope| -> Result<_> {
        let server = scope.spawn(|| health_server(&ns, &stop, &accepted));
        let result = (|| -> Result<_> {
            let warmup = Duration::from_secs(2);
            let baseline = daemon_cpu(&ns, "none", HEALTH_PORT, warmup, &accepted)?;
            let warmup = Duration::from_secs(3);
            let checked = daemon_cpu(&ns, "tcp", HEALTH_PORT, warmup, &accepted)?;
            let startup = startup(&ns, &accepted)?;
            Ok((baseline, checked, startup))
        })();
        stop.store(true, Ordering::Relaxed);
        server.join().expect("health server panicked")?;
        result
    })?;
    let https = https_cpu(&ns)?;
    let percent = (checked.0 - baseline.0).max(0.0);
    let rate = checked.1 as f64 / HEALTH_WINDOW.as_secs_f64();
    let https_percent = (https.0 - baseline.0).max(0.0);
    let https_rate = https.1 as f64 / HEALTH_WINDOW.as_secs_f64();
    println!(
        "  https checks, {HEALTH_BACKENDS} backends at 1 s: daemon {:.1} % of a core; \
         {https_rate:.0} checks/s answered",
        https.0
    );
    ensure!(
        https_rate > HEALTH_BACKENDS as f64 * 0.9,
        "only {https_rate:.0} https checks/s were answered (expected ~{HEALTH_BACKENDS})"
    );
    println!(
        "  health checks, {HEALTH_BACKENDS} backends at 1 s: daemon {:.1} % of a core with checks, \
         {:.1} % without; {rate:.0} checks/s answered",
        checked.0, baseline.0
    );
    ensure!(
        rate > HEALTH_BACKENDS as f64 * 0.9,
        "only {rate:.0} checks/s reached the backends (expected ~{HEALTH_BACKENDS})"
    );
    let section = report.section("Control plane");
    section.push(Figure::new(
        "control.health_cpu",
        "health checker CPU, 1,000 backends, tcp checks every 1 s",
        percent,
        "% of a core",
        &format!(
            "xdplb run's CPU (utime+stime from /proc) over 10 s with kind = tcp minus the same daemon with kind = none ({:.1} % vs {:.1} %); {rate:.0} checks/s reached the loopback server",
            checked.0, baseline.0
        ),
    ));
    section.push(Figure::new(
        "control.health_cpu_https",
        "  the same with https checks",
        https_percent,
        "% of a core",
        &format!(
            "kind = \"https\" (rustls, ring; a full TLS 1.3 handshake and a GET per check, no resumption, tls_verify off: certificate and signature not checked) minus kind = none ({:.1} % vs {:.1} %); {https_rate:.0} checks/s answered 200 by a rustls server in the namespace",
            https.0, baseline.0
        ),
    ));
    let (own, children, steady) = startup;
    println!(
        "  daemon from its start, {STARTUP_BACKENDS} tcp-checked backends: {:.1} CPU s in its first {} s \
         ({own:.1} s own, {children:.1} s in children), then {steady:.0} % of a core",
        own + children,
        STARTUP_WINDOW.as_secs()
    );
    section.push(Figure::new(
        "control.startup_cpu_100",
        "daemon start, 100 tcp-checked backends: CPU in the first 15 s",
        own + children,
        "CPU s",
        &format!(
            "xdplb run (rise 2): next hops resolved once (netlink requests) and reused by the ~100 Unknown->Up transitions, coalesced into few applies ({own:.1} s in the daemon, {children:.1} s in child processes; 2 cores = 30 CPU s)"
        ),
    ));
    section.push(Figure::new(
        "control.steady_cpu_100",
        "  then, 15-18 s after the start",
        steady,
        "% of a core",
        "daemon and its children in the steady state: checks plus the round-robin refresh of 32 next hops per second",
    ));
    report.data.insert(
        "health".into(),
        serde_json::json!({
            "backends": HEALTH_BACKENDS, "interval_s": 1, "window_s": HEALTH_WINDOW.as_secs(),
            "daemon_cpu_percent_with_checks": checked.0,
            "daemon_cpu_percent_without": baseline.0,
            "checks_per_second": rate,
            "daemon_cpu_percent_https": https.0,
            "https_checks_per_second": https_rate,
            "startup_backends": STARTUP_BACKENDS,
            "startup_cpu_seconds_own": own,
            "startup_cpu_seconds_children": children,
            "steady_cpu_percent_with_ip": steady,
        }),
    );
    Ok(())
}

/// Daemon CPU with https checks of [`HEALTH_BACKENDS`] backends, against [`https_server`]
/// with a certificate made here: (% of a core, checks answered in the window).
fn https_cpu(ns: &Netns) -> Result<(f64, u64)> {
    let dir = std::env::temp_dir().join(format!("{}-pki", ns.name));
    std::fs::create_dir_all(&dir)?;
    let config = (|| -> Result<_> {
        let cert = Ca::new(&dir, "bench-ca")?.server(&dir, "backends", &[])?;
        ServerCert::server_config(&cert.cert, &cert.key)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let config = config?;
    let stop = AtomicBool::new(false);
    let answered = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let server = scope.spawn(|| https_server(ns, &config, &stop, &answered));
        let result = daemon_cpu(ns, "https", HTTPS_PORT, Duration::from_secs(3), &answered);
        stop.store(true, Ordering::Relaxed);
        server.join().expect("https server panicked")?;
        result
    })
}

/// The daemon (real netlink resolution, default rise) with [`STARTUP_BACKENDS`] tcp-checked
/// backends, from
/// its start: every backend's next hop is resolved once and each health transition applies
/// the config again. Returns (CPU seconds of the daemon and its children
/// over the first [`STARTUP_WINDOW`], % of a core in the steady state after it).
fn startup(ns: &Netns, accepted: &AtomicU64) -> Result<(f64, f64, f64)> {
    let dir = std::env::temp_dir().join(format!("{}-startup", ns.name));
    let setup = DaemonSetup {
        kind: "tcp",
        port: HEALTH_PORT,
        backends: STARTUP_BACKENDS,
        rise: 2,
        metrics_listen: None,
    };
    let started = Instant::now();
    let daemon = HealthDaemon::start(ns, &dir, &setup)?;
    std::thread::sleep(STARTUP_WINDOW.saturating_sub(started.elapsed()));
    let (own, children) = daemon.cpu()?;
    let t = Instant::now();
    let conns = accepted.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(3));
    let (own2, children2) = daemon.cpu()?;
    let steady = (own2 + children2 - own - children) / t.elapsed().as_secs_f64() * 100.0;
    ensure!(
        accepted.load(Ordering::Relaxed) > conns,
        "the startup daemon's checks did not reach the server"
    );
    Ok((own, children, steady))
}

/// What one next-hop resolution costs the daemon (a netlink route lookup per backend).
fn resolver(report: &mut Report) -> Result<()> {
    let ns = Netns::new(&format!("xr{}", std::process::id() % 100_000))?;
    ns.exec(
        "ip link add eth0 type veth peer name eth1 && ip link set eth0 up && ip link set eth1 up && \
         ip addr add 10.0.0.2/24 dev eth0",
    )?;
    let calls = 200;
    let per_call_ms = ns.enter(|| -> Result<f64> {
        let resolver = HostResolver::new(&["eth0".to_string()])?;
        let backend = BackendSpec {
            port: None,
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 11)),
            weight: 100,
            mac: Some(Mac([2, 0, 0, 0, 0, 0x11])),
            health_port: None,
        };
        let start = Instant::now();
        for _ in 0..calls {
            resolver
                .next_hop(&backend)
                .map_err(|e| anyhow::anyhow!("resolving: {e}"))?;
        }
        Ok(start.elapsed().as_secs_f64() * 1e3 / calls as f64)
    })??;
    println!("  next-hop resolution: {per_call_ms:.2} ms per backend");
    let section = report.section("Control plane");
    section.push(Figure::new(
        "control.resolve_per_backend",
        "next-hop resolution per backend (daemon)",
        per_call_ms,
        "ms",
        "net::HostResolver::next_hop with a configured MAC: one netlink RTM_GETROUTE request (an `ip -j route get` process until issue 13: 1.5 ms); the daemon resolves each backend once at start, then re-resolves at most 32 per second (unresolved first, then round robin)",
    ));
    section.push(Figure::new(
        "control.resolve_1000_backends",
        "  => first start with 1,000 backends",
        per_call_ms * 1000.0 / 1e3,
        "s",
        "resolution alone, serial, once; later applies reuse the answers",
    ));
    Ok(())
}

const RELOAD_BACKENDS: usize = 1_000;
const RELOADS: usize = 3;
const RELOAD_METRICS: &str = "127.0.0.1:9466";

/// One `GET /healthz` in the current namespace: how long the answer took.
fn healthz_latency() -> Result<Duration> {
    use std::io::{Read, Write};
    let start = Instant::now();
    let mut stream = std::net::TcpStream::connect(RELOAD_METRICS)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    ensure!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    Ok(start.elapsed())
}

/// `/healthz` asked every 10 ms while `xdplb reload` re-reads a config of 1,000 backends
/// (each reload looks every backend's next hop up again: a netlink lookup each). A daemon that
/// resolves under its lock keeps `/healthz` waiting for the whole reload.
pub fn reload_latency(report: &mut Report) -> Result<()> {
    let ns = Netns::new(&format!("xl{}", std::process::id() % 100_000))?;
    ns.exec(
        "ip link add eth0 type veth peer name eth1 && ip link set eth0 up && ip link set eth1 up && \
         ip addr add 10.9.0.2/24 dev eth0",
    )?;
    let dir = std::env::temp_dir().join(format!("{}-reload", ns.name));
    let setup = DaemonSetup {
        kind: "none",
        port: HEALTH_PORT,
        backends: RELOAD_BACKENDS,
        rise: 2,
        metrics_listen: Some(RELOAD_METRICS),
    };
    let daemon = HealthDaemon::start(&ns, &dir, &setup)?;
    let stop = AtomicBool::new(false);
    let (reloads, latencies) = std::thread::scope(|scope| -> Result<_> {
        let poller = scope.spawn(|| {
            ns.enter(|| -> Result<Vec<Duration>> {
                let mut latencies = Vec::new();
                // Bounded: the reloads end the loop, and so does a 10,000-request cap.
                while !stop.load(Ordering::Relaxed) && latencies.len() < 10_000 {
                    latencies.push(healthz_latency()?);
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(latencies)
            })
        });
        let reloads = (0..RELOADS)
            .map(|_| {
                let start = Instant::now();
                daemon.cli(&["reload"])?;
                Ok(start.elapsed().as_secs_f64())
            })
            .collect::<Result<Vec<f64>>>();
        stop.store(true, Ordering::Relaxed);
        let latencies = poller.join().expect("poller panicked")??;
        Ok((reloads?, latencies))
    })?;
    let mut ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let max = ms.last().copied().unwrap_or(0.0);
    let p99 = ms[(ms.len() * 99 / 100).min(ms.len() - 1)];
    let reload = median(reloads);
    println!(
        "  /healthz during {RELOADS} reloads of {RELOAD_BACKENDS} backends ({reload:.2} s each): \
         max {max:.1} ms, p99 {p99:.1} ms over {} requests",
        ms.len()
    );
    let section = report.section("Control plane");
    section.push(Figure::new(
        "control.healthz_during_reload",
        "/healthz latency during a reload, 1,000 backends (max)",
        max,
        "ms",
        &format!(
            "GET /healthz every 10 ms while `xdplb reload` runs {RELOADS} times ({reload:.2} s each, median; every backend looked up again); p99 {p99:.1} ms over {} requests",
            ms.len()
        ),
    ));
    Ok(())
}

pub fn run(report: &mut Report) -> Result<()> {
    println!("control plane:");
    maglev(report)?;
    apply_many(report)?;
    memory(report)?;
    resolver(report)?;
    health(report)?;
    reload_latency(report)?;
    Ok(())
}
