//! `xdplb log`: the daemon's last records, or a live stream, as a table or JSON lines.

use super::Entry;
use crate::api::{self, Request, Response};
use anyhow::Result;
use std::{io::Write, path::Path};

/// Column widths of the table; a live stream cannot measure its rows in advance.
const WIDTHS: [usize; 6] = [30, 19, 12, 5, 24, 0];
const HEADER: [&str; 6] = ["TIME", "EVENT", "VIP", "PROTO", "CLIENT", "BACKEND"];

pub struct LogArgs {
    pub follow: bool,
    pub vip: Option<String>,
    pub event: Option<String>,
    pub json: bool,
    /// How many of the last records to show (then, following, the new ones).
    pub last: usize,
}

pub async fn run(socket: &Path, args: LogArgs) -> Result<()> {
    let request = Request::Log {
        vip: args.vip.clone(),
        event: args.event.clone(),
        limit: args.last,
        follow: args.follow,
    };
    let mut out = std::io::stdout().lock();
    // The header once the daemon answered with records (not above an error).
    let mut header = !args.json;
    // Following, the daemon sends the last records first, then new ones as they come: none
    // is missed or shown twice in between.
    let mut failure = Ok(());
    api::stream(socket, &request, |response| {
        let printed = match response {
            Response::Log(entries) => {
                if std::mem::take(&mut header) {
                    let _ = writeln!(out, "{}", row(HEADER.map(str::to_string)));
                }
                print(&mut out, &entries, args.json)
            }
            Response::LogMissed(n) => {
                eprintln!("xdplb log: fell behind, {n} records not shown");
                Ok(())
            }
            Response::Error(e) => Err(anyhow::anyhow!("{e}")),
            other => Err(anyhow::anyhow!("unexpected response: {other:?}")),
        };
        // Stop on an error or a closed stdout (`| head`); without --follow after one answer.
        failure = printed;
        failure.is_ok() && args.follow
    })
    .await?;
    failure
}

fn print(out: &mut impl Write, entries: &[Entry], json: bool) -> Result<()> {
    for entry in entries {
        if json {
            serde_json::to_writer(&mut *out, entry)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", row(cells(entry)))?;
        }
    }
    out.flush()?;
    Ok(())
}

fn cells(entry: &Entry) -> [String; 6] {
    let event = match &entry.limit {
        Some(limit) => format!("{}:{limit}", entry.event),
        None => entry.event.clone(),
    };
    let backend = match (entry.backend, &entry.nat) {
        (Some(b), Some(nat)) => format!("{b} (nat {nat})"),
        (Some(b), None) => format!("{b} ({})", entry.forwarding),
        (None, _) => "-".to_string(),
    };
    [
        entry.time.clone(),
        event,
        entry.vip.clone(),
        entry.proto.clone(),
        entry.client.clone(),
        backend,
    ]
}

fn row(cells: [String; 6]) -> String {
    cells
        .iter()
        .zip(WIDTHS)
        .map(|(cell, width)| format!("{cell:<width$}"))
        .collect::<Vec<_>>()
        .join(" ")
        .trim_end()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_line_up_under_the_header() {
        let entry = Entry {
            time: "2026-11-30T08:00:00.123456789Z".to_string(),
            event: "new".to_string(),
            vip: "web".to_string(),
            proto: "tcp".to_string(),
            client: "192.0.2.1:40000".to_string(),
            port: 80,
            backend: Some("10.0.0.1".parse().unwrap()),
            forwarding: "dsr".to_string(),
            limit: None,
            nat: None,
        };
        let header = row(HEADER.map(str::to_string));
        let line = row(cells(&entry));
        assert_eq!(header.find("CLIENT"), line.find("192.0.2.1"));
        assert!(line.ends_with("10.0.0.1 (dsr)"), "{line}");
    }
}
