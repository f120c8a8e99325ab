//! `cohort ledger verify`'s deep check: one ledger entry's round recomputed from what was
//! published.
//!
//! From the coordinator's round record (open, assignment, close, merged commits, shard plan) and
//! the blobs they name (base model, start adapter, updates, validation set), the verifier
//! re-runs the merge, the evaluation and the Shapley values with the trainer, and the credit
//! arithmetic with the protocol's own function, and compares every result with the signed
//! entry: the merged adapter's hash, both validation losses, each shard's credit and flag. It
//! also checks the plan against the datanets' signed manifests (contributors, tokens) and, when
//! it can read every shard, the near-duplicate groups. On one kernel class (see the commit's
//! `KernelClass`) the results are bit-identical; anything else is reported.
//!
//! The merge is recomputed from the merged set (the verdicts without a reason). The robust
//! filter is recomputed too: the record names the commits Multi-Krum refused
//! ([`RejectReason::Outlier`]); a merged round refuses exactly `min(f − caught, m − 3)` of the
//! `m` updates it compared (`caught`: the round's updates refused for misbehaviour), and
//! Multi-Krum over the merged and refused updates' blobs must pick the same ones. The other
//! refusals (shape, finite values, norm bound, spot checks) are taken from the signed close,
//! not recomputed: those updates are not part of the record.

use std::path::PathBuf;
use std::sync::Arc;

use cohort_protocol::rounds::coordinator::{bars, filter_budget, round_data_credits};
use cohort_protocol::rounds::{RoundRecord, merge_weights};
use cohort_protocol::types::rpc::{RequestBody, Response};
use cohort_protocol::types::{JobId, JobSpec, LedgerEntry, RejectReason, RoundOutcome};
use cohort_protocol::{ContentHash, PeerId, Signed};

use super::work;
use crate::node::Node;
use crate::store::Batch;

/// Stores a closed round's record (the coordinator, at close).
pub fn put_record(
    store: &crate::store::Store,
    batch: &mut Batch,
    job: &JobId,
    record: &RoundRecord,
) {
    let round = record.close.verify().map(|c| c.round).unwrap_or(u32::MAX);
    let mut key = vec![b'r'];
    key.extend_from_slice(job.0.as_bytes());
    key.extend_from_slice(&round.to_be_bytes());
    store.put(
        batch,
        crate::store::Cf::Rounds,
        &key,
        &cohort_protocol::encoding::encode(record),
    );
}

/// A stored round record.
pub fn get_record(
    store: &crate::store::Store,
    job: &JobId,
    round: u32,
) -> Result<Option<RoundRecord>, crate::store::StoreError> {
    use cohort_protocol::Canonical as _;
    let mut key = vec![b'r'];
    key.extend_from_slice(job.0.as_bytes());
    key.extend_from_slice(&round.to_be_bytes());
    Ok(store
        .get(crate::store::Cf::Rounds, &key)?
        .and_then(|v| RoundRecord::from_bytes(&v).ok()))
}

/// The outcome of rechecking one entry.
#[derive(Debug, Default)]
pub struct Recheck {
    /// Mismatches: the entry does not follow from what was published.
    pub problems: Vec<String>,
    /// Why the round could not be recomputed, if it could not (artifacts unavailable).
    pub unchecked: Option<String>,
}

async fn record_of(node: &Node, e: &LedgerEntry) -> Result<RoundRecord, String> {
    let (job, round) = (e.job, e.round);
    if e.coordinator == node.me() {
        return node
            .state
            .call(move |s| get_record(s.store(), &job, round))
            .await
            .map_err(|x| x.to_string())?
            .map_err(|x| x.to_string())?
            .ok_or_else(|| format!("no record of round {round} here"));
    }
    match node
        .call(e.coordinator, RequestBody::GetRoundRecord { job, round })
        .await
        .map_err(|x| format!("asking the coordinator for the round: {x}"))?
    {
        Response::RoundRecord { record: Some(r) } => Ok(*r),
        other => Err(format!(
            "the coordinator has no record of the round: {other:?}"
        )),
    }
}

