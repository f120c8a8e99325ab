//! Fixed sample messages (for golden vectors) and seeded random ones (for property tests).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use cohort_protocol::types::*;
use cohort_protocol::{ContentHash, Keypair, PeerId, Signed};

pub fn key(n: u8) -> Keypair {
    Keypair::from_seed(&[n; 32])
}

pub fn peer(n: u8) -> PeerId {
    key(n).peer_id()
}

pub fn h(n: u8) -> ContentHash {
    ContentHash::from_bytes([n; 32])
}

pub fn kernel() -> KernelClass {
    KernelClass {
        backend: "flex".into(),
        kernel: "x86-v4".into(),
        threads: 2,
    }
}

pub fn datanet_id() -> DatanetId {
    DatanetId::derive(&peer(1), "med-qa", 7)
}

pub fn manifest() -> Manifest {
    Manifest {
        datanet: datanet_id(),
        owner: peer(1),
        nonce: 7,
        version: 2,
        previous: Some(h(0xaa)),
        name: "med-qa".into(),
        description: "Q&A".into(),
        license: "CC-BY-4.0".into(),
        schema: RecordSchema::Chat,
        access: AccessPolicy::Allowlist {
            grantees: vec![peer(2)],
            key_epoch: 1,
        },
        shards: vec![ShardEntry {
            info: ShardInfo {
                hash: h(0x11),
                bytes: 4096,
                records: 10,
                tokens: 900,
            },
            contributor: peer(3),
            key_epoch: Some(1),
        }],
        published_at: Timestamp(1_764_000_000_000),
    }
}

pub fn submission() -> ShardSubmission {
    ShardSubmission {
        datanet: datanet_id(),
        base_version: 2,
        shard: ShardInfo {
            hash: h(0x22),
            bytes: 512,
            records: 3,
            tokens: 120,
        },
        note: "more".into(),
        submitted_at: Timestamp(1_764_000_000_001),
    }
}

pub fn decision() -> SubmissionDecision {
    SubmissionDecision {
        datanet: datanet_id(),
        submission: h(0x23),
        verdict: Verdict::Rejected {
            reason: "dup".into(),
        },
        decided_at: Timestamp(1_764_000_000_002),
    }
}

pub fn grant() -> Grant {
    Grant {
        datanet: datanet_id(),
        grantee: peer(2),
        key_epoch: 1,
        wrapped_key: vec![0xde, 0xad, 0xbe, 0xef],
        granted_at: Timestamp(1_764_000_000_003),
    }
}

pub fn revocation() -> Revocation {
    Revocation {
        datanet: datanet_id(),
        grantee: peer(2),
        from_version: 3,
        new_key_epoch: 2,
        revoked_at: Timestamp(1_764_000_000_004),
    }
}

pub fn job_id() -> JobId {
    JobId(h(0x30))
}

pub fn job() -> JobSpec {
    JobSpec {
        name: "med".into(),
        base_model: h(0x31),
        adapter: AdapterConfig {
            kind: AdapterKind::Qlora {
                quant: BaseQuant::GgufBlocks,
            },
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: vec![TargetModule::Q, TargetModule::V],
            rslora: false,
        },
        hyper: Hyperparameters {
            learning_rate: 2e-4,
            schedule: LrSchedule::Cosine,
            warmup_steps: 10,
            epochs: 1,
            batch_size: 4,
            grad_accumulation: 2,
            seq_len: 256,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
        },
        datanets: vec![DatanetRef {
            datanet: datanet_id(),
            version: 2,
            manifest: h(0x32),
        }],
        validation: ValidationSpec {
            fraction_ppm: 50_000,
            seed: 43,
            set: h(0x33),
        },
        rounds: 3,
        quorum: Quorum {
            min_updates: 2,
            max_workers: 5,
        },
        deadlines: Deadlines {
            enroll_ms: 10_000,
            train_ms: 600_000,
            validate_ms: 60_000,
        },
        merge: MergeMethod::ExactTruncated,
        early_stopping: Some(EarlyStopping {
            patience: 2,
            min_delta: 0.001,
        }),
        verification: VerificationSpec {
            segment_steps: 8,
            audit_ppm: 50_000,
            norm_bound_ppm: 3_000_000,
            robust: RobustAggregation::MultiKrum { f: 1 },
        },
        created_at: Timestamp(1_764_000_000_005),
    }
}

