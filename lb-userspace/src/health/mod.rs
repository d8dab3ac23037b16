//! Backend health checks.
//!
//! [`HealthMonitor::sync`] turns the VIPs' [`HealthSpec`]s into one tokio task per distinct
//! [`CheckTarget`] (backend address and port plus the check itself), so a backend shared by
//! several VIPs with the same check is probed once. Each task runs its check every interval (with
//! jitter, never two at once) and feeds the outcome to one [`State`] machine per distinct
//! rise/fall pair among the VIPs using it. Transitions are logged and sent as [`HealthEvent`]s;
//! the daemon reads the current view with [`HealthMonitor::status`] and decides what a down
//! backend means for its VIP (including `on_all_down`).

mod probe;
#[cfg(test)]
mod tests;
mod tls;
mod tracker;

use std::{
    collections::{hash_map::Entry, HashMap, HashSet},
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::{sync::mpsc::UnboundedSender, task::AbortHandle};
use tracing::{debug, info, warn};

pub use tls::{load_ca, server_name};
pub use tracker::Failure;

use crate::model::{BackendSpec, CheckKind, HealthSpec, TlsSpec, VipSpec};
use probe::{Prober, Schedule};
use tracker::{Tracker, Transition};

/// What is checked, and how often: the unit of deduplication. Thresholds are not part of it,
/// since they interpret the outcomes rather than change the probing.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CheckTarget {
    /// The backend's address and its health port.
    pub addr: SocketAddr,
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
}

/// The check of a [`CheckTarget`]: [`CheckKind`] without `None`, which never probes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Probe {
    Tcp,
    Http {
        path: String,
        expect_status: u16,
        /// Host header; the target address when absent.
        host: Option<String>,
        /// HTTPS when set.
        tls: Option<TlsSpec>,
    },
}

impl CheckTarget {
    /// The target checking `backend` of `vip`; `None` when the VIP's checks are off.
    pub fn of(vip: &VipSpec, backend: &BackendSpec) -> Option<Self> {
        let health = &vip.health;
        let probe = match &health.kind {
            CheckKind::None => return None,
            CheckKind::Tcp => Probe::Tcp,
            CheckKind::Http {
                path,
                expect_status,
                host,
                tls,
            } => Probe::Http {
                path: path.clone(),
                expect_status: *expect_status,
                host: host.clone(),
                tls: tls.clone(),
            },
        };
        // nat backends serve on their own port, which is what a check should reach.
        let port = backend
            .health_port
            .or(health.port)
            .or(backend.port)
            .unwrap_or(vip.vip.port);
        Some(Self {
            addr: SocketAddr::new(backend.addr, port),
            probe,
            interval: health.interval,
            timeout: health.timeout,
        })
    }
}

impl fmt::Display for CheckTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.probe {
            Probe::Tcp => write!(f, "tcp://{}", self.addr),
            Probe::Http {
                path,
                expect_status,
                tls,
                ..
            } => {
                let scheme = if tls.is_some() { "https" } else { "http" };
                write!(f, "{scheme}://{}{path} (expect {expect_status})", self.addr)
            }
        }
    }
}

/// How many consecutive outcomes change a target's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Thresholds {
    pub rise: u32,
    pub fall: u32,
}

impl Thresholds {
    pub fn of(health: &HealthSpec) -> Self {
        Self {
            rise: health.rise,
            fall: health.fall,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// Not yet `rise` successes nor `fall` failures in a row since the check started.
    Unknown,
    Up,
    Down,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Unknown => "unknown",
            State::Up => "up",
            State::Down => "down",
        })
    }
}

/// A backend's health as one VIP sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendHealth {
    pub state: State,
    /// When `state` was entered (for `Unknown`: when the check started); `None` when nothing
    /// checks the backend (kind none, or not [synced](HealthMonitor::sync)).
    pub since: Option<Instant>,
    /// Kept after recovery, for status output.
    pub last_failure: Option<Failure>,
    /// Duration of the most recent check, failed or not.
    pub last_latency: Option<Duration>,
}

impl BackendHealth {
    /// Whether the checks say the backend should get no new flows. `Unknown` is not down: a
    /// backend is not withdrawn before its checks have had a chance to run.
    pub fn is_down(&self) -> bool {
        self.state == State::Down
    }

    fn unchecked(state: State) -> Self {
        Self {
            state,
            since: None,
            last_failure: None,
            last_latency: None,
        }
    }
}

/// A state change of a target under given thresholds; sent for every transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub target: CheckTarget,
    pub thresholds: Thresholds,
    /// Names of the VIPs whose view changed: those using the target with these thresholds.
    pub vips: Arc<[String]>,
    pub from: State,
    pub to: State,
    /// The last failure when going down; `None` when going up.
    pub reason: Option<String>,
}

