//! Golden byte vectors: the wire format of every message kind, pinned.
//!
//! Each kind has a file in `tests/golden/` with one hex line per top-level field of the payload,
//! then one per field of its signed envelope (signed by a fixed key; ed25519 signatures are
//! deterministic). Any change to a type's encoding fails here, loudly. After a deliberate format
//! change (which needs a new domain version), regenerate with
//! `COHORT_BLESS_GOLDEN=1 cargo test -p cohort-protocol --test golden` and review the diff.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use cohort_protocol::encoding::{MAX_MESSAGE_BYTES, decode_limited, encode};
use cohort_protocol::types::*;
use cohort_protocol::{Canonical, Signed, SignedPayload};
use common::*;

macro_rules! fields {
    ($v:expr; $($f:ident),+ $(,)?) => {
        vec![$((stringify!($f), encode(&$v.$f))),+]
    };
}

fn section(title: &str, fields: Vec<(&str, Vec<u8>)>, whole: &[u8]) -> String {
    let concat: Vec<u8> = fields.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    assert_eq!(
        hex::encode(&concat),
        hex::encode(whole),
        "{title}: the fields, encoded one by one, are not the whole encoding"
    );
    let mut out = format!("# {title}\n");
    for (label, bytes) in fields {
        out.push_str(&format!("{}  # {label}\n", hex::encode(bytes)));
    }
    out
}

fn envelope<T: SignedPayload>(signed: &Signed<T>) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("domain", encode(&signed.domain().to_owned())),
        ("version", encode(&signed.version())),
        ("signer", encode(&signed.signer())),
        ("payload", encode(&signed.payload_bytes().to_vec())),
        ("signature", encode(signed.signature())),
    ]
}

/// The hex bytes of one `# title` section of a golden file.
fn section_bytes(text: &str, title: &str) -> Vec<u8> {
    let mut hex_digits = String::new();
    let mut inside = false;
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# ") {
            inside = t == title;
            continue;
        }
        if inside {
            let data = line.split('#').next().unwrap_or("").trim();
            hex_digits.push_str(data);
        }
    }
    assert!(!hex_digits.is_empty(), "no section {title:?}");
    hex::decode(hex_digits).unwrap()
}

