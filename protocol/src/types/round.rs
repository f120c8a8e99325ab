//! Round messages: open, join, assignment, update commit, close.
//!
//! The coordinator (the job's owner) signs [`RoundOpen`], [`Assignment`] and [`RoundClose`];
//! each volunteer signs its [`RoundJoin`] and [`UpdateCommit`]. The state machines that produce
//! and consume these live in `protocol` too, without I/O.

use bincode::{Decode, Encode};

use super::job::JobId;
use super::{Check, InvalidMessage, Timestamp, check_hash_set};
use crate::hash::ContentHash;
use crate::identity::PeerId;
use crate::signed::SignedPayload;

/// Most shards assigned to one worker in one round.
pub const MAX_SHARDS_PER_WORKER: usize = 256;
/// Most workers in one assignment.
pub const MAX_WORKERS: usize = 16_384;
/// Most loss values in one commit (a long run reports a subsample).
pub const MAX_LOSSES: usize = 4096;
/// Most segment commitments in one update.
pub const MAX_SEGMENTS: usize = 4096;
/// Longest backend / kernel name, in bytes.
pub const MAX_KERNEL_NAME_BYTES: usize = 64;

/// The round opens: volunteers may join until `enroll_until`.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct RoundOpen {
    /// The job.
    pub job: JobId,
    /// Round number, from 0.
    pub round: u32,
    /// The adapter every worker starts from (`None`: fresh PEFT initialisation from the seed).
    pub start_adapter: Option<ContentHash>,
    /// The round's seed (assignment, data order, audits), derived from the job seed.
    pub seed: u64,
    /// When the round opened.
    pub opened_at: Timestamp,
    /// Joins after this are ignored.
    pub enroll_until: Timestamp,
}

impl SignedPayload for RoundOpen {
    const DOMAIN: &'static str = "cohort/round-open/v1";
}

/// The numerical kernel a peer trains with. Spot checks compare bit for bit only between peers
/// of one kernel class (gemm's AVX2 and AVX-512 paths give different bits).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub struct KernelClass {
    /// The burn backend, e.g. `flex`, `cuda`.
    pub backend: String,
    /// The kernel family, e.g. `x86-v4` (AVX-512) or `x86-v3` (AVX2).
    pub kernel: String,
    /// Threads used for reductions whose order depends on it.
    pub threads: u16,
}

impl KernelClass {
    fn validate(&self, c: &Check) -> Result<(), InvalidMessage> {
        c.non_empty_text("kernel.backend", &self.backend, MAX_KERNEL_NAME_BYTES)?;
        c.non_empty_text("kernel.kernel", &self.kernel, MAX_KERNEL_NAME_BYTES)
    }
}

/// What a volunteer offers.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Capacity {
    /// Its kernel class.
    pub kernel: KernelClass,
    /// CPU cores or GPU count it lends.
    pub cores: u16,
    /// Memory it lends, in MiB.
    pub memory_mib: u64,
    /// Base models it already holds (strictly increasing).
    pub models: Vec<ContentHash>,
}

/// A volunteer asks to work in a round; the signer is the volunteer.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct RoundJoin {
    /// The job.
    pub job: JobId,
    /// The round.
    pub round: u32,
    /// What it offers.
    pub capacity: Capacity,
}

impl SignedPayload for RoundJoin {
    const DOMAIN: &'static str = "cohort/round-join/v1";
}

impl RoundJoin {
    /// Checks the join's own rules.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let c = Check("round join");
        self.capacity.kernel.validate(&c)?;
        check_hash_set(&c, "capacity.models", &self.capacity.models, 64)
    }
}

/// One worker's share of a round.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct WorkAssignment {
    /// The worker.
    pub worker: PeerId,
    /// The shards it trains on (strictly increasing).
    pub shards: Vec<ContentHash>,
    /// Its training seed.
    pub seed: u64,
}

/// The coordinator's seeded assignment of shards to workers.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Assignment {
    /// The job.
    pub job: JobId,
    /// The round.
    pub round: u32,
    /// Per worker, strictly increasing by worker.
    pub work: Vec<WorkAssignment>,
    /// Update commits after this are late.
    pub commit_until: Timestamp,
}

impl SignedPayload for Assignment {
    const DOMAIN: &'static str = "cohort/assignment/v1";
}

impl Assignment {
    /// Checks the assignment's own rules.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let c = Check("assignment");
        c.len("work", &self.work, MAX_WORKERS)?;
        c.strictly_sorted("work", &self.work, |w| w.worker)?;
        for w in &self.work {
            if w.shards.is_empty() {
                return Err(c.fail(
                    "work.shards",
                    format!("worker {} has no shards", w.worker.short()),
                ));
            }
            check_hash_set(&c, "work.shards", &w.shards, MAX_SHARDS_PER_WORKER)?;
        }
        Ok(())
    }
}

/// A commitment to the training state after a segment of K steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct SegmentCommit {
    /// The optimiser step the segment ends at.
    pub end_step: u32,
    /// The hash of the adapter and optimiser state at `end_step`.
    pub state: ContentHash,
    /// The Merkle root of the segment's batch indices.
    pub batches: ContentHash,
}

