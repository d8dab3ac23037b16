//! `xdplb run`: owns the data path for its lifetime. Every change (config reload, CLI command,
//! health transition, next-hop change) goes through [`Daemon::apply`]: model + overrides +
//! health -> target -> plan -> map writes.

use crate::{
    announce::{self, Announcer},
    api::{
        self, BackendStatus as ApiBackend, FlowInfo, FlowList, Request, Response, StatusReport,
        VipStatus,
    },
    config::{self, Config},
    dataplane::{Adoption, Dataplane, Role},
    health::{BackendHealth, CheckObserver, HealthEvent, HealthMonitor, State},
    metrics,
    model::{BackendSpec, Mac, OnAllDown, VipSpec},
    net::HostResolver,
    overrides::Overrides,
    state::{self, BackendStatus, Live, NextHop, Resolve, Unresolved},
    stats::{self, BackendSample, Sample, Stats, VipSample},
};
use anyhow::{bail, Context as _, Result};
use lb_common::{FlowKey, FLOW_ACK_SEEN, FLOW_FIN_SEEN, FLOW_RST_SEEN, PROTO_TCP};
use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tracing::{error, info, warn};

/// Flow-table entries one stats interval may scan: a larger table is scanned every
/// `entries / FLOWS_PER_SCAN_PERIOD + 1` intervals.
const FLOWS_PER_SCAN_PERIOD: usize = 100_000;

/// What the last flow-table scan found.
#[derive(Default)]
struct FlowScan {
    /// Backend id -> flows seen within the idle timeout and not closed.
    active: HashMap<u32, u64>,
    entries: u64,
    /// Samples to skip before the next scan.
    countdown: u32,
}

/// How often unresolved next hops are retried and some resolved ones refreshed.
const RESOLVE_INTERVAL: Duration = Duration::from_secs(1);
/// Next hops re-resolved per tick, unresolved ones first: with 1,000 backends each is
/// refreshed about every 30 s (for route changes; neighbour changes arrive as netlink
/// notifications, see [`Daemon::neighbours_changed`]), at a bounded cost.
const REFRESH_PER_TICK: usize = 32;

pub struct Options {
    pub config_path: PathBuf,
    /// On exit, detach the programs and remove the pinned maps (instead of leaving the data
    /// path running for the next daemon to adopt).
    pub detach_on_exit: bool,
}

/// Next hops toward backends, resolved as rarely as possible: resolving costs a route and a
/// neighbour lookup (a netlink request each), so a known answer, good or bad, is reused unless
/// the backend is in `refresh` (the periodic tick retries failures every second). The last
/// good answer also outlives a neighbour entry that briefly disappears, so a flapping ARP
/// entry never pulls a backend out of its ring.
struct Remembering<'a, R> {
    resolver: &'a R,
    known: RefCell<&'a mut NextHops>,
    refresh: &'a BTreeSet<IpAddr>,
}

/// What resolution last said per backend address.
#[derive(Default)]
struct NextHops {
    good: HashMap<IpAddr, NextHop>,
    /// Addresses that never resolved, with why.
    failed: HashMap<IpAddr, String>,
}

impl<R: Resolve> Resolve for Remembering<'_, R> {
    fn next_hop(&self, backend: &BackendSpec) -> Result<NextHop, String> {
        let addr = backend.addr;
        if !self.refresh.contains(&addr) {
            let known = self.known.borrow();
            if let Some(hop) = known.good.get(&addr) {
                return Ok(*hop);
            }
            if let Some(reason) = known.failed.get(&addr) {
                return Err(reason.clone());
            }
        }
        let mut known = self.known.borrow_mut();
        match self.resolver.next_hop(backend) {
            Ok(hop) => {
                known.failed.remove(&addr);
                known.good.insert(addr, hop);
                Ok(hop)
            }
            Err(reason) => match known.good.get(&addr) {
                Some(hop) => Ok(*hop),
                None => {
                    known.failed.insert(addr, reason.clone());
                    Err(reason)
                }
            },
        }
    }
}

pub struct Daemon {
    config_path: PathBuf,
    config: Config,
    dataplane: Dataplane,
    live: Live,
    overrides: Overrides,
    resolver: HostResolver,
    next_hops: NextHops,
    unresolved: Vec<Unresolved>,
    health: HealthMonitor,
    /// Where the round-robin next-hop refresh continues.
    refresh_cursor: usize,
    flow_scan: FlowScan,
    /// Per VIP, the backends last seen healthy (for `on_all_down = "keep"`).
    last_healthy: BTreeMap<String, BTreeSet<IpAddr>>,
    stats: Stats,
    health_metrics: metrics::HealthMetrics,
    /// VIP routes for a BGP daemon (`[daemon.announce]`); none when off, and until the
    /// programs are attached.
    announcer: Option<Announcer>,
    /// Held while the daemon runs: a second `xdplb run` on the same state would take over the
    /// links and the admin socket of this one.
    _instance_lock: std::fs::File,
}

