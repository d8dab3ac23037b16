//! Full NAT (`forwarding = "nat"`, issue 12), both directions in XDP.
//!
//! * Client -> VIP: destination becomes backend:port, source a nat address:port of the LB
//!   ([`to_backend`]). A connection's translation is found in `NAT_FWD` (client tuple) and
//!   owned through `NAT_REV` (backend tuple): a new connection claims a port by inserting its
//!   `NAT_REV` entry with `BPF_NOEXIST`, which only one CPU can win, so two live connections
//!   never share (nat address, nat port, backend, backend port, protocol). Probes are bounded
//!   ([`NAT_PROBES`]); an expired owner found on the way is deleted and the slot claimed the
//!   same way. No free slot: the new connection is dropped and counted.
//! * Backend -> nat address: looked up in `NAT_REV` when no VIP matched and some VIP uses nat
//!   ([`from_backend`]), translated back and sent to the hop the client's packets came from.
//! * ICMP errors about a nat connection are translated in both directions (outer and quoted
//!   headers, every checksum), so port unreachable and path MTU discovery work through the LB.
//!
//! Checksums are updated incrementally (RFC 1624) from the 16-bit words that change.
//!
//! Each of the four runs as its own XDP program, reached by a tail call (`NAT_PROGS`) from
//! the balancer once it knows the packet is for nat ([`hand_off`]): the balancer's own stack
//! frame leaves too little of the 512 bytes for nat's work, and the verifier checks a tail
//! called program once instead of once per path that reaches it. The packet's parse and the
//! choice travel in the per-CPU [`Scratch`].

use crate::{
    counters, forward,
    maps::{BACKENDS, NAT_BACKENDS, NAT_CONFIG, NAT_FWD, NAT_PROGS, NAT_REV, NAT_SCRATCH},
    parse::Packet,
    pass,
};
use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_csum_diff, bpf_loop},
    programs::XdpContext,
};
use core::ffi::c_void;
use lb_common::{
    counters as idx, nat_slot, Backend, FlowKey, NatBackend, NatConfig, NatForward, NatState,
    BACKEND_PRESENT, FAMILY_IPV4, FAMILY_IPV6, FLOW_FIN_SEEN, FLOW_RST_SEEN, NAT_PROBES, PROTO_TCP,
    PROTO_UDP,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

/// The packet's bounds, read once per function: LLVM may otherwise compute the address of
/// `data_end` once and load through the moved context pointer, which the verifier refuses.
#[derive(Clone, Copy)]
struct Frame {
    start: usize,
    end: usize,
}

impl Frame {
    #[inline(always)]
    fn of(ctx: &XdpContext) -> Self {
        // SAFETY: reading fields of the context the kernel passed us; volatile so the bound
        // checks below are not proven redundant by LLVM (see `parse::ptr_at`).
        unsafe {
            Self {
                start: core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
                end: core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
            }
        }
    }

    /// A `T` at `offset` bytes into the packet, if it fits.
    #[inline(always)]
    fn at<T>(&self, offset: usize) -> Result<*mut T, ()> {
        if self.start + offset + core::mem::size_of::<T>() > self.end {
            return Err(());
        }
        Ok((self.start + offset) as *mut T)
    }
}

/// `BPF_NOEXIST`: create only.
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;
/// Largest L2 + L3 header length the parser accepts (18 + 40 + 4 extension headers): an
/// explicit bound for the verifier on offsets read back from the stack.
const MAX_L4_OFFSET: usize = 18 + 40 + 4 * 2048;
const ICMP_HEADER_LEN: usize = 8;

#[inline(always)]
fn closing_bits(pkt: &Packet) -> u8 {
    (pkt.is_tcp_fin() as u8 * FLOW_FIN_SEEN) | (pkt.is_tcp_rst() as u8 * FLOW_RST_SEEN)
}

/// Refreshes an entry's idle clock and closing state; writes only when something changed.
#[inline(always)]
fn refresh(state: &mut NatState, now: u32, bits: u8) {
    if state.last_seen != now || state.state | bits != state.state {
        state.last_seen = now;
        state.state |= bits;
    }
}

/// Per-CPU hand-off from the balancer to a nat program, and space for the entries a nat
/// packet builds or copies (off the 512-byte BPF stack).
#[repr(C)]
pub struct Scratch {
    /// The packet as the balancer parsed it (for ICMP errors: keyed by the connection).
    pkt: Packet,
    /// Where `pkt`'s TCP/UDP header starts.
    l4_offset: usize,
    backend_id: u32,
    vip_id: u32,
    new_flow: u32,
    fwd: NatForward,
    reverse: FlowKey,
    state: NatState,
    /// Inputs and result of the probe loop ([`probe`]).
    key: FlowKey,
    default_src: [u8; 16],
    hash: u32,
    now: u32,
    result: u32,
    rehash: u32,
}

/// `NAT_PROGS` slots, one per nat program (see lb-ebpf/src/main.rs).
pub const TO_BACKEND: u32 = 0;
pub const FROM_BACKEND: u32 = 1;
pub const ERROR_FROM_BACKEND: u32 = 2;
pub const ERROR_TO_BACKEND: u32 = 3;

#[inline(always)]
fn scratch() -> Result<&'static mut Scratch, u32> {
    let scratch = NAT_SCRATCH.get_ptr_mut(0).ok_or(idx::DROP_INTERNAL)?;
    // SAFETY: per-CPU slot, used by this program run (and the one it tail-calls) only.
    Ok(unsafe { &mut *scratch })
}

