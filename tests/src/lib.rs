//! Test support for xdplb's root integration tests: a packet builder and the fixture runner.
pub mod bird;
pub mod fixture;
pub mod harness;
pub mod lab;
pub mod packet;
pub mod pki;
