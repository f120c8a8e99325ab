//! The contribution ledger's entries.
//!
//! Each coordinator appends one signed [`LedgerEntry`] per closed round to its own hash chain.
//! Two different signed entries at one position of a chain are an [`EquivocationProof`]; chain
//! verification lives in [`crate::ledger`].

use bincode::{Decode, Encode};

use super::datanet::DatanetId;
use super::job::JobId;
use super::{Check, Credit, InvalidMessage, Timestamp};
use crate::hash::ContentHash;
use crate::identity::PeerId;
use crate::signed::{Signed, SignedPayload, VerifyError};

/// Most shard credits in one entry.
pub const MAX_SHARD_CREDITS: usize = 65_536;
/// Most compute credits in one entry.
pub const MAX_COMPUTE_CREDITS: usize = 16_384;

/// How a shard's credit should be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum CreditFlag {
    /// An ordinary contribution.
    Normal,
    /// A near-duplicate of other shards: the group shares one value.
    Duplicate {
        /// The shard representing the group (the smallest hash in it).
        group: ContentHash,
    },
    /// The shard made the model worse: its value is negative and it earns nothing.
    Harmful,
}

/// Data credit for one shard in one round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ShardCredit {
    /// The shard.
    pub shard: ContentHash,
    /// The datanet it came from.
    pub datanet: DatanetId,
    /// Who contributed it.
    pub contributor: PeerId,
    /// What it earned of the round's data budget (the round's validation-loss gain), split by
    /// its group's Shapley value; 0 for harmful and near-zero groups (the flag says which).
    pub value: Credit,
    /// How to read the value.
    pub flag: CreditFlag,
}

/// Compute credit for one verified (or failed) update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ComputeCredit {
    /// The worker.
    pub peer: PeerId,
    /// The hash of its signed update commit.
    pub commit: ContentHash,
    /// Tokens it processed.
    pub tokens: u64,
    /// Whether the update passed verification; only verified updates earn credit.
    pub verified: bool,
}

/// One closed round, as credited by its coordinator.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct LedgerEntry {
    /// The coordinator whose chain this is; must be the signer.
    pub coordinator: PeerId,
    /// Position in the chain, from 0.
    pub seq: u64,
    /// The hash of the signed entry at `seq - 1`; `None` exactly at `seq` 0.
    pub previous: Option<ContentHash>,
    /// The job.
    pub job: JobId,
    /// The round.
    pub round: u32,
    /// The hash of the signed [`super::RoundClose`].
    pub close: ContentHash,
    /// The merged adapter, if the round merged.
    pub merged_adapter: Option<ContentHash>,
    /// Validation loss before the round's merge.
    pub validation_loss_before: f32,
    /// Validation loss after it.
    pub validation_loss_after: f32,
    /// Data credit per shard, strictly increasing by shard.
    pub data: Vec<ShardCredit>,
    /// Compute credit per update, strictly increasing by peer.
    pub compute: Vec<ComputeCredit>,
    /// When the entry was appended.
    pub at: Timestamp,
}

impl SignedPayload for LedgerEntry {
    const DOMAIN: &'static str = "cohort/ledger-entry/v1";
}

impl LedgerEntry {
    /// Checks the entry's own rules (not its place in the chain).
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let c = Check("ledger entry");
        if (self.seq == 0) != self.previous.is_none() {
            return Err(c.fail(
                "previous",
                "must be absent at seq 0 and present at every later seq",
            ));
        }
        c.finite("validation_loss_before", self.validation_loss_before)?;
        c.finite("validation_loss_after", self.validation_loss_after)?;
        c.len("data", &self.data, MAX_SHARD_CREDITS)?;
        c.strictly_sorted("data", &self.data, |d| d.shard)?;
        c.len("compute", &self.compute, MAX_COMPUTE_CREDITS)?;
        c.strictly_sorted("compute", &self.compute, |d| d.peer)?;
        if let Some(d) = self
            .data
            .iter()
            .find(|d| d.flag == CreditFlag::Harmful && d.value.0 > 0)
        {
            return Err(c.fail(
                "data",
                format!("shard {} is flagged harmful but credited", d.shard.short()),
            ));
        }
        Ok(())
    }
}

/// Two different signed entries by one coordinator at one position: proof that it forked its
/// chain. Anyone can check it with [`EquivocationProof::verify`].
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct EquivocationProof {
    /// One entry.
    pub first: Signed<LedgerEntry>,
    /// Another entry at the same position.
    pub second: Signed<LedgerEntry>,
}

/// Why an equivocation proof does not prove anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidProof {
    /// One of the entries does not verify.
    #[error("equivocation proof: entry does not verify: {0}")]
    Entry(#[from] VerifyError),
    /// The entries have different signers.
    #[error("equivocation proof: entries are signed by different peers")]
    DifferentSigners,
    /// An entry's coordinator field is not its signer.
    #[error("equivocation proof: an entry names a coordinator other than its signer")]
    NotTheCoordinator,
    /// The entries are at different positions.
    #[error("equivocation proof: entries are at seq {0} and {1}")]
    DifferentPositions(u64, u64),
    /// The entries are the same.
    #[error("equivocation proof: both entries are the same")]
    SameEntry,
}

impl EquivocationProof {
    /// Checks that both entries verify, are by one coordinator, share a position, and differ.
    /// Returns the coordinator that equivocated and the position.
    pub fn verify(&self) -> Result<(PeerId, u64), InvalidProof> {
        let a = self.first.verify()?;
        let b = self.second.verify()?;
        if self.first.signer() != self.second.signer() {
            return Err(InvalidProof::DifferentSigners);
        }
        if a.coordinator != self.first.signer() || b.coordinator != self.second.signer() {
            return Err(InvalidProof::NotTheCoordinator);
        }
        if a.seq != b.seq {
            return Err(InvalidProof::DifferentPositions(a.seq, b.seq));
        }
        if self.first == self.second {
            return Err(InvalidProof::SameEntry);
        }
        Ok((self.first.signer(), a.seq))
    }
}
