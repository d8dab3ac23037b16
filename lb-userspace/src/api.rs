//! The admin API: one JSON request and one JSON response per line over a unix socket that only
//! root can open (mode 0600). The daemon serves it; every CLI command except `run`, `check`
//! and `decap` is a client of it. The types here are the whole protocol (sozu's model: one
//! command module shared by both sides).

use crate::{
    acl::AclStatus, blocklist::BlockInfo, connlog::Entry, limits::LimitsSpec, model::Prefix,
};
use serde::{Deserialize, Serialize};
use std::{
    io,
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixListener, UnixStream,
    },
    sync::mpsc,
};

pub const DEFAULT_SOCKET: &str = "/run/xdplb/admin.sock";

/// Bytes read from one connection at most (a request is a few hundred bytes).
const MAX_CONNECTION_BYTES: u64 = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    Reload,
    Drain {
        vip: String,
        backend: IpAddr,
    },
    Undrain {
        vip: String,
        backend: IpAddr,
    },
    /// `None` returns the backend to its configured weight.
    Weight {
        vip: String,
        backend: IpAddr,
        weight: Option<u32>,
    },
    Flows {
        vip: Option<String>,
        backend: Option<IpAddr>,
        limit: usize,
    },
    Stats,
    /// `xdplb block add`: `vip` None = every VIP; `for_s` None = until deleted.
    BlockAdd {
        prefix: Prefix,
        vip: Option<String>,
        for_s: Option<u64>,
        reason: Option<String>,
    },
    BlockDel {
        prefix: Prefix,
        vip: Option<String>,
    },
    BlockList,
    /// `xdplb log`: the last `limit` records, or (`follow`) a stream of new ones, answered
    /// with one `Log` line per batch until the client closes the connection.
    Log {
        vip: Option<String>,
        event: Option<String>,
        limit: usize,
        follow: bool,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data", rename_all = "snake_case")]
pub enum Response {
    Done(String),
    Status(StatusReport),
    Flows(FlowList),
    Stats(crate::stats::Snapshot),
    Blocklist(Vec<BlockInfo>),
    Log(Vec<Entry>),
    /// A follower fell behind and missed this many records.
    LogMissed(u64),
    Error(String),
}

/// What a request gets: one response, or (`xdplb log --follow`) responses until the stream
/// ends or the client goes away.
pub enum Reply {
    One(Response),
    Stream(mpsc::Receiver<Response>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub config_file: PathBuf,
    pub interfaces: Vec<String>,
    /// Configured interfaces without the XDP program (deleted, or re-attaching failed), with
    /// why: VIP traffic arriving there is not balanced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detached: Vec<String>,
    /// How the maps were obtained at start: fresh, adopted from a previous run, or replaced.
    pub maps: String,
    /// Seconds since the flow-table scan behind every `active_flows` started (`None`: no scan
    /// yet). Scans are paced, so counts miss flows opened since; see `drain_complete`.
    pub active_flows_age_s: Option<f64>,
    pub vips: Vec<VipStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: String,
    pub address: String,
    pub forwarding: String,
    /// "maglev", "round-robin" or "least-conn".
    pub scheduler: String,
    /// "connection" or "client" (see `affinity` in the config).
    #[serde(default)]
    pub affinity: String,
    pub ring_size: u32,
    /// Backends that new flows can go to now.
    pub available: usize,
    /// `announced: ...` or `withdrawn: why`; none when `[daemon.announce]` is off.
    #[serde(default)]
    pub announce: Option<String>,
    pub backends: Vec<BackendStatus>,
    #[serde(default)]
    pub acl: AclStatus,
    #[serde(default)]
    pub limits: Option<LimitsSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: IpAddr,
    pub configured_weight: u32,
    /// Weight set from the CLI, if any.
    pub cli_weight: Option<u32>,
    /// Weight new flows see: 0 when drained or down.
    pub effective_weight: u32,
    pub drained: bool,
    /// "up", "down" or "unknown".
    pub health: String,
    /// Seconds since the last health transition.
    pub health_since_s: Option<u64>,
    pub last_failure: Option<String>,
    /// Flows seen within the idle timeout and not closed, as of the last flow-table scan.
    pub active_flows: u64,
    /// Drained, and a flow-table scan that started after the drain took effect found no
    /// active flow: the backend can be stopped. `active_flows == 0` alone can come from a scan
    /// older than a connection opened just before the drain.
    pub drain_complete: bool,
    /// Least-conn VIPs: the active connections the data path compares for new flows.
    pub scheduler_connections: Option<i64>,
    /// "02:00:00:00:00:11 via eth0", or why it is unresolved.
    pub next_hop: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowList {
    /// Entries matching the filter (may exceed `flows.len()` when limited).
    pub matched: usize,
    pub flows: Vec<FlowInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowInfo {
    pub client: String,
    pub vip: String,
    pub protocol: String,
    pub backend: IpAddr,
    pub age_s: u32,
    pub idle_s: u32,
    /// "syn", "established", "fin", "rst", or "udp".
    pub state: String,
    /// `nat` VIPs: the nat address:port the backend sees the connection from.
    #[serde(default)]
    pub nat: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "the xdplb daemon is not running (no socket at {0}); start it with `xdplb run -c FILE`"
    )]
    NotRunning(PathBuf),
    #[error("permission denied on {0}: the admin socket is root-only")]
    PermissionDenied(PathBuf),
    #[error("talking to the daemon at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the daemon sent an invalid response: {0}")]
    Protocol(String),
}

fn io_error(socket: &Path) -> impl Fn(io::Error) -> ApiError + '_ {
    move |source| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ApiError::NotRunning(socket.to_path_buf())
        }
        io::ErrorKind::PermissionDenied => ApiError::PermissionDenied(socket.to_path_buf()),
        _ => ApiError::Io {
            path: socket.to_path_buf(),
            source,
        },
    }
}

