//! The round state machines driven together in virtual time.
//!
//! `Net` is a tiny deterministic driver: an event queue ordered by (time, sequence), one
//! coordinator and a few workers, and scripted stand-ins for training, verification and
//! merging whose results are fixed per worker behaviour.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::coordinator::*;
use super::worker::*;
use super::*;
use crate::identity::Keypair;
use crate::signed::{Signed, Verified};
use crate::types::*;

const LATENCY: u64 = 20;

#[derive(Clone, Debug, PartialEq)]
enum Behaviour {
    Honest,
    /// Never answers the assignment (killed mid-round).
    Vanishes,
    /// Trains for this many ms.
    Slow(u64),
    /// Its update fails verification for this reason.
    Bad(RejectReason),
    /// Its delta is this many times the others'.
    Oversized(f64),
    /// Its delta has the others' norm but points the other way (a sign-flipping attacker the
    /// norm bound cannot see).
    Opposite,
}

enum Ev {
    Coord(CoordinatorEvent),
    Worker(usize, WorkerEvent),
}

struct Net {
    now: Timestamp,
    seq: u64,
    queue: BTreeMap<(Timestamp, u64), Ev>,
    owner: Keypair,
    coord: Coordinator,
    workers: Vec<(Keypair, Worker, Behaviour)>,
    closes: Vec<(RoundClose, Vec<ShardCredit>, Vec<ComputeCredit>)>,
    /// Commits the closes' records name as filtered out (outliers), over all rounds.
    filtered: usize,
    refused: Vec<(PeerId, Refusal)>,
    verdicts: Vec<(usize, u32, Option<RejectReason>)>,
    finished: Option<RoundOutcome>,
    workers_finished: usize,
    loss: f32,
    assignment_log: Vec<WorkAssignment>,
    /// Distance requests seen, and whether the driver loses them instead of answering.
    distance_requests: Vec<(Timestamp, Vec<FilterInput>)>,
    drop_distances: bool,
    /// Deliver assignments and closes verified once and shared, as the simulator does.
    shared: bool,
}

fn spec(rounds: u32, min_updates: u32) -> JobSpec {
    JobSpec {
        name: "test".into(),
        base_model: ContentHash::of(b"base"),
        adapter: AdapterConfig {
            kind: AdapterKind::Lora,
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec![TargetModule::Q, TargetModule::V],
            rslora: false,
        },
        hyper: Hyperparameters {
            learning_rate: 1e-3,
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            epochs: 1,
            batch_size: 2,
            grad_accumulation: 1,
            seq_len: 64,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 5,
        },
        datanets: vec![DatanetRef {
            datanet: DatanetId(ContentHash::of(b"dn")),
            version: 1,
            manifest: ContentHash::of(b"m"),
        }],
        validation: ValidationSpec {
            fraction_ppm: 100_000,
            seed: 6,
            set: ContentHash::of(b"val"),
        },
        rounds,
        quorum: Quorum {
            min_updates,
            max_workers: 8,
        },
        deadlines: Deadlines {
            enroll_ms: 1_000,
            train_ms: 10_000,
            validate_ms: 5_000,
        },
        merge: MergeMethod::ExactTruncated,
        early_stopping: None,
        verification: VerificationSpec {
            segment_steps: 4,
            audit_ppm: 100_000,
            norm_bound_ppm: 4_000_000,
            robust: RobustAggregation::None,
        },
        created_at: Timestamp(0),
    }
}

fn shards(n: u8) -> Vec<PlannedShard> {
    let mut v: Vec<PlannedShard> = (0..n)
        .map(|i| PlannedShard {
            hash: ContentHash::of(&[b's', i]),
            datanet: DatanetId(ContentHash::of(b"dn")),
            contributor: Keypair::from_seed(&[200 + i; 32]).peer_id(),
            tokens: 100 + u64::from(i),
            group: u32::from(i),
        })
        .collect();
    v.sort_by_key(|s| s.hash);
    v
}

fn capacity() -> Capacity {
    Capacity {
        kernel: kernel(),
        cores: 2,
        memory_mib: 4096,
        models: vec![],
    }
}

fn kernel() -> KernelClass {
    KernelClass {
        backend: "flex".into(),
        kernel: "avx512".into(),
        threads: 2,
    }
}

impl Net {
    fn new(spec: JobSpec, behaviours: &[Behaviour]) -> Self {
        Self::build(spec, behaviours, false)
    }

