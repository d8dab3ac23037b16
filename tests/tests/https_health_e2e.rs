//! `kind = "https"` health checks against real TLS servers (rustls in the lab server) in a lab,
//! with certificates this test generates: a server that answers is up; a wrong status, a
//! server that accepts TCP but never completes the handshake, and a certificate from another
//! CA (with verification on) are down, each with its reason; the right CA is up.

use serde_json::Value;
use std::path::PathBuf;
use xdplb_tests::{
    lab::{backend4, Daemon, Lab, Process},
    pki::Ca,
};

/// Checks fast enough for a short test, with a timeout that a TLS handshake on a loaded
/// 2-core machine (debug build) meets by far; the silent server exceeds any timeout.
const CHECK: &str = "interval = \"300ms\"\ntimeout = \"250ms\"\nrise = 1\nfall = 1\n";

/// A VIP on port 443 checking `backends` with `kind = "https"` plus `keys`.
fn vip(name: &str, last_octet: u8, keys: &str, backends: &[usize]) -> String {
    let mut text = format!(
        "[[vip]]\nname = \"{name}\"\naddress = \"192.0.2.{last_octet}\"\nport = 443\n\
         ring_size = 1021\n[vip.health]\nkind = \"https\"\npath = \"/healthz\"\n{keys}{CHECK}"
    );
    for n in backends {
        text.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\n",
            backend4(*n)
        ));
    }
    text
}

/// A temporary directory for the certificates, removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Backend `n` of VIP `vip` in `xdplb status --json`.
fn backend<'a>(status: &'a Value, vip: &str, n: usize) -> &'a Value {
    let address = backend4(n).to_string();
    status["vips"]
        .as_array()
        .and_then(|vips| vips.iter().find(|v| v["name"] == vip))
        .and_then(|v| v["backends"].as_array())
        .and_then(|list| list.iter().find(|b| b["address"] == address.as_str()))
        .unwrap_or_else(|| panic!("no backend {address} in {vip}: {status}"))
}

fn up(b: &Value) -> bool {
    b["health"] == "up"
}

/// Down, with a last failure containing `reason`.
fn down_for(b: &Value, reason: &str) -> bool {
    b["health"] == "down"
        && b["last_failure"]
            .as_str()
            .is_some_and(|f| f.contains(reason))
}

#[test]
fn https_checks_prove_the_tls_service_answers() {
    let lab = Lab::new(2).expect("lab");
    let dir = Dir(std::env::temp_dir().join(format!("{}-pki", lab.id)));
    std::fs::create_dir_all(&dir.0).unwrap();
    let ca = Ca::new(&dir.0, "lab-ca").unwrap();
    let other_ca = Ca::new(&dir.0, "other-ca").unwrap();
    let cert = ca.server(&dir.0, "b0", &[backend4(0).into()]).unwrap();
    // b0 serves HTTP (status 200) over TLS; b1 accepts TCP and never says a word.
    let _servers: Vec<Process> = vec![
        lab.backends[0]
            .serve_tls("b0", "0.0.0.0:443", &cert)
            .unwrap(),
        lab.backends[1]
            .serve("b1", "0.0.0.0:443", "silent")
            .unwrap(),
    ];
    for b in &lab.backends {
        b.wait_sockets(1, 0).unwrap();
    }
    let verify = |ca: &Ca| format!("tls_verify = true\ntls_ca = \"{}\"\n", ca.cert.display());
    let services = [
        vip("plain", 10, "", &[0, 1]),
        vip("status", 11, "expect_status = 204\n", &[0]),
        vip("verified", 12, &verify(&ca), &[0]),
        vip("wrong_ca", 13, &verify(&other_ca), &[0]),
    ]
    .concat();
    let daemon = Daemon::start(&lab, "", &services).expect("daemon");
    let settled = |s: &Value| {
        up(backend(s, "plain", 0))
            && down_for(backend(s, "plain", 1), "TLS: timeout in the handshake")
            && down_for(backend(s, "status", 0), "HTTP 200")
            && up(backend(s, "verified", 0))
            && down_for(backend(s, "wrong_ca", 0), "TLS: invalid peer certificate")
    };
    if let Err(e) = daemon.wait_status("every https check's verdict", settled) {
        let status = daemon.cli(&["status"]).unwrap_or_default();
        panic!("{e}\nstatus:\n{status}");
    }
    // A verdict that lasts: checks keep running, and the up ones stay up (no flapping).
    std::thread::sleep(std::time::Duration::from_secs(1));
    let status: Value = serde_json::from_str(&daemon.cli(&["status", "--json"]).unwrap()).unwrap();
    assert!(settled(&status), "{status}");
    let text = daemon.cli(&["status"]).unwrap();
    println!("{text}");
}
