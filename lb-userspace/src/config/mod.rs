//! The configuration file: TOML text -> a validated [`Config`] (daemon settings plus the
//! [`Services`] the data path should serve).
//!
//! The file is parsed into a generic TOML table and then read key by key instead of being
//! deserialised into structs with serde: serde stops at the first unknown key or wrong type,
//! while someone fixing a file wants every problem at once, each named by where it is.
//!
//! Every [`Problem`] carries a key path made of the TOML names with 0-based indices:
//! `daemon.max_vips`, `vip[2].health.timeout`, `vip[0].backend[3].weight`. Once a VIP's `name`
//! is valid it is added in parentheses, `vip[1] (api).ring_size`, so both `grep 'vip\[1\]'`
//! and `grep '(api)'` find its problems.
//!
//! An invalid value is reported once and the checks that depend on it are skipped, so one
//! mistake does not turn into a cascade of messages.

use crate::{
    announce::AnnounceConfig,
    dataplane::{AttachMode, Sizes},
    model::{DataPathSettings, Prefix, Services, VipSpec},
};
use std::{
    collections::HashMap,
    fmt, fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};
use summary::xdp_mode_name;
use table::describe;
use toml::Value;
use vip::{read_vip, Seen};

mod health;
mod summary;
mod table;
#[cfg(test)]
mod tests;
mod vip;

pub use table::parse_duration;
pub(crate) use table::{Problems, Reported, Table};

/// Everything the configuration file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub services: Services,
}

/// The `[daemon]` settings that are not part of the service model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Interfaces XDP attaches to: at least one, no duplicates.
    pub interfaces: Vec<String>,
    pub xdp_mode: AttachMode,
    /// Unix socket of the admin API, which the CLI talks to.
    pub admin_socket: PathBuf,
    /// Where the daemon keeps state across restarts.
    pub state_dir: PathBuf,
    /// Where maps are pinned (on a bpffs), so a restarted daemon adopts them.
    pub pin_dir: PathBuf,
    /// Map sizes; changing them needs a daemon restart.
    pub sizes: Sizes,
    /// Prometheus endpoint; off when absent.
    pub metrics_listen: Option<SocketAddr>,
    /// A flow idle for this long no longer counts as active (the `idle_timeout` key).
    pub flow_idle_timeout: Duration,
    /// How often counters are read from the maps.
    pub stats_interval: Duration,
    /// `[daemon.announce]`: VIP routes for a BGP daemon; off when absent.
    pub announce: Option<AnnounceConfig>,
    /// `[daemon.log]`: the connection log; off when absent.
    pub log: Option<crate::connlog::LogSpec>,
}

/// One thing wrong with the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where: `daemon.max_vips`, `vip[1] (api).backend[0].address`.
    pub key: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a configuration file was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("cannot read {}: {source} ({})", .path.display(), read_advice(.source))]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not TOML; nothing was checked.
    #[error("{file}:{line}:{column}: not valid TOML: {message}")]
    Syntax {
        file: String,
        /// 1-based.
        line: usize,
        /// 1-based, in characters.
        column: usize,
        message: String,
    },
    /// The file is TOML but not a valid configuration: every problem found (never empty),
    /// printed one per line as `FILE: KEY: MESSAGE`.
    #[error("{}", problem_lines(.file, .problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

fn read_advice(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::NotFound => "check the path",
        io::ErrorKind::PermissionDenied => "make it readable by the user xdplb runs as",
        io::ErrorKind::InvalidData => "the file must be UTF-8 text",
        _ => "check that the path names a readable file",
    }
}