impl Daemon {
    /// Loads the config, loads or adopts the data path, fills the maps, then attaches.
    fn start(options: &Options, health_events: mpsc::UnboundedSender<HealthEvent>) -> Result<Self> {
        let config = config::load(&options.config_path)?;
        let daemon_config = &config.daemon;
        let instance_lock = lock_instance(&daemon_config.state_dir)?;
        ensure_bpffs(&daemon_config.pin_dir)?;
        let mut dataplane = Dataplane::load(
            Role::Balancer,
            daemon_config.sizes,
            Some(&daemon_config.pin_dir),
        )?;
        let live = match dataplane.adoption() {
            Adoption::Adopted => {
                info!("adopting pinned maps: established flows keep their backends");
                Live::adopt(&dataplane)?
            }
            Adoption::Replaced(reason) => {
                warn!("pinned maps replaced, flow table starts empty: {reason}");
                Live::empty(daemon_config.sizes)
            }
            Adoption::Fresh => Live::empty(daemon_config.sizes),
        };
        let resolver = HostResolver::new(&daemon_config.interfaces)?;
        let overrides = Overrides::load(&daemon_config.state_dir)?;
        let health_metrics = metrics::HealthMetrics::default();
        let observer: CheckObserver = {
            let metrics = health_metrics.clone();
            Arc::new(move |_target, vips, took, ok| {
                for vip in vips {
                    metrics.record_check(vip, took, ok);
                }
            })
        };
        let health = HealthMonitor::new(health_events, observer);
        for iface in &daemon_config.interfaces {
            dataplane.add_tx_port(crate::net::interface_index(iface)?)?;
        }
        // A restart must not lose a backend whose neighbour entry happens to be missing right
        // now: the adopted entries hold the next hops the data path is using.
        let next_hops = NextHops {
            good: live
                .vips
                .values()
                .flat_map(|vip| vip.backends.iter())
                .map(|(addr, backend)| {
                    let e = &backend.entry;
                    let hop = NextHop {
                        dst_mac: Mac(e.dst_mac),
                        src_mac: Mac(e.src_mac),
                        ifindex: e.tx_ifindex,
                        mtu: e.mtu,
                    };
                    (*addr, hop)
                })
                .collect(),
            failed: HashMap::new(),
        };
        let mut daemon = Self {
            config_path: options.config_path.clone(),
            config,
            dataplane,
            live,
            overrides,
            resolver,
            next_hops,
            unresolved: Vec::new(),
            refresh_cursor: 0,
            flow_scan: FlowScan::default(),
            health,
            last_healthy: BTreeMap::new(),
            stats: Stats::default(),
            health_metrics,
            announcer: None,
            _instance_lock: instance_lock,
        };
        daemon.sync_health();
        // Maps first, then attach: a fresh program never sees a packet with empty maps.
        daemon.apply()?;
        let mode = daemon.config.daemon.xdp_mode;
        for iface in daemon.config.daemon.interfaces.clone() {
            daemon.dataplane.attach(&iface, mode)?;
            info!(%iface, "XDP program attached");
        }
        daemon.dataplane.remove_older_layouts()?;
        for iface in daemon
            .dataplane
            .detach_others(&daemon.config.daemon.interfaces)?
        {
            info!(%iface, "XDP program detached: the interface is no longer in daemon.interfaces");
        }
        if let Some(config) = daemon.config.daemon.announce.clone() {
            daemon.announcer = Some(Announcer::start(config)?);
            daemon.sync_announcements();
        }
        Ok(daemon)
    }

    /// Starts and stops health checks to match the config.
    fn sync_health(&mut self) {
        self.health.sync(&self.config.services.vips);
    }

    fn is_down(&self, vip: &VipSpec, backend: &BackendSpec) -> bool {
        // Unknown counts as up: at start every backend is unknown, and a restarted daemon
        // must not stop sending new flows until its first checks pass.
        self.health.status(vip, backend).is_down()
    }

    /// Counts a health transition for every VIP backend it concerns.
    fn record_transition(&self, event: &HealthEvent) {
        for vip in &self.config.services.vips {
            for backend in vip.backends.iter().filter(|b| event.applies_to(vip, b)) {
                self.health_metrics.record_transition(
                    &vip.name,
                    &backend.addr.to_string(),
                    &event.to.to_string(),
                );
            }
        }
    }

    /// What a backend's runtime state means for the ring.
    fn backend_status(&self, vip: &VipSpec, backend: &BackendSpec) -> BackendStatus {
        let cli = self.overrides.get(&vip.name, backend.addr);
        let down = self.is_down(vip, backend) && !self.keeping_all_down(vip, backend.addr);
        BackendStatus {
            drained: cli.drained,
            weight: cli.weight,
            down,
        }
    }

