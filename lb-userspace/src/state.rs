//! The one place data-path state changes: desired state -> [`Target`] -> [`plan`] (a pure diff
//! against the [`Live`] state) -> [`apply`] (ordered map writes).
//!
//! Ordering is what makes changes hitless:
//! 1. removed VIPs stop matching before their ids can be reused;
//! 2. backend entries are written before any ring refers to them;
//! 3. a new Maglev table goes into the VIP's inactive ring half, then one VIP-map update flips
//!    to it, so a packet sees the old table or the new one, never a mix;
//! 4. removed backends are cleared only after no ring refers to them, which makes their flows
//!    re-hash. Backends that stay keep their id, so established flows keep their backend.

use crate::{
    acl::SourceEntry,
    dataplane::{Dataplane, DataplaneError, Sizes},
    maglev::MaglevBackend,
    model::{BackendSpec, Forwarding, Mac, Prefix, Services, VipAddr, VipSpec},
    scheduler::{self, Scheduler, SchedulerError},
};
use lb_common::{
    AddrKey, Backend, FloodState, LbConfig, LogBudget, NatBackend, NatConfig, VipKey, VipLimits,
    VipMeta, BACKEND_DOWN, BACKEND_PRESENT, CONFIG_BLOCK_ALL_VIPS, CONFIG_HAS_NAT,
    CONFIG_HAS_PORT0_VIPS, CONFIG_LOG, FAMILY_IPV4, FAMILY_IPV6, FILTER_BLOCKED, FILTER_LIMITS,
    SCOPE_ALL_VIPS,
};
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error(
        "{needed} VIPs configured but max_vips is {max}: raise [daemon] max_vips (needs a restart)"
    )]
    TooManyVips { needed: usize, max: u32 },
    #[error("{needed} backends configured but max_backends is {max}: raise [daemon] max_backends (needs a restart)")]
    TooManyBackends { needed: usize, max: u32 },
    #[error("this change needs more than max_backends = {max} backend slots at once (removed backends keep theirs until the new rings are in place): raise [daemon] max_backends (needs a restart) or apply the change in two steps")]
    BackendSlotsExhausted { max: u32 },
    #[error("VIP {vip}: ring_size {size} exceeds max_ring_size {max}: raise [daemon] max_ring_size (needs a restart)")]
    RingTooLarge { vip: String, size: u32, max: u32 },
    #[error("VIP {vip}: {source}")]
    Schedule {
        vip: String,
        #[source]
        source: SchedulerError,
    },
}

/// Where packets for a backend leave: resolved from routes and neighbours (or configured).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub dst_mac: Mac,
    pub src_mac: Mac,
    /// Egress interface; 0 = the interface the packet came in on.
    pub ifindex: u32,
    pub mtu: u16,
    /// This host's address toward the backend (the route's preferred source): the default
    /// source of `nat` connections to it.
    pub src: Option<IpAddr>,
}

/// Finds the next hop toward a backend.
pub trait Resolve {
    fn next_hop(&self, backend: &BackendSpec) -> Result<NextHop, String>;
}

/// Runtime facts about a backend that are not in the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendStatus {
    /// Drained by the operator: no new flows, established ones continue.
    pub drained: bool,
    /// Weight set from the CLI, replacing the configured one.
    pub weight: Option<u32>,
    /// Failing health checks: no new flows; UDP flows re-hash.
    pub down: bool,
}

/// What the maps should hold.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Target {
    pub config: LbConfig,
    pub vips: BTreeMap<VipKey, TargetVip>,
    /// Backends left out because their next hop is unknown yet (retried later).
    pub unresolved: Vec<Unresolved>,
    /// Blocklist entries: (VIP name, or `None` for every VIP; prefix). Runtime state, filled
    /// in by the caller from [`crate::blocklist`]; entries of unknown VIPs are not written.
    pub blocked: BTreeSet<(Option<String>, SourceEntry)>,
    /// The flood defence's pin budget.
    pub flood: FloodState,
    /// The connection log's budget when the log is on (`[daemon.log]`, filled in by the
    /// caller from [`crate::connlog`]); `None` clears `CONFIG_LOG`.
    pub log: Option<LogBudget>,
    /// `nat` timeouts, ports and sources.
    pub nat: NatConfig,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unresolved {
    pub vip: String,
    pub backend: IpAddr,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetVip {
    pub name: String,
    pub mode: u8,
    pub scheduler: Scheduler,
    pub affinity: u8,
    pub ring_size: u32,
    pub backends: BTreeMap<IpAddr, TargetBackend>,
    /// `FILTER_*` bits from the VIP's config (the blocklist's bit is added by [`plan`]).
    pub filter: u8,
    /// ACL trie entries -> verdict.
    pub acl: BTreeMap<SourceEntry, u8>,
    /// Written while `filter` has `FILTER_LIMITS`.
    pub limits: VipLimits,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetBackend {
    /// The map entry, except `vip_id`, which [`plan`] fills in.
    pub entry: Backend,
    /// Its `NAT_BACKENDS` entry (zero unless the VIP forwards in `nat`).
    pub nat: NatBackend,
    /// Weight in the Maglev table: 0 when drained or down.
    pub ring_weight: u32,
}

pub fn vip_key(vip: &VipAddr) -> VipKey {
    let (addr, family) = addr_bytes(vip.addr);
    VipKey {
        addr,
        port: vip.port.to_be(),
        proto: vip.protocol.number(),
        family,
    }
}

/// An address in the maps' 16-byte layout, with its family.
pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    match addr {
        IpAddr::V4(a) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&a.octets());
            (bytes, FAMILY_IPV4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_IPV6),
    }
}

