//! The connection log's admin requests: the model and the reader live in [`crate::connlog`].

use super::Daemon;
use crate::{api::Response, connlog::Filter};
use tokio::sync::mpsc;

impl Daemon {
    /// `--vip` by a configured VIP's name or address; any other name is taken as given, so
    /// records of a VIP removed since can still be asked for.
    pub(super) fn log_filter(&self, vip: Option<String>, event: Option<String>) -> Filter {
        let vip = vip.map(|v| self.find_vip(&v).map_or(v, |spec| spec.name.clone()));
        Filter { vip, event }
    }

    /// `xdplb log --follow`: the last `limit` records, then those from now on.
    pub(super) fn follow_log(
        &self,
        vip: Option<String>,
        event: Option<String>,
        limit: usize,
    ) -> mpsc::Receiver<Response> {
        self.connlog.follow(self.log_filter(vip, event), limit)
    }

    /// SIGHUP / `xdplb reload`: the file again at the configured path (logrotate).
    pub(super) fn reopen_log(&self) {
        self.connlog.configure(self.config.daemon.log.as_ref());
    }
}
