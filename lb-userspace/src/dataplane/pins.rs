//! The pin directory (map sizes, adoption, older layouts) and the per-interface links that attach.

use super::{Adoption, AttachMode, Dataplane, DataplaneError, Result, Sizes};
use aya::{
    maps::MapData,
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        ProgramError, Xdp, XdpMode,
    },
};
use lb_common::{
    counters, map_names, LOG_CPU_SLOTS, MAX_ACL_ENTRIES, MAX_BLOCKLIST_ENTRIES, MAX_DECAP_ADDRS,
    MAX_TX_PORTS, SOURCE_RATE_SLOTS, VIP_ADDR_WORDS,
};
use std::path::{Path, PathBuf};

impl Dataplane {
    /// Attaches the program to `iface`.
    ///
    /// When pinning, the attachment is a bpf_link pinned next to the maps: it outlives this
    /// process (forwarding continues while the daemon restarts), and a later run swaps its
    /// program into the existing link atomically instead of detaching. Links pinned by an older
    /// layout are taken over the same way. A pinned link the kernel has severed (its interface
    /// was deleted, perhaps created again since) is replaced by a new one. Without pinning it
    /// lasts while `self` lives.
    ///
    /// Returns whether a severed link was replaced.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<bool> {
        let Some(pin_dir) = self.pin_dir.clone() else {
            // The program keeps the link: attached for as long as `self` lives.
            return self.attach_link(iface, mode).map(|_| false);
        };
        let link_path = pin_dir.join(link_pin_name(iface));
        let existing = std::iter::once(link_path.clone())
            .chain(older_layout_dirs(&pin_dir).map(|dir| dir.join(link_pin_name(iface))))
            .find(|path| path.exists());
        let link_err = |path: &Path, reason: String| DataplaneError::Link {
            iface: iface.to_string(),
            path: path.to_path_buf(),
            reason,
        };
        let attach_err = |source| DataplaneError::Attach {
            iface: iface.to_string(),
            source,
        };
        let mut severed = false;
        if let Some(path) = existing {
            let pinned = PinnedLink::from_pin(&path).map_err(|e| link_err(&path, e.to_string()))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .map_err(|e| link_err(&path, e.to_string()))?;
            match self.program().attach_to_link(link) {
                Ok(id) => {
                    if path != link_path {
                        // Re-pin under this layout before the old directory goes away.
                        std::fs::rename(&path, &link_path)
                            .map_err(|e| link_err(&path, e.to_string()))?;
                    }
                    // The pin keeps the link; this process needs no descriptor of its own
                    // (re-attaching after every re-creation would pile them up).
                    drop(self.program().take_link(id).map_err(attach_err)?);
                    return Ok(false);
                }
                Err(e) if is_severed(&e) => {
                    std::fs::remove_file(&path).map_err(|e| link_err(&path, e.to_string()))?;
                    severed = true;
                }
                Err(source) => return Err(attach_err(source)),
            }
        }
        let id = self.attach_link(iface, mode)?;
        let link = self.program().take_link(id).map_err(attach_err)?;
        let fd_link = FdLink::try_from(link).map_err(|e| {
            link_err(
                &link_path,
                format!("{e}: the kernel attached without bpf_link, so it cannot be pinned"),
            )
        })?;
        fd_link
            .pin(&link_path)
            .map_err(|e| link_err(&link_path, e.to_string()))?;
        Ok(severed)
    }

    /// Attaches to `iface` with a new link, dropping the pinned one whatever it is attached to:
    /// for an interface that reports another program (or none) although a link is pinned for
    /// it (the link is severed, or follows a netdev that left this namespace).
    pub fn reattach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        if let Some(pin_dir) = &self.pin_dir {
            let path = pin_dir.join(link_pin_name(iface));
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(DataplaneError::Link {
                        iface: iface.to_string(),
                        path,
                        reason: e.to_string(),
                    })
                }
                _ => {}
            }
        }
        self.attach(iface, mode).map(drop)
    }

    /// The kernel's id of the loaded program, as netlink reports it on attached interfaces.
    pub fn program_id(&mut self) -> Result<u32> {
        let name = self.role.program_name();
        self.program()
            .info()
            .map(|info| info.id())
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Removes every pin (maps and links) of every layout under the pin root: the programs
    /// detach and the maps are freed once this process lets go of them.
    pub fn unpin_everything(&self) -> Result<()> {
        let Some(pin_dir) = &self.pin_dir else {
            return Ok(());
        };
        for dir in std::iter::once(pin_dir.clone()).chain(older_layout_dirs(pin_dir)) {
            remove_dir(&dir)?;
        }
        Ok(())
    }

    /// Removes the pinned links of interfaces not in `keep` (the program detaches from them);
    /// returns those interfaces.
    pub fn detach_others(&self, keep: &[String]) -> Result<Vec<String>> {
        let Some(pin_dir) = &self.pin_dir else {
            return Ok(Vec::new());
        };
        let pin_err = |source| DataplaneError::PinDir {
            path: pin_dir.clone(),
            source,
        };
        let mut detached = Vec::new();
        for entry in std::fs::read_dir(pin_dir).map_err(pin_err)? {
            let entry = entry.map_err(pin_err)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_prefix("link_") {
                if !keep.iter().any(|k| k == iface) {
                    std::fs::remove_file(entry.path()).map_err(pin_err)?;
                    detached.push(iface.to_string());
                }
            }
        }
        Ok(detached)
    }

    /// Removes pins of older layouts (after their links were taken over).
    pub fn remove_older_layouts(&self) -> Result<()> {
        if let Some(pin_dir) = &self.pin_dir {
            for dir in older_layout_dirs(pin_dir) {
                remove_dir(&dir)?;
            }
        }
        Ok(())
    }

    fn attach_link(&mut self, iface: &str, mode: AttachMode) -> Result<XdpLinkId> {
        let attach = |program: &mut Xdp, mode| {
            program
                .attach(iface, mode)
                .map_err(|source| DataplaneError::Attach {
                    iface: iface.to_string(),
                    source,
                })
        };
        let program = self.program();
        match mode {
            AttachMode::Native => attach(program, XdpMode::Driver),
            AttachMode::Generic => attach(program, XdpMode::Skb),
            AttachMode::Auto => {
                attach(program, XdpMode::Driver).or_else(|_| attach(program, XdpMode::Skb))
            }
        }
    }
}

