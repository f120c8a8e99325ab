//! The job owner's side of the rounds.
//!
//! One [`Coordinator`] runs one job from its first round to its end. Each round goes
//!
//! ```text
//! Enrolling --deadline with quorum, or max_workers joined--> Training
//! Training  --every assigned worker committed, or commit deadline--> Verifying
//! Verifying --every commit verified, or validation deadline--> (norm bound) Filtering or Merging
//! Filtering --distances, or filter deadline--> Merging
//! Merging   --merge result--> closed; the next round opens, or the job ends
//! ```
//!
//! Filtering happens only in jobs with a Byzantine-robust filter
//! ([`crate::types::RobustAggregation::MultiKrum`] with budget `f`). The machine has no tensors:
//! it asks the driver for the pairwise squared distances `‖ΔW_i − ΔW_j‖²_F` of the `m` updates
//! left after the norm bound ([`CoordinatorAction::Distances`], answered by
//! [`CoordinatorEvent::Distances`]), scores them itself ([`super::multi_krum_outliers`]) and
//! refuses the `f` farthest as [`RejectReason::Outlier`], less the round's updates already refused
//! for misbehaviour ([`filter_budget`]: those Byzantine workers are caught, not among the `m`).
//! With `m < f + 3` the filter runs with `f` lowered to `m − 3` (and not at all for `m ≤ 3`);
//! the quorum counts what is left after the
//! filter, so a round whose filter would leave fewer than `min_updates` closes unmerged without
//! asking for distances. The driver has one validation period (`validate_ms`) from the request
//! to answer; if it has not by then (a lost or failed computation), the round closes unmerged
//! rather than merging unfiltered updates.
//!
//! The coordinator never trusts a message because of where it came from: joins and commits are
//! checked for signature, rules, sender and timing here, and each refusal is reported as a
//! [`CoordinatorAction::Refused`] so the driver can count it per peer.

use std::collections::BTreeMap;

use bincode::{Decode, Encode};

use super::{PlannedShard, after, assign, audited_segments, round_seed};
use crate::encoding::{self, Canonical, DecodeError};
use crate::hash::ContentHash;
use crate::identity::{Keypair, PeerId};
use crate::signed::Signed;
use crate::types::{
    Assignment, Capacity, ComputeCredit, JobId, JobSpec, RejectReason, RoundClose, RoundJoin,
    RoundOpen, RoundOutcome, ShardCredit, Timestamp, UpdateCommit, UpdateVerdict, WorkAssignment,
};

/// A round that has not gathered its quorum after this many enrolment periods closes unmerged.
pub const MAX_ENROLL_PERIODS: u64 = 30;

/// Where the current round stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Phase {
    /// Accepting joins.
    Enrolling,
    /// Assigned; workers train and commit.
    Training,
    /// Commits are being fetched, checked and spot-checked by the driver.
    Verifying,
    /// The accepted updates are being merged and evaluated by the driver.
    Merging,
    /// The job has ended; nothing more happens.
    Finished,
    /// The driver computes the pairwise distances of the updates that passed verification and
    /// the norm bound, for the Byzantine-robust filter (between `Verifying` and `Merging`).
    Filtering,
}

/// What the driver found when it checked one update.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub enum Verification {
    /// Shapes, finite values and every audited segment were fine.
    Passed {
        /// `‖ΔW‖_F` of the update's delta against the round's start (the driver computes it
        /// from r x r Gram matrices); the norm bound compares it with the round's median.
        delta_norm: f64,
    },
    /// The update failed a check.
    Failed(RejectReason),
}

/// One accepted update, as the driver must merge it.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct MergeInput {
    /// The worker.
    pub worker: PeerId,
    /// The update's blob hash.
    pub update: ContentHash,
    /// The hash of the signed commit.
    pub commit: ContentHash,
    /// Its weight in the merge: its share of the accepted updates' tokens (the weights sum
    /// to 1).
    pub weight: f64,
}

/// One update the robust filter compares (the [`CoordinatorAction::Distances`] request).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct FilterInput {
    /// The worker.
    pub worker: PeerId,
    /// The update's blob hash.
    pub update: ContentHash,
    /// The hash of the signed commit.
    pub commit: ContentHash,
}

/// What the driver reports after merging and evaluating.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct MergeOutcome {
    /// The round it is for.
    pub round: u32,
    /// The merged adapter's blob hash; `None` when there was nothing to merge.
    pub adapter: Option<ContentHash>,
    /// Relative Eckart–Young truncation error of the merge (0 when it was kept exact).
    pub truncation_error: f32,
    /// Validation loss of the round's start adapter.
    pub loss_before: f32,
    /// Validation loss of the merged adapter (equal to `loss_before` without a merge).
    pub loss_after: f32,
    /// Shapley value of each merge input, in the order of the `Merge` action's `updates`,
    /// in nats of validation-loss improvement; they sum to `loss_before - loss_after`.
    pub values: Vec<f64>,
}

/// Something that happened, fed to [`Coordinator::handle`].
#[derive(Clone, Debug)]
pub enum CoordinatorEvent {
    /// Time passed; deadlines are checked against `now`.
    Tick,
    /// A volunteer asks to take part in a round.
    Join(Signed<RoundJoin>),
    /// A worker commits its update.
    Commit(Signed<UpdateCommit>),
    /// The driver finished checking a commit (the answer to [`CoordinatorAction::Verify`]).
    Verified {
        /// The worker.
        worker: PeerId,
        /// The hash of the signed commit that was checked.
        commit: ContentHash,
        /// What it found.
        result: Verification,
    },
    /// The driver computed the pairwise distances (the answer to
    /// [`CoordinatorAction::Distances`]).
    Distances {
        /// The round.
        round: u32,
        /// The commit hashes of the updates compared, in the order of the request's `updates`.
        commits: Vec<ContentHash>,
        /// `m x m`, row-major: entry `(i, j)` is `‖ΔW_i − ΔW_j‖²_F` over all of the adapter's
        /// projections, LoRA scaling included. Symmetric, finite and not negative; the
        /// diagonal is ignored.
        dist: Vec<f64>,
    },
    /// The driver finished merging (the answer to [`CoordinatorAction::Merge`]).
    Merged(MergeOutcome),
    /// The owner cancels the job.
    Cancel,
}

