//! Benchmark packet generator (not part of the product), run with `BPF_PROG_RUN` and
//! `BPF_F_TEST_XDP_LIVE_FRAMES`: every run writes a whole 64-byte frame from a template
//! (the kernel recycles pages without copying the input again, and the data path under test
//! rewrote the previous frame), optionally gives it a fresh 5-tuple, and redirects it out of
//! the client's interface.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, DevMap},
    programs::XdpContext,
};

/// What userspace sets before a run.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GenConfig {
    /// The frame: Ethernet, IPv4 (no options), TCP (no options), padding; valid checksums.
    pub template: [u64; 8],
    /// Nonzero: every frame gets the next (source address, source port), a new flow.
    pub vary: u32,
    pub _pad: u32,
}

#[map]
static CONFIG: Array<GenConfig> = Array::with_max_entries(1, 0);

/// Frames generated so far (only one generator thread runs at a time).
#[map]
static SEQUENCE: Array<u64> = Array::with_max_entries(1, 0);

/// Slot 0: the client's interface.
#[map]
static OUT: DevMap = DevMap::with_max_entries(1, 0);

const IP_CHECK: usize = 14 + 10;
const IP_SRC_LOW: usize = 14 + 14;
const TCP_SPORT: usize = 34;
const TCP_CHECK: usize = 34 + 16;
/// Source ports cycle through this many values; the source address moves on after each cycle.
const PORTS: u64 = 0x8000;

/// RFC 1624: the checksum after one 16-bit word changed from `old` to `new`.
#[inline(always)]
fn csum_replace(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn get16(frame: &[u8; 64], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

#[inline(always)]
fn set16(frame: &mut [u8; 64], at: usize, value: u16) {
    let bytes = value.to_be_bytes();
    frame[at] = bytes[0];
    frame[at + 1] = bytes[1];
}

#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    let Some(config) = CONFIG.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let start = ctx.data();
    if start + 64 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: 64 bytes bounds checked above; the frame starts 8-byte aligned after the
    // kernel's headroom, and x86 does unaligned accesses anyway.
    let words = unsafe { &mut *(start as *mut [u64; 8]) };
    *words = config.template;
    if config.vary != 0 {
        let Some(sequence) = SEQUENCE.get_ptr_mut(0) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: map value; one generator runs at a time.
        let n = unsafe {
            let n = *sequence;
            *sequence = n + 1;
            n
        };
        // SAFETY: the same 64 bytes as `words`, viewed as bytes.
        let frame = unsafe { &mut *(start as *mut [u8; 64]) };
        let old_port = get16(frame, TCP_SPORT);
        let old_low = get16(frame, IP_SRC_LOW);
        let port = old_port.wrapping_add((n % PORTS) as u16);
        let low = old_low.wrapping_add((n / PORTS) as u16);
        set16(frame, TCP_SPORT, port);
        set16(frame, IP_SRC_LOW, low);
        let ip_check = csum_replace(get16(frame, IP_CHECK), old_low, low);
        set16(frame, IP_CHECK, ip_check);
        // The source address is part of the TCP pseudo-header.
        let tcp_check = csum_replace(get16(frame, TCP_CHECK), old_low, low);
        let tcp_check = csum_replace(tcp_check, old_port, port);
        set16(frame, TCP_CHECK, tcp_check);
    }
    OUT.redirect(0, 0).unwrap_or(xdp_action::XDP_ABORTED)
}

lb_ebpf::object_boilerplate!();
