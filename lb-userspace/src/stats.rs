//! Traffic statistics: totals and rates per VIP and per backend, in the spirit of
//! `ipvsadm -L --stats --rate`.
//!
//! The daemon reads the counter maps every `stats_interval` into a [`Sample`] (plain data, so
//! this module never touches a map and is tested without a kernel) and feeds it to
//! [`Stats::ingest`]. The resulting [`Snapshot`] is what `xdplb stats` prints ([`render_table`]
//! or JSON) and what [`crate::metrics`] exports.
//!
//! Kernel counters can go backwards: a daemon restart that could not adopt the pinned maps
//! re-creates them, and a backend or VIP slot is zeroed before it is reused. As Prometheus does
//! for counter resets, a value lower than the previous one is taken as the increase since the
//! reset, so rates are never negative (or huge, from a wrapped subtraction), and the totals
//! exported here only ever grow while the daemon runs.

use lb_common::{FlowKey, FlowValue, TrafficCounters, FLOW_FIN_SEEN, FLOW_RST_SEEN};
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

/// Counter values read from the maps at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// When the maps were read; rates divide by the time between two samples.
    pub at: Instant,
    /// Global counters summed over CPUs, in [`lb_common::counters::ALL`] order.
    pub global: Vec<u64>,
    pub vips: Vec<VipSample>,
    pub flow_table_entries: u64,
    pub protection: Protection,
    /// nat connections at the last sweep.
    pub nat_connections: u64,
}

/// Edge-protection state that is not per VIP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protection {
    /// Entries of the runtime blocklist (applied or not).
    pub blocklist_entries: u64,
    /// Flows in the flood defence's pinned table (at the last scan).
    pub pinned_flows: u64,
}

/// A VIP's packets dropped by the filter stage, by reason (kernel totals).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drops {
    pub source_denied: u64,
    pub blocked: u64,
    /// Over `new_flows_per_source` or `new_flows_total`.
    pub rate_limited: u64,
}

impl From<lb_common::VipDrops> for Drops {
    fn from(d: lb_common::VipDrops) -> Self {
        Self {
            source_denied: d.source_denied,
            blocked: d.blocked,
            rate_limited: d.rate_limited_source + d.rate_limited_total,
        }
    }
}

