use super::{table::format_duration, *};
use crate::{
    model::{
        Affinity, Announce, BackendSpec, CheckKind, Forwarding, HealthSpec, Mac, OnAllDown,
        Protocol, TlsSpec, VipAddr,
    },
    scheduler::Scheduler,
};
use std::net::{Ipv4Addr, Ipv6Addr};

const DAEMON: &str = "[daemon]\ninterfaces = [\"eth0\"]\n";
/// A minimal valid VIP; keys appended to it land in its `[[vip]]` table.
const WEB: &str = "[[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 80\n";

fn valid(text: &str) -> Config {
    parse(text, "t.toml").unwrap_or_else(|err| panic!("{err}\n--- input:\n{text}"))
}

fn problems(text: &str) -> Vec<Problem> {
    match parse(text, "t.toml") {
        Err(ConfigError::Invalid { file, problems }) => {
            assert_eq!(file, "t.toml");
            problems
        }
        other => panic!("expected problems, got {other:?}\n--- input:\n{text}"),
    }
}

/// `text` has exactly one problem (so nothing cascades), at `key`, mentioning `message`.
fn assert_rejected(text: &str, key: &str, message: &str) {
    let problems = problems(text);
    assert!(
        problems.len() == 1 && problems[0].key == key && problems[0].message.contains(message),
        "expected exactly `{key}: ...{message}...`, got {problems:#?}\n--- input:\n{text}"
    );
}

fn with_vip(vip_keys: &str) -> String {
    format!("{DAEMON}{WEB}{vip_keys}")
}

fn with_health(health_keys: &str) -> String {
    format!("{DAEMON}{WEB}[vip.health]\n{health_keys}")
}

fn with_backend(backend_keys: &str) -> String {
    format!("{DAEMON}{WEB}[[vip.backend]]\n{backend_keys}")
}

#[test]
fn a_full_file_maps_to_the_model() {
    let text = r#"
            [daemon]
            interfaces = ["eth0", "eth1"]
            xdp_mode = "native"
            admin_socket = "/run/lb/admin.sock"
            state_dir = "/var/lib/lb"
            pin_dir = "/sys/fs/bpf/lb"
            flow_table_size = 2000000
            max_vips = 8
            max_backends = 100
            max_ring_size = 1009
            metrics_listen = "[::1]:9650"
            idle_timeout = "5m"
            stats_interval = "500ms"
            hash_seed = 42
            ipip_source_v4 = "10.255.0.0/16"
            ipip_source_v6 = "fd00:2::/64"

            [daemon.announce]
            table = 4242
            withdraw_grace = "5s"

            [[vip]]
            name = "web"
            address = "192.0.2.10"
            port = 80
            protocol = "tcp"
            forwarding = "dsr"
            ring_size = 1009
            announce = "always"

            [vip.health]
            kind = "http"
            port = 8080
            path = "/healthz"
            expect_status = 204
            host = "web.example"
            interval = "2s"
            timeout = "1500ms"
            rise = 1
            fall = 5
            on_all_down = "drop"

            [[vip.backend]]
            address = "10.1.0.11"
            weight = 0
            mac = "02:00:00:00:00:11"
            health_port = 8081

            [[vip]]
            name = "dns"
            address = "2001:db8::53"
            port = 0
            protocol = "udp"
            forwarding = "ipip"
            scheduler = "least-conn"
            ring_size = 13

            [vip.health]
            kind = "tcp"
            port = 53

            [[vip.backend]]
            address = "2001:db8:1::53"
        "#;
    let expected = Config {
        daemon: DaemonConfig {
            interfaces: vec!["eth0".into(), "eth1".into()],
            xdp_mode: AttachMode::Native,
            admin_socket: "/run/lb/admin.sock".into(),
            state_dir: "/var/lib/lb".into(),
            pin_dir: "/sys/fs/bpf/lb".into(),
            sizes: Sizes {
                nat_table_size: lb_common::DEFAULT_NAT_TABLE_SIZE,
                max_vips: 8,
                max_backends: 100,
                max_ring_size: 1009,
                flow_table_size: 2_000_000,
            },
            metrics_listen: Some("[::1]:9650".parse().unwrap()),
            flow_idle_timeout: Duration::from_secs(300),
            stats_interval: Duration::from_millis(500),
            announce: Some(AnnounceConfig {
                table: 4242,
                withdraw_grace: Duration::from_secs(5),
            }),
            log: None,
        },
        services: Services {
            settings: DataPathSettings {
                nat: Default::default(),
                hash_seed: 42,
                ipip_source_v4: Prefix {
                    addr: Ipv4Addr::new(10, 255, 0, 0).into(),
                    len: 16,
                },
                ipip_source_v6: Prefix {
                    addr: Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0).into(),
                    len: 64,
                },
                icmp_too_big_rate: 1000,
                flood: crate::flood::FloodSpec {
                    pins_per_second: 31250,
                },
            },
            vips: vec![
                VipSpec {
                    name: "web".into(),
                    vip: VipAddr {
                        addr: Ipv4Addr::new(192, 0, 2, 10).into(),
                        port: 80,
                        protocol: Protocol::Tcp,
                    },
                    forwarding: Forwarding::Dsr,
                    scheduler: Scheduler::Maglev,
                    affinity: Default::default(),
                    ring_size: 1009,
                    health: HealthSpec {
                        kind: CheckKind::Http {
                            path: "/healthz".into(),
                            expect_status: 204,
                            host: Some("web.example".into()),
                            tls: None,
                        },
                        port: Some(8080),
                        interval: Duration::from_secs(2),
                        timeout: Duration::from_millis(1500),
                        rise: 1,
                        fall: 5,
                        on_all_down: OnAllDown::Drop,
                    },
                    backends: vec![BackendSpec {
                        port: None,
                        addr: Ipv4Addr::new(10, 1, 0, 11).into(),
                        weight: 0,
                        mac: Some(Mac([2, 0, 0, 0, 0, 0x11])),
                        health_port: Some(8081),
                    }],
                    acl: Default::default(),
                    limits: None,
                    announce: Announce::Always,
                },
                VipSpec {
                    name: "dns".into(),
                    vip: VipAddr {
                        addr: "2001:db8::53".parse().unwrap(),
                        port: 0,
                        protocol: Protocol::Udp,
                    },
                    forwarding: Forwarding::Ipip,
                    scheduler: Scheduler::LeastConn,
                    affinity: Default::default(),
                    ring_size: 13,
                    health: HealthSpec {
                        kind: CheckKind::Tcp,
                        port: Some(53),
                        ..HealthSpec::default()
                    },
                    backends: vec![BackendSpec {
                        port: None,
                        addr: "2001:db8:1::53".parse().unwrap(),
                        weight: 100,
                        mac: None,
                        health_port: None,
                    }],
                    acl: Default::default(),
                    limits: None,
                    announce: Announce::Healthy,
                },
            ],
        },
    };
    assert_eq!(valid(text), expected);
}

