//! Types shared by the xdplb kernel program (`lb-ebpf`) and userspace (`lb-userspace`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields and a size assertion, so
//! the kernel and userspace agree on the layout byte for byte and no uninitialised padding ever
//! reaches a hash-map key. Addresses are always 16 bytes: an IPv4 address occupies the first four
//! bytes, the rest is zero, and a separate `family` field tells which it is.
//!
//! # Maps (name, type, size, why)
//! | map | type | entries | why |
//! |---|---|---|---|
//! | [`map_names::VIPS`] | `HASH` | `max_vips` | exact (address, port, protocol) match; few entries, read-mostly |
//! | [`map_names::RINGS`] | `ARRAY`, mmapable | `max_vips * 2 * max_ring_size` | Maglev tables, two halves per VIP (see [`VipMeta`]); written through a shared mapping |
//! | [`map_names::BACKENDS`] | `ARRAY` | `max_backends` | indexed by backend id from the ring: one bounds-checked load |
//! | [`map_names::FLOWS`] | `ARRAY` of [`FlowSlot`], mmapable | `flow_table_size` rounded up to a power of two ([`flow_slots`]) | 5-tuple -> backend, set-associative: [`FLOW_WAYS`] slots per set, the set chosen by [`flow_table_hash`]. The verifier inlines every array load, so a lookup is one hash and at most four key compares, and an insert overwrites a slot of its set ([`flow_victim_rank`]): no helper call, lock or LRU list, where an `LRU_HASH` insert into a full table cost about 250 ns here (evicting through the kernel's LRU lists). A full set evicts its least valuable entry, never fails; the daemon reads and updates entries through the mapping |
//! | [`map_names::CONFIG`] | `ARRAY` | 1 | global knobs ([`LbConfig`]) written once per config change |
//! | [`map_names::GLOBAL_COUNTERS`] | `PERCPU_ARRAY` | [`counters::COUNT`] | lock-free counters, summed by userspace |
//! | [`map_names::VIP_COUNTERS`] | `PERCPU_ARRAY` | `max_vips` | per-VIP [`TrafficCounters`] indexed by VIP id |
//! | [`map_names::BACKEND_COUNTERS`] | `PERCPU_ARRAY` | `max_backends` | per-backend [`TrafficCounters`] |
//! | [`map_names::TX_PORTS`] | `DEVMAP_HASH` | [`MAX_TX_PORTS`] | egress interfaces for two-armed set-ups (`XDP_REDIRECT`) |
//! | [`map_names::DECAP_LOCAL`] | `HASH` | [`MAX_DECAP_ADDRS`] | decap program: outer destinations that are this host |
//! | [`map_names::DECAP_VIPS`] | `HASH` | [`MAX_DECAP_ADDRS`] | decap program: inner destinations served here |
//! | [`map_names::SCHED_CURSORS`] | `PERCPU_ARRAY` | `max_vips` | round-robin position (least-conn: where the next scan starts, after the last backend chosen) per VIP: per CPU, so no lock or shared cache line on the packet path |
//! | [`map_names::ACTIVE_CONNS`] | `ARRAY`, mmapable | `max_backends` | least-conn active connections per backend id (`u64`: BPF has no 32-bit atomic add in Rust's core), shared by all CPUs (atomic adds); mapped by the daemon, which reconciles it with the flow table using atomic adds too |
//! | [`map_names::ICMP_TOO_BIG_RATE`] | `PERCPU_ARRAY` | 1 | next allowed "too big" reply time per CPU (GCRA): a lock-free rate limit |
//! | [`map_names::ACL`] | `LPM_TRIE` | [`MAX_ACL_ENTRIES`] | per-VIP IPv6 source allow/deny prefixes, key (vip_id, address): one longest-prefix lookup decides |
//! | [`map_names::ACL4`] | `LPM_TRIE` | [`MAX_ACL_ENTRIES`] | the same for IPv4 sources, with 8-byte keys ([`SourcePrefix4`]): the trie compares one word per node instead of five |
//! | [`map_names::BLOCKLIST`] | `LPM_TRIE` | [`MAX_BLOCKLIST_ENTRIES`] | runtime blocklist, key (vip id or [`SCOPE_ALL_VIPS`], address); the value counts packets |
//! | [`map_names::VIP_LIMITS`] | `ARRAY` | `max_vips` | per-VIP new-flow limits ([`VipLimits`]) and the VIP-wide bucket |
//! | [`map_names::SOURCE_RATES`] | `ARRAY` | [`SOURCE_RATE_SLOTS`] | per-client new-flow buckets, two slots per (VIP, client) by hash ([`source_slots`]): no insert, no eviction, so a spoofed flood of fresh sources costs two array loads, not an LRU insert each |
//! | [`map_names::VIP_DROPS`] | `PERCPU_ARRAY` | `max_vips` | per-VIP [`VipDrops`] by reason |
//! | [`map_names::PINNED`] | `HASH` | `flow_table_size` | flows pinned by the flood defence: never evicted by inserts (full = no more pins); the daemon expires idle ones |
//! | [`map_names::FLOOD`] | `ARRAY` | 1 | the pin budget ([`FloodState`]) |
//! | [`map_names::EVENTS`] | `ARRAY`, mmapable | possible CPUs x [`LOG_CPU_SLOTS`] | connection log ([`LogRecord`]): a ring of [`LOG_RECORDS_PER_CPU`] records per CPU, each behind its [`LogCursor`] slot. The writer needs no helper call (the verifier inlines the array lookups and the CPU id), unlike a `RINGBUF` (reserve + submit take its lock: about 60 ns per record here); it overwrites its CPU's oldest record, and the daemon, which reads the mapping, counts what it missed (`overrun`)
//! | [`map_names::LOG_BUDGET`] | `ARRAY` | 1 | the connection log's kernel budget ([`LogBudget`]): one shared GCRA bucket, so the cap holds for the whole LB, not per CPU |
//! | [`map_names::NAT_FWD`] | `HASH` | `nat_table_size` | `nat` (issue 12): client 5-tuple -> the (nat address, nat port, backend) it was given ([`NatForward`]); a plain hash, never evicted, so a live connection never loses its translation; the daemon deletes expired entries |
//! | [`map_names::NAT_REV`] | `HASH` | `nat_table_size` | `nat`: backend-side 5-tuple (backend -> nat address:port) -> the client connection and its hop ([`NatState`]). Inserted with `BPF_NOEXIST`, it is the ownership claim of a nat port: atomic across CPUs, pinned across restarts. Full = exhaustion (counted, the new flow dropped) |
//! | [`map_names::NAT_BACKENDS`] | `ARRAY` | `max_backends` | `nat`: per backend id its port and default nat source ([`NatBackend`]); read only by `nat` VIPs |
//! | [`map_names::NAT_CONFIG`] | `ARRAY` | 1 | `nat`: timeouts, port range, configured source addresses ([`NatConfig`]) |
//! | [`map_names::NAT_PROGS`] | `PROG_ARRAY` | [`NAT_PROGRAMS`] | `nat`: the tail-called nat programs ([`program_names::NAT`]); pinned, so a restarting daemon never leaves the slots empty |
//! | [`map_names::NAT_SCRATCH`] | `PERCPU_ARRAY` | 1 | `nat`: the balancer's hand-off to a nat program (its choice) and room for the entries it builds, off the BPF stack. Pinned: while a restarted daemon swaps programs, an old balancer may tail-call a new nat program, and both must read the same hand-off |
//! | [`map_names::VIP_ADDRS`] | `ARRAY` of `u64` | [`VIP_ADDR_WORDS`] | a bitmap of the addresses that have a VIP, by hash ([`vip_addr_bit`]): a packet whose destination's bit is clear is no VIP's, decided by two inlined loads instead of a hash-map lookup (a helper call that hashes and walks a bucket); a set bit is only a hint, `VIPS` decides |
//! | [`map_names::VIP_SLOTS`] | `ARRAY` | `max_vips` | each VIP's key and [`VipMeta`] by VIP id ([`VipSlot`]), a copy of `VIPS` written with it: a flow hit finds its VIP through its backend's `vip_id` with inlined array loads instead of a second hash-map lookup |
//!
//! Sizes marked with a name are set by userspace at load time (`EbpfLoader::set_max_entries`);
//! the numbers compiled into the object are only placeholders.
#![no_std]

