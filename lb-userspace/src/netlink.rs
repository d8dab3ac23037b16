//! Synchronous rtnetlink requests: routes, neighbours, addresses and links of the calling
//! thread's network namespace, and the announce routes the daemon writes.
//!
//! Messages are built and parsed by `netlink-packet-route` (through `rtnetlink`'s re-exports,
//! the version `links.rs` uses). The requests are synchronous on purpose: their callers
//! (next-hop resolution, announcement) run inside the daemon's state path, which is
//! synchronous, and one request is a few system calls, not the ~1.7 ms of CPU of an `ip`
//! process. Notifications, which arrive on their own, are async (see [`crate::net::watch`]).

use rtnetlink::{
    packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
        NLM_F_REPLACE, NLM_F_REQUEST,
    },
    packet_route::{
        address::{AddressAttribute, AddressMessage, AddressScope},
        link::LinkMessage,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
        route::{
            RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
            RouteType,
        },
        AddressFamily, RouteNetlinkMessage,
    },
    sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr},
    RouteMessageBuilder,
};
use std::{io, net::IpAddr};

/// One rtnetlink socket in the namespace of the thread that opened it.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    sequence: u32,
}

/// The route the kernel would use toward an address (`ip route get`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteTo {
    pub kind: RouteType,
    /// Egress interface index; none for blackhole-like routes.
    pub oif: Option<u32>,
    /// Absent when the destination is on-link.
    pub gateway: Option<IpAddr>,
    /// The source address this host would use.
    pub prefsrc: Option<IpAddr>,
}

/// A neighbour-table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub state: rtnetlink::packet_route::neighbour::NeighbourState,
    pub lladdr: Option<Vec<u8>>,
}

