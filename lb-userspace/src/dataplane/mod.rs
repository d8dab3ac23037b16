//! The kernel side as userspace sees it: loading the embedded object, attaching it, and typed
//! access to every map. This is the only module that writes maps; everything else goes through
//! [`crate::state`], which decides *what* to write.

use crate::{clock::KernelClock, connlog::LogRing};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray, PerCpuValues, ProgramArray,
    },
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        ProgramError, Xdp, XdpMode,
    },
    Ebpf, EbpfError, EbpfLoader, Pod,
};
use lb_common::{
    counters, map_names, program_names, AddrKey, Backend, FloodState, FlowKey, FlowValue, LbConfig,
    LogBudget, NatBackend, NatConfig, NatForward, NatState, SourcePrefix, SourcePrefix4,
    TrafficCounters, VipDrops, VipKey, VipLimits, VipMeta, VipSlot, FLOW_PINNED, LAYOUT_VERSION,
    LOG_CPU_SLOTS, MAX_ACL_ENTRIES, MAX_BLOCKLIST_ENTRIES, MAX_DECAP_ADDRS, MAX_TX_PORTS,
    SOURCE_RATE_SLOTS, VIP_ADDR_WORDS,
};
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
    flows: HashMap<MapData, FlowKey, FlowValue>,
    /// The flow map's fd again, for batch reads (aya has no batch lookup).
    flows_fd: std::os::fd::OwnedFd,
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
        let name = role.program_name();
        let program: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })?;
        program
            .load()
            .map_err(|source| DataplaneError::Program { name, source })?;
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
            flows_fd: duplicate_fd(&ebpf, map_names::FLOWS)?,
            flows: take(&mut ebpf, map_names::FLOWS)?,
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

    /// Attaches the program to `iface`.
    ///
    /// When pinning, the attachment is a bpf_link pinned next to the maps: it outlives this
    /// process (forwarding continues while the daemon restarts), and a later run swaps its
    /// program into the existing link atomically instead of detaching. Links pinned by an older
    /// layout are taken over the same way. A pinned link the kernel has severed (its interface
    /// was deleted, perhaps created again since) is replaced by a new one. Without pinning it
    /// lasts while `self` lives.
    ///
    /// Returns whether a severed link was replaced.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<bool> {
        let Some(pin_dir) = self.pin_dir.clone() else {
            // The program keeps the link: attached for as long as `self` lives.
            return self.attach_link(iface, mode).map(|_| false);
        };
        let link_path = pin_dir.join(link_pin_name(iface));
        let existing = std::iter::once(link_path.clone())
            .chain(older_layout_dirs(&pin_dir).map(|dir| dir.join(link_pin_name(iface))))
            .find(|path| path.exists());
        let link_err = |path: &Path, reason: String| DataplaneError::Link {
            iface: iface.to_string(),
            path: path.to_path_buf(),
            reason,
        };
        let attach_err = |source| DataplaneError::Attach {
            iface: iface.to_string(),
            source,
        };
        let mut severed = false;
        if let Some(path) = existing {
            let pinned = PinnedLink::from_pin(&path).map_err(|e| link_err(&path, e.to_string()))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .map_err(|e| link_err(&path, e.to_string()))?;
            match self.program().attach_to_link(link) {
                Ok(id) => {
                    if path != link_path {
                        // Re-pin under this layout before the old directory goes away.
                        std::fs::rename(&path, &link_path)
                            .map_err(|e| link_err(&path, e.to_string()))?;
                    }
                    // The pin keeps the link; this process needs no descriptor of its own
                    // (re-attaching after every re-creation would pile them up).
                    drop(self.program().take_link(id).map_err(attach_err)?);
                    return Ok(false);
                }
                Err(e) if is_severed(&e) => {
                    std::fs::remove_file(&path).map_err(|e| link_err(&path, e.to_string()))?;
                    severed = true;
                }
                Err(source) => return Err(attach_err(source)),
            }
        }
        let id = self.attach_link(iface, mode)?;
        let link = self.program().take_link(id).map_err(attach_err)?;
        let fd_link = FdLink::try_from(link).map_err(|e| {
            link_err(
                &link_path,
                format!("{e}: the kernel attached without bpf_link, so it cannot be pinned"),
            )
        })?;
        fd_link
            .pin(&link_path)
            .map_err(|e| link_err(&link_path, e.to_string()))?;
        Ok(severed)
    }

    /// Attaches to `iface` with a new link, dropping the pinned one whatever it is attached to:
    /// for an interface that reports another program (or none) although a link is pinned for
    /// it (the link is severed, or follows a netdev that left this namespace).
    pub fn reattach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        if let Some(pin_dir) = &self.pin_dir {
            let path = pin_dir.join(link_pin_name(iface));
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(DataplaneError::Link {
                        iface: iface.to_string(),
                        path,
                        reason: e.to_string(),
                    })
                }
                _ => {}
            }
        }
        self.attach(iface, mode).map(drop)
    }

    /// The kernel's id of the loaded program, as netlink reports it on attached interfaces.
    pub fn program_id(&mut self) -> Result<u32> {
        let name = self.role.program_name();
        self.program()
            .info()
            .map(|info| info.id())
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Removes every pin (maps and links) of every layout under the pin root: the programs
    /// detach and the maps are freed once this process lets go of them.
    pub fn unpin_everything(&self) -> Result<()> {
        let Some(pin_dir) = &self.pin_dir else {
            return Ok(());
        };
        for dir in std::iter::once(pin_dir.clone()).chain(older_layout_dirs(pin_dir)) {
            remove_dir(&dir)?;
        }
        Ok(())
    }

    /// Removes the pinned links of interfaces not in `keep` (the program detaches from them);
    /// returns those interfaces.
    pub fn detach_others(&self, keep: &[String]) -> Result<Vec<String>> {
        let Some(pin_dir) = &self.pin_dir else {
            return Ok(Vec::new());
        };
        let pin_err = |source| DataplaneError::PinDir {
            path: pin_dir.clone(),
            source,
        };
        let mut detached = Vec::new();
        for entry in std::fs::read_dir(pin_dir).map_err(pin_err)? {
            let entry = entry.map_err(pin_err)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_prefix("link_") {
                if !keep.iter().any(|k| k == iface) {
                    std::fs::remove_file(entry.path()).map_err(pin_err)?;
                    detached.push(iface.to_string());
                }
            }
        }
        Ok(detached)
    }

    /// Removes pins of older layouts (after their links were taken over).
    pub fn remove_older_layouts(&self) -> Result<()> {
        if let Some(pin_dir) = &self.pin_dir {
            for dir in older_layout_dirs(pin_dir) {
                remove_dir(&dir)?;
            }
        }
        Ok(())
    }

    fn attach_link(&mut self, iface: &str, mode: AttachMode) -> Result<XdpLinkId> {
        let attach = |program: &mut Xdp, mode| {
            program
                .attach(iface, mode)
                .map_err(|source| DataplaneError::Attach {
                    iface: iface.to_string(),
                    source,
                })
        };
        let program = self.program();
        match mode {
            AttachMode::Native => attach(program, XdpMode::Driver),
            AttachMode::Generic => attach(program, XdpMode::Skb),
            AttachMode::Auto => {
                attach(program, XdpMode::Driver).or_else(|_| attach(program, XdpMode::Skb))
            }
        }
    }

    /// The config as [`crate::state`] wrote it: without the clock parameters, which are this
    /// machine's, not the desired state's.
    pub fn config(&self) -> Result<LbConfig> {
        let config = self.config.get(&0, 0).map_err(map_err(map_names::CONFIG))?;
        Ok(LbConfig {
            jiffies_per_second: 0,
            jiffies_at_zero: 0,
            ..config
        })
    }

    /// Writes `config` with the clock parameters measured at load.
    pub fn set_config(&mut self, config: &LbConfig) -> Result<()> {
        let clock = self
            .clock
            .map_or((0, 0), |c| (c.jiffies_per_second, c.jiffies_at_zero));
        let config = LbConfig {
            jiffies_per_second: clock.0,
            jiffies_at_zero: clock.1,
            ..*config
        };
        self.config
            .set(0, config, 0)
            .map_err(map_err(map_names::CONFIG))
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
        self.vip_slots
            .set(meta.vip_id, slot, 0)
            .map_err(map_err(map_names::VIP_SLOTS))
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
                self.vip_slots
                    .set(meta.vip_id, VipSlot::default(), 0)
                    .map_err(map_err(map_names::VIP_SLOTS))?;
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
        self.backends
            .set(id, backend, 0)
            .map_err(map_err(map_names::BACKENDS))
    }

    pub fn backend(&self, id: u32) -> Result<Backend> {
        self.backends
            .get(&id, 0)
            .map_err(map_err(map_names::BACKENDS))
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

    /// Every flow entry, read in batches of thousands per syscall (a million flows take a few
    /// hundred syscalls instead of two million). Reading takes no lock the data path waits on.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        read_flow_map(&self.flows_fd, &self.flows, map_names::FLOWS)
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
        const BPF_EXIST: u64 = 2;
        match self.flows.insert(key, value, BPF_EXIST) {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(err) => Err(map_err(map_names::FLOWS)(err)),
        }
    }

    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>> {
        match self.flows.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(err) => Err(map_err(map_names::FLOWS)(err)),
        }
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
        self.vip_limits
            .set(vip_id, limits, 0)
            .map_err(map_err(map_names::VIP_LIMITS))
    }

    pub fn vip_limits(&self, vip_id: u32) -> Result<VipLimits> {
        self.vip_limits
            .get(&vip_id, 0)
            .map_err(map_err(map_names::VIP_LIMITS))
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
        self.flood
            .set(0, state, 0)
            .map_err(map_err(map_names::FLOOD))
    }

    /// Writes words of the `VIP_ADDRS` bitmap (see [`crate::vip_addrs`]).
    pub fn set_vip_addr_words(&mut self, writes: &[(u32, u64)]) -> Result<()> {
        for (word, bits) in writes {
            self.vip_addrs
                .set(*word, bits, 0)
                .map_err(map_err(map_names::VIP_ADDRS))?;
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
        self.log_budget
            .set(0, budget, 0)
            .map_err(map_err(map_names::LOG_BUDGET))
    }

    pub fn log_budget(&self) -> Result<LogBudget> {
        self.log_budget
            .get(&0, 0)
            .map_err(map_err(map_names::LOG_BUDGET))
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
        self.nat_config
            .set(0, config, 0)
            .map_err(map_err(map_names::NAT_CONFIG))
    }

    pub fn nat_config(&self) -> Result<NatConfig> {
        self.nat_config
            .get(&0, 0)
            .map_err(map_err(map_names::NAT_CONFIG))
    }

    pub fn set_nat_backend(&mut self, id: u32, backend: &NatBackend) -> Result<()> {
        self.nat_backends
            .set(id, backend, 0)
            .map_err(map_err(map_names::NAT_BACKENDS))
    }

    pub fn nat_backend(&self, id: u32) -> Result<NatBackend> {
        self.nat_backends
            .get(&id, 0)
            .map_err(map_err(map_names::NAT_BACKENDS))
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

/// An array map mapped into this process (`BPF_F_MMAPABLE`): the Maglev rings and the
/// least-conn counts (`u32` or `u64` values: the kernel stores array values 8-byte aligned,
/// so slot `i` lives at byte `8 * i` either way), and the connection log's records.
pub(crate) struct MappedArray {
    name: &'static str,
    slots: *mut std::sync::atomic::AtomicU32,
    entries: u32,
    bytes: usize,
    /// Keeps the map alive while it is mapped.
    _map: MapData,
}

fn duplicate_fd(ebpf: &Ebpf, name: &'static str) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    let map = ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
    let (aya::maps::Map::LruHashMap(data) | aya::maps::Map::HashMap(data)) = map else {
        return Err(DataplaneError::MissingMap(name));
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| map_err(name)(MapError::IoError(e)))
}

/// Every entry of a flow map (`FLOWS` or `PINNED`), in batches when the kernel can.
fn read_flow_map<V: Pod + Default + Clone>(
    fd: &std::os::fd::OwnedFd,
    map: &HashMap<MapData, FlowKey, V>,
    name: &'static str,
) -> Result<Vec<(FlowKey, V)>> {
    match lookup_batch(fd) {
        Ok(flows) => Ok(flows),
        // Kernels without batch ops for this map type: one entry at a time.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            collect(map.iter()).map_err(map_err(name))
        }
        Err(e) => Err(map_err(name)(MapError::IoError(e))),
    }
}

/// `BPF_MAP_LOOKUP_BATCH` over a hash map keyed by 5-tuples (`FLOWS`, `PINNED`, nat).
fn lookup_batch<V: Pod + Default + Clone>(
    fd: &std::os::fd::OwnedFd,
) -> std::io::Result<Vec<(FlowKey, V)>> {
    use std::os::fd::AsRawFd;
    /// The `batch` member of `union bpf_attr`.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let mut chunk = 1024usize;
    let mut flows = Vec::new();
    // Hash-map batches resume from an opaque bucket cursor.
    let (mut cursor_in, mut cursor_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut keys = vec![FlowKey::default(); chunk];
        let mut values = vec![V::default(); chunk];
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &cursor_in as *const u32 as u64
            },
            out_batch: &mut cursor_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: attr points at buffers of `count` keys and values that outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let error = (ret < 0).then(std::io::Error::last_os_error);
        let got = attr.count as usize;
        flows.extend(keys.into_iter().zip(values).take(got));
        match error.as_ref().and_then(std::io::Error::raw_os_error) {
            None => {}
            Some(libc::ENOENT) => return Ok(flows),
            // One bucket holds more entries than the buffer: retry it with a larger one.
            Some(libc::ENOSPC) if got == 0 => {
                chunk *= 2;
                continue;
            }
            Some(_) => return Err(error.expect("checked")),
        }
        cursor_in = cursor_out;
        first = false;
    }
}

