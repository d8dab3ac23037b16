//! Prometheus metrics: the exposition ([`render`]) and the HTTP endpoint ([`serve`]).
//!
//! Every scrape encodes a [`Registry`] built from the latest [`Snapshot`] (traffic values are
//! sampled by [`crate::stats`], not counted here) plus the long-lived [`HealthMetrics`] the
//! health checker updates. The output is OpenMetrics text, as prometheus-client writes it:
//! counter families are declared without their `_total` suffix (`# TYPE
//! xdplb_backend_packets counter`) and their samples carry it (`xdplb_backend_packets_total`).
//! docs/metrics.md lists every metric; a test keeps it in step with this file.

use crate::{connlog::LogCounters, stats::Snapshot};
use axum::{
    http::{header, StatusCode},
    routing::get,
    Router,
};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet, EncodeMetric, MetricEncoder},
    metrics::{
        counter::ConstCounter, family::Family, gauge::ConstGauge, histogram::Histogram, info::Info,
        MetricType, TypedMetric,
    },
    registry::Registry,
};
use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    sync::{atomic::Ordering, Arc, Mutex, MutexGuard},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

/// Connections `/metrics` and `/healthz` serve at once: a scraper or a load balancer's probe
/// needs one or two; more wait in the kernel's backlog instead of costing descriptors.
pub const MAX_CONNECTIONS: usize = 32;

/// The `Content-Type` of what [`render`] produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How the global counters of [`lb_common::counters::ALL`] are exported: every counter whose
/// label starts with `prefix` becomes one sample of `family`, labelled `label` = the rest of
/// its name (`drop_no_backend` -> `xdplb_packets_dropped_total{reason="no_backend"}`). A new
/// kernel counter with one of these prefixes is exported without touching this file; a new
/// prefix fails the `every_global_counter_is_exported` test.
const GLOBAL_FAMILIES: [GlobalFamily; 9] = [
    GlobalFamily {
        prefix: "action_",
        family: "xdplb_xdp_actions",
        label: "action",
        help: "Verdicts returned by the XDP programs, by action",
    },
    GlobalFamily {
        prefix: "pass_",
        family: "xdplb_packets_passed",
        label: "reason",
        help: "Packets passed to the kernel stack instead of balanced, by reason",
    },
    GlobalFamily {
        prefix: "drop_",
        family: "xdplb_packets_dropped",
        label: "reason",
        help: "Packets dropped by the XDP program, by reason",
    },
    GlobalFamily {
        prefix: "flow_",
        family: "xdplb_flow_lookups",
        label: "result",
        help: "Flow-table lookups and inserts, by result",
    },
    GlobalFamily {
        prefix: "decap_",
        family: "xdplb_decap_packets",
        label: "result",
        help: "Tunnel packets seen by the decap program, by result",
    },
    GlobalFamily {
        prefix: "icmp_",
        family: "xdplb_icmp_packets",
        label: "result",
        help: "ICMP about VIP traffic handled in XDP: errors forwarded to backends, too-big replies sent",
    },
    GlobalFamily {
        prefix: "flood_",
        family: "xdplb_flood_defence_events",
        label: "event",
        help:
            "Flood defence of the flow table: flows pinned, pins deferred or failed, flows restored",
    },
    GlobalFamily {
        prefix: LOG_DROPPED_PREFIX,
        family: "xdplb_log_records_dropped",
        label: "reason",
        help: "Connection-log records lost, by reason: over the kernel budget (budget), overwritten in their CPU's ring before the daemon read them (overrun), file writer behind (file_backlog)",
    },
    GlobalFamily {
        prefix: "nat_",
        family: "xdplb_nat_events",
        label: "event",
        help: "nat forwarding: connections given a nat port (new, reclaimed from an expired one), replies and ICMP errors translated",
    },
];

/// The kernel's connection-log drop counters; the daemon adds its own reason to the family.
const LOG_DROPPED_PREFIX: &str = "log_records_dropped_";

struct GlobalFamily {
    prefix: &'static str,
    family: &'static str,
    label: &'static str,
    help: &'static str,
}

