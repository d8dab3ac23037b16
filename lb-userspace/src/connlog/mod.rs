//! The connection log, userspace side (the kernel side is lb-ebpf/src/events.rs): the
//! `[daemon.log]` model, decoding [`LogRecord`]s with the names valid when they were made,
//! the reader of the ring ([`reader`]), the JSON-lines file ([`file`]) and `xdplb log`
//! ([`cli`]).

pub mod cli;
mod file;
mod reader;
mod ring;

pub use reader::{ConnLog, LogCounters};
pub use ring::LogRing;

use crate::{
    config::{Problems, Reported, Table},
    model::VipSpec,
    state::Live,
};
use lb_common::{
    counters, LogBudget, LogRecord, FAMILY_IPV4, LOG_BLOCKED, LOG_DENIED, LOG_NEW,
    LOG_RATE_LIMITED, LOG_REHASH, PROTO_TCP, PROTO_UDP,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
};

const NS_PER_S: u64 = 1_000_000_000;
/// Name sets kept for records still in flight: the ring is drained every few milliseconds,
/// so only a burst of reloads within that time needs more than two.
const NAME_GENERATIONS: usize = 32;

/// `[daemon.log]`: present = the data path emits records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSpec {
    /// JSON-lines file; `None`: records only reach `xdplb log`.
    pub path: Option<PathBuf>,
    /// Records the kernel emits per second at most (bursts of one second's worth).
    pub max_per_second: u32,
}

impl LogSpec {
    pub const DEFAULT_MAX_PER_SECOND: u32 = 20_000;
    const KEYS: &[&str] = &["path", "max_per_second"];

    /// The kernel budget: GCRA with one second of burst, like the new-flow limits.
    pub fn budget(&self) -> LogBudget {
        let interval_ns = NS_PER_S / u64::from(self.max_per_second);
        LogBudget {
            interval_ns,
            tolerance_ns: interval_ns * u64::from(self.max_per_second),
            tat_ns: 0,
        }
    }
}

/// Reads `[daemon.log]`.
pub(crate) fn read(t: &Table, p: &mut Problems) -> Result<LogSpec, Reported> {
    t.reject_unknown(p, LogSpec::KEYS);
    let path = t.parsed(p, "path", |text| {
        let path = PathBuf::from(text);
        if !path.is_absolute() {
            return Err(format!(
                "{text:?} is not an absolute path; start it with '/' (e.g. \
                 \"/var/log/xdplb/connections.jsonl\"), or leave the key out for no file"
            ));
        }
        if text.ends_with('/') {
            return Err(format!("{text:?} is a directory; name the file in it"));
        }
        Ok(path)
    });
    // The upper bound keeps a record's interval at least 1 ns (and the file writable).
    let max_per_second = t.int(p, "max_per_second", 1..=10_000_000u32);
    Ok(LogSpec {
        path: path?,
        max_per_second: max_per_second?.unwrap_or(LogSpec::DEFAULT_MAX_PER_SECOND),
    })
}

/// Event kinds as written in the log, in `LOG_*` order.
pub const EVENT_KINDS: [&str; 5] = ["new", "rehash", "denied", "blocked", "rate_limited"];

fn event_name(event: u8) -> &'static str {
    match event {
        LOG_NEW => EVENT_KINDS[0],
        LOG_REHASH => EVENT_KINDS[1],
        LOG_DENIED => EVENT_KINDS[2],
        LOG_BLOCKED => EVENT_KINDS[3],
        LOG_RATE_LIMITED => EVENT_KINDS[4],
        _ => "unknown",
    }
}

/// One decoded record: a line of the file, a row of `xdplb log`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// RFC 3339, UTC, nanoseconds.
    pub time: String,
    /// One of [`EVENT_KINDS`].
    pub event: String,
    pub vip: String,
    pub proto: String,
    /// `ip:port` (`[ip]:port` for IPv6).
    pub client: String,
    /// The destination port (differs between connections of a VIP of all ports).
    pub port: u16,
    /// The backend chosen (`new`, `rehash`); `None` for drops.
    pub backend: Option<IpAddr>,
    /// The VIP's forwarding mode.
    pub forwarding: String,
    /// `rate_limited`: which limit ("source" or "total").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// `nat` forwarding: the source address and port the backend sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<String>,
}

