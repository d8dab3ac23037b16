//! A backend for lab tests: tells clients which backend they reached, and streams bytes at a
//! bounded rate so a connection can stay open across a drain, reload or restart.
//!
//! TCP protocol, one request line per connection:
//! * `NAME` -> `<name>\n`, then close.
//! * `STREAM <bytes> <bytes per second>` -> `<name>\n` then exactly `<bytes>` bytes, then close.
//!
//! UDP: any datagram is answered with `<name>`.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

fn serve_tcp(stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut out = stream;
    writeln!(out, "{name}")?;
    let words: Vec<&str> = line.split_whitespace().collect();
    if let ["STREAM", bytes, rate] = words[..] {
        let total: u64 = bytes.parse().unwrap_or(0);
        let rate: u64 = rate.parse::<u64>().unwrap_or(1).max(1);
        let chunk = vec![b'x'; 1024];
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(chunk.len() as u64) as usize;
            out.write_all(&chunk[..n])?;
            sent += n as u64;
            // Pace to the requested rate.
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    out.flush()
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, name, listen, proto] = &args[..] else {
        eprintln!("usage: lab-server NAME LISTEN_ADDR tcp|udp");
        std::process::exit(2);
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
        std::thread::spawn(move || {
            let _ = serve_tcp(stream, &name);
        });
    }
    Ok(())
}
