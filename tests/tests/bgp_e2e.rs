//! No single point of failure, end to end with a real BGP daemon: two LBs run `xdplb run` and
//! BIRD 2 (the config of docs/ha.md), a router runs BIRD with ECMP and learns the VIP from
//! both; a client behind the router; three backends. With streams and a connection ticker
//! running:
//!
//! 1. both LBs announce: the router's VIP route has two next hops and connections use both;
//! 2. SIGTERM on LB1: the route loses LB1 before its daemon exits, LB1's streams finish
//!    byte for byte through LB2, the ticker sees no failure;
//! 3. LB1 restarted: announced again within seconds, new connections use it;
//! 4. every backend failing its checks (on both LBs): withdrawn everywhere; back: announced;
//! 5. `announce = "never"` and `"always"` do what they say;
//!
//! and `kill -9` leaves the announcement to the next daemon, which takes it over; a VIP
//! removed from the config is withdrawn.
//!
//! The failover figures are printed (`-- --nocapture`) for the closing note.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};
use xdplb_tests::{
    bird::{self, Bird, ANNOUNCE_TABLE},
    lab::{addr, backend4, backend6, stream, who, Daemon, Host, Lab, Process, LAB_SIZES},
};

const WEB: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const NEVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const ALWAYS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 12);
/// IPv6 routes go into the announce table too (the lab's BIRD exports IPv4 only).
const ALWAYS6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x12);
/// Health checks of `web` go to this port, so failing them leaves port 80 serving.
const HEALTH_PORT: u16 = 8080;
const GRACE: Duration = Duration::from_secs(3);

fn services() -> String {
    let backends: String = (0..3)
        .map(|n| format!("[[vip.backend]]\naddress = \"{}\"\n", backend4(n)))
        .collect();
    let vip = |name: &str, address: Ipv4Addr, extra: &str| {
        format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = 80\nring_size = 1021\n\
             {extra}{backends}"
        )
    };
    let checks = |port: u16| {
        format!(
            "[vip.health]\nkind = \"tcp\"\nport = {port}\ninterval = \"200ms\"\n\
             timeout = \"100ms\"\nrise = 2\nfall = 2\n"
        )
    };
    [
        vip("web", WEB, &checks(HEALTH_PORT)),
        vip("never", NEVER, "announce = \"never\"\n"),
        // Nothing listens on 8081: every backend is down, and the VIP is announced anyway.
        vip(
            "always",
            ALWAYS,
            &format!("announce = \"always\"\n{}", checks(8081)),
        ),
        format!(
            "[[vip]]\nname = \"always6\"\naddress = \"{ALWAYS6}\"\nport = 80\n\
             ring_size = 1021\nannounce = \"always\"\n[[vip.backend]]\naddress = \"{}\"\n",
            backend6(0)
        ),
    ]
    .concat()
}

/// The router's next hops toward `vip` (none when it has no route).
fn router_hops(router: &Host, vip: Ipv4Addr) -> BTreeSet<Ipv4Addr> {
    let text = router
        .ns
        .exec(&format!("ip route show {vip}/32"))
        .unwrap_or_default();
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "via")
        .filter_map(|w| w[1].parse().ok())
        .collect()
}

