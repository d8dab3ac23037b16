//! How much of the machine work outside the lab took while a window ran. The bench shares its
//! cores with other users, and they do not cost every system alike: a userspace proxy's threads
//! wait for the CPU behind them, while XDP and the kernel's forwarding run in softirq, which
//! the scheduler does not delay. So every window says how busy the rest of the machine was.
//!
//! Counted per process: the CPU time (user + system) of every process outside the lab's
//! namespaces, other than the bench itself (which runs the client) and kernel threads
//! (ksoftirqd forwards the lab's packets when softirq falls behind). Approximate: a process
//! that exits within the window is missed, and lab softirq work that interrupts an outside
//! process is charged to it (this kernel accounts by ticks).

use anyhow::{Context as _, Result};
use std::{collections::HashMap, os::unix::fs::MetadataExt as _, time::Instant};
use xdplb_tests::lab::Lab;

/// `PF_KTHREAD` in a task's flags (include/linux/sched.h).
const PF_KTHREAD: u64 = 0x0020_0000;

pub struct Others {
    lab_namespaces: Vec<u64>,
    started: Instant,
    /// Outside processes' CPU ticks at the start, by pid.
    at_start: HashMap<u32, u64>,
}

impl Others {
    pub fn start(lab: &Lab) -> Result<Self> {
        let hosts = [&lab.client, &lab.lb].into_iter().chain(&lab.backends);
        let lab_namespaces = hosts
            .map(|h| &h.ns)
            .chain([&lab.switch])
            .map(|ns| {
                let path = format!("/var/run/netns/{}", ns.name);
                Ok(std::fs::metadata(&path)
                    .with_context(|| format!("reading {path}"))?
                    .ino())
            })
            .collect::<Result<_>>()?;
        let mut others = Self {
            lab_namespaces,
            started: Instant::now(),
            at_start: HashMap::new(),
        };
        others.at_start = others.outside_ticks()?;
        Ok(others)
    }

    /// The share of the machine's CPU (0 to 1) that processes outside the lab took since
    /// `start` (a process started meanwhile counts from its start).
    pub fn share(&self) -> Result<f64> {
        let ticks: u64 = self
            .outside_ticks()?
            .into_iter()
            .map(|(pid, now)| now.saturating_sub(self.at_start.get(&pid).copied().unwrap_or(0)))
            .sum();
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        Ok(ticks as f64 / (per_second * cores * self.started.elapsed().as_secs_f64()))
    }

    /// utime + stime of every process outside the lab, this one and kernel threads.
    fn outside_ticks(&self) -> Result<HashMap<u32, u64>> {
        let own = std::process::id();
        let mut ticks = HashMap::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let in_lab = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|ns| self.lab_namespaces.contains(&ns.ino()));
            if pid == own || in_lab {
                continue;
            }
            // Processes may exit meanwhile: skip what cannot be read.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields counted after the parenthesised name: 9 flags, 14 utime, 15 stime.
            let fields: Vec<u64> = stat
                .rsplit_once(')')
                .map_or("", |(_, rest)| rest)
                .split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect();
            let (Some(flags), Some(utime), Some(stime)) =
                (fields.get(6), fields.get(11), fields.get(12))
            else {
                continue;
            };
            if flags & PF_KTHREAD == 0 {
                ticks.insert(pid, utime + stime);
            }
        }
        Ok(ticks)
    }
}
