//! One check of one target (TCP connect, or a minimal HTTP/1.1 GET over TCP or TLS), and when to
//! run the next.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    io,
    net::SocketAddr,
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::{timeout_at, Instant},
};

use super::{tls::Tls, CheckTarget, Probe};

/// Longest status line read; a real one ("HTTP/1.1 503 Service Unavailable") is far shorter, and
/// the bound keeps a misbehaving backend from making us buffer its body.
const STATUS_LINE_MAX: usize = 512;

/// Floor of the check interval.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// A target's check with everything that does not change between runs prepared once.
pub(super) struct Prober {
    addr: SocketAddr,
    timeout: Duration,
    http: Option<Http>,
}

struct Http {
    request: Box<[u8]>,
    expect_status: u16,
    /// HTTPS; an error (a TLS setup that cannot work) fails every check with it.
    tls: Option<Result<Tls, String>>,
}

impl Prober {
    pub fn new(target: &CheckTarget) -> Self {
        let http = match &target.probe {
            Probe::Tcp => None,
            Probe::Http {
                path,
                expect_status,
                host,
                tls,
            } => Some(Http {
                request: request(target.addr, path, host.as_deref()),
                expect_status: *expect_status,
                tls: tls
                    .as_ref()
                    .map(|spec| Tls::new(spec, target.addr.ip(), host.as_deref())),
            }),
        };
        Self {
            addr: target.addr,
            timeout: target.timeout,
            http,
        }
    }

    /// Runs the check once; `Err` holds why it failed. The timeout bounds the whole check, and
    /// the reason names the step that ran out of time.
    pub async fn run(&self) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout;
        let stream = timeout_at(deadline, self.connect())
            .await
            .map_err(|_| "connect: timeout".to_owned())?
            .map_err(|e| format!("connect: {}", describe(&e)))?;
        let Some(http) = &self.http else {
            return Ok(());
        };
        match &http.tls {
            None => http.exchange(stream, deadline).await,
            Some(Err(reason)) => Err(format!("TLS: {reason}")),
            Some(Ok(tls)) => {
                let stream = timeout_at(deadline, tls.handshake(stream))
                    .await
                    .map_err(|_| "TLS: timeout in the handshake".to_owned())?
                    .map_err(|e| format!("TLS: {}", describe(&e)))?;
                http.exchange(stream, deadline).await
            }
        }
    }

    async fn connect(&self) -> io::Result<TcpStream> {
        let socket = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // Close with RST instead of FIN: otherwise every check leaves a socket in TIME_WAIT on
        // the balancer for a minute (60k of them for 1000 backends checked every second).
        socket.set_zero_linger()?;
        socket.connect(self.addr).await
    }
}

