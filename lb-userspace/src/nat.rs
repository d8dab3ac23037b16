//! `forwarding = "nat"`, userspace side (the kernel side is lb-ebpf/src/nat.rs): the
//! `[daemon] nat_*` settings, what they put in `NAT_CONFIG`, and the sweep that deletes
//! expired connections, which the data path never scans (it only takes over an expired
//! port it happens to probe).

use crate::{
    config::{Problems, Reported, Table},
    dataplane::{Dataplane, DataplaneError},
};
use lb_common::{FlowKey, NatConfig, NatForward, NatState, MAX_NAT_SOURCES};
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

/// The `[daemon]` keys this module reads (`nat_table_size` is read with the other sizes).
pub const DAEMON_KEYS: &[&str] = &[
    "nat_source_v4",
    "nat_source_v6",
    "nat_ports",
    "nat_tcp_timeout",
    "nat_tcp_closing_timeout",
    "nat_udp_timeout",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatSpec {
    /// Sources toward IPv4 / IPv6 backends; empty: the address of the interface that reaches
    /// each backend.
    pub sources_v4: Vec<Ipv4Addr>,
    pub sources_v6: Vec<Ipv6Addr>,
    /// Nat ports, inclusive.
    pub ports: (u16, u16),
    pub tcp_timeout: Duration,
    pub tcp_closing_timeout: Duration,
    pub udp_timeout: Duration,
}

impl Default for NatSpec {
    fn default() -> Self {
        let config = NatConfig::default();
        Self {
            sources_v4: Vec::new(),
            sources_v6: Vec::new(),
            ports: (config.port_min, config.port_max),
            tcp_timeout: Duration::from_secs(config.tcp_timeout.into()),
            tcp_closing_timeout: Duration::from_secs(config.tcp_closing_timeout.into()),
            udp_timeout: Duration::from_secs(config.udp_timeout.into()),
        }
    }
}

impl NatSpec {
    /// What `NAT_CONFIG[0]` holds.
    pub fn config(&self) -> NatConfig {
        let mut config = NatConfig {
            tcp_timeout: crate::stats::whole_seconds(self.tcp_timeout),
            tcp_closing_timeout: crate::stats::whole_seconds(self.tcp_closing_timeout),
            udp_timeout: crate::stats::whole_seconds(self.udp_timeout),
            port_min: self.ports.0,
            port_max: self.ports.1,
            sources_v4: self.sources_v4.len() as u8,
            sources_v6: self.sources_v6.len() as u8,
            ..NatConfig::default()
        };
        for (slot, addr) in config.src_v4.iter_mut().zip(&self.sources_v4) {
            *slot = addr.octets();
        }
        for (slot, addr) in config.src_v6.iter_mut().zip(&self.sources_v6) {
            *slot = addr.octets();
        }
        config
    }

    /// Concurrent connections one backend (address, port, protocol) can have: every source
    /// times every port. `None` for a family that takes its source from the route.
    pub fn ports_per_backend(&self, family_v6: bool) -> Option<u64> {
        let sources = if family_v6 {
            self.sources_v6.len()
        } else {
            self.sources_v4.len()
        };
        (sources > 0).then(|| sources as u64 * (u64::from(self.ports.1 - self.ports.0) + 1))
    }
}

/// Reads the `nat_*` keys of `[daemon]`.
pub(crate) fn read(t: &Table, p: &mut Problems) -> Result<NatSpec, Reported> {
    let defaults = NatSpec::default();
    let sources_v4 = read_sources(t, p, "nat_source_v4", |addr| match addr {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    });
    let sources_v6 = read_sources(t, p, "nat_source_v6", |addr| match addr {
        IpAddr::V6(a) => Some(a),
        IpAddr::V4(_) => None,
    });
    let ports = t.parsed(p, "nat_ports", parse_ports);
    let timeout = |p: &mut Problems, name: &str, default: Duration| {
        t.duration(p, name).map(|d| d.unwrap_or(default))
    };
    let tcp_timeout = timeout(p, "nat_tcp_timeout", defaults.tcp_timeout);
    let tcp_closing_timeout = timeout(p, "nat_tcp_closing_timeout", defaults.tcp_closing_timeout);
    let udp_timeout = timeout(p, "nat_udp_timeout", defaults.udp_timeout);
    Ok(NatSpec {
        sources_v4: sources_v4?,
        sources_v6: sources_v6?,
        ports: ports?.unwrap_or(defaults.ports),
        tcp_timeout: tcp_timeout?,
        tcp_closing_timeout: tcp_closing_timeout?,
        udp_timeout: udp_timeout?,
    })
}

fn read_sources<A: PartialEq + Copy>(
    t: &Table,
    p: &mut Problems,
    name: &str,
    of_family: impl Fn(IpAddr) -> Option<A>,
) -> Result<Vec<A>, Reported> {
    let family = if name.ends_with("v4") { "IPv4" } else { "IPv6" };
    let list = t
        .get(p, name, "an array of address strings", |v| v.as_array())?
        .map(|list| list.as_slice())
        .unwrap_or_default();
    if list.len() > MAX_NAT_SOURCES {
        return Err(p.report(
            t.key(name),
            format!(
                "{} addresses, but at most {MAX_NAT_SOURCES} are supported; use fewer (each \
                 gives every backend one more range of ports)",
                list.len()
            ),
        ));
    }
    let mut sources = Vec::new();
    for (i, value) in list.iter().enumerate() {
        let addr = value
            .as_str()
            .and_then(|text| text.parse::<IpAddr>().ok())
            .and_then(&of_family);
        match addr {
            Some(addr) if !sources.contains(&addr) => sources.push(addr),
            Some(_) => {
                return Err(p.report(
                    format!("{}[{i}]", t.key(name)),
                    format!("{value} is listed twice; list each {family} address once"),
                ))
            }
            None => {
                return Err(p.report(
                    format!("{}[{i}]", t.key(name)),
                    format!("{value} is not an {family} address (expected a string like the LB's own address on the backends' network)"),
                ))
            }
        }
    }
    Ok(sources)
}

fn parse_ports(text: &str) -> Result<(u16, u16), String> {
    let bad = || {
        format!(
            "{text:?} is not a port range (expected FIRST-LAST, e.g. \"1024-32767\", outside \
             the LB's ephemeral ports, net.ipv4.ip_local_port_range)"
        )
    };
    let (first, last) = text.split_once('-').ok_or_else(bad)?;
    let first: u16 = first.trim().parse().map_err(|_| bad())?;
    let last: u16 = last.trim().parse().map_err(|_| bad())?;
    if first == 0 || first > last {
        return Err(format!(
            "{text:?}: the first port must be at least 1 and not above the last"
        ));
    }
    Ok((first, last))
}

/// A warning when `nat_ports` overlaps this host's ephemeral ports (`ip_local_port_range`,
/// as `range` says it): the LB's own connections (health checks) leave from the nat
/// addresses with those ports, so a nat connection could hold the tuple of one of them.
pub fn ephemeral_overlap(spec: &NatSpec, range: &str) -> Option<String> {
    let mut bounds = range.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(low)), Some(Ok(high))) = (bounds.next(), bounds.next()) else {
        return None;
    };
    let (first, last) = spec.ports;
    (first <= high && low <= last).then(|| {
        format!(
            "nat_ports {first}-{last} overlaps this host's ephemeral ports {low}-{high} \
             (net.ipv4.ip_local_port_range): a health check could share a tuple with a nat \
             connection; move nat_ports below {low} or above {high}"
        )
    })
}

