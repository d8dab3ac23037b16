//! Compiles the kernel programs (lb-ebpf) with aya-build so the `xdplb` binary embeds them.
//!
//! aya-build forwards every line of its nested cargo build as `cargo:warning=`, so a clean
//! build printed about ninety `warning: lb-userspace@0.1.0: Compiling ...` lines. This script
//! runs aya-build in a child copy of itself and keeps only what a reader needs: compiler
//! diagnostics and cargo's own warnings and errors, in full. Progress lines are dropped (cargo's
//! progress bar already shows `lb-userspace(build)` while the kernel crate builds). When the
//! kernel build fails, every line is shown, progress included, for context.
use anyhow::Context as _;
use aya_build::{build_ebpf, Package, Toolchain};
use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::{Command, Stdio},
};

/// Set in the child copy of this script, which runs aya-build itself.
const CHILD: &str = "XDPLB_BUILD_SCRIPT_CHILD";
const WARNING: &str = "cargo:warning=";

fn main() -> anyhow::Result<()> {
    if std::env::var_os(CHILD).is_some() {
        let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
        let built = build_ebpf(
            [Package {
                name: "lb-ebpf",
                root_dir,
                ..Default::default()
            }],
            Toolchain::Nightly,
        );
        if let Err(e) = built {
            // Without the backtrace of this script that returning it would print.
            eprintln!("{e:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the build script")?;
    let mut child = Command::new(&exe)
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {} for aya-build", exe.display()))?;
    let stdout = child.stdout.take().context("the child's stdout")?;
    let mut forwarded = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading aya-build's output")?;
        match line.strip_prefix(WARNING) {
            Some(text) => forwarded.push(text.to_owned()),
            // rerun-if-changed and the like are for cargo.
            None => println!("{line}"),
        }
    }
    // Only aya-build's own error goes there: read once stdout is done, it cannot fill the pipe.
    let mut error = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        stderr
            .read_to_string(&mut error)
            .context("reading aya-build's errors")?;
    }
    let status = child.wait().context("waiting for aya-build")?;
    if !status.success() {
        // cargo shows this when the build fails: the nested build's output, then the command.
        for text in &forwarded {
            eprintln!("{text}");
        }
        eprint!("{error}");
        eprintln!(
            "building the kernel programs (lb-ebpf) failed: the output of its cargo build is above"
        );
        std::process::exit(1);
    }
    // Blank lines only separated the dropped progress from diagnostics.
    for text in forwarded
        .iter()
        .filter(|text| !is_progress(text) && !text.trim().is_empty())
    {
        println!("{WARNING}{text}");
    }
    Ok(())
}

/// Cargo's status lines (`   Compiling core v0.0.0 (...)`, `    Finished ...`): a right-aligned
/// verb, then a space. Diagnostics start at column 0 (`warning: ...`, `error[E0308]: ...`) or
/// are their indented continuation lines (`  --> src/main.rs:3:5`, ` |`), never a capitalised
/// word followed by a space.
fn is_progress(text: &str) -> bool {
    const VERBS: [&str; 12] = [
        "Compiling",
        "Checking",
        "Finished",
        "Fresh",
        "Running",
        "Building",
        "Blocking",
        "Locking",
        "Updating",
        "Downloading",
        "Downloaded",
        "Adding",
    ];
    let trimmed = text.trim_start();
    trimmed.len() < text.len()
        && VERBS.iter().any(|verb| {
            trimmed
                .strip_prefix(verb)
                .is_some_and(|rest| rest.starts_with(' '))
        })
}