/// Key of the decap program's address sets.
pub fn addr_key(addr: IpAddr) -> AddrKey {
    let (addr, family) = addr_bytes(addr);
    AddrKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

fn prefix_and_mask<const N: usize>(prefix: &Prefix) -> ([u8; N], [u8; N]) {
    let (bytes, _) = addr_bytes(prefix.addr);
    let mut addr = [0; N];
    addr.copy_from_slice(&bytes[..N]);
    let mut mask = [0; N];
    mask.copy_from_slice(&prefix.host_mask());
    (addr, mask)
}

/// Builds the target from the model, runtime status and next-hop resolution. A backend whose
/// next hop cannot be resolved is left out (and listed), so one unreachable backend never
/// blocks the others.
pub fn target(
    services: &Services,
    status: impl Fn(&VipSpec, &BackendSpec) -> BackendStatus,
    resolver: &dyn Resolve,
) -> Result<Target, StateError> {
    let settings = &services.settings;
    let (ipip_src_v4, ipip_src_v4_host_mask) = prefix_and_mask::<4>(&settings.ipip_source_v4);
    let (ipip_src_v6, ipip_src_v6_host_mask) = prefix_and_mask::<16>(&settings.ipip_source_v6);
    let config = LbConfig {
        ipip_src_v4,
        ipip_src_v4_host_mask,
        ipip_src_v6,
        ipip_src_v6_host_mask,
        hash_seed: settings.hash_seed,
        flags: if services.vips.iter().any(|v| v.vip.port == 0) {
            CONFIG_HAS_PORT0_VIPS
        } else {
            0
        } | if services
            .vips
            .iter()
            .any(|v| v.forwarding == Forwarding::Nat)
        {
            CONFIG_HAS_NAT
        } else {
            0
        },
        _pad: [0; 3],
        icmp_too_big_per_sec: settings.icmp_too_big_rate,
        // The data plane fills the clock and the flow table's size in (Dataplane::set_config).
        jiffies_per_second: 0,
        jiffies_at_zero: 0,
        flow_set_mask: 0,
        ns_per_jiffy: 0,
    };
    let mut vips = BTreeMap::new();
    let mut unresolved = Vec::new();
    for spec in &services.vips {
        let mut backends = BTreeMap::new();
        for backend in &spec.backends {
            let hop = match resolver.next_hop(backend) {
                Ok(hop) => hop,
                Err(reason) => {
                    unresolved.push(Unresolved {
                        vip: spec.name.clone(),
                        backend: backend.addr,
                        reason,
                    });
                    continue;
                }
            };
            let nat = match nat_backend(spec, backend, &hop, settings) {
                Ok(nat) => nat,
                Err(reason) => {
                    unresolved.push(Unresolved {
                        vip: spec.name.clone(),
                        backend: backend.addr,
                        reason,
                    });
                    continue;
                }
            };
            let status = status(spec, backend);
            let (addr, family) = addr_bytes(backend.addr);
            let entry = Backend {
                addr,
                dst_mac: hop.dst_mac.0,
                src_mac: hop.src_mac.0,
                tx_ifindex: hop.ifindex,
                vip_id: 0,
                mtu: hop.mtu,
                flags: BACKEND_PRESENT | if status.down { BACKEND_DOWN } else { 0 },
                family,
            };
            let ring_weight = if status.drained || status.down {
                0
            } else {
                status.weight.unwrap_or(backend.weight)
            };
            backends.insert(
                backend.addr,
                TargetBackend {
                    entry,
                    nat,
                    ring_weight,
                },
            );
        }
        vips.insert(
            vip_key(&spec.vip),
            TargetVip {
                name: spec.name.clone(),
                mode: spec.forwarding.mode(),
                scheduler: spec.scheduler,
                affinity: spec.affinity.code(),
                ring_size: spec.ring_size,
                backends,
                filter: spec.acl.filter_flags()
                    | if spec.limits.is_some() {
                        FILTER_LIMITS
                    } else {
                        0
                    },
                acl: spec.acl.entries(),
                limits: spec.limits.map(|l| l.vip_limits()).unwrap_or_default(),
            },
        );
    }
    Ok(Target {
        config,
        vips,
        unresolved,
        blocked: BTreeSet::new(),
        flood: settings.flood.state(),
        log: None,
        nat: settings.nat.config(),
    })
}

/// A backend's `NAT_BACKENDS` entry: its port, and the default nat source (the route's
/// source toward it), needed only when no `nat_source_*` of its family is configured.
fn nat_backend(
    spec: &VipSpec,
    backend: &BackendSpec,
    hop: &NextHop,
    settings: &crate::model::DataPathSettings,
) -> Result<NatBackend, String> {
    if spec.forwarding != Forwarding::Nat {
        return Ok(NatBackend::default());
    }
    let configured = settings
        .nat
        .ports_per_backend(backend.addr.is_ipv6())
        .is_some();
    let src = match hop.src {
        Some(src) if src.is_ipv4() == backend.addr.is_ipv4() => addr_bytes(src).0,
        _ if configured => [0; 16],
        _ => {
            let key = if backend.addr.is_ipv4() {
                "nat_source_v4"
            } else {
                "nat_source_v6"
            };
            return Err(format!(
                "no address of this host toward {} to use as nat source: set daemon.{key}",
                backend.addr
            ));
        }
    };
    Ok(NatBackend {
        src,
        port: backend.port.unwrap_or(spec.vip.port).to_be(),
        _pad: [0; 2],
    })
}

/// Ids handed out first-freed-last-reused, so a freed id (whose old flows may linger in the
/// flow table) is reused as late as possible.
#[derive(Clone, Debug, PartialEq, Eq)]
struct IdPool {
    free: VecDeque<u32>,
}

impl IdPool {
    fn new(size: u32) -> Self {
        Self {
            free: (0..size).collect(),
        }
    }
    fn take(&mut self) -> Option<u32> {
        self.free.pop_front()
    }
    fn give_back(&mut self, id: u32) {
        self.free.push_back(id);
    }
}

/// What the maps hold now (as far as this process wrote them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Live {
    sizes: Sizes,
    config: Option<LbConfig>,
    pub vips: BTreeMap<VipKey, LiveVip>,
    vip_ids: IdPool,
    backend_ids: IdPool,
    /// Present backend entries that no VIP owns (found when adopting): cleared by [`plan`].
    orphans: Vec<u32>,
    /// ACL entries of no VIP (found when adopting): removed by [`plan`].
    orphan_acl: Vec<(u32, SourceEntry)>,
    /// Blocklist entries: (scope, prefix).
    blocked: BTreeSet<(u32, SourceEntry)>,
    /// The pin budget's parameters (its running state zeroed).
    flood: Option<FloodState>,
    /// The log budget's parameters (running state zeroed; unknown when adopted).
    log: Option<LogBudget>,
    nat: Option<NatConfig>,
    /// `VIP_ADDRS`' non-zero words.
    vip_addrs: BTreeMap<u32, u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveVip {
    pub name: String,
    pub meta: VipMeta,
    /// Contents of both ring halves (empty = unknown), so a new table only rewrites the slots
    /// that differ from what the inactive half already holds.
    halves: [Vec<u32>; 2],
    /// The half `meta.ring_base` points to.
    active: usize,
    pub backends: BTreeMap<IpAddr, LiveBackend>,
    acl: BTreeMap<SourceEntry, u8>,
    /// What `VIP_LIMITS` holds for the VIP (meaningful while `meta.filter` has the bit).
    limits: VipLimits,
}

impl LiveVip {
    /// The table packets use now (empty: no backend available).
    pub fn table(&self) -> &[u32] {
        if self.meta.ring_size == 0 {
            return &[];
        }
        &self.halves[self.active]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveBackend {
    pub id: u32,
    pub entry: Backend,
    pub nat: NatBackend,
    pub ring_weight: u32,
}

impl Live {
    /// Nothing written yet.
    pub fn empty(sizes: Sizes) -> Self {
        Self {
            sizes,
            config: None,
            vips: BTreeMap::new(),
            vip_ids: IdPool::new(sizes.max_vips),
            backend_ids: IdPool::new(sizes.max_backends),
            orphans: Vec::new(),
            orphan_acl: Vec::new(),
            blocked: BTreeSet::new(),
            flood: None,
            log: None,
            nat: None,
            vip_addrs: BTreeMap::new(),
        }
    }

    /// Rebuilds the live state from maps a previous run left pinned, so the next [`plan`]
    /// writes only what differs: unchanged VIPs keep their ids, tables and backends, and
    /// their flows keep working across the restart.
    pub fn adopt(dataplane: &Dataplane) -> Result<Self, DataplaneError> {
        let sizes = dataplane.sizes();
        let mut live = Self::empty(sizes);
        live.config = Some(dataplane.config()?);
        live.vip_addrs = dataplane.vip_addr_words()?;
        let mut by_vip: BTreeMap<u32, BTreeMap<IpAddr, LiveBackend>> = BTreeMap::new();
        for id in 0..sizes.max_backends {
            let entry = dataplane.backend(id)?;
            if entry.flags & BACKEND_PRESENT != 0 {
                by_vip.entry(entry.vip_id).or_default().insert(
                    entry_addr(&entry),
                    LiveBackend {
                        id,
                        entry,
                        nat: dataplane.nat_backend(id)?,
                        ring_weight: 0,
                    },
                );
            }
        }
        for (key, meta) in dataplane.vips()? {
            let active = ((meta.ring_base / sizes.max_ring_size) % 2) as usize;
            let mut halves = [Vec::new(), Vec::new()];
            halves[active] = (meta.ring_base..meta.ring_base + meta.ring_size)
                .map(|slot| dataplane.ring_slot(slot))
                .collect::<Result<_, _>>()?;
            let backends = by_vip.remove(&meta.vip_id).unwrap_or_default();
            let limits = if meta.filter & FILTER_LIMITS != 0 {
                VipLimits {
                    total_tat_ns: 0,
                    ..dataplane.vip_limits(meta.vip_id)?
                }
            } else {
                VipLimits::default()
            };
            live.vips.insert(
                key,
                LiveVip {
                    name: String::new(),
                    meta,
                    halves,
                    active,
                    backends,
                    acl: BTreeMap::new(),
                    limits,
                },
            );
        }
        for (key, verdict) in dataplane.acl()? {
            let (scope, entry) = SourceEntry::from_key(&key);
            match live.vips.values_mut().find(|v| v.meta.vip_id == scope) {
                Some(vip) => {
                    vip.acl.insert(entry, verdict);
                }
                None => live.orphan_acl.push((scope, entry)),
            }
        }
        live.blocked = dataplane
            .blocklist()?
            .iter()
            .map(|(key, _)| SourceEntry::from_key(key))
            .collect();
        live.flood = Some(FloodState {
            tat_ns: 0,
            ..dataplane.flood()?
        });
        live.nat = Some(dataplane.nat_config()?);
        let used_vips: Vec<u32> = live.vips.values().map(|v| v.meta.vip_id).collect();
        live.vip_ids.free.retain(|id| !used_vips.contains(id));
        let used_backends: Vec<u32> = live
            .vips
            .values()
            .flat_map(|v| v.backends.values().map(|b| b.id))
            .collect();
        live.backend_ids
            .free
            .retain(|id| !used_backends.contains(id));
        // Backends of VIPs that no longer exist: free their ids, clear them on the next plan.
        live.orphans = by_vip
            .into_values()
            .flat_map(|b| b.into_values().map(|b| b.id))
            .collect();
        Ok(live)
    }
}

fn entry_addr(entry: &Backend) -> IpAddr {
    entry_addr_of(entry.family, &entry.addr)
}

/// An address of the maps' 16-byte layout.
pub fn entry_addr_of(family: u8, addr: &[u8; 16]) -> IpAddr {
    if family == FAMILY_IPV4 {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        IpAddr::from(*addr)
    }
}

/// One map write, in the order [`apply`] performs them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    SetConfig(LbConfig),
    RemoveVip(VipKey),
    /// Zeroes a backend slot (entry and counters): flows to it re-hash.
    ClearBackend(u32),
    /// Zeroes a VIP slot's counters before the slot serves a new VIP.
    ClearVipCounters(u32),
    SetBackend(u32, Backend),
    /// Ring slot writes `(slot, backend id)`, all inside a half no packet reads.
    WriteRing(Vec<(u32, u32)>),
    /// ACL entry (VIP id, prefix) -> verdict; written before the VIP's flags use it.
    SetAcl(u32, SourceEntry, u8),
    SetLimits(u32, VipLimits),
    SetVip(VipKey, VipMeta),
    /// Removed only once the VIP's flags no longer need it.
    RemoveAcl(u32, SourceEntry),
    AddBlock(u32, SourceEntry),
    RemoveBlock(u32, SourceEntry),
    SetFlood(FloodState),
    /// Written before the `CONFIG_LOG` flag that makes the data path use it.
    SetLogBudget(LogBudget),
    /// Boxed: the source lists make it the largest change by far.
    SetNatConfig(Box<NatConfig>),
    /// Written before the backend entry, so no packet finds a nat backend without its port.
    SetNatBackend(u32, NatBackend),
    /// `VIP_ADDRS` words (index, bits).
    SetVipAddrs(Vec<(u32, u64)>),
}

/// The changes that turn `live` into `target`, and the live state after them. Pure.
pub fn plan(live: &Live, target: &Target) -> Result<(Vec<Change>, Live), StateError> {
    let sizes = live.sizes;
    check_capacity(&sizes, target)?;
    let mut next = live.clone();
    let mut changes = Vec::new();

    let mut config = target.config;
    if target.blocked.iter().any(|(vip, _)| vip.is_none()) {
        config.flags |= CONFIG_BLOCK_ALL_VIPS;
    }
    if let Some(budget) = target.log {
        config.flags |= CONFIG_LOG;
        if next.log != Some(budget) {
            changes.push(Change::SetLogBudget(budget));
            next.log = Some(budget);
        }
    }
    if next.config != Some(config) {
        changes.push(Change::SetConfig(config));
        next.config = Some(config);
    }
    if next.flood != Some(target.flood) {
        changes.push(Change::SetFlood(target.flood));
        next.flood = Some(target.flood);
    }
    if next.nat != Some(target.nat) {
        changes.push(Change::SetNatConfig(Box::new(target.nat)));
        next.nat = Some(target.nat);
    }

    for id in std::mem::take(&mut next.orphans) {
        changes.push(Change::ClearBackend(id));
    }
    for (scope, entry) in std::mem::take(&mut next.orphan_acl) {
        changes.push(Change::RemoveAcl(scope, entry));
    }

    let removed: Vec<VipKey> = live
        .vips
        .keys()
        .filter(|key| !target.vips.contains_key(key))
        .copied()
        .collect();
    for key in removed {
        let vip = next.vips.remove(&key).expect("listed above");
        changes.push(Change::RemoveVip(key));
        for entry in vip.acl.keys() {
            changes.push(Change::RemoveAcl(vip.meta.vip_id, *entry));
        }
        for backend in vip.backends.values() {
            changes.push(Change::ClearBackend(backend.id));
            next.backend_ids.give_back(backend.id);
        }
        next.vip_ids.give_back(vip.meta.vip_id);
    }

    // New VIPs' address bits before the VIPs (removed ones' bits may still be set: harmless).
    let union = crate::vip_addrs::words(live.vips.keys().chain(target.vips.keys()));
    let writes = crate::vip_addrs::writes(&next.vip_addrs, &union);
    if !writes.is_empty() {
        changes.push(Change::SetVipAddrs(writes));
        next.vip_addrs = union;
    }

    // Backends leaving a VIP that stays keep their ids until the whole plan is made: their
    // VIP's ring may still refer to them until its flip, so no other backend may take them
    // over in the same plan.
    let mut freed = Vec::new();
    for (key, want) in &target.vips {
        let blocked = target
            .blocked
            .iter()
            .any(|(vip, _)| vip.as_ref() == Some(&want.name));
        plan_vip(
            &mut next,
            &mut changes,
            &mut freed,
            key,
            want,
            target.config.hash_seed,
            blocked,
        )?;
    }
    for id in freed {
        next.backend_ids.give_back(id);
    }
    plan_blocklist(&mut next, &mut changes, target);
    // Exactly the remaining VIPs' bits, now that removed VIPs are gone from `VIPS`.
    let exact = crate::vip_addrs::words(target.vips.keys());
    let writes = crate::vip_addrs::writes(&next.vip_addrs, &exact);
    if !writes.is_empty() {
        changes.push(Change::SetVipAddrs(writes));
        next.vip_addrs = exact;
    }
    Ok((changes, next))
}

/// Blocklist entries of known VIPs and of every VIP, added or removed. No order matters: a
/// scope's flag without entries, or entries without the flag, block nothing.
fn plan_blocklist(next: &mut Live, changes: &mut Vec<Change>, target: &Target) {
    let want: BTreeSet<(u32, SourceEntry)> = target
        .blocked
        .iter()
        .filter_map(|(vip, entry)| {
            let scope = match vip {
                None => SCOPE_ALL_VIPS,
                Some(name) => next.vips.values().find(|v| &v.name == name)?.meta.vip_id,
            };
            Some((scope, *entry))
        })
        .collect();
    for (scope, entry) in want.difference(&next.blocked) {
        changes.push(Change::AddBlock(*scope, *entry));
    }
    for (scope, entry) in next.blocked.difference(&want) {
        changes.push(Change::RemoveBlock(*scope, *entry));
    }
    next.blocked = want;
}

fn check_capacity(sizes: &Sizes, target: &Target) -> Result<(), StateError> {
    if target.vips.len() > sizes.max_vips as usize {
        return Err(StateError::TooManyVips {
            needed: target.vips.len(),
            max: sizes.max_vips,
        });
    }
    // The target's total must fit. (A change that needs old and new slots at once can still
    // run out in plan_vip, which says so.)
    let backends: usize = target.vips.values().map(|v| v.backends.len()).sum();
    if backends > sizes.max_backends as usize {
        return Err(StateError::TooManyBackends {
            needed: backends,
            max: sizes.max_backends,
        });
    }
    for vip in target.vips.values() {
        if vip.ring_size > sizes.max_ring_size {
            return Err(StateError::RingTooLarge {
                vip: vip.name.clone(),
                size: vip.ring_size,
                max: sizes.max_ring_size,
            });
        }
    }
    Ok(())
}

fn plan_vip(
    next: &mut Live,
    changes: &mut Vec<Change>,
    freed: &mut Vec<u32>,
    key: &VipKey,
    want: &TargetVip,
    seed: u32,
    blocked: bool,
) -> Result<(), StateError> {
    let sizes = next.sizes;
    let is_new = !next.vips.contains_key(key);
    let mut vip = match next.vips.remove(key) {
        Some(vip) => vip,
        None => {
            let id = next.vip_ids.take().expect("capacity checked");
            changes.push(Change::ClearVipCounters(id));
            LiveVip {
                name: want.name.clone(),
                meta: VipMeta {
                    vip_id: id,
                    ring_base: sizes.ring_base(id, 0),
                    ring_size: 0,
                    mode: want.mode,
                    scheduler: want.scheduler.code(),
                    affinity: want.affinity,
                    filter: 0,
                },
                halves: [Vec::new(), Vec::new()],
                active: 0,
                backends: BTreeMap::new(),
                acl: BTreeMap::new(),
                limits: VipLimits::default(),
            }
        }
    };
    vip.name = want.name.clone();
    let vip_id = vip.meta.vip_id;

    let gone: Vec<IpAddr> = vip
        .backends
        .keys()
        .filter(|addr| !want.backends.contains_key(addr))
        .copied()
        .collect();
    for (addr, backend) in &want.backends {
        let entry = Backend {
            vip_id,
            ..backend.entry
        };
        let live = match vip.backends.get(addr) {
            Some(live) => *live,
            None => {
                let id = next
                    .backend_ids
                    .take()
                    .ok_or(StateError::BackendSlotsExhausted {
                        max: sizes.max_backends,
                    })?;
                // The slot may hold a removed backend's counters.
                changes.push(Change::ClearBackend(id));
                LiveBackend {
                    id,
                    entry: Backend::default(),
                    nat: NatBackend::default(),
                    ring_weight: 0,
                }
            }
        };
        if live.nat != backend.nat {
            changes.push(Change::SetNatBackend(live.id, backend.nat));
        }
        if live.entry != entry {
            changes.push(Change::SetBackend(live.id, entry));
        }
        vip.backends.insert(
            *addr,
            LiveBackend {
                id: live.id,
                entry,
                nat: backend.nat,
                ring_weight: backend.ring_weight,
            },
        );
    }

    let keys: Vec<(String, u32, u32)> = want
        .backends
        .iter()
        .map(|(addr, b)| (addr.to_string(), vip.backends[addr].id, b.ring_weight))
        .collect();
    let ring: Vec<MaglevBackend<'_>> = keys
        .iter()
        .map(|(key, id, weight)| MaglevBackend {
            key: key.as_bytes(),
            id: *id,
            weight: *weight,
        })
        .collect();
    let table =
        scheduler::table(want.scheduler, &ring, want.ring_size, seed).map_err(|source| {
            StateError::Schedule {
                vip: want.name.clone(),
                source,
            }
        })?;

    // A least-conn list (2 slots per backend) must fit a half too.
    if table.len() > sizes.max_ring_size as usize {
        return Err(StateError::RingTooLarge {
            vip: want.name.clone(),
            size: table.len() as u32,
            max: sizes.max_ring_size,
        });
    }
    // Filter state the new flags rely on is in place before the flags.
    for (entry, verdict) in &want.acl {
        if vip.acl.get(entry) != Some(verdict) {
            changes.push(Change::SetAcl(vip_id, *entry, *verdict));
        }
    }
    if want.filter & FILTER_LIMITS != 0 && want.limits != vip.limits {
        changes.push(Change::SetLimits(vip_id, want.limits));
        vip.limits = want.limits;
    }
    let mut meta = VipMeta {
        mode: want.mode,
        scheduler: want.scheduler.code(),
        affinity: want.affinity,
        filter: want.filter | if blocked { FILTER_BLOCKED } else { 0 },
        ..vip.meta
    };
    if table.is_empty() {
        meta.ring_size = 0;
    } else if vip.meta.ring_size == 0 || table != vip.halves[vip.active] {
        // With no table in use, either half is free; else the inactive one.
        let half = if vip.meta.ring_size == 0 {
            vip.active
        } else {
            1 - vip.active
        };
        let base = sizes.ring_base(vip_id, half as u32);
        let old = &vip.halves[half];
        let writes: Vec<(u32, u32)> = (base..)
            .zip(&table)
            .enumerate()
            .filter(|(i, (_, id))| old.get(*i) != Some(id))
            .map(|(_, (slot, id))| (slot, *id))
            .collect();
        if !writes.is_empty() {
            changes.push(Change::WriteRing(writes));
        }
        meta.ring_base = base;
        meta.ring_size = table.len() as u32;
        vip.halves[half] = table;
        vip.active = half;
    }
    if is_new || meta != vip.meta {
        changes.push(Change::SetVip(*key, meta));
        vip.meta = meta;
    }
    for entry in vip.acl.keys().filter(|e| !want.acl.contains_key(e)) {
        changes.push(Change::RemoveAcl(vip_id, *entry));
    }
    vip.acl = want.acl.clone();

    for addr in gone {
        let backend = vip.backends.remove(&addr).expect("listed above");
        changes.push(Change::ClearBackend(backend.id));
        freed.push(backend.id);
    }
    next.vips.insert(*key, vip);
    Ok(())
}

/// How many ring slots `changes` write.
pub fn ring_slot_writes(changes: &[Change]) -> usize {
    changes
        .iter()
        .map(|c| match c {
            Change::WriteRing(writes) => writes.len(),
            _ => 0,
        })
        .sum()
}

/// Performs `changes` in order. On error the maps are partly updated: the caller must treat
/// its live state as unknown and re-plan from [`Live::empty`] (a full rewrite).
pub fn apply(dataplane: &mut Dataplane, changes: &[Change]) -> Result<(), DataplaneError> {
    for change in changes {
        match change {
            Change::SetConfig(config) => dataplane.set_config(config)?,
            Change::RemoveVip(key) => dataplane.remove_vip(key)?,
            Change::ClearBackend(id) => dataplane.clear_backend(*id)?,
            Change::ClearVipCounters(id) => dataplane.clear_vip_counters(*id)?,
            Change::SetBackend(id, entry) => dataplane.set_backend(*id, entry)?,
            Change::WriteRing(writes) => dataplane.write_ring(writes)?,
            Change::SetVip(key, meta) => dataplane.set_vip(key, meta)?,
            Change::SetAcl(scope, entry, verdict) => {
                dataplane.set_acl(&entry.key(*scope), *verdict)?
            }
            Change::RemoveAcl(scope, entry) => dataplane.remove_acl(&entry.key(*scope))?,
            Change::SetLimits(vip_id, limits) => dataplane.set_vip_limits(*vip_id, limits)?,
            Change::AddBlock(scope, entry) => dataplane.add_block(&entry.key(*scope))?,
            Change::RemoveBlock(scope, entry) => dataplane.remove_block(&entry.key(*scope))?,
            Change::SetFlood(state) => dataplane.set_flood(state)?,
            Change::SetLogBudget(budget) => dataplane.set_log_budget(budget)?,
            Change::SetNatConfig(config) => dataplane.set_nat_config(config)?,
            Change::SetNatBackend(id, nat) => dataplane.set_nat_backend(*id, nat)?,
            Change::SetVipAddrs(writes) => dataplane.set_vip_addr_words(writes)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Forwarding, HealthSpec, Protocol};

    const SIZES: Sizes = Sizes {
        nat_table_size: lb_common::DEFAULT_NAT_TABLE_SIZE,
        max_vips: 4,
        max_backends: 8,
        max_ring_size: 13,
        flow_table_size: 64,
    };

    struct Macs;
    impl Resolve for Macs {
        fn next_hop(&self, backend: &BackendSpec) -> Result<NextHop, String> {
            let last = match backend.addr {
                IpAddr::V4(a) => a.octets()[3],
                IpAddr::V6(a) => a.octets()[15],
            };
            if last == 99 {
                return Err("no neighbour entry yet".into());
            }
            Ok(NextHop {
                src: None,
                dst_mac: backend.mac.unwrap_or(Mac([2, 0, 0, 0, 0, last])),
                src_mac: Mac([2, 0, 0, 0, 0, 1]),
                ifindex: 0,
                mtu: 1500,
            })
        }
    }

    fn vip(name: &str, last: u8, backends: &[(u8, u32)]) -> VipSpec {
        VipSpec {
            name: name.into(),
            vip: VipAddr {
                addr: IpAddr::from([192, 0, 2, last]),
                port: 80,
                protocol: Protocol::Tcp,
            },
            forwarding: Forwarding::Dsr,
            scheduler: Scheduler::Maglev,
            affinity: Default::default(),
            ring_size: 13,
            health: HealthSpec::default(),
            announce: Default::default(),
            backends: backends
                .iter()
                .map(|(b, weight)| BackendSpec {
                    port: None,
                    addr: IpAddr::from([10, 0, 0, *b]),
                    weight: *weight,
                    mac: None,
                    health_port: None,
                })
                .collect(),
            acl: Default::default(),
            limits: None,
        }
    }

    fn services(vips: Vec<VipSpec>) -> Services {
        Services {
            vips,
            ..Services::default()
        }
    }

    fn plan_for(live: &Live, services: &Services) -> (Vec<Change>, Live) {
        plan_with(live, services, |_, _| BackendStatus::default())
    }

    fn plan_with(
        live: &Live,
        services: &Services,
        status: impl Fn(&VipSpec, &BackendSpec) -> BackendStatus,
    ) -> (Vec<Change>, Live) {
        plan(live, &target(services, status, &Macs).unwrap()).unwrap()
    }

    /// Names of the changes in order, for compact assertions.
    fn kinds(changes: &[Change]) -> Vec<&'static str> {
        changes
            .iter()
            .map(|c| match c {
                Change::SetConfig(_) => "config",
                Change::RemoveVip(_) => "remove-vip",
                Change::ClearBackend(_) => "clear-backend",
                Change::ClearVipCounters(_) => "clear-vip-counters",
                Change::SetBackend(..) => "set-backend",
                Change::WriteRing(_) => "ring",
                Change::SetVip(..) => "set-vip",
                Change::SetAcl(..) => "set-acl",
                Change::RemoveAcl(..) => "remove-acl",
                Change::SetLimits(..) => "set-limits",
                Change::AddBlock(..) => "add-block",
                Change::RemoveBlock(..) => "remove-block",
                Change::SetFlood(_) => "flood",
                Change::SetLogBudget(_) => "log-budget",
                Change::SetNatConfig(_) => "nat-config",
                Change::SetNatBackend(..) => "nat-backend",
                Change::SetVipAddrs(_) => "vip-addrs",
            })
            .collect()
    }

    fn set_vip(changes: &[Change]) -> VipMeta {
        changes
            .iter()
            .find_map(|c| match c {
                Change::SetVip(_, meta) => Some(*meta),
                _ => None,
            })
            .expect("a SetVip change")
    }

    fn start(vips: Vec<VipSpec>) -> (Services, Live) {
        let services = services(vips);
        let (_, live) = plan_for(&Live::empty(SIZES), &services);
        (services, live)
    }

    #[test]
    fn acl_entries_are_written_before_the_flags_use_them_and_removed_after() {
        use crate::acl::AclSpec;
        use lb_common::{FILTER_ACL, FILTER_ALLOW_LIST};
        let mut web = vip("web", 10, &[(1, 100)]);
        web.acl = AclSpec {
            allow: Some(vec!["10.0.0.0/8".parse().unwrap()]),
            deny: vec!["10.9.0.0/16".parse().unwrap()],
        };
        let (changes, live) = plan_for(&Live::empty(SIZES), &services(vec![web.clone()]));
        let k = kinds(&changes);
        let set_acls = k.iter().filter(|c| **c == "set-acl").count();
        assert_eq!(set_acls, 2, "{k:?}");
        let last_acl = k.iter().rposition(|c| *c == "set-acl").unwrap();
        assert!(last_acl < k.iter().position(|c| *c == "set-vip").unwrap());
        assert_eq!(set_vip(&changes).filter, FILTER_ACL | FILTER_ALLOW_LIST);

        let (again, _) = plan_for(&live, &services(vec![web.clone()]));
        assert!(again.is_empty(), "unchanged ACL, no writes: {again:?}");

        web.acl = AclSpec::default();
        let (changes, _) = plan_for(&live, &services(vec![web]));
        assert_eq!(kinds(&changes), ["set-vip", "remove-acl", "remove-acl"]);
        assert_eq!(set_vip(&changes).filter, 0);
    }

    #[test]
    fn the_log_budget_is_written_before_the_flag_that_uses_it() {
        use lb_common::CONFIG_LOG;
        let web = services(vec![vip("web", 10, &[(1, 100)])]);
        let (_, live) = plan_for(&Live::empty(SIZES), &web);
        let mut want = target(&web, |_, _| BackendStatus::default(), &Macs).unwrap();
        let budget = LogBudget {
            interval_ns: 50_000,
            tolerance_ns: 1_000_000_000,
            tat_ns: 0,
        };
        want.log = Some(budget);
        let (changes, on) = plan(&live, &want).unwrap();
        assert_eq!(kinds(&changes), ["log-budget", "config"]);
        assert!(matches!(changes[1], Change::SetConfig(c) if c.flags & CONFIG_LOG != 0));
        want.log = None;
        let (changes, off) = plan(&on, &want).unwrap();
        assert_eq!(kinds(&changes), ["config"], "off: the flag alone");
        assert!(matches!(changes[0], Change::SetConfig(c) if c.flags & CONFIG_LOG == 0));
        want.log = Some(budget);
        let (changes, _) = plan(&off, &want).unwrap();
        assert_eq!(
            kinds(&changes),
            ["config"],
            "on again: the budget is still there"
        );
    }

    #[test]
    fn blocklist_entries_go_to_their_vip_or_to_every_vip() {
        use lb_common::{CONFIG_BLOCK_ALL_VIPS, FILTER_BLOCKED};
        let web = services(vec![vip("web", 10, &[(1, 100)])]);
        let (_, live) = plan_for(&Live::empty(SIZES), &web);
        let mut want = target(&web, |_, _| BackendStatus::default(), &Macs).unwrap();
        let entry = SourceEntry::of(&"198.51.100.0/24".parse().unwrap());
        want.blocked = [
            (Some("web".to_string()), entry),
            (None, entry),
            (Some("not-configured".to_string()), entry),
        ]
        .into();
        let (changes, next) = plan(&live, &want).unwrap();
        let vip_id = set_vip(&changes).vip_id;
        assert_eq!(
            changes,
            [
                Change::SetConfig(LbConfig {
                    flags: CONFIG_BLOCK_ALL_VIPS,
                    ..want.config
                }),
                Change::SetVip(
                    *want.vips.keys().next().unwrap(),
                    VipMeta {
                        filter: FILTER_BLOCKED,
                        ..set_vip(&changes)
                    }
                ),
                Change::AddBlock(vip_id, entry),
                Change::AddBlock(SCOPE_ALL_VIPS, entry),
            ]
        );
        want.blocked.clear();
        let (changes, _) = plan(&next, &want).unwrap();
        assert_eq!(
            kinds(&changes),
            ["config", "set-vip", "remove-block", "remove-block"]
        );
        assert_eq!(set_vip(&changes).filter, 0);
    }

    #[test]
    fn a_new_vip_writes_backends_then_ring_then_vip() {
        let (changes, live) = plan_for(
            &Live::empty(SIZES),
            &services(vec![vip("web", 10, &[(1, 100), (2, 100)])]),
        );
        assert_eq!(
            kinds(&changes),
            [
                "config",
                "flood",
                "nat-config",
                // The address bit before the VIP can match.
                "vip-addrs",
                "clear-vip-counters",
                "clear-backend",
                "set-backend",
                "clear-backend",
                "set-backend",
                "ring",
                "set-vip"
            ]
        );
        assert_eq!(
            ring_slot_writes(&changes),
            13,
            "a fresh table is written whole"
        );
        let meta = set_vip(&changes);
        assert_eq!((meta.ring_base, meta.ring_size), (0, 13));
        let table = live.vips.values().next().unwrap().table();
        assert_eq!(table.len(), 13);
    }

    #[test]
    fn an_identical_target_changes_nothing() {
        let (services, live) = start(vec![vip("web", 10, &[(1, 100), (2, 100)])]);
        let (changes, next) = plan_for(&live, &services);
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(next, live);
    }

    #[test]
    fn a_weight_change_writes_the_other_half_and_flips() {
        let (_, live) = start(vec![vip("web", 10, &[(1, 100), (2, 100)])]);
        let (changes, next) = plan_for(
            &live,
            &services(vec![vip("web", 10, &[(1, 100), (2, 300)])]),
        );
        assert_eq!(
            kinds(&changes),
            ["ring", "set-vip"],
            "backends stay as they are"
        );
        let meta = set_vip(&changes);
        assert_eq!(meta.ring_base, SIZES.ring_base(0, 1), "the inactive half");
        if let Change::WriteRing(writes) = &changes[0] {
            assert!(writes.iter().all(|(slot, _)| (13..26).contains(slot)));
        }
        // Flipping back only rewrites slots that differ from what that half still holds.
        let (changes, _) = plan_for(
            &next,
            &services(vec![vip("web", 10, &[(1, 100), (2, 100)])]),
        );
        assert_eq!(
            kinds(&changes),
            ["set-vip"],
            "half 0 already holds this table"
        );
        assert_eq!(set_vip(&changes).ring_base, 0);
    }

    #[test]
    fn drain_and_down_take_a_backend_out_of_the_ring_but_keep_it() {
        let (services, live) = start(vec![vip("web", 10, &[(1, 100), (2, 100)])]);
        let drained = |_: &VipSpec, b: &BackendSpec| BackendStatus {
            drained: b.addr == IpAddr::from([10, 0, 0, 1]),
            ..BackendStatus::default()
        };
        let (changes, next) = plan_with(&live, &services, drained);
        assert_eq!(kinds(&changes), ["ring", "set-vip"]);
        let web = next.vips.values().next().unwrap();
        let kept = web.backends[&IpAddr::from([10, 0, 0, 1])].id;
        assert!(
            !web.table().contains(&kept),
            "drained backend left the ring"
        );
        assert!(web
            .table()
            .iter()
            .all(|id| *id == web.backends[&IpAddr::from([10, 0, 0, 2])].id));

        let down = |_: &VipSpec, b: &BackendSpec| BackendStatus {
            down: b.addr == IpAddr::from([10, 0, 0, 1]),
            ..BackendStatus::default()
        };
        let (changes, _) = plan_with(&live, &services, down);
        assert_eq!(
            kinds(&changes),
            ["set-backend", "ring", "set-vip"],
            "DOWN flag written"
        );
        assert!(changes.iter().any(
            |c| matches!(c, Change::SetBackend(_, e) if e.flags == BACKEND_PRESENT | BACKEND_DOWN)
        ));
    }

    #[test]
    fn a_removed_backend_is_cleared_after_the_ring_stops_using_it() {
        let (_, live) = start(vec![vip("web", 10, &[(1, 100), (2, 100)])]);
        let old = live.vips.values().next().unwrap().backends[&IpAddr::from([10, 0, 0, 1])].id;
        let (changes, next) = plan_for(&live, &services(vec![vip("web", 10, &[(2, 100)])]));
        assert_eq!(kinds(&changes), ["ring", "set-vip", "clear-backend"]);
        assert_eq!(changes[2], Change::ClearBackend(old));
        // The freed id is reused last.
        assert_eq!(next.backend_ids.free.back(), Some(&old));
    }

    #[test]
    fn an_added_backend_gets_a_clean_slot_before_the_ring_refers_to_it() {
        let (_, live) = start(vec![vip("web", 10, &[(1, 100)])]);
        let (changes, _) = plan_for(
            &live,
            &services(vec![vip("web", 10, &[(1, 100), (2, 100)])]),
        );
        assert_eq!(
            kinds(&changes),
            ["clear-backend", "set-backend", "ring", "set-vip"]
        );
    }

    #[test]
    fn a_next_hop_change_rewrites_only_the_backend_entry() {
        let (_, live) = start(vec![vip("web", 10, &[(1, 100)])]);
        let mut moved = vip("web", 10, &[(1, 100)]);
        moved.backends[0].mac = Some(Mac([2, 0, 0, 0, 0, 0x42]));
        let (changes, _) = plan_for(&live, &services(vec![moved]));
        assert_eq!(kinds(&changes), ["set-backend"]);
    }

    #[test]
    fn schedulers_fill_the_ring_halves_and_flip_like_maglev() {
        let mut lc = vip("web", 10, &[(1, 100), (2, 0), (3, 300)]);
        lc.scheduler = Scheduler::LeastConn;
        let (changes, live) = plan_for(&Live::empty(SIZES), &services(vec![lc.clone()]));
        let meta = set_vip(&changes);
        assert_eq!(meta.scheduler, lb_common::SCHED_LEAST_CONN);
        let web = live.vips.values().next().unwrap();
        let id = |last: u8| web.backends[&IpAddr::from([10, 0, 0, last])].id;
        assert_eq!(meta.ring_size, 4, "two slots per weighted backend");
        assert_eq!(web.table(), [id(1), 100, id(3), 300]);

        let mut rr = lc;
        rr.scheduler = Scheduler::RoundRobin;
        let (changes, next) = plan_for(&live, &services(vec![rr]));
        assert_eq!(kinds(&changes), ["ring", "set-vip"]);
        let meta = set_vip(&changes);
        assert_eq!(meta.scheduler, lb_common::SCHED_ROUND_ROBIN);
        assert_eq!(meta.ring_base, SIZES.ring_base(0, 1), "the inactive half");
        assert_eq!(
            next.vips.values().next().unwrap().table(),
            [id(3), id(1), id(3), id(3)]
        );
    }

    #[test]
    fn a_least_conn_list_larger_than_a_ring_half_is_refused() {
        let backends: Vec<(u8, u32)> = (1..=7).map(|b| (b, 100)).collect();
        let mut lc = vip("web", 10, &backends);
        lc.scheduler = Scheduler::LeastConn;
        let err = plan(
            &Live::empty(SIZES),
            &target(&services(vec![lc]), |_, _| BackendStatus::default(), &Macs).unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("max_ring_size 13"), "{err}");
    }

    #[test]
    fn a_mode_change_rewrites_only_the_vip() {
        let (_, live) = start(vec![vip("web", 10, &[(1, 100)])]);
        let mut ipip = vip("web", 10, &[(1, 100)]);
        ipip.forwarding = Forwarding::Ipip;
        let (changes, _) = plan_for(&live, &services(vec![ipip]));
        assert_eq!(kinds(&changes), ["set-vip"]);
        assert_eq!(set_vip(&changes).mode, lb_common::MODE_IPIP);
    }

    #[test]
    fn a_nat_vip_writes_its_backends_nat_entries_first_and_sets_the_nat_flag() {
        let mut web = vip("web", 10, &[(1, 100)]);
        web.forwarding = Forwarding::Nat;
        web.backends[0].port = Some(8080);
        let mut services = services(vec![web]);
        services.settings.nat.sources_v4 = vec!["10.0.0.250".parse().unwrap()];
        let (changes, live) = plan_for(&Live::empty(SIZES), &services);
        assert_eq!(
            kinds(&changes),
            [
                "config",
                "flood",
                "nat-config",
                "vip-addrs",
                "clear-vip-counters",
                "clear-backend",
                "nat-backend",
                "set-backend",
                "ring",
                "set-vip"
            ]
        );
        let nat = changes.iter().find_map(|c| match c {
            Change::SetNatBackend(_, nat) => Some(*nat),
            _ => None,
        });
        assert_eq!(nat.map(|n| u16::from_be(n.port)), Some(8080));
        let config = changes.iter().find_map(|c| match c {
            Change::SetConfig(config) => Some(*config),
            _ => None,
        });
        assert_ne!(config.unwrap().flags & CONFIG_HAS_NAT, 0);
        assert_eq!(set_vip(&changes).mode, lb_common::MODE_NAT);
        // Unchanged: nothing rewritten.
        assert!(plan_for(&live, &services).0.is_empty());
    }

    #[test]
    fn a_nat_backend_without_a_source_waits_for_one() {
        let mut web = vip("web", 10, &[(1, 100)]);
        web.forwarding = Forwarding::Nat;
        let target = target(&services(vec![web]), |_, _| BackendStatus::default(), &Macs).unwrap();
        assert_eq!(target.unresolved.len(), 1);
        assert!(
            target.unresolved[0]
                .reason
                .contains("set daemon.nat_source_v4"),
            "{:?}",
            target.unresolved
        );
    }

    #[test]
    fn a_removed_vip_stops_matching_before_its_backends_are_cleared() {
        let (_, live) = start(vec![
            vip("web", 10, &[(1, 100)]),
            vip("api", 11, &[(2, 100)]),
        ]);
        let (changes, next) = plan_for(&live, &services(vec![vip("api", 11, &[(2, 100)])]));
        // Its address bit goes last, once no VIP of that address is left in `VIPS`.
        assert_eq!(
            kinds(&changes),
            ["remove-vip", "clear-backend", "vip-addrs"]
        );
        assert_eq!(next.vips.len(), 1);
        let Change::SetVipAddrs(writes) = &changes[2] else {
            unreachable!()
        };
        let kept = crate::vip_addrs::words(next.vips.keys());
        assert!(writes
            .iter()
            .all(|(word, bits)| kept.get(word).copied().unwrap_or(0) == *bits));
    }

    #[test]
    fn untouched_vips_keep_their_rings_when_another_changes() {
        let (_, live) = start(vec![
            vip("web", 10, &[(1, 100)]),
            vip("api", 11, &[(2, 100)]),
        ]);
        let (changes, next) = plan_for(
            &live,
            &services(vec![
                vip("web", 10, &[(1, 100), (3, 100)]),
                vip("api", 11, &[(2, 100)]),
            ]),
        );
        let api = state_key(11);
        assert!(!changes
            .iter()
            .any(|c| matches!(c, Change::SetVip(k, _) if *k == api)));
        assert_eq!(next.vips[&api], live.vips[&api]);
    }

    fn state_key(last: u8) -> VipKey {
        vip_key(&VipAddr {
            addr: IpAddr::from([192, 0, 2, last]),
            port: 80,
            protocol: Protocol::Tcp,
        })
    }

    #[test]
    fn no_available_backend_means_an_empty_ring() {
        let (_, live) = start(vec![vip("web", 10, &[(1, 100)])]);
        let (changes, next) = plan_for(&live, &services(vec![vip("web", 10, &[(1, 0)])]));
        assert_eq!(kinds(&changes), ["set-vip"]);
        assert_eq!(set_vip(&changes).ring_size, 0);
        assert!(next.vips.values().next().unwrap().table().is_empty());
    }

    #[test]
    fn the_port0_flag_follows_the_config() {
        let flags = |vips| {
            target(&services(vips), |_, _| BackendStatus::default(), &Macs)
                .unwrap()
                .config
                .flags
        };
        assert_eq!(flags(vec![vip("web", 10, &[(1, 100)])]), 0);
        let mut any_port = vip("all", 11, &[(1, 100)]);
        any_port.vip.port = 0;
        assert_eq!(
            flags(vec![vip("web", 10, &[(1, 100)]), any_port]),
            CONFIG_HAS_PORT0_VIPS
        );
    }

    #[test]
    fn unresolved_backends_are_left_out_and_listed() {
        let t = target(
            &services(vec![vip("web", 10, &[(1, 100), (99, 100)])]),
            |_, _| BackendStatus::default(),
            &Macs,
        )
        .unwrap();
        assert_eq!(t.vips.values().next().unwrap().backends.len(), 1);
        assert_eq!(t.unresolved.len(), 1);
        assert_eq!(t.unresolved[0].backend, IpAddr::from([10, 0, 0, 99]));
    }

    #[test]
    fn a_freed_backend_id_is_not_reused_in_the_same_plan() {
        // 8 slots: web 1-4 and api 5-8. Web gains a backend while api loses one: the totals
        // fit, but api's leaving backend keeps its slot until the plan is done.
        let (_, live) = start(vec![
            vip("web", 10, &[(1, 100), (2, 100), (3, 100), (4, 100)]),
            vip("api", 11, &[(5, 100), (6, 100), (7, 100), (8, 100)]),
        ]);
        let next = services(vec![
            vip(
                "web",
                10,
                &[(1, 100), (2, 100), (3, 100), (4, 100), (9, 100)],
            ),
            vip("api", 11, &[(5, 100), (6, 100), (7, 100)]),
        ]);
        let err = plan(
            &live,
            &target(&next, |_, _| BackendStatus::default(), &Macs).unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("two steps"), "{err}");
        // In two steps it works, and the freed id is available afterwards.
        let shrink = services(vec![
            vip("web", 10, &[(1, 100), (2, 100), (3, 100), (4, 100)]),
            vip("api", 11, &[(5, 100), (6, 100), (7, 100)]),
        ]);
        let (_, live) = plan_for(&live, &shrink);
        let (changes, _) = plan_for(&live, &next);
        assert!(changes.iter().any(|c| matches!(c, Change::SetBackend(..))));
    }

    #[test]
    fn capacity_errors_name_the_setting_to_raise() {
        let many: Vec<VipSpec> = (0..5).map(|i| vip(&format!("v{i}"), 20 + i, &[])).collect();
        let err = plan(
            &Live::empty(SIZES),
            &target(&services(many), |_, _| BackendStatus::default(), &Macs).unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("raise [daemon] max_vips"), "{err}");
        let backends: Vec<(u8, u32)> = (1..=9).map(|b| (b, 100)).collect();
        let err = plan(
            &Live::empty(SIZES),
            &target(
                &services(vec![vip("web", 10, &backends)]),
                |_, _| BackendStatus::default(),
                &Macs,
            )
            .unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("max_backends"), "{err}");
    }
}
