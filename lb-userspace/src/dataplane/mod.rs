//! The kernel side as userspace sees it: loading the embedded object, attaching it, and typed
//! access to every map. This is the only module that writes maps; everything else goes through
//! [`crate::state`], which decides *what* to write.

mod batch;
mod flows;
mod mmap;
mod pins;

pub(crate) use mmap::MappedArray;

use crate::{clock::KernelClock, connlog::LogRing};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray, PerCpuValues, ProgramArray,
    },
    programs::{ProgramError, Xdp},
    Ebpf, EbpfError, EbpfLoader, Pod,
};
use batch::{duplicate_fd, read_flow_map};
use lb_common::{
    counters, map_names, program_names, AddrKey, Backend, FloodState, FlowKey, FlowValue, LbConfig,
    LogBudget, NatBackend, NatConfig, NatForward, NatState, SourcePrefix, SourcePrefix4,
    TrafficCounters, VipDrops, VipKey, VipLimits, VipMeta, VipSlot, FLOW_PINNED, LAYOUT_VERSION,
    LOG_CPU_SLOTS, VIP_ADDR_WORDS,
};
use pins::{map_sizes, prepare_pin_dir};
use std::{
    borrow::Cow,
    path::{Path, PathBuf},
};

/// The compiled kernel programs, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Where build.rs put every binary of lb-ebpf: benchmarks load their baseline programs from
/// here at run time, so the daemon does not embed them.
pub const OBJECT_DIR: &str = env!("OUT_DIR");

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object failed (is this root on Linux >= 5.15 with BTF?): {0}")]
    Load(#[from] EbpfError),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("measuring the kernel clock: {0}")]
    Clock(#[from] crate::clock::ClockError),
    #[error("reading the possible CPUs failed: {0}")]
    PossibleCpus(#[source] std::io::Error),
    #[error("registering interface {0} for XDP_REDIRECT failed: {1}")]
    TxPort(u32, #[source] aya::maps::xdp::XdpMapError),
    #[error("the object has no map {0}: lb-common and lb-ebpf disagree (rebuild both)")]
    MissingMap(&'static str),
    #[error("the object has no XDP program {0}: lb-common and lb-ebpf disagree (rebuild both)")]
    MissingProgram(&'static str),
    #[error("interface {iface}: attaching XDP failed: {source} (try xdp_mode = \"generic\")")]
    Attach {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("interface {iface}: pinned XDP link {path}: {reason}")]
    Link {
        iface: String,
        path: PathBuf,
        reason: String,
    },
    #[error("pin directory {path}: {source} (is bpffs mounted on /sys/fs/bpf?)")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// Map sizes chosen by the operator at load time. Memory: the ring array dominates
/// (`max_vips * 2 * max_ring_size * 8` bytes: the kernel aligns array values to 8 bytes),
/// then the flow table (~100 bytes per entry). The nat tables are allocated per connection
/// (about 300 bytes for both entries), up to `nat_table_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub max_vips: u32,
    pub max_backends: u32,
    pub max_ring_size: u32,
    pub flow_table_size: u32,
    pub nat_table_size: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            max_vips: lb_common::DEFAULT_MAX_VIPS,
            max_backends: lb_common::DEFAULT_MAX_BACKENDS,
            max_ring_size: lb_common::DEFAULT_MAX_RING_SIZE,
            flow_table_size: lb_common::DEFAULT_FLOW_TABLE_SIZE,
            nat_table_size: lb_common::DEFAULT_NAT_TABLE_SIZE,
        }
    }
}

impl Sizes {
    /// For the decap program, which uses none of the balancer's maps: smallest allocations.
    pub const UNUSED: Sizes = Sizes {
        max_vips: 1,
        max_backends: 1,
        max_ring_size: 1,
        flow_table_size: 1,
        nat_table_size: 1,
    };

    /// First slot of half `half` (0 or 1) of the ring area of VIP `vip_id`.
    pub fn ring_base(&self, vip_id: u32, half: u32) -> u32 {
        (vip_id * 2 + half) * self.max_ring_size
    }
}

/// How XDP attaches to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// Native (driver) mode when the driver supports it, generic otherwise.
    #[default]
    Auto,
    Native,
    Generic,
}

/// Which program of the object to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The load balancer (`xdplb`).
    Balancer,
    /// The backend-side decapsulator (`xdplb_decap`).
    Decap,
}

impl Role {
    fn program_name(self) -> &'static str {
        match self {
            Role::Balancer => program_names::LB,
            Role::Decap => program_names::DECAP,
        }
    }
}