/// Bumped whenever a map layout or its meaning changes: a daemon only adopts pinned maps whose
/// layout version equals its own, and replaces them otherwise.
pub const LAYOUT_VERSION: u32 = 10;

/// `BPF_F_MMAPABLE`: the ring array is mapped into the daemon's memory, so writing a
/// 65537-slot Maglev table is a memory copy instead of one syscall per slot.
pub const RINGS_MAP_FLAGS: u32 = 1 << 10;

/// `ACTIVE_CONNS` is mmapable too: the daemon corrects its counts with atomic adds on the
/// mapping, which cannot lose a concurrent increment from the data path the way a map update
/// could.
pub const ACTIVE_CONNS_MAP_FLAGS: u32 = RINGS_MAP_FLAGS;

/// `FLOWS` is mmapable: the daemon lists a million entries by reading memory, and finds one
/// by its set like the data path does.
pub const FLOWS_MAP_FLAGS: u32 = RINGS_MAP_FLAGS;

/// Map names, shared so the loader and the kernel program cannot disagree.
pub mod map_names {
    pub const VIPS: &str = "VIPS";
    pub const RINGS: &str = "RINGS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const FLOWS: &str = "FLOWS";
    pub const CONFIG: &str = "CONFIG";
    pub const GLOBAL_COUNTERS: &str = "GLOBAL_COUNTERS";
    pub const VIP_COUNTERS: &str = "VIP_COUNTERS";
    pub const BACKEND_COUNTERS: &str = "BACKEND_COUNTERS";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const DECAP_LOCAL: &str = "DECAP_LOCAL";
    pub const DECAP_VIPS: &str = "DECAP_VIPS";
    pub const SCHED_CURSORS: &str = "SCHED_CURSORS";
    pub const ACTIVE_CONNS: &str = "ACTIVE_CONNS";
    pub const ICMP_TOO_BIG_RATE: &str = "ICMP_TOO_BIG_RATE";
    pub const ACL: &str = "ACL";
    pub const ACL4: &str = "ACL4";
    pub const BLOCKLIST: &str = "BLOCKLIST";
    pub const VIP_LIMITS: &str = "VIP_LIMITS";
    pub const SOURCE_RATES: &str = "SOURCE_RATES";
    pub const VIP_DROPS: &str = "VIP_DROPS";
    pub const PINNED: &str = "PINNED";
    pub const FLOOD: &str = "FLOOD";
    pub const EVENTS: &str = "EVENTS";
    pub const LOG_BUDGET: &str = "LOG_BUDGET";
    pub const NAT_FWD: &str = "NAT_FWD";
    pub const NAT_REV: &str = "NAT_REV";
    pub const NAT_BACKENDS: &str = "NAT_BACKENDS";
    pub const NAT_CONFIG: &str = "NAT_CONFIG";
    pub const NAT_PROGS: &str = "NAT_PROGS";
    pub const NAT_SCRATCH: &str = "NAT_SCRATCH";
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    pub const VIP_SLOTS: &str = "VIP_SLOTS";
}

/// Program names (the function names in lb-ebpf).
pub mod program_names {
    pub const LB: &str = "xdplb";
    pub const DECAP: &str = "xdplb_decap";
    /// The nat programs, in their `NAT_PROGS` slot order.
    pub const NAT: [&str; super::NAT_PROGRAMS as usize] = [
        "xdplb_nat_to_backend",
        "xdplb_nat_from_backend",
        "xdplb_nat_error_from_backend",
        "xdplb_nat_error_to_backend",
    ];
    pub const CLOCK: &str = "xdplb_clock";
}

/// Slots of `NAT_PROGS`.
pub const NAT_PROGRAMS: u32 = 4;

/// Placeholder sizes compiled into the object; userspace always overrides them at load time.
pub const DEFAULT_MAX_VIPS: u32 = 64;
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
pub const DEFAULT_MAX_RING_SIZE: u32 = 65537;
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;
/// Interfaces a two-armed LB can redirect to; more would mean a very unusual host.
pub const MAX_TX_PORTS: u32 = 64;
/// Local tunnel endpoints plus VIPs a backend's decap program recognises.
pub const MAX_DECAP_ADDRS: u32 = 1024;
/// ACL prefixes over all VIPs ("thousands per VIP"); trie nodes are allocated on insert.
pub const MAX_ACL_ENTRIES: u32 = 1 << 18;
/// Blocklist entries: what an operator adds by hand or by script during an attack.
pub const MAX_BLOCKLIST_ENTRIES: u32 = 1 << 16;
/// Buckets of the per-source new-flow limits (a power of two). Each (VIP, client) uses two,
/// chosen by hash: a client is limited wrongly only when both of its buckets are shared with
/// clients that exhaust them.
pub const SOURCE_RATE_SLOTS: u32 = 1 << 18;

/// Words of `VIP_ADDRS`: 65,536 bits, so even a thousand VIP addresses set under 2 % of them
/// and nearly every packet to another address is told apart without a `VIPS` lookup.
pub const VIP_ADDR_WORDS: u32 = 1 << 10;

/// Address families, as stored in `family` fields.
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// IP protocol numbers the data path understands.
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_IPV6: u8 = 41;

/// Forwarding modes ([`VipMeta::mode`]).
pub const MODE_DSR: u8 = 0;
pub const MODE_IPIP: u8 = 1;
/// Full NAT: destination -> backend:port, source -> a nat address:port of the LB; replies are
/// translated back by the LB (see [`NatState`]).
pub const MODE_NAT: u8 = 2;