/// Connects and sends `request`; returns the response lines.
async fn send(
    socket: &Path,
    request: &Request,
) -> Result<(Lines<BufReader<OwnedReadHalf>>, OwnedWriteHalf), ApiError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(io_error(socket))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    write
        .write_all(line.as_bytes())
        .await
        .map_err(io_error(socket))?;
    // The caller keeps the write half open while it reads: closing it ends a stream.
    Ok((BufReader::new(read).lines(), write))
}

/// Sends one request and waits for its response.
pub async fn call(socket: &Path, request: &Request) -> Result<Response, ApiError> {
    let (mut lines, _write) = send(socket, request).await?;
    let response = lines
        .next_line()
        .await
        .map_err(io_error(socket))?
        .unwrap_or_default();
    serde_json::from_str(&response).map_err(|e| ApiError::Protocol(e.to_string()))
}

/// Sends one request and hands every response line to `each` until the daemon ends the
/// stream or `each` returns false.
pub async fn stream(
    socket: &Path,
    request: &Request,
    mut each: impl FnMut(Response) -> bool,
) -> Result<(), ApiError> {
    let (mut lines, _write) = send(socket, request).await?;
    while let Some(line) = lines.next_line().await.map_err(io_error(socket))? {
        let response =
            serde_json::from_str(&line).map_err(|e| ApiError::Protocol(e.to_string()))?;
        if !each(response) {
            break;
        }
    }
    Ok(())
}

/// Binds the admin socket: removes a stale one, creates the directory, mode 0600.
pub fn bind(socket: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn write_response(write: &mut OwnedWriteHalf, response: &Response) -> io::Result<()> {
    let mut out = serde_json::to_string(response).expect("responses serialize");
    out.push('\n');
    write.write_all(out.as_bytes()).await
}

/// Serves one connection: reads request lines, answers each with `handle`. A streamed reply
/// lasts until it ends or the client closes its side.
pub async fn serve_connection<F, Fut>(stream: UnixStream, handle: F) -> io::Result<()>
where
    F: Fn(Request) -> Fut,
    Fut: std::future::Future<Output = Reply>,
{
    let (read, mut write) = stream.into_split();
    // A client that never sends a newline cannot make the daemon buffer without limit.
    let mut lines = BufReader::new(read.take(MAX_CONNECTION_BYTES)).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(request) => handle(request).await,
            Err(e) => Reply::One(Response::Error(format!("bad request: {e}"))),
        };
        match reply {
            Reply::One(response) => write_response(&mut write, &response).await?,
            Reply::Stream(mut responses) => loop {
                tokio::select! {
                    response = responses.recv() => match response {
                        Some(response) => write_response(&mut write, &response).await?,
                        None => return Ok(()),
                    },
                    // The client closed (or sent more, which a stream does not take).
                    _ = lines.next_line() => return Ok(()),
                }
            },
        }
    }
    Ok(())
}
