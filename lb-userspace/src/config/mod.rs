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
    maglev::{self, MaglevError},
    model::{
        Affinity, Announce, BackendSpec, CheckKind, DataPathSettings, Forwarding, HealthSpec,
        OnAllDown, Prefix, Protocol, Services, TlsSpec, VipAddr, VipSpec,
    },
    scheduler::{self, Scheduler},
};
use std::{
    collections::HashMap,
    fmt, fs, io,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};
use toml::Value;

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

/// Marks a value that was invalid: its problem is already recorded, so callers only skip
/// whatever depends on it.
#[derive(Clone, Copy)]
pub(crate) struct Reported;

/// A key's value: `Ok(None)` when the key is absent, `Err` when it is invalid.
pub(crate) type Field<T> = Result<Option<T>, Reported>;

#[derive(Default)]
pub(crate) struct Problems(Vec<Problem>);

impl Problems {
    pub(crate) fn report(
        &mut self,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Reported {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
        Reported
    }
}

/// One TOML table being read, with the key path its problems are reported under.
pub(crate) struct Table<'a> {
    table: &'a toml::Table,
    /// Key path of the table: "" at the top level, `daemon`, `vip[0] (web).health`.
    path: String,
    /// How messages name it: `[daemon]`, `[[vip]]`.
    header: &'static str,
}

impl<'a> Table<'a> {
    pub(crate) fn key(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    pub(crate) fn child(
        &self,
        name: &str,
        table: &'a toml::Table,
        header: &'static str,
    ) -> Table<'a> {
        Table {
            table,
            path: self.key(name),
            header,
        }
    }

    /// A misspelt key would otherwise be ignored silently and its default used instead.
    pub(crate) fn reject_unknown(&self, p: &mut Problems, known: &[&str]) {
        for name in self.table.keys() {
            if !known.contains(&name.as_str()) {
                p.report(
                    self.key(name),
                    format!(
                        "unknown key in {}; the keys there are: {}",
                        self.header,
                        known.join(", ")
                    ),
                );
            }
        }
    }

    pub(crate) fn get<T>(
        &self,
        p: &mut Problems,
        name: &str,
        expected: &str,
        cast: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Field<T> {
        let Some(value) = self.table.get(name) else {
            return Ok(None);
        };
        match cast(value) {
            Some(v) => Ok(Some(v)),
            None => Err(p.report(
                self.key(name),
                format!("expected {expected}, found {}", describe(value)),
            )),
        }
    }

    /// A string that `parse` turns into a value or into a problem message.
    pub(crate) fn parsed<T>(
        &self,
        p: &mut Problems,
        name: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Field<T> {
        let Some(text) = self.get(p, name, "a string", Value::as_str)? else {
            return Ok(None);
        };
        parse(text)
            .map(Some)
            .map_err(|message| p.report(self.key(name), message))
    }

    pub(crate) fn int<T>(&self, p: &mut Problems, name: &str, range: RangeInclusive<T>) -> Field<T>
    where
        T: TryFrom<i64> + Into<i64> + PartialOrd + Copy,
    {
        let Some(value) = self.get(p, name, "an integer", Value::as_integer)? else {
            return Ok(None);
        };
        match T::try_from(value) {
            Ok(v) if range.contains(&v) => Ok(Some(v)),
            _ => {
                let (min, max): (i64, i64) = ((*range.start()).into(), (*range.end()).into());
                let message = if value < min {
                    format!("{value} is too small: use at least {min}")
                } else {
                    format!("{value} is too large: use at most {max}")
                };
                Err(p.report(self.key(name), message))
            }
        }
    }

    fn choice<T: Copy>(&self, p: &mut Problems, name: &str, options: &[(&str, T)]) -> Field<T> {
        self.parsed(p, name, |text| {
            options
                .iter()
                .find(|(option, _)| *option == text)
                .map(|(_, value)| *value)
                .ok_or_else(|| {
                    let names: Vec<String> =
                        options.iter().map(|(o, _)| format!("{o:?}")).collect();
                    format!("{text:?} is not one of {}", names.join(", "))
                })
        })
    }

    /// Every duration here must be positive: zero would be a busy loop or an instant timeout.
    pub(crate) fn duration(&self, p: &mut Problems, name: &str) -> Field<Duration> {
        let expected = "a duration string such as \"500ms\" or \"5s\"";
        let Some(text) = self.get(p, name, expected, Value::as_str)? else {
            return Ok(None);
        };
        match parse_duration(text) {
            Ok(duration) if !duration.is_zero() => Ok(Some(duration)),
            Ok(_) => Err(p.report(self.key(name), "must be longer than zero")),
            Err(message) => Err(p.report(self.key(name), message)),
        }
    }

    /// Paths must be absolute: a relative one would depend on the working directory the daemon
    /// (or, for the admin socket, the CLI) happens to start in.
    fn abs_path(&self, p: &mut Problems, name: &str, default: &str) -> Result<PathBuf, Reported> {
        match self.get(p, name, "a path string", Value::as_str)? {
            None => Ok(PathBuf::from(default)),
            Some(text) if Path::new(text).is_absolute() => Ok(PathBuf::from(text)),
            Some(text) => Err(p.report(
                self.key(name),
                format!("{text:?} is not an absolute path; start it with '/'"),
            )),
        }
    }

    /// `field`'s value, reporting it as missing (with `hint` saying what to add) when absent.
    fn require<T>(
        &self,
        field: Field<T>,
        p: &mut Problems,
        name: &str,
        hint: &str,
    ) -> Result<T, Reported> {
        field?.ok_or_else(|| p.report(self.key(name), format!("missing; {hint}")))
    }

    /// A `[name]` sub-table.
    pub(crate) fn table(
        &self,
        p: &mut Problems,
        name: &str,
        header: &'static str,
    ) -> Field<Table<'a>> {
        let expected = format!("a table ({header})");
        let table = self.get(p, name, &expected, Value::as_table)?;
        Ok(table.map(|table| self.child(name, table, header)))
    }

    /// The entries of a `[[name]]` array of tables (none when absent).
    fn tables(
        &self,
        p: &mut Problems,
        name: &str,
        header: &str,
    ) -> Result<Vec<Result<&'a toml::Table, Reported>>, Reported> {
        let expected = format!("an array of tables ({header})");
        let Some(list) = self.get(p, name, &expected, Value::as_array)? else {
            return Ok(Vec::new());
        };
        Ok(list
            .iter()
            .enumerate()
            .map(|(i, value)| {
                value.as_table().ok_or_else(|| {
                    p.report(
                        format!("{}[{i}]", self.key(name)),
                        format!("expected a table ({header}), found {}", describe(value)),
                    )
                })
            })
            .collect())
    }
}

