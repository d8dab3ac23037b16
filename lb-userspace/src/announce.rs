//! VIP announcement: while this LB can serve a VIP, a host route for its address sits in a
//! kernel routing table that a BGP daemon (BIRD, FRR) exports to the routers; when it cannot,
//! the route goes and the routers move the traffic to the other LBs.
//!
//! The routes are `blackhole` routes in `[daemon.announce] table`, a table no `ip rule` looks
//! up, so they never change how this host itself routes (the VIP's packets are taken by XDP
//! before the stack sees them). They carry protocol [`ROUTE_PROTOCOL`], which marks them as
//! this daemon's: a restarted daemon takes over the ones a previous run left (`kill -9` leaves
//! them in place, and the data path keeps forwarding).
//!
//! Per VIP, [`decide`] is the state machine; per address (VIPs on different ports share one),
//! the route is present when one of its VIPs is announced.

use crate::{health::State, model::Announce, netlink::Netlink};
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, io,
    net::IpAddr,
    time::Duration,
};
use tracing::{info, warn};

/// `rtm_protocol` of announce routes (`ip route show table N proto 250`): what tells them
/// apart from other routes in the table, and what a BGP daemon's kernel protocol learns as
/// "alien" routes. 250 is unassigned in iproute2's `rt_protos`.
pub const ROUTE_PROTOCOL: u8 = 250;

/// `[daemon.announce]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceConfig {
    /// Kernel routing table the VIP routes are written into.
    pub table: u32,
    /// On SIGTERM, how long the data path keeps forwarding after the withdrawal, so routers
    /// move the traffic before this LB stops.
    pub withdraw_grace: Duration,
}

impl AnnounceConfig {
    pub const DEFAULT_WITHDRAW_GRACE: Duration = Duration::from_secs(3);
}

/// What the host looks like to the decision: the same for every VIP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// Configured interfaces this daemon's XDP program is not attached to.
    pub not_attached: Vec<String>,
    /// The daemon is stopping: its checks no longer run.
    pub stopping: bool,
}

/// One backend of a VIP, as the decision sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendFacts {
    pub health: State,
    pub drained: bool,
    /// The effective (CLI or configured) weight is zero.
    pub weight_zero: bool,
    /// The backend's next hop is unknown, so it is not in the ring.
    pub unresolved: bool,
}

impl BackendFacts {
    /// In the ring with a share of new flows, whatever its health.
    fn in_ring(&self) -> bool {
        !self.drained && !self.weight_zero && !self.unresolved
    }
}

/// Whether a VIP should be announced, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Announce(String),
    Withdraw(String),
    /// Not known yet (health checks have not finished their first rounds): keep what is
    /// there, so a restarted daemon neither withdraws a serving VIP nor announces a broken
    /// one.
    Hold(String),
}

impl Decision {
    fn reason(&self) -> &str {
        match self {
            Decision::Announce(why) | Decision::Withdraw(why) | Decision::Hold(why) => why,
        }
    }
}

/// The per-VIP state machine: from the VIP's mode and the facts to a decision.
pub fn decide(mode: Announce, host: &HostFacts, backends: &[BackendFacts]) -> Decision {
    if mode == Announce::Never {
        return Decision::Withdraw("announce = \"never\"".into());
    }
    if host.stopping {
        return Decision::Withdraw("daemon stopping".into());
    }
    if !host.not_attached.is_empty() {
        return Decision::Withdraw(format!(
            "XDP program not attached on {}",
            host.not_attached.join(", ")
        ));
    }
    if mode == Announce::Always {
        return Decision::Announce("announce = \"always\"".into());
    }
    let serving = backends
        .iter()
        .filter(|b| b.in_ring() && b.health == State::Up)
        .count();
    if serving > 0 {
        let plural = if serving == 1 { "" } else { "s" };
        return Decision::Announce(format!("{serving} backend{plural} up"));
    }
    if backends
        .iter()
        .any(|b| b.in_ring() && b.health == State::Unknown)
    {
        return Decision::Hold("waiting for the first health checks".into());
    }
    Decision::Withdraw(why_no_backend(backends))
}