    /// With `on_all_down = "keep"`, a VIP whose backends are all down keeps its last healthy
    /// set: a broken checker must not black-hole a service.
    fn keeping_all_down(&self, vip: &VipSpec, backend: IpAddr) -> bool {
        vip.health.on_all_down == OnAllDown::Keep
            && vip.backends.iter().all(|b| self.is_down(vip, b))
            && self
                .last_healthy
                .get(&vip.name)
                .is_some_and(|set| set.contains(&backend))
    }

    /// Makes the maps match config + overrides + health + next hops, reusing known next hops.
    pub fn apply(&mut self) -> Result<()> {
        self.apply_refreshing(&BTreeSet::new())
    }

    /// Every backend address of the config, sorted and once.
    fn backend_addresses(&self) -> BTreeSet<IpAddr> {
        self.config
            .services
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.addr))
            .collect()
    }

    /// The periodic next-hop refresh of at most [`REFRESH_PER_TICK`] backends: unresolved
    /// ones first, then the next slice of the resolved ones, round robin.
    fn refresh_next_hops(&mut self) -> Result<()> {
        let all: Vec<IpAddr> = self.backend_addresses().into_iter().collect();
        let mut refresh: BTreeSet<IpAddr> = self
            .unresolved
            .iter()
            .map(|u| u.backend)
            .take(REFRESH_PER_TICK)
            .collect();
        let room = REFRESH_PER_TICK
            .saturating_sub(refresh.len())
            .min(all.len());
        for i in 0..room {
            refresh.insert(all[(self.refresh_cursor + i) % all.len()]);
        }
        if !all.is_empty() {
            self.refresh_cursor = (self.refresh_cursor + room) % all.len();
        }
        self.apply_refreshing(&refresh)
    }

    /// Like [`apply`](Self::apply), resolving the backends in `refresh` again.
    fn apply_refreshing(&mut self, refresh: &BTreeSet<IpAddr>) -> Result<()> {
        self.remember_healthy_sets();
        let mut statuses: HashMap<(String, IpAddr), BackendStatus> = HashMap::new();
        for vip in &self.config.services.vips {
            for b in &vip.backends {
                statuses.insert((vip.name.clone(), b.addr), self.backend_status(vip, b));
            }
        }
        let resolver = Remembering {
            resolver: &self.resolver,
            known: RefCell::new(&mut self.next_hops),
            refresh,
        };
        let target = state::target(
            &self.config.services,
            |vip, b| statuses[&(vip.name.clone(), b.addr)],
            &resolver,
        )?;
        let (changes, next) = state::plan(&self.live, &target)?;
        if let Err(e) = state::apply(&mut self.dataplane, &changes) {
            // The maps are the truth: re-read them so the next attempt diffs correctly.
            self.live = Live::adopt(&self.dataplane)?;
            return Err(e.into());
        }
        if !changes.is_empty() {
            info!(changes = changes.len(), "data path updated");
        }
        for u in &target.unresolved {
            if !self.unresolved.contains(u) {
                warn!(vip = %u.vip, backend = %u.backend, "backend left out: {}", u.reason);
            }
        }
        self.live = next;
        self.unresolved = target.unresolved;
        // The maps are written: a failed route write is the announcer's to report and retry
        // (every second), not a reason to undo this change.
        self.sync_announcements();
        Ok(())
    }

    /// Announces or withdraws each VIP's route to match what it can serve now.
    fn sync_announcements(&mut self) {
        if self.announcer.is_none() {
            return;
        }
        let program = match self.dataplane.program_id() {
            Ok(id) => id,
            Err(e) => {
                error!("announce: reading the XDP program's id: {e}");
                return;
            }
        };
        let vips: Vec<announce::VipFacts> = self
            .config
            .services
            .vips
            .iter()
            .map(|vip| announce::VipFacts {
                name: &vip.name,
                addr: vip.vip.addr,
                mode: vip.announce,
                backends: vip
                    .backends
                    .iter()
                    .map(|b| {
                        let cli = self.overrides.get(&vip.name, b.addr);
                        announce::BackendFacts {
                            health: self.health.status(vip, b).state,
                            drained: cli.drained,
                            weight_zero: cli.weight.unwrap_or(b.weight) == 0,
                            unresolved: self
                                .unresolved
                                .iter()
                                .any(|u| u.vip == vip.name && u.backend == b.addr),
                        }
                    })
                    .collect(),
            })
            .collect();
        if let Some(announcer) = &mut self.announcer {
            if let Err(e) = announcer.sync(&self.config.daemon.interfaces, program, &vips) {
                error!("announce: {e}");
            }
        }
    }

    /// SIGTERM: withdraws every VIP; returns how long to keep forwarding before exiting.
    fn withdraw_all(&mut self) -> Duration {
        let Some(announcer) = &mut self.announcer else {
            return Duration::ZERO;
        };
        if let Err(e) = announcer.withdraw_all() {
            error!("withdrawing the VIP routes: {e}");
        }
        announcer.withdraw_grace()
    }

    fn remember_healthy_sets(&mut self) {
        for vip in &self.config.services.vips {
            let healthy: BTreeSet<IpAddr> = vip
                .backends
                .iter()
                .filter(|b| !self.is_down(vip, b))
                .map(|b| b.addr)
                .collect();
            if !healthy.is_empty() {
                self.last_healthy.insert(vip.name.clone(), healthy);
            } else if vip.health.on_all_down == OnAllDown::Keep {
                warn!(vip = %vip.name, "every backend is down: on_all_down = \"keep\" keeps the last healthy set in the ring");
            }
        }
    }

    /// Re-resolves the backends whose neighbour (the backend or its gateway) now has another
    /// MAC, or none (failed, deleted: resolving again restarts ARP/ND; the last good MAC is
    /// kept meanwhile, see [`Remembering`]).
    fn neighbours_changed(&mut self, changes: &[crate::net::NeighbourChange]) -> Result<()> {
        let refresh: BTreeSet<IpAddr> = changes
            .iter()
            .flat_map(|change| {
                let known = &self.next_hops.good;
                self.resolver
                    .backends_via(change.addr)
                    .into_iter()
                    .filter(move |b| {
                        change.mac.is_none() || known.get(b).map(|hop| hop.dst_mac) != change.mac
                    })
            })
            .collect();
        if refresh.is_empty() {
            return Ok(());
        }
        info!(
            backends = refresh.len(),
            "neighbour change: resolving again"
        );
        self.apply_refreshing(&refresh)
    }

    /// Re-reads the config file. A file that fails validation, or that changes settings only
    /// a restart can apply, is rejected and the running config keeps serving.
    pub fn reload(&mut self) -> Result<String> {
        let new = config::load(&self.config_path)?;
        let restart_only = restart_only_changes(&self.config, &new);
        if !restart_only.is_empty() {
            bail!(
                "{} changed: these take effect only with a restart (`systemctl restart xdplb`); \
                 the running config keeps serving",
                restart_only.join(", ")
            );
        }
        let old = std::mem::replace(&mut self.config, new);
        // A reload may change a backend's `mac` or bring new backends: resolve them all.
        if let Err(e) = self.apply_refreshing(&self.backend_addresses()) {
            self.config = old;
            self.apply()
                .context("restoring the previous config after a failed reload")?;
            return Err(
                e.context("the new config could not be applied; the previous one keeps serving")
            );
        }
        self.sync_health();
        self.forget_removed(&old);
        if self.overrides.prune(&self.config.services) {
            self.overrides.save(&self.config.daemon.state_dir)?;
        }
        Ok(format!(
            "reloaded {}: {} VIPs",
            self.config_path.display(),
            self.config.services.vips.len()
        ))
    }

    fn find_backend(&self, vip: &str, backend: IpAddr) -> Result<(String, u32)> {
        let spec = self.find_vip(vip)?;
        let b = spec
            .backends
            .iter()
            .find(|b| b.addr == backend)
            .with_context(|| format!("VIP {} has no backend {backend}", spec.name))?;
        Ok((spec.name.clone(), b.weight))
    }

    /// A VIP by name or by address ("192.0.2.10:80", "[2001:db8::1]:80", "192.0.2.10").
    fn find_vip(&self, vip: &str) -> Result<&VipSpec> {
        let vips = &self.config.services.vips;
        vips.iter()
            .find(|v| v.name == vip)
            .or_else(|| {
                vips.iter().find(|v| {
                    let full = v.vip.to_string();
                    full == vip
                        || full.rsplit_once('/').is_some_and(|(addr, _)| addr == vip)
                        || v.vip.addr.to_string() == vip
                })
            })
            .with_context(|| {
                let names: Vec<&str> = vips.iter().map(|v| v.name.as_str()).collect();
                format!("no VIP {vip:?} (configured: {})", names.join(", "))
            })
    }

    fn set_override(
        &mut self,
        vip: &str,
        backend: IpAddr,
        change: impl FnOnce(&mut crate::overrides::Override),
    ) -> Result<String> {
        let (name, _) = self.find_backend(vip, backend)?;
        let before = self.overrides.clone();
        self.overrides.update(&name, backend, change);
        if let Err(e) = self.apply() {
            self.overrides = before;
            return Err(e);
        }
        self.overrides.save(&self.config.daemon.state_dir)?;
        let now = self.overrides.get(&name, backend);
        Ok(format!(
            "{name} {backend}: {}{}",
            if now.drained { "drained" } else { "in service" },
            now.weight
                .map(|w| format!(", weight {w} (cli)"))
                .unwrap_or_default()
        ))
    }

    fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Status => self.status().map(Response::Status),
            Request::Reload => self.reload().map(Response::Done),
            Request::Drain { vip, backend } => self
                .set_override(&vip, backend, |o| o.drained = true)
                .map(Response::Done),
            Request::Undrain { vip, backend } => self
                .set_override(&vip, backend, |o| o.drained = false)
                .map(Response::Done),
            Request::Weight {
                vip,
                backend,
                weight,
            } => self
                .set_override(&vip, backend, |o| o.weight = weight)
                .map(Response::Done),
            Request::Flows {
                vip,
                backend,
                limit,
            } => self
                .flows(vip.as_deref(), backend, limit)
                .map(Response::Flows),
            Request::Stats => Ok(Response::Stats(self.stats.snapshot().clone())),
        };
        result.unwrap_or_else(|e| Response::Error(format!("{e:#}")))
    }

    /// Reads the flow table when its scan is due: every sample up to [`FLOWS_PER_SCAN_PERIOD`]
    /// entries, then less often (a million flows take about half a second to read, under the
    /// daemon's lock), so the active-flow counts lag by up to ~10 s on huge tables.
    fn scan_flows_if_due(&mut self) -> Result<()> {
        if self.flow_scan.countdown > 0 {
            self.flow_scan.countdown -= 1;
            return Ok(());
        }
        let flows = self.dataplane.flows()?;
        self.flow_scan.active = stats::active_flows(
            &flows,
            stats::monotonic_seconds(),
            self.config.daemon.flow_idle_timeout.as_secs() as u32,
        );
        self.flow_scan.entries = flows.len() as u64;
        self.flow_scan.countdown = (flows.len() / FLOWS_PER_SCAN_PERIOD) as u32;
        Ok(())
    }

    fn status(&self) -> Result<StatusReport> {
        let active = &self.flow_scan.active;
        let vips = self
            .config
            .services
            .vips
            .iter()
            .map(|vip| {
                let live = self.live.vips.get(&state::vip_key(&vip.vip));
                let backends: Vec<ApiBackend> = vip
                    .backends
                    .iter()
                    .map(|b| {
                        let cli = self.overrides.get(&vip.name, b.addr);
                        let status = self.backend_status(vip, b);
                        let health: BackendHealth = self.health.status(vip, b);
                        let live_backend = live.and_then(|l| l.backends.get(&b.addr));
                        let next_hop = match self.next_hops.good.get(&b.addr) {
                            Some(hop) if live_backend.is_some() => {
                                format!("{} ifindex {}", hop.dst_mac, hop.ifindex)
                            }
                            _ => self
                                .unresolved
                                .iter()
                                .find(|u| u.vip == vip.name && u.backend == b.addr)
                                .map(|u| format!("unresolved: {}", u.reason))
                                .unwrap_or_else(|| "unresolved".into()),
                        };
                        ApiBackend {
                            address: b.addr,
                            configured_weight: b.weight,
                            cli_weight: cli.weight,
                            effective_weight: live_backend.map_or(0, |l| l.ring_weight),
                            drained: status.drained,
                            health: health.state.to_string(),
                            health_since_s: health.since.map(|t| t.elapsed().as_secs()),
                            last_failure: health.last_failure.map(|f| f.reason),
                            active_flows: live_backend
                                .and_then(|l| active.get(&l.id))
                                .copied()
                                .unwrap_or(0),
                            next_hop,
                        }
                    })
                    .collect();
                VipStatus {
                    name: vip.name.clone(),
                    address: vip.vip.to_string(),
                    forwarding: vip.forwarding.to_string(),
                    ring_size: vip.ring_size,
                    available: backends.iter().filter(|b| b.effective_weight > 0).count(),
                    announce: self
                        .announcer
                        .as_ref()
                        .and_then(|a| a.announcement(&vip.name))
                        .map(|a| a.state),
                    backends,
                }
            })
            .collect();
        Ok(StatusReport {
            config_file: self.config_path.clone(),
            interfaces: self.config.daemon.interfaces.clone(),
            maps: match self.dataplane.adoption() {
                Adoption::Fresh => "fresh".into(),
                Adoption::Adopted => "adopted from the previous run".into(),
                Adoption::Replaced(why) => format!("replaced ({why})"),
            },
            vips,
        })
    }

    fn flows(&self, vip: Option<&str>, backend: Option<IpAddr>, limit: usize) -> Result<FlowList> {
        let vip_filter = vip
            .map(|v| self.find_vip(v).map(|s| s.name.clone()))
            .transpose()?;
        let now = stats::monotonic_seconds();
        // Backend id -> (VIP name, backend address), from what this daemon wrote.
        let owners: HashMap<u32, (&str, IpAddr)> = self
            .live
            .vips
            .values()
            .flat_map(|v| {
                v.backends
                    .iter()
                    .map(move |(addr, b)| (b.id, (v.name.as_str(), *addr)))
            })
            .collect();
        let mut matching: Vec<_> = self
            .dataplane
            .flows()?
            .into_iter()
            .filter_map(|(key, value)| {
                let (vip_name, backend_addr) = owners.get(&value.backend_id)?;
                let wanted = vip_filter.as_deref().is_none_or(|v| v == *vip_name)
                    && backend.is_none_or(|b| b == *backend_addr);
                wanted.then_some((key, value, *vip_name, *backend_addr))
            })
            .collect();
        let matched = matching.len();
        // Oldest first, then cut: the longest-lived flows are the ones a drain waits for.
        matching.sort_by_key(|(_, value, ..)| value.created);
        let flows = matching
            .into_iter()
            .take(limit)
            .map(|(key, value, vip_name, backend_addr)| FlowInfo {
                client: socket_text(&key, true),
                vip: vip_name.to_string(),
                protocol: if key.proto == PROTO_TCP { "tcp" } else { "udp" }.into(),
                backend: backend_addr,
                age_s: now.saturating_sub(value.created),
                idle_s: now.saturating_sub(value.last_seen),
                state: flow_state(key.proto, value.state).into(),
            })
            .collect();
        Ok(FlowList { matched, flows })
    }

    /// One stats sample: counters, active flows (from the last flow scan), health, weights.
    fn sample(&mut self) -> Result<()> {
        self.scan_flows_if_due()?;
        let active = &self.flow_scan.active;
        let global = self.dataplane.global_counters()?;
        let mut vips = Vec::new();
        for spec in &self.config.services.vips {
            let Some(live) = self.live.vips.get(&state::vip_key(&spec.vip)) else {
                continue;
            };
            let mut backends = Vec::new();
            for b in &spec.backends {
                let Some(lb) = live.backends.get(&b.addr) else {
                    continue;
                };
                let health = self.health.status(spec, b).state;
                backends.push(BackendSample {
                    address: b.addr.to_string(),
                    counters: self.dataplane.backend_counters(lb.id)?,
                    active_flows: active.get(&lb.id).copied().unwrap_or(0),
                    weight: lb.ring_weight,
                    configured_weight: b.weight,
                    drained: self.overrides.get(&spec.name, b.addr).drained,
                    health: health.to_string(),
                    up: health != State::Down,
                });
            }
            vips.push(VipSample {
                name: spec.name.clone(),
                address: spec.vip.to_string(),
                counters: self.dataplane.vip_counters(live.meta.vip_id)?,
                backends,
            });
        }
        let flow_table_entries = self.flow_scan.entries;
        self.stats.ingest(Sample {
            at: Instant::now(),
            global,
            vips,
            flow_table_entries,
        });
        Ok(())
    }

    fn metrics_text(&self) -> String {
        let announced = self
            .announcer
            .as_ref()
            .map(Announcer::announced)
            .unwrap_or_default();
        metrics::render(self.stats.snapshot(), &self.health_metrics, &announced)
    }

    /// Drops metric series of VIPs and backends the new config no longer has.
    fn forget_removed(&self, old: &Config) {
        for vip in &old.services.vips {
            match self
                .config
                .services
                .vips
                .iter()
                .find(|v| v.name == vip.name)
            {
                None => self.health_metrics.forget_vip(&vip.name),
                Some(new) => {
                    for b in vip
                        .backends
                        .iter()
                        .filter(|b| !new.backends.iter().any(|n| n.addr == b.addr))
                    {
                        self.health_metrics
                            .forget_backend(&vip.name, &b.addr.to_string());
                    }
                }
            }
        }
    }

    /// For `/healthz`: the programs are attached and the maps were written.
    fn healthy(&self) -> bool {
        !self.live.vips.is_empty() || self.config.services.vips.is_empty()
    }

    fn shutdown(&self, detach: bool) {
        if detach {
            match self.dataplane.unpin_everything() {
                Ok(()) => info!("programs detached and pinned maps removed"),
                Err(e) => error!("cleaning up pins: {e}"),
            }
        } else {
            info!("stopping; the XDP program keeps forwarding with the current maps (no health checks) until the next `xdplb run` adopts it");
        }
    }
}

