//! Datanets: signed, versioned, permissioned collections of content-addressed shards.
//!
//! The owner signs each [`Manifest`] version; versions chain by the hash of the previous signed
//! manifest. Contributors send [`ShardSubmission`]s, which the owner answers with a
//! [`SubmissionDecision`]. Private datanets list their grantees; [`Grant`] carries the datanet
//! key wrapped to one grantee, [`Revocation`] removes one and rotates the key.

use std::fmt;

use bincode::{Decode, Encode};

use super::{Check, InvalidMessage, Timestamp};
use crate::encoding;
use crate::hash::ContentHash;
use crate::identity::PeerId;
use crate::signed::SignedPayload;

/// Longest datanet name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 4096;
/// Longest license identifier or text reference, in bytes.
pub const MAX_LICENSE_BYTES: usize = 256;
/// Most shards in one manifest version.
pub const MAX_SHARDS: usize = 65_536;
/// Most grantees of one private datanet.
pub const MAX_GRANTEES: usize = 4096;
/// Longest wrapped key in a grant, in bytes.
pub const MAX_WRAPPED_KEY_BYTES: usize = 256;
/// Longest note on a submission or decision, in bytes.
pub const MAX_NOTE_BYTES: usize = 1024;

/// A datanet's stable identity: BLAKE3 of `(owner, name, nonce)` fixed at creation, so a
/// datanet keeps its id across versions and renames.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub struct DatanetId(pub ContentHash);

impl DatanetId {
    /// The id of the datanet `owner` created under `name` with `nonce`.
    pub fn derive(owner: &PeerId, name: &str, nonce: u64) -> Self {
        #[derive(Encode)]
        struct Genesis<'a> {
            context: &'a str,
            owner: &'a PeerId,
            name: &'a str,
            nonce: u64,
        }
        let bytes = encoding::encode(&Genesis {
            context: "cohort/datanet-id/v1",
            owner,
            name,
            nonce,
        });
        Self(ContentHash::of(&bytes))
    }
}

impl fmt::Display for DatanetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for DatanetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatanetId({})", self.0.short())
    }
}

/// The record format of a datanet's shards (JSONL).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
pub enum RecordSchema {
    /// `{"messages": [{"role": ..., "content": ...}, ...]}`
    Chat,
    /// `{"instruction": ..., "input": ..., "output": ...}`
    Alpaca,
}

/// Who may read a datanet's shards.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum AccessPolicy {
    /// Anyone; shards are stored in the clear.
    Public,
    /// Only the listed peers (sorted, unique); shards are encrypted under the datanet key of
    /// `key_epoch`, wrapped to each grantee by a [`Grant`].
    Allowlist {
        /// The grantees, strictly increasing.
        grantees: Vec<PeerId>,
        /// The current key generation; a revocation increments it.
        key_epoch: u32,
    },
}

/// What a shard is, independent of who holds it: used in submissions and manifests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ShardInfo {
    /// The BLAKE3 hash of the shard blob (ciphertext for private datanets).
    pub hash: ContentHash,
    /// The blob's size in bytes.
    pub bytes: u64,
    /// Records (JSONL lines) in the shard.
    pub records: u64,
    /// Tokens in the shard under the default tokenizer.
    pub tokens: u64,
}

/// One shard of a manifest version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ShardEntry {
    /// The shard.
    pub info: ShardInfo,
    /// Who contributed it (the owner for the owner's own shards); credited in the ledger.
    pub contributor: PeerId,
    /// The key epoch it is encrypted under, for private datanets; `None` in the clear.
    pub key_epoch: Option<u32>,
}

/// One version of a datanet, signed by its owner.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Manifest {
    /// The datanet.
    pub datanet: DatanetId,
    /// The owner; must be the signer.
    pub owner: PeerId,
    /// The nonce the id was derived with (see [`DatanetId::derive`]).
    pub nonce: u64,
    /// 1 for the first version, then +1 per version.
    pub version: u64,
    /// The hash of the previous version's signed manifest; `None` exactly for version 1.
    pub previous: Option<ContentHash>,
    /// Short name.
    pub name: String,
    /// What the data is.
    pub description: String,
    /// The license (an SPDX identifier where one applies).
    pub license: String,
    /// Record format.
    pub schema: RecordSchema,
    /// Access policy.
    pub access: AccessPolicy,
    /// The shards, strictly increasing by hash.
    pub shards: Vec<ShardEntry>,
    /// When this version was signed.
    pub published_at: Timestamp,
}

impl SignedPayload for Manifest {
    const DOMAIN: &'static str = "cohort/manifest/v1";
}