/// Why none of `backends` can take new flows, most telling cause first.
fn why_no_backend(backends: &[BackendFacts]) -> String {
    if backends.is_empty() {
        return "no backend configured".into();
    }
    let count = |f: fn(&BackendFacts) -> bool| backends.iter().filter(|b| f(b)).count();
    let causes = [
        (count(|b| b.health == State::Down), "down"),
        (count(|b| b.drained), "drained"),
        (count(|b| b.weight_zero), "at weight 0"),
        (count(|b| b.unresolved), "without a next hop"),
    ];
    let total = backends.len();
    if let Some((_, what)) = causes.iter().find(|(n, _)| *n == total) {
        return format!("no backend up: every backend {what}");
    }
    let parts: Vec<String> = causes
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    format!("no backend up ({})", parts.join(", "))
}

/// One VIP's input to [`Announcer::sync`].
pub struct VipFacts<'a> {
    pub name: &'a str,
    pub addr: IpAddr,
    pub mode: Announce,
    pub backends: Vec<BackendFacts>,
}

#[derive(Debug, thiserror::Error)]
#[error("announce routes in table {table}: {what} {addr}: {source}")]
pub struct AnnounceError {
    table: u32,
    what: &'static str,
    addr: String,
    #[source]
    source: io::Error,
}

/// A VIP's announcement as `xdplb status` and the metrics show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipAnnouncement {
    /// The VIP's address has its route in the table.
    pub announced: bool,
    /// e.g. `announced: 2 backends up`, `withdrawn: no backend up: every backend down`.
    pub state: String,
}

/// The announce routes and the decisions behind them.
pub struct Announcer {
    config: AnnounceConfig,
    netlink: Netlink,
    /// Addresses whose route is in the table.
    installed: BTreeSet<IpAddr>,
    /// Per VIP name, the last decision and the VIP's address.
    decisions: BTreeMap<String, (IpAddr, Decision)>,
    /// Set by [`withdraw_all`](Self::withdraw_all): a change applied during the grace period
    /// (a CLI drain, say) must not announce again.
    stopping: bool,
}

impl Announcer {
    /// Opens netlink and takes over the routes a previous daemon left in the table.
    pub fn start(config: AnnounceConfig) -> Result<Self, AnnounceError> {
        let error = |what, source| AnnounceError {
            table: config.table,
            what,
            addr: String::new(),
            source,
        };
        let mut netlink = Netlink::open().map_err(|e| error("opening netlink", e))?;
        let installed: BTreeSet<IpAddr> = netlink
            .host_routes(config.table, ROUTE_PROTOCOL)
            .map_err(|e| error("listing", e))?
            .into_iter()
            .collect();
        if !installed.is_empty() {
            info!(
                table = config.table,
                routes = installed.len(),
                "taking over the announce routes of the previous run"
            );
        }
        Ok(Self {
            config,
            netlink,
            installed,
            decisions: BTreeMap::new(),
            stopping: false,
        })
    }

    pub fn withdraw_grace(&self) -> Duration {
        self.config.withdraw_grace
    }