#[test]
fn affinity_and_its_ipv6_prefix() {
    for (keys, expected) in [
        ("affinity = \"connection\"\n", Affinity::Connection),
        (
            "affinity = \"client\"\n",
            Affinity::Client { ipv6_host: false },
        ),
        (
            "affinity = \"client\"\naffinity_ipv6_prefix = 64\n",
            Affinity::Client { ipv6_host: false },
        ),
        (
            "affinity = \"client\"\naffinity_ipv6_prefix = 128\n",
            Affinity::Client { ipv6_host: true },
        ),
    ] {
        let config = valid(&format!(
            "{}[[vip.backend]]\naddress = \"10.1.0.11\"\n",
            with_vip(keys)
        ));
        assert_eq!(config.services.vips[0].affinity, expected, "{keys}");
    }
    let config = valid(&format!("{DAEMON}icmp_too_big_rate = 0\n{WEB}"));
    assert_eq!(config.services.settings.icmp_too_big_rate, 0);
}

#[test]
fn defaults_apply() {
    let config = valid(&with_backend("address = \"10.1.0.11\"\n"));
    assert_eq!(
        config.daemon,
        DaemonConfig {
            interfaces: vec!["eth0".into()],
            xdp_mode: AttachMode::Auto,
            admin_socket: "/run/xdplb/admin.sock".into(),
            state_dir: "/var/lib/xdplb".into(),
            pin_dir: "/sys/fs/bpf/xdplb".into(),
            sizes: Sizes {
                nat_table_size: lb_common::DEFAULT_NAT_TABLE_SIZE,
                max_vips: 64,
                max_backends: 4096,
                max_ring_size: 65537,
                flow_table_size: 1 << 20,
            },
            metrics_listen: None,
            flow_idle_timeout: Duration::from_secs(300),
            stats_interval: Duration::from_secs(1),
            announce: None,
            log: None,
        }
    );
    assert_eq!(
        valid(&format!("{DAEMON}[daemon.announce]\ntable = 300\n"))
            .daemon
            .announce,
        Some(AnnounceConfig {
            table: 300,
            withdraw_grace: AnnounceConfig::DEFAULT_WITHDRAW_GRACE,
        })
    );
    assert_eq!(config.services.settings, DataPathSettings::default());
    let vip = &config.services.vips[0];
    assert_eq!(vip.vip.protocol, Protocol::Tcp);
    assert_eq!(vip.forwarding, Forwarding::Dsr);
    assert_eq!(vip.affinity, Affinity::Connection);
    assert_eq!(vip.ring_size, 65537);
    assert_eq!(vip.health, HealthSpec::default());
    assert_eq!(vip.announce, Announce::Healthy);
    assert_eq!(
        vip.backends,
        [BackendSpec {
            port: None,
            addr: Ipv4Addr::new(10, 1, 0, 11).into(),
            weight: 100,
            mac: None,
            health_port: None,
        }]
    );
    // HTTP defaults, and a [vip.health] without kind means none.
    let http = valid(&with_health("kind = \"http\"\n"));
    assert_eq!(
        http.services.vips[0].health.kind,
        CheckKind::Http {
            path: "/".into(),
            expect_status: 200,
            host: None,
            tls: None,
        }
    );
    let https = valid(&with_health(
        "kind = \"https\"\ntls_verify = true\nhost = \"web.example:8443\"\n",
    ));
    assert_eq!(
        https.services.vips[0].health.kind,
        CheckKind::Http {
            path: "/".into(),
            expect_status: 200,
            host: Some("web.example:8443".into()),
            tls: Some(TlsSpec {
                verify: true,
                ca: None
            }),
        }
    );
    let none = valid(&with_health("interval = \"5s\"\n"));
    assert_eq!(none.services.vips[0].health.kind, CheckKind::None);
    // No VIP at all is a valid (idle) configuration.
    assert!(valid(DAEMON).services.vips.is_empty());
}

#[test]
fn the_example_file_parses() {
    let config = valid(include_str!("../../../examples/xdplb.toml"));
    let vips = &config.services.vips;
    assert_eq!(vips.len(), 2);
    let (web, api) = (&vips[0], &vips[1]);
    assert_eq!(
        (web.name.as_str(), web.forwarding, web.backends.len()),
        ("web", Forwarding::Dsr, 3)
    );
    assert!(web.vip.addr.is_ipv4());
    assert!(matches!(web.health.kind, CheckKind::Http { .. }));
    assert_eq!(web.announce, Announce::Healthy);
    assert_eq!(config.daemon.announce.map(|a| a.table), Some(4242));
    assert_eq!(
        (api.name.as_str(), api.forwarding, api.health.kind.clone()),
        ("api", Forwarding::Ipip, CheckKind::Tcp)
    );
}

