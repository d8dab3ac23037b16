//! The `tcp` section's load generator: `concurrency` closed loops in the client's namespace,
//! each doing connect + `GET / HTTP/1.0` + read to EOF + close, again and again, for a fixed
//! time. A load balancer's connections/s is its capacity, so the loops keep enough connections
//! in flight to saturate the lab; with only one or two in flight the rate is bounded by each
//! connection's round trips (wakeups, veth hops), not by what the system spends per connection.
//!
//! The loops are spread over [`CLIENT_THREADS`] threads, each with its own single-threaded
//! tokio runtime (non-blocking sockets, epoll), so the client's own cost per connection stays
//! small and is the same for every system measured.

use anyhow::{bail, Context as _, Result};
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use xdplb_tests::lab::Netns;

/// One per core of this machine: more would only add scheduling.
pub const CLIENT_THREADS: usize = 2;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST: &[u8] = b"GET / HTTP/1.0\r\n\r\n";

/// How long one measurement runs.
#[derive(Clone, Copy)]
pub struct Window {
    /// Requests started before this are not counted (connections and caches warm up).
    pub warmup: Duration,
    pub measured: Duration,
}

/// What one system did under one load.
#[derive(Default)]
pub struct Outcome {
    pub concurrency: usize,
    pub requests: u64,
    pub errors: u64,
    /// The first error seen, to say why a run failed.
    pub first_error: Option<String>,
    pub seconds: f64,
    /// Sorted.
    pub latencies_us: Vec<f64>,
    /// Backend name (the response body) -> requests it answered.
    pub per_backend: BTreeMap<String, u64>,
    /// The share of the machine's CPU that work outside the lab took meanwhile (see
    /// `others.rs`); set by the caller.
    pub others_cpu: f64,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    pub fn percentile(&self, p: f64) -> f64 {
        let n = self.latencies_us.len();
        if n == 0 {
            return f64::NAN;
        }
        self.latencies_us[((n as f64 * p).ceil() as usize).clamp(1, n) - 1]
    }

    /// Fails when the run served nothing or more than 1 % of its requests failed.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.requests == 0 || self.errors * 100 > self.requests {
            bail!(
                "{what} at {} connections: {} requests, {} errors (first: {}): the lab is not serving",
                self.concurrency,
                self.requests,
                self.errors,
                self.first_error.as_deref().unwrap_or("none")
            );
        }
        Ok(())
    }

    fn merge(&mut self, other: Outcome) {
        self.requests += other.requests;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.seconds = self.seconds.max(other.seconds);
        self.latencies_us.extend(other.latencies_us);
        for (name, count) in other.per_backend {
            *self.per_backend.entry(name).or_default() += count;
        }
    }
}

/// One request on a new connection; returns the backend's name (the body of its answer).
async fn request(vip: SocketAddr) -> Result<String> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(vip))
        .await
        .context("connect timed out")??;
    stream.set_nodelay(true)?;
    stream.write_all(REQUEST).await?;
    let mut answer = Vec::with_capacity(256);
    tokio::time::timeout(ANSWER_TIMEOUT, stream.read_to_end(&mut answer))
        .await
        .context("answer timed out")??;
    backend_name(&answer)
}

/// The backend's name from an HTTP answer: status 200, the body is the name.
fn backend_name(answer: &[u8]) -> Result<String> {
    let text = std::str::from_utf8(answer).context("answer is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header in {text:?}"))?;
    if !head.starts_with("HTTP/1.") || head.split(' ').nth(1) != Some("200") {
        bail!("unexpected status in {head:?}");
    }
    let name = body.trim();
    if name.is_empty() {
        bail!("empty body");
    }
    Ok(name.to_string())
}

/// One closed loop until `end`; requests started before `counted_from` are not recorded.
async fn closed_loop(vip: SocketAddr, counted_from: Instant, end: Instant) -> Outcome {
    let mut outcome = Outcome::default();
    let mut last_done = counted_from;
    loop {
        let started = Instant::now();
        if started >= end {
            break;
        }
        let result = request(vip).await;
        let done = Instant::now();
        if started < counted_from {
            continue;
        }
        last_done = done;
        match result {
            Ok(name) => {
                outcome.requests += 1;
                outcome
                    .latencies_us
                    .push((done - started).as_secs_f64() * 1e6);
                *outcome.per_backend.entry(name).or_default() += 1;
            }
            Err(e) => {
                outcome.errors += 1;
                outcome.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    outcome.seconds = (last_done - counted_from).as_secs_f64();
    outcome
}

/// Runs `concurrency` closed loops against `vip` from inside `client` for `window`.
pub fn run(client: &Netns, vip: SocketAddr, concurrency: usize, window: Window) -> Result<Outcome> {
    let counted_from = Instant::now() + window.warmup;
    let end = counted_from + window.measured;
    let outcomes = client.enter(|| {
        // Threads started here are in the client's namespace too (they inherit it).
        std::thread::scope(|scope| {
            let threads: Vec<_> = (0..CLIENT_THREADS)
                .map(|t| {
                    // Loops t, t + CLIENT_THREADS, ... run on thread t.
                    let loops = (t..concurrency).step_by(CLIENT_THREADS).count();
                    scope.spawn(move || -> Result<Vec<Outcome>> {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()?;
                        Ok(runtime.block_on(async {
                            let tasks: Vec<_> = (0..loops)
                                .map(|_| tokio::spawn(closed_loop(vip, counted_from, end)))
                                .collect();
                            let mut outcomes = Vec::with_capacity(loops);
                            for task in tasks {
                                outcomes.push(task.await.expect("client loop panicked"));
                            }
                            outcomes
                        }))
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("client thread panicked"))
                .collect::<Result<Vec<_>>>()
        })
    })??;
    let mut all = Outcome {
        concurrency,
        ..Outcome::default()
    };
    for outcome in outcomes.into_iter().flatten() {
        all.merge(outcome);
    }
    all.latencies_us.sort_by(f64::total_cmp);
    Ok(all)
}

/// One request from inside `client` (for waiting until a system serves).
pub fn probe(client: &Netns, vip: SocketAddr) -> Result<String> {
    client.enter(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(request(vip))
    })?
}

#[cfg(test)]
mod tests {
    use super::backend_name;

    #[test]
    fn names_the_backend_from_an_http_answer() {
        let nginx = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 3\r\n\r\nb1\n";
        assert_eq!(backend_name(nginx).unwrap(), "b1");
        assert!(backend_name(b"HTTP/1.1 503 X\r\n\r\nb1\n").is_err());
        assert!(backend_name(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(backend_name(b"b1\n").is_err());
    }
}