/// Why a message was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The signature or envelope does not verify.
    Forged,
    /// The message breaks its own rules.
    Invalid(String),
    /// For another job.
    WrongJob,
    /// For a round that is not the current one, or a phase that is over.
    Stale,
    /// A commit from a peer that was not assigned in this round.
    NotAssigned,
    /// A commit after the deadline.
    Late,
    /// The same message again (harmless; not an offence).
    Duplicate,
    /// A second, different commit from the same worker in one round.
    Equivocation,
    /// Enrolment is full.
    Full,
    /// A join from a worker an earlier round of this job caught misbehaving.
    Barred {
        /// The round that refused its update.
        round: u32,
        /// Why.
        reason: RejectReason,
    },
}

/// A signed message the driver makes available to every peer (gossip an announcement of its
/// hash, answer requests for its body).
#[derive(Clone, Debug, PartialEq)]
pub enum Published {
    /// A round opened.
    Open(Signed<RoundOpen>),
    /// The round's assignment.
    Assignment(Signed<Assignment>),
    /// A round closed.
    Close(Signed<RoundClose>),
}

/// What the coordinator asks the driver to do.
#[derive(Clone, Debug, PartialEq)]
pub enum CoordinatorAction {
    /// Publish a signed message.
    Publish(Published),
    /// Call [`Coordinator::handle`] with [`CoordinatorEvent::Tick`] at this time (or later).
    WakeAt(Timestamp),
    /// Fetch the update blob named by the commit, check its shapes and values, compute its
    /// delta norm, and re-run the listed segments from the worker's committed states; answer
    /// with [`CoordinatorEvent::Verified`].
    Verify {
        /// The round.
        round: u32,
        /// The round's start adapter, which the update's delta is measured from.
        start: Option<ContentHash>,
        /// The signed commit.
        commit: Signed<UpdateCommit>,
        /// Indices into the commit's `segments` to re-execute.
        audit: Vec<u32>,
    },
    /// Compute the pairwise squared distances of these updates' deltas (the start adapter
    /// cancels out: `‖(U_i − S) − (U_j − S)‖ = ‖U_i − U_j‖`, so it is not needed) for the
    /// Byzantine-robust filter; answer with [`CoordinatorEvent::Distances`] before the filter
    /// deadline ([`Coordinator::next_deadline`]).
    Distances {
        /// The round.
        round: u32,
        /// The updates left after verification and the norm bound, sorted by worker.
        updates: Vec<FilterInput>,
    },
    /// Merge the updates into the start adapter, evaluate on the validation set, and compute
    /// each update's Shapley value; answer with [`CoordinatorEvent::Merged`]. With no updates,
    /// only evaluate the start adapter.
    Merge {
        /// The round.
        round: u32,
        /// The round's start adapter.
        start: Option<ContentHash>,
        /// The accepted updates, sorted by worker.
        updates: Vec<MergeInput>,
        /// The round's seed (for permutation sampling in attribution).
        seed: u64,
    },
    /// The round closed: append a ledger entry with these credits (in one write with the
    /// coordinator's new state), keep the round's record and publish the close.
    Close {
        /// The signed close.
        close: Signed<RoundClose>,
        /// What the round decided, for anyone to recompute it.
        record: Box<super::RoundRecord>,
        /// Data credit per shard, sorted by shard.
        data: Vec<ShardCredit>,
        /// Compute credit per worker that committed, sorted by worker.
        compute: Vec<ComputeCredit>,
    },
    /// A message was refused; count it against its sender.
    Refused {
        /// The signer (as claimed, for forged messages).
        from: PeerId,
        /// What was wrong.
        why: Refusal,
    },
    /// The job ended.
    Finished {
        /// How the last round ended.
        outcome: RoundOutcome,
        /// The final adapter.
        adapter: Option<ContentHash>,
    },
}

/// The state of one commit in the current round.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
struct CommitSlot {
    commit: Signed<UpdateCommit>,
    tokens: u64,
    state: SlotState,
}

#[derive(Clone, Debug, PartialEq, Encode, Decode)]
enum SlotState {
    Received,
    Verifying,
    Passed { delta_norm: f64 },
    Rejected(RejectReason),
}

/// The current round.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
struct Round {
    number: u32,
    seed: u64,
    open: Signed<RoundOpen>,
    joins: BTreeMap<PeerId, Capacity>,
    assignment: Option<Signed<Assignment>>,
    /// The assignment's work by worker, decoded once (decoding a signed assignment of N
    /// workers costs N public-key decompressions; it is looked at on every commit).
    work: BTreeMap<PeerId, WorkAssignment>,
    commit_until: Timestamp,
    verify_until: Timestamp,
    commits: BTreeMap<PeerId, CommitSlot>,
    merge_inputs: Vec<MergeInput>,
    /// When the robust filter gives up waiting for the driver's distances.
    filter_until: Timestamp,
}

/// The job owner's state machine for one job.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct Coordinator {
    spec_signed: Signed<JobSpec>,
    spec: JobSpec,
    job: JobId,
    shards: Vec<PlannedShard>,
    audit_secret: [u8; 32],
    phase: Phase,
    round: Round,
    adapter: Option<ContentHash>,
    best_loss: Option<f32>,
    last_loss: Option<f32>,
    rounds_without_gain: u32,
    grace_until: Timestamp,
    /// Workers an earlier round of this job caught misbehaving ([`bars`]), with the round and
    /// the reason: their joins are refused ([`Refusal::Barred`]) for the rest of the job.
    barred: BTreeMap<PeerId, (u32, RejectReason)>,
}

