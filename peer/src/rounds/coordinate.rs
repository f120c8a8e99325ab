//! The job owner's side: creating a job, and one task per job driving its [`Coordinator`].
//!
//! The task owns the machine. Everything that reaches it — joins and commits from `cohort/1`,
//! the owner's cancel, results of verification and merging, its own timer — goes through its
//! inbox, one event at a time; after each event the machine's new state is written to rocksdb
//! (with the round's ledger entry and close, when a round closed, in the same batch) before any
//! action is carried out. Verification and merging run as tracked tasks on blocking threads and
//! report back as events; when the node restarts, [`Coordinator::restore`] re-issues them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cohort_protocol::rounds::PlannedShard;
use cohort_protocol::rounds::coordinator::{
    Coordinator, CoordinatorAction, CoordinatorEvent, FilterInput, MergeInput, MergeOutcome,
    Published, Refusal, Verification,
};
use cohort_protocol::types::{
    AdapterConfig, AdapterKind, AnnouncementBody, BaseQuant, DatanetRef, Deadlines, EarlyStopping,
    Hyperparameters, JobId, JobSpec, LrSchedule, MergeMethod, Quorum, RejectReason,
    RobustAggregation, TargetModule, Timestamp, UpdateCommit, ValidationSpec, VerificationSpec,
};
use cohort_protocol::{ContentHash, PeerId, Signed};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::work::{self, JobShard};
use super::{BlobKind, CoordinatorMsg, JobRecord, Role};
use crate::node::Node;
use crate::state::{Rejection, now};
use crate::store::Batch;

/// What `cohort job create` and the dashboard send to create a job. Every field but the
/// datanets has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CreateJob {
    /// A name for people.
    pub name: String,
    /// The base model: a path, a file name in the model cache, or empty for the default model.
    pub model: String,
    /// Datanets by name or id, at their latest versions, or `NAME@VERSION` for an earlier one
    /// (held by this node).
    pub datanets: Vec<String>,
    /// Train against the GGUF's quantized blocks (QLoRA) instead of an f32 copy.
    pub qlora: bool,
    /// LoRA rank.
    pub rank: u32,
    /// LoRA alpha.
    pub alpha: f32,
    /// LoRA dropout.
    pub dropout: f32,
    /// Target modules (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).
    pub targets: Vec<String>,
    /// Peak learning rate.
    pub learning_rate: f32,
    /// Local epochs over a worker's shards in each round.
    pub epochs: u32,
    /// Sequences per micro-batch.
    pub batch_size: u32,
    /// Micro-batches per optimizer step.
    pub grad_accumulation: u32,
    /// Longest sequence in tokens.
    pub seq_len: u32,
    /// The job's seed.
    pub seed: u64,
    /// Rounds.
    pub rounds: u32,
    /// Fewest verified updates that make a round.
    pub min_updates: u32,
    /// Most workers per round.
    pub max_workers: u32,
    /// Seconds a round enrols for.
    pub enroll_secs: f64,
    /// Seconds workers have to train and commit.
    pub train_secs: f64,
    /// Seconds for checking the updates.
    pub validate_secs: f64,
    /// `exact` (re-factored to the rank), `full-rank` or `ffa`.
    pub merge: String,
    /// Stop after this many rounds without a validation gain of `min_delta`.
    pub patience: Option<u32>,
    /// The smallest validation gain that counts.
    pub min_delta: f32,
    /// Share of records held out for validation.
    pub validation_fraction: f64,
    /// Optimizer steps per committed segment.
    pub segment_steps: u32,
    /// Share of segments re-executed by the coordinator.
    pub audit_rate: f64,
    /// An update whose delta exceeds this multiple of the round's median is refused.
    pub norm_bound: f64,
    /// Byzantine updates tolerated per round: with `f > 0`, Multi-Krum refuses the `f` updates
    /// farthest from the others in every round (needs `max_workers >= 2f + 3` and
    /// `max_workers >= min_updates + f`); 0 turns the filter off.
    pub byzantine: u32,
}

impl Default for CreateJob {
    fn default() -> Self {
        Self {
            name: "job".into(),
            model: String::new(),
            datanets: Vec::new(),
            qlora: false,
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
            learning_rate: 2e-4,
            epochs: 1,
            batch_size: 4,
            grad_accumulation: 1,
            seq_len: 256,
            seed: 42,
            rounds: 2,
            min_updates: 2,
            max_workers: 8,
            enroll_secs: 10.0,
            train_secs: 600.0,
            validate_secs: 300.0,
            merge: "exact".into(),
            patience: None,
            min_delta: 0.0,
            validation_fraction: 0.1,
            segment_steps: 4,
            audit_rate: 0.1,
            norm_bound: 4.0,
            byzantine: 0,
        }
    }
}

fn target(name: &str) -> Result<TargetModule, String> {
    TargetModule::ALL
        .into_iter()
        .find(|t| t.hf_name() == name)
        .ok_or_else(|| {
            format!(
                "targets: unknown module `{name}` (one of q_proj, k_proj, v_proj, o_proj, \
                 gate_proj, up_proj, down_proj)"
            )
        })
}

