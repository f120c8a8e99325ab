//! The discrete-event driver of one job: the protocol's [`Coordinator`] and one [`Worker`] per
//! volunteer, exactly as the peer runs them, on a virtual clock.
//!
//! What the driver owns (and the machines must not): time, the network, the volunteers'
//! behaviour (honest, leaving, adversarial), training, and the coordinator's heavy work:
//! [`CoordinatorAction::Verify`] (fetch the update blob over the coordinator's downlink, check
//! it, replay the audited segments on the coordinator's CPU), [`CoordinatorAction::Distances`]
//! (the updates' pairwise squared distances, for the Multi-Krum filter) and
//! [`CoordinatorAction::Merge`] (merge, evaluate, Shapley values). All of it is computed for real on the surrogate task
//! ([`super::surrogate`]), so a spot check catches a faked segment only if the machine's audit
//! choice lands on it.
//!
//! Messages are the machines' signed messages, signed and verified for real. Their size on the
//! wire is their canonical encoding's. Published messages (open, assignment with the start
//! adapter's blob, close) travel down a seeded relay tree of the live volunteers with fan-out
//! `fanout`, each hop through the sender's uplink: a stand-in for gossip plus blob re-serving
//! that heals around departed peers (the tree is drawn anew for each message).
//! Joins, commits and update blobs go straight to the coordinator; the coordinator's downlink
//! is a queue too (the network model assumes receivers are never the bottleneck, which is
//! false for one coordinator fetching thousands of updates).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cohort_protocol::attribution::{AttributionConfig, GtgConfig, attribute};
use cohort_protocol::encoding;
use cohort_protocol::hash::ContentHash;
use cohort_protocol::identity::{Keypair, PeerId};
use cohort_protocol::rounds::PlannedShard;
use cohort_protocol::rounds::coordinator::{
    Coordinator, CoordinatorAction, CoordinatorEvent, MergeInput, MergeOutcome, Published,
    Verification,
};
use cohort_protocol::rounds::worker::{TrainedUpdate, Worker, WorkerAction, WorkerEvent};
use cohort_protocol::signed::{Signed, Verified};
use cohort_protocol::types::{
    AdapterConfig, AdapterKind, Capacity, CreditFlag, DatanetId, DatanetRef, Deadlines,
    Hyperparameters, JobSpec, KernelClass, LrSchedule, MergeMethod, Quorum, RejectReason,
    RobustAggregation, RoundOutcome, SegmentCommit, TargetModule, Timestamp, ValidationSpec,
    VerificationSpec,
};
use rand::Rng as _;

use super::config::{AdversaryKind, AttributionMode, MergeMode, RunConfig};
use super::linalg::Mat;
use super::surrogate::{Adapter, Coalitions, ShardKind, Task};
use crate::network::{LatencyModel, Network, NetworkConfig};
use crate::queue::EventQueue;
use crate::seed::{derive_seed, rng_for};
use crate::sim::NodeId;
use crate::time::{SimDuration, SimTime};

const ROLE_STREAM: u64 = 0x5201;
const SPEED_STREAM: u64 = 0x5202;
const CHURN_STREAM: u64 = 0x5203;
const TREE_STREAM: u64 = 0x5204;
const KEY_STREAM: u64 = 0x5205;
const AUDIT_STREAM: u64 = 0x5206;
const NET_STREAM: u64 = 0x5207;
const COORDINATOR: NodeId = NodeId(0);

/// What a volunteer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Trains what it is assigned and commits it.
    Honest,
    /// Cheats this way.
    Adversary(AdversaryKind),
}

#[derive(Debug)]
struct Volunteer {
    key: Keypair,
    machine: Worker,
    role: Role,
    /// Training-time multiplier (log-normal around 1).
    speed: f64,
    alive: bool,
    /// Leaves during round 0's training.
    leaves: bool,
}

/// What a worker serves for its commit: the update and its claimed segment states.
#[derive(Debug)]
struct Claim {
    update: Adapter,
    states: Vec<Adapter>,
    role: Role,
}

#[derive(Debug)]
enum Ev {
    CoordTick,
    ToCoord(CoordinatorEvent),
    ToWorker(usize, WorkerEvent),
    Relay {
        tree: Arc<Vec<usize>>,
        pos: usize,
        /// What each volunteer's worker is fed: an assignment or close is verified once, when
        /// published, and shared (N workers each checking the signature and decoding N entries
        /// made a 10,000-volunteer round quadratic).
        message: Arc<WorkerEvent>,
        size: usize,
    },
    Leave(usize),
}

/// One round's figures. The deterministic part; timings are in [`RoundTiming`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoundRow {
    /// The round.
    pub round: u32,
    /// How it ended (`merged`, `no_quorum`, ... or `open` if the run stopped inside it).
    pub outcome: String,
    /// Virtual second it opened.
    pub opened_s: f64,
    /// Virtual second it closed.
    pub closed_s: f64,
    /// Volunteers enrolled.
    pub enrolled: usize,
    /// Workers assigned.
    pub assigned: usize,
    /// Commits received (verdicts).
    pub committed: usize,
    /// Updates merged.
    pub merged: usize,
    /// Rejected by a spot check.
    pub rejected_spot: usize,
    /// Rejected by the norm bound.
    pub rejected_norm: usize,
    /// Refused by the Multi-Krum filter as an outlier.
    pub rejected_outlier: usize,
    /// Rejected for any other reason.
    pub rejected_other: usize,
    /// Poisoned commits: from a cheating adversary (poison, made-up, copy), or trained on a
    /// flip adversary's label-flipped shard (by anyone).
    pub adversary_commits: usize,
    /// Poisoned commits rejected by a spot check, the norm bound or the filter.
    pub adversary_rejected: usize,
    /// Other commits rejected by a spot check, the norm bound or the filter (false positives).
    pub honest_rejected: usize,
    /// The part of `honest_rejected` that the filter refused as outliers.
    pub honest_outliers: usize,
    /// Assigned workers that left before committing.
    pub left: usize,
    /// Assigned shards whose update was not merged, as a fraction.
    pub lost_work: f64,
    /// Validation loss before.
    pub loss_before: f64,
    /// Validation loss after.
    pub loss_after: f64,
    /// Relative error of the merge against the exact weighted sum of the products.
    pub merge_error: f64,
    /// Relative Eckart–Young truncation error of the merge.
    pub truncation_error: f64,
    /// Coordinator state size when the merge is issued, bytes.
    pub state_bytes: usize,
    /// Sum of the Shapley values reported.
    pub shapley_sum: f64,
    /// Coalitions evaluated for attribution.
    pub attribution_evaluations: usize,
}