/// The names behind the ids of one applied state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// VIP id -> (name, forwarding mode).
    vips: HashMap<u32, (String, String)>,
    backends: HashMap<u32, IpAddr>,
}

impl Names {
    /// What `live` (just written) means, with forwarding modes from the config's VIPs.
    pub fn of(live: &Live, specs: &[VipSpec]) -> Self {
        let mut names = Self::default();
        for vip in live.vips.values() {
            let forwarding = specs
                .iter()
                .find(|s| s.name == vip.name)
                .map(|s| s.forwarding.to_string())
                .unwrap_or_default();
            names
                .vips
                .insert(vip.meta.vip_id, (vip.name.clone(), forwarding));
            for (addr, backend) in &vip.backends {
                names.backends.insert(backend.id, *addr);
            }
        }
        names
    }
}

/// Name sets by the monotonic time they took effect: a record is decoded with the set valid
/// at its time, so a reload that renames or removes a VIP or backend does not rename records
/// made before it.
#[derive(Debug, Default)]
pub struct Decoder {
    generations: VecDeque<(u64, Arc<Names>)>,
}

impl Decoder {
    /// Records made from `since_ns` (`CLOCK_MONOTONIC`) on use `names`.
    pub fn push(&mut self, since_ns: u64, names: Names) {
        if self.generations.back().is_some_and(|(_, n)| **n == names) {
            return;
        }
        self.generations.push_back((since_ns, Arc::new(names)));
        if self.generations.len() > NAME_GENERATIONS {
            self.generations.pop_front();
        }
    }

    /// Generations from the one valid at `time_ns` on: the maps are written before their set
    /// is pushed, so an id unknown at a record's time was written just before the next set.
    fn from(&self, time_ns: u64) -> impl Iterator<Item = &Names> {
        let valid = self
            .generations
            .iter()
            .rposition(|(since, _)| *since <= time_ns)
            .unwrap_or(0);
        self.generations.iter().skip(valid).map(|(_, n)| &**n)
    }

    /// `wall_offset_ns`: realtime minus monotonic, now.
    pub fn decode(&self, record: &LogRecord, wall_offset_ns: i128) -> Entry {
        let (vip, forwarding) = self
            .from(record.time_ns)
            .find_map(|n| n.vips.get(&record.vip_id))
            .cloned()
            .unwrap_or_else(|| (format!("vip#{}", record.vip_id), String::new()));
        let backend = match record.event {
            LOG_NEW | LOG_REHASH => Some(
                self.from(record.time_ns)
                    .find_map(|n| n.backends.get(&record.backend_id))
                    .copied()
                    // An id no set knows: shown as the unspecified address, not hidden.
                    .unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            ),
            _ => None,
        };
        let limit = match u32::from(record.reason) {
            counters::DROP_RATE_LIMITED_SOURCE => Some("source".to_string()),
            counters::DROP_RATE_LIMITED_TOTAL => Some("total".to_string()),
            _ => None,
        };
        let nat = (record.nat_addr != [0; 16] || record.nat_port != 0)
            .then(|| socket_text(record.family, &record.nat_addr, record.nat_port));
        Entry {
            time: rfc3339_nanos(i128::from(record.time_ns) + wall_offset_ns),
            event: event_name(record.event).to_string(),
            vip,
            proto: match record.proto {
                PROTO_TCP => "tcp".to_string(),
                PROTO_UDP => "udp".to_string(),
                other => other.to_string(),
            },
            client: socket_text(record.family, &record.client, record.client_port),
            port: u16::from_be(record.vip_port),
            backend,
            forwarding,
            limit,
            nat,
        }
    }
}

/// An address of the maps' 16-byte layout with a network-order port, as `ip:port`.
fn socket_text(family: u8, addr: &[u8; 16], port_be: u16) -> String {
    let port = u16::from_be(port_be);
    if family == FAMILY_IPV4 {
        format!("{}.{}.{}.{}:{port}", addr[0], addr[1], addr[2], addr[3])
    } else {
        format!("[{}]:{port}", Ipv6Addr::from(*addr))
    }
}

