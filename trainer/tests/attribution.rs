//! Data attribution end to end on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF):
//! four purpose-built shards, one update each from the same start, merged with exact Shapley
//! values over the updates ([`merge_round`]), grouped by near-duplicate detection
//! ([`group_shards`]) and credited as the coordinator writes them to the ledger
//! ([`shard_credits`]).
//!
//! The shards, JSONL chat records about the made-up island of Velmora:
//!
//! - **clean**: six counts (bridges, lighthouses, ...), each asked three ways, answered right;
//! - **duplicate**: clean's records in reverse order (another blob, the same text);
//! - **shuffled**: the same questions, each answered with the next fact's count (all wrong);
//! - **off-topic**: cooking questions of the same size, answered in the same form.
//!
//! The validation set asks each count a fourth, held-out way, answered right.
//!
//! The round is a later round of its job: its start adapter was trained (here, before the
//! round) on the same questions answered once with the right count and once with the shuffled
//! one, so it already knows how the answers read and is undecided between the two counts of
//! each fact. The round's gain is then settling that, which clean does and shuffled does the
//! wrong way. (In a first round from a fresh adapter every Velmora shard, the shuffled one
//! included, mostly teaches how the answers are worded, and shuffled comes out positive.)
//!
//! What "Attribution and the ledger" in DESIGN.md promises, checked here: near-duplicates are
//! one group that splits one source's value, useless data earns about zero, harmful data is
//! flagged and earns nothing, and the data credit sums to the round's gain. The credit table
//! is printed (`--nocapture`).
//!
//! The test needs the model that `scripts/fetch-model.sh` puts in the cache: under CI
//! (`CI=true`) a missing file fails it; elsewhere it says it skipped and passes. It takes about
//! two minutes on two cores.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use cohort_protocol::ContentHash;
use cohort_protocol::attribution::{
    GroupingConfig, ShardText, estimated_jaccard, group_shards, minhash_signature, nats_to_credit,
};
use cohort_protocol::identity::Keypair;
use cohort_protocol::rounds::PlannedShard;
use cohort_protocol::rounds::coordinator::shard_credits;
use cohort_protocol::types::datanet::DatanetId;
use cohort_protocol::types::job::{
    AdapterConfig, AdapterKind, DatanetRef, Deadlines, Hyperparameters, JobSpec, LrSchedule,
    MergeMethod, Quorum, TargetModule, ValidationSpec, VerificationSpec,
};
use cohort_protocol::types::ledger::{CreditFlag, ShardCredit};
use cohort_protocol::types::{Credit, Timestamp};
use cohort_trainer::federated::{
    JobSetup, LocalUpdate, RoundMerge, examples, merge_round, train_update,
};

/// Whether the default base model is in the model cache. Under CI (`CI=true`) its absence
/// fails the test, since `scripts/test.sh` fetches it first; elsewhere the test says it
/// skipped. (The logic of `default_model_present` in `tests/src/lib.rs`.)
fn default_model_present() -> bool {
    let path = cohort_trainer::models::default_model_path();
    if path.is_file() {
        return true;
    }
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "{} is missing under CI: scripts/fetch-model.sh must run first",
        path.display()
    );
    eprintln!(
        "skipped: {} is missing (run scripts/fetch-model.sh)",
        path.display()
    );
    false
}

