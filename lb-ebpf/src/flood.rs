//! Flood defence of the flow table. `FLOWS` is an LRU: any insert evicts the coldest entry, so
//! a spoofed flood of new tuples, sustained long enough, flushes idle established flows. A
//! flow that sends a second packet is pinned: copied into `PINNED`, a hash table that never
//! evicts (an insert into a full table fails). A packet that misses `FLOWS` but is pinned puts
//! its flow back, with its backend. Pins are budgeted (a GCRA bucket in `FLOOD`), so a flood
//! fills `PINNED` no faster than the configured rate, and the daemon expires idle pins.

use crate::{
    counters,
    maps::{FLOOD, FLOWS, PINNED},
    parse::Packet,
};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{counters as idx, gcra, FlowKey, FlowValue, FLOW_PINNED};

/// Pins a flow seen for the second time (or later, after a deferred pin), within the budget.
#[inline(always)]
pub fn pin(key: &FlowKey, flow: &mut FlowValue) {
    let Some(budget) = FLOOD.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: array value; racing CPUs can at worst each take one pin past the budget.
    let budget = unsafe { &mut *budget };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(tat) = gcra(
        budget.tat_ns,
        now,
        budget.pin_interval_ns,
        budget.pin_tolerance_ns,
    ) else {
        counters::global(idx::FLOOD_PIN_DEFERRED);
        return;
    };
    budget.tat_ns = tat;
    let pinned = FlowValue {
        state: flow.state | FLOW_PINNED,
        ..*flow
    };
    if PINNED.insert(key, &pinned, 0).is_err() {
        // Full: the budget spent on it bounds how often this is tried.
        counters::global(idx::FLOOD_PIN_FAILED);
        return;
    }
    flow.state |= FLOW_PINNED;
    counters::global(idx::FLOOD_PINNED);
}

/// A flow missing from `FLOWS` (evicted) but pinned: puts it back and returns its entry. A
/// SYN starts a connection, so it has no established flow to restore: SYNs, and SYN floods,
/// skip the lookup (a retransmitted SYN of an evicted pinned flow is re-hashed, and pinned
/// again by its next packet).
#[inline(always)]
pub fn restore(pkt: &Packet) -> Option<*mut FlowValue> {
    if pkt.is_tcp_syn_only() {
        return None;
    }
    let key = &pkt.key;
    // SAFETY: hash value copied out at once.
    let pinned: FlowValue = *unsafe { PINNED.get(key) }?;
    FLOWS.insert(key, &pinned, 0).ok()?;
    counters::global(idx::FLOOD_RESTORED);
    FLOWS.get_ptr_mut(key)
}
