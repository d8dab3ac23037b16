//! `cargo xtask test`: everything CI checks, in order, stopping at the first failure.

use std::io;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result};

use crate::libtest::{tee_and_count, TestCounts};
use crate::process::{announce, cannot_start, check, run};
use crate::setup::setup;

/// The root integration tests; they need root, so they run after everything cheaper.
const INTEGRATION_TESTS: &str = "xdplb-tests";
/// Builds only for bpfel-unknown-none (through aya-build or its own clippy stage).
const KERNEL_CRATE: &str = "lb-ebpf";

/// Each integration test builds its own uniquely named namespaces, so a few can share the
/// machine's 2 cores; more only makes their timing-sensitive traffic flaky.
const INTEGRATION_TEST_THREADS: u32 = 2;

#[derive(clap::Args)]
pub struct TestArgs {
    /// Do not run `cargo xtask setup` first
    #[arg(long)]
    no_setup: bool,

    /// Passed to the integration test binary: a test name filter, `--exact`, `--nocapture`, ...
    #[arg(last = true)]
    integration_args: Vec<String>,
}

pub fn test(args: &TestArgs) -> ExitCode {
    let mut counts = TestCounts::default();
    let code = crate::report(stages(args, &mut counts));
    // Always the last line, also after a failure, so CI logs can be searched for it.
    println!("{counts}");
    code
}

fn stages(args: &TestArgs, counts: &mut TestCounts) -> Result<()> {
    if !args.no_setup {
        setup()?;
    }
    run(&mut cargo("fmt --all -- --check"), "test: fmt")?;
    // The kernel crate only builds for the BPF target, so the host stages leave it out.
    run(
        &mut cargo(&format!(
            "clippy --workspace --exclude {KERNEL_CRATE} --all-targets -- -D warnings"
        )),
        "test: clippy",
    )?;
    // Linted on its own so that lb-common's `user` feature, which the workspace enables, is not
    // unified into the BPF build.
    run(
        &mut cargo(&format!(
            "+nightly clippy --package {KERNEL_CRATE} --bins --release \
             --target bpfel-unknown-none -Z build-std=core -- -D warnings"
        )),
        "test: clippy (lb-ebpf)",
    )?;
    cargo_test(
        &mut cargo(&format!(
            "test --workspace --exclude {KERNEL_CRATE} --exclude {INTEGRATION_TESTS}"
        )),
        "test: unit tests",
        counts,
    )?;
    // The lab tests run the real daemon binary (target/debug/xdplb).
    run(
        &mut cargo("build --package lb-userspace --bin xdplb"),
        "test: build xdplb",
    )?;
    let mut integration = cargo(&format!("test --package {INTEGRATION_TESTS} --"));
    // libtest refuses `--test-threads` given twice, so the caller's choice replaces ours.
    if !args
        .integration_args
        .iter()
        .any(|arg| arg.starts_with("--test-threads"))
    {
        integration.arg(format!("--test-threads={INTEGRATION_TEST_THREADS}"));
    }
    integration.args(&args.integration_args);
    cargo_test(&mut integration, "test: integration tests", counts)
}

/// `cargo` (through rustup's proxy, so that `+nightly` selects the toolchain) with arguments
/// written as they would be typed; none of them contains spaces.
fn cargo(args: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(args.split_whitespace());
    cmd
}

/// Runs a `cargo test` command, showing its output live while adding up the libtest summaries
/// into `counts` (which keeps what was counted even when the run fails).
fn cargo_test(cmd: &mut Command, stage: &str, counts: &mut TestCounts) -> Result<()> {
    let line = announce(cmd, stage);
    // Only stdout is captured: libtest prints its results there, cargo's progress goes to stderr.
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| cannot_start(stage, &line))?;
    let stdout = child.stdout.take().context("child stdout is piped")?;
    let copied = tee_and_count(stdout, io::stdout().lock(), counts)
        .with_context(|| format!("{stage}: cannot copy the output of `{line}`"));
    // Reap the child even when copying failed, so it is not left behind.
    let status = child
        .wait()
        .with_context(|| format!("{stage}: cannot wait for `{line}`"))?;
    copied?;
    check(status, stage, &line)
}
