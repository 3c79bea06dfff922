//! Weighted split between backend sets.
//!
//! [`SmoothWeighted`] is smooth weighted round-robin (the algorithm nginx
//! uses): over every run of `sum(weights)` picks each endpoint is chosen
//! exactly `weight` times, and the choices of a heavy endpoint are spread out
//! rather than bunched, so any window of picks tracks the weights closely.

use std::sync::Mutex;

/// Smooth weighted round-robin over a fixed set of weights.
#[derive(Debug)]
pub struct SmoothWeighted {
    inner: Mutex<SwrrState>,
}

#[derive(Debug, Clone)]
struct SwrrState {
    weights: Vec<i64>,
    current: Vec<i64>,
    total: i64,
}

impl SmoothWeighted {
    /// Builds a picker; entries with weight 0 are never chosen.
    pub fn new(weights: &[u32]) -> Self {
        let weights: Vec<i64> = weights.iter().map(|w| i64::from(*w)).collect();
        let total = weights.iter().sum();
        SmoothWeighted {
            inner: Mutex::new(SwrrState {
                current: vec![0; weights.len()],
                weights,
                total,
            }),
        }
    }

    /// The index of the next endpoint, or `None` when every weight is 0.
    pub fn pick(&self) -> Option<usize> {
        // A poisoned lock only means another thread panicked mid-pick; the
        // state is plain integers and stays usable.
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.pick()
    }
}

impl SwrrState {
    fn pick(&mut self) -> Option<usize> {
        if self.total <= 0 {
            return None;
        }
        let mut best: Option<usize> = None;
        for i in 0..self.weights.len() {
            if self.weights[i] <= 0 {
                continue;
            }
            self.current[i] += self.weights[i];
            match best {
                Some(b) if self.current[b] >= self.current[i] => {}
                _ => best = Some(i),
            }
        }
        let b = best?;
        self.current[b] -= self.total;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(weights: &[u32], picks: usize) -> Vec<usize> {
        let p = SmoothWeighted::new(weights);
        let mut n = vec![0; weights.len()];
        for _ in 0..picks {
            n[p.pick().expect("a positive weight exists")] += 1;
        }
        n
    }

    #[test]
    fn exact_over_one_cycle() {
        assert_eq!(shares(&[60, 30, 10], 100), vec![60, 30, 10]);
        assert_eq!(shares(&[5, 1, 1], 7), vec![5, 1, 1]);
    }

    #[test]
    fn thousand_picks_within_two_points() {
        let n = shares(&[60, 30, 10], 1000);
        for (got, want) in n.iter().zip([600i64, 300, 100]) {
            assert!((*got as i64 - want).abs() <= 20, "{n:?}");
        }
    }

    #[test]
    fn any_window_tracks_weights() {
        // Smoothness: in every window of 10 consecutive picks of 60/30/10 the
        // heavy endpoint appears 5..=7 times (no bunching).
        let p = SmoothWeighted::new(&[60, 30, 10]);
        let seq: Vec<usize> = (0..300).map(|_| p.pick().unwrap()).collect();
        for w in seq.windows(10) {
            let heavy = w.iter().filter(|i| **i == 0).count();
            assert!((5..=7).contains(&heavy), "window {w:?}");
        }
    }

    #[test]
    fn zero_weights_are_skipped() {
        assert_eq!(shares(&[0, 3, 0, 1], 8), vec![0, 6, 0, 2]);
        assert_eq!(SmoothWeighted::new(&[0, 0]).pick(), None);
        assert_eq!(SmoothWeighted::new(&[]).pick(), None);
    }

    #[test]
    fn uneven_large_weights() {
        let n = shares(&[1_000_000, 1], 1_000_001);
        assert_eq!(n, vec![1_000_000, 1]);
    }
}
