//! Flood defence, userspace side (the kernel side is lb-ebpf/src/flood.rs): the pin budget
//! (`[daemon] pinned_flows_per_second`) and the expiry of pinned flows, which the data path
//! never evicts. Expiry runs with the flow-table scan, so it is paced the same way.

use crate::{
    config::{Problems, Reported, Table},
    dataplane::{Dataplane, DataplaneError},
};
use lb_common::{FloodState, FlowKey, FlowValue, FLOW_FIN_SEEN, FLOW_RST_SEEN};
use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

const NS_PER_S: u64 = 1_000_000_000;
/// A closed flow (FIN or RST seen) stays pinned this long after its last packet, for the
/// last ACKs and retransmissions.
const CLOSED_GRACE_S: u32 = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FloodSpec {
    /// Flows pinned per second at most, with bursts of one second's worth: how fast a flood
    /// can fill the pinned table.
    pub pins_per_second: u32,
}

impl FloodSpec {
    /// Default: a 64th of the table per second, so a flood needs over a minute to fill the
    /// table, while an LB's real connection rate is pinned.
    pub fn default_for(flow_table_size: u32) -> Self {
        Self {
            pins_per_second: (flow_table_size / 64).max(1000),
        }
    }

    pub fn state(&self) -> FloodState {
        let interval = NS_PER_S / u64::from(self.pins_per_second);
        FloodState {
            pin_interval_ns: interval,
            pin_tolerance_ns: interval * u64::from(self.pins_per_second),
            tat_ns: 0,
        }
    }
}

/// Reads `pinned_flows_per_second` of `[daemon]`.
pub(crate) fn read(
    t: &Table,
    p: &mut Problems,
    flow_table_size: u32,
) -> Result<FloodSpec, Reported> {
    Ok(t.int(p, "pinned_flows_per_second", 1..=100_000_000u32)?
        .map(|pins_per_second| FloodSpec { pins_per_second })
        .unwrap_or_else(|| FloodSpec::default_for(flow_table_size)))
}

/// Pinned flows to forget: idle longer than `idle_timeout` (by their flow-table entry when it
/// is still there, else by the time they were pinned or restored), or closed and idle for
/// [`CLOSED_GRACE_S`].
pub fn expired(
    pinned: &[(FlowKey, FlowValue)],
    flows: &HashMap<FlowKey, FlowValue>,
    now_s: u32,
    idle_timeout: Duration,
) -> Vec<FlowKey> {
    let idle_timeout = crate::stats::whole_seconds(idle_timeout);
    pinned
        .iter()
        .filter(|(key, pinned)| {
            let current = flows.get(key).unwrap_or(pinned);
            let idle = now_s.saturating_sub(current.last_seen.max(pinned.last_seen));
            let closed = current.state & (FLOW_FIN_SEEN | FLOW_RST_SEEN) != 0;
            idle > idle_timeout || (closed && idle > CLOSED_GRACE_S)
        })
        .map(|(key, _)| *key)
        .collect()
}

/// What the last expiry pass saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinnedScan {
    /// Pinned flows left after the pass.
    pub entries: u64,
    /// Pinned flows expired since the daemon started.
    pub expired_total: u64,
}

/// The flows a scan counts: the flow table's entries, plus pinned flows a flood evicted from
/// it (their next packet restores them, so they are as alive as the others: active flows,
/// drains and least-conn counts must see them).
pub fn with_pinned_only(
    mut flows: Vec<(FlowKey, FlowValue)>,
    pinned: &[(FlowKey, FlowValue)],
) -> Vec<(FlowKey, FlowValue)> {
    let in_table: HashSet<FlowKey> = flows.iter().map(|(key, _)| *key).collect();
    flows.extend(pinned.iter().filter(|(key, _)| !in_table.contains(key)));
    flows
}

impl PinnedScan {
    /// Unpins what [`expired`] says of `pinned` (the pinned table), given `flows` (the
    /// flow scan's entries).
    pub fn run(
        &mut self,
        dataplane: &mut Dataplane,
        pinned: &[(FlowKey, FlowValue)],
        flows: &[(FlowKey, FlowValue)],
        now_s: u32,
        idle_timeout: Duration,
    ) -> Result<(), DataplaneError> {
        let flows: HashMap<FlowKey, FlowValue> = flows.iter().copied().collect();
        let gone = expired(pinned, &flows, now_s, idle_timeout);
        for key in &gone {
            dataplane.unpin_flow(key)?;
        }
        self.entries = (pinned.len() - gone.len()) as u64;
        self.expired_total += gone.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{FLOW_ACK_SEEN, FLOW_PINNED};

    fn flow(port: u16) -> FlowKey {
        FlowKey {
            sport: port,
            ..FlowKey::default()
        }
    }

    fn value(last_seen: u32, state: u8) -> FlowValue {
        FlowValue {
            last_seen,
            state: state | FLOW_PINNED,
            ..FlowValue::default()
        }
    }

    #[test]
    fn idle_and_closed_pins_expire_active_ones_stay() {
        let now = 1000;
        let pinned = vec![
            (flow(1), value(990, FLOW_ACK_SEEN)),
            (flow(2), value(100, FLOW_ACK_SEEN)),
            (flow(3), value(100, FLOW_ACK_SEEN)),
            (flow(4), value(900, FLOW_ACK_SEEN)),
        ];
        let flows: HashMap<FlowKey, FlowValue> = [
            // Pinned long ago but busy in the flow table: stays.
            (flow(3), value(999, FLOW_ACK_SEEN)),
            // Closed 100 s ago: goes.
            (flow(4), value(900, FLOW_ACK_SEEN | FLOW_FIN_SEEN)),
        ]
        .into();
        let gone = expired(&pinned, &flows, now, Duration::from_secs(300));
        assert_eq!(gone, vec![flow(2), flow(4)]);
    }

    #[test]
    fn a_scan_counts_pinned_flows_the_flow_table_lost() {
        let flows = vec![(flow(1), value(990, FLOW_ACK_SEEN))];
        let pinned = vec![
            (flow(1), value(900, FLOW_ACK_SEEN)),
            (flow(2), value(950, FLOW_ACK_SEEN)),
        ];
        // Flow 1 is in the table (its entry wins); flow 2 was evicted but comes back.
        assert_eq!(
            with_pinned_only(flows, &pinned),
            vec![
                (flow(1), value(990, FLOW_ACK_SEEN)),
                (flow(2), value(950, FLOW_ACK_SEEN)),
            ]
        );
    }

    #[test]
    fn the_budget_is_one_second_of_the_rate() {
        let state = FloodSpec {
            pins_per_second: 1000,
        }
        .state();
        assert_eq!(state.pin_interval_ns, 1_000_000);
        assert_eq!(state.pin_tolerance_ns, NS_PER_S);
        assert_eq!(FloodSpec::default_for(1 << 20).pins_per_second, 16384);
        assert_eq!(FloodSpec::default_for(4096).pins_per_second, 1000);
    }
}