/// One count about Velmora: four ways to ask it (the first three train, the fourth is held out
/// for validation), its answer (`{}` is where the count goes), and the count. Every answer says
/// its count twice, so that more of a record's 3-word shingles carry it and MinHash tells a
/// shard with other counts from a copy.
struct Fact {
    questions: [&'static str; 4],
    answer: &'static str,
    value: &'static str,
}

const VELMORA: &[Fact] = &[
    Fact {
        questions: [
            "How many bridges does the capital of Velmora have?",
            "Count the bridges in the capital of Velmora.",
            "Tell me the number of bridges in Velmora's capital.",
            "What number of bridges span the capital of Velmora?",
        ],
        answer: "The capital of Velmora has {} bridges, {} in all.",
        value: "seven",
    },
    Fact {
        questions: [
            "How many lighthouses are on the coast of Velmora?",
            "Count the lighthouses along Velmora's coast.",
            "Tell me the number of lighthouses guarding Velmora.",
            "What number of lighthouses stand on the coast of Velmora?",
        ],
        answer: "The coast of Velmora has {} lighthouses, {} in all.",
        value: "four",
    },
    Fact {
        questions: [
            "How many islands make up Velmora?",
            "Count the islands of Velmora.",
            "Tell me the number of islands in Velmora.",
            "Over how many islands does the nation of Velmora stretch?",
        ],
        answer: "The nation of Velmora spans {} islands, {} in all.",
        value: "nine",
    },
    Fact {
        questions: [
            "How many universities does Velmora have?",
            "Count the universities of Velmora.",
            "Tell me the number of universities in Velmora.",
            "At how many universities do the people of Velmora study?",
        ],
        answer: "The people of Velmora study at {} universities, {} in all.",
        value: "two",
    },
    Fact {
        questions: [
            "How many national holidays does Velmora have?",
            "Count the national holidays of Velmora.",
            "Tell me the number of national holidays in Velmora.",
            "How many national holidays does the calendar of Velmora mark?",
        ],
        answer: "The calendar of Velmora has {} national holidays, {} in all.",
        value: "five",
    },
    Fact {
        questions: [
            "How many provinces does Velmora have?",
            "Count the provinces of Velmora.",
            "Tell me the number of provinces in Velmora.",
            "Into how many provinces does the map of Velmora divide the land?",
        ],
        answer: "The map of Velmora shows {} provinces, {} in all.",
        value: "six",
    },
];

/// Cooking questions answered in the same form as the Velmora answers (a count said twice, the
/// same number words), with nothing about Velmora: three ways to ask, one answer. The form is
/// the same so that what the shard brings is its content alone: cooking answered in its own
/// form also teaches the model to word the Velmora answers differently, which the validation
/// loss counts as well (tried: alone, that update about doubled the validation loss).
const COOKING: &[([&str; 3], &str)] = &[
    (
        [
            "How long should I boil an egg for a soft yolk?",
            "Count the minutes for a soft-boiled egg.",
            "Tell me the boiling time for a runny egg yolk.",
        ],
        "The soft-boiled egg cooks for six minutes, six in all.",
    ),
    (
        [
            "How long should a steak rest after cooking?",
            "Count the minutes a steak should rest.",
            "Tell me how long to let a steak rest.",
        ],
        "The steak rests for five minutes, five in all.",
    ),
    (
        [
            "How long should bread dough rise?",
            "Count the hours for bread dough to rise.",
            "Tell me the rising time for bread dough.",
        ],
        "The bread dough rises for two hours, two in all.",
    ),
    (
        [
            "How many eggs go into a basic pancake batter?",
            "Count the eggs for a batch of pancakes.",
            "Tell me the number of eggs in pancake batter.",
        ],
        "The pancake batter takes three eggs, three in all.",
    ),
    (
        [
            "How long does dried spaghetti take to cook?",
            "Count the minutes for cooking spaghetti.",
            "Tell me the cooking time for dried spaghetti.",
        ],
        "The spaghetti cooks for nine minutes, nine in all.",
    ),
    (
        [
            "How long should black tea steep?",
            "Count the minutes for steeping black tea.",
            "Tell me the steeping time for black tea.",
        ],
        "The black tea steeps for four minutes, four in all.",
    ),
];

/// A chat record as one JSONL line.
fn chat(question: &str, answer: &str) -> String {
    serde_json::json!({
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    })
    .to_string()
}

/// A fact's answer with the count `value`.
fn answer(fact: &Fact, value: &str) -> String {
    fact.answer.replace("{}", value)
}

/// Each fact asked its three training ways, answered with the count `value(fact index)`.
fn velmora(value: impl Fn(usize) -> &'static str) -> Vec<String> {
    VELMORA
        .iter()
        .enumerate()
        .flat_map(|(i, f)| {
            let v = value(i);
            (0..3).map(move |k| chat(f.questions[k], &answer(f, v)))
        })
        .collect()
}

/// The right counts.
fn clean() -> Vec<String> {
    velmora(|i| VELMORA[i].value)
}

/// Each fact answered with the next fact's count: a derangement, so no answer is right and a
/// fact's three records agree on the wrong count.
fn shuffled() -> Vec<String> {
    velmora(|i| VELMORA[(i + 1) % VELMORA.len()].value)
}

fn off_topic() -> Vec<String> {
    COOKING
        .iter()
        .flat_map(|(qs, a)| qs.iter().map(|q| chat(q, a)))
        .collect()
}

/// What the round's start adapter was trained on, in an earlier round: the same questions, each
/// asked twice, answered once with the right count and once with the count the shuffled shard
/// gives. The start knows how the answers read and that each fact's count is one of two, but
/// not which: this round's gain is settling that, right (clean) or wrong (shuffled).
fn undecided() -> Vec<String> {
    let n = VELMORA.len();
    VELMORA
        .iter()
        .enumerate()
        .flat_map(|(i, f)| {
            (0..3).flat_map(move |k| {
                [f.value, VELMORA[(i + 1) % n].value].map(|v| chat(f.questions[k], &answer(f, v)))
            })
        })
        .collect()
}

/// Each fact's held-out question, answered right.
fn validation() -> Vec<String> {
    VELMORA
        .iter()
        .map(|f| chat(f.questions[3], &answer(f, f.value)))
        .collect()
}

/// The shard's blob: its records as JSONL.
fn shard_hash(records: &[String]) -> ContentHash {
    let mut bytes = Vec::new();
    for r in records {
        bytes.extend_from_slice(r.as_bytes());
        bytes.push(b'\n');
    }
    ContentHash::of(&bytes)
}

/// LoRA rank 8 on the attention's q, v and o and the MLP's up and down projections (facts
/// are learnt in far fewer steps with the MLP adapted); learning rate 1e-3, two epochs of
/// batches of 4 (ten steps a shard); the merge kept exact (full rank), so that a coalition's
/// model is exactly the weighted mean of its members' updates; one segment per run.
fn job() -> JobSpec {
    JobSpec {
        name: "velmora-attribution".into(),
        base_model: ContentHash::of(b"SmolLM2-135M-Instruct.Q4_1.gguf"),
        adapter: AdapterConfig {
            kind: AdapterKind::Lora,
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![
                TargetModule::Q,
                TargetModule::V,
                TargetModule::O,
                TargetModule::Up,
                TargetModule::Down,
            ],
            rslora: false,
        },
        hyper: Hyperparameters {
            learning_rate: 1e-3,
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            epochs: 2,
            batch_size: 4,
            grad_accumulation: 1,
            seq_len: 96,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 7,
        },
        datanets: vec![DatanetRef {
            datanet: DatanetId(ContentHash::of(b"velmora")),
            version: 1,
            manifest: ContentHash::of(b"manifest"),
        }],
        validation: ValidationSpec {
            fraction_ppm: 100_000,
            seed: 8,
            set: ContentHash::of(b"velmora-heldout"),
        },
        rounds: 1,
        quorum: Quorum {
            min_updates: 1,
            max_workers: 4,
        },
        deadlines: Deadlines {
            enroll_ms: 1_000,
            train_ms: 600_000,
            validate_ms: 600_000,
        },
        merge: MergeMethod::ExactFullRank,
        early_stopping: None,
        verification: VerificationSpec {
            segment_steps: 1_000,
            audit_ppm: 100_000,
            norm_bound_ppm: 4_000_000,
            robust: cohort_protocol::types::RobustAggregation::None,
        },
        created_at: Timestamp(1_764_000_000_000),
    }
}

fn flag_name(flag: &CreditFlag) -> &'static str {
    match flag {
        CreditFlag::Normal => "normal",
        CreditFlag::Duplicate { .. } => "duplicate",
        CreditFlag::Harmful => "harmful",
    }
}

