//! How much of the machine work outside the lab took while a window ran. The bench shares its
//! cores with other users, and they do not cost every system alike: a userspace proxy's threads
//! wait for the CPU behind them, while XDP and the kernel's forwarding run in softirq, which
//! the scheduler does not delay. So every window says how busy the rest of the machine was.
//!
//! Approximate: the machine's busy time (`/proc/stat`: user, system, irq and softirq, since
//! this kernel's tick accounting also charges softirq ticks to the task they interrupted) minus
//! that of the processes in the lab's namespaces, of the bench itself (which runs the client)
//! and of kernel threads (ksoftirqd forwards the lab's packets when softirq falls behind).

use anyhow::{Context as _, Result};
use std::{os::unix::fs::MetadataExt as _, time::Instant};
use xdplb_tests::lab::Lab;

/// `PF_KTHREAD` in a task's flags (include/linux/sched.h).
const PF_KTHREAD: u64 = 0x0020_0000;

pub struct Others {
    lab_namespaces: Vec<u64>,
    started: Instant,
    busy: u64,
    lab: u64,
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
            busy: 0,
            lab: 0,
        };
        (others.busy, others.lab) = others.ticks()?;
        Ok(others)
    }

    /// The share of the machine's CPU (0 to 1) that work outside the lab took since `start`.
    pub fn share(&self) -> Result<f64> {
        let (busy, lab) = self.ticks()?;
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let others = (busy - self.busy).saturating_sub(lab - self.lab) as f64;
        Ok(others / (per_second * cores * self.started.elapsed().as_secs_f64()))
    }

    /// The machine's busy ticks, and those of the lab's processes, this one and kernel threads.
    fn ticks(&self) -> Result<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .context("no cpu line in /proc/stat")?
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        // user, nice, system, (idle, iowait,) irq, softirq.
        let busy = [0, 1, 2, 5, 6].iter().filter_map(|&i| cpu.get(i)).sum();
        let own = std::process::id();
        let mut lab = 0;
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // Processes may exit meanwhile: skip what cannot be read.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields counted after the parenthesised name: 9 flags, 14 utime, 15 stime.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map_or("", |(_, rest)| rest)
                .split_whitespace()
                .collect();
            let kernel_thread = fields
                .get(6)
                .and_then(|f| f.parse::<u64>().ok())
                .is_some_and(|flags| flags & PF_KTHREAD != 0);
            let in_lab = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|ns| self.lab_namespaces.contains(&ns.ino()));
            if pid != own && !in_lab && !kernel_thread {
                continue;
            }
            lab += fields
                .get(11..13)
                .map_or(0, |t| t.iter().map(|v| v.parse::<u64>().unwrap_or(0)).sum());
        }
        Ok((busy, lab))
    }
}