    fn build(spec: JobSpec, behaviours: &[Behaviour], shared: bool) -> Self {
        let owner = Keypair::from_seed(&[1; 32]);
        let signed = Signed::sign(&owner, &spec);
        let (coord, actions) =
            Coordinator::new(signed.clone(), shards(6), &owner, [7; 32], Timestamp(0))
                .expect("coordinator");
        let workers = behaviours
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let k = Keypair::from_seed(&[10 + i as u8; 32]);
                (k, Worker::new(&signed, spec.clone(), capacity()), b.clone())
            })
            .collect();
        let mut net = Self {
            now: Timestamp(0),
            seq: 0,
            queue: BTreeMap::new(),
            owner,
            coord,
            workers,
            closes: Vec::new(),
            filtered: 0,
            refused: Vec::new(),
            verdicts: Vec::new(),
            finished: None,
            workers_finished: 0,
            loss: 3.0,
            assignment_log: Vec::new(),
            distance_requests: Vec::new(),
            drop_distances: false,
            shared,
        };
        net.coord_actions(actions);
        net
    }

    fn at(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((after(self.now, delay), self.seq), ev);
    }

    /// Runs events until the queue is empty or `until` (virtual ms) is reached.
    fn run(&mut self, until: u64) {
        while let Some(entry) = self.queue.first_entry() {
            let (t, _) = *entry.key();
            if t.0 > until {
                break;
            }
            let ev = entry.remove();
            self.now = t;
            self.dispatch(ev);
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Coord(e) => {
                let a = self.coord.handle(self.now, e, &self.owner);
                self.coord_actions(a);
            }
            Ev::Worker(i, e) => {
                let (k, w, _) = &mut self.workers[i];
                let a = w.handle(self.now, e, k);
                self.worker_actions(i, a);
            }
        }
    }

    fn behaviour_of(&self, p: PeerId) -> Behaviour {
        self.workers
            .iter()
            .find(|(k, _, _)| k.peer_id() == p)
            .map(|w| w.2.clone())
            .unwrap_or(Behaviour::Honest)
    }

    /// The update's delta as a point in the plane: the honest ones close together around
    /// (1, 0), each a little apart; `Opposite` at (-1, 0), as far as norm 1 allows.
    fn delta_of(&self, p: PeerId) -> [f64; 2] {
        let i = self
            .workers
            .iter()
            .position(|(k, _, _)| k.peer_id() == p)
            .unwrap_or(0);
        match self.behaviour_of(p) {
            Behaviour::Opposite => [-1.0, 0.0],
            Behaviour::Oversized(x) => [x, 0.0],
            _ => [1.0, 0.01 * i as f64],
        }
    }

    fn coord_actions(&mut self, actions: Vec<CoordinatorAction>) {
        for a in actions {
            match a {
                CoordinatorAction::Publish(p) => {
                    if let Published::Assignment(m) = &p {
                        self.assignment_log = m.verify().expect("own assignment").work;
                    }
                    let verified_assignment = match &p {
                        Published::Assignment(m) if self.shared => {
                            Some(Arc::new(Verified::new(m.clone()).expect("own assignment")))
                        }
                        _ => None,
                    };
                    let verified_close = match &p {
                        Published::Close(m) if self.shared => {
                            Some(Arc::new(Verified::new(m.clone()).expect("own close")))
                        }
                        _ => None,
                    };
                    for i in 0..self.workers.len() {
                        let e = match (&p, &verified_assignment, &verified_close) {
                            (_, Some(v), _) => WorkerEvent::AssignedVerified(Arc::clone(v)),
                            (_, _, Some(v)) => WorkerEvent::ClosedVerified(Arc::clone(v)),
                            (Published::Open(m), ..) => WorkerEvent::Open(m.clone()),
                            (Published::Assignment(m), ..) => WorkerEvent::Assigned(m.clone()),
                            (Published::Close(m), ..) => WorkerEvent::Closed(m.clone()),
                        };
                        self.at(LATENCY, Ev::Worker(i, e));
                    }
                }
                CoordinatorAction::WakeAt(t) => {
                    let d = t.0.saturating_sub(self.now.0);
                    self.at(d, Ev::Coord(CoordinatorEvent::Tick));
                }
                CoordinatorAction::Verify { commit, audit, .. } => {
                    let c = commit.verify().expect("own commit");
                    assert!(audit.iter().all(|i| (*i as usize) < c.segments.len()));
                    let d = self.delta_of(commit.signer());
                    let result = match self.behaviour_of(commit.signer()) {
                        Behaviour::Bad(r) => Verification::Failed(r),
                        _ => Verification::Passed {
                            delta_norm: d[0].hypot(d[1]),
                        },
                    };
                    self.at(
                        5,
                        Ev::Coord(CoordinatorEvent::Verified {
                            worker: commit.signer(),
                            commit: commit.hash(),
                            result,
                        }),
                    );
                }
                CoordinatorAction::Distances { round, updates } => {
                    self.distance_requests.push((self.now, updates.clone()));
                    if self.drop_distances {
                        continue;
                    }
                    let points: Vec<[f64; 2]> =
                        updates.iter().map(|u| self.delta_of(u.worker)).collect();
                    let dist = points
                        .iter()
                        .flat_map(|p| {
                            points
                                .iter()
                                .map(move |q| (p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2))
                        })
                        .collect();
                    self.at(
                        5,
                        Ev::Coord(CoordinatorEvent::Distances {
                            round,
                            commits: updates.iter().map(|u| u.commit).collect(),
                            dist,
                        }),
                    );
                }
                CoordinatorAction::Merge { round, updates, .. } => {
                    let n = updates.len();
                    let before = self.loss;
                    let values = vec![0.05; n];
                    let after_loss = before - 0.05 * n as f32;
                    self.at(
                        5,
                        Ev::Coord(CoordinatorEvent::Merged(MergeOutcome {
                            round,
                            adapter: (n > 0).then(|| ContentHash::of(&round.to_le_bytes())),
                            truncation_error: 0.0,
                            loss_before: before,
                            loss_after: after_loss,
                            values,
                        })),
                    );
                }
                CoordinatorAction::Close {
                    close,
                    data,
                    compute,
                    record,
                } => {
                    assert_eq!(record.close, close);
                    if let Ok(c) = close.verify()
                        && matches!(c.outcome, RoundOutcome::Merged | RoundOutcome::Stopped)
                    {
                        // The record's merged commits are exactly the verdicts without a reason.
                        let merged: Vec<PeerId> =
                            record.merged.iter().map(|m| m.signer()).collect();
                        let clean: Vec<PeerId> = c
                            .verdicts
                            .iter()
                            .filter(|v| v.rejected.is_none())
                            .map(|v| v.worker)
                            .collect();
                        assert_eq!(merged, clean);
                        // And its filtered ones exactly the outliers, commits included.
                        let filtered: Vec<(PeerId, ContentHash)> = record
                            .filtered
                            .iter()
                            .map(|m| (m.signer(), m.hash()))
                            .collect();
                        let outliers: Vec<(PeerId, ContentHash)> = c
                            .verdicts
                            .iter()
                            .filter(|v| v.rejected == Some(RejectReason::Outlier))
                            .map(|v| (v.worker, v.commit))
                            .collect();
                        assert_eq!(filtered, outliers);
                        self.filtered += filtered.len();
                        // Anyone can recompute the data credits from the record.
                        let values: Vec<(PeerId, f64)> =
                            merged.iter().map(|p| (*p, 0.05)).collect();
                        let a = record.assignment.as_ref().unwrap().verify().unwrap();
                        assert_eq!(
                            round_data_credits(
                                &a,
                                &record.shards,
                                &values,
                                c.validation_loss_before,
                                c.validation_loss_after
                            ),
                            data
                        );
                    }
                    let c = close.verify().expect("own close");
                    self.loss = c.validation_loss_after;
                    self.closes.push((c, data, compute));
                }
                CoordinatorAction::Refused { from, why } => self.refused.push((from, why)),
                CoordinatorAction::Finished { outcome, .. } => self.finished = Some(outcome),
            }
        }
    }

    fn worker_actions(&mut self, i: usize, actions: Vec<WorkerAction>) {
        for a in actions {
            match a {
                WorkerAction::SendJoin(m) => self.at(LATENCY, Ev::Coord(CoordinatorEvent::Join(m))),
                WorkerAction::SendCommit(m) => {
                    self.at(LATENCY, Ev::Coord(CoordinatorEvent::Commit(m)))
                }
                WorkerAction::Train { round, work, .. } => {
                    let took = match self.workers[i].2.clone() {
                        Behaviour::Vanishes => continue,
                        Behaviour::Slow(ms) => ms,
                        _ => 2_000,
                    };
                    let update = TrainedUpdate {
                        round,
                        update: ContentHash::of(&[i as u8, round as u8]),
                        tokens: 100 * work.shards.len() as u64,
                        steps: 8,
                        losses: vec![2.0; 8],
                        kernel: kernel(),
                        segments: (1..=2)
                            .map(|s| SegmentCommit {
                                end_step: 4 * s,
                                state: ContentHash::of(&[i as u8, s as u8]),
                                batches: ContentHash::of(&[s as u8]),
                            })
                            .collect(),
                    };
                    self.at(took, Ev::Worker(i, WorkerEvent::Trained(update)));
                }
                WorkerAction::Verdict { round, rejected } => {
                    self.verdicts.push((i, round, rejected))
                }
                WorkerAction::StopTraining { .. } | WorkerAction::Refused { .. } => {}
                WorkerAction::Finished => self.workers_finished += 1,
            }
        }
    }

    fn shards_of(&self, p: PeerId) -> usize {
        self.assignment_log
            .iter()
            .find(|w| w.worker == p)
            .map(|w| w.shards.len())
            .unwrap_or(0)
    }

    fn peer(&self, i: usize) -> PeerId {
        self.workers[i].0.peer_id()
    }

    fn verdict(&self, round: usize, i: usize) -> Option<Option<RejectReason>> {
        let p = self.peer(i);
        self.closes[round]
            .0
            .verdicts
            .iter()
            .find(|v| v.worker == p)
            .map(|v| v.rejected.clone())
    }
}

