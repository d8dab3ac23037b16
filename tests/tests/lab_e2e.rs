//! The load balancer end to end: the real daemon in a lab of network namespaces, real TCP and
//! UDP servers on the backends and real clients. Weighted shares, every forwarding mode with
//! both address families and both protocols, a backend failing under load, two LBs behind an
//! ECMP router taking over each other's flows, and the CLI's answers to mistakes.
//!
//! Drain, reload and `kill -9` under load are in daemon_e2e.rs.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};
use xdplb_tests::lab::{
    addr, backend4, backend6, serve_tcp, stream, udp_name, who, xdplb_binary, Daemon, Lab,
    LAB_SIZES, VIP_NET4,
};

const VIP4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// A `[[vip]]` table with a ring that fits the lab daemons' `max_ring_size`.
fn vip(name: &str, address: IpAddr, protocol: &str, forwarding: &str) -> String {
    format!(
        "[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = 80\nprotocol = \"{protocol}\"\n\
         forwarding = \"{forwarding}\"\nring_size = 1021\n"
    )
}

fn backend(address: impl Into<IpAddr>, weight: u32) -> String {
    format!(
        "[[vip.backend]]\naddress = \"{}\"\nweight = {weight}\n",
        address.into()
    )
}

fn wait_available(daemon: &Daemon, vip: &str, n: u64) {
    daemon
        .wait_status(&format!("{vip}: {n} backends available"), |s| {
            s["vips"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| v["name"] == vip && v["available"].as_u64() == Some(n))
        })
        .unwrap();
}

#[test]
fn weights_1_1_2_split_new_connections_25_25_50() {
    let lab = Lab::new(3).unwrap();
    let _servers = serve_tcp(&lab);
    let services = vip("web", VIP4.into(), "tcp", "dsr")
        + &backend(backend4(0), 1)
        + &backend(backend4(1), 1)
        + &backend(backend4(2), 2);
    let daemon = Daemon::start(&lab, "", &services).unwrap();
    wait_available(&daemon, "web", 3);

    // Short connections from a few threads: each picks its own source port, so each is a
    // new flow hashed onto the ring.
    const THREADS: usize = 4;
    const PER_THREAD: usize = 550;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                scope.spawn(|| {
                    lab.client
                        .ns
                        .enter(|| {
                            (0..PER_THREAD)
                                .map(|_| who(addr(VIP4, 80)).expect("connect to the VIP"))
                                .collect::<Vec<_>>()
                        })
                        .unwrap()
                })
            })
            .collect();
        for worker in workers {
            for name in worker.join().unwrap() {
                *counts.entry(name).or_default() += 1;
            }
        }
    });
    let total = (THREADS * PER_THREAD) as f64;
    let shares: Vec<(String, f64)> = counts
        .iter()
        .map(|(name, n)| (name.clone(), 100.0 * *n as f64 / total))
        .collect();
    eprintln!("shares of {total} connections: {shares:.1?}");
    let share = |name: &str| {
        shares
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |(_, s)| *s)
    };
    for (name, expected) in [("b0", 25.0), ("b1", 25.0), ("b2", 50.0)] {
        assert!(
            (share(name) - expected).abs() <= 5.0,
            "{name} got {:.1}% of new connections, expected {expected}% +- 5: {shares:.1?}",
            share(name)
        );
    }
}

/// One VIP of the forwarding matrix.
struct Case {
    name: String,
    vip: IpAddr,
    udp: bool,
    /// Whether it is tunnelled (and so stops working without the backends' decap program).
    ipip: bool,
}

