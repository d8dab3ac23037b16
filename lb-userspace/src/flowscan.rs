//! Active flows per backend, from paced scans of the flow table, and when they can be trusted.
//!
//! Reading the whole flow table holds the daemon's lock for about half a second per million
//! entries, so it is read every stats interval only up to [`FLOWS_PER_SCAN_PERIOD`] entries,
//! and less often above. A count is therefore a fact about the flows that existed when its scan
//! started, never about later ones: a connection opened just before a drain, after the last
//! scan, is invisible until the next. So "this drained backend has no active flow" is only
//! true when the scan that found none started after the drain took effect
//! ([`FlowScan::drain_complete`]); `drain --wait` waits for exactly that, and a drain makes
//! the next stats sample scan, so the wait is one stats interval at most beyond the flows'
//! own end.

use anyhow::Result;
use lb_common::{FlowKey, FlowValue};
use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::stats;

/// Flow-table entries one stats interval may scan: a larger table is scanned every
/// `entries / FLOWS_PER_SCAN_PERIOD + 1` intervals.
pub const FLOWS_PER_SCAN_PERIOD: usize = 100_000;

/// Time after a drain's map writes during which a packet that read the old ring may still
/// insert a flow for the drained backend: an XDP run (an RCU read section, microseconds) that
/// began before the switch. A scan must start after it for its count to include such a flow.
const IN_FLIGHT: Duration = Duration::from_millis(20);

/// The last scan's findings, and when drains took effect.
#[derive(Debug)]
pub struct FlowScan {
    /// Backend id -> flows seen within the idle timeout and not closed.
    active: HashMap<u32, u64>,
    entries: u64,
    /// Samples to skip before the next scan.
    countdown: u32,
    /// When the last scan started; `None` before the first.
    last_started: Option<Instant>,
    /// When drains requested from this daemon took effect, per (VIP name, backend address).
    drains: HashMap<(String, IpAddr), Instant>,
    /// Drains older than this daemon (persisted overrides) took effect before any of its
    /// scans: its first map writes, after this instant, applied them.
    created: Instant,
}

impl Default for FlowScan {
    fn default() -> Self {
        Self {
            active: HashMap::new(),
            entries: 0,
            countdown: 0,
            last_started: None,
            drains: HashMap::new(),
            created: Instant::now(),
        }
    }
}

impl FlowScan {
    /// Scans the flow table read by `read` when a scan is due: every call up to
    /// [`FLOWS_PER_SCAN_PERIOD`] entries, then less often (a million flows take about half a
    /// second to read), so counts may be ~10 s old on huge tables ([`Self::age`] says).
    /// Returns the entries it read when it scanned, for other per-scan work (least-conn's
    /// count settling).
    pub fn scan_if_due(
        &mut self,
        read: impl FnOnce() -> Result<Vec<(FlowKey, FlowValue)>>,
        idle_timeout: Duration,
    ) -> Result<Option<Vec<(FlowKey, FlowValue)>>> {
        if self.countdown > 0 {
            self.countdown -= 1;
            return Ok(None);
        }
        let started = Instant::now();
        let flows = read()?;
        self.active = stats::active_flows(
            &flows,
            stats::monotonic_seconds(),
            stats::whole_seconds(idle_timeout),
        );
        self.entries = flows.len() as u64;
        self.countdown = (flows.len() / FLOWS_PER_SCAN_PERIOD) as u32;
        // A drain this scan started too early for still waits for one: not paced.
        if self
            .drains
            .values()
            .any(|&took_effect| took_effect > started)
        {
            self.countdown = 0;
        }
        self.last_started = Some(started);
        Ok(Some(flows))
    }

    /// Active flows of a backend id in the last scan.
    pub fn active(&self, backend_id: u32) -> u64 {
        self.active.get(&backend_id).copied().unwrap_or(0)
    }

    /// Flow-table entries in the last scan, active or not.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// How old the active-flow counts are: time since the last scan started.
    pub fn age(&self) -> Option<Duration> {
        self.last_started.map(|started| started.elapsed())
    }

    /// Records that a drain of `backend` in `vip` just took effect (its map writes are
    /// done), and makes the next call to [`Self::scan_if_due`] scan, so the wait for a
    /// trustworthy count is not paced. A repeated drain counts from the latest request.
    pub fn drained(&mut self, vip: &str, backend: IpAddr) {
        self.drains
            .insert((vip.to_owned(), backend), Instant::now() + IN_FLIGHT);
        self.countdown = 0;
    }

    pub fn undrained(&mut self, vip: &str, backend: IpAddr) {
        self.drains.remove(&(vip.to_owned(), backend));
    }

