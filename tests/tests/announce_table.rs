//! The announcer against the real kernel, in a namespace of its own: the routes it writes into
//! the announce table, VIPs sharing an address, taking over what a previous run left, and the
//! withdrawal on stop. (The whole story with BGP is in bgp_e2e.rs.)

use lb_userspace::{
    announce::{AnnounceConfig, Announcer, BackendFacts, VipFacts},
    health::State,
    model::Announce,
};
use std::{net::IpAddr, time::Duration};
use xdplb_tests::lab::Netns;

const TABLE: u32 = 4243;

fn backend(health: State) -> BackendFacts {
    BackendFacts {
        health,
        drained: false,
        weight_zero: false,
        unresolved: false,
    }
}

fn vip(name: &'static str, addr: &str, mode: Announce, health: State) -> VipFacts<'static> {
    VipFacts {
        name,
        addr: addr.parse::<IpAddr>().unwrap(),
        mode,
        backends: vec![backend(health)],
    }
}

fn config() -> AnnounceConfig {
    AnnounceConfig {
        table: TABLE,
        withdraw_grace: Duration::from_secs(1),
    }
}

#[test]
fn routes_follow_the_decisions_and_survive_a_restart() {
    let ns = Netns::new(&format!("xdplb-ann-{}", std::process::id())).unwrap();
    let table = || {
        ns.exec(&format!(
            "ip route show table {TABLE}; ip -6 route show table {TABLE}"
        ))
        .unwrap()
    };
    ns.enter(|| {
        let mut announcer = Announcer::start(config()).unwrap();
        // web and web-tls share 192.0.2.10: one route, kept while one of them is announced.
        let vips = [
            vip("web", "192.0.2.10", Announce::Healthy, State::Up),
            vip("web-tls", "192.0.2.10", Announce::Healthy, State::Down),
            vip("never", "192.0.2.11", Announce::Never, State::Up),
            vip("v6", "2001:db8::10", Announce::Always, State::Down),
        ];
        announcer.sync(&[], 0, &vips).unwrap();
        let routes = table();
        assert!(
            routes.contains("blackhole 192.0.2.10 proto 250")
                && routes.contains("blackhole 2001:db8::10 dev lo proto 250")
                && !routes.contains("192.0.2.11"),
            "{routes}"
        );
        assert_eq!(
            announcer.announcement("web-tls").unwrap().state,
            "withdrawn: no backend up: every backend down (the address stays announced for \
             another VIP on it)"
        );
        assert_eq!(
            announcer.announced(),
            [
                ("never".to_string(), false),
                ("v6".to_string(), true),
                ("web".to_string(), true),
                ("web-tls".to_string(), true),
            ]
            .into()
        );

        // A new run (after kill -9) takes the routes over; while its checks have not finished
        // it keeps them, and a VIP gone from the config is withdrawn.
        drop(announcer);
        let mut announcer = Announcer::start(config()).unwrap();
        announcer
            .sync(
                &[],
                0,
                &[vip("web", "192.0.2.10", Announce::Healthy, State::Unknown)],
            )
            .unwrap();
        let routes = table();
        assert!(
            routes.contains("blackhole 192.0.2.10 proto 250") && !routes.contains("2001:db8::10"),
            "{routes}"
        );
        assert_eq!(
            announcer.announcement("web").unwrap().state,
            "announced: waiting for the first health checks (keeps the previous state)"
        );

        // An interface without our program withdraws everything it serves.
        announcer
            .sync(
                &["lo".to_string()],
                1,
                &[vip("web", "192.0.2.10", Announce::Always, State::Up)],
            )
            .unwrap();
        assert_eq!(
            announcer.announcement("web").unwrap().state,
            "withdrawn: XDP program not attached on lo"
        );
        assert_eq!(table().trim(), "");

        // Stop: nothing stays, and later syncs (during the grace period) announce nothing.
        announcer
            .sync(
                &[],
                0,
                &[vip("web", "192.0.2.10", Announce::Always, State::Up)],
            )
            .unwrap();
        assert!(table().contains("192.0.2.10"));
        announcer.withdraw_all().unwrap();
        announcer
            .sync(
                &[],
                0,
                &[vip("web", "192.0.2.10", Announce::Always, State::Up)],
            )
            .unwrap();
        assert_eq!(table().trim(), "");
        assert_eq!(
            announcer.announcement("web").unwrap().state,
            "withdrawn: daemon stopping"
        );
    })
    .unwrap();
}