impl Drops {
    /// (reason label, count), the `reason` values of `xdplb_vip_dropped_packets_total`.
    pub fn by_reason(&self) -> [(&'static str, u64); 3] {
        [
            ("source_denied", self.source_denied),
            ("blocked", self.blocked),
            ("rate_limited", self.rate_limited),
        ]
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSample {
    /// The configured name; identifies the VIP across samples and is the `vip` metric label.
    pub name: String,
    /// e.g. `192.0.2.10:80/tcp` ([`crate::model::VipAddr`]'s display form).
    pub address: String,
    /// "maglev", "round-robin" or "least-conn".
    pub scheduler: String,
    pub counters: TrafficCounters,
    pub drops: Drops,
    pub backends: Vec<BackendSample>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSample {
    /// The backend's IP address; identifies it within its VIP and is the `backend` label.
    pub address: String,
    pub counters: TrafficCounters,
    /// Flows seen within the idle timeout and not closed ([`active_flows`]).
    pub active_flows: u64,
    /// Drained, and a scan that started after the drain found no active flow
    /// ([`crate::flowscan::FlowScan::drain_complete`]).
    pub drain_complete: bool,
    /// Weight new flows see now: 0 when drained or down.
    pub weight: u32,
    pub configured_weight: u32,
    pub drained: bool,
    /// The health checker's verdict: "up", "down" or "unknown" (not checked yet, or checks
    /// disabled).
    pub health: String,
    /// Whether the backend counts as up: health checks have not marked it down.
    pub up: bool,
    /// Least-conn VIPs: the active connections the data path compares for this backend.
    pub scheduler_connections: Option<i64>,
}

/// Monotonic totals since the counters were created (or since the daemon started, for
/// counters that were reset while it ran).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Packets that matched but were not forwarded (no backend, too big to encapsulate).
    pub not_forwarded: u64,
}

/// Per-second rates over the last sampling interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub packets: f64,
    pub bytes: f64,
    pub new_flows: f64,
    pub not_forwarded: f64,
}

/// Everything `xdplb stats` shows and the metrics endpoint exports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Seconds between the two samples the rates come from; 0 until there are two.
    pub interval_s: f64,
    pub flow_table_entries: u64,
    /// Seconds since the flow-table scan behind the active-flow counts started, when the
    /// snapshot was served (`None`: no scan yet). Scans are paced on large tables.
    #[serde(default)]
    pub active_flows_age_s: Option<f64>,
    #[serde(default)]
    pub protection: Protection,
    /// nat connections holding a port (at the last sweep).
    #[serde(default)]
    pub nat_connections: u64,
    /// Global counters in [`lb_common::counters::ALL`] order.
    pub global: Vec<GlobalStat>,
    pub vips: Vec<VipStats>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GlobalStat {
    /// The counter's label in [`lb_common::counters::ALL`], e.g. `drop_no_backend`.
    pub name: String,
    pub total: u64,
    pub rate: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipStats {
    pub name: String,
    pub address: String,
    pub scheduler: String,
    /// Sum over the backends.
    pub active_flows: u64,
    pub totals: Totals,
    pub rates: Rates,
    /// Filter drops by reason (also counted in `totals.not_forwarded`).
    #[serde(default)]
    pub drops: Drops,
    pub backends: Vec<BackendStats>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStats {
    pub address: String,
    pub weight: u32,
    pub configured_weight: u32,
    pub drained: bool,
    pub health: String,
    pub up: bool,
    pub active_flows: u64,
    /// See [`BackendSample::drain_complete`].
    pub drain_complete: bool,
    /// Least-conn VIPs: the active connections the data path compares for this backend.
    pub scheduler_connections: Option<i64>,
    pub totals: Totals,
    pub rates: Rates,
}

/// One kernel counter turned into a monotonic total.
#[derive(Clone, Copy, Debug)]
struct Monotonic {
    last_raw: u64,
    total: u64,
}

impl Monotonic {
    /// First sight: the kernel value is the count since the counter was created (it survives
    /// daemon restarts when the maps are pinned), so it is the total.
    fn new(raw: u64) -> Self {
        Self {
            last_raw: raw,
            total: raw,
        }
    }

    /// Returns the increase since the previous value.
    fn update(&mut self, raw: u64) -> u64 {
        let delta = if raw >= self.last_raw {
            raw - self.last_raw
        } else {
            // Reset: the counter restarted from zero since the last read.
            raw
        };
        self.last_raw = raw;
        self.total = self.total.saturating_add(delta);
        delta
    }
}

/// The four counters of a VIP or backend.
#[derive(Clone, Copy, Debug)]
struct Traffic([Monotonic; 4]);

impl Traffic {
    fn new(raw: &TrafficCounters) -> Self {
        Self(fields(raw).map(Monotonic::new))
    }

    /// Takes a new reading; returns the rates over `interval_s` (0 = no interval yet).
    fn update(&mut self, raw: &TrafficCounters, interval_s: f64) -> Rates {
        let mut deltas = [0u64; 4];
        for ((counter, raw), delta) in self.0.iter_mut().zip(fields(raw)).zip(&mut deltas) {
            *delta = counter.update(raw);
        }
        let [packets, bytes, new_flows, not_forwarded] = deltas.map(|d| rate(d, interval_s));
        Rates {
            packets,
            bytes,
            new_flows,
            not_forwarded,
        }
    }

    fn totals(&self) -> Totals {
        let [packets, bytes, new_flows, not_forwarded] = self.0.map(|c| c.total);
        Totals {
            packets,
            bytes,
            new_flows,
            not_forwarded,
        }
    }
}

fn fields(c: &TrafficCounters) -> [u64; 4] {
    [c.packets, c.bytes, c.new_flows, c.not_forwarded]
}

fn rate(delta: u64, interval_s: f64) -> f64 {
    if interval_s > 0.0 {
        delta as f64 / interval_s
    } else {
        0.0
    }
}

/// Takes a reading of a VIP or backend seen in the previous sample, or starts tracking it.
fn track<K: Eq + std::hash::Hash>(
    previous: &mut HashMap<K, Traffic>,
    next: &mut HashMap<K, Traffic>,
    key: K,
    raw: &TrafficCounters,
    interval_s: f64,
) -> (Totals, Rates) {
    let (traffic, rates) = match previous.remove(&key) {
        Some(mut traffic) => {
            let rates = traffic.update(raw, interval_s);
            (traffic, rates)
        }
        None => (Traffic::new(raw), Rates::default()),
    };
    let totals = traffic.totals();
    next.insert(key, traffic);
    (totals, rates)
}

/// Turns successive [`Sample`]s into [`Snapshot`]s.
#[derive(Debug, Default)]
pub struct Stats {
    last_at: Option<Instant>,
    global: Vec<Monotonic>,
    /// Keyed by VIP name.
    vips: HashMap<String, Traffic>,
    /// Keyed by (VIP name, backend address).
    backends: HashMap<(String, String), Traffic>,
    snapshot: Snapshot,
}

impl Stats {
    /// Takes a new sample. VIPs and backends absent from it are forgotten: if they come back,
    /// they start over from their kernel values (as a new series would in Prometheus).
    pub fn ingest(&mut self, sample: Sample) -> &Snapshot {
        let interval_s = match self.last_at {
            Some(last) => sample.at.saturating_duration_since(last).as_secs_f64(),
            None => 0.0,
        };
        self.last_at = Some(sample.at);

        let global = lb_common::counters::ALL
            .iter()
            .zip(&sample.global)
            .enumerate()
            .map(|(i, ((name, _), &raw))| {
                let delta = match self.global.get_mut(i) {
                    Some(counter) => counter.update(raw),
                    None => {
                        self.global.push(Monotonic::new(raw));
                        0
                    }
                };
                GlobalStat {
                    name: name.to_string(),
                    total: self.global[i].total,
                    rate: rate(delta, interval_s),
                }
            })
            .collect();

        let mut vips = HashMap::new();
        let mut backends = HashMap::new();
        let vip_stats = sample
            .vips
            .into_iter()
            .map(|vip| {
                let (totals, rates) = track(
                    &mut self.vips,
                    &mut vips,
                    vip.name.clone(),
                    &vip.counters,
                    interval_s,
                );
                let backend_stats: Vec<BackendStats> = vip
                    .backends
                    .into_iter()
                    .map(|b| {
                        let key = (vip.name.clone(), b.address.clone());
                        let (totals, rates) = track(
                            &mut self.backends,
                            &mut backends,
                            key,
                            &b.counters,
                            interval_s,
                        );
                        BackendStats {
                            address: b.address,
                            weight: b.weight,
                            configured_weight: b.configured_weight,
                            drained: b.drained,
                            health: b.health,
                            up: b.up,
                            active_flows: b.active_flows,
                            drain_complete: b.drain_complete,
                            scheduler_connections: b.scheduler_connections,
                            totals,
                            rates,
                        }
                    })
                    .collect();
                VipStats {
                    name: vip.name,
                    address: vip.address,
                    scheduler: vip.scheduler,
                    active_flows: backend_stats.iter().map(|b| b.active_flows).sum(),
                    totals,
                    rates,
                    drops: vip.drops,
                    backends: backend_stats,
                }
            })
            .collect();
        self.vips = vips;
        self.backends = backends;

        self.snapshot = Snapshot {
            interval_s,
            flow_table_entries: sample.flow_table_entries,
            active_flows_age_s: None,
            protection: sample.protection,
            nat_connections: sample.nat_connections,
            global,
            vips: vip_stats,
        };
        &self.snapshot
    }

    /// The snapshot of the last sample (empty before the first).
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
}

/// Active flows per backend id: seen within `idle_timeout_s` and not closed (FIN or RST seen).
/// Closed and idle entries stay in the flow table until a new flow takes their slot, so they are not counted.
pub fn active_flows(
    flows: &[(FlowKey, FlowValue)],
    now_s: u32,
    idle_timeout_s: u32,
) -> HashMap<u32, u64> {
    let mut active = HashMap::new();
    for (_, flow) in flows {
        let closed = flow.state & (FLOW_FIN_SEEN | FLOW_RST_SEEN) != 0;
        // `last_seen` may be a second ahead of `now_s` (both are truncated); that is "now".
        let idle_s = now_s.saturating_sub(flow.last_seen);
        if !closed && idle_s <= idle_timeout_s {
            *active.entry(flow.backend_id).or_insert(0) += 1;
        }
    }
    active
}

/// A duration in whole seconds as the data path's `u32` times compare it (saturating).
pub fn whole_seconds(duration: Duration) -> u32 {
    u32::try_from(duration.as_secs()).unwrap_or(u32::MAX)
}

/// Seconds of `CLOCK_MONOTONIC_COARSE`: the clock and unit of [`FlowValue`]'s times (the kernel
/// reads them through `jiffies`, converted with parameters measured against this clock: see
/// [`crate::clock`]).
pub fn monotonic_seconds() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE exists on every
    // Linux this program can load on, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    // Truncation matches the kernel side, which stores the low 32 bits too.
    ts.tv_sec as u32
}

/// `xdplb stats` as a table: one line per VIP, an indented line per backend.
pub fn render_table(snapshot: &Snapshot) -> String {
    const HEADER: [&str; 9] = [
        "VIP / BACKEND",
        "STATE",
        "WEIGHT",
        "ACTIVE",
        "PKT/S",
        "BYTE/S",
        "NEW/S",
        "PACKETS",
        "BYTES",
    ];
    let mut rows: Vec<[String; 9]> = vec![HEADER.map(String::from)];
    for vip in &snapshot.vips {
        rows.push(traffic_row(
            format!("{} {}", vip.name, vip.address),
            String::new(),
            String::new(),
            vip.active_flows,
            &vip.totals,
            &vip.rates,
        ));
        for b in &vip.backends {
            let mut state = b.health.clone();
            if b.drained {
                state.push_str(",drained");
            }
            // Show the configured weight only when something (drain, down, CLI) overrides it.
            let weight = if b.weight == b.configured_weight {
                b.weight.to_string()
            } else {
                format!("{}/{}", b.weight, b.configured_weight)
            };
            rows.push(traffic_row(
                format!("  -> {}", b.address),
                state,
                weight,
                b.active_flows,
                &b.totals,
                &b.rates,
            ));
        }
    }

    let mut widths = [0usize; 9];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            // Text columns (entry, state) read left-aligned, numbers right-aligned.
            let _ = match i {
                0 => write!(line, "{cell:<width$}"),
                1 => write!(line, "  {cell:<width$}"),
                _ => write!(line, "  {cell:>width$}"),
            };
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for vip in snapshot.vips.iter().filter(|v| v.drops != Drops::default()) {
        let reasons: Vec<String> = vip
            .drops
            .by_reason()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(reason, n)| format!("{} {reason}", human(*n as f64)))
            .collect();
        let _ = writeln!(out, "{} filtered: {}", vip.name, reasons.join(", "));
    }
    let dropped: u64 = snapshot.vips.iter().map(|v| v.totals.not_forwarded).sum();
    let age = scan_age(snapshot.active_flows_age_s);
    let _ = writeln!(
        out,
        "flow table: {} entries; {}not forwarded: {} packets; rates over {:.1} s",
        snapshot.flow_table_entries,
        if age.is_empty() {
            String::new()
        } else {
            format!("active flows{age}; ")
        },
        human(dropped as f64),
        snapshot.interval_s
    );
    let total = |name: &str| {
        snapshot
            .global
            .iter()
            .find(|g| g.name == name)
            .map_or(0, |g| g.total)
    };
    let (new, exhausted) = (total("nat_new"), total("drop_nat_exhausted"));
    if snapshot.nat_connections > 0 || new > 0 || exhausted > 0 {
        let _ = writeln!(
            out,
            "nat: {} connections (at the last sweep); {} given a port, {} dropped for want of one",
            snapshot.nat_connections,
            human(new as f64),
            human(exhausted as f64)
        );
    }
    out
}

/// Active-flow counts at least this old are shown with their age: younger ones are as fresh
/// as the default stats interval makes them.
const STALE_AFTER_S: f64 = 2.0;

/// " (counted 8.3 s ago)" when the counts are stale enough to matter, else "".
pub fn scan_age(age_s: Option<f64>) -> String {
    match age_s {
        Some(age) if age >= STALE_AFTER_S => format!(" (counted {age:.1} s ago)"),
        Some(_) => String::new(),
        None => " (not counted yet)".into(),
    }
}

fn traffic_row(
    entry: String,
    state: String,
    weight: String,
    active_flows: u64,
    totals: &Totals,
    rates: &Rates,
) -> [String; 9] {
    [
        entry,
        state,
        weight,
        active_flows.to_string(),
        human(rates.packets),
        format!("{}B", human(rates.bytes)),
        human(rates.new_flows),
        human(totals.packets as f64),
        format!("{}B", human(totals.bytes as f64)),
    ]
}

/// SI units with one decimal, as ipvsadm prints large numbers: `500`, `0.5`, `12.3k`, `1.2M`.
fn human(value: f64) -> String {
    const UNITS: [&str; 7] = ["", "k", "M", "G", "T", "P", "E"];
    let mut value = value;
    let mut unit = 0;
    // 999.95 and up would print as "1000.0": go to the next unit instead.
    while value >= 999.95 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 && value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{counters, FLOW_SYN_SEEN};

    fn traffic(packets: u64, bytes: u64, new_flows: u64, not_forwarded: u64) -> TrafficCounters {
        TrafficCounters {
            packets,
            bytes,
            new_flows,
            not_forwarded,
        }
    }

    fn backend(address: &str, counters: TrafficCounters) -> BackendSample {
        BackendSample {
            address: address.into(),
            counters,
            active_flows: 0,
            drain_complete: false,
            weight: 100,
            configured_weight: 100,
            drained: false,
            health: "up".into(),
            up: true,
            scheduler_connections: None,
        }
    }

    fn sample(at: Instant, vip: TrafficCounters, backend_counters: TrafficCounters) -> Sample {
        Sample {
            at,
            global: vec![0; counters::COUNT as usize],
            vips: vec![VipSample {
                name: "web".into(),
                address: "192.0.2.10:80/tcp".into(),
                scheduler: "maglev".into(),
                counters: vip,
                drops: Drops::default(),
                backends: vec![backend("10.0.0.1", backend_counters)],
            }],
            flow_table_entries: 0,
            protection: Protection::default(),
            nat_connections: 0,
        }
    }

    #[test]
    fn first_sample_has_totals_and_zero_rates() {
        let mut stats = Stats::default();
        let snap = stats.ingest(sample(
            Instant::now(),
            traffic(10, 1000, 2, 1),
            traffic(9, 900, 2, 0),
        ));
        assert_eq!(snap.interval_s, 0.0);
        let vip = &snap.vips[0];
        assert_eq!(
            vip.totals,
            Totals {
                packets: 10,
                bytes: 1000,
                new_flows: 2,
                not_forwarded: 1
            }
        );
        assert_eq!(vip.rates, Rates::default());
        assert_eq!(vip.backends[0].totals.packets, 9);
        assert_eq!(vip.backends[0].rates, Rates::default());
        assert!(snap.global.iter().all(|g| g.rate == 0.0));
    }

    #[test]
    fn rates_from_two_samples() {
        let mut stats = Stats::default();
        let t0 = Instant::now();
        stats.ingest(sample(t0, traffic(0, 0, 0, 0), traffic(0, 0, 0, 0)));
        let mut second = sample(
            t0 + Duration::from_secs(2),
            traffic(1000, 64_000, 10, 4),
            traffic(1000, 64_000, 10, 0),
        );
        second.global[counters::DROP_NO_BACKEND as usize] = 4;
        let snap = stats.ingest(second);
        assert_eq!(snap.interval_s, 2.0);
        let vip = &snap.vips[0];
        assert_eq!(
            vip.rates,
            Rates {
                packets: 500.0,
                bytes: 32_000.0,
                new_flows: 5.0,
                not_forwarded: 2.0
            }
        );
        assert_eq!(vip.backends[0].rates.packets, 500.0);
        assert_eq!(vip.backends[0].totals.packets, 1000);
        let drop = &snap.global[counters::DROP_NO_BACKEND as usize];
        assert_eq!(
            (drop.name.as_str(), drop.total, drop.rate),
            ("drop_no_backend", 4, 2.0)
        );
    }

    #[test]
    fn counter_reset_counts_the_new_value_and_totals_stay_monotonic() {
        let mut stats = Stats::default();
        let t0 = Instant::now();
        let mut s = sample(
            t0,
            traffic(5000, 500_000, 50, 0),
            traffic(5000, 500_000, 50, 0),
        );
        s.global[counters::ACTION_TX as usize] = 5000;
        stats.ingest(s);
        // Maps re-created (or the backend slot zeroed): the counters restarted and reached 300.
        let mut s = sample(
            t0 + Duration::from_secs(1),
            traffic(300, 30_000, 3, 0),
            traffic(300, 30_000, 3, 0),
        );
        s.global[counters::ACTION_TX as usize] = 300;
        let snap = stats.ingest(s).clone();
        let b = &snap.vips[0].backends[0];
        assert_eq!(b.rates.packets, 300.0);
        assert_eq!(b.rates.bytes, 30_000.0);
        assert_eq!(b.totals.packets, 5300);
        assert_eq!(snap.vips[0].totals.new_flows, 53);
        let tx = &snap.global[counters::ACTION_TX as usize];
        assert_eq!((tx.total, tx.rate), (5300, 300.0));

        // And counting continues from the new value.
        let snap = stats.ingest(sample(
            t0 + Duration::from_secs(2),
            traffic(400, 40_000, 4, 0),
            traffic(400, 40_000, 4, 0),
        ));
        let b = &snap.vips[0].backends[0];
        assert_eq!((b.totals.packets, b.rates.packets), (5400, 100.0));
    }

    #[test]
    fn removed_backends_are_forgotten_and_new_ones_start_without_a_rate() {
        let mut stats = Stats::default();
        let t0 = Instant::now();
        stats.ingest(sample(t0, traffic(10, 10, 1, 0), traffic(10, 10, 1, 0)));
        let mut s = sample(
            t0 + Duration::from_secs(1),
            traffic(20, 20, 2, 0),
            traffic(7, 7, 1, 0),
        );
        s.vips[0].backends[0].address = "10.0.0.2".into();
        let snap = stats.ingest(s);
        let b = &snap.vips[0].backends[0];
        assert_eq!((b.address.as_str(), b.totals.packets), ("10.0.0.2", 7));
        assert_eq!(b.rates, Rates::default());
        assert_eq!(snap.vips[0].rates.packets, 10.0);
        assert_eq!(stats.backends.len(), 1);
    }

    #[test]
    fn same_instant_gives_zero_rates_not_infinity() {
        let mut stats = Stats::default();
        let t0 = Instant::now();
        stats.ingest(sample(t0, traffic(0, 0, 0, 0), traffic(0, 0, 0, 0)));
        let snap = stats.ingest(sample(t0, traffic(10, 10, 1, 0), traffic(10, 10, 1, 0)));
        assert_eq!(snap.vips[0].rates, Rates::default());
        assert_eq!(snap.vips[0].totals.packets, 10);
    }

    #[test]
    fn active_flows_excludes_idle_and_closed() {
        let flow = |backend_id, last_seen, state| {
            (
                FlowKey::default(),
                FlowValue {
                    backend_id,
                    created: 0,
                    last_seen,
                    state,
                    _pad: [0; 3],
                    hash: 0,
                },
            )
        };
        let now = 1000;
        let flows = [
            flow(1, 1000, FLOW_SYN_SEEN),
            flow(1, 940, 0),  // idle exactly the timeout: active
            flow(1, 939, 0),  // idle too long
            flow(1, 1001, 0), // a second ahead (truncation): active
            flow(2, 999, FLOW_SYN_SEEN | FLOW_FIN_SEEN), // closing
            flow(2, 999, FLOW_RST_SEEN), // reset
            flow(3, 999, 0),
        ];
        let active = active_flows(&flows, now, 60);
        assert_eq!(active, HashMap::from([(1, 3), (3, 1)]));
    }

    #[test]
    fn monotonic_seconds_counts_from_boot() {
        let now = monotonic_seconds();
        assert!(monotonic_seconds() >= now);
        // CLOCK_MONOTONIC stops during suspend and /proc/uptime does not: never ahead of it.
        let uptime = std::fs::read_to_string("/proc/uptime").unwrap();
        let uptime: f64 = uptime.split_whitespace().next().unwrap().parse().unwrap();
        assert!(f64::from(now) <= uptime + 1.0, "{now} > {uptime}");
    }

    fn fixed_snapshot() -> Snapshot {
        let rates = |packets, bytes, new_flows| Rates {
            packets,
            bytes,
            new_flows,
            not_forwarded: 0.0,
        };
        let totals = |packets, bytes, new_flows, not_forwarded| Totals {
            packets,
            bytes,
            new_flows,
            not_forwarded,
        };
        Snapshot {
            interval_s: 1.0,
            flow_table_entries: 1523,
            active_flows_age_s: Some(0.5),
            protection: Protection::default(),
            nat_connections: 0,
            global: vec![],
            vips: vec![
                VipStats {
                    name: "web".into(),
                    address: "192.0.2.10:80/tcp".into(),
                    scheduler: "maglev".into(),
                    active_flows: 1500,
                    totals: totals(123_456_789, 98_765_432_100, 54_321, 12),
                    rates: rates(12_345.0, 9_876_543.0, 120.5),
                    drops: Drops {
                        source_denied: 12,
                        blocked: 0,
                        rate_limited: 1_500,
                    },
                    backends: vec![
                        BackendStats {
                            address: "10.0.0.1".into(),
                            weight: 100,
                            configured_weight: 100,
                            drained: false,
                            health: "up".into(),
                            up: true,
                            active_flows: 1480,
                            drain_complete: false,
                            scheduler_connections: None,
                            totals: totals(100_000_000, 80_000_000_000, 50_000, 0),
                            rates: rates(12_000.0, 9_600_000.0, 120.5),
                        },
                        BackendStats {
                            address: "10.0.0.2".into(),
                            weight: 0,
                            configured_weight: 100,
                            drained: true,
                            health: "up".into(),
                            up: true,
                            active_flows: 20,
                            drain_complete: false,
                            scheduler_connections: None,
                            totals: totals(23_456_789, 18_765_432_100, 4_321, 0),
                            rates: rates(345.0, 276_543.0, 0.0),
                        },
                        BackendStats {
                            address: "10.0.0.3".into(),
                            weight: 0,
                            configured_weight: 50,
                            drained: false,
                            health: "down".into(),
                            up: false,
                            active_flows: 0,
                            drain_complete: false,
                            scheduler_connections: None,
                            totals: totals(0, 0, 0, 0),
                            rates: Rates::default(),
                        },
                    ],
                },
                VipStats {
                    name: "dns".into(),
                    address: "[2001:db8::53]:53/udp".into(),
                    scheduler: "maglev".into(),
                    active_flows: 7,
                    totals: totals(999, 64_000, 7, 0),
                    rates: rates(0.5, 32.0, 0.5),
                    drops: Drops::default(),
                    backends: vec![BackendStats {
                        address: "2001:db8::1:53".into(),
                        weight: 1,
                        configured_weight: 1,
                        drained: false,
                        health: "unknown".into(),
                        up: true,
                        active_flows: 7,
                        drain_complete: false,
                        scheduler_connections: None,
                        totals: totals(999, 64_000, 7, 0),
                        rates: rates(0.5, 32.0, 0.5),
                    }],
                },
            ],
        }
    }

    #[test]
    fn table_rows_are_aligned() {
        let table = render_table(&fixed_snapshot());
        let expected = "\
VIP / BACKEND              STATE       WEIGHT  ACTIVE  PKT/S   BYTE/S  NEW/S  PACKETS   BYTES
web 192.0.2.10:80/tcp                            1500  12.3k    9.9MB  120.5   123.5M  98.8GB
  -> 10.0.0.1              up             100    1480  12.0k    9.6MB  120.5   100.0M  80.0GB
  -> 10.0.0.2              up,drained   0/100      20    345  276.5kB      0    23.5M  18.8GB
  -> 10.0.0.3              down          0/50       0      0       0B      0        0      0B
dns [2001:db8::53]:53/udp                           7    0.5      32B    0.5      999  64.0kB
  -> 2001:db8::1:53        unknown          1       7    0.5      32B    0.5      999  64.0kB
web filtered: 12 source_denied, 1.5k rate_limited
flow table: 1523 entries; not forwarded: 12 packets; rates over 1.0 s
";
        assert_eq!(table, expected, "\n{table}");
        assert!(table.lines().all(|l| l.len() <= 100));
    }

    #[test]
    fn nat_gets_a_line_only_when_used() {
        let mut snap = fixed_snapshot();
        assert!(!render_table(&snap).contains("nat:"));
        snap.nat_connections = 12;
        snap.global = vec![
            GlobalStat {
                name: "nat_new".into(),
                total: 1500,
                rate: 0.0,
            },
            GlobalStat {
                name: "drop_nat_exhausted".into(),
                total: 3,
                rate: 0.0,
            },
        ];
        let table = render_table(&snap);
        assert!(
            table.contains("nat: 12 connections (at the last sweep); 1.5k given a port, 3 dropped for want of one"),
            "{table}"
        );
    }

    #[test]
    fn scan_ages_are_shown_when_they_matter() {
        assert_eq!(scan_age(Some(0.7)), "");
        assert_eq!(scan_age(Some(10.04)), " (counted 10.0 s ago)");
        assert_eq!(scan_age(None), " (not counted yet)");
    }

    #[test]
    fn human_units() {
        assert_eq!(human(0.0), "0");
        assert_eq!(human(500.0), "500");
        assert_eq!(human(0.25), "0.2");
        assert_eq!(human(999.96), "1.0k");
        assert_eq!(human(1_234_567.0), "1.2M");
        assert_eq!(human(u64::MAX as f64), "18.4E");
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let snap = fixed_snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        assert!(json.contains(r#""health":"unknown""#), "{json}");
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
    }
}
