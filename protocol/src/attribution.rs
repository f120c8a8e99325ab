//! Credit for one federated round: whose data made the model better, by how much, and what
//! each worker is paid for its compute.
//!
//! Everything here is arithmetic over numbers the caller measured; nothing trains, merges,
//! evaluates or reads a file. A round's coordinator, and `cohort ledger verify` recomputing its
//! entry, drive it in four steps:
//!
//! 1. [`group_shards`]: near-duplicate shards become one group. Shards with one content hash
//!    are one group; then MinHash over word shingles of the records' normalised text joins
//!    groups whose estimated Jaccard similarity reaches a threshold (transitively, by
//!    union-find). The Shapley value is not replication-robust: two copies of one shard each
//!    earn about what one copy earns alone, so splitting one source over many identities would
//!    raise its credit. Grouping first closes that door: the round values each group once (one
//!    update per group is the caller's concern) and **the members of a group split its value
//!    equally**.
//! 2. [`attribute`]: the Shapley value of each group in the game
//!    `v(S)` = validation-loss improvement of the round's start adapter plus the merge of the
//!    updates of coalition `S`; no retraining, the coalition's model is a merge (GTG-Shapley,
//!    Liu et al., ACM TIST 2022). Exact over all `2^n` coalitions ([`shapley_exact`]) up to a
//!    threshold, above it GTG-Shapley's truncated, guided permutation sampling
//!    ([`gtg_shapley`]). Either way the values sum to the round's gain `v(N) - v(∅)`.
//! 3. [`data_credits`]: a data budget split over groups in proportion to their positive values;
//!    harmful groups are flagged and earn nothing; near-zero groups earn nothing.
//! 4. [`compute_credits`]: a compute budget split over verified updates in proportion to the
//!    tokens they processed.
//!
//! Every random draw comes from [`SplitMix64`] seeded by the caller (GTG from the round id,
//! MinHash from [`GroupingConfig::default`]'s fixed seed), and every floating-point result is a
//! fixed sequence of IEEE operations, so every peer computes the same numbers. Amounts that reach
//! the ledger are integer [`Credit`]s split by largest remainder ([`split_budget`]), so parts sum
//! to their whole exactly.

use std::collections::HashMap;

use crate::hash::ContentHash;
use crate::rng::SplitMix64;
use crate::types::{ComputeCredit, Credit, CreditFlag};

/// Most players [`shapley_exact`] accepts: `2^20` coalitions, each evaluated once.
pub const MAX_EXACT_PLAYERS: usize = 20;

/// Why credit could not be computed. Each variant names the input that was wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AttributionError {
    /// Exact Shapley values were asked for too many players.
    #[error("exact Shapley values over {n} players: at most {max} (2^{max} coalitions)")]
    TooManyPlayers {
        /// The players asked for.
        n: usize,
        /// The most accepted.
        max: usize,
    },
    /// The value function returned NaN or an infinity.
    #[error("value function returned {value} for coalition {coalition:?}")]
    NonFiniteValue {
        /// The coalition's members, ascending.
        coalition: Vec<usize>,
        /// What it returned.
        value: f64,
    },
    /// A weight is negative, NaN or infinite.
    #[error("weight {index} is {weight}: weights must be finite and non-negative")]
    InvalidWeight {
        /// Its position.
        index: usize,
        /// The weight.
        weight: f64,
    },
    /// A non-zero budget over weights that are all zero (or no weights).
    #[error("cannot split {budget} over {count} weights that are all zero")]
    ZeroWeights {
        /// The budget.
        budget: Credit,
        /// How many weights there were.
        count: usize,
    },
    /// A budget to pay out is negative.
    #[error("{what} budget {budget} is negative")]
    NegativeBudget {
        /// Which budget.
        what: &'static str,
        /// The budget.
        budget: Credit,
    },
    /// Two inputs that must line up have different lengths.
    #[error("{what}: {got} entries, expected {expected}")]
    LengthMismatch {
        /// The input that is off.
        what: &'static str,
        /// The length it should have.
        expected: usize,
        /// The length it has.
        got: usize,
    },
    /// A shard names a group with no value.
    #[error("shard {shard} is in group {group}, but there are values for {groups} groups")]
    GroupOutOfRange {
        /// The shard's position.
        shard: usize,
        /// Its group.
        group: usize,
        /// How many group values there are.
        groups: usize,
    },
    /// A group value is NaN or infinite.
    #[error("group {group} has value {value}")]
    NonFiniteGroupValue {
        /// The group.
        group: usize,
        /// Its value.
        value: f64,
    },
    /// A group has a value but no shard.
    #[error("group {group} has a value but no shard")]
    EmptyGroup {
        /// The group.
        group: usize,
    },
    /// A configuration field is out of range.
    #[error("config field `{field}`: {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn bad_config(field: &'static str, reason: impl Into<String>) -> AttributionError {
    AttributionError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

fn fraction(field: &'static str, x: f64, below_one: bool) -> Result<(), AttributionError> {
    let ok = x.is_finite() && x >= 0.0 && (!below_one || x < 1.0);
    if ok {
        Ok(())
    } else if below_one {
        Err(bad_config(field, format!("{x} is outside 0 <= x < 1")))
    } else {
        Err(bad_config(
            field,
            format!("{x} is not a finite non-negative number"),
        ))
    }
}