/// A value's type, and the value itself unless it is a table or an array, for type errors.
fn describe(value: &Value) -> String {
    match value {
        Value::Table(_) => "a table".to_string(),
        Value::Array(_) => "an array".to_string(),
        Value::Integer(_) => format!("an integer ({value})"),
        _ => format!("a {} ({value})", value.type_str()),
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
const VIP_KEYS: &[&str] = &[
    "name",
    "address",
    "port",
    "protocol",
    "forwarding",
    "scheduler",
    "affinity",
    "affinity_ipv6_prefix",
    "ring_size",
    "health",
    "backend",
    "allow_sources",
    "deny_sources",
    "limits",
    "announce",
];
const HEALTH_KEYS: &[&str] = &[
    "kind",
    "port",
    "path",
    "expect_status",
    "host",
    "tls_verify",
    "tls_ca",
    "interval",
    "timeout",
    "rise",
    "fall",
    "on_all_down",
];
const HTTP_KEYS: &[&str] = &["path", "expect_status", "host"];
const TLS_KEYS: &[&str] = &["tls_verify", "tls_ca"];
const BACKEND_KEYS: &[&str] = &["address", "weight", "mac", "health_port", "port"];

const XDP_MODES: [AttachMode; 3] = [AttachMode::Auto, AttachMode::Native, AttachMode::Generic];
const PROTOCOLS: [(&str, Protocol); 2] = [("tcp", Protocol::Tcp), ("udp", Protocol::Udp)];
const FORWARDINGS: [(&str, Forwarding); 3] = [
    ("dsr", Forwarding::Dsr),
    ("ipip", Forwarding::Ipip),
    ("nat", Forwarding::Nat),
];
const AFFINITIES: [(&str, Affinity); 2] = [
    ("connection", Affinity::Connection),
    ("client", Affinity::Client { ipv6_host: false }),
];
const ON_ALL_DOWN: [(&str, OnAllDown); 2] = [("keep", OnAllDown::Keep), ("drop", OnAllDown::Drop)];
const ANNOUNCE_MODES: [(&str, Announce); 3] = [
    ("healthy", Announce::Healthy),
    ("always", Announce::Always),
    ("never", Announce::Never),
];

/// `[vip.health] kind`, read before the keys that depend on it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    None,
    Tcp,
    Http,
    Https,
}
const KINDS: [(&str, Kind); 4] = [
    ("none", Kind::None),
    ("tcp", Kind::Tcp),
    ("http", Kind::Http),
    ("https", Kind::Https),
];

/// Sanity bounds on map sizes, each with what it protects.
const MAX_VIPS: (u32, &str) = (1 << 16, "each VIP has per-CPU counters and two ring halves");
const MAX_BACKENDS: (u32, &str) = (1 << 20, "each backend has 32 bytes of counters per CPU");
const MAX_FLOW_TABLE_SIZE: (u32, &str) = (
    1 << 28,
    "each flow entry takes about 100 bytes, so that is already about 25 GiB",
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

/// What earlier VIPs claimed, so duplicates are reported at the later VIP, naming the first.
#[derive(Default)]
struct Seen {
    names: HashMap<String, String>,
    addrs: HashMap<VipAddr, String>,
}

fn read_vip(
    raw: &toml::Table,
    index: usize,
    sizes: Result<Sizes, Reported>,
    seen: &mut Seen,
    p: &mut Problems,
) -> Result<VipSpec, Reported> {
    // The name goes into the path of every problem of this VIP, but only once it is valid.
    let path = match raw.get("name").and_then(Value::as_str) {
        Some(name) if check_vip_name(name).is_ok() => format!("vip[{index}] ({name})"),
        _ => format!("vip[{index}]"),
    };
    let t = Table {
        table: raw,
        path,
        header: "[[vip]]",
    };
    t.reject_unknown(p, VIP_KEYS);

    let name = t.parsed(p, "name", |name| {
        check_vip_name(name).map(|()| name.to_string())
    });
    let name = t.require(name, p, "name", "add e.g. name = \"web\"");
    if let Ok(name) = &name {
        match seen.names.get(name) {
            Some(first) => {
                p.report(
                    t.key("name"),
                    format!("{name:?} is already the name of {first}; VIP names must be unique"),
                );
            }
            None => {
                seen.names.insert(name.clone(), t.path.clone());
            }
        }
    }
    let addr = t.parsed(p, "address", parse_ip);
    let addr = t.require(addr, p, "address", "add e.g. address = \"192.0.2.10\"");
    let port = t.int(p, "port", 0..=u16::MAX);
    let port = t.require(port, p, "port", "add e.g. port = 80 (0 serves every port)");
    let protocol = t
        .choice(p, "protocol", &PROTOCOLS)
        .map(|protocol| protocol.unwrap_or(Protocol::Tcp));
    // A port-0 VIP may share its address and protocol with specific-port VIPs: the data path
    // looks the exact port up first and falls back to port 0, so only exact repeats clash.
    if let (Ok(addr), Ok(port), Ok(protocol)) = (addr, port, protocol) {
        let vip = VipAddr {
            addr,
            port,
            protocol,
        };
        match seen.addrs.get(&vip) {
            Some(first) => {
                p.report(
                    t.key("address"),
                    format!(
                        "{vip} is already served by {first}; each address, port and protocol \
                         can have one VIP"
                    ),
                );
            }
            None => {
                seen.addrs.insert(vip, t.path.clone());
            }
        }
    }
    let forwarding = t
        .choice(p, "forwarding", &FORWARDINGS)
        .map(|forwarding| forwarding.unwrap_or(Forwarding::Dsr));
    let scheduler = t
        .choice(p, "scheduler", &Scheduler::CHOICES)
        .map(Option::unwrap_or_default);
    let affinity = read_affinity(&t, p);
    let ring_size = t
        .int(p, "ring_size", 0..=u32::MAX)
        .map(|size| size.unwrap_or(maglev::DEFAULT_RING_SIZE));
    let health = t
        .table(p, "health", "[vip.health]")
        .and_then(|health| match health {
            Some(health) => read_health(&health, p),
            None => Ok(HealthSpec::default()),
        });

    let announce = t
        .choice(p, "announce", &ANNOUNCE_MODES)
        .map(Option::unwrap_or_default);

    let backend_tables = t.tables(p, "backend", "[[vip.backend]]");
    let backends: Vec<Result<BackendSpec, Reported>> = match &backend_tables {
        Ok(list) => list
            .iter()
            .enumerate()
            .map(|(i, raw)| {
                raw.and_then(|raw| {
                    let backend = t.child(&format!("backend[{i}]"), raw, "[[vip.backend]]");
                    read_backend(&backend, p)
                })
            })
            .collect(),
        Err(reported) => vec![Err(*reported)],
    };
    check_backends(&t, forwarding, addr, &backends, p);
    check_nat_ports(&t, forwarding, port, &backends, p);
    let acl = crate::acl::read(&t, p);
    let limits = crate::limits::read(&t, p);
    if let Ok(size) = ring_size {
        check_ring_size(
            &t,
            size,
            backend_tables.as_ref().map_or(0, Vec::len),
            sizes,
            p,
        );
    }

    // Client affinity is a property of the hash that fills a Maglev table; the other
    // schedulers do not hash at all.
    if let (Ok(scheduler), Ok(Affinity::Client { .. })) = (scheduler, &affinity) {
        if scheduler != Scheduler::Maglev {
            p.report(
                t.key("affinity"),
                format!(
                    "\"client\" needs scheduler = \"maglev\" (this VIP has \"{scheduler}\"): \
                     round robin and least-conn choose per connection; remove one of the two"
                ),
            );
        }
    }
    if let (Ok(scheduler), Ok(size)) = (scheduler, ring_size) {
        let weights: Vec<u32> = backends.iter().flatten().map(|b| b.weight).collect();
        if let Err(err) = scheduler::check(scheduler, &weights, size) {
            p.report(t.key("scheduler"), err.to_string());
        }
    }

    // A port-0 VIP has no port to probe, unless every backend names its own.
    if let (Ok(0), Ok(health)) = (port, &health) {
        let unprobed = backends
            .iter()
            .flatten()
            .any(|b| b.health_port.or(b.port).is_none());
        if health.kind != CheckKind::None && health.port.is_none() && unprobed {
            p.report(
                t.key("health.port"),
                "missing; the VIP has port = 0 (every port), so checks need a port: set \
                 health.port, or health_port on every backend",
            );
        }
    }

    let backends = backends.into_iter().collect::<Result<Vec<_>, _>>();
    Ok(VipSpec {
        name: name?,
        vip: VipAddr {
            addr: addr?,
            port: port?,
            protocol: protocol?,
        },
        forwarding: forwarding?,
        scheduler: scheduler?,
        affinity: affinity?,
        ring_size: ring_size?,
        health: health?,
        backends: backends?,
        acl: acl?,
        limits: limits?,
        announce: announce?,
    })
}

/// `affinity` and, for client affinity, how much of an IPv6 client address identifies it.
fn read_affinity(t: &Table, p: &mut Problems) -> Result<Affinity, Reported> {
    let affinity = t
        .choice(p, "affinity", &AFFINITIES)
        .map(|affinity| affinity.unwrap_or_default());
    let prefix = t.int(p, "affinity_ipv6_prefix", 0..=128u8)?;
    match (affinity?, prefix) {
        (affinity, None) => Ok(affinity),
        (Affinity::Client { .. }, Some(64)) => Ok(Affinity::Client { ipv6_host: false }),
        (Affinity::Client { .. }, Some(128)) => Ok(Affinity::Client { ipv6_host: true }),
        (Affinity::Client { .. }, Some(other)) => Err(p.report(
            t.key("affinity_ipv6_prefix"),
            format!("{other} is not supported: use 64 (the client's /64) or 128 (its address)"),
        )),
        (Affinity::Connection, Some(_)) => Err(p.report(
            t.key("affinity_ipv6_prefix"),
            "only applies with affinity = \"client\": set that too, or remove this key",
        )),
    }
}

/// Backend `port` is a nat setting: other modes keep the VIP's port, and a port-0 nat VIP
/// keeps each client's.
fn check_nat_ports(
    t: &Table,
    forwarding: Result<Forwarding, Reported>,
    vip_port: Result<u16, Reported>,
    backends: &[Result<BackendSpec, Reported>],
    p: &mut Problems,
) {
    let (Ok(forwarding), Ok(vip_port)) = (forwarding, vip_port) else {
        return;
    };
    for (i, backend) in backends.iter().enumerate() {
        let Ok(backend) = backend else { continue };
        let key = t.key(&format!("backend[{i}].port"));
        if backend.port.is_some() && forwarding != Forwarding::Nat {
            p.report(
                key,
                format!(
                    "only applies with forwarding = \"nat\" (with \"{forwarding}\" the backend \
                     receives the VIP's port); remove it or use forwarding = \"nat\""
                ),
            );
        } else if backend.port.is_some() && vip_port == 0 {
            p.report(
                key,
                "the VIP has port = 0, so each connection keeps its client's destination port; \
                 remove it, or give the VIP a port",
            );
        }
    }
}

/// Duplicates and address families, across the valid backends of one VIP.
fn check_backends(
    t: &Table,
    forwarding: Result<Forwarding, Reported>,
    vip_addr: Result<IpAddr, Reported>,
    backends: &[Result<BackendSpec, Reported>],
    p: &mut Problems,
) {
    let mut first_index: HashMap<IpAddr, usize> = HashMap::new();
    for (i, backend) in backends.iter().enumerate() {
        let Ok(backend) = backend else { continue };
        let key = t.key(&format!("backend[{i}].address"));
        if let Some(first) = first_index.get(&backend.addr) {
            p.report(
                key,
                format!(
                    "{} is already backend[{first}]; list each backend once",
                    backend.addr
                ),
            );
            continue;
        }
        first_index.insert(backend.addr, i);
        // ipip can carry IPv4 in IPv6 (4in6) but not IPv6 in IPv4. dsr only rewrites MACs: the
        // backend address is used for neighbour resolution and health checks, never as the
        // packet's destination, so any family works there.
        if let (Ok(Forwarding::Nat), Ok(vip_addr)) = (forwarding, vip_addr) {
            if vip_addr.is_ipv4() != backend.addr.is_ipv4() {
                p.report(
                    key.clone(),
                    format!(
                        "{} and the VIP {vip_addr} are of different families, and nat \
                         translates within one family (no NAT64); use a backend address of \
                         the VIP's family",
                        backend.addr
                    ),
                );
            }
        }
        if let (Ok(Forwarding::Ipip), Ok(IpAddr::V6(_)), IpAddr::V4(_)) =
            (forwarding, vip_addr, backend.addr)
        {
            p.report(
                key,
                format!(
                    "{} is IPv4 but the VIP is IPv6 with forwarding = \"ipip\", and IPv6 cannot \
                     be tunnelled in IPv4 (6in4 is not supported); use the backend's IPv6 \
                     address or forwarding = \"dsr\"",
                    backend.addr
                ),
            );
        }
    }
}

/// `backends` counts every configured backend, weighted or not: weights can be raised at
/// runtime without this file being checked again.
fn check_ring_size(
    t: &Table,
    size: u32,
    backends: usize,
    sizes: Result<Sizes, Reported>,
    p: &mut Problems,
) {
    // The checks and errors of maglev::build_table, in its order, so `xdplb check` says what
    // the daemon would.
    let maglev_error = if size < 2 {
        Some(MaglevError::SizeTooSmall { size, backends })
    } else if !maglev::is_prime(size) {
        Some(MaglevError::SizeNotPrime(size))
    } else if (size as usize) < backends {
        Some(MaglevError::SizeTooSmall { size, backends })
    } else {
        None
    };
    if let Some(err) = maglev_error {
        p.report(t.key("ring_size"), err.to_string());
    }
    if let Ok(sizes) = sizes {
        if size > sizes.max_ring_size {
            p.report(
                t.key("ring_size"),
                format!(
                    "{size} is larger than daemon.max_ring_size ({}); use a smaller prime \
                     or raise daemon.max_ring_size (changing it needs a daemon restart)",
                    sizes.max_ring_size
                ),
            );
        }
    }
}

/// VIP names appear in metrics labels and CLI arguments, so they keep to a safe alphabet.
fn check_vip_name(name: &str) -> Result<(), String> {
    let valid = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
    if !name.is_empty() && name.chars().all(valid) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid VIP name: use letters, digits, '_', '.' and '-' \
             (it appears in metrics labels and CLI arguments)"
        ))
    }
}

fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an IP address"))
}

fn read_health(t: &Table, p: &mut Problems) -> Result<HealthSpec, Reported> {
    t.reject_unknown(p, HEALTH_KEYS);
    let defaults = HealthSpec::default();
    let kind = match t.choice(p, "kind", &KINDS) {
        Ok(Some(Kind::Http)) => {
            let tls = reject_keys(t, p, TLS_KEYS, &["https"]).map(|()| None);
            read_http(t, p, tls)
        }
        Ok(Some(Kind::Https)) => {
            let tls = read_tls(t, p).map(Some);
            read_http(t, p, tls)
        }
        Ok(Some(Kind::Tcp)) => reject_http_keys(t, p, CheckKind::Tcp),
        Ok(None | Some(Kind::None)) => reject_http_keys(t, p, CheckKind::None),
        Err(reported) => Err(reported),
    };
    // Port 0 cannot be probed.
    let port = t.int(p, "port", 1..=u16::MAX);
    let interval = t
        .duration(p, "interval")
        .map(|d| d.unwrap_or(defaults.interval));
    let timeout = t
        .duration(p, "timeout")
        .map(|d| d.unwrap_or(defaults.timeout));
    if let (Ok(interval), Ok(timeout)) = (interval, timeout) {
        if timeout >= interval {
            p.report(
                t.key("timeout"),
                format!(
                    "{} is not shorter than interval ({}): a check must end before the next \
                     one starts; lower timeout or raise interval",
                    format_duration(timeout),
                    format_duration(interval)
                ),
            );
        }
    }
    let rise = t
        .int(p, "rise", 1..=u32::MAX)
        .map(|n| n.unwrap_or(defaults.rise));
    let fall = t
        .int(p, "fall", 1..=u32::MAX)
        .map(|n| n.unwrap_or(defaults.fall));
    let on_all_down = t
        .choice(p, "on_all_down", &ON_ALL_DOWN)
        .map(Option::unwrap_or_default);
    Ok(HealthSpec {
        kind: kind?,
        port: port?,
        interval: interval?,
        timeout: timeout?,
        rise: rise?,
        fall: fall?,
        on_all_down: on_all_down?,
    })
}

/// HTTP settings under another kind would silently do nothing, which hides a mistake.
fn reject_http_keys(t: &Table, p: &mut Problems, kind: CheckKind) -> Result<CheckKind, Reported> {
    let http = reject_keys(t, p, HTTP_KEYS, &["http", "https"]);
    let tls = reject_keys(t, p, TLS_KEYS, &["https"]);
    http.and(tls).map(|()| kind)
}

/// Reports each of `keys` present in `t`: only the check kinds `used_by` use them.
fn reject_keys(
    t: &Table,
    p: &mut Problems,
    keys: &[&str],
    used_by: &[&str],
) -> Result<(), Reported> {
    let kinds: Vec<String> = used_by.iter().map(|kind| format!("{kind:?}")).collect();
    let mut result = Ok(());
    for name in keys.iter().filter(|name| t.table.contains_key(**name)) {
        result = Err(p.report(
            t.key(name),
            format!(
                "{name} is only used by kind = {}; remove it or set kind = {}",
                kinds.join(" or "),
                kinds[0]
            ),
        ));
    }
    result
}

/// `tls_verify` and `tls_ca` of an `https` check. The CA file is read and parsed now, so a
/// bad one is a config error (a reload keeps the running config) rather than failing checks.
fn read_tls(t: &Table, p: &mut Problems) -> Result<TlsSpec, Reported> {
    let verify = t
        .get(p, "tls_verify", "true or false", Value::as_bool)
        .map(|v| v.unwrap_or(false));
    let ca = match verify {
        Ok(false) if t.table.contains_key("tls_ca") => Err(p.report(
            t.key("tls_ca"),
            "is only used with tls_verify = true; set tls_verify = true to verify the backends \
             against it, or remove tls_ca",
        )),
        _ => t.parsed(p, "tls_ca", |path| {
            if !Path::new(path).is_absolute() {
                return Err(format!(
                    "{path:?} is not an absolute path; start it with '/'"
                ));
            }
            crate::health::load_ca(Path::new(path))
        }),
    };
    Ok(TlsSpec {
        verify: verify?,
        ca: ca?,
    })
}

fn read_http(
    t: &Table,
    p: &mut Problems,
    tls: Result<Option<TlsSpec>, Reported>,
) -> Result<CheckKind, Reported> {
    let path = t
        .parsed(p, "path", |path| {
            if path.starts_with('/') {
                request_safe(path, "percent-encode them (e.g. %20 for a space)")
            } else {
                Err(format!("{path:?} does not start with '/'"))
            }
        })
        .map(|path| path.unwrap_or_else(|| "/".to_string()));
    let expect_status = t
        .int(p, "expect_status", 100..=599)
        .map(|status| status.unwrap_or(200));
    let host = t.parsed(p, "host", |host| {
        if host.is_empty() {
            Err("empty; leave the key out to send the backend's address".to_string())
        } else {
            request_safe(host, "remove them")
        }
    });
    if let (Ok(Some(_)), Ok(Some(host))) = (&tls, &host) {
        if let Err(message) = crate::health::server_name(Some(host), IpAddr::from([0, 0, 0, 0])) {
            return Err(p.report(t.key("host"), message));
        }
    }
    Ok(CheckKind::Http {
        path: path?,
        expect_status: expect_status?,
        host: host?,
        tls: tls?,
    })
}

/// The path and the host go into the request verbatim, where whitespace or control
/// characters would break it or inject into it.
fn request_safe(text: &str, advice: &str) -> Result<String, String> {
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(format!(
            "{text:?} contains whitespace or control characters, which would break the HTTP \
             request; {advice}"
        ))
    } else {
        Ok(text.to_string())
    }
}

fn read_backend(t: &Table, p: &mut Problems) -> Result<BackendSpec, Reported> {
    t.reject_unknown(p, BACKEND_KEYS);
    let addr = t.parsed(p, "address", parse_ip);
    let addr = t.require(addr, p, "address", "add e.g. address = \"10.1.0.11\"");
    // Weights are relative shares; 16 bits are plenty, and the cap catches a misplaced value.
    let weight = t
        .int(p, "weight", 0..=u32::from(u16::MAX))
        .map(|weight| weight.unwrap_or(100));
    let mac = t.parsed(p, "mac", str::parse);
    let health_port = t.int(p, "health_port", 1..=u16::MAX);
    let port = t.int(p, "port", 1..=u16::MAX);
    Ok(BackendSpec {
        addr: addr?,
        weight: weight?,
        mac: mac?,
        health_port: health_port?,
        port: port?,
    })
}

/// Parses the duration syntax of the file (also used for CLI arguments): whole numbers with
/// a unit, optionally chained: `500ms`, `5s`, `5m`, `2h`, `1m30s`. Zero is accepted here; the
/// file's keys additionally require a positive duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{text:?} is not a duration: write whole numbers with a unit (ms, s, m, h), \
             e.g. \"500ms\", \"5s\", \"5m\" or \"1m30s\""
        )
    };
    if text.is_empty() {
        return Err(bad());
    }
    let mut millis: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_end = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .map_or(rest.len(), |i| digits + i);
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        let scale = match &rest[digits..unit_end] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad()),
        };
        millis = number
            .checked_mul(scale)
            .and_then(|part| millis.checked_add(part))
            .ok_or_else(bad)?;
        rest = &rest[unit_end..];
    }
    Ok(Duration::from_millis(millis))
}

/// The largest unit that divides `duration` exactly, in the syntax [`parse_duration`] reads.
fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    let (unit, scale) = [("h", 3_600_000), ("m", 60_000), ("s", 1_000)]
        .into_iter()
        .find(|(_, scale)| millis.is_multiple_of(*scale))
        .unwrap_or(("ms", 1));
    format!("{}{unit}", millis / scale)
}

