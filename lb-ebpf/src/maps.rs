//! Every map of the object. Types, sizes and the reasons for them are documented in lb-common;
//! the sizes here are placeholders that userspace overrides at load time.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    counters, AddrKey, Backend, FlowKey, FlowValue, LbConfig, TrafficCounters, VipKey, VipMeta,
    ACTIVE_CONNS_MAP_FLAGS, DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_RING_SIZE,
    DEFAULT_MAX_VIPS, MAX_DECAP_ADDRS, MAX_TX_PORTS, RINGS_MAP_FLAGS,
};

#[map]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

#[map]
pub static RINGS: Array<u32> = Array::with_max_entries(
    DEFAULT_MAX_VIPS * 2 * DEFAULT_MAX_RING_SIZE,
    RINGS_MAP_FLAGS,
);

#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

#[map]
pub static CONFIG: Array<LbConfig> = Array::with_max_entries(1, 0);

#[map]
pub static GLOBAL_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

#[map]
pub static VIP_COUNTERS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

#[map]
pub static BACKEND_COUNTERS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);

#[map]
pub static DECAP_LOCAL: HashMap<AddrKey, u8> = HashMap::with_max_entries(MAX_DECAP_ADDRS, 0);

#[map]
pub static DECAP_VIPS: HashMap<AddrKey, u8> = HashMap::with_max_entries(MAX_DECAP_ADDRS, 0);

#[map]
pub static SCHED_CURSORS: PerCpuArray<u32> = PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

#[map]
pub static ACTIVE_CONNS: Array<u64> =
    Array::with_max_entries(DEFAULT_MAX_BACKENDS, ACTIVE_CONNS_MAP_FLAGS);

#[map]
pub static ICMP_TOO_BIG_RATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