/// Schedulers ([`VipMeta::scheduler`]): what the VIP's ring area holds and how a new flow
/// reads it.
/// Maglev: a consistent-hash table of backend ids; slot = flow hash % `ring_size`.
pub const SCHED_MAGLEV: u8 = 0;
/// Round robin: the weighted sequence of backend ids (smooth weighted round robin, one period
/// of `sum(weights) / gcd` slots); a per-CPU cursor walks it.
pub const SCHED_ROUND_ROBIN: u8 = 1;
/// Least connections: `(backend id, weight)` pairs (`ring_size` = 2 x backends); a new flow
/// takes the backend with the fewest [`map_names::ACTIVE_CONNS`] per weight.
pub const SCHED_LEAST_CONN: u8 = 2;
/// Most backends a least-conn VIP may have: the per-new-flow scan is bounded by it.
pub const MAX_LEAST_CONN_BACKENDS: u32 = 64;

/// Ring slot value meaning "no backend" (never a valid backend id).
pub const NO_BACKEND: u32 = u32::MAX;

/// Bytes an outer header adds in `ipip` mode.
pub const IPV4_HEADER_LEN: u32 = 20;
pub const IPV6_HEADER_LEN: u32 = 40;

/// Hash-map key of a virtual service. `port` is in network byte order, 0 = all ports.
/// 4-byte aligned (same size and offsets as packed) so the data path fills it word by word.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VipKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

impl VipKey {
    /// `addr` as four 32-bit words, in memory order (see [`FlowKey::src_words`]).
    #[inline(always)]
    pub fn addr_words(&self) -> [u32; 4] {
        // SAFETY: `addr` is at offset 0 of a 4-byte aligned struct; 16 bytes, any value valid.
        unsafe { *(self.addr.as_ptr() as *const [u32; 4]) }
    }
}

/// The `VIP_ADDRS` word and bit of a destination address (words in memory order, IPv4 in the
/// first): a multiplicative hash of the address, cheap enough for every packet.
#[inline(always)]
pub fn vip_addr_bit(family: u8, addr: &[u32; 4]) -> (u32, u64) {
    let x = addr[0]
        ^ addr[1].rotate_left(8)
        ^ addr[2].rotate_left(16)
        ^ addr[3].rotate_left(24)
        ^ family as u32;
    let h = x.wrapping_mul(0x9e37_79b1) >> 16;
    ((h >> 6) & (VIP_ADDR_WORDS - 1), 1 << (h & 63))
}

/// What the data path needs to serve one VIP.
///
/// The ring is double-buffered: userspace writes a new Maglev table into the half that
/// `ring_base` does not point to, then replaces this value with one hash-map update (which the
/// kernel swaps in as a whole), so a packet sees either the old table or the new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipMeta {
    /// Index into `VIP_COUNTERS`; also identifies the VIP in `Backend::vip_id`.
    pub vip_id: u32,
    /// First slot of the active Maglev table in `RINGS`.
    pub ring_base: u32,
    /// Slots of the active half in use: the Maglev table size (a prime), the round-robin
    /// turn's length, or 2 x least-conn backends. 0 = no backend available, packets are
    /// dropped and counted.
    pub ring_size: u32,
    pub mode: u8,
    /// `SCHED_*`: how new flows pick a backend (0 = Maglev, the layout before schedulers).
    pub scheduler: u8,
    /// `AFFINITY_*`: what the ring hash covers.
    pub affinity: u8,
    /// `FILTER_*` bits: which filter stages this VIP uses (none: the filter costs nothing).
    pub filter: u8,
}
const _: () = assert!(core::mem::size_of::<VipMeta>() == 16);

/// `VIP_SLOTS[vip_id]`: the VIP that holds the id, key and value as in `VIPS` (all zero when
/// no VIP does: family 0 matches no packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipSlot {
    pub key: VipKey,
    pub meta: VipMeta,
}
const _: () = assert!(core::mem::size_of::<VipSlot>() == 36);

/// [`VipMeta::affinity`]: the ring is indexed by the 5-tuple hash (every connection on its own).
pub const AFFINITY_CONNECTION: u8 = 0;
/// The ring is indexed by the client address alone (IPv6: its /64), so all of a client's
/// connections land on one backend while the ring is unchanged.
pub const AFFINITY_CLIENT: u8 = 1;
/// Like [`AFFINITY_CLIENT`], IPv6 clients by their whole /128.
pub const AFFINITY_CLIENT_V6_HOST: u8 = 2;

/// `VipMeta::filter`: the VIP has ACL entries; look the source up in `ACL`.
pub const FILTER_ACL: u8 = 1;
/// The VIP has an allow list: a source matching no ACL entry is denied.
pub const FILTER_ALLOW_LIST: u8 = 2;
/// The VIP has blocklist entries of its own (scope = its id).
pub const FILTER_BLOCKED: u8 = 4;
/// New flows of the VIP are limited (`VIP_LIMITS[vip_id]`).
pub const FILTER_LIMITS: u8 = 8;

/// `Backend::flags`.
pub const BACKEND_PRESENT: u8 = 1;
/// Health checks say the backend is down: established TCP flows stay, UDP flows re-hash.
pub const BACKEND_DOWN: u8 = 2;

/// One backend of one VIP, indexed by backend id. Everything the forwarder writes into the
/// packet is resolved by userspace (neighbour table, routes), so the fast path only copies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Backend address: outer destination in `ipip` mode.
    pub addr: [u8; 16],
    /// Destination MAC: the backend's own (`dsr`) or the next hop's.
    pub dst_mac: [u8; 6],
    /// Source MAC: the egress interface's.
    pub src_mac: [u8; 6],
    /// Egress interface; equal to the ingress one means `XDP_TX`, else `XDP_REDIRECT`.
    pub tx_ifindex: u32,
    /// The VIP this backend belongs to; a flow entry is honoured only while this matches.
    pub vip_id: u32,
    /// Largest L3 packet the egress path carries (the interface MTU).
    pub mtu: u16,
    pub flags: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 40);
const _: () = assert!(core::mem::offset_of!(Backend, dst_mac) == 16);
const _: () = assert!(core::mem::offset_of!(Backend, src_mac) == 22);

impl Backend {
    /// `dst_mac` then `src_mac` (bytes 16..28, 4-byte aligned) as three 32-bit words in
    /// memory order: the Ethernet header's first 12 bytes, written with three stores.
    #[inline(always)]
    pub fn mac_words(&self) -> [u32; 3] {
        // SAFETY: bytes 16..28 of this 4-byte aligned `repr(C)` struct are the two MAC
        // fields, with no padding between them; every bit pattern is a valid [u32; 3].
        unsafe { *((self as *const Self as *const u8).add(16) as *const [u32; 3]) }
    }
}

/// Flow-table key: the 5-tuple as seen by the load balancer (client -> VIP). 8-byte aligned
/// (the size and offsets are those of the packed layout) so the data path builds and hashes it
/// word by word instead of byte by byte.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Ports in network byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// `src` as four 32-bit words, in memory order (one aligned load each, where the data
    /// path would otherwise read and reassemble 16 bytes).
    #[inline(always)]
    pub fn src_words(&self) -> [u32; 4] {
        // SAFETY: `src` is at offset 0 of an 8-byte aligned struct; [u32; 4] has 16 bytes
        // and every bit pattern is valid.
        unsafe { *(self.src.as_ptr() as *const [u32; 4]) }
    }

    /// `dst` as four 32-bit words, in memory order.
    #[inline(always)]
    pub fn dst_words(&self) -> [u32; 4] {
        // SAFETY: `dst` is at offset 16 of an 8-byte aligned struct; see `src_words`.
        unsafe { *(self.dst.as_ptr() as *const [u32; 4]) }
    }
}

