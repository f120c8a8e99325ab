//! Ledger chain verification: every kind of break is reported at the right entry with the
//! right rule, and a fork yields an equivocation proof that verifies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cohort_protocol::Signed;
use cohort_protocol::ledger::{ChainRule, ChainVerifier, verify_chain};
use cohort_protocol::types::*;
use common::*;

fn break_of(entries: &[Signed<LedgerEntry>]) -> (usize, Option<u64>, ChainRule) {
    let b = verify_chain(peer(1), entries).unwrap_err();
    // The message names the coordinator, the index and the rule.
    let msg = b.to_string();
    assert!(
        msg.contains(&peer(1).to_string()) && msg.contains(&format!("index {}", b.index)),
        "{msg}"
    );
    (b.index, b.seq, *b.rule)
}

#[test]
fn a_good_chain_verifies_to_its_head() {
    let c = chain(5);
    let head = verify_chain(peer(1), &c).unwrap().unwrap();
    assert_eq!(head.seq, 4);
    assert_eq!(head.hash, c[4].hash());
    assert_eq!(verify_chain(peer(1), &[]).unwrap(), None);
}

#[test]
fn reordered_entries_are_reported_out_of_order() {
    let mut c = chain(4);
    c.swap(1, 2);
    let (index, seq, rule) = break_of(&c);
    assert_eq!((index, seq), (1, Some(2)));
    assert_eq!(
        rule,
        ChainRule::OutOfOrder {
            expected: 1,
            found: 2
        }
    );
}

#[test]
fn a_missing_entry_is_reported() {
    let mut c = chain(4);
    c.remove(2);
    let (index, seq, rule) = break_of(&c);
    assert_eq!((index, seq), (2, Some(3)));
    assert_eq!(
        rule,
        ChainRule::Missing {
            expected: 2,
            found: 3
        }
    );
}

#[test]
fn a_missing_genesis_is_reported() {
    let c = chain(3);
    let (index, _, rule) = break_of(&c[1..]);
    assert_eq!(index, 0);
    assert_eq!(
        rule,
        ChainRule::Missing {
            expected: 0,
            found: 1
        }
    );
}

#[test]
fn a_duplicated_entry_is_reported() {
    let mut c = chain(3);
    c.insert(2, c[1].clone());
    let (index, seq, rule) = break_of(&c);
    assert_eq!((index, seq), (2, Some(1)));
    assert_eq!(rule, ChainRule::Duplicate { seq: 1 });
}

#[test]
fn a_fork_is_reported_with_a_proof_that_verifies() {
    let mut c = chain(3);
    // The coordinator signs a second, different entry at position 1 (same link).
    let mut other = ledger_entry(1, Some(c[0].hash()));
    other.data[0].value = Credit(999);
    let forked = Signed::sign(&key(1), &other);
    c.push(forked.clone());
    let (index, seq, rule) = break_of(&c);
    assert_eq!((index, seq), (3, Some(1)));
    let ChainRule::Fork {
        seq: 1,
        existing,
        proof: Some(proof),
    } = rule
    else {
        panic!("expected a fork, got {rule:?}");
    };
    assert_eq!(existing, c[1].hash());
    assert_eq!(proof.first, c[1]);
    assert_eq!(proof.second, forked);
    assert_eq!(proof.verify().unwrap(), (peer(1), 1));

    // The proof survives the wire.
    use cohort_protocol::Canonical;
    let back = EquivocationProof::from_bytes(&proof.to_bytes()).unwrap();
    assert_eq!(back.verify().unwrap(), (peer(1), 1));
}

#[test]
fn equivocation_proofs_that_prove_nothing_are_refused() {
    use cohort_protocol::types::ledger::InvalidProof;
    let c = chain(2);
    let same = EquivocationProof {
        first: c[0].clone(),
        second: c[0].clone(),
    };
    assert_eq!(same.verify(), Err(InvalidProof::SameEntry));
    let apart = EquivocationProof {
        first: c[0].clone(),
        second: c[1].clone(),
    };
    assert_eq!(apart.verify(), Err(InvalidProof::DifferentPositions(0, 1)));
    let mut e = ledger_entry(0, None);
    e.coordinator = peer(2);
    let two_signers = EquivocationProof {
        first: c[0].clone(),
        second: Signed::sign(&key(2), &e),
    };
    assert_eq!(two_signers.verify(), Err(InvalidProof::DifferentSigners));
}

#[test]
fn a_broken_link_is_reported() {
    let mut c = chain(2);
    c.push(Signed::sign(&key(1), &ledger_entry(2, Some(h(0x99)))));
    let (index, seq, rule) = break_of(&c);
    assert_eq!((index, seq), (2, Some(2)));
    assert_eq!(
        rule,
        ChainRule::BrokenLink {
            expected: Some(c[1].hash()),
            found: Some(h(0x99)),
        }
    );
}

#[test]
fn another_signer_or_a_bad_signature_is_reported() {
    let mut c = chain(2);
    let mut e = ledger_entry(2, Some(c[1].hash()));
    e.coordinator = peer(2);
    c.push(Signed::sign(&key(2), &e));
    let (index, _, rule) = break_of(&c);
    assert_eq!(index, 2);
    assert!(matches!(rule, ChainRule::WrongSigner { .. }), "{rule:?}");

    // Signed by the coordinator but naming another.
    let mut c = chain(1);
    let mut e = ledger_entry(1, Some(c[0].hash()));
    e.coordinator = peer(2);
    c.push(Signed::sign(&key(1), &e));
    assert!(matches!(
        break_of(&c).2,
        ChainRule::CoordinatorMismatch { .. }
    ));

    // A forged signature.
    let c = chain(2);
    let forged = Signed::<LedgerEntry>::from_parts(
        c[1].domain().into(),
        c[1].version(),
        c[1].signer(),
        c[1].payload_bytes().to_vec(),
        [7; 64],
    );
    let (index, _, rule) = break_of(&[c[0].clone(), forged]);
    assert_eq!(index, 1);
    assert!(matches!(rule, ChainRule::Signature(_)), "{rule:?}");
}

#[test]
fn an_invalid_entry_is_reported() {
    let mut e = ledger_entry(0, None);
    e.data.push(e.data[0]); // duplicate shard credit
    let (_, seq, rule) = break_of(&[Signed::sign(&key(1), &e)]);
    assert_eq!(seq, Some(0));
    assert!(matches!(rule, ChainRule::Invalid(_)), "{rule:?}");
}

#[test]
fn the_incremental_verifier_rejects_without_changing_state() {
    let c = chain(3);
    let mut v = ChainVerifier::new(peer(1));
    v.push(&c[0]).unwrap();
    assert!(v.push(&c[2]).is_err());
    assert_eq!(v.head().unwrap().seq, 0);
    v.push(&c[1]).unwrap();
    v.push(&c[2]).unwrap();
    assert_eq!(v.head().unwrap().hash, c[2].hash());
    assert_eq!(v.hash_at(1), Some(c[1].hash()));
}
