//! The `[[vip]]` tables and their `[[vip.backend]]` entries, with the checks across them.

use super::{health::read_health, Problems, Reported, Table};
use crate::{
    dataplane::Sizes,
    maglev::{self, MaglevError},
    model::{
        Affinity, Announce, BackendSpec, CheckKind, Forwarding, HealthSpec, Protocol, VipAddr,
        VipSpec,
    },
    scheduler::{self, Scheduler},
};
use std::{collections::HashMap, net::IpAddr};
use toml::Value;

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

const BACKEND_KEYS: &[&str] = &["address", "weight", "mac", "health_port", "port"];

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

const ANNOUNCE_MODES: [(&str, Announce); 3] = [
    ("healthy", Announce::Healthy),
    ("always", Announce::Always),
    ("never", Announce::Never),
];

/// What earlier VIPs claimed, so duplicates are reported at the later VIP, naming the first.
#[derive(Default)]
pub(super) struct Seen {
    names: HashMap<String, String>,
    addrs: HashMap<VipAddr, String>,
}

pub(super) fn read_vip(
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
