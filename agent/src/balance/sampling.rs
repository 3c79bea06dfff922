//! Constant-time weighted choices for large sets (proposed replacements for
//! the binary search over cumulative weights and the EDF heap in
//! [`super::set::Level`]; see `tests/bench/PICK.md`).
//!
//! * [`AliasTable`]: weighted random draw in O(1) (Walker/Vose alias method,
//!   exact in integers): one uniform bucket, one comparison, one table entry
//!   touched, where a binary search over 100,000 cumulative weights touches
//!   17 cache lines one after another.
//! * [`WeightedCycle`]: weighted round robin without a lock or a heap
//!   (interleaved weighted round robin): in round `r` every member whose
//!   weight is at least `r` is picked once, so over a cycle of `Σ weight`
//!   picks each member is picked exactly `weight` times. A pick is one
//!   `fetch_add` and a binary search over the *distinct* weights.

use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;

/// Weighted random draw in O(1).
#[derive(Debug, Clone)]
pub struct AliasTable {
    /// Per bucket: keep the bucket when `r < keep` (`r` uniform in
    /// `0..total`), else take `alias`.
    buckets: Vec<Bucket>,
    total: u64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    keep: u64,
    alias: u32,
}

impl AliasTable {
    /// Builds the table; weights of 0 count as 1. `None` when empty.
    pub fn new(weights: &[u32]) -> Option<AliasTable> {
        let n = weights.len();
        if n == 0 {
            return None;
        }
        let w: Vec<u64> = weights.iter().map(|w| u64::from((*w).max(1))).collect();
        let total: u64 = w.iter().sum();
        // Scaled so that the average bucket holds exactly `total`.
        let mut p: Vec<u64> = w.iter().map(|w| w * n as u64).collect();
        let mut buckets = vec![
            Bucket {
                keep: total,
                alias: 0
            };
            n
        ];
        let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| p[i] < total);
        while let (Some(&s), Some(&l)) = (small.last(), large.last()) {
            small.pop();
            buckets[s] = Bucket {
                keep: p[s],
                alias: l as u32,
            };
            p[l] -= total - p[s];
            if p[l] < total {
                large.pop();
                small.push(l);
            }
        }
        // What is left holds exactly `total` (integers: no rounding).
        for i in small.into_iter().chain(large) {
            buckets[i] = Bucket {
                keep: total,
                alias: i as u32,
            };
        }
        Some(AliasTable { buckets, total })
    }

    /// An index drawn with probability `weight / Σ weight`.
    #[inline]
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        let i = rng.random_range(0..self.buckets.len());
        let b = self.buckets[i];
        if b.keep >= self.total || rng.random_range(0..self.total) < b.keep {
            i
        } else {
            b.alias as usize
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Lock-free weighted round robin.
#[derive(Debug)]
pub struct WeightedCycle {
    /// Indexes sorted by weight, heaviest first: the members picked in a
    /// round are a prefix.
    order: Vec<u32>,
    /// Per segment of rounds with the same prefix: the cumulative number of
    /// picks at its end, and the prefix length.
    seg_end: Vec<u64>,
    seg_len: Vec<u32>,
    total: u64,
    next: AtomicU64,
}

impl WeightedCycle {
    /// Builds the cycle; weights of 0 count as 1. `None` when empty.
    pub fn new(weights: &[u32]) -> Option<WeightedCycle> {
        if weights.is_empty() {
            return None;
        }
        let w = |i: u32| weights[i as usize].max(1);
        let mut order: Vec<u32> = (0..weights.len() as u32).collect();
        // Heaviest first; equal weights keep their configured order.
        order.sort_by_key(|&i| std::cmp::Reverse(w(i)));
        let mut distinct: Vec<u32> = order.iter().map(|&i| w(i)).collect();
        distinct.dedup();
        distinct.reverse(); // ascending
        let (mut seg_end, mut seg_len) = (Vec::new(), Vec::new());
        let (mut acc, mut prev) = (0u64, 0u32);
        for d in distinct {
            // Rounds prev+1..=d pick every member of weight >= d.
            let len = order.partition_point(|&i| w(i) >= d) as u32;
            acc += u64::from(d - prev) * u64::from(len);
            seg_end.push(acc);
            seg_len.push(len);
            prev = d;
        }
        Some(WeightedCycle {
            order,
            seg_end,
            seg_len,
            total: acc,
            next: AtomicU64::new(0),
        })
    }

    /// The next index in the cycle.
    #[inline]
    pub fn next(&self) -> usize {
        let t = self.next.fetch_add(1, Ordering::Relaxed) % self.total;
        let j = self.seg_end.partition_point(|e| *e <= t);
        let start = if j == 0 { 0 } else { self.seg_end[j - 1] };
        let pos = (t - start) % u64::from(self.seg_len[j]);
        self.order[pos as usize] as usize
    }

    /// Picks in one full cycle (`Σ weight`).
    pub fn cycle_len(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    /// The exact probability mass of every index, times `n x total`.
    fn mass(t: &AliasTable) -> Vec<u64> {
        let mut m = vec![0u64; t.len()];
        for (i, b) in t.buckets.iter().enumerate() {
            let keep = b.keep.min(t.total);
            m[i] += keep;
            m[b.alias as usize] += t.total - keep;
        }
        m
    }

    #[test]
    fn alias_table_is_exact() {
        let cases: Vec<Vec<u32>> = vec![
            vec![1],
            vec![1, 1, 1, 1],
            vec![1, 2, 3, 4, 5],
            vec![1_000_000, 1, 1, 1],
            vec![0, 7, 0],
            (0..1000).map(|i| (i * 7919 % 100) + 1).collect(),
        ];
        for w in cases {
            let t = AliasTable::new(&w).expect("non-empty");
            let n = w.len() as u64;
            let want: Vec<u64> = w.iter().map(|w| u64::from((*w).max(1)) * n).collect();
            assert_eq!(mass(&t), want, "weights {w:?}");
        }
        assert!(AliasTable::new(&[]).is_none());
    }

    #[test]
    fn alias_table_draws_follow_weights() {
        let t = AliasTable::new(&[1, 3, 6]).unwrap();
        let mut rng = SmallRng::seed_from_u64(1);
        let mut c = [0u32; 3];
        for _ in 0..100_000 {
            c[t.sample(&mut rng)] += 1;
        }
        for (got, want) in c.iter().zip([10_000, 30_000, 60_000]) {
            assert!(got.abs_diff(want) < 1_500, "{c:?}");
        }
    }

    #[test]
    fn weighted_cycle_picks_each_weight_times_per_cycle() {
        for w in [
            vec![1u32],
            vec![1, 1, 1],
            vec![5, 1, 3],
            vec![0, 2],
            (0..500).map(|i| (i * 31 % 17) + 1).collect(),
        ] {
            let c = WeightedCycle::new(&w).unwrap();
            let total: u64 = w.iter().map(|x| u64::from((*x).max(1))).sum();
            assert_eq!(c.cycle_len(), total);
            for _ in 0..2 {
                let mut got = vec![0u32; w.len()];
                for _ in 0..total {
                    got[c.next()] += 1;
                }
                let want: Vec<u32> = w.iter().map(|x| (*x).max(1)).collect();
                assert_eq!(got, want, "weights {w:?}");
            }
        }
    }

    #[test]
    fn weighted_cycle_interleaves() {
        // 3:1 — the heavy member is never picked 4 times in a row, and the
        // light one comes once per 4 picks.
        let c = WeightedCycle::new(&[3, 1]).unwrap();
        let seq: Vec<usize> = (0..8).map(|_| c.next()).collect();
        assert_eq!(seq, vec![0, 1, 0, 0, 0, 1, 0, 0]);
        let c = WeightedCycle::new(&[2, 2, 1]).unwrap();
        let seq: Vec<usize> = (0..5).map(|_| c.next()).collect();
        assert_eq!(seq, vec![0, 1, 2, 0, 1]);
    }
}