/// Flow hash over the 5-tuple: picks the ring slot and the outer source of `ipip`. Two LB
/// instances with the same seed compute the same value, which is what keeps a flow on its
/// backend when routers move it between instances.
#[inline(always)]
pub fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    let ports = (key.sport as u32) << 16 | key.dport as u32;
    hash_words(
        seed ^ ((key.proto as u32) << 16 | key.family as u32),
        &key.src_words(),
        &key.dst_words(),
        ports,
    )
}

/// The flow hash's rounds: source and destination words interleaved, then the ports.
#[inline(always)]
fn hash_words(mut h: u32, src: &[u32; 4], dst: &[u32; 4], ports: u32) -> u32 {
    let mut i = 0;
    while i < 4 {
        h = mix(h, src[i]);
        h = mix(h, dst[i]);
        i += 1;
    }
    h = mix(h, ports);
    fmix(h)
}

/// Ring hash of a VIP with client affinity: the flow hash of the client address alone (IPv6
/// masked to its /64 unless `affinity` is [`AFFINITY_CLIENT_V6_HOST`]). Protocol, VIP and
/// ports are left out, so a client's TCP and UDP connections to VIPs with the same backends
/// (hence the same Maglev table) meet on one backend, on every LB instance with this seed.
#[inline(always)]
pub fn client_hash(key: &FlowKey, seed: u32, affinity: u8) -> u32 {
    let mut src = key.src_words();
    if key.family == FAMILY_IPV6 && affinity != AFFINITY_CLIENT_V6_HOST {
        src[2] = 0;
        src[3] = 0;
    }
    hash_words(seed ^ key.family as u32, &src, &[0; 4], 0)
}

/// One murmur3 round.
#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    let k = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// murmur3's finaliser: every input bit affects every output bit.
#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Outer source of an `ipip` packet: `(prefix & !mask) | (hash & mask)`, byte by byte, with
/// the flow hash in the last four bytes, so backends' RSS spreads flows over queues.
#[inline(always)]
pub fn ipip_source<const N: usize>(prefix: &[u8; N], host_mask: &[u8; N], hash: u32) -> [u8; N] {
    let hash = hash.to_be_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        let h = if i + 4 >= N { hash[i + 4 - N] } else { 0 };
        out[i] = (prefix[i] & !host_mask[i]) | (h & host_mask[i]);
        i += 1;
    }
    out
}

/// `FlowValue::state` bits.
pub const FLOW_SYN_SEEN: u8 = 1;
pub const FLOW_FIN_SEEN: u8 = 2;
pub const FLOW_RST_SEEN: u8 = 4;
/// A segment with ACK and without SYN: the handshake completed (or the flow was picked up
/// mid-stream).
pub const FLOW_ACK_SEEN: u8 = 8;
/// The flow holds one count in `ACTIVE_CONNS` (least-conn): set when counted, cleared when the
/// count is given back (client FIN or RST, idle expiry by the daemon), so it is given back once.
pub const FLOW_COUNTED: u8 = 16;
/// The flow has a copy in `PINNED` (the flood defence), so an eviction from `FLOWS` is undone
/// by its next packet.
pub const FLOW_PINNED: u8 = 32;

/// Slots per set of the flow table: four 64-byte slots, so a set is four cache lines and a
/// miss compares at most four keys. More ways would hold more flows before a set overflows
/// (four ways start evicting at about 70 % of the slots in use) but cost every new flow more
/// compares.
pub const FLOW_WAYS: u32 = 4;

/// Which set of the flow table holds a flow. Not [`flow_hash`]: that one must be the same on
/// every LB (it picks ring slots) and is a chain of nine dependent murmur rounds, about 20 ns
/// on every flow hit. This one only spreads flows over sets: five independent 64-bit
/// multiplies (source and destination words paired, then ports, protocol and family),
/// summed and folded by one more multiply. Fixed, never seeded from configuration, so a
/// changed `hash_seed` keeps the table.
#[inline(always)]
pub fn flow_table_hash(key: &FlowKey) -> u32 {
    let (s, d) = (key.src_words(), key.dst_words());
    let lane = |i: usize| s[i] as u64 | (d[i] as u64) << 32;
    let tail = ((key.sport as u64) << 32)
        | ((key.dport as u64) << 16)
        | ((key.proto as u64) << 8)
        | key.family as u64;
    let h = lane(0)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(lane(1).wrapping_mul(0xc2b2_ae3d_27d4_eb4f))
        .wrapping_add(lane(2).wrapping_mul(0x1656_67b1_9e37_79f9))
        .wrapping_add(lane(3).wrapping_mul(0x85eb_ca77_c2b2_ae63))
        .wrapping_add(tail.wrapping_mul(0x27d4_eb2f_1656_67c5));
    ((h ^ (h >> 29)).wrapping_mul(0xff51_afd7_ed55_8ccd) >> 32) as u32
}

/// Slots of a flow table asked to hold `flow_table_size` flows: a power of two (sets are
/// picked by masking the hash), at least one set.
pub fn flow_slots(flow_table_size: u32) -> u32 {
    flow_table_size
        .max(FLOW_WAYS)
        .checked_next_power_of_two()
        .unwrap_or(1 << 31)
}

/// The first slot of the set of a flow whose [`flow_table_hash`] is `table_hash`;
/// `set_mask` is [`LbConfig::flow_set_mask`].
#[inline(always)]
pub fn flow_set_first_slot(table_hash: u32, set_mask: u32) -> u32 {
    (table_hash & set_mask) * FLOW_WAYS
}

/// Which slot of a full set a new flow replaces: the lowest rank, then the oldest
/// `last_seen`. An empty slot first, then a flow that ended (FIN or RST seen), then a TCP
/// flow that never completed its handshake (a SYN flood's entries), and only then an
/// established flow, the least recently seen. So a SYN flood evicts only its own entries.
#[inline(always)]
pub fn flow_victim_rank(slot: &FlowSlot) -> u64 {
    let v = &slot.value;
    let rank: u64 = if slot.key.family == 0 {
        0
    } else if v.state & (FLOW_FIN_SEEN | FLOW_RST_SEEN) != 0 {
        1
    } else if slot.key.proto == PROTO_TCP && v.state & FLOW_ACK_SEEN == 0 {
        2
    } else {
        3
    };
    rank << 32 | v.last_seen as u64
}

/// One slot of the flow table (`FLOWS`): the flow's key and entry. An empty slot has
/// `key.family == 0`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowSlot {
    pub key: FlowKey,
    pub value: FlowValue,
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<FlowSlot>() == 64);

