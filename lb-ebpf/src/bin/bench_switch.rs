//! Benchmark switch (not part of the product): an L2 switch in XDP for the packet-rate lab.
//! Attached to every switch port, it redirects a frame to the port that owns its destination
//! MAC, so frames cross the lab as XDP frames and the lab itself costs little next to the
//! data path under test. Unknown destinations go to the kernel (a Linux bridge).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{DevMapHash, HashMap},
    programs::XdpContext,
};

/// Destination MAC (padded to 8 bytes) -> egress ifindex.
#[map]
static MACS: HashMap<[u8; 8], u32> = HashMap::with_max_entries(64, 0);

/// Egress ports for `XDP_REDIRECT`, keyed by ifindex.
#[map]
static PORTS: DevMapHash = DevMapHash::with_max_entries(64, 0);

#[xdp]
pub fn bench_switch(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 6 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the 6 bytes were bounds checked above.
    let dst = unsafe { *(start as *const [u8; 6]) };
    let key = [dst[0], dst[1], dst[2], dst[3], dst[4], dst[5], 0, 0];
    // SAFETY: a lookup only; the value is copied out at once.
    match unsafe { MACS.get(key) } {
        Some(ifindex) => PORTS
            .redirect(*ifindex, xdp_action::XDP_PASS as u64)
            .unwrap_or(xdp_action::XDP_PASS),
        None => xdp_action::XDP_PASS,
    }
}

lb_ebpf::object_boilerplate!();
