//! Property tests of the canonical encoding and signed envelopes, over every message kind:
//! round trips, random and corrupted bytes (never a panic; whatever decodes re-encodes to the
//! same bytes), and tampering (a changed payload, signer or domain never verifies).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cohort_protocol::encoding::encode;
use cohort_protocol::types::*;
use cohort_protocol::{Canonical, Keypair, PROTOCOL_VERSION, Signed, SignedPayload};
use common::Gen;
use proptest::prelude::*;

fn submission(g: &mut Gen) -> ShardSubmission {
    ShardSubmission {
        datanet: DatanetId(g.hash()),
        base_version: g.u64(),
        shard: g.shard_info(),
        note: g.string(),
        submitted_at: Timestamp(g.u64()),
    }
}

fn decision(g: &mut Gen) -> SubmissionDecision {
    SubmissionDecision {
        datanet: DatanetId(g.hash()),
        submission: g.hash(),
        verdict: if g.bool() {
            Verdict::Approved { version: g.u64() }
        } else {
            Verdict::Rejected { reason: g.string() }
        },
        decided_at: Timestamp(g.u64()),
    }
}

fn grant(g: &mut Gen) -> Grant {
    Grant {
        datanet: DatanetId(g.hash()),
        grantee: g.peer(),
        key_epoch: g.u32(),
        wrapped_key: g.vec(80, |g| g.u64() as u8),
        granted_at: Timestamp(g.u64()),
    }
}

fn revocation(g: &mut Gen) -> Revocation {
    Revocation {
        datanet: DatanetId(g.hash()),
        grantee: g.peer(),
        from_version: g.u64(),
        new_key_epoch: g.u32(),
        revoked_at: Timestamp(g.u64()),
    }
}

fn round_open(g: &mut Gen) -> RoundOpen {
    RoundOpen {
        job: JobId(g.hash()),
        round: g.u32(),
        start_adapter: g.option(Gen::hash),
        seed: g.u64(),
        opened_at: Timestamp(g.u64()),
        enroll_until: Timestamp(g.u64()),
    }
}

fn round_join(g: &mut Gen) -> RoundJoin {
    RoundJoin {
        job: JobId(g.hash()),
        round: g.u32(),
        capacity: Capacity {
            kernel: g.kernel(),
            cores: g.u64() as u16,
            memory_mib: g.u64(),
            models: g.vec(3, Gen::hash),
        },
    }
}

fn assignment(g: &mut Gen) -> Assignment {
    Assignment {
        job: JobId(g.hash()),
        round: g.u32(),
        work: g.vec(3, |g| WorkAssignment {
            worker: g.peer(),
            shards: g.vec(3, Gen::hash),
            seed: g.u64(),
        }),
        commit_until: Timestamp(g.u64()),
    }
}

fn equivocation(g: &mut Gen) -> EquivocationProof {
    let kp = common::key(g.below(4) as u8);
    EquivocationProof {
        first: Signed::sign(&kp, &g.ledger_entry()),
        second: Signed::sign(&kp, &g.ledger_entry()),
    }
}

/// Decoding `bytes` as `T` returns a value or an error, and a value re-encodes to `bytes`.
fn decodes_canonically_or_errs<T: Canonical>(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(v) = T::from_bytes(bytes) {
        prop_assert_eq!(
            encode(&v),
            bytes,
            "accepted bytes did not re-encode identically"
        );
    }
    Ok(())
}

/// One mutation of a valid encoding: flip, overwrite, insert, delete or truncate.
fn mutate(g: &mut Gen, mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len().max(1) as u64;
    let at = g.below(n) as usize;
    match g.below(5) {
        0 if !bytes.is_empty() => bytes[at] ^= 1 << g.below(8),
        1 if !bytes.is_empty() => bytes[at] = g.u64() as u8,
        2 => bytes.insert(at.min(bytes.len()), g.u64() as u8),
        3 if !bytes.is_empty() => {
            bytes.remove(at);
        }
        _ => bytes.truncate(at),
    }
    bytes
}

