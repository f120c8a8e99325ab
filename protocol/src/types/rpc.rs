//! The `cohort/1` request/response protocol: one request and one response per bidirectional
//! QUIC stream, each a length-prefixed frame (u32 little-endian length, then the canonical
//! encoding), decoded with [`MAX_FRAME_BYTES`] as the limit.
//!
//! The version is in the ALPN (`cohort/1`) and again in each [`Request`]: a peer answers a
//! request of a version it does not speak with [`Response::Refused`]. Variants are only ever
//! appended.

use bincode::{Decode, Encode};

use super::datanet::{DatanetId, Grant, Manifest, ShardSubmission, SubmissionDecision};
use crate::hash::ContentHash;
use crate::signed::Signed;

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
}
