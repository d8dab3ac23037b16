//! The flow table (`FLOWS`) through its mapping: the daemon reads and updates flow entries
//! as plain memory, finding a flow by its set the way the data path does (lb-common's map
//! table says why the table is a set-associative array).

use super::MappedArray;
use lb_common::{FlowKey, FlowSlot, FlowValue, FLOW_WAYS};

pub(super) struct FlowTable {
    slots: MappedArray,
    set_mask: u32,
}

impl FlowTable {
    /// `slots` is the map's size, a power of two ([`lb_common::flow_slots`]).
    pub(super) fn new(slots: MappedArray, slot_count: u32) -> Self {
        Self {
            slots,
            set_mask: slot_count / FLOW_WAYS - 1,
        }
    }

    /// What the data path needs in [`lb_common::LbConfig::flow_set_mask`].
    pub(super) fn set_mask(&self) -> u32 {
        self.set_mask
    }

    fn slot_ptr(&self, index: u32) -> *mut FlowSlot {
        let (start, len) = self.slots.bytes();
        let offset = index as usize * size_of::<FlowSlot>();
        assert!(
            offset + size_of::<FlowSlot>() <= len,
            "flow slot {index} outside the mapping"
        );
        // SAFETY: inside the mapping (checked above), which lives as long as self; the
        // kernel stores 64-byte values back to back, 8-byte aligned.
        unsafe { start.add(offset).cast() }
    }

    /// A copy of slot `index`. The data path may be writing it: a copy can mix two entries
    /// of the slot (see lb-ebpf's flows.rs), which the callers tolerate (listings, idle
    /// scans that look again before acting).
    fn read(&self, index: u32) -> FlowSlot {
        // SAFETY: a valid, aligned pointer into shared memory; every bit pattern is a valid
        // FlowSlot.
        unsafe { std::ptr::read_volatile(self.slot_ptr(index)) }
    }

    fn slots(&self) -> u32 {
        (self.set_mask + 1) * FLOW_WAYS
    }

    /// Every flow in the table, once. Two CPUs that both missed on the same new tuple at the
    /// same moment each insert it, so a set can hold a key twice; the data path only ever
    /// finds the first, and so does this (the other is left to be evicted).
    pub(super) fn all(&self) -> Vec<(FlowKey, FlowValue)> {
        let mut flows = Vec::new();
        for first in (0..self.slots()).step_by(FLOW_WAYS as usize) {
            let set: [FlowSlot; FLOW_WAYS as usize] =
                std::array::from_fn(|way| self.read(first + way as u32));
            for (way, slot) in set.iter().enumerate() {
                if slot.key.family != 0 && !set[..way].iter().any(|s| s.holds(&slot.key)) {
                    flows.push((slot.key, slot.value));
                }
            }
        }
        flows
    }

    /// The slot holding `key`, if any.
    fn find(&self, key: &FlowKey) -> Option<u32> {
        let first = lb_common::flow_set_first_slot(lb_common::flow_table_hash(key), self.set_mask);
        (first..first + FLOW_WAYS).find(|&index| self.read(index).holds(key))
    }

    pub(super) fn get(&self, key: &FlowKey) -> Option<FlowValue> {
        self.find(key).map(|index| self.read(index).value)
    }

    /// Rewrites the entry of `key` if the table still holds it (never creates one); whether
    /// it did. Only the entry is written, not the key, so a slot the data path gave to
    /// another flow meanwhile keeps its key (the race the module's note describes).
    pub(super) fn update(&self, key: &FlowKey, value: &FlowValue) -> bool {
        let Some(index) = self.find(key) else {
            return false;
        };
        // SAFETY: the entry field of a slot inside the mapping (see slot_ptr).
        unsafe { std::ptr::write_volatile(&raw mut (*self.slot_ptr(index)).value, *value) };
        true
    }
}
