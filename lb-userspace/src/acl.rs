//! Per-VIP source ACLs (`allow_sources`, `deny_sources` on a `[[vip]]`): the config model and
//! its checks, the trie entries the state path writes, and the status rows.
//!
//! The data path does one longest-prefix lookup per packet in a trie keyed by (VIP id,
//! source). Deny wins over allow, so an allow entry inside a deny entry is never written: the
//! longest match is then always the right verdict, and a source matching nothing is denied
//! when the VIP has an allow list.

use crate::{
    config::{Problems, Reported, Table},
    dataplane::SourceKey,
    model::Prefix,
};
use lb_common::{
    source_prefix_len, SourcePrefix, ACL_ALLOW, ACL_DENY, FILTER_ACL, FILTER_ALLOW_LIST,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};
use toml::Value;

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AclSpec {
    /// `None`: every source not denied is allowed.
    pub allow: Option<Vec<Prefix>>,
    pub deny: Vec<Prefix>,
}

/// A source prefix as the tries store it, without the scope: the key's prefix length (which
/// counts the 32 scope bits) and the address in [`SourcePrefix`] layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceEntry {
    pub len: u32,
    pub addr: [u8; 16],
}

impl SourceEntry {
    pub fn of(prefix: &Prefix) -> Self {
        let (bytes, family) = crate::state::addr_bytes(prefix.addr);
        Self {
            len: source_prefix_len(family, prefix.len.into()),
            addr: SourcePrefix::of_source(0, family, &bytes).addr,
        }
    }

    pub fn key(&self, scope: u32) -> SourceKey {
        SourceKey::new(
            self.len,
            SourcePrefix {
                scope: scope.to_be_bytes(),
                addr: self.addr,
            },
        )
    }

    /// (scope, entry) of a trie key.
    pub fn from_key(key: &SourceKey) -> (u32, Self) {
        let data = key.data();
        (
            u32::from_be_bytes(data.scope),
            Self {
                len: key.prefix_len(),
                addr: data.addr,
            },
        )
    }
}

impl AclSpec {
    pub fn is_empty(&self) -> bool {
        self.allow.is_none() && self.deny.is_empty()
    }

    /// The VIP's `FILTER_*` bits for its ACL.
    pub fn filter_flags(&self) -> u8 {
        match (&self.allow, self.deny.is_empty()) {
            (None, true) => 0,
            (None, false) => FILTER_ACL,
            (Some(_), _) => FILTER_ACL | FILTER_ALLOW_LIST,
        }
    }

    /// Trie entries -> verdict: every deny entry, and the allow entries no deny entry covers.
    pub fn entries(&self) -> BTreeMap<SourceEntry, u8> {
        let denied: HashMap<Network, usize> = networks(&self.deny);
        let mut entries: BTreeMap<SourceEntry, u8> = self
            .allow
            .iter()
            .flatten()
            .filter(|a| inside(&denied, a).is_none())
            .map(|a| (SourceEntry::of(a), ACL_ALLOW))
            .collect();
        entries.extend(self.deny.iter().map(|d| (SourceEntry::of(d), ACL_DENY)));
        entries
    }

    pub fn status(&self) -> AclStatus {
        let texts = |list: &[Prefix]| list.iter().map(Prefix::to_string).collect();
        AclStatus {
            allow: self.allow.as_deref().map(texts),
            deny: texts(&self.deny),
        }
    }
}

/// The ACL in `xdplb status`.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AclStatus {
    /// `None`: everyone not denied.
    pub allow: Option<Vec<String>>,
    pub deny: Vec<String>,
}

impl AclStatus {
    /// One line for the status table, or nothing without an ACL.
    pub fn line(&self) -> Option<String> {
        const SHOWN: usize = 4;
        let list = |l: &[String]| {
            let mut text = l.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
            if l.len() > SHOWN {
                text.push_str(&format!(" (+{} more)", l.len() - SHOWN));
            }
            text
        };
        let mut parts = Vec::new();
        match &self.allow {
            Some(allow) if allow.is_empty() => parts.push("allow nobody".to_string()),
            Some(allow) => parts.push(format!("allow {}", list(allow))),
            None if !self.deny.is_empty() => parts.push("allow everyone".to_string()),
            None => return None,
        }
        if !self.deny.is_empty() {
            parts.push(format!("deny {}", list(&self.deny)));
        }
        Some(format!("sources: {}", parts.join("; ")))
    }
}