fn ms(field: &str, secs: f64) -> Result<u64, String> {
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return Err(format!(
            "{field}: {secs} is not a positive number of seconds"
        ));
    }
    Ok((secs * 1000.0).round().max(1.0) as u64)
}

fn ppm(field: &str, x: f64, lo: f64, hi: f64) -> Result<u32, String> {
    if !(x.is_finite() && x >= lo && x <= hi) {
        return Err(format!("{field}: {x} is outside {lo}..={hi}"));
    }
    Ok((x * 1e6).round() as u32)
}

/// Creates a job from local datanets and starts coordinating it; returns its id.
pub async fn create_job(node: &Arc<Node>, req: CreateJob) -> Result<JobId, String> {
    if req.datanets.is_empty() {
        return Err("datanets: name at least one datanet".into());
    }
    // Datanets at their latest versions, or at the version named by `NAME@VERSION`.
    let mut refs = Vec::new();
    for given in &req.datanets {
        let (name, version) = match given.rsplit_once('@') {
            Some((n, v)) => {
                let v: u64 = v
                    .parse()
                    .map_err(|_| format!("datanets: `{given}`: the version is not a number"))?;
                (n.to_owned(), Some(v))
            }
            None => (given.clone(), None),
        };
        let found = node
            .state
            .call(move |s| -> Result<_, String> {
                let d = s.resolve(&name).map_err(|e| e.to_string())?;
                let head = d
                    .head
                    .ok_or_else(|| format!("datanet `{}` has no published version", d.name))?;
                let Some(want) = version else {
                    return Ok((d.id, head.version, head.manifest));
                };
                // Walk back from the head to the version asked for.
                let mut next = Some(head.manifest);
                while let Some(hash) = next {
                    let m = s
                        .manifest(&hash)
                        .map_err(|e| e.to_string())?
                        .and_then(|m| m.verify().ok())
                        .ok_or_else(|| {
                            format!("datanet `{}`: version {want} is not held here", d.name)
                        })?;
                    if m.version == want {
                        return Ok((d.id, m.version, hash));
                    }
                    next = m.previous.filter(|_| m.version > want);
                }
                Err(format!(
                    "datanet `{}` has no version {want} (latest {})",
                    d.name, head.version
                ))
            })
            .await
            .map_err(|e| e.to_string())??;
        refs.push(DatanetRef {
            datanet: found.0,
            version: found.1,
            manifest: found.2,
        });
    }
    refs.sort_by_key(|r| r.datanet);
    refs.dedup_by_key(|r| r.datanet);
    let mut targets = req
        .targets
        .iter()
        .map(|t| target(t))
        .collect::<Result<Vec<_>, _>>()?;
    targets.sort();
    targets.dedup();
    let merge = match req.merge.as_str() {
        "exact" => MergeMethod::ExactTruncated,
        "full-rank" => MergeMethod::ExactFullRank,
        "ffa" => MergeMethod::Ffa,
        other => return Err(format!("merge: `{other}` is not exact, full-rank or ffa")),
    };
    // The base model, as a public blob named by its hash.
    let model = if req.model.is_empty() {
        cohort_trainer::models::default_model_path()
    } else {
        cohort_trainer::models::resolve(&req.model).map_err(|e| format!("model: {e}"))?
    };
    let tag = node
        .blobs
        .add_path(&model)
        .await
        .map_err(|e| format!("model {}: {e}", model.display()))?;
    let base_model = ContentHash::from_bytes(*tag.hash.as_bytes());
    node.state
        .call(move |s| {
            let mut b = Batch::default();
            super::put_public(s.store(), &mut b, &base_model, BlobKind::Model);
            s.store().write(b)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    node.provide_own(&[base_model]).await;
    if let Err(e) = node.announce_provides(vec![base_model]).await {
        tracing::debug!("announcing the base model: {e}");
    }

    let mut spec = JobSpec {
        name: req.name.clone(),
        base_model,
        adapter: AdapterConfig {
            kind: if req.qlora {
                AdapterKind::Qlora {
                    quant: BaseQuant::GgufBlocks,
                }
            } else {
                AdapterKind::Lora
            },
            rank: req.rank,
            alpha: req.alpha,
            dropout: req.dropout,
            targets,
            rslora: false,
        },
        hyper: Hyperparameters {
            learning_rate: req.learning_rate,
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            epochs: req.epochs,
            batch_size: req.batch_size,
            grad_accumulation: req.grad_accumulation,
            seq_len: req.seq_len,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: req.seed,
        },
        datanets: refs,
        validation: ValidationSpec {
            fraction_ppm: ppm("validation_fraction", req.validation_fraction, 1e-6, 0.5)?,
            seed: req.seed ^ 0x5641_4C49_4441_5445,
            set: ContentHash::of(b""),
        },
        rounds: req.rounds,
        quorum: Quorum {
            min_updates: req.min_updates,
            max_workers: req.max_workers,
        },
        deadlines: Deadlines {
            enroll_ms: ms("enroll_secs", req.enroll_secs)?,
            train_ms: ms("train_secs", req.train_secs)?,
            validate_ms: ms("validate_secs", req.validate_secs)?,
        },
        merge,
        early_stopping: req.patience.map(|patience| EarlyStopping {
            patience,
            min_delta: req.min_delta,
        }),
        verification: VerificationSpec {
            segment_steps: req.segment_steps,
            audit_ppm: ppm("audit_rate", req.audit_rate, 0.0, 1.0)?,
            norm_bound_ppm: ppm("norm_bound", req.norm_bound, 1.0, 1e6)?,
            robust: match req.byzantine {
                0 => RobustAggregation::None,
                f => RobustAggregation::MultiKrum { f },
            },
        },
        created_at: now(),
    };
    // Check everything the spec's own rules cover before the slow part.
    spec.validate().map_err(|e| e.to_string())?;
    let me = node.me();
    let shards = work::job_shards(node, &spec, me).await?;
    // Validation records out of every shard; the rest is what workers train on.
    let mut validation = Vec::new();
    let mut planned: Vec<PlannedShard> = Vec::new();
    // Each shard's training records, for near-duplicate grouping.
    let mut texts: BTreeMap<ContentHash, Vec<String>> = BTreeMap::new();
    for s in &shards {
        let records = work::shard_records(node, s).await?;
        let (train, val) = work::split(&spec, records);
        validation.extend(val);
        if train.is_empty() {
            continue;
        }
        texts.insert(s.entry.info.hash, train);
        planned.push(PlannedShard {
            hash: s.entry.info.hash,
            datanet: s.datanet,
            contributor: s.entry.contributor,
            tokens: s.entry.info.tokens,
            group: 0,
        });
    }
    planned.sort_by_key(|s| s.hash);
    planned.dedup_by_key(|s| s.hash);
    if validation.is_empty() {
        return Err(format!(
            "the split held out no records for validation: raise validation_fraction (now {})",
            req.validation_fraction
        ));
    }
    // Near-duplicate groups: equal content first, then MinHash (see
    // `cohort_protocol::attribution::group_shards`).
    let keyed: Vec<(ContentHash, Vec<String>)> = planned
        .iter()
        .map(|p| (p.hash, texts.remove(&p.hash).unwrap_or_default()))
        .collect();
    for (p, g) in planned.iter_mut().zip(super::groups_of(&keyed)?) {
        p.group = g;
    }
    let mut text = validation.join("\n");
    text.push('\n');
    spec.validation.set = work::add_public(node, text.into_bytes(), BlobKind::Validation).await?;
    let signed = Signed::sign(&node.keypair, &spec);
    let job = JobId::of(&signed);
    let (machine, actions) = Coordinator::new(
        signed.clone(),
        planned.clone(),
        &node.keypair,
        rand::random(),
        now(),
    )
    .map_err(|e| e.to_string())?;
    let record = JobRecord {
        spec: signed,
        role: Role::Owner,
        shards: planned,
        finished: false,
    };
    let (r2, state) = (record.clone(), machine.save());
    node.state
        .call(move |s| {
            let mut b = Batch::default();
            super::put_job(s.store(), &mut b, &job, &r2);
            super::put_coordinator(s.store(), &mut b, &job, &state);
            s.store().write(b)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    spawn(node, job, record, machine, actions);
    if let Err(e) = node.announce(AnnouncementBody::Job { job }).await {
        tracing::warn!("announcing job {job}: {e}");
    }
    Ok(job)
}

/// Restarts every unfinished job this peer owns (after a restart of the node).
pub async fn resume_all(node: &Arc<Node>) {
    let records = match node.state.call(|s| super::jobs(s.store())).await {
        Ok(Ok(r)) => r,
        other => {
            tracing::error!("listing jobs: {other:?}");
            return;
        }
    };
    for (job, record) in records {
        if record.role != Role::Owner || record.finished {
            continue;
        }
        let saved = node
            .state
            .call(move |s| super::get_coordinator(s.store(), &job))
            .await;
        let Ok(Ok(Some(bytes))) = saved else {
            tracing::error!("job {job}: no saved coordinator state");
            continue;
        };
        match Coordinator::restore(&bytes, &node.keypair, now()) {
            Ok((machine, actions)) => {
                eprintln!("resuming job {job} at round {}", machine.round());
                spawn(node, job, record, machine, actions);
            }
            Err(e) => tracing::error!("job {job}: {e}"),
        }
    }
}

fn spawn(
    node: &Arc<Node>,
    job: JobId,
    record: JobRecord,
    machine: Coordinator,
    actions: Vec<CoordinatorAction>,
) {
    let (tx, rx) = mpsc::channel(256);
    node.rounds.set_coordinator(job, tx);
    node.rounds.update_status(job, |s| {
        s.role = Some(Role::Owner);
        s.round = machine.round();
        s.phase = format!("{:?}", machine.phase()).to_lowercase();
    });
    let (results_tx, results_rx) = mpsc::channel(64);
    let task = Task {
        node: node.clone(),
        job,
        record,
        machine,
        inbox: rx,
        results: results_rx,
        results_tx,
        dir: work::job_dir(node, &job),
    };
    let cancel = node.cancel.child_token();
    node.spawn(async move { task.run(actions, cancel).await });
}

struct Task {
    node: Arc<Node>,
    job: JobId,
    record: JobRecord,
    machine: Coordinator,
    inbox: mpsc::Receiver<CoordinatorMsg>,
    results: mpsc::Receiver<CoordinatorEvent>,
    results_tx: mpsc::Sender<CoordinatorEvent>,
    dir: PathBuf,
}

fn sleep_until(t: Option<Timestamp>) -> tokio::time::Sleep {
    let wait = match t {
        Some(t) => t.0.saturating_sub(now().0).min(3_600_000),
        None => 3_600_000,
    };
    tokio::time::sleep(Duration::from_millis(wait))
}

impl Task {
    async fn run(
        mut self,
        first: Vec<CoordinatorAction>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        self.apply(first, &cancel).await;
        loop {
            let wake = sleep_until(self.machine.next_deadline());
            let (event, reply) = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                m = self.inbox.recv() => match m {
                    Some(CoordinatorMsg::Event(e, reply)) => (e, Some(reply)),
                    Some(CoordinatorMsg::Cancel(reply)) => (CoordinatorEvent::Cancel, Some(reply)),
                    None => break,
                },
                Some(e) = self.results.recv() => (e, None),
                _ = wake => (CoordinatorEvent::Tick, None),
            };
            let from = match &event {
                CoordinatorEvent::Join(m) => Some(m.signer()),
                CoordinatorEvent::Commit(m) => Some(m.signer()),
                _ => None,
            };
            let committed = match &event {
                CoordinatorEvent::Commit(m) => m.verify().ok().map(|c| (c.round, c.losses.clone())),
                _ => None,
            };
            let actions = self.machine.handle(now(), event, &self.node.keypair);
            if let (Some((round, losses)), Some(from)) = (committed, from)
                && !actions
                    .iter()
                    .any(|a| matches!(a, CoordinatorAction::Refused { from: f, .. } if *f == from))
            {
                self.node.rounds.update_status(self.job, |s| {
                    s.worker_losses
                        .entry(round)
                        .or_default()
                        .insert(from.to_string(), losses);
                });
            }
            if let Some(reply) = reply {
                let refused = actions.iter().find_map(|a| match a {
                    CoordinatorAction::Refused { from: f, why } if Some(*f) == from => {
                        Some(why.clone())
                    }
                    _ => None,
                });
                let answer = match refused {
                    None | Some(Refusal::Duplicate) => Ok(()),
                    Some(why) => Err(format!("{why:?}")),
                };
                reply.send(answer).ok();
            }
            self.apply(actions, &cancel).await;
            if self.record.finished {
                break;
            }
        }
    }

    /// Persists the machine (with a close's ledger entry), then carries out the actions.
    async fn apply(
        &mut self,
        actions: Vec<CoordinatorAction>,
        cancel: &tokio_util::sync::CancellationToken,
    ) {
        let state = self.machine.save();
        let job = self.job;
        let closes: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                CoordinatorAction::Close {
                    close,
                    data,
                    compute,
                    record,
                } => Some((close.clone(), data.clone(), compute.clone(), record.clone())),
                _ => None,
            })
            .collect();
        let finished = actions
            .iter()
            .any(|a| matches!(a, CoordinatorAction::Finished { .. }));
        if finished {
            self.record.finished = true;
        }
        let record = self.record.clone();
        let kp = self.node.keypair.clone();
        let written = self
            .node
            .state
            .call(move |s| {
                let store = s.store();
                let mut b = Batch::default();
                super::put_coordinator(store, &mut b, &job, &state);
                let mut entries = Vec::new();
                for (close, data, compute, record) in closes {
                    let round = close.verify().map(|c| c.round).unwrap_or(0);
                    super::put_close(store, &mut b, &close, &job, round);
                    super::recheck::put_record(store, &mut b, &job, &record);
                    entries.push(super::ledger::append(
                        store,
                        &mut b,
                        &kp,
                        job,
                        &close,
                        data,
                        compute,
                        now(),
                    )?);
                }
                if finished {
                    super::put_job(store, &mut b, &job, &record);
                }
                store.write(b)?;
                Ok::<_, crate::store::StoreError>(entries)
            })
            .await;
        let entries = match written {
            Ok(Ok(e)) => e,
            other => {
                // Without the write nothing may be published: stop here; a restart resumes
                // from the last state that was written.
                tracing::error!("job {job}: persisting the coordinator failed: {other:?}");
                cancel.cancel();
                return;
            }
        };
        for e in entries {
            if let Ok(p) = e.verify() {
                let body = AnnouncementBody::LedgerHead {
                    seq: p.seq,
                    head: e.hash(),
                };
                if let Err(err) = self.node.announce(body).await {
                    tracing::debug!("announcing ledger head: {err}");
                }
            }
        }
        self.node.rounds.update_status(job, |s| {
            s.round = self.machine.round();
            s.phase = format!("{:?}", self.machine.phase()).to_lowercase();
            s.adapter = self.machine.adapter().map(|h| h.to_string());
            s.workers = self
                .machine
                .enrolled()
                .iter()
                .map(|p| p.to_string())
                .collect();
            s.assigned = self.assigned_work();
            s.phase_deadline_ms = self.machine.next_deadline().map(|t| t.0);
            s.finished = finished || s.finished;
        });
        for a in actions {
            match a {
                CoordinatorAction::Publish(p) => self.publish(p).await,
                CoordinatorAction::WakeAt(_) => {}
                CoordinatorAction::Verify {
                    round,
                    start,
                    commit,
                    audit,
                } => self.verify(round, start, commit, audit),
                CoordinatorAction::Distances { round, updates } => self.distances(round, updates),
                CoordinatorAction::Merge {
                    round,
                    start,
                    updates,
                    seed,
                } => self.merge(round, start, updates, seed),
                CoordinatorAction::Close { .. } => {}
                CoordinatorAction::Refused { from, why } => self.refused(from, why).await,
                CoordinatorAction::Finished { outcome, adapter } => {
                    eprintln!(
                        "job {job} finished ({outcome:?}); adapter {}",
                        adapter.map_or("none".into(), |h| h.to_string())
                    );
                }
            }
        }
    }

    /// Shards and tokens per worker in the current round's assignment.
    fn assigned_work(&self) -> BTreeMap<String, super::AssignedWork> {
        let tokens: BTreeMap<ContentHash, u64> = self
            .record
            .shards
            .iter()
            .map(|s| (s.hash, s.tokens))
            .collect();
        let Some(assignment) = self
            .machine
            .current_assignment()
            .and_then(|a| a.verify().ok())
        else {
            return BTreeMap::new();
        };
        assignment
            .work
            .iter()
            .map(|w| {
                let work = super::AssignedWork {
                    shards: w.shards.len(),
                    tokens: w.shards.iter().filter_map(|h| tokens.get(h)).sum(),
                };
                (w.worker.to_string(), work)
            })
            .collect()
    }

    async fn publish(&self, p: Published) {
        let job = self.job;
        let body = match &p {
            Published::Open(m) => {
                let round = m.verify().map(|o| o.round).unwrap_or(0);
                eprintln!("job {} round {round}: open", job.0.short());
                Some(AnnouncementBody::RoundOpened {
                    job,
                    round,
                    open: m.hash(),
                })
            }
            Published::Assignment(_) => None,
            Published::Close(m) => {
                let c = m.verify().ok();
                if let Some(c) = &c {
                    eprintln!(
                        "job {} round {}: {:?}, validation loss {:.4} -> {:.4}",
                        job.0.short(),
                        c.round,
                        c.outcome,
                        c.validation_loss_before,
                        c.validation_loss_after
                    );
                    self.node.rounds.update_status(job, |s| {
                        s.validation.push((
                            c.round,
                            c.validation_loss_before,
                            c.validation_loss_after,
                        ));
                    });
                }
                c.map(|c| AnnouncementBody::RoundClosed {
                    job,
                    round: c.round,
                    close: m.hash(),
                })
            }
        };
        self.node.rounds.update_view(job, |v| match p {
            Published::Open(m) => {
                v.open = Some(m);
                v.assignment = None;
            }
            Published::Assignment(m) => v.assignment = Some(m),
            Published::Close(m) => v.last_close = Some(m),
        });
        if let Some(body) = body
            && let Err(e) = self.node.announce(body).await
        {
            tracing::debug!("announcing: {e}");
        }
    }

    async fn refused(&self, from: PeerId, why: Refusal) {
        // Repeats and messages that crossed a phase change are what an honest peer sends
        // around a deadline: refused, not counted against it. A barred worker's join is the
        // consequence of an offence its round's verdict already recorded: shown, not counted
        // again.
        let rejection = match &why {
            Refusal::Duplicate | Refusal::Stale | Refusal::Full => {
                tracing::debug!(job = %self.job.0.short(), peer = %from.short(), ?why, "refused");
                return;
            }
            Refusal::Barred { .. } => None,
            Refusal::Forged => Some(Rejection::BadSignature),
            Refusal::Invalid(_) | Refusal::WrongJob => Some(Rejection::Invalid),
            Refusal::Equivocation => Some(Rejection::Equivocation),
            Refusal::NotAssigned | Refusal::Late => Some(Rejection::OutOfRound),
        };
        tracing::info!(job = %self.job.0.short(), peer = %from.short(), ?why, "refused");
        let key = match &why {
            Refusal::Barred { .. } => "Barred".to_owned(),
            other => format!("{other:?}"),
        };
        self.node.rounds.update_status(self.job, |s| {
            *s.refused.entry(key).or_default() += 1;
        });
        if let Some(r) = rejection {
            self.node.state.call(move |s| s.reject(from, r)).await.ok();
        }
    }

    fn verify(
        &mut self,
        round: u32,
        start: Option<ContentHash>,
        commit: Signed<UpdateCommit>,
        audit: Vec<u32>,
    ) {
        let ctx = self.context();
        let tx = self.results_tx.clone();
        let worker = commit.signer();
        let hash = commit.hash();
        self.node.spawn(async move {
            let result = match ctx.await {
                Ok(ctx) => check(ctx, round, start, &commit, &audit).await,
                Err(e) => {
                    tracing::warn!("verifying {}: {e}", worker.short());
                    Verification::Failed(RejectReason::Unavailable)
                }
            };
            tx.send(CoordinatorEvent::Verified {
                worker,
                commit: hash,
                result,
            })
            .await
            .ok();
        });
    }

    /// A future that prepares what checks need. Preparing is cheap after the first time.
    fn context(&self) -> impl Future<Output = Result<Ctx, String>> + Send + 'static {
        let node = self.node.clone();
        let spec = self.machine.spec().clone();
        let dir = self.dir.clone();
        async move {
            let base = work::model_path(&node, &spec.base_model, None).await?;
            let shards = Arc::new(work::job_shards(&node, &spec, node.me()).await?);
            let bytes = work::blob_bytes(&node, &spec.validation.set, None).await?;
            let text = String::from_utf8(bytes).map_err(|_| "validation set is not UTF-8")?;
            let validation = Arc::new(
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>(),
            );
            let setup = work::setup(&spec, &base)?;
            Ok(Ctx {
                node,
                spec,
                setup,
                shards,
                validation,
                dir,
            })
        }
    }

    /// Computes the pairwise distances of the round's verified updates for the robust filter.
    /// On failure it does not answer: the machine's filter deadline closes the round unmerged.
    fn distances(&mut self, round: u32, updates: Vec<FilterInput>) {
        let ctx = self.context();
        let node = self.node.clone();
        let tx = self.results_tx.clone();
        let job = self.job;
        self.node.spawn(async move {
            let result = match ctx.await {
                Ok(ctx) => distances(ctx, round, &updates).await,
                Err(e) => Err(e),
            };
            let result = match (result, node.coordinator_fault.as_deref()) {
                (Ok(dist), Some("misfilter")) => Ok(misfilter(&dist, updates.len())),
                (result, _) => result,
            };
            match result {
                Ok(dist) => {
                    let commits = updates.iter().map(|u| u.commit).collect();
                    tx.send(CoordinatorEvent::Distances {
                        round,
                        commits,
                        dist,
                    })
                    .await
                    .ok();
                }
                Err(e) => {
                    tracing::error!("job {job} round {round}: update distances failed: {e}");
                    eprintln!("job {job} round {round}: update distances failed: {e}");
                }
            }
        });
    }

    fn merge(
        &mut self,
        round: u32,
        start: Option<ContentHash>,
        updates: Vec<MergeInput>,
        seed: u64,
    ) {
        let ctx = self.context();
        let tx = self.results_tx.clone();
        let job = self.job;
        self.node.spawn(async move {
            let result = match ctx.await {
                Ok(ctx) => merge(ctx, round, start, updates, seed).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(m) => {
                    tx.send(CoordinatorEvent::Merged(m)).await.ok();
                }
                Err(e) => {
                    // The machine waits in Merging; a restart re-issues the merge.
                    tracing::error!("job {job} round {round}: merge failed: {e}");
                    eprintln!("job {job} round {round}: merge failed: {e}");
                }
            }
        });
    }
}