fn data_total(credits: &[ShardCredit]) -> i64 {
    credits.iter().map(|c| c.value.0).sum()
}

#[test]
fn three_honest_workers_run_two_rounds() {
    let mut net = Net::new(spec(2, 2), &vec![Behaviour::Honest; 3]);
    net.run(u64::MAX);
    assert_eq!(net.finished, Some(RoundOutcome::Merged));
    assert_eq!(net.closes.len(), 2);
    for (r, (close, data, compute)) in net.closes.iter().enumerate() {
        assert_eq!(close.round, r as u32);
        assert_eq!(close.outcome, RoundOutcome::Merged);
        assert_eq!(close.verdicts.len(), 3);
        assert!(close.verdicts.iter().all(|v| v.rejected.is_none()));
        // Every shard is trained once per round and credited; the credits sum to the gain.
        assert_eq!(data.len(), 6);
        let gain = close.validation_loss_before - close.validation_loss_after;
        let budget = (f64::from(gain) * 1e9).round() as i64;
        assert_eq!(data_total(data), budget);
        assert!(compute.iter().all(|c| c.verified && c.tokens == 200));
    }
    // Round 1 starts from round 0's merged adapter.
    assert_eq!(
        net.closes[1].0.merged_adapter,
        Some(ContentHash::of(&1u32.to_le_bytes()))
    );
    assert_eq!(net.workers_finished, 3);
    assert_eq!(net.verdicts.len(), 6);
    assert!(net.refused.is_empty(), "{:?}", net.refused);
    assert_eq!(net.coord.phase(), Phase::Finished);
}

#[test]
fn workers_given_shared_verified_messages_run_the_job_identically() {
    let behaviours = [
        Behaviour::Honest,
        Behaviour::Vanishes,
        Behaviour::Honest,
        Behaviour::Honest,
    ];
    let mut plain = Net::new(spec(2, 2), &behaviours);
    plain.run(u64::MAX);
    let mut shared = Net::build(spec(2, 2), &behaviours, true);
    shared.run(u64::MAX);
    assert_eq!(shared.finished, plain.finished);
    assert_eq!(shared.verdicts, plain.verdicts);
    assert_eq!(shared.workers_finished, plain.workers_finished);
    let closes = |n: &Net| n.closes.iter().map(|c| c.0.clone()).collect::<Vec<_>>();
    assert_eq!(closes(&shared), closes(&plain));
    assert!(shared.verdicts.len() >= 6, "{:?}", shared.verdicts);
}

#[test]
fn a_shared_message_signed_by_someone_else_is_refused() {
    let owner_spec = Signed::sign(&Keypair::from_seed(&[1; 32]), &spec(1, 1));
    let me = Keypair::from_seed(&[10; 32]);
    let mut w = Worker::new(&owner_spec, spec(1, 1), capacity());
    let stranger = Keypair::from_seed(&[99; 32]);
    let forged = Signed::sign(
        &stranger,
        &Assignment {
            job: JobId::of(&owner_spec),
            round: 0,
            work: vec![],
            commit_until: Timestamp(10),
        },
    );
    let out = w.handle(
        Timestamp(0),
        WorkerEvent::AssignedVerified(Arc::new(Verified::new(forged).unwrap())),
        &me,
    );
    assert!(
        matches!(out.as_slice(), [WorkerAction::Refused { from, why: Refusal::Forged }] if *from == stranger.peer_id()),
        "{out:?}"
    );
}

#[test]
fn a_vanished_worker_does_not_stop_the_round_at_quorum() {
    let mut net = Net::new(
        spec(1, 2),
        &[Behaviour::Honest, Behaviour::Vanishes, Behaviour::Honest],
    );
    net.run(u64::MAX);
    let (close, data, compute) = &net.closes[0];
    assert_eq!(close.outcome, RoundOutcome::Merged);
    // Only committed workers appear; the vanished one is neither merged nor credited.
    assert_eq!(close.verdicts.len(), 2);
    assert_eq!(net.verdict(0, 1), None);
    assert!(compute.iter().all(|c| c.peer != net.peer(1)));
    // Its two shards were not trained, so they are not credited this round.
    assert_eq!(data.len(), 4);
    // The round closed at the commit deadline, not before.
    assert!(close.closed_at.0 >= 1_000 + 10_000);
}