fn problem_lines(file: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|problem| format!("{file}: {problem}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Validates configuration text; `file_name` only labels the errors.
pub fn parse(text: &str, file_name: &str) -> Result<Config, ConfigError> {
    let root: toml::Table = text
        .parse()
        .map_err(|err: toml::de::Error| syntax_error(text, file_name, &err))?;
    let mut problems = Problems::default();
    match read_config(&root, &mut problems) {
        Ok(config) if problems.0.is_empty() => Ok(config),
        _ => Err(ConfigError::Invalid {
            file: file_name.to_string(),
            problems: problems.0,
        }),
    }
}

fn syntax_error(text: &str, file: &str, err: &toml::de::Error) -> ConfigError {
    // toml gives a byte span for every syntax error; the start of the file is only a fallback.
    let offset = err.span().map_or(0, |span| span.start);
    let (mut line, mut column) = (1, 1);
    for (_, c) in text.char_indices().take_while(|(i, _)| *i < offset) {
        if c == '\n' {
            (line, column) = (line + 1, 1);
        } else {
            column += 1;
        }
    }
    // toml's messages span several lines ("invalid table header\nexpected `.`, `]`"); one is
    // empty (a key without a value at the very end of the file).
    let message = err.message().trim().replace('\n', "; ");
    ConfigError::Syntax {
        file: file.to_string(),
        line,
        column,
        message: if message.is_empty() {
            "expected a value".to_string()
        } else {
            message
        },
    }
}

const TOP_KEYS: &[&str] = &["daemon", "vip"];
const DAEMON_KEYS: &[&str] = &[
    "interfaces",
    "xdp_mode",
    "admin_socket",
    "state_dir",
    "pin_dir",
    "flow_table_size",
    "max_vips",
    "max_backends",
    "max_ring_size",
    "metrics_listen",
    "idle_timeout",
    "stats_interval",
    "hash_seed",
    "ipip_source_v4",
    "ipip_source_v6",
    "icmp_too_big_rate",
    "pinned_flows_per_second",
    "announce",
    "log",
    "nat_table_size",
];
const ANNOUNCE_KEYS: &[&str] = &["table", "withdraw_grace"];

const XDP_MODES: [AttachMode; 3] = [AttachMode::Auto, AttachMode::Native, AttachMode::Generic];

/// Sanity bounds on map sizes, each with what it protects.
const MAX_VIPS: (u32, &str) = (1 << 16, "each VIP has per-CPU counters and two ring halves");
const MAX_BACKENDS: (u32, &str) = (1 << 20, "each backend has 32 bytes of counters per CPU");
const MAX_FLOW_TABLE_SIZE: (u32, &str) = (
    1 << 28,
    "each flow takes a 64-byte slot and about 100 bytes for its pinned copy, so that is already about 40 GiB",
);
const MAX_NAT_TABLE_SIZE: (u32, &str) = (
    1 << 26,
    "each nat connection takes about 300 bytes in its two tables, so that is already about 19 GiB",
);
/// The ring map (`max_vips * 2 * max_ring_size` slots of 8 bytes: the kernel aligns array values to 8) is allocated in full when
/// the daemon starts.
const MAX_RING_BYTES: u64 = 4 << 30;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

fn read_config(root: &toml::Table, p: &mut Problems) -> Result<Config, Reported> {
    let root = Table {
        table: root,
        path: String::new(),
        header: "the top level",
    };
    root.reject_unknown(p, TOP_KEYS);

    // An absent [daemon] reads as an empty one: the defaults apply and the one required key
    // (interfaces) is reported missing.
    let empty = toml::Table::new();
    let daemon_table = root
        .table(p, "daemon", "[daemon]")
        .map(|table| table.unwrap_or_else(|| root.child("daemon", &empty, "[daemon]")));
    let (daemon, settings, sizes) = match &daemon_table {
        Ok(t) => {
            t.reject_unknown(p, &[DAEMON_KEYS, crate::nat::DAEMON_KEYS].concat());
            let sizes = read_sizes(t, p);
            (read_daemon(t, sizes, p), read_settings(t, sizes, p), sizes)
        }
        Err(reported) => (Err(*reported), Err(*reported), Err(*reported)),
    };

    let vip_tables = root.tables(p, "vip", "[[vip]]");
    let mut seen = Seen::default();
    // Collected before being combined, so every VIP is read (and reported) even after a bad one.
    let vips: Vec<Result<VipSpec, Reported>> = match &vip_tables {
        Ok(list) => list
            .iter()
            .enumerate()
            .map(|(i, raw)| raw.and_then(|raw| read_vip(raw, i, sizes, &mut seen, p)))
            .collect(),
        Err(reported) => vec![Err(*reported)],
    };
    if let (Ok(sizes), Ok(list)) = (sizes, &vip_tables) {
        if list.len() > sizes.max_vips as usize {
            p.report(
                "daemon.max_vips",
                format!(
                    "{} VIPs are configured but max_vips is {}; raise daemon.max_vips \
                     (changing it needs a daemon restart)",
                    list.len(),
                    sizes.max_vips
                ),
            );
        }
    }
    let vips = vips.into_iter().collect::<Result<Vec<_>, _>>();
    if let Ok(vips) = &vips {
        crate::acl::check_total(vips, p);
    }
    if let (Ok(sizes), Ok(vips)) = (sizes, &vips) {
        // Each VIP's backends get their own ids, so a backend shared by two VIPs counts twice.
        let backends: usize = vips.iter().map(|vip| vip.backends.len()).sum();
        if backends > sizes.max_backends as usize {
            p.report(
                "daemon.max_backends",
                format!(
                    "{backends} backends are configured (over all VIPs) but max_backends is {}; \
                     raise daemon.max_backends (changing it needs a daemon restart)",
                    sizes.max_backends
                ),
            );
        }
    }
    Ok(Config {
        daemon: daemon?,
        services: Services {
            settings: settings?,
            vips: vips?,
        },
    })
}

fn read_sizes(t: &Table, p: &mut Problems) -> Result<Sizes, Reported> {
    let defaults = Sizes::default();
    let max_vips = read_size(t, p, "max_vips", defaults.max_vips, MAX_VIPS);
    let max_backends = read_size(t, p, "max_backends", defaults.max_backends, MAX_BACKENDS);
    let flow_table_size = read_size(
        t,
        p,
        "flow_table_size",
        defaults.flow_table_size,
        MAX_FLOW_TABLE_SIZE,
    );
    let nat_table_size = read_size(
        t,
        p,
        "nat_table_size",
        defaults.nat_table_size,
        MAX_NAT_TABLE_SIZE,
    );
    // Bounded together with max_vips below, through the memory the ring map needs.
    let max_ring_size = t
        .int(p, "max_ring_size", 1..=u32::MAX)
        .map(|size| size.unwrap_or(defaults.max_ring_size));
    let sizes = Sizes {
        max_vips: max_vips?,
        max_backends: max_backends?,
        max_ring_size: max_ring_size?,
        flow_table_size: flow_table_size?,
        nat_table_size: nat_table_size?,
    };
    let ring_bytes = u64::from(sizes.max_vips) * 2 * u64::from(sizes.max_ring_size) * 8;
    if ring_bytes > MAX_RING_BYTES {
        return Err(p.report(
            t.key("max_ring_size"),
            format!(
                "the ring map would take {} MiB (max_vips {} x 2 halves x max_ring_size {} x 8 \
                 bytes), over the 4 GiB limit; lower max_ring_size or max_vips",
                ring_bytes >> 20,
                sizes.max_vips,
                sizes.max_ring_size
            ),
        ));
    }
    Ok(sizes)
}

/// A map size: at least 1 (a map cannot be empty) and at most `max`, `why` saying why.
fn read_size(
    t: &Table,
    p: &mut Problems,
    name: &str,
    default: u32,
    (max, why): (u32, &str),
) -> Result<u32, Reported> {
    match t.int(p, name, 1..=u32::MAX)? {
        None => Ok(default),
        Some(size) if size <= max => Ok(size),
        Some(size) => Err(p.report(
            t.key(name),
            format!("{size} is too large: use at most {max} ({why})"),
        )),
    }
}

fn read_daemon(
    t: &Table,
    sizes: Result<Sizes, Reported>,
    p: &mut Problems,
) -> Result<DaemonConfig, Reported> {
    let interfaces = read_interfaces(t, p);
    let xdp_mode = t
        .choice(
            p,
            "xdp_mode",
            &XDP_MODES.map(|mode| (xdp_mode_name(mode), mode)),
        )
        .map(Option::unwrap_or_default);
    let admin_socket = t
        .abs_path(p, "admin_socket", "/run/xdplb/admin.sock")
        .and_then(|path| {
            let len = path.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                Err(p.report(
                    t.key("admin_socket"),
                    format!(
                        "the path is {len} bytes long but Unix socket paths are limited to \
                         {MAX_SOCKET_PATH}; use a shorter one"
                    ),
                ))
            } else {
                Ok(path)
            }
        });
    let state_dir = t.abs_path(p, "state_dir", "/var/lib/xdplb");
    let pin_dir = t.abs_path(p, "pin_dir", "/sys/fs/bpf/xdplb");
    let metrics_listen = t.parsed(p, "metrics_listen", |text| {
        text.parse().map_err(|_| {
            format!(
                "{text:?} is not a socket address (expected IP:PORT, e.g. \"127.0.0.1:9650\" \
                 or \"[::1]:9650\"; leave the key out to turn metrics off)"
            )
        })
    });
    let flow_idle_timeout = t
        .duration(p, "idle_timeout")
        .map(|d| d.unwrap_or(Duration::from_secs(300)));
    let stats_interval = t
        .duration(p, "stats_interval")
        .map(|d| d.unwrap_or(Duration::from_secs(1)));
    let announce = t
        .table(p, "announce", "[daemon.announce]")
        .and_then(|announce| announce.map(|a| read_announce(&a, p)).transpose());
    let log = t
        .table(p, "log", "[daemon.log]")
        .and_then(|log| log.map(|l| crate::connlog::read(&l, p)).transpose());
    Ok(DaemonConfig {
        interfaces: interfaces?,
        xdp_mode: xdp_mode?,
        admin_socket: admin_socket?,
        state_dir: state_dir?,
        pin_dir: pin_dir?,
        sizes: sizes?,
        metrics_listen: metrics_listen?,
        flow_idle_timeout: flow_idle_timeout?,
        stats_interval: stats_interval?,
        announce: announce?,
        log: log?,
    })
}

/// Tables the kernel itself uses: writing VIP routes there would change how the host routes.
const RESERVED_TABLES: [(u32, &str); 4] = [
    (0, "unspec"),
    (253, "default"),
    (254, "main"),
    (255, "local"),
];

fn read_announce(t: &Table, p: &mut Problems) -> Result<AnnounceConfig, Reported> {
    t.reject_unknown(p, ANNOUNCE_KEYS);
    let table = t
        .int(p, "table", 0..=u32::MAX)
        .and_then(|table| match table {
            Some(table) => match RESERVED_TABLES.iter().find(|(id, _)| *id == table) {
                Some((_, name)) => Err(p.report(
                    t.key("table"),
                    format!(
                        "{table} is the kernel's {name} table: use a table of its own that no \
                     `ip rule` looks up (e.g. 4242), so the routes only feed the BGP daemon"
                    ),
                )),
                None => Ok(Some(table)),
            },
            None => Ok(None),
        });
    let table = t.require(
        table,
        p,
        "table",
        "add e.g. table = 4242 (the kernel table the BGP daemon exports)",
    );
    let withdraw_grace = t
        .duration(p, "withdraw_grace")
        .map(|d| d.unwrap_or(AnnounceConfig::DEFAULT_WITHDRAW_GRACE));
    Ok(AnnounceConfig {
        table: table?,
        withdraw_grace: withdraw_grace?,
    })
}

fn read_interfaces(t: &Table, p: &mut Problems) -> Result<Vec<String>, Reported> {
    const HINT: &str = "list the interfaces XDP attaches to, e.g. interfaces = [\"eth0\"]";
    let field = t.get(
        p,
        "interfaces",
        "an array of interface names",
        Value::as_array,
    );
    let list = t.require(field, p, "interfaces", HINT)?;
    if list.is_empty() {
        return Err(p.report(t.key("interfaces"), format!("empty; {HINT}")));
    }
    let mut names = Ok(Vec::new());
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, value) in list.iter().enumerate() {
        let problem = match value.as_str() {
            None => format!(
                "expected an interface name (a string), found {}",
                describe(value)
            ),
            Some(name) => match (check_interface_name(name), seen.get(name)) {
                (Err(message), _) => message,
                (Ok(()), Some(first)) => {
                    format!("{name:?} is already interfaces[{first}]; list each interface once")
                }
                (Ok(()), None) => {
                    seen.insert(name, i);
                    if let Ok(names) = &mut names {
                        names.push(name.to_string());
                    }
                    continue;
                }
            },
        };
        names = Err(p.report(format!("{}[{i}]", t.key("interfaces")), problem));
    }
    names
}

