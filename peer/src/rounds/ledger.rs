//! Ledger chains in the store: this coordinator's own, and every other coordinator's, fetched
//! over `cohort/1` and verified entry by entry before they are kept.
//!
//! Keys in [`Cf::Ledger`]: `coordinator (32 bytes) ++ seq (u64 big-endian)` for an entry, and the
//! same followed by `b'!'` for an equivocation proof found at that position. Entries of one
//! chain therefore scan in order.

use std::collections::BTreeMap;

use cohort_protocol::ledger::{ChainBreak, ChainHead, ChainRule, ChainVerifier};
use cohort_protocol::types::{
    ComputeCredit, CreditFlag, EquivocationProof, JobId, LedgerEntry, RoundClose, RoundOutcome,
    ShardCredit, Timestamp,
};
use cohort_protocol::{Canonical, ContentHash, Keypair, PeerId, Signed, encoding};
use serde::Serialize;

use crate::store::{Batch, Cf, Store, StoreError};

fn entry_key(coordinator: &PeerId, seq: u64) -> Vec<u8> {
    let mut k = coordinator.as_bytes().to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn malformed(store: &Store) -> StoreError {
    StoreError::Malformed {
        path: store.path().to_path_buf(),
        key: "ledger entry",
    }
}

/// One coordinator's stored chain, in order.
pub fn chain(store: &Store, coordinator: &PeerId) -> Result<Vec<Signed<LedgerEntry>>, StoreError> {
    let mut out = Vec::new();
    for (k, v) in store.scan_prefix(Cf::Ledger, coordinator.as_bytes())? {
        if k.len() == 40 {
            out.push(Signed::<LedgerEntry>::from_bytes(&v).map_err(|_| malformed(store))?);
        }
    }
    Ok(out)
}

/// Equivocation proofs stored against `coordinator`.
pub fn proofs(store: &Store, coordinator: &PeerId) -> Result<Vec<EquivocationProof>, StoreError> {
    let mut out = Vec::new();
    for (k, v) in store.scan_prefix(Cf::Ledger, coordinator.as_bytes())? {
        if k.len() == 41 {
            out.push(EquivocationProof::from_bytes(&v).map_err(|_| malformed(store))?);
        }
    }
    Ok(out)
}

/// Every coordinator with a stored chain.
pub fn coordinators(store: &Store) -> Result<Vec<PeerId>, StoreError> {
    let mut out: Vec<PeerId> = Vec::new();
    for (k, _) in store.scan_prefix(Cf::Ledger, &[])? {
        let Ok(id) = <[u8; 32]>::try_from(&k[..32.min(k.len())]) else {
            continue;
        };
        if let Ok(p) = PeerId::from_bytes(&id)
            && out.last() != Some(&p)
        {
            out.push(p);
        }
    }
    out.dedup();
    Ok(out)
}

/// The head of a stored chain.
pub fn head(store: &Store, coordinator: &PeerId) -> Result<Option<ChainHead>, StoreError> {
    Ok(chain(store, coordinator)?.last().and_then(|e| {
        e.verify().ok().map(|p| ChainHead {
            seq: p.seq,
            hash: e.hash(),
        })
    }))
}

/// Signs this coordinator's next entry for a closed round and adds it to `batch`.
#[allow(clippy::too_many_arguments)]
pub fn append(
    store: &Store,
    batch: &mut Batch,
    keypair: &Keypair,
    job: JobId,
    close: &Signed<RoundClose>,
    data: Vec<ShardCredit>,
    compute: Vec<ComputeCredit>,
    at: Timestamp,
) -> Result<Signed<LedgerEntry>, StoreError> {
    let me = keypair.peer_id();
    let head = head(store, &me)?;
    let c = close.verify().map_err(|_| malformed(store))?;
    let entry = LedgerEntry {
        coordinator: me,
        seq: head.map_or(0, |h| h.seq + 1),
        previous: head.map(|h| h.hash),
        job,
        round: c.round,
        close: close.hash(),
        merged_adapter: c.merged_adapter,
        validation_loss_before: c.validation_loss_before,
        validation_loss_after: c.validation_loss_after,
        data,
        compute,
        at,
    };
    let signed = Signed::sign(keypair, &entry);
    store.put(
        batch,
        Cf::Ledger,
        &entry_key(&me, entry.seq),
        &encoding::encode(&signed),
    );
    Ok(signed)
}

/// What [`ingest`] did with a batch of entries from another peer.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Ingest {
    /// Entries verified and stored.
    pub stored: usize,
    /// Entries already held.
    pub known: usize,
    /// The first rule an entry broke, if one did (later entries were not looked at).
    pub broken: Option<String>,
    /// Whether the break was a fork, kept as an equivocation proof.
    pub equivocation: bool,
}

