//! The data path reads its clock through `jiffies` (one inlined load instead of a helper
//! call per packet) and converts with two numbers only userspace can measure: the tick rate
//! and where `jiffies` stood at `CLOCK_MONOTONIC` 0. They are measured once, when the object
//! is loaded, and written with the data path's config ([`lb_common::LbConfig`]).

use aya::{
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use lb_common::program_names;

/// The data path's clock parameters ([`lb_common::LbConfig::jiffies_per_second`] and
/// [`lb_common::LbConfig::jiffies_at_zero`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelClock {
    pub jiffies_per_second: u32,
    pub jiffies_at_zero: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("program xdplb_clock: {0}")]
    Program(#[source] ProgramError),
    #[error("the object has no program xdplb_clock (rebuild lb-ebpf and lb-userspace together)")]
    Missing,
    #[error("program xdplb_clock: unexpected result {0} (a kernel without bpf_jiffies64?)")]
    Result(u32),
}

/// Loads and runs `xdplb_clock` once: `jiffies` and `CLOCK_MONOTONIC_COARSE` read together in
/// the kernel, and the tick period from `clock_getres(CLOCK_MONOTONIC_COARSE)` (one jiffy).
pub fn measure(ebpf: &mut Ebpf) -> Result<KernelClock, ClockError> {
    let program: &mut Xdp = ebpf
        .program_mut(program_names::CLOCK)
        .ok_or(ClockError::Missing)?
        .try_into()
        .map_err(ClockError::Program)?;
    program.load().map_err(ClockError::Program)?;
    // An Ethernet header's worth of bytes (the least a test run accepts); the program writes
    // its two readings over the first 16.
    let frame = [0u8; 16];
    let mut out = [0u8; 16];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..TestRunOptions::default()
        })
        .map_err(ClockError::Program)?;
    const XDP_PASS: u32 = 2;
    if result.return_value != XDP_PASS {
        return Err(ClockError::Result(result.return_value));
    }
    let word = |i: usize| u64::from_ne_bytes(out[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let (jiffies_per_second, jiffies_at_zero) =
        lb_common::clock_params(tick_ns(), word(0), word(1));
    Ok(KernelClock {
        jiffies_per_second,
        jiffies_at_zero,
    })
}

/// One jiffy in ns: the resolution of the coarse clocks, which advance once per tick, and of
/// the connection log's record times.
pub fn tick_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE exists on every
    // Linux this program loads on.
    unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use lb_common::{clock_params, jiffies_to_ns, jiffies_to_seconds, whole_ns_per_jiffy};

    #[test]
    fn jiffies_convert_to_the_monotonic_seconds_they_were_measured_with() {
        // HZ = 250 (4 ms ticks); jiffies start 5 minutes before wrapping 32 bits.
        let (hz, at_zero) = clock_params(
            4_000_000,
            4_294_967_296 - 300 * 250 + 12_345,
            49_380_000_000,
        );
        assert_eq!(hz, 250);
        // 49.38 s after monotonic 0, jiffies had counted 12,345 ticks.
        assert_eq!(at_zero, 4_294_967_296 - 300 * 250 + 12_345 - 12_345);
        assert_eq!(jiffies_to_seconds(at_zero + 12_345, hz, at_zero), Some(49));
        // An hour later.
        assert_eq!(
            jiffies_to_seconds(at_zero + 12_345 + 3600 * 250, hz, at_zero),
            Some(3649)
        );
        assert_eq!(
            jiffies_to_seconds(at_zero, 0, at_zero),
            None,
            "not measured yet"
        );
    }

    #[test]
    fn jiffies_convert_to_monotonic_ns_at_the_tick_resolution() {
        // HZ = 300: a tick is not a whole number of ns.
        let at_zero = u64::MAX - 10;
        assert_eq!(
            jiffies_to_ns(
                at_zero.wrapping_add(1),
                300,
                at_zero,
                whole_ns_per_jiffy(300)
            ),
            Some(3_333_333)
        );
        assert_eq!(
            jiffies_to_ns(at_zero.wrapping_add(301), 300, at_zero, 0),
            Some(1_003_333_333)
        );
        // A year of uptime at HZ = 1000 does not overflow.
        let year = 365 * 86_400;
        assert_eq!(
            jiffies_to_ns(at_zero.wrapping_add(year * 1000), 1000, at_zero, 0),
            Some(year * 1_000_000_000)
        );
        assert_eq!(jiffies_to_ns(5, 0, 0, 0), None, "not measured yet");
        // Where a tick is a whole number of ns, one multiply gives what the divisions give.
        for hz in [100, 250, 1000] {
            let per = whole_ns_per_jiffy(hz);
            assert_ne!(per, 0);
            for ticks in [1, 299, 86_400 * hz as u64 + 7, year * hz as u64] {
                let jiffies = at_zero.wrapping_add(ticks);
                assert_eq!(
                    jiffies_to_ns(jiffies, hz, at_zero, per),
                    jiffies_to_ns(jiffies, hz, at_zero, 0),
                    "HZ {hz}, {ticks} ticks"
                );
            }
        }
        assert_eq!(whole_ns_per_jiffy(300), 0, "1e9 / 300 is not whole");
    }

    #[test]
    fn the_tick_rate_is_rounded_from_the_tick_period() {
        // HZ = 300: the kernel's tick is 3,333,333 ns.
        assert_eq!(clock_params(3_333_333, 0, 0).0, 300);
        assert_eq!(clock_params(1_000_000, 0, 0).0, 1000);
    }
}
