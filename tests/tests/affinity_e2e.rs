//! Client affinity end to end: two LBs behind an ECMP router (each connection reaches one of
//! them by a hash of its 5-tuple), both with `affinity = "client"`. Every connection of a
//! client lands on one backend whichever LB carries it, clients spread over the backends,
//! and a drain moves only the drained backend's clients.

use anyhow::{ensure, Result};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};
use xdplb_tests::lab::{backend4, Daemon, Lab, Process, ECMP_CLIENT4, LAB_SIZES};

const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Extra client addresses on the client's link (10.0.1.0/24, routed by the router).
const CLIENTS: u8 = 8;

fn client(n: u8) -> Ipv4Addr {
    if n == 0 {
        ECMP_CLIENT4
    } else {
        Ipv4Addr::new(10, 0, 1, 20 + n)
    }
}

/// `count` HTTP connections from `source`, each from a new port: the backends' names.
fn names(lab: &Lab, source: Ipv4Addr, count: usize) -> Result<Vec<String>> {
    let out = lab.client.ns.exec(&format!(
        "for i in $(seq {count}); do curl -s --max-time 3 --interface {source} http://{VIP4}/ \
         || echo FAILED; done"
    ))?;
    Ok(out.lines().map(str::to_string).collect())
}

/// The one backend all `count` connections of `source` reached.
fn backend_of(lab: &Lab, source: Ipv4Addr, count: usize) -> Result<String> {
    let seen: BTreeSet<String> = names(lab, source, count)?.into_iter().collect();
    ensure!(
        seen.len() == 1,
        "{source}'s {count} connections reached {seen:?}"
    );
    Ok(seen.into_iter().next().unwrap())
}

/// Packets each LB forwarded for the VIP (from `xdplb stats --json`).
fn vip_packets(daemon: &Daemon) -> Result<u64> {
    let json: serde_json::Value = serde_json::from_str(&daemon.cli(&["stats", "--json"])?)?;
    Ok(json["vips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["totals"]["packets"].as_u64())
        .sum())
}

#[test]
fn a_clients_connections_share_a_backend_on_both_lbs_and_a_drain_moves_only_its_clients(
) -> Result<()> {
    let lab = Lab::with_ecmp(3)?;
    let servers: Vec<Process> = lab
        .backends
        .iter()
        .enumerate()
        .map(|(n, b)| b.serve(&format!("b{n}"), "[::]:80", "tcp"))
        .collect::<Result<_>>()?;
    for b in &lab.backends {
        b.wait_sockets(1, 0)?;
    }
    for n in 1..CLIENTS {
        lab.client
            .ns
            .exec(&format!("ip addr add {}/24 dev eth0", client(n)))?;
    }
    let mut services = format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP4}\"\nport = 80\naffinity = \"client\"\n\
         ring_size = 1021\n"
    );
    for n in 0..3 {
        services += &format!("[[vip.backend]]\naddress = \"{}\"\n", backend4(n));
    }
    let keys = format!("{LAB_SIZES}hash_seed = 2718\nstats_interval = \"200ms\"\n");
    let lb2 = lab.lb2.as_ref().expect("an ECMP lab");
    let daemons = [
        Daemon::start_on(&lab.lb.ns, &lab.id, &keys, &services)?,
        Daemon::start_on(&lb2.ns, &format!("{}-lb2", lab.id), &keys, &services)?,
    ];
    for daemon in &daemons {
        daemon.wait_status("web: 3 backends available", |s| {
            s["vips"][0]["available"].as_u64() == Some(3)
        })?;
        ensure!(daemon.cli(&["status"])?.contains("affinity client"));
    }

    // 200 connections of one client: one backend, although the router spread them over both
    // LBs (each made the same choice).
    let main = backend_of(&lab, client(0), 200)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while daemons.iter().any(|d| vip_packets(d).unwrap_or(0) == 0) {
        ensure!(
            std::time::Instant::now() < deadline,
            "the router did not use both LBs for 200 connections"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // The other clients: each on one backend, and together on more than one.
    let mut before: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    before.insert(client(0), main.clone());
    for n in 1..CLIENTS {
        before.insert(client(n), backend_of(&lab, client(n), 20)?);
    }
    let used: BTreeSet<&String> = before.values().collect();
    eprintln!("clients and their backends: {before:?}");
    ensure!(used.len() >= 2, "{CLIENTS} clients all on {used:?}");

    // Drain the first client's backend on both LBs: its clients move (each to one backend),
    // every other client stays.
    let drained = lab.backends[main[1..].parse::<usize>()?].ip4.to_string();
    for daemon in &daemons {
        daemon.cli(&["drain", "web", &drained])?;
        daemon.wait_status("web: 2 backends available", |s| {
            s["vips"][0]["available"].as_u64() == Some(2)
        })?;
    }
    for (source, old) in &before {
        let new = backend_of(&lab, *source, 20)?;
        if *old == main {
            ensure!(new != main, "{source} still reaches the drained {main}");
        } else {
            ensure!(
                new == *old,
                "{source} moved from {old} to {new} though {old} stayed"
            );
        }
    }
    drop(servers);
    Ok(())
}
