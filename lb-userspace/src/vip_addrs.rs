//! The data path's `VIP_ADDRS` bitmap: one bit (by hash) per address that has a VIP, so a
//! packet to any other address skips the `VIPS` lookup. Bits are hints, `VIPS` decides; what
//! must hold is that a VIP's bit is set while `VIPS` holds it, which [`crate::state::plan`]
//! keeps by writing the union of the old and new VIPs' bits before any VIP is added, and the
//! exact set once every change is done.

use lb_common::{vip_addr_bit, VipKey};
use std::collections::BTreeMap;

/// The bitmap's non-zero words (word index -> bits) for these VIPs.
pub fn words<'a>(vips: impl IntoIterator<Item = &'a VipKey>) -> BTreeMap<u32, u64> {
    let mut words = BTreeMap::new();
    for key in vips {
        let (word, bit) = vip_addr_bit(key.family, &key.addr_words());
        *words.entry(word).or_insert(0) |= bit;
    }
    words
}

/// The word writes that turn `live` into `want` (a word absent from `want` becomes 0).
pub fn writes(live: &BTreeMap<u32, u64>, want: &BTreeMap<u32, u64>) -> Vec<(u32, u64)> {
    let mut out: Vec<(u32, u64)> = want
        .iter()
        .filter(|(word, bits)| live.get(word) != Some(bits))
        .map(|(word, bits)| (*word, *bits))
        .collect();
    out.extend(
        live.keys()
            .filter(|word| !want.contains_key(word))
            .map(|word| (*word, 0)),
    );
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{FlowKey, FAMILY_IPV4, FAMILY_IPV6};

    fn vip(addr: [u8; 16], family: u8) -> VipKey {
        VipKey {
            addr,
            port: 80u16.to_be(),
            proto: 6,
            family,
        }
    }

    #[test]
    fn a_vips_bit_is_the_one_the_data_path_tests_for_its_packets() {
        let mut v4 = [0; 16];
        v4[..4].copy_from_slice(&[192, 0, 2, 10]);
        let v6 = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        for (addr, family) in [(v4, FAMILY_IPV4), (v6, FAMILY_IPV6)] {
            let packet = FlowKey {
                dst: addr,
                family,
                ..FlowKey::default()
            };
            let (word, bit) = vip_addr_bit(family, &packet.dst_words());
            assert_eq!(words([&vip(addr, family)]), BTreeMap::from([(word, bit)]));
        }
    }

    #[test]
    fn writes_set_changed_words_and_clear_emptied_ones() {
        let live = BTreeMap::from([(1, 0b11), (2, 0b1), (5, 0b100)]);
        let want = BTreeMap::from([(1, 0b11), (2, 0b10), (7, 0b1)]);
        assert_eq!(writes(&live, &want), [(2, 0b10), (5, 0), (7, 0b1)]);
        assert_eq!(writes(&want, &want), []);
    }
}
