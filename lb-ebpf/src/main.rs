//! xdplb's XDP programs.
//!
//! * `xdplb` (the load balancer): parse -> VIP lookup (a flow hit finds its VIP through
//!   its flow entry) -> filter (blocklist, source ACL) -> flow table with flood defence / new-flow limits / scheduler (Maglev ring, round robin,
//!   least-conn) -> forward (`dsr` MAC rewrite, `ipip` encapsulation, or `nat` translation;
//!   too big to encapsulate: ICMP to the client) -> count. New flows and filter drops go to the
//!   connection log (`events`) when it is on. Packets for no VIP may be replies to `nat`
//!   connections (translated back to their clients). ICMP errors about a VIP's flow branch off
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
mod flows;
mod forward;
mod icmp;
mod lookup;
mod maps;
mod nat;
mod parse;
mod schedule;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{counters as idx, CONFIG_HAS_NAT};

// `inline(always)` reaches the function the macro wraps: left to itself, LLVM may make the
// whole balancer a BPF-to-BPF call from the entry point, which costs every packet a call and
// a return (about 10 ns here, through the return-thunk mitigation).
#[xdp]
#[inline(always)]
pub fn xdplb(ctx: XdpContext) -> u32 {
    counters::action(balance(&ctx))
}

#[xdp]
pub fn xdplb_decap(ctx: XdpContext) -> u32 {
    counters::action(decap::run(&ctx))
}

/// The nat programs, tail-called by `xdplb` through `NAT_PROGS` (see nat.rs).
#[xdp]
pub fn xdplb_nat_to_backend(ctx: XdpContext) -> u32 {
    counters::action(nat::to_backend(&ctx))
}

#[xdp]
pub fn xdplb_nat_from_backend(ctx: XdpContext) -> u32 {
    counters::action(nat::from_backend(&ctx))
}

#[xdp]
pub fn xdplb_nat_error_from_backend(ctx: XdpContext) -> u32 {
    counters::action(nat::error_from_backend(&ctx))
}

#[xdp]
pub fn xdplb_nat_error_to_backend(ctx: XdpContext) -> u32 {
    counters::action(nat::error_to_backend(&ctx))
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
    let config = maps::CONFIG.get(0);
    let (seed, flags) = config.map_or((0, 0), |c| (c.hash_seed, c.flags));
    let hash = lookup::FlowHash::new(&pkt.key, config);
    let Some(lookup::Found { vip, flow, backend }) =
        lookup::find_vip_and_flow(&pkt.key, &hash, flags)
    else {
        // Replies from nat backends are addressed to the LB, not to a VIP.
        if flags & CONFIG_HAS_NAT != 0 {
            let reason = nat::hand_off(ctx, None, nat::FROM_BACKEND, nat::NO_CHOICE);
            counters::global(reason);
            return xdp_action::XDP_DROP;
        }
        return pass(idx::PASS_NOT_VIP);
    };
    // A VIP's packet dropped for `reason`: counted, and logged when it is a filter's drop.
    let drop = |reason| {
        events::dropped(flags, &pkt.key, vip, reason);
        counters::vip_drop(vip.vip_id, pkt.l3_len, reason)
    };
    if let Err(reason) = filter::admit(&pkt.key, vip, flags) {
        return drop(reason);
    }
    let limit_new = || filter::limit_new_flow(&pkt.key, vip, seed);
    let choice = match lookup::choose_backend(&pkt, &hash, vip, flow, backend, limit_new) {
        Ok(choice) => choice,
        Err(reason) => return drop(reason),
    };
    events::chosen(flags, &pkt.key, vip, &choice);
    match forward::to_backend(ctx, &pkt, vip, &choice, &hash) {
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