/// A worker's signed claim: "I trained this update on these shards".
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct UpdateCommit {
    /// The job.
    pub job: JobId,
    /// The round.
    pub round: u32,
    /// The hash of the update's adapter blob (PEFT safetensors).
    pub update: ContentHash,
    /// The shards it was trained on (strictly increasing).
    pub shards: Vec<ContentHash>,
    /// Tokens processed.
    pub tokens: u64,
    /// Optimiser steps taken.
    pub steps: u32,
    /// Training loss per step (or an even subsample of at most [`MAX_LOSSES`]).
    pub losses: Vec<f32>,
    /// The training seed used.
    pub seed: u64,
    /// The kernel class it ran on.
    pub kernel: KernelClass,
    /// Commitments every K steps, strictly increasing by step.
    pub segments: Vec<SegmentCommit>,
}

impl SignedPayload for UpdateCommit {
    const DOMAIN: &'static str = "cohort/update-commit/v1";
}

impl UpdateCommit {
    /// Checks the commit's own rules.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let c = Check("update commit");
        check_hash_set(&c, "shards", &self.shards, MAX_SHARDS_PER_WORKER)?;
        if self.shards.is_empty() {
            return Err(c.fail("shards", "an update is trained on at least one shard"));
        }
        c.len("losses", &self.losses, MAX_LOSSES)?;
        if let Some(i) = self.losses.iter().position(|l| !l.is_finite()) {
            return Err(c.fail("losses", format!("entry {i} is not finite")));
        }
        self.kernel.validate(&c)?;
        c.len("segments", &self.segments, MAX_SEGMENTS)?;
        c.strictly_sorted("segments", &self.segments, |s| s.end_step)?;
        if self
            .segments
            .last()
            .is_some_and(|s| s.end_step > self.steps)
        {
            return Err(c.fail("segments", "a segment ends after the last step"));
        }
        Ok(())
    }
}

/// Why an update was not merged.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum RejectReason {
    /// The adapter's tensors do not have the job's shapes.
    Shape,
    /// NaN or infinite values.
    NonFinite,
    /// The delta's norm exceeded the bound relative to the round's median.
    NormBound,
    /// A re-executed segment did not reproduce the committed state.
    SpotCheckMismatch {
        /// The segment's end step.
        end_step: u32,
    },
    /// The commit or its blob arrived after the deadline.
    Late,
    /// The blob could not be fetched.
    Unavailable,
    /// The worker trained shards it was not assigned.
    WrongShards,
    /// The worker signed two different commits for the round.
    Equivocation,
    /// It passed its checks, but the round merged nothing (no quorum, or the job was
    /// cancelled).
    NotMerged,
    /// It passed its checks and the norm bound, but the job's Byzantine-robust filter
    /// ([`crate::types::RobustAggregation`]) found it farthest from the round's other updates.
    /// Not evidence of misbehaviour on its own (Multi-Krum refuses `f` updates in every round
    /// it filters): the work still counts as verified for compute credit.
    Outlier,
}

/// The coordinator's verdict on one update.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct UpdateVerdict {
    /// The worker.
    pub worker: PeerId,
    /// The hash of its signed commit.
    pub commit: ContentHash,
    /// `None` if accepted and merged.
    pub rejected: Option<RejectReason>,
}

/// How a round ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum RoundOutcome {
    /// Updates were merged.
    Merged,
    /// Too few verified updates by the deadline; the start adapter carries over.
    NoQuorum,
    /// The owner cancelled the job.
    Cancelled,
    /// Early stopping ended the job after this round.
    Stopped,
}

/// The round closes: what was merged and how well it did.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct RoundClose {
    /// The job.
    pub job: JobId,
    /// The round.
    pub round: u32,
    /// How it ended.
    pub outcome: RoundOutcome,
    /// Per update, strictly increasing by worker.
    pub verdicts: Vec<UpdateVerdict>,
    /// The merged adapter (the start adapter when nothing was merged).
    pub merged_adapter: Option<ContentHash>,
    /// Eckart–Young truncation error of the re-factored merge (Frobenius, relative).
    pub truncation_error: f32,
    /// Validation loss of the start adapter.
    pub validation_loss_before: f32,
    /// Validation loss of the merged adapter.
    pub validation_loss_after: f32,
    /// When it closed.
    pub closed_at: Timestamp,
}

impl SignedPayload for RoundClose {
    const DOMAIN: &'static str = "cohort/round-close/v1";
}

impl RoundClose {
    /// Checks the close's own rules.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let c = Check("round close");
        c.len("verdicts", &self.verdicts, MAX_WORKERS)?;
        c.strictly_sorted("verdicts", &self.verdicts, |v| v.worker)?;
        c.finite("truncation_error", self.truncation_error)?;
        c.finite("validation_loss_before", self.validation_loss_before)?;
        c.finite("validation_loss_after", self.validation_loss_after)?;
        Ok(())
    }
}