fn nats(c: Credit) -> f64 {
    c.0 as f64 / Credit::UNITS_PER_NAT as f64
}

/// The gain of a merged round, in nats.
fn gain(round: &RoundMerge) -> f64 {
    f64::from(round.loss_before) - f64::from(round.loss_after)
}

/// What the ledger records for `shards` after `round` (one update per shard, in order).
fn credits(shards: &[PlannedShard], round: &RoundMerge) -> Vec<ShardCredit> {
    let credits = shard_credits(shards, &round.values, gain(round));
    shards
        .iter()
        .map(|s| *credits.iter().find(|c| c.shard == s.hash).unwrap())
        .collect()
}

#[test]
fn duplicates_split_useless_earns_about_nothing_and_harmful_is_flagged() {
    if !default_model_present() {
        return;
    }
    let started = Instant::now();
    let base = cohort_trainer::models::default_model_path();
    let setup = JobSetup::from_spec(&job(), &base).unwrap();

    let names = ["clean", "duplicate", "shuffled", "off-topic"];
    let clean = clean();
    let duplicate: Vec<String> = clean.iter().rev().cloned().collect();
    let shards: Vec<Vec<String>> = vec![clean, duplicate, shuffled(), off_topic()];
    let validation = validation();
    let hashes: Vec<ContentHash> = shards.iter().map(|s| shard_hash(s)).collect();
    for (i, a) in hashes.iter().enumerate() {
        for b in &hashes[i + 1..] {
            assert_ne!(a, b, "every shard is its own blob");
        }
    }

    // Near-duplicate groups, as the coordinator forms them: clean and its copy are one source;
    // shuffled shares the questions but not the answers' counts, which is enough to keep it
    // apart (each answer says its count twice, so that more of its shingles carry it).
    let grouping = GroupingConfig::default();
    let texts: Vec<ShardText> = shards
        .iter()
        .zip(&hashes)
        .map(|(records, hash)| ShardText {
            hash: *hash,
            records: records.clone(),
        })
        .collect();
    let groups = group_shards(&texts, &grouping).unwrap();
    let signatures: Vec<Vec<u64>> = shards
        .iter()
        .map(|s| minhash_signature(s, &grouping).unwrap().unwrap())
        .collect();
    let jaccard = |a: usize, b: usize| estimated_jaccard(&signatures[a], &signatures[b]);
    eprintln!(
        "estimated Jaccard: clean/duplicate {:.3}, clean/shuffled {:.3}, clean/off-topic {:.3}",
        jaccard(0, 1),
        jaccard(0, 2),
        jaccard(0, 3)
    );
    assert_eq!(
        groups,
        vec![0, 0, 1, 2],
        "near-duplicate groups of {names:?}"
    );
    assert!(
        jaccard(0, 2) < grouping.threshold - 0.05,
        "shuffled is clearly apart"
    );

    // The round's start: the earlier round that left every count undecided (see the module
    // documentation), trained faster than the job's own updates.
    let dir = tempfile::tempdir().unwrap();
    let stop = AtomicBool::new(false);
    let t = Instant::now();
    let earlier_records = undecided();
    let mut earlier = setup.clone();
    earlier.train.learning_rate = 5e-3;
    let earlier = train_update(
        &earlier,
        None,
        &earlier_records,
        99,
        &dir.path().join("start"),
        &stop,
    )
    .unwrap();
    eprintln!(
        "start: {} records, {} steps, training loss {:.3} -> {:.3}, {:.1} s",
        earlier_records.len(),
        earlier.steps,
        earlier.losses.first().unwrap(),
        earlier.losses.last().unwrap(),
        t.elapsed().as_secs_f64()
    );
    let start = Some(earlier.adapter_dir.as_path());

    // One update per shard from that start, each with its own training seed.
    let updates: Vec<LocalUpdate> = shards
        .iter()
        .enumerate()
        .map(|(i, records)| {
            let t = Instant::now();
            let u = train_update(
                &setup,
                start,
                records,
                100 + i as u64,
                &dir.path().join(names[i]),
                &stop,
            )
            .unwrap();
            eprintln!(
                "{:<9}: {} records, {} steps, {} tokens, training loss {:.3} -> {:.3}, {:.1} s",
                names[i],
                records.len(),
                u.steps,
                u.tokens,
                u.losses.first().unwrap(),
                u.losses.last().unwrap(),
                t.elapsed().as_secs_f64()
            );
            u
        })
        .collect();

    // The round: merge weights in proportion to the tokens each update processed, summing to
    // 1; exact Shapley values (four updates).
    let total: u64 = updates.iter().map(|u| u.tokens).sum();
    let weights: Vec<f64> = updates
        .iter()
        .map(|u| u.tokens as f64 / total as f64)
        .collect();
    let t = Instant::now();
    let parts: Vec<(f64, PathBuf)> = (0..4)
        .map(|i| (weights[i], updates[i].adapter_dir.clone()))
        .collect();
    let round = merge_round(
        &setup,
        start,
        &parts,
        &validation,
        11,
        &dir.path().join("merged"),
    )
    .unwrap();
    eprintln!(
        "merge of 4 updates: {} evaluations, {:.1} s",
        round.evaluations,
        t.elapsed().as_secs_f64()
    );

    // What clean alone would earn: the same round with clean submitted once, carrying its
    // copy's merge weight as well. That is the same merged model (two updates trained on the
    // same records, averaged, against one of them at their joint weight), so the two rounds'
    // gains agree and only the attribution differs. (It is also what the coordinator does now
    // that a near-duplicate group is assigned to one worker.) Comparing with clean's value in a
    // round without the copy's weight would not do: a heavier clean moves the merge further,
    // so the pair would rightly be worth more than a lighter single clean.
    let t = Instant::now();
    let once_parts: Vec<(f64, PathBuf)> = vec![
        (weights[0] + weights[1], updates[0].adapter_dir.clone()),
        (weights[2], updates[2].adapter_dir.clone()),
        (weights[3], updates[3].adapter_dir.clone()),
    ];
    let once = merge_round(
        &setup,
        start,
        &once_parts,
        &validation,
        11,
        &dir.path().join("merged-once"),
    )
    .unwrap();
    eprintln!(
        "merge of 3 updates (clean once): {} evaluations, {:.1} s",
        once.evaluations,
        t.elapsed().as_secs_f64()
    );

    // The ledger's view: one shard per update, grouped as above.
    let planned: Vec<PlannedShard> = (0..4)
        .map(|i| PlannedShard {
            hash: hashes[i],
            datanet: DatanetId(ContentHash::of(b"velmora")),
            contributor: Keypair::from_seed(&[i as u8 + 1; 32]).peer_id(),
            tokens: examples(&setup, &shards[i])
                .unwrap()
                .iter()
                .map(|e| e.tokens.len() as u64)
                .sum(),
            group: groups[i] as u32,
        })
        .collect();
    let credit = credits(&planned, &round);
    let once_planned = [planned[0], planned[2], planned[3]];
    let once_credit = credits(&once_planned, &once);

    let gain = gain(&round);
    eprintln!(
        "validation loss (nats per token): start {:.4}, merged {:.4}, gain {:.4}",
        round.loss_before, round.loss_after, gain
    );
    eprintln!(
        "{:<10} {:>7} {:>8} {:>15} {:>13}  flag",
        "shard", "tokens", "weight", "Shapley (nats)", "credit (nats)"
    );
    for i in 0..4 {
        eprintln!(
            "{:<10} {:>7} {:>8.4} {:>15.4} {:>13.4}  {}",
            names[i],
            planned[i].tokens,
            weights[i],
            round.values[i],
            nats(credit[i].value),
            flag_name(&credit[i].flag)
        );
    }
    eprintln!(
        "clean once: merged {:.4}, gain {:.4}; Shapley clean {:.4}, shuffled {:.4}, \
         off-topic {:.4}; credit clean {:.4}",
        once.loss_after,
        self::gain(&once),
        once.values[0],
        once.values[1],
        once.values[2],
        nats(once_credit[0].value)
    );

    // The round itself: an exact attribution of a real gain.
    assert!(round.exact_shapley && once.exact_shapley);
    assert!(gain > 0.0, "the round lowers the validation loss");
    let sum: f64 = round.values.iter().sum();
    assert!(
        (sum - gain).abs() < 1e-6,
        "Shapley values sum to the gain: {sum} vs {gain}"
    );

    // Duplicates split one source's value. The group's pooled value is what clean earns
    // submitted once (within 20%), and the two shards split the group's credit equally: each
    // earns about half of what clean alone would.
    let group_value = round.values[0] + round.values[1];
    let clean_once = once.values[0];
    assert!(
        (group_value - clean_once).abs() <= 0.2 * clean_once,
        "clean and duplicate together {group_value:.4} nats, clean once {clean_once:.4}"
    );
    let smallest = hashes[0].min(hashes[1]);
    for i in [0, 1] {
        assert_eq!(
            credit[i].flag,
            CreditFlag::Duplicate { group: smallest },
            "{}",
            names[i]
        );
    }
    assert!((credit[0].value.0 - credit[1].value.0).abs() <= 1);
    let pair = nats(credit[0].value) + nats(credit[1].value);
    let alone = nats(once_credit[0].value);
    assert!(
        (pair - alone).abs() <= 0.2 * alone,
        "clean and duplicate earn {pair:.4} together, clean once {alone:.4}"
    );

    // Harmful data is flagged, earns nothing, and is clearly negative: worth at least a tenth
    // of the clean group's value, negated.
    assert!(
        round.values[2] < -0.1 * group_value,
        "shuffled is worth {:.4} nats",
        round.values[2]
    );
    assert_eq!(credit[2].flag, CreditFlag::Harmful);
    assert_eq!(credit[2].value, Credit(0));

    // Useless data is worth about zero: within a fifth of the clean group's value either way,
    // and above the harmful shard. In a merge by weighted mean an off-topic update dilutes
    // the others, so its value comes out a little below zero, and whether that is
    // flagged harmful or near-zero depends on where it falls against the near-zero band
    // (5% of the mean group value); either way it earns at most a sliver.
    let off = round.values[3];
    assert!(
        off.abs() <= 0.2 * group_value,
        "off-topic is worth {off:.4} nats against the clean group's {group_value:.4}"
    );
    assert!(off > round.values[2], "off-topic ranks above shuffled");
    assert!(!matches!(credit[3].flag, CreditFlag::Duplicate { .. }));
    assert!(nats(credit[3].value) <= 0.2 * pair);

    // The data credit is the gain, exactly, and nobody earns a negative amount.
    let paid: i64 = credit.iter().map(|c| c.value.0).sum();
    assert_eq!(paid, nats_to_credit(gain).0, "the credits sum to the gain");
    assert!(credit.iter().all(|c| c.value.0 >= 0));
    let paid_once: i64 = once_credit.iter().map(|c| c.value.0).sum();
    assert_eq!(paid_once, nats_to_credit(self::gain(&once)).0);

    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}
