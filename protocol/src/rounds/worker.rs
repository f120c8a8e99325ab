//! A volunteer's side of the rounds of one job.
//!
//! The [`Worker`] follows the job owner's signed messages: it joins each round it hears of,
//! trains when the assignment names it, commits its update before the deadline and learns the
//! verdict from the close. Whether to take part in a job at all is the volunteer's policy, decided
//! by the driver before it creates a worker. Every message must be signed by the job's owner;
//! anything else is refused and reported.

use bincode::{Decode, Encode};

use super::coordinator::Refusal;
use crate::hash::ContentHash;
use crate::identity::{Keypair, PeerId};
use crate::signed::{Signed, Verified};
use crate::types::{
    Assignment, Capacity, JobId, JobSpec, KernelClass, RejectReason, RoundClose, RoundJoin,
    RoundOpen, RoundOutcome, SegmentCommit, Timestamp, UpdateCommit, WorkAssignment,
};
use std::sync::Arc;

/// What the driver's training produced, fed back with [`WorkerEvent::Trained`].
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct TrainedUpdate {
    /// The round it was trained for.
    pub round: u32,
    /// The update's blob hash (the adapter after training, stored as a blob).
    pub update: ContentHash,
    /// Tokens processed.
    pub tokens: u64,
    /// Optimizer steps taken.
    pub steps: u32,
    /// Training loss per step.
    pub losses: Vec<f32>,
    /// Backend, CPU kernel class and thread count it ran with.
    pub kernel: KernelClass,
    /// One commitment every K steps.
    pub segments: Vec<SegmentCommit>,
}

/// Something that happened, fed to [`Worker::handle`].
#[derive(Clone, Debug)]
pub enum WorkerEvent {
    /// Time passed.
    Tick,
    /// A round opened.
    Open(Signed<RoundOpen>),
    /// A round's assignment.
    Assigned(Signed<Assignment>),
    /// A round's assignment, already verified and shared with other workers of this process.
    AssignedVerified(Arc<Verified<Assignment>>),
    /// Training finished (the answer to [`WorkerAction::Train`]).
    Trained(TrainedUpdate),
    /// Training failed; the worker sits this round out.
    TrainingFailed {
        /// The round.
        round: u32,
    },
    /// A round closed.
    Closed(Signed<RoundClose>),
    /// A round closed; the close already verified and shared with other workers of this process.
    ClosedVerified(Arc<Verified<RoundClose>>),
}

/// What the worker asks the driver to do.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkerAction {
    /// Send this join to the coordinator.
    SendJoin(Signed<RoundJoin>),
    /// Fetch the base model, the start adapter and the shards, and train; answer with
    /// [`WorkerEvent::Trained`] before `deadline`.
    Train {
        /// The round.
        round: u32,
        /// The adapter to start from (`None`: a fresh adapter from the job's seed).
        start: Option<ContentHash>,
        /// This worker's work: shards and training seed.
        work: WorkAssignment,
        /// The commit deadline.
        deadline: Timestamp,
    },
    /// Stop any training for this round: it is over for this worker.
    StopTraining {
        /// The round.
        round: u32,
    },
    /// Send this commit to the coordinator (again until it answers).
    SendCommit(Signed<UpdateCommit>),
    /// A message was refused.
    Refused {
        /// Its signer.
        from: PeerId,
        /// Why.
        why: Refusal,
    },
    /// The coordinator's verdict on this worker's update in a closed round.
    Verdict {
        /// The round.
        round: u32,
        /// `None`: merged; otherwise why not.
        rejected: Option<RejectReason>,
    },
    /// The job is over.
    Finished,
}

/// Where this worker stands in the current round.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub enum WorkerPhase {
    /// Joined; waiting for the assignment.
    Joined,
    /// Assigned; training.
    Training {
        /// The work.
        work: WorkAssignment,
        /// The commit deadline.
        deadline: Timestamp,
    },
    /// Not chosen this round.
    Idle,
    /// Committed.
    Committed {
        /// The commit's hash.
        commit: ContentHash,
    },
    /// Training finished too late, or failed.
    Missed,
    /// The round closed.
    Closed,
    /// The job is over.
    Finished,
}

