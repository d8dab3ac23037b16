//! Next hops on the host where the LB runs: the route and the neighbour entry toward each
//! backend (from `ip -j`), and the facts of the egress interface.
//!
//! Everything is read in the calling thread's network namespace: `ip` children inherit it, and
//! interface facts come from ioctls on a socket created here. (`/sys/class/net` is not used: it
//! shows the namespace sysfs was mounted in, which after a bare `setns` is not the caller's.)

use crate::{
    model::{BackendSpec, Mac},
    state::{NextHop, Resolve},
};
use serde::Deserialize;
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    os::{fd::AsRawFd, unix::net::UnixDatagram},
    process::Command,
};

/// The discard service: where the datagram that starts ARP/ND is sent.
const DISCARD_PORT: u16 = 9;

/// Neighbour states whose link-layer address can be used.
const USABLE_STATES: [&str; 5] = ["REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT"];

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("interface {0} does not exist in this network namespace: check daemon.interfaces")]
    NoSuchInterface(String),
    #[error("{0:?} is not an interface name (1 to 15 bytes, no NUL)")]
    BadName(String),
    #[error("interface {name} has hardware type {hw_type}, not Ethernet: XDP forwarding needs an Ethernet interface")]
    NotEthernet { name: String, hw_type: u16 },
    #[error("interface {name}: cannot read its {what}: {source}")]
    Io {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Runs an interface ioctl (`SIOCGIF*`) for `name` and returns the filled request.
fn ifreq(name: &str, request: libc::c_ulong, what: &'static str) -> Result<libc::ifreq, NetError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(NetError::BadName(name.to_string()));
    }
    let io_error = |source| NetError::Io {
        name: name.to_string(),
        what,
        source,
    };
    // Any socket will do: its ioctls see the interfaces of the namespace it was created in.
    let socket = UnixDatagram::unbound().map_err(io_error)?;
    // SAFETY: `ifreq` is plain old data, for which all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: every SIOCGIF* request reads and writes one `ifreq`, which outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), request as _, &mut req) } < 0 {
        let err = io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::ENODEV) {
            NetError::NoSuchInterface(name.to_string())
        } else {
            io_error(err)
        });
    }
    Ok(req)
}

pub fn interface_index(name: &str) -> Result<u32, NetError> {
    let req = ifreq(name, libc::SIOCGIFINDEX, "index")?;
    // SAFETY: SIOCGIFINDEX fills `ifru_ifindex`.
    Ok(unsafe { req.ifr_ifru.ifru_ifindex } as u32)
}

pub fn interface_mac(name: &str) -> Result<Mac, NetError> {
    let req = ifreq(name, libc::SIOCGIFHWADDR, "MAC address")?;
    // SAFETY: SIOCGIFHWADDR fills `ifru_hwaddr`.
    let hwaddr = unsafe { req.ifr_ifru.ifru_hwaddr };
    if hwaddr.sa_family != libc::ARPHRD_ETHER {
        return Err(NetError::NotEthernet {
            name: name.to_string(),
            hw_type: hwaddr.sa_family,
        });
    }
    let mut mac = [0; 6];
    for (dst, src) in mac.iter_mut().zip(hwaddr.sa_data) {
        *dst = src as u8;
    }
    Ok(Mac(mac))
}

/// The interface MTU; one above 65535 (loopback's 65536) reads as 65535.
pub fn interface_mtu(name: &str) -> Result<u16, NetError> {
    let req = ifreq(name, libc::SIOCGIFMTU, "MTU")?;
    // SAFETY: SIOCGIFMTU fills `ifru_mtu`.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    Ok(u16::try_from(mtu.max(0)).unwrap_or(u16::MAX))
}

/// Resolves next hops on the host where the LB runs.
#[derive(Clone, Debug)]
pub struct HostResolver {
    /// The interfaces XDP is attached to: the only ones packets can leave through.
    interfaces: Vec<String>,
}

impl HostResolver {
    /// `interfaces` are those XDP is attached to; each must exist.
    pub fn new(interfaces: &[String]) -> Result<Self, NetError> {
        for name in interfaces {
            interface_index(name)?;
        }
        Ok(Self {
            interfaces: interfaces.to_vec(),
        })
    }

