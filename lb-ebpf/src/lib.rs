#![no_std]
//! Shared by the binaries of this crate: `lb-ebpf` (src/main.rs, the load balancer and decap
//! programs) and the benchmark baselines in src/bin/. lb-userspace's build script names this
//! crate as a build dependency, so cargo rebuilds the objects when the kernel code changes.

/// What every XDP object needs besides its programs: a panic handler (unreachable: the
/// verifier rejects any program with a reachable panic path) and the license section.
#[macro_export]
macro_rules! object_boilerplate {
    () => {
        #[cfg(not(test))]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            loop {}
        }

        #[link_section = "license"]
        #[no_mangle]
        static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
    };
}