/// What [`Dataplane::load`] found in the pin directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Adoption {
    /// Nothing pinned (or pinning not requested): empty maps.
    Fresh,
    /// Maps of this layout and these sizes were pinned: their contents (flows!) are kept.
    Adopted,
    /// Pinned maps could not be used; they are replaced by empty ones.
    Replaced(String),
}

/// A loaded object with typed handles on its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    role: Role,
    sizes: Sizes,
    /// `<pin root>/v<LAYOUT_VERSION>` when pinning.
    pin_dir: Option<PathBuf>,
    adoption: Adoption,
    /// Written into every config (the balancer's data path reads its clock with it).
    clock: Option<KernelClock>,
    vips: HashMap<MapData, VipKey, VipMeta>,
    /// `VIPS` again by VIP id, for flow hits (see [`lb_common::VipSlot`]).
    vip_slots: Array<MapData, VipSlot>,
    rings: MappedArray,
    /// Least-conn counts, mapped so reconciliation adds atomically like the data path.
    active_conns: MappedArray,
    backends: Array<MapData, Backend>,
    flows: flows::FlowTable,
    config: Array<MapData, LbConfig>,
    global_counters: PerCpuArray<MapData, u64>,
    vip_counters: PerCpuArray<MapData, TrafficCounters>,
    backend_counters: PerCpuArray<MapData, TrafficCounters>,
    tx_ports: DevMapHash<MapData>,
    decap_local: HashMap<MapData, AddrKey, u8>,
    decap_vips: HashMap<MapData, AddrKey, u8>,
    /// IPv6 sources; IPv4 ones are in `acl4` (see [`acl4_key`]).
    acl: LpmTrie<MapData, SourcePrefix, u8>,
    acl4: LpmTrie<MapData, SourcePrefix4, u8>,
    blocklist: LpmTrie<MapData, SourcePrefix, u64>,
    vip_limits: Array<MapData, VipLimits>,
    vip_drops: PerCpuArray<MapData, VipDrops>,
    pinned: HashMap<MapData, FlowKey, FlowValue>,
    pinned_fd: std::os::fd::OwnedFd,
    flood: Array<MapData, FloodState>,
    log_budget: Array<MapData, LogBudget>,
    /// The connection log's rings, until [`Self::take_events`] hands them to their reader.
    events: Option<LogRing>,
    nat_fwd: HashMap<MapData, FlowKey, NatForward>,
    nat_fwd_fd: std::os::fd::OwnedFd,
    nat_rev: HashMap<MapData, FlowKey, NatState>,
    nat_rev_fd: std::os::fd::OwnedFd,
    nat_backends: Array<MapData, NatBackend>,
    nat_config: Array<MapData, NatConfig>,
    /// Holds the tail-called nat programs (balancer only).
    _nat_programs: Option<ProgramArray<MapData>>,
    vip_addrs: Array<MapData, u64>,
}

/// A key of the ACL or blocklist trie.
pub type SourceKey = Key<SourcePrefix>;

/// The `ACL4` key of an IPv4 prefix given in the IPv4-mapped layout (`::ffff:a.b.c.d`, prefix
/// length 32 + 96 + len); `None` for an IPv6 prefix.
fn acl4_key(key: &SourceKey) -> Option<Key<SourcePrefix4>> {
    let data = key.data();
    let mapped = data.addr[..10] == [0; 10] && data.addr[10..12] == [0xff, 0xff];
    (mapped && key.prefix_len() >= 32 + 96).then(|| {
        let [.., a, b, c, d] = data.addr;
        Key::new(
            key.prefix_len() - 96,
            SourcePrefix4 {
                scope: data.scope,
                addr: [a, b, c, d],
            },
        )
    })
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

fn take<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::MissingMap(name))?;
    M::try_from(map).map_err(map_err(name))
}

