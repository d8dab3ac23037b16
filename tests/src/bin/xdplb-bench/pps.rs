//! Packets per second through the LB attached in native (driver) mode on veth, in namespaces.
//!
//! ```text
//!   gen (eth0) --+                       generator: bench_gen via BPF_PROG_RUN with
//!   lb  (eth0) --+-- switch namespace:   XDP_LIVE_FRAMES, redirected out of gen's eth0
//!   b0..b3     --+   bench_switch on every port (dst MAC -> port, as XDP frames)
//! ```
//! Every endpoint (gen, b0..b3) runs bench_count, which counts and drops. The LB namespace
//! runs, in turn: xdplb (real program, maps filled by the real state code), the trivial
//! swap-MACs + XDP_TX program (its frames go back to gen, where they are counted), and no XDP
//! but an nftables DNAT balancer (`numgen random mod 4`) on the LB's stack. The rate is what
//! the endpoints counted divided by the generator's wall time; the generator, the switch, the
//! LB and the endpoints all run in softirq on the generator's CPU, one after the other.

use crate::{
    progs,
    report::{Figure, Report},
};
use anyhow::{ensure, Context as _, Result};
use aya::{
    maps::{Array, DevMap, DevMapHash, HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf, Pod,
};
use lb_common::counters;
use lb_userspace::{
    dataplane::{Dataplane, Role, Sizes},
    model::{BackendSpec, Forwarding, Mac, Protocol, Services, VipAddr},
    net::interface_index,
    state::{self, Live, NextHop, Resolve},
};
use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};
use xdplb_tests::{
    harness::vip_spec,
    lab::{sh, Netns},
    packet::{Packet, TCP_ACK, TCP_SYN},
};

/// Generator time per measurement; each configuration is measured once per round, rounds
/// interleave the configurations, and the figure is the median over rounds (this machine is
/// shared: a burst of other work hits one window, not one configuration).
const DURATION: Duration = Duration::from_secs(1);
/// Five: with three, one disturbed window in a shared machine's minute moved a median by 3-5 %.
const ROUNDS: usize = 5;
/// Frames per BPF_PROG_RUN call, and per batch inside it.
const CHUNK: u32 = 65_536;
const BATCH: u32 = 64;
const BACKENDS: usize = 4;
/// The flow table of the main windows: the daemon's default size (64 MiB of slots), so a new
/// flow's set is a cache and TLB miss, as in production.
const FLOW_SLOTS: u32 = 1 << 20;
/// A table whose slots (4 MiB) mostly stay in the cache: the same new flows with this one show
/// what the memory of the default table costs.
const CACHED_FLOW_SLOTS: u32 = 1 << 16;

const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const GEN_SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

fn host_mac(last: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x01, last]
}
const GEN_MAC_LAST: u8 = 0x10;
const LB_MAC_LAST: u8 = 0x02;
fn backend_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 11 + n as u8)
}
fn backend_mac(n: usize) -> [u8; 6] {
    host_mac(0x11 + n as u8)
}

fn mac_text(mac: [u8; 6]) -> String {
    Mac(mac).to_string()
}

/// Mirror of bench_gen's `GenConfig`.
#[repr(C)]
#[derive(Clone, Copy)]
struct GenConfig {
    template: [u64; 8],
    vary: u32,
    _pad: u32,
}
// SAFETY: repr(C), no implicit padding (64 + 4 + 4 bytes), every byte pattern valid.
unsafe impl Pod for GenConfig {}

/// Next hops of the lab's backends: configured MACs, out of the ingress interface.
struct LabMacs;

impl Resolve for LabMacs {
    fn next_hop(&self, backend: &BackendSpec) -> Result<NextHop, String> {
        Ok(NextHop {
            src: None,
            dst_mac: backend.mac.ok_or("the lab gives every backend a mac")?,
            src_mac: Mac(host_mac(LB_MAC_LAST)),
            ifindex: 0,
            mtu: 1500,
        })
    }
}