fn bits(addr: IpAddr) -> (u128, u8) {
    match addr {
        IpAddr::V4(a) => ((u32::from(a) as u128) << 96, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

fn mask(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - len as u32)
    }
}

/// Whether `outer` covers every address of `inner`.
pub fn contains(outer: &Prefix, inner: &Prefix) -> bool {
    let ((o, ow), (i, iw)) = (bits(outer.addr), bits(inner.addr));
    ow == iw && outer.len <= inner.len && (o ^ i) & mask(outer.len) == 0
}

/// A prefix as (IPv6?, length, network bits), for hash lookups: with thousands of entries,
/// pairwise containment tests would cost millions of comparisons on every apply.
type Network = (bool, u8, u128);

fn network(p: &Prefix, len: u8) -> Network {
    let (addr, width) = bits(p.addr);
    (width == 128, len, addr & mask(len))
}

/// Index of each prefix of `list` by its network.
fn networks(list: &[Prefix]) -> HashMap<Network, usize> {
    list.iter()
        .enumerate()
        .map(|(i, p)| (network(p, p.len), i))
        .collect()
}

/// The index of an entry of `set` that contains `p` (itself included): one lookup per
/// possible shorter length.
fn inside(set: &HashMap<Network, usize>, p: &Prefix) -> Option<usize> {
    (0..=p.len).find_map(|len| set.get(&network(p, len)).copied())
}

/// Parses a CIDR prefix with no host bits set (a prefix with host bits is usually a typo for
/// another prefix, or an address meant as /32).
pub fn parse_network(text: &str) -> Result<Prefix, String> {
    let prefix: Prefix = text.parse()?;
    let (addr, _) = bits(prefix.addr);
    let host = addr & !mask(prefix.len);
    if host != 0 {
        let network = match prefix.addr {
            IpAddr::V4(_) => IpAddr::from(std::net::Ipv4Addr::from(
                ((addr & mask(prefix.len)) >> 96) as u32,
            )),
            IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::from(addr & mask(prefix.len))),
        };
        return Err(format!(
            "{text:?} has host bits set: write {network}/{} for the network, or {}/{} for the one address",
            prefix.len,
            prefix.addr,
            if prefix.addr.is_ipv4() { 32 } else { 128 }
        ));
    }
    Ok(prefix)
}

/// Reads `allow_sources` and `deny_sources` of a `[[vip]]` table.
pub(crate) fn read(t: &Table, p: &mut Problems) -> Result<AclSpec, Reported> {
    let allow = read_list(t, p, "allow_sources");
    let deny = read_list(t, p, "deny_sources");
    let (allow, deny) = (allow?, deny?.unwrap_or_default());
    let mut bad = None;
    let denied = networks(&deny);
    for (i, a) in allow.iter().flatten().enumerate() {
        if let Some(j) = inside(&denied, a) {
            let d = deny[j];
            bad = Some(p.report(
                t.key(&format!("allow_sources[{i}]")),
                format!(
                    "{a} lies inside deny_sources[{j}] ({d}) and deny wins, so this entry \
                     allows nobody: remove one of the two"
                ),
            ));
        }
    }
    if let Some(allow) = &allow {
        let allowed = networks(allow);
        // Every network that contains an allow entry: a deny entry among them overlaps it.
        let around_allowed: HashSet<Network> = allow
            .iter()
            .flat_map(|a| (0..=a.len).map(move |len| network(a, len)))
            .collect();
        for (j, d) in deny.iter().enumerate() {
            let overlaps =
                inside(&allowed, d).is_some() || around_allowed.contains(&network(d, d.len));
            if !overlaps {
                bad = Some(p.report(
                    t.key(&format!("deny_sources[{j}]")),
                    format!(
                        "{d} overlaps no allow_sources entry: sources outside the allow list \
                         are denied already, so this entry does nothing; remove it"
                    ),
                ));
            }
        }
    }
    match bad {
        Some(reported) => Err(reported),
        None => Ok(AclSpec { allow, deny }),
    }
}

/// All VIPs' ACL entries must fit in the one trie the data path has.
pub(crate) fn check_total(vips: &[crate::model::VipSpec], p: &mut Problems) {
    let total: usize = vips.iter().map(|v| v.acl.entries().len()).sum();
    let max = lb_common::MAX_ACL_ENTRIES as usize;
    if total > max {
        p.report(
            "vip",
            format!(
                "{total} allow_sources and deny_sources prefixes over all VIPs, more than the \
                 {max} the data path holds: merge prefixes or drop some"
            ),
        );
    }
}

