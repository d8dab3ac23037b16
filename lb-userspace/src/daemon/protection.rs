//! The runtime blocklist's admin requests and expiry: the model lives in [`crate::blocklist`];
//! this is where a change is applied through the daemon's one state path and saved.

use super::Daemon;
use crate::blocklist::{self, BlockInfo, Blocklist, BlocklistError};
use crate::model::Prefix;
use anyhow::Result;
use std::time::Duration;

impl Daemon {
    pub(super) fn block_add(
        &mut self,
        prefix: Prefix,
        vip: Option<String>,
        for_s: Option<u64>,
        reason: Option<String>,
    ) -> Result<String> {
        let vip = self.vip_name(vip)?;
        let duration = for_s.map(Duration::from_secs);
        let now = blocklist::unix_now();
        self.change_blocklist(|b| b.add(prefix, vip, duration, reason, now))
    }

    pub(super) fn block_del(&mut self, prefix: Prefix, vip: Option<String>) -> Result<String> {
        let vip = self.vip_name(vip)?;
        self.change_blocklist(|b| b.remove(prefix, vip))
    }

    /// The configured name of a VIP given by name or address (`None` stays `None`: every VIP).
    fn vip_name(&self, vip: Option<String>) -> Result<Option<String>> {
        vip.map(|v| self.find_vip(&v).map(|spec| spec.name.clone()))
            .transpose()
    }

    /// Changes the blocklist, applies it (rolling back if that fails) and saves it.
    fn change_blocklist(
        &mut self,
        change: impl FnOnce(&mut Blocklist) -> Result<String, BlocklistError>,
    ) -> Result<String> {
        let before = self.blocklist.clone();
        let message = change(&mut self.blocklist)?;
        if let Err(e) = self.apply() {
            self.blocklist = before;
            return Err(e);
        }
        self.blocklist.save(&self.config.daemon.state_dir)?;
        Ok(message)
    }

    /// Removes blocklist entries whose time is up (called every second).
    pub(super) fn expire_blocks(&mut self) -> Result<()> {
        if self.blocklist.expire(blocklist::unix_now()) {
            self.apply()?;
            self.blocklist.save(&self.config.daemon.state_dir)?;
        }
        Ok(())
    }

    pub(super) fn block_rows(&self) -> Result<Vec<BlockInfo>> {
        let vip_id = |name: &str| {
            let vip = self.live.vips.values().find(|v| v.name == name)?;
            Some(vip.meta.vip_id)
        };
        let written = self.dataplane.blocklist()?;
        Ok(self.blocklist.rows(blocklist::unix_now(), &written, vip_id))
    }
}
