//! Next hops on the host where the LB runs: the route and the neighbour entry toward each
//! backend (over netlink, [`crate::netlink`]), the facts of the egress interface, and the
//! neighbour-table notifications that tell the daemon when a next hop changed.
//!
//! Everything is read in the namespace of the thread that created the resolver: netlink and
//! ioctl sockets belong to the namespace they were created in. (`/sys/class/net` is not used:
//! it shows the namespace sysfs was mounted in, which after a bare `setns` is not the
//! caller's.)

use crate::{
    model::{BackendSpec, Mac},
    netlink::{Neighbour, Netlink},
    state::{NextHop, Resolve},
};
use futures_util::StreamExt;
use rtnetlink::{
    constants::RTMGRP_NEIGH,
    packet_core::NetlinkPayload,
    packet_route::{neighbour::NeighbourState, route::RouteType, RouteNetlinkMessage},
    sys::AsyncSocket,
};
use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    os::{fd::AsRawFd, unix::net::UnixDatagram},
    sync::{Arc, Mutex, MutexGuard},
};
use tokio::sync::mpsc;

/// The discard service: where the datagram that starts ARP/ND is sent.
const DISCARD_PORT: u16 = 9;

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

/// Resolves next hops on the host where the LB runs, over netlink. Clones share the socket
/// and what was learnt (lookups run on blocking threads, away from the daemon's lock).
#[derive(Clone, Debug)]
pub struct HostResolver {
    /// The interfaces XDP is attached to: the only ones packets can leave through.
    interfaces: Vec<String>,
    /// Opened in the caller's namespace by [`new`](Self::new); one request at a time.
    netlink: Arc<Mutex<Netlink>>,
    /// Backend address -> the neighbour its packets go to (itself or its gateway), from the
    /// last resolution: what a neighbour notification concerns.
    hops: Arc<Mutex<HashMap<IpAddr, IpAddr>>>,
}

impl HostResolver {
    /// `interfaces` are those XDP is attached to; each must exist.
    pub fn new(interfaces: &[String]) -> Result<Self, NetError> {
        for name in interfaces {
            interface_index(name)?;
        }
        let netlink = Netlink::open().map_err(|source| NetError::Io {
            name: interfaces.join(","),
            what: "routes (netlink)",
            source,
        })?;
        Ok(Self {
            interfaces: interfaces.to_vec(),
            netlink: Arc::new(Mutex::new(netlink)),
            hops: Arc::default(),
        })
    }

