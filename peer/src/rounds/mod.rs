//! Federated rounds on a running node: the job owner's coordinator and the volunteer's worker.
//!
//! The round logic lives in `cohort_protocol::rounds` as two state machines without I/O; this
//! module drives them with wall-clock time, real messages and real work:
//!
//! - [`coordinate`]: one task per job this peer owns. It feeds joins and commits (arriving over
//!   `cohort/1`) and its own timers into the [`Coordinator`], persists the machine's state after
//!   every step (in one rocksdb batch with the ledger entry a close produces, so a `kill -9`
//!   never leaves a close without its entry), and carries out its actions: publishing round
//!   messages, verifying updates (fetch, check, spot-check re-execution), merging and
//!   evaluating. A restarted node resumes every unfinished job from the saved state.
//! - [`volunteer`]: one task per job this peer works on, when volunteering is on and the job
//!   passes the volunteer's policy. It follows the coordinator (gossip announcements, and
//!   polling `cohort/1` as anti-entropy), trains its assigned shards and commits.
//! - [`work`]: the blocking work both call into the trainer for (training, checks, replay,
//!   merge and evaluation), on paths inside the data directory.
//! - [`recheck`]: `cohort ledger verify`'s recomputation of a round from published blobs.
//! - [`ledger`]: every coordinator's signed, hash-chained ledger entries: storing, syncing
//!   from other peers, verifying, and the totals per contributor and per volunteer.
//!
//! Blobs that jobs need travel over iroh-blobs like shards do: the base model, the validation
//! set, start and merged adapters, updates and training-state snapshots. They are recorded as
//! *public* blobs ([`Rounds::allow_public`]) so the provider gate serves them to any peer.
//!
//! [`Coordinator`]: cohort_protocol::rounds::coordinator::Coordinator

pub mod coordinate;
pub mod ledger;
pub mod recheck;
pub mod volunteer;
pub mod work;

use std::collections::BTreeMap;
use std::sync::Mutex;

use bincode::{Decode, Encode};
use cohort_protocol::rounds::PlannedShard;
use cohort_protocol::types::{Assignment, JobId, JobSpec, RoundClose, RoundOpen};
use cohort_protocol::{Canonical, ContentHash, Signed, encoding};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::store::{Batch, Cf, Store, StoreError};

/// Key prefix in [`Cf::Rounds`] of a coordinator's saved state.
const KEY_COORDINATOR: u8 = b'c';
/// Key prefix in [`Cf::Rounds`] of a closed round's signed close.
const KEY_CLOSE: u8 = b'x';
/// Key prefix in [`Cf::Adapters`] of a training-state snapshot: state hash -> blob hash.
const KEY_SNAPSHOT: u8 = b's';
/// Key prefix in [`Cf::Adapters`] of a public blob: blob hash -> what it is.
const KEY_PUBLIC: u8 = b'p';

/// This peer's part in a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// It owns and coordinates the job.
    Owner,
    /// It volunteers for the job.
    Volunteer,
}

/// A job as this peer stores it.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct JobRecord {
    /// The signed spec.
    pub spec: Signed<JobSpec>,
    /// This peer's part in it.
    pub role: Role,
    /// The training shards (the owner's plan; empty for volunteers).
    pub shards: Vec<PlannedShard>,
    /// Whether the job has ended (for this peer).
    pub finished: bool,
}

/// What a public blob is, for people reading the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobKind {
    /// A base model file.
    Model,
    /// A job's validation set (JSONL).
    Validation,
    /// A merged adapter (a bundled PEFT directory).
    Adapter,
    /// A worker's update (a bundled PEFT directory).
    Update,
    /// A training-state snapshot (a bundled checkpoint directory).
    Snapshot,
}

/// Stores a job record.
pub fn put_job(store: &Store, batch: &mut Batch, job: &JobId, record: &JobRecord) {
    store.put(batch, Cf::Jobs, job.0.as_bytes(), &encoding::encode(record));
}

/// Reads a job record.
pub fn get_job(store: &Store, job: &JobId) -> Result<Option<JobRecord>, StoreError> {
    match store.get(Cf::Jobs, job.0.as_bytes())? {
        None => Ok(None),
        Some(v) => JobRecord::from_bytes(&v)
            .map(Some)
            .map_err(|_| StoreError::Malformed {
                path: store.path().to_path_buf(),
                key: "job record",
            }),
    }
}

