//! `cargo xtask setup`: makes this machine able to build and test xdplb, installing only what is
//! missing, so that a second run is only checks (a few seconds at most).

use std::collections::HashSet;
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::process::{check, display, probe, run};

/// Debian packages the build and the tests need; later features add theirs here.
const DEBIAN_PACKAGES: &[&str] = &[
    // Building bpf-linker against the system's LLVM 22 (see TOOLCHAIN.md).
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // Lab hosts in the integration tests: namespaces and veths, offload settings, BPF objects.
    "iproute2",
    "ethtool",
    "bpftool",
    // The HA lab (tests/tests/bgp_e2e.rs): BIRD 2 on a router and on each LB. Each test runs
    // its own BIRDs, one per namespace, with their own config and control socket.
    "bird2",
];

/// Baselines `cargo xtask bench` measures xdplb against (nftables DNAT, HAProxy), and the
/// backends of its `tcp` section (nginx-light: an event-driven server, so the backends' cost
/// per connection does not hide the balancers'); installed only by the bench, so
/// `cargo xtask test` and CI do not pull them in.
const BENCH_DEBIAN_PACKAGES: &[&str] = &["nftables", "haproxy", "nginx-light"];

/// The kernel crate builds with `-Z build-std=core` (rust-src); `cargo xtask test` lints it with
/// the nightly clippy.
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];

const BPF_LINKER_VERSION: &str = "0.13.0";

const BPFFS: &str = "/sys/fs/bpf";

pub fn setup() -> Result<()> {
    let started = Instant::now();
    require_root()?;
    debian_packages()?;
    system_bird_off()?;
    nightly_components()?;
    bpf_linker()?;
    bpffs()?;
    network_namespaces()?;
    println!("setup: done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Installing packages and mounting bpffs need root; saying so up front beats failing halfway.
/// The effective uid is read from /proc so that no libc binding is needed.
fn require_root() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("setup: cannot read /proc/self/status to check for root")?;
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        .context("setup: no effective uid in /proc/self/status")?;
    if euid != "0" {
        bail!("setup must run as root (it installs Debian packages and mounts bpffs), but the effective uid is {euid}");
    }
    Ok(())
}

/// What `cargo xtask bench` needs on top of [`setup`]: the baseline load balancers.
pub fn setup_bench() -> Result<()> {
    install_debian_packages("setup: bench baselines", BENCH_DEBIAN_PACKAGES)
}

fn debian_packages() -> Result<()> {
    install_debian_packages("setup: Debian packages", DEBIAN_PACKAGES)
}

/// Installs whichever of `packages` dpkg does not list as installed.
fn install_debian_packages(step: &str, packages: &[&str]) -> Result<()> {
    let mut query = Command::new("dpkg-query");
    query
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(packages);
    // dpkg-query exits 1 when a package is unknown to dpkg; that is the answer "missing", so
    // only what it printed is judged.
    let listing = probe(&mut query, step)?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    let installed: HashSet<&str> = listing
        .lines()
        .filter_map(|line| {
            // `<package> <want> <flag> <status>`: held packages say `hold ok installed`.
            match line.split_whitespace().collect::<Vec<_>>()[..] {
                [name, _, "ok", "installed"] => Some(name),
                _ => None,
            }
        })
        .collect();
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !installed.contains(package))
        .collect();
    if missing.is_empty() {
        println!("{step} ({}) ... ok", packages.join(" "));
        return Ok(());
    }
    println!("{step} ... missing {}, installing", missing.join(" "));
    run(Command::new("apt-get").arg("update"), step)?;
    run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
        step,
    )
}

/// Installing bird2 enables a system-wide `bird.service`: where systemd runs, it would start
/// with /etc/bird/bird.conf and program the host's main table. The labs run their own BIRDs
/// in namespaces, so the system one is stopped and disabled (a second run only checks).
fn system_bird_off() -> Result<()> {
    let step = "setup: system-wide bird.service off";
    if !Path::new("/run/systemd/system").exists() {
        println!("{step} (no systemd: nothing starts it) ... ok");
        return Ok(());
    }
    let mut enabled = Command::new("systemctl");
    enabled.args(["is-enabled", "--quiet", "bird.service"]);
    let mut active = Command::new("systemctl");
    active.args(["is-active", "--quiet", "bird.service"]);
    if !probe(&mut enabled, step)?.status.success() && !probe(&mut active, step)?.status.success() {
        println!("{step} ... ok");
        return Ok(());
    }
    run(
        Command::new("systemctl").args(["disable", "--now", "bird.service"]),
        step,
    )
}

