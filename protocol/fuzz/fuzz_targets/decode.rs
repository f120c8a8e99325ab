//! Decodes arbitrary bytes as every top-level message: never a panic, never an allocation past
//! the limit, and whatever decodes re-encodes to the same bytes and can be verified.
#![no_main]

use cohort_protocol::encoding::encode;
use cohort_protocol::types::announce::decode_announcement;
use cohort_protocol::types::*;
use cohort_protocol::{Canonical, Signed, SignedPayload};
use libfuzzer_sys::fuzz_target;

fn signed<T: SignedPayload>(data: &[u8]) {
    if let Ok(s) = Signed::<T>::from_bytes(data) {
        assert_eq!(encode(&s), data, "non-canonical Signed<{}>", T::DOMAIN);
        let _ = s.verify();
    }
    if let Ok(v) = T::from_bytes(data) {
        assert_eq!(encode(&v), data, "non-canonical {}", T::DOMAIN);
    }
}

fuzz_target!(|data: &[u8]| {
    signed::<Manifest>(data);
    signed::<ShardSubmission>(data);
    signed::<SubmissionDecision>(data);
    signed::<Grant>(data);
    signed::<Revocation>(data);
    signed::<Announcement>(data);
    signed::<JobSpec>(data);
    signed::<RoundOpen>(data);
    signed::<RoundJoin>(data);
    signed::<Assignment>(data);
    signed::<UpdateCommit>(data);
    signed::<RoundClose>(data);
    signed::<LedgerEntry>(data);
    if let Ok(p) = EquivocationProof::from_bytes(data) {
        assert_eq!(encode(&p), data);
        let _ = p.verify();
    }
    if let Ok(a) = decode_announcement(data) {
        let _ = a.verify().map(|a| a.validate());
    }
});
