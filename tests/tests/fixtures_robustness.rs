//! Robustness: valid, truncated, mutated and random packets through the LB and decap programs.
//!
//! Whatever arrives, the LB program returns DROP, PASS or TX (REDIRECT on two-armed set-ups,
//! never ABORTED), leaves a passed packet untouched, drops only for a VIP without backends, and
//! forwards only to a backend of the VIP the packet is addressed to, in exactly the shape of that
//! VIP's forwarding mode. Its counters account for every packet. The decap program either leaves
//! a packet alone or removes exactly its outer header.
//!
//! Packets come from a seeded xorshift64* generator. A failure names the seed, the phase and the
//! packet; `XDPLB_FUZZ_SEED=<hex>` runs another seed.

use lb_common::counters::*;
use lb_userspace::state::addr_key;
use lb_userspace::{
    dataplane::Role,
    model::{DataPathSettings, Forwarding, Protocol, Services, VipAddr},
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use xdplb_tests::fixture::*;
use xdplb_tests::{
    harness::{vip_spec, Action, Harness, Outcome, CLIENT_MAC, LB_MAC, MTU},
    packet::{hex_diff, Packet},
};

const DEFAULT_SEED: u64 = 0x0dd5_eed0_c0ff_ee42;

fn seed() -> u64 {
    match std::env::var("XDPLB_FUZZ_SEED") {
        Ok(hex) => u64::from_str_radix(hex.trim_start_matches("0x"), 16)
            .expect("XDPLB_FUZZ_SEED is a hex number"),
        Err(_) => DEFAULT_SEED,
    }
}

/// xorshift64* (Vigna): small, fast, and the same sequence on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn byte(&mut self) -> u8 {
        (self.next() >> 32) as u8
    }
    fn u16(&mut self) -> u16 {
        (self.next() >> 32) as u16
    }
    fn u32(&mut self) -> u32 {
        (self.next() >> 32) as u32
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration: every VIP shape, each on its own address, backends with distinctive MACs.

struct TestVip {
    name: &'static str,
    addr: IpAddr,
    /// 0 = all ports.
    port: u16,
    protocol: Protocol,
    forwarding: Forwarding,
    /// (address, MAC, weight).
    backends: Vec<(IpAddr, [u8; 6], u32)>,
}

impl TestVip {
    fn has_backends(&self) -> bool {
        self.backends.iter().any(|(_, _, weight)| *weight > 0)
    }
    /// Bytes an encapsulation toward this VIP's backends adds (all of one family).
    fn outer_len(&self) -> usize {
        if self.backends[0].0.is_ipv6() {
            40
        } else {
            20
        }
    }
}

fn test_vips() -> Vec<TestVip> {
    use Forwarding::*;
    use Protocol::*;
    let vip = |name, addr, port, protocol, forwarding, backends| TestVip {
        name,
        addr,
        port,
        protocol,
        forwarding,
        backends,
    };
    vec![
        vip(
            "dsr4",
            v4(192, 0, 2, 10),
            80,
            Tcp,
            Dsr,
            vec![
                (v4(10, 1, 0, 11), mac(0x11), 1),
                (v4(10, 1, 0, 12), mac(0x12), 1),
            ],
        ),
        vip(
            "any4",
            v4(192, 0, 2, 20),
            0,
            Tcp,
            Dsr,
            vec![(v4(10, 1, 0, 13), mac(0x13), 1)],
        ),
        vip(
            "dns4",
            v4(192, 0, 2, 30),
            53,
            Udp,
            Dsr,
            vec![(v4(10, 1, 0, 14), mac(0x14), 1)],
        ),
        vip(
            "dsr6",
            v6("2001:db8::10"),
            80,
            Tcp,
            Dsr,
            vec![(v6("2001:db8:1::15"), mac(0x15), 1)],
        ),
        vip(
            "tun4",
            v4(192, 0, 2, 40),
            80,
            Tcp,
            Ipip,
            vec![
                (v4(10, 2, 0, 21), mac(0x21), 1),
                (v4(10, 2, 0, 22), mac(0x22), 3),
            ],
        ),
        vip(
            "tun6",
            v6("2001:db8::40"),
            443,
            Tcp,
            Ipip,
            vec![(v6("2001:db8:2::23"), mac(0x23), 1)],
        ),
        vip(
            "tun46",
            v4(192, 0, 2, 50),
            53,
            Udp,
            Ipip,
            vec![(v6("2001:db8:2::24"), mac(0x24), 1)],
        ),
        vip(
            "tun64",
            v6("2001:db8::50"),
            0,
            Udp,
            Ipip,
            vec![(v4(10, 2, 0, 25), mac(0x25), 1)],
        ),
        vip(
            "empty",
            v4(192, 0, 2, 60),
            80,
            Tcp,
            Dsr,
            vec![(v4(10, 1, 0, 16), mac(0x16), 0)],
        ),
    ]
}

fn services(vips: &[TestVip]) -> Services {
    Services {
        settings: DataPathSettings {
            hash_seed: 0x5eed,
            // Never rate limited here: every too-big reply is checked byte for byte.
            icmp_too_big_rate: 1_000_000,
            ..DataPathSettings::default()
        },
        vips: vips
            .iter()
            .map(|v| {
                let addr = VipAddr {
                    addr: v.addr,
                    port: v.port,
                    protocol: v.protocol,
                };
                vip_spec(v.name, addr, v.forwarding, 13, &v.backends)
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Packet generators.

/// What a valid packet must get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Forwarded to a backend of `test_vips()[index]`.
    Forward(usize),
    Pass,
    Drop,
    /// Too big for an `ipip` tunnel, IPv6 or DF: answered with ICMP "too big".
    TooBig,
}

/// A packet built by [`valid_packet`].
struct Valid {
    frame: Vec<u8>,
    expect: Expect,
    /// Where the IP packet ends: Ethernet padding, if any, follows.
    ip_end: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum L4 {
    Tcp,
    Udp,
    Icmp,
}

fn l4_of(protocol: Protocol) -> L4 {
    match protocol {
        Protocol::Tcp => L4::Tcp,
        Protocol::Udp => L4::Udp,
    }
}

/// A well-formed packet with random fields: to a VIP (mostly its port and protocol) or to
/// another address, with or without VLAN tag, IPv4 options, IPv6 extension headers, TCP
/// options, fragmentation and Ethernet padding; payload up to `max_payload` bytes.
fn valid_packet(rng: &mut Rng, vips: &[TestVip], max_payload: usize) -> Valid {
    let target = rng.chance(85).then(|| rng.below(vips.len()));
    let vip = target.map(|i| &vips[i]);
    let dst = match vip {
        Some(vip) => vip.addr,
        // Addresses no VIP uses.
        None if rng.chance(50) => v4(198, 18, rng.byte(), rng.byte()),
        None => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, rng.u16())),
    };
    let l4 = match vip {
        Some(vip) if rng.chance(85) => l4_of(vip.protocol),
        _ => [L4::Tcp, L4::Udp, L4::Icmp][rng.below(3)],
    };
    let dport = match vip {
        Some(vip) if vip.port != 0 && rng.chance(85) => vip.port,
        _ => rng.u16(),
    };
    let fragment = rng.chance(5);

    let mut p = Packet::new().eth(CLIENT_MAC, LB_MAC);
    if rng.chance(30) {
        p = p.vlan(rng.u16());
    }
    p = match dst {
        IpAddr::V4(dst) => {
            let src = Ipv4Addr::from(rng.u32());
            p = p
                .ipv4(src, dst)
                .tos(rng.byte())
                .ttl(rng.byte())
                .id(rng.u16());
            if rng.chance(50) {
                p = p.df();
            }
            if rng.chance(25) {
                let len = rng.below(41);
                p = p.ipv4_options(&rng.bytes(len));
            }
            if fragment {
                p = if rng.chance(50) {
                    p.mf()
                } else {
                    p.frag_offset(1 + rng.below(0x1fff) as u16)
                };
            }
            p
        }
        IpAddr::V6(dst) => {
            let src = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, rng.u16(), rng.u16());
            p = p
                .ipv6(src, dst)
                .tos(rng.byte())
                .flow_label(rng.u32() & 0xf_ffff)
                .ttl(rng.byte());
            // At most 3 headers (plus a fragment header): within the program's walk of 4.
            for _ in 0..rng.below(4) {
                let len = rng.below(24);
                let options = rng.bytes(len);
                p = match rng.below(3) {
                    0 => p.hop_by_hop(&options),
                    1 => p.dest_opts(&options),
                    _ => p.routing(rng.byte(), rng.byte(), &options),
                };
            }
            if fragment {
                p = p.fragment(rng.below(0x2000) as u16, rng.chance(50), rng.u32());
            }
            p
        }
    };
    let sport = rng.u16();
    p = match l4 {
        L4::Tcp => {
            p = p
                .tcp(sport, dport)
                .flags(rng.byte())
                .seq(rng.u32())
                .ack(rng.u32())
                .window(rng.u16());
            if rng.chance(20) {
                let len = rng.below(41);
                p = p.tcp_options(&rng.bytes(len));
            }
            p
        }
        L4::Udp => p.udp(sport, dport),
        L4::Icmp => p.icmp_echo_request(rng.u16(), rng.u16()),
    };
    let payload_len = if rng.chance(50) {
        rng.below(65.min(max_payload + 1))
    } else {
        rng.below(max_payload + 1)
    };
    let mut frame = p.payload(&rng.bytes(payload_len)).build();
    let ip_end = frame.len();
    if rng.chance(10) {
        let padding = 1 + rng.below(32);
        frame.extend(rng.bytes(padding));
    }

    let l3_len = ip_end - l2_len(&frame);
    let expect = match target {
        None => Expect::Pass,
        Some(index) => {
            let vip = &vips[index];
            let served = l4 == l4_of(vip.protocol) && (vip.port == 0 || vip.port == dport);
            if fragment || !served {
                Expect::Pass
            } else if !vip.has_backends() {
                Expect::Drop
            } else if vip.forwarding == Forwarding::Ipip && l3_len + vip.outer_len() > MTU.into() {
                let df = frame[l2_len(&frame) + 6] & 0x40 != 0;
                let answerable = frame[l2_len(&frame)] >> 4 == 6 || df;
                if answerable && ip_end == frame.len() {
                    Expect::TooBig
                } else {
                    Expect::Pass
                }
            } else {
                Expect::Forward(index)
            }
        }
    };
    Valid {
        frame,
        expect,
        ip_end,
    }
}

/// Interesting values for header fields: lengths, versions, protocols, flags.
const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x11, 0x29, 0x2c, 0x3b, 0x3c, 0x40, 0x45, 0x46, 0x4f, 0x60,
    0x7f, 0x80, 0x81, 0x86, 0x88, 0xa8, 0xdd, 0xfe, 0xff,
];

/// Changes 1 to 8 bytes, mostly in the first 80 (the headers): flips bits, writes random or
/// interesting values; sometimes also cuts the packet short or appends bytes.
fn mutate(rng: &mut Rng, mut frame: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(8) {
        let at = if rng.chance(80) {
            rng.below(frame.len().min(80))
        } else {
            rng.below(frame.len())
        };
        frame[at] = match rng.below(3) {
            0 => frame[at] ^ (1 << rng.below(8)),
            1 => rng.byte(),
            _ => INTERESTING[rng.below(INTERESTING.len())],
        };
    }
    if rng.chance(10) {
        let len = 14 + rng.below(frame.len() - 13);
        frame.truncate(len);
    } else if rng.chance(10) {
        let extra = 1 + rng.below(64);
        frame.extend(rng.bytes(extra));
    }
    frame
}

/// Random bytes of a random length (14..1600); half of them start like IP over Ethernet, with
/// or without a VLAN tag, so they get past the first checks.
fn random_frame(rng: &mut Rng) -> Vec<u8> {
    let len = 14 + rng.below(1600 - 14);
    let mut frame = rng.bytes(len);
    if rng.chance(50) {
        let (ether_type, version): ([u8; 2], u8) = if rng.chance(50) {
            ([0x08, 0x00], 0x40)
        } else {
            ([0x86, 0xdd], 0x60)
        };
        let l2 = if rng.chance(30) && len > 18 {
            frame[12..14].copy_from_slice(&[0x81, 0x00]);
            18
        } else {
            14
        };
        frame[l2 - 2..l2].copy_from_slice(&ether_type);
        if let Some(b) = frame.get_mut(l2) {
            *b = version | (*b & 0x0f);
        }
    }
    frame
}

// ---------------------------------------------------------------------------------------------
// Frame inspection.

/// Ethernet header length as the program sees it: one 802.1Q or 802.1ad tag at most.
fn l2_len(frame: &[u8]) -> usize {
    match frame[12..14] {
        [0x81, 0x00] | [0x88, 0xa8] => 18,
        _ => 14,
    }
}

/// Whether the frame carries an IP packet whose destination is `addr`.
fn addressed_to(frame: &[u8], addr: IpAddr) -> bool {
    let l2 = l2_len(frame);
    let (ether_type, range, bytes) = match addr {
        IpAddr::V4(a) => ([0x08, 0x00], l2 + 16..l2 + 20, a.octets().to_vec()),
        IpAddr::V6(a) => ([0x86, 0xdd], l2 + 24..l2 + 40, a.octets().to_vec()),
    };
    frame.get(l2 - 2..l2) == Some(&ether_type[..]) && frame.get(range) == Some(&bytes[..])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const ACTIONS: [Action; 5] = [
    Action::Aborted,
    Action::Drop,
    Action::Pass,
    Action::Tx,
    Action::Redirect,
];

/// Runs packets through one program, checks each outcome, and counts actions.
struct Fuzz {
    harness: Harness,
    seed: u64,
    phase: &'static str,
    /// Packets run in the current phase.
    index: usize,
    /// By action code, all phases.
    actions: [u64; 5],
    start: Vec<u64>,
}

impl Fuzz {
    fn new(harness: Harness, seed: u64) -> Self {
        let start = harness.global_counters();
        Self {
            harness,
            seed,
            phase: "",
            index: 0,
            actions: [0; 5],
            start,
        }
    }

    fn phase(&mut self, phase: &'static str) {
        self.phase = phase;
        self.index = 0;
    }

    fn runs(&self) -> u64 {
        self.actions.iter().sum()
    }

    /// Runs `input`; checks the action code and the output length bound every program keeps.
    fn run(&mut self, input: &[u8]) -> (Action, Vec<u8>) {
        let Outcome { action, output } = self.harness.run(input);
        self.index += 1;
        let Some(action) = ACTIONS.get(action as usize).copied() else {
            self.fail(input, &output, &format!("action code {action}"));
        };
        self.actions[action as usize] += 1;
        if action == Action::Aborted {
            self.fail(input, &output, "XDP_ABORTED");
        }
        if output.len() > input.len() + 40 {
            self.fail(input, &output, "output grew by more than 40 bytes");
        }
        (action, output)
    }

    #[track_caller]
    fn fail(&self, input: &[u8], output: &[u8], why: &str) -> ! {
        panic!(
            "seed {:#x}, phase {:?}, packet #{}: {why}\ninput  ({} bytes): {}\noutput ({} bytes): {}",
            self.seed,
            self.phase,
            self.index - 1,
            input.len(),
            hex(input),
            output.len(),
            hex(output)
        )
    }

    /// Counter deltas since the start, by name, for the report and the sums below.
    fn deltas(&self) -> Vec<(&'static str, u64)> {
        let now = self.harness.global_counters();
        ALL.iter()
            .zip(now.iter().zip(&self.start))
            .map(|((name, _), (now, start))| (*name, now - start))
            .collect()
    }

    fn report(&self, program: &str) {
        eprintln!("{program}: {} packets, seed {:#x}", self.runs(), self.seed);
        for (action, count) in ACTIONS.iter().zip(self.actions) {
            eprintln!("  {action:?}: {count}");
        }
        let moved: Vec<String> = self
            .deltas()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name}={n}"))
            .collect();
        eprintln!("  counters: {}", moved.join(" "));
    }
}

// ---------------------------------------------------------------------------------------------
// The LB program.

struct Balancer {
    fuzz: Fuzz,
    vips: Vec<TestVip>,
}

impl Balancer {
    fn new(seed: u64) -> Self {
        let vips = test_vips();
        let mut harness = Harness::new(Role::Balancer);
        harness.apply(&services(&vips));
        Self {
            fuzz: Fuzz::new(harness, seed),
            vips,
        }
    }

    /// Runs one packet and checks every invariant, plus `expect` when the packet is known.
    /// Returns the output.
    fn run(&mut self, input: &[u8], expect: Option<Expect>) -> Vec<u8> {
        let (action, output) = self.fuzz.run(input);
        let checked = match action {
            Action::Pass if output != input => Err(format!(
                "passed packet was modified:\n{}",
                hex_diff(input, &output).unwrap_or_default()
            )),
            Action::Pass => Ok(Expect::Pass),
            Action::Drop => {
                let to_empty_vip = |v: &TestVip| !v.has_backends() && addressed_to(input, v.addr);
                if self.vips.iter().any(to_empty_vip) {
                    Ok(Expect::Drop)
                } else {
                    Err("dropped a packet that is not for a VIP without backends".into())
                }
            }
            Action::Tx if output[..6] == input[6..12] => self.check_too_big(input, &output),
            Action::Tx | Action::Redirect => self.check_forwarded(input, &output),
            Action::Aborted => unreachable!("Fuzz::run fails on ABORTED"),
        };
        match checked {
            Err(why) => self.fuzz.fail(input, &output, &why),
            Ok(got) if expect.is_some_and(|want| want != got) => {
                let why = format!("expected {:?}, got {got:?}", expect.unwrap());
                self.fuzz.fail(input, &output, &why)
            }
            Ok(_) => output,
        }
    }

    /// A forwarded frame goes to a backend of the VIP it is addressed to, from the LB's MAC,
    /// otherwise unchanged (`dsr`) or inside an exact outer header (`ipip`).
    fn check_forwarded(&self, input: &[u8], output: &[u8]) -> Result<Expect, String> {
        let found = self.vips.iter().enumerate().find_map(|(index, vip)| {
            let backend = vip.backends.iter().find(|b| output[..6] == b.1)?;
            Some((index, vip, backend.0))
        });
        let Some((index, vip, backend)) = found else {
            return Err("destination MAC is no backend's".into());
        };
        if output[6..12] != LB_MAC {
            return Err("source MAC is not the LB's".into());
        }
        if !addressed_to(input, vip.addr) {
            return Err(format!(
                "sent to a backend of {} but not addressed to it",
                vip.name
            ));
        }
        match vip.forwarding {
            Forwarding::Dsr if output[12..] != input[12..] => Err(format!(
                "dsr changed more than the MACs:\n{}",
                hex_diff(&input[12..], &output[12..]).unwrap_or_default()
            )),
            Forwarding::Dsr => Ok(Expect::Forward(index)),
            Forwarding::Ipip => {
                check_encapsulated(input, output, backend).map(|()| Expect::Forward(index))
            }
            // nat has its own fixtures (fixtures_nat.rs); the fuzzed VIPs do not use it.
            Forwarding::Nat => Err("nat VIPs are not part of the fuzzed set".into()),
        }
    }

    /// `output` is the ICMP "too big" reply to `input`, byte for byte, for an `ipip` VIP.
    fn check_too_big(&self, input: &[u8], output: &[u8]) -> Result<Expect, String> {
        let vip = self
            .vips
            .iter()
            .find(|v| v.forwarding == Forwarding::Ipip && addressed_to(input, v.addr))
            .ok_or("sent back to the client, but not addressed to an ipip VIP")?;
        let expected = too_big_reply(input, MTU - vip.outer_len() as u16);
        match hex_diff(&expected, output) {
            None => Ok(Expect::TooBig),
            Some(diff) => Err(format!(
                "sent back to the client, but not the too-big reply:\n{diff}"
            )),
        }
    }

    /// Checks the action counters against the runs, and that every counted packet has exactly
    /// one reason: pass reasons add up to passes, drop reasons to drops, and every packet that
    /// reached backend selection counts one flow-table outcome.
    fn counters_add_up(&self) {
        let deltas = self.fuzz.deltas();
        let d = |index: u32| deltas[index as usize].1;
        let sum = |indices: &[u32]| indices.iter().map(|i| d(*i)).sum::<u64>();
        for (i, count) in self.fuzz.actions.iter().enumerate() {
            assert_eq!(d(ACTION_ABORTED + i as u32), *count, "{}", deltas[i].0);
        }
        let pass_reasons = [
            PASS_NOT_IP,
            PASS_MALFORMED,
            PASS_FRAGMENT,
            PASS_NOT_TCP_UDP,
            PASS_NOT_VIP,
            PASS_TOO_BIG,
            PASS_ICMP_NO_BACKEND,
        ];
        assert_eq!(d(ACTION_PASS), sum(&pass_reasons), "pass reasons");
        assert_eq!(
            d(ACTION_DROP),
            sum(&[DROP_NO_BACKEND, DROP_INTERNAL, DROP_TOO_BIG_RATE_LIMITED]),
            "drop reasons"
        );
        // ICMP errors reach their backend without touching the flow table.
        assert_eq!(
            sum(&[FLOW_HIT, FLOW_MISS, FLOW_REHASH]),
            sum(&[ACTION_TX, ACTION_REDIRECT, ACTION_DROP, PASS_TOO_BIG]) - d(ICMP_ERROR_FORWARDED),
            "flow-table outcomes"
        );
        assert_eq!(sum(&[DECAP_OK, DECAP_NOT_OURS]), 0, "decap counters");
    }
}

/// `output` is `input` inside an outer header to `backend`: Ethernet header (VLAN tag kept,
/// last ethertype the outer family), outer header, then every byte of `input` after its
/// Ethernet header, Ethernet padding included. Lengths come from the inner IP header.
fn check_encapsulated(input: &[u8], output: &[u8], backend: IpAddr) -> Result<(), String> {
    let l2 = l2_len(input);
    let outer_len = if backend.is_ipv6() { 40 } else { 20 };
    if output.len() != input.len() + outer_len {
        return Err(format!("ipip output is not {outer_len} bytes longer"));
    }
    if output[12..l2 - 2] != input[12..l2 - 2] {
        return Err("VLAN tag not kept".into());
    }
    if output[l2 + outer_len..] != input[l2..] {
        return Err(format!(
            "inner packet differs from the input:\n{}",
            hex_diff(&input[l2..], &output[l2 + outer_len..]).unwrap_or_default()
        ));
    }
    let inner = &input[l2..];
    let (l3_len, tos, inner_proto) = if input[l2 - 2..l2] == [0x86, 0xdd] {
        let payload = u16::from_be_bytes([inner[4], inner[5]]) as usize;
        (40 + payload, inner[0] << 4 | inner[1] >> 4, 41)
    } else {
        (
            u16::from_be_bytes([inner[2], inner[3]]) as usize,
            inner[1],
            4,
        )
    };
    if l3_len > inner.len() || l3_len + outer_len > MTU.into() {
        return Err(format!(
            "IP length {l3_len}: cut short, or too big to encapsulate"
        ));
    }
    // The outer source comes from the flow hash: check it lies in the pool, then build the
    // header that source implies and compare every byte.
    let outer = &output[l2..l2 + outer_len];
    let (ether_type, expected) = match backend {
        IpAddr::V4(backend) => {
            let src = Ipv4Addr::new(outer[12], outer[13], outer[14], outer[15]);
            if src.octets()[..2] != [172, 16] {
                return Err(format!("outer source {src} outside 172.16.0.0/16"));
            }
            let header = Packet::new()
                .ipv4(src, backend)
                .tos(tos)
                .df()
                .ttl(64)
                .protocol(inner_proto)
                .payload(&inner[..l3_len])
                .build();
            ([0x08, 0x00], header)
        }
        IpAddr::V6(backend) => {
            let src: [u8; 16] = outer[8..24].try_into().unwrap();
            if src[..12] != [0xfd, 0, 0, 0x1b, 0, 0, 0, 0, 0, 0, 0, 0] {
                return Err("outer source outside fd00:1b::/96".into());
            }
            // The flow label is the low 20 bits of the same hash.
            let hash = u32::from_be_bytes(src[12..].try_into().unwrap());
            let header = Packet::new()
                .ipv6(src.into(), backend)
                .tos(tos)
                .flow_label(hash & 0xf_ffff)
                .ttl(64)
                .protocol(inner_proto)
                .payload(&inner[..l3_len])
                .build();
            ([0x86, 0xdd], header)
        }
    };
    let want = [&ether_type[..], &expected[..outer_len]].concat();
    match hex_diff(&want, &output[l2 - 2..l2 + outer_len]) {
        Some(diff) => Err(format!("ethertype or outer header:\n{diff}")),
        None => Ok(()),
    }
}

#[test]
fn balancer_survives_valid_truncated_mutated_and_random_packets() {
    let started = std::time::Instant::now();
    let seed = seed();
    let mut rng = Rng::new(seed);
    let mut lb = Balancer::new(seed);
    let mut expected = [0u64; 4];

    lb.fuzz.phase("valid");
    for _ in 0..40_000 {
        let packet = valid_packet(&mut rng, &lb.vips, 1500);
        expected[match packet.expect {
            Expect::Forward(_) => 0,
            Expect::Pass => 1,
            Expect::Drop => 2,
            Expect::TooBig => 3,
        }] += 1;
        lb.run(&packet.frame, Some(packet.expect));
    }
    // The generator must exercise every outcome, or the phase proves little (too big is rarer).
    assert!(
        expected[..3].iter().all(|n| *n > 500) && expected[3] > 100,
        "{expected:?}"
    );

    // Cut short anywhere inside the IP packet: passed untouched. Cut in the Ethernet padding:
    // as if whole.
    lb.fuzz.phase("truncated");
    for _ in 0..200 {
        let packet = valid_packet(&mut rng, &lb.vips, 200);
        for len in 14..packet.frame.len() {
            let expect = if len < packet.ip_end {
                Expect::Pass
            } else {
                packet.expect
            };
            lb.run(&packet.frame[..len], Some(expect));
        }
    }

    lb.fuzz.phase("mutated");
    for _ in 0..40_000 {
        let packet = valid_packet(&mut rng, &lb.vips, 300);
        lb.run(&mutate(&mut rng, packet.frame), None);
    }

    lb.fuzz.phase("random");
    for _ in 0..20_000 {
        lb.run(&random_frame(&mut rng), None);
    }

    lb.counters_add_up();
    lb.fuzz.report("xdplb");
    eprintln!("  valid packets expected (forward, pass, drop): {expected:?}");
    eprintln!("  {:.1?}", started.elapsed());
    let forwarded = lb.fuzz.actions[Action::Tx as usize];
    assert!(forwarded > 20_000, "only {forwarded} packets forwarded");
    assert!(lb.fuzz.runs() >= 100_000, "{} packets", lb.fuzz.runs());
}

// ---------------------------------------------------------------------------------------------
// The decap program.

/// Outer destination and inner destination of a tunnel frame, and the frame without its outer
/// header (Ethernet header and VLAN tag kept, ethertype of the inner family): what the decap
/// program makes of it if it strips it. `None` if the frame is not IPIP or IPv6-in-IP.
fn stripped(frame: &[u8]) -> Option<(IpAddr, IpAddr, Vec<u8>)> {
    let l2 = l2_len(frame);
    let ip = frame.get(l2..)?;
    let (outer_dst, proto, outer_len) = match frame.get(l2 - 2..l2)? {
        [0x08, 0x00] => {
            let dst: [u8; 4] = ip.get(16..20)?.try_into().unwrap();
            (IpAddr::from(dst), *ip.get(9)?, 20)
        }
        [0x86, 0xdd] => {
            let dst: [u8; 16] = ip.get(24..40)?.try_into().unwrap();
            (IpAddr::from(dst), *ip.get(6)?, 40)
        }
        _ => return None,
    };
    let inner = ip.get(outer_len..)?;
    let (inner_dst, ether_type) = match proto {
        4 => {
            let dst: [u8; 4] = inner.get(16..20)?.try_into().unwrap();
            (IpAddr::from(dst), [0x08, 0x00])
        }
        41 => {
            let dst: [u8; 16] = inner.get(24..40)?.try_into().unwrap();
            (IpAddr::from(dst), [0x86, 0xdd])
        }
        _ => return None,
    };
    let frame = [&frame[..l2 - 2], &ether_type, inner].concat();
    Some((outer_dst, inner_dst, frame))
}

struct Decap {
    fuzz: Fuzz,
    local: Vec<IpAddr>,
    vips: Vec<IpAddr>,
    stripped: u64,
}

impl Decap {
    /// A decap program on a host that is every `ipip` backend and serves every `ipip` VIP.
    fn new(vips: &[TestVip], seed: u64) -> Self {
        let tunnels: Vec<_> = vips
            .iter()
            .filter(|v| v.forwarding == Forwarding::Ipip)
            .collect();
        let local: Vec<IpAddr> = tunnels
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.0))
            .collect();
        let served: Vec<IpAddr> = tunnels.iter().map(|v| v.addr).collect();
        let mut harness = Harness::new(Role::Decap);
        let keys = |addrs: &[IpAddr]| addrs.iter().map(|a| addr_key(*a)).collect::<Vec<_>>();
        harness.dataplane.set_decap_local(&keys(&local)).unwrap();
        harness.dataplane.set_decap_vips(&keys(&served)).unwrap();
        Self {
            fuzz: Fuzz::new(harness, seed),
            local,
            vips: served,
            stripped: 0,
        }
    }

    /// Runs one packet: never aborted; passed either untouched or without exactly its outer
    /// header, and then only for a local tunnel endpoint and a served VIP. Returns the output.
    fn run(&mut self, input: &[u8]) -> Vec<u8> {
        let (action, output) = self.fuzz.run(input);
        match action {
            // Counted under drop_internal, checked in `counters_add_up`.
            Action::Drop => return output,
            Action::Pass if output == input => return output,
            Action::Pass => {}
            _ => self
                .fuzz
                .fail(input, &output, "the decap program forwarded"),
        }
        match stripped(input) {
            Some((outer, inner, frame)) if frame == output => {
                if !self.local.contains(&outer) || !self.vips.contains(&inner) {
                    self.fuzz
                        .fail(input, &output, "stripped a tunnel that is not ours");
                }
                self.stripped += 1;
            }
            _ => self.fuzz.fail(
                input,
                &output,
                "changed, but not by removing the outer header",
            ),
        }
        output
    }

    fn counters_add_up(&self) {
        let deltas = self.fuzz.deltas();
        let d = |index: u32| deltas[index as usize].1;
        for (i, count) in self.fuzz.actions.iter().enumerate() {
            assert_eq!(d(ACTION_ABORTED + i as u32), *count, "{}", deltas[i].0);
        }
        assert_eq!(
            d(DECAP_OK),
            self.stripped,
            "decap_ok counts stripped packets"
        );
        assert_eq!(d(ACTION_DROP), d(DROP_INTERNAL), "drop reasons");
    }
}

