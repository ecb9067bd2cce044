//! A fast hasher for maps keyed by numbers the gateway picks itself
//! (client keys, link ids): the default SipHash resists keys chosen by an
//! attacker, which these are not, and costs several times more per lookup
//! (the hub looks up a client or a link a few times per message).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// A map keyed by gateway-chosen numbers.
pub type NumMap<K, V> = HashMap<K, V, BuildHasherDefault<NumHasher>>;
/// A set of gateway-chosen numbers.
pub type NumSet<K> = HashSet<K, BuildHasherDefault<NumHasher>>;

/// Multiplicative hashing (as in Firefox's and rustc's FxHash) for
/// integer keys; other input is folded in 8 bytes at a time.
#[derive(Default, Clone, Copy)]
pub struct NumHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl NumHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for NumHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        let mut last = [0u8; 8];
        let rest = chunks.remainder();
        last[..rest.len()].copy_from_slice(rest);
        self.add(u64::from_le_bytes(last) ^ rest.len() as u64);
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(key: u64) -> u64 {
        let mut h = NumHasher::default();
        h.write_u64(key);
        h.finish()
    }

    #[test]
    fn consecutive_keys_take_distinct_buckets_and_spread_control_bits() {
        // hashbrown picks the bucket from the low bits: consecutive keys
        // never collide there (the multiplier is odd).
        let buckets: HashSet<u64> = (0..1 << 16).map(|k| hash(k) & 0xffff).collect();
        assert_eq!(buckets.len(), 1 << 16);
        // It takes 7 control bits from the top.
        let tops: HashSet<u64> = (0..128).map(|k| hash(k) >> 57).collect();
        assert!(tops.len() > 48, "{} distinct", tops.len());
    }
}
