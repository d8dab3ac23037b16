//! Benchmark baseline (not part of the product): the cheapest useful XDP forwarder. It swaps
//! the Ethernet addresses and bounces the frame out of the interface it came in on, so every
//! per-packet figure of the load balancer can be read against it.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn bench_tx(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let macs = start as *mut [u8; 12];
    // SAFETY: the 12 bytes were bounds checked above.
    unsafe {
        let old = *macs;
        let mut new = [0u8; 12];
        new[..6].copy_from_slice(&old[6..]);
        new[6..].copy_from_slice(&old[..6]);
        *macs = new;
    }
    xdp_action::XDP_TX
}

lb_ebpf::object_boilerplate!();