    fn netlink(&self) -> MutexGuard<'_, Netlink> {
        // A request that panicked leaves nothing half-done in the socket worth refusing.
        self.netlink.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The backends whose last resolution went through neighbour `hop` (the backend itself or
    /// its gateway): those a change of `hop`'s entry concerns.
    pub fn backends_via(&self, hop: IpAddr) -> Vec<IpAddr> {
        let hops = self.hops.lock().unwrap_or_else(|p| p.into_inner());
        hops.iter()
            .filter(|(_, via)| **via == hop)
            .map(|(backend, _)| *backend)
            .collect()
    }

    /// The destination MAC for `hop` (the backend or its gateway), seen from `dev`.
    fn neighbour_mac(
        &self,
        backend: IpAddr,
        hop: IpAddr,
        dev: &str,
        ifindex: u32,
    ) -> Result<Mac, String> {
        let entry = self
            .netlink()
            .neighbour(ifindex, hop)
            .map_err(|e| format!("cannot read the neighbour entry of {hop} on {dev}: {e}"))?;
        let state = match entry {
            Some(entry) => match usable_mac(&entry) {
                Some(mac) => return Ok(mac),
                None => Some(entry.state),
            },
            None => None,
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
        Err(match state {
            Some(NeighbourState::Failed) => format!(
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
        let route = self.netlink().route_to(addr).map_err(|e| {
            format!("no route to {addr} ({e}): add one through an interface of daemon.interfaces")
        })?;
        if route.kind == RouteType::Local {
            return Err(format!(
                "{addr} is an address of this host: a backend must be another host"
            ));
        }
        let ifindex = route.oif.ok_or_else(|| {
            format!(
                "the route to {addr} has no egress interface (a {:?} route): add one through an \
                 interface of daemon.interfaces",
                route.kind
            )
        })?;
        let dev = interface_name(ifindex)
            .map_err(|e| format!("route to {addr} leaves through ifindex {ifindex}: {e}"))?;
        if !self.interfaces.contains(&dev) {
            return Err(format!(
                "route to {addr} leaves through {dev}, which has no XDP program attached: \
                 add it to daemon.interfaces"
            ));
        }
        let facts = |e: NetError| format!("route to {addr} leaves through {dev}: {e}");
        let src_mac = interface_mac(&dev).map_err(facts)?;
        let mtu = interface_mtu(&dev).map_err(facts)?;
        let dst_mac = match backend.mac {
            Some(mac) => mac,
            None => {
                let hop = route.gateway.unwrap_or(addr);
                self.hops
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(addr, hop);
                self.neighbour_mac(addr, hop, &dev, ifindex)?
            }
        };
        Ok(NextHop {
            dst_mac,
            src_mac,
            ifindex,
            mtu,
            src: route.prefsrc,
        })
    }
}

/// The name of interface `index` in the caller's namespace.
fn interface_name(index: u32) -> Result<String, NetError> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes if_indextoname writes at most.
    if unsafe { libc::if_indextoname(index, name.as_mut_ptr()) }.is_null() {
        return Err(NetError::Io {
            name: format!("ifindex {index}"),
            what: "name",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

/// The link-layer address of a neighbour entry, when its state makes it usable.
fn usable_mac(entry: &Neighbour) -> Option<Mac> {
    let usable = matches!(
        entry.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
    );
    let lladdr = entry.lladdr.as_deref()?;
    let mac: [u8; 6] = lladdr.try_into().ok()?;
    usable.then_some(Mac(mac))
}

/// The global (non-link-local) addresses of an interface: where tunnels to this host end.
pub fn interface_addresses(name: &str) -> Result<Vec<IpAddr>, String> {
    let index = interface_index(name).map_err(|e| e.to_string())?;
    let mut netlink = Netlink::open().map_err(|e| format!("opening netlink: {e}"))?;
    netlink
        .global_addresses(index)
        .map_err(|e| format!("reading the addresses of {name} over netlink: {e}"))
}

/// A neighbour entry changed (added, updated, deleted) on interface `ifindex`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeighbourChange {
    pub ifindex: u32,
    pub addr: IpAddr,
    /// The usable MAC it has now; none when it failed, is being resolved or was deleted.
    pub mac: Option<Mac>,
}

/// Subscribes to neighbour-table changes (ARP/ND) of the caller's namespace and sends each.
/// The subscription is in place when this returns. Must be called within a tokio runtime; the
/// watch ends when the receiver is dropped.
pub fn watch_neighbours() -> io::Result<mpsc::UnboundedReceiver<NeighbourChange>> {
    let (mut connection, _handle, mut messages) = rtnetlink::new_connection()?;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&rtnetlink::sys::SocketAddr::new(0, RTMGRP_NEIGH))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let connection = tokio::spawn(connection);
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            let (entry, present) = match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => (n, true),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(n)) => (n, false),
                _ => continue,
            };
            let Some(entry) = crate::netlink::neighbour(&entry) else {
                continue;
            };
            let change = NeighbourChange {
                ifindex: entry.ifindex,
                addr: entry.addr,
                mac: if present { usable_mac(&entry) } else { None },
            };
            if tx.send(change).is_err() {
                break;
            }
        }
        connection.abort();
    });
    Ok(rx)
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

    const MAC: Mac = Mac([0xe2, 0xba, 0x5f, 0x07, 0x7a, 0x46]);

    fn entry(state: NeighbourState, lladdr: Option<&[u8]>) -> Neighbour {
        Neighbour {
            ifindex: 2,
            addr: IpAddr::from([10, 1, 0, 11]),
            state,
            lladdr: lladdr.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn usable_neighbour_states_give_the_mac() {
        for state in [
            NeighbourState::Reachable,
            NeighbourState::Stale,
            NeighbourState::Delay,
            NeighbourState::Probe,
            NeighbourState::Permanent,
        ] {
            assert_eq!(
                usable_mac(&entry(state, Some(&MAC.0))),
                Some(MAC),
                "{state:?}"
            );
        }
    }

    #[test]
    fn unusable_neighbours_give_no_mac() {
        for state in [
            NeighbourState::Incomplete,
            NeighbourState::Failed,
            NeighbourState::None,
        ] {
            assert_eq!(usable_mac(&entry(state, Some(&MAC.0))), None, "{state:?}");
        }
        assert_eq!(usable_mac(&entry(NeighbourState::Reachable, None)), None);
        // Not an Ethernet address (e.g. an IPoIB neighbour).
        assert_eq!(
            usable_mac(&entry(NeighbourState::Reachable, Some(&[1, 2, 3, 4]))),
            None
        );
    }

    #[test]
    fn interface_facts_of_loopback() {
        assert_eq!(interface_index("lo").unwrap(), 1);
        assert_eq!(interface_name(1).unwrap(), "lo");
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
    fn routes_and_addresses_of_loopback_over_netlink() {
        let mut netlink = Netlink::open().unwrap();
        let route = netlink.route_to(IpAddr::from([127, 0, 0, 1])).unwrap();
        assert_eq!((route.kind, route.oif), (RouteType::Local, Some(1)));
        // Loopback's 127.0.0.1 and ::1 have host scope, not global.
        assert_eq!(interface_addresses("lo").unwrap(), Vec::<IpAddr>::new());
    }
}