    /// Decides every VIP and makes the table match: a route per address with an announced
    /// VIP, none for the others (VIPs no longer configured included). `program` is the id
    /// of the daemon's XDP program, which must be attached on every one of `interfaces`.
    pub fn sync(
        &mut self,
        interfaces: &[String],
        program: u32,
        vips: &[VipFacts],
    ) -> Result<(), AnnounceError> {
        let host = &HostFacts {
            not_attached: self.not_attached(interfaces, program),
            stopping: self.stopping,
        };
        let decisions: BTreeMap<String, (IpAddr, Decision)> = vips
            .iter()
            .map(|v| {
                let decision = decide(v.mode, host, &v.backends);
                (v.name.to_string(), (v.addr, decision))
            })
            .collect();
        let wanted: BTreeSet<IpAddr> = decisions
            .values()
            .filter(|(addr, decision)| match decision {
                Decision::Announce(_) => true,
                Decision::Hold(_) => self.installed.contains(addr),
                Decision::Withdraw(_) => false,
            })
            .map(|(addr, _)| *addr)
            .collect();
        for (name, (_, decision)) in &decisions {
            let before = self.decisions.get(name).map(|(_, d)| d);
            if before.map(std::mem::discriminant) != Some(std::mem::discriminant(decision)) {
                info!(vip = %name, "announce: {}", describe(decision));
            }
        }
        self.decisions = decisions;
        self.write(&wanted)
    }

    /// Those of `interfaces` without XDP program `program` attached (or missing), as the
    /// kernel reports them now; all of them when it cannot be asked.
    fn not_attached(&mut self, interfaces: &[String], program: u32) -> Vec<String> {
        interfaces
            .iter()
            .filter(|name| {
                let attached = crate::net::interface_index(name)
                    .ok()
                    .and_then(|index| self.netlink.xdp_program(index).ok().flatten());
                attached != Some(program)
            })
            .cloned()
            .collect()
    }

    /// Withdraws every route (SIGTERM), whatever the decisions.
    pub fn withdraw_all(&mut self) -> Result<(), AnnounceError> {
        self.stopping = true;
        for (_, decision) in self.decisions.values_mut() {
            *decision = Decision::Withdraw("daemon stopping".into());
        }
        self.write(&BTreeSet::new())
    }

    fn write(&mut self, wanted: &BTreeSet<IpAddr>) -> Result<(), AnnounceError> {
        let table = self.config.table;
        let error = |what, addr: &IpAddr, source| AnnounceError {
            table,
            what,
            addr: addr.to_string(),
            source,
        };
        let add: Vec<IpAddr> = wanted.difference(&self.installed).copied().collect();
        let remove: Vec<IpAddr> = self.installed.difference(wanted).copied().collect();
        for addr in &add {
            self.netlink
                .replace_host_route(table, ROUTE_PROTOCOL, *addr)
                .map_err(|e| error("adding", addr, e))?;
            self.installed.insert(*addr);
            info!(%addr, table, "VIP announced");
        }
        for addr in &remove {
            self.netlink
                .delete_host_route(table, ROUTE_PROTOCOL, *addr)
                .map_err(|e| error("removing", addr, e))?;
            self.installed.remove(addr);
            warn!(%addr, table, "VIP withdrawn");
        }
        Ok(())
    }

    /// The announcement of VIP `name` (`None` before its first decision).
    pub fn announcement(&self, name: &str) -> Option<VipAnnouncement> {
        let (addr, decision) = self.decisions.get(name)?;
        let announced = self.installed.contains(addr);
        let mut state = describe(decision);
        // Another VIP on the same address keeps the route, or a hold keeps the last state.
        match decision {
            Decision::Announce(why) if !announced => {
                state =
                    format!("withdrawn: {why}, but the route could not be written (see the log)")
            }
            Decision::Withdraw(_) if announced => {
                state.push_str(" (the address stays announced for another VIP on it)")
            }
            Decision::Hold(_) => {
                state = format!(
                    "{}: {} (keeps the previous state)",
                    if announced { "announced" } else { "withdrawn" },
                    decision.reason()
                )
            }
            _ => {}
        }
        Some(VipAnnouncement { announced, state })
    }

    /// `xdplb_vip_announced{vip}` samples, by VIP name.
    pub fn announced(&self) -> BTreeMap<String, bool> {
        self.decisions
            .iter()
            .map(|(name, (addr, _))| (name.clone(), self.installed.contains(addr)))
            .collect()
    }
}