fn finite_value(coalition: &[usize], value: f64) -> Result<f64, AttributionError> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(AttributionError::NonFiniteValue {
            coalition: coalition.to_vec(),
            value,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Shapley values
// ---------------------------------------------------------------------------------------------

/// Exact Shapley values of the `n`-player game `v`.
///
/// `v` is called once for each of the `2^n` coalitions (memoised by bitmask), with the members
/// in ascending order, `&[]` for the empty coalition. Player `i` gets
/// `Σ_{S ⊆ N∖{i}} |S|! (n-|S|-1)! / n! · (v(S ∪ {i}) - v(S))`, which sums to `v(N) - v(∅)` up to
/// rounding. Refuses `n >` [`MAX_EXACT_PLAYERS`] before calling `v`; `n = 0` gives no values.
pub fn shapley_exact(
    n: usize,
    v: impl FnMut(&[usize]) -> f64,
) -> Result<Vec<f64>, AttributionError> {
    exact_with_gain(n, v).map(|(values, _)| values)
}

/// Exact values and the gain `v(N) - v(∅)`.
fn exact_with_gain(
    n: usize,
    mut v: impl FnMut(&[usize]) -> f64,
) -> Result<(Vec<f64>, f64), AttributionError> {
    if n > MAX_EXACT_PLAYERS {
        return Err(AttributionError::TooManyPlayers {
            n,
            max: MAX_EXACT_PLAYERS,
        });
    }
    let size = 1usize << n;
    let mut table = Vec::with_capacity(size);
    let mut members = Vec::with_capacity(n);
    for mask in 0..size {
        members.clear();
        members.extend((0..n).filter(|&i| mask >> i & 1 == 1));
        table.push(finite_value(&members, v(&members))?);
    }
    // The weight of a coalition of size k not containing i: k! (n-1-k)! / n! = 1 / (n C(n-1, k)).
    let weights: Vec<f64> = (0..n)
        .map(|k| 1.0 / (n as f64 * binomial(n - 1, k) as f64))
        .collect();
    let mut values = vec![0.0; n];
    for (mask, &without) in table.iter().enumerate() {
        let k = mask.count_ones() as usize;
        for (i, value) in values.iter_mut().enumerate() {
            if mask >> i & 1 == 0 {
                *value += weights[k] * (table[mask | 1 << i] - without);
            }
        }
    }
    let gain = table[size - 1] - table[0];
    Ok((values, gain))
}

/// `C(m, k)` for `m <= 19`: exact in a `u64` at every step.
fn binomial(m: usize, k: usize) -> u64 {
    let k = k.min(m - k);
    (0..k as u64).fold(1u64, |c, j| c * (m as u64 - j) / (j + 1))
}

/// Settings of [`gtg_shapley`]. Tolerances are fractions of the round's gain `|v(N) - v(∅)|`
/// except `between_round_tol`, which is in the value function's unit (nats).
#[derive(Debug, Clone, PartialEq)]
pub struct GtgConfig {
    /// Most permutations sampled, whether or not the estimate has converged. At least 1.
    pub max_permutations: usize,
    /// Convergence: the estimate is checked after every `n` permutations (one guided cycle, in
    /// which each player leads once) and sampling stops when no player's value moved by more
    /// than `convergence_tol · |gain|` since the previous check. 0 disables the early stop.
    /// (The scale is the gain rather than each value, so a value near 0 cannot keep sampling
    /// going; this rule is ours, not the paper's.)
    pub convergence_tol: f64,
    /// Within-round truncation: once `|v(N) - v(prefix)| < truncation_tol · |gain|`, the rest of
    /// the permutation's marginals are taken as 0 and not evaluated. 0 disables it; below 1.
    pub truncation_tol: f64,
    /// Between-round truncation: if `|v(N) - v(∅)|` is below this many nats, the round counts
    /// as having no gain and every value is 0.
    pub between_round_tol: f64,
}

impl Default for GtgConfig {
    /// 500 permutations at most, convergence at 1% of the gain per cycle, truncation at 1% of
    /// the gain, no credit for a round that gained under a micro-nat.
    fn default() -> Self {
        Self {
            max_permutations: 500,
            convergence_tol: 0.01,
            truncation_tol: 0.01,
            between_round_tol: 1e-6,
        }
    }
}

impl GtgConfig {
    fn validate(&self) -> Result<(), AttributionError> {
        if self.max_permutations == 0 {
            return Err(bad_config("max_permutations", "must be at least 1"));
        }
        fraction("convergence_tol", self.convergence_tol, false)?;
        fraction("truncation_tol", self.truncation_tol, true)?;
        fraction("between_round_tol", self.between_round_tol, false)
    }
}

/// What [`gtg_shapley`] estimated and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct GtgOutcome {
    /// One value per player, summing to `gain`.
    pub values: Vec<f64>,
    /// `v(N) - v(∅)`, or 0 when the round was truncated (`between_round_truncated`).
    pub gain: f64,
    /// Permutations sampled: the sample count the ledger records.
    pub permutations: usize,
    /// Distinct coalitions evaluated, `∅` and `N` included.
    pub evaluations: usize,
    /// Whether sampling stopped by the convergence rule rather than at `max_permutations`.
    pub converged: bool,
    /// Whether the round's gain was below `between_round_tol`, so nothing was sampled.
    pub between_round_truncated: bool,
}

/// Coalition values memoised by membership bitset; `evaluations` counts the distinct ones.
struct Coalitions<F> {
    v: F,
    n: usize,
    seen: HashMap<Vec<u64>, f64>,
    members: Vec<usize>,
}

impl<F: FnMut(&[usize]) -> f64> Coalitions<F> {
    fn new(n: usize, v: F) -> Self {
        Self {
            v,
            n,
            seen: HashMap::new(),
            members: Vec::with_capacity(n),
        }
    }

    fn value(&mut self, bits: &[u64]) -> Result<f64, AttributionError> {
        if let Some(&x) = self.seen.get(bits) {
            return Ok(x);
        }
        self.members.clear();
        self.members
            .extend((0..self.n).filter(|&i| bits[i / 64] >> (i % 64) & 1 == 1));
        let x = finite_value(&self.members, (self.v)(&self.members))?;
        self.seen.insert(bits.to_vec(), x);
        Ok(x)
    }

    fn evaluations(&self) -> usize {
        self.seen.len()
    }
}

/// A uniform draw from `0..bound` (`bound >= 1`): the high word of a 64×64-bit product.
fn below(rng: &mut SplitMix64, bound: usize) -> usize {
    ((u128::from(rng.next_u64()) * bound as u128) >> 64) as usize
}

/// GTG-Shapley (Liu et al., "GTG-Shapley: Efficient and Accurate Participant Contribution
/// Evaluation in Federated Learning", ACM TIST 2022): Monte Carlo permutation sampling of the
/// Shapley values of the `n`-player game `v`, seeded by `seed` (derive it from the round id).
///
/// - Between-round truncation: `v(∅)` and `v(N)` are evaluated first; if the gain is below
///   [`GtgConfig::between_round_tol`], every value is 0 and the outcome's gain is 0.
/// - Guided sampling: permutation `k` puts player `k mod n` first and shuffles the rest
///   (Fisher-Yates over [`SplitMix64`]), so every player leads equally often.
/// - Within-round truncation: walking a permutation, once the prefix is within
///   [`GtgConfig::truncation_tol`] of `v(N)` the remaining marginals are 0, not evaluated.
/// - Stop: convergence per [`GtgConfig::convergence_tol`], or `max_permutations`.
/// - Every coalition is evaluated at most once (memoised), so `evaluations` is the real cost.
///
/// A player's value is the mean of its marginals over the permutations. Truncation leaves the
/// sum a little off the gain, so the values are rescaled (or, if the sum's sign disagrees with
/// the gain's, shifted equally) to sum to `v(N) - v(∅)`; the last rounding residue goes to the
/// largest value.
pub fn gtg_shapley(
    n: usize,
    v: impl FnMut(&[usize]) -> f64,
    config: &GtgConfig,
    seed: u64,
) -> Result<GtgOutcome, AttributionError> {
    config.validate()?;
    let mut outcome = GtgOutcome {
        values: vec![0.0; n],
        gain: 0.0,
        permutations: 0,
        evaluations: 0,
        converged: false,
        between_round_truncated: false,
    };
    if n == 0 {
        outcome.converged = true;
        return Ok(outcome);
    }
    let words = n.div_ceil(64);
    let mut coalitions = Coalitions::new(n, v);
    let mut bits = vec![0u64; words];
    let empty = coalitions.value(&bits)?;
    for i in 0..n {
        bits[i / 64] |= 1 << (i % 64);
    }
    let full = coalitions.value(&bits)?;
    let gain = full - empty;
    if gain.abs() < config.between_round_tol {
        outcome.evaluations = coalitions.evaluations();
        outcome.between_round_truncated = true;
        return Ok(outcome);
    }

    let truncate_below = config.truncation_tol * gain.abs();
    let converge_below = config.convergence_tol * gain.abs();
    let mut rng = SplitMix64::new(seed);
    let mut sums = vec![0.0; n];
    let mut permutation: Vec<usize> = Vec::with_capacity(n);
    let mut last_check: Option<Vec<f64>> = None;
    let mut k = 0;
    while k < config.max_permutations {
        let lead = k % n;
        permutation.clear();
        permutation.push(lead);
        permutation.extend((0..n).filter(|&i| i != lead));
        for i in (2..n).rev() {
            let j = 1 + below(&mut rng, i);
            permutation.swap(i, j);
        }

        bits.fill(0);
        let mut before = empty;
        for &p in &permutation {
            if (full - before).abs() < truncate_below {
                break;
            }
            bits[p / 64] |= 1 << (p % 64);
            let after = coalitions.value(&bits)?;
            sums[p] += after - before;
            before = after;
        }
        k += 1;

        if config.convergence_tol > 0.0 && k % n == 0 {
            let means: Vec<f64> = sums.iter().map(|s| s / k as f64).collect();
            if let Some(previous) = &last_check {
                let moved = means
                    .iter()
                    .zip(previous)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                if moved <= converge_below {
                    outcome.converged = true;
                    break;
                }
            }
            last_check = Some(means);
        }
    }

    outcome.values = sums.iter().map(|s| s / k as f64).collect();
    make_efficient(&mut outcome.values, gain);
    outcome.gain = gain;
    outcome.permutations = k;
    outcome.evaluations = coalitions.evaluations();
    Ok(outcome)
}

/// Makes `values` sum to `gain`: rescale when the sum is within half the gain of it (the usual
/// case: truncation loses a sliver), else shift every value equally; then put the rounding
/// residue on the value of largest magnitude.
fn make_efficient(values: &mut [f64], gain: f64) {
    if values.is_empty() {
        return;
    }
    let sum: f64 = values.iter().sum();
    if sum != gain {
        let same_sign = (sum > 0.0 && gain > 0.0) || (sum < 0.0 && gain < 0.0);
        if same_sign && (sum - gain).abs() <= 0.5 * gain.abs() {
            let scale = gain / sum;
            values.iter_mut().for_each(|x| *x *= scale);
        } else {
            let shift = (gain - sum) / values.len() as f64;
            values.iter_mut().for_each(|x| *x += shift);
        }
    }
    let sum: f64 = values.iter().sum();
    let largest = (0..values.len()).fold(0, |best, i| {
        if values[i].abs() > values[best].abs() {
            i
        } else {
            best
        }
    });
    values[largest] += gain - sum;
}

/// How [`attribute`] computed its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// [`shapley_exact`] over all coalitions.
    Exact,
    /// [`gtg_shapley`] sampling.
    Gtg,
}