impl Config {
    /// What would be applied, for `xdplb check`: the interfaces, then one line per VIP followed
    /// by its backends, in aligned columns.
    pub fn summary(&self) -> String {
        let vips = &self.services.vips;
        let mode = xdp_mode_name(self.daemon.xdp_mode);
        let backends: usize = vips.iter().map(|vip| vip.backends.len()).sum();
        let mut out = format!(
            "interfaces {} (xdp_mode {mode}); {}, {}\n",
            self.daemon.interfaces.join(", "),
            count(vips.len(), "VIP"),
            count(backends, "backend"),
        );
        let vip_rows: Vec<Vec<String>> = vips
            .iter()
            .map(|vip| {
                vec![
                    vip.name.clone(),
                    vip.vip.to_string(),
                    vip.forwarding.to_string(),
                    vip.scheduler.to_string(),
                    format!("ring {}", vip.ring_size),
                    health_summary(&vip.health),
                ]
            })
            .collect();
        let backend_rows: Vec<Vec<String>> = vips
            .iter()
            .flat_map(|vip| &vip.backends)
            .map(|backend| {
                vec![
                    backend.addr.to_string(),
                    format!("weight {}", backend.weight),
                    backend
                        .mac
                        .map(|mac| format!("mac {mac}"))
                        .unwrap_or_default(),
                    backend
                        .health_port
                        .map(|port| format!("health port {port}"))
                        .unwrap_or_default(),
                ]
            })
            .collect();
        let mut backend_lines = align(&backend_rows).into_iter();
        for (vip, line) in vips.iter().zip(align(&vip_rows)) {
            out += &line;
            out.push('\n');
            if vip.backends.is_empty() {
                out += "  (no backends: its packets are dropped)\n";
            }
            let filter_lines = vip.acl.status().line().into_iter();
            for filter in filter_lines.chain(vip.limits.map(|l| l.line())) {
                out += &format!("  {filter}\n");
            }
            let announced = self.daemon.announce.is_some() && vip.announce != Announce::Never;
            if announced && vip.scheduler != Scheduler::Maglev {
                out += &format!(
                    "  warning: scheduler \"{}\" chooses per load balancer and this VIP is \
                     announced over BGP: a flow moved to another load balancer (an LB failure, \
                     an ECMP change) keeps its backend only if that load balancer's flow table \
                     knows it; scheduler = \"maglev\" makes the same choice on every load \
                     balancer\n",
                    vip.scheduler
                );
            }
            for line in backend_lines.by_ref().take(vip.backends.len()) {
                out += "  ";
                out += &line;
                out.push('\n');
            }
        }
        out
    }
}

fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn xdp_mode_name(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Auto => "auto",
        AttachMode::Native => "native",
        AttachMode::Generic => "generic",
    }
}

fn health_summary(health: &HealthSpec) -> String {
    let port = health
        .port
        .map(|port| format!(" port {port}"))
        .unwrap_or_default();
    let every = format_duration(health.interval);
    match &health.kind {
        CheckKind::None => "health none".to_string(),
        CheckKind::Tcp => format!("health tcp{port} every {every}"),
        CheckKind::Http { path, tls, .. } => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            format!("health {scheme} {path}{port} every {every}")
        }
    }
}