/// A volunteer's state machine for one job.
#[derive(Clone, Debug, PartialEq, Encode, Decode)]
pub struct Worker {
    job: JobId,
    owner: PeerId,
    spec: JobSpec,
    capacity: Capacity,
    round: Option<u32>,
    start: Option<ContentHash>,
    phase: WorkerPhase,
}

impl Worker {
    /// A worker for the job `spec` (verified and validated by the caller), offering `capacity`.
    pub fn new(spec: &Signed<JobSpec>, payload: JobSpec, capacity: Capacity) -> Self {
        Self {
            job: JobId::of(spec),
            owner: spec.signer(),
            spec: payload,
            capacity,
            round: None,
            start: None,
            phase: WorkerPhase::Idle,
        }
    }

    /// The job.
    pub fn job(&self) -> JobId {
        self.job
    }

    /// The current round, once one was heard of.
    pub fn round(&self) -> Option<u32> {
        self.round
    }

    /// Where the worker stands.
    pub fn phase(&self) -> &WorkerPhase {
        &self.phase
    }

    /// Feeds one event at time `now`; returns what the driver must do, in order.
    pub fn handle(
        &mut self,
        now: Timestamp,
        event: WorkerEvent,
        keypair: &Keypair,
    ) -> Vec<WorkerAction> {
        let mut out = Vec::new();
        if self.phase == WorkerPhase::Finished {
            return out;
        }
        match event {
            WorkerEvent::Tick => {
                if let WorkerPhase::Training { deadline, .. } = self.phase
                    && now > deadline
                {
                    self.phase = WorkerPhase::Missed;
                    out.extend(self.stop());
                }
            }
            WorkerEvent::Open(m) => self.on_open(m, keypair, &mut out),
            WorkerEvent::Assigned(m) => {
                if let Some(a) = self.check(&m, &mut out) {
                    self.on_assigned(m.signer(), &a, keypair, &mut out);
                }
            }
            WorkerEvent::AssignedVerified(v) => {
                if self.signed_by_owner(v.signed(), &mut out) {
                    self.on_assigned(v.signed().signer(), v.payload(), keypair, &mut out);
                }
            }
            WorkerEvent::Trained(t) => self.on_trained(now, t, keypair, &mut out),
            WorkerEvent::TrainingFailed { round } => {
                if Some(round) == self.round && matches!(self.phase, WorkerPhase::Training { .. }) {
                    self.phase = WorkerPhase::Missed;
                }
            }
            WorkerEvent::Closed(m) => {
                if let Some(c) = self.check(&m, &mut out) {
                    self.on_closed(&c, keypair, &mut out);
                }
            }
            WorkerEvent::ClosedVerified(v) => {
                if self.signed_by_owner(v.signed(), &mut out) {
                    self.on_closed(v.payload(), keypair, &mut out);
                }
            }
        }
        out
    }

    fn stop(&self) -> Option<WorkerAction> {
        self.round.map(|round| WorkerAction::StopTraining { round })
    }

    /// Whether `m` is signed by the job's owner (the signature itself is checked elsewhere);
    /// a refusal goes to `out`.
    fn signed_by_owner<T>(&self, m: &Signed<T>, out: &mut Vec<WorkerAction>) -> bool {
        if m.signer() != self.owner {
            out.push(WorkerAction::Refused {
                from: m.signer(),
                why: Refusal::Forged,
            });
            return false;
        }
        true
    }

    /// Verifies that `m` is the owner's and decodes it; refusals go to `out`.
    fn check<T: crate::signed::SignedPayload>(
        &self,
        m: &Signed<T>,
        out: &mut Vec<WorkerAction>,
    ) -> Option<T> {
        if !self.signed_by_owner(m, out) {
            return None;
        }
        match m.verify() {
            Ok(p) => Some(p),
            Err(_) => {
                out.push(WorkerAction::Refused {
                    from: m.signer(),
                    why: Refusal::Forged,
                });
                None
            }
        }
    }

