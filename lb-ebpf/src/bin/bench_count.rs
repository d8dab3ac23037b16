//! Benchmark sink (not part of the product): counts every frame that reaches an endpoint of the
//! packet-rate lab and drops it, so the count is what the data path under test delivered.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action, macros::map, macros::xdp, maps::PerCpuArray, programs::XdpContext,
};

/// Frames received, per CPU (userspace sums them).
#[map]
static RECEIVED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn bench_count(_ctx: XdpContext) -> u32 {
    if let Some(count) = RECEIVED.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *count += 1 }
    }
    xdp_action::XDP_DROP
}

lb_ebpf::object_boilerplate!();
