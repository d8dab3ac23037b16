//! The kernel side as userspace sees it: loading the embedded object, attaching it, and typed
//! access to every map. This is the only module that writes maps; everything else goes through
//! [`crate::state`], which decides *what* to write.

use aya::{
    maps::{Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{ProgramError, Xdp, XdpMode},
    Ebpf, EbpfError, EbpfLoader, Pod,
};
use lb_common::{
    counters, map_names, program_names, AddrKey, Backend, FlowKey, FlowValue, LbConfig,
    TrafficCounters, VipKey, VipMeta, MAX_DECAP_ADDRS, MAX_TX_PORTS,
};
use std::{
    borrow::Cow,
    path::{Path, PathBuf},
};

/// The compiled kernel programs, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

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
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// Map sizes chosen by the operator at load time. Memory: the ring array dominates
/// (`max_vips * 2 * max_ring_size * 4` bytes), then the flow table (~100 bytes per entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub max_vips: u32,
    pub max_backends: u32,
    pub max_ring_size: u32,
    pub flow_table_size: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            max_vips: lb_common::DEFAULT_MAX_VIPS,
            max_backends: lb_common::DEFAULT_MAX_BACKENDS,
            max_ring_size: lb_common::DEFAULT_MAX_RING_SIZE,
            flow_table_size: lb_common::DEFAULT_FLOW_TABLE_SIZE,
        }
    }
}

impl Sizes {
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

/// A loaded object with typed handles on its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    role: Role,
    sizes: Sizes,
    vips: HashMap<MapData, VipKey, VipMeta>,
    rings: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    config: Array<MapData, LbConfig>,
    global_counters: PerCpuArray<MapData, u64>,
    vip_counters: PerCpuArray<MapData, TrafficCounters>,
    backend_counters: PerCpuArray<MapData, TrafficCounters>,
    tx_ports: DevMapHash<MapData>,
    decap_local: HashMap<MapData, AddrKey, u8>,
    decap_vips: HashMap<MapData, AddrKey, u8>,
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
    /// With `pin_dir`, every map is pinned there, and maps already pinned there are reused
    /// (their contents survive, which is what makes a daemon restart hitless).
    pub fn load(role: Role, sizes: Sizes, pin_dir: Option<&Path>) -> Result<Self> {
        let ring_entries = sizes.max_vips * 2 * sizes.max_ring_size;
        let pins: Vec<(&'static str, PathBuf)> = match pin_dir {
            Some(dir) => ALL_MAPS
                .iter()
                .map(|name| (*name, dir.join(name)))
                .collect(),
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::VIPS, sizes.max_vips)
            .map_max_entries(map_names::VIP_COUNTERS, sizes.max_vips)
            .map_max_entries(map_names::RINGS, ring_entries)
            .map_max_entries(map_names::BACKENDS, sizes.max_backends)
            .map_max_entries(map_names::BACKEND_COUNTERS, sizes.max_backends)
            .map_max_entries(map_names::FLOWS, sizes.flow_table_size)
            .map_max_entries(map_names::TX_PORTS, MAX_TX_PORTS)
            .map_max_entries(map_names::DECAP_LOCAL, MAX_DECAP_ADDRS)
            .map_max_entries(map_names::DECAP_VIPS, MAX_DECAP_ADDRS);
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
        Ok(Self {
            vips: take(&mut ebpf, map_names::VIPS)?,
            rings: take(&mut ebpf, map_names::RINGS)?,
            backends: take(&mut ebpf, map_names::BACKENDS)?,
            flows: take(&mut ebpf, map_names::FLOWS)?,
            config: take(&mut ebpf, map_names::CONFIG)?,
            global_counters: take(&mut ebpf, map_names::GLOBAL_COUNTERS)?,
            vip_counters: take(&mut ebpf, map_names::VIP_COUNTERS)?,
            backend_counters: take(&mut ebpf, map_names::BACKEND_COUNTERS)?,
            tx_ports: take(&mut ebpf, map_names::TX_PORTS)?,
            decap_local: take(&mut ebpf, map_names::DECAP_LOCAL)?,
            decap_vips: take(&mut ebpf, map_names::DECAP_VIPS)?,
            ebpf,
            role,
            sizes,
        })
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

    /// Attaches the program to `iface`; it stays attached while `self` lives.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
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
        .map(drop)
    }

    pub fn set_config(&mut self, config: &LbConfig) -> Result<()> {
        self.config
            .set(0, config, 0)
            .map_err(map_err(map_names::CONFIG))
    }

    pub fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<()> {
        self.vips
            .insert(key, meta, 0)
            .map_err(map_err(map_names::VIPS))
    }

    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        ignore_missing(self.vips.remove(key)).map_err(map_err(map_names::VIPS))
    }

    pub fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>> {
        collect(self.vips.iter()).map_err(map_err(map_names::VIPS))
    }

    /// Writes `(slot, backend id)` pairs of a Maglev table into a half no packet reads yet.
    pub fn write_ring(&mut self, writes: &[(u32, u32)]) -> Result<()> {
        for (slot, backend_id) in writes {
            self.rings
                .set(*slot, backend_id, 0)
                .map_err(map_err(map_names::RINGS))?;
        }
        Ok(())
    }

    pub fn ring_slot(&self, slot: u32) -> Result<u32> {
        self.rings.get(&slot, 0).map_err(map_err(map_names::RINGS))
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
        self.backend_counters
            .set(id, zeroed_per_cpu()?, 0)
            .map_err(map_err(map_names::BACKEND_COUNTERS))
    }

    /// Zeroes a VIP slot's counters before the slot is given to a new VIP.
    pub fn clear_vip_counters(&mut self, vip_id: u32) -> Result<()> {
        self.vip_counters
            .set(vip_id, zeroed_per_cpu()?, 0)
            .map_err(map_err(map_names::VIP_COUNTERS))
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

    /// Every flow entry. Iterating a hash map takes no lock the data path waits on.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        collect(self.flows.iter()).map_err(map_err(map_names::FLOWS))
    }

    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>> {
        match self.flows.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(err) => Err(map_err(map_names::FLOWS)(err)),
        }
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

const ALL_MAPS: [&str; 11] = [
    map_names::VIPS,
    map_names::RINGS,
    map_names::BACKENDS,
    map_names::FLOWS,
    map_names::CONFIG,
    map_names::GLOBAL_COUNTERS,
    map_names::VIP_COUNTERS,
    map_names::BACKEND_COUNTERS,
    map_names::TX_PORTS,
    map_names::DECAP_LOCAL,
    map_names::DECAP_VIPS,
];

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