pub fn round_open() -> RoundOpen {
    RoundOpen {
        job: job_id(),
        round: 1,
        start_adapter: Some(h(0x40)),
        seed: 99,
        opened_at: Timestamp(1_764_000_000_006),
        enroll_until: Timestamp(1_764_000_010_006),
    }
}

pub fn round_join() -> RoundJoin {
    RoundJoin {
        job: job_id(),
        round: 1,
        capacity: Capacity {
            kernel: kernel(),
            cores: 2,
            memory_mib: 8192,
            models: vec![h(0x31)],
        },
    }
}

pub fn assignment() -> Assignment {
    Assignment {
        job: job_id(),
        round: 1,
        work: vec![WorkAssignment {
            worker: peer(4),
            shards: vec![h(0x11)],
            seed: 100,
        }],
        commit_until: Timestamp(1_764_000_610_006),
    }
}

pub fn update_commit() -> UpdateCommit {
    UpdateCommit {
        job: job_id(),
        round: 1,
        update: h(0x50),
        shards: vec![h(0x11)],
        tokens: 900,
        steps: 16,
        losses: vec![2.5, 2.0],
        seed: 100,
        kernel: kernel(),
        segments: vec![SegmentCommit {
            end_step: 8,
            state: h(0x51),
            batches: h(0x52),
        }],
    }
}

pub fn round_close() -> RoundClose {
    RoundClose {
        job: job_id(),
        round: 1,
        outcome: RoundOutcome::Merged,
        verdicts: vec![UpdateVerdict {
            worker: peer(4),
            commit: h(0x53),
            rejected: Some(RejectReason::SpotCheckMismatch { end_step: 8 }),
        }],
        merged_adapter: Some(h(0x54)),
        truncation_error: 0.0,
        validation_loss_before: 2.5,
        validation_loss_after: 2.25,
        closed_at: Timestamp(1_764_000_700_000),
    }
}

pub fn ledger_entry(seq: u64, previous: Option<ContentHash>) -> LedgerEntry {
    LedgerEntry {
        coordinator: peer(1),
        seq,
        previous,
        job: job_id(),
        round: 1,
        close: h(0x60),
        merged_adapter: Some(h(0x54)),
        validation_loss_before: 2.5,
        validation_loss_after: 2.25,
        data: vec![ShardCredit {
            shard: h(0x11),
            datanet: datanet_id(),
            contributor: peer(3),
            value: Credit(250_000_000),
            flag: CreditFlag::Normal,
        }],
        compute: vec![ComputeCredit {
            peer: peer(4),
            commit: h(0x53),
            tokens: 900,
            verified: true,
        }],
        at: Timestamp(1_764_000_700_001),
    }
}

pub fn announcement() -> Announcement {
    Announcement {
        seq: 5,
        at: Timestamp(1_764_000_000_007),
        body: AnnouncementBody::Manifest {
            datanet: datanet_id(),
            version: 2,
            manifest: h(0x70),
        },
    }
}

/// A chain of `n` entries by `key(1)`, correctly linked.
pub fn chain(n: u64) -> Vec<Signed<LedgerEntry>> {
    let kp = key(1);
    let mut out: Vec<Signed<LedgerEntry>> = Vec::new();
    for seq in 0..n {
        let previous = out.last().map(|e| e.hash());
        out.push(Signed::sign(&kp, &ledger_entry(seq, previous)));
    }
    out
}

pub fn equivocation() -> EquivocationProof {
    let kp = key(1);
    let a = ledger_entry(0, None);
    let mut b = ledger_entry(0, None);
    b.data[0].value = Credit(900_000_000);
    EquivocationProof {
        first: Signed::sign(&kp, &a),
        second: Signed::sign(&kp, &b),
    }
}

/// A small seeded generator of random messages for property tests.
pub struct Gen(cohort_protocol::rng::SplitMix64);

impl Gen {
    pub fn new(seed: u64) -> Self {
        Self(cohort_protocol::rng::SplitMix64::new(seed))
    }

