//! VIP match, flow table and Maglev ring: which backend serves this packet (new flows ask
//! [`crate::schedule`]).

use crate::{
    maps::{BACKENDS, PINNED, RINGS, VIPS, VIP_ADDRS, VIP_SLOTS},
    parse::Packet,
};
use core::cell::Cell;
use lb_common::{
    counters, Backend, FlowKey, FlowValue, LbConfig, VipKey, VipMeta, AFFINITY_CONNECTION,
    BACKEND_DOWN, BACKEND_PRESENT, CONFIG_HAS_PORT0_VIPS, FILTER_LIMITS, FLOW_ACK_SEEN,
    FLOW_FIN_SEEN, FLOW_PINNED, FLOW_RST_SEEN, FLOW_SYN_SEEN, NO_BACKEND, PROTO_UDP, SCHED_MAGLEV,
};

/// What the VIP stage found: the packet's VIP, and its flow entry when the flow table has one
/// (looked up on the way, so [`choose_backend`] does not look again).
pub struct Found {
    pub vip: &'static VipMeta,
    pub flow: Option<*mut FlowValue>,
    /// The flow's backend, when the flow entry is what proved the VIP (checked as
    /// [`backend_of_vip`] would, so [`choose_backend`] does not look it up again).
    pub backend: Option<&'static Backend>,
}

/// Flow table first: a flow hit finds its VIP through its backend's `vip_id` in `VIP_SLOTS`
/// (inlined array loads) and proves it by comparing the slot's key with the packet's, so a hit
/// makes no hash-map lookup at all. A miss, or a flow of an all-ports VIP (an exact VIP
/// added since may now own the packet), asks `VIPS` as [`find_vip`] does. A destination
/// whose `VIP_ADDRS` bit is clear looks up nothing.
#[inline(always)]
pub fn find_vip_and_flow(key: &FlowKey, hash: &FlowHash, config_flags: u8) -> Option<Found> {
    if !may_be_vip(key) {
        return None;
    }
    let flow = crate::flows::find(key, hash);
    // SAFETY: flow-table slot, read only here (see `choose_backend` for the writes).
    if let Some((vip, backend)) = flow.and_then(|flow| vip_of_flow(unsafe { &*flow }, key)) {
        return Some(Found {
            vip,
            flow,
            backend: Some(backend),
        });
    }
    let vip = vips_lookup(key, config_flags)?;
    Some(Found {
        vip,
        flow,
        backend: None,
    })
}

/// The VIP of a flow's backend, and the backend, when it is the VIP with exactly the packet's
/// (address, port, protocol); port-0 VIPs never match (`VIPS` decides for them).
#[inline(always)]
fn vip_of_flow(flow: &FlowValue, key: &FlowKey) -> Option<(&'static VipMeta, &'static Backend)> {
    let backend = BACKENDS.get(flow.backend_id)?;
    if backend.flags & BACKEND_PRESENT == 0 {
        return None;
    }
    let slot = VIP_SLOTS.get(backend.vip_id)?;
    let same = slot.key.port == key.dport
        && slot.key.proto == key.proto
        && slot.key.family == key.family
        && slot.key.addr_words() == key.dst_words();
    same.then_some((&slot.meta, backend))
}

/// Exact (address, port, protocol) first, then the address's all-ports entry when any VIP
/// has one (`CONFIG_HAS_PORT0_VIPS`). A destination whose `VIP_ADDRS` bit is clear has no
/// VIP: no `VIPS` lookup at all.
#[inline(always)]
pub fn find_vip(flow: &FlowKey, config_flags: u8) -> Option<&'static VipMeta> {
    if !may_be_vip(flow) {
        return None;
    }
    vips_lookup(flow, config_flags)
}

/// False when the destination's `VIP_ADDRS` bit is clear: no VIP has that address.
#[inline(always)]
fn may_be_vip(flow: &FlowKey) -> bool {
    let (word, bit) = lb_common::vip_addr_bit(flow.family, &flow.dst_words());
    VIP_ADDRS.get(word).is_some_and(|bits| bits & bit != 0)
}