/// What a nat program needs besides the packet: the chosen backend (none for packets from
/// backends) and the flow hash.
pub struct HandOff {
    pub backend_id: u32,
    pub vip_id: u32,
    pub new_flow: bool,
    /// The new flow replaced an ended one on the same tuple (the log's `rehash`).
    pub rehash: bool,
    pub hash: u32,
}

/// Hands the packet over to nat program `slot` (a tail call, which does not return). Returns
/// only if that failed: the drop reason. TCP and UDP packets are parsed again there (a few
/// ns for nat packets only), which keeps the balancer's stack from growing; ICMP errors
/// pass their parse (`error`: keyed by the connection).
#[inline(always)]
pub fn hand_off(ctx: &XdpContext, error: Option<&Packet>, slot: u32, with: HandOff) -> u32 {
    let Ok(scratch) = scratch() else {
        return idx::DROP_INTERNAL;
    };
    if let Some(error) = error {
        // SAFETY: plain data copied from the stack into the per-CPU map value.
        unsafe { core::ptr::copy_nonoverlapping(error, &mut scratch.pkt, 1) };
    }
    scratch.backend_id = with.backend_id;
    scratch.vip_id = with.vip_id;
    scratch.new_flow = with.new_flow as u32;
    scratch.rehash = with.rehash as u32;
    scratch.hash = with.hash;
    // SAFETY: a tail call on our own context; on failure it returns here.
    unsafe { NAT_PROGS.tail_call(ctx, slot) };
    idx::DROP_INTERNAL
}

/// [`HandOff`] for packets that have no backend chosen yet (they carry their connection).
pub const NO_CHOICE: HandOff = HandOff {
    backend_id: 0,
    vip_id: 0,
    new_flow: false,
    rehash: false,
    hash: 0,
};

/// `xdplb_nat_to_backend`: translates a client's packet for its backend and sends it there.
#[inline(always)]
pub fn to_backend(ctx: &XdpContext) -> u32 {
    let scratch = match reparsed(ctx) {
        Ok(scratch) => scratch,
        Err(reason) => return drop(reason),
    };
    let (vip_id, backend_id, bytes, new_flow) = (
        scratch.vip_id,
        scratch.backend_id,
        scratch.pkt.l3_len,
        scratch.new_flow != 0,
    );
    let sent = translate_to_backend(ctx, scratch);
    // Logged here, not by the balancer: only now are the nat address and port known.
    if new_flow && sent.is_ok() {
        crate::events::nat_chosen(
            &scratch.pkt.key,
            vip_id,
            backend_id,
            scratch.rehash != 0,
            &scratch.fwd,
        );
    }
    counters::sent_to_backend(vip_id, backend_id, bytes, new_flow, sent)
}

/// The hand-off, with the packet parsed (again: the balancer hands over only its choice).
#[inline(always)]
fn reparsed(ctx: &XdpContext) -> Result<&'static mut Scratch, u32> {
    let scratch = scratch()?;
    let (pkt, l4_offset) = crate::parse::parse_to_l4(ctx)?;
    scratch.pkt = pkt;
    scratch.l4_offset = l4_offset;
    Ok(scratch)
}

/// The backend entry of `id`, while present (the hand-off carries the id, not the entry).
#[inline(always)]
fn backend_by_id(id: u32) -> Option<&'static Backend> {
    BACKENDS.get(id).filter(|b| b.flags & BACKEND_PRESENT != 0)
}

