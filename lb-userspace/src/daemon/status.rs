//! What the daemon reports: `xdplb status` and `xdplb flows` answers, the stats samples
//! behind `xdplb stats`, and the `/metrics` text.

use super::Daemon;
use crate::{
    announce::Announcer,
    api::{BackendStatus as ApiBackend, FlowInfo, FlowList, StatusReport, VipStatus},
    dataplane::Adoption,
    flood,
    health::{BackendHealth, State},
    metrics,
    model::Forwarding,
    nat, scheduler, state,
    stats::{self, BackendSample, Sample, Snapshot, VipSample},
};
use anyhow::Result;
use lb_common::{FlowKey, FLOW_ACK_SEEN, FLOW_FIN_SEEN, FLOW_RST_SEEN, PROTO_TCP};
use std::{collections::HashMap, net::IpAddr, time::Instant};

impl Daemon {
    pub(super) fn status(&self) -> Result<StatusReport> {
        let vips = self
            .config
            .services
            .vips
            .iter()
            .map(|vip| {
                let live = self.live.vips.get(&state::vip_key(&vip.vip));
                let backends: Vec<ApiBackend> = vip
                    .backends
                    .iter()
                    .map(|b| {
                        let cli = self.overrides.get(&vip.name, b.addr);
                        let status = self.backend_status(vip, b);
                        let health: BackendHealth = self.health.status(vip, b);
                        let live_backend = live.and_then(|l| l.backends.get(&b.addr));
                        let next_hop = match self.next_hops.get(b.addr) {
                            Some(hop) if live_backend.is_some() => {
                                format!("{} ifindex {}", hop.dst_mac, hop.ifindex)
                            }
                            _ => self
                                .unresolved
                                .iter()
                                .find(|u| u.vip == vip.name && u.backend == b.addr)
                                .map(|u| format!("unresolved: {}", u.reason))
                                .unwrap_or_else(|| "unresolved".into()),
                        };
                        ApiBackend {
                            address: b.addr,
                            configured_weight: b.weight,
                            cli_weight: cli.weight,
                            effective_weight: live_backend.map_or(0, |l| l.ring_weight),
                            drained: status.drained,
                            health: health.state.to_string(),
                            health_since_s: health.since.map(|t| t.elapsed().as_secs()),
                            last_failure: health.last_failure.map(|f| f.reason),
                            active_flows: live_backend.map_or(0, |l| self.flow_scan.active(l.id)),
                            drain_complete: status.drained
                                && self.flow_scan.drain_complete(
                                    &vip.name,
                                    b.addr,
                                    live_backend.map(|l| l.id),
                                ),
                            // A live backend's id is always inside the mapped counts.
                            scheduler_connections: live.zip(live_backend).and_then(|(vip, b)| {
                                scheduler::connections(&self.dataplane, vip, b.id)
                                    .ok()
                                    .flatten()
                            }),
                            next_hop,
                        }
                    })
                    .collect();
                VipStatus {
                    name: vip.name.clone(),
                    address: vip.vip.to_string(),
                    forwarding: vip.forwarding.to_string(),
                    scheduler: vip.scheduler.to_string(),
                    affinity: vip.affinity.to_string(),
                    ring_size: vip.ring_size,
                    available: backends.iter().filter(|b| b.effective_weight > 0).count(),
                    announce: self
                        .announcer
                        .as_ref()
                        .and_then(|a| a.announcement(&vip.name))
                        .map(|a| a.state),
                    backends,
                    acl: vip.acl.status(),
                    limits: vip.limits,
                }
            })
            .collect();
        Ok(StatusReport {
            config_file: self.config_path.clone(),
            interfaces: self.config.daemon.interfaces.clone(),
            detached: self.attachments.problems(),
            maps: match self.dataplane.adoption() {
                Adoption::Fresh => "fresh".into(),
                Adoption::Adopted => "adopted from the previous run".into(),
                Adoption::Replaced(why) => format!("replaced ({why})"),
            },
            active_flows_age_s: self.flow_scan.age().map(|age| age.as_secs_f64()),
            vips,
        })
    }

    pub(super) fn flows(
        &self,
        vip: Option<&str>,
        backend: Option<IpAddr>,
        limit: usize,
    ) -> Result<FlowList> {
        let vip_filter = vip
            .map(|v| self.find_vip(v).map(|s| s.name.clone()))
            .transpose()?;
        let now = stats::monotonic_seconds();
        // Backend id -> (VIP name, backend address), from what this daemon wrote.
        let owners: HashMap<u32, (&str, IpAddr)> = self
            .live
            .vips
            .values()
            .flat_map(|v| {
                v.backends
                    .iter()
                    .map(move |(addr, b)| (b.id, (v.name.as_str(), *addr)))
            })
            .collect();
        // Client tuple -> nat address:port, when some VIP uses nat.
        let nat: HashMap<FlowKey, String> = if self.uses_nat() {
            self.dataplane
                .nat_translations()?
                .into_iter()
                .map(|(client, fwd)| {
                    let backend_side = fwd.reverse_key(client.proto, client.family);
                    (client, socket_text(&backend_side, false))
                })
                .collect()
        } else {
            HashMap::new()
        };
        let mut matching: Vec<_> = self
            .dataplane
            .flows()?
            .into_iter()
            .filter_map(|(key, value)| {
                let (vip_name, backend_addr) = owners.get(&value.backend_id)?;
                let wanted = vip_filter.as_deref().is_none_or(|v| v == *vip_name)
                    && backend.is_none_or(|b| b == *backend_addr);
                wanted.then_some((key, value, *vip_name, *backend_addr))
            })
            .collect();
        let matched = matching.len();
        // Oldest first, then cut: the longest-lived flows are the ones a drain waits for.
        matching.sort_by_key(|(_, value, ..)| value.created);
        let flows = matching
            .into_iter()
            .take(limit)
            .map(|(key, value, vip_name, backend_addr)| FlowInfo {
                client: socket_text(&key, true),
                vip: vip_name.to_string(),
                protocol: if key.proto == PROTO_TCP { "tcp" } else { "udp" }.into(),
                backend: backend_addr,
                age_s: now.saturating_sub(value.created),
                idle_s: now.saturating_sub(value.last_seen),
                state: flow_state(key.proto, value.state).into(),
                nat: nat.get(&key).cloned(),
            })
            .collect();
        Ok(FlowList { matched, flows })
    }

