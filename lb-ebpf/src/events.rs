//! The connection log: a [`LogRecord`] into the `EVENTS` ring buffer for each new or
//! re-picked flow and for each packet the filter drops (ACL, blocklist, new-flow limits).
//!
//! Off (`CONFIG_LOG` clear), each hook costs one flag test. On, records pass a kernel budget
//! first (`LOG_BUDGET`, GCRA over one bucket shared by every CPU, updated without atomics
//! like the VIP-wide new-flow limit: racing CPUs may each let one extra record through), then
//! a reserve in the ring; a record over the budget or without room is counted and forgotten,
//! never waited for. Records are submitted without waking the reader: the daemon drains the
//! ring on its own timer, so a flood costs no wake-ups.

use crate::{
    counters,
    lookup::Choice,
    maps::{EVENTS, LOG_BUDGET},
};
use aya_ebpf::{bindings::BPF_RB_NO_WAKEUP, helpers::bpf_ktime_get_ns};
use lb_common::{
    counters as idx, gcra, FlowKey, LogRecord, VipMeta, CONFIG_LOG, LOG_BLOCKED, LOG_DENIED,
    LOG_NEW, LOG_RATE_LIMITED, LOG_REHASH, NO_BACKEND,
};

/// After the backend choice: logs a flow that was created or re-picked.
#[inline(always)]
pub fn chosen(config_flags: u8, key: &FlowKey, vip: &VipMeta, choice: &Choice) {
    if config_flags & CONFIG_LOG == 0 || !choice.new_flow {
        return;
    }
    let event = if choice.rehash { LOG_REHASH } else { LOG_NEW };
    emit(key, vip.vip_id, choice.backend_id, event, 0);
}

/// Where a VIP's packet is dropped: logs the filter's drops (`reason` is the drop counter);
/// other reasons (no backend) are not connection events.
#[inline(always)]
pub fn dropped(config_flags: u8, key: &FlowKey, vip: &VipMeta, reason: u32) {
    if config_flags & CONFIG_LOG == 0 {
        return;
    }
    let event = match reason {
        idx::DROP_SOURCE_DENIED => LOG_DENIED,
        idx::DROP_BLOCKED => LOG_BLOCKED,
        idx::DROP_RATE_LIMITED_SOURCE | idx::DROP_RATE_LIMITED_TOTAL => LOG_RATE_LIMITED,
        _ => return,
    };
    emit(key, vip.vip_id, NO_BACKEND, event, reason as u8);
}

/// A BPF-to-BPF call: the record's code stays out of the inlined packet path, which only
/// the log-on case enters.
#[inline(never)]
fn emit(key: &FlowKey, vip_id: u32, backend_id: u32, event: u8, reason: u8) {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(budget) = LOG_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: array value; concurrent writers store whole u64s (see the module comment).
    let budget = unsafe { &mut *budget };
    match gcra(budget.tat_ns, now, budget.interval_ns, budget.tolerance_ns) {
        Some(next) => budget.tat_ns = next,
        None => return counters::global(idx::LOG_RECORDS_DROPPED_BUDGET),
    }
    let Some(mut entry) = EVENTS.reserve::<LogRecord>(0) else {
        return counters::global(idx::LOG_RECORDS_DROPPED_RING_FULL);
    };
    entry.write(LogRecord {
        time_ns: now,
        client: key.src,
        nat_addr: [0; 16],
        vip_id,
        backend_id,
        client_port: key.sport,
        nat_port: 0,
        vip_port: key.dport,
        event,
        proto: key.proto,
        family: key.family,
        reason,
        _pad: [0; 6],
    });
    entry.submit(BPF_RB_NO_WAKEUP as u64);
}
