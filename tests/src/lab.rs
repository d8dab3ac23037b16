//! Labs in network namespaces: hosts on one bridge, the real `xdplb` daemon, real TCP/UDP
//! servers and clients. Every address lives inside namespaces the lab creates, and everything
//! is removed on drop, also when a test fails.
//!
//! Topology (one L2 segment, 10.0.0.0/24 and fd00::/64, inside the lab's own namespaces):
//! ```text
//!   client (.10) ---+
//!   lb     (.2)  ---+-- br0 (in the switch namespace)
//!   b1..bN (.11+)---+
//! ```
//! VIPs live in 192.0.2.0/24 and 2001:db8:100::/64; the client routes them via the LB. In
//! `dsr`, backends hold the VIPs on `lo` and answer the client directly.
//!
//! [`Lab::with_ecmp`] puts the client behind a router that spreads the VIPs over two LBs by a
//! hash of the 5-tuple, as a data-centre fabric would:
//! ```text
//!   client (10.0.1.10) --- router (10.0.1.1 | .1) ---+
//!                                 lb (.2), lb2 (.3) ---+-- br0
//!                                 b1..bN (.11+) -------+
//! ```
//! Backends answer the client through the router (DSR), so only client-to-VIP packets cross
//! the LBs. [`Lab::with_bgp`] is the same without the router's static route: the router learns
//! the VIPs from the LBs over BGP (see [`crate::bird`]).
//!
//! [`Lab::behind_router`] is the same with one LB and a smaller MTU on the router's
//! client-side interface (the client and every other interface keep 1500): replies larger
//! than it make the router send "fragmentation needed" / "packet too big" to their source,
//! the VIP, as a real path MTU bottleneck does.

use anyhow::{bail, Context as _, Result};
use lb_userspace::dataplane::{AttachMode, Dataplane, Role, Sizes};
use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub const LB4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
pub const VIP_NET4: &str = "192.0.2.0/24";
pub const VIP_NET6: &str = "2001:db8:100::/64";

/// The n-th backend's addresses (n from 0).
pub fn backend4(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 11 + n as u8)
}
pub fn backend6(n: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x11 + n as u16)
}
pub const LB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10);

/// ECMP labs: the second LB, and the router's side of the bridge.
pub const LB2_4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
pub const LB2_6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3);
pub const ROUTER4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
/// ECMP labs: the client's own link to the router.
const ECMP_NET4: &str = "10.0.1.0/24";
const ECMP_NET6: &str = "fd00:0:0:1::/64";
pub const ECMP_CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
pub const ECMP_CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0x10);
const ECMP_GATEWAY4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
const ECMP_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 1);

/// Map sizes of lab daemons: small, so a daemon starts fast and many labs fit in memory.
pub const LAB_SIZES: &str =
    "flow_table_size = 65536\nmax_vips = 8\nmax_backends = 64\nmax_ring_size = 1021\n";

/// Runs a command and fails with its stderr.
pub fn sh(command: &str) -> Result<String> {
    let out = Command::new("sh")
        .args(["-c", command])
        .output()
        .with_context(|| format!("running {command}"))?;
    if !out.status.success() {
        bail!(
            "`{command}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        // A leftover from a crashed run of the same name would make `add` fail.
        let _ = sh(&format!("ip netns del {name} 2>/dev/null"));
        // The guard exists first: should `add` be interrupted after creating the namespace
        // (Ctrl-C in the demo), its drop still deletes it.
        let ns = Self {
            name: name.to_string(),
        };
        sh(&format!("ip netns add {name}"))?;
        // No duplicate address detection on interfaces created here: while a link-local address
        // is tentative the kernel sends no neighbour solicitation for traffic whose source is
        // not an address of the interface, so a dsr backend answering from an IPv6 VIP (held
        // by a route on lo) could not reach the client for the first second or two.
        ns.exec(
            "ip link set lo up && \
             sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0",
        )?;
        Ok(ns)
    }

    /// Runs a shell command inside the namespace.
    pub fn exec(&self, command: &str) -> Result<String> {
        sh(&format!("ip netns exec {} sh -c '{command}'", self.name))
    }

    /// Starts a long-running process inside the namespace.
    pub fn spawn(&self, program: &Path, args: &[&str]) -> Result<Child> {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} in {}", program.display(), self.name))
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens belong there).
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
                    // SAFETY: setns on this thread only, with a valid namespace fd.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns {path}: {}", std::io::Error::last_os_error());
                    }
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns del {}", self.name));
    }
}