/// Every job record.
pub fn jobs(store: &Store) -> Result<Vec<(JobId, JobRecord)>, StoreError> {
    let mut out = Vec::new();
    for (k, v) in store.scan_prefix(Cf::Jobs, &[])? {
        let (Ok(key), Ok(record)) = (<[u8; 32]>::try_from(&k[..]), JobRecord::from_bytes(&v))
        else {
            tracing::warn!("skipping a malformed job record");
            continue;
        };
        out.push((JobId(ContentHash::from_bytes(key)), record));
    }
    Ok(out)
}

fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = vec![prefix];
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

/// Stores a coordinator's saved state.
pub fn put_coordinator(store: &Store, batch: &mut Batch, job: &JobId, state: &[u8]) {
    store.put(
        batch,
        Cf::Rounds,
        &key(KEY_COORDINATOR, &[job.0.as_bytes()]),
        state,
    );
}

/// Reads a coordinator's saved state.
pub fn get_coordinator(store: &Store, job: &JobId) -> Result<Option<Vec<u8>>, StoreError> {
    store.get(Cf::Rounds, &key(KEY_COORDINATOR, &[job.0.as_bytes()]))
}

/// Stores a round's signed close.
pub fn put_close(
    store: &Store,
    batch: &mut Batch,
    close: &Signed<RoundClose>,
    job: &JobId,
    round: u32,
) {
    store.put(
        batch,
        Cf::Rounds,
        &key(KEY_CLOSE, &[job.0.as_bytes(), &round.to_be_bytes()]),
        &encoding::encode(close),
    );
}

/// Every stored close of a job, in round order.
pub fn closes(store: &Store, job: &JobId) -> Result<Vec<Signed<RoundClose>>, StoreError> {
    let mut out = Vec::new();
    for (_, v) in store.scan_prefix(Cf::Rounds, &key(KEY_CLOSE, &[job.0.as_bytes()]))? {
        match Signed::<RoundClose>::from_bytes(&v) {
            Ok(c) => out.push(c),
            Err(_) => tracing::warn!("skipping a malformed round close"),
        }
    }
    Ok(out)
}

/// Records a public blob.
pub fn put_public(store: &Store, batch: &mut Batch, hash: &ContentHash, kind: BlobKind) {
    store.put(
        batch,
        Cf::Adapters,
        &key(KEY_PUBLIC, &[hash.as_bytes()]),
        &encoding::encode(&kind),
    );
}

/// Whether `hash` is a public blob.
pub fn is_public(store: &Store, hash: &ContentHash) -> Result<bool, StoreError> {
    store.contains(Cf::Adapters, &key(KEY_PUBLIC, &[hash.as_bytes()]))
}

/// Records which blob holds the snapshot of training state `state`.
pub fn put_snapshot(store: &Store, batch: &mut Batch, state: &ContentHash, blob: &ContentHash) {
    store.put(
        batch,
        Cf::Adapters,
        &key(KEY_SNAPSHOT, &[state.as_bytes()]),
        blob.as_bytes(),
    );
}

/// The blob holding the snapshot of training state `state`, if this peer has it.
pub fn get_snapshot(store: &Store, state: &ContentHash) -> Result<Option<ContentHash>, StoreError> {
    Ok(store
        .get(Cf::Adapters, &key(KEY_SNAPSHOT, &[state.as_bytes()]))?
        .and_then(|v| <[u8; 32]>::try_from(&v[..]).ok())
        .map(ContentHash::from_bytes))
}

/// The messages of a coordinated job's current round, as `cohort/1` answers them.
#[derive(Clone, Debug, Default)]
pub struct RoundView {
    /// The current round's open.
    pub open: Option<Signed<RoundOpen>>,
    /// Its assignment, once made.
    pub assignment: Option<Signed<Assignment>>,
    /// The last close.
    pub last_close: Option<Signed<RoundClose>>,
}