#[inline(always)]
fn drop(reason: u32) -> u32 {
    counters::global(reason);
    xdp_action::XDP_DROP
}

#[inline(always)]
fn translate_to_backend(ctx: &XdpContext, scratch: &mut Scratch) -> Result<u32, u32> {
    let backend = backend_by_id(scratch.backend_id).ok_or(idx::DROP_INTERNAL)?;
    let config = NAT_CONFIG.get(0).ok_or(idx::DROP_INTERNAL)?;
    let nat_backend = NAT_BACKENDS
        .get(scratch.backend_id)
        .ok_or(idx::DROP_INTERNAL)?;
    let backend_port = if nat_backend.port == 0 {
        scratch.pkt.key.dport
    } else {
        nat_backend.port
    };
    let now = crate::clock::now_seconds();
    if !current(scratch, backend_port, config, now) {
        claim(ctx, scratch, backend, backend_port, nat_backend, now)?;
    }
    let fwd = &scratch.fwd;
    rewrite(
        ctx,
        &scratch.pkt,
        scratch.l4_offset,
        &fwd.nat_addr,
        fwd.nat_port,
        &fwd.backend,
        fwd.backend_port,
    )
    .map_err(|_| idx::DROP_INTERNAL)?;
    forward::dsr(ctx, backend)
}

/// Whether the connection has a live translation for this backend (then in `scratch.fwd`).
/// An entry of its own that no longer fits (another backend, expired, a new SYN after FIN or
/// RST) is released.
#[inline(always)]
fn current(scratch: &mut Scratch, backend_port: u16, config: &NatConfig, now: u32) -> bool {
    let pkt = &scratch.pkt;
    let key = &pkt.key;
    let backend_id = scratch.backend_id;
    // SAFETY: hash value copied out at once.
    let Some(fwd) = (unsafe { NAT_FWD.get(key) }) else {
        return false;
    };
    let fwd = *fwd;
    scratch.reverse = fwd.reverse_key(key.proto, key.family);
    let Some(state) = NAT_REV.get_ptr_mut(&scratch.reverse) else {
        return false;
    };
    // SAFETY: hash value; concurrent writers only store whole small fields.
    let state = unsafe { &mut *state };
    if !state.owned_by(key) {
        // Expired and taken over by another connection: this one needs a new port.
        return false;
    }
    let reopened = pkt.is_tcp_syn_only() && state.state & (FLOW_FIN_SEEN | FLOW_RST_SEEN) != 0;
    if fwd.backend_id == backend_id
        && fwd.backend_port == backend_port
        && !reopened
        && !config.expired(key.proto, state, now)
    {
        refresh(state, now, closing_bits(pkt));
        scratch.fwd = fwd;
        return true;
    }
    let _ = NAT_REV.remove(&scratch.reverse);
    false
}