    /// The destination MAC for `hop` (the backend or its gateway), seen from `dev`.
    fn neighbour_mac(
        &self,
        backend: IpAddr,
        hop: IpAddr,
        dev: &str,
        ifindex: u32,
    ) -> Result<Mac, String> {
        let json = ip_json(&["neigh", "show", "to", &hop.to_string(), "dev", dev])?;
        let state = match parse_neighbour(&json, hop)? {
            Neighbour::Usable(mac) => return Ok(mac),
            Neighbour::Unusable(state) => Some(state),
            Neighbour::Missing => None,
        };
        let who = if hop == backend {
            hop.to_string()
        } else {
            format!("gateway {hop} (next hop toward {backend})")
        };
        let trigger = match trigger_resolution(hop, dev, ifindex) {
            Ok(()) => String::new(),
            Err(e) => format!(" (could not send a datagram to start it: {e})"),
        };
        Err(match state.as_deref() {
            Some("FAILED") => format!(
                "{who} does not answer ARP/ND on {dev} (neighbour entry FAILED){trigger}: \
                 check that it is up and on that link, or set its `mac`"
            ),
            _ => format!("no neighbour entry for {who} on {dev} yet (ARP/ND in progress){trigger}"),
        })
    }
}

impl Resolve for HostResolver {
    fn next_hop(&self, backend: &BackendSpec) -> Result<NextHop, String> {
        let addr = backend.addr;
        let route = ip_json(&["route", "get", &addr.to_string()])
            .and_then(|json| parse_route(&json))
            .map_err(|e| {
                format!(
                    "no route to {addr} ({e}): add one through an interface of daemon.interfaces"
                )
            })?;
        if route.kind.as_deref() == Some("local") {
            return Err(format!(
                "{addr} is an address of this host: a backend must be another host"
            ));
        }
        let dev = &route.dev;
        if !self.interfaces.contains(dev) {
            return Err(format!(
                "route to {addr} leaves through {dev}, which has no XDP program attached: \
                 add it to daemon.interfaces"
            ));
        }
        let facts = |e: NetError| format!("route to {addr} leaves through {dev}: {e}");
        let ifindex = interface_index(dev).map_err(facts)?;
        let src_mac = interface_mac(dev).map_err(facts)?;
        let mtu = interface_mtu(dev).map_err(facts)?;
        let dst_mac = match backend.mac {
            Some(mac) => mac,
            None => self.neighbour_mac(addr, route.gateway.unwrap_or(addr), dev, ifindex)?,
        };
        Ok(NextHop {
            dst_mac,
            src_mac,
            ifindex,
            mtu,
        })
    }
}

/// Those of `interfaces` that do not have XDP program `program` attached (or are missing),
/// as the kernel reports them now; all of them if netlink cannot be asked.
pub fn not_attached(interfaces: &[String], program: u32) -> Vec<String> {
    let Ok(mut netlink) = crate::netlink::Netlink::open() else {
        return interfaces.to_vec();
    };
    interfaces
        .iter()
        .filter(|name| {
            let attached = interface_index(name)
                .ok()
                .and_then(|index| netlink.xdp_program(index).ok().flatten());
            attached != Some(program)
        })
        .cloned()
        .collect()
}

/// The global (non-link-local) addresses of an interface: where tunnels to this host end.
pub fn interface_addresses(name: &str) -> Result<Vec<IpAddr>, String> {
    parse_addresses(&ip_json(&["addr", "show", "dev", name])?)
}

/// `ip -j addr show dev X`: one entry with its `addr_info`.
fn parse_addresses(json: &str) -> Result<Vec<IpAddr>, String> {
    #[derive(Deserialize)]
    struct Link {
        addr_info: Vec<AddrInfo>,
    }
    #[derive(Deserialize)]
    struct AddrInfo {
        local: IpAddr,
        scope: String,
    }
    let links: Vec<Link> = serde_json::from_str(json)
        .map_err(|e| format!("cannot parse `ip -j addr show` output ({e}): {json}"))?;
    Ok(links
        .into_iter()
        .flat_map(|l| l.addr_info)
        .filter(|a| a.scope == "global")
        .map(|a| a.local)
        .collect())
}

/// Runs `ip -j ARGS` and returns its output.
fn ip_json(args: &[&str]) -> Result<String, String> {
    let command = format!("ip -j {}", args.join(" "));
    let output = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `{command}` ({e}): install iproute2"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("`{command}` failed: {}", stderr.trim()));
    }
    String::from_utf8(output.stdout).map_err(|e| format!("`{command}` printed non-UTF-8: {e}"))
}

/// One entry of `ip -j route get`.
#[derive(Debug, Deserialize, PartialEq, Eq)]
struct Route {
    /// Only printed for non-unicast routes, e.g. `local`.
    #[serde(rename = "type")]
    kind: Option<String>,
    dev: String,
    /// Absent when the destination is on-link.
    gateway: Option<IpAddr>,
}