    fn on_open(&mut self, m: Signed<RoundOpen>, keypair: &Keypair, out: &mut Vec<WorkerAction>) {
        let Some(open) = self.check(&m, out) else {
            return;
        };
        if open.job != self.job {
            return out.push(WorkerAction::Refused {
                from: m.signer(),
                why: Refusal::WrongJob,
            });
        }
        if open.round >= self.spec.rounds {
            return out.push(WorkerAction::Refused {
                from: m.signer(),
                why: Refusal::Invalid(format!(
                    "round {} of a {}-round job",
                    open.round, self.spec.rounds
                )),
            });
        }
        if self.round.is_some_and(|r| open.round <= r) {
            // Heard again (gossip repeats, a restarted coordinator re-publishes): join again
            // while still waiting, since the coordinator may have lost the join.
            if self.round == Some(open.round) && self.phase == WorkerPhase::Joined {
                out.push(self.join(open.round, keypair));
            }
            return;
        }
        if matches!(self.phase, WorkerPhase::Training { .. }) {
            out.extend(self.stop());
        }
        self.round = Some(open.round);
        self.start = open.start_adapter;
        self.phase = WorkerPhase::Joined;
        out.push(self.join(open.round, keypair));
    }

    fn join(&self, round: u32, keypair: &Keypair) -> WorkerAction {
        WorkerAction::SendJoin(Signed::sign(
            keypair,
            &RoundJoin {
                job: self.job,
                round,
                capacity: self.capacity.clone(),
            },
        ))
    }

    fn on_assigned(
        &mut self,
        from: PeerId,
        a: &Assignment,
        keypair: &Keypair,
        out: &mut Vec<WorkerAction>,
    ) {
        if a.job != self.job || Some(a.round) != self.round || self.phase != WorkerPhase::Joined {
            return;
        }
        if let Err(e) = a.validate() {
            return out.push(WorkerAction::Refused {
                from,
                why: Refusal::Invalid(e.to_string()),
            });
        }
        let me = keypair.peer_id();
        // The work is sorted by worker (validated above).
        let mine = a
            .work
            .binary_search_by(|w| w.worker.cmp(&me))
            .ok()
            .map(|i| a.work[i].clone());
        match mine {
            Some(work) => {
                self.phase = WorkerPhase::Training {
                    work: work.clone(),
                    deadline: a.commit_until,
                };
                out.push(WorkerAction::Train {
                    round: a.round,
                    start: self.start,
                    work,
                    deadline: a.commit_until,
                });
            }
            None => self.phase = WorkerPhase::Idle,
        }
    }

    fn on_trained(
        &mut self,
        now: Timestamp,
        t: TrainedUpdate,
        keypair: &Keypair,
        out: &mut Vec<WorkerAction>,
    ) {
        let WorkerPhase::Training { work, deadline } = &self.phase else {
            return;
        };
        if Some(t.round) != self.round {
            return;
        }
        if now > *deadline {
            // The coordinator would refuse it; sending it only costs both sides.
            self.phase = WorkerPhase::Missed;
            return;
        }
        let commit = Signed::sign(
            keypair,
            &UpdateCommit {
                job: self.job,
                round: t.round,
                update: t.update,
                shards: work.shards.clone(),
                tokens: t.tokens,
                steps: t.steps,
                losses: t.losses,
                seed: work.seed,
                kernel: t.kernel,
                segments: t.segments,
            },
        );
        self.phase = WorkerPhase::Committed {
            commit: commit.hash(),
        };
        out.push(WorkerAction::SendCommit(commit));
    }

    fn on_closed(&mut self, close: &RoundClose, keypair: &Keypair, out: &mut Vec<WorkerAction>) {
        if close.job != self.job {
            return;
        }
        if Some(close.round) == self.round {
            if matches!(self.phase, WorkerPhase::Training { .. }) {
                out.extend(self.stop());
            }
            let me = keypair.peer_id();
            // The verdicts are sorted by worker (a close's rule).
            let verdict = close
                .verdicts
                .binary_search_by(|v| v.worker.cmp(&me))
                .ok()
                .map(|i| &close.verdicts[i]);
            if let Some(v) = verdict {
                out.push(WorkerAction::Verdict {
                    round: close.round,
                    rejected: v.rejected.clone(),
                });
            }
            self.phase = WorkerPhase::Closed;
        }
        let over = close.round + 1 >= self.spec.rounds
            || matches!(
                close.outcome,
                RoundOutcome::Cancelled | RoundOutcome::Stopped
            );
        if over && self.round.is_none_or(|r| close.round >= r) {
            self.phase = WorkerPhase::Finished;
            out.push(WorkerAction::Finished);
        }
    }
}