#[test]
fn without_quorum_nothing_is_merged_and_the_start_carries_over() {
    let mut net = Net::new(
        spec(1, 3),
        &[Behaviour::Honest, Behaviour::Vanishes, Behaviour::Honest],
    );
    net.run(u64::MAX);
    let (close, data, compute) = &net.closes[0];
    assert_eq!(close.outcome, RoundOutcome::NoQuorum);
    assert_eq!(close.merged_adapter, None);
    assert_eq!(close.validation_loss_before, close.validation_loss_after);
    assert!(data.is_empty());
    assert_eq!(net.verdict(0, 0), Some(Some(RejectReason::NotMerged)));
    // Honest work that passed its checks still earns compute credit.
    assert!(compute.iter().all(|c| c.verified));
}

#[test]
fn a_straggler_is_refused_as_late_and_recorded() {
    let mut net = Net::new(
        spec(1, 2),
        &[Behaviour::Honest, Behaviour::Honest, Behaviour::Slow(9_000)],
    );
    // The slow worker finishes training inside its deadline by its own clock but the commit
    // reaches the coordinator after it: make the coordinator's deadline the tighter one by
    // delivering the commit late.
    net.run(u64::MAX);
    let (close, _, _) = &net.closes[0];
    // 9 s of training after assignment at ~1 s, commit deadline at ~11 s: on time.
    assert_eq!(net.verdict(0, 2), Some(None));
    assert_eq!(close.outcome, RoundOutcome::Merged);

    let mut net = Net::new(
        spec(1, 2),
        &[
            Behaviour::Honest,
            Behaviour::Honest,
            Behaviour::Slow(12_000),
        ],
    );
    net.run(u64::MAX);
    // Training ended after the deadline: the worker does not even send it.
    assert_eq!(net.verdict(0, 2), None);
    assert_eq!(*net.workers[2].1.phase(), WorkerPhase::Finished);
}

#[test]
fn late_duplicate_equivocating_forged_and_unassigned_commits() {
    let mut net = Net::new(
        spec(1, 2),
        &[Behaviour::Honest, Behaviour::Honest, Behaviour::Vanishes],
    );
    // Run until training started (assignment at ~1 s).
    net.run(1_500);
    assert_eq!(net.coord.phase(), Phase::Training);
    let assignment = net.coord.assigned();
    assert_eq!(assignment.len(), 3);
    let job = net.coord.job();
    let make = |k: &Keypair, update: &[u8], shards: Vec<ContentHash>| {
        Signed::sign(
            k,
            &UpdateCommit {
                job,
                round: 0,
                update: ContentHash::of(update),
                shards,
                tokens: 10,
                steps: 4,
                losses: vec![1.0; 4],
                seed: 1,
                kernel: kernel(),
                segments: vec![],
            },
        )
    };
    // Worker 2's real shards, read from its phase once assigned.
    let WorkerPhase::Training { work, .. } = net.workers[2].1.phase().clone() else {
        panic!(
            "worker 2 should be training: {:?}",
            net.workers[2].1.phase()
        );
    };
    let k2 = Keypair::from_seed(&[12; 32]);
    let first = make(&k2, b"one", work.shards.clone());
    let outsider = Keypair::from_seed(&[99; 32]);
    let unassigned = make(&outsider, b"x", work.shards.clone());
    // Forged: worker 2's commit with the payload of another.
    let other = make(&k2, b"two", work.shards.clone());
    let forged = Signed::<UpdateCommit>::from_parts(
        first.domain().to_owned(),
        first.version(),
        first.signer(),
        other.payload_bytes().to_vec(),
        *first.signature(),
    );
    let t = net.now;
    let mut refusals = Vec::new();
    for m in [forged, unassigned, first.clone(), first.clone(), other] {
        for a in net.coord.handle(t, CoordinatorEvent::Commit(m), &net.owner) {
            if let CoordinatorAction::Refused { why, .. } = a {
                refusals.push(why);
            }
        }
    }
    assert_eq!(
        refusals,
        vec![
            Refusal::Forged,
            Refusal::NotAssigned,
            Refusal::Duplicate,
            Refusal::Equivocation
        ]
    );
    net.run(u64::MAX);
    // The equivocator's first commit stays on record, rejected.
    assert_eq!(net.verdict(0, 2), Some(Some(RejectReason::Equivocation)));
    // A commit after the round closed is refused as stale.
    let late = make(&k2, b"late", work.shards);
    let a = net
        .coord
        .handle(net.now, CoordinatorEvent::Commit(late), &net.owner);
    assert!(matches!(
        &a[..],
        [CoordinatorAction::Refused {
            why: Refusal::Stale,
            ..
        }]
    ));
}

#[test]
fn bad_and_oversized_updates_are_rejected_and_earn_nothing() {
    let mut net = Net::new(
        spec(1, 2),
        &[
            Behaviour::Honest,
            Behaviour::Bad(RejectReason::NonFinite),
            Behaviour::Honest,
            Behaviour::Oversized(50.0),
            Behaviour::Bad(RejectReason::SpotCheckMismatch { end_step: 4 }),
        ],
    );
    net.run(u64::MAX);
    let (close, data, compute) = &net.closes[0];
    assert_eq!(close.outcome, RoundOutcome::Merged);
    assert_eq!(net.verdict(0, 1), Some(Some(RejectReason::NonFinite)));
    assert_eq!(net.verdict(0, 3), Some(Some(RejectReason::NormBound)));
    assert_eq!(
        net.verdict(0, 4),
        Some(Some(RejectReason::SpotCheckMismatch { end_step: 4 }))
    );
    for i in [1, 3, 4] {
        let c = compute
            .iter()
            .find(|c| c.peer == net.peer(i))
            .expect("recorded");
        assert!(!c.verified);
    }
    // Only the two honest workers' shards are credited.
    let merged: usize = [0, 2].iter().map(|i| net.shards_of(net.peer(*i))).sum();
    assert_eq!(data.len(), merged);
}