impl Dataplane {
    /// Loads the object with the given map sizes and verifies `role`'s program in the kernel.
    ///
    /// With `pin_root`, maps are pinned in `pin_root/v<LAYOUT_VERSION>/`, and maps already
    /// pinned there with the same sizes are reused: their contents survive, which is what makes
    /// a daemon restart hitless. A layout version bump or a size change gets fresh maps.
    pub fn load(role: Role, sizes: Sizes, pin_root: Option<&Path>) -> Result<Self> {
        // The connection log has a ring per CPU on a balancer; decap hosts do not log.
        let log_cpus = match role {
            Role::Balancer => {
                aya::util::nr_cpus().map_err(|(_, err)| DataplaneError::PossibleCpus(err))? as u32
            }
            Role::Decap => 1,
        };
        let map_sizes = map_sizes(&sizes, log_cpus);
        let flow_slots = lb_common::flow_slots(sizes.flow_table_size);
        let pin_dir = pin_root.map(|root| root.join(format!("v{LAYOUT_VERSION}")));
        let adoption = match &pin_dir {
            Some(dir) => prepare_pin_dir(dir, &map_sizes)?,
            None => Adoption::Fresh,
        };
        let pins: Vec<(&'static str, PathBuf)> = match &pin_dir {
            Some(dir) => map_sizes
                .iter()
                .map(|(name, _)| (*name, dir.join(name)))
                .collect(),
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        for (name, size) in &map_sizes {
            loader.map_max_entries(name, *size);
        }
        for (name, path) in &pins {
            loader.map_pin_path(name, Cow::Borrowed(path.as_path()));
        }
        let mut ebpf = loader.load(OBJECT)?;
        load_xdp(&mut ebpf, role.program_name())?;
        let nat_programs = match role {
            Role::Balancer => Some(load_nat_programs(&mut ebpf)?),
            Role::Decap => None,
        };
        let clock = match role {
            Role::Balancer => Some(crate::clock::measure(&mut ebpf)?),
            Role::Decap => None,
        };
        Ok(Self {
            _nat_programs: nat_programs,
            clock,
            vips: take(&mut ebpf, map_names::VIPS)?,
            rings: MappedArray::map(
                &mut ebpf,
                map_names::RINGS,
                sizes.max_vips * 2 * sizes.max_ring_size,
            )?,
            active_conns: MappedArray::map(&mut ebpf, map_names::ACTIVE_CONNS, sizes.max_backends)?,
            backends: take(&mut ebpf, map_names::BACKENDS)?,
            flows: flows::FlowTable::new(
                MappedArray::map_values(
                    &mut ebpf,
                    map_names::FLOWS,
                    flow_slots,
                    size_of::<lb_common::FlowSlot>(),
                )?,
                flow_slots,
            ),
            config: take(&mut ebpf, map_names::CONFIG)?,
            global_counters: take(&mut ebpf, map_names::GLOBAL_COUNTERS)?,
            vip_counters: take(&mut ebpf, map_names::VIP_COUNTERS)?,
            backend_counters: take(&mut ebpf, map_names::BACKEND_COUNTERS)?,
            tx_ports: take(&mut ebpf, map_names::TX_PORTS)?,
            decap_local: take(&mut ebpf, map_names::DECAP_LOCAL)?,
            decap_vips: take(&mut ebpf, map_names::DECAP_VIPS)?,
            acl: take(&mut ebpf, map_names::ACL)?,
            acl4: take(&mut ebpf, map_names::ACL4)?,
            blocklist: take(&mut ebpf, map_names::BLOCKLIST)?,
            vip_limits: take(&mut ebpf, map_names::VIP_LIMITS)?,
            vip_drops: take(&mut ebpf, map_names::VIP_DROPS)?,
            pinned_fd: duplicate_fd(&ebpf, map_names::PINNED)?,
            pinned: take(&mut ebpf, map_names::PINNED)?,
            flood: take(&mut ebpf, map_names::FLOOD)?,
            log_budget: take(&mut ebpf, map_names::LOG_BUDGET)?,
            events: Some(LogRing::new(
                MappedArray::map_values(
                    &mut ebpf,
                    map_names::EVENTS,
                    log_cpus * LOG_CPU_SLOTS,
                    std::mem::size_of::<lb_common::LogRecord>(),
                )?,
                log_cpus,
            )),
            nat_fwd_fd: duplicate_fd(&ebpf, map_names::NAT_FWD)?,
            nat_fwd: take(&mut ebpf, map_names::NAT_FWD)?,
            nat_rev_fd: duplicate_fd(&ebpf, map_names::NAT_REV)?,
            nat_rev: take(&mut ebpf, map_names::NAT_REV)?,
            nat_backends: take(&mut ebpf, map_names::NAT_BACKENDS)?,
            nat_config: take(&mut ebpf, map_names::NAT_CONFIG)?,
            vip_addrs: take(&mut ebpf, map_names::VIP_ADDRS)?,
            vip_slots: take(&mut ebpf, map_names::VIP_SLOTS)?,
            ebpf,
            role,
            sizes,
            pin_dir,
            adoption,
        })
    }

    /// Whether the maps were adopted from a previous run.
    pub fn adoption(&self) -> &Adoption {
        &self.adoption
    }

    pub fn sizes(&self) -> Sizes {
        self.sizes
    }

    /// The loaded program, for attaching or `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self) -> &mut Xdp {
        let name = self.role.program_name();
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .expect("checked at load")
    }

