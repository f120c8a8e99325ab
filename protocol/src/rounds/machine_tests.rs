//! The round state machines driven together in virtual time.
//!
//! `Net` is a tiny deterministic driver: an event queue ordered by (time, sequence), one
//! coordinator and a few workers, and scripted stand-ins for training, verification and
//! merging whose results are fixed per worker behaviour.

use std::collections::BTreeMap;

use super::coordinator::*;
use super::worker::*;
use super::*;
use crate::identity::Keypair;
use crate::signed::Signed;
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
    refused: Vec<(PeerId, Refusal)>,
    verdicts: Vec<(usize, u32, Option<RejectReason>)>,
    finished: Option<RoundOutcome>,
    workers_finished: usize,
    loss: f32,
    assignment_log: Vec<WorkAssignment>,
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
            refused: Vec::new(),
            verdicts: Vec::new(),
            finished: None,
            workers_finished: 0,
            loss: 3.0,
            assignment_log: Vec::new(),
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

    fn coord_actions(&mut self, actions: Vec<CoordinatorAction>) {
        for a in actions {
            match a {
                CoordinatorAction::Publish(p) => {
                    if let Published::Assignment(m) = &p {
                        self.assignment_log = m.verify().expect("own assignment").work;
                    }
                    for i in 0..self.workers.len() {
                        let e = match &p {
                            Published::Open(m) => WorkerEvent::Open(m.clone()),
                            Published::Assignment(m) => WorkerEvent::Assigned(m.clone()),
                            Published::Close(m) => WorkerEvent::Closed(m.clone()),
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
                    let result = match self.behaviour_of(commit.signer()) {
                        Behaviour::Bad(r) => Verification::Failed(r),
                        Behaviour::Oversized(x) => Verification::Passed { delta_norm: x },
                        _ => Verification::Passed { delta_norm: 1.0 },
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

#[test]
fn a_restarted_coordinator_finishes_the_job_identically() {
    // Reference: an uninterrupted run.
    let mut reference = Net::new(spec(2, 2), &vec![Behaviour::Honest; 3]);
    reference.run(u64::MAX);
    // Stop points in every phase of round 0 and in round 1.
    for stop in [500, 1_500, 3_100, 3_150, 3_200, 14_000] {
        let mut net = Net::new(spec(2, 2), &vec![Behaviour::Honest; 3]);
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
        assert_eq!(net.finished, Some(RoundOutcome::Merged), "stop at {stop}");
        assert_eq!(net.closes.len(), 2, "stop at {stop}");
        for (a, b) in net.closes.iter().zip(&reference.closes) {
            assert_eq!(a.0.outcome, b.0.outcome);
            assert_eq!(a.0.verdicts.len(), b.0.verdicts.len(), "stop at {stop}");
            assert!(
                a.0.verdicts.iter().all(|v| v.rejected.is_none()),
                "stop at {stop}: {:?}",
                a.0.verdicts
            );
            assert_eq!(data_total(&a.1), data_total(&b.1));
        }
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
