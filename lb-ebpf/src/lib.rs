#![no_std]
// Exists so lb-userspace can depend on this crate from its build script; the programs are in
// the `lb-ebpf` binary target (src/main.rs).