    /// The config as [`crate::state`] wrote it: without the clock parameters, which are this
    /// machine's, not the desired state's.
    pub fn config(&self) -> Result<LbConfig> {
        let config = self.config.get(&0, 0).map_err(map_err(map_names::CONFIG))?;
        Ok(LbConfig {
            jiffies_per_second: 0,
            jiffies_at_zero: 0,
            ns_per_jiffy: 0,
            flow_set_mask: 0,
            ..config
        })
    }

    /// Writes `config` with the clock parameters measured at load and the flow table's size.
    pub fn set_config(&mut self, config: &LbConfig) -> Result<()> {
        let clock = self
            .clock
            .map_or((0, 0), |c| (c.jiffies_per_second, c.jiffies_at_zero));
        let config = LbConfig {
            jiffies_per_second: clock.0,
            jiffies_at_zero: clock.1,
            ns_per_jiffy: lb_common::whole_ns_per_jiffy(clock.0),
            flow_set_mask: self.flows.set_mask(),
            ..*config
        };
        put(&mut self.config, map_names::CONFIG, 0, config)
    }

    /// `VIPS` first, then its slot: a flow hit uses the slot only while it holds the same key,
    /// so it never serves a VIP that `VIPS` does not (yet) have.
    pub fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<()> {
        self.vips
            .insert(key, meta, 0)
            .map_err(map_err(map_names::VIPS))?;
        let slot = VipSlot {
            key: *key,
            meta: *meta,
        };
        put(&mut self.vip_slots, map_names::VIP_SLOTS, meta.vip_id, slot)
    }

