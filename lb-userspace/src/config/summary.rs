//! The human description of a configuration that `xdplb check` prints.

use super::table::format_duration;
use super::Config;
use crate::{
    dataplane::AttachMode,
    model::{Announce, CheckKind, HealthSpec},
    scheduler::Scheduler,
};

impl Config {
    /// What would be applied, for `xdplb check`: the interfaces, then one line per VIP followed
    /// by its backends, in aligned columns.
    pub fn summary(&self) -> String {
        let vips = &self.services.vips;
        let mode = xdp_mode_name(self.daemon.xdp_mode);
        let backends: usize = vips.iter().map(|vip| vip.backends.len()).sum();
        let mut out = format!(
            "interfaces {} (xdp_mode {mode}); {}, {}\n",
            self.daemon.interfaces.join(", "),
            count(vips.len(), "VIP"),
            count(backends, "backend"),
        );
        let vip_rows: Vec<Vec<String>> = vips
            .iter()
            .map(|vip| {
                vec![
                    vip.name.clone(),
                    vip.vip.to_string(),
                    vip.forwarding.to_string(),
                    vip.scheduler.to_string(),
                    format!("ring {}", vip.ring_size),
                    health_summary(&vip.health),
                ]
            })
            .collect();
        let backend_rows: Vec<Vec<String>> = vips
            .iter()
            .flat_map(|vip| &vip.backends)
            .map(|backend| {
                vec![
                    backend.addr.to_string(),
                    format!("weight {}", backend.weight),
                    backend
                        .mac
                        .map(|mac| format!("mac {mac}"))
                        .unwrap_or_default(),
                    backend
                        .health_port
                        .map(|port| format!("health port {port}"))
                        .unwrap_or_default(),
                ]
            })
            .collect();
        let mut backend_lines = align(&backend_rows).into_iter();
        for (vip, line) in vips.iter().zip(align(&vip_rows)) {
            out += &line;
            out.push('\n');
            if vip.backends.is_empty() {
                out += "  (no backends: its packets are dropped)\n";
            }
            let filter_lines = vip.acl.status().line().into_iter();
            for filter in filter_lines.chain(vip.limits.map(|l| l.line())) {
                out += &format!("  {filter}\n");
            }
            let announced = self.daemon.announce.is_some() && vip.announce != Announce::Never;
            if announced && vip.scheduler != Scheduler::Maglev {
                out += &format!(
                    "  warning: scheduler \"{}\" chooses per load balancer and this VIP is \
                     announced over BGP: a flow moved to another load balancer (an LB failure, \
                     an ECMP change) keeps its backend only if that load balancer's flow table \
                     knows it; scheduler = \"maglev\" makes the same choice on every load \
                     balancer\n",
                    vip.scheduler
                );
            }
            for line in backend_lines.by_ref().take(vip.backends.len()) {
                out += "  ";
                out += &line;
                out.push('\n');
            }
        }
        out
    }
}

fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

pub(super) fn xdp_mode_name(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Auto => "auto",
        AttachMode::Native => "native",
        AttachMode::Generic => "generic",
    }
}

fn health_summary(health: &HealthSpec) -> String {
    let port = health
        .port
        .map(|port| format!(" port {port}"))
        .unwrap_or_default();
    let every = format_duration(health.interval);
    match &health.kind {
        CheckKind::None => "health none".to_string(),
        CheckKind::Tcp => format!("health tcp{port} every {every}"),
        CheckKind::Http { path, tls, .. } => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            format!("health {scheme} {path}{port} every {every}")
        }
    }
}

/// Pads every column to its widest cell, two spaces apart, without trailing blanks.
fn align(rows: &[Vec<String>]) -> Vec<String> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|row| row.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, &width)| format!("{cell:<width$}"))
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect()
}