struct Lab {
    gen: Netns,
    lb: Netns,
    _backends: Vec<Netns>,
    /// Kept for their attachments; dropped before the namespaces.
    _switch: Ebpf,
    /// gen's, then each backend's counter.
    counters: Vec<Ebpf>,
    generator: Ebpf,
    // Dropped last: deleting it removes the switch ports.
    _switch_ns: Netns,
}

/// Sum over CPUs of a bench_count object's counter.
fn received(counter: &Ebpf) -> Result<u64> {
    let map = counter
        .map("RECEIVED")
        .context("bench_count has no RECEIVED map")?;
    let array = PerCpuArray::<&MapData, u64>::try_from(map)?;
    Ok(array.get(&0, 0)?.iter().sum())
}

impl Lab {
    fn new() -> Result<Self> {
        let id = format!("xb{}", std::process::id() % 100_000);
        // No IPv6: its neighbour discovery and MLD chatter would be counted at the endpoints.
        const NO_IPV6: &str = "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 \
                               net.ipv6.conf.default.disable_ipv6=1";
        let switch_ns = Netns::new(&format!("{id}-sw"))?;
        switch_ns.exec(&format!(
            "{NO_IPV6} && ip link add br0 type bridge && ip link set br0 up"
        ))?;
        let host = |name: &str, mac: [u8; 6], ip: Ipv4Addr| -> Result<Netns> {
            let ns = Netns::new(&format!("{id}-{name}"))?;
            ns.exec(NO_IPV6)?;
            sh(&format!(
                "ip link add eth0 netns {} type veth peer name p-{name} netns {}",
                ns.name, switch_ns.name
            ))?;
            switch_ns.exec(&format!(
                "ip link set p-{name} master br0 && ip link set p-{name} up"
            ))?;
            ns.exec(&format!(
                "ip link set eth0 address {} && ip addr add {ip}/24 dev eth0 && ip link set eth0 up",
                mac_text(mac)
            ))?;
            Ok(ns)
        };
        let gen = host("gen", host_mac(GEN_MAC_LAST), GEN_SRC)?;
        let lb = host("lb", host_mac(LB_MAC_LAST), LB_IP)?;
        let backends = (0..BACKENDS)
            .map(|n| host(&format!("b{n}"), backend_mac(n), backend_ip(n)))
            .collect::<Result<Vec<_>>>()?;

        // The switch: every known MAC to its port, as XDP frames.
        let mut ports = vec![("gen".to_string(), host_mac(GEN_MAC_LAST))];
        ports.push(("lb".to_string(), host_mac(LB_MAC_LAST)));
        ports.extend((0..BACKENDS).map(|n| (format!("b{n}"), backend_mac(n))));
        let mut switch = progs::load("bench_switch")?;
        let switch = switch_ns.enter(move || -> Result<Ebpf> {
            for (name, mac) in &ports {
                let port = format!("p-{name}");
                let ifindex = interface_index(&port)?;
                DevMapHash::try_from(switch.map_mut("PORTS").context("PORTS")?)?
                    .insert(ifindex, ifindex, None, 0)?;
                let mut key = [0u8; 8];
                key[..6].copy_from_slice(mac);
                HashMap::<_, [u8; 8], u32>::try_from(switch.map_mut("MACS").context("MACS")?)?
                    .insert(key, ifindex, 0)?;
                progs::program(&mut switch, "bench_switch")?
                    .attach(&port, XdpMode::Driver)
                    .with_context(|| format!("attaching bench_switch to {port}"))?;
            }
            Ok(switch)
        })??;

        let mut counters = Vec::new();
        for ns in std::iter::once(&gen).chain(&backends) {
            let mut counter = progs::load("bench_count")?;
            let counter = ns.enter(move || -> Result<Ebpf> {
                progs::program(&mut counter, "bench_count")?
                    .attach("eth0", XdpMode::Driver)
                    .context("attaching bench_count")?;
                Ok(counter)
            })??;
            counters.push(counter);
        }

        let mut generator = progs::load("bench_gen")?;
        let generator = gen.enter(move || -> Result<Ebpf> {
            let ifindex = interface_index("eth0")?;
            DevMap::try_from(generator.map_mut("OUT").context("OUT")?)?.set(0, ifindex, None, 0)?;
            Ok(generator)
        })??;
        Ok(Self {
            gen,
            lb,
            _backends: backends,
            _switch: switch,
            counters,
            generator,
            _switch_ns: switch_ns,
        })
    }

