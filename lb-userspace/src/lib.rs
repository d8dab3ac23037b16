//! xdplb userspace: everything but the per-packet work.
//!
//! * [`maglev`]: consistent-hashing tables (pure).
//! * [`model`]: the validated service model.
//! * [`state`]: desired state -> diff -> ordered map writes (the only place state changes).
//! * [`dataplane`]: the kernel object, its maps and programs (the only map writer).

pub mod config;
pub mod dataplane;
pub mod maglev;
pub mod model;
pub mod net;
pub mod overrides;
pub mod state;