impl FlowSlot {
    /// Whether the slot holds `key`: five word compares (the key is 8-byte aligned and has no
    /// bytes outside its fields, so equal words mean equal keys).
    #[inline(always)]
    pub fn holds(&self, key: &FlowKey) -> bool {
        // SAFETY: FlowKey is 40 bytes, 8-byte aligned, every bit pattern a valid [u64; 5].
        let (a, b) = unsafe {
            (
                &*(&self.key as *const FlowKey as *const [u64; 5]),
                &*(key as *const FlowKey as *const [u64; 5]),
            )
        };
        a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4]
    }
}

/// Flow-table value. Times are seconds of `CLOCK_MONOTONIC` (read through `jiffies`, see
/// [`LbConfig::jiffies_per_second`]);
/// `last_seen` is only rewritten when the second changes, to keep writes off the hot path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub backend_id: u32,
    pub created: u32,
    pub last_seen: u32,
    pub state: u8,
    pub _pad: [u8; 3],
    /// The flow hash when the entry was created ([`flow_hash`] with the seed of then): the
    /// `ipip` outer source and flow label of the flow's packets, so a hit does not hash the
    /// 5-tuple again. A flow keeps it across a seed change (its outer header stays the same);
    /// ring choices always use the current seed.
    pub hash: u32,
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 20);
const _: () = assert!(core::mem::offset_of!(FlowValue, state) == 12);
const _: () = assert!(core::mem::offset_of!(FlowValue, hash) == 16);

/// Global knobs, one entry in `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbConfig {
    /// Outer IPv4 source for `ipip`: `(prefix & !host_mask) | (flow_hash & host_mask)`, so
    /// backends' RSS spreads flows over queues (Katran does the same).
    pub ipip_src_v4: [u8; 4],
    pub ipip_src_v4_host_mask: [u8; 4],
    pub ipip_src_v6: [u8; 16],
    pub ipip_src_v6_host_mask: [u8; 16],
    /// Seed of the flow hash; must be equal on LB instances that share traffic.
    pub hash_seed: u32,
    /// `CONFIG_*` bits.
    pub flags: u8,
    pub _pad: [u8; 3],
    /// "Too big to encapsulate" ICMP replies allowed per second and CPU (also the burst).
    pub icmp_too_big_per_sec: u32,
    /// The kernel's tick rate (`HZ`) and the value `jiffies` had when `CLOCK_MONOTONIC` was 0:
    /// the data path reads the clock as `(bpf_jiffies64() - jiffies_at_zero) /
    /// jiffies_per_second` seconds, because the verifier inlines `bpf_jiffies64` into one
    /// load, where `bpf_ktime_get_coarse_ns` is a helper call (about 25 ns per packet on this
    /// kernel: every call and return goes through the CPU's return-thunk mitigations). Written
    /// by userspace's data-plane loader, which measures both once ([`clock_params`]); 0 = not
    /// known yet, the data path then falls back to the helper.
    pub jiffies_per_second: u32,
    pub jiffies_at_zero: u64,
    /// Sets of `FLOWS` minus one (their count is a power of two, [`flow_slots`]): a flow's set
    /// is `flow_table_hash & flow_set_mask`. Written by the data-plane loader, which sized the
    /// map.
    pub flow_set_mask: u32,
    /// `1e9 / jiffies_per_second` when that is whole, else 0 ([`whole_ns_per_jiffy`]).
    pub ns_per_jiffy: u32,
}
const _: () = assert!(core::mem::size_of::<LbConfig>() == 72);

/// A jiffy in whole nanoseconds, or 0 when HZ does not divide 1e9 (see [`jiffies_to_ns`]).
pub fn whole_ns_per_jiffy(jiffies_per_second: u32) -> u32 {
    match jiffies_per_second {
        0 => 0,
        hz if 1_000_000_000 % hz == 0 => 1_000_000_000 / hz,
        _ => 0,
    }
}

/// [`LbConfig::jiffies_per_second`] and [`LbConfig::jiffies_at_zero`] from the tick period
/// (`clock_getres(CLOCK_MONOTONIC_COARSE)`, which is one jiffy) and one simultaneous reading
/// of `jiffies` and `CLOCK_MONOTONIC_COARSE` in nanoseconds, taken in the kernel.
pub fn clock_params(tick_ns: u64, jiffies: u64, monotonic_ns: u64) -> (u32, u64) {
    let hz = (1_000_000_000 + tick_ns / 2) / tick_ns.max(1);
    let elapsed = (monotonic_ns as u128 * hz as u128 / 1_000_000_000) as u64;
    (hz as u32, jiffies.wrapping_sub(elapsed))
}

/// Seconds of `CLOCK_MONOTONIC` from `jiffies` and the parameters of [`clock_params`];
/// `None` while the parameters are unknown (`jiffies_per_second` = 0).
#[inline(always)]
pub fn jiffies_to_seconds(
    jiffies: u64,
    jiffies_per_second: u32,
    jiffies_at_zero: u64,
) -> Option<u32> {
    // checked_div: no division-by-zero panic path for the verifier to reject.
    jiffies
        .wrapping_sub(jiffies_at_zero)
        .checked_div(jiffies_per_second as u64)
        .map(|seconds| seconds as u32)
}

/// Nanoseconds of `CLOCK_MONOTONIC` from `jiffies`, like [`jiffies_to_seconds`], so at the
/// tick's resolution (1/HZ). With `ns_per_jiffy` (from [`whole_ns_per_jiffy`]: HZ 100, 250,
/// 1000...) one multiply; otherwise whole seconds and the remainder apart (`jiffies * 1e9`
/// would overflow after months of uptime): three divisions, 20-30 ns on this machine kind.
#[inline(always)]
pub fn jiffies_to_ns(
    jiffies: u64,
    jiffies_per_second: u32,
    jiffies_at_zero: u64,
    ns_per_jiffy: u32,
) -> Option<u64> {
    let ticks = jiffies.wrapping_sub(jiffies_at_zero);
    if ns_per_jiffy != 0 {
        return Some(ticks.wrapping_mul(ns_per_jiffy as u64));
    }
    let hz = jiffies_per_second as u64;
    let seconds = ticks.checked_div(hz)?;
    let rest = ticks.checked_rem(hz)?;
    Some(seconds * 1_000_000_000 + rest * 1_000_000_000 / hz)
}

/// `LbConfig::flags`: some VIP serves all ports of its address. Without it the program skips
/// the port-0 lookup, so a packet for no VIP costs one hash lookup instead of two.
pub const CONFIG_HAS_PORT0_VIPS: u8 = 1;
/// The blocklist has entries for every VIP: look each VIP packet's source up.
pub const CONFIG_BLOCK_ALL_VIPS: u8 = 2;
/// The connection log is on (`[daemon.log]`): new flows and filter drops emit a [`LogRecord`].
/// Off, the log costs the packet path this one flag test.
pub const CONFIG_LOG: u8 = 4;
/// Some VIP forwards in `nat`: packets for no VIP are looked up in `NAT_REV` (replies from
/// backends). Without it that costs one flag test.
pub const CONFIG_HAS_NAT: u8 = 8;

