//! A backend for lab tests: tells clients which backend they reached, and streams bytes at a
//! bounded rate so a connection can stay open across a drain, reload or restart.
//!
//! TCP protocol, one request line per connection:
//! * `NAME` -> `<name>\n`, then close.
//! * `STREAM <bytes> <bytes per second>` -> `<name>\n` then exactly `<bytes>` bytes, then close.
//! * `ECHO` -> `<name>\n`, then every line back, until the client closes or is silent for
//!   2 minutes: a connection that can stay idle (no packet toward the VIP) and be probed later.
//! * HTTP `GET /` -> `<name>\n`; `GET /bytes/<bytes>/<bytes per second>` -> that many bytes
//!   (paced); any other path (e.g. `/healthz`) -> `<name>\n`. The status is 200, or the number
//!   in the status file when one is given and exists (so a test can make health checks fail
//!   while TCP still connects).
//!
//! UDP: any datagram is answered with `<name>`.
//!
//! Usage: `lab-server NAME LISTEN_ADDR tcp|udp [STATUS_FILE]`

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

/// Writes `total` bytes at `rate` bytes per second.
fn paced(out: &mut TcpStream, total: u64, rate: u64) -> std::io::Result<()> {
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

fn serve_tcp(stream: TcpStream, name: &str, status_file: Option<&str>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut out = stream;
    let words: Vec<&str> = line.split_whitespace().collect();
    match words[..] {
        ["ECHO"] => {
            writeln!(out, "{name}")?;
            out.set_read_timeout(Some(Duration::from_secs(120)))?;
            line.clear();
            while reader.read_line(&mut line)? > 0 {
                out.write_all(line.as_bytes())?;
                line.clear();
            }
        }
        ["STREAM", bytes, rate] => {
            writeln!(out, "{name}")?;
            paced(
                &mut out,
                bytes.parse().unwrap_or(0),
                rate.parse().unwrap_or(1),
            )?;
        }
        ["GET", path, ..] => {
            // Skip the request headers.
            let mut header = String::new();
            while reader.read_line(&mut header)? > 2 {
                header.clear();
            }
            let status = http_status(status_file);
            let parts: Vec<&str> = path.split('/').collect();
            if let ["", "bytes", bytes, rate] = parts[..] {
                let total: u64 = bytes.parse().unwrap_or(0);
                write!(
                    out,
                    "HTTP/1.0 {status} X\r\nContent-Length: {total}\r\nX-Backend: {name}\r\n\r\n"
                )?;
                paced(&mut out, total, rate.parse().unwrap_or(1))?;
            } else {
                let body = format!("{name}\n");
                write!(
                    out,
                    "HTTP/1.0 {status} X\r\nContent-Length: {}\r\nX-Backend: {name}\r\n\r\n{body}",
                    body.len()
                )?;
            }
        }
        _ => writeln!(out, "{name}")?,
    }
    out.flush()
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (name, listen, proto, status_file) = match &args[..] {
        [_, name, listen, proto] => (name, listen, proto, None),
        [_, name, listen, proto, file] => (name, listen, proto, Some(file.clone())),
        _ => {
            eprintln!("usage: lab-server NAME LISTEN_ADDR tcp|udp [STATUS_FILE]");
            std::process::exit(2);
        }
    };
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
        std::thread::spawn(move || {
            let _ = serve_tcp(stream, &name, status_file.as_deref());
        });
    }
    Ok(())
}