/// One round's wall-clock costs on this machine (not deterministic).
#[derive(Clone, Debug, Default)]
pub struct RoundTiming {
    /// Time inside `Coordinator::handle`.
    pub coordinator_cpu: Duration,
    /// Time inside the driver's verification (replays), distances and merge (evaluation,
    /// Shapley).
    pub driver_cpu: Duration,
    /// Time inside the volunteers' `Worker::handle` (verifying and decoding the published
    /// messages, signing joins and commits), attributed to the worker's round.
    pub worker_cpu: Duration,
}

/// One shard's attribution in one merged round.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardRow {
    /// The round.
    pub round: u32,
    /// Shard index.
    pub shard: usize,
    /// Its kind.
    pub kind: &'static str,
    /// Its near-duplicate group.
    pub group: u32,
    /// Its share of its update's Shapley value, nats.
    pub value: f64,
    /// Credit earned in the ledger entry (nano-nats).
    pub credit: i64,
    /// The ledger's flag.
    pub flag: &'static str,
}

/// Everything a run produced.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// The configuration.
    pub config: RunConfig,
    /// Per round.
    pub rounds: Vec<RoundRow>,
    /// Per round, wall-clock.
    pub timings: Vec<RoundTiming>,
    /// Per shard per merged round.
    pub shards: Vec<ShardRow>,
    /// How the job ended (`None`: it stalled or hit the time limit).
    pub finished: Option<String>,
    /// Validation loss of the initial adapter.
    pub initial_loss: f64,
    /// Validation loss of the final adapter.
    pub final_loss: f64,
    /// Validation loss of the truth (the noise floor).
    pub optimum_loss: f64,
    /// Events handled.
    pub events: u64,
    /// Virtual time at the end.
    pub end_s: f64,
    /// Bytes sent plus received per volunteer per round (mean).
    pub bytes_per_peer_round: f64,
    /// The most any volunteer moved per round.
    pub max_bytes_per_peer_round: f64,
    /// Bytes the coordinator sent plus received per round.
    pub coordinator_bytes_round: f64,
    /// Refusals by the coordinator.
    pub refusals: u64,
    /// Wall-clock time of setup (keys, task).
    pub setup_wall: Duration,
    /// Wall-clock time of the event loop.
    pub run_wall: Duration,
    /// The process's peak resident set so far (`VmHWM`, Linux), bytes: with several runs in
    /// one process, the largest of this run and those before it.
    pub peak_rss: Option<u64>,
}

/// The simulation of one job.
#[derive(Debug)]
pub struct RoundSim {
    config: RunConfig,
    task: Task,
    now: SimTime,
    queue: EventQueue<Ev>,
    net: Network,
    owner: Keypair,
    coord: Coordinator,
    vols: Vec<Volunteer>,
    by_peer: BTreeMap<PeerId, usize>,
    shard_index: BTreeMap<ContentHash, usize>,
    adapters: BTreeMap<ContentHash, Adapter>,
    claims: BTreeMap<PeerId, Claim>,
    /// Per shard index: label-flipped by a flip adversary.
    poisoned: Vec<bool>,
    /// The current round's assignment, decoded once when it is published.
    assignment: Option<Arc<cohort_protocol::types::Assignment>>,
    received: Vec<u64>,
    down_busy: SimTime,
    replay_slots: Vec<SimTime>,
    publishes: u64,
    rows: Vec<RoundRow>,
    timings: Vec<RoundTiming>,
    shard_rows: Vec<ShardRow>,
    last_values: BTreeMap<PeerId, f64>,
    finished: Option<String>,
    current: Adapter,
    events: u64,
    refusals: u64,
    limit: SimTime,
    setup_wall: Duration,
}

fn kernel() -> KernelClass {
    KernelClass {
        backend: "sim".into(),
        kernel: "surrogate".into(),
        threads: 1,
    }
}

fn secs(s: f64) -> SimDuration {
    SimDuration::from_micros((s.max(0.0) * 1e6).round() as u64)
}

fn ms(s: f64) -> u64 {
    (s * 1e3).round().max(1.0) as u64
}

fn mbps(x: f64) -> u64 {
    (x * 1e6 / 8.0).round().max(1.0) as u64
}