/// Verifies `entries` (in order, claimed to continue `coordinator`'s chain) against the stored
/// chain and stores those that extend it. A different entry at a stored position is kept as
/// an equivocation proof; the chain keeps its first entry.
pub fn ingest(
    store: &Store,
    coordinator: &PeerId,
    entries: &[Signed<LedgerEntry>],
) -> Result<Ingest, StoreError> {
    let stored = chain(store, coordinator)?;
    let mut v = ChainVerifier::new(*coordinator);
    for e in &stored {
        if let Err(b) = v.push(e) {
            // The stored chain was verified on the way in; a break here is store damage.
            tracing::error!("stored ledger chain of {}: {b}", coordinator.short());
            return Err(malformed(store));
        }
    }
    let mut out = Ingest::default();
    let mut batch = Batch::default();
    for e in entries {
        match v.push(e) {
            Ok(h) => {
                store.put(
                    &mut batch,
                    Cf::Ledger,
                    &entry_key(coordinator, h.seq),
                    &encoding::encode(e),
                );
                out.stored += 1;
            }
            Err(ChainBreak { rule, seq, .. }) => match *rule {
                ChainRule::Duplicate { .. } => out.known += 1,
                ChainRule::Fork { seq: at, .. } => {
                    if let Some(first) = stored.get(at as usize) {
                        let proof = EquivocationProof {
                            first: first.clone(),
                            second: e.clone(),
                        };
                        if proof.verify().is_ok() {
                            let mut k = entry_key(coordinator, at);
                            k.push(b'!');
                            store.put(&mut batch, Cf::Ledger, &k, &encoding::encode(&proof));
                            out.equivocation = true;
                        }
                    }
                    out.broken = Some(format!("entry {at}: fork"));
                    break;
                }
                other => {
                    out.broken = Some(match seq {
                        Some(s) => format!("entry {s}: {other}"),
                        None => other.to_string(),
                    });
                    break;
                }
            },
        }
    }
    store.write(batch)?;
    Ok(out)
}

/// One chain's verification, for `cohort ledger verify`.
#[derive(Debug, Clone, Serialize)]
pub struct ChainReport {
    /// The coordinator.
    pub coordinator: String,
    /// Entries in the chain.
    pub entries: usize,
    /// Problems found; empty when the chain verifies.
    pub problems: Vec<String>,
    /// Equivocation proofs held against this coordinator.
    pub equivocations: usize,
    /// Entries whose round could not be recomputed here, and why (not failures: nothing was
    /// found wrong, but nothing was confirmed either).
    pub unchecked: Vec<String>,
    /// Entries whose round was recomputed from the published blobs and matched.
    pub recomputed: usize,
}

/// Verifies every stored chain: signatures, positions and links (as entries arrive), and each
/// entry's credit arithmetic: data credits sum to the round's gain (nothing when it has none),
/// harmful shards earn nothing, a round that merged nothing credits no data, and compute credit
/// is only claimed for updates the round verified. With `closes`, each entry is also checked
/// against its round's signed close (same hash, merged adapter, losses and verdicts).
pub fn verify_all(
    store: &Store,
    closes: &BTreeMap<ContentHash, Signed<RoundClose>>,
) -> Result<Vec<ChainReport>, StoreError> {
    let mut out = Vec::new();
    for c in coordinators(store)? {
        let entries = chain(store, &c)?;
        let mut problems = Vec::new();
        if let Err(b) = cohort_protocol::ledger::verify_chain(c, &entries) {
            problems.push(b.to_string());
        }
        for e in &entries {
            let Ok(p) = e.verify() else { continue };
            problems.extend(check_entry(&p, closes.get(&p.close)).into_iter().map(|m| {
                format!(
                    "entry {} (job {}, round {}): {m}",
                    p.seq,
                    p.job.0.short(),
                    p.round
                )
            }));
        }
        out.push(ChainReport {
            coordinator: c.to_string(),
            entries: entries.len(),
            problems,
            equivocations: proofs(store, &c)?.len(),
            unchecked: Vec::new(),
            recomputed: 0,
        });
    }
    Ok(out)
}

