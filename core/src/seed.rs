//! Seeds derived from a run's seed: everything random in training is a function of
//! (seed, stream, position), so a resumed run draws what the uninterrupted one would have.

/// 2^64 / φ, the odd constant of splitmix64 and Fibonacci hashing.
pub const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The seed of position `position` of stream `stream` of a run seeded `seed`:
/// `seed ^ stream ^ position * GOLDEN` (wrapping). Positions are spread over all 64 bits, so
/// neighbouring positions give unrelated generator states; `stream` (a small salt) keeps
/// two uses of the same positions apart. Position 0 of stream 0 is the seed itself.
pub fn derive(seed: u64, stream: u64, position: u64) -> u64 {
    seed ^ stream ^ position.wrapping_mul(GOLDEN)
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
