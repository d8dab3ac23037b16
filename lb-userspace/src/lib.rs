//! xdplb userspace: everything but the per-packet work.
//!
//! * [`maglev`]: consistent-hashing tables (pure).
//! * [`dataplane`]: the kernel object, its maps and programs (the only map writer).

pub mod dataplane;
pub mod maglev;