/// A message for a coordinator task.
#[derive(Debug)]
pub enum CoordinatorMsg {
    /// A join or commit from a peer; the reply says whether it was taken.
    Event(
        cohort_protocol::rounds::coordinator::CoordinatorEvent,
        oneshot::Sender<Result<(), String>>,
    ),
    /// Cancel the job.
    Cancel(oneshot::Sender<Result<(), String>>),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The node's rounds: running coordinators and workers, the volunteer switch, published views.
#[derive(Debug, Default)]
pub struct Rounds {
    coordinators: Mutex<BTreeMap<JobId, mpsc::Sender<CoordinatorMsg>>>,
    views: Mutex<BTreeMap<JobId, RoundView>>,
    workers: Mutex<BTreeMap<JobId, mpsc::Sender<volunteer::WorkerMsg>>>,
    policy: Mutex<Option<volunteer::Policy>>,
    /// Jobs the current policy declined (not looked at again until the policy changes).
    declined: Mutex<std::collections::BTreeSet<JobId>>,
    status: Mutex<BTreeMap<JobId, JobStatus>>,
}

/// What a job looks like from this peer, for `cohort job status` and the dashboard.
#[derive(Clone, Debug, Default, Serialize)]
pub struct JobStatus {
    /// This peer's part.
    pub role: Option<Role>,
    /// The current round.
    pub round: u32,
    /// The phase (coordinator) or this worker's state (volunteer).
    pub phase: String,
    /// Validation loss after each closed round.
    pub validation: Vec<(u32, f32, f32)>,
    /// The latest merged adapter.
    pub adapter: Option<String>,
    /// Training losses this worker reported, per round.
    pub losses: BTreeMap<u32, Vec<f32>>,
    /// Peers enrolled or assigned this round.
    pub workers: Vec<String>,
    /// Training loss per step of each accepted update, by round and worker (coordinator).
    pub worker_losses: BTreeMap<u32, BTreeMap<String, Vec<f32>>>,
    /// The current round's work by worker, once assigned (coordinator).
    pub assigned: BTreeMap<String, AssignedWork>,
    /// When the current phase's deadline falls (unix ms), if it has one.
    pub phase_deadline_ms: Option<u64>,
    /// Refused messages by reason.
    pub refused: BTreeMap<String, u64>,
    /// The job has ended.
    pub finished: bool,
    /// The last error the driver hit, if any.
    pub last_error: Option<String>,
}

/// One worker's share of a round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AssignedWork {
    /// Shards assigned.
    pub shards: usize,
    /// Their training tokens.
    pub tokens: u64,
}

impl Rounds {
    /// The coordinator inbox of `job`, if this peer coordinates it.
    pub fn coordinator(&self, job: &JobId) -> Option<mpsc::Sender<CoordinatorMsg>> {
        lock(&self.coordinators).get(job).cloned()
    }

    pub(crate) fn set_coordinator(&self, job: JobId, tx: mpsc::Sender<CoordinatorMsg>) {
        lock(&self.coordinators).insert(job, tx);
    }

    /// The published view of a coordinated job.
    pub fn view(&self, job: &JobId) -> Option<RoundView> {
        lock(&self.views).get(job).cloned()
    }

    pub(crate) fn update_view(&self, job: JobId, f: impl FnOnce(&mut RoundView)) {
        f(lock(&self.views).entry(job).or_default());
    }

    /// The worker inbox of `job`, if this peer works on it.
    pub fn worker(&self, job: &JobId) -> Option<mpsc::Sender<volunteer::WorkerMsg>> {
        lock(&self.workers).get(job).cloned()
    }

    pub(crate) fn set_worker(&self, job: JobId, tx: mpsc::Sender<volunteer::WorkerMsg>) {
        lock(&self.workers).insert(job, tx);
    }

    pub(crate) fn has_worker(&self, job: &JobId) -> bool {
        lock(&self.workers).contains_key(job)
    }

    /// The volunteer policy; `None` when volunteering is off.
    pub fn policy(&self) -> Option<volunteer::Policy> {
        lock(&self.policy).clone()
    }

    /// Turns volunteering on with `policy`, or off with `None`.
    pub fn set_policy(&self, policy: Option<volunteer::Policy>) {
        *lock(&self.policy) = policy;
        lock(&self.declined).clear();
    }

    /// Whether the current policy already declined `job`.
    pub(crate) fn declined(&self, job: &JobId) -> bool {
        lock(&self.declined).contains(job)
    }

    pub(crate) fn decline(&self, job: JobId) {
        lock(&self.declined).insert(job);
    }

    /// The status of every job this peer takes part in.
    pub fn statuses(&self) -> BTreeMap<JobId, JobStatus> {
        lock(&self.status).clone()
    }

    /// The status of one job.
    pub fn status(&self, job: &JobId) -> Option<JobStatus> {
        lock(&self.status).get(job).cloned()
    }

    pub(crate) fn update_status(&self, job: JobId, f: impl FnOnce(&mut JobStatus)) {
        f(lock(&self.status).entry(job).or_default());
    }
}