    fn received(&self) -> Result<Vec<u64>> {
        self.counters.iter().map(received).collect()
    }

    /// Runs the generator for [`DURATION`]: (frames generated, frames each endpoint
    /// received, seconds).
    fn blast(&mut self, flags: u8, vary: bool) -> Result<(u64, Vec<u64>, f64)> {
        let mut frame = Packet::new()
            .eth(host_mac(GEN_MAC_LAST), host_mac(LB_MAC_LAST))
            .ipv4(GEN_SRC, VIP)
            .tcp(1024, 80)
            .flags(flags)
            .seq(1)
            .ack(if flags & TCP_ACK != 0 { 1 } else { 0 })
            .build();
        ensure!(frame.len() <= 64, "template frame is {} bytes", frame.len());
        frame.resize(64, 0);
        let mut template = [0u64; 8];
        for (word, bytes) in template.iter_mut().zip(frame.chunks_exact(8)) {
            *word = u64::from_ne_bytes(bytes.try_into().expect("8 bytes"));
        }
        let config = GenConfig {
            template,
            vary: vary as u32,
            _pad: 0,
        };
        Array::<_, GenConfig>::try_from(self.generator.map_mut("CONFIG").context("CONFIG")?)?
            .set(0, config, 0)?;
        let before = self.received()?;
        let generator = &mut self.generator;
        let (sent, seconds) = self.gen.enter(|| -> Result<(u64, f64)> {
            let prog = progs::program(generator, "bench_gen")?;
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed() < DURATION {
                prog.test_run(TestRunOptions {
                    data_in: Some(&frame),
                    repeat: CHUNK,
                    attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                    ..TestRunOptions::default()
                })
                .context("BPF_PROG_RUN with XDP_LIVE_FRAMES")?;
                sent += CHUNK as u64;
            }
            Ok((sent, start.elapsed().as_secs_f64()))
        })??;
        // Whatever is still in flight is processed in softirq right away.
        std::thread::sleep(Duration::from_millis(100));
        let after = self.received()?;
        let got = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        Ok((sent, got, seconds))
    }
}

/// One configuration's windows.
#[derive(Default)]
struct Runs {
    sent: Vec<u64>,
    /// Per window: gen, b0..b3.
    received: Vec<Vec<u64>>,
    seconds: Vec<f64>,
}