/// A nat connection whose claim the sweep deletes: its `NAT_REV` key and its client tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    pub reverse: FlowKey,
    pub client: FlowKey,
}

/// The client tuple (client -> VIP) of a nat connection.
pub fn client_key(reverse: &FlowKey, state: &NatState) -> FlowKey {
    FlowKey {
        src: state.client,
        dst: state.vip,
        sport: state.client_port,
        dport: state.vip_port,
        proto: reverse.proto,
        family: reverse.family,
        _pad: [0; 2],
    }
}

/// Connections silent for longer than their timeout at `now_s`, and translations whose
/// claim is gone (taken over by another connection, or deleted).
pub fn expired(
    connections: &[(FlowKey, NatState)],
    translations: &[(FlowKey, NatForward)],
    config: &NatConfig,
    now_s: u32,
) -> (Vec<Expired>, Vec<FlowKey>) {
    let owners: HashMap<FlowKey, FlowKey> = connections
        .iter()
        .map(|(reverse, state)| (*reverse, client_key(reverse, state)))
        .collect();
    let expired = connections
        .iter()
        .filter(|(reverse, state)| config.expired(reverse.proto, state, now_s))
        .map(|(reverse, state)| Expired {
            reverse: *reverse,
            client: client_key(reverse, state),
        })
        .collect();
    let orphans = translations
        .iter()
        .filter(|(client, fwd)| {
            owners.get(&fwd.reverse_key(client.proto, client.family)) != Some(client)
        })
        .map(|(client, _)| *client)
        .collect();
    (expired, orphans)
}