#[inline(always)]
fn vips_lookup(flow: &FlowKey, config_flags: u8) -> Option<&'static VipMeta> {
    let mut key = VipKey {
        // SAFETY: [u32; 4] and [u8; 16] have the same size; every bit pattern is valid.
        addr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(flow.dst_words()) },
        port: flow.dport,
        proto: flow.proto,
        family: flow.family,
    };
    // SAFETY: an updated hash element is replaced as a whole and freed only after every
    // running program is done (RCU), so the reference stays valid and consistent.
    if let Some(meta) = unsafe { VIPS.get(&key) } {
        return Some(meta);
    }
    if config_flags & CONFIG_HAS_PORT0_VIPS == 0 {
        return None;
    }
    key.port = 0;
    unsafe { VIPS.get(&key) }
}

/// The flow hashes, each computed on first use: the table's ([`Self::table`], every VIP
/// packet, cheap) and the flow hash ([`Self::get`]: new flows' ring slot, `ipip`'s outer
/// source and the ICMP path; a flow hit in `dsr` never needs it).
pub struct FlowHash<'a> {
    key: &'a FlowKey,
    seed: u32,
    /// [`LbConfig::flow_set_mask`], read with the seed so the table needs no config lookup.
    set_mask: u32,
    value: Cell<Option<u32>>,
    /// [`lb_common::flow_table_hash`].
    table: Cell<Option<u32>>,
    /// The hash stored in the flow's entry, for the outer header ([`Self::outer`]).
    stored: Cell<Option<u32>>,
}

impl<'a> FlowHash<'a> {
    /// The hashes of `key` with the seed and flow-table size of `config`.
    #[inline(always)]
    pub fn new(key: &'a FlowKey, config: Option<&LbConfig>) -> Self {
        let (seed, set_mask) = config.map_or((0, 0), |c| (c.hash_seed, c.flow_set_mask));
        Self {
            key,
            seed,
            set_mask,
            value: Cell::new(None),
            table: Cell::new(None),
            stored: Cell::new(None),
        }
    }

    /// A hash already computed (`seed` is then only used by [`Self::ring`] for affinity).
    #[inline(always)]
    pub fn known(key: &'a FlowKey, seed: u32, value: u32) -> Self {
        Self {
            key,
            seed,
            set_mask: 0,
            value: Cell::new(Some(value)),
            table: Cell::new(None),
            stored: Cell::new(None),
        }
    }

    /// The 5-tuple hash ([`lb_common::flow_hash`]).
    #[inline(always)]
    pub fn get(&self) -> u32 {
        if let Some(value) = self.value.get() {
            return value;
        }
        let value = lb_common::flow_hash(self.key, self.seed);
        self.value.set(Some(value));
        value
    }

    /// The first slot of the flow's set in the flow table.
    #[inline(always)]
    pub fn first_slot(&self) -> u32 {
        lb_common::flow_set_first_slot(self.table(), self.set_mask)
    }

    /// The hash that picks the flow's set in the flow table.
    #[inline(always)]
    fn table(&self) -> u32 {
        if let Some(value) = self.table.get() {
            return value;
        }
        let value = lb_common::flow_table_hash(self.key);
        self.table.set(Some(value));
        value
    }

    /// The hash of the flow's outer header (`ipip` source, flow label): the one its entry
    /// stores when the flow table gave one, else the 5-tuple hash.
    #[inline(always)]
    pub fn outer(&self) -> u32 {
        self.stored.get().unwrap_or_else(|| self.get())
    }

    /// Records the hash a flow-table entry holds (see [`Self::outer`]).
    #[inline(always)]
    fn remember(&self, stored: u32) {
        self.stored.set(Some(stored));
    }

