//! BIRD 2 in lab namespaces: each BIRD runs in the foreground in its namespace with its own
//! config, control socket and log under a temp dir, and is killed on drop. Nothing touches the
//! system-wide BIRD (`/etc/bird`, `/run/bird`).
//!
//! The configs are the files in `examples/bird/` that docs/ha.md shows: `xdplb-host.conf` on
//! every LB as it is, `router.conf` on the router.

use crate::lab::{sh, Netns, Process};
use anyhow::{bail, Context as _, Result};
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// `[daemon.announce] table` of the lab LBs: the table `xdplb-host.conf` exports.
pub const ANNOUNCE_TABLE: u32 = 4242;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/bird")
        .join(name)
}

/// The BIRD config of an xdplb host (docs/ha.md).
pub fn lb_config() -> PathBuf {
    example("xdplb-host.conf")
}

/// The BIRD config of the lab's router (docs/ha.md).
pub fn router_config() -> PathBuf {
    example("router.conf")
}

pub struct Bird {
    dir: PathBuf,
    socket: PathBuf,
    _process: Process,
}

impl Bird {
    /// Starts `bird -f` with `config` in `ns`; `name` makes its files unique.
    pub fn start(ns: &Netns, name: &str, config: &Path) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{name}-bird"));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("bird.ctl");
        let log = File::create(dir.join("bird.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "bird", "-f", "-c"])
            .arg(config)
            .arg("-s")
            .arg(&socket)
            .arg("-P")
            .arg(dir.join("bird.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting bird (installed by `cargo xtask setup`: Debian bird2)")?;
        let bird = Self {
            dir,
            socket,
            _process: Process(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while bird.birdc("show status").is_err() {
            if Instant::now() > deadline {
                bail!("bird in {} did not start; log:\n{}", ns.name, bird.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(bird)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bird.log")).unwrap_or_default()
    }

    /// Runs a `birdc` command on this BIRD's control socket.
    pub fn birdc(&self, command: &str) -> Result<String> {
        sh(&format!("birdc -s {} {command}", self.socket.display()))
    }

    /// Waits until each BGP protocol in `protocols` is Established.
    pub fn wait_established(&self, protocols: &[&str]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.birdc("show protocols")?;
            let up = |p: &&str| {
                text.lines()
                    .any(|l| l.starts_with(&format!("{p} ")) && l.contains("Established"))
            };
            if protocols.iter().all(up) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "BGP sessions not established in 30 s:\n{text}\nlog:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
