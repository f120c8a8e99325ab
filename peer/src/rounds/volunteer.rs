//! The volunteer's side: which jobs to take, and one task per job driving its [`Worker`].
//!
//! A job is considered when its announcement arrives (gossip) or when a periodic look at known
//! peers' jobs finds it (`cohort/1` `Jobs`, the anti-entropy for peers that joined late). If the
//! [`Policy`] accepts it, a worker task follows the coordinator: it asks for the current
//! round (`GetRound`) whenever an announcement for the job arrives and every
//! [`POLL`] while it waits, joins, trains its assignment on a blocking thread, uploads the
//! update and its snapshots as blobs, and commits.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cohort_protocol::rounds::worker::{TrainedUpdate, Worker, WorkerAction, WorkerEvent};
use cohort_protocol::types::rpc::{RequestBody, Response};
use cohort_protocol::types::{Capacity, JobId, JobSpec, SegmentCommit, WorkAssignment};
use cohort_protocol::{ContentHash, PeerId, Signed};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::work::{self};
use super::{BlobKind, JobRecord, Role};
use crate::node::Node;
use crate::state::now;
use crate::store::Batch;

/// How often a worker asks its coordinator for the round while it waits.
pub const POLL: Duration = Duration::from_millis(1000);

/// Which jobs this peer volunteers for.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Only jobs by these owners (peer ids); empty: any owner.
    pub owners: Vec<String>,
    /// Only jobs whose datanets are all among these (ids); empty: any datanet.
    pub datanets: Vec<String>,
    /// Refuse jobs with a larger LoRA rank.
    pub max_rank: Option<u32>,
    /// Refuse jobs with more rounds.
    pub max_rounds: Option<u32>,
    /// Refuse jobs whose sequences are longer.
    pub max_seq_len: Option<u32>,
    /// Deliberately misbehave, for tests of the coordinator's defences: `nan` (a NaN in the
    /// update), `oversized` (the update scaled up 1000x), `made-up` (an update never trained:
    /// random factors, committed with invented segment hashes). Never use outside tests.
    pub fault: Option<String>,
}

impl Policy {
    /// Why the policy refuses `spec` from `owner`, if it does.
    pub fn refuses(&self, owner: &PeerId, spec: &JobSpec) -> Option<String> {
        if !self.owners.is_empty() && !self.owners.iter().any(|o| *o == owner.to_string()) {
            return Some(format!("owner {} is not in the policy", owner.short()));
        }
        if !self.datanets.is_empty() {
            for d in &spec.datanets {
                if !self.datanets.iter().any(|x| *x == d.datanet.to_string()) {
                    return Some(format!("datanet {} is not in the policy", d.datanet));
                }
            }
        }
        if self.max_rank.is_some_and(|m| spec.adapter.rank > m) {
            return Some(format!(
                "rank {} is over the policy's maximum",
                spec.adapter.rank
            ));
        }
        if self.max_rounds.is_some_and(|m| spec.rounds > m) {
            return Some(format!(
                "{} rounds is over the policy's maximum",
                spec.rounds
            ));
        }
        if self.max_seq_len.is_some_and(|m| spec.hyper.seq_len > m) {
            return Some(format!(
                "sequence length {} is over the policy's maximum",
                spec.hyper.seq_len
            ));
        }
        None
    }
}

/// A message for a worker task.
#[derive(Debug)]
pub enum WorkerMsg {
    /// Something happened to the job (an announcement): ask the coordinator now.
    Poke,
}

/// This machine's kernel class and capacity, as a volunteer offers it.
pub fn capacity(models: Vec<ContentHash>) -> Capacity {
    Capacity {
        kernel: cohort_trainer::federated::kernel_class(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u16),
        memory_mib: 0,
        models,
    }
}

