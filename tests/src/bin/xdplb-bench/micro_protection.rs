//! What edge protection costs per packet, through `BPF_PROG_TEST_RUN` like [`crate::micro`]:
//! * a flow hit on a VIP with 10,000 ACL prefixes next to the same hit on a VIP without ACL
//!   (repeat mode, interleaved in the same runs);
//! * a new flow on a VIP with new-flow limits (per source and per VIP, never reached) next to
//!   one without (per call, a fresh source each call: cold per-source buckets);
//! * a spoofed flood (fresh tuples, SYN then ACK each) through a 4,096-entry flow table while
//!   a pinned flow holds a drained backend: the rate one core absorbs, and the flow checked
//!   to keep its backend afterwards.

use crate::{
    micro::{
        establish, expect, expect_counters, framed, mac, median, moved, new_flows_per_call,
        per_call_run, predicted_mac, repeat_run, tcp4, with_macs, CALLS, REPEAT, RING, RUNS, SEED,
        XDP_TX,
    },
    report::{Figure, Report},
};
use anyhow::Result;
use lb_common::{counters, PROTO_TCP};
use lb_userspace::{
    acl::AclSpec,
    dataplane::Role,
    limits::LimitsSpec,
    model::{DataPathSettings, Forwarding, Prefix, Protocol, Services, VipAddr},
    state::BackendStatus,
};
use std::net::{IpAddr, Ipv4Addr};
use xdplb_tests::{
    fixture::flow_key,
    harness::{vip_spec, Harness, CLIENT_MAC, LB_MAC},
    packet::{TCP_ACK, TCP_SYN},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub(crate) const PLAIN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const FILTERED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const LIMITED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 12);
const ACL_PREFIXES: u32 = 10_000;