/// Claims a free (nat address, nat port) toward the backend for a new connection; the
/// translation is left in `scratch.fwd`.
#[inline(always)]
fn claim(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    backend: &Backend,
    backend_port: u16,
    nat_backend: &NatBackend,
    now: u32,
) -> Result<(), u32> {
    let key = scratch.pkt.key;
    let bits = closing_bits(&scratch.pkt);
    let macs = Frame::of(ctx)
        .at::<[u8; 12]>(0)
        .map_err(|_| idx::DROP_INTERNAL)?;
    // SAFETY: bounds checked.
    let macs = unsafe { &*macs };
    let state = &mut scratch.state;
    state.client = key.src;
    state.vip = key.dst;
    state.client_port = key.sport;
    state.vip_port = key.dport;
    // Replies go back to the hop this packet came from, from the address it was sent to.
    state.client_mac.copy_from_slice(&macs[6..]);
    state.lb_mac.copy_from_slice(&macs[..6]);
    state.ifindex = ctx.ingress_ifindex() as u32;
    state.vip_id = scratch.vip_id;
    state.backend_id = scratch.backend_id;
    state.created = now;
    state.last_seen = now;
    state.state = bits;
    state._pad = [0; 3];
    let fwd = &mut scratch.fwd;
    fwd.backend = backend.addr;
    fwd.backend_port = backend_port;
    fwd.backend_id = scratch.backend_id;
    scratch.key = key;
    scratch.default_src = nat_backend.src;
    scratch.now = now;
    scratch.result = TABLE_FULL;
    // bpf_loop: the verifier checks the probe once, not once per iteration.
    // SAFETY: `probe` has the callback signature bpf_loop expects; it takes no context.
    unsafe {
        bpf_loop(
            NAT_PROBES,
            probe as *const () as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    match scratch.result {
        SLOT_CLAIMED => Ok(()),
        _ => Err(idx::DROP_NAT_EXHAUSTED),
    }
}

const SLOT_CLAIMED: u32 = 0;
const SLOT_TAKEN: u32 = 1;
const TABLE_FULL: u32 = 2;

/// Probe `index` of the claim prepared in the scratch space: computes its slot and tries to
/// claim it. Returns 0 to go on probing, 1 to stop (claimed, or the table is full).
#[inline(never)]
extern "C" fn probe(index: u64, _ctx: *mut c_void) -> i64 {
    let Ok(scratch) = scratch() else {
        return 1;
    };
    let Some(config) = NAT_CONFIG.get(0) else {
        return 1;
    };
    let key = scratch.key;
    let sources = config.source_count(key.family);
    let (source, port) = nat_slot(
        scratch.hash,
        index as u32,
        config.port_min,
        config.port_max,
        sources,
    );
    if sources == 0 {
        scratch.fwd.nat_addr = scratch.default_src;
    } else if !set_source(&mut scratch.fwd.nat_addr, config, key.family, source) {
        return 1;
    }
    scratch.fwd.nat_port = port.to_be();
    scratch.result = try_slot(scratch, &key, config, scratch.now);
    (scratch.result != SLOT_TAKEN) as i64
}

/// Tries to claim the slot in `scratch.fwd` for the connection `key` (state in
/// `scratch.state`).
#[inline(always)]
fn try_slot(scratch: &mut Scratch, key: &FlowKey, config: &NatConfig, now: u32) -> u32 {
    scratch.reverse = scratch.fwd.reverse_key(key.proto, key.family);
    match NAT_REV.insert(&scratch.reverse, &scratch.state, BPF_NOEXIST) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => {
            // SAFETY: hash value, read once.
            let expired = unsafe { NAT_REV.get(&scratch.reverse) }
                .is_some_and(|owner| config.expired(key.proto, owner, now));
            // Delete, then claim like a free slot: if another CPU claims it in between, this
            // one simply probes on.
            if !expired
                || NAT_REV.remove(&scratch.reverse).is_err()
                || NAT_REV
                    .insert(&scratch.reverse, &scratch.state, BPF_NOEXIST)
                    .is_err()
            {
                return SLOT_TAKEN;
            }
            counters::global(idx::NAT_RECLAIMED);
        }
        // The table is full: no probe can succeed.
        Err(_) => return TABLE_FULL,
    }
    if NAT_FWD.insert(key, &scratch.fwd, 0).is_err() {
        let _ = NAT_REV.remove(&scratch.reverse);
        return TABLE_FULL;
    }
    counters::global(idx::NAT_NEW);
    SLOT_CLAIMED
}

/// Writes configured nat source `index` of `family` in the 16-byte layout; false if absent.
#[inline(always)]
fn set_source(addr: &mut [u8; 16], config: &NatConfig, family: u8, index: u32) -> bool {
    if family == FAMILY_IPV6 {
        let Some(v6) = config.src_v6.get(index as usize) else {
            return false;
        };
        *addr = *v6;
        return true;
    }
    let Some(v4) = config.src_v4.get(index as usize) else {
        return false;
    };
    *addr = [0; 16];
    addr[..4].copy_from_slice(v4);
    true
}

/// `xdplb_nat_from_backend`: a backend's packet to a nat address, translated back to its
/// client. Packets to nat addresses that belong to no nat connection (the LB's own traffic)
/// are passed.
#[inline(always)]
pub fn from_backend(ctx: &XdpContext) -> u32 {
    let scratch = match reparsed(ctx) {
        Ok(scratch) => scratch,
        Err(reason) => return drop(reason),
    };
    let pkt = &scratch.pkt;
    let Some(state) = NAT_REV.get_ptr_mut(&pkt.key) else {
        return pass(idx::PASS_NOT_VIP);
    };
    // SAFETY: hash value; concurrent writers only store whole small fields.
    let state = unsafe { &mut *state };
    refresh(state, crate::clock::now_seconds(), closing_bits(pkt));
    if rewrite(
        ctx,
        pkt,
        scratch.l4_offset,
        &state.vip,
        state.vip_port,
        &state.client,
        state.client_port,
    )
    .is_err()
    {
        return drop(idx::DROP_INTERNAL);
    }
    to_client(ctx, state, idx::NAT_REPLY)
}

/// Sends a translated frame back to the hop `state`'s client packets came from.
#[inline(always)]
fn to_client(ctx: &XdpContext, state: &NatState, counter: u32) -> u32 {
    let sent = Frame::of(ctx).at::<[u8; 12]>(0).map(|macs| {
        // SAFETY: bounds checked.
        let macs = unsafe { &mut *macs };
        macs[..6].copy_from_slice(&state.client_mac);
        macs[6..].copy_from_slice(&state.lb_mac);
    });
    if sent.is_err() {
        return drop(idx::DROP_INTERNAL);
    }
    match forward::out_of(ctx, state.ifindex) {
        Ok(action) => {
            counters::global(counter);
            action
        }
        Err(reason) => {
            counters::global(reason);
            xdp_action::XDP_DROP
        }
    }
}

/// An ICMP error sent to a nat address about a packet the LB sent to a backend (port
/// unreachable from the backend, fragmentation needed / packet too big from a router on the
/// way): translated to be about the client's packet, and sent to the client from the VIP.
/// `error.key` is the quoted packet's tuple reversed: the backend-side tuple of `NAT_REV`.
#[inline(always)]
pub fn error_from_backend(ctx: &XdpContext) -> u32 {
    let Ok(scratch) = scratch() else {
        return drop(idx::DROP_INTERNAL);
    };
    let error = &scratch.pkt;
    // SAFETY: hash value, only read.
    let Some(state) = (unsafe { NAT_REV.get(&error.key) }) else {
        return pass(idx::PASS_NOT_VIP);
    };
    let quoted = Quoted {
        src: &state.client,
        sport: state.client_port,
        dst: &state.vip,
        dport: state.vip_port,
    };
    if translate_error(ctx, error, &quoted).is_err() {
        return drop(idx::DROP_INTERNAL);
    }
    to_client(ctx, state, idx::NAT_ICMP_TO_CLIENT)
}

/// An ICMP error sent to a nat VIP about its reply to a client (fragmentation needed /
/// packet too big from a router toward the client): translated to be about the backend's
/// packet, from the nat address, and sent to the connection's backend. `error.key` is the
/// client connection's tuple. No live translation: passed.
#[inline(always)]
pub fn error_to_backend(ctx: &XdpContext) -> u32 {
    let Ok(scratch) = scratch() else {
        return drop(idx::DROP_INTERNAL);
    };
    let (vip_id, backend_id, bytes) = (scratch.vip_id, scratch.backend_id, scratch.pkt.l3_len);
    match translate_error_to_backend(ctx, scratch) {
        Err(idx::PASS_ICMP_NO_BACKEND) => pass(idx::PASS_ICMP_NO_BACKEND),
        sent => counters::sent_to_backend(vip_id, backend_id, bytes, false, sent),
    }
}

#[inline(always)]
fn translate_error_to_backend(ctx: &XdpContext, scratch: &mut Scratch) -> Result<u32, u32> {
    let error = &scratch.pkt;
    let key = &error.key;
    let backend = backend_by_id(scratch.backend_id).ok_or(idx::DROP_INTERNAL)?;
    // SAFETY: hash values, only read.
    let fwd = unsafe { NAT_FWD.get(key) }
        .filter(|fwd| fwd.backend_id == scratch.backend_id)
        .ok_or(idx::PASS_ICMP_NO_BACKEND)?;
    scratch.reverse = fwd.reverse_key(key.proto, key.family);
    let owned = unsafe { NAT_REV.get(&scratch.reverse) }.is_some_and(|state| state.owned_by(key));
    if !owned {
        return Err(idx::PASS_ICMP_NO_BACKEND);
    }
    let quoted = Quoted {
        src: &fwd.backend,
        sport: fwd.backend_port,
        dst: &fwd.nat_addr,
        dport: fwd.nat_port,
    };
    translate_error(ctx, error, &quoted).map_err(|_| idx::DROP_INTERNAL)?;
    counters::global(idx::NAT_ICMP_TO_BACKEND);
    forward::dsr(ctx, backend)
}

/// What the packet quoted in an ICMP error becomes.
struct Quoted<'a> {
    src: &'a [u8; 16],
    sport: u16,
    dst: &'a [u8; 16],
    dport: u16,
}