/// Whether a refused update bars its worker from the job's later rounds: when the refusal
/// proves the worker broke the protocol or sent something no honest trainer produces (a failed
/// spot check, other shards than assigned, two commits for one round, wrong shapes, non-finite
/// values). Not for what befalls honest workers too: lateness, an unavailable blob, the norm
/// bound (a shard unlike the others can trip it), Multi-Krum's outliers, a round that merged
/// nothing.
pub fn bars(reason: &RejectReason) -> bool {
    matches!(
        reason,
        RejectReason::SpotCheckMismatch { .. }
            | RejectReason::WrongShards
            | RejectReason::Equivocation
            | RejectReason::Shape
            | RejectReason::NonFinite
    )
}

/// How many of `m` updates Multi-Krum refuses in a round: the job's `f` (the Byzantine updates
/// it allows for per round) less the `caught` updates of the round already refused for
/// misbehaviour ([`bars`]), since those Byzantine workers are not among the `m`; and at most
/// `m − 3`, so that Multi-Krum's scores stay defined. (Barred workers take no part in the round
/// at all.)
pub fn filter_budget(f: usize, caught: usize, m: usize) -> usize {
    f.saturating_sub(caught).min(m.saturating_sub(3))
}

/// Why a coordinator could not be built or restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// The job spec does not verify or is invalid.
    #[error("job spec: {0}")]
    Spec(String),
    /// The key given is not the job owner's.
    #[error("the job is signed by {owner}, not by this peer ({me})")]
    NotOwner {
        /// The job's owner.
        owner: PeerId,
        /// This peer.
        me: PeerId,
    },
    /// There are no shards to train on.
    #[error("the job has no shards to train on")]
    NoShards,
    /// Shards are not sorted and unique by hash.
    #[error("shards must be sorted by hash without repeats")]
    UnsortedShards,
    /// The saved state does not decode.
    #[error("saved coordinator state: {0}")]
    State(#[from] DecodeError),
}

impl Coordinator {
    /// Starts a job: verifies the spec, checks that `keypair` owns it, and opens round 0.
    ///
    /// `shards` (sorted by hash, unique) are the training shards resolved from the job's
    /// manifests; `audit_secret` is 32 bytes of the driver's randomness, kept private, that
    /// decides which segments get re-executed.
    pub fn new(
        spec: Signed<JobSpec>,
        shards: Vec<PlannedShard>,
        keypair: &Keypair,
        audit_secret: [u8; 32],
        now: Timestamp,
    ) -> Result<(Self, Vec<CoordinatorAction>), CoordinatorError> {
        let payload = spec
            .verify()
            .map_err(|e| CoordinatorError::Spec(e.to_string()))?;
        payload
            .validate()
            .map_err(|e| CoordinatorError::Spec(e.to_string()))?;
        if spec.signer() != keypair.peer_id() {
            return Err(CoordinatorError::NotOwner {
                owner: spec.signer(),
                me: keypair.peer_id(),
            });
        }
        if shards.is_empty() {
            return Err(CoordinatorError::NoShards);
        }
        if shards.windows(2).any(|w| w[0].hash >= w[1].hash) {
            return Err(CoordinatorError::UnsortedShards);
        }
        let job = JobId::of(&spec);
        let round = Self::open_round(&job, &payload, keypair, 0, None, now);
        let me = Self {
            spec_signed: spec,
            spec: payload,
            job,
            shards,
            audit_secret,
            phase: Phase::Enrolling,
            round,
            adapter: None,
            best_loss: None,
            last_loss: None,
            rounds_without_gain: 0,
            grace_until: now,
            barred: BTreeMap::new(),
        };
        let actions = me.announce_current();
        Ok((me, actions))
    }

    /// The canonical bytes of the state, to persist after every [`Coordinator::handle`] (in the
    /// same write as the actions' effects that must not be lost, such as ledger entries).
    pub fn save(&self) -> Vec<u8> {
        encoding::encode(self)
    }

    /// Rebuilds a coordinator from [`Coordinator::save`]'s bytes after a restart.
    ///
    /// The actions returned re-publish the current round's messages and re-issue the driver
    /// work that was in flight (verifications, the merge), since the driver lost it with the
    /// process. Workers may have tried to commit while the coordinator was down, so a commit
    /// deadline that passed during the outage is extended by one enrolment period from `now`.
    pub fn restore(
        bytes: &[u8],
        keypair: &Keypair,
        now: Timestamp,
    ) -> Result<(Self, Vec<CoordinatorAction>), CoordinatorError> {
        let mut me = Self::from_bytes(bytes)?;
        if me.spec_signed.signer() != keypair.peer_id() {
            return Err(CoordinatorError::NotOwner {
                owner: me.spec_signed.signer(),
                me: keypair.peer_id(),
            });
        }
        me.grace_until = after(now, me.spec.deadlines.enroll_ms);
        let mut actions = me.announce_current();
        match me.phase {
            Phase::Verifying => {
                let start = me.adapter;
                for slot in me.round.commits.values() {
                    if slot.state == SlotState::Verifying {
                        actions.push(me.verify_action(start, slot));
                    }
                }
            }
            Phase::Filtering => actions.push(me.distances_action()),
            Phase::Merging => actions.push(me.merge_action()),
            _ => {}
        }
        actions.extend(me.handle(now, CoordinatorEvent::Tick, keypair));
        Ok((me, actions))
    }

    /// The job.
    pub fn job(&self) -> JobId {
        self.job
    }

