//! The connection log's per-CPU rings (`EVENTS`, see `lb_common::LogCursor`) as the daemon
//! reads them: through a shared mapping of the array (aya 0.14 has no mmap for maps, so it
//! is the data plane's `MappedArray`, libc's mmap on the map's fd), without a syscall per
//! record or per read.

use crate::dataplane::MappedArray;
use lb_common::{LogRecord, LOG_CPU_SLOTS, LOG_RECORDS_PER_CPU};
use std::sync::atomic::{fence, AtomicU64, Ordering};

const SLOT_BYTES: usize = std::mem::size_of::<LogRecord>();
const RECORDS: u64 = LOG_RECORDS_PER_CPU as u64;

/// The mapped `EVENTS` of `cpus` CPUs.
pub struct LogRing {
    map: MappedArray,
    cpus: u32,
}

impl LogRing {
    pub(crate) fn new(map: MappedArray, cpus: u32) -> Self {
        assert!(
            map.bytes().1 >= cpus as usize * LOG_CPU_SLOTS as usize * SLOT_BYTES,
            "EVENTS is mapped whole"
        );
        Self { map, cpus }
    }

    /// Byte offset of `EVENTS[slot]`.
    fn at(&self, slot: u64) -> *mut u8 {
        // SAFETY: every slot of `cpus` CPUs is inside the mapping (checked in new).
        unsafe { self.map.bytes().0.add(slot as usize * SLOT_BYTES) }
    }

    /// `LogCursor::head` and `tail` of `cpu`.
    fn cursor(&self, cpu: u32) -> (&AtomicU64, &AtomicU64) {
        let first = self.at(u64::from(cpu * LOG_CPU_SLOTS));
        // SAFETY: the cursor's first two u64 of a 64-byte slot, 8-byte aligned, shared with the
        // kernel, which stores `head` as a whole u64; the mapping lives as long as self.
        unsafe {
            (
                &*first.cast::<AtomicU64>(),
                &*first.add(8).cast::<AtomicU64>(),
            )
        }
    }

    /// Appends the records written since the last read to `out` (each CPU's oldest first)
    /// and returns how many were lost because their CPU overwrote them before this read:
    /// those beyond the ring's capacity, and those that may have been overwritten while
    /// they were being copied (told by the head read again after the copy).
    pub fn read(&mut self, out: &mut Vec<LogRecord>) -> u64 {
        let mut lost = 0;
        for cpu in 0..self.cpus {
            let (head_at, tail_at) = self.cursor(cpu);
            // Acquire: the records before `head` are whole (the kernel stored them first).
            let head = head_at.load(Ordering::Acquire);
            let mut tail = tail_at.load(Ordering::Relaxed).min(head);
            if head - tail > RECORDS {
                lost += head - tail - RECORDS;
                tail = head - RECORDS;
            }
            let start = out.len();
            for n in tail..head {
                let slot = u64::from(cpu * LOG_CPU_SLOTS) + 1 + n % RECORDS;
                // SAFETY: a record slot inside the mapping; LogRecord is plain old data, so
                // even a record the kernel is overwriting reads as some value (and is dropped
                // below).
                out.push(unsafe { self.at(slot).cast::<LogRecord>().read_volatile() });
            }
            // The copies above happen before the head is read again.
            fence(Ordering::Acquire);
            let after = head_at.load(Ordering::Relaxed);
            // Record n's slot is rewritten by record n + RECORDS, which the kernel writes
            // while its head is n + RECORDS: a copy is whole when n + RECORDS > after.
            let first_whole = (after + 1).saturating_sub(RECORDS).clamp(tail, head);
            let torn = (first_whole - tail) as usize;
            out.drain(start..start + torn);
            lost += torn as u64;
            tail_at.store(head, Ordering::Relaxed);
        }
        lost
    }
}