/// What checks and merges need, shared across a job's tasks.
struct Ctx {
    node: Arc<Node>,
    spec: JobSpec,
    setup: Arc<cohort_trainer::federated::JobSetup>,
    shards: Arc<Vec<JobShard>>,
    validation: Arc<Vec<String>>,
    dir: PathBuf,
}

impl Ctx {
    async fn adapter_dir(&self, hash: Option<ContentHash>) -> Result<Option<PathBuf>, String> {
        match hash {
            None => Ok(None),
            Some(h) => {
                let root = self.dir.join("adapters");
                std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
                work::unpacked(&self.node, &h, None, &root).await.map(Some)
            }
        }
    }

    async fn update_dir(
        &self,
        round: u32,
        c: &UpdateCommit,
        worker: PeerId,
    ) -> Result<PathBuf, String> {
        let root = self
            .dir
            .join(format!("rounds/{round}/updates/{}", worker.short()));
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        work::unpacked(&self.node, &c.update, Some(worker), &root).await
    }
}

/// Fetches, checks and spot-checks one update.
async fn check(
    ctx: Ctx,
    round: u32,
    start: Option<ContentHash>,
    signed: &Signed<UpdateCommit>,
    audit: &[u32],
) -> Verification {
    let worker = signed.signer();
    let Ok(c) = signed.verify() else {
        return Verification::Failed(RejectReason::Shape);
    };
    let start_dir = match ctx.adapter_dir(start).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("start adapter: {e}");
            return Verification::Failed(RejectReason::Unavailable);
        }
    };
    let dir = match ctx.update_dir(round, &c, worker).await {
        Ok(d) => d,
        Err(e) => {
            tracing::info!("update of {}: {e}", worker.short());
            return Verification::Failed(RejectReason::Unavailable);
        }
    };
    let setup = ctx.setup.clone();
    let (s2, d2) = (start_dir.clone(), dir.clone());
    let checked = work::blocking(move || {
        cohort_trainer::federated::check_update(&setup, s2.as_deref(), &d2)
            .map_err(|e| e.to_string())
    })
    .await;
    let norm = match checked {
        Ok(Ok(n)) => n,
        Ok(Err(defect)) => {
            tracing::info!("update of {}: {defect}", worker.short());
            return Verification::Failed(match defect {
                cohort_trainer::federated::UpdateDefect::NonFinite(_) => RejectReason::NonFinite,
                _ => RejectReason::Shape,
            });
        }
        Err(e) => {
            // The checker itself failed (its base or start adapter): not the worker's fault,
            // but the update cannot be accepted unchecked.
            tracing::error!("checking {}: {e}", worker.short());
            return Verification::Failed(RejectReason::Unavailable);
        }
    };
    if audit.is_empty() {
        return Verification::Passed { delta_norm: norm };
    }
    let records = match work::training_records(&ctx.node, &ctx.spec, &ctx.shards, &c.shards).await {
        Ok(r) => Arc::new(r),
        Err(e) => {
            tracing::error!("records for an audit of {}: {e}", worker.short());
            return Verification::Failed(RejectReason::Unavailable);
        }
    };
    // A worker of this peer's kernel class is checked bit for bit; one of another class (other
    // SIMD level, backend or thread count) within the trainer's tolerance, against its own
    // snapshot at the segment's end.
    let verifier = cohort_trainer::federated::Verifier::local();
    let exact = verifier.exact_for(&c.kernel);
    let kernel = Arc::new(c.kernel.clone());
    for &i in audit {
        let Some(seg) = c.segments.get(i as usize).copied() else {
            continue;
        };
        // Segment i starts where segment i - 1 ended (segment 0 from the run's own start,
        // which the auditor rebuilds itself from the start adapter and the seed).
        let prev = (i > 0).then(|| c.segments[i as usize - 1].state);
        let snapshot = match prev {
            None => None,
            Some(prev) => match snapshot_dir(&ctx, round, worker, prev).await {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::info!("snapshot of {} for segment {i}: {e}", worker.short());
                    return Verification::Failed(RejectReason::Unavailable);
                }
            },
        };
        let end = if exact {
            None
        } else {
            match snapshot_dir(&ctx, round, worker, seg.state).await {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::info!("end snapshot of {} for segment {i}: {e}", worker.short());
                    return Verification::Failed(RejectReason::Unavailable);
                }
            }
        };
        let (setup, s2, r2, seed, kernel, verifier) = (
            ctx.setup.clone(),
            start_dir.clone(),
            records.clone(),
            c.seed,
            kernel.clone(),
            verifier.clone(),
        );
        let checked = work::blocking(move || {
            let audit = cohort_trainer::federated::Audit {
                segment: cohort_trainer::verify::Segment {
                    end_step: seg.end_step as usize,
                    state: seg.state,
                    batches: seg.batches,
                },
                start_state: prev,
                start_snapshot: snapshot.as_deref(),
                end_snapshot: end.as_deref(),
                worker: &kernel,
            };
            cohort_trainer::federated::spot_check(
                &setup,
                s2.as_deref(),
                &r2,
                seed,
                &audit,
                &verifier,
            )
            .map_err(|e| e.to_string())
        })
        .await;
        match checked {
            // The snapshot must be the committed state (a re-run can absorb a changed last bit,
            // so the start is checked too), the re-run must have used the committed batches and
            // end on the committed state: bit for bit, or within the tolerance of the worker's
            // own (committed) end state.
            Ok(Ok(cohort_trainer::federated::SpotPass::Reproduced)) => {}
            Ok(Ok(cohort_trainer::federated::SpotPass::Within(d))) => {
                tracing::debug!(
                    "spot check: {}'s segment ending at step {} is {:.2e} of its update from \
                     its end state (at {})",
                    worker.short(),
                    seg.end_step,
                    d.relative,
                    d.worst
                );
            }
            Ok(Err(mismatch)) => {
                tracing::info!(
                    "spot check: {}'s segment ending at step {} does not reproduce: {mismatch}",
                    worker.short(),
                    seg.end_step
                );
                return Verification::Failed(RejectReason::SpotCheckMismatch {
                    end_step: seg.end_step,
                });
            }
            Err(e) => {
                // The checker itself failed (its base model, the start adapter, the records):
                // not the worker's fault, but the update cannot be accepted unchecked.
                tracing::error!("spot check of {}: {e}", worker.short());
                return Verification::Failed(RejectReason::Unavailable);
            }
        }
    }
    Verification::Passed { delta_norm: norm }
}

