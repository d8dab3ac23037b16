//! Runtime overrides set from the CLI (drains, weights), persisted in `state_dir` so they
//! survive daemon restarts.
//!
//! The rule: an override belongs to a (VIP name, backend address) pair and lasts until the
//! operator clears it (`xdplb undrain`, `xdplb weight VIP BACKEND reset`) or the backend leaves
//! the config. A reload never silently undoes a drain: a drained backend stays drained even if
//! the new config changes its weight.

use crate::model::Services;
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Override {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drained: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Overrides {
    /// VIP name -> backend address -> override.
    #[serde(default)]
    vips: BTreeMap<String, BTreeMap<IpAddr, Override>>,
}

#[derive(Debug, thiserror::Error)]
pub enum OverridesError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a valid overrides file ({source}); fix or remove it (drains and CLI weights are stored there)")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

pub const FILE_NAME: &str = "overrides.json";

impl Overrides {
    /// Loads `state_dir/overrides.json`; a missing file means no overrides.
    pub fn load(state_dir: &Path) -> Result<Self, OverridesError> {
        let path = state_dir.join(FILE_NAME);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|source| OverridesError::Parse {
                path: path.clone(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(OverridesError::Read { path, source }),
        }
    }

    /// Like [`load`](Self::load), but a file that cannot be read or parsed (a power loss
    /// before this version synced its writes, a disk error, a hand edit) must not keep the
    /// load balancer down: it is renamed to `overrides.json.unreadable-<unix time>` for the
    /// operator to inspect, and the daemon starts without overrides. Returns what happened,
    /// for a loud log line; fails only when the file cannot even be moved aside.
    pub fn load_or_set_aside(state_dir: &Path) -> Result<(Self, Option<String>), OverridesError> {
        let error = match Self::load(state_dir) {
            Ok(overrides) => return Ok((overrides, None)),
            Err(error) => error,
        };
        let path = state_dir.join(FILE_NAME);
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = state_dir.join(format!("{FILE_NAME}.unreadable-{seconds}"));
        std::fs::rename(&path, &aside).map_err(|source| OverridesError::Write {
            path: path.clone(),
            source,
        })?;
        Ok((
            Self::default(),
            Some(format!(
                "{error}; moved it to {} and starting WITHOUT drains or CLI weights: \
                 re-apply them (`xdplb drain`, `xdplb weight`)",
                aside.display()
            )),
        ))
    }

    /// Writes crash-safely: a temporary file, fsynced, renamed over the old one, then the
    /// directory fsynced. Without the syncs a power loss can leave an empty file (the rename
    /// reaches the disk before the data).
    pub fn save(&self, state_dir: &Path) -> Result<(), OverridesError> {
        use std::io::Write as _;
        let path = state_dir.join(FILE_NAME);
        let write_err = |source| OverridesError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(write_err)?;
        let tmp = state_dir.join(format!("{FILE_NAME}.tmp"));
        let text = serde_json::to_string_pretty(self).expect("plain data serializes");
        let mut file = std::fs::File::create(&tmp).map_err(write_err)?;
        file.write_all(text.as_bytes()).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(write_err)?;
        std::fs::File::open(state_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(write_err)
    }

    pub fn get(&self, vip: &str, backend: IpAddr) -> Override {
        self.vips
            .get(vip)
            .and_then(|b| b.get(&backend))
            .copied()
            .unwrap_or_default()
    }

    /// Changes one override; an override back at its defaults is forgotten.
    pub fn update(&mut self, vip: &str, backend: IpAddr, change: impl FnOnce(&mut Override)) {
        let backends = self.vips.entry(vip.to_string()).or_default();
        let entry = backends.entry(backend).or_default();
        change(entry);
        if *entry == Override::default() {
            backends.remove(&backend);
        }
        if backends.is_empty() {
            self.vips.remove(vip);
        }
    }

    /// Drops overrides of backends the config no longer has; returns whether any went.
    pub fn prune(&mut self, services: &Services) -> bool {
        let before = self.vips.clone();
        self.vips.retain(|vip, backends| {
            let Some(spec) = services.vips.iter().find(|v| &v.name == vip) else {
                return false;
            };
            backends.retain(|addr, _| spec.backends.iter().any(|b| b.addr == *addr));
            !backends.is_empty()
        });
        before != self.vips
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendSpec, Forwarding, HealthSpec, Protocol, VipAddr, VipSpec};

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn services(backends: &[&str]) -> Services {
        Services {
            vips: vec![VipSpec {
                name: "web".into(),
                vip: VipAddr {
                    addr: addr("192.0.2.10"),
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                forwarding: Forwarding::Dsr,
                scheduler: Default::default(),
                affinity: Default::default(),
                ring_size: 13,
                health: HealthSpec::default(),
                announce: Default::default(),
                backends: backends
                    .iter()
                    .map(|b| BackendSpec {
                        addr: addr(b),
                        weight: 100,
                        mac: None,
                        health_port: None,
                    })
                    .collect(),
            }],
            ..Services::default()
        }
    }

    #[test]
    fn survives_a_save_and_load() {
        let dir = std::env::temp_dir().join(format!("xdplb-overrides-{}", std::process::id()));
        let mut overrides = Overrides::default();
        overrides.update("web", addr("10.0.0.1"), |o| o.drained = true);
        overrides.update("web", addr("10.0.0.2"), |o| o.weight = Some(7));
        overrides.save(&dir).unwrap();
        let loaded = Overrides::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded, overrides);
        assert!(loaded.get("web", addr("10.0.0.1")).drained);
        assert_eq!(loaded.get("web", addr("10.0.0.2")).weight, Some(7));
        assert_eq!(loaded.get("web", addr("10.0.0.3")), Override::default());
    }

    #[test]
    fn missing_file_is_empty_and_garbage_is_an_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("xdplb-overrides-bad-{}", std::process::id()));
        assert_eq!(Overrides::load(&dir).unwrap(), Overrides::default());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(FILE_NAME), "{ not json").unwrap();
        let err = Overrides::load(&dir).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            err.contains("overrides.json") && err.contains("fix or remove"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_or_garbled_file_is_moved_aside_and_loading_goes_on() {
        let dir =
            std::env::temp_dir().join(format!("xdplb-overrides-aside-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // What a power loss between rename and data write-back leaves.
        std::fs::write(dir.join(FILE_NAME), "").unwrap();
        let (loaded, warning) = Overrides::load_or_set_aside(&dir).unwrap();
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded, Overrides::default());
        let warning = warning.expect("a warning");
        assert!(warning.contains("WITHOUT drains"), "{warning}");
        assert!(!names.iter().any(|n| n == FILE_NAME), "{names:?}");
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("overrides.json.unreadable-")),
            "{names:?}"
        );
    }

    #[test]
    fn a_good_file_loads_without_a_warning() {
        let dir = std::env::temp_dir().join(format!("xdplb-overrides-good-{}", std::process::id()));
        let mut overrides = Overrides::default();
        overrides.update("web", addr("10.0.0.1"), |o| o.drained = true);
        overrides.save(&dir).unwrap();
        let (loaded, warning) = Overrides::load_or_set_aside(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((loaded, warning), (overrides, None));
    }

    #[test]
    fn clearing_an_override_forgets_it() {
        let mut overrides = Overrides::default();
        overrides.update("web", addr("10.0.0.1"), |o| o.drained = true);
        overrides.update("web", addr("10.0.0.1"), |o| o.drained = false);
        assert_eq!(overrides, Overrides::default());
    }

    #[test]
    fn prune_keeps_overrides_of_backends_still_configured() {
        let mut overrides = Overrides::default();
        overrides.update("web", addr("10.0.0.1"), |o| o.drained = true);
        overrides.update("web", addr("10.0.0.2"), |o| o.weight = Some(1));
        overrides.update("gone", addr("10.0.0.1"), |o| o.drained = true);
        assert!(overrides.prune(&services(&["10.0.0.1"])));
        assert!(overrides.get("web", addr("10.0.0.1")).drained);
        assert_eq!(overrides.get("web", addr("10.0.0.2")), Override::default());
        assert_eq!(overrides.get("gone", addr("10.0.0.1")), Override::default());
        assert!(
            !overrides.prune(&services(&["10.0.0.1"])),
            "nothing left to prune"
        );
    }
}