    /// The hash that picks the ring slot: the flow hash, or the client's for a VIP with
    /// client affinity (only those pay for a second hash).
    #[inline(always)]
    pub fn ring(&self, vip: &VipMeta) -> u32 {
        if vip.affinity == AFFINITY_CONNECTION {
            self.get()
        } else {
            client_hash(self.key, self.seed, vip.affinity)
        }
    }
}

/// A BPF-to-BPF call rather than a second unrolled hash inlined into the main path, whose
/// size costs every packet instruction-cache misses; only affinity VIPs make the call.
#[inline(never)]
fn client_hash(key: &FlowKey, seed: u32, affinity: u8) -> u32 {
    lb_common::client_hash(key, seed, affinity)
}

/// The backend of an existing flow, for packets that must neither create nor refresh a flow
/// entry (ICMP errors about it): the flow table while its backend is still the VIP's, else
/// the Maglev ring, which is what chose the backend if this instance never saw the flow.
/// Round robin and least-conn choices live only in the flow table (their ring half holds a
/// turn or a backend list, not a hash table).
#[inline(always)]
pub fn flow_backend(
    key: &FlowKey,
    hash: &FlowHash,
    vip: &VipMeta,
) -> Option<(u32, &'static Backend)> {
    // SAFETY: read-only lookups; the value is copied out at once.
    // The pinned copy counts too: a flood may have evicted the flow from `FLOWS`.
    if let Some(backend_id) = crate::flows::find_out_of_line(key, hash)
        .map(|flow| unsafe { &*flow })
        .or_else(|| unsafe { PINNED.get(key) })
        .map(|flow| flow.backend_id)
    {
        if let Some(backend) = backend_of_vip(backend_id, vip) {
            return Some((backend_id, backend));
        }
    }
    if vip.scheduler != SCHED_MAGLEV {
        return None;
    }
    from_ring(vip, hash.ring(vip))
}

/// The backend chosen for a packet.
pub struct Choice {
    pub backend_id: u32,
    pub backend: &'static Backend,
    pub new_flow: bool,
    /// A new flow that replaced an entry of the same tuple (see `choose_backend`).
    pub rehash: bool,
}

#[inline(always)]
pub fn backend_of_vip(backend_id: u32, vip: &VipMeta) -> Option<&'static Backend> {
    let backend = BACKENDS.get(backend_id)?;
    (backend.flags & BACKEND_PRESENT != 0 && backend.vip_id == vip.vip_id).then_some(backend)
}

/// Maglev table lookup in the VIP's active half.
#[inline(always)]
pub fn from_ring(vip: &VipMeta, hash: u32) -> Option<(u32, &'static Backend)> {
    if vip.ring_size == 0 {
        return None;
    }
    let backend_id = *RINGS.get(vip.ring_base + hash % vip.ring_size)?;
    if backend_id == NO_BACKEND {
        return None;
    }
    Some((backend_id, backend_of_vip(backend_id, vip)?))
}

#[inline(always)]
fn state_bits(pkt: &Packet) -> u8 {
    (pkt.is_tcp_syn_only() as u8 * FLOW_SYN_SEEN)
        | (pkt.is_tcp_ack_only() as u8 * FLOW_ACK_SEEN)
        | (pkt.is_tcp_fin() as u8 * FLOW_FIN_SEEN)
        | (pkt.is_tcp_rst() as u8 * FLOW_RST_SEEN)
}