/// What one sweep saw and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Connections in the table before the sweep.
    pub connections: usize,
    pub expired: usize,
    pub orphans: usize,
}

/// Deletes expired connections and orphaned translations. Reads both tables in batches; the
/// data path is never stopped (an entry refreshed between the read and the delete is lost,
/// which only a connection silent for its whole timeout can suffer).
pub fn sweep(dataplane: &mut Dataplane, now_s: u32) -> Result<SweepStats, DataplaneError> {
    let config = dataplane.nat_config()?;
    let connections = dataplane.nat_connections()?;
    let translations = dataplane.nat_translations()?;
    let (expired, orphans) = expired(&connections, &translations, &config, now_s);
    for entry in &expired {
        dataplane.remove_nat(&entry.reverse, &entry.client)?;
    }
    for client in &orphans {
        dataplane.remove_nat_translation(client)?;
    }
    Ok(SweepStats {
        connections: connections.len(),
        expired: expired.len(),
        orphans: orphans.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{FAMILY_IPV4, FLOW_FIN_SEEN, PROTO_TCP, PROTO_UDP};

    fn key(src: u8, dst: u8, sport: u16, dport: u16, proto: u8) -> FlowKey {
        let mut k = FlowKey {
            sport,
            dport,
            proto,
            family: FAMILY_IPV4,
            ..FlowKey::default()
        };
        k.src[0] = src;
        k.dst[0] = dst;
        k
    }

    fn connection(proto: u8, last_seen: u32, state: u8, nat_port: u16) -> (FlowKey, NatState) {
        let reverse = key(10, 172, 8080, nat_port, proto);
        let mut s = NatState {
            client_port: nat_port + 1,
            vip_port: 80,
            last_seen,
            state,
            ..NatState::default()
        };
        s.client[0] = 198;
        s.vip[0] = 192;
        (reverse, s)
    }

    #[test]
    fn timeouts_follow_protocol_and_closing_state() {
        let config = NatSpec::default().config();
        let now = 10_000;
        let connections = vec![
            connection(PROTO_TCP, now - 900, 0, 1),
            connection(PROTO_TCP, now - 901, 0, 2),
            connection(PROTO_TCP, now - 121, FLOW_FIN_SEEN, 3),
            connection(PROTO_TCP, now - 120, FLOW_FIN_SEEN, 4),
            connection(PROTO_UDP, now - 301, 0, 5),
            connection(PROTO_UDP, now - 300, 0, 6),
        ];
        let (expired, orphans) = expired(&connections, &[], &config, now);
        let ports: Vec<u16> = expired.iter().map(|e| e.reverse.dport).collect();
        assert_eq!(ports, vec![2, 3, 5]);
        assert!(orphans.is_empty());
        assert_eq!(expired[0].client.sport, 3);
    }

    #[test]
    fn translations_without_their_claim_are_orphans() {
        let config = NatSpec::default().config();
        let (reverse, state) = connection(PROTO_TCP, 100, 0, 7);
        let client = client_key(&reverse, &state);
        let live = NatForward {
            nat_addr: reverse.dst,
            backend: reverse.src,
            nat_port: 7,
            backend_port: 8080,
            backend_id: 0,
        };
        let taken_over = FlowKey {
            sport: 999,
            ..client
        };
        let (_, orphans) = expired(
            &[(reverse, state)],
            &[(client, live), (taken_over, live)],
            &config,
            100,
        );
        assert_eq!(orphans, vec![taken_over]);
    }

    #[test]
    fn an_overlap_with_the_ephemeral_ports_is_named() {
        let spec = NatSpec::default();
        assert_eq!(ephemeral_overlap(&spec, "32768\t60999\n"), None);
        let overlap = ephemeral_overlap(&spec, "10000 60999").unwrap();
        assert!(overlap.contains("1024-32767 overlaps"), "{overlap}");
        assert_eq!(ephemeral_overlap(&spec, "garbage"), None);
    }

    #[test]
    fn the_config_lists_sources_and_ports() {
        let spec = NatSpec {
            sources_v4: vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)],
            ..NatSpec::default()
        };
        let config = spec.config();
        assert_eq!(config.sources_v4, 2);
        assert_eq!(config.src_v4[1], [10, 0, 0, 2]);
        assert_eq!((config.port_min, config.port_max), (1024, 32767));
        assert_eq!(spec.ports_per_backend(false), Some(2 * 31744));
        assert_eq!(spec.ports_per_backend(true), None);
        assert_eq!(parse_ports("2000-2001"), Ok((2000, 2001)));
        assert!(parse_ports("2001-2000").is_err());
        assert!(parse_ports("80").is_err());
    }
}
