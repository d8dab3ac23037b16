//! Path MTU discovery through the load balancer, end to end: real TCP stacks, a real router
//! that sends real ICMP, the real daemon and the backends' decap program.
//!
//! * Downloads: the client sits behind a router whose client-side link has MTU 1400 (client
//!   and backends at 1500). A backend's 1500-byte replies make the router send "fragmentation
//!   needed" / "packet too big" to the VIP, i.e. to the load balancer, which must hand it to
//!   the backend of that connection, or the download stalls for ever.
//! * Uploads: a client at MTU 1500 sends full-size segments to an `ipip` VIP whose backends are
//!   at 1500: they do not fit the tunnel, and the load balancer must answer with ICMP so that
//!   the client lowers its segments.
//!
//! Each transfer is bounded: a stalled connection fails its 10-second read or write timeout.
//! Run against the previous data path (XDPLB_BIN=<old xdplb>), every transfer here stalls.

use anyhow::{ensure, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};
use xdplb_tests::lab::{addr, backend4, backend6, stream, upload, Daemon, Lab, Process};

const DOWNLOAD: u64 = 4 << 20;
const UPLOAD: u64 = 2 << 20;
/// Bytes per second the server aims at: fast, but paced so a 2-core machine keeps up.
const RATE: u64 = 40 << 20;

struct Vip {
    name: &'static str,
    address: IpAddr,
    forwarding: &'static str,
    /// Backends' address family.
    family: u8,
}

/// A VIP per mode and family: dsr4, dsr6, ipip4 (4in4), ipip6 (6in6).
fn vips() -> [Vip; 4] {
    let vip = |name, address, forwarding, family| Vip {
        name,
        address,
        forwarding,
        family,
    };
    [
        vip("dsr4", vip4(10), "dsr", 4),
        vip("dsr6", vip6(0x10), "dsr", 6),
        vip("ipip4", vip4(20), "ipip", 4),
        vip("ipip6", vip6(0x20), "ipip", 6),
    ]
}

fn vip4(last: u8) -> IpAddr {
    Ipv4Addr::new(192, 0, 2, last).into()
}

fn vip6(last: u16) -> IpAddr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, last).into()
}

/// Config, TCP servers and (for `ipip`) the decap program on every backend.
fn serve(lab: &Lab, vips: &[Vip]) -> Result<(Daemon, Vec<Process>)> {
    let mut services = String::new();
    for vip in vips {
        services += &format!(
            "[[vip]]\nname = \"{}\"\naddress = \"{}\"\nport = 80\nforwarding = \"{}\"\n\
             ring_size = 1021\n",
            vip.name, vip.address, vip.forwarding
        );
        for n in 0..lab.backends.len() {
            let backend: IpAddr = if vip.family == 4 {
                backend4(n).into()
            } else {
                backend6(n).into()
            };
            services += &format!("[[vip.backend]]\naddress = \"{backend}\"\n");
        }
    }
    let tunnelled: Vec<IpAddr> = vips
        .iter()
        .filter(|v| v.forwarding == "ipip")
        .map(|v| v.address)
        .collect();
    let mut processes = Vec::new();
    for (n, b) in lab.backends.iter().enumerate() {
        processes.push(b.serve(&format!("b{n}"), "[::]:80", "tcp")?);
        if !tunnelled.is_empty() {
            processes.push(b.decap(&[b.ip4.into(), b.ip6.into()], &tunnelled)?);
        }
    }
    for b in &lab.backends {
        b.wait_sockets(1, 0)?;
    }
    let daemon = Daemon::start(lab, "", &services)?;
    for vip in vips {
        let expected = format!("{}: {} backends available", vip.name, lab.backends.len());
        daemon.wait_status(&expected, |s| {
            s["vips"].as_array().into_iter().flatten().any(|v| {
                v["name"] == vip.name && v["available"].as_u64() == Some(lab.backends.len() as u64)
            })
        })?;
    }
    Ok((daemon, processes))
}

/// How much the global counter `name` grew past `before`, waiting up to 5 s for the daemon's
/// next sample (counters are read every `stats_interval`).
fn grown(daemon: &Daemon, name: &str, before: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = counter(daemon, name)?;
        if now > before || Instant::now() > deadline {
            return Ok(now - before);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The daemon's global counter `name` (from `xdplb stats --json`).
fn counter(daemon: &Daemon, name: &str) -> Result<u64> {
    let json: serde_json::Value = serde_json::from_str(&daemon.cli(&["stats", "--json"])?)?;
    let value = json["global"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .and_then(|c| c["total"].as_u64());
    value.ok_or_else(|| anyhow::anyhow!("no counter {name} in {json}"))
}

#[test]
fn downloads_complete_through_a_smaller_client_link_in_dsr_and_ipip() -> Result<()> {
    let lab = Lab::behind_router(2, 1400)?;
    let vips = vips();
    let (daemon, _processes) = serve(&lab, &vips)?;
    let router = lab.router.as_ref().expect("a router lab");
    let mut forwarded_total = 0;
    for vip in &vips {
        // A backend caches the path MTU per client address: forget what the previous case
        // taught it, so each case needs its own ICMP errors.
        for b in &lab.backends {
            b.ns.exec("ip route flush cache && ip -6 route flush cache")?;
        }
        let before = counter(&daemon, "icmp_error_forwarded")?;
        let (backend, received) = lab
            .client
            .ns
            .enter(|| stream(addr(vip.address, 80), DOWNLOAD, RATE, |_| {}))?
            .map_err(|e| anyhow::anyhow!("{}: download stalled or failed: {e:#}", vip.name))?;
        ensure!(
            received == DOWNLOAD,
            "{}: received {received} of {DOWNLOAD} bytes from {backend}",
            vip.name
        );
        let forwarded = grown(&daemon, "icmp_error_forwarded", before)?;
        eprintln!(
            "{}: 4 MiB from {backend}, {forwarded} ICMP errors forwarded",
            vip.name
        );
        // The path really was too small: the router complained and the LB passed it on.
        ensure!(
            forwarded > 0,
            "{}: no ICMP error reached a backend",
            vip.name
        );
        forwarded_total += forwarded;
    }
    // They are the router's own errors (nothing in this lab fakes ICMP).
    let sent: u64 = router
        .ns
        .exec("nstat -az IcmpOutDestUnreachs Icmp6OutPktTooBigs")?
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    eprintln!("router sent {sent} ICMP errors, the LB forwarded {forwarded_total}");
    ensure!(
        forwarded_total <= sent,
        "the LB forwarded more errors than the router sent"
    );
    Ok(())
}

#[test]
fn uploads_to_an_ipip_vip_complete() -> Result<()> {
    let lab = Lab::new(2)?;
    // The tunnelled ones: a client at 1500 does not fit a tunnel whose path is 1500.
    let vips = &vips()[2..];
    let (daemon, _processes) = serve(&lab, vips)?;
    for vip in vips {
        let before = counter(&daemon, "icmp_too_big_sent")?;
        let (backend, stored) = lab
            .client
            .ns
            .enter(|| upload(addr(vip.address, 80), UPLOAD))?
            .map_err(|e| anyhow::anyhow!("{}: upload stalled or failed: {e:#}", vip.name))?;
        ensure!(
            stored == UPLOAD,
            "{}: {backend} stored {stored} of {UPLOAD} bytes",
            vip.name
        );
        let sent = grown(&daemon, "icmp_too_big_sent", before)?;
        eprintln!("{}: 2 MiB to {backend}, {sent} too-big replies", vip.name);
        ensure!(
            sent > 0,
            "{}: the client never had to lower its MTU",
            vip.name
        );
    }
    Ok(())
}
