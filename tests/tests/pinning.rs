//! Pinned maps and links: what makes daemon restarts and upgrades hitless. The program stays
//! attached through every step; a restart adopts the maps, an older layout's link is taken
//! over, a size change replaces the maps, and unpinning detaches.

use lb_userspace::dataplane::{Adoption, AttachMode, Dataplane, Role, Sizes};
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};
use xdplb_tests::lab::{sh, Netns};

const SIZES: Sizes = Sizes {
    nat_table_size: lb_common::DEFAULT_NAT_TABLE_SIZE,
    max_vips: 4,
    max_backends: 16,
    max_ring_size: 13,
    flow_table_size: 1024,
};

/// A bpffs of the test's own, unmounted on drop.
struct Bpffs(PathBuf);

impl Bpffs {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("xdplb-pinning-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        sh(&format!("mount -t bpf bpf {}", dir.display())).unwrap();
        Self(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = sh(&format!("umount -l {}", self.0.display()));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The id of the XDP program attached to `iface`, if any.
fn attached(ns: &Netns, iface: &str) -> Option<u64> {
    let out = ns.exec(&format!("ip -j link show {iface}")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json[0]["xdp"]["prog"]["id"].as_u64()
}

fn load_and_attach(ns: &Netns, root: &Path, sizes: Sizes) -> (Dataplane, Adoption) {
    ns.enter(|| {
        let mut dp = Dataplane::load(Role::Balancer, sizes, Some(root)).unwrap();
        dp.attach("veth0", AttachMode::Native).unwrap();
        dp.remove_older_layouts().unwrap();
        let adoption = dp.adoption().clone();
        (dp, adoption)
    })
    .unwrap()
}

#[test]
fn restarts_and_upgrades_keep_the_program_attached() {
    let bpffs = Bpffs::new();
    let root = bpffs.0.join("xdplb");
    let ns = Netns::new(&format!("xdplb-pin-{}", std::process::id())).unwrap();
    ns.exec("ip link add veth0 type veth peer name veth1 && ip link set veth0 up && ip link set veth1 up")
        .unwrap();
    let layout = root.join(format!("v{}", lb_common::LAYOUT_VERSION));

    // First start: fresh maps, link pinned; the process "exits" and XDP stays.
    let (dp, adoption) = load_and_attach(&ns, &root, SIZES);
    assert_eq!(adoption, Adoption::Fresh);
    assert!(layout.join("link_veth0").exists());
    let first = attached(&ns, "veth0").expect("attached");
    drop(dp);
    assert_eq!(
        attached(&ns, "veth0"),
        Some(first),
        "still attached after exit"
    );

    // Restart: maps adopted, the new program swapped into the same link.
    let (dp, adoption) = load_and_attach(&ns, &root, SIZES);
    assert_eq!(adoption, Adoption::Adopted);
    let second = attached(&ns, "veth0").expect("attached");
    assert_ne!(second, first, "the new program replaced the old one");
    drop(dp);

    // Upgrade from an older layout: its link is taken over, its pins removed.
    let old = root.join("v1");
    std::fs::rename(&layout, &old).unwrap();
    let (dp, adoption) = load_and_attach(&ns, &root, SIZES);
    assert_eq!(adoption, Adoption::Fresh, "no maps of this layout existed");
    assert!(!old.exists(), "older layout removed");
    assert!(
        layout.join("link_veth0").exists(),
        "link re-pinned under this layout"
    );
    assert!(attached(&ns, "veth0").is_some());
    drop(dp);

    // New sizes: maps replaced (flows start empty), still attached.
    let bigger = Sizes {
        flow_table_size: 2048,
        ..SIZES
    };
    let (dp, adoption) = load_and_attach(&ns, &root, bigger);
    match adoption {
        Adoption::Replaced(reason) => assert!(reason.contains("FLOWS"), "{reason}"),
        other => panic!("expected replaced maps, got {other:?}"),
    }
    assert!(attached(&ns, "veth0").is_some());

    // Removing everything detaches once the process lets go.
    dp.unpin_everything().unwrap();
    drop(dp);
    // The kernel releases a link whose last reference was its bpffs pin from a workqueue, so
    // the detach may land a moment after the unlink.
    let deadline = Instant::now() + Duration::from_secs(3);
    while attached(&ns, "veth0").is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(attached(&ns, "veth0"), None, "detached");
}