/// Polls the router every few milliseconds until its hops toward `vip` are `want`; returns
/// how long that took.
fn wait_hops(router: &Host, vip: Ipv4Addr, want: &[Ipv4Addr], within: Duration) -> Duration {
    let want: BTreeSet<Ipv4Addr> = want.iter().copied().collect();
    let start = Instant::now();
    loop {
        let hops = router_hops(router, vip);
        if hops == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "router's route to {vip}: {hops:?}, not {want:?} within {within:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// The routes of an LB's announce table, for `family` ("-4" or "-6").
fn announce_table(lb: &Host, family: &str) -> String {
    lb.ns
        .exec(&format!("ip {family} route show table {ANNOUNCE_TABLE}"))
        .unwrap()
}

/// The VIP's announce line in `xdplb status --json`.
fn announce_state(daemon: &Daemon, vip: &str) -> String {
    let status = daemon.cli_json(&["status"]).unwrap();
    named(&status["vips"], vip)["announce"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The entry of `list` (a JSON array) named `name`; null when there is none.
fn named<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list.as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == name)
        .unwrap_or(&serde_json::Value::Null)
}

/// `web`'s flows in the LB's flow table: (client, state, age in seconds).
fn flows(daemon: &Daemon) -> Vec<(String, String, u64)> {
    daemon
        .flows("web")
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["client"].as_str().unwrap_or_default().to_string(),
                f["state"].as_str().unwrap_or_default().to_string(),
                f["age_s"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// `web`'s new-flow total on one LB (from its last stats sample).
fn new_flows(daemon: &Daemon) -> u64 {
    let stats = daemon.cli_json(&["stats"]).unwrap();
    named(&stats["vips"], "web")["totals"]["new_flows"]
        .as_u64()
        .unwrap_or(0)
}

/// Waits (bounded) until `web` has taken `more` new flows on `daemon` since `before`.
fn wait_new_flows(daemon: &Daemon, before: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while new_flows(daemon) < before + 5 {
        assert!(Instant::now() < deadline, "{what}: no new connections");
        thread::sleep(Duration::from_millis(100));
    }
}

/// One TCP connection to `web` every 50 ms from the client until `stop`, for at most 3
/// minutes; counts successes and failures.
struct Ticker {
    stop: AtomicBool,
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Ticker {
    fn run(&self, client: &Host) {
        client
            .ns
            .enter(|| {
                let deadline = Instant::now() + Duration::from_secs(180);
                while !self.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match who(addr(WEB, 80)) {
                        Ok(name) if name.starts_with('b') => {
                            self.ok.fetch_add(1, Ordering::Relaxed)
                        }
                        Ok(other) => {
                            eprintln!("ticker: unexpected answer {other:?}");
                            self.failed.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => {
                            eprintln!("ticker: {e}");
                            self.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    thread::sleep(Duration::from_millis(50));
                }
            })
            .unwrap();
    }
}

/// `count` streams of `bytes` at `rate` from the client, each checked byte for byte.
fn streams<'scope, 'env>(
    scope: &'scope thread::Scope<'scope, 'env>,
    client: &'env Host,
    count: usize,
    bytes: u64,
    rate: u64,
) -> Vec<thread::ScopedJoinHandle<'scope, ()>> {
    (0..count)
        .map(|_| {
            let client = &client.ns;
            scope.spawn(move || {
                let (name, received) = client
                    .enter(|| stream(addr(WEB, 80), bytes, rate, |_| {}))
                    .unwrap()
                    .expect("a stream broke");
                assert_eq!(received, bytes, "stream from {name} cut short");
            })
        })
        .collect()
}

#[test]
fn two_lbs_announce_over_bgp_and_fail_over_without_loss() {
    let lab = Lab::with_bgp(3).unwrap();
    let router = lab.router.as_ref().unwrap();
    let lb2 = lab.lb2.as_ref().unwrap();
    let lb_hops = [lab.lb.ip4, lb2.ip4];
    let serve = |port: u16| -> Vec<Process> {
        let servers = lab
            .backends
            .iter()
            .enumerate()
            .map(|(n, b)| {
                b.serve(&format!("b{n}"), &format!("[::]:{port}"), "tcp")
                    .unwrap()
            })
            .collect();
        servers
    };
    let _servers = serve(80);
    let mut health_servers = serve(HEALTH_PORT);
    for b in &lab.backends {
        b.wait_sockets(2, 0).unwrap();
    }

    let _router_bird =
        Bird::start(&router.ns, &format!("{}-r", lab.id), &bird::router_config()).unwrap();
    let lb_birds = [
        Bird::start(&lab.lb.ns, &format!("{}-lb1", lab.id), &bird::lb_config()).unwrap(),
        Bird::start(&lb2.ns, &format!("{}-lb2", lab.id), &bird::lb_config()).unwrap(),
    ];
    for b in &lb_birds {
        b.wait_established(&["upstream"]).unwrap();
    }

    // Same services and seed on both LBs: a flow maps to the same backend on either.
    let keys = format!(
        "{LAB_SIZES}hash_seed = 2718\n[daemon.announce]\ntable = {ANNOUNCE_TABLE}\n\
         withdraw_grace = \"{}s\"\n",
        GRACE.as_secs()
    );
    let mut lb1 = Daemon::start_on(&lab.lb.ns, &lab.id, &keys, &services()).unwrap();
    let lb2_daemon =
        Daemon::start_on(&lb2.ns, &format!("{}-lb2", lab.id), &keys, &services()).unwrap();

    // 1. Both announce: two next hops, and connections use both LBs.
    let took = wait_hops(router, WEB, &lb_hops, Duration::from_secs(20));
    eprintln!("both LBs announced {WEB} {took:?} after the second daemon answered");
    // A VIP is announced once one backend is up; the other checks may still be on their way.
    for daemon in [&lb1, &lb2_daemon] {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut state = announce_state(daemon, "web");
        while state != "announced: 3 backends up" && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
            state = announce_state(daemon, "web");
        }
        assert_eq!(state, "announced: 3 backends up");
    }
    let ticker = Ticker {
        stop: AtomicBool::new(false),
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    };
    thread::scope(|scope| {
        scope.spawn(|| ticker.run(&lab.client));
        let (lb1_before, lb2_before) = (new_flows(&lb1), new_flows(&lb2_daemon));
        wait_new_flows(&lb1, lb1_before, "LB1 while both announce");
        wait_new_flows(&lb2_daemon, lb2_before, "LB2 while both announce");

        // 2. SIGTERM on LB1 with streams running.
        const BYTES: u64 = 2_000_000;
        const RATE: u64 = 400_000;
        let running = streams(scope, &lab.client, 8, BYTES, RATE);
        // Streams that have run for a second or more, established: the ticker's connections
        // live for milliseconds.
        let deadline = Instant::now() + Duration::from_secs(10);
        let on_lb1 = loop {
            thread::sleep(Duration::from_millis(200));
            let long: Vec<String> = flows(&lb1)
                .into_iter()
                .filter(|(_, state, age)| state == "established" && *age >= 1)
                .map(|(client, ..)| client)
                .collect();
            let on_lb2 = flows(&lb2_daemon)
                .into_iter()
                .filter(|(_, state, age)| state == "established" && *age >= 1)
                .count();
            if long.len() + on_lb2 >= 8 || Instant::now() > deadline {
                break long;
            }
        };
        assert!(
            !on_lb1.is_empty(),
            "no stream went through LB1: nothing to fail over"
        );
        let term = Instant::now();
        lb1.terminate().unwrap();
        let withdrawn = wait_hops(router, WEB, &[lb2.ip4], Duration::from_secs(5));
        assert!(
            !lb1.exited().unwrap(),
            "LB1's daemon exited before the router withdrew it"
        );
        while !lb1.exited().unwrap() {
            assert!(
                term.elapsed() < GRACE + Duration::from_secs(10),
                "LB1 did not exit"
            );
            thread::sleep(Duration::from_millis(20));
        }
        let exited = term.elapsed();
        assert!(
            exited >= GRACE,
            "LB1 exited after {exited:?}, before its grace"
        );
        let moved: BTreeSet<String> = flows(&lb2_daemon).into_iter().map(|(c, ..)| c).collect();
        for client in &on_lb1 {
            assert!(
                moved.contains(client),
                "LB1's stream {client} did not move to LB2"
            );
        }
        for s in running {
            s.join().unwrap();
        }
        eprintln!(
            "SIGTERM on LB1: router withdrew it after {withdrawn:?}; daemon exited after \
             {exited:?}; {} streams on LB1 finished through LB2 byte for byte",
            on_lb1.len()
        );

        // 3. LB1 back: announced within seconds, new connections use it.
        let running = streams(scope, &lab.client, 4, BYTES, RATE);
        let restart = Instant::now();
        lb1.restart().unwrap();
        let back = wait_hops(router, WEB, &lb_hops, Duration::from_secs(15));
        eprintln!(
            "LB1 restarted: announced again {:?} after the restart began ({back:?} after it \
             answered)",
            restart.elapsed()
        );
        wait_new_flows(&lb1, new_flows(&lb1), "LB1 after its restart");
        for s in running {
            s.join().unwrap();
        }
        ticker.stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = (ticker.ok.into_inner(), ticker.failed.into_inner());
    eprintln!("ticker: {ok} connections, {failed} failed");
    assert_eq!(failed, 0, "connections failed during failover");
    assert!(ok > 50, "the ticker barely ran: {ok} connections");

    // 4. Every backend failing its checks on both LBs: withdrawn everywhere, then back.
    health_servers.clear();
    let gone = wait_hops(router, WEB, &[], Duration::from_secs(10));
    eprintln!("every backend down: withdrawn everywhere after {gone:?}");
    for daemon in [&lb1, &lb2_daemon] {
        assert_eq!(
            announce_state(daemon, "web"),
            "withdrawn: no backend up: every backend down"
        );
    }
    health_servers = serve(HEALTH_PORT);
    let up = wait_hops(router, WEB, &lb_hops, Duration::from_secs(10));
    eprintln!("backends up again: announced after {up:?}");
    lab.client
        .ns
        .enter(|| who(addr(WEB, 80)))
        .unwrap()
        .expect("web answers once announced again");

    // 5. never: no route at any time; always: announced with every backend down.
    assert_eq!(router_hops(router, NEVER), BTreeSet::new());
    assert_eq!(
        announce_state(&lb2_daemon, "never"),
        "withdrawn: announce = \"never\""
    );
    wait_hops(router, ALWAYS, &lb_hops, Duration::from_secs(5));
    assert_eq!(
        announce_state(&lb2_daemon, "always"),
        "announced: announce = \"always\""
    );
    let table6 = announce_table(&lab.lb, "-6");
    assert!(
        table6
            .lines()
            .any(|route| route.starts_with(&format!("blackhole {ALWAYS6} "))
                && route.contains(" proto 250 ")),
        "LB1's IPv6 announce table:\n{table6}"
    );
    // The LB's own routing is untouched: the VIP routes live only in the announce table.
    let main = lab.lb.ns.exec("ip route show table main").unwrap();
    assert!(
        !main.contains("192.0.2."),
        "VIP route in LB1's main table:\n{main}"
    );
    let table = announce_table(&lab.lb, "-4");
    assert!(
        table.contains(&format!("blackhole {WEB} proto 250"))
            && table.contains(&format!("blackhole {ALWAYS} proto 250"))
            && !table.contains(&NEVER.to_string()),
        "LB1's announce table:\n{table}"
    );

    // kill -9 leaves the routes (and the data path): the next daemon takes them over without
    // a withdrawal, even though its checks start from unknown.
    lb1.kill();
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(1) {
        assert_eq!(
            router_hops(router, WEB),
            lb_hops.into(),
            "kill -9 withdrew LB1"
        );
        thread::sleep(Duration::from_millis(50));
    }
    lb1.restart().unwrap();
    assert_eq!(
        router_hops(router, WEB),
        lb_hops.into(),
        "the restart withdrew LB1"
    );
    assert!(
        lb1.log()
            .contains("taking over the announce routes of the previous run"),
        "{}",
        lb1.log()
    );
    lb1.wait_status("LB1 deciding from its own checks", |s| {
        s["vips"][0]["announce"] == "announced: 3 backends up"
    })
    .unwrap();
    assert_eq!(router_hops(router, WEB), lb_hops.into());

    // A VIP removed from the config (reload) is withdrawn; the others stay.
    let config = std::fs::read_to_string(&lb1.config).unwrap();
    let without_always = config
        .split("[[vip]]")
        .filter(|vip| !vip.contains("name = \"always\""))
        .collect::<Vec<_>>()
        .join("[[vip]]");
    std::fs::write(&lb1.config, without_always).unwrap();
    lb1.cli(&["reload"]).unwrap();
    wait_hops(router, ALWAYS, &[lb2.ip4], Duration::from_secs(5));
    assert_eq!(router_hops(router, WEB), lb_hops.into());
    drop(health_servers);
}

/// docs/ha.md shows the BIRD configs this lab runs, verbatim.
#[test]
fn the_ha_doc_shows_the_lab_bird_configs() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/ha.md")).unwrap();
    for config in [bird::lb_config(), bird::router_config()] {
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(
            doc.contains(&format!("```text\n{text}```")),
            "docs/ha.md does not show {} as it is",
            config.display()
        );
    }
}