fn nightly_components() -> Result<()> {
    let step = "setup: Rust nightly components";
    let mut list = Command::new("rustup");
    list.args(["component", "list", "--toolchain", "nightly", "--installed"]);
    let listing = probe(&mut list, step)?;
    if !listing.status.success() {
        // Not installed here on purpose: RUSTUP_AUTO_INSTALL=0 marks the machine's toolchains as
        // provisioned, and a newer nightly may carry an LLVM that bpf-linker (LLVM 22) rejects.
        bail!(
            "{step} failed: `{}` says: {}; the machine is expected to provide the `nightly` toolchain (see TOOLCHAIN.md)",
            display(&list),
            String::from_utf8_lossy(&listing.stderr).trim()
        );
    }
    // Installed components are listed as `rust-src` or `clippy-x86_64-unknown-linux-gnu`.
    let listing = String::from_utf8_lossy(&listing.stdout);
    let missing: Vec<&str> = NIGHTLY_COMPONENTS
        .iter()
        .copied()
        .filter(|component| {
            !listing.lines().any(|line| {
                line == *component
                    || line
                        .strip_prefix(component)
                        .is_some_and(|host| host.starts_with('-'))
            })
        })
        .collect();
    if missing.is_empty() {
        println!("{step} ({}) ... ok", NIGHTLY_COMPONENTS.join(" "));
        return Ok(());
    }
    println!("{step} ... missing {}, installing", missing.join(" "));
    run(
        Command::new("rustup")
            .args(["component", "add"])
            .args(&missing)
            .args(["--toolchain", "nightly"]),
        step,
    )
}

fn bpf_linker() -> Result<()> {
    let step = format!("setup: bpf-linker {BPF_LINKER_VERSION}");
    let found = find_bpf_linker().map(|path| {
        let version = bpf_linker_version(&path);
        (path, version)
    });
    match &found {
        Some((_, version)) if version == BPF_LINKER_VERSION => {
            println!("{step} ... ok");
            return Ok(());
        }
        Some((path, other)) => println!(
            "{step} ... {} reports {other}, reinstalling (about 2 minutes)",
            path.display()
        ),
        None => println!("{step} ... not found, installing (about 2 minutes)"),
    }
    // The recipe verified in TOOLCHAIN.md: bpf-linker's default features want LLVM 23, this
    // machine has LLVM 22. Its output streams to the terminal so the build shows progress.
    let mut install = Command::new("cargo");
    install
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22"]);
    if found.is_some() {
        install.arg("--force");
    }
    run(&mut install, &step)
}

/// Where `cargo install` put it (`$CARGO_HOME/bin`) or anywhere on PATH, PATH first because
/// that is the one rustc will run.
fn find_bpf_linker() -> Option<PathBuf> {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")));
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(cargo_home.map(|home| home.join("bin")))
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}

/// The version `bpf-linker --version` reports (`bpf-linker 0.13.0`), or a description of why
/// there is none; either way, anything but the wanted version means reinstalling.
fn bpf_linker_version(path: &Path) -> String {
    match Command::new(path).arg("--version").output() {
        Ok(output) if output.status.success() => {
            let stdout = String::from_utf8_lossy(&output.stdout);
            match stdout.split_whitespace().collect::<Vec<_>>()[..] {
                ["bpf-linker", version] => version.to_owned(),
                _ => format!("an unexpected version {:?}", stdout.trim()),
            }
        }
        Ok(output) => format!("an error ({})", output.status),
        Err(e) => format!("an error ({e})"),
    }
}

/// Pinning maps needs bpffs; this machine has the directory but does not mount it at boot.
fn bpffs() -> Result<()> {
    let step = "setup: bpffs";
    let mut mounted = Command::new("mountpoint");
    mounted.args(["-q", BPFFS]);
    if probe(&mut mounted, step)?.status.success() {
        println!("{step} on {BPFFS} ... ok");
        return Ok(());
    }
    println!("{step} on {BPFFS} ... not mounted, mounting");
    run(
        Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]),
        step,
    )
}

/// The integration tests build their lab hosts as network namespaces.
fn network_namespaces() -> Result<()> {
    let step = "setup: network namespaces";
    let mut list = Command::new("ip");
    list.args(["netns", "list"]);
    let listing = probe(&mut list, step)?;
    check(listing.status, step, &display(&list))?;
    println!("{step} (ip netns) ... ok");
    Ok(())
}
