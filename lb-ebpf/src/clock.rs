//! The data path's clock: seconds of `CLOCK_MONOTONIC` (the unit of a flow's times) read
//! through `jiffies`, whose helper the verifier inlines into one load, instead of
//! `bpf_ktime_get_coarse_ns`, a real call (see `LbConfig::jiffies_per_second`). The
//! `xdplb_clock` program gives userspace the one reading it needs to convert.

use crate::{maps::CONFIG, parse::ptr_at};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    programs::XdpContext,
};

/// Seconds of `CLOCK_MONOTONIC` now.
#[inline(always)]
pub fn now_seconds() -> u32 {
    CONFIG
        .get(0)
        .and_then(|c| {
            lb_common::jiffies_to_seconds(
                // SAFETY: helper without arguments.
                unsafe { bpf_jiffies64() },
                c.jiffies_per_second,
                c.jiffies_at_zero,
            )
        })
        // Before userspace wrote the clock parameters.
        // SAFETY: helper without arguments.
        .unwrap_or_else(|| (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32)
}

/// `CLOCK_MONOTONIC` in ns through `jiffies` (one load once the verifier inlined it), or
/// the helper until userspace wrote the clock parameters.
#[inline(always)]
pub fn now_ns() -> u64 {
    CONFIG
        .get(0)
        .and_then(|c| {
            // SAFETY: helper without arguments.
            lb_common::jiffies_to_ns(
                unsafe { bpf_jiffies64() },
                c.jiffies_per_second,
                c.jiffies_at_zero,
                c.ns_per_jiffy,
            )
        })
        // SAFETY: helper without arguments.
        .unwrap_or_else(|| unsafe { bpf_ktime_get_ns() })
}

/// Writes `jiffies` then `CLOCK_MONOTONIC_COARSE` in ns (native byte order, 8 bytes each)
/// over the first 16 bytes of the frame; run by userspace with `BPF_PROG_TEST_RUN`.
#[inline(always)]
pub fn reading(ctx: &XdpContext) -> u32 {
    let Ok(out) = ptr_at::<[u64; 2]>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: helpers without arguments; `out` was bounds checked. The frame is not
    // necessarily 8-byte aligned: an unaligned store is fine for the BPF JIT on the
    // architectures XDP runs on (see parse::load).
    unsafe { *out = [bpf_jiffies64(), bpf_ktime_get_coarse_ns()] };
    xdp_action::XDP_PASS
}