/// LPM-trie key data of `BLOCKLIST` and `ACL`: a scope (VIP id, or [`SCOPE_ALL_VIPS`] in the
/// blocklist) then the source address, IPv4 as `::ffff:a.b.c.d` so both families share one
/// key space. The prefix length counts the scope's 32 bits: see [`source_prefix_len`]. The
/// kernel's `ACL` trie holds IPv6 sources only: userspace moves IPv4 entries to `ACL4`
/// ([`SourcePrefix4`]), whose shorter keys make the lookup cheaper.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SourcePrefix {
    /// Big-endian, so the trie compares it bit by bit like the address.
    pub scope: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SourcePrefix>() == 20);

/// LPM-trie key data of `ACL4`: (VIP id, IPv4 source), both big-endian; the prefix length
/// is 32 + the source prefix's length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SourcePrefix4 {
    pub scope: [u8; 4],
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<SourcePrefix4>() == 8);

/// Blocklist scope of entries that cover every VIP.
pub const SCOPE_ALL_VIPS: u32 = u32::MAX;
/// `ACL` values.
pub const ACL_ALLOW: u8 = 1;
pub const ACL_DENY: u8 = 2;

impl SourcePrefix {
    /// The key data for a packet's source (an address of the flow key's layout).
    #[inline(always)]
    pub fn of_source(scope: u32, family: u8, src: &[u8; 16]) -> Self {
        let mut addr = *src;
        if family == FAMILY_IPV4 {
            addr = [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, src[0], src[1], src[2], src[3],
            ];
        }
        Self {
            scope: scope.to_be_bytes(),
            addr,
        }
    }
}

impl SourcePrefix {
    /// [`Self::of_source`] for a flow key's source, read as words.
    #[inline(always)]
    pub fn of_flow_source(scope: u32, key: &FlowKey) -> Self {
        let src = key.src_words();
        let words = if key.family == FAMILY_IPV4 {
            [0, 0, u32::from_be(0xffff), src[0]]
        } else {
            src
        };
        // SAFETY: [u32; 4] and [u8; 16] have the same size; every bit pattern is valid.
        let addr: [u8; 16] = unsafe { core::mem::transmute(words) };
        Self {
            scope: scope.to_be_bytes(),
            addr,
        }
    }
}

/// Prefix length of a [`SourcePrefix`] key for a `len`-bit prefix of `family`.
#[inline(always)]
pub fn source_prefix_len(family: u8, len: u32) -> u32 {
    32 + if family == FAMILY_IPV4 { 96 + len } else { len }
}

/// New-flow limits of one VIP (`VIP_LIMITS`), as GCRA parameters: a new flow is admitted
/// when the bucket's theoretical arrival time, advanced by `interval`, stays within
/// `tolerance` of now; `interval = 1 s / rate`, `tolerance = burst * interval`.
/// An interval of 0 means no limit of that kind.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipLimits {
    pub source_interval_ns: u64,
    pub source_tolerance_ns: u64,
    pub total_interval_ns: u64,
    pub total_tolerance_ns: u64,
    /// The VIP-wide bucket (kernel state; userspace writes 0 = full).
    pub total_tat_ns: u64,
}
const _: () = assert!(core::mem::size_of::<VipLimits>() == 40);

/// The two `SOURCE_RATES` slots of a client (the flow key's source) of a VIP. IPv6
/// clients count per /64: the last 8 bytes are left out. `seed` is the flow hash's, so the
/// slots are not predictable from outside.
#[inline(always)]
pub fn source_slots(vip_id: u32, key: &FlowKey, seed: u32) -> [u32; 2] {
    let words = if key.family == FAMILY_IPV6 { 2 } else { 1 };
    let src = key.src_words();
    let mut h = seed ^ vip_id.rotate_left(8) ^ key.family as u32;
    let mut i = 0;
    while i < 4 {
        h = mix(h, if i < words { src[i] } else { 0 });
        i += 1;
    }
    let first = fmix(h);
    let second = fmix(first ^ 0x9e37_79b9);
    [
        first & (SOURCE_RATE_SLOTS - 1),
        second & (SOURCE_RATE_SLOTS - 1),
    ]
}

/// Per-VIP drops by reason (per CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipDrops {
    pub source_denied: u64,
    pub blocked: u64,
    pub rate_limited_source: u64,
    pub rate_limited_total: u64,
}
const _: () = assert!(core::mem::size_of::<VipDrops>() == 32);

/// The flood defence's pin budget (`FLOOD[0]`): GCRA like [`VipLimits`], written by
/// userspace (`tat_ns` = 0), then advanced by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FloodState {
    pub pin_interval_ns: u64,
    pub pin_tolerance_ns: u64,
    pub tat_ns: u64,
}
const _: () = assert!(core::mem::size_of::<FloodState>() == 24);

/// GCRA admission: returns the new theoretical arrival time, or `None` when over the limit.
#[inline(always)]
pub fn gcra(tat_ns: u64, now_ns: u64, interval_ns: u64, tolerance_ns: u64) -> Option<u64> {
    let next = if tat_ns > now_ns { tat_ns } else { now_ns } + interval_ns;
    (next - now_ns <= tolerance_ns).then_some(next)
}

/// Records in each CPU's part of the connection log (a power of two): 4096 x 64 bytes =
/// 256 KiB per CPU, 20 daemon reads (every 10 ms) at the default budget of 20,000/s even if
/// one CPU makes them all. A CPU doing nothing but new flows (about 2 million/s) outruns it:
/// raise `max_per_second` that far and the reader counts overruns.
pub const LOG_RECORDS_PER_CPU: u32 = 4096;
/// `EVENTS` slots per CPU: its [`LogCursor`], then its records.
pub const LOG_CPU_SLOTS: u32 = LOG_RECORDS_PER_CPU + 1;
/// `EVENTS` flags: `BPF_F_MMAPABLE`, the daemon reads the records from its mapping.
pub const EVENTS_MAP_FLAGS: u32 = RINGS_MAP_FLAGS;

/// The first `EVENTS` slot of each CPU (`cpu * LOG_CPU_SLOTS`), in a record's place: `head`
/// counts the records this CPU ever wrote (record `n` is in slot `1 + n %
/// LOG_RECORDS_PER_CPU`), stored by the XDP program after the record; `tail` is the next
/// record the daemon will read, stored by the daemon, so a restarted daemon goes on where
/// the last one stopped. One cache line per CPU: writers on different CPUs never share one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LogCursor {
    pub head: u64,
    pub tail: u64,
    pub _pad: [u64; 6],
}
const _: () = assert!(core::mem::size_of::<LogCursor>() == core::mem::size_of::<LogRecord>());

/// [`LogRecord::event`]: what the record reports.
/// A packet created a flow (flow-table miss) and the scheduler picked `backend_id`.
pub const LOG_NEW: u8 = 1;
/// A flow entry was re-picked (its backend left the VIP, went down for UDP/SYN, or the
/// tuple was reused after FIN/RST).
pub const LOG_REHASH: u8 = 2;
/// Dropped by the VIP's source ACL.
pub const LOG_DENIED: u8 = 3;
/// Dropped by the blocklist.
pub const LOG_BLOCKED: u8 = 4;
/// Dropped by a new-flow limit (`reason` says which).
pub const LOG_RATE_LIMITED: u8 = 5;