#[test]
fn check_warns_when_a_per_lb_scheduler_is_announced_over_bgp() {
    let text = |announce: &str, scheduler: &str| {
        format!(
            "{DAEMON}{announce}{WEB}scheduler = \"{scheduler}\"\n\
             [[vip.backend]]\naddress = \"10.1.0.11\"\n"
        )
    };
    let bgp = "[daemon.announce]\ntable = 100\n";
    let warned = |text: String| valid(&text).summary().contains("warning: scheduler");
    assert!(warned(text(bgp, "least-conn")));
    assert!(warned(text(bgp, "round-robin")));
    assert!(
        !warned(text(bgp, "maglev")),
        "Maglev chooses alike on every LB"
    );
    assert!(!warned(text("", "least-conn")), "not announced: one LB");
}

#[test]
fn summary_lists_vips_then_their_backends_in_columns() {
    let config = valid(
        r#"
            [daemon]
            interfaces = ["eth0", "eth1"]
            xdp_mode = "native"
            [[vip]]
            name = "web"
            address = "192.0.2.10"
            port = 80
            [vip.health]
            kind = "http"
            path = "/healthz"
            [[vip.backend]]
            address = "10.1.0.11"
            mac = "02:00:00:00:00:11"
            [[vip.backend]]
            address = "10.1.0.12"
            weight = 5
            health_port = 8081
            [[vip]]
            name = "api"
            address = "2001:db8::10"
            port = 443
            forwarding = "ipip"
            scheduler = "round-robin"
            ring_size = 1009
            [vip.health]
            kind = "tcp"
            port = 8443
            interval = "2s"
            [[vip.backend]]
            address = "2001:db8:1::21"
            [[vip]]
            name = "spare"
            address = "192.0.2.11"
            port = 53
            protocol = "udp"
            deny_sources = ["203.0.113.0/24"]
            [vip.limits]
            new_flows_total = 500
            "#,
    );
    assert_eq!(
        config.summary(),
        "interfaces eth0, eth1 (xdp_mode native); 3 VIPs, 3 backends\n\
         web    192.0.2.10:80/tcp       dsr   maglev       ring 65537  health http /healthz every 1s\n\
         \x20 10.1.0.11       weight 100  mac 02:00:00:00:00:11\n\
         \x20 10.1.0.12       weight 5                           health port 8081\n\
         api    [2001:db8::10]:443/tcp  ipip  round-robin  ring 1009   health tcp port 8443 every 2s\n\
         \x20 2001:db8:1::21  weight 100\n\
         spare  192.0.2.11:53/udp       dsr   maglev       ring 65537  health none\n\
         \x20 (no backends: its packets are dropped)\n\
         \x20 sources: allow everyone; deny 203.0.113.0/24\n\
         \x20 limits: 500 new flows/s in total\n"
    );
}

#[test]
fn syntax_errors_name_file_line_and_column() {
    let err = parse(
        "[daemon]\ninterfaces = [\"eth0\"]\nmax_vips = = 3\n",
        "x.toml",
    )
    .unwrap_err();
    let ConfigError::Syntax { line, column, .. } = &err else {
        panic!("expected a syntax error, got {err:?}");
    };
    assert_eq!((*line, *column), (3, 12));
    assert!(
        err.to_string().starts_with("x.toml:3:12: not valid TOML: "),
        "{err}"
    );

    let err = parse("[daemon]\nmax_vips = 1\nmax_vips = 2\n", "x.toml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "x.toml:3:1: not valid TOML: duplicate key `max_vips` in table `daemon`"
    );
    // toml has no message for a value missing at the very end.
    let err = parse("a = ", "x.toml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "x.toml:1:5: not valid TOML: expected a value"
    );
}

#[test]
fn load_reads_files_and_explains_unreadable_ones() {
    let dir = std::env::temp_dir().join(format!("xdplb-config-test-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("xdplb.toml");
    fs::write(&path, with_vip("")).unwrap();
    assert_eq!(load(&path).unwrap().services.vips[0].name, "web");

    fs::write(&path, "[daemon]\n").unwrap();
    let err = load(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: daemon.interfaces: missing; list the interfaces XDP attaches to, \
             e.g. interfaces = [\"eth0\"]",
            path.display()
        )
    );

    let missing = dir.join("missing.toml");
    let err = load(&missing).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Read { path, source } if *path == missing
            && source.kind() == io::ErrorKind::NotFound),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.starts_with(&format!("cannot read {}: ", missing.display())));
    assert!(message.ends_with("(check the path)"), "{message}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn schedulers_are_checked_against_their_limits() {
    assert_rejected(
        &with_vip("scheduler = \"random\"\n"),
        "vip[0] (web).scheduler",
        "\"random\" is not one of \"maglev\", \"round-robin\", \"least-conn\"",
    );
    // Round robin: the weighted turn (sum / gcd) must fit the ring.
    let turn = |weights: &[u32]| {
        let backends: String = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                format!(
                    "[[vip.backend]]\naddress = \"10.0.0.{}\"\nweight = {w}\n",
                    i + 1
                )
            })
            .collect();
        format!("{DAEMON}{WEB}scheduler = \"round-robin\"\nring_size = 13\n{backends}")
    };
    assert_rejected(
        &turn(&[100, 201, 301]),
        "vip[0] (web).scheduler",
        "turn is 602 new flows long",
    );
    assert_eq!(
        valid(&turn(&[100, 200, 300])).services.vips[0].scheduler,
        Scheduler::RoundRobin
    );
    // Least-conn: a bounded scan, so a bounded number of backends.
    let backends: String = (0..65)
        .map(|i| {
            format!(
                "[[vip.backend]]\naddress = \"10.0.{}.{}\"\n",
                i / 200,
                i % 200 + 1
            )
        })
        .collect();
    assert_rejected(
        &format!("{DAEMON}{WEB}scheduler = \"least-conn\"\n{backends}"),
        "vip[0] (web).scheduler",
        "at most 64 backends per new flow, and the VIP has 65",
    );
    assert_eq!(
        valid(&with_vip("")).services.vips[0].scheduler,
        Scheduler::Maglev,
        "maglev by default"
    );
}

