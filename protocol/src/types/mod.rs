//! Every wire and ledger message.
//!
//! These are plain data with public fields. Their encoding is the canonical bincode encoding of
//! [`crate::encoding`]: fields in declaration order, enum variants numbered in declaration
//! order. **Never reorder fields or variants, never remove a variant**: add new variants at the
//! end, and pin every change with the golden vectors in `protocol/tests/golden/`.
//!
//! Lists are kept in a documented order and checked by each type's `validate`, so one value
//! has one encoding. Receivers call `validate` after `Signed::verify`.

pub mod announce;
pub mod datanet;
pub mod job;
pub mod ledger;
pub mod round;
pub mod rpc;

use std::fmt;

use bincode::{Decode, Encode};

use crate::hash::ContentHash;

pub use announce::{Announcement, AnnouncementBody};
pub use datanet::{
    AccessPolicy, DatanetId, Grant, Manifest, RecordSchema, Revocation, ShardEntry, ShardInfo,
    ShardSubmission, SubmissionDecision, Verdict,
};
pub use job::{
    AdapterConfig, AdapterKind, BaseQuant, DatanetRef, Deadlines, EarlyStopping, Hyperparameters,
    JobId, JobSpec, LrSchedule, MergeMethod, Quorum, RobustAggregation, TargetModule,
    ValidationSpec, VerificationSpec,
};
pub use ledger::{ComputeCredit, CreditFlag, EquivocationProof, LedgerEntry, ShardCredit};
pub use round::{
    Assignment, Capacity, KernelClass, RejectReason, RoundClose, RoundJoin, RoundOpen,
    RoundOutcome, SegmentCommit, UpdateCommit, UpdateVerdict, WorkAssignment,
};

/// Wall-clock time: milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub struct Timestamp(pub u64);

/// Data credit in nano-units of validation-loss improvement (1e-9 nats); negative for harmful
/// data. Fixed-point so that every peer computes and sums credits bit-identically.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub struct Credit(pub i64);

impl Credit {
    /// Units per nat of validation-loss improvement.
    pub const UNITS_PER_NAT: i64 = 1_000_000_000;
}

impl fmt::Display for Credit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let unit = Self::UNITS_PER_NAT.unsigned_abs();
        write!(f, "{sign}{}.{:09}", abs / unit, abs % unit)
    }
}

/// A message that does not satisfy its type's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: field `{field}`: {reason}")]
pub struct InvalidMessage {
    /// The message kind.
    pub kind: &'static str,
    /// The offending field.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// Builds [`InvalidMessage`]s for one message kind.
pub(crate) struct Check(pub &'static str);

impl Check {
    pub(crate) fn fail(&self, field: &'static str, reason: impl Into<String>) -> InvalidMessage {
        InvalidMessage {
            kind: self.0,
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn text(
        &self,
        field: &'static str,
        s: &str,
        max: usize,
    ) -> Result<(), InvalidMessage> {
        if s.len() > max {
            return Err(self.fail(field, format!("{} bytes, at most {max}", s.len())));
        }
        if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            return Err(self.fail(field, "contains control characters"));
        }
        Ok(())
    }

    pub(crate) fn non_empty_text(
        &self,
        field: &'static str,
        s: &str,
        max: usize,
    ) -> Result<(), InvalidMessage> {
        if s.trim().is_empty() {
            return Err(self.fail(field, "must not be empty"));
        }
        self.text(field, s, max)
    }

    pub(crate) fn len<T>(
        &self,
        field: &'static str,
        v: &[T],
        max: usize,
    ) -> Result<(), InvalidMessage> {
        if v.len() > max {
            return Err(self.fail(field, format!("{} entries, at most {max}", v.len())));
        }
        Ok(())
    }

    /// Strictly increasing by `key`: sorted and without duplicates.
    pub(crate) fn strictly_sorted<T, K: Ord>(
        &self,
        field: &'static str,
        v: &[T],
        key: impl Fn(&T) -> K,
    ) -> Result<(), InvalidMessage> {
        match v.windows(2).position(|w| key(&w[0]) >= key(&w[1])) {
            None => Ok(()),
            Some(i) => Err(self.fail(
                field,
                format!("entries {i} and {} are out of order or duplicated", i + 1),
            )),
        }
    }

    pub(crate) fn finite(&self, field: &'static str, x: f32) -> Result<(), InvalidMessage> {
        if x.is_finite() {
            Ok(())
        } else {
            Err(self.fail(field, format!("{x} is not a finite number")))
        }
    }

    pub(crate) fn range<T: PartialOrd + fmt::Display>(
        &self,
        field: &'static str,
        x: T,
        lo: T,
        hi: T,
    ) -> Result<(), InvalidMessage> {
        if x >= lo && x <= hi {
            Ok(())
        } else {
            Err(self.fail(field, format!("{x} is outside {lo}..={hi}")))
        }
    }
}

/// Unique, sorted hashes (a set as a list).
pub(crate) fn check_hash_set(
    c: &Check,
    field: &'static str,
    v: &[ContentHash],
    max: usize,
) -> Result<(), InvalidMessage> {
    c.len(field, v, max)?;
    c.strictly_sorted(field, v, |h| *h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_prints_as_fixed_point() {
        assert_eq!(Credit(1_500_000_000).to_string(), "1.500000000");
        assert_eq!(Credit(-42).to_string(), "-0.000000042");
        assert_eq!(Credit(i64::MIN).to_string(), "-9223372036.854775808");
    }
}