/// Health-check latencies from 0.1 ms (a local backend answering) to 1 s (beyond any sensible
/// timeout); slower checks land in `+Inf`.
const CHECK_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Latency is labelled per VIP, not per backend: a histogram costs 16 series, and thousands
/// of backends would multiply that. `result` keeps timeouts from blurring healthy latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    vip: String,
    result: &'static str,
}

const CHECK_RESULTS: [&str; 2] = ["ok", "fail"];

/// (vip, backend, to) -> number of transitions.
type Transitions = BTreeMap<(String, String, String), u64>;

/// Health-check metrics, counted as checks happen. The daemon owns one and passes it to
/// [`render`]; clones share the same values.
#[derive(Clone, Debug)]
pub struct HealthMetrics {
    /// (vip, backend, to) -> transitions. A sorted map rather than a `Family`: scrapes list
    /// backends in a stable order, and a removed backend's series can be found and dropped.
    transitions: Arc<Mutex<Transitions>>,
    durations: Family<CheckLabels, Histogram>,
}

impl Default for HealthMetrics {
    fn default() -> Self {
        Self {
            transitions: Arc::default(),
            durations: Family::new_with_constructor(|| Histogram::new(CHECK_BUCKETS)),
        }
    }
}

impl HealthMetrics {
    /// One health check of a backend of `vip` finished after `took`.
    pub fn record_check(&self, vip: &str, took: Duration, ok: bool) {
        let labels = CheckLabels {
            vip: vip.to_string(),
            result: CHECK_RESULTS[usize::from(!ok)],
        };
        self.durations
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// A backend's health changed to `to` ("up", "down"...).
    pub fn record_transition(&self, vip: &str, backend: &str, to: &str) {
        let key = (vip.to_string(), backend.to_string(), to.to_string());
        *self.lock_transitions().entry(key).or_insert(0) += 1;
    }

    /// Drops the series of a backend removed from the configuration, so they do not linger
    /// until the daemon restarts.
    pub fn forget_backend(&self, vip: &str, backend: &str) {
        self.lock_transitions()
            .retain(|(v, b, _), _| (v.as_str(), b.as_str()) != (vip, backend));
    }

    /// Drops the series of a VIP removed from the configuration, its backends' included.
    pub fn forget_vip(&self, vip: &str) {
        self.lock_transitions().retain(|(v, _, _), _| v != vip);
        for result in CHECK_RESULTS {
            self.durations.remove(&CheckLabels {
                vip: vip.to_string(),
                result,
            });
        }
    }

    fn lock_transitions(&self) -> MutexGuard<'_, Transitions> {
        // A panic while holding the lock cannot leave the map inconsistent (one insert or
        // increment), so a poisoned lock is still good to use.
        self.transitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

type Labels = Vec<(&'static str, String)>;

/// A metric family whose samples are taken from a snapshot at scrape time, encoded in the
/// snapshot's order (a `Family` would encode in hash order and needs atomics we never update).
#[derive(Debug)]
struct Samples<M> {
    samples: Vec<(Labels, M)>,
}

impl<M> Samples<M> {
    fn new() -> Self {
        Self {
            samples: Vec::new(),
        }
    }

    fn push(&mut self, labels: Labels, metric: M) {
        self.samples.push((labels, metric));
    }
}

impl<M: EncodeMetric + TypedMetric> EncodeMetric for Samples<M> {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        for (labels, metric) in &self.samples {
            metric.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }

    /// Families without samples (no VIP configured) are left out entirely.
    fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

type Counters = Samples<ConstCounter<u64>>;
type Gauges = Samples<ConstGauge<i64>>;

fn gauge(value: impl TryInto<i64>) -> ConstGauge<i64> {
    // Flow counts and weights are far below i64::MAX; saturate rather than wrap if not.
    ConstGauge::new(value.try_into().unwrap_or(i64::MAX))
}

/// The OpenMetrics exposition of `snapshot`, the health-check metrics and, per VIP name,
/// whether its route is announced (empty when announcing is off).
pub fn render(
    snapshot: &Snapshot,
    health: &HealthMetrics,
    announced: &BTreeMap<String, bool>,
    log: &LogCounters,
) -> String {
    let mut registry = Registry::default();

    let mut backend_packets = Counters::new();
    let mut backend_bytes = Counters::new();
    let mut backend_new_flows = Counters::new();
    let mut backend_active = Gauges::new();
    let mut backend_up = Gauges::new();
    let mut backend_weight = Gauges::new();
    let mut backend_drained = Gauges::new();
    let mut backend_drain_complete = Gauges::new();
    let mut backend_scheduler_connections = Gauges::new();
    let mut vip_scheduler = Gauges::new();
    let mut vip_packets = Counters::new();
    let mut vip_bytes = Counters::new();
    let mut vip_new_flows = Counters::new();
    let mut vip_dropped = Counters::new();
    let mut vip_filtered = Counters::new();
    for vip in &snapshot.vips {
        let labels = || vec![("vip", vip.name.clone())];
        vip_packets.push(labels(), ConstCounter::new(vip.totals.packets));
        vip_bytes.push(labels(), ConstCounter::new(vip.totals.bytes));
        vip_new_flows.push(labels(), ConstCounter::new(vip.totals.new_flows));
        vip_dropped.push(labels(), ConstCounter::new(vip.totals.not_forwarded));
        vip_scheduler.push(
            vec![
                ("vip", vip.name.clone()),
                ("scheduler", vip.scheduler.clone()),
            ],
            gauge(1),
        );
        for (reason, count) in vip.drops.by_reason() {
            let labels = vec![("vip", vip.name.clone()), ("reason", reason.to_string())];
            vip_filtered.push(labels, ConstCounter::new(count));
        }
        for b in &vip.backends {
            let labels = || vec![("vip", vip.name.clone()), ("backend", b.address.clone())];
            backend_packets.push(labels(), ConstCounter::new(b.totals.packets));
            backend_bytes.push(labels(), ConstCounter::new(b.totals.bytes));
            backend_new_flows.push(labels(), ConstCounter::new(b.totals.new_flows));
            backend_active.push(labels(), gauge(b.active_flows));
            backend_up.push(labels(), gauge(u8::from(b.up)));
            backend_weight.push(labels(), gauge(b.weight));
            backend_drained.push(labels(), gauge(u8::from(b.drained)));
            backend_drain_complete.push(labels(), gauge(u8::from(b.drain_complete)));
            if let Some(connections) = b.scheduler_connections {
                backend_scheduler_connections.push(labels(), gauge(connections));
            }
        }
    }

    registry.register(
        "xdplb_backend_packets",
        "Packets forwarded to the backend",
        backend_packets,
    );
    registry.register(
        "xdplb_backend_bytes",
        "Bytes forwarded to the backend: IP packets as received, before encapsulation",
        backend_bytes,
    );
    registry.register(
        "xdplb_backend_new_flows",
        "Flows assigned to the backend",
        backend_new_flows,
    );
    registry.register(
        "xdplb_backend_active_flows",
        "Flows to the backend seen within the idle timeout and not closed",
        backend_active,
    );
    registry.register(
        "xdplb_backend_up",
        "1 when the data path treats the backend as up, 0 when down",
        backend_up,
    );
    registry.register(
        "xdplb_backend_weight",
        "Effective weight: share of new flows (0 when drained or down)",
        backend_weight,
    );
    registry.register(
        "xdplb_backend_drained",
        "1 when the backend is drained: no new flows, established ones continue",
        backend_drained,
    );
    registry.register(
        "xdplb_backend_drain_complete",
        "1 when the backend is drained and a flow-table scan that started after the drain found no active flow: safe to stop",
        backend_drain_complete,
    );
    registry.register(
        "xdplb_backend_scheduler_connections",
        "Least-conn VIPs: the backend's active connections as the data path counts them for new-flow choices",
        backend_scheduler_connections,
    );
    registry.register(
        "xdplb_vip_scheduler",
        "1, labelled with how the VIP's new flows pick a backend (maglev, round-robin, least-conn)",
        vip_scheduler,
    );
    registry.register(
        "xdplb_vip_packets",
        "Packets of the VIP forwarded to a backend",
        vip_packets,
    );
    registry.register(
        "xdplb_vip_bytes",
        "Bytes of the VIP forwarded: IP packets as received, before encapsulation",
        vip_bytes,
    );
    registry.register(
        "xdplb_vip_new_flows",
        "Flows of the VIP assigned to a backend",
        vip_new_flows,
    );
    registry.register(
        "xdplb_vip_dropped",
        "Packets of the VIP not forwarded: dropped (no backend, internal error) or passed to the stack (too big once encapsulated)",
        vip_dropped,
    );
    registry.register(
        "xdplb_vip_dropped_packets",
        "Packets of the VIP dropped by the filter stage, by reason (source_denied, blocked, rate_limited)",
        vip_filtered,
    );

    for family in &GLOBAL_FAMILIES {
        let mut samples = Counters::new();
        for stat in &snapshot.global {
            if let Some(value) = stat.name.strip_prefix(family.prefix) {
                samples.push(
                    vec![(family.label, value.to_string())],
                    ConstCounter::new(stat.total),
                );
            }
        }
        if family.prefix == LOG_DROPPED_PREFIX {
            for (reason, count) in [
                ("overrun", &log.dropped_overrun),
                ("file_backlog", &log.dropped_file_backlog),
            ] {
                samples.push(
                    vec![(family.label, reason.to_string())],
                    ConstCounter::new(count.load(Ordering::Relaxed)),
                );
            }
        }
        registry.register(family.family, family.help, samples);
    }
    registry.register(
        "xdplb_log_records_read",
        "Connection-log records the daemon read from the per-CPU rings",
        ConstCounter::new(log.read.load(Ordering::Relaxed)),
    );
    registry.register(
        "xdplb_log_records_written",
        "Connection-log records written to the [daemon.log] file",
        ConstCounter::new(log.written.load(Ordering::Relaxed)),
    );
    registry.register(
        "xdplb_log_write_errors",
        "Failed opens, writes and flushes of the connection-log file (see the daemon's log)",
        ConstCounter::new(log.write_errors.load(Ordering::Relaxed)),
    );

    registry.register(
        "xdplb_flow_table_entries",
        "Entries in the flow table, active or not (a full set gives its least valuable entry to a new flow)",
        gauge(snapshot.flow_table_entries),
    );
    if let Some(age) = snapshot.active_flows_age_s {
        registry.register(
            "xdplb_active_flows_age_seconds",
            "Seconds since the flow-table scan behind the active-flow gauges started (scans are paced on large tables)",
            ConstGauge::new(age),
        );
    }
    registry.register(
        "xdplb_blocklist_entries",
        "Entries of the runtime blocklist (xdplb block add)",
        gauge(snapshot.protection.blocklist_entries),
    );
    registry.register(
        "xdplb_pinned_flows",
        "Flows in the flood defence's pinned table, which floods cannot flush",
        gauge(snapshot.protection.pinned_flows),
    );
    registry.register(
        "xdplb_nat_connections",
        "nat connections holding a nat port (at the last sweep of expired ones)",
        gauge(snapshot.nat_connections),
    );
    let mut transitions = Counters::new();
    for ((vip, backend, to), count) in health.lock_transitions().iter() {
        let labels = vec![
            ("vip", vip.clone()),
            ("backend", backend.clone()),
            ("to", to.clone()),
        ];
        transitions.push(labels, ConstCounter::new(*count));
    }
    registry.register(
        "xdplb_health_transitions",
        "Health-state changes of a backend, by new state",
        transitions,
    );
    registry.register(
        "xdplb_health_check_duration_seconds",
        "Duration of health checks, by VIP and result",
        health.durations.clone(),
    );
    let mut vip_announced = Gauges::new();
    for (vip, announced) in announced {
        vip_announced.push(vec![("vip", vip.clone())], gauge(u8::from(*announced)));
    }
    registry.register(
        "xdplb_vip_announced",
        "1 while the VIP's route is in the announce table (the BGP daemon announces it), 0 when withdrawn",
        vip_announced,
    );
    registry.register(
        "xdplb_build",
        "xdplb build information",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );

    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

/// Serves `GET /metrics` (the text `metrics` returns) and `GET /healthz` (200 when `healthy`
/// returns true, else 503) on `listener` until `shutdown` completes. Taking a bound listener
/// lets the caller report a bind error (port in use) at start-up rather than from a spawned
/// task, and learn the port when binding port 0.
/// At most [`MAX_CONNECTIONS`] connections are open at once.
pub async fn serve(
    listener: TcpListener,
    metrics: impl Fn() -> String + Send + Sync + 'static,
    healthy: impl Fn() -> bool + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_bounded(listener, MAX_CONNECTIONS, metrics, healthy, shutdown).await
}

async fn serve_bounded(
    listener: TcpListener,
    max_connections: usize,
    metrics: impl Fn() -> String + Send + Sync + 'static,
    healthy: impl Fn() -> bool + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let metrics = Arc::new(metrics);
    let healthy = Arc::new(healthy);
    let app = Router::new()
        .route(
            "/metrics",
            get(move || async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics()) }),
        )
        .route(
            "/healthz",
            get(move || async move {
                if healthy() {
                    (StatusCode::OK, "ok\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n")
                }
            }),
        );
    let listener = Bounded {
        listener,
        slots: Arc::new(Semaphore::new(max_connections)),
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// A listener that accepts only while fewer than its limit of connections are open. Accept
/// errors (out of descriptors) are handled by axum's listener: logged, then a pause.
struct Bounded {
    listener: TcpListener,
    slots: Arc<Semaphore>,
}

impl axum::serve::Listener for Bounded {
    type Io = Slotted;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        (
            Slotted {
                stream,
                _slot: slot,
            },
            addr,
        )
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A connection holding its slot until it closes.
struct Slotted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Slotted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Slotted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{BackendStats, GlobalStat, Rates, Totals, VipStats};
    use lb_common::counters;
    use std::net::SocketAddr;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
        sync::oneshot,
    };

    fn snapshot() -> Snapshot {
        let totals = |packets, bytes, new_flows, not_forwarded| Totals {
            packets,
            bytes,
            new_flows,
            not_forwarded,
        };
        let backend = |address: &str, weight, drained, up, active_flows, t| BackendStats {
            address: address.into(),
            weight,
            configured_weight: 100,
            drained,
            health: if up { "up" } else { "down" }.into(),
            up,
            active_flows,
            drain_complete: drained && active_flows == 0,
            // The VIP is least-conn: the data path's count next to the flow scan's.
            scheduler_connections: Some(active_flows as i64 + 1),
            totals: t,
            rates: Rates::default(),
        };
        Snapshot {
            interval_s: 1.0,
            flow_table_entries: 42,
            active_flows_age_s: Some(0.25),
            protection: crate::stats::Protection {
                blocklist_entries: 3,
                pinned_flows: 17,
            },
            nat_connections: 5,
            global: counters::ALL
                .iter()
                .enumerate()
                .map(|(i, (name, _))| GlobalStat {
                    name: name.to_string(),
                    total: i as u64 * 10,
                    rate: 0.0,
                })
                .collect(),
            vips: vec![VipStats {
                name: "web".into(),
                address: "192.0.2.10:80/tcp".into(),
                scheduler: "least-conn".into(),
                active_flows: 40,
                totals: totals(1000, 64_000, 50, 3),
                rates: Rates::default(),
                drops: crate::stats::Drops {
                    source_denied: 2,
                    blocked: 1,
                    rate_limited: 0,
                },
                backends: vec![
                    backend("10.0.0.1", 100, false, true, 30, totals(700, 44_800, 35, 0)),
                    backend("10.0.0.2", 0, true, true, 10, totals(297, 19_008, 15, 0)),
                    backend("10.0.0.3", 0, false, false, 0, totals(0, 0, 0, 0)),
                    backend("10.0.0.4", 0, true, true, 0, totals(5, 320, 1, 0)),
                ],
            }],
        }
    }

    fn health() -> HealthMetrics {
        let health = HealthMetrics::default();
        health.record_check("web", Duration::from_micros(300), true);
        health.record_check("web", Duration::from_millis(500), false);
        health.record_transition("web", "10.0.0.3", "down");
        health.record_transition("web", "10.0.0.3", "up");
        health.record_transition("web", "10.0.0.3", "down");
        health.record_transition("web", "10.0.0.1", "up");
        health
    }

    fn announced() -> BTreeMap<String, bool> {
        [("web".to_string(), true), ("api".to_string(), false)].into()
    }

    /// (family, type) in output order: exactly what docs/metrics.md documents.
    const FAMILIES: [(&str, &str); 36] = [
        ("xdplb_backend_packets", "counter"),
        ("xdplb_backend_bytes", "counter"),
        ("xdplb_backend_new_flows", "counter"),
        ("xdplb_backend_active_flows", "gauge"),
        ("xdplb_backend_up", "gauge"),
        ("xdplb_backend_weight", "gauge"),
        ("xdplb_backend_drained", "gauge"),
        ("xdplb_backend_drain_complete", "gauge"),
        ("xdplb_backend_scheduler_connections", "gauge"),
        ("xdplb_vip_scheduler", "gauge"),
        ("xdplb_vip_packets", "counter"),
        ("xdplb_vip_bytes", "counter"),
        ("xdplb_vip_new_flows", "counter"),
        ("xdplb_vip_dropped", "counter"),
        ("xdplb_vip_dropped_packets", "counter"),
        ("xdplb_xdp_actions", "counter"),
        ("xdplb_packets_passed", "counter"),
        ("xdplb_packets_dropped", "counter"),
        ("xdplb_flow_lookups", "counter"),
        ("xdplb_decap_packets", "counter"),
        ("xdplb_icmp_packets", "counter"),
        ("xdplb_flood_defence_events", "counter"),
        ("xdplb_log_records_dropped", "counter"),
        ("xdplb_nat_events", "counter"),
        ("xdplb_log_records_read", "counter"),
        ("xdplb_log_records_written", "counter"),
        ("xdplb_log_write_errors", "counter"),
        ("xdplb_flow_table_entries", "gauge"),
        ("xdplb_active_flows_age_seconds", "gauge"),
        ("xdplb_blocklist_entries", "gauge"),
        ("xdplb_pinned_flows", "gauge"),
        ("xdplb_nat_connections", "gauge"),
        ("xdplb_health_transitions", "counter"),
        ("xdplb_health_check_duration_seconds", "histogram"),
        ("xdplb_vip_announced", "gauge"),
        ("xdplb_build", "info"),
    ];

    #[test]
    fn families_and_types_are_as_documented() {
        let text = render(
            &snapshot(),
            &health(),
            &announced(),
            &LogCounters::default(),
        );
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let expected: Vec<String> = FAMILIES
            .iter()
            .map(|(name, kind)| format!("# TYPE {name} {kind}"))
            .collect();
        assert_eq!(types, expected, "\n{text}");
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains(
            "# HELP xdplb_packets_dropped Packets dropped by the XDP program, by reason.\n"
        ));
    }

    #[test]
    fn samples_and_label_sets() {
        let text = render(
            &snapshot(),
            &health(),
            &announced(),
            &LogCounters::default(),
        );
        let lines: Vec<&str> = text.lines().collect();
        for expected in [
            r#"xdplb_backend_packets_total{vip="web",backend="10.0.0.1"} 700"#,
            r#"xdplb_vip_dropped_packets_total{vip="web",reason="source_denied"} 2"#,
            r#"xdplb_vip_dropped_packets_total{vip="web",reason="blocked"} 1"#,
            r#"xdplb_vip_dropped_packets_total{vip="web",reason="rate_limited"} 0"#,
            "xdplb_blocklist_entries 3",
            "xdplb_pinned_flows 17",
            "xdplb_nat_connections 5",
            r#"xdplb_nat_events_total{event="new"} 320"#,
            r#"xdplb_backend_bytes_total{vip="web",backend="10.0.0.2"} 19008"#,
            r#"xdplb_backend_new_flows_total{vip="web",backend="10.0.0.1"} 35"#,
            r#"xdplb_backend_active_flows{vip="web",backend="10.0.0.1"} 30"#,
            r#"xdplb_backend_up{vip="web",backend="10.0.0.3"} 0"#,
            r#"xdplb_backend_up{vip="web",backend="10.0.0.1"} 1"#,
            r#"xdplb_backend_weight{vip="web",backend="10.0.0.1"} 100"#,
            r#"xdplb_backend_drained{vip="web",backend="10.0.0.2"} 1"#,
            r#"xdplb_backend_drain_complete{vip="web",backend="10.0.0.2"} 0"#,
            r#"xdplb_backend_drain_complete{vip="web",backend="10.0.0.4"} 1"#,
            r#"xdplb_backend_drain_complete{vip="web",backend="10.0.0.1"} 0"#,
            "xdplb_active_flows_age_seconds 0.25",
            r#"xdplb_backend_scheduler_connections{vip="web",backend="10.0.0.1"} 31"#,
            r#"xdplb_vip_scheduler{vip="web",scheduler="least-conn"} 1"#,
            r#"xdplb_vip_packets_total{vip="web"} 1000"#,
            r#"xdplb_vip_announced{vip="web"} 1"#,
            r#"xdplb_vip_announced{vip="api"} 0"#,
            r#"xdplb_vip_bytes_total{vip="web"} 64000"#,
            r#"xdplb_vip_new_flows_total{vip="web"} 50"#,
            r#"xdplb_vip_dropped_total{vip="web"} 3"#,
            r#"xdplb_xdp_actions_total{action="tx"} 30"#,
            r#"xdplb_packets_passed_total{reason="not_vip"} 90"#,
            r#"xdplb_packets_dropped_total{reason="no_backend"} 110"#,
            r#"xdplb_flow_lookups_total{result="hit"} 130"#,
            r#"xdplb_flow_lookups_total{result="evicted"} 160"#,
            r#"xdplb_decap_packets_total{result="ok"} 170"#,
            r#"xdplb_decap_packets_total{result="not_ours"} 180"#,
            r#"xdplb_icmp_packets_total{result="too_big_sent"} 210"#,
            "xdplb_flow_table_entries 42",
            r#"xdplb_health_transitions_total{vip="web",backend="10.0.0.3",to="down"} 2"#,
            r#"xdplb_health_check_duration_seconds_bucket{le="0.0005",vip="web",result="ok"} 1"#,
            r#"xdplb_health_check_duration_seconds_count{vip="web",result="fail"} 1"#,
        ] {
            assert!(lines.contains(&expected), "missing {expected}\n{text}");
        }
        let build = format!(
            r#"xdplb_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        );
        assert!(lines.contains(&build.as_str()), "{text}");
        // Transitions come out sorted, whatever order they happened in.
        let transitions: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("xdplb_health_transitions_total"))
            .collect();
        assert_eq!(
            transitions,
            [
                r#"xdplb_health_transitions_total{vip="web",backend="10.0.0.1",to="up"} 1"#,
                r#"xdplb_health_transitions_total{vip="web",backend="10.0.0.3",to="down"} 2"#,
                r#"xdplb_health_transitions_total{vip="web",backend="10.0.0.3",to="up"} 1"#,
            ]
        );
        // One sample per kernel counter: none lost, none invented.
        let global = lines
            .iter()
            .filter(|l| {
                [
                    "xdp_actions",
                    "packets_passed",
                    "packets_dropped",
                    "flow_lookups",
                    "decap_packets",
                    "icmp_packets",
                    "flood_defence_events",
                    "log_records_dropped",
                    "nat_events",
                ]
                .iter()
                .any(|f| l.starts_with(&format!("xdplb_{f}_total{{")))
            })
            .count();
        // The log's drops have two reasons counted by the daemon, not the kernel.
        assert_eq!(global, counters::ALL.len() + 2);
        for expected in [
            r#"xdplb_log_records_dropped_total{reason="budget"} 310"#,
            r#"xdplb_log_records_dropped_total{reason="overrun"} 0"#,
            r#"xdplb_log_records_dropped_total{reason="file_backlog"} 0"#,
        ] {
            assert!(lines.contains(&expected), "{expected} missing:\n{text}");
        }
    }

    #[test]
    fn every_global_counter_is_exported() {
        for (name, _) in counters::ALL {
            let families = GLOBAL_FAMILIES
                .iter()
                .filter(|f| name.starts_with(f.prefix));
            assert_eq!(
                families.count(),
                1,
                "{name}: add its prefix to GLOBAL_FAMILIES"
            );
        }
    }

    #[test]
    fn without_vips_only_global_families_are_rendered() {
        let mut snap = snapshot();
        snap.vips.clear();
        let text = render(
            &snap,
            &HealthMetrics::default(),
            &BTreeMap::new(),
            &LogCounters::default(),
        );
        assert!(!text.contains("xdplb_backend_"), "{text}");
        assert!(!text.contains("xdplb_vip_"), "{text}");
        assert!(!text.contains("xdplb_health_"), "{text}");
        assert!(text.contains("xdplb_flow_table_entries 42\n"));
    }

    #[test]
    fn forgotten_series_disappear() {
        let health = health();
        health.forget_backend("web", "10.0.0.3");
        let text = render(&snapshot(), &health, &announced(), &LogCounters::default());
        assert!(!text.contains(r#"backend="10.0.0.3",to="#), "{text}");
        assert!(text.contains(r#"backend="10.0.0.1",to="up"} 1"#), "{text}");
        health.forget_vip("web");
        let text = render(&snapshot(), &health, &announced(), &LogCounters::default());
        assert!(!text.contains("xdplb_health_"), "{text}");
    }

    #[test]
    fn docs_list_every_metric() {
        let docs = include_str!("../../docs/metrics.md");
        for (family, kind) in FAMILIES {
            // The names queries use: counters and info metrics carry a suffix in samples.
            let name = match kind {
                "counter" => format!("{family}_total"),
                "info" => format!("{family}_info"),
                _ => family.to_string(),
            };
            assert!(
                docs.contains(&format!("`{name}`")),
                "docs/metrics.md lacks `{name}`"
            );
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    type Server = tokio::task::JoinHandle<std::io::Result<()>>;

    /// Serves `text` on a free port until the returned sender fires.
    async fn start(text: String, healthy: bool) -> (SocketAddr, oneshot::Sender<()>, Server) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let server = tokio::spawn(serve(
            listener,
            move || text.clone(),
            move || healthy,
            shutdown,
        ));
        (addr, stop, server)
    }

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let text = render(
            &snapshot(),
            &health(),
            &announced(),
            &LogCounters::default(),
        );
        let (addr, stop, server) = start(text.clone(), true).await;

        let response = get(addr, "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        let content_type = format!("content-type: {CONTENT_TYPE}\r\n");
        assert!(
            response.to_ascii_lowercase().contains(&content_type),
            "{response}"
        );
        assert_eq!(response.split_once("\r\n\r\n").unwrap().1, text);

        let response = get(addr, "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\nok\n"), "{response}");

        let response = get(addr, "/nope").await;
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops on shutdown")
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_for_a_free_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_bounded(
            listener,
            2,
            String::new,
            || true,
            std::future::pending(),
        ));
        // Two idle connections take both slots.
        let idle = [
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        let waiting = tokio::spawn(get(addr, "/healthz"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "served beyond the limit");
        drop(idle);
        let response = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("served once a slot was free")
            .unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        server.abort();
    }

    #[tokio::test]
    async fn unhealthy_is_503() {
        let (addr, stop, server) = start(String::new(), false).await;
        let response = get(addr, "/healthz").await;
        assert!(
            response.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{response}"
        );
        assert!(response.ends_with("\r\n\r\nunhealthy\n"), "{response}");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