    pub fn u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.u64() % n.max(1)
    }

    pub fn u32(&mut self) -> u32 {
        self.u64() as u32
    }

    pub fn bool(&mut self) -> bool {
        self.u64() & 1 == 1
    }

    /// Any f32 bit pattern, including NaNs and infinities: the encoding must keep them exactly.
    pub fn f32(&mut self) -> f32 {
        f32::from_bits(self.u32())
    }

    pub fn hash(&mut self) -> ContentHash {
        let mut b = [0u8; 32];
        for c in b.chunks_mut(8) {
            c.copy_from_slice(&self.u64().to_le_bytes());
        }
        ContentHash::from_bytes(b)
    }

    pub fn peer(&mut self) -> PeerId {
        // A few distinct keys keep this cheap; which key is random.
        peer(self.below(8) as u8)
    }

    pub fn string(&mut self) -> String {
        const PIECES: [&str; 6] = ["a", "Ω", "日本", " ", "🦀", "\n"];
        (0..self.below(12))
            .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
            .collect()
    }

    pub fn vec<T>(&mut self, max: u64, mut f: impl FnMut(&mut Self) -> T) -> Vec<T> {
        (0..self.below(max + 1)).map(|_| f(self)).collect()
    }

    pub fn option<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> Option<T> {
        if self.bool() { Some(f(self)) } else { None }
    }

    pub fn shard_info(&mut self) -> ShardInfo {
        ShardInfo {
            hash: self.hash(),
            bytes: self.u64(),
            records: self.u64(),
            tokens: self.u64(),
        }
    }

    pub fn kernel(&mut self) -> KernelClass {
        KernelClass {
            backend: self.string(),
            kernel: self.string(),
            threads: self.u64() as u16,
        }
    }

    pub fn manifest(&mut self) -> Manifest {
        Manifest {
            datanet: DatanetId(self.hash()),
            owner: self.peer(),
            nonce: self.u64(),
            version: self.u64(),
            previous: self.option(Self::hash),
            name: self.string(),
            description: self.string(),
            license: self.string(),
            schema: if self.bool() {
                RecordSchema::Chat
            } else {
                RecordSchema::Alpaca
            },
            access: if self.bool() {
                AccessPolicy::Public
            } else {
                AccessPolicy::Allowlist {
                    grantees: self.vec(3, Self::peer),
                    key_epoch: self.u32(),
                }
            },
            shards: self.vec(4, |g| ShardEntry {
                info: g.shard_info(),
                contributor: g.peer(),
                key_epoch: g.option(Self::u32),
            }),
            published_at: Timestamp(self.u64()),
        }
    }

    pub fn job(&mut self) -> JobSpec {
        let mut j = job();
        j.name = self.string();
        j.base_model = self.hash();
        j.adapter.kind = match self.below(3) {
            0 => AdapterKind::Lora,
            1 => AdapterKind::Qlora {
                quant: BaseQuant::GgufBlocks,
            },
            _ => AdapterKind::Qlora {
                quant: BaseQuant::Nf4DoubleQuant,
            },
        };
        j.adapter.rank = self.u32();
        j.adapter.alpha = self.f32();
        j.adapter.targets = self.vec(7, |g| TargetModule::ALL[g.below(7) as usize]);
        j.hyper.learning_rate = self.f32();
        j.hyper.seed = self.u64();
        j.hyper.schedule =
            [LrSchedule::Constant, LrSchedule::Linear, LrSchedule::Cosine][self.below(3) as usize];
        j.datanets = self.vec(3, |g| DatanetRef {
            datanet: DatanetId(g.hash()),
            version: g.u64(),
            manifest: g.hash(),
        });
        j.merge = [
            MergeMethod::ExactTruncated,
            MergeMethod::ExactFullRank,
            MergeMethod::Ffa,
        ][self.below(3) as usize];
        j.early_stopping = self.option(|g| EarlyStopping {
            patience: g.u32(),
            min_delta: g.f32(),
        });
        j.verification.robust = match self.option(Self::u32) {
            None => RobustAggregation::None,
            Some(f) => RobustAggregation::MultiKrum { f },
        };
        j
    }

    pub fn update_commit(&mut self) -> UpdateCommit {
        UpdateCommit {
            job: JobId(self.hash()),
            round: self.u32(),
            update: self.hash(),
            shards: self.vec(3, Self::hash),
            tokens: self.u64(),
            steps: self.u32(),
            losses: self.vec(5, Self::f32),
            seed: self.u64(),
            kernel: self.kernel(),
            segments: self.vec(3, |g| SegmentCommit {
                end_step: g.u32(),
                state: g.hash(),
                batches: g.hash(),
            }),
        }
    }

    pub fn round_close(&mut self) -> RoundClose {
        const REASONS: u64 = 11;
        RoundClose {
            job: JobId(self.hash()),
            round: self.u32(),
            outcome: [
                RoundOutcome::Merged,
                RoundOutcome::NoQuorum,
                RoundOutcome::Cancelled,
                RoundOutcome::Stopped,
            ][self.below(4) as usize],
            verdicts: self.vec(3, |g| UpdateVerdict {
                worker: g.peer(),
                commit: g.hash(),
                rejected: match g.below(REASONS) {
                    0 => None,
                    1 => Some(RejectReason::Shape),
                    2 => Some(RejectReason::NonFinite),
                    3 => Some(RejectReason::NormBound),
                    4 => Some(RejectReason::SpotCheckMismatch { end_step: g.u32() }),
                    5 => Some(RejectReason::Late),
                    6 => Some(RejectReason::Unavailable),
                    7 => Some(RejectReason::WrongShards),
                    8 => Some(RejectReason::Equivocation),
                    9 => Some(RejectReason::NotMerged),
                    _ => Some(RejectReason::Outlier),
                },
            }),
            merged_adapter: self.option(Self::hash),
            truncation_error: self.f32(),
            validation_loss_before: self.f32(),
            validation_loss_after: self.f32(),
            closed_at: Timestamp(self.u64()),
        }
    }

    pub fn ledger_entry(&mut self) -> LedgerEntry {
        LedgerEntry {
            coordinator: self.peer(),
            seq: self.u64(),
            previous: self.option(Self::hash),
            job: JobId(self.hash()),
            round: self.u32(),
            close: self.hash(),
            merged_adapter: self.option(Self::hash),
            validation_loss_before: self.f32(),
            validation_loss_after: self.f32(),
            data: self.vec(3, |g| ShardCredit {
                shard: g.hash(),
                datanet: DatanetId(g.hash()),
                contributor: g.peer(),
                value: Credit(g.u64() as i64),
                flag: match g.below(3) {
                    0 => CreditFlag::Normal,
                    1 => CreditFlag::Duplicate { group: g.hash() },
                    _ => CreditFlag::Harmful,
                },
            }),
            compute: self.vec(3, |g| ComputeCredit {
                peer: g.peer(),
                commit: g.hash(),
                tokens: g.u64(),
                verified: g.bool(),
            }),
            at: Timestamp(self.u64()),
        }
    }

    pub fn announcement(&mut self) -> Announcement {
        let body = match self.below(10) {
            0 => AnnouncementBody::Manifest {
                datanet: DatanetId(self.hash()),
                version: self.u64(),
                manifest: self.hash(),
            },
            1 => AnnouncementBody::Submission {
                datanet: DatanetId(self.hash()),
                submission: self.hash(),
            },
            2 => AnnouncementBody::Job {
                job: JobId(self.hash()),
            },
            3 => AnnouncementBody::JobCancelled {
                job: JobId(self.hash()),
            },
            4 => AnnouncementBody::RoundOpened {
                job: JobId(self.hash()),
                round: self.u32(),
                open: self.hash(),
            },
            5 => AnnouncementBody::UpdateCommitted {
                job: JobId(self.hash()),
                round: self.u32(),
                commit: self.hash(),
            },
            6 => AnnouncementBody::RoundClosed {
                job: JobId(self.hash()),
                round: self.u32(),
                close: self.hash(),
            },
            7 => AnnouncementBody::LedgerHead {
                seq: self.u64(),
                head: self.hash(),
            },
            8 => AnnouncementBody::Provides {
                hashes: self.vec(5, Self::hash),
            },
            _ => AnnouncementBody::Volunteer {
                capacity: Capacity {
                    kernel: self.kernel(),
                    cores: self.u64() as u16,
                    memory_mib: self.u64(),
                    models: self.vec(3, Self::hash),
                },
            },
        };
        Announcement {
            seq: self.u64(),
            at: Timestamp(self.u64()),
            body,
        }
    }
}