impl HealthEvent {
    /// Whether this event changes [`HealthMonitor::status`] of `backend` in `vip`.
    pub fn applies_to(&self, vip: &VipSpec, backend: &BackendSpec) -> bool {
        self.thresholds == Thresholds::of(&vip.health)
            && CheckTarget::of(vip, backend).as_ref() == Some(&self.target)
    }
}

/// Called after every check with the target, the names of the VIPs using it, the check's
/// duration and whether it succeeded, e.g. to fill a per-VIP latency histogram (a target shared
/// by several VIPs is checked once, for all of them). Runs on the checking task: it must be
/// cheap and must not block.
pub type CheckObserver = Arc<dyn Fn(&CheckTarget, &[String], Duration, bool) + Send + Sync>;

/// Runs the checks and holds their results.
///
/// [`sync`](Self::sync) spawns tasks, so it must be called within a tokio runtime. Dropping the
/// monitor stops every check.
pub struct HealthMonitor {
    events: UnboundedSender<HealthEvent>,
    observer: CheckObserver,
    targets: HashMap<CheckTarget, Running>,
    /// Checks whose state machine starts down when [`sync`](Self::sync) first starts it.
    presumed_down: HashSet<(CheckTarget, Thresholds)>,
}

struct Running {
    shared: Arc<Mutex<Shared>>,
    task: AbortHandle,
}

/// What a target's task and the monitor share; locked briefly, never across an await.
struct Shared {
    /// Names of the VIPs using the target, for the observer.
    vips: Arc<[String]>,
    /// One per distinct thresholds among those VIPs; usually exactly one.
    machines: Vec<Machine>,
    last_latency: Option<Duration>,
}

struct Machine {
    tracker: Tracker,
    /// Names of the VIPs using the target with the tracker's thresholds, for events.
    vips: Arc<[String]>,
}

/// Per target: the VIPs using it, grouped by thresholds.
type Wanted = HashMap<CheckTarget, Vec<(Thresholds, Vec<String>)>>;

impl HealthMonitor {
    /// `events` receives every transition; `observer` sees every check.
    pub fn new(events: UnboundedSender<HealthEvent>, observer: CheckObserver) -> Self {
        Self {
            events,
            observer,
            targets: HashMap::new(),
            presumed_down: HashSet::new(),
        }
    }

    /// Makes `backend`'s check for `vip` start down instead of unknown when the next
    /// [`sync`](Self::sync) starts it: after a restart the pinned maps say which backends were
    /// down, and unknown counts as up, which would send new flows to a dead backend until
    /// `fall` checks had failed.
    pub fn presume_down(&mut self, vip: &VipSpec, backend: &BackendSpec) {
        if let Some(target) = CheckTarget::of(vip, backend) {
            self.presumed_down
                .insert((target, Thresholds::of(&vip.health)));
        }
    }

    /// Makes the running checks match `vips`: starts new targets, stops removed ones, and keeps
    /// unchanged ones running with their state. A changed check (path, interval, timeout, ...)
    /// is a new target but keeps the state of the check it replaces on the same address and
    /// port with the same thresholds: a reload that tunes a check must not turn a down backend
    /// into an unknown (counted as up) one. Changed thresholds start a new state machine.
    pub fn sync(&mut self, vips: &[VipSpec]) {
        let now = Instant::now();
        let mut wanted = Wanted::new();
        for vip in vips {
            let thresholds = Thresholds::of(&vip.health);
            for backend in &vip.backends {
                let Some(target) = CheckTarget::of(vip, backend) else {
                    continue;
                };
                let groups = wanted.entry(target).or_default();
                let group = match groups.iter().position(|(t, _)| *t == thresholds) {
                    Some(group) => group,
                    None => {
                        groups.push((thresholds, Vec::new()));
                        groups.len() - 1
                    }
                };
                let names = &mut groups[group].1;
                if !names.contains(&vip.name) {
                    names.push(vip.name.clone());
                }
            }
        }
        // The state machines of stopped checks, for a replacement on the same address.
        let mut replaced: HashMap<(SocketAddr, Thresholds), Tracker> = HashMap::new();
        self.targets.retain(|target, running| {
            let keep = wanted.contains_key(target);
            if !keep {
                debug!(%target, "stopping health check");
                running.task.abort();
                for machine in std::mem::take(&mut lock(&running.shared).machines) {
                    let key = (target.addr, machine.tracker.thresholds());
                    replaced.insert(key, machine.tracker);
                }
            }
            keep
        });
        let presumed_down = std::mem::take(&mut self.presumed_down);
        let start = |target: &CheckTarget, thresholds: Thresholds| {
            if presumed_down.contains(&(target.clone(), thresholds)) {
                Tracker::presumed_down(thresholds, now, "down before the restart (pinned maps)")
            } else {
                Tracker::new(thresholds, now)
            }
        };
        for (target, groups) in wanted {
            let vips: Arc<[String]> = groups.iter().flat_map(|(_, names)| names.clone()).collect();
            match self.targets.entry(target) {
                Entry::Occupied(running) => {
                    let mut shared = lock(&running.get().shared);
                    shared.vips = vips;
                    let mut machines = std::mem::take(&mut shared.machines);
                    shared.machines = groups
                        .into_iter()
                        .map(|(thresholds, names)| {
                            let tracker = match machines
                                .iter()
                                .position(|m| m.tracker.thresholds() == thresholds)
                            {
                                Some(kept) => machines.swap_remove(kept).tracker,
                                None => start(running.key(), thresholds),
                            };
                            Machine {
                                tracker,
                                vips: names.into(),
                            }
                        })
                        .collect();
                }
                Entry::Vacant(slot) => {
                    debug!(target = %slot.key(), "starting health check");
                    let machines = groups
                        .into_iter()
                        .map(|(thresholds, names)| Machine {
                            tracker: replaced
                                .remove(&(slot.key().addr, thresholds))
                                .unwrap_or_else(|| start(slot.key(), thresholds)),
                            vips: names.into(),
                        })
                        .collect();
                    let shared = Arc::new(Mutex::new(Shared {
                        vips,
                        machines,
                        last_latency: None,
                    }));
                    let task = tokio::spawn(check_loop(
                        slot.key().clone(),
                        shared.clone(),
                        self.events.clone(),
                        self.observer.clone(),
                    ))
                    .abort_handle();
                    slot.insert(Running { shared, task });
                }
            }
        }
    }

