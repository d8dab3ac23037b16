//! What the connection log costs and carries:
//! * the new-flow path with the log off next to on (per call like [`crate::micro`], a fresh
//!   source each call, interleaved in the same runs; on, a thread reads the rings every
//!   10 ms as the daemon does: the record's path is the same whether it keeps up or not);
//! * records written to the file by the daemon's reader and writer ([`ConnLog`]) at the
//!   default budget of 20,000/s (paced new flows through `BPF_PROG_TEST_RUN`), every line
//!   checked against the flows sent; and as fast as one core can create flows.

use crate::{
    micro::{median, new_flows_per_call, CALLS, RUNS},
    micro_protection::{services, PLAIN},
    report::{Figure, Report},
};
use anyhow::{ensure, Context as _, Result};
use lb_common::counters;
use lb_userspace::{
    acl::AclSpec,
    connlog::{ConnLog, Entry, LogRing, LogSpec, Names},
    dataplane::Role,
};
use std::{
    collections::HashSet,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use xdplb_tests::{
    harness::{Harness, CLIENT_MAC, LB_MAC},
    packet::{Packet, TCP_SYN},
};

/// The default `[daemon.log] max_per_second`.
const RATE: u32 = LogSpec::DEFAULT_MAX_PER_SECOND;
const PACED_SECONDS: u32 = 3;
const PEAK_RECORDS: u32 = 200_000;
/// How long the writer may take to catch up after the last packet.
const CATCH_UP: Duration = Duration::from_secs(10);

fn spec(path: Option<PathBuf>, max_per_second: u32) -> LogSpec {
    LogSpec {
        path,
        max_per_second,
    }
}

/// Reads `ring` on its own thread until `stop`, every 10 ms like the daemon's reader;
/// returns how many records were lost (overwritten before they were read).
fn drain_until(mut ring: LogRing, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut records = Vec::new();
        let mut lost = 0;
        while !stop.load(Ordering::Relaxed) {
            lost += ring.read(&mut records);
            records.clear();
            std::thread::sleep(Duration::from_millis(10));
        }
        lost + ring.read(&mut records)
    })
}

pub fn run(report: &mut Report) -> Result<()> {
    println!("connection log: new-flow path off vs on, records written to the file");
    let services = services(AclSpec::default(), None);
    let mut lb = Harness::new(Role::Balancer);
    lb.apply(&services);
    let stop = Arc::new(AtomicBool::new(false));
    let drainer = drain_until(
        lb.dataplane.take_events().context("the ring")?,
        stop.clone(),
    );
    let mut call: [Vec<f64>; 2] = Default::default();
    let mut fresh = 0u32;
    for run in 0..RUNS {
        print!("  run {}/{RUNS} ...", run + 1);
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        for (slot, on) in [(0, false), (1, true)] {
            // A budget never reached: what is measured is the record's cost, not a drop's.
            lb.log = on.then(|| spec(None, 10_000_000).budget());
            lb.apply(&services);
            // new_flows_per_call checks that only FLOW_MISS and ACTION_TX moved: no record
            // was over the budget.
            call[slot].push(new_flows_per_call(
                &mut lb,
                PLAIN,
                42001,
                0x6440_0000 + fresh,
            )?);
            fresh += CALLS as u32;
        }
        println!(" done");
    }
    stop.store(true, Ordering::Relaxed);
    let lost = drainer
        .join()
        .map_err(|_| anyhow::anyhow!("the ring reader panicked"))?;
    let call: Vec<f64> = call.into_iter().map(median).collect();
    let extra = call[1] / call[0] - 1.0;
    println!(
        "  new flow: log off {:.0} ns, on {:.0} ns ({:+.1} %)",
        call[0],
        call[1],
        extra * 100.0
    );
    let section = report.section("Connection log");
    section.push(Figure::new(
        "connlog.per_call.new_flow_log_off",
        "new flow -> dsr, log off (per call)",
        call[0],
        "ns/pkt",
        "fresh source each call; the log costs one flag test here; same runs as the next figure",
    ));
    section.push(
        Figure::new(
            "connlog.per_call.new_flow_log_on",
            "new flow -> dsr, log on (per call)",
            call[1],
            "ns/pkt",
            &format!(
                "budget check, 64-byte record into this CPU's ring, time from jiffies, no helper call ({:+.1} ns); a thread read the rings every 10 ms ({lost} records overwritten first: calls this fast outrun a 10 ms reader, the writer's path is the same)",
                call[1] - call[0]
            ),
        )
        .ratio(call[1] / call[0], "log off")
        .target("<= +10 % over log off", extra <= 0.10),
    );

    let paced = to_file(&services, RATE, Some(RATE), RATE * PACED_SECONDS)?;
    let section = report.section("Connection log");
    section.push(
        Figure::new(
            "connlog.file.records_per_s_at_budget",
            &format!("records written to the file, {RATE} new flows/s for {PACED_SECONDS} s"),
            paced.written_per_s,
            "records/s",
            &format!(
                "{} records through the rings, the reader and the JSON-lines writer; lost: {} (budget {}, overrun {}, writer behind {}); every line checked against the flows sent",
                paced.sent, paced.lost(), paced.budget, paced.overrun, paced.backlog
            ),
        )
        .target(
            &format!("{RATE}/s with no loss"),
            paced.lost() == 0 && paced.written_per_s >= 0.95 * f64::from(RATE),
        ),
    );
    let peak = to_file(&services, 10_000_000, None, PEAK_RECORDS)?;
    section.push(Figure::new(
        "connlog.file.records_per_s_peak",
        "records written to the file, new flows as fast as one core makes them",
        peak.written_per_s,
        "records/s",
        &format!(
            "{} new flows at {:.0}/s from BPF_PROG_TEST_RUN; lost: {} (overrun {}, writer behind {})",
            peak.sent, peak.sent_per_s, peak.lost(), peak.overrun, peak.backlog
        ),
    ));
    Ok(())
}

