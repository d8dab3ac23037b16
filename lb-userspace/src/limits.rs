//! New-flow limits of a VIP (`[vip.limits]`): the config model and its checks, the GCRA
//! parameters the state path writes into `VIP_LIMITS`, and the status rows.
//!
//! Only a packet that would start a new flow is limited; packets of flows in the flow table
//! never are. Per source (per client address; IPv6 clients per /64) and per VIP.

use crate::config::{Problems, Reported, Table};
use lb_common::VipLimits;
use serde::{Deserialize, Serialize};

const KEYS: &[&str] = &["new_flows_per_source", "new_flows_burst", "new_flows_total"];
/// Beyond this a limit is no longer a limit for one client (10 million new flows/s).
const MAX_RATE: u32 = 10_000_000;
const NS_PER_S: u64 = 1_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsSpec {
    /// New flows per second per client address (IPv6: per /64).
    pub per_source: Option<u32>,
    /// New flows a source may open at once; defaults to one second's worth.
    pub burst: Option<u32>,
    /// New flows per second for the whole VIP (bursts of one second's worth).
    pub total: Option<u32>,
}

impl LimitsSpec {
    /// GCRA parameters: interval = 1 s / rate, tolerance = burst intervals.
    pub fn vip_limits(&self) -> VipLimits {
        let gcra = |rate: Option<u32>, burst: Option<u32>| match rate {
            Some(rate) => {
                let interval = NS_PER_S / u64::from(rate);
                (interval, interval * u64::from(burst.unwrap_or(rate)))
            }
            None => (0, 0),
        };
        let (source_interval_ns, source_tolerance_ns) = gcra(self.per_source, self.burst);
        let (total_interval_ns, total_tolerance_ns) = gcra(self.total, None);
        VipLimits {
            source_interval_ns,
            source_tolerance_ns,
            total_interval_ns,
            total_tolerance_ns,
            total_tat_ns: 0,
        }
    }

    /// One line for the status table.
    pub fn line(&self) -> String {
        let mut parts = Vec::new();
        if let Some(rate) = self.per_source {
            parts.push(format!(
                "{rate} new flows/s per source (burst {})",
                self.burst.unwrap_or(rate)
            ));
        }
        if let Some(total) = self.total {
            parts.push(format!("{total} new flows/s in total"));
        }
        format!("limits: {}", parts.join(", "))
    }
}

/// Reads the optional `[vip.limits]` table of a VIP.
pub(crate) fn read(vip: &Table, p: &mut Problems) -> Result<Option<LimitsSpec>, Reported> {
    let Some(t) = vip.table(p, "limits", "[vip.limits]")? else {
        return Ok(None);
    };
    t.reject_unknown(p, KEYS);
    let per_source = t.int(p, "new_flows_per_source", 1..=MAX_RATE);
    let burst = t.int(p, "new_flows_burst", 1..=MAX_RATE);
    let total = t.int(p, "new_flows_total", 1..=MAX_RATE);
    let (per_source, burst, total) = (per_source?, burst?, total?);
    if burst.is_some() && per_source.is_none() {
        return Err(p.report(
            t.key("new_flows_burst"),
            "is the burst of new_flows_per_source, which is not set: set it too, or remove this",
        ));
    }
    if per_source.is_none() && total.is_none() {
        return Err(p.report(
            vip.key("limits"),
            "sets no limit: give new_flows_per_source and/or new_flows_total, or remove the table",
        ));
    }
    Ok(Some(LimitsSpec {
        per_source,
        burst,
        total,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::acl::tests::rejected;

    #[test]
    fn limits_config_is_read_and_checked_with_key_named_messages() {
        let ok = "[vip.limits]\nnew_flows_per_source = 10\nnew_flows_burst = 20\nnew_flows_total = 1000\n";
        assert!(crate::acl::tests::problems(ok).is_empty());
        rejected(
            "[vip.limits]\nnew_flows_per_source = 0\n",
            "vip[0] (web).limits.new_flows_per_source",
            "0 is too small: use at least 1",
        );
        rejected(
            "[vip.limits]\nnew_flows_total = 0\n",
            "vip[0] (web).limits.new_flows_total",
            "too small",
        );
        rejected(
            "[vip.limits]\nnew_flows_burst = 5\n",
            "vip[0] (web).limits.new_flows_burst",
            "new_flows_per_source, which is not set",
        );
        rejected("[vip.limits]\n", "vip[0] (web).limits", "sets no limit");
        rejected(
            "[vip.limits]\nnew_flows_total = 5\nnew_flows = 5\n",
            "vip[0] (web).limits.new_flows",
            "unknown key in [vip.limits]",
        );
    }

    #[test]
    fn rates_become_gcra_intervals() {
        let spec = LimitsSpec {
            per_source: Some(10),
            burst: Some(20),
            total: Some(1000),
        };
        let l = spec.vip_limits();
        assert_eq!(l.source_interval_ns, 100_000_000);
        assert_eq!(l.source_tolerance_ns, 2_000_000_000);
        assert_eq!(l.total_interval_ns, 1_000_000);
        assert_eq!(l.total_tolerance_ns, 1_000_000_000);
        let only_total = LimitsSpec {
            per_source: None,
            burst: None,
            total: Some(4),
        };
        assert_eq!(
            only_total.vip_limits().source_interval_ns,
            0,
            "0 = no limit"
        );
        assert_eq!(
            spec.line(),
            "limits: 10 new flows/s per source (burst 20), 1000 new flows/s in total"
        );
    }

    #[test]
    fn gcra_admits_the_burst_then_the_rate() {
        let l = LimitsSpec {
            per_source: Some(10),
            burst: Some(3),
            total: None,
        }
        .vip_limits();
        let (interval, tolerance) = (l.source_interval_ns, l.source_tolerance_ns);
        let mut tat = 0;
        let now = 5 * NS_PER_S;
        for i in 0..3 {
            tat = lb_common::gcra(tat, now, interval, tolerance)
                .unwrap_or_else(|| panic!("burst packet {i} refused"));
        }
        assert_eq!(lb_common::gcra(tat, now, interval, tolerance), None);
        assert!(lb_common::gcra(tat, now + interval, interval, tolerance).is_some());
    }
}
