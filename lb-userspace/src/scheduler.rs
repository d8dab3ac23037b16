//! Schedulers: how a VIP's new flows pick a backend, and what its ring area holds for that.
//!
//! * `maglev` (default): the consistent-hash table ([`crate::maglev`]). Every LB with the same
//!   config picks the same backend for a flow, so flows survive moving between LBs.
//! * `round-robin`: one period of smooth weighted round robin (nginx's algorithm, reduced by
//!   the weights' gcd), walked by a per-CPU cursor in the kernel.
//! * `least-conn`: the `(backend id, weight)` list the kernel scans for the fewest active
//!   connections per weight (IPVS's `wlc`), with counts kept on the packet path.
//!
//! Round robin and least-conn are per LB (and per CPU for round robin's turn): two LBs behind
//! ECMP choose independently, so a flow moved to another LB keeps its backend only if that
//! LB's flow table knows it.
//!
//! Least-conn counts are exact on the packet path for flows whose client sends FIN or RST.
//! Two things the kernel cannot see are settled by the daemon's paced flow-table scan
//! ([`reconcile`]): flows idle past `flow_idle_timeout` give their count back, and each count
//! is reset to the number of counted entries found (evictions give their counts back in the
//! data path; this also catches what a race there lost). A count is therefore off by at most the flows that opened
//! or closed on that backend while the scan read the table, until the next scan.

use crate::{
    dataplane::{Dataplane, DataplaneError},
    maglev::{self, MaglevBackend, MaglevError},
    state::{Live, LiveVip},
};
use lb_common::{
    FlowKey, FlowValue, FLOW_COUNTED, MAX_LEAST_CONN_BACKENDS, SCHED_LEAST_CONN, SCHED_MAGLEV,
    SCHED_ROUND_ROBIN,
};
use std::{
    collections::{HashMap, HashSet},
    fmt,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Scheduler {
    #[default]
    Maglev,
    RoundRobin,
    LeastConn,
}

impl Scheduler {
    /// Config spellings, for `scheduler = "..."`.
    pub const CHOICES: [(&'static str, Scheduler); 3] = [
        ("maglev", Scheduler::Maglev),
        ("round-robin", Scheduler::RoundRobin),
        ("least-conn", Scheduler::LeastConn),
    ];

    /// [`lb_common::VipMeta::scheduler`].
    pub fn code(self) -> u8 {
        match self {
            Scheduler::Maglev => SCHED_MAGLEV,
            Scheduler::RoundRobin => SCHED_ROUND_ROBIN,
            Scheduler::LeastConn => SCHED_LEAST_CONN,
        }
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Self::CHOICES
            .iter()
            .find(|(_, s)| s == self)
            .map_or("?", |(name, _)| name);
        f.write_str(name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("{0}")]
    Maglev(#[from] MaglevError),
    #[error(
        "scheduler \"round-robin\": the weights' turn is {len} new flows long (sum of weights / \
         their greatest common divisor), over ring_size {size}; use smaller or rounder weights \
         (e.g. 1, 2, 3 instead of 100, 201, 301) or raise ring_size"
    )]
    TurnTooLong { len: u64, size: u32 },
    #[error(
        "scheduler \"least-conn\" scans at most {max} backends per new flow, and the VIP has \
         {backends}; split the service over several VIPs or use scheduler = \"maglev\""
    )]
    TooManyBackends { backends: usize, max: u32 },
}

/// What [`table`] will refuse for a VIP with these configured weights (every backend counted,
/// weighted or not: weights can be raised at runtime without the file being checked again).
pub fn check(scheduler: Scheduler, weights: &[u32], ring_size: u32) -> Result<(), SchedulerError> {
    match scheduler {
        Scheduler::Maglev => Ok(()),
        Scheduler::RoundRobin => turn_length(weights, ring_size).map(drop),
        Scheduler::LeastConn => least_conn_fits(weights.len()),
    }
}