impl Netlink {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Lets the kernel filter dumps by the header fields we set (e.g. the table).
        socket.set_netlink_get_strict_chk(true)?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Sends one request and collects the replies up to its acknowledgement (or the end of a
    /// dump). A negative acknowledgement becomes the `io::Error` of its errno.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::from(message));
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        let mut replies = Vec::new();
        loop {
            let (datagram, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < datagram.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let length = reply.header.length as usize;
                if length == 0 {
                    break;
                }
                offset += length.next_multiple_of(4);
                if reply.header.sequence_number != self.sequence {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(error) => {
                        return match error.code {
                            None => Ok(replies),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    _ => {}
                }
            }
        }
    }

    /// The route the kernel picks for packets to `dst` from this host.
    pub fn route_to(&mut self, dst: IpAddr) -> io::Result<RouteTo> {
        let mut query = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, full_length(dst))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?
            .build();
        // With strict checking the kernel refuses a lookup that names a table, protocol,
        // scope or type (the builder's defaults are those of a route to add).
        query.header.table = RouteHeader::RT_TABLE_UNSPEC;
        query.header.protocol = RouteProtocol::Unspec;
        query.header.scope = RouteScope::Universe;
        query.header.kind = RouteType::Unspec;
        let replies = self.request(RouteNetlinkMessage::GetRoute(query), 0)?;
        let route = replies
            .into_iter()
            .find_map(|reply| match reply {
                RouteNetlinkMessage::NewRoute(route) => Some(route),
                _ => None,
            })
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no route in the reply"))?;
        let mut found = RouteTo {
            kind: route.header.kind,
            oif: None,
            gateway: None,
            prefsrc: None,
        };
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Oif(index) => found.oif = Some(*index),
                RouteAttribute::Gateway(gateway) => found.gateway = ip_of(gateway),
                RouteAttribute::PrefSource(src) => found.prefsrc = ip_of(src),
                _ => {}
            }
        }
        Ok(found)
    }

    /// The neighbour entry for `addr` on interface `ifindex`, if there is one.
    pub fn neighbour(&mut self, ifindex: u32, addr: IpAddr) -> io::Result<Option<Neighbour>> {
        let mut query = NeighbourMessage::default();
        query.header.family = family(addr);
        query.header.ifindex = ifindex;
        query
            .attributes
            .push(NeighbourAttribute::Destination(match addr {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        match self.request(RouteNetlinkMessage::GetNeighbour(query), 0) {
            Ok(replies) => Ok(replies.into_iter().find_map(|reply| match reply {
                RouteNetlinkMessage::NewNeighbour(entry) => neighbour(&entry),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The global-scope addresses of interface `ifindex`.
    pub fn global_addresses(&mut self, ifindex: u32) -> io::Result<Vec<IpAddr>> {
        let mut query = AddressMessage::default();
        query.header.index = ifindex;
        let replies = self.request(RouteNetlinkMessage::GetAddress(query), NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewAddress(a)
                    if a.header.index == ifindex && a.header.scope == AddressScope::Universe =>
                {
                    a.attributes.iter().find_map(|attribute| match attribute {
                        AddressAttribute::Address(addr) => Some(*addr),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// The id of the XDP program attached to interface `ifindex`, if any.
    pub fn xdp_program(&mut self, ifindex: u32) -> io::Result<Option<u32>> {
        let mut query = LinkMessage::default();
        query.header.index = ifindex;
        let replies = self.request(RouteNetlinkMessage::GetLink(query), 0)?;
        Ok(replies.iter().find_map(|reply| match reply {
            RouteNetlinkMessage::NewLink(link) => crate::links::xdp_program(link),
            _ => None,
        }))
    }

    /// Adds (or takes over) the blackhole host route for `addr` in `table`, marked as
    /// written by `protocol`.
    pub fn replace_host_route(&mut self, table: u32, protocol: u8, addr: IpAddr) -> io::Result<()> {
        let route = host_route(table, protocol, addr)?;
        self.request(
            RouteNetlinkMessage::NewRoute(route),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Removes the host route for `addr` from `table`; one already gone is not an error.
    pub fn delete_host_route(&mut self, table: u32, protocol: u8, addr: IpAddr) -> io::Result<()> {
        let route = host_route(table, protocol, addr)?;
        match self.request(RouteNetlinkMessage::DelRoute(route), 0) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other.map(drop),
        }
    }

    /// The host routes in `table` written by `protocol` (what a previous daemon left).
    pub fn host_routes(&mut self, table: u32, protocol: u8) -> io::Result<Vec<IpAddr>> {
        let mut found = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            // Table, protocol and type filter the dump in the kernel (strict checking).
            let mut query = RouteMessageBuilder::<IpAddr>::new()
                .table_id(table)
                .protocol(RouteProtocol::from(protocol))
                .kind(RouteType::BlackHole)
                .build();
            query.header.address_family = family;
            let replies = self.request(RouteNetlinkMessage::GetRoute(query), NLM_F_DUMP)?;
            for reply in replies {
                let RouteNetlinkMessage::NewRoute(route) = reply else {
                    continue;
                };
                if route_table(&route) != table
                    || route.header.protocol != RouteProtocol::from(protocol)
                {
                    continue;
                }
                let dst = route.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(dst) => ip_of(dst),
                    _ => None,
                });
                if let Some(dst) =
                    dst.filter(|d| route.header.destination_prefix_length == full_length(*d))
                {
                    found.push(dst);
                }
            }
        }
        Ok(found)
    }
}

fn host_route(table: u32, protocol: u8, addr: IpAddr) -> io::Result<RouteMessage> {
    Ok(RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(addr, full_length(addr))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?
        .table_id(table)
        .protocol(RouteProtocol::from(protocol))
        .kind(RouteType::BlackHole)
        .build())
}

/// A route's table: tables above 255 only fit the `RTA_TABLE` attribute.
fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(route.header.table.into())
}

/// Parses a neighbour message (a reply or a notification).
pub fn neighbour(entry: &NeighbourMessage) -> Option<Neighbour> {
    let mut addr = None;
    let mut lladdr = None;
    for attribute in &entry.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => addr = Some((*a).into()),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => addr = Some((*a).into()),
            NeighbourAttribute::LinkLayerAddress(mac) => lladdr = Some(mac.clone()),
            _ => {}
        }
    }
    Some(Neighbour {
        ifindex: entry.header.ifindex,
        addr: addr?,
        state: entry.header.state,
        lladdr,
    })
}

fn ip_of(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(a) => Some((*a).into()),
        RouteAddress::Inet6(a) => Some((*a).into()),
        _ => None,
    }
}

fn family(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// The prefix length of a host route: /32 or /128.
pub fn full_length(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}
