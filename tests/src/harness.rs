//! Packet-fixture runner: the real compiled program, loaded by the real loader, maps filled by
//! the real state code, each packet run through `BPF_PROG_TEST_RUN`.
//!
//! A [`Fixture`] reads like Katran's: description, input, expected action, expected output
//! (compared byte for byte), plus the counters it must move.

use crate::packet::hex_diff;
use aya::programs::{TestRun, TestRunOptions};
use lb_common::{counters, LogBudget};
use lb_userspace::{
    acl::SourceEntry,
    dataplane::{Dataplane, Role, Sizes},
    model::{BackendSpec, Mac, Services, VipSpec},
    state::{self, BackendStatus, Live, NextHop, Resolve},
};
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

/// The LB's own MAC in fixtures (source of every forwarded frame).
pub const LB_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// A client (or router) MAC.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xc1];
/// MTU fixtures give every egress path.
pub const MTU: u16 = 1500;

/// Map sizes small enough that loading is quick, large enough for every fixture.
pub const FIXTURE_SIZES: Sizes = Sizes {
    nat_table_size: lb_common::DEFAULT_NAT_TABLE_SIZE,
    max_vips: 16,
    max_backends: 64,
    max_ring_size: 1021,
    flow_table_size: 4096,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Aborted = 0,
    Drop = 1,
    Pass = 2,
    Tx = 3,
    Redirect = 4,
}

impl Action {
    fn from_code(code: u32) -> Option<Self> {
        [
            Action::Aborted,
            Action::Drop,
            Action::Pass,
            Action::Tx,
            Action::Redirect,
        ]
        .into_iter()
        .find(|a| *a as u32 == code)
    }
}

/// Backends in fixtures name their MAC in the config (`mac = ...`), as an operator can; the
/// egress is the ingress interface. Resolution through routes is tested end to end.
pub struct ConfiguredMacs;

impl Resolve for ConfiguredMacs {
    fn next_hop(&self, backend: &BackendSpec) -> Result<NextHop, String> {
        let dst_mac = backend
            .mac
            .ok_or("fixtures give every backend a mac".to_string())?;
        Ok(NextHop {
            src: None,
            dst_mac,
            src_mac: Mac(LB_MAC),
            ifindex: 0,
            mtu: MTU,
        })
    }
}

pub struct Fixture {
    pub description: &'static str,
    pub input: Vec<u8>,
    pub action: Action,
    /// `None`: the packet must leave unchanged.
    pub output: Option<Vec<u8>>,
    /// Global counters that must move, by how much (all others must not move).
    pub counters: &'static [(u32, u64)],
}

/// Why a fixture failed, printed in full by the test.
pub struct Mismatch(pub String);

impl fmt::Debug for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Result of one run.
pub struct Outcome {
    pub action: u32,
    pub output: Vec<u8>,
}

/// A loaded program plus the state that filled its maps.
pub struct Harness {
    pub dataplane: Dataplane,
    live: Live,
    pub status: BTreeMap<(String, std::net::IpAddr), BackendStatus>,
    /// Blocklist entries (VIP name or every VIP, prefix) the next apply writes.
    pub blocked: BTreeSet<(Option<String>, SourceEntry)>,
    /// The connection log's budget the next apply writes (`None`: the log is off).
    pub log: Option<LogBudget>,
}

impl Harness {
    pub fn new(role: Role) -> Self {
        let dataplane = Dataplane::load(role, FIXTURE_SIZES, None)
            .unwrap_or_else(|e| panic!("loading the XDP object (tests must run as root): {e}"));
        Self {
            dataplane,
            live: Live::empty(FIXTURE_SIZES),
            status: BTreeMap::new(),
            blocked: BTreeSet::new(),
            log: None,
        }
    }

    /// Applies `services` through the real state code (target -> plan -> apply).
    pub fn apply(&mut self, services: &Services) {
        self.apply_with(services, &ConfiguredMacs);
    }