/// One connection-log record, written by the XDP program into `EVENTS`, decoded by the
/// daemon with the VIP and backend names valid at `time_ns`.
///
/// The NAT fields (issue #12, built in parallel) are part of the layout now, zero until
/// NAT fills them in, so adding NAT does not change the record again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LogRecord {
    /// `CLOCK_MONOTONIC` nanoseconds at the kernel tick's resolution (read through
    /// `jiffies`, see [`jiffies_to_ns`]); userspace converts to wall time.
    pub time_ns: u64,
    /// Client address, in the flow key's layout (IPv4 in the first four bytes).
    pub client: [u8; 16],
    /// NAT source address toward the backend (`nat` forwarding); zero otherwise.
    pub nat_addr: [u8; 16],
    pub vip_id: u32,
    /// The backend chosen ([`NO_BACKEND`] for drops).
    pub backend_id: u32,
    /// Ports in network byte order.
    pub client_port: u16,
    pub nat_port: u16,
    /// The destination port (a VIP of all ports serves many).
    pub vip_port: u16,
    /// `LOG_*`.
    pub event: u8,
    pub proto: u8,
    pub family: u8,
    /// The drop counter (`counters::DROP_*`) of drop events; 0 for `new` and `rehash`.
    pub reason: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<LogRecord>() == 64);

/// The connection log's budget (`LOG_BUDGET[0]`): GCRA like [`VipLimits`], written by
/// userspace (`tat_ns` = 0, `tolerance_ns` = one second's worth), advanced by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LogBudget {
    pub interval_ns: u64,
    pub tolerance_ns: u64,
    pub tat_ns: u64,
}
const _: () = assert!(core::mem::size_of::<LogBudget>() == 24);

/// Per-VIP and per-backend traffic counters (per CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Packets for this VIP/backend that were not forwarded (no backend, too big to encapsulate).
    pub not_forwarded: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficCounters>() == 32);

/// Key of the decap program's address sets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AddrKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);

/// Most nat source addresses per family ([`NatConfig`]).
pub const MAX_NAT_SOURCES: usize = 32;
/// Port slots a new nat flow tries (from a hash-chosen start) before it counts as exhausted:
/// bounds the work of one packet.
pub const NAT_PROBES: u32 = 16;
/// Default nat port range: below Linux's default ephemeral range (32768-60999), so the LB's
/// own connections (health checks, from the same addresses) never hold a port a nat flow
/// could take, and a reply to them is never taken for a nat flow's.
pub const NAT_DEFAULT_PORT_MIN: u16 = 1024;
pub const NAT_DEFAULT_PORT_MAX: u16 = 32767;
pub const DEFAULT_NAT_TABLE_SIZE: u32 = 1 << 20;

/// `NAT_CONFIG[0]`. Timeouts in seconds (IPVS's defaults: TCP 900, closing 120, UDP 300).
/// `sources_v4`/`sources_v6` = 0: each backend's own default source ([`NatBackend::src`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatConfig {
    pub tcp_timeout: u32,
    pub tcp_closing_timeout: u32,
    pub udp_timeout: u32,
    pub port_min: u16,
    pub port_max: u16,
    pub sources_v4: u8,
    pub sources_v6: u8,
    pub _pad: [u8; 2],
    pub src_v4: [[u8; 4]; MAX_NAT_SOURCES],
    pub src_v6: [[u8; 16]; MAX_NAT_SOURCES],
}
const _: () = assert!(core::mem::size_of::<NatConfig>() == 20 + 20 * MAX_NAT_SOURCES);

impl Default for NatConfig {
    fn default() -> Self {
        Self {
            tcp_timeout: 900,
            tcp_closing_timeout: 120,
            udp_timeout: 300,
            port_min: NAT_DEFAULT_PORT_MIN,
            port_max: NAT_DEFAULT_PORT_MAX,
            sources_v4: 0,
            sources_v6: 0,
            _pad: [0; 2],
            src_v4: [[0; 4]; MAX_NAT_SOURCES],
            src_v6: [[0; 16]; MAX_NAT_SOURCES],
        }
    }
}

impl NatConfig {
    /// Seconds of silence (both directions) after which `state` may be reclaimed.
    #[inline(always)]
    pub fn timeout(&self, proto: u8, state: u8) -> u32 {
        if proto == PROTO_UDP {
            self.udp_timeout
        } else if state & (FLOW_FIN_SEEN | FLOW_RST_SEEN) != 0 {
            self.tcp_closing_timeout
        } else {
            self.tcp_timeout
        }
    }

    /// Whether the nat entry `state` of protocol `proto` is expired at `now` (seconds).
    #[inline(always)]
    pub fn expired(&self, proto: u8, state: &NatState, now: u32) -> bool {
        now.wrapping_sub(state.last_seen) > self.timeout(proto, state.state)
    }

    /// Configured sources of `family` (0: the backend's own).
    #[inline(always)]
    pub fn source_count(&self, family: u8) -> u32 {
        let n = if family == FAMILY_IPV6 {
            self.sources_v6
        } else {
            self.sources_v4
        };
        (n as u32).min(MAX_NAT_SOURCES as u32)
    }
}

/// Probe `probe` of a new nat flow with flow hash `hash`: (source index, port in host order)
/// among `sources` addresses x the port range. Consecutive slots from a hash-chosen start.
#[inline(always)]
pub fn nat_slot(hash: u32, probe: u32, port_min: u16, port_max: u16, sources: u32) -> (u32, u16) {
    let ports = (port_max as u32).saturating_sub(port_min as u32) + 1;
    let total = ports * sources.max(1);
    let slot = (hash % total + probe) % total;
    (slot / ports, port_min + (slot % ports) as u16)
}

/// `NAT_BACKENDS[backend id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatBackend {
    /// Source toward this backend when no `nat_source_*` is configured: the address of the
    /// interface that reaches it.
    pub src: [u8; 16],
    /// Backend port, network byte order; 0 = the client's destination port.
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<NatBackend>() == 20);

/// `NAT_FWD` value: the translation of one client connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatForward {
    pub nat_addr: [u8; 16],
    /// The backend's address, as when the entry was made (its `NAT_REV` key).
    pub backend: [u8; 16],
    /// Network byte order.
    pub nat_port: u16,
    pub backend_port: u16,
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<NatForward>() == 40);

impl NatForward {
    /// The `NAT_REV` key of this translation: the tuple of the backend's replies.
    #[inline(always)]
    pub fn reverse_key(&self, proto: u8, family: u8) -> FlowKey {
        FlowKey {
            src: self.backend,
            dst: self.nat_addr,
            sport: self.backend_port,
            dport: self.nat_port,
            proto,
            family,
            _pad: [0; 2],
        }
    }
}