/// Every property, for one payload kind.
fn check_kind<T>(seed: u64, make: fn(&mut Gen) -> T) -> Result<(), TestCaseError>
where
    T: SignedPayload + std::fmt::Debug + PartialEq,
{
    let mut g = Gen::new(seed);
    let value = make(&mut g);

    // Round trip of the payload, and of the signed envelope.
    let bytes = value.to_bytes();
    let back = T::from_bytes(&bytes).unwrap();
    prop_assert_eq!(encode(&back), bytes.clone());
    let signer_seed = g.u64() as u8;
    let kp = Keypair::from_seed(&[signer_seed; 32]);
    let signed = Signed::sign(&kp, &value);
    let signed_bytes = signed.to_bytes();
    let signed_back = Signed::<T>::from_bytes(&signed_bytes).unwrap();
    prop_assert_eq!(&signed_back, &signed);
    prop_assert_eq!(encode(&signed_back.verify().unwrap()), bytes.clone());

    // Corrupted encodings never panic and never decode to something non-canonical.
    for _ in 0..8 {
        decodes_canonically_or_errs::<T>(&mutate(&mut g, bytes.clone()))?;
        let corrupted = mutate(&mut g, signed_bytes.clone());
        decodes_canonically_or_errs::<Signed<T>>(&corrupted)?;
        // A corrupted envelope that still decodes must not verify unless nothing signed changed.
        if let Ok(s) = Signed::<T>::from_bytes(&corrupted)
            && s.verify_signature().is_ok()
        {
            prop_assert_eq!(s.domain(), signed.domain());
            prop_assert_eq!(s.signer(), signed.signer());
            prop_assert_eq!(s.payload_bytes(), signed.payload_bytes());
        }
    }

    // Tampering: payload, signer, domain, version.
    if !bytes.is_empty() {
        let mut payload = signed.payload_bytes().to_vec();
        let i = g.below(payload.len() as u64) as usize;
        payload[i] ^= 0x01;
        let tampered = Signed::<T>::from_parts(
            T::DOMAIN.into(),
            PROTOCOL_VERSION,
            signed.signer(),
            payload,
            *signed.signature(),
        );
        prop_assert!(tampered.verify().is_err(), "a tampered payload verified");
    }
    let other_signer = Keypair::from_seed(&[signer_seed.wrapping_add(1); 32]).peer_id();
    let resigned = Signed::<T>::from_parts(
        T::DOMAIN.into(),
        PROTOCOL_VERSION,
        other_signer,
        signed.payload_bytes().to_vec(),
        *signed.signature(),
    );
    prop_assert!(resigned.verify().is_err(), "a changed signer verified");
    let other_domain = Signed::<T>::from_parts(
        format!("{}x", T::DOMAIN),
        PROTOCOL_VERSION,
        signed.signer(),
        signed.payload_bytes().to_vec(),
        *signed.signature(),
    );
    prop_assert!(other_domain.verify().is_err(), "a changed domain verified");
    Ok(())
}

macro_rules! kinds {
    ($($name:ident: $make:expr;)+) => {
        proptest! {
            $(
                #[test]
                fn $name(seed in any::<u64>()) {
                    check_kind(seed, $make)?;
                }
            )+
        }
    };
}

kinds! {
    manifest: Gen::manifest;
    shard_submission: submission;
    submission_decision: decision;
    grant_: grant;
    revocation_: revocation;
    announcement: Gen::announcement;
    job_spec: Gen::job;
    round_open_: round_open;
    round_join_: round_join;
    assignment_: assignment;
    update_commit: Gen::update_commit;
    round_close: Gen::round_close;
    ledger_entry: Gen::ledger_entry;
}

proptest! {
    /// Arbitrary bytes, decoded as every top-level kind: never a panic, and what decodes
    /// re-encodes to the same bytes.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decodes_canonically_or_errs::<Signed<Manifest>>(&bytes)?;
        decodes_canonically_or_errs::<Signed<ShardSubmission>>(&bytes)?;
        decodes_canonically_or_errs::<Signed<SubmissionDecision>>(&bytes)?;
        decodes_canonically_or_errs::<Signed<Grant>>(&bytes)?;
        decodes_canonically_or_errs::<Signed<Revocation>>(&bytes)?;
        decodes_canonically_or_errs::<Signed<Announcement>>(&bytes)?;
        decodes_canonically_or_errs::<Signed<JobSpec>>(&bytes)?;
        decodes_canonically_or_errs::<Signed<RoundOpen>>(&bytes)?;
        decodes_canonically_or_errs::<Signed<RoundJoin>>(&bytes)?;
        decodes_canonically_or_errs::<Signed<Assignment>>(&bytes)?;
        decodes_canonically_or_errs::<Signed<UpdateCommit>>(&bytes)?;
        decodes_canonically_or_errs::<Signed<RoundClose>>(&bytes)?;
        decodes_canonically_or_errs::<Signed<LedgerEntry>>(&bytes)?;
        decodes_canonically_or_errs::<EquivocationProof>(&bytes)?;
        decodes_canonically_or_errs::<Manifest>(&bytes)?;
        decodes_canonically_or_errs::<JobSpec>(&bytes)?;
        decodes_canonically_or_errs::<UpdateCommit>(&bytes)?;
        decodes_canonically_or_errs::<LedgerEntry>(&bytes)?;
        decodes_canonically_or_errs::<Announcement>(&bytes)?;
    }

    #[test]
    fn equivocation_proofs_round_trip_and_corrupt_safely(seed in any::<u64>()) {
        let mut g = Gen::new(seed);
        let proof = equivocation(&mut g);
        let bytes = proof.to_bytes();
        prop_assert_eq!(&EquivocationProof::from_bytes(&bytes).unwrap(), &proof);
        for _ in 0..8 {
            decodes_canonically_or_errs::<EquivocationProof>(&mutate(&mut g, bytes.clone()))?;
        }
    }
}
