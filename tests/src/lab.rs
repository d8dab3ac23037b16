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
        sh(&format!("ip netns add {name}"))?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.exec("ip link set lo up")?;
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

pub struct Lab {
    pub id: String,
    pub client: Host,
    pub lb: Host,
    pub backends: Vec<Host>,
    /// Keeps an XDP program on the LB's bridge port: veth drops XDP_TX frames unless its peer
    /// has one (TOOLCHAIN.md). The decap program with empty sets passes everything.
    _peer_xdp: Dataplane,
    // Dropped last: deleting it removes the bridge ports.
    pub switch: Netns,
}

impl Lab {
    /// Builds the topology with `backends` backends serving nothing yet.
    pub fn new(backends: usize) -> Result<Self> {
        let id = unique("xl");
        let switch = Netns::new(&format!("{id}-sw"))?;
        switch.exec("ip link add br0 type bridge && ip link set br0 up")?;
        let host = |name: &str, ip4: Ipv4Addr, ip6: Ipv6Addr| -> Result<Host> {
            let ns = Netns::new(&format!("{id}-{name}"))?;
            sh(&format!(
                "ip link add eth0 netns {} type veth peer name p-{name} netns {}",
                ns.name, switch.name
            ))?;
            switch.exec(&format!(
                "ip link set p-{name} master br0 && ip link set p-{name} up"
            ))?;
            ns.exec(&format!(
                "ip addr add {ip4}/24 dev eth0 && ip addr add {ip6}/64 dev eth0 nodad && \
                 ip link set eth0 up && ethtool -K eth0 tx off >/dev/null"
            ))?;
            Ok(Host { ns, ip4, ip6 })
        };
        let client = host("c", CLIENT4, CLIENT6)?;
        let lb = host("lb", LB4, LB6)?;
        client.ns.exec(&format!(
            "ip route add {VIP_NET4} via {LB4} && ip -6 route add {VIP_NET6} via {LB6}"
        ))?;
        let backends = (0..backends)
            .map(|n| host(&format!("b{n}"), backend4(n), backend6(n)))
            .collect::<Result<Vec<_>>>()?;
        for b in &backends {
            // dsr: the VIPs are local on every backend, but only the LB answers ARP/ND for them.
            b.ns.exec(&format!(
                "ip route add local {VIP_NET4} dev lo && ip -6 route add local {VIP_NET6} dev lo && \
                 sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 \
                 net.ipv4.conf.eth0.arp_ignore=1 net.ipv4.conf.eth0.arp_announce=2 \
                 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0"
            ))?;
        }
        let peer_xdp = switch.enter(|| -> Result<Dataplane> {
            let mut xdp = Dataplane::load(Role::Decap, Sizes::UNUSED, None)?;
            xdp.attach("p-lb", AttachMode::Native)?;
            Ok(xdp)
        })??;
        Ok(Self {
            id,
            client,
            lb,
            backends,
            _peer_xdp: peer_xdp,
            switch,
        })
    }
}

/// The `xdplb` binary under test: built by `cargo xtask test` before the integration stage.
pub fn xdplb_binary() -> PathBuf {
    std::env::var_os("XDPLB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/xdplb"))
}

/// The lab server binary of this crate: cargo builds it next to the test binaries' directory
/// (`target/debug/lab-server` beside `target/debug/deps/<test>`).
pub fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let debug = exe.parent().and_then(Path::parent).expect("target/debug");
    debug.join("lab-server")
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
        let dir = std::env::temp_dir().join(&lab.id);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("admin.sock");
        // Its own bpffs outside /sys: `ip netns exec` remounts /sys privately, so pins under
        // /sys/fs/bpf would vanish with the daemon (and `kill -9` would stop forwarding).
        let bpffs = dir.join("bpffs");
        std::fs::create_dir_all(&bpffs)?;
        sh(&format!("mount -t bpf bpf {}", bpffs.display()))?;
        let pin_dir = bpffs.join("xdplb");
        let config = dir.join("xdplb.toml");
        std::fs::write(
            &config,
            format!(
                "[daemon]\ninterfaces = [\"eth0\"]\nadmin_socket = \"{}\"\nstate_dir = \"{}\"\n\
                 pin_dir = \"{}\"\nflow_table_size = 65536\nmax_vips = 8\nmax_backends = 64\n\
                 max_ring_size = 1021\n{extra_daemon}\n{services}",
                socket.display(),
                dir.join("state").display(),
                pin_dir.display(),
            ),
        )?;
        let mut daemon = Self {
            dir,
            config,
            socket,
            pin_dir,
            process: None,
            ns: lab.lb.ns.name.clone(),
        };
        daemon.restart()?;
        Ok(daemon)
    }

    /// Starts (again) the daemon process and waits for its admin socket.
    pub fn restart(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(xdplb_binary())
            .args(["run", "-c"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stderr(File::create(self.dir.join("daemon.log"))?)
            .spawn()
            .context(
                "starting xdplb run (is target/debug/xdplb built? `cargo xtask test` builds it)",
            )?;
        self.process = Some(child);
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

    /// `kill -9`: no cleanup at all, the pinned program keeps forwarding.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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

pub fn addr(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}