#[test]
fn unknown_keys_are_rejected_with_their_table() {
    assert_rejected(
        &format!("vips = []\n{DAEMON}"),
        "vips",
        "unknown key in the top level; the keys there are: daemon, vip",
    );
    assert_rejected(
        &format!("{DAEMON}max_vip = 3\n"),
        "daemon.max_vip",
        "unknown key in [daemon]; the keys there are: interfaces, xdp_mode",
    );
    assert_rejected(
        &with_vip("protocl = \"udp\"\n"),
        "vip[0] (web).protocl",
        "unknown key in [[vip]]; the keys there are: name, address, port, protocol",
    );
    assert_rejected(
        &with_health("kind = \"tcp\"\nintervall = \"2s\"\n"),
        "vip[0] (web).health.intervall",
        "unknown key in [vip.health]; the keys there are: kind, port, path",
    );
    assert_rejected(
        &with_backend("address = \"10.1.0.11\"\nwieght = 5\n"),
        "vip[0] (web).backend[0].wieght",
        "unknown key in [[vip.backend]]; the keys there are: address, weight, mac, \
         health_port",
    );
}

#[test]
fn wrong_types_are_rejected() {
    let cases = [
        (
            "daemon = 1\n".to_string(),
            "daemon",
            "expected a table ([daemon]), found an integer (1)",
        ),
        (
            format!("{DAEMON}max_vips = \"64\"\n"),
            "daemon.max_vips",
            "expected an integer, found a string (\"64\")",
        ),
        (
            format!("{DAEMON}idle_timeout = 300\n"),
            "daemon.idle_timeout",
            "expected a duration string such as \"500ms\" or \"5s\", found an integer",
        ),
        (
            "[daemon]\ninterfaces = \"eth0\"\n".to_string(),
            "daemon.interfaces",
            "expected an array of interface names, found a string (\"eth0\")",
        ),
        (
            "[daemon]\ninterfaces = [\"eth0\", 1]\n".to_string(),
            "daemon.interfaces[1]",
            "expected an interface name (a string), found an integer (1)",
        ),
        (
            format!("{DAEMON}state_dir = true\n"),
            "daemon.state_dir",
            "expected a path string, found a boolean (true)",
        ),
        (
            format!("{DAEMON}[vip]\nname = \"web\"\n"),
            "vip",
            "expected an array of tables ([[vip]]), found a table",
        ),
        (
            format!("vip = [1]\n{DAEMON}"),
            "vip[0]",
            "expected a table ([[vip]]), found an integer (1)",
        ),
        (
            with_vip("protocol = 6\n"),
            "vip[0] (web).protocol",
            "expected a string, found an integer (6)",
        ),
        (
            with_vip("ring_size = 1.5\n"),
            "vip[0] (web).ring_size",
            "expected an integer, found a float (1.5)",
        ),
        (
            with_vip("[[vip.health]]\nkind = \"tcp\"\n"),
            "vip[0] (web).health",
            "expected a table ([vip.health]), found an array",
        ),
        (
            with_vip("backend = \"10.1.0.11\"\n"),
            "vip[0] (web).backend",
            "expected an array of tables ([[vip.backend]]), found a string",
        ),
    ];
    for (text, key, message) in &cases {
        assert_rejected(text, key, message);
    }
}

