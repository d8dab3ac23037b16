//! Every map of the object. Types, sizes and the reasons for them are documented in lb-common;
//! the sizes here are placeholders that userspace overrides at load time.

use crate::counters::SharedCount;
use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, DevMapHash, HashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    counters, AddrKey, Backend, FloodState, FlowKey, FlowSlot, FlowValue, LbConfig, LogBudget,
    LogRecord, NatBackend, NatConfig, NatForward, NatState, SourcePrefix, SourcePrefix4,
    TrafficCounters, VipDrops, VipKey, VipLimits, VipMeta, VipSlot, ACTIVE_CONNS_MAP_FLAGS,
    DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_RING_SIZE, DEFAULT_MAX_VIPS,
    DEFAULT_NAT_TABLE_SIZE, EVENTS_MAP_FLAGS, FLOWS_MAP_FLAGS, LOG_CPU_SLOTS, MAX_ACL_ENTRIES,
    MAX_BLOCKLIST_ENTRIES, MAX_DECAP_ADDRS, MAX_TX_PORTS, RINGS_MAP_FLAGS, SOURCE_RATE_SLOTS,
    VIP_ADDR_WORDS,
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
pub static FLOWS: Array<FlowSlot> =
    Array::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, FLOWS_MAP_FLAGS);

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

#[map]
pub static ACL: LpmTrie<SourcePrefix, u8> = LpmTrie::with_max_entries(MAX_ACL_ENTRIES, 0);

#[map]
pub static ACL4: LpmTrie<SourcePrefix4, u8> = LpmTrie::with_max_entries(MAX_ACL_ENTRIES, 0);

#[map]
pub static BLOCKLIST: LpmTrie<SourcePrefix, SharedCount> =
    LpmTrie::with_max_entries(MAX_BLOCKLIST_ENTRIES, 0);

#[map]
pub static VIP_LIMITS: Array<VipLimits> = Array::with_max_entries(DEFAULT_MAX_VIPS, 0);

#[map]
pub static SOURCE_RATES: Array<u64> = Array::with_max_entries(SOURCE_RATE_SLOTS, 0);

#[map]
pub static VIP_DROPS: PerCpuArray<VipDrops> = PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

#[map]
pub static PINNED: HashMap<FlowKey, FlowValue> =
    HashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

#[map]
pub static FLOOD: Array<FloodState> = Array::with_max_entries(1, 0);

#[map]
pub static EVENTS: Array<LogRecord> = Array::with_max_entries(LOG_CPU_SLOTS, EVENTS_MAP_FLAGS);

#[map]
pub static LOG_BUDGET: Array<LogBudget> = Array::with_max_entries(1, 0);

/// `nat` hash tables are not preallocated (`BPF_F_NO_PREALLOC`): an LB without nat VIPs
/// spends no memory on them, and one with them spends it per connection, up to the size.
const NO_PREALLOC: u32 = 1;

#[map]
pub static NAT_FWD: HashMap<FlowKey, NatForward> =
    HashMap::with_max_entries(DEFAULT_NAT_TABLE_SIZE, NO_PREALLOC);

#[map]
pub static NAT_REV: HashMap<FlowKey, NatState> =
    HashMap::with_max_entries(DEFAULT_NAT_TABLE_SIZE, NO_PREALLOC);

#[map]
pub static NAT_BACKENDS: Array<NatBackend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map]
pub static NAT_CONFIG: Array<NatConfig> = Array::with_max_entries(1, 0);

#[map]
pub static NAT_SCRATCH: PerCpuArray<crate::nat::Scratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static NAT_PROGS: ProgramArray = ProgramArray::with_max_entries(lb_common::NAT_PROGRAMS, 0);

#[map]
pub static VIP_ADDRS: Array<u64> = Array::with_max_entries(VIP_ADDR_WORDS, 0);

#[map]
pub static VIP_SLOTS: Array<VipSlot> = Array::with_max_entries(DEFAULT_MAX_VIPS, 0);
