//! Ledger chain verification.
//!
//! A coordinator's chain is the sequence of its signed [`LedgerEntry`]s with `seq` 0, 1, 2, ...,
//! each linking to the hash of the signed entry before it. [`ChainVerifier`] checks entries one
//! at a time as they arrive; [`verify_chain`] checks a whole chain and reports the first break
//! precisely: which entry (its index in the input), and which rule it broke. A different entry
//! at a position already taken is a fork, reported with an [`EquivocationProof`] anyone can
//! check.

use crate::encoding::Canonical;
use crate::hash::ContentHash;
use crate::identity::PeerId;
use crate::signed::{Signed, VerifyError};
use crate::types::{EquivocationProof, InvalidMessage, LedgerEntry};

/// The rule an entry broke.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainRule {
    /// The envelope does not verify (domain, version or signature).
    #[error("signature: {0}")]
    Signature(#[from] VerifyError),
    /// The entry breaks its own rules.
    #[error("invalid entry: {0}")]
    Invalid(#[from] InvalidMessage),
    /// Signed by someone other than the chain's coordinator.
    #[error("signed by {found}, not by the chain's coordinator {expected}")]
    WrongSigner {
        /// The chain's coordinator.
        expected: PeerId,
        /// The signer.
        found: PeerId,
    },
    /// The entry's `coordinator` field is not its signer.
    #[error("names coordinator {named} but is signed by {signer}")]
    CoordinatorMismatch {
        /// The named coordinator.
        named: PeerId,
        /// The signer.
        signer: PeerId,
    },
    /// Entries are missing: the next position was expected.
    #[error("entry {expected} is missing (found entry {found})")]
    Missing {
        /// The position expected next.
        expected: u64,
        /// The position found.
        found: u64,
    },
    /// The expected entry exists, but later in the input.
    #[error("out of order: expected entry {expected}, found entry {found} first")]
    OutOfOrder {
        /// The position expected next.
        expected: u64,
        /// The position found.
        found: u64,
    },
    /// The same entry twice.
    #[error("entry {seq} appears twice")]
    Duplicate {
        /// The position.
        seq: u64,
    },
    /// A different entry at a position already taken: the coordinator equivocated.
    #[error("fork at entry {seq}: two different entries signed for one position")]
    Fork {
        /// The position.
        seq: u64,
        /// The hash of the entry accepted first at that position.
        existing: ContentHash,
        /// The two entries, when the whole chain was at hand ([`verify_chain`]).
        proof: Option<Box<EquivocationProof>>,
    },
    /// `previous` does not name the entry before.
    #[error("previous-entry link is {found:?}, expected {expected:?}")]
    BrokenLink {
        /// The hash of the entry before (`None` at position 0).
        expected: Option<ContentHash>,
        /// The link in the entry.
        found: Option<ContentHash>,
    },
}

/// The first break in a chain.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("ledger chain of {coordinator}: entry at index {index}{}: {rule}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
pub struct ChainBreak {
    /// The chain's coordinator.
    pub coordinator: PeerId,
    /// The offending entry's index in the input.
    pub index: usize,
    /// Its claimed position, when it could be read.
    pub seq: Option<u64>,
    /// The rule it broke.
    pub rule: Box<ChainRule>,
}

/// The head of a verified chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    /// The last position.
    pub seq: u64,
    /// The hash of the last signed entry.
    pub hash: ContentHash,
}

/// Verifies one coordinator's chain entry by entry.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    coordinator: PeerId,
    /// The hash of the accepted entry at each position.
    hashes: Vec<ContentHash>,
    pushed: usize,
}

impl ChainVerifier {
    /// A verifier for `coordinator`'s chain, empty.
    pub fn new(coordinator: PeerId) -> Self {
        Self {
            coordinator,
            hashes: Vec::new(),
            pushed: 0,
        }
    }

    /// The chain's head so far.
    pub fn head(&self) -> Option<ChainHead> {
        self.hashes.last().map(|&hash| ChainHead {
            seq: self.hashes.len() as u64 - 1,
            hash,
        })
    }

    /// The hash of the accepted entry at `seq`.
    pub fn hash_at(&self, seq: u64) -> Option<ContentHash> {
        usize::try_from(seq)
            .ok()
            .and_then(|i| self.hashes.get(i))
            .copied()
    }

    /// Checks the next entry and, if it extends the chain, appends it. A rejected entry leaves
    /// the verifier as it was.
    pub fn push(&mut self, signed: &Signed<LedgerEntry>) -> Result<ChainHead, ChainBreak> {
        let index = self.pushed;
        self.pushed += 1;
        let fail = |seq, rule| ChainBreak {
            coordinator: self.coordinator,
            index,
            seq,
            rule: Box::new(rule),
        };
        if signed.signer() != self.coordinator {
            return Err(fail(
                None,
                ChainRule::WrongSigner {
                    expected: self.coordinator,
                    found: signed.signer(),
                },
            ));
        }
        let entry = signed.verify().map_err(|e| fail(None, e.into()))?;
        let seq = Some(entry.seq);
        if entry.coordinator != signed.signer() {
            return Err(fail(
                seq,
                ChainRule::CoordinatorMismatch {
                    named: entry.coordinator,
                    signer: signed.signer(),
                },
            ));
        }
        entry.validate().map_err(|e| fail(seq, e.into()))?;
        let hash = signed.hash();
        let expected = self.hashes.len() as u64;
        if entry.seq < expected {
            let existing = self.hashes[entry.seq as usize];
            let rule = if existing == hash {
                ChainRule::Duplicate { seq: entry.seq }
            } else {
                ChainRule::Fork {
                    seq: entry.seq,
                    existing,
                    proof: None,
                }
            };
            return Err(fail(seq, rule));
        }
        if entry.seq > expected {
            return Err(fail(
                seq,
                ChainRule::Missing {
                    expected,
                    found: entry.seq,
                },
            ));
        }
        let link = self.hashes.last().copied();
        if entry.previous != link {
            return Err(fail(
                seq,
                ChainRule::BrokenLink {
                    expected: link,
                    found: entry.previous,
                },
            ));
        }
        self.hashes.push(hash);
        Ok(ChainHead {
            seq: entry.seq,
            hash,
        })
    }
}

/// Verifies a whole chain of `coordinator`'s entries, in the order given. Returns its head
/// (`None` for an empty chain) or the first break. A fork comes with an equivocation proof;
/// a gap whose missing entry appears later in the input is reported as out of order.
pub fn verify_chain(
    coordinator: PeerId,
    entries: &[Signed<LedgerEntry>],
) -> Result<Option<ChainHead>, ChainBreak> {
    let mut verifier = ChainVerifier::new(coordinator);
    let mut accepted_at = Vec::new();
    for (index, signed) in entries.iter().enumerate() {
        match verifier.push(signed) {
            Ok(_) => accepted_at.push(index),
            Err(mut brk) => {
                match &mut *brk.rule {
                    ChainRule::Fork { seq, proof, .. } => {
                        let first = entries[accepted_at[*seq as usize]].clone();
                        *proof = Some(Box::new(EquivocationProof {
                            first,
                            second: signed.clone(),
                        }));
                    }
                    ChainRule::Missing { expected, found } => {
                        let later = entries[index + 1..].iter().any(|e| {
                            LedgerEntry::from_bytes(e.payload_bytes())
                                .is_ok_and(|e| e.seq == *expected)
                        });
                        if later {
                            *brk.rule = ChainRule::OutOfOrder {
                                expected: *expected,
                                found: *found,
                            };
                        }
                    }
                    _ => {}
                }
                return Err(brk);
            }
        }
    }
    Ok(verifier.head())
}
