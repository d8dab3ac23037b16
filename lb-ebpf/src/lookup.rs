//! VIP match, flow table and Maglev ring: which backend serves this packet (new flows ask
//! [`crate::schedule`]).

use crate::{
    maps::{BACKENDS, FLOWS, PINNED, RINGS, VIPS},
    parse::Packet,
};
use lb_common::{
    counters, Backend, FlowKey, FlowValue, VipKey, VipMeta, AFFINITY_CONNECTION, BACKEND_DOWN,
    BACKEND_PRESENT, CONFIG_HAS_PORT0_VIPS, FLOW_ACK_SEEN, FLOW_FIN_SEEN, FLOW_PINNED,
    FLOW_RST_SEEN, FLOW_SYN_SEEN, NO_BACKEND, PROTO_UDP, SCHED_MAGLEV,
};

/// Exact (address, port, protocol) first, then the address's all-ports entry when any VIP
/// has one (`CONFIG_HAS_PORT0_VIPS`).
#[inline(always)]
pub fn find_vip(flow: &FlowKey, config_flags: u8) -> Option<&'static VipMeta> {
    let mut key = VipKey {
        addr: flow.dst,
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

/// The hash that picks the ring slot: the flow hash, or the client's for a VIP with client
/// affinity (only those pay for a second hash).
#[inline(always)]
pub fn ring_hash(key: &FlowKey, flow_hash: u32, seed: u32, vip: &VipMeta) -> u32 {
    if vip.affinity == AFFINITY_CONNECTION {
        flow_hash
    } else {
        client_hash(key, seed, vip.affinity)
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
    ring_hash: u32,
    vip: &VipMeta,
) -> Option<(u32, &'static Backend)> {
    // SAFETY: read-only lookup; the value is copied out at once.
    // The pinned copy counts too: a flood may have evicted the flow from `FLOWS`.
    if let Some(backend_id) =
        unsafe { FLOWS.get(key).or_else(|| PINNED.get(key)) }.map(|flow| flow.backend_id)
    {
        if let Some(backend) = backend_of_vip(backend_id, vip) {
            return Some((backend_id, backend));
        }
    }
    if vip.scheduler != SCHED_MAGLEV {
        return None;
    }
    from_ring(vip, ring_hash)
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
/// connection must first pass `limit_new` (the filter's new-flow limits). An entry evicted
/// from the flow table but pinned by the flood defence counts as found. `Err` is a
/// drop-reason counter.
#[inline(always)]
pub fn choose_backend(
    pkt: &Packet,
    hash: u32,
    vip: &VipMeta,
    limit_new: impl FnOnce() -> Result<(), u32>,
) -> Result<Choice, u32> {
    let key = &pkt.key;
    let now = crate::clock::now_seconds();
    let state = state_bits(pkt);
    if let Some(flow) = FLOWS
        .get_ptr_mut(key)
        .or_else(|| crate::flood::restore(pkt))
    {
        // SAFETY: LRU map value; concurrent writers only ever store whole small fields.
        let flow = unsafe { &mut *flow };
        let syn = pkt.is_tcp_syn_only();
        // A fresh SYN on a tuple whose connection ended is a new connection: let the ring
        // choose, so a drained backend gets no new connection through port reuse.
        let reopened = syn && flow.state & (FLOW_FIN_SEEN | FLOW_RST_SEEN) != 0;
        if !reopened {
            if let Some(backend) = backend_of_vip(flow.backend_id, vip) {
                // A down backend keeps its established TCP flows (they cannot move), but UDP
                // flows leave it, and so does a SYN: a handshake cannot complete there, and
                // the client may be reusing the port of an attempt the backend reset (a reset
                // this LB never sees in DSR).
                let leave_down =
                    backend.flags & BACKEND_DOWN != 0 && (key.proto == PROTO_UDP || syn);
                if !leave_down {
                    crate::counters::global(counters::FLOW_HIT);
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
        if reopened {
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
    limit_new()?;
    let (backend_id, backend) =
        crate::schedule::pick(vip, hash).ok_or(counters::DROP_NO_BACKEND)?;
    let value = FlowValue {
        backend_id,
        created: now,
        last_seen: now,
        state: state | crate::schedule::open(vip, backend_id, state),
        _pad: [0; 3],
    };
    if FLOWS.insert(key, &value, 0).is_err() {
        // Still forward: Maglev gives the same answer for the next packet (round robin and
        // least-conn may not). No entry holds the count: give it back.
        crate::schedule::close(value.state, backend_id);
        crate::counters::global(counters::FLOW_INSERT_FAILED);
    }
    Ok(Choice {
        backend_id,
        backend,
        new_flow: true,
        rehash: false,
    })
}
