//! What `nat` costs per packet, through `BPF_PROG_TEST_RUN` like [`crate::micro`], next to the
//! trivial program in the same runs, per call (nat rewrites the packet, so repeat mode does
//! not apply): a packet of an established nat connection toward its backend, the backend's
//! reply toward the client, and a new connection (a fresh source each call: a port claimed).
//! Every output is compared with the exact expected bytes, built with full checksums.

use crate::{
    micro::{
        establish, expect, expect_counters, expect_new_flows, framed, mac, median, moved,
        per_call_run, same_frame_per_call, CALLS, RING, RUNS, SEED, XDP_TX,
    },
    progs,
    report::{Figure, Report},
};
use anyhow::Result;
use lb_common::{counters, NAT_DEFAULT_PORT_MAX, NAT_DEFAULT_PORT_MIN, NAT_PROBES, PROTO_TCP};
use lb_userspace::{
    dataplane::Role,
    model::{DataPathSettings, Forwarding, Protocol, Services, VipAddr},
    nat::NatSpec,
};
use std::{collections::HashSet, net::Ipv4Addr};
use xdplb_tests::{
    fixture::flow_key,
    harness::{vip_spec, Harness, CLIENT_MAC, LB_MAC},
    packet::{Packet, TCP_ACK, TCP_PSH, TCP_SYN},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 70);
/// The first of [`SOURCES`] nat source addresses: 32 x 31,744 ports hold the 200,000 new
/// connections of a run (one source would be exhausted after 31,744).
const NAT: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 1);
const SOURCES: u32 = 32;
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 11);

fn services() -> Services {
    let mut web = vip_spec(
        "web",
        VipAddr {
            addr: VIP.into(),
            port: 80,
            protocol: Protocol::Tcp,
        },
        Forwarding::Nat,
        RING,
        &[(BACKEND.into(), mac(0x31), 100)],
    );
    web.backends[0].port = Some(8080);
    Services {
        settings: DataPathSettings {
            hash_seed: SEED,
            nat: NatSpec {
                sources_v4: (0..SOURCES).map(source).collect(),
                ..NatSpec::default()
            },
            ..DataPathSettings::default()
        },
        vips: vec![web],
    }
}

fn source(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(NAT) + index)
}

/// The nat (source, port) the kernel gives a new connection from `client:sport`: its first
/// probe slot (`lb_common::nat_slot`) that `taken` does not hold, which it then holds.
fn claim(taken: &mut HashSet<(u32, u16)>, client: Ipv4Addr, sport: u16) -> (Ipv4Addr, u16) {
    let key = flow_key(client.into(), VIP.into(), sport, 80, PROTO_TCP);
    let hash = lb_common::flow_hash(&key, SEED);
    (0..NAT_PROBES)
        .map(|probe| {
            lb_common::nat_slot(
                hash,
                probe,
                NAT_DEFAULT_PORT_MIN,
                NAT_DEFAULT_PORT_MAX,
                SOURCES,
            )
        })
        .find(|slot| taken.insert(*slot))
        .map(|(index, port)| (source(index), port))
        .expect("a run claims a fifth of the slots: 16 probes always find one")
}

fn segment(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    Packet::new()
        .ipv4(src, dst)
        .tcp(sport, dport)
        .flags(flags)
        .seq(1000)
        .payload(&[0x42; 64])
        .build()
}