/// Sum of 16-bit word changes, applied to a checksum field at the end (RFC 1624:
/// HC' = ~(~HC + ~m + m')). Words are read in memory order, so the result is stored the same
/// way; every changed field lies at an even offset from the start of what its checksum covers.
#[derive(Clone, Copy, Default)]
struct Delta(u64);

impl Delta {
    /// `len` bytes (a multiple of 4) at `old` replaced by those at `new`, summed by the
    /// kernel's `bpf_csum_diff` (as Katran does): a few instructions here instead of an
    /// unrolled loop per address.
    #[inline(always)]
    fn replace(&mut self, old: *const u8, new: *const u8, len: u32) -> Result<(), ()> {
        // SAFETY: the caller proved `len` bytes at both pointers are readable (packet bytes
        // bounds-checked, or a map value or stack array of that size); the helper only reads.
        let sum = unsafe { bpf_csum_diff(old as *mut u32, len, new as *mut u32, len, 0) };
        if sum < 0 {
            return Err(());
        }
        self.0 += sum as u32 as u64;
        Ok(())
    }

    /// One 16-bit word (a checksum field) changed.
    #[inline(always)]
    fn word(&mut self, old: u16, new: u16) {
        self.0 += (!old) as u64 + new as u64;
    }

    #[inline(always)]
    fn add(&mut self, other: Delta) {
        self.0 += other.0;
    }

