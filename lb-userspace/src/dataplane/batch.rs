//! Batched reads (`BPF_MAP_LOOKUP_BATCH`) of the hash maps keyed by 5-tuples: `PINNED`, nat.

use super::{collect, map_err, DataplaneError, Result};
use aya::{
    maps::{HashMap, MapData, MapError},
    Ebpf, Pod,
};
use lb_common::FlowKey;

pub(super) fn duplicate_fd(ebpf: &Ebpf, name: &'static str) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    let map = ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
    let (aya::maps::Map::LruHashMap(data) | aya::maps::Map::HashMap(data)) = map else {
        return Err(DataplaneError::MissingMap(name));
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| map_err(name)(MapError::IoError(e)))
}

/// Every entry of a flow hash map (`PINNED`), in batches when the kernel can.
pub(super) fn read_flow_map<V: Pod + Default + Clone>(
    fd: &std::os::fd::OwnedFd,
    map: &HashMap<MapData, FlowKey, V>,
    name: &'static str,
) -> Result<Vec<(FlowKey, V)>> {
    match lookup_batch(fd) {
        Ok(flows) => Ok(flows),
        // Kernels without batch ops for this map type: one entry at a time.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            collect(map.iter()).map_err(map_err(name))
        }
        Err(e) => Err(map_err(name)(MapError::IoError(e))),
    }
}

/// `BPF_MAP_LOOKUP_BATCH` over a hash map keyed by 5-tuples (`PINNED`, nat).
fn lookup_batch<V: Pod + Default + Clone>(
    fd: &std::os::fd::OwnedFd,
) -> std::io::Result<Vec<(FlowKey, V)>> {
    use std::os::fd::AsRawFd;
    /// The `batch` member of `union bpf_attr`.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let mut chunk = 1024usize;
    let mut flows = Vec::new();
    // Hash-map batches resume from an opaque bucket cursor.
    let (mut cursor_in, mut cursor_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut keys = vec![FlowKey::default(); chunk];
        let mut values = vec![V::default(); chunk];
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &cursor_in as *const u32 as u64
            },
            out_batch: &mut cursor_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: attr points at buffers of `count` keys and values that outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let error = (ret < 0).then(std::io::Error::last_os_error);
        let got = attr.count as usize;
        flows.extend(keys.into_iter().zip(values).take(got));
        match error.as_ref().and_then(std::io::Error::raw_os_error) {
            None => {}
            Some(libc::ENOENT) => return Ok(flows),
            // One bucket holds more entries than the buffer: retry it with a larger one.
            Some(libc::ENOSPC) if got == 0 => {
                chunk *= 2;
                continue;
            }
            Some(_) => return Err(error.expect("checked")),
        }
        cursor_in = cursor_out;
        first = false;
    }
}
