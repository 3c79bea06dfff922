//! Endpoint balancing inside one backend set: locality priority levels,
//! the panic threshold, and the four algorithms.
//!
//! A [`View`] is built from the set's endpoints and their health whenever
//! that changes (ejection, expiry, health check, DNS); picks read the current
//! view without locks. Because a view can be a few milliseconds stale, every
//! pick also checks the chosen endpoint's live availability and draws again
//! when it was ejected in between.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rand::Rng;

use super::endpoint::EndpointStats;
use crate::config::{Algorithm, Locality, LocalityPolicy};

/// An endpoint as the set balances it.
#[derive(Debug, Clone)]
pub struct Member {
    pub stats: Arc<EndpointStats>,
    pub weight: u32,
}

/// Locality priority of an endpoint seen from this node: 0 same node,
/// 1 same zone, 2 same region, 3 elsewhere.
pub fn priority(local: &Locality, ep: &Locality) -> usize {
    let same =
        |a: &Option<String>, b: &Option<String>| matches!((a, b), (Some(x), Some(y)) if x == y);
    if same(&local.node, &ep.node) {
        0
    } else if same(&local.zone, &ep.zone) {
        1
    } else if same(&local.region, &ep.region) {
        2
    } else {
        3
    }
}

/// Endpoints of one priority level that may be picked.
#[derive(Debug)]
pub struct Level {
    /// Priority (0 same node .. 3 elsewhere); all levels in panic mode.
    pub priority: usize,
    /// Indexes into the view's members.
    pub members: Vec<u32>,
    cum_weight: Vec<u64>,
    total_weight: u64,
    uniform: bool,
    rr: AtomicU64,
    edf: Option<Mutex<Edf>>,
    alias: Option<super::sampling::AliasTable>,
    cycle: Option<super::sampling::WeightedCycle>,
    /// `members[i] == i` (every member, in order): skip the indirection,
    /// one cache miss less per pick on a large set.
    dense: bool,
}

/// Up to this many members, weighted round robin uses the EDF schedule
/// (smoothest interleaving, a heap under a lock); beyond, the lock-free
/// interleaved cycle (exact per cycle, O(1) per pick).
const EDF_MAX_MEMBERS: usize = 4096;

/// Earliest-deadline-first schedule for weighted round robin: each entry
/// is due again `1/weight` after it is picked, so over time every member is
/// picked in proportion to its weight, evenly spread.
#[derive(Debug)]
struct Edf {
    heap: BinaryHeap<Reverse<(u128, u32)>>,
    step: Vec<u128>,
}

const EDF_SCALE: u128 = 1 << 64;

impl Level {
    fn new(priority: usize, members: Vec<u32>, all: &[Member], algo: Algorithm) -> Level {
        let mut cum = Vec::with_capacity(members.len());
        let mut total = 0u64;
        for &m in &members {
            total += u64::from(all[m as usize].weight);
            cum.push(total);
        }
        let uniform = members
            .windows(2)
            .all(|w| all[w[0] as usize].weight == all[w[1] as usize].weight);
        let dense = members.iter().enumerate().all(|(i, &m)| m as usize == i);
        let weights: Vec<u32> = members.iter().map(|&m| all[m as usize].weight).collect();
        // O(1) weighted draws (exact, in integers) instead of a binary
        // search over cumulative weights.
        let alias = if uniform {
            None
        } else {
            super::sampling::AliasTable::new(&weights)
        };
        let weighted_rr = algo == Algorithm::RoundRobin && !uniform;
        let cycle = if weighted_rr && members.len() > EDF_MAX_MEMBERS {
            super::sampling::WeightedCycle::new(&weights)
        } else {
            None
        };
        let edf = (weighted_rr && members.len() <= EDF_MAX_MEMBERS).then(|| {
            let step: Vec<u128> = members
                .iter()
                .map(|&m| EDF_SCALE / u128::from(all[m as usize].weight.max(1)))
                .collect();
            let heap = step
                .iter()
                .enumerate()
                .map(|(i, s)| Reverse((*s, i as u32)))
                .collect();
            Mutex::new(Edf { heap, step })
        });
        Level {
            priority,
            members,
            cum_weight: cum,
            total_weight: total,
            uniform,
            rr: AtomicU64::new(0),
            edf,
            alias,
            cycle,
            dense,
        }
    }

    /// The view index of the member at `pos`.
    #[inline]
    fn member(&self, pos: usize) -> u32 {
        if self.dense {
            pos as u32
        } else {
            self.members[pos]
        }
    }

