//! xdplb userspace: everything but the per-packet work.
//!
//! * [`config`]: TOML -> validated [`model`] (every problem named with its key).
//! * [`maglev`]: consistent-hashing tables (pure); [`scheduler`]: what each scheduler puts
//!   in a VIP's ring area, and least-conn count reconciliation (pure).
//! * [`state`]: desired state -> diff -> ordered map writes (the only place state changes).
//! * [`dataplane`]: the kernel object, its maps and programs (the only map writer).
//! * [`net`]: next hops toward backends (routes, neighbours, interfaces); [`netlink`]: the
//!   rtnetlink requests behind it; [`nexthops`]: their cache, looked up outside the daemon's
//!   lock.
//! * [`announce`]: VIP routes for a BGP daemon, gated by health.
//! * [`links`]: interface events over rtnetlink; [`attachments`]: the program kept on the
//!   configured interfaces.
//! * [`health`]: health checks and their state machines.
//! * [`overrides`]: drains and CLI weights, persisted ([`persist`]).
//! * [`acl`], [`blocklist`], [`limits`], [`flood`]: edge protection (source ACLs, the runtime
//!   blocklist, new-flow limits, the flow table's flood defence).
//! * [`connlog`]: the connection log (records from the data path's ring buffer, decoded,
//!   written as JSON lines and streamed to `xdplb log`).
//! * [`stats`], [`metrics`]: counters, rates, Prometheus export; [`flowscan`]: active flows
//!   per backend, and when a drain is complete.
//! * [`daemon`]: `xdplb run`, tying the above together; [`api`]: its admin socket protocol;
//!   [`cli`], [`watch`]: the command line.

pub mod acl;
pub mod announce;
pub mod api;
pub mod attachments;
pub mod blocklist;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connlog;
pub mod daemon;
pub mod dataplane;
pub mod flood;
pub mod flowscan;
pub mod health;
pub mod limits;
pub mod links;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod net;
pub mod netlink;
pub mod nexthops;
pub mod overrides;
pub mod persist;
pub mod scheduler;
pub mod state;
pub mod stats;
pub mod watch;
