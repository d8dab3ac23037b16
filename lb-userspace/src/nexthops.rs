//! Next hops toward backends, cached, and looked up outside the daemon's lock.
//!
//! Resolving costs a route and a neighbour lookup (a netlink request each, ~20 µs; an `ip`
//! process each, ~1.7 ms, before issue 13), so a full pass over many backends is not free.
//! The daemon therefore works in three steps: under its lock it asks [`NextHops::due`] which
//! backends need a lookup, releases the lock while [`resolve`] runs them, then takes the lock
//! again to [`record`](NextHops::record) the answers and plan the map writes. The cache is itself the [`Resolve`] the plan reads, so
//! planning never asks the kernel.
//!
//! A known answer, good or bad, is reused until the backend is due for refresh; the last good
//! answer also outlives a neighbour entry that briefly disappears, so a flapping ARP entry
//! never pulls a backend out of its ring.

use crate::{
    model::{BackendSpec, Mac},
    state::{Live, NextHop, Resolve},
};
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

/// Next hops re-resolved per refresh tick, unresolved ones first: with 1,000 backends each is
/// refreshed about every 30 s at one tick a second, and the cost stays bounded (at most ~5 %
/// of a core).
pub const REFRESH_PER_TICK: usize = 32;

/// Why a backend has no next hop before its first lookup finished.
const NOT_YET: &str = "next hop not looked up yet";

/// What resolution last said per backend address.
#[derive(Debug, Default)]
pub struct NextHops {
    good: HashMap<IpAddr, NextHop>,
    /// Addresses that never resolved, with why.
    failed: HashMap<IpAddr, String>,
    /// Where the round-robin refresh continues.
    cursor: usize,
}

/// Answers of a [`resolve`] pass, to [`record`](NextHops::record).
pub type Answers = Vec<(IpAddr, Result<NextHop, String>)>;

impl NextHops {
    /// The next hops the data path is using, from adopted maps: a restart must not lose a
    /// backend whose neighbour entry happens to be missing right now.
    pub fn adopted(live: &Live) -> Self {
        let good = live
            .vips
            .values()
            .flat_map(|vip| vip.backends.iter())
            .map(|(addr, backend)| {
                let e = &backend.entry;
                // A nat backend's source was resolved with its route: keep using it.
                let src = (backend.nat.src != [0; 16])
                    .then(|| crate::state::entry_addr_of(e.family, &backend.nat.src));
                let hop = NextHop {
                    dst_mac: Mac(e.dst_mac),
                    src_mac: Mac(e.src_mac),
                    ifindex: e.tx_ifindex,
                    mtu: e.mtu,
                    src,
                };
                (*addr, hop)
            })
            .collect();
        Self {
            good,
            ..Self::default()
        }
    }

    pub fn get(&self, addr: IpAddr) -> Option<&NextHop> {
        self.good.get(&addr)
    }