fn describe(decision: &Decision) -> String {
    match decision {
        Decision::Announce(why) => format!("announced: {why}"),
        Decision::Withdraw(why) => format!("withdrawn: {why}"),
        Decision::Hold(why) => format!("holding: {why}"),
    }
}

impl fmt::Display for Announce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Announce::Healthy => "healthy",
            Announce::Always => "always",
            Announce::Never => "never",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: BackendFacts = BackendFacts {
        health: State::Up,
        drained: false,
        weight_zero: false,
        unresolved: false,
    };

    fn with(health: State) -> BackendFacts {
        BackendFacts { health, ..UP }
    }

    fn host() -> HostFacts {
        HostFacts::default()
    }

    #[test]
    fn healthy_announces_while_a_backend_takes_new_flows() {
        let d = decide(Announce::Healthy, &host(), &[with(State::Down), UP, UP]);
        assert_eq!(d, Decision::Announce("2 backends up".into()));
        let d = decide(Announce::Healthy, &host(), &[UP]);
        assert_eq!(d, Decision::Announce("1 backend up".into()));
    }

    #[test]
    fn healthy_withdraws_when_no_backend_takes_new_flows_and_says_why() {
        let down = with(State::Down);
        assert_eq!(
            decide(Announce::Healthy, &host(), &[down, down]),
            Decision::Withdraw("no backend up: every backend down".into())
        );
        let drained = BackendFacts {
            drained: true,
            ..UP
        };
        let zero = BackendFacts {
            weight_zero: true,
            ..UP
        };
        let unresolved = BackendFacts {
            unresolved: true,
            ..UP
        };
        assert_eq!(
            decide(Announce::Healthy, &host(), &[drained, drained]),
            Decision::Withdraw("no backend up: every backend drained".into())
        );
        assert_eq!(
            decide(
                Announce::Healthy,
                &host(),
                &[down, drained, zero, unresolved]
            ),
            Decision::Withdraw(
                "no backend up (1 down, 1 drained, 1 at weight 0, 1 without a next hop)".into()
            )
        );
        assert_eq!(
            decide(Announce::Healthy, &host(), &[]),
            Decision::Withdraw("no backend configured".into())
        );
    }

    #[test]
    fn unknown_health_holds_the_previous_state() {
        let unknown = with(State::Unknown);
        assert_eq!(
            decide(Announce::Healthy, &host(), &[unknown, with(State::Down)]),
            Decision::Hold("waiting for the first health checks".into())
        );
        // An up backend decides at once; a drained unknown one does not hold.
        assert!(matches!(
            decide(Announce::Healthy, &host(), &[unknown, UP]),
            Decision::Announce(_)
        ));
        let drained_unknown = BackendFacts {
            drained: true,
            ..unknown
        };
        assert!(matches!(
            decide(Announce::Healthy, &host(), &[drained_unknown]),
            Decision::Withdraw(_)
        ));
    }

    #[test]
    fn modes_never_and_always_ignore_backends() {
        let down = with(State::Down);
        assert_eq!(
            decide(Announce::Never, &host(), &[UP]),
            Decision::Withdraw("announce = \"never\"".into())
        );
        assert_eq!(
            decide(Announce::Always, &host(), &[down]),
            Decision::Announce("announce = \"always\"".into())
        );
    }

    #[test]
    fn a_detached_interface_or_a_stopping_daemon_withdraws_every_mode() {
        let detached = HostFacts {
            not_attached: vec!["eth1".into()],
            stopping: false,
        };
        let stopping = HostFacts {
            not_attached: Vec::new(),
            stopping: true,
        };
        for mode in [Announce::Healthy, Announce::Always] {
            assert_eq!(
                decide(mode, &detached, &[UP]),
                Decision::Withdraw("XDP program not attached on eth1".into())
            );
            assert_eq!(
                decide(mode, &stopping, &[UP]),
                Decision::Withdraw("daemon stopping".into())
            );
        }
    }
}
