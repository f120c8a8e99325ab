//! The federated round, as two state machines without I/O.
//!
//! A job's owner runs one [`Coordinator`] per job; every volunteer runs one [`Worker`] per job
//! it takes part in. Both are written in the style of iroh-gossip's `proto` module: the driver
//! feeds them events together with the current time (`handle(now, event)`), and they answer
//! with actions for the driver to carry out: messages to publish or send, training to run,
//! updates to verify, merges to compute, wake-ups to schedule. They never read a clock, draw
//! from the operating system's randomness, touch the network or the disk. The peer drives them
//! with wall-clock time and real messages; the simulator drives the very same code with virtual
//! time. Their state is plain data with a canonical encoding, so a driver persists it after
//! each step and a restarted coordinator resumes where it stopped ([`Coordinator::restore`]).
//!
//! What the machines decide, and what they leave to the driver:
//!
//! - They check every signature, every message's own rules, who may send what and when
//!   (assignment, deadlines, duplicates, equivocation), seeded shard assignment, which
//!   segments to audit, the norm bound against the round's median, the Byzantine-robust filter's
//!   choice from the updates' pairwise distances ([`multi_krum_outliers`]), quorum, early
//!   stopping, and the credit arithmetic of the ledger entry.
//! - The driver does the heavy or I/O-bound work and reports back: training
//!   ([`WorkerAction::Train`]), fetching and checking an update and re-running its audited
//!   segments ([`CoordinatorAction::Verify`]), the pairwise distances of the verified updates
//!   when the job filters them ([`CoordinatorAction::Distances`]), and merging plus evaluating
//!   the accepted updates and their coalitions ([`CoordinatorAction::Merge`]).
//!
//! [`Coordinator`]: coordinator::Coordinator
//! [`Coordinator::restore`]: coordinator::Coordinator::restore
//! [`Worker`]: worker::Worker
//! [`WorkerAction::Train`]: worker::WorkerAction::Train
//! [`CoordinatorAction::Verify`]: coordinator::CoordinatorAction::Verify
//! [`CoordinatorAction::Merge`]: coordinator::CoordinatorAction::Merge
//! [`CoordinatorAction::Distances`]: coordinator::CoordinatorAction::Distances

pub mod coordinator;
pub mod worker;

#[cfg(test)]
mod machine_tests;

use bincode::{Decode, Encode};

use crate::hash::{ContentHash, ContentHasher};
use crate::identity::PeerId;
use crate::rng::SplitMix64;
use crate::types::{DatanetId, JobId, Timestamp, WorkAssignment};

/// One shard a job trains on, as the coordinator resolved it from the job's manifests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct PlannedShard {
    /// The shard's blob hash.
    pub hash: ContentHash,
    /// The datanet it comes from.
    pub datanet: DatanetId,
    /// Who contributed it; credited in the ledger.
    pub contributor: PeerId,
    /// Its tokens under the default tokenizer.
    pub tokens: u64,
    /// Its near-duplicate group: shards with the same group number are one source for credit
    /// (see [`crate::attribution`]); a shard alone in its group is simply itself.
    pub group: u32,
}

/// Everything a closed round decided, kept by its coordinator and served over `cohort/1` so that
/// anyone can recompute the round's merge and credits from the published blobs.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct RoundRecord {
    /// The round's open (its start adapter and seed).
    pub open: crate::signed::Signed<crate::types::RoundOpen>,
    /// Its assignment (none when the job was cancelled during enrolment).
    pub assignment: Option<crate::signed::Signed<crate::types::Assignment>>,
    /// Its close.
    pub close: crate::signed::Signed<crate::types::RoundClose>,
    /// The commits that were merged, sorted by worker (empty when nothing was merged).
    pub merged: Vec<crate::signed::Signed<crate::types::UpdateCommit>>,
    /// The commits the robust filter compared with the merged ones and refused as outliers
    /// ([`crate::types::RejectReason::Outlier`]), sorted by worker (empty without a filter or
    /// a merge): with `merged`, everything Multi-Krum compared, so that anyone can recompute
    /// its verdicts from the updates.
    pub filtered: Vec<crate::signed::Signed<crate::types::UpdateCommit>>,
    /// The job's training shards as planned (sorted by hash).
    pub shards: Vec<PlannedShard>,
}