/// Flow table first: an existing flow keeps its backend while that backend is still part of
/// the VIP, even drained or re-weighted. Otherwise (a new flow, or one another LB instance
/// started) the ring decides and the flow is remembered. A packet that would start a new
/// connection must first pass `limit_new` (the filter's new-flow limits), asked only when
/// the VIP has limits: it is a BPF-to-BPF call (two call sites), which a VIP without limits
/// does not pay. `flow` is the packet's `FLOWS` entry as [`find_vip_and_flow`] found it. An
/// entry evicted
/// from the flow table but pinned by the flood defence counts as found. `Err` is a
/// drop-reason counter.
#[inline(always)]
pub fn choose_backend(
    pkt: &Packet,
    hash: &FlowHash,
    vip: &VipMeta,
    flow: Option<*mut FlowValue>,
    flow_backend: Option<&'static Backend>,
    limit_new: impl FnOnce() -> Result<(), u32>,
) -> Result<Choice, u32> {
    let key = &pkt.key;
    let now = crate::clock::now_seconds();
    let state = state_bits(pkt);
    if let Some(flow) = flow.or_else(|| crate::flood::restore(pkt, hash)) {
        // SAFETY: flow-table slot; concurrent writers only ever store whole small fields.
        let flow = unsafe { &mut *flow };
        let syn = pkt.is_tcp_syn_only();
        // A fresh SYN on a tuple whose connection ended is a new connection: let the ring
        // choose, so a drained backend gets no new connection through port reuse.
        let reopened = syn && flow.state & (FLOW_FIN_SEEN | FLOW_RST_SEEN) != 0;
        if !reopened {
            if let Some(backend) = flow_backend.or_else(|| backend_of_vip(flow.backend_id, vip)) {
                // A down backend keeps its established TCP flows (they cannot move), but UDP
                // flows leave it, and so does a SYN: a handshake cannot complete there, and
                // the client may be reusing the port of an attempt the backend reset (a reset
                // this LB never sees in DSR).
                let leave_down =
                    backend.flags & BACKEND_DOWN != 0 && (key.proto == PROTO_UDP || syn);
                if !leave_down {
                    crate::counters::global(counters::FLOW_HIT);
                    hash.remember(flow.hash);
                    let before = flow.state;
                    if flow.last_seen != now || flow.state | state != flow.state {
                        flow.last_seen = now;
                        flow.state |= state;
                    }
                    crate::schedule::established(vip, flow);
                    if flow.state & FLOW_PINNED == 0 {
                        crate::flood::pin(key, flow);
                    } else if flow.state != before {
                        crate::flood::sync(key, flow);
                    }
                    return Ok(Choice {
                        backend_id: flow.backend_id,
                        backend,
                        new_flow: false,
                        rehash: false,
                    });
                }
            }
        }
        if reopened && vip.filter & FILTER_LIMITS != 0 {
            limit_new()?;
        }
        crate::counters::global(counters::FLOW_REHASH);
        let (backend_id, backend) =
            crate::schedule::pick(vip, hash).ok_or(counters::DROP_NO_BACKEND)?;
        crate::schedule::close(flow.state, flow.backend_id);
        let pinned = flow.state & FLOW_PINNED;
        flow.backend_id = backend_id;
        flow.created = now;
        flow.last_seen = now;
        flow.state = state | pinned | crate::schedule::open(vip, backend_id, state);
        flow.hash = hash.get();
        if pinned != 0 {
            crate::flood::sync(key, flow);
        }
        return Ok(Choice {
            backend_id,
            backend,
            new_flow: true,
            rehash: true,
        });
    }
    crate::counters::global(counters::FLOW_MISS);
    if vip.filter & FILTER_LIMITS != 0 {
        limit_new()?;
    }
    let (backend_id, backend) =
        crate::schedule::pick(vip, hash).ok_or(counters::DROP_NO_BACKEND)?;
    let value = FlowValue {
        backend_id,
        created: now,
        last_seen: now,
        state: state | crate::schedule::open(vip, backend_id, state),
        _pad: [0; 3],
        hash: hash.get(),
    };
    if crate::flows::insert(key, &value, hash).is_none() {
        // Only if `CONFIG` named more sets than the table has (the loader writes both): no
        // entry holds the count, give it back, and forward anyway.
        crate::schedule::close(value.state, backend_id);
    }
    Ok(Choice {
        backend_id,
        backend,
        new_flow: true,
        rehash: false,
    })
}