#[test]
fn a_worker_caught_cheating_is_barred_from_the_later_rounds() {
    let mut net = Net::new(
        spec(2, 2),
        &[
            Behaviour::Honest,
            Behaviour::Bad(RejectReason::SpotCheckMismatch { end_step: 4 }),
            Behaviour::Honest,
            Behaviour::Oversized(50.0),
            Behaviour::Bad(RejectReason::NonFinite),
        ],
    );
    net.run(u64::MAX);
    assert_eq!(net.closes.len(), 2);
    assert_eq!(
        net.verdict(0, 1),
        Some(Some(RejectReason::SpotCheckMismatch { end_step: 4 }))
    );
    assert_eq!(net.verdict(0, 4), Some(Some(RejectReason::NonFinite)));
    // Round 1: the spot-check cheat and the NaN sender are refused at enrolment, with the
    // round and reason that barred them; the oversized update (the norm bound also catches
    // honest workers with an unusual shard) is let back in and refused again on its merits.
    for (i, reason) in [
        (1, RejectReason::SpotCheckMismatch { end_step: 4 }),
        (4, RejectReason::NonFinite),
    ] {
        assert_eq!(net.verdict(1, i), None, "worker {i} took part in round 1");
        let p = net.peer(i);
        assert!(
            net.refused.contains(&(
                p,
                Refusal::Barred {
                    round: 0,
                    reason: reason.clone()
                }
            )),
            "worker {i}: {:?}",
            net.refused
        );
    }
    assert_eq!(net.verdict(1, 3), Some(Some(RejectReason::NormBound)));
    for i in [0, 2] {
        assert_eq!(net.verdict(1, i), Some(None), "worker {i}");
    }
    // The bar is part of the saved state: a restarted coordinator keeps it.
    assert_eq!(net.coord.barred().len(), 2);
    let (restored, _) = Coordinator::restore(&net.coord.save(), &net.owner, net.now).unwrap();
    assert_eq!(restored.barred(), net.coord.barred());
}

#[test]
fn enrolment_waits_for_enough_volunteers() {
    // Quorum 4 with 3 volunteers: the round keeps enrolling past its deadline instead of
    // burning itself; nothing is assigned.
    let mut net = Net::new(spec(1, 4), &vec![Behaviour::Honest; 3]);
    net.run(20_000);
    assert_eq!(net.coord.phase(), Phase::Enrolling);
    assert_eq!(net.coord.enrolled().len(), 3);
    assert!(net.closes.is_empty());
    // A fourth volunteer arrives late and the round goes ahead.
    let owner_spec = Signed::sign(&net.owner, &spec(1, 4));
    let k = Keypair::from_seed(&[40; 32]);
    net.workers.push((
        k,
        Worker::new(&owner_spec, spec(1, 4), capacity()),
        Behaviour::Honest,
    ));
    let open = net.coord.current_open().clone();
    net.at(0, Ev::Worker(3, WorkerEvent::Open(open)));
    // The coordinator's next tick after the join sees a full quorum at a passed deadline.
    net.at(100, Ev::Coord(CoordinatorEvent::Tick));
    net.run(u64::MAX);
    assert_eq!(net.closes[0].0.outcome, RoundOutcome::Merged);
    assert_eq!(net.closes[0].0.verdicts.len(), 4);
}

#[test]
fn a_round_that_never_reaches_its_quorum_gives_up() {
    let mut net = Net::new(spec(2, 4), &vec![Behaviour::Honest; 3]);
    net.run(u64::MAX);
    // Each round waits MAX_ENROLL_PERIODS enrolment periods, then closes unmerged.
    assert_eq!(net.closes.len(), 2);
    for (r, (c, data, _)) in net.closes.iter().enumerate() {
        assert_eq!(c.outcome, RoundOutcome::NoQuorum);
        assert!(c.verdicts.is_empty() && data.is_empty());
        let opened = r as u64 * 30_000;
        assert_eq!(c.closed_at.0, opened + MAX_ENROLL_PERIODS * 1_000);
    }
    assert_eq!(net.finished, Some(RoundOutcome::NoQuorum));
    assert_eq!(net.workers_finished, 3);
}

/// Stops the coordinator at each of `stops` (virtual ms), loses every coordinator event in
/// flight, restores it from its saved bytes, and checks that the job ends as an uninterrupted
/// run of it did: same outcomes, verdicts and credit totals. Returns the reference run.
fn restarts_finish_identically(spec: &JobSpec, behaviours: &[Behaviour], stops: &[u64]) -> Net {
    let mut reference = Net::new(spec.clone(), behaviours);
    reference.run(u64::MAX);
    for &stop in stops {
        let mut net = Net::new(spec.clone(), behaviours);
        net.run(stop);
        let saved = net.coord.save();
        // The process dies: every coordinator event in flight is lost with it.
        net.queue.retain(|_, e| matches!(e, Ev::Worker(..)));
        let (coord, actions) = Coordinator::restore(&saved, &net.owner, net.now).expect("restore");
        assert_eq!(
            (coord.round(), coord.phase(), coord.adapter()),
            (net.coord.round(), net.coord.phase(), net.coord.adapter()),
            "stop at {stop}"
        );
        net.coord = coord;
        net.coord_actions(actions);
        net.run(u64::MAX);
        assert_eq!(net.finished, reference.finished, "stop at {stop}");
        assert_eq!(net.closes.len(), reference.closes.len(), "stop at {stop}");
        for (a, b) in net.closes.iter().zip(&reference.closes) {
            assert_eq!(a.0.outcome, b.0.outcome, "stop at {stop}");
            let reasons = |c: &RoundClose| -> Vec<(PeerId, Option<RejectReason>)> {
                c.verdicts
                    .iter()
                    .map(|v| (v.worker, v.rejected.clone()))
                    .collect()
            };
            assert_eq!(reasons(&a.0), reasons(&b.0), "stop at {stop}");
            assert_eq!(data_total(&a.1), data_total(&b.1), "stop at {stop}");
        }
    }
    reference
}