fn socket_text(key: &FlowKey, client: bool) -> String {
    let (addr, port) = if client {
        (&key.src, key.sport)
    } else {
        (&key.dst, key.dport)
    };
    let port = u16::from_be(port);
    if key.family == lb_common::FAMILY_IPV4 {
        format!("{}.{}.{}.{}:{port}", addr[0], addr[1], addr[2], addr[3])
    } else {
        format!("[{}]:{port}", std::net::Ipv6Addr::from(*addr))
    }
}

fn flow_state(proto: u8, state: u8) -> &'static str {
    if proto != PROTO_TCP {
        "udp"
    } else if state & FLOW_RST_SEEN != 0 {
        "rst"
    } else if state & FLOW_FIN_SEEN != 0 {
        "fin"
    } else if state & FLOW_ACK_SEEN != 0 {
        "established"
    } else {
        "syn"
    }
}

/// Daemon settings a reload cannot change (they shape maps, sockets and attachments).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.daemon, &new.daemon);
    [
        (o.interfaces != n.interfaces, "daemon.interfaces"),
        (o.xdp_mode != n.xdp_mode, "daemon.xdp_mode"),
        (o.admin_socket != n.admin_socket, "daemon.admin_socket"),
        (o.state_dir != n.state_dir, "daemon.state_dir"),
        (o.pin_dir != n.pin_dir, "daemon.pin_dir"),
        (
            o.sizes != n.sizes,
            "map sizes (flow_table_size, max_vips, max_backends, max_ring_size)",
        ),
        (
            o.metrics_listen != n.metrics_listen,
            "daemon.metrics_listen",
        ),
        (
            o.stats_interval != n.stats_interval,
            "daemon.stats_interval",
        ),
        (o.announce != n.announce, "daemon.announce"),
    ]
    .into_iter()
    .filter_map(|(changed, key)| changed.then_some(key))
    .collect()
}