    /// One stats sample: counters, active flows (from the last flow scan), health, weights.
    pub(super) fn sample(&mut self) -> Result<()> {
        let dataplane = &self.dataplane;
        let idle_timeout = self.config.daemon.flow_idle_timeout;
        let mut pinned = Vec::new();
        let scanned = self.flow_scan.scan_if_due(
            || {
                pinned = dataplane.pinned()?;
                Ok(flood::with_pinned_only(dataplane.flows()?, &pinned))
            },
            idle_timeout,
        )?;
        if let Some(flows) = scanned {
            let now = stats::monotonic_seconds();
            let idle_timeout_s = stats::whole_seconds(idle_timeout);
            scheduler::settle_counts(&mut self.dataplane, &self.live, &flows, now, idle_timeout_s)?;
            self.pinned_scan
                .run(&mut self.dataplane, &pinned, &flows, now, idle_timeout)?;
            // Expired nat connections go with the same pacing: never on the packet path.
            if self.uses_nat() {
                let swept = nat::sweep(&mut self.dataplane, now)?;
                self.nat_connections = (swept.connections - swept.expired) as u64;
            }
        }
        let global = self.dataplane.global_counters()?;
        let mut vips = Vec::new();
        for spec in &self.config.services.vips {
            let Some(live) = self.live.vips.get(&state::vip_key(&spec.vip)) else {
                continue;
            };
            let mut backends = Vec::new();
            for b in &spec.backends {
                let Some(lb) = live.backends.get(&b.addr) else {
                    continue;
                };
                let health = self.health.status(spec, b).state;
                let drained = self.overrides.get(&spec.name, b.addr).drained;
                backends.push(BackendSample {
                    address: b.addr.to_string(),
                    counters: self.dataplane.backend_counters(lb.id)?,
                    active_flows: self.flow_scan.active(lb.id),
                    drain_complete: drained
                        && self
                            .flow_scan
                            .drain_complete(&spec.name, b.addr, Some(lb.id)),
                    weight: lb.ring_weight,
                    configured_weight: b.weight,
                    drained,
                    health: health.to_string(),
                    up: health != State::Down,
                    scheduler_connections: scheduler::connections(&self.dataplane, live, lb.id)?,
                });
            }
            vips.push(VipSample {
                name: spec.name.clone(),
                address: spec.vip.to_string(),
                scheduler: spec.scheduler.to_string(),
                counters: self.dataplane.vip_counters(live.meta.vip_id)?,
                drops: self.dataplane.vip_drops(live.meta.vip_id)?.into(),
                backends,
            });
        }
        let flow_table_entries = self.flow_scan.entries();
        self.stats.ingest(Sample {
            at: Instant::now(),
            global,
            vips,
            flow_table_entries,
            protection: stats::Protection {
                blocklist_entries: self.blocklist.entries().len() as u64,
                pinned_flows: self.pinned_scan.entries,
            },
            nat_connections: self.nat_connections,
        });
        Ok(())
    }

    /// The last sample's snapshot, with the age of its active-flow counts as of now.
    pub(super) fn snapshot(&self) -> Snapshot {
        Snapshot {
            active_flows_age_s: self.flow_scan.age().map(|age| age.as_secs_f64()),
            ..self.stats.snapshot().clone()
        }
    }

    fn uses_nat(&self) -> bool {
        self.config
            .services
            .vips
            .iter()
            .any(|v| v.forwarding == Forwarding::Nat)
    }

    pub(super) fn metrics_text(&self) -> String {
        let announced = self
            .announcer
            .as_ref()
            .map(Announcer::announced)
            .unwrap_or_default();
        metrics::render(
            &self.snapshot(),
            &self.health_metrics,
            &announced,
            self.connlog.counters(),
        )
    }
}

fn socket_text(key: &FlowKey, client: bool) -> String {
    let (addr, port) = if client {
        (&key.src, key.sport)
    } else {
        (&key.dst, key.dport)
    };
    let port = u16::from_be(port);
    if key.family == lb_common::FAMILY_IPV4 {
        format!("{}.{}.{}.{}:{port}", addr[0], addr[1], addr[2], addr[3])
    } else {
        format!("[{}]:{port}", std::net::Ipv6Addr::from(*addr))
    }
}

fn flow_state(proto: u8, state: u8) -> &'static str {
    if proto != PROTO_TCP {
        "udp"
    } else if state & FLOW_RST_SEEN != 0 {
        "rst"
    } else if state & FLOW_FIN_SEEN != 0 {
        "fin"
    } else if state & FLOW_ACK_SEEN != 0 {
        "established"
    } else {
        "syn"
    }
}