    /// The checksum `check` (as stored) once the changes are applied.
    #[inline(always)]
    fn apply(self, check: u16) -> u16 {
        let mut sum = (!check) as u64 + self.0;
        sum = (sum & 0xffff_ffff) + (sum >> 32);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }
}

/// Applies `delta` to the 2-byte checksum at `offset` (UDP: 0 means none in IPv4 and stays;
/// a computed 0 is sent as 0xffff). Returns the change of the field for an enclosing sum.
#[inline(always)]
fn fix_l4_check(frame: Frame, offset: usize, proto: u8, delta: Delta) -> Result<Delta, ()> {
    let check = frame.at::<u16>(offset)?;
    // SAFETY: bounds checked; packet data is only 2-byte aligned here, which BPF loads allow.
    let old = unsafe { core::ptr::read_unaligned(check) };
    if proto == PROTO_UDP && old == 0 {
        return Ok(Delta::default());
    }
    let mut new = delta.apply(old);
    if proto == PROTO_UDP && new == 0 {
        new = 0xffff;
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_unaligned(check, new) };
    let mut change = Delta::default();
    change.word(old, new);
    Ok(change)
}

/// Offset of the transport checksum within its header.
#[inline(always)]
fn l4_check_offset(proto: u8) -> usize {
    if proto == PROTO_TCP {
        16
    } else {
        6
    }
}

/// Rewrites the addresses and ports of the packet's IP and TCP/UDP headers to `src:sport`
/// -> `dst:dport`, with the IPv4 header and transport checksums.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    l4: usize,
    src: &[u8; 16],
    sport: u16,
    dst: &[u8; 16],
    dport: u16,
) -> Result<(), ()> {
    let l2_len = pkt.l2_len;
    if l2_len > 18 || l4 > MAX_L4_OFFSET {
        return Err(());
    }
    let frame = Frame::of(ctx);
    let mut l4_delta = write_addresses(frame, l2_len, pkt.key.family, src, dst)?;
    l4_delta.add(write_ports(frame, l4, sport, dport)?);
    fix_l4_check(
        frame,
        l4 + l4_check_offset(pkt.key.proto),
        pkt.key.proto,
        l4_delta,
    )?;
    Ok(())
}

/// Replaces the two ports at `offset`; returns the change.
#[inline(always)]
fn write_ports(frame: Frame, offset: usize, sport: u16, dport: u16) -> Result<Delta, ()> {
    let ports = frame.at::<[u16; 2]>(offset)?;
    let new = [sport, dport];
    let mut delta = Delta::default();
    delta.replace(ports as *const u8, new.as_ptr() as *const u8, 4)?;
    // SAFETY: bounds checked.
    unsafe { core::ptr::write_unaligned(ports, new) };
    Ok(delta)
}

