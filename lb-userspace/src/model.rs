//! The validated service model: what the operator asked for, independent of TOML and of maps.
//! [`crate::config`] produces it; [`crate::state`] turns it (plus health and runtime overrides)
//! into map contents.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Forwarding {
    /// L2 direct server return: rewrite MACs; backends hold the VIP on loopback.
    Dsr,
    /// IP-in-IP (4in4, 6in6, 4in6) to the backend, which decapsulates.
    Ipip,
    /// Full NAT: the LB rewrites both directions; backends need no change (see [`crate::nat`]).
    Nat,
}

impl Forwarding {
    pub fn mode(self) -> u8 {
        match self {
            Forwarding::Dsr => lb_common::MODE_DSR,
            Forwarding::Ipip => lb_common::MODE_IPIP,
            Forwarding::Nat => lb_common::MODE_NAT,
        }
    }
}

/// Which of a client's connections share a backend (the ring hash's input).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Affinity {
    /// Each connection (5-tuple) is placed on its own.
    #[default]
    Connection,
    /// Every connection of a client goes to one backend while the ring is unchanged (IPVS
    /// persistence, Cilium `sessionAffinity: ClientIP`). IPv6 clients are grouped by their
    /// /64 (one host's privacy addresses), or by the whole address with `ipv6_host`.
    Client { ipv6_host: bool },
}

impl Affinity {
    pub fn code(self) -> u8 {
        match self {
            Affinity::Connection => lb_common::AFFINITY_CONNECTION,
            Affinity::Client { ipv6_host: false } => lb_common::AFFINITY_CLIENT,
            Affinity::Client { ipv6_host: true } => lb_common::AFFINITY_CLIENT_V6_HOST,
        }
    }
}

impl fmt::Display for Affinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Affinity::Connection => "connection",
            Affinity::Client { ipv6_host: false } => "client",
            Affinity::Client { ipv6_host: true } => "client/128",
        })
    }
}

impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Forwarding::Dsr => "dsr",
            Forwarding::Ipip => "ipip",
            Forwarding::Nat => "nat",
        })
    }
}

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("{s:?} is not a MAC address (expected six hex pairs like 02:00:00:00:00:01)")
        };
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(mac))
    }
}

/// An IP prefix, e.g. the pool outer `ipip` sources are taken from. Serialized as its text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// Mask of the host bits (those the flow hash fills), as many bytes as the family has.
    pub fn host_mask(&self) -> Vec<u8> {
        let bits = match self.addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        (0..bits / 8)
            .map(|i| {
                let network_bits = (self.len as i32 - i * 8).clamp(0, 8);
                !(0xffu16 << (8 - network_bits)) as u8
            })
            .collect()
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl TryFrom<String> for Prefix {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<Prefix> for String {
    fn from(prefix: Prefix) -> String {
        prefix.to_string()
    }
}

impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s.split_once('/').ok_or_else(|| {
            format!("{s:?} is not a prefix (expected ADDRESS/LENGTH, e.g. 10.255.0.0/16)")
        })?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} in {s:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = len
            .parse()
            .ok()
            .filter(|len| *len <= max)
            .ok_or_else(|| format!("{len:?} in {s:?} is not a prefix length (0..={max})"))?;
        Ok(Prefix { addr, len })
    }
}

/// Identity of a virtual service: where clients send packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipAddr {
    pub addr: IpAddr,
    /// 0 = every port of the address.
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for VipAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: IpAddr,
    /// Relative share of new flows; 0 = no new flows.
    pub weight: u32,
    /// Skip neighbour resolution and send to this MAC.
    pub mac: Option<Mac>,
    /// Health-check port for this backend, replacing the VIP's.
    pub health_port: Option<u16>,
    /// `nat` only: the backend's port (default: the VIP's; a port-0 VIP keeps the client's).
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSpec {
    pub name: String,
    pub vip: VipAddr,
    pub forwarding: Forwarding,
    /// How new flows pick a backend.
    pub scheduler: crate::scheduler::Scheduler,
    pub affinity: Affinity,
    /// Maglev table size (prime); for round robin, the longest weighted turn.
    pub ring_size: u32,
    pub health: HealthSpec,
    pub backends: Vec<BackendSpec>,
    /// Source ACL (`allow_sources`, `deny_sources`).
    pub acl: crate::acl::AclSpec,
    /// New-flow limits (`[vip.limits]`).
    pub limits: Option<crate::limits::LimitsSpec>,
    /// When the VIP's route is announced (with `[daemon.announce]`).
    pub announce: Announce,
}

