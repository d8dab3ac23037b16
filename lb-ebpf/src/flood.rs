//! Flood defence of the flow table. `FLOWS` evicts: a new flow whose set is full takes the
//! slot of its least valuable entry, so a spoofed flood of new tuples that complete a fake
//! handshake, sustained long enough, flushes idle established flows. A
//! flow that sends a second packet is pinned: copied into `PINNED`, a hash table that never
//! evicts (an insert into a full table fails). A packet that misses `FLOWS` but is pinned puts
//! its flow back, with its backend. Pins are budgeted (a GCRA bucket in `FLOOD`), so a flood
//! fills `PINNED` no faster than the configured rate, and the daemon expires idle pins.

use crate::{
    counters,
    lookup::FlowHash,
    maps::{FLOOD, PINNED},
    parse::Packet,
};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    counters as idx, gcra, FlowKey, FlowValue, FLOW_FIN_SEEN, FLOW_PINNED, FLOW_RST_SEEN,
};

/// Pins a flow seen for the second time (or later, after a deferred pin), within the budget.
/// Once per flow: a BPF-to-BPF call keeps it out of the hit path's code.
#[inline(never)]
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
        // A copy left by an earlier connection on this tuple (evicted before it closed) must
        // not outlive this one: overwriting an existing entry takes no room, so no budget.
        if PINNED.insert(key, &pinned_copy(flow), BPF_EXIST).is_ok() {
            flow.state |= FLOW_PINNED;
        }
        return;
    };
    budget.tat_ns = tat;
    if PINNED.insert(key, &pinned_copy(flow), 0).is_err() {
        // Full: the budget spent on it bounds how often this is tried.
        counters::global(idx::FLOOD_PIN_FAILED);
        return;
    }
    flow.state |= FLOW_PINNED;
    counters::global(idx::FLOOD_PINNED);
}

/// `BPF_EXIST`: update an existing entry only.
const BPF_EXIST: u64 = 2;

#[inline(always)]
fn pinned_copy(flow: &FlowValue) -> FlowValue {
    FlowValue {
        state: flow.state | FLOW_PINNED,
        ..*flow
    }
}

/// A pinned flow's backend or state bits changed (a re-pick, FIN, RST, least-conn's count):
/// the copy follows, so a restore never brings back an old backend or an old count. Updating
/// an existing entry takes no budget. A copy the daemon expired meanwhile is gone: the flow
/// is pinned again by its next packet. Rare, so a call rather than inlined into the hit path.
#[inline(never)]
pub fn sync(key: &FlowKey, flow: &mut FlowValue) {
    if PINNED.insert(key, &*flow, BPF_EXIST).is_err() {
        flow.state &= !FLOW_PINNED;
    }
}

/// A flow missing from `FLOWS` (evicted) but pinned: puts it back and returns its entry. A
/// SYN starts a connection, so it has no established flow to restore: SYNs, and SYN floods,
/// skip the lookup (a retransmitted SYN of an evicted pinned flow is re-hashed, and pinned
/// again by its next packet). Nor is a connection that ended (FIN or RST seen) restored: the
/// daemon expires such copies soon, and a new connection on the tuple must not inherit it.
#[inline(always)]
pub fn restore(pkt: &Packet, hash: &FlowHash) -> Option<*mut FlowValue> {
    if pkt.is_tcp_syn_only() {
        return None;
    }
    let key = &pkt.key;
    // SAFETY: hash value copied out at once.
    let pinned: FlowValue = *unsafe { PINNED.get(key) }?;
    if pinned.state & (FLOW_FIN_SEEN | FLOW_RST_SEEN) != 0 {
        return None;
    }
    let flow = crate::flows::insert(key, &pinned, hash)?;
    counters::global(idx::FLOOD_RESTORED);
    Some(flow)
}
