//! xdplb's XDP programs.
//!
//! * `xdplb` (the load balancer): parse -> VIP lookup -> filter (blocklist, source ACL) ->
//!   flow table with flood defence / new-flow limits / scheduler (Maglev ring, round robin,
//!   least-conn) -> forward (`dsr` MAC rewrite or `ipip` encapsulation; too big to
//!   encapsulate: ICMP to the client) -> count. New flows and filter drops go to the
//!   connection log (`events`) when it is on. ICMP errors about a VIP's flow branch off
//!   after parse to the flow's backend.
//! * `xdplb_decap` (on backends): removes the `ipip` outer header for local VIPs.
//! * `xdplb_clock`: one reading of the kernel's clocks for userspace (see clock.rs).
//!
//! Nothing here can abort: every error is a counted `XDP_PASS` or `XDP_DROP`.
#![no_std]
#![no_main]
// BPF's atomic add (least-conn counts): see schedule.rs.
#![allow(internal_features)]
#![feature(core_intrinsics)]
// Map keys are passed by reference on purpose: a by-value key is one more copy on the
// 512-byte BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod clock;
mod counters;
mod decap;
mod events;
mod filter;
mod flood;
mod forward;
mod icmp;
mod lookup;
mod maps;
mod parse;
mod schedule;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::counters as idx;

#[xdp]
pub fn xdplb(ctx: XdpContext) -> u32 {
    counters::action(balance(&ctx))
}

#[xdp]
pub fn xdplb_decap(ctx: XdpContext) -> u32 {
    counters::action(decap::run(&ctx))
}

/// Not a data path: userspace runs it once to relate `jiffies` to `CLOCK_MONOTONIC`.
#[xdp]
pub fn xdplb_clock(ctx: XdpContext) -> u32 {
    clock::reading(&ctx)
}

#[inline(always)]
fn pass(reason: u32) -> u32 {
    counters::global(reason);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> u32 {
    let pkt = match parse::parse(ctx) {
        Ok(pkt) => pkt,
        // Only packets that are neither TCP nor UDP pay for the ICMP check.
        Err(idx::PASS_NOT_TCP_UDP) => return icmp::forward_error(ctx),
        Err(reason) => return pass(reason),
    };
    let (seed, flags) = maps::CONFIG
        .get(0)
        .map_or((0, 0), |c| (c.hash_seed, c.flags));
    let Some(vip) = lookup::find_vip(&pkt.key, flags) else {
        return pass(idx::PASS_NOT_VIP);
    };
    if let Err(reason) = filter::admit(&pkt.key, vip, flags) {
        events::dropped(flags, &pkt.key, vip, reason);
        return counters::vip_drop(vip.vip_id, pkt.l3_len, reason);
    }
    let hash = lb_common::flow_hash(&pkt.key, seed);
    let ring_hash = lookup::ring_hash(&pkt.key, hash, seed, vip);
    let limit_new = || filter::limit_new_flow(&pkt.key, vip, seed);
    let choice = match lookup::choose_backend(&pkt, ring_hash, vip, limit_new) {
        Ok(choice) => choice,
        Err(reason) => {
            events::dropped(flags, &pkt.key, vip, reason);
            return counters::vip_drop(vip.vip_id, pkt.l3_len, reason);
        }
    };
    events::chosen(flags, &pkt.key, vip, &choice);
    match forward::to_backend(ctx, &pkt, vip, choice.backend, hash) {
        Err(idx::PASS_TOO_BIG) => {
            counters::not_forwarded(vip.vip_id, choice.backend_id, pkt.l3_len);
            icmp::too_big(ctx, &pkt, choice.backend)
        }
        sent => counters::sent_to_backend(
            vip.vip_id,
            choice.backend_id,
            pkt.l3_len,
            choice.new_flow,
            sent,
        ),
    }
}

lb_ebpf::object_boilerplate!();