/// A list of prefixes, each checked; duplicates reported.
fn read_list(t: &Table, p: &mut Problems, name: &str) -> Result<Option<Vec<Prefix>>, Reported> {
    let expected = "an array of prefixes such as [\"10.1.0.0/16\", \"2001:db8::/48\"]";
    let Some(list) = t.get(p, name, expected, Value::as_array)? else {
        return Ok(None);
    };
    let mut out: Vec<Prefix> = Vec::new();
    let mut seen: HashMap<Prefix, usize> = HashMap::new();
    let mut bad = None;
    for (i, value) in list.iter().enumerate() {
        let key = t.key(&format!("{name}[{i}]"));
        let parsed = match value.as_str() {
            Some(text) => parse_network(text),
            None => Err(format!(
                "expected a prefix string such as \"10.1.0.0/16\", found {value}"
            )),
        };
        match parsed {
            Ok(prefix) => match seen.get(&prefix) {
                Some(first) => {
                    bad = Some(p.report(
                        key,
                        format!("{prefix} is already {name}[{first}]; list each prefix once"),
                    ));
                }
                None => {
                    seen.insert(prefix, i);
                    out.push(prefix);
                }
            },
            Err(message) => bad = Some(p.report(key, message)),
        }
    }
    if out.len() > lb_common::MAX_ACL_ENTRIES as usize {
        bad = Some(p.report(
            t.key(name),
            format!(
                "{} prefixes, more than the {} the data path holds",
                out.len(),
                lb_common::MAX_ACL_ENTRIES
            ),
        ));
    }
    match bad {
        Some(reported) => Err(reported),
        None => Ok(Some(out)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn prefix(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    /// The problems of a config with one VIP carrying `vip_keys`, as `key: message` lines.
    pub(crate) fn problems(vip_keys: &str) -> Vec<String> {
        let text = format!(
            "[daemon]\ninterfaces = [\"eth0\"]\n[[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 80\n{vip_keys}"
        );
        match crate::config::parse(&text, "t.toml") {
            Ok(_) => Vec::new(),
            Err(crate::config::ConfigError::Invalid { problems, .. }) => problems
                .iter()
                .map(|p| format!("{}: {}", p.key, p.message))
                .collect(),
            Err(other) => vec![other.to_string()],
        }
    }

    /// `vip_keys` cause exactly one problem, at `key`, mentioning `message`.
    pub(crate) fn rejected(vip_keys: &str, key: &str, message: &str) {
        let problems = problems(vip_keys);
        assert!(
            problems.len() == 1
                && problems[0].starts_with(&format!("{key}: "))
                && problems[0].contains(message),
            "expected `{key}: ...{message}...`, got {problems:#?}"
        );
    }

    #[test]
    fn acl_config_is_read_and_checked_with_key_named_messages() {
        assert!(problems(
            "allow_sources = [\"10.0.0.0/8\", \"2001:db8::/32\"]\ndeny_sources = [\"10.9.0.0/16\"]\n"
        )
        .is_empty());
        rejected(
            "allow_sources = [\"10.0.0.0/8\", \"10.1.2.3/16\"]\n",
            "vip[0] (web).allow_sources[1]",
            "host bits set: write 10.1.0.0/16",
        );
        rejected(
            "deny_sources = [\"10.0.0.0/33\"]\n",
            "vip[0] (web).deny_sources[0]",
            "not a prefix length",
        );
        rejected(
            "deny_sources = [\"10.0.0.0\"]\n",
            "vip[0] (web).deny_sources[0]",
            "is not a prefix",
        );
        rejected(
            "deny_sources = \"10.0.0.0/8\"\n",
            "vip[0] (web).deny_sources",
            "expected an array of prefixes",
        );
        rejected(
            "deny_sources = [\"10.0.0.0/8\", \"10.0.0.0/8\"]\n",
            "vip[0] (web).deny_sources[1]",
            "already deny_sources[0]",
        );
        rejected(
            "allow_sources = [\"10.1.0.0/16\"]\ndeny_sources = [\"10.0.0.0/8\"]\n",
            "vip[0] (web).allow_sources[0]",
            "lies inside deny_sources[0] (10.0.0.0/8) and deny wins",
        );
        rejected(
            "allow_sources = [\"10.1.0.0/16\"]\ndeny_sources = [\"192.168.0.0/16\"]\n",
            "vip[0] (web).deny_sources[0]",
            "overlaps no allow_sources entry",
        );
    }

    #[test]
    fn thousands_of_entries_are_checked_and_written_quickly() {
        let list = |n: u32, base: u32| -> String {
            let items: Vec<String> = (0..n)
                .map(|i| format!("\"{}/32\"", std::net::Ipv4Addr::from(base + i)))
                .collect();
            format!("[{}]", items.join(", "))
        };
        // 20,000 allowed /32s, the same 20,000 denied plus 10.0.0.0/8: pairwise checks would
        // be 400 million containment tests.
        let keys = format!(
            "allow_sources = {}\ndeny_sources = {}\n",
            list(20_000, 0x0a00_0000),
            list(20_000, 0x0a00_0000).replace("]", ", \"10.0.0.0/8\"]")
        );
        let started = std::time::Instant::now();
        let problems = problems(&keys);
        assert_eq!(
            problems.len(),
            20_000,
            "every allow entry lies inside 10.0.0.0/8"
        );
        assert!(
            problems[0].contains("inside deny_sources["),
            "{}",
            problems[0]
        );
        let spec = AclSpec {
            allow: Some(prefixes_from(0x0a00_0000, 20_000)),
            deny: prefixes_from(0x0a10_0000, 20_000),
        };
        assert_eq!(spec.entries().len(), 40_000);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }

    fn prefixes_from(base: u32, n: u32) -> Vec<Prefix> {
        (0..n)
            .map(|i| Prefix {
                addr: IpAddr::from(std::net::Ipv4Addr::from(base + i)),
                len: 32,
            })
            .collect()
    }

    #[test]
    fn containment_is_per_family_and_bitwise() {
        assert!(contains(&prefix("10.0.0.0/8"), &prefix("10.1.0.0/16")));
        assert!(contains(&prefix("10.1.0.0/16"), &prefix("10.1.0.0/16")));
        assert!(!contains(&prefix("10.1.0.0/16"), &prefix("10.0.0.0/8")));
        assert!(!contains(&prefix("10.1.0.0/16"), &prefix("10.2.0.0/16")));
        assert!(contains(&prefix("0.0.0.0/0"), &prefix("192.0.2.1/32")));
        assert!(!contains(&prefix("::/0"), &prefix("192.0.2.1/32")));
        assert!(contains(
            &prefix("2001:db8::/32"),
            &prefix("2001:db8:1::/48")
        ));
    }

    #[test]
    fn host_bits_are_rejected_with_the_network_suggested() {
        assert_eq!(parse_network("10.1.0.0/16").unwrap(), prefix("10.1.0.0/16"));
        let err = parse_network("10.1.2.3/16").unwrap_err();
        assert!(
            err.contains("host bits") && err.contains("10.1.0.0/16"),
            "{err}"
        );
        let err = parse_network("2001:db8::1/64").unwrap_err();
        assert!(err.contains("2001:db8::/64"), "{err}");
        assert!(parse_network("10.1.0.0/33").is_err());
        assert!(parse_network("ten/8").is_err());
    }

    #[test]
    fn allow_entries_inside_a_deny_entry_are_not_written() {
        let spec = AclSpec {
            allow: Some(vec![prefix("10.0.0.0/8"), prefix("10.9.1.0/24")]),
            deny: vec![prefix("10.9.0.0/16")],
        };
        let entries = spec.entries();
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert_eq!(entries[&SourceEntry::of(&prefix("10.0.0.0/8"))], ACL_ALLOW);
        assert_eq!(entries[&SourceEntry::of(&prefix("10.9.0.0/16"))], ACL_DENY);
        assert_eq!(spec.filter_flags(), FILTER_ACL | FILTER_ALLOW_LIST);
        assert_eq!(AclSpec::default().filter_flags(), 0);
    }

    #[test]
    fn ipv4_entries_are_mapped_into_the_ipv6_space() {
        let e = SourceEntry::of(&prefix("10.1.0.0/16"));
        assert_eq!(e.len, 32 + 96 + 16);
        assert_eq!(&e.addr[10..14], &[0xff, 0xff, 10, 1]);
        let key = e.key(7);
        assert_eq!(SourceEntry::from_key(&key), (7, e));
        let e6 = SourceEntry::of(&prefix("2001:db8::/32"));
        assert_eq!(e6.len, 64);
    }
}
