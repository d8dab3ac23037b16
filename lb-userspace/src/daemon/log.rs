//! The connection log's admin requests: the model and the reader live in [`crate::connlog`].

use super::Daemon;
use crate::{
    api::{Reply, Response},
    connlog::{Entry, Filter},
};
use anyhow::{bail, Result};

impl Daemon {
    fn log_on(&self) -> Result<()> {
        if self.config.daemon.log.is_none() {
            bail!(
                "the connection log is off: add a [daemon.log] section to {} and reload",
                self.config_path.display()
            );
        }
        Ok(())
    }

    /// `xdplb log`: the last `limit` records.
    pub(super) fn log_records(
        &self,
        vip: Option<String>,
        event: Option<String>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        self.log_on()?;
        Ok(self.connlog.recent(&self.log_filter(vip, event), limit))
    }

    /// `--vip` by a configured VIP's name or address; any other name is taken as given, so
    /// records of a VIP removed since can still be asked for.
    fn log_filter(&self, vip: Option<String>, event: Option<String>) -> Filter {
        let vip = vip.map(|v| self.find_vip(&v).map_or(v, |spec| spec.name.clone()));
        Filter { vip, event }
    }

    /// `xdplb log --follow`: the last `limit` records, then those from now on.
    pub(super) fn follow_log(
        &self,
        vip: Option<String>,
        event: Option<String>,
        limit: usize,
    ) -> Reply {
        match self.log_on() {
            Ok(()) => Reply::Stream(self.connlog.follow(self.log_filter(vip, event), limit)),
            Err(e) => Reply::One(Response::Error(format!("{e:#}"))),
        }
    }

    /// SIGHUP / `xdplb reload`: the file again at the configured path (logrotate).
    pub(super) fn reopen_log(&self) {
        self.connlog.configure(self.config.daemon.log.as_ref());
    }
}
