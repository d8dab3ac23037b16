//! A backend for lab tests: tells clients which backend they reached, and streams bytes at a
//! bounded rate so a connection can stay open across a drain, reload or restart.
//!
//! TCP protocol, one request line per connection:
//! * `NAME` -> `<name>\n`, then close.
//! * `PEER` -> `<name> <peer address:port>\n` (the address the backend sees), then close.
//! * `STREAM <bytes> <bytes per second>` -> `<name>\n` then exactly `<bytes>` bytes, then close.
//! * `SINK <bytes>` then up to `<bytes>` bytes -> `<name> <bytes read>\n` (an upload).
//! * `ECHO` -> `<name>\n`, then every line back, until the client closes or is silent for
//!   2 minutes: a connection that can stay idle (no packet toward the VIP) and be probed later.
//! * HTTP `GET /` -> `<name>\n`; `GET /bytes/<bytes>/<bytes per second>` -> that many bytes
//!   (paced); any other path (e.g. `/healthz`) -> `<name>\n`. The status is 200, or the number
//!   in the status file when one is given and exists (so a test can make health checks fail
//!   while TCP still connects).
//!
//! TLS (`tls CERT KEY`): the same TCP protocol inside TLS (rustls), for `https` checks.
//!
//! `silent`: accepts TCP connections and never sends a byte (a TLS server that never completes
//! its handshake), closing each after 30 s.
//!
//! UDP: any datagram is answered with `<name>`.
//!
//! Usage: `lab-server NAME LISTEN_ADDR tcp|udp|silent [STATUS_FILE]` or
//! `lab-server NAME LISTEN_ADDR tls CERT_PEM KEY_PEM [STATUS_FILE]`

use rustls::{ServerConfig, ServerConnection, StreamOwned};
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Arc,
    time::{Duration, Instant},
};
use xdplb_tests::pki::ServerCert;

/// How long a `silent` server holds a connection.
const SILENT_FOR: Duration = Duration::from_secs(30);

/// Writes `total` bytes at `rate` bytes per second.
fn paced(out: &mut impl Write, total: u64, rate: u64) -> std::io::Result<()> {
    let chunk = [b'x'; 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(chunk.len() as u64) as usize;
        out.write_all(&chunk[..n])?;
        sent += n as u64;
        let due = Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    Ok(())
}

fn http_status(status_file: Option<&str>) -> u16 {
    status_file
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(200)
}

/// Answers one request on `stream` (plain TCP or TLS over `socket`, whose timeouts a request
/// may change).
fn serve(
    stream: impl Read + Write,
    socket: &TcpStream,
    name: &str,
    status_file: Option<&str>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let words: Vec<&str> = line.split_whitespace().collect();
    match words[..] {
        ["ECHO"] => {
            writeln!(reader.get_mut(), "{name}")?;
            socket.set_read_timeout(Some(Duration::from_secs(120)))?;
            line.clear();
            while reader.read_line(&mut line)? > 0 {
                reader.get_mut().write_all(line.as_bytes())?;
                line.clear();
            }
        }
        ["PEER"] => {
            // What a backend's access log would record: who the connection came from.
            writeln!(reader.get_mut(), "{name} {}", socket.peer_addr()?)?;
        }
        ["STREAM", bytes, rate] => {
            let out = reader.get_mut();
            writeln!(out, "{name}")?;
            paced(out, bytes.parse().unwrap_or(0), rate.parse().unwrap_or(1))?;
        }
        ["SINK", bytes] => {
            let total: u64 = bytes.parse().unwrap_or(0);
            let read = std::io::copy(&mut (&mut reader).take(total), &mut std::io::sink())?;
            writeln!(reader.get_mut(), "{name} {read}")?;
        }
        ["GET", path, ..] => {
            // Skip the request headers.
            let mut header = String::new();
            while reader.read_line(&mut header)? > 2 {
                header.clear();
            }
            let status = http_status(status_file);
            let parts: Vec<&str> = path.split('/').collect();
            let out = reader.get_mut();
            if let ["", "bytes", bytes, rate] = parts[..] {
                let total: u64 = bytes.parse().unwrap_or(0);
                write!(
                    out,
                    "HTTP/1.0 {status} X\r\nContent-Length: {total}\r\nX-Backend: {name}\r\n\r\n"
                )?;
                paced(out, total, rate.parse().unwrap_or(1))?;
            } else {
                let body = format!("{name}\n");
                write!(
                    out,
                    "HTTP/1.0 {status} X\r\nContent-Length: {}\r\nX-Backend: {name}\r\n\r\n{body}",
                    body.len()
                )?;
            }
        }
        _ => writeln!(reader.get_mut(), "{name}")?,
    }
    reader.get_mut().flush()
}

/// One accepted connection, as the mode says.
fn handle(
    stream: TcpStream,
    name: &str,
    tls: Option<&Arc<ServerConfig>>,
    silent: bool,
    status_file: Option<&str>,
) -> std::io::Result<()> {
    if silent {
        // Read (and drop) whatever comes until the client closes or the time is up.
        stream.set_read_timeout(Some(SILENT_FOR))?;
        let _ = std::io::copy(&mut &stream, &mut std::io::sink());
        return Ok(());
    }
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let socket = stream.try_clone()?;
    match tls {
        None => serve(stream, &socket, name, status_file),
        Some(config) => {
            let connection =
                ServerConnection::new(config.clone()).map_err(std::io::Error::other)?;
            let mut tls = StreamOwned::new(connection, stream);
            serve(&mut tls, &socket, name, status_file)?;
            tls.conn.send_close_notify();
            tls.flush()
        }
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = || -> ! {
        eprintln!(
            "usage: lab-server NAME LISTEN_ADDR tcp|udp|silent [STATUS_FILE]\n   \
             or: lab-server NAME LISTEN_ADDR tls CERT_PEM KEY_PEM [STATUS_FILE]"
        );
        std::process::exit(2);
    };
    let (name, listen, proto, rest) = match &args[..] {
        [_, name, listen, proto, rest @ ..] => (name, listen, proto.as_str(), rest),
        _ => usage(),
    };
    let (tls, status_file) = match (proto, rest) {
        ("tls", [cert, key, rest @ ..]) => {
            match ServerCert::server_config(cert.as_ref(), key.as_ref()) {
                Ok(config) => (Some(config), rest.first().cloned()),
                Err(e) => {
                    eprintln!("lab-server: TLS certificate {cert} / key {key}: {e:#}");
                    std::process::exit(2);
                }
            }
        }
        ("tcp" | "udp" | "silent", []) => (None, None),
        ("tcp" | "udp" | "silent", [file]) => (None, Some(file.clone())),
        _ => usage(),
    };
    let silent = proto == "silent";
    if proto == "udp" {
        let socket = UdpSocket::bind(listen)?;
        let mut buf = [0u8; 2048];
        loop {
            let (_, peer) = socket.recv_from(&mut buf)?;
            socket.send_to(name.as_bytes(), peer)?;
        }
    }
    let listener = TcpListener::bind(listen)?;
    for stream in listener.incoming().flatten() {
        let name = name.clone();
        let status_file = status_file.clone();
        let tls = tls.clone();
        std::thread::spawn(move || {
            let _ = handle(stream, &name, tls.as_ref(), silent, status_file.as_deref());
        });
    }
    Ok(())
}
