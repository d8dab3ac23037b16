//! The filter stage: the blocklist and the VIP's source ACL for every packet of a VIP that uses
//! them, and the new-flow limits, which the flow table asks only when a packet would start a
//! new flow. Each check is skipped by one flag test when its VIP (or, for the all-VIP
//! blocklist, the LB) has nothing of that kind.

use crate::maps::{ACL, ACL4, BLOCKLIST, SOURCE_RATES, VIP_LIMITS};
use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use lb_common::{
    counters, gcra, source_prefix_len, source_slots, FlowKey, SourcePrefix, SourcePrefix4, VipMeta,
    ACL_ALLOW, CONFIG_BLOCK_ALL_VIPS, FAMILY_IPV4, FAMILY_IPV6, FILTER_ACL, FILTER_ALLOW_LIST,
    FILTER_BLOCKED, FILTER_LIMITS, SCOPE_ALL_VIPS,
};

/// Blocklist (the VIP's own entries, then those for every VIP), then the ACL. `Err` is the
/// drop-reason counter.
#[inline(always)]
pub fn admit(key: &FlowKey, vip: &VipMeta, config_flags: u8) -> Result<(), u32> {
    if vip.filter & FILTER_BLOCKED != 0 && blocked(vip.vip_id, key) {
        return Err(counters::DROP_BLOCKED);
    }
    if config_flags & CONFIG_BLOCK_ALL_VIPS != 0 && blocked(SCOPE_ALL_VIPS, key) {
        return Err(counters::DROP_BLOCKED);
    }
    if vip.filter & FILTER_ACL != 0 {
        // Userspace stores no allow entry inside a deny entry, so the longest match decides.
        let verdict = if key.family == FAMILY_IPV4 {
            let data = SourcePrefix4 {
                scope: vip.vip_id.to_be_bytes(),
                addr: key.src_words()[0].to_ne_bytes(),
            };
            ACL4.get(Key::new(64, data))
        } else {
            ACL.get(source_key(vip.vip_id, key))
        };
        let allowed = match verdict {
            Some(verdict) => *verdict == ACL_ALLOW,
            None => vip.filter & FILTER_ALLOW_LIST == 0,
        };
        if !allowed {
            return Err(counters::DROP_SOURCE_DENIED);
        }
    }
    Ok(())
}

/// The full-length trie key of the packet's source in `scope`.
#[inline(always)]
fn source_key(scope: u32, key: &FlowKey) -> Key<SourcePrefix> {
    Key::new(
        source_prefix_len(FAMILY_IPV6, 128),
        SourcePrefix::of_flow_source(scope, key),
    )
}

/// Whether a blocklist entry of `scope` covers the source; counts the packet on the entry.
#[inline(always)]
fn blocked(scope: u32, key: &FlowKey) -> bool {
    let Some(packets) = BLOCKLIST.get(source_key(scope, key)) else {
        return false;
    };
    packets.add_one();
    true
}

/// A packet that would start a new flow of `vip`: admitted within the per-source limit
/// (IPv6 sources per /64), then within the VIP-wide one. `Err` is the drop-reason counter.
///
/// A source's limit is kept in two buckets chosen by hash (see `lb_common::source_slots`),
/// and a new flow must fit in both. Buckets are updated without atomics: two CPUs admitting
/// at the same instant may both pass, so a limit can be exceeded by a flow per CPU.
#[inline(always)]
pub fn limit_new_flow(key: &FlowKey, vip: &VipMeta, seed: u32) -> Result<(), u32> {
    if vip.filter & FILTER_LIMITS == 0 {
        return Ok(());
    }
    let Some(limits) = VIP_LIMITS.get_ptr_mut(vip.vip_id) else {
        return Ok(());
    };
    // SAFETY: array value; see above for concurrent writers.
    let limits = unsafe { &mut *limits };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if limits.source_interval_ns != 0 {
        let [a, b] = source_slots(vip.vip_id, key, seed);
        let (Some(a), Some(b)) = (SOURCE_RATES.get_ptr_mut(a), SOURCE_RATES.get_ptr_mut(b)) else {
            return Ok(());
        };
        let (interval, tolerance) = (limits.source_interval_ns, limits.source_tolerance_ns);
        // SAFETY: array values, each a whole u64 written at once.
        unsafe {
            let next_a = gcra(*a, now, interval, tolerance);
            let next_b = gcra(*b, now, interval, tolerance);
            let (Some(next_a), Some(next_b)) = (next_a, next_b) else {
                return Err(counters::DROP_RATE_LIMITED_SOURCE);
            };
            *a = next_a;
            *b = next_b;
        }
    }
    if limits.total_interval_ns != 0 {
        limits.total_tat_ns = gcra(
            limits.total_tat_ns,
            now,
            limits.total_interval_ns,
            limits.total_tolerance_ns,
        )
        .ok_or(counters::DROP_RATE_LIMITED_TOTAL)?;
    }
    Ok(())
}
