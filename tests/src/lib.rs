//! Test support for xdplb's root integration tests: a packet builder and the fixture runner.
pub mod harness;
pub mod lab;
pub mod packet;