/// Replaces the source and destination of the IP header at `l3` and fixes the IPv4 header
/// checksum. Returns the change of the addresses: the pseudo-header's part of a transport
/// or ICMPv6 checksum, and the quoted header's part of an ICMPv4 one.
#[inline(always)]
fn write_addresses(
    frame: Frame,
    l3: usize,
    family: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
) -> Result<Delta, ()> {
    let mut delta = Delta::default();
    if family == FAMILY_IPV4 {
        let ip = frame.at::<Ipv4Hdr>(l3)?;
        // SAFETY: bounds checked.
        let ip = unsafe { &mut *ip };
        delta.replace(ip.src_addr.as_ptr(), src.as_ptr(), 4)?;
        delta.replace(ip.dst_addr.as_ptr(), dst.as_ptr(), 4)?;
        ip.check = delta.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
        ip.src_addr.copy_from_slice(&src[..4]);
        ip.dst_addr.copy_from_slice(&dst[..4]);
    } else {
        let ip = frame.at::<Ipv6Hdr>(l3)?;
        // SAFETY: bounds checked.
        let ip = unsafe { &mut *ip };
        delta.replace(ip.src_addr.as_ptr(), src.as_ptr(), 16)?;
        delta.replace(ip.dst_addr.as_ptr(), dst.as_ptr(), 16)?;
        ip.src_addr = *src;
        ip.dst_addr = *dst;
    }
    Ok(delta)
}

/// Rewrites an ICMP error (outer IP | ICMP | quoted IP | quoted ports...): the quoted
/// packet gets `quoted`'s addresses and ports (its IPv4 header checksum, and its transport
/// checksum when quoted), the outer header goes from `quoted.dst` to `quoted.src`, and the
/// ICMP checksum follows every change it covers (ICMPv6: the outer addresses too).
#[inline(always)]
fn translate_error(ctx: &XdpContext, error: &Packet, quoted: &Quoted) -> Result<(), ()> {
    let l2_len = error.l2_len;
    if l2_len > 18 {
        return Err(());
    }
    let family = error.key.family;
    let l3_end = l2_len + error.l3_len as usize;
    let frame = Frame::of(ctx);
    let outer_len = if family == FAMILY_IPV4 {
        // SAFETY: bounds checked.
        let ip = unsafe { &*frame.at::<Ipv4Hdr>(l2_len)? };
        ((ip.vihl & 0x0f) as usize) * 4
    } else {
        Ipv6Hdr::LEN
    };
    if outer_len > 60 {
        return Err(());
    }
    let icmp_at = l2_len + outer_len;
    let inner_at = icmp_at + ICMP_HEADER_LEN;
    // Quoted IP header; ICMPv4's sum covers its addresses and its checksum.
    let (inner_len, old_check) = if family == FAMILY_IPV4 {
        // SAFETY: bounds checked.
        let ip = unsafe { &*frame.at::<Ipv4Hdr>(inner_at)? };
        (
            ((ip.vihl & 0x0f) as usize) * 4,
            u16::from_ne_bytes(ip.check),
        )
    } else {
        (Ipv6Hdr::LEN, 0)
    };
    if inner_len > 60 {
        return Err(());
    }
    let inner_addresses = write_addresses(frame, inner_at, family, quoted.src, quoted.dst)?;
    let mut icmp = inner_addresses;
    if family == FAMILY_IPV4 {
        // SAFETY: bounds checked.
        let ip = unsafe { &*frame.at::<Ipv4Hdr>(inner_at)? };
        icmp.word(old_check, u16::from_ne_bytes(ip.check));
    }
    // Quoted ports (always quoted: the caller found them) and, when quoted, the checksum.
    let ports_at = inner_at + inner_len;
    let ports = write_ports(frame, ports_at, quoted.sport, quoted.dport)?;
    icmp.add(ports);
    let check_at = ports_at + l4_check_offset(error.key.proto);
    if check_at + 2 <= l3_end {
        let mut l4 = inner_addresses;
        l4.add(ports);
        icmp.add(fix_l4_check(frame, check_at, error.key.proto, l4)?);
    }
    // Outer header: from the quoted packet's destination to its source.
    let outer = write_addresses(frame, l2_len, family, quoted.dst, quoted.src)?;
    if family == FAMILY_IPV6 {
        icmp.add(outer);
    }
    let check = frame.at::<u16>(icmp_at + 2)?;
    // SAFETY: bounds checked.
    unsafe { core::ptr::write_unaligned(check, icmp.apply(core::ptr::read_unaligned(check))) };
    Ok(())
}