/// The merge weight of each update: its share of the merged updates' tokens (at least 1 token
/// each), in the order given; the same arithmetic as the coordinator's.
pub fn merge_weights(tokens: &[u64]) -> Vec<f64> {
    let total: u64 = tokens.iter().map(|t| (*t).max(1)).sum();
    tokens
        .iter()
        .map(|t| (*t).max(1) as f64 / total as f64)
        .collect()
}

/// Multi-Krum's scores (Blanchard et al., 2017) of `m` updates with up to `f` Byzantine ones,
/// from their pairwise squared distances `dist` (`m x m`, row-major; the diagonal is ignored):
/// each update's score is the sum of its `m − f − 2` smallest distances to the others. Lower is
/// more central. `None` unless `m ≥ f + 3` and `dist` has `m²` entries.
pub fn multi_krum_scores(dist: &[f64], m: usize, f: usize) -> Option<Vec<f64>> {
    if m < f + 3 || dist.len() != m * m {
        return None;
    }
    let keep = m - f - 2;
    Some(
        (0..m)
            .map(|i| {
                let mut row: Vec<f64> = (0..m)
                    .filter(|j| *j != i)
                    .map(|j| dist[i * m + j])
                    .collect();
                row.sort_by(f64::total_cmp);
                row[..keep].iter().sum()
            })
            .collect(),
    )
}

/// The `f` updates Multi-Krum refuses: the highest [`multi_krum_scores`], as indices in
/// increasing order. Updates are ranked by score, ties by index (the later one is refused), so
/// every peer that has the distances picks the same ones. `Some(vec![])` for `f = 0`; `None`
/// when the scores are undefined.
pub fn multi_krum_outliers(dist: &[f64], m: usize, f: usize) -> Option<Vec<usize>> {
    let scores = multi_krum_scores(dist, m, f)?;
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]).then(a.cmp(b)));
    let mut out = order.split_off(m - f);
    out.sort_unstable();
    Some(out)
}

/// The seed of round `round` of a job whose base seed is `job_seed`.
///
/// Every seeded choice of the round (assignment, each worker's data order) derives from it.
pub fn round_seed(job: &JobId, job_seed: u64, round: u32) -> u64 {
    let h = ContentHasher::new()
        .update(b"cohort/round-seed/v1")
        .update(job.0.as_bytes())
        .update(&job_seed.to_le_bytes())
        .update(&round.to_le_bytes())
        .finalize();
    u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

/// Chooses at most `max_workers` of the enrolled `workers` and deals the round's shards to them.
///
/// `shards` are (hash, near-duplicate group). Deterministic in `seed`: the workers are sorted, a
/// seeded sample is kept when there are too many; the groups are shuffled, and group `i` of the
/// shuffle goes to kept worker `i mod k`, where `k` is the number of kept workers or the number
/// of groups, whichever is smaller. A whole near-duplicate group goes to one worker, so copies
/// of a source are one update and one player of the round's Shapley game: copying a shard under
/// more identities cannot raise its credit. Each update is trained on one group or a few, which
/// is what lets credit be given per shard. The result is sorted by worker, each worker's shards
/// sorted, and each worker gets its own training seed.
pub fn assign(
    seed: u64,
    workers: &[PeerId],
    shards: &[(ContentHash, u32)],
    max_workers: usize,
) -> Vec<WorkAssignment> {
    let mut rng = SplitMix64::new(seed);
    let mut workers: Vec<PeerId> = workers.to_vec();
    workers.sort();
    workers.dedup();
    shuffle(&mut workers, &mut rng);
    workers.truncate(max_workers.max(1));
    workers.sort();
    let mut shards: Vec<(ContentHash, u32)> = shards.to_vec();
    shards.sort();
    shards.dedup_by_key(|s| s.0);
    // Groups in order of their smallest shard, then shuffled.
    let mut groups: Vec<(u32, Vec<ContentHash>)> = Vec::new();
    for (hash, group) in &shards {
        match groups.iter_mut().find(|(g, _)| g == group) {
            Some((_, members)) => members.push(*hash),
            None => groups.push((*group, vec![*hash])),
        }
    }
    shuffle(&mut groups, &mut rng);
    let k = workers.len().min(groups.len());
    let mut work: Vec<WorkAssignment> = workers[..k]
        .iter()
        .map(|w| WorkAssignment {
            worker: *w,
            shards: Vec::new(),
            seed: rng.next_u64(),
        })
        .collect();
    for (i, (_, members)) in groups.into_iter().enumerate() {
        work[i % k].shards.extend(members);
    }
    for w in &mut work {
        w.shards.sort();
    }
    work
}

/// Fisher–Yates with the protocol's generator, so every peer shuffles identically.
fn shuffle<T>(v: &mut [T], rng: &mut SplitMix64) {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Which of an update's `segments` the coordinator re-executes.
///
/// Each segment is audited independently with probability `audit_ppm / 1e6`, drawn from a
/// generator keyed by the coordinator's secret and the commit's hash: the choice is fixed once
/// the commit is signed, and the worker cannot predict it before committing (it does not know
/// the secret), so it cannot grind its commit to dodge the audit.
pub fn audited_segments(
    secret: &[u8; 32],
    commit: &ContentHash,
    segments: usize,
    audit_ppm: u32,
) -> Vec<u32> {
    let h = ContentHasher::new()
        .update(b"cohort/audit/v1")
        .update(secret)
        .update(commit.as_bytes())
        .finalize();
    let mut rng = SplitMix64::new(u64::from_le_bytes(
        h.as_bytes()[..8].try_into().unwrap_or([0; 8]),
    ));
    (0..segments as u32)
        .filter(|_| rng.next_u64() % 1_000_000 < u64::from(audit_ppm))
        .collect()
}

/// The probability that auditing each segment with probability `p` catches a worker that
/// faked `m` segments: `1 - (1 - p)^m`.
pub fn detection_probability(p: f64, m: u32) -> f64 {
    1.0 - (1.0 - p).powi(m as i32)
}

/// The smallest number of faked segments that audits at rate `p` catch with probability at
/// least `target`; `None` when `p` is zero.
pub fn segments_for_detection(p: f64, target: f64) -> Option<u32> {
    if p <= 0.0 {
        return None;
    }
    if p >= 1.0 {
        return Some(1);
    }
    Some(((1.0 - target).ln() / (1.0 - p).ln()).ceil().max(1.0) as u32)
}

/// Whether a training record belongs to the job's held-out validation set.
///
/// The split is by record, seeded, and needs nothing but the record's bytes (its JSONL line,
/// without the line ending and surrounding white space): a BLAKE3 hash of the seed and the
/// record, read as a number below 10^6, is compared with `fraction_ppm`. So every peer takes
/// the same records out of its shards without being sent the list, and the validation set the
/// coordinator publishes can be checked record by record.
pub fn is_validation(seed: u64, fraction_ppm: u32, record: &[u8]) -> bool {
    let h = ContentHasher::new()
        .update(b"cohort/validation-split/v1")
        .update(&seed.to_le_bytes())
        .update(record.trim_ascii())
        .finalize();
    let x = u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8]));
    x % 1_000_000 < u64::from(fraction_ppm)
}