/// Looks at a job announced by `owner` and, if volunteering is on and the policy accepts it,
/// starts working on it.
pub async fn consider(node: &Arc<Node>, owner: PeerId, job: JobId) {
    let Some(policy) = node.rounds.policy() else {
        return;
    };
    if node.rounds.has_worker(&job) || owner == node.me() || node.rounds.declined(&job) {
        return;
    }
    let known = node
        .state
        .call(move |s| super::get_job(s.store(), &job))
        .await;
    if let Ok(Ok(Some(r))) = &known
        && (r.finished || r.role == Role::Owner)
    {
        return;
    }
    let answer = node.call(owner, RequestBody::GetJob { job }).await;
    let spec = match answer {
        Ok(Response::Job { spec: Some(s) }) => s,
        Ok(other) => {
            tracing::debug!("job {job} from {}: {other:?}", owner.short());
            return;
        }
        Err(e) => {
            tracing::debug!("job {job} from {}: {e}", owner.short());
            return;
        }
    };
    let payload = match spec.verify() {
        Ok(p) if spec.signer() == owner && JobId::of(&spec) == job && p.validate().is_ok() => p,
        _ => {
            node.state
                .call(move |s| s.reject(owner, crate::state::Rejection::Invalid))
                .await
                .ok();
            return;
        }
    };
    if let Some(why) = policy.refuses(&owner, &payload) {
        eprintln!("not volunteering for job {}: {why}", job.0.short());
        node.rounds.decline(job);
        return;
    }
    let record = JobRecord {
        spec: spec.clone(),
        role: Role::Volunteer,
        shards: Vec::new(),
        finished: false,
    };
    let r2 = record.clone();
    if let Err(e) = node
        .state
        .call(move |s| {
            let mut b = Batch::default();
            super::put_job(s.store(), &mut b, &job, &r2);
            s.store().write(b)
        })
        .await
    {
        tracing::error!("storing job {job}: {e}");
        return;
    }
    let models = if work::held(node, &payload.base_model).await {
        vec![payload.base_model]
    } else {
        Vec::new()
    };
    let worker = Worker::new(&spec, payload.clone(), capacity(models));
    let (tx, rx) = mpsc::channel(64);
    node.rounds.set_worker(job, tx);
    node.rounds.update_status(job, |s| {
        s.role = Some(Role::Volunteer);
        s.phase = "joining".into();
    });
    eprintln!("volunteering for job {} ({})", job.0.short(), payload.name);
    let task = Task {
        node: node.clone(),
        job,
        owner,
        spec: payload,
        worker,
        inbox: rx,
        stop: Arc::new(AtomicBool::new(false)),
        fault: policy.fault.clone(),
    };
    let cancel = node.cancel.child_token();
    node.spawn(async move { task.run(cancel).await });
}