/// A VIP's `announce` key: when [`crate::announce`] puts its route in the announce table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Announce {
    /// While this LB can serve it: XDP attached, checks running, a backend up.
    #[default]
    Healthy,
    /// Whenever the daemon runs with XDP attached, whatever the backends' health.
    Always,
    Never,
}

/// How backends of a VIP are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// Backends are always considered up.
    None,
    /// A TCP connect succeeds.
    Tcp,
    /// An HTTP GET answers with the expected status; over TLS (`kind = "https"`) when `tls` is
    /// set.
    Http {
        path: String,
        expect_status: u16,
        /// Host header, and the TLS server name; the backend address when absent.
        host: Option<String>,
        tls: Option<TlsSpec>,
    },
}

/// How an `https` check sets up TLS.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TlsSpec {
    /// Verify the backend's certificate chain and name (`tls_verify`). Off by default:
    /// backends are addressed by IP, and their certificates rarely name one.
    pub verify: bool,
    /// Roots to verify against (`tls_ca`); the system's roots when absent.
    pub ca: Option<CaFile>,
}

/// A CA file as read when the config was loaded: a changed file read by a reload makes a new
/// check, so a rotated CA takes effect.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CaFile {
    pub path: std::path::PathBuf,
    pub certs: Vec<rustls::pki_types::CertificateDer<'static>>,
}

/// What to do when every backend of a VIP is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnAllDown {
    /// Keep the last healthy set, so a broken checker does not black-hole a service.
    #[default]
    Keep,
    /// Drop new flows (the VIP has no backend).
    Drop,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSpec {
    pub kind: CheckKind,
    /// Port probed on each backend; the VIP's port when absent (required for port-0 VIPs).
    pub port: Option<u16>,
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
    /// Consecutive successes before a backend is up.
    pub rise: u32,
    /// Consecutive failures before a backend is down.
    pub fall: u32,
    pub on_all_down: OnAllDown,
}

impl Default for HealthSpec {
    fn default() -> Self {
        Self {
            kind: CheckKind::None,
            port: None,
            interval: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_millis(500),
            rise: 2,
            fall: 3,
            on_all_down: OnAllDown::Keep,
        }
    }
}

/// Data-path settings that are not per VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataPathSettings {
    /// Seed of the flow hash and of the Maglev tables; LB instances sharing traffic must agree.
    pub hash_seed: u32,
    /// Pool of outer IPv4 sources for `ipip`.
    pub ipip_source_v4: Prefix,
    /// Pool of outer IPv6 sources for `ipip`.
    pub ipip_source_v6: Prefix,
    /// "Too big to encapsulate" ICMP replies per second and CPU; 0 sends none.
    pub icmp_too_big_rate: u32,
    /// Flood defence: the pin budget.
    pub flood: crate::flood::FloodSpec,
    /// `nat` sources, port range and timeouts.
    pub nat: crate::nat::NatSpec,
}

impl Default for DataPathSettings {
    fn default() -> Self {
        Self {
            hash_seed: 0,
            ipip_source_v4: Prefix {
                addr: IpAddr::V4(Ipv4Addr::new(172, 16, 0, 0)),
                len: 16,
            },
            ipip_source_v6: Prefix {
                addr: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x1b, 0, 0, 0, 0, 0, 0)),
                len: 96,
            },
            icmp_too_big_rate: 1000,
            flood: crate::flood::FloodSpec::default_for(lb_common::DEFAULT_FLOW_TABLE_SIZE),
            nat: crate::nat::NatSpec::default(),
        }
    }
}

/// Everything the data path should serve.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Services {
    pub settings: DataPathSettings,
    pub vips: Vec<VipSpec>,
}
