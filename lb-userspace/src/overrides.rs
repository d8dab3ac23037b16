//! Runtime overrides set from the CLI (drains, weights), persisted in `state_dir` so they
//! survive daemon restarts.
//!
//! The rule: an override belongs to a (VIP name, backend address) pair and lasts until the
//! operator clears it (`xdplb undrain`, `xdplb weight VIP BACKEND reset`) or the backend leaves
//! the config. A reload never silently undoes a drain: a drained backend stays drained even if
//! the new config changes its weight.

use crate::model::Services;
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, net::IpAddr, path::Path};

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

/// Errors reading or writing `overrides.json`.
pub type OverridesError = crate::persist::PersistError;

pub const FILE_NAME: &str = "overrides.json";

impl Overrides {
    /// Loads `state_dir/overrides.json`; a missing file means no overrides.
    pub fn load(state_dir: &Path) -> Result<Self, OverridesError> {
        crate::persist::load(state_dir, FILE_NAME, "drains and CLI weights")
    }

    /// Like [`load`](Self::load), but an unreadable file is moved aside instead of keeping
    /// the daemon down (see [`crate::persist::load_or_set_aside`]).
    pub fn load_or_set_aside(state_dir: &Path) -> Result<(Self, Option<String>), OverridesError> {
        crate::persist::load_or_set_aside(
            state_dir,
            FILE_NAME,
            "drains and CLI weights",
            "drains or CLI weights: re-apply them (`xdplb drain`, `xdplb weight`)",
        )
    }

    /// Writes durably (see [`crate::persist::save`]).
    pub fn save(&self, state_dir: &Path) -> Result<(), OverridesError> {
        crate::persist::save(state_dir, FILE_NAME, self)
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
                        port: None,
                        addr: addr(b),
                        weight: 100,
                        mac: None,
                        health_port: None,
                    })
                    .collect(),
                acl: Default::default(),
                limits: None,
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
