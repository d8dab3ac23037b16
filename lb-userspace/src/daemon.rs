//! `xdplb run`: owns the data path for its lifetime. Every change (config reload, CLI command,
//! health transition, next-hop change, interface re-created) goes through [`Daemon::apply`]:
//! model + overrides + health + cached next hops -> target -> plan -> map writes.
//!
//! Every task shares the daemon behind one mutex, held only to plan and apply: slow work
//! (reading the config, looking next hops up) runs without it, so the admin API and
//! `/metrics` answer during a reload; `/healthz` reads an atomic and never waits.

mod host;
mod log;
mod protection;
mod status;
mod tasks;

pub use tasks::run;

use crate::{
    announce::{self, Announcer},
    api::{Request, Response},
    attachments::Attachments,
    blocklist::{self, Blocklist},
    config::Config,
    connlog::{self, ConnLog},
    dataplane::{Adoption, Dataplane, Role},
    flood::PinnedScan,
    flowscan::FlowScan,
    health::{CheckObserver, HealthEvent, HealthMonitor},
    links, metrics,
    model::{BackendSpec, Forwarding, OnAllDown, VipSpec},
    nat,
    net::HostResolver,
    nexthops::{self, NextHops},
    overrides::Overrides,
    state::{self, BackendStatus, Live, Unresolved},
    stats::Stats,
};
use anyhow::{bail, Context as _, Result};
use lb_common::BACKEND_DOWN;
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

pub struct Options {
    pub config_path: PathBuf,
    /// On exit, detach the programs and remove the pinned maps (instead of leaving the data
    /// path running for the next daemon to adopt).
    pub detach_on_exit: bool,
}

pub struct Daemon {
    config_path: PathBuf,
    config: Config,
    dataplane: Dataplane,
    live: Live,
    overrides: Overrides,
    blocklist: Blocklist,
    pinned_scan: PinnedScan,
    /// nat connections left by the last sweep.
    nat_connections: u64,
    resolver: HostResolver,
    next_hops: NextHops,
    unresolved: Vec<Unresolved>,
    health: HealthMonitor,
    attachments: Attachments,
    /// What `/healthz` answers, updated after every change (see [`Daemon::healthy`]).
    healthz: Arc<AtomicBool>,
    flow_scan: FlowScan,
    /// Per VIP, the backends last seen healthy (for `on_all_down = "keep"`).
    last_healthy: BTreeMap<String, BTreeSet<IpAddr>>,
    stats: Stats,
    health_metrics: metrics::HealthMetrics,
    /// VIP routes for a BGP daemon (`[daemon.announce]`); none when off, and until the
    /// programs are attached.
    announcer: Option<Announcer>,
    /// The connection log's reader and file; reads the ring whether or not the log is on.
    connlog: ConnLog,
    /// Held while the daemon runs: a second `xdplb run` on the same state would take over the
    /// links and the admin socket of this one.
    _instance_lock: std::fs::File,
}