    /// The slot first (flow hits then ask `VIPS`), then `VIPS`. A slot already given to
    /// another VIP is left alone.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        let meta = match self.vips.get(key, 0) {
            Ok(meta) => Some(meta),
            Err(MapError::KeyNotFound) => None,
            Err(e) => return Err(map_err(map_names::VIPS)(e)),
        };
        if let Some(meta) = meta {
            let slot = self
                .vip_slots
                .get(&meta.vip_id, 0)
                .map_err(map_err(map_names::VIP_SLOTS))?;
            if slot.key == *key {
                put(
                    &mut self.vip_slots,
                    map_names::VIP_SLOTS,
                    meta.vip_id,
                    VipSlot::default(),
                )?;
            }
        }
        ignore_missing(self.vips.remove(key)).map_err(map_err(map_names::VIPS))
    }

    pub fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>> {
        collect(self.vips.iter()).map_err(map_err(map_names::VIPS))
    }

    /// Writes `(slot, backend id)` pairs of a Maglev table into a half no packet reads yet.
    /// The VIP-map update that makes the half active comes after, through a syscall, which
    /// orders these stores before it.
    pub fn write_ring(&mut self, writes: &[(u32, u32)]) -> Result<()> {
        for (slot, backend_id) in writes {
            self.rings.set(*slot, *backend_id)?;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    pub fn ring_slot(&self, slot: u32) -> Result<u32> {
        self.rings.get(slot)
    }

    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        put(&mut self.backends, map_names::BACKENDS, id, backend)
    }

    pub fn backend(&self, id: u32) -> Result<Backend> {
        fetch(&self.backends, map_names::BACKENDS, id)
    }

    /// Makes backend `id` disappear for the data path (flows to it re-hash) and zeroes its
    /// counters, so a later reuse of the id starts from nothing.
    pub fn clear_backend(&mut self, id: u32) -> Result<()> {
        self.set_backend(id, &Backend::default())?;
        self.set_nat_backend(id, &NatBackend::default())?;
        self.active_conns
            .wide_slot(id)?
            .store(0, std::sync::atomic::Ordering::Relaxed);
        self.backend_counters
            .set(id, zeroed_per_cpu()?, 0)
            .map_err(map_err(map_names::BACKEND_COUNTERS))
    }

    /// Zeroes a VIP slot's counters (traffic and drops) before the slot is given to a new VIP.
    pub fn clear_vip_counters(&mut self, vip_id: u32) -> Result<()> {
        self.vip_counters
            .set(vip_id, zeroed_per_cpu()?, 0)
            .map_err(map_err(map_names::VIP_COUNTERS))?;
        self.clear_vip_drops(vip_id)
    }

    /// Registers an egress interface for `XDP_REDIRECT`.
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|err| DataplaneError::TxPort(ifindex, err))
    }

    /// Global counters summed over CPUs, in [`counters::ALL`] order.
    pub fn global_counters(&self) -> Result<Vec<u64>> {
        (0..counters::COUNT)
            .map(|i| {
                let per_cpu = self
                    .global_counters
                    .get(&i, 0)
                    .map_err(map_err(map_names::GLOBAL_COUNTERS))?;
                Ok(per_cpu.iter().sum())
            })
            .collect()
    }

    pub fn vip_counters(&self, vip_id: u32) -> Result<TrafficCounters> {
        sum_traffic(&self.vip_counters, vip_id).map_err(map_err(map_names::VIP_COUNTERS))
    }

    pub fn backend_counters(&self, backend_id: u32) -> Result<TrafficCounters> {
        sum_traffic(&self.backend_counters, backend_id)
            .map_err(map_err(map_names::BACKEND_COUNTERS))
    }

    /// Every flow entry, read from the table's mapping (no syscall, no lock the data path
    /// waits on).
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        Ok(self.flows.all())
    }

    /// Least-conn active connections of backend `id`, as the data path compares them
    /// (signed: a give-back racing with reconciliation may dip below zero for a moment).
    pub fn active_conns(&self, id: u32) -> Result<i64> {
        let count = self.active_conns.wide_slot(id)?;
        Ok(count.load(std::sync::atomic::Ordering::Relaxed) as i64)
    }

    /// Adds `delta` to backend `id`'s least-conn count, atomically with the data path's adds.
    pub fn add_active_conns(&self, id: u32, delta: i64) -> Result<()> {
        self.active_conns
            .wide_slot(id)?
            .fetch_add(delta as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Rewrites an existing flow entry (never creates one: an entry evicted meanwhile stays
    /// gone). Returns whether it still existed.
    pub fn update_flow(&mut self, key: &FlowKey, value: &FlowValue) -> Result<bool> {
        Ok(self.flows.update(key, value))
    }

    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>> {
        Ok(self.flows.get(key))
    }

    /// Writes an ACL entry given in the IPv4-mapped layout of [`SourceKey`]; IPv4 prefixes go
    /// to the IPv4 trie.
    pub fn set_acl(&mut self, key: &SourceKey, verdict: u8) -> Result<()> {
        match acl4_key(key) {
            Some(key4) => self.acl4.insert(&key4, verdict, 0),
            None => self.acl.insert(key, verdict, 0),
        }
        .map_err(map_err(map_names::ACL))
    }

    pub fn remove_acl(&mut self, key: &SourceKey) -> Result<()> {
        ignore_missing(match acl4_key(key) {
            Some(key4) => self.acl4.remove(&key4),
            None => self.acl.remove(key),
        })
        .map_err(map_err(map_names::ACL))
    }

    /// Every ACL entry with its verdict, in the IPv4-mapped layout of [`SourceKey`].
    pub fn acl(&self) -> Result<Vec<(SourceKey, u8)>> {
        let mut entries = collect(self.acl.iter()).map_err(map_err(map_names::ACL))?;
        for entry in self.acl4.iter() {
            let (key4, verdict) = entry.map_err(map_err(map_names::ACL4))?;
            let data = key4.data();
            let prefix = SourcePrefix::of_source(
                u32::from_be_bytes(data.scope),
                lb_common::FAMILY_IPV4,
                &[data.addr, [0; 4], [0; 4], [0; 4]]
                    .concat()
                    .try_into()
                    .expect("16 bytes"),
            );
            entries.push((SourceKey::new(key4.prefix_len() + 96, prefix), verdict));
        }
        Ok(entries)
    }

    /// Adds a blocklist entry (its packet count starts at 0).
    pub fn add_block(&mut self, key: &SourceKey) -> Result<()> {
        self.blocklist
            .insert(key, 0, 0)
            .map_err(map_err(map_names::BLOCKLIST))
    }

    pub fn remove_block(&mut self, key: &SourceKey) -> Result<()> {
        ignore_missing(self.blocklist.remove(key)).map_err(map_err(map_names::BLOCKLIST))
    }

    /// Every blocklist entry with the packets it dropped.
    pub fn blocklist(&self) -> Result<Vec<(SourceKey, u64)>> {
        collect(self.blocklist.iter()).map_err(map_err(map_names::BLOCKLIST))
    }

    pub fn set_vip_limits(&mut self, vip_id: u32, limits: &VipLimits) -> Result<()> {
        put(&mut self.vip_limits, map_names::VIP_LIMITS, vip_id, limits)
    }

    pub fn vip_limits(&self, vip_id: u32) -> Result<VipLimits> {
        fetch(&self.vip_limits, map_names::VIP_LIMITS, vip_id)
    }

    /// A VIP's drops by reason, summed over CPUs.
    pub fn vip_drops(&self, vip_id: u32) -> Result<VipDrops> {
        let per_cpu = self
            .vip_drops
            .get(&vip_id, 0)
            .map_err(map_err(map_names::VIP_DROPS))?;
        Ok(per_cpu.iter().fold(VipDrops::default(), |sum, d| VipDrops {
            source_denied: sum.source_denied + d.source_denied,
            blocked: sum.blocked + d.blocked,
            rate_limited_source: sum.rate_limited_source + d.rate_limited_source,
            rate_limited_total: sum.rate_limited_total + d.rate_limited_total,
        }))
    }

    fn clear_vip_drops(&mut self, vip_id: u32) -> Result<()> {
        let zero = aya::util::nr_cpus()
            .map_err(|(_, err)| err)
            .and_then(|cpus| PerCpuValues::try_from(vec![VipDrops::default(); cpus]))
            .map_err(DataplaneError::PossibleCpus)?;
        self.vip_drops
            .set(vip_id, zero, 0)
            .map_err(map_err(map_names::VIP_DROPS))
    }

    pub fn set_flood(&mut self, state: &FloodState) -> Result<()> {
        put(&mut self.flood, map_names::FLOOD, 0, state)
    }

    /// Writes words of the `VIP_ADDRS` bitmap (see [`crate::vip_addrs`]).
    pub fn set_vip_addr_words(&mut self, writes: &[(u32, u64)]) -> Result<()> {
        for (word, bits) in writes {
            put(&mut self.vip_addrs, map_names::VIP_ADDRS, *word, bits)?;
        }
        Ok(())
    }

    /// The bitmap's non-zero words.
    pub fn vip_addr_words(&self) -> Result<std::collections::BTreeMap<u32, u64>> {
        let mut words = std::collections::BTreeMap::new();
        for word in 0..VIP_ADDR_WORDS {
            let bits = self
                .vip_addrs
                .get(&word, 0)
                .map_err(map_err(map_names::VIP_ADDRS))?;
            if bits != 0 {
                words.insert(word, bits);
            }
        }
        Ok(words)
    }

    pub fn flood(&self) -> Result<FloodState> {
        self.flood.get(&0, 0).map_err(map_err(map_names::FLOOD))
    }

    pub fn set_log_budget(&mut self, budget: &LogBudget) -> Result<()> {
        put(&mut self.log_budget, map_names::LOG_BUDGET, 0, budget)
    }

    pub fn log_budget(&self) -> Result<LogBudget> {
        fetch(&self.log_budget, map_names::LOG_BUDGET, 0)
    }

    /// The connection log's ring buffer, for its one reader (`None` once taken).
    pub fn take_events(&mut self) -> Option<LogRing> {
        self.events.take()
    }

    /// Every pinned flow (the flood defence's table), read in batches like [`Self::flows`].
    pub fn pinned(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        read_flow_map(&self.pinned_fd, &self.pinned, map_names::PINNED)
    }

    /// Removes a flow's pinned copy and clears `FLOW_PINNED` on its flow-table entry (if it
    /// has one), so the data path pins it again should it become active: a flow that keeps
    /// the bit without a copy could never be restored after an eviction.
    pub fn unpin_flow(&mut self, key: &FlowKey) -> Result<()> {
        ignore_missing(self.pinned.remove(key)).map_err(map_err(map_names::PINNED))?;
        if let Some(flow) = self.flow(key)? {
            if flow.state & FLOW_PINNED != 0 {
                let unpinned = FlowValue {
                    state: flow.state & !FLOW_PINNED,
                    ..flow
                };
                self.update_flow(key, &unpinned)?;
            }
        }
        Ok(())
    }

    pub fn set_nat_config(&mut self, config: &NatConfig) -> Result<()> {
        put(&mut self.nat_config, map_names::NAT_CONFIG, 0, config)
    }

    pub fn nat_config(&self) -> Result<NatConfig> {
        fetch(&self.nat_config, map_names::NAT_CONFIG, 0)
    }

    pub fn set_nat_backend(&mut self, id: u32, backend: &NatBackend) -> Result<()> {
        put(&mut self.nat_backends, map_names::NAT_BACKENDS, id, backend)
    }

    pub fn nat_backend(&self, id: u32) -> Result<NatBackend> {
        fetch(&self.nat_backends, map_names::NAT_BACKENDS, id)
    }

    /// Every nat connection (`NAT_REV`: backend-side tuple -> state), read in batches.
    pub fn nat_connections(&self) -> Result<Vec<(FlowKey, NatState)>> {
        read_flow_map(&self.nat_rev_fd, &self.nat_rev, map_names::NAT_REV)
    }

    /// Every nat translation (`NAT_FWD`: client tuple -> nat address and port), in batches.
    pub fn nat_translations(&self) -> Result<Vec<(FlowKey, NatForward)>> {
        read_flow_map(&self.nat_fwd_fd, &self.nat_fwd, map_names::NAT_FWD)
    }

    /// Overwrites the state of an existing nat connection (tests age entries with it).
    pub fn update_nat_connection(&mut self, key: &FlowKey, state: &NatState) -> Result<()> {
        const BPF_EXIST: u64 = 2;
        self.nat_rev
            .insert(key, state, BPF_EXIST)
            .map_err(map_err(map_names::NAT_REV))
    }

    /// Removes a nat connection's claim (`NAT_REV`), then its translation (`NAT_FWD`) if it
    /// still points at that claim.
    pub fn remove_nat(&mut self, reverse: &FlowKey, client: &FlowKey) -> Result<()> {
        ignore_missing(self.nat_rev.remove(reverse)).map_err(map_err(map_names::NAT_REV))?;
        let points_here = match self.nat_fwd.get(client, 0) {
            Ok(fwd) => fwd.reverse_key(reverse.proto, reverse.family) == *reverse,
            Err(MapError::KeyNotFound) => false,
            Err(e) => return Err(map_err(map_names::NAT_FWD)(e)),
        };
        if points_here {
            ignore_missing(self.nat_fwd.remove(client)).map_err(map_err(map_names::NAT_FWD))?;
        }
        Ok(())
    }

    /// Removes a translation whose claim is gone (taken over or swept).
    pub fn remove_nat_translation(&mut self, client: &FlowKey) -> Result<()> {
        ignore_missing(self.nat_fwd.remove(client)).map_err(map_err(map_names::NAT_FWD))
    }

    /// Decap program: tunnel endpoints that are this host.
    pub fn set_decap_local(&mut self, addrs: &[AddrKey]) -> Result<()> {
        replace_set(&mut self.decap_local, addrs).map_err(map_err(map_names::DECAP_LOCAL))
    }

    /// Decap program: VIPs served on this host.
    pub fn set_decap_vips(&mut self, addrs: &[AddrKey]) -> Result<()> {
        replace_set(&mut self.decap_vips, addrs).map_err(map_err(map_names::DECAP_VIPS))
    }
}

/// Loads the object's XDP program `name` into the kernel.
fn load_xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })?;
    program
        .load()
        .map_err(|source| DataplaneError::Program { name, source })?;
    Ok(program)
}