/// A host on the lab's bridge.
pub struct Host {
    pub ns: Netns,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

/// Unique names, so tests can run in parallel.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}-{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Connects `host` to the lab's bridge by a veth (`eth0` in the host, `p-<name>` on the
/// bridge) with its addresses; `link_options` go to the `eth0` side (e.g. its MAC).
fn plug(host: &Host, switch: &Netns, name: &str, link_options: &str) -> Result<()> {
    sh(&format!(
        "ip link add eth0 netns {} {link_options} type veth peer name p-{name} netns {}",
        host.ns.name, switch.name
    ))?;
    switch.exec(&format!(
        "ip link set p-{name} master br0 && ip link set p-{name} up"
    ))?;
    host.ns.exec(&format!(
        "ip addr add {}/24 dev eth0 && ip addr add {}/64 dev eth0 nodad && \
         ip link set eth0 up && ethtool -K eth0 tx off >/dev/null",
        host.ip4, host.ip6
    ))?;
    Ok(())
}

/// The pass-everything program on an LB's bridge port (see `Lab::_peer_xdp`); a link pinned
/// for an earlier port of that name (severed when it was deleted) is replaced.
fn attach_pass(switch: &Netns, pins: &BpfMount, port: &str) -> Result<()> {
    switch.enter(|| -> Result<()> {
        let mut xdp = Dataplane::load(Role::Decap, Sizes::UNUSED, Some(&pins.0.join(port)))?;
        xdp.attach(port, AttachMode::Native)?;
        Ok(())
    })?
}

/// A bpffs mounted on the directory it names: unmounting it drops every pin in it (pinned links
/// detach their programs). Unmounted and removed on drop.
struct BpfMount(PathBuf);

impl BpfMount {
    fn new(dir: PathBuf) -> Result<Self> {
        // The guard exists before the mount, so a failed mount still removes the directory.
        let mount = Self(dir);
        std::fs::create_dir_all(&mount.0)?;
        sh(&format!("mount -t bpf bpf {}", mount.0.display()))?;
        Ok(mount)
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        let _ = sh(&format!("umount -l {}", self.0.display()));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What stands between the client and the LB segment.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Front {
    /// The client is on the bridge.
    Bridge,
    /// A router with an ECMP route over two LBs.
    Ecmp,
    /// A router to one LB, with a smaller MTU toward the client.
    Router { client_link_mtu: u32 },
}

pub struct Lab {
    pub id: String,
    pub client: Host,
    pub lb: Host,
    /// The second LB of an ECMP lab ([`Lab::with_ecmp`]).
    pub lb2: Option<Host>,
    /// The router between the client and the LBs of an ECMP lab; `ip4`/`ip6` are its addresses
    /// on the bridge.
    pub router: Option<Host>,
    pub backends: Vec<Host>,
    /// Keeps an XDP program on each LB's bridge port: veth drops XDP_TX frames unless its peer
    /// has one (TOOLCHAIN.md). The decap program with empty sets passes everything. Its links
    /// are pinned here rather than held by this process, so a lab left running on purpose
    /// (`xdplb-demo --keep`) keeps forwarding after the process exits.
    _peer_xdp: BpfMount,
    // Dropped last: deleting it removes the bridge ports.
    pub switch: Netns,
}

impl Lab {
    /// Deletes `host`'s interface (as a driver reload or a network manager re-creating a
    /// VLAN does; its bridge port goes with it). Returns its MAC for
    /// [`restore_interface`](Self::restore_interface).
    pub fn delete_interface(&self, host: &Host) -> Result<String> {
        let mac = host.ns.exec("cat /sys/class/net/eth0/address")?;
        host.ns.exec("ip link del eth0")?;
        Ok(mac.trim().to_string())
    }

    /// Creates `host`'s interface again with the same MAC and addresses: a new netdev without
    /// any XDP program (an LB's bridge port gets its pass program back).
    pub fn restore_interface(&self, host: &Host, mac: &str) -> Result<()> {
        let name = host
            .ns
            .name
            .strip_prefix(&format!("{}-", self.id))
            .context("a host of this lab")?;
        plug(host, &self.switch, name, &format!("address {mac}"))?;
        if name.starts_with("lb") {
            attach_pass(&self.switch, &self._peer_xdp, &format!("p-{name}"))?;
        }
        Ok(())
    }

    /// Takes the pass program off the LB's bridge port (`false`) or puts it back (`true`).
    /// Only XDP_TX from the LB needs it, but it also takes every frame the LB's own stack
    /// sends, which veth then copies into an XDP buffer and back: a benchmark of balancers
    /// on the LB's stack (HAProxy, nftables) measures them without it.
    pub fn lb_port_pass(&self, on: bool) -> Result<()> {
        let port = "p-lb";
        if on {
            return attach_pass(&self.switch, &self._peer_xdp, port);
        }
        // The pins hold the link: removing them detaches the program.
        let pins = self._peer_xdp.0.join(port);
        std::fs::remove_dir_all(&pins).with_context(|| format!("removing {}", pins.display()))
    }

    /// `count` new TCP connections from the client to `vip`: the names of the backends that
    /// answered, or the errors.
    pub fn connect(&self, vip: SocketAddr, count: usize) -> Vec<Result<String, String>> {
        self.client
            .ns
            .enter(|| {
                (0..count)
                    .map(|_| who(vip).map_err(|e| e.to_string()))
                    .collect()
            })
            .expect("entering the client's namespace")
    }

    /// Builds the topology with `backends` backends serving nothing yet.
    pub fn new(backends: usize) -> Result<Self> {
        Self::build(backends, Front::Bridge, true)
    }

    /// The ECMP topology (see the module docs): two LBs, `backends` backends, and the client
    /// behind a router with a multipath route to the VIPs hashed on the 5-tuple.
    pub fn with_ecmp(backends: usize) -> Result<Self> {
        Self::build(backends, Front::Ecmp, true)
    }

    /// The ECMP topology with no route to the VIPs on the router: BGP brings them.
    pub fn with_bgp(backends: usize) -> Result<Self> {
        let lab = Self::build(backends, Front::Ecmp, true)?;
        let router = lab.router.as_ref().expect("an ECMP lab has a router");
        router.ns.exec(&format!(
            "ip route del {VIP_NET4} && ip -6 route del {VIP_NET6}"
        ))?;
        Ok(lab)
    }

    /// The client behind a router whose client-side interface has MTU `client_link_mtu`
    /// (see the module docs), one LB.
    pub fn behind_router(backends: usize, client_link_mtu: u32) -> Result<Self> {
        Self::build(backends, Front::Router { client_link_mtu }, true)
    }

    /// [`Lab::new`] with backends left as they come: no VIP, no sysctl changed (`nat`
    /// backends need nothing).
    pub fn with_plain_backends(backends: usize) -> Result<Self> {
        Self::build(backends, Front::Bridge, false)
    }

    /// `dsr_backends`: the backends hold the VIPs and answer no ARP/ND for them.
    fn build(backends: usize, front: Front, dsr_backends: bool) -> Result<Self> {
        let routed = front != Front::Bridge;
        let id = unique("xl");
        let switch = Netns::new(&format!("{id}-sw"))?;
        let peer_xdp = BpfMount::new(std::env::temp_dir().join(format!("{id}-peers")))?;
        switch.exec("ip link add br0 type bridge && ip link set br0 up")?;
        let host = |name: &str, ip4: Ipv4Addr, ip6: Ipv6Addr| -> Result<Host> {
            let host = Host {
                ns: Netns::new(&format!("{id}-{name}"))?,
                ip4,
                ip6,
            };
            plug(&host, &switch, name, "")?;
            Ok(host)
        };
        let (client, lb, lb2, router) = if routed {
            let router = host("r", ROUTER4, ROUTER6)?;
            let client = Netns::new(&format!("{id}-c"))?;
            sh(&format!(
                "ip link add eth0 netns {} type veth peer name eth1 netns {}",
                client.name, router.ns.name
            ))?;
            client.exec(&format!(
                "ip addr add {ECMP_CLIENT4}/24 dev eth0 && \
                 ip addr add {ECMP_CLIENT6}/64 dev eth0 nodad && ip link set eth0 up && \
                 ethtool -K eth0 tx off >/dev/null && \
                 ip route add default via {ECMP_GATEWAY4} && \
                 ip -6 route add default via {ECMP_GATEWAY6}"
            ))?;
            let lb = host("lb", LB4, LB6)?;
            let (lb2, routes, mtu) = match front {
                Front::Router { client_link_mtu } => (
                    None,
                    format!(
                        "ip route add {VIP_NET4} via {LB4} && ip -6 route add {VIP_NET6} via {LB6}"
                    ),
                    client_link_mtu,
                ),
                _ => (
                    Some(host("lb2", LB2_4, LB2_6)?),
                    format!(
                        "ip route add {VIP_NET4} nexthop via {LB4} nexthop via {LB2_4} && \
                         ip -6 route add {VIP_NET6} nexthop via {LB6} nexthop via {LB2_6}"
                    ),
                    1500,
                ),
            };
            // Policy 1 hashes on the 5-tuple, so each flow sticks to one LB until the route
            // changes. Replies from backends to the VIP's address come in on the bridge, where
            // the VIP route also points: rp_filter is off anyway, as on real routers with ECMP.
            // Forwarding on and path MTU discovery untouched: the router sends real ICMP
            // errors for packets larger than the client-side MTU.
            router.ns.exec(&format!(
                "ip addr add {ECMP_GATEWAY4}/24 dev eth1 && \
                 ip addr add {ECMP_GATEWAY6}/64 dev eth1 nodad && \
                 ip link set eth1 mtu {mtu} up && ethtool -K eth1 tx off >/dev/null && \
                 sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
                 net.ipv4.fib_multipath_hash_policy=1 net.ipv6.fib_multipath_hash_policy=1 \
                 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0 \
                 net.ipv4.conf.eth1.rp_filter=0 && {routes}"
            ))?;
            let client = Host {
                ns: client,
                ip4: ECMP_CLIENT4,
                ip6: ECMP_CLIENT6,
            };
            (client, lb, lb2, Some(router))
        } else {
            let client = host("c", CLIENT4, CLIENT6)?;
            let lb = host("lb", LB4, LB6)?;
            client.ns.exec(&format!(
                "ip route add {VIP_NET4} via {LB4} && ip -6 route add {VIP_NET6} via {LB6}"
            ))?;
            (client, lb, None, None)
        };
        let backends = (0..backends)
            .map(|n| host(&format!("b{n}"), backend4(n), backend6(n)))
            .collect::<Result<Vec<_>>>()?;
        for b in backends.iter().filter(|_| dsr_backends) {
            // dsr: the VIPs are local on every backend, but only the LB answers ARP/ND for them.
            b.ns.exec(&format!(
                "ip route add local {VIP_NET4} dev lo && ip -6 route add local {VIP_NET6} dev lo && \
                 sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 \
                 net.ipv4.conf.eth0.arp_ignore=1 net.ipv4.conf.eth0.arp_announce=2 \
                 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0"
            ))?;
            if routed {
                // Replies go straight back to the client, through the router.
                b.ns.exec(&format!(
                    "ip route add {ECMP_NET4} via {ROUTER4} && \
                     ip -6 route add {ECMP_NET6} via {ROUTER6}"
                ))?;
            }
        }
        let lb_ports: &[&str] = if lb2.is_some() {
            &["p-lb", "p-lb2"]
        } else {
            &["p-lb"]
        };
        for port in lb_ports {
            attach_pass(&switch, &peer_xdp, port)?;
        }
        Ok(Self {
            id,
            client,
            lb,
            lb2,
            router,
            backends,
            _peer_xdp: peer_xdp,
            switch,
        })
    }

    /// Leaves the lab, `daemons` and `processes` running after this process exits (none of
    /// their drops runs) and returns a shell command that removes all of them.
    pub fn leave_running(self, daemons: Vec<Daemon>, processes: Vec<Process>) -> String {
        let mut namespaces: Vec<&str> = [&self.client, &self.lb]
            .into_iter()
            .chain(&self.lb2)
            .chain(&self.router)
            .chain(&self.backends)
            .map(|host| host.ns.name.as_str())
            .collect();
        // Last: deleting it removes the bridge ports of the others.
        namespaces.push(&self.switch.name);
        let mut mounts: Vec<PathBuf> = daemons.iter().map(|d| d.dir.join("bpffs")).collect();
        mounts.push(self._peer_xdp.0.clone());
        let mut dirs: Vec<PathBuf> = daemons.iter().map(|d| d.dir.clone()).collect();
        dirs.push(self._peer_xdp.0.clone());
        let join = |paths: &[PathBuf]| {
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        // Processes first (the daemon, servers, decap programs), then the namespaces; the
        // unmounts drop the pinned programs and maps.
        let command = format!(
            "for ns in {}; do ip netns pids $ns | xargs -r kill; ip netns del $ns; done; \
             umount -l {}; rm -rf {}",
            namespaces.join(" "),
            join(&mounts),
            join(&dirs)
        );
        std::mem::forget(processes);
        std::mem::forget(daemons);
        std::mem::forget(self);
        command
    }
}

/// The `xdplb` binary under test: built by `cargo xtask test` before the integration stage.
pub fn xdplb_binary() -> PathBuf {
    std::env::var_os("XDPLB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/xdplb"))
}

/// The lab server binary of this crate: cargo builds it in `target/debug`, beside this crate's
/// other binaries (`xdplb-demo`) and one level above the test binaries (`target/debug/deps`).
pub fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("own binary path");
    let dir = exe.parent().expect("target/debug");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("target/debug")
    } else {
        dir
    };
    dir.join("lab-server")
}

/// A process killed on drop.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Host {
    /// Starts a lab server named `name` on `listen` ("0.0.0.0:80", "[::]:80").
    pub fn serve(&self, name: &str, listen: &str, proto: &str) -> Result<Process> {
        self.ns
            .spawn(&server_binary(), &[name, listen, proto])
            .map(Process)
    }