/// Whether updating a pinned link failed because the kernel severed it (ENOLINK: its
/// interface is gone, or someone detached it).
fn is_severed(error: &ProgramError) -> bool {
    matches!(error, ProgramError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::ENOLINK))
}

fn link_pin_name(iface: &str) -> String {
    format!("link_{iface}")
}

/// Sibling `v<N>` directories of other layout versions.
fn older_layout_dirs(pin_dir: &Path) -> impl Iterator<Item = PathBuf> {
    let current = pin_dir.file_name().map(|n| n.to_owned());
    let entries = pin_dir
        .parent()
        .and_then(|root| std::fs::read_dir(root).ok())
        .into_iter()
        .flatten()
        .flatten();
    entries
        .filter(move |e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            Some(e.file_name()) != current
                && name.starts_with('v')
                && name[1..].parse::<u32>().is_ok()
        })
        .map(|e| e.path())
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DataplaneError::PinDir {
            path: dir.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Every map with its max_entries: what the loader creates, and what a pinned map must have
/// to be adopted.
pub(super) fn map_sizes(sizes: &Sizes, log_cpus: u32) -> Vec<(&'static str, u32)> {
    vec![
        (map_names::VIPS, sizes.max_vips),
        (map_names::VIP_COUNTERS, sizes.max_vips),
        (map_names::RINGS, sizes.max_vips * 2 * sizes.max_ring_size),
        (map_names::BACKENDS, sizes.max_backends),
        (map_names::BACKEND_COUNTERS, sizes.max_backends),
        (
            map_names::FLOWS,
            lb_common::flow_slots(sizes.flow_table_size),
        ),
        (map_names::CONFIG, 1),
        (map_names::GLOBAL_COUNTERS, counters::COUNT),
        (map_names::TX_PORTS, MAX_TX_PORTS),
        (map_names::DECAP_LOCAL, MAX_DECAP_ADDRS),
        (map_names::DECAP_VIPS, MAX_DECAP_ADDRS),
        (map_names::SCHED_CURSORS, sizes.max_vips),
        (map_names::ACTIVE_CONNS, sizes.max_backends),
        (map_names::ACL, MAX_ACL_ENTRIES),
        (map_names::ACL4, MAX_ACL_ENTRIES),
        (map_names::BLOCKLIST, MAX_BLOCKLIST_ENTRIES),
        (map_names::VIP_LIMITS, sizes.max_vips),
        (map_names::SOURCE_RATES, SOURCE_RATE_SLOTS),
        (map_names::VIP_DROPS, sizes.max_vips),
        (map_names::PINNED, sizes.flow_table_size),
        (map_names::FLOOD, 1),
        (map_names::EVENTS, log_cpus * LOG_CPU_SLOTS),
        (map_names::LOG_BUDGET, 1),
        (map_names::NAT_FWD, sizes.nat_table_size),
        (map_names::NAT_REV, sizes.nat_table_size),
        (map_names::NAT_BACKENDS, sizes.max_backends),
        (map_names::NAT_CONFIG, 1),
        (map_names::NAT_PROGS, lb_common::NAT_PROGRAMS),
        (map_names::NAT_SCRATCH, 1),
        (map_names::VIP_ADDRS, VIP_ADDR_WORDS),
        (map_names::VIP_SLOTS, sizes.max_vips),
    ]
}

/// Decides whether the maps pinned in `dir` can be adopted; clears the directory if not.
pub(super) fn prepare_pin_dir(dir: &Path, expected: &[(&'static str, u32)]) -> Result<Adoption> {
    let pin_err = |source| DataplaneError::PinDir {
        path: dir.to_path_buf(),
        source,
    };
    if !dir.join(map_names::FLOWS).exists() {
        std::fs::create_dir_all(dir).map_err(pin_err)?;
        return Ok(Adoption::Fresh);
    }
    let mismatch = expected.iter().find_map(|(name, want)| {
        let have = MapData::from_pin(dir.join(name))
            .and_then(|map| map.info())
            .map(|info| info.max_entries());
        match have {
            Ok(have) if have == *want => None,
            Ok(have) => Some(format!(
                "map {name} has {have} entries, the config asks for {want}"
            )),
            Err(e) => Some(format!("map {name} cannot be opened: {e}")),
        }
    });
    match mismatch {
        None => Ok(Adoption::Adopted),
        Some(reason) => {
            // Keep the links: the new program takes them over in attach().
            for (name, _) in expected {
                match std::fs::remove_file(dir.join(name)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(pin_err(e)),
                    _ => {}
                }
            }
            Ok(Adoption::Replaced(reason))
        }
    }
}