/// Bytes between ring slots in the mapping (`round_up(sizeof(u32), 8)` in the kernel).
const SLOT_STRIDE: usize = 8;

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for MappedArray {}

impl MappedArray {
    fn map(ebpf: &mut Ebpf, name: &'static str, entries: u32) -> Result<Self> {
        Self::map_values(ebpf, name, entries, SLOT_STRIDE)
    }

    /// An array of `entries` values of `value_size` bytes (a multiple of 8).
    pub(crate) fn map_values(
        ebpf: &mut Ebpf,
        name: &'static str,
        entries: u32,
        value_size: usize,
    ) -> Result<Self> {
        let Some(aya::maps::Map::Array(data)) = ebpf.take_map(name) else {
            return Err(DataplaneError::MissingMap(name));
        };
        use std::os::fd::{AsFd, AsRawFd};
        let page = 4096;
        let bytes = (entries as usize * value_size).div_ceil(page) * page;
        // SAFETY: mapping a BPF array fd created with BPF_F_MMAPABLE, shared and writable.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DataplaneError::Map {
                name,
                source: MapError::IoError(std::io::Error::last_os_error()),
            });
        }
        Ok(Self {
            name,
            slots: ptr.cast(),
            entries,
            bytes,
            _map: data,
        })
    }

    /// The start of the mapping and its length in bytes.
    pub(crate) fn bytes(&self) -> (*mut u8, usize) {
        (self.slots.cast(), self.bytes)
    }

    fn slot(&self, index: u32) -> Result<&std::sync::atomic::AtomicU32> {
        if index >= self.entries {
            return Err(DataplaneError::Map {
                name: self.name,
                source: MapError::OutOfBounds {
                    index,
                    max_entries: self.entries,
                },
            });
        }
        // SAFETY: in bounds of the mapping, which lives as long as self; 8-byte aligned.
        Ok(unsafe { &*self.slots.byte_add(index as usize * SLOT_STRIDE) })
    }

    /// Slot `index` of an array of `u64` values (same 8-byte stride).
    fn wide_slot(&self, index: u32) -> Result<&std::sync::atomic::AtomicU64> {
        let slot = self.slot(index)?;
        // SAFETY: the slot's 8 bytes are all inside the mapping and 8-byte aligned.
        Ok(unsafe { &*std::ptr::from_ref(slot).cast::<std::sync::atomic::AtomicU64>() })
    }

    fn get(&self, index: u32) -> Result<u32> {
        Ok(self.slot(index)?.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn set(&self, index: u32, value: u32) -> Result<()> {
        self.slot(index)?
            .store(value, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.slots.cast(), self.bytes) };
    }
}