/// Takes an exclusive lock on `state_dir/xdplb.lock`, or says which daemon holds it.
fn lock_instance(state_dir: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating daemon.state_dir {}", state_dir.display()))?;
    let path = state_dir.join("xdplb.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another `xdplb run` already uses state_dir {} (lock {}): stop it first",
            state_dir.display(),
            path.display()
        );
    }
    Ok(file)
}

/// Pinning needs bpffs. Under /sys/fs/bpf it is mounted if missing (as systemd would);
/// elsewhere the operator must have mounted one. Pins on a bpffs that only this process's
/// mount namespace sees (e.g. under `ip netns exec`, which remounts /sys) vanish when the
/// daemon exits, and with them the attachment: that case is refused with what to do.
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let bpffs = Path::new("/sys/fs/bpf");
    let create = || {
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating daemon.pin_dir {}", pin_dir.display()))
    };
    if !pin_dir.starts_with(bpffs) {
        create()?;
        if !is_bpffs(pin_dir)? {
            bail!(
                "daemon.pin_dir {} is not on a bpf filesystem: run `mount -t bpf bpf {}` first",
                pin_dir.display(),
                pin_dir.display()
            );
        }
        return Ok(());
    }
    if bpffs.exists() && is_bpffs(bpffs)? {
        return create();
    }
    if private_mount_namespace() {
        bail!(
            "/sys/fs/bpf is not mounted in this mount namespace (as under `ip netns exec`): \
             pins there would vanish when xdplb exits. Mount a bpffs outside /sys and point \
             daemon.pin_dir at it (`mount -t bpf bpf /run/xdplb/bpf`)"
        );
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .context("running mount -t bpf")?;
    if !status.success() || !is_bpffs(bpffs)? {
        bail!("bpffs is not mounted on /sys/fs/bpf and mounting it failed: run `mount -t bpf bpf /sys/fs/bpf`");
    }
    create()
}

