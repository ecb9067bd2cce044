//! Log-bucketed latency histogram with bounded memory.
//!
//! Values below 256 are stored exactly; larger values are stored in buckets
//! of 128 sub-buckets per power of two, so a recorded value is reported with a
//! relative error below 1/128 (< 0.8 %). The bucket array has a fixed size
//! (7424 counters, about 58 KiB) no matter how many values are recorded.

/// Number of sub-bucket bits per power of two.
const SUB_BITS: u32 = 7;
/// Sub-buckets per power of two.
const SUB: u64 = 1 << SUB_BITS;
/// Values below this are stored exactly, one bucket per value.
const EXACT: u64 = 2 * SUB;
/// Total number of buckets needed to cover all of `u64`.
const BUCKETS: usize = (EXACT + (64 - SUB_BITS as u64 - 1) * SUB) as usize;

/// Fixed-size histogram of `u64` values (microseconds in this crate).
#[derive(Debug, Clone)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < EXACT {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS + 1
    let shift = exp - SUB_BITS; // >= 1
    let mantissa = v >> shift; // in [SUB, 2 * SUB)
    (EXACT + u64::from(shift - 1) * SUB + (mantissa - SUB)) as usize
}

/// Largest value that falls into bucket `idx`.
fn bucket_high(idx: usize) -> u64 {
    let idx = idx as u64;
    if idx < EXACT {
        return idx;
    }
    let rel = idx - EXACT;
    let shift = rel / SUB + 1;
    let mantissa = rel % SUB + SUB;
    // `mantissa + 1 <= 2 * SUB` and `shift <= 56`, so for the top bucket this
    // is exactly 2^64, which saturates to u64::MAX.
    ((u128::from(mantissa + 1) << shift) - 1).min(u128::from(u64::MAX)) as u64
}

impl Histogram {
    /// Records one value.
    pub(crate) fn record(&mut self, v: u64) {
        self.counts[bucket_of(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    /// Number of recorded values.
    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.total
    }

    /// Value at quantile `q` (0.0..=1.0): the smallest bucket upper bound such
    /// that at least `ceil(q * n)` values are at or below it, capped at the
    /// largest recorded value. Returns 0 when empty.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let q = q.clamp(0.0, 1.0);
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0u64;
        for (idx, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_high(idx).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_cover_u64() {
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_high(BUCKETS - 1), u64::MAX);
        let mut prev = 0;
        for v in (0..100_000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b >= prev, "bucket order broken at {v}");
            prev = b;
            assert!(bucket_high(b) >= v, "value {v} above its bucket bound");
            if b > 0 {
                assert!(bucket_high(b - 1) < v, "value {v} fits a lower bucket");
            }
        }
    }

    #[test]
    fn quantiles_are_exact_for_small_values_and_close_for_large() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), 0);
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.len(), 100);
        assert_eq!(h.quantile(0.5), 50);
        assert_eq!(h.quantile(0.99), 99);
        assert_eq!(h.quantile(1.0), 100);

        let mut h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        let p99 = h.quantile(0.99) as f64;
        assert!((p50 / 5_000_000.0 - 1.0).abs() < 0.01, "p50 {p50}");
        assert!((p99 / 9_900_000.0 - 1.0).abs() < 0.01, "p99 {p99}");
        assert_eq!(h.quantile(1.0), 10_000_000);
    }
}