#[test]
fn decap_survives_tunnelled_truncated_mutated_and_random_packets() {
    let started = std::time::Instant::now();
    let seed = seed() ^ 0xdeca;
    let mut rng = Rng::new(seed);
    let mut lb = Balancer::new(seed);
    let mut decap = Decap::new(&lb.vips, seed);
    let tunnel_vips: Vec<usize> = (0..lb.vips.len())
        .filter(|i| lb.vips[*i].forwarding == Forwarding::Ipip)
        .collect();

    // Whatever the LB encapsulates, decap restores: the client's frame after the MACs.
    decap.fuzz.phase("round trip");
    lb.fuzz.phase("round trip");
    let mut tunnelled = Vec::new();
    while tunnelled.len() < 5_000 {
        let packet = valid_packet(&mut rng, &lb.vips, 1400);
        let Expect::Forward(index) = packet.expect else {
            continue;
        };
        if !tunnel_vips.contains(&index) {
            continue;
        }
        let encapsulated = lb.run(&packet.frame, Some(packet.expect));
        let restored = decap.run(&encapsulated);
        let expected = [&encapsulated[..12], &packet.frame[12..]].concat();
        if let Some(diff) = hex_diff(&expected, &restored) {
            decap.fuzz.fail(&encapsulated, &restored, &diff);
        }
        tunnelled.push(encapsulated);
    }

    decap.fuzz.phase("truncated");
    for frame in tunnelled.iter().step_by(50) {
        for len in 14..frame.len().min(200) {
            decap.run(&frame[..len]);
        }
    }

    decap.fuzz.phase("mutated");
    for i in 0..30_000 {
        let frame = tunnelled[i % tunnelled.len()].clone();
        decap.run(&mutate(&mut rng, frame));
    }

    decap.fuzz.phase("random");
    for _ in 0..10_000 {
        decap.run(&random_frame(&mut rng));
    }

    lb.counters_add_up();
    decap.counters_add_up();
    decap.fuzz.report("xdplb_decap");
    eprintln!("  stripped: {}", decap.stripped);
    eprintln!("  {:.1?}", started.elapsed());
    assert!(decap.stripped > 10_000, "only {} stripped", decap.stripped);
}