/// The kernel's rules (`dev_valid_name`): 1 to 15 bytes (IFNAMSIZ includes the NUL), not "."
/// or "..", and no '/', ':' or whitespace.
fn check_interface_name(name: &str) -> Result<(), String> {
    let why = if name.is_empty() {
        "it is empty"
    } else if name.len() > 15 {
        "it is longer than 15 bytes (IFNAMSIZ)"
    } else if name == "." || name == ".." {
        "\".\" and \"..\" are reserved"
    } else if name.contains(['/', ':']) || name.contains(char::is_whitespace) {
        "it contains '/', ':' or whitespace"
    } else {
        return Ok(());
    };
    Err(format!(
        "{name:?} is not a valid interface name: {why}; use a name `ip link` shows"
    ))
}

fn read_settings(
    t: &Table,
    sizes: Result<Sizes, Reported>,
    p: &mut Problems,
) -> Result<DataPathSettings, Reported> {
    let defaults = DataPathSettings::default();
    let flow_table_size = sizes.map_or(lb_common::DEFAULT_FLOW_TABLE_SIZE, |s| s.flow_table_size);
    let flood = crate::flood::read(t, p, flow_table_size);
    let hash_seed = t
        .int(p, "hash_seed", 0..=u32::MAX)
        .map(|seed| seed.unwrap_or(defaults.hash_seed));
    let ipip_source_v4 = read_source_pool(t, p, "ipip_source_v4", defaults.ipip_source_v4);
    let ipip_source_v6 = read_source_pool(t, p, "ipip_source_v6", defaults.ipip_source_v6);
    let icmp_too_big_rate = t
        .int(p, "icmp_too_big_rate", 0..=1_000_000)
        .map(|rate| rate.unwrap_or(defaults.icmp_too_big_rate));
    let nat = crate::nat::read(t, p);
    Ok(DataPathSettings {
        hash_seed: hash_seed?,
        ipip_source_v4: ipip_source_v4?,
        ipip_source_v6: ipip_source_v6?,
        icmp_too_big_rate: icmp_too_big_rate?,
        flood: flood?,
        nat: nat?,
    })
}

/// A pool of outer `ipip` source addresses, of the same family as `default`.
fn read_source_pool(
    t: &Table,
    p: &mut Problems,
    name: &str,
    default: Prefix,
) -> Result<Prefix, Reported> {
    match t.parsed(p, name, str::parse::<Prefix>)? {
        None => Ok(default),
        Some(prefix) if prefix.addr.is_ipv4() == default.addr.is_ipv4() => Ok(prefix),
        Some(prefix) => {
            let family = if default.addr.is_ipv4() {
                "IPv4"
            } else {
                "IPv6"
            };
            Err(p.report(
                t.key(name),
                format!("{prefix} is not an {family} prefix; use one such as {default}"),
            ))
        }
    }
}
