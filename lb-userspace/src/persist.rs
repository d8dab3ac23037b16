//! Runtime state files in `state_dir` (drains and CLI weights, the blocklist): JSON, where a
//! missing file means "nothing yet", saved durably so a crash or a power loss leaves the old
//! file or the new one, never a torn one.

use serde::{de::DeserializeOwned, Serialize};
use std::{
    io::{self, Write},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not valid ({source}); fix or remove it ({holds} are stored there)")]
    Parse {
        path: PathBuf,
        holds: &'static str,
        source: serde_json::Error,
    },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// Reads `state_dir/file_name`; `holds` says what the file keeps, for the error message.
pub fn load<T: DeserializeOwned + Default>(
    state_dir: &Path,
    file_name: &str,
    holds: &'static str,
) -> Result<T, PersistError> {
    let path = state_dir.join(file_name);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|source| PersistError::Parse {
            path,
            holds,
            source,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(PersistError::Read { path, source }),
    }
}

/// Like [`load`], but a file that cannot be read or parsed (a power loss before its writes
/// were synced, a disk error, a hand edit) must not keep the load balancer down: it is renamed
/// to `<file_name>.unreadable-<unix time>` for the operator to inspect, and the default is
/// used. Returns the warning for a loud log line (`lost` says what the daemon runs without);
/// fails only when the file cannot even be moved aside.
pub fn load_or_set_aside<T: DeserializeOwned + Default>(
    state_dir: &Path,
    file_name: &str,
    holds: &'static str,
    lost: &str,
) -> Result<(T, Option<String>), PersistError> {
    let error = match load(state_dir, file_name, holds) {
        Ok(value) => return Ok((value, None)),
        Err(error) => error,
    };
    let path = state_dir.join(file_name);
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = state_dir.join(format!("{file_name}.unreadable-{seconds}"));
    std::fs::rename(&path, &aside).map_err(|source| PersistError::Write {
        path: path.clone(),
        source,
    })?;
    Ok((
        T::default(),
        Some(format!(
            "{error}; moved it to {} and starting WITHOUT {lost}",
            aside.display()
        )),
    ))
}

/// Writes a temporary file, syncs it, renames it over `state_dir/file_name` and syncs the
/// directory, so the rename itself is on disk too.
pub fn save<T: Serialize>(
    state_dir: &Path,
    file_name: &str,
    value: &T,
) -> Result<(), PersistError> {
    let path = state_dir.join(file_name);
    let write_err = |source| PersistError::Write {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(write_err)?;
    let tmp = state_dir.join(format!("{file_name}.tmp"));
    let text = serde_json::to_string_pretty(value).expect("plain data serializes");
    let mut file = std::fs::File::create(&tmp).map_err(write_err)?;
    file.write_all(text.as_bytes()).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    std::fs::rename(&tmp, &path).map_err(write_err)?;
    std::fs::File::open(state_dir)
        .and_then(|dir| dir.sync_all())
        .map_err(write_err)
}