pub fn run(report: &mut Report) -> Result<()> {
    println!("nat: per call, {CALLS} calls, median of {RUNS} runs");
    let mut trivial_obj = progs::load("bench_tx")?;
    let mut lb = Harness::new(Role::Balancer);
    lb.apply(&services());

    let mut taken = HashSet::new();
    let (nat, port) = claim(&mut taken, CLIENT, 40001);
    let established = taken.clone();
    let to_backend_in = framed(
        CLIENT_MAC,
        LB_MAC,
        &segment(CLIENT, VIP, 40001, 80, TCP_ACK | TCP_PSH),
    );
    let to_backend_out = framed(
        LB_MAC,
        mac(0x31),
        &segment(nat, BACKEND, port, 8080, TCP_ACK | TCP_PSH),
    );
    let reply_in = framed(
        mac(0x31),
        LB_MAC,
        &segment(BACKEND, nat, 8080, port, TCP_ACK | TCP_PSH),
    );
    let reply_out = framed(
        LB_MAC,
        CLIENT_MAC,
        &segment(VIP, CLIENT, 80, 40001, TCP_ACK | TCP_PSH),
    );
    let trivial_out = {
        let mut out = to_backend_in.clone();
        out[..6].copy_from_slice(&CLIENT_MAC);
        out[6..12].copy_from_slice(&LB_MAC);
        out
    };
    // The connection the first two paths use: claimed, then pinned like a real one.
    establish(
        &mut lb,
        "nat connection setup",
        &to_backend_in,
        &to_backend_out,
    )?;

    let mut call: [Vec<f64>; 4] = Default::default();
    let mut new_sources = u32::from(Ipv4Addr::new(100, 64, 0, 0));
    for run in 0..RUNS {
        print!("  run {}/{RUNS} ...", run + 1);
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        let trivial = progs::program(&mut trivial_obj, "bench_tx")?;
        call[0].push(same_frame_per_call(
            trivial,
            "trivial",
            &to_backend_in,
            XDP_TX,
            &trivial_out,
        )?);

        let before = lb.global_counters();
        call[1].push(same_frame_per_call(
            lb.dataplane.program(),
            "nat to backend",
            &to_backend_in,
            XDP_TX,
            &to_backend_out,
        )?);
        call[2].push(same_frame_per_call(
            lb.dataplane.program(),
            "nat reply",
            &reply_in,
            XDP_TX,
            &reply_out,
        )?);
        expect_counters(
            "nat established (per call)",
            &moved(&lb, &before),
            &[
                (counters::FLOW_HIT, CALLS as u64),
                (counters::NAT_REPLY, CALLS as u64),
                (counters::ACTION_TX, 2 * CALLS as u64),
            ],
        )?;

        // New connections: a fresh client address each call, so each claims a port.
        let syn = |src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16| {
            Packet::new()
                .ipv4(src, dst)
                .tcp(sport, dport)
                .flags(TCP_SYN)
                .seq(1000)
                .build()
        };
        let cases: Vec<(Vec<u8>, Vec<u8>)> = (0..CALLS as u32)
            .map(|i| {
                let src = Ipv4Addr::from(new_sources + i);
                let input = syn(src, VIP, 40002, 80);
                let (nat, port) = claim(&mut taken, src, 40002);
                let output = syn(nat, BACKEND, port, 8080);
                (input, framed(LB_MAC, mac(0x31), &output))
            })
            .collect();
        let before = lb.global_counters();
        let held_before = lb.dataplane.flows()?.len();
        call[3].push(per_call_run(
            lb.dataplane.program(),
            framed(CLIENT_MAC, LB_MAC, &cases[0].0),
            |i, frame| frame[14..].copy_from_slice(&cases[i].0),
            |i, _, action, out| expect("nat new connection", action, XDP_TX, out, &cases[i].1),
        )?);
        new_sources += CALLS as u32;
        expect_new_flows(
            "nat new connection (per call)",
            &lb,
            &before,
            held_before,
            &[
                (counters::FLOW_MISS, CALLS as u64),
                (counters::NAT_NEW, CALLS as u64),
                (counters::ACTION_TX, CALLS as u64),
            ],
        )?;
        // Frees the claims for the next run (they would otherwise fill the table).
        let now = lb_userspace::stats::monotonic_seconds();
        lb_userspace::nat::sweep(&mut lb.dataplane, now.wrapping_add(100_000))?;
        taken = established.clone();
        lb.run(&to_backend_in);
        println!(" done");
    }

    let call: Vec<f64> = call.into_iter().map(median).collect();
    let section = report.section("nat per packet (BPF_PROG_TEST_RUN, per call)");
    let per_call = "mean of kernel-reported ns over 200,000 calls with repeat = 1 (includes ~70 ns timer/call overhead); median of 5";
    section.push(Figure::new(
        "micro.nat.trivial",
        "trivial swap-MACs + XDP_TX (per call)",
        call[0],
        "ns/pkt",
        per_call,
    ));
    let pps = |ns: f64| 1e9 / ns / 1e6;
    for (key, label, ns, measures) in [
        (
            "micro.nat.to_backend",
            "nat established -> backend, IPv4 TCP",
            call[1],
            "parse, VIP, flow hit, tail call, re-parse, NAT_FWD + NAT_REV lookups, address/port rewrite with incremental checksums, XDP_TX; exact output every call",
        ),
        (
            "micro.nat.reply",
            "nat reply backend -> client, IPv4 TCP",
            call[2],
            "parse, VIP miss, tail call, re-parse, NAT_REV lookup, rewrite back, XDP_TX to the client's hop; exact output every call",
        ),
        (
            "micro.nat.new",
            "nat new connection (SYN, fresh client)",
            call[3],
            "as to_backend, plus flow-table miss, Maglev choice and the port claim (NAT_REV insert with BPF_NOEXIST, NAT_FWD insert); exact output every call",
        ),
    ] {
        section.push(
            Figure::new(key, &format!("{label} (per call)"), ns, "ns/pkt", measures)
                .ratio(ns / call[0], "trivial (per call)"),
        );
        section.push(Figure::new(
            &format!("{key}_mpps"),
            &format!("{label}: packets/s per core"),
            pps(ns),
            "Mpps",
            "1 / the per-call figure (an upper bound: the timer overhead is included, NIC and memory costs are not)",
        ));
    }
    Ok(())
}
