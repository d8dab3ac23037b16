//! Command line: `xdplb run` is the daemon, the other commands are clients of its admin API
//! (except `check`, which only reads a file, and `decap`, which runs on backends).

use crate::{
    api::{self, FlowList, Request, Response, StatusReport},
    config, daemon,
    dataplane::{AttachMode, Dataplane, Role, Sizes},
    model::Prefix,
    stats,
};
use anyhow::{bail, Context as _, Result};
use clap::{CommandFactory, Parser, Subcommand};
use serde::Serialize;
use std::{
    io::{IsTerminal, Write},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[derive(Parser, Debug)]
#[command(
    name = "xdplb",
    version,
    about = "XDP L4 load balancer: daemon and CLI"
)]
pub struct Cli {
    /// Admin socket of the daemon, given before the command: `xdplb --socket PATH status`.
    // Not global, so that the help of `run`, `check`, `decap` and `completions`, which do not
    // use it, does not offer it.
    #[arg(long, env = "XDPLB_SOCKET", default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon in the foreground (SIGHUP reloads, SIGTERM stops).
    Run {
        #[arg(short, long)]
        config: PathBuf,
        /// On exit, detach XDP and remove pinned maps instead of leaving forwarding running.
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Validate a config file and print what it would apply.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Make the daemon re-read its config file.
    Reload,
    /// VIPs, backends, health, weights, active flows.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Stop sending new flows to a backend; established flows continue.
    Drain {
        vip: String,
        backend: IpAddr,
        /// Wait until the backend has no active flow (or the timeout passes).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, e.g. 30s, 5m.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Return a drained backend to service.
    Undrain { vip: String, backend: IpAddr },
    /// Set a backend's weight ("reset" returns to the configured weight).
    Weight {
        vip: String,
        backend: IpAddr,
        /// A weight 0..=65535, or "reset".
        weight: String,
    },
    /// List flows from the flow table.
    Flows {
        vip: Option<String>,
        #[arg(long)]
        backend: Option<IpAddr>,
        /// Print at most this many flows.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Runtime blocklist: drop every packet from source prefixes, for one VIP or all of them.
    Block {
        #[command(subcommand)]
        command: BlockCommand,
    },
    /// Connection log: the last records (new flows, filter drops), or a live stream.
    Log {
        /// Keep printing records as they come.
        #[arg(short, long)]
        follow: bool,
        /// Only this VIP's records (its name).
        #[arg(long)]
        vip: Option<String>,
        /// Only one kind of record.
        #[arg(long, value_parser = crate::connlog::EVENT_KINDS)]
        event: Option<String>,
        /// JSON lines (the file's format) instead of a table.
        #[arg(long)]
        json: bool,
        /// Records shown from the daemon's memory (before following).
        #[arg(short = 'n', long, default_value_t = 20)]
        last: usize,
    },
    /// Counters and rates per VIP and backend.
    Stats {
        #[arg(long)]
        json: bool,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// On a backend: strip `ipip` tunnels for local VIPs (runs until SIGTERM).
    Decap {
        /// Interface the tunnelled packets arrive on (e.g. eth0).
        interface: String,
        /// VIP addresses served on this host.
        #[arg(long = "vip", required = true)]
        vips: Vec<IpAddr>,
        /// Tunnel endpoint addresses of this host (the backend addresses the LB sends to);
        /// default: the interface's global addresses.
        #[arg(long = "local")]
        locals: Vec<IpAddr>,
        /// auto (native, else generic), native or generic XDP.
        #[arg(long, default_value = "auto", value_parser = parse_mode)]
        xdp_mode: AttachMode,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand, Debug)]
pub enum BlockCommand {
    /// Block a source prefix: effective within a second, for established flows too; kept
    /// across restarts.
    Add {
        #[arg(value_parser = crate::acl::parse_network)]
        prefix: Prefix,
        /// Only for this VIP (default: every VIP).
        #[arg(long)]
        vip: Option<String>,
        /// Remove the entry after this long, e.g. 30s, 10m, 1h.
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Free text shown by `block list`.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Remove a blocklist entry (the same prefix and --vip it was added with).
    Del {
        #[arg(value_parser = crate::acl::parse_network)]
        prefix: Prefix,
        #[arg(long)]
        vip: Option<String>,
    },
    /// Entries with the packets each dropped, age and time left.
    List {
        #[arg(long)]
        json: bool,
    },
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    config::parse_duration(text)
}

fn parse_mode(text: &str) -> Result<AttachMode, String> {
    match text {
        "auto" => Ok(AttachMode::Auto),
        "native" => Ok(AttachMode::Native),
        "generic" => Ok(AttachMode::Generic),
        _ => Err(format!("{text:?}: expected auto, native or generic")),
    }
}

pub async fn main(cli: Cli) -> Result<()> {
    let socket = cli.socket.as_path();
    match cli.command {
        Command::Run {
            config,
            detach_on_exit,
        } => {
            daemon::run(daemon::Options {
                config_path: config,
                detach_on_exit,
            })
            .await
        }
        Command::Check { config } => {
            let config = config::load(&config)?;
            print!("{}", config.summary());
            Ok(())
        }
        Command::Reload => done(socket, Request::Reload).await,
        Command::Status { json } => {
            let Response::Status(report) = call(socket, Request::Status).await? else {
                bail!("unexpected response");
            };
            print_either(json, &report, render_status)
        }
        Command::Drain {
            vip,
            backend,
            wait,
            timeout,
        } => {
            done(
                socket,
                Request::Drain {
                    vip: vip.clone(),
                    backend,
                },
            )
            .await?;
            if wait {
                wait_for_drain(socket, &vip, backend, timeout).await?;
            }
            Ok(())
        }
        Command::Undrain { vip, backend } => done(socket, Request::Undrain { vip, backend }).await,
        Command::Weight {
            vip,
            backend,
            weight,
        } => {
            let weight = match weight.as_str() {
                "reset" => None,
                w => Some(w.parse::<u16>().map(u32::from).map_err(|_| {
                    anyhow::anyhow!("weight {w:?}: expected 0..=65535 or \"reset\"")
                })?),
            };
            done(
                socket,
                Request::Weight {
                    vip,
                    backend,
                    weight,
                },
            )
            .await
        }
        Command::Flows {
            vip,
            backend,
            limit,
            json,
        } => {
            let Response::Flows(list) = call(
                socket,
                Request::Flows {
                    vip,
                    backend,
                    limit,
                },
            )
            .await?
            else {
                bail!("unexpected response");
            };
            print_either(json, &list, render_flows)
        }
        Command::Log {
            follow,
            vip,
            event,
            json,
            last,
        } => {
            let args = crate::connlog::cli::LogArgs {
                follow,
                vip,
                event,
                json,
                last,
            };
            crate::connlog::cli::run(socket, args).await
        }
        Command::Stats { json, watch } => stats_command(socket, json, watch).await,
        Command::Block { command } => block_command(socket, command).await,
        Command::Decap {
            interface,
            vips,
            locals,
            xdp_mode,
        } => decap(&interface, &vips, &locals, xdp_mode).await,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "xdplb", &mut std::io::stdout());
            Ok(())
        }
    }
}

async fn call(socket: &Path, request: Request) -> Result<Response> {
    match api::call(socket, &request).await? {
        Response::Error(e) => bail!(e),
        response => Ok(response),
    }
}

async fn done(socket: &Path, request: Request) -> Result<()> {
    match call(socket, request).await? {
        Response::Done(message) => {
            println!("{message}");
            Ok(())
        }
        _ => bail!("unexpected response"),
    }
}

fn print_either<T: Serialize>(json: bool, value: &T, render: fn(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", render(value));
    }
    Ok(())
}

/// Left-aligned columns separated by two spaces.
pub fn table(rows: &[Vec<String>], indent: &str) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = indent.to_string();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn ago(seconds: Option<u64>) -> String {
    match seconds {
        None => String::new(),
        Some(s) if s < 120 => format!("{s}s"),
        Some(s) if s < 7200 => format!("{}m", s / 60),
        Some(s) => format!("{}h", s / 3600),
    }
}

pub fn render_status(report: &StatusReport) -> String {
    let mut out = format!(
        "config {}  interfaces {}  maps {}\n",
        report.config_file.display(),
        report.interfaces.join(","),
        report.maps
    );
    for problem in &report.detached {
        out.push_str(&format!("NOT BALANCING: {problem}\n"));
    }
    let age = stats::scan_age(report.active_flows_age_s);
    if !age.is_empty() {
        out.push_str(&format!("active flows{age}\n"));
    }
    for vip in &report.vips {
        out.push_str(&format!(
            "\n{}  {}  {}  {}  affinity {}  ring {}  {}/{} backends available\n",
            vip.name,
            vip.address,
            vip.forwarding,
            vip.scheduler,
            vip.affinity,
            vip.ring_size,
            vip.available,
            vip.backends.len()
        ));
        if let Some(announce) = &vip.announce {
            out.push_str(&format!("  {announce}\n"));
        }
        let filter_lines = vip
            .acl
            .line()
            .into_iter()
            .chain(vip.limits.map(|l| l.line()));
        for line in filter_lines {
            out.push_str(&format!("  {line}\n"));
        }
        // Least-conn VIPs: the count the data path picks by, next to the flow scan's ACTIVE.
        let conns = vip
            .backends
            .iter()
            .any(|b| b.scheduler_connections.is_some());
        let mut header = vec!["BACKEND", "WEIGHT", "STATE", "HEALTH", "SINCE", "ACTIVE"];
        header.extend(conns.then_some("CONNS"));
        header.extend(["NEXT HOP", "LAST FAILURE"]);
        let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
        for b in &vip.backends {
            let weight = match b.cli_weight {
                Some(w) => format!(
                    "{} (cli {w}, config {})",
                    b.effective_weight, b.configured_weight
                ),
                None if b.effective_weight != b.configured_weight => {
                    format!("{} (config {})", b.effective_weight, b.configured_weight)
                }
                None => b.effective_weight.to_string(),
            };
            let mut row = vec![
                b.address.to_string(),
                weight,
                match (b.drained, b.drain_complete) {
                    (false, _) => "active",
                    (true, false) => "draining",
                    (true, true) => "drained",
                }
                .into(),
                b.health.clone(),
                ago(b.health_since_s),
                b.active_flows.to_string(),
            ];
            if conns {
                row.push(
                    b.scheduler_connections
                        .map(|c| c.to_string())
                        .unwrap_or_default(),
                );
            }
            row.extend([
                b.next_hop.clone(),
                b.last_failure.clone().unwrap_or_default(),
            ]);
            rows.push(row);
        }
        out.push_str(&table(&rows, "  "));
    }
    out
}

pub fn render_flows(list: &FlowList) -> String {
    let mut rows = vec![
        ["CLIENT", "VIP", "PROTO", "BACKEND", "AGE", "IDLE", "STATE"]
            .map(String::from)
            .to_vec(),
    ];
    // The NAT column only when some flow is nat'ed: other modes have nothing to show there.
    let nat = list.flows.iter().any(|f| f.nat.is_some());
    if nat {
        rows[0].insert(4, "NAT".into());
    }
    for f in &list.flows {
        let mut row = vec![
            f.client.clone(),
            f.vip.clone(),
            f.protocol.clone(),
            f.backend.to_string(),
            format!("{}s", f.age_s),
            format!("{}s", f.idle_s),
            f.state.clone(),
        ];
        if nat {
            row.insert(4, f.nat.clone().unwrap_or_else(|| "-".into()));
        }
        rows.push(row);
    }
    let mut out = table(&rows, "");
    if list.matched > list.flows.len() {
        out.push_str(&format!(
            "({} of {} matching flows shown; use --limit)\n",
            list.flows.len(),
            list.matched
        ));
    }
    out
}

/// Polls the backend's drain, printing a progress line, until it is complete or the timeout
/// passes. Complete means a flow-table scan that started after the drain found no active flow:
/// an older scan cannot have seen a connection opened just before the drain.
async fn wait_for_drain(
    socket: &Path,
    vip: &str,
    backend: IpAddr,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let terminal = std::io::stdout().is_terminal();
    loop {
        let Response::Status(report) = call(socket, Request::Status).await? else {
            bail!("unexpected response");
        };
        let b = report
            .vips
            .iter()
            .filter(|v| {
                v.name == vip || v.address == vip || v.address.starts_with(&format!("{vip}:"))
            })
            .flat_map(|v| &v.backends)
            .find(|b| b.address == backend)
            .context("the backend disappeared from the config while draining")?;
        if !b.drained {
            if terminal {
                println!();
            }
            bail!("{backend} was undrained while waiting");
        }
        let (active, complete) = (b.active_flows, b.drain_complete);
        let line = if complete || active > 0 {
            format!(
                "draining {vip} {backend}: {active} active flows{}",
                stats::scan_age(report.active_flows_age_s)
            )
        } else {
            format!("draining {vip} {backend}: waiting for a flow-table scan that started after the drain")
        };
        if terminal {
            print!("\r\x1b[2K{line}");
            std::io::stdout().flush()?;
        } else {
            println!("{line}");
        }
        if complete {
            if terminal {
                println!();
            }
            println!("drained: {backend} has no active flow");
            return Ok(());
        }
        if Instant::now() >= deadline {
            if terminal {
                println!();
            }
            bail!("timed out after {timeout:?} with {active} active flows on {backend} (it stays drained)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn block_command(socket: &Path, command: BlockCommand) -> Result<()> {
    match command {
        BlockCommand::Add {
            prefix,
            vip,
            duration,
            reason,
        } => {
            let for_s = duration.map(|d| d.as_secs().max(1));
            let request = Request::BlockAdd {
                prefix,
                vip,
                for_s,
                reason,
            };
            done(socket, request).await
        }
        BlockCommand::Del { prefix, vip } => done(socket, Request::BlockDel { prefix, vip }).await,
        BlockCommand::List { json } => {
            let Response::Blocklist(rows) = call(socket, Request::BlockList).await? else {
                bail!("unexpected response");
            };
            print_either(json, &rows, |rows| crate::blocklist::render(rows))
        }
    }
}

async fn stats_command(socket: &Path, json: bool, watch: bool) -> Result<()> {
    let fetch = || async {
        match call(socket, Request::Stats).await? {
            Response::Stats(snapshot) => Ok(snapshot),
            _ => bail!("unexpected response"),
        }
    };
    if !watch {
        return print_either(json, &fetch().await?, stats::render_table);
    }
    crate::watch::run(fetch, json).await
}

/// `xdplb decap`: loads the decap program on a backend and keeps it attached until stopped.
async fn decap(
    interface: &str,
    vips: &[IpAddr],
    locals: &[IpAddr],
    mode: AttachMode,
) -> Result<()> {
    let key = |addr: &IpAddr| crate::state::addr_key(*addr);
    let locals = if locals.is_empty() {
        crate::net::interface_addresses(interface).map_err(anyhow::Error::msg)?
    } else {
        locals.to_vec()
    };
    if locals.is_empty() {
        bail!("{interface} has no global address to end tunnels on: give --local ADDRESS");
    }
    let mut dataplane = Dataplane::load(Role::Decap, Sizes::UNUSED, None)?;
    dataplane.set_decap_local(&locals.iter().map(key).collect::<Vec<_>>())?;
    dataplane.set_decap_vips(&vips.iter().map(key).collect::<Vec<_>>())?;
    // Subscribed before attaching, so no change after the attachment is missed.
    let mut link_events = crate::links::watch(vec![interface.to_string()])?;
    dataplane.attach(interface, mode)?;
    let program_id = dataplane.program_id()?;
    let mut present = true;
    tracing::info!(%interface, ?locals, ?vips, "decap program attached; stop with SIGTERM or Ctrl-C");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            Some(event) = link_events.recv() => {
                match crate::links::current(&[event.name().to_string()]).await {
                    Ok(now) => {
                        for state in now {
                            present = follow_decap_interface(&mut dataplane, &state, present, program_id, mode);
                        }
                    }
                    Err(e) => tracing::error!(%interface, "reading the interface's state: {e}"),
                }
            }
        }
    }
    Ok(())
}

/// Attaches the decap program again when its interface came back without it. `present`:
/// whether the interface existed at the last event; returns whether it does now.
fn follow_decap_interface(
    dataplane: &mut Dataplane,
    state: &crate::links::LinkEvent,
    present: bool,
    program_id: u32,
    mode: AttachMode,
) -> bool {
    use crate::links::LinkEvent;
    match state {
        LinkEvent::Removed { name, .. } => {
            if present {
                tracing::error!(interface = %name, "interface deleted: tunnels are not decapsulated until it comes back");
            }
            false
        }
        LinkEvent::Present {
            name, xdp_program, ..
        } => {
            if *xdp_program != Some(program_id) {
                match dataplane.attach(name, mode) {
                    Ok(_) => {
                        tracing::info!(interface = %name, "interface back: decap program attached again")
                    }
                    Err(e) => {
                        tracing::error!(interface = %name, "re-attaching the decap program failed: {e}")
                    }
                }
            }
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BackendStatus, FlowInfo, VipStatus};

    fn report() -> StatusReport {
        let backend = |addr: &str, weight, cli, drained, health: &str, active| BackendStatus {
            address: addr.parse().unwrap(),
            configured_weight: 100,
            cli_weight: cli,
            effective_weight: weight,
            drained,
            health: health.into(),
            health_since_s: Some(90),
            last_failure: (health == "down").then(|| "connect: connection refused".into()),
            active_flows: active,
            drain_complete: drained && active == 0,
            scheduler_connections: None,
            next_hop: "02:00:00:00:00:11 ifindex 2".into(),
        };
        StatusReport {
            config_file: "/etc/xdplb/xdplb.toml".into(),
            interfaces: vec!["eth0".into()],
            detached: Vec::new(),
            maps: "fresh".into(),
            active_flows_age_s: Some(8.25),
            vips: vec![VipStatus {
                name: "web".into(),
                address: "192.0.2.10:80/tcp".into(),
                forwarding: "dsr".into(),
                scheduler: "maglev".into(),
                affinity: "client".into(),
                ring_size: 65537,
                available: 1,
                announce: Some("announced: 1 backend up".into()),
                backends: vec![
                    backend("10.1.0.11", 100, None, false, "up", 12),
                    backend("10.1.0.12", 0, None, true, "up", 3),
                    backend("10.1.0.13", 0, Some(50), false, "down", 0),
                    backend("10.1.0.14", 0, None, true, "up", 0),
                ],
                acl: crate::acl::AclStatus {
                    allow: Some(vec!["10.0.0.0/8".into(), "2001:db8::/32".into()]),
                    deny: vec!["10.9.0.0/16".into()],
                },
                limits: Some(crate::limits::LimitsSpec {
                    per_source: Some(10),
                    burst: None,
                    total: Some(1000),
                }),
            }],
        }
    }

    #[test]
    fn status_table_is_aligned_and_complete() {
        let expected = "\
config /etc/xdplb/xdplb.toml  interfaces eth0  maps fresh
active flows (counted 8.2 s ago)

web  192.0.2.10:80/tcp  dsr  maglev  affinity client  ring 65537  1/4 backends available
  announced: 1 backend up
  sources: allow 10.0.0.0/8, 2001:db8::/32; deny 10.9.0.0/16
  limits: 10 new flows/s per source (burst 10), 1000 new flows/s in total
  BACKEND    WEIGHT                  STATE     HEALTH  SINCE  ACTIVE  NEXT HOP                     LAST FAILURE
  10.1.0.11  100                     active    up      90s    12      02:00:00:00:00:11 ifindex 2
  10.1.0.12  0 (config 100)          draining  up      90s    3       02:00:00:00:00:11 ifindex 2
  10.1.0.13  0 (cli 50, config 100)  active    down    90s    0       02:00:00:00:00:11 ifindex 2  connect: connection refused
  10.1.0.14  0 (config 100)          drained   up      90s    0       02:00:00:00:00:11 ifindex 2
";
        assert_eq!(render_status(&report()), expected);
    }

    #[test]
    fn least_conn_status_shows_the_counts_new_flows_are_picked_by() {
        let mut report = report();
        let vip = &mut report.vips[0];
        vip.scheduler = "least-conn".into();
        vip.affinity = "connection".into();
        for (b, conns) in vip.backends.iter_mut().zip([11, 3, 0, 0]) {
            b.scheduler_connections = Some(conns);
        }
        let expected = "\
config /etc/xdplb/xdplb.toml  interfaces eth0  maps fresh
active flows (counted 8.2 s ago)

web  192.0.2.10:80/tcp  dsr  least-conn  affinity connection  ring 65537  1/4 backends available
  announced: 1 backend up
  sources: allow 10.0.0.0/8, 2001:db8::/32; deny 10.9.0.0/16
  limits: 10 new flows/s per source (burst 10), 1000 new flows/s in total
  BACKEND    WEIGHT                  STATE     HEALTH  SINCE  ACTIVE  CONNS  NEXT HOP                     LAST FAILURE
  10.1.0.11  100                     active    up      90s    12      11     02:00:00:00:00:11 ifindex 2
  10.1.0.12  0 (config 100)          draining  up      90s    3       3      02:00:00:00:00:11 ifindex 2
  10.1.0.13  0 (cli 50, config 100)  active    down    90s    0       0      02:00:00:00:00:11 ifindex 2  connect: connection refused
  10.1.0.14  0 (config 100)          drained   up      90s    0       0      02:00:00:00:00:11 ifindex 2
";
        assert_eq!(render_status(&report), expected);
    }

    #[test]
    fn status_json_round_trips() {
        let json = serde_json::to_string(&report()).unwrap();
        let back: StatusReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report());
        assert!(json.contains("\"drained\":true"), "{json}");
    }

    #[test]
    fn flows_table_says_when_output_was_limited() {
        let list = FlowList {
            matched: 3,
            flows: vec![FlowInfo {
                client: "198.51.100.7:40000".into(),
                vip: "web".into(),
                protocol: "tcp".into(),
                backend: "10.1.0.11".parse().unwrap(),
                age_s: 75,
                idle_s: 2,
                state: "established".into(),
                nat: None,
            }],
        };
        let expected = "\
CLIENT              VIP  PROTO  BACKEND    AGE  IDLE  STATE
198.51.100.7:40000  web  tcp    10.1.0.11  75s  2s    established
(1 of 3 matching flows shown; use --limit)
";
        assert_eq!(render_flows(&list), expected);
    }

    #[test]
    fn durations_and_ages_read_naturally() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert!(parse_duration("soon").is_err());
        assert_eq!(ago(Some(59)), "59s");
        assert_eq!(ago(Some(600)), "10m");
        assert_eq!(ago(Some(7200)), "2h");
        assert_eq!(ago(None), "");
    }

    #[test]
    fn every_command_parses() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "xdplb",
            "drain",
            "web",
            "10.1.0.11",
            "--wait",
            "--timeout",
            "2m",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Drain { wait: true, timeout, .. } if timeout == Duration::from_secs(120)
        ));
        let err = Cli::try_parse_from(["xdplb", "drain", "web", "not-an-ip"]).unwrap_err();
        assert!(err.to_string().contains("not-an-ip"), "{err}");
        let cli = Cli::try_parse_from(["xdplb", "--socket", "/tmp/a.sock", "status"]).unwrap();
        assert_eq!(cli.socket, PathBuf::from("/tmp/a.sock"));
    }

    #[test]
    fn decap_help_describes_its_arguments_and_offers_no_socket() {
        let mut command = Cli::command();
        let help = command
            .find_subcommand_mut("decap")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(!help.contains("--socket"), "{help}");
        let interface = help
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("<INTERFACE>"))
            .nth(1)
            .unwrap_or_default();
        assert!(
            interface.contains("Interface the tunnelled packets"),
            "{help}"
        );
    }
}