/// Fetches the worker's snapshot of training state `state`.
async fn snapshot_dir(
    ctx: &Ctx,
    round: u32,
    worker: PeerId,
    state: ContentHash,
) -> Result<PathBuf, String> {
    let answer = ctx
        .node
        .call(
            worker,
            cohort_protocol::types::rpc::RequestBody::GetSnapshot { state },
        )
        .await
        .map_err(|e| e.to_string())?;
    let blob = match answer {
        cohort_protocol::types::rpc::Response::Snapshot { blob: Some(b) } => b,
        other => return Err(format!("no snapshot: {other:?}")),
    };
    let root = ctx
        .dir
        .join(format!("rounds/{round}/snapshots/{}", worker.short()));
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    work::unpacked(&ctx.node, &blob, Some(worker), &root).await
}

/// The pairwise squared distances of the updates' deltas
/// ([`cohort_trainer::federated::update_distances`]), in the order given. The blobs are those
/// verification fetched (unpacked under the round's directory already, or fetched again).
async fn distances(ctx: Ctx, round: u32, updates: &[FilterInput]) -> Result<Vec<f64>, String> {
    let mut dirs = Vec::with_capacity(updates.len());
    for u in updates {
        let root = ctx
            .dir
            .join(format!("rounds/{round}/updates/{}", u.worker.short()));
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        dirs.push(work::unpacked(&ctx.node, &u.update, Some(u.worker), &root).await?);
        // The filter's outliers are part of the round's record too.
        keep_serving(&ctx.node, u.update).await?;
    }
    let setup = ctx.setup.clone();
    work::blocking(move || {
        cohort_trainer::federated::update_distances(&setup, &dirs).map_err(|e| e.to_string())
    })
    .await
}