/// Whether updating a pinned link failed because the kernel severed it (ENOLINK: its
/// interface is gone, or someone detached it).
fn is_severed(error: &ProgramError) -> bool {
    matches!(error, ProgramError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::ENOLINK))
}

fn link_pin_name(iface: &str) -> String {
    format!("link_{iface}")
}

/// Sibling `v<N>` directories of other layout versions.
fn older_layout_dirs(pin_dir: &Path) -> impl Iterator<Item = PathBuf> {
    let current = pin_dir.file_name().map(|n| n.to_owned());
    let entries = pin_dir
        .parent()
        .and_then(|root| std::fs::read_dir(root).ok())
        .into_iter()
        .flatten()
        .flatten();
    entries
        .filter(move |e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            Some(e.file_name()) != current
                && name.starts_with('v')
                && name[1..].parse::<u32>().is_ok()
        })
        .map(|e| e.path())
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DataplaneError::PinDir {
            path: dir.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Every map with its max_entries: what the loader creates, and what a pinned map must have
/// to be adopted.
fn map_sizes(sizes: &Sizes, log_cpus: u32) -> Vec<(&'static str, u32)> {
    vec![
        (map_names::VIPS, sizes.max_vips),
        (map_names::VIP_COUNTERS, sizes.max_vips),
        (map_names::RINGS, sizes.max_vips * 2 * sizes.max_ring_size),
        (map_names::BACKENDS, sizes.max_backends),
        (map_names::BACKEND_COUNTERS, sizes.max_backends),
        (map_names::FLOWS, sizes.flow_table_size),
        (map_names::CONFIG, 1),
        (map_names::GLOBAL_COUNTERS, counters::COUNT),
        (map_names::TX_PORTS, MAX_TX_PORTS),
        (map_names::DECAP_LOCAL, MAX_DECAP_ADDRS),
        (map_names::DECAP_VIPS, MAX_DECAP_ADDRS),
        (map_names::SCHED_CURSORS, sizes.max_vips),
        (map_names::ACTIVE_CONNS, sizes.max_backends),
        (map_names::ACL, MAX_ACL_ENTRIES),
        (map_names::ACL4, MAX_ACL_ENTRIES),
        (map_names::BLOCKLIST, MAX_BLOCKLIST_ENTRIES),
        (map_names::VIP_LIMITS, sizes.max_vips),
        (map_names::SOURCE_RATES, SOURCE_RATE_SLOTS),
        (map_names::VIP_DROPS, sizes.max_vips),
        (map_names::PINNED, sizes.flow_table_size),
        (map_names::FLOOD, 1),
        (map_names::EVENTS, log_cpus * LOG_CPU_SLOTS),
        (map_names::LOG_BUDGET, 1),
        (map_names::NAT_FWD, sizes.nat_table_size),
        (map_names::NAT_REV, sizes.nat_table_size),
        (map_names::NAT_BACKENDS, sizes.max_backends),
        (map_names::NAT_CONFIG, 1),
        (map_names::NAT_PROGS, lb_common::NAT_PROGRAMS),
        (map_names::NAT_SCRATCH, 1),
        (map_names::VIP_ADDRS, VIP_ADDR_WORDS),
        (map_names::VIP_SLOTS, sizes.max_vips),
    ]
}

/// Loads the nat programs and puts them in their `NAT_PROGS` slots, where the balancer's
/// tail calls find them.
fn load_nat_programs(ebpf: &mut Ebpf) -> Result<ProgramArray<MapData>> {
    let mut slots: ProgramArray<MapData> = take(ebpf, map_names::NAT_PROGS)?;
    for (slot, name) in program_names::NAT.iter().enumerate() {
        let program: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })?;
        program
            .load()
            .map_err(|source| DataplaneError::Program { name, source })?;
        let fd = program
            .fd()
            .map_err(|source| DataplaneError::Program { name, source })?;
        slots
            .set(slot as u32, fd, 0)
            .map_err(map_err(map_names::NAT_PROGS))?;
    }
    Ok(slots)
}

/// Decides whether the maps pinned in `dir` can be adopted; clears the directory if not.
fn prepare_pin_dir(dir: &Path, expected: &[(&'static str, u32)]) -> Result<Adoption> {
    let pin_err = |source| DataplaneError::PinDir {
        path: dir.to_path_buf(),
        source,
    };
    if !dir.join(map_names::FLOWS).exists() {
        std::fs::create_dir_all(dir).map_err(pin_err)?;
        return Ok(Adoption::Fresh);
    }
    let mismatch = expected.iter().find_map(|(name, want)| {
        let have = MapData::from_pin(dir.join(name))
            .and_then(|map| map.info())
            .map(|info| info.max_entries());
        match have {
            Ok(have) if have == *want => None,
            Ok(have) => Some(format!(
                "map {name} has {have} entries, the config asks for {want}"
            )),
            Err(e) => Some(format!("map {name} cannot be opened: {e}")),
        }
    });
    match mismatch {
        None => Ok(Adoption::Adopted),
        Some(reason) => {
            // Keep the links: the new program takes them over in attach().
            for (name, _) in expected {
                match std::fs::remove_file(dir.join(name)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(pin_err(e)),
                    _ => {}
                }
            }
            Ok(Adoption::Replaced(reason))
        }
    }
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