fn is_bpffs(path: &Path) -> Result<bool> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: statfs fills the zeroed struct or fails.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0 {
        bail!(
            "statfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(fs.f_type as i64 == BPF_FS_MAGIC)
}

/// Whether this process runs in another mount namespace than init.
fn private_mount_namespace() -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    ns("self") != ns("1")
}

/// Every task shares the daemon behind one mutex, never held across an await. A poisoned
/// lock only means a handler panicked; the daemon's state is still the maps' truth.
fn lock(daemon: &Mutex<Daemon>) -> MutexGuard<'_, Daemon> {
    daemon
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(options: Options) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("xdplb run needs root (it loads XDP programs and pins BPF maps)");
    }
    let (health_tx, mut health_rx) = mpsc::unbounded_channel();
    let daemon = Daemon::start(&options, health_tx)?;
    let socket = daemon.config.daemon.admin_socket.clone();
    let metrics_listen = daemon.config.daemon.metrics_listen;
    let stats_interval = daemon.config.daemon.stats_interval;
    let daemon = Arc::new(Mutex::new(daemon));
    let mut neighbours =
        crate::net::watch_neighbours().context("subscribing to neighbour changes (netlink)")?;

    let listener = api::bind(&socket)
        .with_context(|| format!("binding the admin socket {}", socket.display()))?;
    info!(socket = %socket.display(), "admin API listening");
    let api_task = {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    let handle = |request| {
                        let response = lock(&daemon).handle(request);
                        async move { response }
                    };
                    if let Err(e) = api::serve_connection(stream, handle).await {
                        warn!("admin connection: {e}");
                    }
                });
            }
        })
    };
    let metrics_task = match metrics_listen {
        Some(listen) => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding daemon.metrics_listen {listen}"))?;
            info!(%listen, "metrics on http://{listen}/metrics");
            let (text, healthy) = (daemon.clone(), daemon.clone());
            Some(tokio::spawn(metrics::serve(
                listener,
                move || lock(&text).metrics_text(),
                move || lock(&healthy).healthy(),
                std::future::pending(),
            )))
        }
        None => None,
    };

    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut resolve_tick = tokio::time::interval(RESOLVE_INTERVAL);
    let mut stats_tick = tokio::time::interval(stats_interval);
    // After a slow tick, wait a full period instead of firing the missed ones back to back:
    // rates are computed over the real time between samples either way.
    resolve_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!("xdplb running");
    loop {
        tokio::select! {
            _ = hangup.recv() => match lock(&daemon).reload() {
                Ok(msg) => info!("SIGHUP: {msg}"),
                Err(e) => error!("SIGHUP: reload rejected: {e:#}"),
            },
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            Some(event) = health_rx.recv() => {
                let mut daemon = lock(&daemon);
                daemon.record_transition(&event);
                // A burst of transitions (a switch failing) becomes one update.
                while let Ok(event) = health_rx.try_recv() {
                    daemon.record_transition(&event);
                }
                if let Err(e) = daemon.apply() {
                    error!("applying a health change: {e:#}");
                }
            }
            Some(change) = neighbours.recv() => {
                let mut changes = vec![change];
                while let Ok(change) = neighbours.try_recv() {
                    changes.push(change);
                }
                if let Err(e) = lock(&daemon).neighbours_changed(&changes) {
                    error!("applying a neighbour change: {e:#}");
                }
            }
            _ = resolve_tick.tick() => {
                // Also re-checks the attachments the announcements depend on.
                if let Err(e) = lock(&daemon).refresh_next_hops() {
                    error!("refreshing next hops: {e:#}");
                }
            }
            _ = stats_tick.tick() => {
                if let Err(e) = lock(&daemon).sample() {
                    warn!("sampling counters: {e:#}");
                }
            }
        }
    }
    // Routers move the traffic while the data path still forwards; status and metrics
    // stay up meanwhile.
    let grace = lock(&daemon).withdraw_all();
    if !grace.is_zero() {
        info!("VIPs withdrawn; forwarding for withdraw_grace ({grace:?}) before exiting");
        tokio::time::sleep(grace).await;
    }
    api_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    let _ = std::fs::remove_file(&socket);
    lock(&daemon).shutdown(options.detach_on_exit);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Counts resolutions; fails for 10.0.0.99.
    struct Counting(Cell<usize>);

    impl Resolve for Counting {
        fn next_hop(&self, backend: &BackendSpec) -> Result<NextHop, String> {
            self.0.set(self.0.get() + 1);
            if backend.addr == IpAddr::from([10, 0, 0, 99]) {
                return Err("no neighbour".into());
            }
            Ok(NextHop {
                dst_mac: Mac([2, 0, 0, 0, 0, 1]),
                src_mac: Mac([2, 0, 0, 0, 0, 2]),
                ifindex: 2,
                mtu: 1500,
            })
        }
    }

    fn backend(last: u8) -> BackendSpec {
        BackendSpec {
            addr: IpAddr::from([10, 0, 0, last]),
            weight: 100,
            mac: None,
            health_port: None,
        }
    }

    #[test]
    fn known_next_hops_are_reused_unless_refreshed() {
        let counting = Counting(Cell::new(0));
        let mut known = NextHops::default();
        let none = BTreeSet::new();
        let resolve = |known: &mut NextHops, refresh: &BTreeSet<IpAddr>, b| {
            Remembering {
                resolver: &counting,
                known: RefCell::new(known),
                refresh,
            }
            .next_hop(&backend(b))
        };
        assert!(resolve(&mut known, &none, 1).is_ok());
        assert_eq!(counting.0.get(), 1, "unknown: resolved");
        assert!(resolve(&mut known, &none, 1).is_ok());
        assert_eq!(counting.0.get(), 1, "known: reused, no lookup");
        let refresh: BTreeSet<IpAddr> = [IpAddr::from([10, 0, 0, 1])].into();
        assert!(resolve(&mut known, &refresh, 1).is_ok());
        assert_eq!(counting.0.get(), 2, "due for refresh: resolved again");
        assert!(
            resolve(&mut known, &none, 99).is_err(),
            "never resolved: the error"
        );
        assert_eq!(counting.0.get(), 3);
        assert!(resolve(&mut known, &none, 99).is_err());
        assert_eq!(
            counting.0.get(),
            3,
            "a known failure is not retried outside refresh"
        );
        // A known next hop survives a failed refresh.
        let hop = known.good[&IpAddr::from([10, 0, 0, 1])];
        known.good.insert(IpAddr::from([10, 0, 0, 99]), hop);
        let refresh: BTreeSet<IpAddr> = [IpAddr::from([10, 0, 0, 99])].into();
        assert_eq!(resolve(&mut known, &refresh, 99), Ok(hop));
        assert_eq!(counting.0.get(), 4);
    }
}
