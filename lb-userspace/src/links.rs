//! The kernel's view of network interfaces, over rtnetlink.
//!
//! An interface that is deleted and created again under the same name (a driver or devlink
//! reload, a VLAN or bond re-created by the network manager) is a new netdev without the XDP
//! program: the kernel severs the old bpf_link. [`watch`] reports such changes as they happen
//! so the daemon (and `xdplb decap`) can attach again within a second instead of silently
//! passing every packet to the host stack.
//!
//! This module is where netlink lives in the daemon; route and neighbour lookups can move here
//! from `net.rs` (which runs `ip`) later.

use futures_util::{StreamExt, TryStreamExt};
use rtnetlink::{
    constants::RTMGRP_LINK,
    packet_core::NetlinkPayload,
    packet_route::{
        link::{LinkAttribute, LinkMessage, LinkXdp},
        RouteNetlinkMessage,
    },
    sys::{AsyncSocket, SocketAddr},
};
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error("opening a netlink socket failed: {0}")]
    Socket(#[from] std::io::Error),
    #[error("listing interfaces over netlink failed: {0}")]
    Dump(#[from] rtnetlink::Error),
}

/// A change of one of the watched interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// The interface exists (it was created, or something about it changed), with the XDP
    /// program attached to it now, if any.
    Present {
        name: String,
        ifindex: u32,
        xdp_program: Option<u32>,
    },
    /// The interface was deleted (or moved to another namespace).
    Removed { name: String, ifindex: u32 },
}

impl LinkEvent {
    pub fn name(&self) -> &str {
        match self {
            LinkEvent::Present { name, .. } | LinkEvent::Removed { name, .. } => name,
        }
    }
}

/// The state of the interfaces in `names` now: `Present` with the program attached, or
/// `Removed` (index 0) for a name no interface has. Events can be stale by the time they are
/// read (an interface that flapped twice); this is the truth to act on.
pub async fn current(names: &[String]) -> Result<Vec<LinkEvent>, LinksError> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let connection = tokio::spawn(connection);
    let links: Result<Vec<LinkMessage>, _> = handle.link().get().execute().try_collect().await;
    connection.abort();
    let present: Vec<LinkEvent> = links?
        .iter()
        .filter_map(|link| link_event(link, true))
        .filter(|e| names.iter().any(|n| n == e.name()))
        .collect();
    Ok(names
        .iter()
        .map(|name| {
            present
                .iter()
                .find(|e| e.name() == name)
                .cloned()
                .unwrap_or_else(|| LinkEvent::Removed {
                    name: name.clone(),
                    ifindex: 0,
                })
        })
        .collect())
}

/// Subscribes to link changes and sends those of the interfaces in `names`. The subscription
/// is in place when this returns, so nothing that happens afterwards is missed. Must be called
/// within a tokio runtime; the watch ends when the receiver is dropped.
pub fn watch(names: Vec<String>) -> Result<mpsc::UnboundedReceiver<LinkEvent>, LinksError> {
    let (mut connection, _handle, mut messages) = rtnetlink::new_connection()?;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, RTMGRP_LINK))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let connection = tokio::spawn(connection);
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            let event = match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    link_event(&link, true)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                    link_event(&link, false)
                }
                _ => None,
            };
            let Some(event) = event.filter(|e| names.iter().any(|n| n == e.name())) else {
                continue;
            };
            if tx.send(event).is_err() {
                break;
            }
        }
        connection.abort();
    });
    Ok(rx)
}

/// The id of the XDP program a link message says is attached, if any.
pub fn xdp_program(link: &LinkMessage) -> Option<u32> {
    link.attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::Xdp(xdp) => Some(xdp),
            _ => None,
        })
        .flatten()
        .find_map(|x| match x {
            LinkXdp::ProgId(id) if *id != 0 => Some(*id),
            _ => None,
        })
}

fn link_event(link: &LinkMessage, present: bool) -> Option<LinkEvent> {
    let name = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })?;
    let ifindex = link.header.index;
    if !present {
        return Some(LinkEvent::Removed { name, ifindex });
    }
    Some(LinkEvent::Present {
        name,
        ifindex,
        xdp_program: xdp_program(link),
    })
}
