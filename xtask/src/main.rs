//! Project automation for xdplb, run as `cargo xtask <task>` (see `.cargo/config.toml`).
//!
//! Everything a fresh machine needs is installed by `setup`, so CI and developers run the same
//! steps; `test` is what `.ci/run` calls.

mod lab;
mod libtest;
mod process;
mod setup;
mod test;

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(bin_name = "cargo xtask", about = "Project automation for xdplb")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check and install what the build and the tests need (as root; idempotent)
    Setup,
    /// Run setup, fmt, clippy, the unit tests and the root integration tests
    Test(test::TestArgs),
    /// Build everything and walk through a lab in network namespaces (`--keep` leaves it up)
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure the data path and control plane next to baselines; writes bench/results.*
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every command runs from the workspace root, and every "rerun it" hint is written relative
    // to it, whatever directory `cargo xtask` was started from.
    let root = workspace_root();
    if let Err(e) = std::env::set_current_dir(root)
        .with_context(|| format!("cannot change directory to {}", root.display()))
    {
        return report(Err(e));
    }
    match cli.task {
        Task::Setup => report(setup::setup()),
        Task::Test(args) => test::test(&args),
        Task::Demo { args } => report(lab::run_lab_program("xdplb-demo", false, &args)),
        Task::Bench { args } => report(lab::run_lab_program("xdplb-bench", true, &args)),
    }
}

/// The workspace root: xtask is one of its members, one level down.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest directory is inside the workspace root")
}

/// Turns a task's outcome into the exit status: errors become one `error: ...` line (with their
/// causes joined by `: `) instead of a Debug dump, and exit code 1.
fn report(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