#[test]
fn a_restarted_coordinator_finishes_the_job_identically() {
    // Stop points in every phase of round 0 and in round 1.
    let reference = restarts_finish_identically(
        &spec(2, 2),
        &vec![Behaviour::Honest; 3],
        &[500, 1_500, 3_100, 3_150, 3_200, 14_000],
    );
    assert_eq!(reference.finished, Some(RoundOutcome::Merged));
    assert_eq!(reference.closes.len(), 2);
    for (close, _, _) in &reference.closes {
        assert!(close.verdicts.iter().all(|v| v.rejected.is_none()));
    }
}

#[test]
fn a_restore_with_another_key_is_refused() {
    let net = Net::new(spec(1, 2), &vec![Behaviour::Honest; 3]);
    let saved = net.coord.save();
    let err = Coordinator::restore(&saved, &Keypair::from_seed(&[3; 32]), Timestamp(5));
    assert!(matches!(err, Err(CoordinatorError::NotOwner { .. })));
    let err = Coordinator::restore(&saved[..saved.len() - 1], &net.owner, Timestamp(5));
    assert!(matches!(err, Err(CoordinatorError::State(_))));
}

#[test]
fn early_stopping_ends_the_job_when_validation_stops_improving() {
    let mut s = spec(10, 2);
    s.early_stopping = Some(EarlyStopping {
        patience: 2,
        min_delta: 0.5,
    });
    // Each merged round gains 0.15 (3 updates x 0.05) < min_delta: rounds 1 and 2 don't count
    // as improvements, so the job stops after round 2 of 10.
    let mut net = Net::new(s, &vec![Behaviour::Honest; 3]);
    net.run(u64::MAX);
    assert_eq!(net.closes.len(), 3);
    assert_eq!(net.finished, Some(RoundOutcome::Stopped));
    assert_eq!(net.closes[2].0.outcome, RoundOutcome::Stopped);
    assert_eq!(net.workers_finished, 3);
}

#[test]
fn cancel_closes_the_round_and_ends_the_job() {
    let mut net = Net::new(spec(3, 2), &vec![Behaviour::Honest; 3]);
    net.run(1_500);
    net.at(0, Ev::Coord(CoordinatorEvent::Cancel));
    net.run(u64::MAX);
    assert_eq!(net.finished, Some(RoundOutcome::Cancelled));
    assert_eq!(net.closes.len(), 1);
    assert!(net.closes[0].1.is_empty());
    assert_eq!(net.workers_finished, 3);
}

#[test]
fn joins_are_checked() {
    let mut net = Net::new(spec(1, 2), &[]);
    let k = Keypair::from_seed(&[50; 32]);
    let join = |job: JobId, round: u32| {
        Signed::sign(
            &k,
            &RoundJoin {
                job,
                round,
                capacity: capacity(),
            },
        )
    };
    let job = net.coord.job();
    let mut why = Vec::new();
    for m in [
        join(JobId(ContentHash::of(b"other")), 0),
        join(job, 1),
        join(job, 0),
        join(job, 0),
    ] {
        for a in net
            .coord
            .handle(Timestamp(1), CoordinatorEvent::Join(m), &net.owner)
        {
            if let CoordinatorAction::Refused { why: w, .. } = a {
                why.push(w);
            }
        }
    }
    assert_eq!(
        why,
        vec![Refusal::WrongJob, Refusal::Stale, Refusal::Duplicate]
    );
    assert_eq!(net.coord.enrolled(), vec![k.peer_id()]);
    net.run(0);
}

#[test]
fn workers_refuse_messages_not_signed_by_the_owner() {
    let owner = Keypair::from_seed(&[1; 32]);
    let s = spec(1, 2);
    let signed = Signed::sign(&owner, &s);
    let mut w = Worker::new(&signed, s, capacity());
    let me = Keypair::from_seed(&[2; 32]);
    let intruder = Keypair::from_seed(&[3; 32]);
    let open = |k: &Keypair| {
        Signed::sign(
            k,
            &RoundOpen {
                job: JobId::of(&signed),
                round: 0,
                start_adapter: None,
                seed: 1,
                opened_at: Timestamp(0),
                enroll_until: Timestamp(10),
            },
        )
    };
    let a = w.handle(Timestamp(0), WorkerEvent::Open(open(&intruder)), &me);
    assert!(matches!(
        &a[..],
        [WorkerAction::Refused {
            why: Refusal::Forged,
            ..
        }]
    ));
    assert_eq!(w.round(), None);
    let a = w.handle(Timestamp(0), WorkerEvent::Open(open(&owner)), &me);
    assert!(matches!(&a[..], [WorkerAction::SendJoin(_)]));
    // Hearing the open again re-sends the join (the coordinator may have restarted).
    let a = w.handle(Timestamp(1), WorkerEvent::Open(open(&owner)), &me);
    assert!(matches!(&a[..], [WorkerAction::SendJoin(_)]));
}

#[test]
fn shard_credits_pool_duplicates_zero_the_harmful_and_sum_exactly() {
    let p = |i: u8| Keypair::from_seed(&[i; 32]).peer_id();
    let dn = DatanetId(ContentHash::of(b"dn"));
    let mk = |i: u8, group: u32| PlannedShard {
        hash: ContentHash::of(&[i]),
        datanet: dn,
        contributor: p(i),
        tokens: 100,
        group,
    };
    // clean (group 0) and its duplicate (group 0), off-topic (group 1), shuffled (group 2).
    let shards = vec![mk(1, 0), mk(2, 0), mk(3, 1), mk(4, 2)];
    let values = [0.30, 0.31, 0.001, -0.2];
    let gain = 0.411;
    let credits = shard_credits(&shards, &values, gain);
    let by = |i: u8| {
        credits
            .iter()
            .find(|c| c.shard == ContentHash::of(&[i]))
            .unwrap()
    };
    assert_eq!(by(4).flag, CreditFlag::Harmful);
    assert_eq!(by(4).value, Credit(0));
    assert!(matches!(by(1).flag, CreditFlag::Duplicate { .. }));
    assert_eq!(by(1).flag, by(2).flag);
    // The duplicates split their pooled value equally (to the nano-unit).
    assert!((by(1).value.0 - by(2).value.0).abs() <= 1);
    assert!(by(3).value.0 < by(1).value.0 / 50);
    let total: i64 = credits.iter().map(|c| c.value.0).sum();
    assert_eq!(total, 411_000_000);
    assert!(credits.windows(2).all(|w| w[0].shard < w[1].shard));
    // No gain, no data credit.
    assert!(
        shard_credits(&shards, &values, -0.1)
            .iter()
            .all(|c| c.value.0 == 0)
    );
}