fn parse_route(json: &str) -> Result<Route, String> {
    let routes: Vec<Route> = serde_json::from_str(json)
        .map_err(|e| format!("cannot parse `ip -j route get` output ({e}): {json}"))?;
    routes
        .into_iter()
        .next()
        .ok_or_else(|| "`ip -j route get` printed no route".to_string())
}

/// What the neighbour table says about one address on one device.
#[derive(Debug, PartialEq, Eq)]
enum Neighbour {
    Usable(Mac),
    /// An entry without a usable address, in this state (e.g. `FAILED`, `INCOMPLETE`).
    Unusable(String),
    Missing,
}

/// One entry of `ip -j neigh show`.
#[derive(Debug, Deserialize)]
struct NeighbourEntry {
    dst: IpAddr,
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

fn parse_neighbour(json: &str, addr: IpAddr) -> Result<Neighbour, String> {
    let entries: Vec<NeighbourEntry> = serde_json::from_str(json)
        .map_err(|e| format!("cannot parse `ip -j neigh show` output ({e}): {json}"))?;
    let Some(entry) = entries.into_iter().find(|entry| entry.dst == addr) else {
        return Ok(Neighbour::Missing);
    };
    let usable = entry
        .state
        .iter()
        .any(|state| USABLE_STATES.contains(&state.as_str()));
    match (usable, entry.lladdr) {
        (true, Some(lladdr)) => lladdr.parse().map(Neighbour::Usable),
        _ => Ok(Neighbour::Unusable(entry.state.join(","))),
    }
}

/// Sends one datagram to `hop`'s discard port out of `dev`: the kernel starts ARP/ND for it.
fn trigger_resolution(hop: IpAddr, dev: &str, ifindex: u32) -> io::Result<()> {
    let (local, remote): (SocketAddr, SocketAddr) = match hop {
        IpAddr::V4(hop) => (
            (Ipv4Addr::UNSPECIFIED, 0).into(),
            (hop, DISCARD_PORT).into(),
        ),
        IpAddr::V6(hop) => {
            // A link-local gateway (fe80::/10) is only meaningful with its interface.
            let scope = if hop.is_unicast_link_local() {
                ifindex
            } else {
                0
            };
            (
                (Ipv6Addr::UNSPECIFIED, 0).into(),
                SocketAddrV6::new(hop, DISCARD_PORT, 0, scope).into(),
            )
        }
    };
    let socket = UdpSocket::bind(local)?;
    // SAFETY: the option value is `dev`'s bytes, valid for the call, with their length.
    let bound = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            dev.as_ptr().cast(),
            dev.len() as libc::socklen_t,
        )
    };
    if bound < 0 {
        return Err(io::Error::last_os_error());
    }
    socket.send_to(&[], remote)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from `ip -j route get` (iproute2 6.1) in a lab namespace.
    const ROUTE_V4_ON_LINK: &str =
        r#"[{"dst":"10.1.0.11","dev":"eth0","prefsrc":"10.1.0.1","flags":[],"uid":0,"cache":[]}]"#;
    const ROUTE_V4_GATEWAY: &str = r#"[{"dst":"10.9.0.5","gateway":"10.1.0.11","dev":"eth0","prefsrc":"10.1.0.1","flags":[],"uid":0,"cache":[]}]"#;
    const ROUTE_V6_ON_LINK: &str = r#"[{"dst":"fd00:1::11","from":"::","dev":"eth0","protocol":"kernel","prefsrc":"fd00:1::1","metric":256,"flags":[],"pref":"medium"}]"#;
    const ROUTE_V6_GATEWAY: &str = r#"[{"dst":"fd00:9::5","from":"::","gateway":"fd00:1::11","dev":"eth0","prefsrc":"fd00:1::1","metric":1024,"flags":[],"pref":"medium"}]"#;
    const ROUTE_LOCAL: &str = r#"[{"type":"local","dst":"10.1.0.1","dev":"lo","prefsrc":"10.1.0.1","flags":[],"uid":0,"cache":["local"]}]"#;

    // Captured from `ip -j neigh show to ADDR dev eth0`.
    const NEIGH_REACHABLE: &str =
        r#"[{"dst":"10.1.0.11","lladdr":"e2:ba:5f:07:7a:46","state":["REACHABLE"]}]"#;
    const NEIGH_STALE: &str =
        r#"[{"dst":"10.1.0.11","lladdr":"e2:ba:5f:07:7a:46","state":["STALE"]}]"#;
    const NEIGH_PERMANENT: &str =
        r#"[{"dst":"10.1.0.99","lladdr":"02:00:00:00:00:99","state":["PERMANENT"]}]"#;
    const NEIGH_V6_ROUTER: &str = r#"[{"dst":"fd00:1::12","lladdr":"e2:ba:5f:07:7a:46","router":null,"state":["REACHABLE"]}]"#;
    const NEIGH_V6_DELAY: &str =
        r#"[{"dst":"fe80::e0ba:5fff:fe07:7a46","lladdr":"e2:ba:5f:07:7a:46","state":["DELAY"]}]"#;
    const NEIGH_INCOMPLETE: &str = r#"[{"dst":"10.1.0.77","state":["INCOMPLETE"]}]"#;
    const NEIGH_FAILED: &str = r#"[{"dst":"10.1.0.77","state":["FAILED"]}]"#;

    const MAC: Mac = Mac([0xe2, 0xba, 0x5f, 0x07, 0x7a, 0x46]);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_routes() {
        let route = |dev: &str, gateway: Option<&str>| Route {
            kind: None,
            dev: dev.to_string(),
            gateway: gateway.map(ip),
        };
        assert_eq!(parse_route(ROUTE_V4_ON_LINK), Ok(route("eth0", None)));
        assert_eq!(
            parse_route(ROUTE_V4_GATEWAY),
            Ok(route("eth0", Some("10.1.0.11")))
        );
        assert_eq!(parse_route(ROUTE_V6_ON_LINK), Ok(route("eth0", None)));
        assert_eq!(
            parse_route(ROUTE_V6_GATEWAY),
            Ok(route("eth0", Some("fd00:1::11")))
        );
        let local = parse_route(ROUTE_LOCAL).unwrap();
        assert_eq!(
            (local.kind.as_deref(), local.dev.as_str()),
            (Some("local"), "lo")
        );
    }

    #[test]
    fn rejects_unparsable_routes() {
        assert!(parse_route("[]").unwrap_err().contains("no route"));
        assert!(parse_route("not json")
            .unwrap_err()
            .contains("cannot parse"));
    }

    #[test]
    fn usable_neighbour_states_give_the_mac() {
        for (json, addr) in [
            (NEIGH_REACHABLE, "10.1.0.11"),
            (NEIGH_STALE, "10.1.0.11"),
            (NEIGH_V6_ROUTER, "fd00:1::12"),
            (NEIGH_V6_DELAY, "fe80::e0ba:5fff:fe07:7a46"),
        ] {
            assert_eq!(parse_neighbour(json, ip(addr)), Ok(Neighbour::Usable(MAC)));
        }
        assert_eq!(
            parse_neighbour(NEIGH_PERMANENT, ip("10.1.0.99")),
            Ok(Neighbour::Usable(Mac([2, 0, 0, 0, 0, 0x99])))
        );
    }

    #[test]
    fn unusable_or_missing_neighbours_give_no_mac() {
        let unusable = |state: &str| Ok(Neighbour::Unusable(state.to_string()));
        assert_eq!(
            parse_neighbour(NEIGH_INCOMPLETE, ip("10.1.0.77")),
            unusable("INCOMPLETE")
        );
        assert_eq!(
            parse_neighbour(NEIGH_FAILED, ip("10.1.0.77")),
            unusable("FAILED")
        );
        assert_eq!(
            parse_neighbour("[]", ip("10.1.0.11")),
            Ok(Neighbour::Missing)
        );
        // `to ADDR` is a prefix match: entries for other addresses do not count.
        assert_eq!(
            parse_neighbour(NEIGH_REACHABLE, ip("10.1.0.12")),
            Ok(Neighbour::Missing)
        );
    }

    #[test]
    fn interface_facts_of_loopback() {
        assert_eq!(interface_index("lo").unwrap(), 1);
        assert_eq!(interface_mtu("lo").unwrap(), u16::MAX);
        assert!(matches!(
            interface_mac("lo"),
            Err(NetError::NotEthernet { hw_type: 772, .. })
        ));
        assert!(matches!(
            interface_index("xdplb-none0"),
            Err(NetError::NoSuchInterface(_))
        ));
        assert!(matches!(
            interface_index("a-name-longer-than-15"),
            Err(NetError::BadName(_))
        ));
    }

    #[test]
    fn global_addresses_of_an_interface() {
        let json = r#"[{"ifindex":2,"ifname":"eth0","addr_info":[
            {"family":"inet","local":"10.0.0.11","prefixlen":24,"scope":"global"},
            {"family":"inet6","local":"fd00::11","prefixlen":64,"scope":"global"},
            {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]}]"#;
        let addrs = parse_addresses(json).unwrap();
        assert_eq!(
            addrs,
            [
                "10.0.0.11".parse::<IpAddr>().unwrap(),
                "fd00::11".parse().unwrap()
            ]
        );
    }
}