impl Http {
    /// Sends the request and reads the status line, by `deadline`.
    async fn exchange(
        &self,
        mut stream: impl AsyncRead + AsyncWrite + Unpin,
        deadline: Instant,
    ) -> Result<(), String> {
        timeout_at(deadline, stream.write_all(&self.request))
            .await
            .map_err(|_| "HTTP: timeout sending the request".to_owned())?
            .map_err(|e| format!("HTTP: send: {}", describe(&e)))?;
        let status = timeout_at(deadline, read_status(&mut stream))
            .await
            .map_err(|_| "HTTP: timeout waiting for the status line".to_owned())??;
        if status == self.expect_status {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    }
}

fn request(addr: SocketAddr, path: &str, host: Option<&str>) -> Box<[u8]> {
    let host = match host {
        Some(host) => host.to_owned(),
        // SocketAddr's form is a valid Host header for both families ("[::1]:8080").
        None => addr.to_string(),
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: xdplb-health\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
    .into_boxed_slice()
}

/// Reads until the status line is complete and returns its code; the rest is never read.
async fn read_status(stream: &mut (impl AsyncRead + Unpin)) -> Result<u16, String> {
    let mut buf = [0u8; STATUS_LINE_MAX];
    let mut len = 0;
    loop {
        if let Some(end) = buf[..len].iter().position(|&b| b == b'\n') {
            return parse_status_line(&buf[..end]);
        }
        if len == buf.len() {
            return Err("HTTP: status line too long".to_owned());
        }
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(|e| format!("HTTP: read: {}", describe(&e)))?;
        if n == 0 {
            return Err(if len == 0 {
                "HTTP: connection closed without a response"
            } else {
                "HTTP: connection closed inside the status line"
            }
            .to_owned());
        }
        len += n;
    }
}

/// Parses "HTTP/1.1 200 OK" (without the line feed; the reason phrase is optional).
fn parse_status_line(line: &[u8]) -> Result<u16, String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let malformed = || {
        format!(
            "HTTP: malformed status line {:?}",
            String::from_utf8_lossy(line)
        )
    };
    let rest = line.strip_prefix(b"HTTP/").ok_or_else(malformed)?;
    let mut fields = rest.splitn(3, |&b| b == b' ');
    let _version = fields.next();
    match fields.next() {
        Some(&[a, b, c]) if [a, b, c].iter().all(u8::is_ascii_digit) => Ok([a, b, c]
            .iter()
            .fold(0, |n, d| n * 10 + u16::from(d - b'0'))),
        _ => Err(malformed()),
    }
}

/// "connection refused" rather than "Connection refused (os error 111)": reasons are read
/// after "connect: " in logs and status output.
fn describe(err: &io::Error) -> String {
    let text = err.to_string();
    let text = match err.raw_os_error() {
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .unwrap_or(&text),
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// When a target's checks run. Phases are pseudo-random but derived from the target, so a
/// thousand targets added at once do not all connect in the same millisecond, and a given target
/// behaves the same in every run.
pub(super) struct Schedule {
    /// The interval in nanoseconds, at least [`MIN_INTERVAL`].
    interval: u64,
    /// xorshift64* state; never 0.
    rng: u64,
}

impl Schedule {
    pub fn new(target: &CheckTarget) -> Self {
        let mut hasher = DefaultHasher::new();
        target.hash(&mut hasher);
        Self {
            // A zero interval (config validation rejects it) would otherwise divide by zero
            // below, or probe in a tight loop.
            interval: u64::try_from(target.interval.max(MIN_INTERVAL).as_nanos())
                .unwrap_or(u64::MAX),
            rng: hasher.finish() | 1,
        }
    }

    /// Delay before the first check: up to a tenth of the interval. Spreading over the whole
    /// interval would delay the first verdict by up to another interval; the per-period jitter
    /// below keeps spreading the phases afterwards.
    pub fn first_delay(&mut self) -> Duration {
        Duration::from_nanos(self.next() % (self.interval / 10).max(1))
    }

    /// Time from the start of one check to the start of the next: the interval ±10%.
    pub fn next_period(&mut self) -> Duration {
        let spread = self.interval / 10;
        let offset = self.next() % (2 * spread + 1);
        Duration::from_nanos(self.interval - spread + offset)
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::{IpAddr, Ipv4Addr},
    };

    use super::*;

    fn target(addr: SocketAddr, interval: Duration) -> CheckTarget {
        CheckTarget {
            addr,
            probe: Probe::Tcp,
            interval,
            timeout: interval / 2,
        }
    }

    #[test]
    fn parses_status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r"), Ok(200));
        assert_eq!(
            parse_status_line(b"HTTP/1.0 503 Service Unavailable"),
            Ok(503)
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 204"), Ok(204));
        for bad in [
            &b"SSH-2.0-OpenSSH_9.6\r"[..],
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 2x0 OK",
            b"HTTP/1.1",
            b"",
        ] {
            let err = parse_status_line(bad).unwrap_err();
            assert!(err.starts_with("HTTP: malformed status line"), "{err}");
        }
    }

    #[test]
    fn builds_the_request() {
        let addr: SocketAddr = "[2001:db8::1]:8080".parse().unwrap();
        assert_eq!(
            &*request(addr, "/healthz", None),
            b"GET /healthz HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\nUser-Agent: xdplb-health\r\nConnection: close\r\n\r\n"
        );
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        assert_eq!(
            &*request(addr, "/", Some("svc.example")),
            b"GET / HTTP/1.1\r\nHost: svc.example\r\nUser-Agent: xdplb-health\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn describes_os_errors_without_the_code() {
        // ECONNREFUSED and EHOSTUNREACH on Linux.
        assert_eq!(
            describe(&io::Error::from_raw_os_error(111)),
            "connection refused"
        );
        assert_eq!(
            describe(&io::Error::from_raw_os_error(113)),
            "no route to host"
        );
        assert_eq!(describe(&io::Error::other("Custom thing")), "custom thing");
    }

    #[test]
    fn schedule_stays_within_ten_percent_and_is_deterministic() {
        let interval = Duration::from_secs(1);
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 80);
        let mut a = Schedule::new(&target(addr, interval));
        let mut b = Schedule::new(&target(addr, interval));
        let first = a.first_delay();
        assert!(first < interval / 10, "{first:?}");
        assert_eq!(b.first_delay(), first);
        let mut distinct = std::collections::HashSet::new();
        for _ in 0..1000 {
            let period = a.next_period();
            assert!(
                period >= interval * 9 / 10 && period <= interval * 11 / 10,
                "{period:?}"
            );
            assert_eq!(b.next_period(), period);
            distinct.insert(period);
        }
        assert!(
            distinct.len() > 900,
            "periods barely vary: {}",
            distinct.len()
        );
    }

    #[test]
    fn first_checks_of_many_targets_are_spread() {
        let interval = Duration::from_secs(1);
        let mut per_millisecond: HashMap<u128, usize> = HashMap::new();
        for i in 0..1000u32 {
            let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 80);
            let delay = Schedule::new(&target(addr, interval)).first_delay();
            *per_millisecond.entry(delay.as_millis()).or_default() += 1;
        }
        // 1000 targets over 100 ms: about 10 per millisecond, never a pile-up.
        assert!(per_millisecond.len() >= 95, "{}", per_millisecond.len());
        let worst = per_millisecond.values().max().unwrap();
        assert!(*worst <= 30, "{worst} checks in one millisecond");
    }

    #[test]
    fn zero_interval_neither_panics_nor_spins() {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 80);
        let mut schedule = Schedule::new(&target(addr, Duration::ZERO));
        assert!(schedule.first_delay() < MIN_INTERVAL / 10);
        assert!(schedule.next_period() >= MIN_INTERVAL * 9 / 10);
    }
}