    /// Whether drained `backend` (live id `backend_id`; `None` when it is not in the maps)
    /// has no active flow according to a scan that started after its drain took effect.
    /// The caller checks that the backend is drained.
    pub fn drain_complete(&self, vip: &str, backend: IpAddr, backend_id: Option<u32>) -> bool {
        let took_effect = self
            .drains
            .get(&(vip.to_owned(), backend))
            .copied()
            .unwrap_or(self.created);
        let counted_after = self
            .last_started
            .is_some_and(|started| started >= took_effect);
        counted_after && backend_id.is_none_or(|id| self.active(id) == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::FLOW_FIN_SEEN;

    fn flow(backend_id: u32, state: u8) -> (FlowKey, FlowValue) {
        let now = stats::monotonic_seconds();
        (
            FlowKey::default(),
            FlowValue {
                backend_id,
                created: now,
                last_seen: now,
                state,
                _pad: [0; 3],
                hash: 0,
            },
        )
    }

    const IDLE: Duration = Duration::from_secs(60);
    const WEB: &str = "web";

    fn backend() -> IpAddr {
        IpAddr::from([10, 0, 0, 13])
    }

    #[test]
    fn a_scan_from_before_the_drain_proves_nothing() {
        let mut scan = FlowScan::default();
        // The last periodic scan ran before the client connected: no flow on backend 3.
        scan.scan_if_due(|| Ok(vec![]), IDLE).unwrap();
        assert_eq!(scan.active(3), 0);
        scan.drained(WEB, backend());
        assert!(
            !scan.drain_complete(WEB, backend(), Some(3)),
            "a count older than the drain was trusted"
        );
        // The next scan starts after the drain took effect and sees the download.
        std::thread::sleep(IN_FLIGHT);
        scan.scan_if_due(|| Ok(vec![flow(3, 0)]), IDLE).unwrap();
        assert_eq!(scan.active(3), 1);
        assert!(!scan.drain_complete(WEB, backend(), Some(3)));
        // The download ended (FIN): the following scan completes the drain.
        scan.scan_if_due(|| Ok(vec![flow(3, FLOW_FIN_SEEN)]), IDLE)
            .unwrap();
        assert!(scan.drain_complete(WEB, backend(), Some(3)));
        // Undrained, then drained again: a new scan is needed.
        scan.undrained(WEB, backend());
        scan.drained(WEB, backend());
        assert!(!scan.drain_complete(WEB, backend(), Some(3)));
    }

    #[test]
    fn a_drain_makes_the_next_sample_scan_even_when_paced() {
        let mut scan = FlowScan::default();
        let big = vec![flow(1, 0); 2 * FLOWS_PER_SCAN_PERIOD + 1];
        scan.scan_if_due(|| Ok(big), IDLE).unwrap();
        let reads = std::cell::Cell::new(0);
        let empty_table = || {
            reads.set(reads.get() + 1);
            Ok(vec![])
        };
        scan.scan_if_due(empty_table, IDLE).unwrap();
        assert_eq!(reads.get(), 0, "a 200k-entry table is paced");
        scan.drained(WEB, backend());
        let bigger = 3 * FLOWS_PER_SCAN_PERIOD + 1;
        scan.scan_if_due(|| Ok(vec![flow(1, 0); bigger]), IDLE)
            .unwrap();
        assert_eq!(
            scan.entries(),
            bigger as u64,
            "the sample after a drain scans"
        );
        assert!(
            !scan.drain_complete(WEB, backend(), Some(3)),
            "a scan within IN_FLIGHT of the drain counted"
        );
        scan.scan_if_due(empty_table, IDLE).unwrap();
        assert_eq!(
            reads.get(),
            1,
            "a drain still waiting for a scan is not paced"
        );
    }

    #[test]
    fn drains_older_than_the_daemon_count_from_its_first_scan() {
        let mut scan = FlowScan::default();
        assert!(
            !scan.drain_complete(WEB, backend(), Some(3)),
            "no scan yet: nothing is known"
        );
        scan.scan_if_due(|| Ok(vec![flow(4, 0)]), IDLE).unwrap();
        assert!(scan.drain_complete(WEB, backend(), Some(3)));
        assert!(!scan.drain_complete(WEB, IpAddr::from([10, 0, 0, 14]), Some(4)));
        // A backend not in the maps (unresolved) has no flow to wait for.
        assert!(scan.drain_complete(WEB, backend(), None));
        assert!(scan.age().unwrap() < Duration::from_secs(5));
    }
}
