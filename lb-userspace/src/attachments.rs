//! Keeping the program on the configured interfaces for the daemon's whole life: attached at
//! start (a pinned link the kernel severed is replaced), attached again when
//! [`crate::links`] reports that an interface came back without it, and reported in status
//! and `/healthz` while an interface has no program.

use crate::{
    dataplane::{AttachMode, Dataplane, DataplaneError},
    links::LinkEvent,
};
use std::{collections::BTreeMap, time::Instant};
use tracing::{error, info, warn};

/// Where the program stands on one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Attachment {
    Attached {
        ifindex: u32,
    },
    /// No program there: every VIP packet goes to the host stack.
    Missing {
        ifindex: u32,
        since: Instant,
        why: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Interface(#[from] crate::net::NetError),
}

pub struct Attachments {
    mode: AttachMode,
    /// The kernel's id of our program, to tell it from another one (or none) on a link.
    program_id: u32,
    interfaces: BTreeMap<String, Attachment>,
}

impl Attachments {
    /// Nothing attached yet.
    pub fn new(dataplane: &mut Dataplane, mode: AttachMode) -> Result<Self, DataplaneError> {
        Ok(Self {
            mode,
            program_id: dataplane.program_id()?,
            interfaces: BTreeMap::new(),
        })
    }

    /// Attaches to every interface and registers it for `XDP_REDIRECT`. Fails when one cannot
    /// be attached: the daemon must not start half-deployed.
    pub fn attach_all(
        &mut self,
        dataplane: &mut Dataplane,
        interfaces: &[String],
    ) -> Result<(), AttachError> {
        for iface in interfaces {
            let ifindex = crate::net::interface_index(iface)?;
            self.attach(dataplane, iface, ifindex)?;
        }
        Ok(())
    }

    fn attach(
        &mut self,
        dataplane: &mut Dataplane,
        iface: &str,
        ifindex: u32,
    ) -> Result<(), DataplaneError> {
        if dataplane.attach(iface, self.mode)? {
            warn!(%iface, "the pinned XDP link was severed (the interface was deleted and created again): replaced");
        }
        dataplane.add_tx_port(ifindex)?;
        info!(%iface, ifindex, "XDP program attached");
        self.interfaces
            .insert(iface.to_string(), Attachment::Attached { ifindex });
        Ok(())
    }

    /// Follows the current state of a configured interface (from [`crate::links::current`]).
    /// Returns the index the interface had when it came back under another one: next hops
    /// through the old index are stale.
    pub fn on_event(&mut self, dataplane: &mut Dataplane, event: &LinkEvent) -> Option<u32> {
        let name = event.name();
        let known = self.interfaces.get(name)?.clone();
        let old_ifindex = match known {
            Attachment::Attached { ifindex } | Attachment::Missing { ifindex, .. } => ifindex,
        };
        match event {
            // Said once, however many events the deletion caused.
            LinkEvent::Removed { .. } if matches!(known, Attachment::Missing { .. }) => None,
            LinkEvent::Removed { .. } => {
                error!(iface = %name, "interface deleted: no XDP program, VIP traffic is not balanced until it comes back");
                self.interfaces.insert(
                    name.to_string(),
                    Attachment::Missing {
                        ifindex: old_ifindex,
                        since: Instant::now(),
                        why: "interface deleted".into(),
                    },
                );
                None
            }
            LinkEvent::Present {
                ifindex,
                xdp_program,
                ..
            } => {
                if *xdp_program == Some(self.program_id) && *ifindex == old_ifindex {
                    if matches!(known, Attachment::Missing { .. }) {
                        self.interfaces
                            .insert(name.to_string(), Attachment::Attached { ifindex: *ifindex });
                    }
                    return None;
                }
                // Whatever the pinned link is attached to, it is not this interface.
                let attached = dataplane
                    .reattach(name, self.mode)
                    .and_then(|()| dataplane.add_tx_port(*ifindex));
                match attached {
                    Ok(()) => {
                        info!(iface = %name, ifindex, "interface back: XDP program attached again");
                        self.interfaces
                            .insert(name.to_string(), Attachment::Attached { ifindex: *ifindex });
                        (*ifindex != old_ifindex).then_some(old_ifindex)
                    }
                    Err(e) => {
                        error!(iface = %name, "re-attaching XDP failed: {e}");
                        self.interfaces.insert(
                            name.to_string(),
                            Attachment::Missing {
                                ifindex: *ifindex,
                                since: Instant::now(),
                                why: format!("re-attaching failed: {e}"),
                            },
                        );
                        None
                    }
                }
            }
        }
    }

    /// Whether every configured interface has the program.
    pub fn all_attached(&self) -> bool {
        self.interfaces
            .values()
            .all(|a| matches!(a, Attachment::Attached { .. }))
    }

    /// One line per interface without the program, for status.
    pub fn problems(&self) -> Vec<String> {
        self.interfaces
            .iter()
            .filter_map(|(name, a)| match a {
                Attachment::Attached { .. } => None,
                Attachment::Missing { since, why, .. } => Some(format!(
                    "{name}: no XDP program for {}s ({why})",
                    since.elapsed().as_secs()
                )),
            })
            .collect()
    }
}