fn check_golden(name: &str, text: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.hex"));
    if std::env::var_os("COHORT_BLESS_GOLDEN").is_some() {
        std::fs::write(&path, text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (bless it: see the module docs)", path.display()));
    if want != text {
        let line = want
            .lines()
            .zip(text.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || "the line count".to_string(),
                |i| format!("line {}", i + 1),
            );
        panic!(
            "the wire format of {name} changed ({line} of {}).\nexpected:\n{want}\nactual:\n{text}",
            path.display()
        );
    }
}

/// Pins a payload and its signed envelope, and checks that the golden bytes decode back to the
/// same value and verify.
fn golden<T>(name: &str, value: T, payload_fields: Vec<(&str, Vec<u8>)>)
where
    T: SignedPayload + std::fmt::Debug + PartialEq,
{
    let signed = Signed::sign(&key(1), &value);
    let payload_title = format!("{name} payload, domain {}", T::DOMAIN);
    let envelope_title = format!("Signed<{name}> envelope, signer = key with seed [1; 32]");
    let mut text = section(&payload_title, payload_fields, &value.to_bytes());
    text.push_str(&section(
        &envelope_title,
        envelope(&signed),
        &signed.to_bytes(),
    ));
    check_golden(name, &text);

    let golden_payload = section_bytes(&text, &payload_title);
    assert_eq!(T::from_bytes(&golden_payload).unwrap(), value);
    let golden_signed: Signed<T> =
        decode_limited::<_, MAX_MESSAGE_BYTES>(&section_bytes(&text, &envelope_title)).unwrap();
    assert_eq!(golden_signed.verify().unwrap(), value);
}

#[test]
fn manifest() {
    let v = common::manifest();
    v.validate().unwrap();
    let f = fields!(v; datanet, owner, nonce, version, previous, name, description, license,
        schema, access, shards, published_at);
    golden("Manifest", v, f);
}

#[test]
fn shard_submission() {
    let v = submission();
    v.validate().unwrap();
    let f = fields!(v; datanet, base_version, shard, note, submitted_at);
    golden("ShardSubmission", v, f);
}

#[test]
fn submission_decision() {
    let v = decision();
    v.validate().unwrap();
    let f = fields!(v; datanet, submission, verdict, decided_at);
    golden("SubmissionDecision", v, f);
}

#[test]
fn grant() {
    let v = common::grant();
    v.validate().unwrap();
    let f = fields!(v; datanet, grantee, key_epoch, wrapped_key, granted_at);
    golden("Grant", v, f);
}

#[test]
fn revocation() {
    let v = common::revocation();
    v.validate().unwrap();
    let f = fields!(v; datanet, grantee, from_version, new_key_epoch, revoked_at);
    golden("Revocation", v, f);
}

#[test]
fn announcement() {
    let v = common::announcement();
    v.validate().unwrap();
    let f = fields!(v; seq, at, body);
    golden("Announcement", v, f);
}

#[test]
fn job_spec() {
    let v = job();
    v.validate().unwrap();
    let f = fields!(v; name, base_model, adapter, hyper, datanets, validation, rounds, quorum,
        deadlines, merge, early_stopping, verification, created_at);
    golden("JobSpec", v, f);
}

#[test]
fn round_open() {
    let v = common::round_open();
    let f = fields!(v; job, round, start_adapter, seed, opened_at, enroll_until);
    golden("RoundOpen", v, f);
}

#[test]
fn round_join() {
    let v = common::round_join();
    v.validate().unwrap();
    let f = fields!(v; job, round, capacity);
    golden("RoundJoin", v, f);
}

#[test]
fn assignment() {
    let v = common::assignment();
    v.validate().unwrap();
    let f = fields!(v; job, round, work, commit_until);
    golden("Assignment", v, f);
}

#[test]
fn update_commit() {
    let v = common::update_commit();
    v.validate().unwrap();
    let f = fields!(v; job, round, update, shards, tokens, steps, losses, seed, kernel, segments);
    golden("UpdateCommit", v, f);
}

#[test]
fn round_close() {
    let v = common::round_close();
    v.validate().unwrap();
    let f = fields!(v; job, round, outcome, verdicts, merged_adapter, truncation_error,
        validation_loss_before, validation_loss_after, closed_at);
    golden("RoundClose", v, f);
}

#[test]
fn ledger_entry() {
    let v = common::ledger_entry(1, Some(h(0x5f)));
    v.validate().unwrap();
    let f = fields!(v; coordinator, seq, previous, job, round, close, merged_adapter,
        validation_loss_before, validation_loss_after, data, compute, at);
    golden("LedgerEntry", v, f);
}

#[test]
fn equivocation_proof() {
    let v = equivocation();
    v.verify().unwrap();
    let text = section(
        "EquivocationProof (unsigned: it carries two signed entries)",
        fields!(v; first, second),
        &v.to_bytes(),
    );
    check_golden("EquivocationProof", &text);
    let back = EquivocationProof::from_bytes(&section_bytes(
        &text,
        "EquivocationProof (unsigned: it carries two signed entries)",
    ))
    .unwrap();
    assert_eq!(back, v);
}

/// The documented layout, written out by hand: an independent check that the encoder does what
/// `encoding` and `signed` say, not only what it did yesterday.
#[test]
fn announcement_layout_matches_the_documentation() {
    let v = common::announcement();
    let AnnouncementBody::Manifest {
        datanet, manifest, ..
    } = v.body
    else {
        unreachable!()
    };
    let mut want = Vec::new();
    want.extend_from_slice(&5u64.to_le_bytes()); // seq
    want.extend_from_slice(&1_764_000_000_007u64.to_le_bytes()); // at
    want.extend_from_slice(&0u32.to_le_bytes()); // body: variant 0, Manifest
    want.extend_from_slice(datanet.0.as_bytes()); // datanet
    want.extend_from_slice(&2u64.to_le_bytes()); // version
    want.extend_from_slice(manifest.as_bytes()); // manifest hash
    assert_eq!(hex::encode(v.to_bytes()), hex::encode(want));
}

#[test]
fn envelope_layout_and_signing_input_match_the_documentation() {
    fn with_len(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    let v = common::announcement();
    let signed = Signed::sign(&key(1), &v);
    let payload = v.to_bytes();
    let signer = peer(1);

    let mut want = Vec::new();
    with_len(&mut want, b"cohort/announcement/v1");
    want.extend_from_slice(&1u16.to_le_bytes());
    want.extend_from_slice(signer.as_bytes());
    with_len(&mut want, &payload);
    want.extend_from_slice(signed.signature());
    assert_eq!(hex::encode(signed.to_bytes()), hex::encode(&want));

    // The signature covers ("cohort/signature/v1", domain, version, signer, payload), checked
    // here with ed25519-dalek directly rather than through the crate.
    let mut input = Vec::new();
    with_len(&mut input, b"cohort/signature/v1");
    with_len(&mut input, b"cohort/announcement/v1");
    input.extend_from_slice(&1u16.to_le_bytes());
    input.extend_from_slice(signer.as_bytes());
    with_len(&mut input, &payload);
    let key = ed25519_dalek::VerifyingKey::from_bytes(signer.as_bytes()).unwrap();
    let sig = ed25519_dalek::Signature::from_bytes(signed.signature());
    key.verify_strict(&input, &sig).unwrap();
}

#[test]
fn every_sample_announcement_fits_gossip() {
    use cohort_protocol::types::announce::{MAX_ANNOUNCEMENT_BYTES, encode_announcement};
    let kp = key(1);
    let bodies = [
        common::announcement().body,
        AnnouncementBody::Provides {
            hashes: (0..64).map(h).collect(),
        },
        AnnouncementBody::Volunteer {
            capacity: common::round_join().capacity,
        },
    ];
    for body in bodies {
        let a = Announcement {
            seq: 1,
            at: Timestamp(0),
            body,
        };
        a.validate().unwrap();
        let bytes = encode_announcement(&Signed::sign(&kp, &a)).unwrap();
        assert!(bytes.len() <= MAX_ANNOUNCEMENT_BYTES);
    }
    // 64 hashes fit; a Provides over its limit is invalid, and a payload over 4000 bytes is
    // refused before it reaches gossip.
    let too_many = Announcement {
        seq: 1,
        at: Timestamp(0),
        body: AnnouncementBody::Provides {
            hashes: (0..=64).map(h).collect(),
        },
    };
    assert!(too_many.validate().is_err());
    let huge = Announcement {
        seq: 1,
        at: Timestamp(0),
        body: AnnouncementBody::Provides {
            hashes: (0..130u32).map(|i| h((i % 256) as u8)).collect(),
        },
    };
    let err = encode_announcement(&Signed::sign(&kp, &huge)).unwrap_err();
    assert!(err.size > MAX_ANNOUNCEMENT_BYTES, "{err}");
}

/// The `cohort/1` request and response frames (unsigned: the QUIC connection authenticates
/// the peer), one section per variant.
#[test]
fn rpc_frames() {
    use cohort_protocol::types::rpc::{Head, RPC_VERSION, Request, RequestBody, Response};
    fn req(body: RequestBody) -> Request {
        Request {
            version: RPC_VERSION,
            body,
        }
    }
    fn one<T: Canonical + std::fmt::Debug + PartialEq>(title: &str, v: &T) -> String {
        let bytes = v.to_bytes();
        assert_eq!(&T::from_bytes(&bytes).unwrap(), v);
        section(title, vec![("whole", bytes.clone())], &bytes)
    }
    let submission = Signed::sign(&key(1), &common::submission());
    let grant = Signed::sign(&key(1), &common::grant());
    let mut text = String::new();
    text.push_str(&one("Request Heads", &req(RequestBody::Heads)));
    text.push_str(&one(
        "Request GetManifest",
        &req(RequestBody::GetManifest { hash: h(7) }),
    ));
    text.push_str(&one(
        "Request Announce",
        &req(RequestBody::Announce {
            bytes: vec![1, 2, 3],
        }),
    ));
    text.push_str(&one(
        "Request Submit",
        &req(RequestBody::Submit { submission }),
    ));
    text.push_str(&one(
        "Request GetGrants",
        &req(RequestBody::GetGrants {
            datanet: datanet_id(),
        }),
    ));
    text.push_str(&one(
        "Request Decision",
        &req(RequestBody::Decision {
            decision: Signed::sign(&key(1), &decision()),
        }),
    ));
    text.push_str(&one(
        "Response Heads",
        &Response::Heads {
            heads: vec![Head {
                datanet: datanet_id(),
                version: 3,
                manifest: h(9),
            }],
        },
    ));
    text.push_str(&one(
        "Response Manifest none",
        &Response::Manifest { manifest: None },
    ));
    text.push_str(&one("Response Accepted", &Response::Accepted));
    text.push_str(&one(
        "Response Refused",
        &Response::Refused {
            reason: "no".into(),
        },
    ));
    text.push_str(&one(
        "Response Grants",
        &Response::Grants {
            grants: vec![grant],
        },
    ));
    check_golden("Rpc", &text);
}