impl Runs {
    fn push(&mut self, (sent, received, seconds): (u64, Vec<u64>, f64)) {
        self.sent.push(sent);
        self.received.push(received);
        self.seconds.push(seconds);
    }
    fn mpps_each(&self) -> Vec<f64> {
        self.received
            .iter()
            .zip(&self.seconds)
            .map(|(r, s)| r.iter().sum::<u64>() as f64 / s / 1e6)
            .collect()
    }
    /// Median over rounds.
    fn mpps(&self) -> f64 {
        let mut v = self.mpps_each();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    /// Per endpoint, over all windows.
    fn totals(&self) -> Vec<u64> {
        let mut sum = vec![0u64; BACKENDS + 1];
        for r in &self.received {
            for (s, n) in sum.iter_mut().zip(r) {
                *s += n;
            }
        }
        sum
    }
    fn delivered(&self) -> u64 {
        self.totals().iter().sum()
    }
    fn json(&self, name: &str) -> serde_json::Value {
        serde_json::json!({
            "name": name, "mpps_per_round": self.mpps_each(), "sent": self.sent,
            "received_gen_b0_b3": self.received, "seconds": self.seconds,
        })
    }
}

fn services() -> Services {
    let backends: Vec<(IpAddr, [u8; 6], u32)> = (0..BACKENDS)
        .map(|n| (IpAddr::V4(backend_ip(n)), backend_mac(n), 100))
        .collect();
    Services {
        vips: vec![vip_spec(
            "web",
            VipAddr {
                addr: VIP.into(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            Forwarding::Dsr,
            lb_userspace::maglev::DEFAULT_RING_SIZE,
            &backends,
        )],
        ..Services::default()
    }
}

/// The nftables balancer on the LB's stack; it only sees packets while no XDP program
/// is attached to the LB's interface.
fn nft_setup(lab: &Lab) -> Result<()> {
    let neighbours: String = (0..BACKENDS)
        .map(|n| {
            format!(
                " && ip neigh replace {} lladdr {} dev eth0 nud permanent",
                backend_ip(n),
                mac_text(backend_mac(n))
            )
        })
        .collect();
    // GRO gives the veth a NAPI instance, without which it refuses redirected XDP frames.
    lab.lb.exec(&format!(
        "ethtool -K eth0 gro on >/dev/null && \
         sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.send_redirects=0 \
         net.ipv4.conf.eth0.send_redirects=0 net.ipv4.conf.all.rp_filter=0 \
         net.ipv4.conf.eth0.rp_filter=0{neighbours}"
    ))?;
    let map: Vec<String> = (0..BACKENDS)
        .map(|n| format!("{n} : {}", backend_ip(n)))
        .collect();
    let ruleset = format!(
        "table ip xdplb_bench {{\n\
           chain prerouting {{\n\
             type nat hook prerouting priority dstnat; policy accept;\n\
             ip daddr {VIP} tcp dport 80 dnat to numgen random mod {BACKENDS} map {{ {} }}\n\
           }}\n\
         }}\n",
        map.join(", ")
    );
    let file = std::env::temp_dir().join(format!("{}-nft.conf", lab.lb.name));
    std::fs::write(&file, ruleset)?;
    let loaded = lab.lb.exec(&format!("nft -f {}", file.display()));
    let _ = std::fs::remove_file(&file);
    loaded.context("loading the nftables DNAT ruleset (is nftables installed?)")?;
    // Mid-stream pickup of the one-tuple ACK stream without window-tracking surprises.
    lab.lb
        .exec("sysctl -qw net.netfilter.nf_conntrack_tcp_be_liberal=1")?;
    Ok(())
}

/// Attaches `program` natively to the LB's eth0, runs `f`, detaches.
fn attached<T>(
    lab: &mut Lab,
    program: &mut Xdp,
    f: impl FnOnce(&mut Lab) -> Result<T>,
) -> Result<T> {
    let lb = &lab.lb;
    let link = lb.enter(|| program.attach("eth0", XdpMode::Driver))??;
    let result = f(lab);
    program.detach(link)?;
    result
}

struct Measured {
    trivial: Runs,
    hit: Runs,
    new: Runs,
    /// New flows into a [`CACHED_FLOW_SLOTS`] table.
    new_cached: Runs,
    /// Fresh 5-tuples with ACK set: the spoofed-flood pattern that also looks in the pinned
    /// table (a SYN skips it).
    flood: Runs,
    nft_hit: Runs,
    nft_new: Runs,
    /// xdplb's global counters moved over all its windows.
    moved: Vec<u64>,
    flows_at_end: usize,
    /// Flows in the flood defence's pinned table at the end (the hit flow, pinned on its
    /// second packet, must still be there after every flood window).
    pinned_at_end: usize,
}

/// The real program with its maps filled by the real state code, and a flow table of
/// `flow_slots`; attached with the program's own attach so that it can be detached between
/// windows (the flow table stays).
fn loaded(flow_slots: u32) -> Result<Dataplane> {
    let sizes = Sizes {
        nat_table_size: lb_common::DEFAULT_NAT_TABLE_SIZE,
        max_vips: 4,
        max_backends: 16,
        max_ring_size: lb_userspace::maglev::DEFAULT_RING_SIZE,
        flow_table_size: flow_slots,
    };
    let mut dataplane = Dataplane::load(Role::Balancer, sizes, None)?;
    let target = state::target(&services(), |_, _| Default::default(), &LabMacs)?;
    let (changes, _) = state::plan(&Live::empty(sizes), &target)?;
    state::apply(&mut dataplane, &changes)?;
    Ok(dataplane)
}

fn measure_all(lab: &mut Lab) -> Result<Measured> {
    let mut dataplane = loaded(FLOW_SLOTS)?;
    let mut cached = loaded(CACHED_FLOW_SLOTS)?;
    let mut trivial_obj = progs::load("bench_tx")?;
    nft_setup(lab)?;
    let before = dataplane.global_counters()?;
    let mut m = Measured {
        trivial: Runs::default(),
        hit: Runs::default(),
        new: Runs::default(),
        new_cached: Runs::default(),
        flood: Runs::default(),
        nft_hit: Runs::default(),
        nft_new: Runs::default(),
        moved: Vec::new(),
        flows_at_end: 0,
        pinned_at_end: 0,
    };
    for round in 0..ROUNDS {
        println!("  round {}/{ROUNDS}", round + 1);
        let trivial = progs::program(&mut trivial_obj, "bench_tx")?;
        m.trivial
            .push(attached(lab, trivial, |lab| lab.blast(TCP_ACK, false))?);
        let (hit, new, flood) = attached(lab, dataplane.program(), |lab| {
            Ok((
                lab.blast(TCP_ACK, false)?,
                lab.blast(TCP_SYN, true)?,
                lab.blast(TCP_ACK, true)?,
            ))
        })?;
        m.hit.push(hit);
        m.new.push(new);
        m.flood.push(flood);
        m.new_cached.push(attached(lab, cached.program(), |lab| {
            lab.blast(TCP_SYN, true)
        })?);
        m.nft_hit.push(lab.blast(TCP_ACK, false)?);
        m.nft_new.push(lab.blast(TCP_SYN, true)?);
    }
    let after = dataplane.global_counters()?;
    m.moved = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    m.flows_at_end = dataplane.flows()?.len();
    m.pinned_at_end = dataplane.pinned()?.len();
    Ok(m)
}

fn check(m: &Measured) -> Result<()> {
    let t = m.trivial.totals();
    ensure!(
        t[0] > 0 && t[1..].iter().all(|n| *n < t[0] / 1000),
        "the trivial program's frames must come back to the generator only: {t:?}"
    );
    for (runs, what) in [
        (&m.hit, "flow hits"),
        (&m.new, "new flows"),
        (&m.new_cached, "new flows, cache-sized table"),
        (&m.flood, "ACK flood"),
    ] {
        let r = runs.totals();
        ensure!(
            r[0] < runs.delivered() / 1000 && runs.delivered() > 0,
            "xdplb {what}: frames must reach the backends only: {r:?}"
        );
    }
    // The LB sent (XDP_TX) at least what the backends counted.
    let tx = m.moved[counters::ACTION_TX as usize];
    // (The cache-sized table's program has counters of its own, not in `moved`.)
    let delivered = m.hit.delivered() + m.new.delivered() + m.flood.delivered();
    ensure!(
        tx >= delivered,
        "backends counted {delivered} frames but xdplb sent only {tx}"
    );
    ensure!(
        m.pinned_at_end >= 1,
        "the pinned flow of the hit windows is gone after the floods"
    );
    let new = m.new.totals();
    ensure!(
        new[1..].iter().all(|n| *n > m.new.delivered() / 10),
        "xdplb spread new flows unevenly: {new:?}"
    );
    for (runs, what) in [(&m.nft_hit, "one tuple"), (&m.nft_new, "new flows")] {
        ensure!(
            runs.delivered() > 0 && runs.totals()[0] < runs.delivered() / 1000,
            "nftables {what}: frames must reach the backends: {:?}",
            runs.totals()
        );
    }
    Ok(())
}

pub fn run(report: &mut Report) -> Result<()> {
    println!(
        "packet rate: {ROUNDS} rounds of {} s per configuration, 64-byte TCP frames, {BACKENDS} backends",
        DURATION.as_secs()
    );
    let mut lab = Lab::new().context("building the packet-rate lab")?;
    let m = measure_all(&mut lab)?;
    drop(lab);
    for (runs, what) in [
        (
            &m.trivial,
            "trivial XDP_TX on the LB (frames return to gen)",
        ),
        (&m.hit, "xdplb, flow hits (one 5-tuple)"),
        (&m.new, "xdplb, new flows (fresh 5-tuple per packet)"),
        (
            &m.new_cached,
            "xdplb, new flows into a cache-sized flow table",
        ),
        (
            &m.flood,
            "xdplb, ACK flood (fresh 5-tuple per packet, ACK set)",
        ),
        (&m.nft_hit, "nftables DNAT, one 5-tuple"),
        (&m.nft_new, "nftables DNAT, new flows"),
    ] {
        println!(
            "  {what}: median {:.3} Mpps (rounds {:?}); delivered to gen, b0..b3: {:?}",
            runs.mpps(),
            runs.mpps_each()
                .iter()
                .map(|v| (v * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>(),
            runs.totals()
        );
    }
    check(&m)?;
    let Measured {
        trivial,
        hit,
        new,
        new_cached,
        flood,
        nft_hit,
        nft_new,
        moved,
        flows_at_end,
        pinned_at_end,
    } = m;

    let section = report.section("Packet rate (native XDP on veth, namespaces)");
    let measures = |what: &str| {
        format!(
            "{what}; frames counted at the endpoints / generator wall time, median of {ROUNDS} interleaved 1 s windows"
        )
    };
    section.push(Figure::new(
        "pps.trivial",
        "trivial swap-MACs + XDP_TX on the LB",
        trivial.mpps(),
        "Mpps",
        &measures("ceiling of the lab: same path with the cheapest LB program"),
    ));
    let hit_vs_nft = hit.mpps() / nft_hit.mpps();
    section.push(
        Figure::new(
            "pps.xdplb_hit",
            "xdplb dsr, flow hits",
            hit.mpps(),
            "Mpps",
            &measures("one 5-tuple (flow-table hit each packet)"),
        )
        .ratio(hit.mpps() / trivial.mpps(), "trivial")
        .target(
            &format!("xdplb/nftables = {hit_vs_nft:.2}x, >= 3x"),
            hit_vs_nft >= 3.0,
        ),
    );
    let new_vs_nft = new.mpps() / nft_new.mpps();
    section.push(
        Figure::new(
            "pps.xdplb_new",
            "xdplb dsr, new flows",
            new.mpps(),
            "Mpps",
            &measures(&format!(
                "a fresh 5-tuple every packet (flow-table miss + insert into its set, evicting once the set is full; {FLOW_SLOTS}-slot table, {flows_at_end} flows held at the end)"
            )),
        )
        .ratio(new.mpps() / trivial.mpps(), "trivial")
        .target(
            &format!("xdplb/nftables = {new_vs_nft:.2}x, >= 3x"),
            new_vs_nft >= 3.0,
        ),
    );
    section.push(
        Figure::new(
            "pps.xdplb_new_cached",
            "xdplb dsr, new flows, cache-sized flow table",
            new_cached.mpps(),
            "Mpps",
            &measures(&format!(
                "as the new flows above into a {CACHED_FLOW_SLOTS}-slot table (4 MiB of slots, mostly in the cache): the difference is what the default table's memory costs, a cache and TLB miss per new flow"
            )),
        )
        .ratio(new_cached.mpps() / trivial.mpps(), "trivial"),
    );
    section.push(
        Figure::new(
            "pps.xdplb_flood",
            "xdplb dsr, spoofed ACK flood",
            flood.mpps(),
            "Mpps",
            &measures(&format!(
                "a fresh 5-tuple with ACK set every packet: miss, pinned-table lookup, insert; the pinned flow of the hit windows survived ({pinned_at_end} pinned at the end)"
            )),
        )
        .ratio(flood.mpps() / trivial.mpps(), "trivial"),
    );
    section.push(Figure::new(
        "pps.nft_hit",
        "nftables DNAT (numgen random), one 5-tuple",
        nft_hit.mpps(),
        "Mpps",
        &measures("LB's stack: GRO, conntrack hit, DNAT, forward, neighbour, veth xmit"),
    ));
    section.push(Figure::new(
        "pps.nft_new",
        "nftables DNAT (numgen random), new flows",
        nft_new.mpps(),
        "Mpps",
        &measures("as above with a conntrack insert per packet (the conntrack table, 262,144 entries, fills up: early drop)"),
    ));
    // The lab's own cost (generator, two switch hops, endpoint) is the same in every run: what
    // a configuration adds over the trivial program is the LB's own extra cost per packet.
    let extra = |run: &Runs| 1e3 / run.mpps() - 1e3 / trivial.mpps();
    let (hit_extra, new_extra) = (extra(&hit), extra(&new));
    let (nft_hit_extra, nft_new_extra) = (extra(&nft_hit), extra(&nft_new));
    let section = report.section("Packet rate (native XDP on veth, namespaces)");
    section.push(Figure::new(
        "pps.lab_ns_per_packet",
        "lab cost per packet with the trivial LB",
        1e3 / trivial.mpps(),
        "ns/pkt",
        "1 / trivial rate: generator + switch + LB + switch + endpoint, all on one CPU in softirq",
    ));
    section.push(
        Figure::new(
            "pps.extra_ns_xdplb_hit",
            "extra cost over trivial: xdplb, flow hits",
            hit_extra,
            "ns/pkt",
            "1/rate - 1/trivial rate: what the LB program adds per packet in the live path",
        )
        .ratio(
            nft_hit_extra / hit_extra,
            "= nftables' extra cost / this (one tuple)",
        ),
    );
    section.push(
        Figure::new(
            "pps.extra_ns_xdplb_new",
            "extra cost over trivial: xdplb, new flows",
            new_extra,
            "ns/pkt",
            "as above, a flow-table miss + insert per packet",
        )
        .ratio(
            nft_new_extra / new_extra,
            "= nftables' extra cost / this (new flows)",
        ),
    );
    section.push(Figure::new(
        "pps.extra_ns_nft_hit",
        "extra cost over trivial: nftables, one tuple",
        nft_hit_extra,
        "ns/pkt",
        "as above for the stack path",
    ));
    section.push(Figure::new(
        "pps.extra_ns_nft_new",
        "extra cost over trivial: nftables, new flows",
        nft_new_extra,
        "ns/pkt",
        "as above with a conntrack insert per packet",
    ));
    report.data.insert(
        "pps".into(),
        serde_json::json!({
            "window_seconds": DURATION.as_secs(),
            "rounds": ROUNDS,
            "frame_bytes": 64,
            "runs": [
                trivial.json("trivial"), hit.json("xdplb_hit"), new.json("xdplb_new"),
                new_cached.json("xdplb_new_cached"),
                flood.json("xdplb_flood"),
                nft_hit.json("nft_hit"), nft_new.json("nft_new"),
            ],
            "xdplb_flow_entries_at_end": flows_at_end,
            "xdplb_counters_moved": counters::ALL.iter().zip(&moved)
                .filter(|(_, n)| **n > 0)
                .map(|((name, _), n)| (name.to_string(), serde_json::json!(n)))
                .collect::<serde_json::Map<_, _>>(),
        }),
    );
    Ok(())
}
