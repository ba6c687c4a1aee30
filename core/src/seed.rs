//! Seeds derived from a run's seed: everything random in training is a function of
//! (seed, stream, position), so a resumed run draws what the uninterrupted one would have.
//! [`Rng`] is the one generator those seeds start.

/// 2^64 / φ, the odd constant of splitmix64 and Fibonacci hashing.
pub const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The seed of position `position` of stream `stream` of a run seeded `seed`:
/// `seed ^ stream ^ position * GOLDEN` (wrapping). Positions are spread over all 64 bits, so
/// neighbouring positions give unrelated generator states; `stream` (a small salt) keeps
/// two uses of the same positions apart. Position 0 of stream 0 is the seed itself.
pub fn derive(seed: u64, stream: u64, position: u64) -> u64 {
    seed ^ stream ^ position.wrapping_mul(GOLDEN)
}

/// xoshiro256** (Blackman and Vigna), its state seeded by splitmix64: fast, small, and the
/// same numbers everywhere.
#[derive(Clone, Debug)]
pub struct Rng {
    state: [u64; 4],
}

/// One splitmix64 step: advances `x` and returns the next output.
fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator whose stream is a function of `seed` only (state from splitmix64).
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        Rng {
            state: [
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
            ],
        }
    }

    /// The next 64 uniformly random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A Fisher-Yates permutation of 0..n drawn from this stream (data order, minibatches).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derive_is_the_spellings_it_replaces() {
        for seed in [0u64, 5, 0x5eed, u64::MAX] {
            for k in [0u64, 1, 2, 1000, u64::MAX] {
                // lathe sft: the order of epoch k and the dropout of micro-batch k.
                assert_eq!(
                    derive(seed, 0, k.wrapping_add(1)),
                    seed ^ k.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                );
                assert_eq!(
                    derive(seed, 0x5eed, k.wrapping_add(1)),
                    (seed ^ 0x5eed) ^ k.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                );
                // lathe ppo: the minibatch order after k steps.
                assert_eq!(
                    derive(seed, 0, k),
                    seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                );
            }
        }
    }
}