    /// The backends (each address once) that need a lookup: never looked up, or in `refresh`.
    pub fn due<'a>(
        &self,
        backends: impl IntoIterator<Item = &'a BackendSpec>,
        refresh: &BTreeSet<IpAddr>,
    ) -> Vec<BackendSpec> {
        let mut seen = BTreeSet::new();
        backends
            .into_iter()
            .filter(|b| {
                refresh.contains(&b.addr)
                    || !(self.good.contains_key(&b.addr) || self.failed.contains_key(&b.addr))
            })
            .filter(|b| seen.insert(b.addr))
            .cloned()
            .collect()
    }

    /// The next slice of a periodic refresh of at most [`REFRESH_PER_TICK`] addresses:
    /// `unresolved` first, then the next of `all`, round robin.
    pub fn refresh_slice(
        &mut self,
        all: &[IpAddr],
        unresolved: impl IntoIterator<Item = IpAddr>,
    ) -> BTreeSet<IpAddr> {
        let mut refresh: BTreeSet<IpAddr> = unresolved.into_iter().take(REFRESH_PER_TICK).collect();
        let room = REFRESH_PER_TICK
            .saturating_sub(refresh.len())
            .min(all.len());
        for i in 0..room {
            refresh.insert(all[(self.cursor + i) % all.len()]);
        }
        if !all.is_empty() {
            self.cursor = (self.cursor + room) % all.len();
        }
        refresh
    }

    /// Takes in lookup answers. A failed lookup of an address that resolved before keeps the
    /// old answer.
    pub fn record(&mut self, answers: Answers) {
        for (addr, answer) in answers {
            match answer {
                Ok(hop) => {
                    self.failed.remove(&addr);
                    self.good.insert(addr, hop);
                }
                Err(reason) if !self.good.contains_key(&addr) => {
                    self.failed.insert(addr, reason);
                }
                Err(_) => {}
            }
        }
    }

    /// Moves the next hops through interface `old` to its re-created self `new` (another
    /// index, perhaps another MAC and MTU): the backends' MACs have not changed, so they keep
    /// forwarding at once instead of waiting for ARP/ND on the new interface. Returns the
    /// backends moved, to look up again soon.
    pub fn move_interface(
        &mut self,
        old: u32,
        ifindex: u32,
        src_mac: Mac,
        mtu: u16,
    ) -> BTreeSet<IpAddr> {
        let mut moved = BTreeSet::new();
        for (addr, hop) in self.good.iter_mut().filter(|(_, hop)| hop.ifindex == old) {
            *hop = NextHop {
                ifindex,
                src_mac,
                mtu,
                ..*hop
            };
            moved.insert(*addr);
        }
        moved
    }

    /// Forgets the next hops through interfaces whose index is not in `current` (an interface
    /// re-created while no daemon ran, when it cannot be told which one it became); returns
    /// the backends concerned, to look up.
    pub fn forget_interfaces_except(&mut self, current: &[u32]) -> BTreeSet<IpAddr> {
        let gone: BTreeSet<IpAddr> = self
            .good
            .iter()
            .filter(|(_, hop)| !current.contains(&hop.ifindex))
            .map(|(addr, _)| *addr)
            .collect();
        self.good.retain(|addr, _| !gone.contains(addr));
        gone
    }

    /// The interface indexes next hops go through.
    pub fn interfaces(&self) -> BTreeSet<u32> {
        self.good.values().map(|hop| hop.ifindex).collect()
    }

    /// Drops what is known about addresses not in `keep` (backends that left the config).
    pub fn retain(&mut self, keep: &BTreeSet<IpAddr>) {
        self.good.retain(|addr, _| keep.contains(addr));
        self.failed.retain(|addr, _| keep.contains(addr));
    }
}

/// Planning reads the cache only: an address not looked up yet is left out for now (the
/// refresh tick, which tries unresolved backends first, looks it up within a second).
impl Resolve for NextHops {
    fn next_hop(&self, backend: &BackendSpec) -> Result<NextHop, String> {
        if let Some(hop) = self.good.get(&backend.addr) {
            return Ok(*hop);
        }
        Err(self
            .failed
            .get(&backend.addr)
            .cloned()
            .unwrap_or_else(|| NOT_YET.into()))
    }
}