    /// Like [`apply`](Self::apply), resolving next hops with `resolver`.
    pub fn apply_with(&mut self, services: &Services, resolver: &dyn Resolve) {
        let status = |vip: &VipSpec, backend: &BackendSpec| {
            self.status
                .get(&(vip.name.clone(), backend.addr))
                .copied()
                .unwrap_or_default()
        };
        let mut target = state::target(services, status, resolver).expect("target");
        target.blocked = self.blocked.clone();
        target.log = self.log;
        let (changes, next) = state::plan(&self.live, &target).expect("plan");
        state::apply(&mut self.dataplane, &changes).expect("apply");
        self.live = next;
    }

    pub fn live(&self) -> &Live {
        &self.live
    }

    /// Runs one packet through the program.
    pub fn run(&mut self, input: &[u8]) -> Outcome {
        // Room for the largest encapsulation the program adds.
        let mut output = vec![0u8; input.len() + 64];
        let result = self
            .dataplane
            .program()
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut output),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        output.truncate(result.data_size_out as usize);
        Outcome {
            action: result.return_value,
            output,
        }
    }

    pub fn global_counters(&self) -> Vec<u64> {
        self.dataplane.global_counters().expect("counters")
    }

    /// Runs a fixture and checks action, output bytes and counters.
    pub fn check(&mut self, fixture: &Fixture) -> Result<(), Mismatch> {
        let before = self.global_counters();
        let outcome = self.run(&fixture.input);
        let after = self.global_counters();
        let mut problems = Vec::new();
        match Action::from_code(outcome.action) {
            Some(action) if action == fixture.action => {}
            other => problems.push(format!(
                "action: expected {:?}, got {other:?} ({})",
                fixture.action, outcome.action
            )),
        }
        let expected = fixture.output.as_ref().unwrap_or(&fixture.input);
        if let Some(diff) = hex_diff(expected, &outcome.output) {
            problems.push(format!("output:\n{diff}"));
        }
        let mut want = vec![0u64; after.len()];
        for (index, delta) in fixture.counters {
            want[*index as usize] += delta;
        }
        let action_index = counters::ACTION_ABORTED + outcome.action.min(counters::ACTION_REDIRECT);
        want[action_index as usize] += 1;
        for (i, (name, _)) in counters::ALL.iter().enumerate() {
            let moved = after[i] - before[i];
            if moved != want[i] {
                problems.push(format!(
                    "counter {name}: moved by {moved}, expected {}",
                    want[i]
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Mismatch(format!(
                "fixture {:?}:\n{}",
                fixture.description,
                problems.join("\n")
            )))
        }
    }

    /// Runs every fixture, reporting all failures together.
    pub fn check_all(&mut self, fixtures: &[Fixture]) {
        let failures: Vec<String> = fixtures
            .iter()
            .filter_map(|f| self.check(f).err().map(|m| m.0))
            .collect();
        assert!(
            failures.is_empty(),
            "{} of {} fixtures failed:\n\n{}",
            failures.len(),
            fixtures.len(),
            failures.join("\n\n")
        );
    }
}

/// Keeps the calling thread on CPU 0: `BPF_PROG_TEST_RUN` runs on the calling CPU, and the
/// round-robin and least-conn schedulers keep per-CPU state, so their exact sequences hold
/// only on one CPU.
pub fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning the thread to CPU 0: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A VIP spec for fixtures: backends as (address, MAC, weight).
pub fn vip_spec(
    name: &str,
    vip: lb_userspace::model::VipAddr,
    forwarding: lb_userspace::model::Forwarding,
    ring_size: u32,
    backends: &[(std::net::IpAddr, [u8; 6], u32)],
) -> VipSpec {
    VipSpec {
        name: name.to_string(),
        vip,
        forwarding,
        scheduler: Default::default(),
        affinity: Default::default(),
        ring_size,
        health: Default::default(),
        announce: Default::default(),
        backends: backends
            .iter()
            .map(|(addr, mac, weight)| BackendSpec {
                port: None,
                addr: *addr,
                weight: *weight,
                mac: Some(Mac(*mac)),
                health_port: None,
            })
            .collect(),
        acl: Default::default(),
        limits: None,
    }
}