/// Near-duplicate groups of shards given as (hash, training records): a group number per shard
/// (see [`cohort_protocol::attribution::group_shards`]: equal hashes, then MinHash).
pub fn groups_of(shards: &[(ContentHash, Vec<String>)]) -> Result<Vec<u32>, String> {
    use cohort_protocol::attribution::{GroupingConfig, ShardText, group_shards};
    let texts: Vec<ShardText> = shards
        .iter()
        .map(|(hash, records)| ShardText {
            hash: *hash,
            records: records.clone(),
        })
        .collect();
    group_shards(&texts, &GroupingConfig::default())
        .map(|g| g.into_iter().map(|x| x as u32).collect())
        .map_err(|e| e.to_string())
}

/// The node as the OpenAI API's [`crate::openai::AdapterSource`]: adapters by blob hash (found
/// through content routing, fetched over iroh-blobs) or by job (its latest merged adapter in
/// the ledger), and base models this node holds as blobs.
#[derive(Debug)]
pub struct NodeAdapters(pub std::sync::Weak<crate::node::Node>);

impl NodeAdapters {
    async fn resolve(&self, name: &str) -> Result<Option<std::path::PathBuf>, String> {
        let node = self.0.upgrade().ok_or("the node is shutting down")?;
        let name = name.to_ascii_lowercase();
        if name.len() < 8 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        // A job (by id or unique prefix) names its latest merged adapter, which its coordinator
        // holds; an adapter hash is looked up through content routing alone.
        let (hash, hint) = match latest_adapter(&node, &name).await? {
            Some((h, coordinator)) => (h, Some(coordinator)),
            None => match name.parse::<ContentHash>() {
                Ok(h) => (h, None),
                Err(_) => return Ok(None),
            },
        };
        let root = node.data_dir.root().join("adapters");
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        let dir = work::unpacked(&node, &hash, hint, &root).await?;
        Ok(Some(dir))
    }
}

/// The merged adapter of the latest merged round of the job named by `name` (an id or a unique
/// prefix), or the adapter whose hash `name` is, with the coordinator that published it, from
/// any ledger chain this node holds.
pub async fn latest_adapter(
    node: &crate::node::Node,
    name: &str,
) -> Result<Option<(ContentHash, cohort_protocol::PeerId)>, String> {
    let name = name.to_owned();
    node.state
        .call(
            move |s| -> Result<Option<(ContentHash, cohort_protocol::PeerId)>, StoreError> {
                let mut best: Option<(JobId, u32, ContentHash, cohort_protocol::PeerId)> = None;
                for c in ledger::coordinators(s.store())? {
                    for e in ledger::chain(s.store(), &c)? {
                        let Ok(p) = e.verify() else { continue };
                        let Some(adapter) = p.merged_adapter else {
                            continue;
                        };
                        // An adapter named by its own hash: its coordinator holds it.
                        if adapter.to_string() == name {
                            return Ok(Some((adapter, p.coordinator)));
                        }
                        if !p.job.to_string().starts_with(&name) {
                            continue;
                        }
                        if best.is_none_or(|(j, r, _, _)| j == p.job && p.round > r) {
                            best = Some((p.job, p.round, adapter, p.coordinator));
                        }
                    }
                }
                Ok(best.map(|(_, _, h, c)| (h, c)))
            },
        )
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

impl crate::openai::AdapterSource for NodeAdapters {
    fn adapter<'a>(
        &'a self,
        name: &'a str,
    ) -> std::pin::Pin<
        Box<dyn Future<Output = Result<Option<std::path::PathBuf>, String>> + Send + 'a>,
    > {
        Box::pin(self.resolve(name))
    }

    fn fetch_base<'a>(
        &'a self,
        hash: &'a str,
    ) -> std::pin::Pin<
        Box<dyn Future<Output = Result<Option<std::path::PathBuf>, String>> + Send + 'a>,
    > {
        Box::pin(async move {
            let node = self.0.upgrade().ok_or("the node is shutting down")?;
            let Ok(h) = hash.parse::<ContentHash>() else {
                return Ok(None);
            };
            work::model_path(&node, &h, None).await.map(Some)
        })
    }

    fn base(&self, hash: &str) -> Option<std::path::PathBuf> {
        let node = self.0.upgrade()?;
        let path = node
            .data_dir
            .root()
            .join("models")
            .join(format!("{}.gguf", hash.to_ascii_lowercase()));
        path.is_file().then_some(path)
    }
}
