//! The new-flow path per scheduler: Maglev, round robin and least-conn VIPs of 16 equal
//! backends each, a fresh 5-tuple per call (`BPF_PROG_TEST_RUN`, `repeat = 1`), interleaved
//! in every run. The per-call figures include the kernel's timer overhead (~70 ns), the same
//! for all three.
//!
//! Every call's output is checked against the backend the scheduler must pick: the Maglev
//! table's slot for the tuple and the next entry of the round-robin turn. Least-conn's pick
//! depends on which flows the full table evicted (an eviction gives its count back), so each
//! of its outputs must be one of the VIP's backends, and after each run the counts must be
//! level (within 2: a pick, then an eviction from another backend) and equal, backend by
//! backend, to the counted flows the table holds. The thread is pinned to one CPU, since both
//! non-Maglev schedulers keep per-CPU state.

use crate::{
    micro::{expect, expect_new_flows, framed, median, per_call_run, tcp4, with_macs, CALLS},
    report::{Figure, Report},
};
use anyhow::{ensure, Context as _, Result};
use lb_common::{counters, FLOW_COUNTED};
use lb_userspace::{
    dataplane::Role,
    model::{Forwarding, Protocol, Services, VipAddr},
    scheduler::Scheduler,
    state::{vip_key, LiveVip},
};
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};
use xdplb_tests::{
    fixture::{flow_key, settings, SEED},
    harness::{pin_to_one_cpu, vip_spec, Harness, CLIENT_MAC, LB_MAC},
    packet::TCP_SYN,
};

const RUNS: usize = 5;
const BACKENDS: u8 = 16;
const XDP_TX: u32 = 3;
const SCHEDULERS: [(Scheduler, u8); 3] = [
    (Scheduler::Maglev, 70),
    (Scheduler::RoundRobin, 71),
    (Scheduler::LeastConn, 72),
];

