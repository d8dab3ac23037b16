//! Array maps mapped into this process (`BPF_F_MMAPABLE`): slots read and written without syscalls.

use super::{DataplaneError, Result};
use aya::{
    maps::{MapData, MapError},
    Ebpf,
};

/// An array map mapped into this process (`BPF_F_MMAPABLE`): the Maglev rings and the
/// least-conn counts (`u32` or `u64` values: the kernel stores array values 8-byte aligned,
/// so slot `i` lives at byte `8 * i` either way), and the connection log's records.
pub(crate) struct MappedArray {
    name: &'static str,
    slots: *mut std::sync::atomic::AtomicU32,
    entries: u32,
    bytes: usize,
    /// Keeps the map alive while it is mapped.
    _map: MapData,
}

/// Bytes between ring slots in the mapping (`round_up(sizeof(u32), 8)` in the kernel).
const SLOT_STRIDE: usize = 8;

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for MappedArray {}

impl MappedArray {
    pub(super) fn map(ebpf: &mut Ebpf, name: &'static str, entries: u32) -> Result<Self> {
        Self::map_values(ebpf, name, entries, SLOT_STRIDE)
    }

    /// An array of `entries` values of `value_size` bytes (a multiple of 8).
    pub(crate) fn map_values(
        ebpf: &mut Ebpf,
        name: &'static str,
        entries: u32,
        value_size: usize,
    ) -> Result<Self> {
        let Some(aya::maps::Map::Array(data)) = ebpf.take_map(name) else {
            return Err(DataplaneError::MissingMap(name));
        };
        use std::os::fd::{AsFd, AsRawFd};
        let page = 4096;
        let bytes = (entries as usize * value_size).div_ceil(page) * page;
        // SAFETY: mapping a BPF array fd created with BPF_F_MMAPABLE, shared and writable.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DataplaneError::Map {
                name,
                source: MapError::IoError(std::io::Error::last_os_error()),
            });
        }
        Ok(Self {
            name,
            slots: ptr.cast(),
            entries,
            bytes,
            _map: data,
        })
    }

    /// The start of the mapping and its length in bytes.
    pub(crate) fn bytes(&self) -> (*mut u8, usize) {
        (self.slots.cast(), self.bytes)
    }

    fn slot(&self, index: u32) -> Result<&std::sync::atomic::AtomicU32> {
        if index >= self.entries {
            return Err(DataplaneError::Map {
                name: self.name,
                source: MapError::OutOfBounds {
                    index,
                    max_entries: self.entries,
                },
            });
        }
        // SAFETY: in bounds of the mapping, which lives as long as self; 8-byte aligned.
        Ok(unsafe { &*self.slots.byte_add(index as usize * SLOT_STRIDE) })
    }

    /// Slot `index` of an array of `u64` values (same 8-byte stride).
    pub(super) fn wide_slot(&self, index: u32) -> Result<&std::sync::atomic::AtomicU64> {
        let slot = self.slot(index)?;
        // SAFETY: the slot's 8 bytes are all inside the mapping and 8-byte aligned.
        Ok(unsafe { &*std::ptr::from_ref(slot).cast::<std::sync::atomic::AtomicU64>() })
    }

    pub(super) fn get(&self, index: u32) -> Result<u32> {
        Ok(self.slot(index)?.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub(super) fn set(&self, index: u32, value: u32) -> Result<()> {
        self.slot(index)?
            .store(value, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.slots.cast(), self.bytes) };
    }
}