    /// A member position drawn with probability proportional to weight.
    #[inline]
    fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        let n = self.members.len();
        if self.uniform || n == 1 {
            return rng.random_range(0..n);
        }
        if let Some(a) = &self.alias {
            return a.sample(rng);
        }
        let r = rng.random_range(0..self.total_weight);
        self.cum_weight.partition_point(|c| *c <= r)
    }

    fn next_rr(&self) -> usize {
        let n = self.members.len();
        if let Some(c) = &self.cycle {
            return c.next();
        }
        match &self.edf {
            None => (self.rr.fetch_add(1, Ordering::Relaxed) % n as u64) as usize,
            Some(edf) => {
                let mut e = edf.lock().unwrap_or_else(|p| p.into_inner());
                let Some(Reverse((due, i))) = e.heap.pop() else {
                    return 0;
                };
                let step = e.step[i as usize];
                e.heap.push(Reverse((due + step, i)));
                i as usize
            }
        }
    }
}

/// A snapshot of what the set may pick from.
#[derive(Debug)]
pub struct View {
    pub members: Arc<Vec<Member>>,
    /// Non-empty levels with their share of load, in priority order.
    pub levels: Vec<Level>,
    /// Cumulative load per level, out of `LOAD_SCALE`.
    cum_load: Vec<u32>,
    /// Health is ignored: too few endpoints are healthy.
    pub panic: bool,
}

/// Loads are parts of this.
pub const LOAD_SCALE: u32 = 10_000;

impl View {
    /// Builds the view from the members and their current health.
    pub fn build(
        members: Arc<Vec<Member>>,
        local: &Locality,
        policy: &LocalityPolicy,
        algo: Algorithm,
    ) -> View {
        let mut by_level: [Vec<u32>; 4] = Default::default();
        let mut avail: [Vec<u32>; 4] = Default::default();
        for (i, m) in members.iter().enumerate() {
            let p = priority(local, &m.stats.locality);
            by_level[p].push(i as u32);
            if m.stats.available() {
                avail[p].push(i as u32);
            }
        }
        let of = policy.overprovisioning_factor;
        let health: Vec<f64> = (0..4)
            .map(|p| {
                if by_level[p].is_empty() {
                    0.0
                } else {
                    (of * avail[p].len() as f64 / by_level[p].len() as f64).min(1.0)
                }
            })
            .collect();
        let total_health: f64 = health.iter().sum::<f64>().min(1.0);
        let panic =
            !members.is_empty() && total_health * 100.0 < f64::from(policy.panic_threshold_percent);
        if panic || total_health == 0.0 {
            // Panic: every endpoint, health ignored, locality ignored.
            let all: Vec<u32> = (0..members.len() as u32).collect();
            if all.is_empty() {
                return View {
                    members,
                    levels: Vec::new(),
                    cum_load: Vec::new(),
                    panic: false,
                };
            }
            let levels = vec![Level::new(0, all, &members, algo)];
            return View {
                members,
                levels,
                cum_load: vec![LOAD_SCALE],
                panic: true,
            };
        }
        // Spill: each level takes what its (overprovisioned) health allows,
        // the rest goes to the next; scaled up if the total is below 100%.
        let mut remaining = 1.0f64;
        let mut loads = [0.0f64; 4];
        for p in 0..4 {
            loads[p] = health[p].min(remaining);
            remaining -= loads[p];
        }
        let sum: f64 = loads.iter().sum();
        let mut levels = Vec::new();
        let mut cum_load = Vec::new();
        let mut acc = 0u32;
        for p in 0..4 {
            if loads[p] <= 0.0 || avail[p].is_empty() {
                continue;
            }
            let share = ((loads[p] / sum) * f64::from(LOAD_SCALE)).round() as u32;
            if share == 0 {
                continue;
            }
            acc = (acc + share).min(LOAD_SCALE);
            levels.push(Level::new(p, std::mem::take(&mut avail[p]), &members, algo));
            cum_load.push(acc);
        }
        if let Some(last) = cum_load.last_mut() {
            *last = LOAD_SCALE;
        }
        View {
            members,
            levels,
            cum_load,
            panic: false,
        }
    }

    /// The share of load each priority gets, out of `LOAD_SCALE` (for
    /// metrics and tests).
    pub fn level_loads(&self) -> Vec<(usize, u32)> {
        let mut prev = 0;
        self.levels
            .iter()
            .zip(&self.cum_load)
            .map(|(l, c)| {
                let share = c - prev;
                prev = *c;
                (l.priority, share)
            })
            .collect()
    }