/// [`spec`] with Multi-Krum tolerating `f` Byzantine updates.
fn krum_spec(rounds: u32, min_updates: u32, f: u32) -> JobSpec {
    let mut s = spec(rounds, min_updates);
    s.verification.robust = RobustAggregation::MultiKrum { f };
    s.validate().expect("valid spec");
    s
}

fn four_honest_and(b: Behaviour) -> Vec<Behaviour> {
    let mut v = vec![Behaviour::Honest; 4];
    v.push(b);
    v
}

#[test]
fn a_worker_caught_misbehaving_uses_up_the_filters_budget() {
    // f = 1, and the round's one Byzantine worker is caught by a spot check: Multi-Krum refuses
    // none of the four honest updates (it would refuse one with f counted afresh).
    let mut net = Net::new(
        krum_spec(1, 2, 1),
        &four_honest_and(Behaviour::Bad(RejectReason::SpotCheckMismatch {
            end_step: 2,
        })),
    );
    net.run(u64::MAX);
    assert_eq!(net.closes[0].0.outcome, RoundOutcome::Merged);
    for i in 0..4 {
        assert_eq!(net.verdict(0, i), Some(None), "worker {i}");
    }
    assert_eq!(net.filtered, 0);
    assert_eq!(filter_budget(1, 1, 4), 0);
    assert_eq!(filter_budget(3, 1, 10), 2);
    assert_eq!(filter_budget(3, 0, 4), 1, "at most m - 3");
    assert_eq!(filter_budget(3, 0, 3), 0);
}

#[test]
fn multi_krum_refuses_the_far_update_and_merges_the_rest() {
    let mut net = Net::new(krum_spec(1, 2, 1), &four_honest_and(Behaviour::Opposite));
    net.run(u64::MAX);
    let (close, data, compute) = &net.closes[0];
    assert_eq!(close.outcome, RoundOutcome::Merged);
    // One request, for the five updates that passed, sorted by worker.
    assert_eq!(net.distance_requests.len(), 1);
    let asked: Vec<PeerId> = net.distance_requests[0]
        .1
        .iter()
        .map(|u| u.worker)
        .collect();
    let mut all: Vec<PeerId> = (0..5).map(|i| net.peer(i)).collect();
    all.sort();
    assert_eq!(asked, all);
    // The sign-flipped update has the others' norm: the norm bound lets it through, the
    // filter refuses it, and the four others are merged.
    assert_eq!(net.verdict(0, 4), Some(Some(RejectReason::Outlier)));
    for i in 0..4 {
        assert_eq!(net.verdict(0, i), Some(None), "worker {i}");
    }
    // Its work passed every check: compute credit, but no data credit for its shards.
    assert!(compute.iter().all(|c| c.verified));
    let merged: usize = (0..4).map(|i| net.shards_of(net.peer(i))).sum();
    assert_eq!(data.len(), merged);
    assert!(net.verdicts.contains(&(4, 0, Some(RejectReason::Outlier))));
    // The round's record names its commit, for `ledger verify` to recompute the filter.
    assert_eq!(net.filtered, 1);
}

#[test]
fn without_a_filter_the_same_update_is_merged() {
    let mut net = Net::new(spec(1, 2), &four_honest_and(Behaviour::Opposite));
    net.run(u64::MAX);
    assert!(net.distance_requests.is_empty());
    assert_eq!(net.closes[0].0.outcome, RoundOutcome::Merged);
    assert_eq!(net.verdict(0, 4), Some(None));
}

#[test]
fn the_norm_bound_runs_before_the_filter() {
    // The oversized update is refused by the norm bound; the filter compares the four others
    // and, with f = 1, refuses one of them (they are about equally spread), so three are merged.
    let mut net = Net::new(
        krum_spec(1, 2, 1),
        &four_honest_and(Behaviour::Oversized(50.0)),
    );
    net.run(u64::MAX);
    assert_eq!(net.distance_requests[0].1.len(), 4);
    assert_eq!(net.verdict(0, 4), Some(Some(RejectReason::NormBound)));
    let outliers: Vec<usize> = (0..4)
        .filter(|i| net.verdict(0, *i) == Some(Some(RejectReason::Outlier)))
        .collect();
    assert_eq!(outliers.len(), 1, "{outliers:?}");
    assert_eq!(net.closes[0].0.outcome, RoundOutcome::Merged);
}

#[test]
fn too_few_updates_for_f_filter_with_what_they_allow() {
    // Three updates cannot be scored with f = 1 (Multi-Krum needs f + 3): the filter is
    // skipped and all three are merged.
    let mut net = Net::new(
        krum_spec(1, 2, 1),
        &[Behaviour::Honest, Behaviour::Honest, Behaviour::Opposite],
    );
    net.run(u64::MAX);
    assert!(net.distance_requests.is_empty());
    assert_eq!(net.closes[0].0.outcome, RoundOutcome::Merged);
    assert!(
        net.closes[0]
            .0
            .verdicts
            .iter()
            .all(|v| v.rejected.is_none())
    );

    // With f = 2, four updates are filtered with f lowered to 1.
    let mut net = Net::new(
        krum_spec(1, 2, 2),
        &[
            Behaviour::Honest,
            Behaviour::Honest,
            Behaviour::Vanishes,
            Behaviour::Honest,
            Behaviour::Opposite,
        ],
    );
    net.run(u64::MAX);
    assert_eq!(net.distance_requests[0].1.len(), 4);
    assert_eq!(net.verdict(0, 4), Some(Some(RejectReason::Outlier)));
    let refused = net.closes[0]
        .0
        .verdicts
        .iter()
        .filter(|v| v.rejected.is_some())
        .count();
    assert_eq!(refused, 1);
}

