//! Gossip announcements: small signed notices that something new exists.
//!
//! Bodies travel as blobs; an announcement carries only ids and hashes. Every encoded signed
//! announcement must fit in [`MAX_ANNOUNCEMENT_BYTES`], below iroh-gossip's default 4096-byte
//! message limit (an oversize broadcast is dropped silently by gossip, so senders check first
//! with [`encode_announcement`]). iroh-gossip deduplicates identical messages, so each carries
//! the signer's sequence number and a timestamp.

use bincode::{Decode, Encode};

use super::datanet::DatanetId;
use super::job::JobId;
use super::round::Capacity;
use super::{Check, InvalidMessage, Timestamp, check_hash_set};
use crate::encoding::{self, DecodeError};
use crate::hash::ContentHash;
use crate::signed::{Signed, SignedPayload};

/// The largest encoded `Signed<Announcement>`, in bytes.
pub const MAX_ANNOUNCEMENT_BYTES: usize = 4000;
/// Most hashes in one [`AnnouncementBody::Provides`].
pub const MAX_PROVIDED: usize = 64;

/// What is announced.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum AnnouncementBody {
    /// A datanet version was published.
    Manifest {
        /// The datanet.
        datanet: DatanetId,
        /// The version.
        version: u64,
        /// The hash of the signed manifest.
        manifest: ContentHash,
    },
    /// A shard submission was sent to a datanet's owner.
    Submission {
        /// The datanet.
        datanet: DatanetId,
        /// The hash of the signed submission.
        submission: ContentHash,
    },
    /// A job was created.
    Job {
        /// The job.
        job: JobId,
    },
    /// A job was cancelled by its owner.
    JobCancelled {
        /// The job.
        job: JobId,
    },
    /// A round opened.
    RoundOpened {
        /// The job.
        job: JobId,
        /// The round.
        round: u32,
        /// The hash of the signed [`super::RoundOpen`].
        open: ContentHash,
    },
    /// A worker committed an update.
    UpdateCommitted {
        /// The job.
        job: JobId,
        /// The round.
        round: u32,
        /// The hash of the signed [`super::UpdateCommit`].
        commit: ContentHash,
    },
    /// A round closed.
    RoundClosed {
        /// The job.
        job: JobId,
        /// The round.
        round: u32,
        /// The hash of the signed [`super::RoundClose`].
        close: ContentHash,
    },
    /// The signer's ledger chain has a new head.
    LedgerHead {
        /// The head's position.
        seq: u64,
        /// The hash of the signed head entry.
        head: ContentHash,
    },
    /// The signer serves these blobs (feeds the local content-routing index).
    Provides {
        /// Strictly increasing, at most [`MAX_PROVIDED`].
        hashes: Vec<ContentHash>,
    },
    /// The signer volunteers compute.
    Volunteer {
        /// What it offers.
        capacity: Capacity,
    },
}

/// A signed gossip notice.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Announcement {
    /// The signer's announcement counter, increasing by one per announcement.
    pub seq: u64,
    /// When it was sent.
    pub at: Timestamp,
    /// What it announces.
    pub body: AnnouncementBody,
}

impl SignedPayload for Announcement {
    const DOMAIN: &'static str = "cohort/announcement/v1";
}

impl Announcement {
    /// Checks the announcement's own rules.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let c = Check("announcement");
        match &self.body {
            AnnouncementBody::Provides { hashes } => {
                check_hash_set(&c, "body.hashes", hashes, MAX_PROVIDED)
            }
            AnnouncementBody::Volunteer { capacity } => {
                check_hash_set(&c, "body.capacity.models", &capacity.models, 64)
            }
            _ => Ok(()),
        }
    }
}

/// An announcement too large for gossip.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("announcement is {size} bytes encoded; gossip carries at most {MAX_ANNOUNCEMENT_BYTES}")]
pub struct AnnouncementTooLarge {
    /// Its encoded size.
    pub size: usize,
}

/// Encodes a signed announcement for gossip, refusing one that gossip would drop.
pub fn encode_announcement(a: &Signed<Announcement>) -> Result<Vec<u8>, AnnouncementTooLarge> {
    let bytes = encoding::encode(a);
    if bytes.len() > MAX_ANNOUNCEMENT_BYTES {
        return Err(AnnouncementTooLarge { size: bytes.len() });
    }
    Ok(bytes)
}

/// Decodes a gossip message with the announcement size limit (verify it next).
pub fn decode_announcement(bytes: &[u8]) -> Result<Signed<Announcement>, DecodeError> {
    encoding::decode_limited::<_, MAX_ANNOUNCEMENT_BYTES>(bytes)
}