#[test]
fn daemon_problems_are_rejected() {
    let long_socket = format!("/run/{}.sock", "s".repeat(100));
    let cases = [
        (
            "",
            "daemon.interfaces",
            "missing; list the interfaces XDP attaches to",
        ),
        (
            "[daemon]\n",
            "daemon.interfaces",
            "missing; list the interfaces",
        ),
        (
            "[daemon]\ninterfaces = []\n",
            "daemon.interfaces",
            "empty; list the interfaces",
        ),
        (
            "[daemon]\ninterfaces = [\"eth0\", \"eth1\", \"eth0\"]\n",
            "daemon.interfaces[2]",
            "\"eth0\" is already interfaces[0]; list each interface once",
        ),
        (
            "[daemon]\ninterfaces = [\"enp0s31f6-uplink\"]\n",
            "daemon.interfaces[0]",
            "\"enp0s31f6-uplink\" is not a valid interface name: it is longer than 15 bytes",
        ),
        (
            "[daemon]\ninterfaces = [\"\"]\n",
            "daemon.interfaces[0]",
            "it is empty",
        ),
        (
            "[daemon]\ninterfaces = [\"..\"]\n",
            "daemon.interfaces[0]",
            "are reserved",
        ),
        (
            "[daemon]\ninterfaces = [\"eth0/1\"]\n",
            "daemon.interfaces[0]",
            "'/', ':' or whitespace",
        ),
        (
            "[daemon]\ninterfaces = [\"eth0:1\"]\n",
            "daemon.interfaces[0]",
            "'/', ':' or whitespace",
        ),
        (
            "[daemon]\ninterfaces = [\"eth 0\"]\n",
            "daemon.interfaces[0]",
            "'/', ':' or whitespace",
        ),
    ];
    for (text, key, message) in cases {
        assert_rejected(text, key, message);
    }
    let cases = [
        ("xdp_mode = \"fast\"", "daemon.xdp_mode", "\"fast\" is not one of \"auto\", \"native\", \"generic\""),
        ("admin_socket = \"admin.sock\"", "daemon.admin_socket", "\"admin.sock\" is not an absolute path; start it with '/'"),
        (&format!("admin_socket = \"{long_socket}\""), "daemon.admin_socket", "the path is 110 bytes long but Unix socket paths are limited to 107"),
        ("state_dir = \"var/lib/xdplb\"", "daemon.state_dir", "is not an absolute path"),
        ("pin_dir = \"\"", "daemon.pin_dir", "\"\" is not an absolute path"),
        ("flow_table_size = 0", "daemon.flow_table_size", "0 is too small: use at least 1"),
        ("flow_table_size = 268435457", "daemon.flow_table_size", "268435457 is too large: use at most 268435456 (each flow takes a 64-byte slot"),
        ("max_vips = 65537", "daemon.max_vips", "65537 is too large: use at most 65536 (each VIP has per-CPU counters"),
        ("max_backends = 1048577", "daemon.max_backends", "1048577 is too large: use at most 1048576 (each backend has 32 bytes of counters per CPU)"),
        ("max_backends = -1", "daemon.max_backends", "-1 is too small: use at least 1"),
        ("max_ring_size = 0", "daemon.max_ring_size", "0 is too small: use at least 1"),
        ("max_ring_size = 4294967296", "daemon.max_ring_size", "4294967296 is too large: use at most 4294967295"),
        ("max_vips = 4096\nmax_ring_size = 262147", "daemon.max_ring_size", "the ring map would take 16384 MiB (max_vips 4096 x 2 halves x max_ring_size 262147 x 8 bytes), over the 4 GiB limit; lower max_ring_size or max_vips"),
        ("metrics_listen = \"localhost:9650\"", "daemon.metrics_listen", "\"localhost:9650\" is not a socket address (expected IP:PORT"),
        ("idle_timeout = \"1x\"", "daemon.idle_timeout", "\"1x\" is not a duration: write whole numbers with a unit (ms, s, m, h)"),
        ("stats_interval = \"0s\"", "daemon.stats_interval", "must be longer than zero"),
        ("hash_seed = -1", "daemon.hash_seed", "-1 is too small: use at least 0"),
        ("hash_seed = 4294967296", "daemon.hash_seed", "4294967296 is too large: use at most 4294967295"),
        ("ipip_source_v4 = \"fd00::/96\"", "daemon.ipip_source_v4", "fd00::/96 is not an IPv4 prefix; use one such as 172.16.0.0/16"),
        ("ipip_source_v6 = \"10.0.0.0/8\"", "daemon.ipip_source_v6", "10.0.0.0/8 is not an IPv6 prefix; use one such as fd00:1b::/96"),
        ("ipip_source_v4 = \"10.0.0.0\"", "daemon.ipip_source_v4", "\"10.0.0.0\" is not a prefix"),
        ("ipip_source_v4 = \"10.0.0.0/33\"", "daemon.ipip_source_v4", "\"33\" in \"10.0.0.0/33\" is not a prefix length"),
        ("icmp_too_big_rate = 1000001", "daemon.icmp_too_big_rate", "1000001 is too large: use at most 1000000"),
    ];
    for (keys, key, message) in cases {
        assert_rejected(&format!("{DAEMON}{keys}\n"), key, message);
    }
    let cases = [
        (
            "",
            "daemon.announce.table",
            "missing; add e.g. table = 4242",
        ),
        (
            "table = 254",
            "daemon.announce.table",
            "254 is the kernel's main table: use a table of its own that no `ip rule` looks up",
        ),
        (
            "table = 0",
            "daemon.announce.table",
            "0 is the kernel's unspec table",
        ),
        (
            "table = -1",
            "daemon.announce.table",
            "-1 is too small: use at least 0",
        ),
        (
            "table = 10\nwithdraw_grace = \"0s\"",
            "daemon.announce.withdraw_grace",
            "must be longer than zero",
        ),
        (
            "table = 10\ngrace = \"1s\"",
            "daemon.announce.grace",
            "unknown key in [daemon.announce]; the keys there are: table, withdraw_grace",
        ),
    ];
    for (keys, key, message) in cases {
        assert_rejected(
            &format!("{DAEMON}[daemon.announce]\n{keys}\n"),
            key,
            message,
        );
    }
    let cases = [
        (
            "path = \"connections.jsonl\"",
            "daemon.log.path",
            "\"connections.jsonl\" is not an absolute path; start it with '/'",
        ),
        (
            "path = \"/var/log/xdplb/\"",
            "daemon.log.path",
            "is a directory; name the file in it",
        ),
        (
            "max_per_second = 0",
            "daemon.log.max_per_second",
            "0 is too small: use at least 1",
        ),
        (
            "rate = 5",
            "daemon.log.rate",
            "unknown key in [daemon.log]; the keys there are: path, max_per_second",
        ),
    ];
    for (keys, key, message) in cases {
        assert_rejected(&format!("{DAEMON}[daemon.log]\n{keys}\n"), key, message);
    }
    assert_rejected(
        &format!("{DAEMON}{WEB}announce = \"sometimes\"\n"),
        "vip[0] (web).announce",
        "\"sometimes\" is not one of \"healthy\", \"always\", \"never\"",
    );
}

#[test]
fn the_connection_log_is_on_with_its_section() {
    use crate::connlog::LogSpec;
    assert_eq!(valid(DAEMON).daemon.log, None);
    assert_eq!(
        valid(&format!("{DAEMON}[daemon.log]\n")).daemon.log,
        Some(LogSpec {
            path: None,
            max_per_second: 20_000
        })
    );
    let text =
        format!("{DAEMON}[daemon.log]\npath = \"/var/log/xdplb/c.jsonl\"\nmax_per_second = 500\n");
    assert_eq!(
        valid(&text).daemon.log,
        Some(LogSpec {
            path: Some("/var/log/xdplb/c.jsonl".into()),
            max_per_second: 500
        })
    );
}