/// Loads the nat programs and puts them in their `NAT_PROGS` slots, where the balancer's
/// tail calls find them.
fn load_nat_programs(ebpf: &mut Ebpf) -> Result<ProgramArray<MapData>> {
    let mut slots: ProgramArray<MapData> = take(ebpf, map_names::NAT_PROGS)?;
    for (slot, name) in program_names::NAT.iter().enumerate() {
        let fd = load_xdp(ebpf, name)?
            .fd()
            .map_err(|source| DataplaneError::Program { name, source })?;
        slots
            .set(slot as u32, fd, 0)
            .map_err(map_err(map_names::NAT_PROGS))?;
    }
    Ok(slots)
}

fn zeroed_per_cpu() -> Result<PerCpuValues<TrafficCounters>> {
    aya::util::nr_cpus()
        .map_err(|(_, err)| err)
        .and_then(|cpus| PerCpuValues::try_from(vec![TrafficCounters::default(); cpus]))
        .map_err(DataplaneError::PossibleCpus)
}

fn sum_traffic(
    map: &PerCpuArray<MapData, TrafficCounters>,
    index: u32,
) -> Result<TrafficCounters, MapError> {
    let per_cpu = map.get(&index, 0)?;
    Ok(per_cpu
        .iter()
        .fold(TrafficCounters::default(), |sum, c| TrafficCounters {
            packets: sum.packets + c.packets,
            bytes: sum.bytes + c.bytes,
            new_flows: sum.new_flows + c.new_flows,
            not_forwarded: sum.not_forwarded + c.not_forwarded,
        }))
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

fn collect<K, V>(
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
) -> Result<Vec<(K, V)>, MapError> {
    iter.collect()
}

/// Makes a hash-map set hold exactly `addrs`.
fn replace_set<K: Pod + Eq>(
    map: &mut HashMap<MapData, K, u8>,
    addrs: &[K],
) -> Result<(), MapError> {
    let stale: Vec<K> = map
        .keys()
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|k| !addrs.contains(k))
        .collect();
    for key in &stale {
        ignore_missing(map.remove(key))?;
    }
    for key in addrs {
        map.insert(key, 1, 0)?;
    }
    Ok(())
}

/// `map[index] = value` in an array map; errors name the map.
fn put<T: Pod>(
    map: &mut Array<MapData, T>,
    name: &'static str,
    index: u32,
    value: impl std::borrow::Borrow<T>,
) -> Result<()> {
    map.set(index, value, 0).map_err(map_err(name))
}

/// `map[index]` of an array map; errors name the map.
fn fetch<T: Pod>(map: &Array<MapData, T>, name: &'static str, index: u32) -> Result<T> {
    map.get(&index, 0).map_err(map_err(name))
}