fn least_conn_fits(backends: usize) -> Result<(), SchedulerError> {
    if backends > MAX_LEAST_CONN_BACKENDS as usize {
        return Err(SchedulerError::TooManyBackends {
            backends,
            max: MAX_LEAST_CONN_BACKENDS,
        });
    }
    Ok(())
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Length of one round-robin turn: sum of the weights over their gcd (0 when all are 0).
fn turn_length(weights: &[u32], ring_size: u32) -> Result<u32, SchedulerError> {
    let divisor = weights.iter().fold(0, |g, w| gcd(g, *w));
    if divisor == 0 {
        return Ok(0);
    }
    let len: u64 = weights.iter().map(|w| u64::from(w / divisor)).sum();
    if len > u64::from(ring_size) {
        return Err(SchedulerError::TurnTooLong {
            len,
            size: ring_size,
        });
    }
    Ok(len as u32)
}

/// What the VIP's ring area holds for `scheduler` (empty: no backend available). The kernel
/// reads `table.len()` slots.
pub fn table(
    scheduler: Scheduler,
    backends: &[MaglevBackend<'_>],
    ring_size: u32,
    seed: u32,
) -> Result<Vec<u32>, SchedulerError> {
    match scheduler {
        Scheduler::Maglev => Ok(maglev::build_table(backends, ring_size, seed)?),
        Scheduler::RoundRobin => round_robin(backends, ring_size),
        Scheduler::LeastConn => {
            let weighted: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
            least_conn_fits(weighted.len())?;
            Ok(weighted.iter().flat_map(|b| [b.id, b.weight]).collect())
        }
    }
}

/// One turn of smooth weighted round robin: each step, every backend gains its weight, the
/// one with the most credit goes next and pays the total. Backends of equal weight alternate
/// and a heavy one is spread through the turn instead of taken in a burst.
fn round_robin(backends: &[MaglevBackend<'_>], ring_size: u32) -> Result<Vec<u32>, SchedulerError> {
    let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
    let len = turn_length(&weights, ring_size)?;
    let divisor = weights.iter().fold(0, |g, w| gcd(g, *w));
    let reduced: Vec<i64> = weights
        .iter()
        .map(|w| i64::from(w.checked_div(divisor).unwrap_or(0)))
        .collect();
    let total: i64 = reduced.iter().sum();
    let mut credit = vec![0i64; backends.len()];
    let mut turn = Vec::with_capacity(len as usize);
    for _ in 0..len {
        for (c, w) in credit.iter_mut().zip(&reduced) {
            *c += w;
        }
        // The first of equal credits: the order of `backends` (by address) breaks ties.
        let (next, _) = credit
            .iter()
            .enumerate()
            .rev()
            .max_by_key(|(_, c)| **c)
            .expect("len > 0 means some backend has a weight");
        credit[next] -= total;
        turn.push(backends[next].id);
    }
    Ok(turn)
}

/// A flow-table scan's verdict on the least-conn counts.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// Counted flows idle for longer than the idle timeout: their count goes back (the entry
    /// is rewritten without [`FLOW_COUNTED`]; the kernel counts it again on its next packet).
    pub idle: Vec<(FlowKey, FlowValue)>,
    /// Backend id -> counted flows that stay counted: what each count should be.
    pub held: HashMap<u32, i64>,
}

fn is_least_conn(vip: &LiveVip) -> bool {
    vip.meta.scheduler == SCHED_LEAST_CONN
}

/// Least-conn: the count the data path compares for backend `id` of `vip` (`None` for other
/// schedulers).
pub fn connections(
    dataplane: &Dataplane,
    vip: &LiveVip,
    id: u32,
) -> Result<Option<i64>, DataplaneError> {
    if !is_least_conn(vip) {
        return Ok(None);
    }
    dataplane.active_conns(id).map(Some)
}

/// After a flow-table scan: idle counted flows give their count back (the entry loses
/// [`FLOW_COUNTED`]), then each least-conn backend's count is set to the counted flows the
/// scan found, which also settles anything the data path's give-backs missed. Counts are corrected
/// with atomic adds, so increments and give-backs from the data path are never lost; only
/// flows opened or closed between the scan and the correction are off, until the next scan.
pub fn settle_counts(
    dataplane: &mut Dataplane,
    live: &Live,
    flows: &[(FlowKey, FlowValue)],
    now_s: u32,
    idle_timeout_s: u32,
) -> Result<(), DataplaneError> {
    let ids: HashSet<u32> = live
        .vips
        .values()
        .filter(|vip| is_least_conn(vip))
        .flat_map(|vip| vip.backends.values().map(|b| b.id))
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    let verdict = reconcile(flows, |id| ids.contains(&id), now_s, idle_timeout_s);
    for (key, mut flow) in verdict.idle {
        flow.state &= !FLOW_COUNTED;
        // Gone meanwhile (evicted, or re-used by a new flow): nothing to rewrite.
        dataplane.update_flow(&key, &flow)?;
    }
    for id in ids {
        let want = verdict.held.get(&id).copied().unwrap_or(0);
        let have = dataplane.active_conns(id)?;
        if have != want {
            dataplane.add_active_conns(id, want - have)?;
        }
    }
    Ok(())
}

/// Sorts the counted flows of the least-conn backends (`counted`) into idle and held.
pub fn reconcile(
    flows: &[(FlowKey, FlowValue)],
    counted: impl Fn(u32) -> bool,
    now_s: u32,
    idle_timeout_s: u32,
) -> Reconciliation {
    let mut result = Reconciliation::default();
    for (key, flow) in flows {
        if flow.state & FLOW_COUNTED == 0 || !counted(flow.backend_id) {
            continue;
        }
        // `last_seen` may be a second ahead of `now_s` (both are truncated); that is "now".
        if now_s.saturating_sub(flow.last_seen) > idle_timeout_s {
            result.idle.push((*key, *flow));
        } else {
            *result.held.entry(flow.backend_id).or_insert(0) += 1;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{FLOW_ACK_SEEN, FLOW_FIN_SEEN};

    /// Backends 10.0.0.1, 10.0.0.2... with ids 1, 2... and the given weights.
    fn build(scheduler: Scheduler, weights: &[u32], size: u32) -> Result<Vec<u32>, SchedulerError> {
        let keys: Vec<String> = (1..=weights.len()).map(|i| format!("10.0.0.{i}")).collect();
        let list: Vec<MaglevBackend> = keys
            .iter()
            .zip(weights)
            .zip(1..)
            .map(|((key, weight), id)| MaglevBackend {
                key: key.as_bytes(),
                id,
                weight: *weight,
            })
            .collect();
        table(scheduler, &list, size, 0)
    }

    #[test]
    fn round_robin_turn_is_smooth_and_exact() {
        // Weights 1:1:2 (given as 100:100:200): the heavy backend every other flow.
        assert_eq!(
            build(Scheduler::RoundRobin, &[100, 100, 200], 65537).unwrap(),
            [3, 1, 2, 3]
        );
        // nginx's classic example, weights 5:1:1.
        assert_eq!(
            build(Scheduler::RoundRobin, &[5, 1, 1], 65537).unwrap(),
            [1, 1, 2, 1, 3, 1, 1]
        );
        // Any window of one turn holds each backend exactly its weight's share.
        let weights = [3, 7, 2, 5];
        let turn = build(Scheduler::RoundRobin, &weights, 65537).unwrap();
        assert_eq!(turn.len(), 17);
        let twice: Vec<u32> = turn.iter().chain(&turn).copied().collect();
        for window in twice.windows(17) {
            for (i, w) in weights.iter().enumerate() {
                let got = window.iter().filter(|id| **id == i as u32 + 1).count();
                assert_eq!(got, *w as usize, "backend {} in {window:?}", i + 1);
            }
        }
    }

    #[test]
    fn round_robin_skips_unweighted_and_empties_without_weights() {
        assert_eq!(
            build(Scheduler::RoundRobin, &[1, 0, 1], 13).unwrap(),
            [1, 3]
        );
        assert!(build(Scheduler::RoundRobin, &[0, 0], 13)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_round_robin_turn_longer_than_the_ring_is_refused() {
        let err = build(Scheduler::RoundRobin, &[100, 201, 301], 13).unwrap_err();
        assert_eq!(err, SchedulerError::TurnTooLong { len: 602, size: 13 });
        assert!(err.to_string().contains("raise ring_size"), "{err}");
        assert_eq!(check(Scheduler::RoundRobin, &[100, 201, 301], 13), Err(err));
        assert_eq!(check(Scheduler::RoundRobin, &[100, 200, 300], 13), Ok(()));
    }

    #[test]
    fn least_conn_lists_weighted_backends_with_their_weights() {
        assert_eq!(
            build(Scheduler::LeastConn, &[100, 0, 50], 13).unwrap(),
            [1, 100, 3, 50]
        );
        let many = vec![1; MAX_LEAST_CONN_BACKENDS as usize + 1];
        let err = build(Scheduler::LeastConn, &many, 65537).unwrap_err();
        assert!(err.to_string().contains("at most 64 backends"), "{err}");
        assert!(check(Scheduler::LeastConn, &many, 65537).is_err());
        assert!(check(Scheduler::LeastConn, &many[1..], 65537).is_ok());
    }

    #[test]
    fn maglev_is_unchanged() {
        let table = build(Scheduler::Maglev, &[1, 1], 13).unwrap();
        assert_eq!(table.len(), 13);
        assert!(build(Scheduler::Maglev, &[1, 1], 12).is_err());
    }

    #[test]
    fn names_round_trip() {
        for (name, scheduler) in Scheduler::CHOICES {
            assert_eq!(scheduler.to_string(), name);
        }
    }

    #[test]
    fn reconcile_gives_idle_counts_back_and_recounts_the_rest() {
        let flow = |port: u16, backend_id: u32, state: u8, last_seen: u32| {
            (
                FlowKey {
                    sport: port,
                    ..FlowKey::default()
                },
                FlowValue {
                    backend_id,
                    last_seen,
                    state,
                    ..FlowValue::default()
                },
            )
        };
        let flows = [
            flow(1, 7, FLOW_ACK_SEEN | FLOW_COUNTED, 100),
            flow(2, 7, FLOW_ACK_SEEN | FLOW_COUNTED, 101), // a second ahead: now
            flow(3, 7, FLOW_ACK_SEEN | FLOW_COUNTED, 30),  // idle
            flow(4, 7, FLOW_ACK_SEEN | FLOW_FIN_SEEN, 100), // closed: gave its count back
            flow(5, 8, FLOW_ACK_SEEN | FLOW_COUNTED, 100),
            flow(6, 9, FLOW_ACK_SEEN | FLOW_COUNTED, 100), // not a least-conn backend
        ];
        let result = reconcile(&flows, |id| id == 7 || id == 8, 100, 60);
        assert_eq!(result.idle, [flows[2]]);
        assert_eq!(result.held, HashMap::from([(7, 2), (8, 1)]));
    }
}