async fn spec_of(node: &Node, job: JobId, coordinator: PeerId) -> Result<JobSpec, String> {
    let signed = match super::volunteer::job_spec(node, job).await {
        Some(s) => s,
        None => match node
            .call(coordinator, RequestBody::GetJob { job })
            .await
            .map_err(|x| format!("asking the coordinator for the job: {x}"))?
        {
            Response::Job { spec: Some(s) } => s,
            other => return Err(format!("the coordinator did not give the job: {other:?}")),
        },
    };
    if JobId::of(&signed) != job || signed.signer() != coordinator {
        return Err("the job's spec does not match its id or coordinator".into());
    }
    signed.verify().map_err(|x| x.to_string())
}

fn signed_by<T: cohort_protocol::SignedPayload>(
    m: &Signed<T>,
    who: PeerId,
    what: &str,
    problems: &mut Vec<String>,
) -> Option<T> {
    if m.signer() != who {
        problems.push(format!("the {what} is not signed by the coordinator"));
        return None;
    }
    match m.verify() {
        Ok(p) => Some(p),
        Err(x) => {
            problems.push(format!("the {what} does not verify: {x}"));
            None
        }
    }
}

/// Recomputes the round of ledger entry `e` and compares.
pub async fn recheck(node: &Arc<Node>, e: &LedgerEntry) -> Recheck {
    let mut out = Recheck::default();
    match recheck_inner(node, e, &mut out.problems).await {
        Ok(()) => {}
        Err(why) => out.unchecked = Some(why),
    }
    out
}

