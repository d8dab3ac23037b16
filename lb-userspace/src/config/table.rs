//! The TOML reading toolkit: [`Table`] reads one table key by key, recording each
//! [`Problem`] under its key path.

use super::Problem;
use std::{
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};
use toml::Value;

/// Marks a value that was invalid: its problem is already recorded, so callers only skip
/// whatever depends on it.
#[derive(Clone, Copy)]
pub(crate) struct Reported;

/// A key's value: `Ok(None)` when the key is absent, `Err` when it is invalid.
pub(crate) type Field<T> = Result<Option<T>, Reported>;

#[derive(Default)]
pub(crate) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(crate) fn report(
        &mut self,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Reported {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
        Reported
    }
}

/// One TOML table being read, with the key path its problems are reported under.
pub(crate) struct Table<'a> {
    pub(super) table: &'a toml::Table,
    /// Key path of the table: "" at the top level, `daemon`, `vip[0] (web).health`.
    pub(super) path: String,
    /// How messages name it: `[daemon]`, `[[vip]]`.
    pub(super) header: &'static str,
}

impl<'a> Table<'a> {
    pub(crate) fn key(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    pub(crate) fn child(
        &self,
        name: &str,
        table: &'a toml::Table,
        header: &'static str,
    ) -> Table<'a> {
        Table {
            table,
            path: self.key(name),
            header,
        }
    }

    /// A misspelt key would otherwise be ignored silently and its default used instead.
    pub(crate) fn reject_unknown(&self, p: &mut Problems, known: &[&str]) {
        for name in self.table.keys() {
            if !known.contains(&name.as_str()) {
                p.report(
                    self.key(name),
                    format!(
                        "unknown key in {}; the keys there are: {}",
                        self.header,
                        known.join(", ")
                    ),
                );
            }
        }
    }