pub(crate) fn services(acl: AclSpec, limits: Option<LimitsSpec>) -> Services {
    let vip = |addr: Ipv4Addr| VipAddr {
        addr: addr.into(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let backends: Vec<(IpAddr, [u8; 6], u32)> = (0..4u8)
        .map(|i| (Ipv4Addr::new(10, 1, 0, 11 + i).into(), mac(0x11 + i), 100))
        .collect();
    let mut filtered = vip_spec("filtered", vip(FILTERED), Forwarding::Dsr, RING, &backends);
    filtered.acl = acl;
    let mut limited = vip_spec("limited", vip(LIMITED), Forwarding::Dsr, RING, &backends);
    limited.limits = limits;
    Services {
        settings: DataPathSettings {
            hash_seed: SEED,
            ..DataPathSettings::default()
        },
        vips: vec![
            vip_spec("plain", vip(PLAIN), Forwarding::Dsr, RING, &backends),
            filtered,
            limited,
        ],
    }
}

/// 10,000 allowed /24s spread over 10.0.0.0/8 and 172.16.0.0/12, plus the client's.
fn big_acl() -> AclSpec {
    let mut allow: Vec<Prefix> = (0..ACL_PREFIXES - 1)
        .map(|i| {
            let base = if i % 2 == 0 { 0x0a00_0000 } else { 0xac10_0000 };
            let net = Ipv4Addr::from(base + (((i / 2 * 7919) % 65536) << 8));
            format!("{net}/24").parse().unwrap()
        })
        .collect();
    allow.sort_by_key(|p| p.to_string());
    allow.dedup();
    allow.push("198.51.100.0/24".parse().unwrap());
    AclSpec {
        allow: Some(allow),
        deny: Vec::new(),
    }
}

pub fn run(report: &mut Report) -> Result<()> {
    println!("edge protection: 10,000-prefix ACL, new-flow limits, spoofed flood");
    let acl = big_acl();
    let prefixes = acl.allow.as_ref().map_or(0, Vec::len);
    let limits = LimitsSpec {
        per_source: Some(10_000_000),
        burst: None,
        total: Some(10_000_000),
    };
    let mut lb = Harness::new(Role::Balancer);
    lb.apply(&services(acl, Some(limits)));

    let hit = |vip: Ipv4Addr, sport| -> Result<(Vec<u8>, Vec<u8>)> {
        let frame = framed(
            CLIENT_MAC,
            LB_MAC,
            &tcp4(CLIENT, vip, sport, TCP_ACK).build(),
        );
        let key = flow_key(CLIENT.into(), vip.into(), sport, 80, PROTO_TCP);
        let out = with_macs(&frame, predicted_mac(&lb, vip.into(), &key)?, LB_MAC);
        Ok((frame, out))
    };
    let (plain_hit, plain_out) = hit(PLAIN, 41001)?;
    let (acl_hit, acl_out) = hit(FILTERED, 41002)?;
    for (frame, out) in [(&plain_hit, &plain_out), (&acl_hit, &acl_out)] {
        establish(&mut lb, "establishing", frame, out)?;
    }

    let mut rep: [Vec<f64>; 2] = Default::default();
    let mut call: [Vec<f64>; 2] = Default::default();
    let mut fresh = 0u32;
    for run in 0..RUNS {
        print!("  run {}/{RUNS} ...", run + 1);
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        for (slot, frame, want) in [(0, &plain_hit, &plain_out), (1, &acl_hit, &acl_out)] {
            let before = lb.global_counters();
            let (ns, action, out) = repeat_run(lb.dataplane.program(), frame)?;
            expect("flow hit (repeat)", action, XDP_TX, &out, want)?;
            expect_counters(
                "flow hit (repeat)",
                &moved(&lb, &before),
                &[
                    (counters::FLOW_HIT, REPEAT as u64),
                    (counters::ACTION_TX, REPEAT as u64),
                ],
            )?;
            rep[slot].push(ns);
        }
        for (slot, vip) in [(0, PLAIN), (1, LIMITED)] {
            call[slot].push(new_flows_per_call(
                &mut lb,
                vip,
                41003,
                0x6440_0000 + fresh,
            )?);
            fresh += CALLS as u32;
        }
        println!(" done");
    }
    let flood = flood()?;

    let rep: Vec<f64> = rep.into_iter().map(median).collect();
    let call: Vec<f64> = call.into_iter().map(median).collect();
    let section = report.section("Edge protection (BPF_PROG_TEST_RUN)");
    section.push(Figure::new(
        "protection.repeat.flow_hit_no_acl",
        "flow hit -> dsr, VIP without ACL (repeat)",
        rep[0],
        "ns/pkt",
        "the flow-hit path of a VIP that uses no filter stage, in the same runs as the next figure",
    ));
    let extra = rep[1] - rep[0];
    section.push(
        Figure::new(
            "protection.repeat.flow_hit_acl_10k",
            &format!("flow hit -> dsr, VIP with {prefixes} ACL prefixes (repeat)"),
            rep[1],
            "ns/pkt",
            &format!(
                "one LPM-trie lookup of the source among {prefixes} allowed /24s (+{extra:.1} ns); checked: TX, expected MAC, FLOW_HIT += 1e6"
            ),
        )
        .target("<= +15 ns over no ACL", extra <= 15.0),
    );
    section.push(Figure::new(
        "protection.per_call.new_flow_no_limits",
        "new flow -> dsr, no limits (per call)",
        call[0],
        "ns/pkt",
        "fresh source each call, VIP without limits; same runs as the next figure",
    ));
    section.push(Figure::new(
        "protection.per_call.new_flow_limits",
        "new flow -> dsr, per-source and VIP limits (per call)",
        call[1],
        "ns/pkt",
        &format!(
            "fresh source each call: its two per-source buckets and the VIP bucket advanced (+{:.1} ns); limits never reached",
            call[1] - call[0]
        ),
    ));
    section.push(Figure::new(
        "protection.per_call.flood",
        "spoofed flood, SYN then ACK per tuple (per call)",
        flood.ns,
        "ns/pkt",
        &format!(
            "{} packets through a 4,096-entry flow table (about {:.1} M packets/s per core at this cost, timer overhead included); the pinned flow of a drained backend kept its backend: checked",
            flood.packets,
            1000.0 / flood.ns
        ),
    ));
    Ok(())
}

struct Flood {
    ns: f64,
    packets: usize,
}

/// A flow pinned to backend A, A drained, then fresh spoofed tuples SYN then ACK each; the
/// flow must still reach A afterwards.
fn flood() -> Result<Flood> {
    let mut lb = Harness::new(Role::Balancer);
    let services = services(AclSpec::default(), None);
    lb.apply(&services);
    let (frame, key) = {
        let frame = framed(
            CLIENT_MAC,
            LB_MAC,
            &tcp4(CLIENT, PLAIN, 41005, TCP_ACK).build(),
        );
        (
            frame,
            flow_key(CLIENT.into(), PLAIN.into(), 41005, 80, PROTO_TCP),
        )
    };
    let backend_mac = predicted_mac(&lb, PLAIN.into(), &key)?;
    let want = with_macs(&frame, backend_mac, LB_MAC);
    establish(&mut lb, "pinned flow", &frame, &want)?;
    let backend = services.vips[0]
        .backends
        .iter()
        .find(|b| b.mac.map(|m| m.0) == Some(backend_mac))
        .expect("backend of the MAC")
        .addr;
    lb.status.insert(
        ("plain".into(), backend),
        BackendStatus {
            drained: true,
            ..BackendStatus::default()
        },
    );
    lb.apply(&services);

    let packets = CALLS;
    let syn = framed(
        CLIENT_MAC,
        LB_MAC,
        &tcp4(CLIENT, PLAIN, 1024, TCP_SYN).build(),
    );
    let ns = per_call_run(
        lb.dataplane.program(),
        syn,
        |i, frame| {
            let tuple = (i / 2) as u32;
            frame[26..30].copy_from_slice(&(0x0ac8_0000 + (tuple >> 8)).to_be_bytes());
            frame[34..36].copy_from_slice(&(1024 + (tuple & 0xff) as u16).to_be_bytes());
            // TCP flags; the checksum is not checked on this path.
            frame[47] = if i % 2 == 0 { TCP_SYN } else { TCP_ACK };
        },
        |_, _, action, _| {
            anyhow::ensure!(action == XDP_TX, "flood packet not forwarded: {action}");
            Ok(())
        },
    )?;
    anyhow::ensure!(
        lb.dataplane.flow(&key)?.is_none(),
        "the flood did not evict the pinned flow from the flow table: it proves nothing"
    );
    let outcome = lb.run(&frame);
    expect(
        "pinned flow after the flood",
        outcome.action,
        XDP_TX,
        &outcome.output,
        &want,
    )?;
    Ok(Flood { ns, packets })
}