#[test]
fn vip_problems_are_rejected() {
    let api = "[[vip]]\nname = \"api\"\naddress = \"192.0.2.10\"\nport = 80\n";
    let backends = "[[vip.backend]]\naddress = \"10.1.0.1\"\n\
                    [[vip.backend]]\naddress = \"10.1.0.2\"\n\
                    [[vip.backend]]\naddress = \"10.1.0.3\"\n";
    let cases = [
        (
            format!("{DAEMON}[[vip]]\naddress = \"192.0.2.10\"\nport = 80\n"),
            "vip[0].name",
            "missing; add e.g. name = \"web\"",
        ),
        (
            format!("{DAEMON}[[vip]]\nname = \"web site\"\naddress = \"192.0.2.10\"\nport = 80\n"),
            "vip[0].name",
            "\"web site\" is not a valid VIP name: use letters, digits, '_', '.' and '-'",
        ),
        (
            format!("{DAEMON}{WEB}[[vip]]\nname = \"web\"\naddress = \"192.0.2.11\"\nport = 80\n"),
            "vip[1] (web).name",
            "\"web\" is already the name of vip[0] (web); VIP names must be unique",
        ),
        (
            format!("{DAEMON}[[vip]]\nname = \"web\"\nport = 80\n"),
            "vip[0] (web).address",
            "missing; add e.g. address = \"192.0.2.10\"",
        ),
        (
            format!("{DAEMON}[[vip]]\nname = \"web\"\naddress = \"192.0.2.300\"\nport = 80\n"),
            "vip[0] (web).address",
            "\"192.0.2.300\" is not an IP address",
        ),
        (
            format!("{DAEMON}[[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\n"),
            "vip[0] (web).port",
            "missing; add e.g. port = 80 (0 serves every port)",
        ),
        (
            format!("{DAEMON}[[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 65536\n"),
            "vip[0] (web).port",
            "65536 is too large: use at most 65535",
        ),
        (
            with_vip("protocol = \"sctp\"\n"),
            "vip[0] (web).protocol",
            "\"sctp\" is not one of \"tcp\", \"udp\"",
        ),
        (
            with_vip("forwarding = \"tproxy\"\n"),
            "vip[0] (web).forwarding",
            "\"tproxy\" is not one of \"dsr\", \"ipip\", \"nat\"",
        ),
        (
            with_vip("affinity = \"source\"\n"),
            "vip[0] (web).affinity",
            "\"source\" is not one of \"connection\", \"client\"",
        ),
        (
            with_vip("affinity = \"client\"\naffinity_ipv6_prefix = 48\n"),
            "vip[0] (web).affinity_ipv6_prefix",
            "48 is not supported: use 64 (the client's /64) or 128 (its address)",
        ),
        (
            with_vip("affinity = \"client\"\nscheduler = \"round-robin\"\n"),
            "vip[0] (web).affinity",
            "\"client\" needs scheduler = \"maglev\" (this VIP has \"round-robin\"): round \
             robin and least-conn choose per connection; remove one of the two",
        ),
        (
            with_vip("affinity_ipv6_prefix = 128\n"),
            "vip[0] (web).affinity_ipv6_prefix",
            "only applies with affinity = \"client\": set that too, or remove this key",
        ),
        (
            format!("{DAEMON}{WEB}{api}"),
            "vip[1] (api).address",
            "192.0.2.10:80/tcp is already served by vip[0] (web); each address, port and \
             protocol can have one VIP",
        ),
        (
            with_vip("ring_size = 65536\n"),
            "vip[0] (web).ring_size",
            "ring_size 65536 is not prime; use a prime such as 65537",
        ),
        (
            with_vip("ring_size = 1\n"),
            "vip[0] (web).ring_size",
            "ring_size 1 is too small",
        ),
        (
            with_vip(&format!("ring_size = 2\n{backends}")),
            "vip[0] (web).ring_size",
            "ring_size 2 is too small for 3 weighted backends; use a prime with at least \
             100 slots per backend, such as 65537",
        ),
        (
            with_vip("ring_size = 131071\n"),
            "vip[0] (web).ring_size",
            "131071 is larger than daemon.max_ring_size (65537); use a smaller prime or \
             raise daemon.max_ring_size",
        ),
        (
            format!(
                "{DAEMON}max_vips = 1\n{WEB}{}",
                api.replace("port = 80", "port = 81")
            ),
            "daemon.max_vips",
            "2 VIPs are configured but max_vips is 1; raise daemon.max_vips",
        ),
        (
            format!("{DAEMON}max_backends = 2\n{WEB}{backends}"),
            "daemon.max_backends",
            "3 backends are configured (over all VIPs) but max_backends is 2; raise \
             daemon.max_backends",
        ),
    ];
    for (text, key, message) in &cases {
        assert_rejected(text, key, message);
    }
}

#[test]
fn vips_that_only_look_alike_are_accepted() {
    // Port 0 is the address's fallback, so it may sit next to specific ports; the same
    // address and port with another protocol is another service.
    let text = format!(
        "{DAEMON}{WEB}\
         [[vip]]\nname = \"web-all\"\naddress = \"192.0.2.10\"\nport = 0\n\
         [[vip]]\nname = \"web-udp\"\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"udp\"\n"
    );
    assert_eq!(valid(&text).services.vips.len(), 3);
    // 4in6 tunnels, and dsr with a backend address of the other family.
    let mixed = format!(
        "{DAEMON}\
         [[vip]]\nname = \"v4\"\naddress = \"192.0.2.10\"\nport = 80\nforwarding = \"ipip\"\n\
         [[vip.backend]]\naddress = \"2001:db8::1\"\n\
         [[vip]]\nname = \"v6\"\naddress = \"2001:db8::10\"\nport = 80\n\
         [[vip.backend]]\naddress = \"10.1.0.1\"\n"
    );
    assert_eq!(valid(&mixed).services.vips.len(), 2);
    // A port-0 VIP can be checked when every backend names its port.
    let all_ports = format!(
        "{DAEMON}[[vip]]\nname = \"all\"\naddress = \"192.0.2.10\"\nport = 0\n\
         [vip.health]\nkind = \"tcp\"\n\
         [[vip.backend]]\naddress = \"10.1.0.1\"\nhealth_port = 22\n"
    );
    assert_eq!(valid(&all_ports).services.vips[0].vip.port, 0);
}