#[test]
fn every_mode_family_and_protocol_reaches_every_backend() {
    let lab = Lab::new(3).unwrap();
    let v4 = |last: u8| IpAddr::V4(Ipv4Addr::new(192, 0, 2, last));
    let v6 = |last: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, last));
    let mut cases = Vec::new();
    let mut services = String::new();
    // (name, VIP, forwarding, backends' address family): ipip covers 4in4, 6in6 and 4in6.
    let vips = [
        ("dsr4", v4(10), "dsr", 4),
        ("dsr6", v6(0x10), "dsr", 6),
        ("ipip4in4", v4(20), "ipip", 4),
        ("ipip6in6", v6(0x20), "ipip", 6),
        ("ipip4in6", v4(30), "ipip", 6),
    ];
    for (name, address, forwarding, family) in vips {
        for (protocol, udp) in [("tcp", false), ("udp", true)] {
            let name = format!("{name}-{protocol}");
            services += &vip(&name, address, protocol, forwarding);
            for n in 0..lab.backends.len() {
                let b: IpAddr = match family {
                    4 => backend4(n).into(),
                    _ => backend6(n).into(),
                };
                services += &backend(b, 1);
            }
            cases.push(Case {
                name,
                vip: address,
                udp,
                ipip: forwarding == "ipip",
            });
        }
    }

    // UDP servers bind to each VIP so that they answer from it (as DSR needs); binding to an
    // IPv6 address that is only covered by a local route needs ip_nonlocal_bind.
    let udp_vips: Vec<IpAddr> = vips.iter().map(|(_, address, ..)| *address).collect();
    let tunnelled: Vec<IpAddr> = vips
        .iter()
        .filter(|(_, _, forwarding, _)| *forwarding == "ipip")
        .map(|(_, address, ..)| *address)
        .collect();
    let mut servers = Vec::new();
    let mut decaps = Vec::new();
    for (n, b) in lab.backends.iter().enumerate() {
        b.ns.exec("sysctl -qw net.ipv6.ip_nonlocal_bind=1").unwrap();
        let name = format!("b{n}");
        servers.push(b.serve(&name, "[::]:80", "tcp").unwrap());
        for address in &udp_vips {
            let listen = addr(*address, 80).to_string();
            servers.push(b.serve(&name, &listen, "udp").unwrap());
        }
        decaps.push(b.decap(&[b.ip4.into(), b.ip6.into()], &tunnelled).unwrap());
    }
    for b in &lab.backends {
        b.wait_sockets(1, udp_vips.len()).unwrap();
    }
    let sizes = LAB_SIZES.replace("max_vips = 8", "max_vips = 16");
    let daemon = Daemon::start_on(&lab.lb.ns, &lab.id, &sizes, &services).unwrap();
    for case in &cases {
        wait_available(&daemon, &case.name, 3);
    }

    let ask = |case: &Case| {
        let vip = addr(case.vip, 80);
        if case.udp {
            udp_name(vip)
        } else {
            who(vip)
        }
    };
    lab.client
        .ns
        .enter(|| {
            for case in &cases {
                // Each request comes from a new source port: a new flow, hashed anew. 40
                // requests miss one of three backends with a probability of 3 * (2/3)^40.
                let mut seen = BTreeSet::new();
                for _ in 0..40 {
                    let name = ask(case).unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
                    seen.insert(name);
                    if seen.len() == 3 {
                        break;
                    }
                }
                assert_eq!(seen.len(), 3, "{} reached only {seen:?}", case.name);
            }
        })
        .unwrap();

    // Without the decap program the tunnelled VIPs go silent (this kernel has no ipip module)
    // while dsr keeps working: so the answers above really came through the tunnels.
    drop(decaps);
    let answers: Vec<(&String, bool)> = lab
        .client
        .ns
        .enter(|| {
            thread::scope(|scope| {
                let asks: Vec<_> = cases
                    .iter()
                    .map(|case| scope.spawn(|| (&case.name, ask(case).is_ok())))
                    .collect();
                asks.into_iter().map(|a| a.join().unwrap()).collect()
            })
        })
        .unwrap();
    for (case, (name, answered)) in cases.iter().zip(answers) {
        assert_eq!(
            answered, !case.ipip,
            "{name}: answered {answered} without the decap program"
        );
    }
}