fn vip_addr(last: u8) -> VipAddr {
    VipAddr {
        addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn services() -> Services {
    let vips = SCHEDULERS
        .iter()
        .map(|(scheduler, last)| {
            let backends: Vec<(IpAddr, [u8; 6], u32)> = (1..=BACKENDS)
                .map(|b| {
                    let addr = IpAddr::V4(Ipv4Addr::new(10, *last, 0, b));
                    (addr, [0x02, 0, 0, *last, 0x0b, b], 100)
                })
                .collect();
            let mut spec = vip_spec(
                &scheduler.to_string(),
                vip_addr(*last),
                Forwarding::Dsr,
                1021,
                &backends,
            );
            spec.scheduler = *scheduler;
            spec
        })
        .collect();
    Services {
        settings: settings(SEED),
        vips,
    }
}

/// The VIP applied at address `last`.
fn live_vip(lb: &Harness, last: u8) -> Result<&LiveVip> {
    lb.live()
        .vips
        .get(&vip_key(&vip_addr(last)))
        .context("VIP not applied")
}

/// The backend MAC new flow number `n` (of this VIP, since the maps were filled) must get;
/// `None` for least-conn (any of the VIP's backends, checked by [`least_conn_level`]).
fn predict(
    lb: &Harness,
    scheduler: Scheduler,
    last: u8,
    n: usize,
    src: Ipv4Addr,
) -> Result<Option<[u8; 6]>> {
    let vip = live_vip(lb, last)?;
    let macs: HashMap<u32, [u8; 6]> = vip
        .backends
        .values()
        .map(|b| (b.id, b.entry.dst_mac))
        .collect();
    let table = vip.table();
    let id = match scheduler {
        Scheduler::Maglev => {
            let key = flow_key(
                src.into(),
                vip_addr(last).addr,
                40005,
                80,
                lb_common::PROTO_TCP,
            );
            table[(lb_common::flow_hash(&key, SEED) % table.len() as u32) as usize]
        }
        Scheduler::RoundRobin => table[n % table.len()],
        Scheduler::LeastConn => return Ok(None),
    };
    macs.get(&id)
        .copied()
        .map(Some)
        .context("table names an unknown backend")
}

/// After a least-conn run: each backend's count equals the counted flows the table holds for
/// it, and the counts are level.
fn least_conn_level(lb: &Harness, last: u8) -> Result<()> {
    let vip = live_vip(lb, last)?;
    let flows = lb.dataplane.flows()?;
    let mut counts = Vec::new();
    for backend in vip.backends.values() {
        let count = lb.dataplane.active_conns(backend.id)?;
        let held = flows
            .iter()
            .filter(|(_, f)| f.backend_id == backend.id && f.state & FLOW_COUNTED != 0)
            .count() as i64;
        ensure!(
            count == held,
            "least-conn: backend {} counts {count} connections, the table holds {held}",
            backend.id
        );
        counts.push(count);
    }
    let (min, max) = (counts.iter().min(), counts.iter().max());
    ensure!(
        max.zip(min).is_some_and(|(max, min)| max - min <= 2),
        "least-conn: counts not level: {counts:?}"
    );
    Ok(())
}

pub fn run(report: &mut Report) -> Result<()> {
    println!("new-flow path per scheduler: {CALLS} calls with repeat = 1, median of {RUNS} runs");
    pin_to_one_cpu();
    let mut lb = Harness::new(Role::Balancer);
    lb.apply(&services());
    let mut figures: [Vec<f64>; 3] = Default::default();
    let mut sent = [0usize; 3];
    for run in 0..RUNS {
        print!("  run {}/{RUNS} ...", run + 1);
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        for (slot, (scheduler, last)) in SCHEDULERS.iter().enumerate() {
            let vip = Ipv4Addr::new(192, 0, 2, *last);
            let base = sent[slot];
            let backend_macs: Vec<[u8; 6]> = live_vip(&lb, *last)?
                .backends
                .values()
                .map(|b| b.entry.dst_mac)
                .collect();
            let expected: Vec<(Ipv4Addr, Option<[u8; 6]>)> = (0..CALLS)
                .map(|i| {
                    let n = base + i;
                    let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + n as u32);
                    Ok((src, predict(&lb, *scheduler, *last, n, src)?))
                })
                .collect::<Result<_>>()?;
            let what = format!("new flow, {scheduler}");
            let before = lb.global_counters();
            let held_before = lb.dataplane.flows()?.len();
            figures[slot].push(per_call_run(
                lb.dataplane.program(),
                framed(
                    CLIENT_MAC,
                    LB_MAC,
                    &tcp4(Ipv4Addr::new(100, 64, 0, 0), vip, 40005, TCP_SYN).build(),
                ),
                |i, frame| frame[26..30].copy_from_slice(&expected[i].0.octets()),
                |i, input, action, out| {
                    // Least-conn: whichever backend the output names, if it is the VIP's.
                    let mac = expected[i].1.unwrap_or_else(|| {
                        let named = out.get(..6).unwrap_or_default();
                        *backend_macs
                            .iter()
                            .find(|mac| mac[..] == *named)
                            .unwrap_or(&backend_macs[0])
                    });
                    expect(&what, action, XDP_TX, out, &with_macs(input, mac, LB_MAC))
                },
            )?);
            sent[slot] += CALLS;
            expect_new_flows(
                &what,
                &lb,
                &before,
                held_before,
                &[
                    (counters::FLOW_MISS, CALLS as u64),
                    (counters::ACTION_TX, CALLS as u64),
                ],
            )?;
            if *scheduler == Scheduler::LeastConn {
                least_conn_level(&lb, *last)?;
            }
        }
        println!(" done");
    }
    let [maglev, round_robin, least_conn] = figures.map(median);
    let section = report.section("New-flow path per scheduler (BPF_PROG_TEST_RUN)");
    let measures = "mean of kernel-reported ns over 200,000 calls with repeat = 1 (includes ~70 ns timer/call overhead), 16 backends of equal weight, fresh 5-tuple per call, 4,096-entry flow table (full: each insert evicts); median of 5; checked: the scheduler's backend every call";
    section.push(Figure::new(
        "sched.new_flow.maglev",
        "new flow, maglev, 16 backends (per call)",
        maglev,
        "ns/pkt",
        measures,
    ));
    let rr_ratio = round_robin / maglev;
    section.push(
        Figure::new(
            "sched.new_flow.round_robin",
            "new flow, round-robin, 16 backends (per call)",
            round_robin,
            "ns/pkt",
            "per-CPU cursor + one turn slot instead of the flow hash's slot",
        )
        .ratio(rr_ratio, "maglev")
        .target("<= 1.05x maglev", rr_ratio <= 1.05),
    );
    let lc_ratio = least_conn / maglev;
    section.push(
        Figure::new(
            "sched.new_flow.least_conn",
            "new flow, least-conn, 16 backends (per call)",
            least_conn,
            "ns/pkt",
            "scan of 16 (backend, weight) entries and their shared counts + one atomic add",
        )
        .ratio(lc_ratio, "maglev")
        .target("<= 1.2x maglev", lc_ratio <= 1.2),
    );
    Ok(())
}