    /// The job's spec.
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    /// The current round (the last one once finished).
    pub fn round(&self) -> u32 {
        self.round.number
    }

    /// The workers barred from this job's later rounds, with the round that caught each and
    /// why ([`bars`]).
    pub fn barred(&self) -> &BTreeMap<PeerId, (u32, RejectReason)> {
        &self.barred
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The adapter the current round starts from (the latest merged adapter).
    pub fn adapter(&self) -> Option<ContentHash> {
        self.adapter
    }

    /// The current round's signed open.
    pub fn current_open(&self) -> &Signed<RoundOpen> {
        &self.round.open
    }

    /// The current round's signed assignment, once made.
    pub fn current_assignment(&self) -> Option<&Signed<Assignment>> {
        self.round.assignment.as_ref()
    }

    /// The workers assigned in the current round, if assignment happened.
    pub fn assigned(&self) -> Vec<PeerId> {
        self.round.work.keys().copied().collect()
    }

    /// The peers enrolled in the current round.
    pub fn enrolled(&self) -> Vec<PeerId> {
        self.round.joins.keys().copied().collect()
    }

    /// When a round that cannot reach its quorum stops enrolling: [`MAX_ENROLL_PERIODS`]
    /// enrolment periods after it opened.
    fn give_up_enrolling_at(&self) -> Timestamp {
        let open = self.round.open_payload();
        after(
            open.opened_at,
            self.spec
                .deadlines
                .enroll_ms
                .saturating_mul(MAX_ENROLL_PERIODS),
        )
    }

    /// The next deadline the coordinator waits for, if any.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        match self.phase {
            Phase::Enrolling => {
                let open = self.round.open_payload();
                let quorum = self.round.joins.len() >= self.spec.quorum.min_updates as usize;
                // Without a quorum nothing happens at the enrolment deadline; a join wakes the
                // machine anyway.
                Some(if quorum {
                    open.enroll_until
                } else {
                    self.give_up_enrolling_at()
                })
            }
            Phase::Training => Some(self.round.commit_until.max(self.grace_until)),
            Phase::Verifying => Some(self.round.verify_until),
            Phase::Filtering => Some(self.round.filter_until),
            Phase::Merging | Phase::Finished => None,
        }
    }

    /// Feeds one event at time `now`; returns what the driver must do, in order.
    pub fn handle(
        &mut self,
        now: Timestamp,
        event: CoordinatorEvent,
        keypair: &Keypair,
    ) -> Vec<CoordinatorAction> {
        let mut out = Vec::new();
        if self.phase == Phase::Finished {
            if let CoordinatorEvent::Join(m) = &event {
                out.push(refuse(m.signer(), Refusal::Stale));
            }
            if let CoordinatorEvent::Commit(m) = &event {
                out.push(refuse(m.signer(), Refusal::Stale));
            }
            return out;
        }
        match event {
            CoordinatorEvent::Tick => {}
            CoordinatorEvent::Join(m) => self.on_join(m, &mut out),
            CoordinatorEvent::Commit(m) => self.on_commit(now, m, &mut out),
            CoordinatorEvent::Verified {
                worker,
                commit,
                result,
            } => self.on_verified(worker, commit, result),
            CoordinatorEvent::Distances {
                round,
                commits,
                dist,
            } => self.on_distances(round, &commits, &dist, &mut out),
            CoordinatorEvent::Merged(result) => {
                self.on_merged(now, result, keypair, &mut out);
                return out;
            }
            CoordinatorEvent::Cancel => {
                self.close(now, RoundOutcome::Cancelled, None, keypair, &mut out);
                return out;
            }
        }
        self.advance(now, keypair, &mut out);
        out
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        <Self as Canonical>::from_bytes(bytes)
    }

    fn open_round(
        job: &JobId,
        spec: &JobSpec,
        keypair: &Keypair,
        number: u32,
        start: Option<ContentHash>,
        now: Timestamp,
    ) -> Round {
        let seed = round_seed(job, spec.hyper.seed, number);
        let open = Signed::sign(
            keypair,
            &RoundOpen {
                job: *job,
                round: number,
                start_adapter: start,
                seed,
                opened_at: now,
                enroll_until: after(now, spec.deadlines.enroll_ms),
            },
        );
        Round {
            number,
            seed,
            open,
            joins: BTreeMap::new(),
            assignment: None,
            work: BTreeMap::new(),
            commit_until: Timestamp(u64::MAX),
            verify_until: Timestamp(u64::MAX),
            commits: BTreeMap::new(),
            merge_inputs: Vec::new(),
            filter_until: Timestamp(u64::MAX),
        }
    }

    fn announce_current(&self) -> Vec<CoordinatorAction> {
        let mut out = vec![CoordinatorAction::Publish(Published::Open(
            self.round.open.clone(),
        ))];
        if let Some(a) = &self.round.assignment {
            out.push(CoordinatorAction::Publish(Published::Assignment(a.clone())));
        }
        if let Some(at) = self.next_deadline() {
            out.push(CoordinatorAction::WakeAt(at));
        }
        out
    }

    fn on_join(&mut self, m: Signed<RoundJoin>, out: &mut Vec<CoordinatorAction>) {
        let from = m.signer();
        let join = match m.verify() {
            Ok(j) => j,
            Err(_) => return out.push(refuse(from, Refusal::Forged)),
        };
        if let Err(e) = join.validate() {
            return out.push(refuse(from, Refusal::Invalid(e.to_string())));
        }
        if join.job != self.job {
            return out.push(refuse(from, Refusal::WrongJob));
        }
        if join.round != self.round.number || self.phase != Phase::Enrolling {
            return out.push(refuse(from, Refusal::Stale));
        }
        if self.round.joins.contains_key(&from) {
            return out.push(refuse(from, Refusal::Duplicate));
        }
        if let Some((round, reason)) = self.barred.get(&from) {
            let (round, reason) = (*round, reason.clone());
            return out.push(refuse(from, Refusal::Barred { round, reason }));
        }
        if self.round.joins.len() >= self.spec.quorum.max_workers as usize {
            return out.push(refuse(from, Refusal::Full));
        }
        self.round.joins.insert(from, join.capacity);
        if self.round.joins.len() == self.spec.quorum.min_updates as usize {
            // The quorum is there: the enrolment deadline matters now.
            out.push(CoordinatorAction::WakeAt(
                self.round.open_payload().enroll_until,
            ));
        }
    }

    fn on_commit(
        &mut self,
        now: Timestamp,
        m: Signed<UpdateCommit>,
        out: &mut Vec<CoordinatorAction>,
    ) {
        let from = m.signer();
        let commit = match m.verify() {
            Ok(c) => c,
            Err(_) => return out.push(refuse(from, Refusal::Forged)),
        };
        if let Err(e) = commit.validate() {
            return out.push(refuse(from, Refusal::Invalid(e.to_string())));
        }
        if commit.job != self.job {
            return out.push(refuse(from, Refusal::WrongJob));
        }
        if commit.round != self.round.number || self.phase == Phase::Enrolling {
            return out.push(refuse(from, Refusal::Stale));
        }
        let Some(assigned) = self.round.work.get(&from).cloned() else {
            return out.push(refuse(from, Refusal::NotAssigned));
        };
        if let Some(slot) = self.round.commits.get_mut(&from) {
            if slot.commit == m {
                return out.push(refuse(from, Refusal::Duplicate));
            }
            // Two different signed commits for one round: neither is merged, and the first
            // stays on record as evidence.
            if !matches!(slot.state, SlotState::Rejected(_)) {
                slot.state = SlotState::Rejected(RejectReason::Equivocation);
            }
            return out.push(refuse(from, Refusal::Equivocation));
        }
        let late =
            self.phase != Phase::Training || now > self.round.commit_until.max(self.grace_until);
        let state = if late {
            out.push(refuse(from, Refusal::Late));
            SlotState::Rejected(RejectReason::Late)
        } else if commit.shards != assigned.shards {
            SlotState::Rejected(RejectReason::WrongShards)
        } else {
            SlotState::Received
        };
        if late && self.phase == Phase::Merging {
            // The merge inputs are fixed; a late commit is refused without changing the record
            // the merge is being computed for.
            return;
        }
        self.round.commits.insert(
            from,
            CommitSlot {
                commit: m,
                tokens: commit.tokens,
                state,
            },
        );
    }

    fn on_verified(&mut self, worker: PeerId, commit: ContentHash, result: Verification) {
        if self.phase != Phase::Verifying {
            return;
        }
        let Some(slot) = self.round.commits.get_mut(&worker) else {
            return;
        };
        if slot.commit.hash() != commit || slot.state != SlotState::Verifying {
            return;
        }
        slot.state = match result {
            Verification::Passed { delta_norm } if delta_norm.is_finite() => {
                SlotState::Passed { delta_norm }
            }
            Verification::Passed { .. } => SlotState::Rejected(RejectReason::NonFinite),
            Verification::Failed(r) => SlotState::Rejected(r),
        };
    }

    /// Moves through as many phases as the current state and time allow.
    fn advance(&mut self, now: Timestamp, keypair: &Keypair, out: &mut Vec<CoordinatorAction>) {
        loop {
            let before = self.phase;
            match self.phase {
                Phase::Enrolling => {
                    let joined = self.round.joins.len();
                    let full = joined >= self.spec.quorum.max_workers as usize;
                    let due = now >= self.round.open_payload().enroll_until;
                    // Without enough volunteers for a quorum the round keeps enrolling: closing
                    // it would only burn a round.
                    if full || (due && joined >= self.spec.quorum.min_updates as usize) {
                        self.start_training(now, keypair, out);
                    } else if now >= self.give_up_enrolling_at() {
                        // Too few volunteers for too long: the round ends unmerged, so that a
                        // job without volunteers finishes instead of waiting for ever.
                        self.close(now, RoundOutcome::NoQuorum, None, keypair, out);
                        return;
                    }
                }
                Phase::Training => {
                    let assigned = self.round.work.len();
                    let all_in = self.round.commits.len() >= assigned;
                    if all_in || now >= self.round.commit_until.max(self.grace_until) {
                        self.start_verifying(now, out);
                    }
                }
                Phase::Verifying => {
                    let pending = self
                        .round
                        .commits
                        .values()
                        .any(|s| s.state == SlotState::Verifying);
                    if pending && now >= self.round.verify_until {
                        for s in self.round.commits.values_mut() {
                            if s.state == SlotState::Verifying {
                                s.state = SlotState::Rejected(RejectReason::Unavailable);
                            }
                        }
                    }
                    if !pending || now >= self.round.verify_until {
                        self.end_verification(now, out);
                    }
                }
                Phase::Filtering => {
                    if now >= self.round.filter_until {
                        // No distances in time: merging the updates unfiltered would defeat
                        // the filter, so the round closes unmerged (the passed updates are
                        // `NotMerged`).
                        self.start_merging(false, out);
                    }
                }
                Phase::Merging | Phase::Finished => {}
            }
            if self.phase == before {
                return;
            }
        }
    }

    fn start_training(
        &mut self,
        now: Timestamp,
        keypair: &Keypair,
        out: &mut Vec<CoordinatorAction>,
    ) {
        let workers: Vec<PeerId> = self.round.joins.keys().copied().collect();
        let shards: Vec<(ContentHash, u32)> =
            self.shards.iter().map(|s| (s.hash, s.group)).collect();
        let work = assign(
            self.round.seed,
            &workers,
            &shards,
            self.spec.quorum.max_workers as usize,
        );
        self.round.commit_until = after(now, self.spec.deadlines.train_ms);
        self.round.work = work.iter().map(|w| (w.worker, w.clone())).collect();
        let signed = Signed::sign(
            keypair,
            &Assignment {
                job: self.job,
                round: self.round.number,
                work,
                commit_until: self.round.commit_until,
            },
        );
        self.round.assignment = Some(signed.clone());
        self.phase = Phase::Training;
        out.push(CoordinatorAction::Publish(Published::Assignment(signed)));
        out.push(CoordinatorAction::WakeAt(self.round.commit_until));
    }

    fn start_verifying(&mut self, now: Timestamp, out: &mut Vec<CoordinatorAction>) {
        self.round.verify_until = after(now, self.spec.deadlines.validate_ms);
        self.phase = Phase::Verifying;
        let start = self.adapter;
        let mut actions = Vec::new();
        for slot in self.round.commits.values_mut() {
            if slot.state == SlotState::Received {
                slot.state = SlotState::Verifying;
                actions.push(slot.clone());
            }
        }
        for slot in &actions {
            out.push(self.verify_action(start, slot));
        }
        out.push(CoordinatorAction::WakeAt(self.round.verify_until));
    }

    fn verify_action(&self, start: Option<ContentHash>, slot: &CommitSlot) -> CoordinatorAction {
        let segments = slot.commit.verify().map(|c| c.segments.len()).unwrap_or(0);
        CoordinatorAction::Verify {
            round: self.round.number,
            start,
            commit: slot.commit.clone(),
            audit: audited_segments(
                &self.audit_secret,
                &slot.commit.hash(),
                segments,
                self.spec.verification.audit_ppm,
            ),
        }
    }

    /// Verification is over: applies the norm bound, then either asks for the robust filter's
    /// distances or goes on to the merge.
    fn end_verification(&mut self, now: Timestamp, out: &mut Vec<CoordinatorAction>) {
        // The norm bound: an update whose delta is more than `norm_bound_ppm / 1e6` times the
        // median of the round's passed updates is refused. The median is robust to a minority
        // of oversized updates, which is what the bound is for.
        let mut norms: Vec<f64> = self
            .round
            .commits
            .values()
            .filter_map(|s| match s.state {
                SlotState::Passed { delta_norm } => Some(delta_norm),
                _ => None,
            })
            .collect();
        norms.sort_by(f64::total_cmp);
        if !norms.is_empty() {
            let n = norms.len();
            let median = if n % 2 == 1 {
                norms[n / 2]
            } else {
                0.5 * (norms[n / 2 - 1] + norms[n / 2])
            };
            let bound = median * f64::from(self.spec.verification.norm_bound_ppm) / 1e6;
            for s in self.round.commits.values_mut() {
                if let SlotState::Passed { delta_norm } = s.state
                    && delta_norm > bound
                {
                    s.state = SlotState::Rejected(RejectReason::NormBound);
                }
            }
        }
        let m = self.passed_count();
        let f = self.filter_budget(m);
        if m - f < self.spec.quorum.min_updates as usize {
            // Even a merge of every update the filter would keep misses the quorum.
            self.start_merging(false, out);
        } else if f == 0 {
            self.start_merging(true, out);
        } else {
            self.round.filter_until = after(now, self.spec.deadlines.validate_ms);
            self.phase = Phase::Filtering;
            out.push(self.distances_action());
            out.push(CoordinatorAction::WakeAt(self.round.filter_until));
        }
    }

    fn passed_count(&self) -> usize {
        self.round
            .commits
            .values()
            .filter(|s| matches!(s.state, SlotState::Passed { .. }))
            .count()
    }

    /// How many of `m` passed updates the robust filter refuses ([`filter_budget`]): the job's
    /// `f` less this round's updates refused for misbehaviour, lowered to `m − 3` when there are
    /// too few updates to score with it (Multi-Krum needs `m ≥ f + 3`).
    fn filter_budget(&self, m: usize) -> usize {
        let caught = self
            .round
            .commits
            .values()
            .filter(|s| matches!(&s.state, SlotState::Rejected(r) if bars(r)))
            .count();
        filter_budget(
            self.spec.verification.robust.byzantine() as usize,
            caught,
            m,
        )
    }

    /// The updates the filter compares: the passed ones, sorted by worker.
    fn filter_inputs(&self) -> Vec<FilterInput> {
        self.round
            .commits
            .iter()
            .filter(|(_, s)| matches!(s.state, SlotState::Passed { .. }))
            .filter_map(|(w, s)| {
                Some(FilterInput {
                    worker: *w,
                    update: s.commit.verify().ok()?.update,
                    commit: s.commit.hash(),
                })
            })
            .collect()
    }

    fn distances_action(&self) -> CoordinatorAction {
        CoordinatorAction::Distances {
            round: self.round.number,
            updates: self.filter_inputs(),
        }
    }

    fn on_distances(
        &mut self,
        round: u32,
        commits: &[ContentHash],
        dist: &[f64],
        out: &mut Vec<CoordinatorAction>,
    ) {
        if self.phase != Phase::Filtering || round != self.round.number {
            return;
        }
        let inputs = self.filter_inputs();
        let m = inputs.len();
        let fits = inputs.iter().map(|i| &i.commit).eq(commits)
            && dist.len() == m * m
            && (0..m).all(|i| {
                (0..m).all(|j| {
                    let d = dist[i * m + j];
                    i == j || (d.is_finite() && d >= 0.0 && d == dist[j * m + i])
                })
            });
        if !fits {
            // A driver bug or an answer to an older request: ignore it; the filter deadline
            // still ends the round.
            return;
        }
        let Some(outliers) = super::multi_krum_outliers(dist, m, self.filter_budget(m)) else {
            return;
        };
        for i in outliers {
            if let Some(slot) = self.round.commits.get_mut(&inputs[i].worker) {
                slot.state = SlotState::Rejected(RejectReason::Outlier);
            }
        }
        self.start_merging(true, out);
    }

    /// Fixes the merge inputs (the passed updates when `merge` and they make the quorum,
    /// otherwise none) and asks the driver to merge.
    fn start_merging(&mut self, merge: bool, out: &mut Vec<CoordinatorAction>) {
        let passed: Vec<(&PeerId, &CommitSlot)> = self
            .round
            .commits
            .iter()
            .filter(|(_, s)| matches!(s.state, SlotState::Passed { .. }))
            .collect();
        self.round.merge_inputs = if merge && passed.len() >= self.spec.quorum.min_updates as usize
        {
            let weights =
                super::merge_weights(&passed.iter().map(|(_, s)| s.tokens).collect::<Vec<_>>());
            passed
                .iter()
                .zip(weights)
                .filter_map(|((w, s), weight)| {
                    let c = s.commit.verify().ok()?;
                    Some(MergeInput {
                        worker: **w,
                        update: c.update,
                        commit: s.commit.hash(),
                        weight,
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        self.phase = Phase::Merging;
        out.push(self.merge_action());
    }

    fn merge_action(&self) -> CoordinatorAction {
        CoordinatorAction::Merge {
            round: self.round.number,
            start: self.adapter,
            updates: self.round.merge_inputs.clone(),
            seed: self.round.seed,
        }
    }

    fn on_merged(
        &mut self,
        now: Timestamp,
        result: MergeOutcome,
        keypair: &Keypair,
        out: &mut Vec<CoordinatorAction>,
    ) {
        let fits = self.phase == Phase::Merging
            && result.round == self.round.number
            && result.values.len() == self.round.merge_inputs.len()
            && result.loss_before.is_finite()
            && result.loss_after.is_finite()
            && result.truncation_error.is_finite()
            && result.values.iter().all(|v| v.is_finite())
            && (result.adapter.is_some() || self.round.merge_inputs.is_empty());
        if !fits {
            // A driver bug or a result for an older round: ignore it; the merge is re-issued
            // on restart.
            return;
        }
        let mut outcome = if self.round.merge_inputs.is_empty() {
            RoundOutcome::NoQuorum
        } else {
            RoundOutcome::Merged
        };
        if outcome == RoundOutcome::Merged
            && let Some(es) = self.spec.early_stopping
        {
            match self.best_loss {
                Some(best) if result.loss_after > best - es.min_delta => {
                    self.rounds_without_gain += 1;
                }
                _ => {
                    self.best_loss = Some(result.loss_after);
                    self.rounds_without_gain = 0;
                }
            }
            if self.rounds_without_gain >= es.patience {
                outcome = RoundOutcome::Stopped;
            }
        }
        self.close(now, outcome, Some(result), keypair, out);
    }

    fn close(
        &mut self,
        now: Timestamp,
        outcome: RoundOutcome,
        result: Option<MergeOutcome>,
        keypair: &Keypair,
        out: &mut Vec<CoordinatorAction>,
    ) {
        let merged = matches!(outcome, RoundOutcome::Merged | RoundOutcome::Stopped);
        let in_merge = |w: &PeerId| self.round.merge_inputs.iter().any(|m| m.worker == *w);
        let verdicts: Vec<UpdateVerdict> = self
            .round
            .commits
            .iter()
            .map(|(w, s)| UpdateVerdict {
                worker: *w,
                commit: s.commit.hash(),
                rejected: match &s.state {
                    SlotState::Rejected(r) => Some(r.clone()),
                    _ if merged && in_merge(w) => None,
                    _ => Some(RejectReason::NotMerged),
                },
            })
            .collect();
        for v in &verdicts {
            if let Some(reason) = v.rejected.as_ref().filter(|r| bars(r)) {
                self.barred
                    .entry(v.worker)
                    .or_insert((self.round.number, reason.clone()));
            }
        }
        let compute: Vec<ComputeCredit> = self
            .round
            .commits
            .iter()
            .map(|(w, s)| ComputeCredit {
                peer: *w,
                commit: s.commit.hash(),
                tokens: s.tokens,
                // An outlier passed every check of its work; the filter refuses `f` updates
                // in every round it runs, honest ones included.
                verified: matches!(
                    s.state,
                    SlotState::Passed { .. } | SlotState::Rejected(RejectReason::Outlier)
                ),
            })
            .collect();
        let (before, after_loss, trunc) = match &result {
            Some(r) => (r.loss_before, r.loss_after, r.truncation_error),
            None => {
                let l = self.last_loss.unwrap_or(0.0);
                (l, l, 0.0)
            }
        };
        let data = match (&result, merged) {
            (Some(r), true) => self.data_credits(r),
            _ => Vec::new(),
        };
        if merged && let Some(r) = &result {
            self.adapter = r.adapter;
        }
        if result.is_some() {
            self.last_loss = Some(after_loss);
        }
        let close = Signed::sign(
            keypair,
            &RoundClose {
                job: self.job,
                round: self.round.number,
                outcome,
                verdicts,
                merged_adapter: self.adapter,
                truncation_error: trunc,
                validation_loss_before: before,
                validation_loss_after: after_loss,
                closed_at: now,
            },
        );
        let record = super::RoundRecord {
            open: self.round.open.clone(),
            assignment: self.round.assignment.clone(),
            close: close.clone(),
            merged: if merged {
                self.round
                    .merge_inputs
                    .iter()
                    .filter_map(|m| self.round.commits.get(&m.worker))
                    .map(|s| s.commit.clone())
                    .collect()
            } else {
                Vec::new()
            },
            filtered: if merged {
                self.round
                    .commits
                    .values()
                    .filter(|s| s.state == SlotState::Rejected(RejectReason::Outlier))
                    .map(|s| s.commit.clone())
                    .collect()
            } else {
                Vec::new()
            },
            shards: self.shards.clone(),
        };
        out.push(CoordinatorAction::Close {
            close: close.clone(),
            record: Box::new(record),
            data,
            compute,
        });
        out.push(CoordinatorAction::Publish(Published::Close(close)));
        let last = self.round.number + 1 >= self.spec.rounds;
        if last || matches!(outcome, RoundOutcome::Cancelled | RoundOutcome::Stopped) {
            self.phase = Phase::Finished;
            out.push(CoordinatorAction::Finished {
                outcome,
                adapter: self.adapter,
            });
            return;
        }
        self.round = Self::open_round(
            &self.job,
            &self.spec,
            keypair,
            self.round.number + 1,
            self.adapter,
            now,
        );
        self.phase = Phase::Enrolling;
        out.extend(self.announce_current());
    }

    fn data_credits(&self, r: &MergeOutcome) -> Vec<ShardCredit> {
        let assignment = Assignment {
            job: self.job,
            round: self.round.number,
            work: self.round.work.values().cloned().collect(),
            commit_until: self.round.commit_until,
        };
        let values: Vec<(PeerId, f64)> = self
            .round
            .merge_inputs
            .iter()
            .map(|m| m.worker)
            .zip(r.values.iter().copied())
            .collect();
        round_data_credits(
            &assignment,
            &self.shards,
            &values,
            r.loss_before,
            r.loss_after,
        )
    }
}

/// Per-shard data credit of a merged round, from each merged worker's Shapley value.
///
/// A worker's value goes to its assigned shards in proportion to their tokens; then
/// [`shard_credits`] pools near-duplicate groups, zeroes harmful ones and splits the round's
/// gain exactly. Anyone holding the round's assignment, the job's shards and the values
/// computes the same credits (`cohort ledger verify` does).
pub fn round_data_credits(
    assignment: &Assignment,
    shards: &[PlannedShard],
    values: &[(PeerId, f64)],
    loss_before: f32,
    loss_after: f32,
) -> Vec<ShardCredit> {
    let mut per_shard: BTreeMap<ContentHash, f64> = BTreeMap::new();
    for (worker, value) in values {
        let Some(work) = assignment.work.iter().find(|w| w.worker == *worker) else {
            continue;
        };
        let planned: Vec<&PlannedShard> = work
            .shards
            .iter()
            .filter_map(|h| shards.iter().find(|s| s.hash == *h))
            .collect();
        let tokens: u64 = planned.iter().map(|s| s.tokens.max(1)).sum();
        for s in planned {
            *per_shard.entry(s.hash).or_default() += value * s.tokens.max(1) as f64 / tokens as f64;
        }
    }
    let gain = f64::from(loss_before) - f64::from(loss_after);
    let trained: Vec<PlannedShard> = shards
        .iter()
        .filter(|s| per_shard.contains_key(&s.hash))
        .copied()
        .collect();
    let values: Vec<f64> = trained.iter().map(|s| per_shard[&s.hash]).collect();
    shard_credits(&trained, &values, gain)
}

impl Round {
    fn open_payload(&self) -> RoundOpen {
        // Signed by the coordinator itself.
        self.open.verify().unwrap_or_else(|_| RoundOpen {
            job: JobId(ContentHash::of(b"")),
            round: self.number,
            start_adapter: None,
            seed: self.seed,
            opened_at: Timestamp(0),
            enroll_until: Timestamp(0),
        })
    }
}

fn refuse(from: PeerId, why: Refusal) -> CoordinatorAction {
    CoordinatorAction::Refused { from, why }
}

/// Credit per shard for one merged round.
///
/// `values[i]` is shard `shards[i]`'s share of the Shapley values, in nats. Shards of one
/// near-duplicate group pool their values: the group is one source, and its credit is split
/// equally among its shards (flagged [`crate::types::CreditFlag::Duplicate`]), so copying a shard under more
/// identities does not raise the source's total. The round's data budget is its gain
/// `max(0, loss_before - loss_after)` in [`crate::types::Credit`] units, split by
/// [`crate::attribution::data_credits`]: harmful groups are flagged and earn nothing,
/// near-zero ones earn nothing, and the positive ones split the budget exactly in proportion
/// to their values. [`ShardCredit::value`] records what each shard earned.
pub fn shard_credits(shards: &[PlannedShard], values: &[f64], gain: f64) -> Vec<ShardCredit> {
    use crate::attribution::{CreditConfig, data_credits, nats_to_credit};
    // Dense group numbers in order of first appearance, and each group's pooled value.
    let mut dense: BTreeMap<u32, usize> = BTreeMap::new();
    let mut groups = Vec::with_capacity(shards.len());
    let mut group_values: Vec<f64> = Vec::new();
    for (s, v) in shards.iter().zip(values) {
        let next = dense.len();
        let g = *dense.entry(s.group).or_insert(next);
        if g == group_values.len() {
            group_values.push(0.0);
        }
        group_values[g] += v;
        groups.push(g);
    }
    let hashes: Vec<ContentHash> = shards.iter().map(|s| s.hash).collect();
    let budget = nats_to_credit(gain.max(0.0));
    let awards = data_credits(
        budget,
        &hashes,
        &groups,
        &group_values,
        &CreditConfig::default(),
    )
    // Only non-finite values fail, and `on_merged` refuses those before this point.
    .unwrap_or_default();
    let mut out: Vec<ShardCredit> = shards
        .iter()
        .zip(awards)
        .map(|(s, a)| ShardCredit {
            shard: s.hash,
            datanet: s.datanet,
            contributor: s.contributor,
            value: a.earned,
            flag: a.flag,
        })
        .collect();
    out.sort_by_key(|c| c.shard);
    out
}
