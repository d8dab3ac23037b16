//! The flow table (`FLOWS`): a set-associative array of [`FlowSlot`]s, [`FLOW_WAYS`] per set
//! (see lb-common's map table for why not an `LRU_HASH`). Every access is an inlined array
//! load: no helper call, no lock.
//!
//! Writers do not lock: two CPUs inserting into the same set in the same few nanoseconds may
//! pick the same victim, and then one of the two new entries is lost (its flow's next packet
//! is a miss that chooses again: Maglev gives the same backend). A packet of a flow whose slot
//! is being overwritten at that moment can read the new entry's backend; a victim is the
//! least valuable entry of its set ([`lb_common::flow_victim_rank`]), so an active flow is
//! replaced only when all four entries of its set are busier than it.

use crate::{counters, lookup::FlowHash, maps::FLOWS};
use lb_common::{counters as idx, FlowKey, FlowValue, FLOW_PINNED, FLOW_WAYS};

/// The entry of `key`, if the table holds it. Inlined into the main path; other paths call
/// [`find_out_of_line`].
#[inline(always)]
pub fn find(key: &FlowKey, hash: &FlowHash) -> Option<*mut FlowValue> {
    let first = hash.first_slot();
    let mut way = 0;
    while way < FLOW_WAYS {
        let slot = FLOWS.get_ptr_mut(first + way)?;
        // SAFETY: array value, valid while the program runs; see the module's note on races.
        let slot = unsafe { &mut *slot };
        if slot.holds(key) {
            return Some(&mut slot.value);
        }
        way += 1;
    }
    None
}

/// Stores `value` for `key` (not in the table: [`find`] missed) in the slot of its set that
/// [`lb_common::flow_victim_rank`] ranks lowest, and returns the stored entry. Replacing a
/// live entry is counted, and a least-conn count it held is given back (unless it is pinned:
/// its pinned copy keeps the count and brings it back with the flow).
#[inline(always)]
pub fn insert(key: &FlowKey, value: &FlowValue, hash: &FlowHash) -> Option<*mut FlowValue> {
    let first = hash.first_slot();
    let mut victim = first;
    let mut lowest = u64::MAX;
    let mut way = 0;
    while way < FLOW_WAYS {
        if let Some(slot) = FLOWS.get(first + way) {
            let rank = lb_common::flow_victim_rank(slot);
            if rank < lowest {
                (lowest, victim) = (rank, first + way);
            }
        }
        way += 1;
    }
    let slot = FLOWS.get_ptr_mut(victim)?;
    // SAFETY: array value; see the module's note on races.
    let slot = unsafe { &mut *slot };
    if slot.key.family != 0 {
        counters::global(idx::FLOW_EVICTED);
        if slot.value.state & FLOW_PINNED == 0 {
            crate::schedule::close(slot.value.state, slot.value.backend_id);
        }
    }
    slot.key = *key;
    // As five word stores: a struct copy makes LLVM clear the 3 padding bytes with a call to
    // `memset`, a BPF-to-BPF call (and return thunk) on every new flow. `state` is the low
    // byte of the fourth word (little-endian BPF), its padding the rest.
    let words = &mut slot.value as *mut FlowValue as *mut u32;
    // SAFETY: FlowValue is five 4-byte aligned words (lb-common asserts the offsets).
    unsafe {
        *words = value.backend_id;
        *words.add(1) = value.created;
        *words.add(2) = value.last_seen;
        *words.add(3) = value.state as u32;
        *words.add(4) = value.hash;
    }
    Some(&mut slot.value)
}

/// [`find`] as a BPF-to-BPF call, for the ICMP path: one more inlined copy of the set scan
/// would grow the program that every packet runs.
#[inline(never)]
pub fn find_out_of_line(key: &FlowKey, hash: &FlowHash) -> Option<*mut FlowValue> {
    find(key, hash)
}
