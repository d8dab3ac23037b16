//! Per-CPU counters: plain adds, no atomics, userspace sums the CPUs.

use crate::maps::{BACKEND_COUNTERS, GLOBAL_COUNTERS, VIP_COUNTERS};
use aya_ebpf::bindings::xdp_action;
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

/// Counts the outcome of sending a VIP's packet to a backend and returns its action: a
/// failure is dropped, except a packet too big to encapsulate, which the stack gets.
#[inline(always)]
pub fn sent_to_backend(
    vip_id: u32,
    backend_id: u32,
    bytes: u32,
    new_flow: bool,
    sent: Result<u32, u32>,
) -> u32 {
    match sent {
        Ok(action) => {
            let traffic = Traffic::Forwarded { new_flow };
            vip_traffic(vip_id, bytes, &traffic);
            backend_traffic(backend_id, bytes, &traffic);
            action
        }
        Err(reason) => {
            not_forwarded(vip_id, backend_id, bytes);
            global(reason);
            if reason == counters::PASS_TOO_BIG {
                xdp_action::XDP_PASS
            } else {
                xdp_action::XDP_DROP
            }
        }
    }
}

/// A packet of a VIP, meant for a backend, that did not reach it.
#[inline(always)]
pub fn not_forwarded(vip_id: u32, backend_id: u32, bytes: u32) {
    vip_traffic(vip_id, bytes, &Traffic::NotForwarded);
    backend_traffic(backend_id, bytes, &Traffic::NotForwarded);
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
