//! The runtime blocklist (`xdplb block add|del|list`): source prefixes dropped for one VIP or
//! for every VIP, optionally for a limited time. It is runtime state like drains, so it is
//! persisted in `state_dir` ([`crate::persist`]) and survives restarts; entries added with `--for` expire by themselves (the daemon checks
//! every second). The state path writes it into the `BLOCKLIST` trie.

use crate::{acl::SourceEntry, dataplane::SourceKey, model::Prefix};
use lb_common::SCOPE_ALL_VIPS;
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub const FILE_NAME: &str = "blocklist.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockEntry {
    pub prefix: Prefix,
    /// The VIP it applies to; `None`: every VIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds since the Unix epoch (wall clock: it must mean the same after a reboot).
    pub added: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Blocklist {
    #[serde(default)]
    entries: Vec<BlockEntry>,
}

/// One row of `xdplb block list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    pub prefix: String,
    /// VIP name, or `None` for every VIP.
    pub vip: Option<String>,
    pub reason: Option<String>,
    pub age_s: u64,
    /// Seconds until it expires; `None`: until deleted.
    pub expires_in_s: Option<u64>,
    /// Packets it dropped since it was added (or since the daemon adopted it).
    pub packets: u64,
    /// False when its VIP is not in the config (kept, not applied).
    pub applied: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BlocklistError {
    #[error(transparent)]
    File(#[from] crate::persist::PersistError),
    #[error("{prefix} is not blocked{}; `xdplb block list` shows the entries", scope(.vip))]
    NotBlocked { prefix: Prefix, vip: Option<String> },
    #[error("the blocklist holds {max} entries at most: remove some, or block a shorter prefix")]
    Full { max: u32 },
}

fn scope(vip: &Option<String>) -> String {
    match vip {
        Some(vip) => format!(" for VIP {vip}"),
        None => " for every VIP".to_string(),
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Blocklist {
    /// Loads `state_dir/blocklist.json`; a missing file means an empty blocklist.
    pub fn load(state_dir: &Path) -> Result<Self, BlocklistError> {
        Ok(crate::persist::load(
            state_dir,
            FILE_NAME,
            "the runtime blocklist entries",
        )?)
    }

    /// Like [`load`](Self::load), but an unreadable file is moved aside instead of keeping
    /// the daemon down (see [`crate::persist::load_or_set_aside`]).
    pub fn load_or_set_aside(state_dir: &Path) -> Result<(Self, Option<String>), BlocklistError> {
        Ok(crate::persist::load_or_set_aside(
            state_dir,
            FILE_NAME,
            "the runtime blocklist entries",
            "the runtime blocklist: add its entries again (`xdplb block add`)",
        )?)
    }

    /// Writes durably (see [`crate::persist::save`]).
    pub fn save(&self, state_dir: &Path) -> Result<(), BlocklistError> {
        Ok(crate::persist::save(state_dir, FILE_NAME, self)?)
    }

    pub fn entries(&self) -> &[BlockEntry] {
        &self.entries
    }

    /// Adds an entry, replacing one for the same prefix and VIP (a new `--for` or reason).
    pub fn add(
        &mut self,
        prefix: Prefix,
        vip: Option<String>,
        duration: Option<Duration>,
        reason: Option<String>,
        now: u64,
    ) -> Result<String, BlocklistError> {
        let max = lb_common::MAX_BLOCKLIST_ENTRIES;
        self.entries
            .retain(|e| !(e.prefix == prefix && e.vip == vip));
        if self.entries.len() >= max as usize {
            return Err(BlocklistError::Full { max });
        }
        let expires = duration.map(|d| now + d.as_secs().max(1));
        let message = format!(
            "blocked {prefix}{}{}",
            scope(&vip),
            duration
                .map(|d| format!(" for {}s", d.as_secs().max(1)))
                .unwrap_or_default()
        );
        self.entries.push(BlockEntry {
            prefix,
            vip,
            reason,
            added: now,
            expires,
        });
        Ok(message)
    }

    pub fn remove(
        &mut self,
        prefix: Prefix,
        vip: Option<String>,
    ) -> Result<String, BlocklistError> {
        let before = self.entries.len();
        self.entries
            .retain(|e| !(e.prefix == prefix && e.vip == vip));
        if self.entries.len() == before {
            return Err(BlocklistError::NotBlocked { prefix, vip });
        }
        Ok(format!("unblocked {prefix}{}", scope(&vip)))
    }

    /// Drops entries whose time is up; returns whether any went.
    pub fn expire(&mut self, now: u64) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.expires.is_none_or(|t| t > now));
        self.entries.len() != before
    }

    /// What the state path writes: (VIP or every VIP, prefix).
    pub fn target(&self) -> BTreeSet<(Option<String>, SourceEntry)> {
        self.entries
            .iter()
            .map(|e| (e.vip.clone(), SourceEntry::of(&e.prefix)))
            .collect()
    }

    /// Rows for `xdplb block list`: `written` is what the data path holds (trie key, packets
    /// dropped), `vip_id` the id of a configured VIP by name.
    pub fn rows(
        &self,
        now: u64,
        written: &[(SourceKey, u64)],
        vip_id: impl Fn(&str) -> Option<u32>,
    ) -> Vec<BlockInfo> {
        let counts: HashMap<(u32, SourceEntry), u64> = written
            .iter()
            .map(|(key, packets)| (SourceEntry::from_key(key), *packets))
            .collect();
        self.entries
            .iter()
            .map(|e| {
                let scope = match &e.vip {
                    None => Some(SCOPE_ALL_VIPS),
                    Some(name) => vip_id(name),
                };
                let count = scope.and_then(|s| counts.get(&(s, SourceEntry::of(&e.prefix))));
                BlockInfo {
                    prefix: e.prefix.to_string(),
                    vip: e.vip.clone(),
                    reason: e.reason.clone(),
                    age_s: now.saturating_sub(e.added),
                    expires_in_s: e.expires.map(|t| t.saturating_sub(now)),
                    packets: count.copied().unwrap_or(0),
                    applied: count.is_some(),
                }
            })
            .collect()
    }
}

/// `xdplb block list` as a table.
pub fn render(rows: &[BlockInfo]) -> String {
    if rows.is_empty() {
        return "the blocklist is empty\n".to_string();
    }
    let mut table = vec![["PREFIX", "VIP", "PACKETS", "AGE", "EXPIRES IN", "REASON"]
        .map(String::from)
        .to_vec()];
    for r in rows {
        table.push(vec![
            r.prefix.clone(),
            match (&r.vip, r.applied) {
                (Some(vip), true) => vip.clone(),
                (Some(vip), false) => format!("{vip} (not configured)"),
                (None, _) => "*".to_string(),
            },
            r.packets.to_string(),
            format!("{}s", r.age_s),
            r.expires_in_s.map_or("never".into(), |s| format!("{s}s")),
            r.reason.clone().unwrap_or_default(),
        ]);
    }
    crate::cli::table(&table, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    /// One entry for every VIP (with a reason), one for `vip` that lasts `seconds`.
    fn two_entries(scoped: &str, vip: &str, seconds: u64, added: (u64, u64)) -> Blocklist {
        let mut list = Blocklist::default();
        let reason = Some("scan".to_string());
        list.add(prefix("198.51.100.0/24"), None, None, reason, added.0)
            .unwrap();
        let duration = Some(Duration::from_secs(seconds));
        list.add(prefix(scoped), Some(vip.into()), duration, None, added.1)
            .unwrap();
        list
    }

    #[test]
    fn survives_a_save_and_load_and_expires_by_itself() {
        let dir = std::env::temp_dir().join(format!("xdplb-blocklist-{}", std::process::id()));
        let list = two_entries("2001:db8::/48", "web", 3, (1000, 1000));
        list.save(&dir).unwrap();
        let mut loaded = Blocklist::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded, list);
        assert!(!loaded.expire(1002), "3 s not over yet");
        assert!(loaded.expire(1003));
        assert_eq!(loaded.entries().len(), 1);
        assert_eq!(loaded.entries()[0].vip, None);
    }

    #[test]
    fn adding_again_replaces_and_removing_names_what_is_missing() {
        let mut list = Blocklist::default();
        list.add(
            prefix("10.0.0.0/8"),
            None,
            Some(Duration::from_secs(5)),
            None,
            0,
        )
        .unwrap();
        list.add(prefix("10.0.0.0/8"), None, None, None, 7).unwrap();
        assert_eq!(list.entries().len(), 1);
        assert_eq!(list.entries()[0].expires, None);
        let err = list
            .remove(prefix("10.0.0.0/8"), Some("web".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not blocked for VIP web"), "{err}");
        assert_eq!(
            list.remove(prefix("10.0.0.0/8"), None).unwrap(),
            "unblocked 10.0.0.0/8 for every VIP"
        );
    }

    #[test]
    fn the_table_shows_counts_ages_and_scopes() {
        let list = two_entries("203.0.113.7/32", "old", 60, (1000, 1010));
        let every_vip = SourceEntry::of(&prefix("198.51.100.0/24")).key(SCOPE_ALL_VIPS);
        // "old" is not configured: no id, so its entry is not applied.
        let rows = list.rows(1030, &[(every_vip, 42)], |_| None);
        let expected = "\
PREFIX           VIP                   PACKETS  AGE  EXPIRES IN  REASON
198.51.100.0/24  *                     42       30s  never       scan
203.0.113.7/32   old (not configured)  0        20s  40s
";
        assert_eq!(render(&rows), expected);
    }
}
