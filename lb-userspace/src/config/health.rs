//! The `[vip.health]` tables: which check, its timing and its HTTP and TLS settings.

use super::{table::format_duration, Problems, Reported, Table};
use crate::model::{CheckKind, HealthSpec, OnAllDown, TlsSpec};
use std::{net::IpAddr, path::Path};
use toml::Value;

const HEALTH_KEYS: &[&str] = &[
    "kind",
    "port",
    "path",
    "expect_status",
    "host",
    "tls_verify",
    "tls_ca",
    "interval",
    "timeout",
    "rise",
    "fall",
    "on_all_down",
];
const HTTP_KEYS: &[&str] = &["path", "expect_status", "host"];
const TLS_KEYS: &[&str] = &["tls_verify", "tls_ca"];

const ON_ALL_DOWN: [(&str, OnAllDown); 2] = [("keep", OnAllDown::Keep), ("drop", OnAllDown::Drop)];

/// `[vip.health] kind`, read before the keys that depend on it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    None,
    Tcp,
    Http,
    Https,
}
const KINDS: [(&str, Kind); 4] = [
    ("none", Kind::None),
    ("tcp", Kind::Tcp),
    ("http", Kind::Http),
    ("https", Kind::Https),
];

pub(super) fn read_health(t: &Table, p: &mut Problems) -> Result<HealthSpec, Reported> {
    t.reject_unknown(p, HEALTH_KEYS);
    let defaults = HealthSpec::default();
    let kind = match t.choice(p, "kind", &KINDS) {
        Ok(Some(Kind::Http)) => {
            let tls = reject_keys(t, p, TLS_KEYS, &["https"]).map(|()| None);
            read_http(t, p, tls)
        }
        Ok(Some(Kind::Https)) => {
            let tls = read_tls(t, p).map(Some);
            read_http(t, p, tls)
        }
        Ok(Some(Kind::Tcp)) => reject_http_keys(t, p, CheckKind::Tcp),
        Ok(None | Some(Kind::None)) => reject_http_keys(t, p, CheckKind::None),
        Err(reported) => Err(reported),
    };
    // Port 0 cannot be probed.
    let port = t.int(p, "port", 1..=u16::MAX);
    let interval = t
        .duration(p, "interval")
        .map(|d| d.unwrap_or(defaults.interval));
    let timeout = t
        .duration(p, "timeout")
        .map(|d| d.unwrap_or(defaults.timeout));
    if let (Ok(interval), Ok(timeout)) = (interval, timeout) {
        if timeout >= interval {
            p.report(
                t.key("timeout"),
                format!(
                    "{} is not shorter than interval ({}): a check must end before the next \
                     one starts; lower timeout or raise interval",
                    format_duration(timeout),
                    format_duration(interval)
                ),
            );
        }
    }
    let rise = t
        .int(p, "rise", 1..=u32::MAX)
        .map(|n| n.unwrap_or(defaults.rise));
    let fall = t
        .int(p, "fall", 1..=u32::MAX)
        .map(|n| n.unwrap_or(defaults.fall));
    let on_all_down = t
        .choice(p, "on_all_down", &ON_ALL_DOWN)
        .map(Option::unwrap_or_default);
    Ok(HealthSpec {
        kind: kind?,
        port: port?,
        interval: interval?,
        timeout: timeout?,
        rise: rise?,
        fall: fall?,
        on_all_down: on_all_down?,
    })
}

/// HTTP settings under another kind would silently do nothing, which hides a mistake.
fn reject_http_keys(t: &Table, p: &mut Problems, kind: CheckKind) -> Result<CheckKind, Reported> {
    let http = reject_keys(t, p, HTTP_KEYS, &["http", "https"]);
    let tls = reject_keys(t, p, TLS_KEYS, &["https"]);
    http.and(tls).map(|()| kind)
}

/// Reports each of `keys` present in `t`: only the check kinds `used_by` use them.
fn reject_keys(
    t: &Table,
    p: &mut Problems,
    keys: &[&str],
    used_by: &[&str],
) -> Result<(), Reported> {
    let kinds: Vec<String> = used_by.iter().map(|kind| format!("{kind:?}")).collect();
    let mut result = Ok(());
    for name in keys.iter().filter(|name| t.table.contains_key(**name)) {
        result = Err(p.report(
            t.key(name),
            format!(
                "{name} is only used by kind = {}; remove it or set kind = {}",
                kinds.join(" or "),
                kinds[0]
            ),
        ));
    }
    result
}

/// `tls_verify` and `tls_ca` of an `https` check. The CA file is read and parsed now, so a
/// bad one is a config error (a reload keeps the running config) rather than failing checks.
fn read_tls(t: &Table, p: &mut Problems) -> Result<TlsSpec, Reported> {
    let verify = t
        .get(p, "tls_verify", "true or false", Value::as_bool)
        .map(|v| v.unwrap_or(false));
    let ca = match verify {
        Ok(false) if t.table.contains_key("tls_ca") => Err(p.report(
            t.key("tls_ca"),
            "is only used with tls_verify = true; set tls_verify = true to verify the backends \
             against it, or remove tls_ca",
        )),
        _ => t.parsed(p, "tls_ca", |path| {
            if !Path::new(path).is_absolute() {
                return Err(format!(
                    "{path:?} is not an absolute path; start it with '/'"
                ));
            }
            crate::health::load_ca(Path::new(path))
        }),
    };
    Ok(TlsSpec {
        verify: verify?,
        ca: ca?,
    })
}

fn read_http(
    t: &Table,
    p: &mut Problems,
    tls: Result<Option<TlsSpec>, Reported>,
) -> Result<CheckKind, Reported> {
    let path = t
        .parsed(p, "path", |path| {
            if path.starts_with('/') {
                request_safe(path, "percent-encode them (e.g. %20 for a space)")
            } else {
                Err(format!("{path:?} does not start with '/'"))
            }
        })
        .map(|path| path.unwrap_or_else(|| "/".to_string()));
    let expect_status = t
        .int(p, "expect_status", 100..=599)
        .map(|status| status.unwrap_or(200));
    let host = t.parsed(p, "host", |host| {
        if host.is_empty() {
            Err("empty; leave the key out to send the backend's address".to_string())
        } else {
            request_safe(host, "remove them")
        }
    });
    if let (Ok(Some(_)), Ok(Some(host))) = (&tls, &host) {
        if let Err(message) = crate::health::server_name(Some(host), IpAddr::from([0, 0, 0, 0])) {
            return Err(p.report(t.key("host"), message));
        }
    }
    Ok(CheckKind::Http {
        path: path?,
        expect_status: expect_status?,
        host: host?,
        tls: tls?,
    })
}

/// The path and the host go into the request verbatim, where whitespace or control
/// characters would break it or inject into it.
fn request_safe(text: &str, advice: &str) -> Result<String, String> {
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(format!(
            "{text:?} contains whitespace or control characters, which would break the HTTP \
             request; {advice}"
        ))
    } else {
        Ok(text.to_string())
    }
}