/// Settings of [`attribute`].
#[derive(Debug, Clone, PartialEq)]
pub struct AttributionConfig {
    /// Exact Shapley values up to this many players, GTG-Shapley above; at most
    /// [`MAX_EXACT_PLAYERS`].
    pub exact_max_players: usize,
    /// The sampler's settings.
    pub gtg: GtgConfig,
}

impl Default for AttributionConfig {
    /// Exact up to 10 players (1,024 coalitions), default [`GtgConfig`] above.
    fn default() -> Self {
        Self {
            exact_max_players: 10,
            gtg: GtgConfig::default(),
        }
    }
}

/// A round's Shapley values and how they were obtained.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribution {
    /// One value per player (group of shards), summing to `gain`.
    pub values: Vec<f64>,
    /// The round's gain `v(N) - v(∅)`; 0 if GTG truncated the round.
    pub gain: f64,
    /// Exact or sampled.
    pub method: Method,
    /// Permutations sampled (0 for exact).
    pub permutations: usize,
    /// Distinct coalitions evaluated.
    pub evaluations: usize,
}

/// The Shapley values of the round's `n` groups under `v`: exact when
/// `n <= config.exact_max_players`, else GTG-Shapley seeded by `seed`. The values sum to the
/// returned gain (exact values are nudged by at most a few ulps to make that so).
pub fn attribute(
    n: usize,
    v: impl FnMut(&[usize]) -> f64,
    config: &AttributionConfig,
    seed: u64,
) -> Result<Attribution, AttributionError> {
    if config.exact_max_players > MAX_EXACT_PLAYERS {
        return Err(bad_config(
            "exact_max_players",
            format!(
                "{} is more than {MAX_EXACT_PLAYERS}",
                config.exact_max_players
            ),
        ));
    }
    if n <= config.exact_max_players {
        let (mut values, gain) = exact_with_gain(n, v)?;
        make_efficient(&mut values, gain);
        return Ok(Attribution {
            values,
            gain,
            method: Method::Exact,
            permutations: 0,
            evaluations: 1 << n,
        });
    }
    let outcome = gtg_shapley(n, v, &config.gtg, seed)?;
    Ok(Attribution {
        values: outcome.values,
        gain: outcome.gain,
        method: Method::Gtg,
        permutations: outcome.permutations,
        evaluations: outcome.evaluations,
    })
}

// ---------------------------------------------------------------------------------------------
// Near-duplicate grouping
// ---------------------------------------------------------------------------------------------

/// One shard as the grouping sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardText {
    /// The shard's content hash: equal hashes are always one group.
    pub hash: ContentHash,
    /// The text of its records.
    pub records: Vec<String>,
}

/// Settings of [`group_shards`]. Every peer must use the same ones to compute the same credit.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupingConfig {
    /// Seed of the MinHash functions.
    pub seed: u64,
    /// LSH bands; the signature has `bands · rows` hash functions.
    pub bands: usize,
    /// Rows per band.
    pub rows: usize,
    /// Words per shingle; a record with fewer words is one shingle.
    pub shingle_words: usize,
    /// Shards whose estimated Jaccard similarity is at least this are joined; in `(0, 1]`.
    pub threshold: f64,
}

impl Default for GroupingConfig {
    /// 128 hash functions in 32 bands of 4 (a pair at Jaccard 0.8 is missed as a candidate with
    /// probability `(1 - 0.8^4)^32 ≈ 5e-8`), 3-word shingles, threshold 0.8, a fixed seed.
    fn default() -> Self {
        Self {
            // "cohortmh" in ASCII.
            seed: 0x636f_686f_7274_6d68,
            bands: 32,
            rows: 4,
            shingle_words: 3,
            threshold: 0.8,
        }
    }
}

impl GroupingConfig {
    fn validate(&self) -> Result<(), AttributionError> {
        if self.bands == 0 {
            return Err(bad_config("bands", "must be at least 1"));
        }
        if self.rows == 0 {
            return Err(bad_config("rows", "must be at least 1"));
        }
        if self.bands.checked_mul(self.rows).is_none_or(|h| h > 4096) {
            return Err(bad_config("rows", "bands · rows must be at most 4096"));
        }
        if self.shingle_words == 0 {
            return Err(bad_config("shingle_words", "must be at least 1"));
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(bad_config(
                "threshold",
                format!("{} is outside 0 < x <= 1", self.threshold),
            ));
        }
        Ok(())
    }