/// `NAT_REV` value, keyed by the backend-side tuple (src = backend, dst = nat address,
/// sport = backend port, dport = nat port): the client connection and where its replies go.
/// `last_seen` and `state` are refreshed by both directions.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatState {
    pub client: [u8; 16],
    pub vip: [u8; 16],
    /// Network byte order.
    pub client_port: u16,
    pub vip_port: u16,
    /// The hop the client's packets came from (replies go back to it) and the LB's MAC there.
    pub client_mac: [u8; 6],
    pub lb_mac: [u8; 6],
    pub ifindex: u32,
    pub vip_id: u32,
    pub backend_id: u32,
    pub created: u32,
    pub last_seen: u32,
    /// `FLOW_*_SEEN` bits of both directions.
    pub state: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<NatState>() == 72);

impl NatState {
    /// Whether this entry belongs to the client connection `key` (client -> VIP).
    #[inline(always)]
    pub fn owned_by(&self, key: &FlowKey) -> bool {
        self.client == key.src
            && self.vip == key.dst
            && self.client_port == key.sport
            && self.vip_port == key.dport
    }
}

/// Declares the global counters once: index constants, their exported names and help texts.
macro_rules! global_counters {
    ($($name:ident = $idx:literal, $label:literal, $help:literal;)*) => {
        $(#[doc = $help] pub const $name: u32 = $idx;)*
        /// Every counter in index order: (metric label, help).
        pub const ALL: &[(&str, &str)] = &[$(($label, $help)),*];
        pub const COUNT: u32 = ALL.len() as u32;
        const _: () = { let mut i = 0; $(assert!($idx == i); i += 1;)* let _ = i; };
    };
}

/// Indices into `GLOBAL_COUNTERS`. Labels are `kind_reason`; userspace splits them into
/// Prometheus labels (`xdplb_xdp_actions_total{action}`, `xdplb_packets_passed_total{reason}`...).
pub mod counters {
    global_counters! {
        ACTION_ABORTED = 0, "action_aborted", "XDP_ABORTED returned (a bug: never expected)";
        ACTION_DROP = 1, "action_drop", "XDP_DROP returned";
        ACTION_PASS = 2, "action_pass", "XDP_PASS returned";
        ACTION_TX = 3, "action_tx", "XDP_TX returned";
        ACTION_REDIRECT = 4, "action_redirect", "XDP_REDIRECT returned";
        PASS_NOT_IP = 5, "pass_not_ip", "passed: neither IPv4 nor IPv6 (ARP, LLDP...)";
        PASS_MALFORMED = 6, "pass_malformed", "passed: truncated or malformed header";
        PASS_FRAGMENT = 7, "pass_fragment", "passed: IP fragment (ports unknown)";
        PASS_NOT_TCP_UDP = 8, "pass_not_tcp_udp", "passed: transport is neither TCP nor UDP";
        PASS_NOT_VIP = 9, "pass_not_vip", "passed: destination is not a VIP";
        PASS_TOO_BIG = 10, "pass_too_big", "passed: too big for the egress MTU once encapsulated, IPv4 without DF";
        DROP_NO_BACKEND = 11, "drop_no_backend", "dropped: the VIP has no available backend";
        DROP_INTERNAL = 12, "drop_internal", "dropped: a map or helper failed unexpectedly";
        FLOW_HIT = 13, "flow_hit", "flow-table hit, backend kept";
        FLOW_MISS = 14, "flow_miss", "flow-table miss, backend chosen from the ring";
        FLOW_REHASH = 15, "flow_rehash", "flow entry's backend gone (or UDP to a down backend): re-hashed";
        FLOW_EVICTED = 16, "flow_evicted", "flow table: a new flow replaced a live entry (its set of 4 slots was full)";
        DECAP_OK = 17, "decap_ok", "decap program: outer header removed";
        DECAP_NOT_OURS = 18, "decap_not_ours", "decap program: tunnel packet not for a local address and VIP";
        ICMP_ERROR_FORWARDED = 19, "icmp_error_forwarded", "ICMP error about a VIP's flow forwarded to the flow's backend";
        PASS_ICMP_NO_BACKEND = 20, "pass_icmp_no_backend", "passed: ICMP error about a VIP's flow, but the VIP has no backend for it";
        ICMP_TOO_BIG_SENT = 21, "icmp_too_big_sent", "too big to encapsulate: ICMP fragmentation needed / packet too big sent to the client";
        DROP_TOO_BIG_RATE_LIMITED = 22, "drop_too_big_rate_limited", "dropped: too big to encapsulate, and the ICMP reply is over its rate limit";
        DROP_SOURCE_DENIED = 23, "drop_source_denied", "dropped: source denied by the VIP's ACL";
        DROP_BLOCKED = 24, "drop_blocked", "dropped: source on the blocklist";
        DROP_RATE_LIMITED_SOURCE = 25, "drop_rate_limited_source", "dropped: new flow over the VIP's per-source limit";
        DROP_RATE_LIMITED_TOTAL = 26, "drop_rate_limited_total", "dropped: new flow over the VIP's total limit";
        FLOOD_PINNED = 27, "flood_pinned", "flood defence: flow pinned (copied to the pinned table)";
        FLOOD_PIN_DEFERRED = 28, "flood_pin_deferred", "flood defence: pin deferred, over the pin rate";
        FLOOD_PIN_FAILED = 29, "flood_pin_failed", "flood defence: pin failed, the pinned table is full";
        FLOOD_RESTORED = 30, "flood_restored", "flood defence: flow evicted from the flow table restored from the pinned table";
        // Issue #15, the connection log.
        LOG_RECORDS_DROPPED_BUDGET = 31, "log_records_dropped_budget", "connection log: record not emitted, over [daemon.log] max_per_second";
        // Issue 12: nat forwarding.
        NAT_NEW = 32, "nat_new", "nat: a connection got a nat address and port";
        NAT_RECLAIMED = 33, "nat_reclaimed", "nat: a new connection took over the port of an expired one";
        DROP_NAT_EXHAUSTED = 34, "drop_nat_exhausted", "dropped: nat found no free port (or the nat table is full) for a new connection";
        NAT_REPLY = 35, "nat_reply", "nat: a backend's reply translated back to its client";
        NAT_ICMP_TO_CLIENT = 36, "nat_icmp_to_client", "nat: an ICMP error about a nat connection translated and sent to its client";
        NAT_ICMP_TO_BACKEND = 37, "nat_icmp_to_backend", "nat: an ICMP error about a nat connection translated and sent to its backend";
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] plain-old-data without implicit padding (see the
    // size assertions above), so every byte pattern is a valid value.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for VipSlot {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for LbConfig {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for SourcePrefix {}
    unsafe impl aya::Pod for SourcePrefix4 {}
    unsafe impl aya::Pod for VipLimits {}
    unsafe impl aya::Pod for VipDrops {}
    unsafe impl aya::Pod for FloodState {}
    unsafe impl aya::Pod for LogRecord {}
    unsafe impl aya::Pod for LogBudget {}
    unsafe impl aya::Pod for NatConfig {}
    unsafe impl aya::Pod for NatBackend {}
    unsafe impl aya::Pod for NatForward {}
    unsafe impl aya::Pod for NatState {}
}