/// The credit rules one entry must satisfy, and agreement with its close when known.
pub fn check_entry(e: &LedgerEntry, close: Option<&Signed<RoundClose>>) -> Vec<String> {
    let mut problems = Vec::new();
    let gain = f64::from(e.validation_loss_before) - f64::from(e.validation_loss_after);
    let budget = if gain > 0.0 {
        (gain * cohort_protocol::types::Credit::UNITS_PER_NAT as f64).round() as i64
    } else {
        0
    };
    let total: i64 = e.data.iter().map(|d| d.value.0).sum();
    if !e.data.is_empty() && e.data.iter().any(|d| d.value.0 > 0) && total != budget {
        problems.push(format!(
            "data credits sum to {total} units, the round's gain is {budget}"
        ));
    }
    if e.data.iter().any(|d| d.value.0 < 0) {
        problems.push("a negative data credit".into());
    }
    if e.data
        .iter()
        .any(|d| d.flag == CreditFlag::Harmful && d.value.0 != 0)
    {
        problems.push("a shard flagged harmful is credited".into());
    }
    if let Some(signed) = close {
        if signed.hash() != e.close {
            problems.push("the close does not match the entry's hash".into());
        }
        match signed.verify() {
            Err(err) => problems.push(format!("the close does not verify: {err}")),
            Ok(c) => {
                if signed.signer() != e.coordinator {
                    problems.push("the close is not signed by the entry's coordinator".into());
                }
                if c.merged_adapter != e.merged_adapter
                    || c.validation_loss_before != e.validation_loss_before
                    || c.validation_loss_after != e.validation_loss_after
                    || c.round != e.round
                    || c.job != e.job
                {
                    problems.push("the entry disagrees with its close".into());
                }
                let merged = matches!(c.outcome, RoundOutcome::Merged | RoundOutcome::Stopped);
                if !merged && e.data.iter().any(|d| d.value.0 != 0) {
                    problems.push("data credited in a round that merged nothing".into());
                }
                for cc in &e.compute {
                    let verdict = c.verdicts.iter().find(|v| v.worker == cc.peer);
                    match verdict {
                        None => problems.push(format!(
                            "compute credit for {}, who has no verdict",
                            cc.peer.short()
                        )),
                        Some(v) => {
                            // Outliers of the robust filter passed every check of their work.
                            let passed = matches!(
                                v.rejected,
                                None | Some(
                                    cohort_protocol::types::RejectReason::NotMerged
                                        | cohort_protocol::types::RejectReason::Outlier
                                )
                            );
                            if v.commit != cc.commit || (cc.verified && !passed) {
                                problems.push(format!(
                                    "compute credit for {} does not match its verdict",
                                    cc.peer.short()
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    problems
}

/// Credit totals across every stored chain.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Totals {
    /// Data credit per contributor (nano-nats).
    pub contributors: BTreeMap<String, i64>,
    /// Verified tokens per volunteer.
    pub volunteers: BTreeMap<String, u64>,
    /// Updates that failed verification, per volunteer.
    pub failed: BTreeMap<String, u64>,
}

/// Sums credits per contributor and per volunteer over every stored chain.
pub fn totals(store: &Store) -> Result<Totals, StoreError> {
    let mut t = Totals::default();
    for c in coordinators(store)? {
        for e in chain(store, &c)? {
            let Ok(p) = e.verify() else { continue };
            for d in &p.data {
                *t.contributors.entry(d.contributor.to_string()).or_default() += d.value.0;
            }
            for cc in &p.compute {
                let who = cc.peer.to_string();
                if cc.verified {
                    *t.volunteers.entry(who).or_default() += cc.tokens;
                } else {
                    *t.failed.entry(who).or_default() += 1;
                }
            }
        }
    }
    Ok(t)
}