async fn recheck_inner(
    node: &Arc<Node>,
    e: &LedgerEntry,
    problems: &mut Vec<String>,
) -> Result<(), String> {
    let record = record_of(node, e).await?;
    let coordinator = e.coordinator;
    if record.close.hash() != e.close {
        problems.push("the round record's close is not the entry's".into());
        return Ok(());
    }
    let Some(close) = signed_by(&record.close, coordinator, "close", problems) else {
        return Ok(());
    };
    let Some(open) = signed_by(&record.open, coordinator, "round open", problems) else {
        return Ok(());
    };
    if open.job != e.job || open.round != e.round || close.job != e.job || close.round != e.round {
        problems.push("the round record is for another job or round".into());
        return Ok(());
    }
    let merged_round = matches!(close.outcome, RoundOutcome::Merged | RoundOutcome::Stopped);
    if !merged_round {
        if !record.merged.is_empty() || e.data.iter().any(|d| d.value.0 != 0) {
            problems.push("a round that merged nothing records merged updates or credit".into());
        }
        return Ok(());
    }
    let Some(assignment) = record
        .assignment
        .as_ref()
        .and_then(|a| signed_by(a, coordinator, "assignment", problems))
    else {
        problems.push("a merged round without an assignment".into());
        return Ok(());
    };
    // The merged commits are exactly the verdicts without a reason.
    let mut tokens = Vec::new();
    let mut updates = Vec::new();
    for m in &record.merged {
        let Ok(c) = m.verify() else {
            problems.push(format!(
                "merged commit of {} does not verify",
                m.signer().short()
            ));
            return Ok(());
        };
        let verdict = close.verdicts.iter().find(|v| v.worker == m.signer());
        if !verdict.is_some_and(|v| v.rejected.is_none() && v.commit == m.hash()) {
            problems.push(format!(
                "{}'s merged commit is not a merged verdict of the close",
                m.signer().short()
            ));
        }
        tokens.push(c.tokens);
        updates.push((m.signer(), c.update));
    }
    let accepted = close
        .verdicts
        .iter()
        .filter(|v| v.rejected.is_none())
        .count();
    if accepted != record.merged.len() {
        problems.push(format!(
            "the close merges {accepted} updates, the record names {}",
            record.merged.len()
        ));
    }
    let spec = spec_of(node, e.job, coordinator).await?;
    // The robust filter: it compared the merged updates and its outliers, and refused
    // min(f − caught, m − 3) of them (see the coordinator's docs). The record names the outliers'
    // commits, which must be the close's outlier verdicts.
    let mut filtered = Vec::new();
    for m in &record.filtered {
        let Ok(c) = m.verify() else {
            problems.push(format!(
                "filtered commit of {} does not verify",
                m.signer().short()
            ));
            return Ok(());
        };
        let verdict = close.verdicts.iter().find(|v| v.worker == m.signer());
        if !verdict
            .is_some_and(|v| v.rejected == Some(RejectReason::Outlier) && v.commit == m.hash())
        {
            problems.push(format!(
                "{}'s filtered commit is not an outlier verdict of the close",
                m.signer().short()
            ));
        }
        filtered.push((m.signer(), c.update));
    }
    let outliers = close
        .verdicts
        .iter()
        .filter(|v| v.rejected == Some(RejectReason::Outlier))
        .count();
    if outliers != filtered.len() {
        problems.push(format!(
            "the close refuses {outliers} updates as outliers, the record names {}",
            filtered.len()
        ));
    }
    let f = spec.verification.robust.byzantine() as usize;
    let compared = accepted + outliers;
    let caught = close
        .verdicts
        .iter()
        .filter(|v| v.rejected.as_ref().is_some_and(bars))
        .count();
    let budget = filter_budget(f, caught, compared);
    if outliers != budget {
        problems.push(format!(
            "the close refuses {outliers} of {compared} updates as outliers; the job's filter \
             (f = {f}, {caught} caught misbehaving) refuses {budget}"
        ));
    }
    // The plan against the datanets' signed manifests.
    let shards = work::job_shards(node, &spec, coordinator).await?;
    for p in &record.shards {
        match shards.iter().find(|s| s.entry.info.hash == p.hash) {
            None => problems.push(format!(
                "planned shard {} is in none of the job's datanets",
                p.hash.short()
            )),
            Some(s) => {
                if s.entry.contributor != p.contributor
                    || s.entry.info.tokens != p.tokens
                    || s.datanet != p.datanet
                {
                    problems.push(format!(
                        "planned shard {} does not match its manifest (contributor, tokens or datanet)",
                        p.hash.short()
                    ));
                }
            }
        }
    }
    // Near-duplicate groups, when every shard can be read here.
    let mut texts = Vec::new();
    let mut readable = true;
    for p in &record.shards {
        let Some(s) = shards.iter().find(|s| s.entry.info.hash == p.hash) else {
            readable = false;
            break;
        };
        match work::shard_records(node, s).await {
            Ok(r) => texts.push((p.hash, work::split(&spec, r).0)),
            Err(_) => {
                readable = false;
                break;
            }
        }
    }
    if readable {
        let groups = super::groups_of(&texts)?;
        let claimed: Vec<u32> = record.shards.iter().map(|p| p.group).collect();
        if !same_partition(&groups, &claimed) {
            problems.push("the shards' near-duplicate groups differ from the plan's".into());
        }
    }
    // Recompute the merge, the losses and the Shapley values.
    let dir = node
        .data_dir
        .root()
        .join("verify")
        .join(e.job.0.to_string())
        .join(e.round.to_string());
    std::fs::create_dir_all(&dir).map_err(|x| format!("{}: {x}", dir.display()))?;
    let base = work::model_path(node, &spec.base_model, Some(coordinator)).await?;
    let start = match open.start_adapter {
        None => None,
        Some(h) => Some(work::unpacked(node, &h, Some(coordinator), &dir).await?),
    };
    let mut inputs: Vec<(f64, PathBuf)> = Vec::new();
    for ((worker, update), w) in updates.iter().zip(merge_weights(&tokens)) {
        inputs.push((
            w,
            update_dir(node, coordinator, *worker, update, &dir).await?,
        ));
    }
    let setup = work::setup(&spec, &base)?;
    if budget > 0 && problems.is_empty() {
        filter_again(
            node,
            &setup,
            coordinator,
            &updates,
            &filtered,
            budget,
            &dir,
            problems,
        )
        .await?;
    }
    let bytes = work::blob_bytes(node, &spec.validation.set, Some(coordinator)).await?;
    let validation: Vec<String> = String::from_utf8(bytes)
        .map_err(|_| "the validation set is not UTF-8")?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    let out = dir.join("merged");
    let _ = std::fs::remove_dir_all(&out);
    let o2 = out.clone();
    let m = work::blocking(move || {
        cohort_trainer::federated::merge_round(
            &setup,
            start.as_deref(),
            &inputs,
            &validation,
            open.seed,
            &o2,
        )
        .map_err(|x| x.to_string())
    })
    .await?;
    let adapter_dir = m.adapter_dir.clone();
    let packed = work::blocking(move || {
        cohort_trainer::federated::pack_dir(&adapter_dir).map_err(|x| x.to_string())
    })
    .await?;
    let merged_hash = ContentHash::of(&packed);
    if Some(merged_hash) != e.merged_adapter {
        problems.push(format!(
            "the recomputed merge is {}, the entry says {}",
            merged_hash.short(),
            e.merged_adapter.map_or("none".into(), |h| h.short())
        ));
    }
    if m.loss_before.to_bits() != e.validation_loss_before.to_bits()
        || m.loss_after.to_bits() != e.validation_loss_after.to_bits()
    {
        problems.push(format!(
            "recomputed validation losses {} -> {}, the entry says {} -> {}",
            m.loss_before, m.loss_after, e.validation_loss_before, e.validation_loss_after
        ));
    }
    let values: Vec<(PeerId, f64)> = updates.iter().map(|(w, _)| *w).zip(m.values).collect();
    let data = round_data_credits(
        &assignment,
        &record.shards,
        &values,
        m.loss_before,
        m.loss_after,
    );
    if data != e.data {
        let differing = data.iter().zip(&e.data).filter(|(a, b)| a != b).count()
            + data.len().abs_diff(e.data.len());
        problems.push(format!(
            "the recomputed data credits differ from the entry's in {differing} shard(s)"
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Fetches an update the coordinator merged or compared (it serves them; the worker may be
/// gone) and unpacks it under `dir`.
async fn update_dir(
    node: &Node,
    coordinator: PeerId,
    worker: PeerId,
    update: &ContentHash,
    dir: &std::path::Path,
) -> Result<PathBuf, String> {
    match work::unpacked(node, update, Some(coordinator), dir).await {
        Ok(d) => Ok(d),
        Err(_) => work::unpacked(node, update, Some(worker), dir).await,
    }
}

/// Multi-Krum again, on the updates the round compared (`merged` and `filtered`, by worker):
/// their pairwise distances from the update blobs, the `budget` outliers, and those against the
/// ones the close refused. The arithmetic is the coordinator's own
/// ([`cohort_trainer::federated::update_distances`],
/// [`cohort_protocol::rounds::multi_krum_outliers`]), so on one kernel class the verdicts are
/// the same; a near tie between two scores could differ elsewhere and would be reported.
#[allow(clippy::too_many_arguments)]
async fn filter_again(
    node: &Node,
    setup: &cohort_trainer::federated::JobSetup,
    coordinator: PeerId,
    merged: &[(PeerId, ContentHash)],
    filtered: &[(PeerId, ContentHash)],
    budget: usize,
    dir: &std::path::Path,
    problems: &mut Vec<String>,
) -> Result<(), String> {
    let mut compared: Vec<(PeerId, ContentHash, bool)> = merged
        .iter()
        .map(|(w, u)| (*w, *u, false))
        .chain(filtered.iter().map(|(w, u)| (*w, *u, true)))
        .collect();
    compared.sort_by_key(|c| c.0);
    let mut dirs = Vec::with_capacity(compared.len());
    for (worker, update, _) in &compared {
        dirs.push(update_dir(node, coordinator, *worker, update, dir).await?);
    }
    let setup = setup.clone();
    let dist = work::blocking(move || {
        cohort_trainer::federated::update_distances(&setup, &dirs).map_err(|x| x.to_string())
    })
    .await?;
    let m = compared.len();
    let Some(outliers) = cohort_protocol::rounds::multi_krum_outliers(&dist, m, budget) else {
        problems.push(format!(
            "the robust filter cannot refuse {budget} of {m} updates"
        ));
        return Ok(());
    };
    let names = |which: &mut dyn Iterator<Item = usize>| -> String {
        which
            .map(|i| compared[i].0.short())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let claimed: Vec<usize> = (0..m).filter(|i| compared[*i].2).collect();
    if claimed != outliers {
        problems.push(format!(
            "the robust filter refused {} as outliers; Multi-Krum over the published updates \
             refuses {}",
            names(&mut claimed.iter().copied()),
            names(&mut outliers.iter().copied())
        ));
    }
    Ok(())
}

/// Whether two group numberings put the same shards together.
fn same_partition(a: &[u32], b: &[u32]) -> bool {
    a.len() == b.len()
        && (0..a.len()).all(|i| (i + 1..a.len()).all(|j| (a[i] == a[j]) == (b[i] == b[j])))
}
