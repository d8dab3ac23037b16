//! `demo` and `bench`: both run a program of the xdplb-tests crate (which holds the lab code)
//! after setup and a build, passing extra arguments through.

use std::process::Command;

use anyhow::Result;

use crate::{
    process::run,
    setup::{setup, setup_bench},
};

/// Builds the daemon and `program` (a binary of xdplb-tests), then runs it with `args`.
pub fn run_lab_program(program: &str, release: bool, args: &[String]) -> Result<()> {
    setup()?;
    if program == "xdplb-bench" {
        setup_bench()?;
    }
    let profile: &[&str] = if release { &["--release"] } else { &[] };
    run(
        Command::new("cargo")
            .args(["build", "--package", "lb-userspace", "--bin", "xdplb"])
            .args(profile),
        "build xdplb (with its kernel programs)",
    )?;
    run(
        Command::new("cargo")
            .args(["build", "--package", "xdplb-tests", "--bins"])
            .args(profile),
        "build the lab programs",
    )?;
    let dir = if release { "release" } else { "debug" };
    run(
        Command::new(format!("target/{dir}/{program}"))
            .env("XDPLB_BIN", format!("target/{dir}/xdplb"))
            .args(args),
        program,
    )
}
