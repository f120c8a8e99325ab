//! Seeds.
//!
//! A run has ONE seed. Every random choice draws from a generator seeded from it through
//! [`derive_seed`], with a separate stream per purpose (overlay, latencies, adversaries, each
//! node's own generator). Separate streams mean that changing how one part consumes randomness
//! (say, a node drawing one more number) leaves every other part of the run unchanged, and a
//! link's latency depends only on the seed and the two endpoints, not on the order in which
//! links are first used.

use rand::SeedableRng as _;
use rand::rngs::SmallRng;

/// One round of SplitMix64's output function: a bijective 64-bit mixer.
const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seed for stream `stream`, item `index`, of the run seeded with `seed`.
///
/// Distinct `(stream, index)` pairs give unrelated seeds (not cryptographically: this is for
/// simulation, not for keys that must stay secret).
pub const fn derive_seed(seed: u64, stream: u64, index: u64) -> u64 {
    let a = mix64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let b = mix64(a ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03));
    mix64(b ^ index.wrapping_mul(0x8cb9_2ba7_2f3d_8dd7))
}

/// A generator for stream `stream`, item `index`, of the run seeded with `seed`.
pub fn rng_for(seed: u64, stream: u64, index: u64) -> SmallRng {
    SmallRng::seed_from_u64(derive_seed(seed, stream, index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_and_items_differ() {
        let s = 42;
        let mut seen = std::collections::BTreeSet::new();
        for stream in 0..8 {
            for index in 0..256 {
                assert!(seen.insert(derive_seed(s, stream, index)));
            }
        }
        assert_ne!(derive_seed(1, 0, 0), derive_seed(2, 0, 0));
        assert_eq!(derive_seed(7, 3, 9), derive_seed(7, 3, 9));
    }
}
