//! The `cohort/1` request/response protocol: one request and one response per bidirectional
//! QUIC stream, each a length-prefixed frame (u32 little-endian length, then the canonical
//! encoding), decoded with [`MAX_FRAME_BYTES`] as the limit.
//!
//! The version is in the ALPN (`cohort/1`) and again in each [`Request`]: a peer answers a
//! request of a version it does not speak with [`Response::Refused`]. Variants are only ever
//! appended.

use bincode::{Decode, Encode};

use super::datanet::{DatanetId, Grant, Manifest, ShardSubmission, SubmissionDecision};
use super::job::{JobId, JobSpec};
use super::ledger::LedgerEntry;
use super::round::{Assignment, RoundClose, RoundJoin, RoundOpen, UpdateCommit};
use crate::hash::ContentHash;
use crate::identity::PeerId;
use crate::signed::Signed;

/// Most ledger entries in one [`Response::Ledger`].
pub const MAX_LEDGER_ENTRIES_PER_RESPONSE: u32 = 256;

/// The ALPN of the request/response protocol.
pub const ALPN: &[u8] = b"cohort/1";
/// The request version this build speaks.
pub const RPC_VERSION: u16 = 1;
/// The largest frame, in bytes (a manifest of [`super::datanet::MAX_SHARDS`] shards fits).
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// One request.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Request {
    /// [`RPC_VERSION`] of the sender.
    pub version: u16,
    /// What is asked.
    pub body: RequestBody,
}

/// What a request asks.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum RequestBody {
    /// The latest manifest of every datanet the peer knows (anti-entropy).
    Heads,
    /// One signed manifest by the hash of its encoding.
    GetManifest {
        /// `Signed<Manifest>::hash()`.
        hash: ContentHash,
    },
    /// An encoded `Signed<Announcement>` pushed directly; checked exactly like one from gossip.
    Announce {
        /// The encoded announcement.
        bytes: Vec<u8>,
    },
    /// A shard submission for a datanet the receiver owns.
    Submit {
        /// The contributor's signed submission.
        submission: Signed<ShardSubmission>,
    },
    /// The caller's grants (wrapped datanet keys) for a private datanet.
    GetGrants {
        /// The datanet.
        datanet: DatanetId,
    },
    /// The owner's decision on a submission, sent to its contributor.
    Decision {
        /// The owner's signed decision.
        decision: Signed<SubmissionDecision>,
    },
    /// A job's signed spec, from its owner.
    GetJob {
        /// The job.
        job: JobId,
    },
    /// The current round of a job, from its coordinator: its open, its assignment once made,
    /// and the last close.
    GetRound {
        /// The job.
        job: JobId,
    },
    /// A volunteer asks to take part in the current round.
    Join {
        /// The signed join.
        join: Signed<RoundJoin>,
    },
    /// A worker commits its update.
    Commit {
        /// The signed commit.
        commit: Signed<UpdateCommit>,
    },
    /// Ledger entries of one coordinator's chain, from position `from` on (at most
    /// [`MAX_LEDGER_ENTRIES_PER_RESPONSE`]).
    GetLedger {
        /// The chain's coordinator.
        coordinator: PeerId,
        /// The first position wanted.
        from: u64,
    },
    /// Which blob holds a training-state snapshot, from the worker that committed to it.
    GetSnapshot {
        /// The state hash, as committed in a segment.
        state: ContentHash,
    },
    /// The unfinished jobs this peer coordinates (anti-entropy for volunteers).
    Jobs,
    /// A closed round's record, from its coordinator.
    GetRoundRecord {
        /// The job.
        job: JobId,
        /// The round.
        round: u32,
    },
}

/// One datanet's latest version, as a peer knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Head {
    /// The datanet.
    pub datanet: DatanetId,
    /// Its latest version.
    pub version: u64,
    /// The hash of that version's signed manifest.
    pub manifest: ContentHash,
}

/// The answer to a request.
// Built once and written out at once; boxing the large variants would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Response {
    /// Answer to [`RequestBody::Heads`].
    Heads {
        /// Sorted by datanet.
        heads: Vec<Head>,
    },
    /// Answer to [`RequestBody::GetManifest`]; `None` if the peer does not hold it.
    Manifest {
        /// The manifest.
        manifest: Option<Signed<Manifest>>,
    },
    /// The request was accepted.
    Accepted,
    /// The request was refused.
    Refused {
        /// Why.
        reason: String,
    },
    /// Answer to [`RequestBody::GetGrants`]: every key epoch granted to the caller.
    Grants {
        /// Sorted by key epoch.
        grants: Vec<Signed<Grant>>,
    },
    /// Answers [`RequestBody::GetJob`].
    Job {
        /// The spec, if this peer holds it.
        spec: Option<Signed<JobSpec>>,
    },
    /// Answers [`RequestBody::GetRound`].
    Round {
        /// The current round's open.
        open: Option<Signed<RoundOpen>>,
        /// Its assignment, once made.
        assignment: Option<Signed<Assignment>>,
        /// The last closed round's close.
        last_close: Option<Signed<RoundClose>>,
    },
    /// Answers [`RequestBody::GetLedger`], in order of position.
    Ledger {
        /// The entries.
        entries: Vec<Signed<LedgerEntry>>,
    },
    /// Answers [`RequestBody::GetSnapshot`].
    Snapshot {
        /// The blob, if this peer holds the snapshot.
        blob: Option<ContentHash>,
    },
    /// Answers [`RequestBody::Jobs`].
    Jobs {
        /// The jobs.
        jobs: Vec<JobId>,
    },
    /// Answers [`RequestBody::GetRoundRecord`].
    RoundRecord {
        /// The record, if this peer coordinated that round.
        record: Option<Box<crate::rounds::RoundRecord>>,
    },
}