#[test]
fn health_problems_are_rejected() {
    let cases = [
        (
            "kind = \"icmp\"",
            "kind",
            "\"icmp\" is not one of \"none\", \"tcp\", \"http\", \"https\"",
        ),
        (
            "kind = \"tcp\"\nport = 0",
            "port",
            "0 is too small: use at least 1",
        ),
        (
            "kind = \"http\"\npath = \"healthz\"",
            "path",
            "\"healthz\" does not start with '/'",
        ),
        (
            "kind = \"http\"\npath = \"/a b\"",
            "path",
            "contains whitespace or control characters",
        ),
        (
            "kind = \"http\"\nexpect_status = 99",
            "expect_status",
            "99 is too small: use at least 100",
        ),
        (
            "kind = \"http\"\nexpect_status = 600",
            "expect_status",
            "600 is too large: use at most 599",
        ),
        (
            "kind = \"http\"\nhost = \"\"",
            "host",
            "empty; leave the key out",
        ),
        (
            "kind = \"http\"\nhost = \"a\\r\\nX: y\"",
            "host",
            "contains whitespace or control characters",
        ),
        (
            "kind = \"tcp\"\npath = \"/\"",
            "path",
            "path is only used by kind = \"http\" or \"https\"; remove it or set kind = \"http\"",
        ),
        (
            "kind = \"none\"\nhost = \"web\"",
            "host",
            "host is only used by kind = \"http\"",
        ),
        (
            "expect_status = 200",
            "expect_status",
            "expect_status is only used by kind = \"http\"",
        ),
        (
            "kind = \"http\"\ntls_verify = true",
            "tls_verify",
            "tls_verify is only used by kind = \"https\"; remove it or set kind = \"https\"",
        ),
        (
            "kind = \"https\"\ntls_verify = \"yes\"",
            "tls_verify",
            "expected true or false, found",
        ),
        (
            "kind = \"https\"\ntls_ca = \"/etc/ca.pem\"",
            "tls_ca",
            "is only used with tls_verify = true",
        ),
        (
            "kind = \"https\"\ntls_verify = true\ntls_ca = \"ca.pem\"",
            "tls_ca",
            "\"ca.pem\" is not an absolute path",
        ),
        (
            "kind = \"https\"\ntls_verify = true\ntls_ca = \"/nonexistent/ca.pem\"",
            "tls_ca",
            "cannot read CA certificates from /nonexistent/ca.pem",
        ),
        (
            "kind = \"https\"\nhost = \"a..b\"",
            "host",
            "host \"a..b\" is not a TLS server name",
        ),
        (
            "kind = \"tcp\"\ninterval = \"1x\"",
            "interval",
            "\"1x\" is not a duration",
        ),
        (
            "kind = \"tcp\"\ninterval = \"0ms\"",
            "interval",
            "must be longer than zero",
        ),
        (
            "kind = \"tcp\"\ntimeout = \"1s\"",
            "timeout",
            "1s is not shorter than interval (1s): a check must end before the next one starts",
        ),
        (
            "kind = \"tcp\"\ninterval = \"2s\"\ntimeout = \"2500ms\"",
            "timeout",
            "2500ms is not shorter than interval (2s)",
        ),
        (
            "kind = \"tcp\"\nrise = 0",
            "rise",
            "0 is too small: use at least 1",
        ),
        (
            "kind = \"tcp\"\nfall = 0",
            "fall",
            "0 is too small: use at least 1",
        ),
        (
            "kind = \"tcp\"\non_all_down = \"fail\"",
            "on_all_down",
            "\"fail\" is not one of \"keep\", \"drop\"",
        ),
    ];
    for (keys, key, message) in cases {
        assert_rejected(
            &with_health(&format!("{keys}\n")),
            &format!("vip[0] (web).health.{key}"),
            message,
        );
    }
    assert_rejected(
        &format!(
            "{DAEMON}[[vip]]\nname = \"all\"\naddress = \"192.0.2.10\"\nport = 0\n\
             [vip.health]\nkind = \"tcp\"\n\
             [[vip.backend]]\naddress = \"10.1.0.1\"\nhealth_port = 22\n\
             [[vip.backend]]\naddress = \"10.1.0.2\"\n"
        ),
        "vip[0] (all).health.port",
        "missing; the VIP has port = 0 (every port), so checks need a port",
    );
}

