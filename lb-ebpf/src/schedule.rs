//! Schedulers: which backend a new flow gets. Established flows never come here (the flow
//! table keeps their backend, whatever the scheduler).
//!
//! * Maglev: the consistent-hash table, by flow hash (the same answer on every LB instance).
//! * Round robin: the VIP's weighted sequence, walked by a per-CPU cursor. Exact per CPU: any
//!   `sum(weights)` consecutive new flows on one CPU take each backend `weight` times; across
//!   CPUs each one keeps its own turn, so the spread is exact per CPU and within one turn per
//!   CPU overall.
//! * Least connections: a bounded scan of the VIP's `(backend, weight)` list for the fewest
//!   `ACTIVE_CONNS` per weight (IPVS's `wlc`), starting (per CPU) after the backend chosen
//!   last, so equal backends take turns. Counts are shared by all CPUs and changed with atomic
//!   adds: +1 when a flow is counted, -1 when its client sends FIN or RST.

use crate::{
    lookup::{backend_of_vip, from_ring, FlowHash},
    maps::{ACTIVE_CONNS, RINGS, SCHED_CURSORS},
};
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use lb_common::{
    Backend, FlowValue, VipMeta, FLOW_COUNTED, FLOW_FIN_SEEN, FLOW_RST_SEEN,
    MAX_LEAST_CONN_BACKENDS, NO_BACKEND, SCHED_LEAST_CONN, SCHED_ROUND_ROBIN,
};

/// The backend for a new flow of `vip`, or `None` when the VIP has none available.
#[inline(always)]
pub fn pick(vip: &VipMeta, hash: &FlowHash) -> Option<(u32, &'static Backend)> {
    match vip.scheduler {
        SCHED_ROUND_ROBIN => round_robin(vip),
        SCHED_LEAST_CONN => least_conn(vip),
        _ => from_ring(vip, hash.ring(vip)),
    }
}

/// Takes this CPU's round-robin position for `vip` in `0..len` and advances it.
#[inline(always)]
fn next_turn(vip: &VipMeta, len: u32) -> Option<u32> {
    let cursor = SCHED_CURSORS.get_ptr_mut(vip.vip_id)?;
    // SAFETY: per-CPU slot, only this CPU touches it while the program runs.
    let cursor = unsafe { &mut *cursor };
    // A table that shrank (or a reused VIP slot) leaves the cursor past the end: start over.
    let turn = if *cursor < len { *cursor } else { 0 };
    *cursor = if turn + 1 < len { turn + 1 } else { 0 };
    Some(turn)
}

#[inline(always)]
fn round_robin(vip: &VipMeta) -> Option<(u32, &'static Backend)> {
    if vip.ring_size == 0 {
        return None;
    }
    let turn = next_turn(vip, vip.ring_size)?;
    let backend_id = *RINGS.get(vip.ring_base + turn)?;
    Some((backend_id, backend_of_vip(backend_id, vip)?))
}

/// Active connections of a backend, in `0..=u32::MAX`. The count is signed on purpose: a
/// give-back that raced with the daemon's reconciliation may take it below zero for a
/// moment, which counts as 0.
#[inline(always)]
fn active(backend_id: u32) -> u64 {
    ACTIVE_CONNS
        .get(backend_id)
        .map_or(0, |count| (*count as i64).clamp(0, u32::MAX as i64) as u64)
}

#[inline(always)]
fn least_conn(vip: &VipMeta) -> Option<(u32, &'static Backend)> {
    let len = vip.ring_size / 2;
    if len == 0 {
        return None;
    }
    let cursor = SCHED_CURSORS.get_ptr_mut(vip.vip_id)?;
    // SAFETY: per-CPU slot, only this CPU touches it while the program runs.
    let cursor = unsafe { &mut *cursor };
    let start = if *cursor < len { *cursor } else { 0 };
    // Best so far; none yet weighs as more connections than any backend can have (counts are
    // at most u32::MAX, weights at most u16::MAX: no product overflows).
    let (mut best_entry, mut best_id) = (0, NO_BACKEND);
    let (mut best_conns, mut best_weight) = (1u64 << 40, 1u64);
    for i in 0..MAX_LEAST_CONN_BACKENDS {
        if i >= len {
            break;
        }
        // `(start + i) % len` without a division per entry (start and i are below len).
        let entry = if start + i >= len {
            start + i - len
        } else {
            start + i
        };
        let slot = vip.ring_base + 2 * entry;
        let (Some(id), Some(weight)) = (RINGS.get(slot), RINGS.get(slot + 1)) else {
            break;
        };
        let (id, weight) = (*id, *weight as u64);
        let conns = active(id);
        // conns / weight < best_conns / best_weight, without division. Strictly less: of
        // equal backends, the first after the last one chosen wins.
        if conns * best_weight < best_conns * weight {
            (best_entry, best_id, best_conns, best_weight) = (entry, id, conns, weight);
        }
    }
    if best_id == NO_BACKEND {
        return None;
    }
    // The next scan starts after the chosen backend, so equal backends take turns exactly
    // (starting one further each time would favour a tied backend that follows a busier one).
    *cursor = if best_entry + 1 < len {
        best_entry + 1
    } else {
        0
    };
    Some((best_id, backend_of_vip(best_id, vip)?))
}

#[inline(always)]
fn add(backend_id: u32, delta: u64) {
    if let Some(count) = ACTIVE_CONNS.get_ptr_mut(backend_id) {
        // SAFETY: a valid, 8-byte aligned u64 in a map value; every writer uses atomics
        // (BPF_ATOMIC add here, atomic adds on the daemon's mapping). core's AtomicU64 has no
        // fetch_add on BPF (no compare-and-swap), the intrinsic lowers to BPF's atomic add.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, delta) };
    }
}

/// A flow of `vip` starts on `backend_id` with `state`: counts it when the VIP is least-conn
/// and the first packet does not already close it (a FIN or RST on a fresh tuple, as a
/// spoofed flood sends, would hold a count nothing gives back). Returns the state bit to
/// store with the flow.
#[inline(always)]
pub fn open(vip: &VipMeta, backend_id: u32, state: u8) -> u8 {
    if vip.scheduler != SCHED_LEAST_CONN || state & (FLOW_FIN_SEEN | FLOW_RST_SEEN) != 0 {
        return 0;
    }
    add(backend_id, 1);
    FLOW_COUNTED
}

/// Gives back the count a flow holds (if it holds one).
#[inline(always)]
pub fn close(state: u8, backend_id: u32) {
    if state & FLOW_COUNTED != 0 {
        add(backend_id, u64::MAX);
    }
}

/// A packet of an established flow, after its state bits were merged: the client's FIN or
/// RST gives the count back (once: the bit goes with it); a least-conn flow that holds no
/// count and is still open takes one (it was created before the VIP became least-conn, or
/// the daemon gave its count back when it idled, and it is active again).
#[inline(always)]
pub fn established(vip: &VipMeta, flow: &mut FlowValue) {
    let closed = flow.state & (FLOW_FIN_SEEN | FLOW_RST_SEEN) != 0;
    if flow.state & FLOW_COUNTED != 0 {
        if closed {
            flow.state &= !FLOW_COUNTED;
            close(FLOW_COUNTED, flow.backend_id);
        }
    } else if vip.scheduler == SCHED_LEAST_CONN && !closed {
        flow.state |= open(vip, flow.backend_id, flow.state);
    }
}
