//! `cargo xtask bench`: measures xdplb's data path and control plane next to baselines, prints
//! a table saying what each figure measures, and writes `bench/results.json` and
//! `bench/results.svg`.
//!
//! Sections (all by default; `--only micro,log,sched,pps,tcp,control,reload` picks some):
//! * `micro`: per-packet cost through `BPF_PROG_TEST_RUN` next to a trivial XDP_TX program;
//!   and what edge protection costs: 10,000 ACL prefixes, new-flow limits, a spoofed flood;
//!   and the nat paths (to the backend, the reply, a new connection) next to the trivial one.
//! * `log`: the connection log: the new-flow path with it off and on, records written to the
//!   file at the default budget and at peak.
//! * `sched`: the new-flow path of round-robin and least-conn VIPs next to Maglev's.
//! * `pps`: packet rate through the LB attached natively on veth in namespaces, from an XDP
//!   live-frames generator, next to the trivial program and an nftables DNAT balancer.
//! * `tcp`: TCP connections per second and request latency through the real daemon (`dsr`
//!   and `nat`), HAProxy (`mode tcp`) and an nftables DNAT + SNAT balancer in the same lab.
//! * `control`: Maglev build time, applying 1,000 VIPs, map memory at 1M flows, health-check
//!   CPU, next-hop resolution cost, `/healthz` latency during a reload.
//! * `reload`: only the last of those (a part of `control`, to run on its own).
//!
//! Every address lives in namespaces the bench creates and removes; every loop is bounded.

mod connlog;
mod control;
mod load;
mod micro;
mod micro_nat;
mod micro_protection;
mod others;
mod pps;
mod progs;
mod report;
mod sched;
mod tcp;

use anyhow::{bail, Result};
use report::Report;
use std::{path::Path, time::Instant};

const SECTIONS: &[&str] = &["micro", "log", "sched", "pps", "tcp", "control", "reload"];

const SHARED_CPU_NOTE: &str = "This is a shared 2-core VM: in the lab measurements the client \
    (generator), the LB and the backends run on the same 2 cores and compete for CPU, so rates \
    are lower bounds for dedicated machines and ratios matter more than absolute numbers.";

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut only: Vec<String> = SECTIONS.iter().map(|s| s.to_string()).collect();
    let mut out_dir = "bench".to_string();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--only" => {
                let list = it.next().map(String::as_str).unwrap_or_default();
                only = list.split(',').map(str::to_string).collect();
                if let Some(bad) = only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                    bail!("unknown section {bad:?}; sections: {}", SECTIONS.join(","));
                }
            }
            "--out" => out_dir = it.next().cloned().unwrap_or(out_dir),
            "-h" | "--help" => {
                println!(
                    "usage: xdplb-bench [--only {}] [--out DIR]\n\
                     Run through `cargo xtask bench [ARGS]` (setup, release build, root).",
                    SECTIONS.join(",")
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench loads XDP programs and builds network namespaces: run it as root");
    }
    let started = Instant::now();
    let mut report = Report::default();
    let wants = |s: &str| only.iter().any(|o| o == s);
    if wants("micro") {
        micro::run(&mut report)?;
        micro_protection::run(&mut report)?;
        micro_nat::run(&mut report)?;
    }
    if wants("log") {
        connlog::run(&mut report)?;
    }
    if wants("sched") {
        sched::run(&mut report)?;
    }
    if wants("pps") {
        pps::run(&mut report)?;
    }
    if wants("tcp") {
        tcp::run(&mut report)?;
    }
    if wants("control") {
        control::run(&mut report)?;
    } else if wants("reload") {
        control::reload_latency(&mut report)?;
    }
    report.note(SHARED_CPU_NOTE);
    let elapsed = started.elapsed().as_secs_f64();
    println!("{}", report.table());
    println!("bench took {elapsed:.0} s");
    report
        .data
        .insert("elapsed_seconds".into(), serde_json::json!(elapsed));
    report.write(Path::new(&out_dir), machine())
}

/// What the figures were measured on.
fn machine() -> serde_json::Value {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    serde_json::json!({
        "date": date,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "note": SHARED_CPU_NOTE,
    })
}
