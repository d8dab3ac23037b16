//! The connection log: a [`LogRecord`] into this CPU's part of `EVENTS` for each new or
//! re-picked flow and for each packet the filter drops (ACL, blocklist, new-flow limits).
//!
//! Off (`CONFIG_LOG` clear), each hook costs one flag test. On, records pass a kernel budget
//! first (`LOG_BUDGET`, GCRA over one bucket shared by every CPU, updated without atomics
//! like the VIP-wide new-flow limit: racing CPUs may each let one extra record through); a
//! record over the budget is counted and forgotten. Then it is stored in the CPU's ring
//! (see `LogCursor`): no helper is called on the way, because on this kernel every call and
//! return pays the CPU's return-thunk mitigation; the verifier inlines the array lookups,
//! `bpf_get_smp_processor_id` and `bpf_jiffies64` (the time, at the tick's resolution). A
//! CPU's ring overwrites its oldest record and never waits: the daemon reads the mapping on
//! its own timer and counts the records it was too late for.

use crate::{
    counters,
    lookup::Choice,
    maps::{CONFIG, EVENTS, LOG_BUDGET},
};
use aya_ebpf::helpers::bpf_get_smp_processor_id;
use core::{
    ptr::addr_of_mut,
    sync::atomic::{compiler_fence, Ordering},
};
use lb_common::{
    counters as idx, gcra, FlowKey, LogCursor, NatForward, VipMeta, CONFIG_LOG, LOG_BLOCKED,
    LOG_CPU_SLOTS, LOG_DENIED, LOG_NEW, LOG_RATE_LIMITED, LOG_RECORDS_PER_CPU, LOG_REHASH,
    MODE_NAT, NO_BACKEND,
};

/// After the backend choice: logs a flow that was created or re-picked. A `nat` VIP's flow
/// is logged by the nat program instead ([`nat_chosen`]), once it has its nat port.
#[inline(always)]
pub fn chosen(config_flags: u8, key: &FlowKey, vip: &VipMeta, choice: &Choice) {
    if config_flags & CONFIG_LOG == 0 || !choice.new_flow || vip.mode == MODE_NAT {
        return;
    }
    let event = if choice.rehash { LOG_REHASH } else { LOG_NEW };
    emit(key, vip.vip_id, choice.backend_id, event as u32, None);
}

/// A new or re-picked `nat` flow, with the nat address and port it was given.
#[inline(always)]
pub fn nat_chosen(key: &FlowKey, vip_id: u32, backend_id: u32, rehash: bool, nat: &NatForward) {
    if CONFIG.get(0).map_or(0, |c| c.flags) & CONFIG_LOG == 0 {
        return;
    }
    let event = if rehash { LOG_REHASH } else { LOG_NEW };
    emit(key, vip_id, backend_id, event as u32, Some(nat));
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
    emit(
        key,
        vip.vip_id,
        NO_BACKEND,
        event as u32 | reason << 8,
        None,
    );
}

/// Inlined: as a BPF-to-BPF call its call and return (through the return thunk) were a third
/// of the log's cost, once the flow table made a new flow cheap (log on: +18 ns as a call,
/// +13 ns inlined, over a 170 ns new flow). `event_reason`: the `LOG_*` event, the drop
/// reason in the next byte.
#[inline(always)]
fn emit(key: &FlowKey, vip_id: u32, backend_id: u32, event_reason: u32, nat: Option<&NatForward>) {
    let (event, reason) = (event_reason as u8, (event_reason >> 8) as u8);
    let now = crate::clock::now_ns();
    let Some(budget) = LOG_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: array value; concurrent writers store whole u64s (see the module comment).
    let budget = unsafe { &mut *budget };
    match gcra(budget.tat_ns, now, budget.interval_ns, budget.tolerance_ns) {
        Some(next) => budget.tat_ns = next,
        None => return counters::global(idx::LOG_RECORDS_DROPPED_BUDGET),
    }
    // SAFETY: helper without arguments (inlined by the verifier).
    let first = unsafe { bpf_get_smp_processor_id() } * LOG_CPU_SLOTS;
    let Some(cursor) = EVENTS.get_ptr_mut(first) else {
        return;
    };
    let cursor = cursor.cast::<LogCursor>();
    // SAFETY: this CPU's cursor slot (a LogCursor is a LogRecord's size); only this CPU
    // writes `head`, and an XDP program is not re-entered on a CPU.
    let head = unsafe { core::ptr::addr_of!((*cursor).head).read_volatile() };
    let Some(slot) = EVENTS.get_ptr_mut(first + 1 + (head as u32 & (LOG_RECORDS_PER_CPU - 1)))
    else {
        return;
    };
    // SAFETY: array values of this CPU (a LogRecord slot, 8-byte aligned). The record is
    // stored before the head that publishes it: the fence keeps that order in the compiler
    // (it emits no instruction), and x86-64 keeps the order of stores (TSO), so a reader that
    // sees the head sees the record. Field by field, straight into the slot (a whole record
    // goes through the 512-byte stack), and the zero byte arrays as volatile words: LLVM
    // turns a plain zeroing into a call to memset, and every call pays the return thunk.
    unsafe {
        addr_of_mut!((*slot).time_ns).write(now);
        addr_of_mut!((*slot).client).write(key.src);
        // Word by word (a byte-array copy becomes a call to memcpy); the forward entry is
        // 4-byte aligned.
        let nat_addr = addr_of_mut!((*slot).nat_addr).cast::<u32>();
        let nat_port = match nat {
            Some(nat) => {
                let words = nat.nat_addr.as_ptr().cast::<u32>();
                for i in 0..4 {
                    nat_addr.add(i).write_volatile(words.add(i).read());
                }
                nat.nat_port
            }
            None => {
                for i in 0..4 {
                    nat_addr.add(i).write_volatile(0);
                }
                0
            }
        };
        addr_of_mut!((*slot).vip_id).write(vip_id);
        addr_of_mut!((*slot).backend_id).write(backend_id);
        addr_of_mut!((*slot).client_port).write(key.sport);
        addr_of_mut!((*slot).nat_port).write(nat_port);
        addr_of_mut!((*slot).vip_port).write(key.dport);
        addr_of_mut!((*slot).event).write(event);
        addr_of_mut!((*slot).proto).write(key.proto);
        addr_of_mut!((*slot).family).write(key.family);
        addr_of_mut!((*slot).reason).write(reason);
        let pad = addr_of_mut!((*slot)._pad).cast::<u16>();
        pad.write_volatile(0);
        pad.add(1).cast::<u32>().write_volatile(0);
        compiler_fence(Ordering::Release);
        addr_of_mut!((*cursor).head).write_volatile(head + 1);
    }
}