/// Pads every column to its widest cell, two spaces apart, without trailing blanks.
fn align(rows: &[Vec<String>]) -> Vec<String> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|row| row.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, &width)| format!("{cell:<width$}"))
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Mac;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const DAEMON: &str = "[daemon]\ninterfaces = [\"eth0\"]\n";
    /// A minimal valid VIP; keys appended to it land in its `[[vip]]` table.
    const WEB: &str = "[[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 80\n";

    fn valid(text: &str) -> Config {
        parse(text, "t.toml").unwrap_or_else(|err| panic!("{err}\n--- input:\n{text}"))
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text, "t.toml") {
            Err(ConfigError::Invalid { file, problems }) => {
                assert_eq!(file, "t.toml");
                problems
            }
            other => panic!("expected problems, got {other:?}\n--- input:\n{text}"),
        }
    }

    /// `text` has exactly one problem (so nothing cascades), at `key`, mentioning `message`.
    fn assert_rejected(text: &str, key: &str, message: &str) {
        let problems = problems(text);
        assert!(
            problems.len() == 1 && problems[0].key == key && problems[0].message.contains(message),
            "expected exactly `{key}: ...{message}...`, got {problems:#?}\n--- input:\n{text}"
        );
    }

    fn with_vip(vip_keys: &str) -> String {
        format!("{DAEMON}{WEB}{vip_keys}")
    }

    fn with_health(health_keys: &str) -> String {
        format!("{DAEMON}{WEB}[vip.health]\n{health_keys}")
    }

    fn with_backend(backend_keys: &str) -> String {
        format!("{DAEMON}{WEB}[[vip.backend]]\n{backend_keys}")
    }

    #[test]
    fn a_full_file_maps_to_the_model() {
        let text = r#"
            [daemon]
            interfaces = ["eth0", "eth1"]
            xdp_mode = "native"
            admin_socket = "/run/lb/admin.sock"
            state_dir = "/var/lib/lb"
            pin_dir = "/sys/fs/bpf/lb"
            flow_table_size = 2000000
            max_vips = 8
            max_backends = 100
            max_ring_size = 1009
            metrics_listen = "[::1]:9650"
            idle_timeout = "5m"
            stats_interval = "500ms"
            hash_seed = 42
            ipip_source_v4 = "10.255.0.0/16"
            ipip_source_v6 = "fd00:2::/64"

            [daemon.announce]
            table = 4242
            withdraw_grace = "5s"

            [[vip]]
            name = "web"
            address = "192.0.2.10"
            port = 80
            protocol = "tcp"
            forwarding = "dsr"
            ring_size = 1009
            announce = "always"

            [vip.health]
            kind = "http"
            port = 8080
            path = "/healthz"
            expect_status = 204
            host = "web.example"
            interval = "2s"
            timeout = "1500ms"
            rise = 1
            fall = 5
            on_all_down = "drop"

            [[vip.backend]]
            address = "10.1.0.11"
            weight = 0
            mac = "02:00:00:00:00:11"
            health_port = 8081

            [[vip]]
            name = "dns"
            address = "2001:db8::53"
            port = 0
            protocol = "udp"
            forwarding = "ipip"
            scheduler = "least-conn"
            ring_size = 13

            [vip.health]
            kind = "tcp"
            port = 53

            [[vip.backend]]
            address = "2001:db8:1::53"
        "#;
        let expected = Config {
            daemon: DaemonConfig {
                interfaces: vec!["eth0".into(), "eth1".into()],
                xdp_mode: AttachMode::Native,
                admin_socket: "/run/lb/admin.sock".into(),
                state_dir: "/var/lib/lb".into(),
                pin_dir: "/sys/fs/bpf/lb".into(),
                sizes: Sizes {
                    nat_table_size: lb_common::DEFAULT_NAT_TABLE_SIZE,
                    max_vips: 8,
                    max_backends: 100,
                    max_ring_size: 1009,
                    flow_table_size: 2_000_000,
                },
                metrics_listen: Some("[::1]:9650".parse().unwrap()),
                flow_idle_timeout: Duration::from_secs(300),
                stats_interval: Duration::from_millis(500),
                announce: Some(AnnounceConfig {
                    table: 4242,
                    withdraw_grace: Duration::from_secs(5),
                }),
                log: None,
            },
            services: Services {
                settings: DataPathSettings {
                    nat: Default::default(),
                    hash_seed: 42,
                    ipip_source_v4: Prefix {
                        addr: Ipv4Addr::new(10, 255, 0, 0).into(),
                        len: 16,
                    },
                    ipip_source_v6: Prefix {
                        addr: Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0).into(),
                        len: 64,
                    },
                    icmp_too_big_rate: 1000,
                    flood: crate::flood::FloodSpec {
                        pins_per_second: 31250,
                    },
                },
                vips: vec![
                    VipSpec {
                        name: "web".into(),
                        vip: VipAddr {
                            addr: Ipv4Addr::new(192, 0, 2, 10).into(),
                            port: 80,
                            protocol: Protocol::Tcp,
                        },
                        forwarding: Forwarding::Dsr,
                        scheduler: Scheduler::Maglev,
                        affinity: Default::default(),
                        ring_size: 1009,
                        health: HealthSpec {
                            kind: CheckKind::Http {
                                path: "/healthz".into(),
                                expect_status: 204,
                                host: Some("web.example".into()),
                                tls: None,
                            },
                            port: Some(8080),
                            interval: Duration::from_secs(2),
                            timeout: Duration::from_millis(1500),
                            rise: 1,
                            fall: 5,
                            on_all_down: OnAllDown::Drop,
                        },
                        backends: vec![BackendSpec {
                            port: None,
                            addr: Ipv4Addr::new(10, 1, 0, 11).into(),
                            weight: 0,
                            mac: Some(Mac([2, 0, 0, 0, 0, 0x11])),
                            health_port: Some(8081),
                        }],
                        acl: Default::default(),
                        limits: None,
                        announce: Announce::Always,
                    },
                    VipSpec {
                        name: "dns".into(),
                        vip: VipAddr {
                            addr: "2001:db8::53".parse().unwrap(),
                            port: 0,
                            protocol: Protocol::Udp,
                        },
                        forwarding: Forwarding::Ipip,
                        scheduler: Scheduler::LeastConn,
                        affinity: Default::default(),
                        ring_size: 13,
                        health: HealthSpec {
                            kind: CheckKind::Tcp,
                            port: Some(53),
                            ..HealthSpec::default()
                        },
                        backends: vec![BackendSpec {
                            port: None,
                            addr: "2001:db8:1::53".parse().unwrap(),
                            weight: 100,
                            mac: None,
                            health_port: None,
                        }],
                        acl: Default::default(),
                        limits: None,
                        announce: Announce::Healthy,
                    },
                ],
            },
        };
        assert_eq!(valid(text), expected);
    }

    #[test]
    fn affinity_and_its_ipv6_prefix() {
        for (keys, expected) in [
            ("affinity = \"connection\"\n", Affinity::Connection),
            (
                "affinity = \"client\"\n",
                Affinity::Client { ipv6_host: false },
            ),
            (
                "affinity = \"client\"\naffinity_ipv6_prefix = 64\n",
                Affinity::Client { ipv6_host: false },
            ),
            (
                "affinity = \"client\"\naffinity_ipv6_prefix = 128\n",
                Affinity::Client { ipv6_host: true },
            ),
        ] {
            let config = valid(&format!(
                "{}[[vip.backend]]\naddress = \"10.1.0.11\"\n",
                with_vip(keys)
            ));
            assert_eq!(config.services.vips[0].affinity, expected, "{keys}");
        }
        let config = valid(&format!("{DAEMON}icmp_too_big_rate = 0\n{WEB}"));
        assert_eq!(config.services.settings.icmp_too_big_rate, 0);
    }

    #[test]
    fn defaults_apply() {
        let config = valid(&with_backend("address = \"10.1.0.11\"\n"));
        assert_eq!(
            config.daemon,
            DaemonConfig {
                interfaces: vec!["eth0".into()],
                xdp_mode: AttachMode::Auto,
                admin_socket: "/run/xdplb/admin.sock".into(),
                state_dir: "/var/lib/xdplb".into(),
                pin_dir: "/sys/fs/bpf/xdplb".into(),
                sizes: Sizes {
                    nat_table_size: lb_common::DEFAULT_NAT_TABLE_SIZE,
                    max_vips: 64,
                    max_backends: 4096,
                    max_ring_size: 65537,
                    flow_table_size: 1 << 20,
                },
                metrics_listen: None,
                flow_idle_timeout: Duration::from_secs(300),
                stats_interval: Duration::from_secs(1),
                announce: None,
                log: None,
            }
        );
        assert_eq!(
            valid(&format!("{DAEMON}[daemon.announce]\ntable = 300\n"))
                .daemon
                .announce,
            Some(AnnounceConfig {
                table: 300,
                withdraw_grace: AnnounceConfig::DEFAULT_WITHDRAW_GRACE,
            })
        );
        assert_eq!(config.services.settings, DataPathSettings::default());
        let vip = &config.services.vips[0];
        assert_eq!(vip.vip.protocol, Protocol::Tcp);
        assert_eq!(vip.forwarding, Forwarding::Dsr);
        assert_eq!(vip.affinity, Affinity::Connection);
        assert_eq!(vip.ring_size, 65537);
        assert_eq!(vip.health, HealthSpec::default());
        assert_eq!(vip.announce, Announce::Healthy);
        assert_eq!(
            vip.backends,
            [BackendSpec {
                port: None,
                addr: Ipv4Addr::new(10, 1, 0, 11).into(),
                weight: 100,
                mac: None,
                health_port: None,
            }]
        );
        // HTTP defaults, and a [vip.health] without kind means none.
        let http = valid(&with_health("kind = \"http\"\n"));
        assert_eq!(
            http.services.vips[0].health.kind,
            CheckKind::Http {
                path: "/".into(),
                expect_status: 200,
                host: None,
                tls: None,
            }
        );
        let https = valid(&with_health(
            "kind = \"https\"\ntls_verify = true\nhost = \"web.example:8443\"\n",
        ));
        assert_eq!(
            https.services.vips[0].health.kind,
            CheckKind::Http {
                path: "/".into(),
                expect_status: 200,
                host: Some("web.example:8443".into()),
                tls: Some(TlsSpec {
                    verify: true,
                    ca: None
                }),
            }
        );
        let none = valid(&with_health("interval = \"5s\"\n"));
        assert_eq!(none.services.vips[0].health.kind, CheckKind::None);
        // No VIP at all is a valid (idle) configuration.
        assert!(valid(DAEMON).services.vips.is_empty());
    }

    #[test]
    fn the_example_file_parses() {
        let config = valid(include_str!("../../../examples/xdplb.toml"));
        let vips = &config.services.vips;
        assert_eq!(vips.len(), 2);
        let (web, api) = (&vips[0], &vips[1]);
        assert_eq!(
            (web.name.as_str(), web.forwarding, web.backends.len()),
            ("web", Forwarding::Dsr, 3)
        );
        assert!(web.vip.addr.is_ipv4());
        assert!(matches!(web.health.kind, CheckKind::Http { .. }));
        assert_eq!(web.announce, Announce::Healthy);
        assert_eq!(config.daemon.announce.map(|a| a.table), Some(4242));
        assert_eq!(
            (api.name.as_str(), api.forwarding, api.health.kind.clone()),
            ("api", Forwarding::Ipip, CheckKind::Tcp)
        );
    }

    #[test]
    fn check_warns_when_a_per_lb_scheduler_is_announced_over_bgp() {
        let text = |announce: &str, scheduler: &str| {
            format!(
                "{DAEMON}{announce}{WEB}scheduler = \"{scheduler}\"\n\
                 [[vip.backend]]\naddress = \"10.1.0.11\"\n"
            )
        };
        let bgp = "[daemon.announce]\ntable = 100\n";
        let warned = |text: String| valid(&text).summary().contains("warning: scheduler");
        assert!(warned(text(bgp, "least-conn")));
        assert!(warned(text(bgp, "round-robin")));
        assert!(
            !warned(text(bgp, "maglev")),
            "Maglev chooses alike on every LB"
        );
        assert!(!warned(text("", "least-conn")), "not announced: one LB");
    }

    #[test]
    fn summary_lists_vips_then_their_backends_in_columns() {
        let config = valid(
            r#"
            [daemon]
            interfaces = ["eth0", "eth1"]
            xdp_mode = "native"
            [[vip]]
            name = "web"
            address = "192.0.2.10"
            port = 80
            [vip.health]
            kind = "http"
            path = "/healthz"
            [[vip.backend]]
            address = "10.1.0.11"
            mac = "02:00:00:00:00:11"
            [[vip.backend]]
            address = "10.1.0.12"
            weight = 5
            health_port = 8081
            [[vip]]
            name = "api"
            address = "2001:db8::10"
            port = 443
            forwarding = "ipip"
            scheduler = "round-robin"
            ring_size = 1009
            [vip.health]
            kind = "tcp"
            port = 8443
            interval = "2s"
            [[vip.backend]]
            address = "2001:db8:1::21"
            [[vip]]
            name = "spare"
            address = "192.0.2.11"
            port = 53
            protocol = "udp"
            deny_sources = ["203.0.113.0/24"]
            [vip.limits]
            new_flows_total = 500
            "#,
        );
        assert_eq!(
            config.summary(),
            "interfaces eth0, eth1 (xdp_mode native); 3 VIPs, 3 backends\n\
             web    192.0.2.10:80/tcp       dsr   maglev       ring 65537  health http /healthz every 1s\n\
             \x20 10.1.0.11       weight 100  mac 02:00:00:00:00:11\n\
             \x20 10.1.0.12       weight 5                           health port 8081\n\
             api    [2001:db8::10]:443/tcp  ipip  round-robin  ring 1009   health tcp port 8443 every 2s\n\
             \x20 2001:db8:1::21  weight 100\n\
             spare  192.0.2.11:53/udp       dsr   maglev       ring 65537  health none\n\
             \x20 (no backends: its packets are dropped)\n\
             \x20 sources: allow everyone; deny 203.0.113.0/24\n\
             \x20 limits: 500 new flows/s in total\n"
        );
    }

    #[test]
    fn syntax_errors_name_file_line_and_column() {
        let err = parse(
            "[daemon]\ninterfaces = [\"eth0\"]\nmax_vips = = 3\n",
            "x.toml",
        )
        .unwrap_err();
        let ConfigError::Syntax { line, column, .. } = &err else {
            panic!("expected a syntax error, got {err:?}");
        };
        assert_eq!((*line, *column), (3, 12));
        assert!(
            err.to_string().starts_with("x.toml:3:12: not valid TOML: "),
            "{err}"
        );

        let err = parse("[daemon]\nmax_vips = 1\nmax_vips = 2\n", "x.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.toml:3:1: not valid TOML: duplicate key `max_vips` in table `daemon`"
        );
        // toml has no message for a value missing at the very end.
        let err = parse("a = ", "x.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.toml:1:5: not valid TOML: expected a value"
        );
    }

    #[test]
    fn load_reads_files_and_explains_unreadable_ones() {
        let dir = std::env::temp_dir().join(format!("xdplb-config-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("xdplb.toml");
        fs::write(&path, with_vip("")).unwrap();
        assert_eq!(load(&path).unwrap().services.vips[0].name, "web");

        fs::write(&path, "[daemon]\n").unwrap();
        let err = load(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: daemon.interfaces: missing; list the interfaces XDP attaches to, \
                 e.g. interfaces = [\"eth0\"]",
                path.display()
            )
        );

        let missing = dir.join("missing.toml");
        let err = load(&missing).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Read { path, source } if *path == missing
                && source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.starts_with(&format!("cannot read {}: ", missing.display())));
        assert!(message.ends_with("(check the path)"), "{message}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn schedulers_are_checked_against_their_limits() {
        assert_rejected(
            &with_vip("scheduler = \"random\"\n"),
            "vip[0] (web).scheduler",
            "\"random\" is not one of \"maglev\", \"round-robin\", \"least-conn\"",
        );
        // Round robin: the weighted turn (sum / gcd) must fit the ring.
        let turn = |weights: &[u32]| {
            let backends: String = weights
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    format!(
                        "[[vip.backend]]\naddress = \"10.0.0.{}\"\nweight = {w}\n",
                        i + 1
                    )
                })
                .collect();
            format!("{DAEMON}{WEB}scheduler = \"round-robin\"\nring_size = 13\n{backends}")
        };
        assert_rejected(
            &turn(&[100, 201, 301]),
            "vip[0] (web).scheduler",
            "turn is 602 new flows long",
        );
        assert_eq!(
            valid(&turn(&[100, 200, 300])).services.vips[0].scheduler,
            Scheduler::RoundRobin
        );
        // Least-conn: a bounded scan, so a bounded number of backends.
        let backends: String = (0..65)
            .map(|i| {
                format!(
                    "[[vip.backend]]\naddress = \"10.0.{}.{}\"\n",
                    i / 200,
                    i % 200 + 1
                )
            })
            .collect();
        assert_rejected(
            &format!("{DAEMON}{WEB}scheduler = \"least-conn\"\n{backends}"),
            "vip[0] (web).scheduler",
            "at most 64 backends per new flow, and the VIP has 65",
        );
        assert_eq!(
            valid(&with_vip("")).services.vips[0].scheduler,
            Scheduler::Maglev,
            "maglev by default"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_table() {
        assert_rejected(
            &format!("vips = []\n{DAEMON}"),
            "vips",
            "unknown key in the top level; the keys there are: daemon, vip",
        );
        assert_rejected(
            &format!("{DAEMON}max_vip = 3\n"),
            "daemon.max_vip",
            "unknown key in [daemon]; the keys there are: interfaces, xdp_mode",
        );
        assert_rejected(
            &with_vip("protocl = \"udp\"\n"),
            "vip[0] (web).protocl",
            "unknown key in [[vip]]; the keys there are: name, address, port, protocol",
        );
        assert_rejected(
            &with_health("kind = \"tcp\"\nintervall = \"2s\"\n"),
            "vip[0] (web).health.intervall",
            "unknown key in [vip.health]; the keys there are: kind, port, path",
        );
        assert_rejected(
            &with_backend("address = \"10.1.0.11\"\nwieght = 5\n"),
            "vip[0] (web).backend[0].wieght",
            "unknown key in [[vip.backend]]; the keys there are: address, weight, mac, \
             health_port",
        );
    }

    #[test]
    fn wrong_types_are_rejected() {
        let cases = [
            (
                "daemon = 1\n".to_string(),
                "daemon",
                "expected a table ([daemon]), found an integer (1)",
            ),
            (
                format!("{DAEMON}max_vips = \"64\"\n"),
                "daemon.max_vips",
                "expected an integer, found a string (\"64\")",
            ),
            (
                format!("{DAEMON}idle_timeout = 300\n"),
                "daemon.idle_timeout",
                "expected a duration string such as \"500ms\" or \"5s\", found an integer",
            ),
            (
                "[daemon]\ninterfaces = \"eth0\"\n".to_string(),
                "daemon.interfaces",
                "expected an array of interface names, found a string (\"eth0\")",
            ),
            (
                "[daemon]\ninterfaces = [\"eth0\", 1]\n".to_string(),
                "daemon.interfaces[1]",
                "expected an interface name (a string), found an integer (1)",
            ),
            (
                format!("{DAEMON}state_dir = true\n"),
                "daemon.state_dir",
                "expected a path string, found a boolean (true)",
            ),
            (
                format!("{DAEMON}[vip]\nname = \"web\"\n"),
                "vip",
                "expected an array of tables ([[vip]]), found a table",
            ),
            (
                format!("vip = [1]\n{DAEMON}"),
                "vip[0]",
                "expected a table ([[vip]]), found an integer (1)",
            ),
            (
                with_vip("protocol = 6\n"),
                "vip[0] (web).protocol",
                "expected a string, found an integer (6)",
            ),
            (
                with_vip("ring_size = 1.5\n"),
                "vip[0] (web).ring_size",
                "expected an integer, found a float (1.5)",
            ),
            (
                with_vip("[[vip.health]]\nkind = \"tcp\"\n"),
                "vip[0] (web).health",
                "expected a table ([vip.health]), found an array",
            ),
            (
                with_vip("backend = \"10.1.0.11\"\n"),
                "vip[0] (web).backend",
                "expected an array of tables ([[vip.backend]]), found a string",
            ),
        ];
        for (text, key, message) in &cases {
            assert_rejected(text, key, message);
        }
    }

    #[test]
    fn daemon_problems_are_rejected() {
        let long_socket = format!("/run/{}.sock", "s".repeat(100));
        let cases = [
            (
                "",
                "daemon.interfaces",
                "missing; list the interfaces XDP attaches to",
            ),
            (
                "[daemon]\n",
                "daemon.interfaces",
                "missing; list the interfaces",
            ),
            (
                "[daemon]\ninterfaces = []\n",
                "daemon.interfaces",
                "empty; list the interfaces",
            ),
            (
                "[daemon]\ninterfaces = [\"eth0\", \"eth1\", \"eth0\"]\n",
                "daemon.interfaces[2]",
                "\"eth0\" is already interfaces[0]; list each interface once",
            ),
            (
                "[daemon]\ninterfaces = [\"enp0s31f6-uplink\"]\n",
                "daemon.interfaces[0]",
                "\"enp0s31f6-uplink\" is not a valid interface name: it is longer than 15 bytes",
            ),
            (
                "[daemon]\ninterfaces = [\"\"]\n",
                "daemon.interfaces[0]",
                "it is empty",
            ),
            (
                "[daemon]\ninterfaces = [\"..\"]\n",
                "daemon.interfaces[0]",
                "are reserved",
            ),
            (
                "[daemon]\ninterfaces = [\"eth0/1\"]\n",
                "daemon.interfaces[0]",
                "'/', ':' or whitespace",
            ),
            (
                "[daemon]\ninterfaces = [\"eth0:1\"]\n",
                "daemon.interfaces[0]",
                "'/', ':' or whitespace",
            ),
            (
                "[daemon]\ninterfaces = [\"eth 0\"]\n",
                "daemon.interfaces[0]",
                "'/', ':' or whitespace",
            ),
        ];
        for (text, key, message) in cases {
            assert_rejected(text, key, message);
        }
        let cases = [
            ("xdp_mode = \"fast\"", "daemon.xdp_mode", "\"fast\" is not one of \"auto\", \"native\", \"generic\""),
            ("admin_socket = \"admin.sock\"", "daemon.admin_socket", "\"admin.sock\" is not an absolute path; start it with '/'"),
            (&format!("admin_socket = \"{long_socket}\""), "daemon.admin_socket", "the path is 110 bytes long but Unix socket paths are limited to 107"),
            ("state_dir = \"var/lib/xdplb\"", "daemon.state_dir", "is not an absolute path"),
            ("pin_dir = \"\"", "daemon.pin_dir", "\"\" is not an absolute path"),
            ("flow_table_size = 0", "daemon.flow_table_size", "0 is too small: use at least 1"),
            ("flow_table_size = 268435457", "daemon.flow_table_size", "268435457 is too large: use at most 268435456 (each flow entry takes about 100 bytes"),
            ("max_vips = 65537", "daemon.max_vips", "65537 is too large: use at most 65536 (each VIP has per-CPU counters"),
            ("max_backends = 1048577", "daemon.max_backends", "1048577 is too large: use at most 1048576 (each backend has 32 bytes of counters per CPU)"),
            ("max_backends = -1", "daemon.max_backends", "-1 is too small: use at least 1"),
            ("max_ring_size = 0", "daemon.max_ring_size", "0 is too small: use at least 1"),
            ("max_ring_size = 4294967296", "daemon.max_ring_size", "4294967296 is too large: use at most 4294967295"),
            ("max_vips = 4096\nmax_ring_size = 262147", "daemon.max_ring_size", "the ring map would take 16384 MiB (max_vips 4096 x 2 halves x max_ring_size 262147 x 8 bytes), over the 4 GiB limit; lower max_ring_size or max_vips"),
            ("metrics_listen = \"localhost:9650\"", "daemon.metrics_listen", "\"localhost:9650\" is not a socket address (expected IP:PORT"),
            ("idle_timeout = \"1x\"", "daemon.idle_timeout", "\"1x\" is not a duration: write whole numbers with a unit (ms, s, m, h)"),
            ("stats_interval = \"0s\"", "daemon.stats_interval", "must be longer than zero"),
            ("hash_seed = -1", "daemon.hash_seed", "-1 is too small: use at least 0"),
            ("hash_seed = 4294967296", "daemon.hash_seed", "4294967296 is too large: use at most 4294967295"),
            ("ipip_source_v4 = \"fd00::/96\"", "daemon.ipip_source_v4", "fd00::/96 is not an IPv4 prefix; use one such as 172.16.0.0/16"),
            ("ipip_source_v6 = \"10.0.0.0/8\"", "daemon.ipip_source_v6", "10.0.0.0/8 is not an IPv6 prefix; use one such as fd00:1b::/96"),
            ("ipip_source_v4 = \"10.0.0.0\"", "daemon.ipip_source_v4", "\"10.0.0.0\" is not a prefix"),
            ("ipip_source_v4 = \"10.0.0.0/33\"", "daemon.ipip_source_v4", "\"33\" in \"10.0.0.0/33\" is not a prefix length"),
            ("icmp_too_big_rate = 1000001", "daemon.icmp_too_big_rate", "1000001 is too large: use at most 1000000"),
        ];
        for (keys, key, message) in cases {
            assert_rejected(&format!("{DAEMON}{keys}\n"), key, message);
        }
        let cases = [
            (
                "",
                "daemon.announce.table",
                "missing; add e.g. table = 4242",
            ),
            (
                "table = 254",
                "daemon.announce.table",
                "254 is the kernel's main table: use a table of its own that no `ip rule` looks up",
            ),
            (
                "table = 0",
                "daemon.announce.table",
                "0 is the kernel's unspec table",
            ),
            (
                "table = -1",
                "daemon.announce.table",
                "-1 is too small: use at least 0",
            ),
            (
                "table = 10\nwithdraw_grace = \"0s\"",
                "daemon.announce.withdraw_grace",
                "must be longer than zero",
            ),
            (
                "table = 10\ngrace = \"1s\"",
                "daemon.announce.grace",
                "unknown key in [daemon.announce]; the keys there are: table, withdraw_grace",
            ),
        ];
        for (keys, key, message) in cases {
            assert_rejected(
                &format!("{DAEMON}[daemon.announce]\n{keys}\n"),
                key,
                message,
            );
        }
        let cases = [
            (
                "path = \"connections.jsonl\"",
                "daemon.log.path",
                "\"connections.jsonl\" is not an absolute path; start it with '/'",
            ),
            (
                "path = \"/var/log/xdplb/\"",
                "daemon.log.path",
                "is a directory; name the file in it",
            ),
            (
                "max_per_second = 0",
                "daemon.log.max_per_second",
                "0 is too small: use at least 1",
            ),
            (
                "rate = 5",
                "daemon.log.rate",
                "unknown key in [daemon.log]; the keys there are: path, max_per_second",
            ),
        ];
        for (keys, key, message) in cases {
            assert_rejected(&format!("{DAEMON}[daemon.log]\n{keys}\n"), key, message);
        }
        assert_rejected(
            &format!("{DAEMON}{WEB}announce = \"sometimes\"\n"),
            "vip[0] (web).announce",
            "\"sometimes\" is not one of \"healthy\", \"always\", \"never\"",
        );
    }

    #[test]
    fn the_connection_log_is_on_with_its_section() {
        use crate::connlog::LogSpec;
        assert_eq!(valid(DAEMON).daemon.log, None);
        assert_eq!(
            valid(&format!("{DAEMON}[daemon.log]\n")).daemon.log,
            Some(LogSpec {
                path: None,
                max_per_second: 20_000
            })
        );
        let text = format!(
            "{DAEMON}[daemon.log]\npath = \"/var/log/xdplb/c.jsonl\"\nmax_per_second = 500\n"
        );
        assert_eq!(
            valid(&text).daemon.log,
            Some(LogSpec {
                path: Some("/var/log/xdplb/c.jsonl".into()),
                max_per_second: 500
            })
        );
    }

    #[test]
    fn vip_problems_are_rejected() {
        let api = "[[vip]]\nname = \"api\"\naddress = \"192.0.2.10\"\nport = 80\n";
        let backends = "[[vip.backend]]\naddress = \"10.1.0.1\"\n\
                        [[vip.backend]]\naddress = \"10.1.0.2\"\n\
                        [[vip.backend]]\naddress = \"10.1.0.3\"\n";
        let cases = [
            (
                format!("{DAEMON}[[vip]]\naddress = \"192.0.2.10\"\nport = 80\n"),
                "vip[0].name",
                "missing; add e.g. name = \"web\"",
            ),
            (
                format!(
                    "{DAEMON}[[vip]]\nname = \"web site\"\naddress = \"192.0.2.10\"\nport = 80\n"
                ),
                "vip[0].name",
                "\"web site\" is not a valid VIP name: use letters, digits, '_', '.' and '-'",
            ),
            (
                format!(
                    "{DAEMON}{WEB}[[vip]]\nname = \"web\"\naddress = \"192.0.2.11\"\nport = 80\n"
                ),
                "vip[1] (web).name",
                "\"web\" is already the name of vip[0] (web); VIP names must be unique",
            ),
            (
                format!("{DAEMON}[[vip]]\nname = \"web\"\nport = 80\n"),
                "vip[0] (web).address",
                "missing; add e.g. address = \"192.0.2.10\"",
            ),
            (
                format!("{DAEMON}[[vip]]\nname = \"web\"\naddress = \"192.0.2.300\"\nport = 80\n"),
                "vip[0] (web).address",
                "\"192.0.2.300\" is not an IP address",
            ),
            (
                format!("{DAEMON}[[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\n"),
                "vip[0] (web).port",
                "missing; add e.g. port = 80 (0 serves every port)",
            ),
            (
                format!(
                    "{DAEMON}[[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 65536\n"
                ),
                "vip[0] (web).port",
                "65536 is too large: use at most 65535",
            ),
            (
                with_vip("protocol = \"sctp\"\n"),
                "vip[0] (web).protocol",
                "\"sctp\" is not one of \"tcp\", \"udp\"",
            ),
            (
                with_vip("forwarding = \"tproxy\"\n"),
                "vip[0] (web).forwarding",
                "\"tproxy\" is not one of \"dsr\", \"ipip\", \"nat\"",
            ),
            (
                with_vip("affinity = \"source\"\n"),
                "vip[0] (web).affinity",
                "\"source\" is not one of \"connection\", \"client\"",
            ),
            (
                with_vip("affinity = \"client\"\naffinity_ipv6_prefix = 48\n"),
                "vip[0] (web).affinity_ipv6_prefix",
                "48 is not supported: use 64 (the client's /64) or 128 (its address)",
            ),
            (
                with_vip("affinity = \"client\"\nscheduler = \"round-robin\"\n"),
                "vip[0] (web).affinity",
                "\"client\" needs scheduler = \"maglev\" (this VIP has \"round-robin\"): round \
                 robin and least-conn choose per connection; remove one of the two",
            ),
            (
                with_vip("affinity_ipv6_prefix = 128\n"),
                "vip[0] (web).affinity_ipv6_prefix",
                "only applies with affinity = \"client\": set that too, or remove this key",
            ),
            (
                format!("{DAEMON}{WEB}{api}"),
                "vip[1] (api).address",
                "192.0.2.10:80/tcp is already served by vip[0] (web); each address, port and \
                 protocol can have one VIP",
            ),
            (
                with_vip("ring_size = 65536\n"),
                "vip[0] (web).ring_size",
                "ring_size 65536 is not prime; use a prime such as 65537",
            ),
            (
                with_vip("ring_size = 1\n"),
                "vip[0] (web).ring_size",
                "ring_size 1 is too small",
            ),
            (
                with_vip(&format!("ring_size = 2\n{backends}")),
                "vip[0] (web).ring_size",
                "ring_size 2 is too small for 3 weighted backends; use a prime with at least \
                 100 slots per backend, such as 65537",
            ),
            (
                with_vip("ring_size = 131071\n"),
                "vip[0] (web).ring_size",
                "131071 is larger than daemon.max_ring_size (65537); use a smaller prime or \
                 raise daemon.max_ring_size",
            ),
            (
                format!(
                    "{DAEMON}max_vips = 1\n{WEB}{}",
                    api.replace("port = 80", "port = 81")
                ),
                "daemon.max_vips",
                "2 VIPs are configured but max_vips is 1; raise daemon.max_vips",
            ),
            (
                format!("{DAEMON}max_backends = 2\n{WEB}{backends}"),
                "daemon.max_backends",
                "3 backends are configured (over all VIPs) but max_backends is 2; raise \
                 daemon.max_backends",
            ),
        ];
        for (text, key, message) in &cases {
            assert_rejected(text, key, message);
        }
    }

    #[test]
    fn vips_that_only_look_alike_are_accepted() {
        // Port 0 is the address's fallback, so it may sit next to specific ports; the same
        // address and port with another protocol is another service.
        let text = format!(
            "{DAEMON}{WEB}\
             [[vip]]\nname = \"web-all\"\naddress = \"192.0.2.10\"\nport = 0\n\
             [[vip]]\nname = \"web-udp\"\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"udp\"\n"
        );
        assert_eq!(valid(&text).services.vips.len(), 3);
        // 4in6 tunnels, and dsr with a backend address of the other family.
        let mixed = format!(
            "{DAEMON}\
             [[vip]]\nname = \"v4\"\naddress = \"192.0.2.10\"\nport = 80\nforwarding = \"ipip\"\n\
             [[vip.backend]]\naddress = \"2001:db8::1\"\n\
             [[vip]]\nname = \"v6\"\naddress = \"2001:db8::10\"\nport = 80\n\
             [[vip.backend]]\naddress = \"10.1.0.1\"\n"
        );
        assert_eq!(valid(&mixed).services.vips.len(), 2);
        // A port-0 VIP can be checked when every backend names its port.
        let all_ports = format!(
            "{DAEMON}[[vip]]\nname = \"all\"\naddress = \"192.0.2.10\"\nport = 0\n\
             [vip.health]\nkind = \"tcp\"\n\
             [[vip.backend]]\naddress = \"10.1.0.1\"\nhealth_port = 22\n"
        );
        assert_eq!(valid(&all_ports).services.vips[0].vip.port, 0);
    }

    #[test]
    fn health_problems_are_rejected() {
        let cases = [
            (
                "kind = \"icmp\"",
                "kind",
                "\"icmp\" is not one of \"none\", \"tcp\", \"http\", \"https\"",
            ),
            (
                "kind = \"tcp\"\nport = 0",
                "port",
                "0 is too small: use at least 1",
            ),
            (
                "kind = \"http\"\npath = \"healthz\"",
                "path",
                "\"healthz\" does not start with '/'",
            ),
            (
                "kind = \"http\"\npath = \"/a b\"",
                "path",
                "contains whitespace or control characters",
            ),
            (
                "kind = \"http\"\nexpect_status = 99",
                "expect_status",
                "99 is too small: use at least 100",
            ),
            (
                "kind = \"http\"\nexpect_status = 600",
                "expect_status",
                "600 is too large: use at most 599",
            ),
            (
                "kind = \"http\"\nhost = \"\"",
                "host",
                "empty; leave the key out",
            ),
            (
                "kind = \"http\"\nhost = \"a\\r\\nX: y\"",
                "host",
                "contains whitespace or control characters",
            ),
            (
                "kind = \"tcp\"\npath = \"/\"",
                "path",
                "path is only used by kind = \"http\" or \"https\"; remove it or set kind = \"http\"",
            ),
            (
                "kind = \"none\"\nhost = \"web\"",
                "host",
                "host is only used by kind = \"http\"",
            ),
            (
                "expect_status = 200",
                "expect_status",
                "expect_status is only used by kind = \"http\"",
            ),
            (
                "kind = \"http\"\ntls_verify = true",
                "tls_verify",
                "tls_verify is only used by kind = \"https\"; remove it or set kind = \"https\"",
            ),
            (
                "kind = \"https\"\ntls_verify = \"yes\"",
                "tls_verify",
                "expected true or false, found",
            ),
            (
                "kind = \"https\"\ntls_ca = \"/etc/ca.pem\"",
                "tls_ca",
                "is only used with tls_verify = true",
            ),
            (
                "kind = \"https\"\ntls_verify = true\ntls_ca = \"ca.pem\"",
                "tls_ca",
                "\"ca.pem\" is not an absolute path",
            ),
            (
                "kind = \"https\"\ntls_verify = true\ntls_ca = \"/nonexistent/ca.pem\"",
                "tls_ca",
                "cannot read CA certificates from /nonexistent/ca.pem",
            ),
            (
                "kind = \"https\"\nhost = \"a..b\"",
                "host",
                "host \"a..b\" is not a TLS server name",
            ),
            (
                "kind = \"tcp\"\ninterval = \"1x\"",
                "interval",
                "\"1x\" is not a duration",
            ),
            (
                "kind = \"tcp\"\ninterval = \"0ms\"",
                "interval",
                "must be longer than zero",
            ),
            (
                "kind = \"tcp\"\ntimeout = \"1s\"",
                "timeout",
                "1s is not shorter than interval (1s): a check must end before the next one starts",
            ),
            (
                "kind = \"tcp\"\ninterval = \"2s\"\ntimeout = \"2500ms\"",
                "timeout",
                "2500ms is not shorter than interval (2s)",
            ),
            (
                "kind = \"tcp\"\nrise = 0",
                "rise",
                "0 is too small: use at least 1",
            ),
            (
                "kind = \"tcp\"\nfall = 0",
                "fall",
                "0 is too small: use at least 1",
            ),
            (
                "kind = \"tcp\"\non_all_down = \"fail\"",
                "on_all_down",
                "\"fail\" is not one of \"keep\", \"drop\"",
            ),
        ];
        for (keys, key, message) in cases {
            assert_rejected(
                &with_health(&format!("{keys}\n")),
                &format!("vip[0] (web).health.{key}"),
                message,
            );
        }
        assert_rejected(
            &format!(
                "{DAEMON}[[vip]]\nname = \"all\"\naddress = \"192.0.2.10\"\nport = 0\n\
                 [vip.health]\nkind = \"tcp\"\n\
                 [[vip.backend]]\naddress = \"10.1.0.1\"\nhealth_port = 22\n\
                 [[vip.backend]]\naddress = \"10.1.0.2\"\n"
            ),
            "vip[0] (all).health.port",
            "missing; the VIP has port = 0 (every port), so checks need a port",
        );
    }

    #[test]
    fn nat_keys_map_to_the_model_and_are_checked() {
        let config = valid(
            "[daemon]\ninterfaces = [\"eth0\"]\nnat_source_v4 = [\"10.0.0.1\", \"10.0.0.2\"]\n\
             nat_ports = \"2000-2999\"\nnat_udp_timeout = \"30s\"\nnat_table_size = 1000\n\
             [[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 80\nforwarding = \"nat\"\n\
             [[vip.backend]]\naddress = \"10.1.0.1\"\nport = 8080\n",
        );
        let nat = &config.services.settings.nat;
        assert_eq!(nat.sources_v4.len(), 2);
        assert_eq!(nat.ports, (2000, 2999));
        assert_eq!(nat.udp_timeout, Duration::from_secs(30));
        assert_eq!(nat.tcp_timeout, Duration::from_secs(900));
        assert_eq!(config.daemon.sizes.nat_table_size, 1000);
        assert_eq!(config.services.vips[0].forwarding, Forwarding::Nat);
        assert_eq!(config.services.vips[0].backends[0].port, Some(8080));

        let daemon = |keys: &str| format!("[daemon]\ninterfaces = [\"eth0\"]\n{keys}");
        assert_rejected(
            &daemon("nat_source_v4 = [\"fd00::1\"]\n"),
            "daemon.nat_source_v4[0]",
            "is not an IPv4 address",
        );
        assert_rejected(
            &daemon("nat_ports = \"3000-2000\"\n"),
            "daemon.nat_ports",
            "not above the last",
        );
        assert_rejected(
            &with_backend("address = \"10.1.0.1\"\nport = 8080"),
            "vip[0] (web).backend[0].port",
            "only applies with forwarding = \"nat\"",
        );
        assert_rejected(
            &format!(
                "{DAEMON}[[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 80\n\
                 forwarding = \"nat\"\n[[vip.backend]]\naddress = \"2001:db8::1\"\n"
            ),
            "vip[0] (web).backend[0].address",
            "no NAT64",
        );
    }

    #[test]
    fn backend_problems_are_rejected() {
        let cases = [
            (
                "weight = 1",
                "address",
                "missing; add e.g. address = \"10.1.0.11\"",
            ),
            (
                "address = \"10.1.0.300\"",
                "address",
                "\"10.1.0.300\" is not an IP address",
            ),
            (
                "address = \"10.1.0.1\"\nweight = 65536",
                "weight",
                "65536 is too large: use at most 65535",
            ),
            (
                "address = \"10.1.0.1\"\nweight = -1",
                "weight",
                "-1 is too small: use at least 0",
            ),
            (
                "address = \"10.1.0.1\"\nmac = \"02:00:00:00:00\"",
                "mac",
                "\"02:00:00:00:00\" is not a MAC address",
            ),
            (
                "address = \"10.1.0.1\"\nhealth_port = 0",
                "health_port",
                "0 is too small: use at least 1",
            ),
        ];
        for (keys, key, message) in cases {
            assert_rejected(
                &with_backend(&format!("{keys}\n")),
                &format!("vip[0] (web).backend[0].{key}"),
                message,
            );
        }
        assert_rejected(
            &with_backend(
                "address = \"10.1.0.11\"\n[[vip.backend]]\naddress = \"10.1.0.12\"\n\
                 [[vip.backend]]\naddress = \"10.1.0.11\"\n",
            ),
            "vip[0] (web).backend[2].address",
            "10.1.0.11 is already backend[0]; list each backend once",
        );
        assert_rejected(
            &format!(
                "{DAEMON}[[vip]]\nname = \"v6\"\naddress = \"2001:db8::10\"\nport = 80\n\
                 forwarding = \"ipip\"\n[[vip.backend]]\naddress = \"10.1.0.1\"\n"
            ),
            "vip[0] (v6).backend[0].address",
            "10.1.0.1 is IPv4 but the VIP is IPv6 with forwarding = \"ipip\", and IPv6 cannot \
             be tunnelled in IPv4 (6in4 is not supported)",
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            bogus = 1
            [daemon]
            interfaces = ["eth0", "eth0"]
            max_vips = 0
            idle_timeout = "5 minutes"
            [[vip]]
            name = "web"
            address = "192.0.2.10"
            port = 80
            ring_size = 100
            [vip.health]
            kind = "tcp"
            path = "/"
            timeout = "2s"
            [[vip.backend]]
            address = "10.1.0.300"
            weight = 70000
            [[vip]]
            name = "web"
            address = "192.0.2.10"
            port = 80
        "#;
        let keys: Vec<String> = problems(text).into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "bogus",
                "daemon.max_vips",
                "daemon.interfaces[1]",
                "daemon.idle_timeout",
                "vip[0] (web).health.path",
                "vip[0] (web).health.timeout",
                "vip[0] (web).backend[0].address",
                "vip[0] (web).backend[0].weight",
                "vip[0] (web).ring_size",
                "vip[1] (web).name",
                "vip[1] (web).address",
            ]
        );
    }

    #[test]
    fn an_invalid_file_prints_one_problem_per_line() {
        let text = format!("{DAEMON}max_vips = 0\n{WEB}ring_size = 100\n");
        assert_eq!(
            parse(&text, "xdplb.toml").unwrap_err().to_string(),
            "xdplb.toml: daemon.max_vips: 0 is too small: use at least 1\n\
             xdplb.toml: vip[0] (web).ring_size: ring_size 100 is not prime; use a prime such \
             as 101"
        );
    }

    #[test]
    fn durations_take_whole_numbers_with_units() {
        for (text, millis) in [
            ("500ms", 500),
            ("1s", 1000),
            ("5m", 300_000),
            ("2h", 7_200_000),
            ("1m30s", 90_000),
            ("1h1ms", 3_600_001),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(millis)),
                "{text}"
            );
            assert_eq!(
                parse_duration(&format_duration(Duration::from_millis(millis))),
                Ok(Duration::from_millis(millis))
            );
        }
        for text in [
            "",
            "5",
            "s",
            "1x",
            "1.5s",
            "-1s",
            "+1s",
            "1 s",
            "1S",
            "99999999999999999999s",
            "18446744073709551615h",
        ] {
            assert!(parse_duration(text).is_err(), "{text:?} parsed");
        }
        // Zero parses (CLI arguments may use it); the file's keys reject it separately.
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(format_duration(Duration::from_millis(90_000)), "90s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }
}