    /// The keys of the MinHash functions `h_j(x) = SplitMix64(x ^ key_j)`'s first output.
    fn keys(&self) -> Vec<u64> {
        let mut rng = SplitMix64::new(self.seed);
        (0..self.bands * self.rows)
            .map(|_| rng.next_u64())
            .collect()
    }
}

/// One step of SplitMix64 from `x`: a bijective 64-bit mix.
fn mix(x: u64) -> u64 {
    SplitMix64::new(x).next_u64()
}

/// The distinct shingle hashes of `records`: each record is lowercased and split into words at
/// every character that is not alphanumeric; every `shingle_words` consecutive words of one
/// record (never across records) are one shingle. Sorted.
fn shingles(records: &[String], shingle_words: usize) -> Vec<u64> {
    let mut out = Vec::new();
    let mut words: Vec<u64> = Vec::new();
    for record in records {
        words.clear();
        words.extend(
            record
                .split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty())
                .map(|w| {
                    let h = ContentHash::of(w.to_lowercase().as_bytes());
                    let mut first = [0u8; 8];
                    first.copy_from_slice(&h.as_bytes()[..8]);
                    u64::from_le_bytes(first)
                }),
        );
        if words.is_empty() {
            continue;
        }
        let width = shingle_words.min(words.len());
        out.extend(
            words
                .windows(width)
                .map(|w| w.iter().fold(width as u64, |acc, &h| mix(acc ^ h))),
        );
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The MinHash signature of `records` under `config` (`bands · rows` values), or `None` if the
/// records hold no word at all.
pub fn minhash_signature(
    records: &[String],
    config: &GroupingConfig,
) -> Result<Option<Vec<u64>>, AttributionError> {
    config.validate()?;
    Ok(signature(records, config, &config.keys()))
}

fn signature(records: &[String], config: &GroupingConfig, keys: &[u64]) -> Option<Vec<u64>> {
    let shingles = shingles(records, config.shingle_words);
    if shingles.is_empty() {
        return None;
    }
    Some(
        keys.iter()
            .map(|&key| {
                shingles
                    .iter()
                    .map(|&x| mix(x ^ key))
                    .fold(u64::MAX, u64::min)
            })
            .collect(),
    )
}

/// The Jaccard similarity two MinHash signatures estimate: the fraction of positions where they
/// agree (0 for signatures of different lengths or empty ones).
pub fn estimated_jaccard(a: &[u64], b: &[u64]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

/// Union-find over shard indices; the root of a set is its smallest member.
struct Sets(Vec<usize>);

impl Sets {
    fn root(&mut self, mut i: usize) -> usize {
        while self.0[i] != i {
            self.0[i] = self.0[self.0[i]];
            i = self.0[i];
        }
        i
    }

    fn join(&mut self, a: usize, b: usize) {
        let (a, b) = (self.root(a), self.root(b));
        let (low, high) = if a < b { (a, b) } else { (b, a) };
        self.0[high] = low;
    }
}

/// Groups near-duplicate shards: returns a group id per shard, dense from 0 in order of each
/// group's first shard.
///
/// Shards with equal [`ShardText::hash`] are one group. Then each shard's MinHash signature
/// ([`minhash_signature`]) is cut into bands; shards sharing a band are candidates, and a
/// candidate pair whose [`estimated_jaccard`] is at least `config.threshold` is joined. Joining
/// is transitive: A near B and B near C puts A and C in one group. Shards without any word join
/// only by hash. The round computes one Shapley value per group, and a group's members split it
/// equally ([`data_credits`]).
pub fn group_shards(
    shards: &[ShardText],
    config: &GroupingConfig,
) -> Result<Vec<usize>, AttributionError> {
    config.validate()?;
    let mut sets = Sets((0..shards.len()).collect());

    let mut by_hash: HashMap<ContentHash, usize> = HashMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let first = *by_hash.entry(shard.hash).or_insert(i);
        sets.join(first, i);
    }

    let keys = config.keys();
    let signatures: Vec<Option<Vec<u64>>> = shards
        .iter()
        .map(|s| signature(&s.records, config, &keys))
        .collect();
    let mut buckets: HashMap<(usize, u64), Vec<usize>> = HashMap::new();
    for (i, sig) in signatures.iter().enumerate() {
        let Some(sig) = sig else { continue };
        for (band, rows) in sig.chunks(config.rows).enumerate() {
            let key = rows.iter().fold(band as u64, |acc, &r| mix(acc ^ r));
            buckets.entry((band, key)).or_default().push(i);
        }
    }
    for members in buckets.values() {
        for (x, &a) in members.iter().enumerate() {
            for &b in &members[x + 1..] {
                if sets.root(a) == sets.root(b) {
                    continue;
                }
                if let (Some(sa), Some(sb)) = (&signatures[a], &signatures[b])
                    && estimated_jaccard(sa, sb) >= config.threshold
                {
                    sets.join(a, b);
                }
            }
        }
    }

    let mut ids: HashMap<usize, usize> = HashMap::new();
    Ok((0..shards.len())
        .map(|i| {
            let root = sets.root(i);
            let next = ids.len();
            *ids.entry(root).or_insert(next)
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Credit arithmetic
// ---------------------------------------------------------------------------------------------

/// `nats` as a [`Credit`]: rounded to the nearest nano-nat, saturating at `i64`'s range; NaN
/// is 0.
pub fn nats_to_credit(nats: f64) -> Credit {
    // `as` from f64 to i64 saturates and maps NaN to 0.
    Credit((nats * Credit::UNITS_PER_NAT as f64).round() as i64)
}

/// Splits `budget` by integer weights by largest remainder: part `i` is `⌊|budget| w_i / W⌋`
/// plus one for the `|budget| - Σ⌊…⌋` largest remainders (ties to the lower index), with
/// `budget`'s sign. Needs `Σw > 0` unless `budget` is 0.
fn split_integer(budget: Credit, weights: &[u64]) -> Result<Vec<Credit>, AttributionError> {
    let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    if budget.0 == 0 {
        return Ok(vec![Credit(0); weights.len()]);
    }
    if total == 0 {
        return Err(AttributionError::ZeroWeights {
            budget,
            count: weights.len(),
        });
    }
    let whole = u128::from(budget.0.unsigned_abs());
    let mut parts: Vec<u128> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(weights.len());
    for (i, &w) in weights.iter().enumerate() {
        // |budget| < 2^64 and w < 2^64, so the product fits in a u128.
        let share = whole * u128::from(w);
        parts.push(share / total);
        remainders.push((share % total, i));
    }
    let left = whole - parts.iter().sum::<u128>();
    remainders.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take(left as usize) {
        parts[i] += 1;
    }
    let sign: i128 = if budget.0 < 0 { -1 } else { 1 };
    // Each part is at most |budget| <= 2^63, with budget's sign, so it fits in an i64.
    Ok(parts
        .into_iter()
        .map(|p| Credit(i64::try_from(sign * p as i128).unwrap_or(budget.0)))
        .collect())
}

/// Splits `budget` in proportion to `weights` so that the parts sum **exactly** to `budget`
/// (largest remainder, Hamilton's method; ties go to the lower index, so the split is
/// deterministic). A negative budget splits its magnitude and negates the parts. A zero weight
/// gets a zero part.
///
/// Weights must be finite and non-negative, and not all zero unless the budget is 0. They are
/// first quantised to integers relative to the largest (`⌊w / max · 2^53⌋`), so a weight below
/// `2^-53` of the largest counts as 0; from there the arithmetic is exact integer arithmetic.
pub fn split_budget(budget: Credit, weights: &[f64]) -> Result<Vec<Credit>, AttributionError> {
    if let Some((index, &weight)) = weights
        .iter()
        .enumerate()
        .find(|(_, w)| !(w.is_finite() && **w >= 0.0))
    {
        return Err(AttributionError::InvalidWeight { index, weight });
    }
    let max = weights.iter().copied().fold(0.0, f64::max);
    let scale = (1u64 << 53) as f64;
    let quantised: Vec<u64> = weights
        .iter()
        .map(|&w| {
            if max > 0.0 {
                (w / max * scale) as u64
            } else {
                0
            }
        })
        .collect();
    split_integer(budget, &quantised)
}

/// Settings of [`data_credits`].
#[derive(Debug, Clone, PartialEq)]
pub struct CreditConfig {
    /// A group whose `|value|` is at most `near_zero` times the mean `|value|` of the round's
    /// groups (`Σ_g |value_g| / groups`) is near-zero: it earns nothing and is not flagged
    /// harmful. The mean absolute value is the scale of a typical group's contribution: unlike
    /// the gain it is not small when helpful and harmful groups cancel out, and unlike the
    /// total it does not grow with the number of groups (at a thousand groups 0.1% of the total
    /// is about one group's whole value).
    pub near_zero: f64,
}

impl Default for CreditConfig {
    /// Near-zero below 5% of the mean absolute group value.
    fn default() -> Self {
        Self { near_zero: 0.05 }
    }
}

/// One shard's data credit for a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardAward {
    /// Its group (from [`group_shards`]).
    pub group: usize,
    /// Its equal share of its group's Shapley value, in nano-nats; negative for harmful data.
    /// This is what [`crate::types::ShardCredit::value`] records.
    pub value: Credit,
    /// Its share of the data budget; never negative, 0 if harmful or near-zero.
    pub earned: Credit,
    /// [`CreditFlag::Harmful`] for a harmful group (first: it outranks duplication), else
    /// [`CreditFlag::Duplicate`] naming the group's smallest hash when the group has more than
    /// one shard, else [`CreditFlag::Normal`].
    pub flag: CreditFlag,
}

/// Data credit per shard.
///
/// `shards[s]` is shard `s`'s content hash and `groups[s]` its group; `group_values[g]` is group
/// `g`'s Shapley value in nats (from [`attribute`]); every group must have a shard. A group is
///
/// - **harmful** if its value is below `-near_zero · mean|value|` ([`CreditConfig`]): flagged
///   [`CreditFlag::Harmful`], earns 0, and records its (negative) value;
/// - **near-zero** if its `|value|` is at most that: earns 0;
/// - **positive** otherwise: the positive groups split `budget` in proportion to their values
///   ([`split_budget`]).
///
/// Within a group the members split the group's value and its earnings equally, the remainder
/// (in nano-nats) going one unit each to the first members in shard order; a group of more
/// than one shard is flagged [`CreditFlag::Duplicate`]. If no group is positive, **the data
/// budget is not paid**: every `earned` is 0. Otherwise the `earned` sum exactly to `budget`.
pub fn data_credits(
    budget: Credit,
    shards: &[ContentHash],
    groups: &[usize],
    group_values: &[f64],
    config: &CreditConfig,
) -> Result<Vec<ShardAward>, AttributionError> {
    fraction("near_zero", config.near_zero, true)?;
    if budget.0 < 0 {
        return Err(AttributionError::NegativeBudget {
            what: "data",
            budget,
        });
    }
    if groups.len() != shards.len() {
        return Err(AttributionError::LengthMismatch {
            what: "groups (one per shard)",
            expected: shards.len(),
            got: groups.len(),
        });
    }
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); group_values.len()];
    for (shard, &group) in groups.iter().enumerate() {
        members
            .get_mut(group)
            .ok_or(AttributionError::GroupOutOfRange {
                shard,
                group,
                groups: group_values.len(),
            })?
            .push(shard);
    }
    for (group, &value) in group_values.iter().enumerate() {
        if !value.is_finite() {
            return Err(AttributionError::NonFiniteGroupValue { group, value });
        }
        if members[group].is_empty() {
            return Err(AttributionError::EmptyGroup { group });
        }
    }

    let scale: f64 = group_values.iter().map(|v| v.abs()).sum();
    // Relative to a typical group, not to the total: with a thousand groups a share of the
    // total is about one group's whole value, which would zero honest shards.
    let threshold = config.near_zero * scale / group_values.len().max(1) as f64;
    let weights: Vec<f64> = group_values
        .iter()
        .map(|&v| if v > threshold { v } else { 0.0 })
        .collect();
    let group_earned = if weights.iter().any(|&w| w > 0.0) {
        split_budget(budget, &weights)?
    } else {
        vec![Credit(0); group_values.len()]
    };

    let mut awards: Vec<Option<ShardAward>> = vec![None; shards.len()];
    for (group, shards_in_group) in members.iter().enumerate() {
        let value = group_values[group];
        let flag = if value < -threshold {
            CreditFlag::Harmful
        } else if shards_in_group.len() > 1 {
            let smallest = shards_in_group.iter().map(|&s| shards[s]).min();
            smallest.map_or(CreditFlag::Normal, |group| CreditFlag::Duplicate { group })
        } else {
            CreditFlag::Normal
        };
        let equal = vec![1; shards_in_group.len()];
        let values = split_integer(nats_to_credit(value), &equal)?;
        let earned = split_integer(group_earned[group], &equal)?;
        for (x, &s) in shards_in_group.iter().enumerate() {
            awards[s] = Some(ShardAward {
                group,
                value: values[x],
                earned: earned[x],
                flag,
            });
        }
    }
    // Every shard is in exactly one group, so every slot was filled.
    Ok(awards.into_iter().flatten().collect())
}

/// Compute credit per update: `budget` split in proportion to the tokens of the verified
/// updates (exactly, by largest remainder); an update that failed verification gets 0. If no
/// verified update processed a token, **the compute budget is not paid**: every part is 0.
pub fn compute_credits(
    budget: Credit,
    updates: &[ComputeCredit],
) -> Result<Vec<Credit>, AttributionError> {
    if budget.0 < 0 {
        return Err(AttributionError::NegativeBudget {
            what: "compute",
            budget,
        });
    }
    let tokens: Vec<u64> = updates
        .iter()
        .map(|u| if u.verified { u.tokens } else { 0 })
        .collect();
    if tokens.iter().all(|&t| t == 0) {
        return Ok(vec![Credit(0); updates.len()]);
    }
    split_integer(budget, &tokens)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;
    use crate::identity::Keypair;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    fn assert_values(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(close(*g, *w, tol), "player {i}: got {g}, want {w}");
        }
    }

    // -- exact Shapley against closed forms ----------------------------------------------------

    #[test]
    fn attribution_exact_additive_game_gives_the_weights() {
        let w = [0.3, -0.1, 0.7, 0.0, 1.25];
        let values = shapley_exact(5, |s| s.iter().map(|&i| w[i]).sum::<f64>() + 2.0).unwrap();
        assert_values(&values, &w, 1e-12);
    }

    #[test]
    fn attribution_exact_glove_game() {
        // Players 0 and 1 hold left gloves, player 2 a right glove; a pair is worth 1.
        // Closed form: the right glove gets 2/3, each left glove 1/6.
        let glove = |s: &[usize]| {
            let left = s.iter().filter(|&&i| i < 2).count();
            let right = s.iter().filter(|&&i| i == 2).count();
            left.min(right) as f64
        };
        let values = shapley_exact(3, glove).unwrap();
        assert_values(&values, &[1.0 / 6.0, 1.0 / 6.0, 2.0 / 3.0], 1e-12);
    }

    #[test]
    fn attribution_exact_symmetric_majority_and_unanimity_games() {
        // Majority of 5: symmetric, so each gets 1/5.
        let majority = shapley_exact(5, |s| f64::from(u8::from(s.len() >= 3))).unwrap();
        assert_values(&majority, &[0.2; 5], 1e-12);
        // Unanimity on T = {0, 2, 3} among 6: 1/|T| for each member of T, 0 for the rest.
        let unanimity = shapley_exact(6, |s| {
            f64::from(u8::from([0, 2, 3].iter().all(|t| s.contains(t))))
        })
        .unwrap();
        let third = 1.0 / 3.0;
        assert_values(&unanimity, &[third, 0.0, third, third, 0.0, 0.0], 1e-12);
    }

    #[test]
    fn attribution_exact_weighted_voting_game() {
        // Quota 3 with weights (2, 1, 1): player 0 is pivotal in 4 of the 6 orders.
        let w = [2, 1, 1];
        let values = shapley_exact(3, |s| {
            f64::from(u8::from(s.iter().map(|&i| w[i]).sum::<i32>() >= 3))
        })
        .unwrap();
        assert_values(&values, &[2.0 / 3.0, 1.0 / 6.0, 1.0 / 6.0], 1e-12);
    }

    #[test]
    fn attribution_exact_dummy_player_gets_zero() {
        // v(S) = |S ∖ {3}|^2 over 5 players: player 3 is a dummy; the other four are symmetric
        // and share v(N) = 16, so each gets 4.
        let values = shapley_exact(5, |s| {
            let k = s.iter().filter(|&&i| i != 3).count() as f64;
            k * k
        })
        .unwrap();
        assert_values(&values, &[4.0, 4.0, 4.0, 0.0, 4.0], 1e-12);
    }

    #[test]
    fn attribution_exact_evaluates_each_coalition_once() {
        let mut seen = HashSet::new();
        let values = shapley_exact(7, |s| {
            assert!(seen.insert(s.to_vec()), "{s:?} evaluated twice");
            assert!(s.windows(2).all(|w| w[0] < w[1]));
            s.len() as f64
        })
        .unwrap();
        assert_eq!(seen.len(), 128);
        assert_values(&values, &[1.0; 7], 1e-12);
        assert_eq!(shapley_exact(0, |_| 1.0).unwrap(), Vec::<f64>::new());
    }

    #[test]
    fn attribution_exact_refuses_too_many_players_and_bad_values() {
        let mut calls = 0;
        let err = shapley_exact(21, |_| {
            calls += 1;
            0.0
        })
        .unwrap_err();
        assert_eq!(err, AttributionError::TooManyPlayers { n: 21, max: 20 });
        assert_eq!(calls, 0);
        let err = shapley_exact(3, |s| if s == [0, 2] { f64::NAN } else { 1.0 }).unwrap_err();
        assert!(
            matches!(err, AttributionError::NonFiniteValue { ref coalition, .. } if coalition == &[0, 2]),
            "{err}"
        );
    }

    /// A non-additive game on 8 players: diminishing returns, a complementary pair (0, 1), and a
    /// harmful player 7.
    fn game(s: &[usize]) -> f64 {
        const W: [f64; 8] = [0.4, 0.1, 0.3, 0.2, 0.05, 0.25, 0.15, 0.0];
        let mass: f64 = s.iter().map(|&i| W[i]).sum();
        let pair = f64::from(u8::from(s.contains(&0) && s.contains(&1)));
        let harm = f64::from(u8::from(s.contains(&7)));
        1.0 - (-mass).exp() + 0.3 * pair - 0.2 * harm + 0.5
    }

    fn gain_of_game() -> f64 {
        game(&[0, 1, 2, 3, 4, 5, 6, 7]) - game(&[])
    }

    #[test]
    fn attribution_exact_is_efficient() {
        let values = shapley_exact(8, game).unwrap();
        let sum: f64 = values.iter().sum();
        assert!(close(sum, gain_of_game(), 1e-12), "{sum}");
        assert!(close(values[7], -0.2, 1e-12));
    }

    // -- GTG-Shapley ---------------------------------------------------------------------------

    fn sampling(max_permutations: usize) -> GtgConfig {
        GtgConfig {
            max_permutations,
            convergence_tol: 0.0,
            ..GtgConfig::default()
        }
    }

    fn mean_abs_error(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len() as f64
    }

    /// Means over seeds 0..20 of GTG's mean absolute error against exact on [`game`], and of
    /// its coalition evaluations.
    fn gtg_error(max_permutations: usize) -> (f64, f64) {
        gtg_error_with(&sampling(max_permutations))
    }

    fn gtg_error_with(config: &GtgConfig) -> (f64, f64) {
        let max_permutations = config.max_permutations;
        let exact = shapley_exact(8, game).unwrap();
        let (mut error, mut evaluations) = (0.0, 0.0);
        for seed in 0..20u64 {
            let out = gtg_shapley(8, game, config, seed).unwrap();
            assert_eq!(out.permutations, max_permutations);
            error += mean_abs_error(&out.values, &exact) / 20.0;
            evaluations += out.evaluations as f64 / 20.0;
        }
        (error, evaluations)
    }

    #[test]
    fn attribution_gtg_approaches_exact_as_permutations_grow() {
        let (e10, e50, e200) = (gtg_error(10).0, gtg_error(50).0, gtg_error(200).0);
        let gain = gain_of_game();
        assert!(e50 < e10 && e200 < e50, "{e10} {e50} {e200}");
        assert!(
            e200 < 0.01 * gain,
            "error {e200} at 200 permutations, gain {gain}"
        );
    }

    #[test]
    fn attribution_gtg_error_figures() {
        let gain = gain_of_game();
        for k in [10, 50, 200] {
            let (e, evaluations) = gtg_error(k);
            eprintln!(
                "GTG-Shapley vs exact, 8 players, {k} permutations: mean absolute error {e:.5} \
                 ({:.2}% of the gain {gain:.4}), {evaluations:.0} of 256 coalitions evaluated; \
                 means over 20 seeds",
                100.0 * e / gain
            );
            let untruncated = GtgConfig {
                truncation_tol: 0.0,
                ..sampling(k)
            };
            let (e, evaluations) = gtg_error_with(&untruncated);
            eprintln!(
                "  the same without within-round truncation: {e:.5} ({:.2}% of the gain), \
                 {evaluations:.0} of 256 coalitions",
                100.0 * e / gain
            );
        }
    }

    #[test]
    fn attribution_gtg_is_efficient_deterministic_and_memoised() {
        let mut calls = 0usize;
        let mut seen = HashSet::new();
        let a = gtg_shapley(
            8,
            |s| {
                calls += 1;
                assert!(seen.insert(s.to_vec()), "{s:?} evaluated twice");
                game(s)
            },
            &GtgConfig::default(),
            42,
        )
        .unwrap();
        assert_eq!(a.evaluations, calls);
        assert!(a.evaluations <= 256);
        let sum: f64 = a.values.iter().sum();
        assert!(close(sum, gain_of_game(), 1e-12), "{sum}");
        assert_eq!(a.gain, gain_of_game());

        let b = gtg_shapley(8, game, &GtgConfig::default(), 42).unwrap();
        assert_eq!(a, b);
        let c = gtg_shapley(8, game, &GtgConfig::default(), 43).unwrap();
        assert_ne!(a.values, c.values);
    }

    #[test]
    fn attribution_gtg_truncates_within_and_between_rounds() {
        // Only player 0 matters: once it is in, the rest of a permutation is truncated.
        let lone = |s: &[usize]| if s.contains(&0) { 1.0 } else { 0.0 };
        let out = gtg_shapley(12, lone, &sampling(24), 5).unwrap();
        assert!(close(out.values[0], 1.0, 1e-12));
        assert!(
            out.values[1..].iter().all(|&x| x == 0.0),
            "{:?}",
            out.values
        );
        // Truncated, a permutation stops at player 0 (about half way on average), so about half
        // the coalitions are evaluated: 130 against 228 with this seed.
        let untruncated = GtgConfig {
            truncation_tol: 0.0,
            ..sampling(24)
        };
        let full = gtg_shapley(12, lone, &untruncated, 5).unwrap();
        assert!(
            out.evaluations * 10 < full.evaluations * 7,
            "{} vs {}",
            out.evaluations,
            full.evaluations
        );

        // A round that gained nothing: two evaluations, all zero.
        let flat = gtg_shapley(
            12,
            |s| 3.0 + 1e-9 * s.len() as f64,
            &GtgConfig::default(),
            5,
        )
        .unwrap();
        assert!(flat.between_round_truncated);
        assert_eq!(
            (flat.evaluations, flat.permutations, flat.gain),
            (2, 0, 0.0)
        );
        assert!(flat.values.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn attribution_gtg_stops_when_converged() {
        let w: Vec<f64> = (0..16).map(|i| 0.01 * f64::from(i + 1)).collect();
        let additive = |s: &[usize]| s.iter().map(|&i| w[i]).sum::<f64>();
        let out = gtg_shapley(16, additive, &GtgConfig::default(), 9).unwrap();
        assert!(out.converged);
        assert!(out.permutations < 500 && out.permutations % 16 == 0);
        assert!(mean_abs_error(&out.values, &w) < 0.01);
    }

    #[test]
    fn attribution_chooses_exact_or_gtg() {
        let config = AttributionConfig::default();
        let small = attribute(8, game, &config, 1).unwrap();
        assert_eq!((small.method, small.evaluations), (Method::Exact, 256));
        assert_values(&small.values, &shapley_exact(8, game).unwrap(), 1e-12);

        let big = |s: &[usize]| {
            let m: f64 = s.iter().map(|&i| 0.02 * (i % 5) as f64).sum();
            1.0 - (-m).exp() - if s.contains(&3) { 0.05 } else { 0.0 }
        };
        let sampled = attribute(14, big, &config, 1).unwrap();
        assert_eq!(sampled.method, Method::Gtg);
        assert!(sampled.permutations > 0);
        let sum: f64 = sampled.values.iter().sum();
        assert!(close(
            sum,
            sampled.gain,
            1e-12 * sampled.gain.abs().max(1.0)
        ));

        let too_big = AttributionConfig {
            exact_max_players: 21,
            ..AttributionConfig::default()
        };
        assert!(matches!(
            attribute(3, game, &too_big, 1),
            Err(AttributionError::InvalidConfig { .. })
        ));
    }

    // -- grouping ------------------------------------------------------------------------------

    /// `count` records of 12 words each, drawn from a 2,000-word vocabulary.
    fn records(seed: u64, count: usize) -> Vec<String> {
        let mut rng = SplitMix64::new(seed);
        (0..count)
            .map(|_| {
                (0..12)
                    .map(|_| format!("w{}", below(&mut rng, 2000)))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    fn shard(records: Vec<String>) -> ShardText {
        ShardText {
            hash: ContentHash::of(records.join("\n").as_bytes()),
            records,
        }
    }

    #[test]
    fn attribution_groups_exact_and_near_duplicates() {
        let a = records(1, 50);
        let mut near = a.clone();
        near[17] = records(99, 1).remove(0);
        // The same text, punctuated and capitalised differently, is the same words.
        let mut shouty = a.clone();
        for r in &mut shouty {
            *r = format!("{}!", r.to_uppercase().replace(' ', ", "));
        }
        let shards = vec![
            shard(a.clone()),
            shard(records(2, 50)),
            shard(a.clone()),
            shard(near),
            shard(records(3, 50)),
            shard(shouty),
            ShardText {
                hash: ContentHash::of(b"empty"),
                records: vec!["...".into()],
            },
        ];
        let groups = group_shards(&shards, &GroupingConfig::default()).unwrap();
        assert_eq!(groups, vec![0, 1, 0, 0, 2, 0, 3]);
    }

    #[test]
    fn attribution_grouping_joins_by_hash_alone_and_estimates_jaccard() {
        // Two shards with one hash are one group even if their texts were reported differently.
        let h = ContentHash::of(b"x");
        let shards = vec![
            ShardText {
                hash: h,
                records: records(4, 5),
            },
            ShardText {
                hash: h,
                records: records(5, 5),
            },
        ];
        assert_eq!(
            group_shards(&shards, &GroupingConfig::default()).unwrap(),
            vec![0, 0]
        );

        // Half the records shared: true Jaccard of the shingle sets is about 1/3.
        let config = GroupingConfig::default();
        let a = records(6, 40);
        let mut b = a[..20].to_vec();
        b.extend(records(7, 20));
        let sa = minhash_signature(&a, &config).unwrap().unwrap();
        let sb = minhash_signature(&b, &config).unwrap().unwrap();
        let j = estimated_jaccard(&sa, &sb);
        assert!((0.2..0.47).contains(&j), "{j}");
        assert_eq!(
            group_shards(&[shard(a), shard(b)], &config).unwrap(),
            vec![0, 1]
        );
        assert_eq!(minhash_signature(&["  ".into()], &config).unwrap(), None);
    }

    // -- credit arithmetic ---------------------------------------------------------------------

    fn sum(parts: &[Credit]) -> i128 {
        parts.iter().map(|c| i128::from(c.0)).sum()
    }

    #[test]
    fn attribution_split_budget_awkward_weights() {
        let parts = split_budget(Credit(100), &[1.0 / 3.0; 3]).unwrap();
        assert_eq!(parts, vec![Credit(34), Credit(33), Credit(33)]);
        let parts = split_budget(Credit(-100), &[1.0 / 3.0; 3]).unwrap();
        assert_eq!(parts, vec![Credit(-34), Credit(-33), Credit(-33)]);
        let parts = split_budget(Credit(i64::MIN), &[1e300, 1e-300, 0.0, 3e299]).unwrap();
        assert_eq!(sum(&parts), i128::from(i64::MIN));
        assert_eq!(parts[2], Credit(0));
        let parts = split_budget(Credit(7), &[0.0, 5e-324, 2.0]).unwrap();
        assert_eq!(parts, vec![Credit(0), Credit(0), Credit(7)]);
        assert_eq!(
            split_budget(Credit(0), &[0.0, 0.0]).unwrap(),
            vec![Credit(0); 2]
        );
        assert!(matches!(
            split_budget(Credit(5), &[0.0, 0.0]),
            Err(AttributionError::ZeroWeights { count: 2, .. })
        ));
        assert!(matches!(
            split_budget(Credit(5), &[1.0, -1.0]),
            Err(AttributionError::InvalidWeight { index: 1, .. })
        ));
        assert!(matches!(
            split_budget(Credit(5), &[1.0, f64::NAN]),
            Err(AttributionError::InvalidWeight { index: 1, .. })
        ));
    }

    proptest! {
        #[test]
        fn attribution_split_budget_sums_exactly(
            budget in any::<i64>(),
            weights in prop::collection::vec(
                prop_oneof![Just(0.0), 1e-12..1e12f64, 0.0..1.0f64], 1..40),
        ) {
            prop_assume!(weights.iter().any(|&w| w > 0.0));
            let parts = split_budget(Credit(budget), &weights).unwrap();
            prop_assert_eq!(parts.len(), weights.len());
            prop_assert_eq!(sum(&parts), i128::from(budget));
            let total: f64 = weights.iter().sum();
            for (p, &w) in parts.iter().zip(&weights) {
                if w == 0.0 {
                    prop_assert_eq!(p.0, 0);
                }
                // Each part is within one unit of its exact quota, up to the quantisation.
                let quota = budget as f64 * (w / total);
                prop_assert!((p.0 as f64 - quota).abs() <= 1.0 + 1e-9 * (budget as f64).abs());
            }
        }
    }

    fn hashes(n: u8) -> Vec<ContentHash> {
        (0..n).map(|i| ContentHash::of(&[i])).collect()
    }

    #[test]
    fn attribution_data_credits_flag_harmful_split_duplicates_and_sum_to_budget() {
        let shards = hashes(6);
        // Group 0: shards 0, 2, 4 (duplicates); group 1: shard 1; group 2 harmful: shard 3;
        // group 3 near-zero: shard 5.
        let groups = [0, 1, 0, 2, 0, 3];
        let values = [0.6, 0.3, -0.15, 1e-6];
        let budget = Credit(1_000_000_001);
        let awards =
            data_credits(budget, &shards, &groups, &values, &CreditConfig::default()).unwrap();
        assert_eq!(
            sum(&awards.iter().map(|a| a.earned).collect::<Vec<_>>()),
            1_000_000_001
        );

        // Positive groups split the budget 2:1; group 0's third goes 1 unit to its first shard.
        let group0 = 666_666_667;
        assert_eq!(awards[0].earned, Credit(group0 / 3 + 1));
        assert_eq!(awards[2].earned, Credit(group0 / 3));
        assert_eq!(awards[4].earned, Credit(group0 / 3));
        assert_eq!(awards[1].earned, Credit(333_333_334));
        let smallest = [shards[0], shards[2], shards[4]].into_iter().min().unwrap();
        for s in [0, 2, 4] {
            assert_eq!(awards[s].flag, CreditFlag::Duplicate { group: smallest });
            assert_eq!(awards[s].value, Credit(200_000_000));
        }
        assert_eq!(awards[1].flag, CreditFlag::Normal);

        assert_eq!(awards[3].flag, CreditFlag::Harmful);
        assert_eq!(awards[3].earned, Credit(0));
        assert_eq!(awards[3].value, Credit(-150_000_000));

        assert_eq!(awards[5].flag, CreditFlag::Normal);
        assert_eq!(awards[5].earned, Credit(0));
        assert_eq!(awards[5].value, Credit(1_000));
    }

    #[test]
    fn attribution_data_budget_unpaid_without_positive_value() {
        let shards = hashes(3);
        let awards = data_credits(
            Credit(1_000),
            &shards,
            &[0, 1, 1],
            &[-0.5, 0.0],
            &CreditConfig::default(),
        )
        .unwrap();
        assert!(awards.iter().all(|a| a.earned == Credit(0)));
        assert_eq!(awards[0].flag, CreditFlag::Harmful);
        assert!(matches!(awards[1].flag, CreditFlag::Duplicate { .. }));

        let config = CreditConfig::default();
        assert!(matches!(
            data_credits(Credit(1), &shards, &[0, 1, 2], &[1.0, 1.0], &config),
            Err(AttributionError::GroupOutOfRange {
                shard: 2,
                group: 2,
                groups: 2
            })
        ));
        assert!(matches!(
            data_credits(Credit(1), &shards, &[0, 0, 0], &[1.0, 1.0], &config),
            Err(AttributionError::EmptyGroup { group: 1 })
        ));
        assert!(matches!(
            data_credits(Credit(-1), &shards, &[0, 0, 0], &[1.0], &config),
            Err(AttributionError::NegativeBudget { .. })
        ));
    }

    #[test]
    fn attribution_compute_credits_by_verified_tokens() {
        let commit = |i: u8, tokens: u64, verified: bool| ComputeCredit {
            peer: Keypair::from_seed(&[i; 32]).peer_id(),
            commit: ContentHash::of(&[i]),
            tokens,
            verified,
        };
        let updates = [
            commit(0, 1_000, true),
            commit(1, 5_000, false),
            commit(2, 2_000, true),
            commit(3, u64::MAX, true),
        ];
        let parts = compute_credits(Credit(i64::MAX), &updates).unwrap();
        assert_eq!(parts[1], Credit(0));
        assert_eq!(sum(&parts), i128::from(i64::MAX));
        assert!(parts[2].0 >= 2 * parts[0].0 - 1 && parts[2].0 <= 2 * parts[0].0 + 1);

        let parts = compute_credits(Credit(10), &updates[..3]).unwrap();
        assert_eq!(parts, vec![Credit(3), Credit(0), Credit(7)]);
        let failed = [commit(0, 1_000, false)];
        assert_eq!(
            compute_credits(Credit(10), &failed).unwrap(),
            vec![Credit(0)]
        );
    }

    #[test]
    fn attribution_nats_to_credit_rounds_and_saturates() {
        assert_eq!(nats_to_credit(0.25), Credit(250_000_000));
        assert_eq!(nats_to_credit(-1.4e-9), Credit(-1));
        assert_eq!(nats_to_credit(1e30), Credit(i64::MAX));
        assert_eq!(nats_to_credit(f64::NAN), Credit(0));
    }
}
