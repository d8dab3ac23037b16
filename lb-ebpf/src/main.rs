//! xdplb's XDP programs.
//!
//! * `xdplb` (the load balancer): parse -> VIP lookup -> flow table / Maglev ring -> forward
//!   (`dsr` MAC rewrite or `ipip` encapsulation) -> count.
//! * `xdplb_decap` (on backends): removes the `ipip` outer header for local VIPs.
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

mod counters;
mod decap;
mod forward;
mod lookup;
mod maps;
mod parse;
mod schedule;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use counters::Traffic;
use lb_common::{counters as idx, MODE_IPIP};

#[xdp]
pub fn xdplb(ctx: XdpContext) -> u32 {
    counters::action(balance(&ctx))
}

#[xdp]
pub fn xdplb_decap(ctx: XdpContext) -> u32 {
    counters::action(decap::run(&ctx))
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
        Err(reason) => return pass(reason),
    };
    let (seed, flags) = maps::CONFIG
        .get(0)
        .map_or((0, 0), |c| (c.hash_seed, c.flags));
    let Some(vip) = lookup::find_vip(&pkt.key, flags) else {
        return pass(idx::PASS_NOT_VIP);
    };
    let hash = lb_common::flow_hash(&pkt.key, seed);
    let choice = match lookup::choose_backend(&pkt, hash, vip) {
        Ok(choice) => choice,
        Err(reason) => {
            counters::global(reason);
            counters::vip_traffic(vip.vip_id, pkt.l3_len, &Traffic::NotForwarded);
            return xdp_action::XDP_DROP;
        }
    };
    let sent = if vip.mode == MODE_IPIP {
        forward::ipip(ctx, &pkt, choice.backend, hash)
    } else {
        forward::dsr(ctx, choice.backend)
    };
    match sent {
        Ok(action) => {
            let traffic = Traffic::Forwarded {
                new_flow: choice.new_flow,
            };
            counters::vip_traffic(vip.vip_id, pkt.l3_len, &traffic);
            counters::backend_traffic(choice.backend_id, pkt.l3_len, &traffic);
            action
        }
        Err(reason) => {
            counters::vip_traffic(vip.vip_id, pkt.l3_len, &Traffic::NotForwarded);
            counters::backend_traffic(choice.backend_id, pkt.l3_len, &Traffic::NotForwarded);
            if reason == idx::PASS_TOO_BIG {
                pass(reason)
            } else {
                counters::global(reason);
                xdp_action::XDP_DROP
            }
        }
    }
}

lb_ebpf::object_boilerplate!();