    /// Starts a lab server named `name` answering over TLS on `listen` with `cert`.
    pub fn serve_tls(
        &self,
        name: &str,
        listen: &str,
        cert: &crate::pki::ServerCert,
    ) -> Result<Process> {
        let (cert, key) = (cert.cert.to_string_lossy(), cert.key.to_string_lossy());
        self.ns
            .spawn(&server_binary(), &[name, listen, "tls", &cert, &key])
            .map(Process)
    }

    /// Waits until at least `tcp` TCP listeners and `udp` UDP sockets are bound in the host's
    /// namespace: servers start asynchronously, and a request sent before would be refused.
    pub fn wait_sockets(&self, tcp: usize, udp: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let count = |flags: &str| -> Result<usize> {
                Ok(self.ns.exec(&format!("ss -H {flags}"))?.lines().count())
            };
            if count("-ltn")? >= tcp && count("-lun")? >= udp {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: {tcp} TCP and {udp} UDP sockets were not bound within 10 s",
                    self.ns.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `xdplb decap eth0` (the project's decapsulator: this kernel has no ipip module)
    /// for tunnels addressed to `locals` that carry packets for `vips`, and waits until its
    /// program is attached.
    pub fn decap(&self, locals: &[IpAddr], vips: &[IpAddr]) -> Result<Process> {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns.name])
            .arg(xdplb_binary())
            .args(["decap", "eth0", "--xdp-mode", "native"]);
        for local in locals {
            command.args(["--local", &local.to_string()]);
        }
        for vip in vips {
            command.args(["--vip", &vip.to_string()]);
        }
        // Its "attached" line would interleave with test and demo output; errors still show.
        command.env("XDPLB_LOG", "warn").stdin(Stdio::null());
        let mut process = Process(
            command
                .spawn()
                .with_context(|| format!("starting xdplb decap in {}", self.ns.name))?,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.ns.exec("ip link show dev eth0")?.contains("prog/xdp") {
            if let Some(status) = process.0.try_wait()? {
                bail!("xdplb decap in {} exited: {status}", self.ns.name);
            }
            if Instant::now() > deadline {
                bail!("xdplb decap in {} did not attach in 20 s", self.ns.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(process)
    }
}

/// The daemon running in the LB namespace with its own pin dir, socket and state dir.
pub struct Daemon {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub process: Option<Child>,
    ns: String,
}

impl Daemon {
    /// Writes `[daemon]` settings unique to this lab in front of `services` (TOML of
    /// `[[vip]]` tables) and starts `xdplb run`, waiting until its socket answers.
    pub fn start(lab: &Lab, extra_daemon: &str, services: &str) -> Result<Self> {
        Self::start_on(
            &lab.lb.ns,
            &lab.id,
            &format!("{LAB_SIZES}{extra_daemon}"),
            services,
        )
    }

    /// Starts `xdplb run` in `ns` with its files under `<temp dir>/<name>`: each daemon of a
    /// lab needs its own name, since the pin dir, socket and state would otherwise be shared.
    /// `daemon_keys` are the `[daemon]` keys besides the interface and those paths.
    pub fn start_on(ns: &Netns, name: &str, daemon_keys: &str, services: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(name);
        let socket = dir.join("admin.sock");
        // Its own bpffs outside /sys: `ip netns exec` remounts /sys privately, so pins under
        // /sys/fs/bpf would vanish with the daemon (and `kill -9` would stop forwarding).
        let bpffs = dir.join("bpffs");
        let pin_dir = bpffs.join("xdplb");
        let config = dir.join("xdplb.toml");
        // Built before anything is created, so that Drop cleans up after any failure below.
        let mut daemon = Self {
            dir,
            config,
            socket,
            pin_dir,
            process: None,
            ns: ns.name.clone(),
        };
        std::fs::create_dir_all(&bpffs)?;
        sh(&format!("mount -t bpf bpf {}", bpffs.display()))?;
        std::fs::write(
            &daemon.config,
            format!(
                "[daemon]\ninterfaces = [\"eth0\"]\nadmin_socket = \"{}\"\nstate_dir = \"{}\"\n\
                 pin_dir = \"{}\"\n{daemon_keys}\n{services}",
                daemon.socket.display(),
                daemon.dir.join("state").display(),
                daemon.pin_dir.display(),
            ),
        )?;
        daemon.restart()?;
        Ok(daemon)
    }

    /// Starts (again) the daemon process and waits for its admin socket.
    pub fn restart(&mut self) -> Result<()> {
        self.spawn(&[])?;
        self.wait_ready()
    }

    /// Starts the daemon process with `env` added to its environment, without waiting.
    pub fn spawn(&mut self, env: &[(&str, &Path)]) -> Result<()> {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(xdplb_binary())
            .args(["run", "-c"])
            .arg(&self.config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(File::create(self.dir.join("daemon.log"))?)
            .spawn()
            .context(
                "starting xdplb run (is target/debug/xdplb built? `cargo xtask test` builds it)",
            )?;
        self.process = Some(child);
        Ok(())
    }

    /// Waits until the admin socket of a [spawned](Self::spawn) daemon answers.
    pub fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.cli(&["status"]).is_err() {
            if Instant::now() > deadline {
                bail!("the daemon did not come up in 20 s; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Runs `xdplb <args>` against this daemon; Ok(stdout) or Err(stderr).
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(xdplb_binary())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `xdplb <args> --json` against this daemon and parses its answer.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut args = args.to_vec();
        args.push("--json");
        Ok(serde_json::from_str(&self.cli(&args)?)?)
    }

    /// The entries of `xdplb flows VIP --json` (client, backend, state, age_s, ...).
    pub fn flows(&self, vip: &str) -> Result<Vec<serde_json::Value>> {
        match self.cli_json(&["flows", vip])?["flows"].take() {
            serde_json::Value::Array(flows) => Ok(flows),
            other => bail!("xdplb flows: no list of flows in {other}"),
        }
    }

    /// SIGTERM (`systemctl stop`): the daemon withdraws its VIPs, waits `withdraw_grace`, exits.
    /// Returns at once; poll [`exited`](Self::exited).
    pub fn terminate(&self) -> Result<()> {
        let child = self.process.as_ref().context("the daemon is not running")?;
        // `ip netns exec` execs the daemon, so the child is xdplb itself.
        // SAFETY: kill(2) on our own child's pid.
        if unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) } != 0 {
            bail!("SIGTERM: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the daemon process has exited (reaping it if so).
    pub fn exited(&mut self) -> Result<bool> {
        match self.process.as_mut() {
            None => Ok(true),
            Some(child) => Ok(child.try_wait()?.is_some()),
        }
    }

    /// `kill -9`: no cleanup at all, the pinned program keeps forwarding.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until every VIP has `backends` backends available for new flows (bounded).
    pub fn wait_available(&self, backends: usize) -> Result<()> {
        self.wait_status("every backend available", |s| {
            s["vips"]
                .as_array()
                .is_some_and(|v| v.iter().all(|v| v["available"] == backends))
        })
    }

    /// Waits until `xdplb status --json` satisfies `ready` (bounded).
    pub fn wait_status(
        &self,
        what: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = self.cli(&["status", "--json"]) {
                if ready(&serde_json::from_str(&text)?) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        // Unmounting the lab's bpffs drops every pin: programs detach, maps are freed.
        let _ = sh(&format!("umount -l {}", self.dir.join("bpffs").display()));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The lab server named `b<n>` on every backend of `lab`, TCP on port 80 of every address,
/// listening when this returns.
pub fn serve_tcp(lab: &Lab) -> Vec<Process> {
    let servers = lab
        .backends
        .iter()
        .enumerate()
        .map(|(n, b)| b.serve(&format!("b{n}"), "[::]:80", "tcp").unwrap())
        .collect();
    for b in &lab.backends {
        b.wait_sockets(1, 0).unwrap();
    }
    servers
}

/// Asks a lab server which backend answered (TCP).
pub fn who(vip: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"NAME\n")?;
    let mut name = String::new();
    BufReader::new(stream).read_line(&mut name)?;
    Ok(name.trim().to_string())
}

/// Asks over UDP which backend answered.
pub fn who_udp(vip: SocketAddr) -> Result<String> {
    let bind: SocketAddr = if vip.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.send_to(b"NAME", vip)?;
    let mut buf = [0u8; 256];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A transfer of `bytes` at `rate` bytes/s, read to the end: (backend name, bytes received).
/// `started` gets the backend's name as soon as it is known.
pub fn stream(
    vip: SocketAddr,
    bytes: u64,
    rate: u64,
    started: impl FnOnce(&str),
) -> Result<(String, u64)> {
    let mut stream = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("STREAM {bytes} {rate}\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut name = String::new();
    reader.read_line(&mut name)?;
    started(name.trim());
    let mut received = 0u64;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf)? {
            0 => break,
            n => received += n as u64,
        }
    }
    Ok((name.trim().to_string(), received))
}

/// Sends `bytes` bytes to a lab server (`SINK`): (backend name, bytes it read). A stalled
/// connection fails the 10-second write or read timeout.
pub fn upload(vip: SocketAddr, bytes: u64) -> Result<(String, u64)> {
    let mut stream = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("SINK {bytes}\n").as_bytes())?;
    let chunk = [b'u'; 64 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let (name, read) = line
        .trim()
        .split_once(' ')
        .with_context(|| format!("unexpected answer {line:?}"))?;
    Ok((name.to_string(), read.parse()?))
}

/// The client's address in a second subnet (see [`two_subnet_lab`]).
pub const CLIENT_B: Ipv4Addr = Ipv4Addr::new(10, 0, 5, 10);

/// A lab whose client also has [`CLIENT_B`]/24 (backends route it back through the client),
/// with the TCP server `b<n>` on port 80 of every backend, listening when this returns.
pub fn two_subnet_lab(backends: usize) -> (Lab, Vec<Process>) {
    let lab = Lab::new(backends).expect("lab");
    lab.client
        .ns
        .exec(&format!("ip addr add {CLIENT_B}/24 dev eth0"))
        .unwrap();
    let servers = lab
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            b.ns.exec(&format!("ip route add 10.0.5.0/24 via {CLIENT4}"))
                .unwrap();
            let server = b.serve(&format!("b{i}"), "0.0.0.0:80", "tcp").unwrap();
            b.wait_sockets(1, 0).unwrap();
            server
        })
        .collect();
    (lab, servers)
}

/// `[[vip]]` tables of two TCP port-80 VIPs, "web" at `web` (with `web_keys`) and "other" at
/// `other`, each on the lab's first `backends` backends.
pub fn web_and_other(web: Ipv4Addr, other: Ipv4Addr, backends: usize, web_keys: &str) -> String {
    let mut text = String::new();
    for (name, vip, keys) in [("web", web, web_keys), ("other", other, "")] {
        text.push_str(&format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"{vip}\"\nport = 80\nring_size = 1021\n{keys}\n"
        ));
        for n in 0..backends {
            text.push_str(&format!("[[vip.backend]]\naddress = \"{}\"\n", backend4(n)));
        }
    }
    text
}

/// Sends IPv4 `packets` (whole IP packets, any source: spoofed floods) to `dst` through a raw
/// socket of the calling thread's namespace, until they run out or `deadline`. Returns how
/// many were sent.
pub fn send_raw_v4(
    dst: Ipv4Addr,
    packets: impl Iterator<Item = Vec<u8>>,
    deadline: Instant,
) -> std::io::Result<u64> {
    // SAFETY: plain socket syscalls on a descriptor owned here and closed at the end.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut sent = 0u64;
    for packet in packets {
        if Instant::now() > deadline {
            break;
        }
        // SAFETY: the buffer and the address outlive the call.
        let n = unsafe {
            libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n > 0 {
            sent += 1;
        }
    }
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    Ok(sent)
}

/// Asks over UDP which backend answered, sending again (same socket, so same flow) when no
/// answer comes, as UDP clients do: one lost datagram on a loaded machine is not a failure.
/// The answer must come from the VIP: a backend replying from its own address would be
/// dropped by any connected UDP client.
pub fn udp_name(vip: SocketAddr) -> Result<String> {
    let local: SocketAddr = if vip.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(local)?;
    socket.set_read_timeout(Some(Duration::from_millis(700)))?;
    let mut buf = [0u8; 256];
    let mut attempt = 0;
    let (n, from) = loop {
        attempt += 1;
        socket.send_to(b"NAME", vip)?;
        match socket.recv_from(&mut buf) {
            Ok(answer) => break answer,
            Err(e) if attempt == 3 => return Err(e.into()),
            Err(_) => {}
        }
    };
    anyhow::ensure!(from == vip, "the answer to {vip} came from {from}");
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Runs `during(serving backend's IPv4 address, whether the transfer has ended)` while a
/// transfer of `bytes` at `rate` from `vip` is in flight, then checks it delivered every byte
/// from the backend it started on.
pub fn with_transfer(
    lab: &Lab,
    vip: SocketAddr,
    (bytes, rate): (u64, u64),
    during: impl FnOnce(&str, &dyn Fn() -> bool),
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let client = &lab.client.ns;
    std::thread::scope(|scope| {
        let transfer = scope.spawn(|| {
            client
                .enter(|| stream(vip, bytes, rate, |name| tx.send(name.to_string()).unwrap()))
                .unwrap()
        });
        let serving = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("transfer started");
        let backend = backend4(serving[1..].parse().unwrap()).to_string();
        during(&backend, &|| transfer.is_finished());
        let (name, received) = transfer.join().unwrap().expect("transfer broke");
        assert_eq!((name.as_str(), received), (serving.as_str(), bytes));
    });
}

pub fn addr(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}
