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
    dataplane::{Dataplane, DataplaneError, Sizes},
    maglev::{self, MaglevBackend, MaglevError},
    model::{BackendSpec, Mac, Prefix, Services, VipAddr, VipSpec},
};
use lb_common::{
    Backend, LbConfig, VipKey, VipMeta, BACKEND_DOWN, BACKEND_PRESENT, FAMILY_IPV4, FAMILY_IPV6,
};
use std::{
    collections::{BTreeMap, VecDeque},
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
    #[error("VIP {vip}: ring_size {size} exceeds max_ring_size {max}: raise [daemon] max_ring_size (needs a restart)")]
    RingTooLarge { vip: String, size: u32, max: u32 },
    #[error("VIP {vip}: {source}")]
    Maglev {
        vip: String,
        #[source]
        source: MaglevError,
    },
    #[error("VIP {vip}, backend {backend}: {reason}")]
    NextHop {
        vip: String,
        backend: IpAddr,
        reason: String,
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetVip {
    pub name: String,
    pub mode: u8,
    pub ring_size: u32,
    pub backends: BTreeMap<IpAddr, TargetBackend>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetBackend {
    /// The map entry, except `vip_id`, which [`plan`] fills in.
    pub entry: Backend,
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

fn prefix_and_mask<const N: usize>(prefix: &Prefix) -> ([u8; N], [u8; N]) {
    let (bytes, _) = addr_bytes(prefix.addr);
    let mut addr = [0; N];
    addr.copy_from_slice(&bytes[..N]);
    let mut mask = [0; N];
    mask.copy_from_slice(&prefix.host_mask());
    (addr, mask)
}

/// Builds the target from the model, runtime status and next-hop resolution.
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
        _pad: [0; 4],
    };
    let mut vips = BTreeMap::new();
    for spec in &services.vips {
        let mut backends = BTreeMap::new();
        for backend in &spec.backends {
            let hop = resolver
                .next_hop(backend)
                .map_err(|reason| StateError::NextHop {
                    vip: spec.name.clone(),
                    backend: backend.addr,
                    reason,
                })?;
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
            backends.insert(backend.addr, TargetBackend { entry, ring_weight });
        }
        vips.insert(
            vip_key(&spec.vip),
            TargetVip {
                name: spec.name.clone(),
                mode: spec.forwarding.mode(),
                ring_size: spec.ring_size,
                backends,
            },
        );
    }
    Ok(Target { config, vips })
}

/// Ids handed out first-freed-last-reused, so a freed id (whose old flows may linger in the
/// LRU) is reused as late as possible.
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
        }
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
    SetVip(VipKey, VipMeta),
}

/// The changes that turn `live` into `target`, and the live state after them. Pure.
pub fn plan(live: &Live, target: &Target) -> Result<(Vec<Change>, Live), StateError> {
    let sizes = live.sizes;
    check_capacity(&sizes, target)?;
    let mut next = live.clone();
    let mut changes = Vec::new();

    if next.config != Some(target.config) {
        changes.push(Change::SetConfig(target.config));
        next.config = Some(target.config);
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
        for backend in vip.backends.values() {
            changes.push(Change::ClearBackend(backend.id));
            next.backend_ids.give_back(backend.id);
        }
        next.vip_ids.give_back(vip.meta.vip_id);
    }

    for (key, want) in &target.vips {
        plan_vip(&mut next, &mut changes, key, want, target.config.hash_seed)?;
    }
    Ok((changes, next))
}

fn check_capacity(sizes: &Sizes, target: &Target) -> Result<(), StateError> {
    if target.vips.len() > sizes.max_vips as usize {
        return Err(StateError::TooManyVips {
            needed: target.vips.len(),
            max: sizes.max_vips,
        });
    }
    // Removed backends are freed before new ones are taken, so the target's total is what counts.
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
    key: &VipKey,
    want: &TargetVip,
    seed: u32,
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
                    _pad: [0; 3],
                },
                halves: [Vec::new(), Vec::new()],
                active: 0,
                backends: BTreeMap::new(),
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
                let id = next.backend_ids.take().expect("capacity checked");
                // The slot may hold a removed backend's counters.
                changes.push(Change::ClearBackend(id));
                LiveBackend {
                    id,
                    entry: Backend::default(),
                    ring_weight: 0,
                }
            }
        };
        if live.entry != entry {
            changes.push(Change::SetBackend(live.id, entry));
        }
        vip.backends.insert(
            *addr,
            LiveBackend {
                id: live.id,
                entry,
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
        maglev::build_table(&ring, want.ring_size, seed).map_err(|source| StateError::Maglev {
            vip: want.name.clone(),
            source,
        })?;

    let mut meta = VipMeta {
        mode: want.mode,
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
        vip.halves[half] = table;
        vip.active = half;
        meta.ring_base = base;
        meta.ring_size = want.ring_size;
    }
    if is_new || meta != vip.meta {
        changes.push(Change::SetVip(*key, meta));
        vip.meta = meta;
    }

    for addr in gone {
        let backend = vip.backends.remove(&addr).expect("listed above");
        changes.push(Change::ClearBackend(backend.id));
        next.backend_ids.give_back(backend.id);
    }
    next.vips.insert(*key, vip);
    Ok(())
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
        }
    }
    Ok(())
}