#[test]
fn the_quorum_counts_the_updates_the_filter_keeps() {
    // Quorum 4 and f = 1 with exactly four updates: the filter would leave three, so the round
    // closes unmerged without asking for distances, and every update is `NotMerged`.
    let mut net = Net::new(krum_spec(1, 4, 1), &vec![Behaviour::Honest; 4]);
    net.run(u64::MAX);
    assert!(net.distance_requests.is_empty());
    let (close, data, compute) = &net.closes[0];
    assert_eq!(close.outcome, RoundOutcome::NoQuorum);
    assert!(
        close
            .verdicts
            .iter()
            .all(|v| v.rejected == Some(RejectReason::NotMerged))
    );
    assert!(data.is_empty());
    assert!(compute.iter().all(|c| c.verified));
    // A fifth update makes the quorum after the filter.
    let mut net = Net::new(krum_spec(1, 4, 1), &four_honest_and(Behaviour::Opposite));
    net.run(u64::MAX);
    assert_eq!(net.closes[0].0.outcome, RoundOutcome::Merged);
    assert_eq!(net.verdict(0, 4), Some(Some(RejectReason::Outlier)));
}

#[test]
fn lost_distances_close_the_round_unmerged_at_the_filter_deadline() {
    let mut net = Net::new(krum_spec(2, 2, 1), &four_honest_and(Behaviour::Opposite));
    net.drop_distances = true;
    net.run(u64::MAX);
    // Round 0 waited one validation period for the distances, then closed without merging the
    // unfiltered updates; round 1 asked again (and lost again), and the job ended.
    assert_eq!(net.distance_requests.len(), 2);
    for (r, (close, data, _)) in net.closes.iter().enumerate() {
        assert_eq!(close.outcome, RoundOutcome::NoQuorum);
        assert!(data.is_empty());
        assert!(
            close
                .verdicts
                .iter()
                .all(|v| v.rejected == Some(RejectReason::NotMerged))
        );
        let asked = net.distance_requests[r].0;
        assert!(close.closed_at.0 >= asked.0 + 5_000, "round {r}");
    }
    assert_eq!(net.finished, Some(RoundOutcome::NoQuorum));
}

#[test]
fn answers_that_do_not_fit_the_request_are_ignored() {
    let mut net = Net::new(krum_spec(1, 2, 1), &four_honest_and(Behaviour::Opposite));
    net.drop_distances = true;
    while net.distance_requests.is_empty() {
        let (t, _) = *net.queue.first_key_value().expect("events").0;
        net.run(t.0);
    }
    assert_eq!(net.coord.phase(), Phase::Filtering);
    let (_, updates) = net.distance_requests[0].clone();
    let commits: Vec<ContentHash> = updates.iter().map(|u| u.commit).collect();
    let m = commits.len();
    let good = vec![1.0; m * m];
    let mut asymmetric = good.clone();
    asymmetric[1] = 2.0;
    let mut negative = good.clone();
    negative[1] = -1.0;
    negative[m] = -1.0;
    let mut nan = good.clone();
    nan[1] = f64::NAN;
    nan[m] = f64::NAN;
    let mut reordered = commits.clone();
    reordered.swap(0, 1);
    for (round, commits, dist) in [
        (1, commits.clone(), good.clone()),
        (0, commits[1..].to_vec(), good.clone()),
        (0, reordered, good.clone()),
        (0, commits.clone(), good[1..].to_vec()),
        (0, commits.clone(), asymmetric),
        (0, commits.clone(), negative),
        (0, commits.clone(), nan),
    ] {
        let a = net.coord.handle(
            net.now,
            CoordinatorEvent::Distances {
                round,
                commits,
                dist,
            },
            &net.owner,
        );
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(net.coord.phase(), Phase::Filtering);
    }
    // The right answer goes through.
    let a = net.coord.handle(
        net.now,
        CoordinatorEvent::Distances {
            round: 0,
            commits,
            dist: good,
        },
        &net.owner,
    );
    assert!(matches!(&a[..], [CoordinatorAction::Merge { updates, .. }] if updates.len() == m - 1));
    assert_eq!(net.coord.phase(), Phase::Merging);
}

#[test]
fn a_coordinator_restarted_while_filtering_finishes_identically() {
    let spec = krum_spec(2, 2, 1);
    let behaviours = four_honest_and(Behaviour::Opposite);
    let mut reference = Net::new(spec.clone(), &behaviours);
    reference.run(u64::MAX);
    assert_eq!(reference.distance_requests.len(), 2);
    // Stop right after each round's distance request (the answer is in flight and is lost),
    // and around it.
    let asked: Vec<u64> = reference
        .distance_requests
        .iter()
        .map(|(t, _)| t.0)
        .collect();
    let mut stops = vec![1_500, asked[0] - 1, asked[0], asked[0] + 5, asked[1]];
    stops.sort_unstable();
    let reference = restarts_finish_identically(&spec, &behaviours, &stops);
    for (close, _, _) in &reference.closes {
        assert_eq!(close.outcome, RoundOutcome::Merged);
        let outlier = reference.peer(4);
        for v in &close.verdicts {
            let want = (v.worker == outlier).then_some(RejectReason::Outlier);
            assert_eq!(v.rejected, want);
        }
    }
    // Stopped while filtering, the saved state restores into the same phase and re-issues the
    // request.
    let mut net = Net::new(spec, &behaviours);
    net.run(asked[0]);
    assert_eq!(net.coord.phase(), Phase::Filtering);
    let (coord, actions) =
        Coordinator::restore(&net.coord.save(), &net.owner, net.now).expect("restore");
    assert_eq!(coord.phase(), Phase::Filtering);
    assert!(actions.iter().any(|a| matches!(
        a,
        CoordinatorAction::Distances { updates, .. } if *updates == reference.distance_requests[0].1
    )));
}

#[test]
fn robust_settings_are_validated() {
    let with = |min: u32, max: u32, f: u32| {
        let mut s = spec(1, min);
        s.quorum.max_workers = max;
        s.verification.robust = RobustAggregation::MultiKrum { f };
        s.validate()
    };
    assert!(with(2, 5, 1).is_ok());
    assert!(with(2, 7, 2).is_ok());
    // f = 0 is spelled `None`.
    assert!(with(2, 8, 0).is_err());
    // Krum needs n > 2f + 2 in a full round.
    assert!(with(2, 6, 2).is_err());
    // A full round keeps its quorum after refusing f.
    assert!(with(5, 5, 1).is_err());
    assert!(with(4, 5, 1).is_ok());
    assert!(with(2, 8, u32::MAX).is_err());
}