/// Looks up every backend in `due`. Blocking (netlink requests): call it off the async
/// threads and without the daemon's lock.
pub fn resolve(resolver: &impl Resolve, due: &[BackendSpec]) -> Answers {
    due.iter().map(|b| (b.addr, resolver.next_hop(b))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Counts resolutions; fails for 10.0.0.99.
    struct Counting(Cell<usize>);

    impl Resolve for Counting {
        fn next_hop(&self, backend: &BackendSpec) -> Result<NextHop, String> {
            self.0.set(self.0.get() + 1);
            if backend.addr == IpAddr::from([10, 0, 0, 99]) {
                return Err("no neighbour".into());
            }
            Ok(hop(2))
        }
    }

    fn hop(ifindex: u32) -> NextHop {
        NextHop {
            src: None,
            dst_mac: Mac([2, 0, 0, 0, 0, 1]),
            src_mac: Mac([2, 0, 0, 0, 0, 2]),
            ifindex,
            mtu: 1500,
        }
    }

    fn backend(last: u8) -> BackendSpec {
        BackendSpec {
            port: None,
            addr: IpAddr::from([10, 0, 0, last]),
            weight: 100,
            mac: None,
            health_port: None,
        }
    }

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn known_answers_are_reused_unless_refreshed() {
        let counting = Counting(Cell::new(0));
        let mut hops = NextHops::default();
        let none = BTreeSet::new();
        let backends = [backend(1), backend(99), backend(1)];
        let due = hops.due(&backends, &none);
        assert_eq!(due.len(), 2, "each unknown address once: {due:?}");
        hops.record(resolve(&counting, &due));
        assert_eq!(counting.0.get(), 2);
        assert_eq!(hops.next_hop(&backend(1)), Ok(hop(2)));
        assert_eq!(hops.next_hop(&backend(99)), Err("no neighbour".into()));
        assert!(
            hops.due(&backends, &none).is_empty(),
            "known answers, good or bad, are not looked up again"
        );
        let refresh: BTreeSet<IpAddr> = [addr(1)].into();
        assert_eq!(hops.due(&backends, &refresh), vec![backend(1)]);
        assert_eq!(
            hops.next_hop(&backend(7)),
            Err(NOT_YET.into()),
            "planning never resolves"
        );
    }

    #[test]
    fn a_failed_refresh_keeps_the_last_good_answer() {
        let mut hops = NextHops::default();
        hops.record(vec![(addr(99), Ok(hop(2)))]);
        hops.record(vec![(addr(99), Err("no neighbour".into()))]);
        assert_eq!(hops.next_hop(&backend(99)), Ok(hop(2)));
    }

    #[test]
    fn a_recreated_interface_keeps_the_backend_macs_and_removed_backends_are_forgotten() {
        let mut hops = NextHops::default();
        hops.record(vec![
            (addr(1), Ok(hop(2))),
            (addr(2), Ok(hop(3))),
            (addr(3), Err("no route".into())),
        ]);
        let mac = Mac([2, 0, 0, 0, 0, 9]);
        assert_eq!(hops.move_interface(2, 7, mac, 9000), [addr(1)].into());
        assert_eq!(
            hops.next_hop(&backend(1)),
            Ok(NextHop {
                src: None,
                dst_mac: hop(2).dst_mac,
                src_mac: mac,
                ifindex: 7,
                mtu: 9000,
            })
        );
        assert_eq!(hops.next_hop(&backend(2)), Ok(hop(3)));
        assert_eq!(hops.interfaces(), [3, 7].into());
        assert_eq!(hops.forget_interfaces_except(&[7]), [addr(2)].into());
        assert_eq!(hops.next_hop(&backend(2)), Err(NOT_YET.into()));
        hops.retain(&[addr(1)].into());
        assert_eq!(hops.next_hop(&backend(1)).map(|h| h.ifindex), Ok(7));
        assert_eq!(hops.next_hop(&backend(3)), Err(NOT_YET.into()));
    }

    #[test]
    fn refresh_goes_round_robin_after_the_unresolved() {
        let mut hops = NextHops::default();
        let all: Vec<IpAddr> = (0..40).map(addr).collect();
        let first = hops.refresh_slice(&all, [addr(200)]);
        assert_eq!(first.len(), REFRESH_PER_TICK);
        assert!(first.contains(&addr(200)));
        let second = hops.refresh_slice(&all, []);
        assert!(second.contains(&addr(31)) && second.contains(&addr(0)));
        assert!(!second.contains(&addr(30)), "{second:?}");
    }
}