impl Manifest {
    /// Checks the manifest's own rules (not its link to the previous version).
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let c = Check("manifest");
        c.non_empty_text("name", &self.name, MAX_NAME_BYTES)?;
        c.text("description", &self.description, MAX_DESCRIPTION_BYTES)?;
        c.text("license", &self.license, MAX_LICENSE_BYTES)?;
        if self.version == 0 {
            return Err(c.fail("version", "versions start at 1"));
        }
        // Names may change in later versions; the id stays the one derived at version 1.
        if self.version == 1
            && DatanetId::derive(&self.owner, &self.name, self.nonce) != self.datanet
        {
            return Err(c.fail("datanet", "is not derived from (owner, name, nonce)"));
        }
        if (self.version == 1) != self.previous.is_none() {
            return Err(c.fail(
                "previous",
                "must be absent for version 1 and present for every later version",
            ));
        }
        c.len("shards", &self.shards, MAX_SHARDS)?;
        c.strictly_sorted("shards", &self.shards, |s| s.info.hash)?;
        match &self.access {
            AccessPolicy::Public => {
                if self.shards.iter().any(|s| s.key_epoch.is_some()) {
                    return Err(c.fail("shards", "a public datanet holds an encrypted shard"));
                }
            }
            AccessPolicy::Allowlist {
                grantees,
                key_epoch,
            } => {
                c.len("access.grantees", grantees, MAX_GRANTEES)?;
                c.strictly_sorted("access.grantees", grantees, |p| *p)?;
                if let Some(s) = self
                    .shards
                    .iter()
                    .find(|s| s.key_epoch.is_none_or(|e| e > *key_epoch))
                {
                    return Err(c.fail(
                        "shards",
                        format!(
                            "shard {} of a private datanet is not encrypted under an epoch <= {key_epoch}",
                            s.info.hash.short()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Total records over all shards.
    pub fn records(&self) -> u64 {
        self.shards.iter().map(|s| s.info.records).sum()
    }

    /// Total tokens over all shards.
    pub fn tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.info.tokens).sum()
    }
}

/// A contributor's offer of a shard to someone else's datanet; the signer is the contributor.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ShardSubmission {
    /// The target datanet.
    pub datanet: DatanetId,
    /// The manifest version the contributor saw.
    pub base_version: u64,
    /// The shard (plaintext; a private datanet's owner encrypts it on approval).
    pub shard: ShardInfo,
    /// A note for the owner.
    pub note: String,
    /// When it was sent.
    pub submitted_at: Timestamp,
}

impl SignedPayload for ShardSubmission {
    const DOMAIN: &'static str = "cohort/shard-submission/v1";
}

impl ShardSubmission {
    /// Checks the submission's own rules.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let c = Check("shard submission");
        c.text("note", &self.note, MAX_NOTE_BYTES)?;
        if self.shard.records == 0 {
            return Err(c.fail("shard.records", "a shard holds at least one record"));
        }
        Ok(())
    }
}

/// The owner's answer to a submission.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Verdict {
    /// Accepted into the version given.
    Approved {
        /// The manifest version that first includes the shard.
        version: u64,
    },
    /// Refused, with a reason for the contributor.
    Rejected {
        /// Why.
        reason: String,
    },
}

/// The owner's signed decision on one submission.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct SubmissionDecision {
    /// The datanet.
    pub datanet: DatanetId,
    /// The hash of the signed submission decided on.
    pub submission: ContentHash,
    /// The decision.
    pub verdict: Verdict,
    /// When it was decided.
    pub decided_at: Timestamp,
}

impl SignedPayload for SubmissionDecision {
    const DOMAIN: &'static str = "cohort/submission-decision/v1";
}

impl SubmissionDecision {
    /// Checks the decision's own rules.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let c = Check("submission decision");
        if let Verdict::Rejected { reason } = &self.verdict {
            c.text("verdict.reason", reason, MAX_NOTE_BYTES)?;
        }
        Ok(())
    }
}

/// Read access for one peer: the datanet key of one epoch, wrapped to the grantee's key.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Grant {
    /// The datanet.
    pub datanet: DatanetId,
    /// Who may read.
    pub grantee: PeerId,
    /// The key epoch the wrapped key belongs to.
    pub key_epoch: u32,
    /// The datanet key sealed to the grantee (the scheme is defined with private datanets).
    pub wrapped_key: Vec<u8>,
    /// When it was granted.
    pub granted_at: Timestamp,
}

impl SignedPayload for Grant {
    const DOMAIN: &'static str = "cohort/grant/v1";
}

impl Grant {
    /// Checks the grant's own rules.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let c = Check("grant");
        c.len("wrapped_key", &self.wrapped_key, MAX_WRAPPED_KEY_BYTES)?;
        if self.wrapped_key.is_empty() {
            return Err(c.fail("wrapped_key", "must not be empty"));
        }
        Ok(())
    }
}

/// Removal of a grantee. Versions from `from_version` on are encrypted under `new_key_epoch`,
/// whose key the revoked peer never receives.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Revocation {
    /// The datanet.
    pub datanet: DatanetId,
    /// Who loses access.
    pub grantee: PeerId,
    /// The first manifest version the revoked peer may not read.
    pub from_version: u64,
    /// The rotated key epoch.
    pub new_key_epoch: u32,
    /// When it was revoked.
    pub revoked_at: Timestamp,
}

impl SignedPayload for Revocation {
    const DOMAIN: &'static str = "cohort/revocation/v1";
}

impl Revocation {
    /// Checks the revocation's own rules.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let c = Check("revocation");
        if self.new_key_epoch == 0 {
            return Err(c.fail("new_key_epoch", "a rotation produces an epoch after 0"));
        }
        Ok(())
    }
}