#[test]
fn a_failed_backend_breaks_only_its_own_transfers() {
    const TRANSFERS: usize = 9;
    /// 2 MB at 400 kB/s: 5 s, long enough to span the failure and its detection.
    const BYTES: u64 = 2_000_000;
    const RATE: u64 = 400_000;
    let lab = Lab::new(3).unwrap();
    let mut servers = serve_tcp(&lab);
    let mut services = vip("web", VIP4.into(), "tcp", "dsr")
        + "[vip.health]\nkind = \"tcp\"\ninterval = \"300ms\"\ntimeout = \"200ms\"\n\
           rise = 2\nfall = 2\n";
    for n in 0..3 {
        services += &backend(backend4(n), 1);
    }
    let daemon = Daemon::start(&lab, "", &services).unwrap();
    wait_available(&daemon, "web", 3);

    let (started_tx, started) = mpsc::channel();
    thread::scope(|scope| {
        // Each transfer returns the backend it started on with its outcome.
        let transfers: Vec<_> = (0..TRANSFERS)
            .map(|_| {
                let started_tx = started_tx.clone();
                let client = &lab.client.ns;
                scope.spawn(move || {
                    let mut serving = String::new();
                    let outcome = client
                        .enter(|| {
                            stream(addr(VIP4, 80), BYTES, RATE, |name| {
                                serving = name.to_string();
                                started_tx.send(name.to_string()).unwrap()
                            })
                        })
                        .unwrap();
                    (serving, outcome)
                })
            })
            .collect();
        let names: Vec<String> = (0..TRANSFERS)
            .map(|_| started.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        let distinct: BTreeSet<&String> = names.iter().collect();
        assert!(distinct.len() >= 2, "all transfers went to {distinct:?}");

        // Kill the server of the first transfer's backend: its sockets close mid-transfer.
        let victim = names[0].clone();
        let n: usize = victim[1..].parse().unwrap();
        let killed_at = Instant::now();
        servers[n].0.kill().unwrap();
        let victim_addr = backend4(n).to_string();
        daemon
            .wait_status("the health check to mark the backend down", |s| {
                s["vips"][0]["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|b| b["address"] == victim_addr.as_str() && b["health"] == "down")
            })
            .unwrap();
        wait_available(&daemon, "web", 2);
        eprintln!(
            "{victim} marked down {:?} after its server was killed",
            killed_at.elapsed()
        );

        // From now on every new connection succeeds, on the two others.
        let names: Vec<String> = lab
            .client
            .ns
            .enter(|| {
                (0..150)
                    .map(|i| {
                        who(addr(VIP4, 80))
                            .unwrap_or_else(|e| panic!("new connection {i} failed: {e:#}"))
                    })
                    .collect()
            })
            .unwrap();
        assert!(
            !names.contains(&victim),
            "a new connection reached the failed {victim}"
        );

        let mut completed = 0;
        for transfer in transfers {
            let (serving, outcome) = transfer.join().unwrap();
            if serving == victim {
                // Broken, as expected: reset, or closed before the end.
                if let Ok((_, bytes)) = outcome {
                    assert!(bytes < BYTES, "a transfer survived its killed server");
                }
            } else {
                let (_, bytes) = outcome.unwrap_or_else(|e| {
                    panic!("a transfer from {serving} (not the failed one) broke: {e:#}")
                });
                assert_eq!(bytes, BYTES, "a transfer from {serving} was cut short");
                completed += 1;
            }
        }
        eprintln!("{completed} transfers on the other backends completed");
    });
}

#[test]
fn a_flow_moved_to_the_other_ecmp_lb_keeps_its_backend() {
    const BYTES: u64 = 3_000_000;
    const RATE: u64 = 600_000;
    let lab = Lab::with_ecmp(3).unwrap();
    let _servers = serve_tcp(&lab);
    let lb2 = lab.lb2.as_ref().unwrap();
    let router = lab.router.as_ref().unwrap();
    let mut services = vip("web", VIP4.into(), "tcp", "dsr");
    for n in 0..3 {
        services += &backend(backend4(n), 1);
    }
    // Same VIPs, backends and seed on both: a flow maps to the same backend on either LB.
    let keys = format!("{LAB_SIZES}hash_seed = 2718\n");
    let daemons = [
        Daemon::start_on(&lab.lb.ns, &lab.id, &keys, &services).unwrap(),
        Daemon::start_on(&lb2.ns, &format!("{}-lb2", lab.id), &keys, &services).unwrap(),
    ];
    for daemon in &daemons {
        wait_available(daemon, "web", 3);
    }
    let lb_addrs = [lab.lb.ip4, lb2.ip4];

    // The flows each LB holds for the VIP: (client, backend).
    let flows = |daemon: &Daemon| -> Vec<(String, String)> {
        daemon
            .flows("web")
            .unwrap()
            .iter()
            .map(|f| {
                let field = |k: &str| f[k].as_str().unwrap_or_default().to_string();
                (field("client"), field("backend"))
            })
            .collect()
    };
    let wait_for_flow = |daemon: &Daemon| -> Option<(String, String)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(flow) = flows(daemon).pop() {
                return Some(flow);
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    };

    let (started_tx, started) = mpsc::channel();
    thread::scope(|scope| {
        let transfer = scope.spawn(|| {
            lab.client
                .ns
                .enter(|| {
                    stream(addr(VIP4, 80), BYTES, RATE, |name| {
                        started_tx.send(name.to_string()).unwrap()
                    })
                })
                .unwrap()
        });
        let serving = started.recv_timeout(Duration::from_secs(10)).unwrap();
        // Only this transfer crosses the LBs, so the one holding a flow carries it.
        let (first, _) = (0..2)
            .find_map(|i| flows(&daemons[i]).pop().map(|flow| (i, flow)))
            .expect("neither LB has the transfer's flow");
        let other = 1 - first;
        assert!(flows(&daemons[other]).is_empty());
        router
            .ns
            .exec(&format!(
                "ip route replace {VIP_NET4} via {}",
                lb_addrs[other]
            ))
            .unwrap();
        // The client's next ACK reaches the other LB, which has never seen the flow: it must
        // pick the same backend from its own ring.
        let (client, backend) =
            wait_for_flow(&daemons[other]).expect("the flow did not move to the other LB");
        let serving_addr = backend4(serving[1..].parse().unwrap()).to_string();
        assert_eq!(backend, serving_addr, "{client} moved to another backend");
        let (name, bytes) = transfer.join().unwrap().expect("the moved transfer broke");
        assert_eq!((name.as_str(), bytes), (serving.as_str(), BYTES));
        eprintln!(
            "moved from lb{} to lb{}: {client} -> {backend}",
            first + 1,
            other + 1
        );
    });
}

/// `xdplb check FILE`: (exit code, stdout, stderr).
fn check(file: &std::path::Path) -> (Option<i32>, String, String) {
    let out = Command::new(xdplb_binary())
        .args(["check", "-c"])
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A file removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn check_lists_every_problem_and_accepts_the_example() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/xdplb.toml");
    let (code, stdout, stderr) = check(&example);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("web") && stdout.contains("api"), "{stdout}");

    let bad = TempFile::new(
        "bad.toml",
        "[daemon]\ninterfaces = []\nmax_vips = 0\nidle_timeout = \"5 minutes\"\n\
         [[vip]]\nname = \"web\"\naddress = \"192.0.2.300\"\nport = 80\nring_size = 100\n\
         [vip.health]\nkind = \"tcp\"\ntimeout = \"2s\"\n\
         [[vip.backend]]\naddress = \"10.0.0.11\"\nweight = 70000\n",
    );
    let (code, stdout, stderr) = check(&bad.0);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let keys = [
        "daemon.interfaces",
        "daemon.max_vips",
        "daemon.idle_timeout",
        "vip[0] (web).address",
        "vip[0] (web).ring_size",
        "vip[0] (web).health.timeout",
        "vip[0] (web).backend[0].weight",
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), keys.len(), "one line per problem:\n{stderr}");
    for key in keys {
        assert!(
            lines.iter().any(|l| l.contains(&format!(": {key}: "))),
            "{key} not reported:\n{stderr}"
        );
    }

    let syntax = TempFile::new("syntax.toml", "[daemon\ninterfaces = [\"eth0\"]\n");
    let (code, _, stderr) = check(&syntax.0);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("syntax.toml:1:"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let (code, _, stderr) = check(std::path::Path::new("/nonexistent/xdplb.toml"));
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("cannot read /nonexistent/xdplb.toml"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn cli_mistakes_get_one_line_errors() {
    let lab = Lab::new(1).unwrap();
    let daemon = Daemon::start(
        &lab,
        "",
        &(vip("web", VIP4.into(), "tcp", "dsr") + &backend(backend4(0), 1)),
    )
    .unwrap();
    let one_line = |args: &[&str], expected: &str| {
        let err = daemon.cli(args).unwrap_err().to_string();
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    };
    one_line(&["flows", "nope"], "no VIP \"nope\" (configured: web)");
    one_line(&["weight", "nope", "10.0.0.11", "5"], "no VIP \"nope\"");
    one_line(&["undrain", "nope", "10.0.0.11"], "no VIP \"nope\"");
    one_line(
        &["weight", "web", "10.0.0.11", "heavy"],
        "expected 0..=65535",
    );
    one_line(
        &["weight", "web", "10.0.0.99", "5"],
        "has no backend 10.0.0.99",
    );
}