#[test]
fn nat_keys_map_to_the_model_and_are_checked() {
    let config = valid(
        "[daemon]\ninterfaces = [\"eth0\"]\nnat_source_v4 = [\"10.0.0.1\", \"10.0.0.2\"]\n\
         nat_ports = \"2000-2999\"\nnat_udp_timeout = \"30s\"\nnat_table_size = 1000\n\
         [[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 80\nforwarding = \"nat\"\n\
         [[vip.backend]]\naddress = \"10.1.0.1\"\nport = 8080\n",
    );
    let nat = &config.services.settings.nat;
    assert_eq!(nat.sources_v4.len(), 2);
    assert_eq!(nat.ports, (2000, 2999));
    assert_eq!(nat.udp_timeout, Duration::from_secs(30));
    assert_eq!(nat.tcp_timeout, Duration::from_secs(900));
    assert_eq!(config.daemon.sizes.nat_table_size, 1000);
    assert_eq!(config.services.vips[0].forwarding, Forwarding::Nat);
    assert_eq!(config.services.vips[0].backends[0].port, Some(8080));

    let daemon = |keys: &str| format!("[daemon]\ninterfaces = [\"eth0\"]\n{keys}");
    assert_rejected(
        &daemon("nat_source_v4 = [\"fd00::1\"]\n"),
        "daemon.nat_source_v4[0]",
        "is not an IPv4 address",
    );
    assert_rejected(
        &daemon("nat_ports = \"3000-2000\"\n"),
        "daemon.nat_ports",
        "not above the last",
    );
    assert_rejected(
        &with_backend("address = \"10.1.0.1\"\nport = 8080"),
        "vip[0] (web).backend[0].port",
        "only applies with forwarding = \"nat\"",
    );
    assert_rejected(
        &format!(
            "{DAEMON}[[vip]]\nname = \"web\"\naddress = \"192.0.2.10\"\nport = 80\n\
             forwarding = \"nat\"\n[[vip.backend]]\naddress = \"2001:db8::1\"\n"
        ),
        "vip[0] (web).backend[0].address",
        "no NAT64",
    );
}

#[test]
fn backend_problems_are_rejected() {
    let cases = [
        (
            "weight = 1",
            "address",
            "missing; add e.g. address = \"10.1.0.11\"",
        ),
        (
            "address = \"10.1.0.300\"",
            "address",
            "\"10.1.0.300\" is not an IP address",
        ),
        (
            "address = \"10.1.0.1\"\nweight = 65536",
            "weight",
            "65536 is too large: use at most 65535",
        ),
        (
            "address = \"10.1.0.1\"\nweight = -1",
            "weight",
            "-1 is too small: use at least 0",
        ),
        (
            "address = \"10.1.0.1\"\nmac = \"02:00:00:00:00\"",
            "mac",
            "\"02:00:00:00:00\" is not a MAC address",
        ),
        (
            "address = \"10.1.0.1\"\nhealth_port = 0",
            "health_port",
            "0 is too small: use at least 1",
        ),
    ];
    for (keys, key, message) in cases {
        assert_rejected(
            &with_backend(&format!("{keys}\n")),
            &format!("vip[0] (web).backend[0].{key}"),
            message,
        );
    }
    assert_rejected(
        &with_backend(
            "address = \"10.1.0.11\"\n[[vip.backend]]\naddress = \"10.1.0.12\"\n\
             [[vip.backend]]\naddress = \"10.1.0.11\"\n",
        ),
        "vip[0] (web).backend[2].address",
        "10.1.0.11 is already backend[0]; list each backend once",
    );
    assert_rejected(
        &format!(
            "{DAEMON}[[vip]]\nname = \"v6\"\naddress = \"2001:db8::10\"\nport = 80\n\
             forwarding = \"ipip\"\n[[vip.backend]]\naddress = \"10.1.0.1\"\n"
        ),
        "vip[0] (v6).backend[0].address",
        "10.1.0.1 is IPv4 but the VIP is IPv6 with forwarding = \"ipip\", and IPv6 cannot \
         be tunnelled in IPv4 (6in4 is not supported)",
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
            bogus = 1
            [daemon]
            interfaces = ["eth0", "eth0"]
            max_vips = 0
            idle_timeout = "5 minutes"
            [[vip]]
            name = "web"
            address = "192.0.2.10"
            port = 80
            ring_size = 100
            [vip.health]
            kind = "tcp"
            path = "/"
            timeout = "2s"
            [[vip.backend]]
            address = "10.1.0.300"
            weight = 70000
            [[vip]]
            name = "web"
            address = "192.0.2.10"
            port = 80
        "#;
    let keys: Vec<String> = problems(text).into_iter().map(|p| p.key).collect();
    assert_eq!(
        keys,
        [
            "bogus",
            "daemon.max_vips",
            "daemon.interfaces[1]",
            "daemon.idle_timeout",
            "vip[0] (web).health.path",
            "vip[0] (web).health.timeout",
            "vip[0] (web).backend[0].address",
            "vip[0] (web).backend[0].weight",
            "vip[0] (web).ring_size",
            "vip[1] (web).name",
            "vip[1] (web).address",
        ]
    );
}

#[test]
fn an_invalid_file_prints_one_problem_per_line() {
    let text = format!("{DAEMON}max_vips = 0\n{WEB}ring_size = 100\n");
    assert_eq!(
        parse(&text, "xdplb.toml").unwrap_err().to_string(),
        "xdplb.toml: daemon.max_vips: 0 is too small: use at least 1\n\
         xdplb.toml: vip[0] (web).ring_size: ring_size 100 is not prime; use a prime such \
         as 101"
    );
}

#[test]
fn durations_take_whole_numbers_with_units() {
    for (text, millis) in [
        ("500ms", 500),
        ("1s", 1000),
        ("5m", 300_000),
        ("2h", 7_200_000),
        ("1m30s", 90_000),
        ("1h1ms", 3_600_001),
    ] {
        assert_eq!(
            parse_duration(text),
            Ok(Duration::from_millis(millis)),
            "{text}"
        );
        assert_eq!(
            parse_duration(&format_duration(Duration::from_millis(millis))),
            Ok(Duration::from_millis(millis))
        );
    }
    for text in [
        "",
        "5",
        "s",
        "1x",
        "1.5s",
        "-1s",
        "+1s",
        "1 s",
        "1S",
        "99999999999999999999s",
        "18446744073709551615h",
    ] {
        assert!(parse_duration(text).is_err(), "{text:?} parsed");
    }
    // Zero parses (CLI arguments may use it); the file's keys reject it separately.
    assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    assert_eq!(format_duration(Duration::from_millis(90_000)), "90s");
    assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
}
