//! A small, fully specified PRNG (SplitMix64) so data order and synthetic content are identical
//! across platforms and crate versions; its state is one `u64`, trivially checkpointed.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rng {
    pub state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }
    /// A stream derived from a seed and a tag (split, index, source …).
    pub fn derive(seed: u64, tag: &[u64]) -> Self {
        let mut r = Rng::new(seed ^ 0x5851_F42D_4C95_7F2D);
        for t in tag {
            r.state ^= t.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            r.next_u64();
        }
        r
    }
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.f32()
    }
    /// Uniform integer in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// A seeded random permutation of `0..n` evaluated one position at a time, in O(1) memory: a
/// balanced Feistel network over the smallest even power of two ≥ `n`, cycle-walked back into
/// range (each walk step stays a bijection, so the result is a permutation of `0..n`). What a
/// shuffle of a billion-row dataset needs, where a shuffled index list would take 8 GB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 6],
}

impl Permutation {
    pub fn new(n: usize, seed: u64, tag: &[u64]) -> Self {
        let mut r = Rng::derive(seed, tag);
        let bits = (n.max(2) as u64 - 1).ilog2() + 1;
        Self {
            n: n as u64,
            half_bits: bits.div_ceil(2),
            keys: std::array::from_fn(|_| r.next_u64()),
        }
    }

    /// The element at `position` (< n).
    pub fn at(&self, position: usize) -> usize {
        debug_assert!((position as u64) < self.n.max(1));
        if self.n <= 1 {
            return position;
        }
        let mut x = position as u64;
        loop {
            x = self.encrypt(x);
            if x < self.n {
                return x as usize;
            }
        }
    }

    fn encrypt(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            let mut round = Rng::new(k ^ r);
            (l, r) = (r, (l ^ round.next_u64()) & mask);
        }
        (l << self.half_bits) | r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_seeded_bijection() {
        for n in [0usize, 1, 2, 3, 7, 64, 1000, 4097] {
            let p = Permutation::new(n, 5, &[1]);
            let mut seen: Vec<usize> = (0..n).map(|i| p.at(i)).collect();
            seen.sort();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
        let a: Vec<usize> = (0..1000)
            .map(|i| Permutation::new(1000, 5, &[1]).at(i))
            .collect();
        let b: Vec<usize> = (0..1000)
            .map(|i| Permutation::new(1000, 5, &[2]).at(i))
            .collect();
        assert_ne!(a, b);
        // Shuffled, not a rotation: few fixed points, and neighbours land far apart.
        assert!(a.iter().enumerate().filter(|(i, x)| i == *x).count() < 10);
        let near = a.windows(2).filter(|w| w[0].abs_diff(w[1]) < 10).count();
        assert!(near < 50, "{near} of 999 neighbours stay within 10");
    }
}