/// `at + ms`, saturating.
pub(crate) fn after(at: Timestamp, ms: u64) -> Timestamp {
    Timestamp(at.0.saturating_add(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: u8) -> Vec<PeerId> {
        (0..n)
            .map(|i| crate::identity::Keypair::from_seed(&[i + 1; 32]).peer_id())
            .collect()
    }

    fn hashes(n: u32) -> Vec<ContentHash> {
        (0..n).map(|i| ContentHash::of(&i.to_le_bytes())).collect()
    }

    /// Each shard its own group.
    fn alone(h: &[ContentHash]) -> Vec<(ContentHash, u32)> {
        h.iter().enumerate().map(|(i, h)| (*h, i as u32)).collect()
    }

    #[test]
    fn assignment_covers_every_shard_once_and_is_seeded() {
        let w = peers(3);
        let s = hashes(8);
        let a = assign(7, &w, &alone(&s), 16);
        assert_eq!(a.len(), 3);
        let mut all: Vec<ContentHash> = a.iter().flat_map(|w| w.shards.clone()).collect();
        all.sort();
        let mut want = s.clone();
        want.sort();
        assert_eq!(all, want);
        // Sizes differ by at most one.
        let sizes: Vec<usize> = a.iter().map(|w| w.shards.len()).collect();
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        // Same seed and same inputs in another order: same result; another seed: another deal.
        let mut w2 = w.clone();
        w2.reverse();
        assert_eq!(assign(7, &w2, &alone(&s), 16), a);
        assert_ne!(assign(8, &w, &alone(&s), 16), a);
    }

    #[test]
    fn more_workers_than_shards_leaves_the_rest_idle_and_caps_apply() {
        let a = assign(1, &peers(5), &alone(&hashes(2)), 16);
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|w| w.shards.len() == 1));
        let b = assign(1, &peers(5), &alone(&hashes(10)), 3);
        assert_eq!(b.len(), 3);
        assert!(b.windows(2).all(|p| p[0].worker < p[1].worker));
    }

    #[test]
    fn validation_split_is_seeded_by_record_and_near_its_fraction() {
        let records: Vec<String> = (0..20_000)
            .map(|i| format!("{{\"text\": \"r{i}\"}}"))
            .collect();
        let taken = records
            .iter()
            .filter(|r| is_validation(3, 100_000, r.as_bytes()))
            .count();
        // 20,000 draws at 10%: mean 2,000, sd about 42.
        assert!((1_850..2_150).contains(&taken), "{taken}");
        // White space around a line does not move it; another seed does.
        let r = records[7].as_bytes();
        let padded = format!("  {}\r\n", records[7]);
        assert_eq!(
            is_validation(3, 100_000, r),
            is_validation(3, 100_000, padded.as_bytes())
        );
        let moved = records
            .iter()
            .filter(|r| {
                is_validation(3, 100_000, r.as_bytes()) != is_validation(4, 100_000, r.as_bytes())
            })
            .count();
        assert!(moved > 3_000, "{moved}");
    }

    #[test]
    fn a_near_duplicate_group_goes_to_one_worker() {
        let h = hashes(6);
        // Shards 0, 3 and 5 are copies of one source.
        let shards: Vec<(ContentHash, u32)> = h
            .iter()
            .enumerate()
            .map(|(i, x)| (*x, if i % 3 == 0 || i == 5 { 0 } else { i as u32 }))
            .collect();
        for seed in 0..20 {
            let a = assign(seed, &peers(4), &shards, 16);
            let holders: Vec<usize> = a
                .iter()
                .enumerate()
                .filter(|(_, w)| w.shards.contains(&h[0]))
                .map(|(i, _)| i)
                .collect();
            assert_eq!(holders.len(), 1);
            let w = &a[holders[0]];
            assert!(
                w.shards.contains(&h[3]) && w.shards.contains(&h[5]),
                "seed {seed}"
            );
            assert_eq!(a.iter().map(|w| w.shards.len()).sum::<usize>(), 6);
        }
    }

    #[test]
    fn multi_krum_refuses_the_farthest_and_breaks_ties_by_index() {
        // Five points on a line: 0, 1, 2, 3 and 100; squared distances.
        let x = [0.0, 1.0, 2.0, 3.0, 100.0];
        let m = x.len();
        let dist: Vec<f64> = (0..m * m)
            .map(|k| (x[k / m] - x[k % m]) * (x[k / m] - x[k % m]))
            .collect();
        // f = 1: each score sums the 2 nearest: 0 -> 1+4, 1 -> 1+1, 2 -> 1+1, 3 -> 1+4, 100 -> far.
        assert_eq!(
            multi_krum_scores(&dist, m, 1).unwrap(),
            vec![5.0, 2.0, 2.0, 5.0, 97.0 * 97.0 + 98.0 * 98.0]
        );
        assert_eq!(multi_krum_outliers(&dist, m, 1), Some(vec![4]));
        // f = 2: one nearest each, so the four near points tie at 1: 100 goes, and then the
        // last of the tie.
        assert_eq!(multi_krum_outliers(&dist, m, 2), Some(vec![3, 4]));
        assert_eq!(multi_krum_outliers(&dist, m, 0), Some(vec![]));
        // Too few updates, or a matrix of the wrong size.
        assert_eq!(multi_krum_outliers(&dist, m, 3), None);
        assert_eq!(multi_krum_scores(&dist[1..], m, 1), None);
    }

    #[test]
    fn audit_rate_and_detection_formula() {
        let secret = [9; 32];
        let mut chosen = 0usize;
        for i in 0..200u32 {
            chosen +=
                audited_segments(&secret, &ContentHash::of(&i.to_le_bytes()), 100, 50_000).len();
        }
        // 20,000 draws at p = 5%: mean 1,000, sd about 31.
        assert!((880..1120).contains(&chosen), "{chosen}");
        // DESIGN.md's figures: p = 5% catches 20 faked segments with 64%, 100 with 99.4%.
        assert!((detection_probability(0.05, 20) - 0.6415).abs() < 1e-3);
        assert!((detection_probability(0.05, 100) - 0.9941).abs() < 1e-3);
        assert_eq!(segments_for_detection(0.05, 0.95), Some(59));
        assert!(detection_probability(0.05, 59) >= 0.95);
        assert!(detection_probability(0.05, 58) < 0.95);
    }
}
