//! Per-CPU counters: plain adds, no atomics, userspace sums the CPUs.

use crate::maps::{BACKEND_COUNTERS, GLOBAL_COUNTERS, VIP_COUNTERS};
use lb_common::{counters, TrafficCounters};

#[inline(always)]
pub fn global(index: u32) {
    if let Some(counter) = GLOBAL_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 }
    }
}

/// Counts the action a program returns.
#[inline(always)]
pub fn action(xdp_action: u32) -> u32 {
    // XDP_ABORTED..XDP_REDIRECT are 0..4, in the same order as the ACTION_* counters.
    global(counters::ACTION_ABORTED + xdp_action.min(counters::ACTION_REDIRECT));
    xdp_action
}

/// What happened to a packet of a VIP, for its per-VIP and per-backend counters.
pub enum Traffic {
    Forwarded { new_flow: bool },
    NotForwarded,
}

#[inline(always)]
pub fn vip_traffic(vip_id: u32, bytes: u32, traffic: &Traffic) {
    if let Some(c) = VIP_COUNTERS.get_ptr_mut(vip_id) {
        // SAFETY: per-CPU slot.
        unsafe { add(&mut *c, bytes, traffic) }
    }
}

#[inline(always)]
pub fn backend_traffic(backend_id: u32, bytes: u32, traffic: &Traffic) {
    if let Some(c) = BACKEND_COUNTERS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot.
        unsafe { add(&mut *c, bytes, traffic) }
    }
}

#[inline(always)]
fn add(c: &mut TrafficCounters, bytes: u32, traffic: &Traffic) {
    match traffic {
        Traffic::Forwarded { new_flow } => {
            c.packets += 1;
            c.bytes += bytes as u64;
            c.new_flows += *new_flow as u64;
        }
        Traffic::NotForwarded => c.not_forwarded += 1,
    }
}