/// Asks every known peer for its jobs and considers each (anti-entropy for volunteers).
pub async fn discover(node: &Arc<Node>) {
    if node.rounds.policy().is_none() {
        return;
    }
    for peer in node.known_peers() {
        match node.call(peer, RequestBody::Jobs).await {
            Ok(Response::Jobs { jobs }) => {
                for job in jobs {
                    consider(node, peer, job).await;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("jobs of {}: {e}", peer.short()),
        }
    }
}

struct Task {
    node: Arc<Node>,
    job: JobId,
    owner: PeerId,
    spec: JobSpec,
    worker: Worker,
    inbox: mpsc::Receiver<WorkerMsg>,
    stop: Arc<AtomicBool>,
    fault: Option<String>,
}

impl Drop for Task {
    /// A worker dropped at shutdown stops its training run at the next step.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Task {
    async fn run(mut self, cancel: tokio_util::sync::CancellationToken) {
        let (trained_tx, mut trained_rx) = mpsc::channel::<WorkerEvent>(4);
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let events = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(e) = trained_rx.recv() => vec![e],
                m = self.inbox.recv() => match m {
                    Some(WorkerMsg::Poke) => self.ask().await,
                    None => break,
                },
                _ = poll.tick() => {
                    let mut e = self.ask().await;
                    e.push(WorkerEvent::Tick);
                    e
                }
            };
            for e in events {
                let actions = self.worker.handle(now(), e, &self.node.keypair);
                for a in actions {
                    if self.act(a, &trained_tx).await {
                        self.stop.store(true, Ordering::Relaxed);
                        self.finish().await;
                        return;
                    }
                }
            }
            let phase = format!("{:?}", self.worker.phase());
            let round = self.worker.round().unwrap_or(0);
            self.node.rounds.update_status(self.job, |s| {
                s.round = round;
                s.phase = phase.split([' ', '{']).next().unwrap_or("").to_lowercase();
            });
        }
        self.stop.store(true, Ordering::Relaxed);
    }

    async fn finish(&self) {
        let job = self.job;
        let done = self
            .node
            .state
            .call(move |s| -> Result<(), crate::store::StoreError> {
                if let Some(mut r) = super::get_job(s.store(), &job)? {
                    r.finished = true;
                    let mut b = Batch::default();
                    super::put_job(s.store(), &mut b, &job, &r);
                    s.store().write(b)?;
                }
                Ok(())
            })
            .await;
        if let Ok(Err(e)) = done {
            tracing::warn!("job {job}: {e}");
        }
        self.node.rounds.update_status(job, |s| {
            s.finished = true;
            s.phase = "finished".into();
        });
        eprintln!("job {} is over for this volunteer", job.0.short());
    }

    /// The coordinator's current round, as events in the order the worker needs them: the
    /// last close, the open, the assignment.
    async fn ask(&self) -> Vec<WorkerEvent> {
        let job = self.job;
        match self
            .node
            .call(self.owner, RequestBody::GetRound { job })
            .await
        {
            Ok(Response::Round {
                open,
                assignment,
                last_close,
            }) => {
                let mut out = Vec::new();
                out.extend(last_close.map(WorkerEvent::Closed));
                // Once the round is assigned, hearing its open again would only re-send a
                // join the coordinator no longer takes.
                let assigned = assignment.is_some();
                let round = open.as_ref().and_then(|o| o.verify().ok()).map(|o| o.round);
                if let Some(o) = open
                    && !(assigned && round == self.worker.round())
                {
                    out.push(WorkerEvent::Open(o));
                }
                out.extend(assignment.map(WorkerEvent::Assigned));
                out
            }
            Ok(other) => {
                tracing::debug!("round of job {job}: {other:?}");
                Vec::new()
            }
            Err(e) => {
                tracing::debug!("round of job {job}: {e}");
                Vec::new()
            }
        }
    }

    /// Carries out one action; true when the job is over for this worker.
    async fn act(&mut self, a: WorkerAction, trained: &mpsc::Sender<WorkerEvent>) -> bool {
        match a {
            WorkerAction::SendJoin(m) => {
                let r = self
                    .node
                    .call(self.owner, RequestBody::Join { join: m })
                    .await;
                match &r {
                    // An earlier round refused this peer's update for misbehaviour: its
                    // operator should hear of it.
                    Ok(Response::Refused { reason }) if reason.starts_with("Barred") => {
                        tracing::warn!("join refused: {reason}");
                        eprintln!(
                            "job {}: the coordinator bars this peer from its rounds: {reason}",
                            self.job.0.short()
                        );
                    }
                    Ok(Response::Refused { reason }) => tracing::debug!("join refused: {reason}"),
                    _ => {}
                }
            }
            // The deadline is the machine's to watch: past it, a tick turns into StopTraining.
            WorkerAction::Train {
                round,
                start,
                work,
                deadline: _,
            } => {
                self.stop = Arc::new(AtomicBool::new(false));
                eprintln!(
                    "job {} round {round}: training {} shard(s)",
                    self.job.0.short(),
                    work.shards.len()
                );
                let job = Job {
                    node: self.node.clone(),
                    job: self.job,
                    owner: self.owner,
                    spec: self.spec.clone(),
                    stop: self.stop.clone(),
                    fault: self.fault.clone(),
                };
                let tx = trained.clone();
                self.node.spawn(async move {
                    let e = match job.train(round, start, work).await {
                        Ok(t) => WorkerEvent::Trained(t),
                        Err(e) => {
                            eprintln!(
                                "job {} round {round}: training failed: {e}",
                                job.job.0.short()
                            );
                            WorkerEvent::TrainingFailed { round }
                        }
                    };
                    tx.send(e).await.ok();
                });
            }
            WorkerAction::StopTraining { .. } => self.stop.store(true, Ordering::Relaxed),
            WorkerAction::SendCommit(m) => {
                let node = self.node.clone();
                let owner = self.owner;
                // Retried until the coordinator answers (it may be restarting).
                self.node.spawn(async move {
                    for attempt in 0..60 {
                        match node
                            .call(owner, RequestBody::Commit { commit: m.clone() })
                            .await
                        {
                            Ok(Response::Accepted) => return,
                            Ok(Response::Refused { reason }) => {
                                eprintln!("commit refused: {reason}");
                                return;
                            }
                            Ok(_) | Err(_) => {
                                tracing::debug!("commit attempt {attempt} failed; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                });
            }
            WorkerAction::Refused { from, why } => {
                tracing::info!("refused a message from {}: {why:?}", from.short());
                self.node
                    .state
                    .call(move |s| s.reject(from, crate::state::Rejection::BadSignature))
                    .await
                    .ok();
            }
            WorkerAction::Verdict { round, rejected } => {
                eprintln!(
                    "job {} round {round}: update {}",
                    self.job.0.short(),
                    match &rejected {
                        None => "merged".to_owned(),
                        Some(r) => format!("rejected ({r:?})"),
                    }
                );
            }
            WorkerAction::Finished => return true,
        }
        false
    }
}

/// What a training run needs, detached from the task so it can run alongside it.
struct Job {
    node: Arc<Node>,
    job: JobId,
    owner: PeerId,
    spec: JobSpec,
    stop: Arc<AtomicBool>,
    fault: Option<String>,
}

impl Job {
    async fn train(
        &self,
        round: u32,
        start: Option<ContentHash>,
        work_assignment: WorkAssignment,
    ) -> Result<TrainedUpdate, String> {
        let node = &self.node;
        let dir = work::job_dir(node, &self.job);
        let base = work::model_path(node, &self.spec.base_model, Some(self.owner)).await?;
        let start_dir = match start {
            None => None,
            Some(h) => {
                let root = dir.join("adapters");
                std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
                Some(work::unpacked(node, &h, Some(self.owner), &root).await?)
            }
        };
        let shards = work::job_shards(node, &self.spec, self.owner).await?;
        let records =
            work::training_records(node, &self.spec, &shards, &work_assignment.shards).await?;
        let setup = work::setup(&self.spec, &base)?;
        let out: PathBuf = dir.join(format!("rounds/{round}/train"));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let (o2, stop, seed) = (out.clone(), self.stop.clone(), work_assignment.seed);
        let s2 = start_dir.clone();
        let local = work::blocking(move || {
            cohort_trainer::federated::train_update(
                &setup,
                s2.as_deref(),
                &records,
                seed,
                &o2,
                &stop,
            )
            .map_err(|e| e.to_string())
        })
        .await?;
        if let Some(fault) = &self.fault {
            let adapter = local.adapter_dir.clone();
            let f = fault.clone();
            work::blocking(move || inject_fault(&adapter, &f)).await?;
        }
        // Snapshots first: an auditor may ask for them as soon as the commit lands.
        let mut batch_snapshots = Vec::new();
        for snap in &local.snapshots {
            let blob = work::publish_dir(node, &snap.dir, BlobKind::Snapshot).await?;
            batch_snapshots.push((snap.state, blob));
        }
        node.state
            .call(move |s| {
                let mut b = Batch::default();
                for (state, blob) in &batch_snapshots {
                    super::put_snapshot(s.store(), &mut b, state, blob);
                }
                s.store().write(b)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let update = work::publish_dir(node, &local.adapter_dir, BlobKind::Update).await?;
        let mut segments: Vec<SegmentCommit> = local
            .segments
            .iter()
            .filter_map(|s| s.to_commit())
            .collect();
        if self.fault.as_deref() == Some("made-up") {
            for s in &mut segments {
                s.state = ContentHash::of(&s.state.as_bytes()[..4]);
            }
        }
        node.rounds.update_status(self.job, |s| {
            s.losses.insert(round, local.losses.clone());
        });
        Ok(TrainedUpdate {
            round,
            update,
            tokens: local.tokens,
            steps: local.steps,
            losses: local.losses,
            kernel: local.kernel,
            segments,
        })
    }
}

/// The signed spec of a job this peer holds (owner or volunteer).
pub async fn job_spec(node: &Node, job: JobId) -> Option<Signed<JobSpec>> {
    match node
        .state
        .call(move |s| super::get_job(s.store(), &job))
        .await
    {
        Ok(Ok(Some(r))) => Some(r.spec),
        _ => None,
    }
}

/// Spoils a trained PEFT adapter on purpose (`Policy::fault`, for tests of the coordinator's
/// defences): `nan` puts a NaN in the first `B`, `oversized` scales every `B` by 1000, and
/// `made-up` leaves the adapter alone (its commitments are invented instead).
fn inject_fault(dir: &std::path::Path, fault: &str) -> Result<(), String> {
    use cohort_trainer::adapter::AdapterWeights;
    let mut w = AdapterWeights::load_peft(dir).map_err(|e| e.to_string())?;
    match fault {
        "nan" => {
            if let Some(f) = w.factors.values_mut().next()
                && let Some(x) = f.b.first_mut()
            {
                *x = f32::NAN;
            }
        }
        "oversized" => {
            for f in w.factors.values_mut() {
                for x in &mut f.b {
                    *x *= 1000.0;
                }
            }
        }
        "made-up" => return Ok(()),
        other => return Err(format!("unknown fault `{other}` (nan, oversized, made-up)")),
    }
    let base = std::fs::read_to_string(dir.join("adapter_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["base_model_name_or_path"].as_str().map(str::to_owned))
        .unwrap_or_default();
    w.save_peft(dir, &base).map_err(|e| e.to_string())
}