struct FileRun {
    sent: u32,
    sent_per_s: f64,
    written_per_s: f64,
    budget: u64,
    overrun: u64,
    backlog: u64,
}

impl FileRun {
    fn lost(&self) -> u64 {
        self.budget + self.overrun + self.backlog
    }
}

/// `records` new flows (paced at `pace` per second, or unpaced) with the log on at
/// `max_per_second`, read and written by a [`ConnLog`] as the daemon runs it; checks the
/// file's lines against the flows sent.
fn to_file(
    services: &lb_userspace::model::Services,
    max_per_second: u32,
    pace: Option<u32>,
    records: u32,
) -> Result<FileRun> {
    let mut lb = Harness::new(Role::Balancer);
    lb.log = Some(spec(None, max_per_second).budget());
    lb.apply(services);
    let path =
        std::env::temp_dir().join(format!("xdplb-bench-connlog-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let log = ConnLog::start(
        lb.dataplane.take_events(),
        Some(&spec(Some(path.clone()), max_per_second)),
    );
    log.set_names(Names::of(lb.live(), &services.vips));
    let before = lb.global_counters();
    let first_source = u32::from(Ipv4Addr::new(100, 80, 0, 0));
    let mut frame = crate::micro::framed(
        CLIENT_MAC,
        LB_MAC,
        &Packet::new()
            .ipv4(Ipv4Addr::from(first_source), PLAIN)
            .tcp(43001, 80)
            .flags(TCP_SYN)
            .build(),
    );
    let start = Instant::now();
    for i in 0..records {
        if let Some(rate) = pace {
            let due = Duration::from_secs_f64(f64::from(i) / f64::from(rate));
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        frame[26..30].copy_from_slice(&(first_source + i).to_be_bytes());
        let outcome = lb.run(&frame);
        ensure!(
            outcome.action == crate::micro::XDP_TX,
            "flow {i} not forwarded"
        );
    }
    let sent_for = start.elapsed();
    let counted = |index: u32| lb.global_counters()[index as usize] - before[index as usize];
    let budget = counted(counters::LOG_RECORDS_DROPPED_BUDGET);
    let expected = u64::from(records) - budget;
    let counters = log.counters();
    let settled = |c: &lb_userspace::connlog::LogCounters| {
        c.written.load(Ordering::Relaxed)
            + c.dropped_file_backlog.load(Ordering::Relaxed)
            + c.dropped_overrun.load(Ordering::Relaxed)
    };
    while settled(counters) < expected && start.elapsed() < sent_for + CATCH_UP {
        std::thread::sleep(Duration::from_millis(1));
    }
    let written_for = start.elapsed();
    let written = counters.written.load(Ordering::Relaxed);
    let backlog = counters.dropped_file_backlog.load(Ordering::Relaxed);
    let overrun = counters.dropped_overrun.load(Ordering::Relaxed);
    ensure!(
        settled(counters) == expected,
        "the writer settled {} of {expected} records within {CATCH_UP:?}",
        settled(counters)
    );
    drop(log);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path:?}"))?;
    let _ = std::fs::remove_file(&path);
    let mut clients = HashSet::new();
    for line in text.lines() {
        let entry: Entry = serde_json::from_str(line).with_context(|| format!("line {line:?}"))?;
        ensure!(
            entry.event == "new" && entry.vip == "plain" && entry.backend.is_some(),
            "unexpected record {entry:?}"
        );
        let addr: Ipv4Addr = entry
            .client
            .strip_suffix(":43001")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("client of {entry:?}"))?;
        let index = u32::from(addr).wrapping_sub(first_source);
        ensure!(index < records, "a client never sent: {entry:?}");
        ensure!(clients.insert(index), "client {addr} written twice");
    }
    ensure!(
        clients.len() as u64 == written,
        "{} lines in the file, {written} counted written",
        clients.len()
    );
    Ok(FileRun {
        sent: records,
        sent_per_s: f64::from(records) / sent_for.as_secs_f64(),
        written_per_s: written as f64 / written_for.as_secs_f64(),
        budget,
        overrun,
        backlog,
    })
}