    /// Picks a member whose address is not in `tried`; returns its index
    /// in `members`.
    pub fn pick<R: Rng + ?Sized>(
        &self,
        algo: Algorithm,
        tried: &[std::net::SocketAddr],
        rng: &mut R,
    ) -> Option<u32> {
        if self.levels.is_empty() {
            return None;
        }
        let li = if self.levels.len() == 1 {
            0
        } else {
            let r = rng.random_range(0..LOAD_SCALE);
            self.cum_load
                .partition_point(|c| *c <= r)
                .min(self.levels.len() - 1)
        };
        // A few draws in the chosen level; they fail only when the view is
        // stale (ejection since it was built) or everything drawn was tried.
        let level = &self.levels[li];
        for _ in 0..4 {
            let pos = self.pick_in_level(level, algo, rng);
            let m = level.member(pos);
            let st = &self.members[m as usize].stats;
            if !tried.contains(&st.addr) && (self.panic || st.available()) {
                return Some(m);
            }
        }
        // Then any untried, available member, preferring the chosen level,
        // then the others in priority order.
        let ok = |m: &u32| {
            let st = &self.members[*m as usize].stats;
            !tried.contains(&st.addr) && (self.panic || st.available())
        };
        if let Some(m) = level.members.iter().find(|m| ok(m)) {
            return Some(*m);
        }
        self.levels
            .iter()
            .flat_map(|l| l.members.iter())
            .find(|m| ok(m))
            .copied()
    }

    #[inline]
    fn pick_in_level<R: Rng + ?Sized>(&self, level: &Level, algo: Algorithm, rng: &mut R) -> usize {
        let n = level.members.len();
        if n == 1 {
            return 0;
        }
        let member = |pos: usize| &self.members[level.member(pos) as usize];
        match algo {
            Algorithm::Random => level.sample(rng),
            Algorithm::RoundRobin => level.next_rr(),
            Algorithm::P2cPeakEwma => {
                // Weights decide how often an endpoint is a candidate; load
                // decides between the two candidates. With equal load the
                // first (weighted) draw wins, so idle traffic follows the
                // weights exactly.
                let (a, b) = two(level, rng);
                if member(a).stats.load_cost() <= member(b).stats.load_cost() {
                    a
                } else {
                    b
                }
            }
            Algorithm::LeastConnections => {
                // active / weight (as nginx's weighted least_conn), compared
                // without division; ties go by weight, so idle traffic
                // follows the weights.
                let better = |x: usize, y: usize| {
                    let (mx, my) = (member(x), member(y));
                    let cx = u128::from(mx.stats.active()) * u128::from(my.weight.max(1));
                    let cy = u128::from(my.stats.active()) * u128::from(mx.weight.max(1));
                    cx.cmp(&cy)
                };
                if n <= 16 {
                    // Exact, with ties broken at random so that sequential
                    // connections do not all land on the first endpoint.
                    // Weighted reservoir over the ties: each tied member
                    // ends up chosen with probability weight / tied weight.
                    let mut best = 0usize;
                    let mut tied_weight = u64::from(member(0).weight.max(1));
                    for pos in 1..n {
                        let w = u64::from(member(pos).weight.max(1));
                        match better(pos, best) {
                            std::cmp::Ordering::Less => {
                                best = pos;
                                tied_weight = w;
                            }
                            std::cmp::Ordering::Equal => {
                                tied_weight += w;
                                if rng.random_range(0..tied_weight) < w {
                                    best = pos;
                                }
                            }
                            std::cmp::Ordering::Greater => {}
                        }
                    }
                    best
                } else {
                    let (a, b) = two(level, rng);
                    if better(a, b) != std::cmp::Ordering::Greater {
                        a
                    } else {
                        b
                    }
                }
            }
        }
    }
}

/// Two distinct weighted draws (distinct whenever the level has two members).
#[inline]
fn two<R: Rng + ?Sized>(level: &Level, rng: &mut R) -> (usize, usize) {
    let a = level.sample(rng);
    let mut b = level.sample(rng);
    if b == a {
        b = level.sample(rng);
        if b == a {
            b = (a + 1) % level.members.len();
        }
    }
    (a, b)
}

/// A set's current view, swapped as health changes.
#[derive(Debug)]
pub struct ViewCell(ArcSwap<View>);

impl ViewCell {
    pub fn new(view: View) -> ViewCell {
        ViewCell(ArcSwap::from_pointee(view))
    }
    pub fn load(&self) -> arc_swap::Guard<Arc<View>> {
        self.0.load()
    }
    pub fn store(&self, view: View) {
        self.0.store(Arc::new(view));
    }
}