impl Daemon {
    /// Loads or adopts the data path, fills the maps, then attaches.
    fn start(
        options: &Options,
        config: Config,
        health_events: mpsc::UnboundedSender<HealthEvent>,
        healthz: Arc<AtomicBool>,
    ) -> Result<Self> {
        let daemon_config = &config.daemon;
        if config
            .services
            .vips
            .iter()
            .any(|v| v.forwarding == Forwarding::Nat)
        {
            let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
                .unwrap_or_default();
            if let Some(warning) = nat::ephemeral_overlap(&config.services.settings.nat, &range) {
                warn!("{warning}");
            }
        }
        let instance_lock = host::lock_instance(&daemon_config.state_dir)?;
        host::ensure_bpffs(&daemon_config.pin_dir)?;
        let mut dataplane = Dataplane::load(
            Role::Balancer,
            daemon_config.sizes,
            Some(&daemon_config.pin_dir),
        )?;
        let connlog = ConnLog::start(dataplane.take_events(), daemon_config.log.as_ref());
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
        let (overrides, set_aside) = Overrides::load_or_set_aside(&daemon_config.state_dir)?;
        let (mut blocklist, blocklist_set_aside) =
            Blocklist::load_or_set_aside(&daemon_config.state_dir)?;
        for warning in set_aside.iter().chain(&blocklist_set_aside) {
            error!("{warning}");
        }
        // Entries whose time ran out while the daemon was stopped go now.
        blocklist.expire(blocklist::unix_now());
        let health_metrics = metrics::HealthMetrics::default();
        let observer: CheckObserver = {
            let metrics = health_metrics.clone();
            Arc::new(move |_target, vips, took, ok| {
                for vip in vips {
                    metrics.record_check(vip, took, ok);
                }
            })
        };
        let mut health = HealthMonitor::new(health_events, observer);
        presume_down_as_adopted(&mut health, &live, &config.services.vips);
        let mut next_hops = NextHops::adopted(&live);
        let refresh = next_hops_to_current_interfaces(&mut next_hops, &daemon_config.interfaces)?;
        let due = next_hops.due(
            config.services.vips.iter().flat_map(|v| &v.backends),
            &refresh,
        );
        next_hops.record(nexthops::resolve(&resolver, &due));
        let attachments = Attachments::new(&mut dataplane, daemon_config.xdp_mode)?;
        let mut daemon = Self {
            config_path: options.config_path.clone(),
            config,
            dataplane,
            live,
            overrides,
            blocklist,
            pinned_scan: PinnedScan::default(),
            nat_connections: 0,
            resolver,
            next_hops,
            unresolved: Vec::new(),
            flow_scan: FlowScan::default(),
            health,
            attachments,
            healthz,
            last_healthy: BTreeMap::new(),
            stats: Stats::default(),
            health_metrics,
            announcer: None,
            connlog,
            _instance_lock: instance_lock,
        };
        daemon.sync_health();
        // Maps first, then attach: a fresh program never sees a packet with empty maps.
        daemon.apply()?;
        daemon
            .attachments
            .attach_all(&mut daemon.dataplane, &daemon.config.daemon.interfaces)?;
        daemon.publish_health();
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

    /// Makes the maps match config + overrides + health + the next hops known now (it never
    /// resolves: see [`resolve_then_apply`]).
    pub fn apply(&mut self) -> Result<()> {
        self.remember_healthy_sets();
        let mut statuses: HashMap<(String, IpAddr), BackendStatus> = HashMap::new();
        for vip in &self.config.services.vips {
            for b in &vip.backends {
                statuses.insert((vip.name.clone(), b.addr), self.backend_status(vip, b));
            }
        }
        let mut target = state::target(
            &self.config.services,
            |vip, b| statuses[&(vip.name.clone(), b.addr)],
            &self.next_hops,
        )?;
        target.blocked = self.blocklist.target();
        target.log = self
            .config
            .daemon
            .log
            .as_ref()
            .map(connlog::LogSpec::budget);
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
        self.connlog
            .set_names(connlog::Names::of(&self.live, &self.config.services.vips));
        self.unresolved = target.unresolved;
        self.publish_health();
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

    /// The backends whose neighbour (the backend or its gateway) now has another MAC, or none
    /// (failed, deleted: looking up again restarts ARP/ND; the last good MAC is kept
    /// meanwhile): those to look up at once.
    fn neighbours_changed(&self, changes: &[crate::net::NeighbourChange]) -> BTreeSet<IpAddr> {
        let due: BTreeSet<IpAddr> = changes
            .iter()
            .flat_map(|change| {
                self.resolver
                    .backends_via(change.addr)
                    .into_iter()
                    .filter(move |b| {
                        change.mac.is_none()
                            || self.next_hops.get(*b).map(|hop| hop.dst_mac) != change.mac
                    })
            })
            .collect();
        if !due.is_empty() {
            info!(backends = due.len(), "neighbour change: resolving again");
        }
        due
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

    /// The backends to look up now: those never looked up, and those in `refresh`.
    fn due_lookups(&self, refresh: &BTreeSet<IpAddr>) -> Vec<BackendSpec> {
        let backends = self.config.services.vips.iter().flat_map(|v| &v.backends);
        self.next_hops.due(backends, refresh)
    }

    /// The periodic refresh's next slice: unresolved backends first, then round robin.
    fn refresh_slice(&mut self) -> BTreeSet<IpAddr> {
        let all: Vec<IpAddr> = self.backend_addresses().into_iter().collect();
        let unresolved: Vec<IpAddr> = self.unresolved.iter().map(|u| u.backend).collect();
        self.next_hops.refresh_slice(&all, unresolved)
    }

    /// Follows the current state of a configured interface. When it came back under another
    /// index, its next hops move to it and the maps are updated at once; returns the backends
    /// to look up again (their neighbour entries went with the old interface).
    fn on_link_event(&mut self, event: &links::LinkEvent) -> Result<BTreeSet<IpAddr>> {
        let old = self.attachments.on_event(&mut self.dataplane, event);
        self.publish_health();
        let (Some(old), links::LinkEvent::Present { name, ifindex, .. }) = (old, event) else {
            return Ok(BTreeSet::new());
        };
        let moved = self.next_hops.move_interface(
            old,
            *ifindex,
            crate::net::interface_mac(name)?,
            crate::net::interface_mtu(name)?,
        );
        self.apply()?;
        Ok(moved)
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

    /// Switches to `new` (read and checked by [`reload`]) with the next hops looked up for
    /// it. A config that cannot be applied is rejected and the running one keeps serving.
    fn reload_with(&mut self, new: Config, answers: nexthops::Answers) -> Result<String> {
        let restart_only = restart_only_changes(&self.config, &new);
        if !restart_only.is_empty() {
            bail!(
                "{} changed: these take effect only with a restart (`systemctl restart xdplb`); \
                 the running config keeps serving",
                restart_only.join(", ")
            );
        }
        self.next_hops.record(answers);
        let old = std::mem::replace(&mut self.config, new);
        if let Err(e) = self.apply() {
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

    /// Drains or undrains, and tells the flow scan when a drain took effect.
    fn set_drained(&mut self, vip: &str, backend: IpAddr, drained: bool) -> Result<String> {
        let message = self.set_override(vip, backend, |o| o.drained = drained)?;
        let (name, _) = self.find_backend(vip, backend)?;
        if drained {
            self.flow_scan.drained(&name, backend);
        } else {
            self.flow_scan.undrained(&name, backend);
        }
        Ok(message)
    }

    fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Status => self.status().map(Response::Status),
            // Routed to `reload` by `handle`: its slow part must not hold the lock.
            Request::Reload => Err(anyhow::anyhow!("a reload is not handled under the lock")),
            Request::Drain { vip, backend } => {
                self.set_drained(&vip, backend, true).map(Response::Done)
            }
            Request::Undrain { vip, backend } => {
                self.set_drained(&vip, backend, false).map(Response::Done)
            }
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
            Request::Stats => Ok(Response::Stats(self.snapshot())),
            Request::BlockAdd {
                prefix,
                vip,
                for_s,
                reason,
            } => self
                .block_add(prefix, vip, for_s, reason)
                .map(Response::Done),
            Request::BlockDel { prefix, vip } => self.block_del(prefix, vip).map(Response::Done),
            Request::BlockList => self.block_rows().map(Response::Blocklist),
            Request::Log {
                vip, event, limit, ..
            } => self.log_records(vip, event, limit).map(Response::Log),
        };
        result.unwrap_or_else(|e| Response::Error(format!("{e:#}")))
    }

    /// Drops metric series and cached per-backend state of VIPs and backends the new config
    /// no longer has.
    fn forget_removed(&mut self, old: &Config) {
        let addresses = self.backend_addresses();
        self.next_hops.retain(&addresses);
        let vips = &self.config.services.vips;
        self.last_healthy.retain(|name, healthy| {
            let Some(vip) = vips.iter().find(|v| &v.name == name) else {
                return false;
            };
            healthy.retain(|addr| vip.backends.iter().any(|b| b.addr == *addr));
            true
        });
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

    /// For `/healthz`: the program is on every configured interface and the maps were written.
    fn healthy(&self) -> bool {
        self.attachments.all_attached()
            && (!self.live.vips.is_empty() || self.config.services.vips.is_empty())
    }

    fn publish_health(&self) {
        self.healthz.store(self.healthy(), Ordering::Relaxed);
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

/// Backends the adopted maps mark down start down, not unknown (which counts as up): a dead
/// backend must not get new flows after a restart until `fall` checks have failed.
fn presume_down_as_adopted(health: &mut HealthMonitor, live: &Live, vips: &[VipSpec]) {
    for vip in vips {
        let Some(adopted) = live.vips.get(&state::vip_key(&vip.vip)) else {
            continue;
        };
        for backend in &vip.backends {
            let down = adopted
                .backends
                .get(&backend.addr)
                .is_some_and(|b| b.entry.flags & BACKEND_DOWN != 0);
            if down {
                info!(vip = %vip.name, backend = %backend.addr, "down before the restart: stays out until its checks pass");
                health.presume_down(vip, backend);
            }
        }
    }
}

/// Adopted next hops through an interface that is gone (deleted and created again while no
/// daemon ran) would send packets nowhere until their turn in the refresh: with one
/// configured interface they move to it at once (the backends' MACs are still right), with
/// several they are looked up again. Returns the backends to look up.
fn next_hops_to_current_interfaces(
    next_hops: &mut NextHops,
    interfaces: &[String],
) -> Result<BTreeSet<IpAddr>> {
    let current = interfaces
        .iter()
        .map(|name| Ok(crate::net::interface_index(name)?))
        .collect::<Result<Vec<u32>>>()?;
    let gone: Vec<u32> = next_hops
        .interfaces()
        .into_iter()
        .filter(|i| !current.contains(i))
        .collect();
    if gone.is_empty() {
        return Ok(BTreeSet::new());
    }
    warn!(
        ?gone,
        "adopted next hops go through interfaces that no longer exist"
    );
    match (interfaces, current.as_slice()) {
        ([name], [ifindex]) => {
            let (mac, mtu) = (
                crate::net::interface_mac(name)?,
                crate::net::interface_mtu(name)?,
            );
            Ok(gone
                .into_iter()
                .flat_map(|old| next_hops.move_interface(old, *ifindex, mac, mtu))
                .collect())
        }
        _ => Ok(next_hops.forget_interfaces_except(&current)),
    }
}