    /// The current health of `backend` as `vip` sees it: always up when the VIP's checks are
    /// off, unknown when the monitor was not synced with this VIP.
    pub fn status(&self, vip: &VipSpec, backend: &BackendSpec) -> BackendHealth {
        let Some(target) = CheckTarget::of(vip, backend) else {
            return BackendHealth::unchecked(State::Up);
        };
        let thresholds = Thresholds::of(&vip.health);
        let Some(running) = self.targets.get(&target) else {
            return BackendHealth::unchecked(State::Unknown);
        };
        let shared = lock(&running.shared);
        match shared
            .machines
            .iter()
            .find(|m| m.tracker.thresholds() == thresholds)
        {
            Some(Machine { tracker, .. }) => BackendHealth {
                state: tracker.state(),
                since: Some(tracker.since()),
                last_failure: tracker.last_failure().cloned(),
                last_latency: shared.last_latency,
            },
            None => BackendHealth::unchecked(State::Unknown),
        }
    }

    /// The targets being checked, each once however many VIPs use it.
    pub fn targets(&self) -> impl Iterator<Item = &CheckTarget> {
        self.targets.keys()
    }
}

impl Drop for HealthMonitor {
    fn drop(&mut self) {
        for running in self.targets.values() {
            running.task.abort();
        }
    }
}

/// A poisoned lock only means a task panicked mid-update; the trackers are still consistent
/// enough to report, and the monitor must not panic in turn.
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A target's task: checks one at a time, forever (until aborted).
async fn check_loop(
    target: CheckTarget,
    shared: Arc<Mutex<Shared>>,
    events: UnboundedSender<HealthEvent>,
    observer: CheckObserver,
) {
    let prober = Prober::new(&target);
    let mut schedule = Schedule::new(&target);
    let mut next = tokio::time::Instant::now() + schedule.first_delay();
    loop {
        tokio::time::sleep_until(next).await;
        let start = tokio::time::Instant::now();
        let outcome = prober.run().await;
        let latency = start.elapsed();
        // Measured from the start, so the period does not drift by the checks' durations. A check
        // slower than the period (timeout > interval) is followed at once by the next one.
        next = start + schedule.next_period();
        let observed = match &outcome {
            Ok(()) => Ok(()),
            Err(reason) => Err(reason.as_str()),
        };
        let now = Instant::now();
        // No allocation unless something changes.
        let mut transitions = Vec::new();
        let vips = {
            let mut shared = lock(&shared);
            shared.last_latency = Some(latency);
            for machine in &mut shared.machines {
                if let Some(transition) = machine.tracker.observe(now, observed) {
                    let thresholds = machine.tracker.thresholds();
                    transitions.push((thresholds, machine.vips.clone(), transition));
                }
            }
            shared.vips.clone()
        };
        observer(&target, &vips, latency, outcome.is_ok());
        for (thresholds, vips, Transition { from, to }) in transitions {
            let reason = outcome.as_ref().err();
            let Thresholds { rise, fall } = thresholds;
            match reason {
                Some(reason) => {
                    warn!(%target, ?vips, rise, fall, %from, reason, "backend down")
                }
                None => info!(%target, ?vips, rise, fall, %from, "backend up"),
            }
            // The daemon going away first (shutdown) is not this task's concern.
            let _ = events.send(HealthEvent {
                target: target.clone(),
                thresholds,
                vips,
                from,
                to,
                reason: reason.cloned(),
            });
        }
    }
}