fn rfc3339_nanos(unix_ns: i128) -> String {
    let ns = i64::try_from(unix_ns).unwrap_or(0);
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Realtime minus monotonic nanoseconds, now: converts the kernel's timestamps to wall time.
pub fn wall_offset_ns() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec out-pointer; both clocks always exist on Linux.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * i128::from(NS_PER_S) + i128::from(ts.tv_nsec)
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}

/// `CLOCK_MONOTONIC` now (the clock of record times, which have a tick's resolution).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * NS_PER_S + ts.tv_nsec as u64
}

/// What `xdplb log` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// VIP name.
    pub vip: Option<String>,
    /// One of [`EVENT_KINDS`].
    pub event: Option<String>,
}

impl Filter {
    pub fn matches(&self, entry: &Entry) -> bool {
        self.vip.as_ref().is_none_or(|v| *v == entry.vip)
            && self.event.as_ref().is_none_or(|e| *e == entry.event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{FAMILY_IPV6, NO_BACKEND};

    fn names(vip: &str, backend: IpAddr) -> Names {
        Names {
            vips: HashMap::from([(3, (vip.to_string(), "dsr".to_string()))]),
            backends: HashMap::from([(7, backend)]),
        }
    }

    fn record(time_ns: u64, event: u8) -> LogRecord {
        LogRecord {
            time_ns,
            client: [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            vip_id: 3,
            backend_id: if event == LOG_NEW { 7 } else { NO_BACKEND },
            client_port: 40000u16.to_be(),
            vip_port: 80u16.to_be(),
            event,
            proto: PROTO_TCP,
            family: FAMILY_IPV4,
            ..LogRecord::default()
        }
    }

    #[test]
    fn records_keep_the_names_of_their_time_across_a_rename() {
        let mut decoder = Decoder::default();
        decoder.push(100, names("web", "10.0.0.1".parse().unwrap()));
        decoder.push(200, names("www", "10.0.0.2".parse().unwrap()));
        let before = decoder.decode(&record(150, LOG_NEW), 0);
        let after = decoder.decode(&record(250, LOG_NEW), 0);
        assert_eq!(
            (before.vip.as_str(), before.backend),
            ("web", Some("10.0.0.1".parse().unwrap()))
        );
        assert_eq!(
            (after.vip.as_str(), after.backend),
            ("www", Some("10.0.0.2".parse().unwrap()))
        );
    }

    #[test]
    fn an_id_written_just_before_its_names_resolves_with_the_next_set() {
        let mut decoder = Decoder::default();
        decoder.push(100, Names::default());
        decoder.push(200, names("web", "10.0.0.1".parse().unwrap()));
        assert_eq!(decoder.decode(&record(150, LOG_NEW), 0).vip, "web");
    }

    #[test]
    fn a_record_decodes_to_every_field() {
        let mut decoder = Decoder::default();
        decoder.push(0, names("web", "10.0.0.1".parse().unwrap()));
        let mut limited = record(NS_PER_S, LOG_RATE_LIMITED);
        limited.reason = counters::DROP_RATE_LIMITED_SOURCE as u8;
        let entry = decoder.decode(&limited, 1_700_000_000 * i128::from(NS_PER_S));
        assert_eq!(
            entry,
            Entry {
                time: "2023-11-14T22:13:21.000000000Z".to_string(),
                event: "rate_limited".to_string(),
                vip: "web".to_string(),
                proto: "tcp".to_string(),
                client: "192.0.2.1:40000".to_string(),
                port: 80,
                backend: None,
                forwarding: "dsr".to_string(),
                limit: Some("source".to_string()),
                nat: None,
            }
        );
        let mut v6 = record(5, LOG_NEW);
        v6.family = FAMILY_IPV6;
        v6.client = "2001:db8::5".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(decoder.decode(&v6, 0).client, "[2001:db8::5]:40000");
    }

    #[test]
    fn the_budget_allows_one_second_of_burst() {
        let spec = LogSpec {
            path: None,
            max_per_second: 20_000,
        };
        assert_eq!(
            spec.budget(),
            LogBudget {
                interval_ns: 50_000,
                tolerance_ns: NS_PER_S,
                tat_ns: 0
            }
        );
    }
}