/// The `misfilter` fault (tests of `cohort ledger verify` only): distances under which
/// Multi-Krum refuses the most central of `m` updates (the lowest score under `dist`) instead of
/// the farthest: that one 100 away from every other, the rest 1 apart.
fn misfilter(dist: &[f64], m: usize) -> Vec<f64> {
    let f = 1.min(m.saturating_sub(3));
    let Some(scores) = cohort_protocol::rounds::multi_krum_scores(dist, m, f) else {
        return dist.to_vec();
    };
    let central = (0..m)
        .min_by(|a, b| scores[*a].total_cmp(&scores[*b]))
        .unwrap_or(0);
    let mut fake = vec![0.0; m * m];
    for i in 0..m {
        for j in 0..m {
            if i != j {
                fake[i * m + j] = if i == central || j == central {
                    100.0
                } else {
                    1.0
                };
            }
        }
    }
    fake
}

/// Marks an update this coordinator fetched as one it serves: merged updates, and those the
/// robust filter compared, stay available after their workers leave, so that anyone can
/// recompute the round (`cohort ledger verify`).
async fn keep_serving(node: &Node, hash: ContentHash) -> Result<(), String> {
    node.state
        .call(move |s| {
            let mut b = Batch::default();
            super::put_public(s.store(), &mut b, &hash, BlobKind::Update);
            s.store().write(b)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// Merges the accepted updates, evaluates, attributes; publishes the merged adapter.
async fn merge(
    ctx: Ctx,
    round: u32,
    start: Option<ContentHash>,
    updates: Vec<MergeInput>,
    seed: u64,
) -> Result<MergeOutcome, String> {
    let start_dir = ctx.adapter_dir(start).await?;
    let mut inputs = Vec::new();
    for u in &updates {
        let root = ctx
            .dir
            .join(format!("rounds/{round}/updates/{}", u.worker.short()));
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        let d = work::unpacked(&ctx.node, &u.update, Some(u.worker), &root).await?;
        inputs.push((u.weight, d));
        keep_serving(&ctx.node, u.update).await?;
    }
    let out = ctx.dir.join(format!("rounds/{round}/merged"));
    let _ = std::fs::remove_dir_all(&out);
    let (setup, validation, o2) = (ctx.setup.clone(), ctx.validation.clone(), out.clone());
    let m = work::blocking(move || {
        cohort_trainer::federated::merge_round(
            &setup,
            start_dir.as_deref(),
            &inputs,
            &validation,
            seed,
            &o2,
        )
        .map_err(|e| e.to_string())
    })
    .await?;
    let adapter = if updates.is_empty() {
        None
    } else {
        Some(work::publish_dir(&ctx.node, &m.adapter_dir, BlobKind::Adapter).await?)
    };
    Ok(MergeOutcome {
        round,
        adapter,
        truncation_error: m.truncation_error,
        loss_before: m.loss_before,
        loss_after: m.loss_after,
        values: m.values,
    })
}

/// Routes a join or commit from `cohort/1` to the job's coordinator; the answer says whether
/// it was taken.
pub async fn deliver(node: &Node, job: &JobId, event: CoordinatorEvent) -> Result<(), String> {
    let Some(tx) = node.rounds.coordinator(job) else {
        return Err(format!("this peer does not coordinate job {job}"));
    };
    let (reply, rx) = oneshot::channel();
    tx.send(CoordinatorMsg::Event(event, reply))
        .await
        .map_err(|_| "the job's coordinator has stopped".to_owned())?;
    rx.await
        .map_err(|_| "the job's coordinator has stopped".to_owned())?
}

/// Cancels a job this peer coordinates.
pub async fn cancel(node: &Node, job: &JobId) -> Result<(), String> {
    let Some(tx) = node.rounds.coordinator(job) else {
        return Err(format!("this peer does not coordinate job {job}"));
    };
    let (reply, rx) = oneshot::channel();
    tx.send(CoordinatorMsg::Cancel(reply))
        .await
        .map_err(|_| "the job has already ended".to_owned())?;
    rx.await
        .map_err(|_| "the job has already ended".to_owned())?
}