/// The job spec a run's configuration describes.
pub fn job_spec(c: &RunConfig) -> JobSpec {
    let volunteers = c.volunteers as u32;
    let max_workers = if c.max_workers == 0 {
        volunteers
    } else {
        c.max_workers as u32
    };
    let min_updates =
        ((c.quorum_fraction * f64::from(volunteers)).ceil() as u32).clamp(1, max_workers.max(1));
    JobSpec {
        name: c.label.chars().take(60).collect(),
        base_model: ContentHash::of(b"cohort-sim/surrogate-base"),
        adapter: AdapterConfig {
            kind: AdapterKind::Lora,
            rank: c.rank,
            alpha: 2.0 * c.rank as f32,
            dropout: 0.0,
            targets: vec![TargetModule::Q],
            rslora: false,
        },
        hyper: Hyperparameters {
            learning_rate: c.lr as f32,
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            epochs: c.epochs,
            batch_size: c.batch as u32,
            grad_accumulation: 1,
            seq_len: 64,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: c.seed,
        },
        datanets: vec![DatanetRef {
            datanet: DatanetId(ContentHash::of(b"cohort-sim/datanet")),
            version: 1,
            manifest: ContentHash::of(b"cohort-sim/manifest"),
        }],
        validation: ValidationSpec {
            fraction_ppm: 100_000,
            seed: c.seed,
            set: ContentHash::of(b"cohort-sim/validation"),
        },
        rounds: c.rounds,
        quorum: Quorum {
            min_updates,
            max_workers,
        },
        deadlines: Deadlines {
            enroll_ms: ms(c.enroll_s),
            train_ms: ms(c.train_s),
            validate_ms: ms(c.validate_s),
        },
        merge: match c.merge {
            MergeMode::Exact | MergeMode::Naive => MergeMethod::ExactTruncated,
            MergeMode::Full => MergeMethod::ExactFullRank,
            MergeMode::Ffa => MergeMethod::Ffa,
        },
        early_stopping: None,
        verification: VerificationSpec {
            segment_steps: c.segment_steps,
            audit_ppm: if c.defences {
                (c.audit_rate * 1e6).round() as u32
            } else {
                0
            },
            norm_bound_ppm: if c.defences && c.norm_bound > 0.0 {
                (c.norm_bound * 1e6).min(f64::from(u32::MAX)) as u32
            } else {
                u32::MAX
            },
            robust: if c.defences && c.multi_krum_f > 0 {
                RobustAggregation::MultiKrum { f: c.multi_krum_f }
            } else {
                RobustAggregation::None
            },
        },
        created_at: Timestamp(0),
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The protocol refused the job.
    #[error("run {label:?}: {source}")]
    Coordinator {
        /// The run.
        label: String,
        /// What the coordinator said.
        source: cohort_protocol::rounds::coordinator::CoordinatorError,
    },
    /// The network configuration is invalid.
    #[error("run {label:?}: {source}")]
    Network {
        /// The run.
        label: String,
        /// What is wrong.
        source: crate::network::NetworkConfigError,
    },
}

impl RoundSim {
    /// Sets up the job: keys, task, shards, volunteers, network, and the coordinator's round 0.
    pub fn new(config: RunConfig) -> Result<Self, RunError> {
        let started = Instant::now();
        let c = &config;
        let spec = job_spec(c);
        let mut task = Task::new(c, f64::from(spec.scaling()));
        let owner = key_for(c.seed, u64::MAX);
        let signed = Signed::sign(&owner, &spec);

        // Roles: a seeded choice of adversaries; churners among the rest.
        let n = c.volunteers;
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = rng_for(c.seed, ROLE_STREAM, 0);
        for i in (1..n).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
        let adversaries = (c.adversaries * n as f64).round() as usize;
        let leavers = (c.churn * n as f64).round() as usize;
        let mut roles = vec![Role::Honest; n];
        let mut leaves = vec![false; n];
        for (k, &i) in order.iter().take(adversaries).enumerate() {
            roles[i] = Role::Adversary(match c.adversary {
                AdversaryKind::Mixed => [
                    AdversaryKind::Poison,
                    AdversaryKind::MadeUp,
                    AdversaryKind::Copy,
                ][k % 3],
                kind => kind,
            });
        }
        for &i in order.iter().skip(adversaries).take(leavers) {
            leaves[i] = true;
        }
        // Flip adversaries' shards (shard j is contributed by volunteer j mod n) hold
        // label-flipped rows.
        let poisoned: Vec<bool> = (0..c.shard_count())
            .map(|j| roles[j % n] == Role::Adversary(AdversaryKind::Flip))
            .collect();
        let flipped: Vec<usize> = (0..poisoned.len()).filter(|&j| poisoned[j]).collect();
        task.flip(&flipped);
        let capacity = Capacity {
            kernel: kernel(),
            cores: 4,
            memory_mib: 8192,
            models: vec![],
        };
        let vols: Vec<Volunteer> = (0..n)
            .map(|i| {
                let mut srng = rng_for(c.seed, SPEED_STREAM, i as u64);
                let u1 = 1.0 - srng.random::<f64>();
                let u2 = srng.random::<f64>();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                Volunteer {
                    key: key_for(c.seed, i as u64),
                    machine: Worker::new(&signed, spec.clone(), capacity.clone()),
                    role: roles[i],
                    speed: (c.train_time_sigma * z).exp(),
                    alive: true,
                    leaves: leaves[i],
                }
            })
            .collect();
        let by_peer = vols
            .iter()
            .enumerate()
            .map(|(i, v)| (v.key.peer_id(), i))
            .collect();

        // Shards: group = the shard itself, or the shard it duplicates.
        let datanet = DatanetId(ContentHash::of(b"cohort-sim/datanet"));
        let mut shards: Vec<PlannedShard> = (0..c.shard_count())
            .map(|j| PlannedShard {
                hash: ContentHash::of(format!("cohort-sim/shard/{}/{j}", c.seed).as_bytes()),
                datanet,
                contributor: vols[j % n].key.peer_id(),
                tokens: (c.rows_per_shard * 64) as u64,
                group: match task.kinds()[j] {
                    ShardKind::Duplicate { of } => of as u32,
                    _ => j as u32,
                },
            })
            .collect();
        let shard_index = shards
            .iter()
            .enumerate()
            .map(|(j, s)| (s.hash, j))
            .collect();
        shards.sort_by_key(|s| s.hash);

        let mut net = Network::new(
            NetworkConfig {
                latency: LatencyModel::LogNormal {
                    median: secs(c.latency_ms / 1e3),
                    sigma: c.latency_sigma,
                    min: secs(c.latency_ms / 1e3 / 8.0),
                    max: secs(c.latency_ms / 1e3 * 10.0),
                },
                upload_bytes_per_sec: mbps(c.upload_mbps),
            },
            derive_seed(c.seed, NET_STREAM, 0),
        )
        .map_err(|source| RunError::Network {
            label: c.label.clone(),
            source,
        })?;
        for i in 0..=n {
            net.add_node(NodeId(i as u32));
        }
        net.set_upload(COORDINATOR, mbps(c.coordinator_upload_mbps));

        let mut secret = [0u8; 32];
        secret[..8].copy_from_slice(&derive_seed(c.seed, AUDIT_STREAM, 0).to_le_bytes());
        let (coord, actions) = Coordinator::new(signed, shards, &owner, secret, Timestamp(0))
            .map_err(|source| RunError::Coordinator {
                label: c.label.clone(),
                source,
            })?;
        let per_round = c.enroll_s + c.train_s + c.validate_s;
        let limit = SimTime::ZERO + secs(per_round * f64::from(c.rounds) * 4.0 + 3_600.0);
        let current = task.initial();
        let mut sim = Self {
            replay_slots: vec![SimTime::ZERO; c.replay_slots],
            config: config.clone(),
            task,
            now: SimTime::ZERO,
            queue: EventQueue::new(),
            net,
            owner,
            coord,
            vols,
            by_peer,
            shard_index,
            adapters: BTreeMap::new(),
            claims: BTreeMap::new(),
            poisoned,
            assignment: None,
            received: vec![0; n + 1],
            down_busy: SimTime::ZERO,
            publishes: 0,
            rows: Vec::new(),
            timings: Vec::new(),
            shard_rows: Vec::new(),
            last_values: BTreeMap::new(),
            finished: None,
            current,
            events: 0,
            refusals: 0,
            limit,
            setup_wall: Duration::ZERO,
        };
        sim.coord_actions(actions);
        sim.setup_wall = started.elapsed();
        Ok(sim)
    }

    fn ts(&self) -> Timestamp {
        Timestamp(self.now.as_millis())
    }

    fn row(&mut self, round: u32) -> &mut RoundRow {
        while self.rows.len() <= round as usize {
            let r = self.rows.len() as u32;
            self.rows.push(RoundRow {
                round: r,
                outcome: "open".into(),
                ..RoundRow::default()
            });
            self.timings.push(RoundTiming::default());
        }
        &mut self.rows[round as usize]
    }

    fn timing(&mut self, round: u32) -> &mut RoundTiming {
        self.row(round);
        &mut self.timings[round as usize]
    }

    /// Sends `size` bytes from `from` to the coordinator; the arrival time, through the
    /// coordinator's downlink queue.
    fn send_to_coordinator(&mut self, from: NodeId, size: usize) -> SimTime {
        let arrival = self
            .net
            .transmit(self.now, from, COORDINATOR, size)
            .map(|t| t.arrival)
            .unwrap_or(self.now);
        let start = arrival.max(self.down_busy);
        let rate = mbps(self.config.coordinator_download_mbps) as f64;
        let done = start + secs(size as f64 / rate);
        self.down_busy = done;
        self.received[0] += size as u64;
        done
    }

    fn coord_event(&mut self, ev: CoordinatorEvent) {
        let round = self.coord.round();
        let started = Instant::now();
        let actions = self.coord.handle(self.ts(), ev, &self.owner);
        let spent = started.elapsed();
        self.timing(round).coordinator_cpu += spent;
        self.coord_actions(actions);
    }

    /// Runs until the job finishes, the queue empties (a stall) or the time limit.
    pub fn run(mut self) -> RunReport {
        let started = Instant::now();
        while let Some((at, ev)) = self.queue.pop() {
            if at > self.limit {
                break;
            }
            self.now = at;
            self.events += 1;
            match ev {
                Ev::CoordTick => self.coord_event(CoordinatorEvent::Tick),
                Ev::ToCoord(e) => self.coord_event(e),
                Ev::ToWorker(i, e) => self.worker_event(i, e),
                Ev::Relay {
                    tree,
                    pos,
                    message,
                    size,
                } => self.relay(tree, pos, message, size),
                Ev::Leave(i) => self.vols[i].alive = false,
            }
        }
        let run_wall = started.elapsed();
        self.report(run_wall)
    }

    fn publish(&mut self, message: Published) {
        let size = match &message {
            Published::Open(m) => encoding::encode(m).len(),
            Published::Assignment(m) => {
                // The start adapter's blob rides along from round 1 on.
                let blob = if self.coord.adapter().is_some() {
                    self.config.update_bytes
                } else {
                    0
                };
                encoding::encode(m).len() + blob
            }
            Published::Close(m) => encoding::encode(m).len(),
        };
        let mut tree: Vec<usize> = (0..self.vols.len())
            .filter(|&i| self.vols[i].alive)
            .collect();
        let mut rng = rng_for(self.config.seed, TREE_STREAM, self.publishes);
        self.publishes += 1;
        for i in (1..tree.len()).rev() {
            let j = rng.random_range(0..=i);
            tree.swap(i, j);
        }
        let tree = Arc::new(tree);
        let message = Arc::new(match message {
            Published::Open(m) => WorkerEvent::Open(m),
            // The coordinator's own messages verify; should one not, each worker checks it.
            Published::Assignment(m) => match Verified::new(m.clone()) {
                Ok(v) => WorkerEvent::AssignedVerified(Arc::new(v)),
                Err(_) => WorkerEvent::Assigned(m),
            },
            Published::Close(m) => match Verified::new(m.clone()) {
                Ok(v) => WorkerEvent::ClosedVerified(Arc::new(v)),
                Err(_) => WorkerEvent::Closed(m),
            },
        });
        for pos in 0..self.config.fanout.min(tree.len()) {
            self.send_relay(COORDINATOR, &tree, pos, &message, size);
        }
    }

    fn send_relay(
        &mut self,
        from: NodeId,
        tree: &Arc<Vec<usize>>,
        pos: usize,
        message: &Arc<WorkerEvent>,
        size: usize,
    ) {
        let to = tree[pos];
        let arrival = self
            .net
            .transmit(self.now, from, NodeId(to as u32 + 1), size)
            .map(|t| t.arrival)
            .unwrap_or(self.now);
        self.received[to + 1] += size as u64;
        self.queue.push(
            arrival,
            Ev::Relay {
                tree: Arc::clone(tree),
                pos,
                message: Arc::clone(message),
                size,
            },
        );
    }

    fn relay(&mut self, tree: Arc<Vec<usize>>, pos: usize, message: Arc<WorkerEvent>, size: usize) {
        let me = tree[pos];
        let first = self.config.fanout * (pos + 1);
        for child in first..(first + self.config.fanout).min(tree.len()) {
            self.send_relay(NodeId(me as u32 + 1), &tree, child, &message, size);
        }
        self.worker_event(me, (*message).clone());
    }

    fn worker_event(&mut self, i: usize, ev: WorkerEvent) {
        if !self.vols[i].alive {
            return;
        }
        let now = self.ts();
        let v = &mut self.vols[i];
        let round = v.machine.round().unwrap_or(0);
        let started = Instant::now();
        let actions = v.machine.handle(now, ev, &v.key);
        self.timing(round).worker_cpu += started.elapsed();
        for a in actions {
            match a {
                WorkerAction::SendJoin(m) => {
                    let size = encoding::encode(&m).len();
                    let at = self.send_to_coordinator(NodeId(i as u32 + 1), size);
                    self.queue.push(at, Ev::ToCoord(CoordinatorEvent::Join(m)));
                }
                WorkerAction::SendCommit(m) => {
                    let size = encoding::encode(&m).len();
                    let at = self.send_to_coordinator(NodeId(i as u32 + 1), size);
                    self.queue
                        .push(at, Ev::ToCoord(CoordinatorEvent::Commit(m)));
                }
                WorkerAction::Train {
                    round,
                    start,
                    work,
                    deadline: _,
                } => self.train(i, round, start, work),
                WorkerAction::StopTraining { .. }
                | WorkerAction::Refused { .. }
                | WorkerAction::Verdict { .. }
                | WorkerAction::Finished => {}
            }
        }
    }

    fn adapter_of(&self, hash: Option<ContentHash>) -> Adapter {
        hash.and_then(|h| self.adapters.get(&h).cloned())
            .unwrap_or_else(|| self.task.initial())
    }

    fn shard_indices(&self, hashes: &[ContentHash]) -> Vec<usize> {
        hashes
            .iter()
            .filter_map(|h| self.shard_index.get(h).copied())
            .collect()
    }

    fn frozen(&self) -> bool {
        self.config.merge == MergeMode::Ffa
    }

    fn train(
        &mut self,
        i: usize,
        round: u32,
        start: Option<ContentHash>,
        work: cohort_protocol::types::WorkAssignment,
    ) {
        let started = Instant::now();
        let start = self.adapter_of(start);
        let shards = self.shard_indices(&work.shards);
        let took = secs(
            self.config.train_time_s * self.vols[i].speed * work.shards.len() as f64
                / (self.config.shard_count() as f64 / self.config.volunteers as f64).max(1.0),
        );
        if self.vols[i].leaves && round == 0 {
            let mut rng = rng_for(self.config.seed, CHURN_STREAM, i as u64);
            let when = secs(took.as_secs_f64() * rng.random::<f64>());
            self.queue.push(self.now + when, Ev::Leave(i));
            self.row(round).left += 1;
            return;
        }
        let frozen = self.frozen();
        let honest = self.task.train(&start, &shards, work.seed, frozen);
        let role = self.vols[i].role;
        let m0 = self.task.dense(&start);
        let (update, states, segments, took) = match role {
            Role::Honest | Role::Adversary(AdversaryKind::Flip) => {
                let states: Vec<Adapter> = honest.segments.iter().map(|s| s.1.clone()).collect();
                let segs = commits(&honest.segments);
                (honest.adapter.clone(), states, segs, took)
            }
            Role::Adversary(AdversaryKind::Copy) => {
                // The next assigned worker's update, with its commitments.
                let victim = self
                    .assignment
                    .as_ref()
                    .filter(|a| a.round == round)
                    .and_then(|a| {
                        let pos = a
                            .work
                            .binary_search_by(|w| w.worker.cmp(&work.worker))
                            .ok()?;
                        let next = a.work.get((pos + 1) % a.work.len())?.clone();
                        Some(next)
                    })
                    .unwrap_or(work.clone());
                let vs = self.shard_indices(&victim.shards);
                let t = self.task.train(&start, &vs, victim.seed, frozen);
                let states = t.segments.iter().map(|s| s.1.clone()).collect();
                (t.adapter.clone(), states, commits(&t.segments), took)
            }
            Role::Adversary(kind) => {
                let fake = match kind {
                    AdversaryKind::MadeUp => {
                        let delta = self.task.dense(&honest.adapter).sub(&m0);
                        let noise = self.task.dense(&self.task.random_like(
                            &honest.adapter,
                            derive_seed(self.config.seed, i as u64, u64::from(round)),
                        ));
                        let mut m = m0.clone();
                        m.add_scaled(delta.frob() / noise.frob().max(1e-12), &noise);
                        self.task.factor(&m).0
                    }
                    _ => {
                        let mut m = m0.clone();
                        let delta = self.task.dense(&honest.adapter).sub(&m0);
                        m.add_scaled(-self.config.poison_scale, &delta);
                        if frozen {
                            let mut b = start.b.clone();
                            let db = honest.adapter.b.sub(&start.b);
                            b.add_scaled(-self.config.poison_scale, &db);
                            Adapter {
                                b,
                                a: start.a.clone(),
                            }
                        } else {
                            self.task.factor(&m).0
                        }
                    }
                };
                let m = honest.segments.len();
                let faked = if kind == AdversaryKind::MadeUp || self.config.faked_segments == 0 {
                    m
                } else {
                    (self.config.faked_segments as usize).min(m)
                };
                let mut states: Vec<Adapter> =
                    honest.segments.iter().map(|s| s.1.clone()).collect();
                for (j, state) in states.iter_mut().enumerate().skip(m - faked) {
                    *state = if j + 1 == m {
                        fake.clone()
                    } else {
                        self.task.random_like(
                            &fake,
                            derive_seed(self.config.seed, (i * 4096 + j) as u64, 7),
                        )
                    };
                }
                let segs = honest
                    .segments
                    .iter()
                    .zip(&states)
                    .map(|((end, _, batches), s)| SegmentCommit {
                        end_step: *end,
                        state: s.hash(),
                        batches: *batches,
                    })
                    .collect();
                let took = if kind == AdversaryKind::MadeUp {
                    secs(took.as_secs_f64() * 0.1)
                } else {
                    took
                };
                (fake, states, segs, took)
            }
        };
        let update_hash = update.hash();
        let peer = self.vols[i].key.peer_id();
        self.claims.insert(
            peer,
            Claim {
                update,
                states,
                role,
            },
        );
        let trained = TrainedUpdate {
            round,
            update: update_hash,
            tokens: honest.rows,
            steps: honest.steps,
            losses: honest.losses.clone(),
            kernel: kernel(),
            segments,
        };
        self.timing(round).driver_cpu += started.elapsed();
        self.queue.push(
            self.now + took,
            Ev::ToWorker(i, WorkerEvent::Trained(trained)),
        );
    }

    fn coord_actions(&mut self, actions: Vec<CoordinatorAction>) {
        for a in actions {
            match a {
                CoordinatorAction::Publish(p) => {
                    match &p {
                        Published::Open(m) => {
                            if let Ok(o) = m.verify() {
                                let now = self.now.since_start().as_secs_f64();
                                let row = self.row(o.round);
                                if row.opened_s == 0.0 && o.round > 0 {
                                    row.opened_s = now;
                                }
                            }
                        }
                        Published::Assignment(m) => {
                            if let Ok(a) = m.verify() {
                                let enrolled = self.coord.enrolled().len();
                                let row = self.row(a.round);
                                row.assigned = a.work.len();
                                row.enrolled = enrolled;
                                self.assignment = Some(Arc::new(a));
                            }
                        }
                        Published::Close(_) => {}
                    }
                    self.publish(p);
                }
                CoordinatorAction::WakeAt(t) => {
                    let at = SimTime::from_millis(t.0).max(self.now);
                    self.queue.push(at, Ev::CoordTick);
                }
                CoordinatorAction::Verify {
                    round,
                    start,
                    commit,
                    audit,
                } => self.verify(round, start, commit, audit),
                CoordinatorAction::Distances { round, updates } => self.distances(round, &updates),
                CoordinatorAction::Merge {
                    round,
                    start,
                    updates,
                    seed,
                } => self.merge(round, start, updates, seed),
                CoordinatorAction::Close {
                    close,
                    record,
                    data,
                    compute: _,
                } => {
                    let Ok(c) = close.verify() else { continue };
                    // The coordinator has already opened the next round: the closed round's
                    // assignment comes from its record.
                    let assignment = record.assignment.as_ref().and_then(|a| a.verify().ok());
                    self.record_close(&c, assignment.as_ref(), &data);
                }
                CoordinatorAction::Refused { .. } => self.refusals += 1,
                CoordinatorAction::Finished { outcome, .. } => {
                    self.finished = Some(outcome_name(outcome).into());
                }
            }
        }
    }

    fn verify(
        &mut self,
        round: u32,
        start: Option<ContentHash>,
        commit: Signed<cohort_protocol::types::UpdateCommit>,
        audit: Vec<u32>,
    ) {
        let started = Instant::now();
        let worker = commit.signer();
        let hash = commit.hash();
        let reply = |result| CoordinatorEvent::Verified {
            worker,
            commit: hash,
            result,
        };
        let Ok(c) = commit.verify() else {
            return;
        };
        let i = self.by_peer.get(&worker).copied();
        let available = i.is_some_and(|i| self.vols[i].alive) && self.claims.contains_key(&worker);
        if !available {
            // Nobody serves the blob: the fetch times out.
            self.queue.push(
                self.now + secs(10.0),
                Ev::ToCoord(reply(Verification::Failed(RejectReason::Unavailable))),
            );
            return;
        }
        let i = i.unwrap_or(0);
        let arrival = self.send_to_coordinator(NodeId(i as u32 + 1), self.config.update_bytes);
        let start = self.adapter_of(start);
        let shards = self.shard_indices(&c.shards);
        let frozen = self.frozen();
        let result = {
            let Some(claim) = self.claims.get(&worker) else {
                return;
            };
            let last = c.segments.last().map(|s| (s.end_step, s.state));
            if claim.update.hash() != c.update || !claim.update.is_finite() {
                Verification::Failed(RejectReason::NonFinite)
            } else if last.is_some_and(|(_, s)| s != c.update) {
                Verification::Failed(RejectReason::SpotCheckMismatch {
                    end_step: last.map(|l| l.0).unwrap_or(0),
                })
            } else {
                let mut failed = None;
                for &j in &audit {
                    let j = j as usize;
                    let (from_step, from) = if j == 0 {
                        (0, &start)
                    } else {
                        (c.segments[j - 1].end_step, &claim.states[j - 1])
                    };
                    let seg = c.segments[j];
                    let got =
                        self.task
                            .replay(from, &shards, c.seed, from_step, seg.end_step, frozen);
                    if got.hash() != seg.state {
                        failed = Some(RejectReason::SpotCheckMismatch {
                            end_step: seg.end_step,
                        });
                        break;
                    }
                }
                match failed {
                    Some(r) => Verification::Failed(r),
                    None => Verification::Passed {
                        delta_norm: self
                            .task
                            .dense(&claim.update)
                            .sub(&self.task.dense(&start))
                            .frob(),
                    },
                }
            }
        };
        // Replays queue on the coordinator's replay slots after the blob arrived.
        let mut done = arrival;
        for _ in &audit {
            let (k, free) = self
                .replay_slots
                .iter()
                .copied()
                .enumerate()
                .min_by_key(|(k, t)| (*t, *k))
                .unwrap_or((0, arrival));
            let end = free.max(arrival) + secs(self.config.replay_s);
            self.replay_slots[k] = end;
            done = done.max(end);
        }
        self.timing(round).driver_cpu += started.elapsed();
        self.queue.push(done, Ev::ToCoord(reply(result)));
    }

    /// The robust filter's pairwise squared distances of the updates' products, dense on the
    /// surrogate task (an update without a claim is not answered: the filter times out).
    fn distances(
        &mut self,
        round: u32,
        updates: &[cohort_protocol::rounds::coordinator::FilterInput],
    ) {
        let started = Instant::now();
        let Some(dense) = updates
            .iter()
            .map(|u| Some(self.task.dense(&self.claims.get(&u.worker)?.update)))
            .collect::<Option<Vec<Mat>>>()
        else {
            return;
        };
        let m = dense.len();
        let mut dist = vec![0f64; m * m];
        for i in 0..m {
            for j in i + 1..m {
                let d = dense[i].sub(&dense[j]).frob().powi(2);
                dist[i * m + j] = d;
                dist[j * m + i] = d;
            }
        }
        self.timing(round).driver_cpu += started.elapsed();
        let event = CoordinatorEvent::Distances {
            round,
            commits: updates.iter().map(|u| u.commit).collect(),
            dist,
        };
        self.queue
            .push(self.now + secs(1e-3 * m as f64), Ev::ToCoord(event));
    }

    fn merge(
        &mut self,
        round: u32,
        start: Option<ContentHash>,
        updates: Vec<MergeInput>,
        seed: u64,
    ) {
        let started = Instant::now();
        let state_bytes = self.coord.save().len();
        let start = self.adapter_of(start);
        let m0 = self.task.dense(&start);
        let loss_before = self.task.loss_of(&m0);
        let parts: Vec<(f64, Adapter)> = updates
            .iter()
            .filter_map(|u| {
                let c = self.claims.get(&u.worker)?;
                Some((u.weight, c.update.clone()))
            })
            .collect();
        let (merged, truncation, merge_error) = if parts.is_empty() {
            (start.clone(), 0.0, 0.0)
        } else {
            self.merge_parts(&parts)
        };
        let loss_after = self.task.loss(&merged);
        let u: Vec<Mat> = parts
            .iter()
            .map(|(w, a)| self.task.dense(a).sub(&m0).scaled(*w))
            .collect();
        let (values, evaluations) = match self.config.attribution {
            AttributionMode::Protocol
                if !u.is_empty() && u.len() <= self.config.protocol_attribution_max =>
            {
                let mut game = Coalitions::new(&self.task, m0.clone(), &u);
                let config = AttributionConfig {
                    exact_max_players: 12,
                    gtg: GtgConfig::default(),
                };
                match attribute(u.len(), |s| game.value(s), &config, seed) {
                    Ok(a) => (a.values, a.evaluations),
                    Err(_) => (self.task.shapley(&m0, &u), u.len()),
                }
            }
            _ => (self.task.shapley(&m0, &u), u.len()),
        };
        self.last_values = updates
            .iter()
            .zip(&values)
            .map(|(u, v)| (u.worker, *v))
            .collect();
        let adapter = (!parts.is_empty()).then(|| merged.hash());
        if let Some(h) = adapter {
            self.adapters.insert(h, merged.clone());
            self.current = merged;
        }
        let row = self.row(round);
        row.loss_before = loss_before;
        row.loss_after = loss_after;
        row.merge_error = merge_error;
        row.truncation_error = truncation;
        row.state_bytes = state_bytes;
        row.shapley_sum = values.iter().sum();
        row.attribution_evaluations = evaluations;
        let outcome = MergeOutcome {
            round,
            adapter,
            truncation_error: truncation as f32,
            loss_before: loss_before as f32,
            loss_after: loss_after as f32,
            values,
        };
        self.timing(round).driver_cpu += started.elapsed();
        let at = self.now + secs(1.0 + 1e-3 * parts.len() as f64);
        self.queue
            .push(at, Ev::ToCoord(CoordinatorEvent::Merged(outcome)));
    }

    /// The merged adapter, the truncation error and the error against the exact weighted sum.
    fn merge_parts(&self, parts: &[(f64, Adapter)]) -> (Adapter, f64, f64) {
        let t = &self.task;
        let (m, k) = (parts[0].1.b.rows(), parts[0].1.a.cols());
        let mut exact = Mat::zeros(m, k);
        for (w, a) in parts {
            exact.add_scaled(*w, &t.dense(a));
        }
        let rel = |x: &Mat| x.sub(&exact).frob() / exact.frob().max(1e-300);
        match self.config.merge {
            MergeMode::Exact => {
                let (a, err) = t.factor(&exact);
                let e = rel(&t.dense(&a));
                (a, err, e)
            }
            MergeMode::Full => {
                // Dense sum: B = M / s, A = I.
                let a = Adapter {
                    b: exact.scaled(1.0 / t.scale()),
                    a: Mat::identity(k),
                };
                (a, 0.0, 0.0)
            }
            MergeMode::Ffa => {
                let mut b = Mat::zeros(m, parts[0].1.b.cols());
                for (w, a) in parts {
                    b.add_scaled(*w, &a.b);
                }
                let a = Adapter {
                    b,
                    a: t.frozen_a().clone(),
                };
                let e = rel(&t.dense(&a));
                (a, 0.0, e)
            }
            MergeMode::Naive => {
                let mut b = Mat::zeros(m, parts[0].1.b.cols());
                let mut aa = Mat::zeros(parts[0].1.a.rows(), k);
                for (w, a) in parts {
                    b.add_scaled(*w, &a.b);
                    aa.add_scaled(*w, &a.a);
                }
                let a = Adapter { b, a: aa };
                let e = rel(&t.dense(&a));
                (a, 0.0, e)
            }
        }
    }

    fn record_close(
        &mut self,
        c: &cohort_protocol::types::RoundClose,
        assignment: Option<&cohort_protocol::types::Assignment>,
        data: &[cohort_protocol::types::ShardCredit],
    ) {
        let now = self.now.since_start().as_secs_f64();
        let mut rows_shards = Vec::new();
        let mut assigned_shards = 0usize;
        let mut merged_shards = 0usize;
        let (mut spot, mut norm, mut outlier, mut other) = (0, 0, 0, 0);
        let (mut adv, mut adv_rej, mut honest_rej, mut honest_out) = (0, 0, 0, 0);
        let mut merged = 0;
        // The shards each worker was assigned (the work is sorted by worker).
        let shards_of = |w: &PeerId| -> &[ContentHash] {
            assignment
                .and_then(|a| {
                    let k = a.work.binary_search_by(|x| x.worker.cmp(w)).ok()?;
                    Some(a.work[k].shards.as_slice())
                })
                .unwrap_or(&[])
        };
        for v in &c.verdicts {
            let role = self.claims.get(&v.worker).map(|c| c.role);
            let cheat = matches!(role, Some(Role::Adversary(k)) if k != AdversaryKind::Flip);
            let flipped = shards_of(&v.worker)
                .iter()
                .any(|h| self.shard_index.get(h).is_some_and(|&j| self.poisoned[j]));
            let is_adv = cheat || flipped;
            adv += usize::from(is_adv);
            match &v.rejected {
                None => merged += 1,
                Some(RejectReason::SpotCheckMismatch { .. }) => spot += 1,
                Some(RejectReason::NormBound) => norm += 1,
                Some(RejectReason::Outlier) => outlier += 1,
                Some(_) => other += 1,
            }
            let caught = matches!(
                v.rejected,
                Some(
                    RejectReason::SpotCheckMismatch { .. }
                        | RejectReason::NormBound
                        | RejectReason::Outlier
                )
            );
            if is_adv && caught {
                adv_rej += 1;
            }
            if !is_adv && caught {
                honest_rej += 1;
                honest_out += usize::from(v.rejected == Some(RejectReason::Outlier));
            }
        }
        // Verdicts are sorted by worker.
        let merged_ok = |w: &PeerId| {
            c.verdicts
                .binary_search_by(|v| v.worker.cmp(w))
                .is_ok_and(|k| c.verdicts[k].rejected.is_none())
        };
        if let Some(a) = assignment {
            for w in &a.work {
                assigned_shards += w.shards.len();
                let ok = merged_ok(&w.worker);
                if ok {
                    merged_shards += w.shards.len();
                }
                if let (true, Some(value)) = (ok, self.last_values.get(&w.worker)) {
                    let idx = self.shard_indices(&w.shards);
                    let share = value / idx.len().max(1) as f64;
                    for j in idx {
                        rows_shards.push((j, share));
                    }
                }
            }
        }
        let credit_of: BTreeMap<ContentHash, (i64, &'static str)> = data
            .iter()
            .map(|d| {
                let flag = match d.flag {
                    CreditFlag::Normal => "normal",
                    CreditFlag::Duplicate { .. } => "duplicate",
                    CreditFlag::Harmful => "harmful",
                };
                (d.shard, (d.value.0, flag))
            })
            .collect();
        let mut by_index: Vec<(usize, f64)> = rows_shards;
        by_index.sort_by_key(|x| x.0);
        for (j, value) in by_index {
            let hash =
                ContentHash::of(format!("cohort-sim/shard/{}/{j}", self.config.seed).as_bytes());
            let (credit, flag) = credit_of.get(&hash).copied().unwrap_or((0, "none"));
            let kind = self.task.kinds()[j];
            self.shard_rows.push(ShardRow {
                round: c.round,
                shard: j,
                kind: kind.name(),
                group: match kind {
                    ShardKind::Duplicate { of } => of as u32,
                    _ => j as u32,
                },
                value,
                credit,
                flag,
            });
        }
        let row = self.row(c.round);
        row.outcome = outcome_name(c.outcome).into();
        row.closed_s = now;
        row.committed = c.verdicts.len();
        row.merged = merged;
        row.rejected_spot = spot;
        row.rejected_norm = norm;
        row.rejected_outlier = outlier;
        row.rejected_other = other;
        row.adversary_commits = adv;
        row.adversary_rejected = adv_rej;
        row.honest_rejected = honest_rej;
        row.honest_outliers = honest_out;
        row.lost_work = if assigned_shards == 0 {
            0.0
        } else {
            1.0 - merged_shards as f64 / assigned_shards as f64
        };
        if row.loss_before == 0.0 {
            row.loss_before = f64::from(c.validation_loss_before);
            row.loss_after = f64::from(c.validation_loss_after);
        }
        self.claims.clear();
        self.last_values.clear();
    }

    fn report(self, run_wall: Duration) -> RunReport {
        let n = self.vols.len();
        let rounds = self
            .rows
            .iter()
            .filter(|r| r.outcome != "open")
            .count()
            .max(1) as f64;
        let per_peer: Vec<f64> = (1..=n)
            .map(|i| {
                let sent = self
                    .net
                    .uplink(NodeId(i as u32))
                    .map(|u| u.bytes_sent())
                    .unwrap_or(0);
                (sent + self.received[i]) as f64 / rounds
            })
            .collect();
        let coord_sent = self
            .net
            .uplink(COORDINATOR)
            .map(|u| u.bytes_sent())
            .unwrap_or(0);
        RunReport {
            initial_loss: self.task.loss(&self.task.initial()),
            final_loss: self.task.loss(&self.current),
            optimum_loss: self.task.optimum_loss(),
            config: self.config,
            rounds: self.rows,
            timings: self.timings,
            shards: self.shard_rows,
            finished: self.finished,
            events: self.events,
            end_s: self.now.since_start().as_secs_f64(),
            bytes_per_peer_round: per_peer.iter().sum::<f64>() / n.max(1) as f64,
            max_bytes_per_peer_round: per_peer.iter().copied().fold(0.0, f64::max),
            coordinator_bytes_round: (coord_sent + self.received[0]) as f64 / rounds,
            refusals: self.refusals,
            setup_wall: self.setup_wall,
            run_wall,
            peak_rss: peak_rss(),
        }
    }
}

/// The process's peak resident set (`VmHWM` in `/proc/self/status`), bytes; `None` off Linux.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A keypair derived from the run's seed (`index` `u64::MAX` is the job owner).
fn key_for(seed: u64, index: u64) -> Keypair {
    let base = derive_seed(seed, KEY_STREAM, index);
    let mut bytes = [0u8; 32];
    for (k, chunk) in bytes.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&derive_seed(base, KEY_STREAM, k as u64).to_le_bytes());
    }
    Keypair::from_seed(&bytes)
}

fn commits(segments: &[(u32, Adapter, ContentHash)]) -> Vec<SegmentCommit> {
    segments
        .iter()
        .map(|(end, state, batches)| SegmentCommit {
            end_step: *end,
            state: state.hash(),
            batches: *batches,
        })
        .collect()
}

fn outcome_name(o: RoundOutcome) -> &'static str {
    match o {
        RoundOutcome::Merged => "merged",
        RoundOutcome::NoQuorum => "no_quorum",
        RoundOutcome::Cancelled => "cancelled",
        RoundOutcome::Stopped => "stopped",
    }
}

/// Runs one configuration to its end.
pub fn run(config: RunConfig) -> Result<RunReport, RunError> {
    Ok(RoundSim::new(config)?.run())
}