    pub(crate) fn get<T>(
        &self,
        p: &mut Problems,
        name: &str,
        expected: &str,
        cast: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Field<T> {
        let Some(value) = self.table.get(name) else {
            return Ok(None);
        };
        match cast(value) {
            Some(v) => Ok(Some(v)),
            None => Err(p.report(
                self.key(name),
                format!("expected {expected}, found {}", describe(value)),
            )),
        }
    }

    /// A string that `parse` turns into a value or into a problem message.
    pub(crate) fn parsed<T>(
        &self,
        p: &mut Problems,
        name: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Field<T> {
        let Some(text) = self.get(p, name, "a string", Value::as_str)? else {
            return Ok(None);
        };
        parse(text)
            .map(Some)
            .map_err(|message| p.report(self.key(name), message))
    }

    pub(crate) fn int<T>(&self, p: &mut Problems, name: &str, range: RangeInclusive<T>) -> Field<T>
    where
        T: TryFrom<i64> + Into<i64> + PartialOrd + Copy,
    {
        let Some(value) = self.get(p, name, "an integer", Value::as_integer)? else {
            return Ok(None);
        };
        match T::try_from(value) {
            Ok(v) if range.contains(&v) => Ok(Some(v)),
            _ => {
                let (min, max): (i64, i64) = ((*range.start()).into(), (*range.end()).into());
                let message = if value < min {
                    format!("{value} is too small: use at least {min}")
                } else {
                    format!("{value} is too large: use at most {max}")
                };
                Err(p.report(self.key(name), message))
            }
        }
    }

    pub(super) fn choice<T: Copy>(
        &self,
        p: &mut Problems,
        name: &str,
        options: &[(&str, T)],
    ) -> Field<T> {
        self.parsed(p, name, |text| {
            options
                .iter()
                .find(|(option, _)| *option == text)
                .map(|(_, value)| *value)
                .ok_or_else(|| {
                    let names: Vec<String> =
                        options.iter().map(|(o, _)| format!("{o:?}")).collect();
                    format!("{text:?} is not one of {}", names.join(", "))
                })
        })
    }

    /// Every duration here must be positive: zero would be a busy loop or an instant timeout.
    pub(crate) fn duration(&self, p: &mut Problems, name: &str) -> Field<Duration> {
        let expected = "a duration string such as \"500ms\" or \"5s\"";
        let Some(text) = self.get(p, name, expected, Value::as_str)? else {
            return Ok(None);
        };
        match parse_duration(text) {
            Ok(duration) if !duration.is_zero() => Ok(Some(duration)),
            Ok(_) => Err(p.report(self.key(name), "must be longer than zero")),
            Err(message) => Err(p.report(self.key(name), message)),
        }
    }

    /// Paths must be absolute: a relative one would depend on the working directory the daemon
    /// (or, for the admin socket, the CLI) happens to start in.
    pub(super) fn abs_path(
        &self,
        p: &mut Problems,
        name: &str,
        default: &str,
    ) -> Result<PathBuf, Reported> {
        match self.get(p, name, "a path string", Value::as_str)? {
            None => Ok(PathBuf::from(default)),
            Some(text) if Path::new(text).is_absolute() => Ok(PathBuf::from(text)),
            Some(text) => Err(p.report(
                self.key(name),
                format!("{text:?} is not an absolute path; start it with '/'"),
            )),
        }
    }

    /// `field`'s value, reporting it as missing (with `hint` saying what to add) when absent.
    pub(super) fn require<T>(
        &self,
        field: Field<T>,
        p: &mut Problems,
        name: &str,
        hint: &str,
    ) -> Result<T, Reported> {
        field?.ok_or_else(|| p.report(self.key(name), format!("missing; {hint}")))
    }

    /// A `[name]` sub-table.
    pub(crate) fn table(
        &self,
        p: &mut Problems,
        name: &str,
        header: &'static str,
    ) -> Field<Table<'a>> {
        let expected = format!("a table ({header})");
        let table = self.get(p, name, &expected, Value::as_table)?;
        Ok(table.map(|table| self.child(name, table, header)))
    }

    /// The entries of a `[[name]]` array of tables (none when absent).
    pub(super) fn tables(
        &self,
        p: &mut Problems,
        name: &str,
        header: &str,
    ) -> Result<Vec<Result<&'a toml::Table, Reported>>, Reported> {
        let expected = format!("an array of tables ({header})");
        let Some(list) = self.get(p, name, &expected, Value::as_array)? else {
            return Ok(Vec::new());
        };
        Ok(list
            .iter()
            .enumerate()
            .map(|(i, value)| {
                value.as_table().ok_or_else(|| {
                    p.report(
                        format!("{}[{i}]", self.key(name)),
                        format!("expected a table ({header}), found {}", describe(value)),
                    )
                })
            })
            .collect())
    }
}

/// A value's type, and the value itself unless it is a table or an array, for type errors.
pub(super) fn describe(value: &Value) -> String {
    match value {
        Value::Table(_) => "a table".to_string(),
        Value::Array(_) => "an array".to_string(),
        Value::Integer(_) => format!("an integer ({value})"),
        _ => format!("a {} ({value})", value.type_str()),
    }
}

/// Parses the duration syntax of the file (also used for CLI arguments): whole numbers with
/// a unit, optionally chained: `500ms`, `5s`, `5m`, `2h`, `1m30s`. Zero is accepted here; the
/// file's keys additionally require a positive duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{text:?} is not a duration: write whole numbers with a unit (ms, s, m, h), \
             e.g. \"500ms\", \"5s\", \"5m\" or \"1m30s\""
        )
    };
    if text.is_empty() {
        return Err(bad());
    }
    let mut millis: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_end = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .map_or(rest.len(), |i| digits + i);
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        let scale = match &rest[digits..unit_end] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad()),
        };
        millis = number
            .checked_mul(scale)
            .and_then(|part| millis.checked_add(part))
            .ok_or_else(bad)?;
        rest = &rest[unit_end..];
    }
    Ok(Duration::from_millis(millis))
}

/// The largest unit that divides `duration` exactly, in the syntax [`parse_duration`] reads.
pub(super) fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    let (unit, scale) = [("h", 3_600_000), ("m", 60_000), ("s", 1_000)]
        .into_iter()
        .find(|(_, scale)| millis.is_multiple_of(*scale))
        .unwrap_or(("ms", 1));
    format!("{}{unit}", millis / scale)
}
