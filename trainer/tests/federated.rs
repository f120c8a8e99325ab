//! A federated round on a generated tiny model, through the functions a peer calls: a job spec
//! maps to the trainer's settings; a worker's update commits exactly as `train_segmented` does
//! and passes its check with the norm dense arithmetic gives; broken updates are refused with the
//! right defect; a segment replays to its commitment (also from a snapshot that travelled as a
//! bundle) and a changed record does not; a merge of three updates trained on different data
//! lowers the validation loss, its Shapley values sum to the gain, and it beats naive factor
//! averaging in product space; bundles round-trip, are deterministic, and refuse bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use burn::tensor::Device;
use cohort_protocol::ContentHash;
use cohort_protocol::rng::SplitMix64;
use cohort_protocol::types::job::{AdapterKind, BaseQuant, JobSpec};
use cohort_trainer::adapter::{AdapterWeights, Factors, LoraSpec, MergeMethod, attach};
use cohort_trainer::federated::{
    BUNDLE_MAGIC, FederatedError, JobSetup, Replay, UpdateDefect, check_update, evaluate, examples,
    merge_error, merge_round, pack_dir, replay, train_update, unpack_dir,
};
use cohort_trainer::gguf::{GgmlType, GgufFile};
use cohort_trainer::merge::{LowRank, naive};
use cohort_trainer::model::Llama;
use cohort_trainer::tokenizer::Tokenizer;
use cohort_trainer::train::{Schedule, TrainConfig};
use cohort_trainer::verify::{Segmenting, train_segmented};
use common::{TOKENIZER_VOCAB, Tiny, temp_gguf, tiny_model_with_tokenizer};

fn h(i: u8) -> ContentHash {
    ContentHash::of(&[i])
}

struct Fx {
    _dir: tempfile::TempDir,
    path: PathBuf,
    setup: JobSetup,
}

fn fixture_with(spec: &JobSpec, proj_ty: GgmlType) -> Fx {
    let mut t = Tiny::new(proj_ty);
    t.vocab = TOKENIZER_VOCAB;
    t.ctx = 128;
    let (bytes, _) = tiny_model_with_tokenizer(&t);
    let (dir, path) = temp_gguf(&bytes);
    let setup = JobSetup::from_spec(spec, &path).unwrap();
    Fx {
        _dir: dir,
        path,
        setup,
    }
}

fn fixture() -> Fx {
    fixture_with(&common::tiny_job(), GgmlType::F32)
}

fn chat(user: &str, answer: &str) -> String {
    serde_json::json!({"messages": [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]})
    .to_string()
}

fn alpaca(instruction: &str, output: &str) -> String {
    serde_json::json!({"instruction": instruction, "input": "", "output": output}).to_string()
}

/// Three workers' data: each teaches one answer.
fn shard(which: usize) -> Vec<String> {
    let answer = ["an inn", "the tin", "then the tin"][which];
    ["in", "the", "tin", "then", "an", "inn"]
        .iter()
        .enumerate()
        .map(|(i, q)| {
            if i % 3 == 2 {
                alpaca(q, answer)
            } else {
                chat(q, answer)
            }
        })
        .collect()
}

fn validation() -> Vec<String> {
    vec![
        chat("inn", "an inn"),
        chat("tin", "the tin"),
        alpaca("the", "then the tin"),
        chat("an", "the tin"),
    ]
}

fn go() -> AtomicBool {
    AtomicBool::new(false)
}

/// `‖s·B·A − s0·B0·A0‖_F` over all projections, dense.
fn dense_delta(w: &AdapterWeights, start: Option<&AdapterWeights>) -> f64 {
    let product = |f: &Factors, s: f64| -> Vec<f64> {
        let r = f.a.len() / f.d_in;
        let mut out = vec![0f64; f.d_out * f.d_in];
        for i in 0..f.d_out {
            for t in 0..r {
                let b = f.b[i * r + t] as f64 * s;
                for j in 0..f.d_in {
                    out[i * f.d_in + j] += b * f.a[t * f.d_in + j] as f64;
                }
            }
        }
        out
    };
    let mut sq = 0.0;
    for (key, f) in &w.factors {
        let mut d = product(f, w.spec.scaling() as f64);
        if let Some(s) = start {
            let p0 = product(&s.factors[key], s.spec.scaling() as f64);
            d.iter_mut().zip(p0).for_each(|(x, y)| *x -= y);
        }
        sq += d.iter().map(|x| x * x).sum::<f64>();
    }
    sq.sqrt()
}

/// A fresh adapter of the job's layout with random `B` (an update without training).
fn synthetic(fx: &Fx, spec: &LoraSpec, seed: u64, scale: f64) -> AdapterWeights {
    let file = GgufFile::open(&fx.path).unwrap();
    let mut model = Llama::from_gguf(&file, &Device::flex()).unwrap();
    attach(&mut model, spec).unwrap();
    let mut w = AdapterWeights::from_model(&model, spec);
    let mut rng = SplitMix64::new(seed);
    for f in w.factors.values_mut() {
        for b in &mut f.b {
            *b = ((2.0 * rng.next_f64() - 1.0) * scale) as f32;
        }
    }
    w
}

fn save(w: &AdapterWeights, dir: &Path) -> PathBuf {
    w.save_peft(dir, "tiny").unwrap();
    dir.to_path_buf()
}

#[test]
fn a_job_spec_maps_to_the_trainer_settings() {
    let fx = fixture();
    let s = &fx.setup;
    assert_eq!(s.lora.targets, ["q_proj", "v_proj", "down_proj"]);
    assert_eq!((s.lora.rank, s.lora.alpha, s.lora.seed), (4, 8.0, 21));
    // The job's decimal learning rate, not f64::from(0.02f32) = 0.019999999552965164.
    assert_eq!(s.train.learning_rate, 0.02);
    assert_eq!(s.train.schedule, Schedule::Constant);
    assert_eq!(
        (s.train.epochs, s.train.batch_size, s.train.grad_accum),
        (2, 2, 1)
    );
    assert_eq!(s.train.max_steps, None);
    assert_eq!((s.seq_len, s.segment_steps), (64, 2));
    assert_eq!(s.merge, MergeMethod::ExactTruncated);
    assert!(!s.qlora);
    assert_eq!(s.base_name, h(1).to_string());

    let mut spec = common::tiny_job();
    spec.hyper.max_grad_norm = 0.0;
    spec.hyper.seq_len = 1 << 20;
    spec.adapter.kind = AdapterKind::Qlora {
        quant: BaseQuant::GgufBlocks,
    };
    let s = JobSetup::from_spec(&spec, &fx.path).unwrap();
    assert_eq!(
        s.train.max_grad_norm,
        f64::MAX,
        "no clipping, in a JSON-safe form"
    );
    assert_eq!(s.seq_len, 128, "cut to the model's context");
    assert!(s.qlora);
    spec.adapter.kind = AdapterKind::Qlora {
        quant: BaseQuant::Nf4DoubleQuant,
    };
    assert!(matches!(
        JobSetup::from_spec(&spec, &fx.path),
        Err(FederatedError::Unsupported(_))
    ));
    spec.adapter.kind = AdapterKind::Lora;
    spec.adapter.rank = 0;
    assert!(matches!(
        JobSetup::from_spec(&spec, &fx.path),
        Err(FederatedError::BadSetting { .. })
    ));
    // Snapshots keep the configuration as JSON and a replay requires it back unchanged: the
    // decimal learning rates jobs use survive the round trip.
    for lr in [1e-4f32, 2e-4, 3e-4, 5e-5, 1e-3, 7e-6] {
        let mut spec = common::tiny_job();
        spec.hyper.learning_rate = lr;
        spec.hyper.max_grad_norm = 0.3;
        let train = JobSetup::from_spec(&spec, &fx.path).unwrap().train;
        let back: TrainConfig =
            serde_json::from_str(&serde_json::to_string(&train).unwrap()).unwrap();
        assert_eq!(back, train, "learning rate {lr}");
    }
    assert!(matches!(
        JobSetup::from_spec(&common::tiny_job(), Path::new("/nonexistent/model.gguf")),
        Err(FederatedError::Base { .. })
    ));

    // Records: either schema, detected per record; an error names the record.
    let ex = examples(&fx.setup, &shard(0)).unwrap();
    assert_eq!(ex.len(), 6);
    assert!(ex.iter().all(|e| e.target_count() > 0));
    let mut bad = shard(0);
    bad[4] = r#"{"messages": [{"role": "user", "content": "hi"}]}"#.into();
    match examples(&fx.setup, &bad) {
        Err(FederatedError::Record { index: 4, problem }) => {
            assert!(problem.contains("assistant"), "{problem}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_update_commits_like_train_segmented_and_passes_its_check() {
    let fx = fixture();
    let out = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let up = train_update(&fx.setup, None, &shard(0), 5, out.path(), &go()).unwrap();
    eprintln!("train_update: {:.2} s", started.elapsed().as_secs_f64());
    // 6 records in batches of 2 for 2 epochs: 6 steps, a segment every 2.
    assert_eq!(up.steps, 6);
    assert_eq!(up.losses.len(), 6);
    assert!(up.losses.iter().all(|l| l.is_finite()));
    let ends: Vec<usize> = up.segments.iter().map(|s| s.end_step).collect();
    assert_eq!(ends, [2, 4, 6]);
    let steps: Vec<usize> = up.snapshots.iter().map(|s| s.step).collect();
    assert_eq!(steps, [0, 2, 4, 6]);
    for (snap, seg) in up.snapshots[1..].iter().zip(&up.segments) {
        assert_eq!(snap.state, seg.state);
        assert!(snap.dir.join("state.json").is_file());
    }
    let ex = examples(&fx.setup, &shard(0)).unwrap();
    let per_epoch: u64 = ex.iter().map(|e| e.tokens.len() as u64 - 1).sum();
    assert_eq!(up.tokens, 2 * per_epoch, "every example's inputs, twice");
    assert_eq!(up.kernel.backend, "flex");
    assert!(up.kernel.threads >= 1);
    assert!(["x86-v4", "x86-v3", "neon", "scalar"].contains(&up.kernel.kernel.as_str()));

    // The same run through verify::train_segmented commits the same hashes and trains the
    // same adapter.
    let file = GgufFile::open(&fx.path).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let mut model = Llama::from_gguf(&file, &Device::flex().autodiff()).unwrap();
    attach(&mut model, &fx.setup.lora).unwrap();
    let cfg = TrainConfig {
        seed: 5,
        ..fx.setup.train.clone()
    };
    let dir = tempfile::tempdir().unwrap();
    let seg = Segmenting {
        every: 2,
        dir: dir.path().to_path_buf(),
        spec: fx.setup.lora.clone(),
    };
    let pad = tok.pad().or(tok.eos()).unwrap();
    let run = train_segmented(model, &ex, &cfg, pad, &seg, |_| {}, |_| {}).unwrap();
    assert_eq!(run.segments, up.segments);
    assert_eq!(run.start, up.snapshots[0].state);
    let trained = AdapterWeights::load_peft(&up.adapter_dir).unwrap();
    assert_eq!(
        trained.factors,
        AdapterWeights::from_model(&run.model, &fx.setup.lora).factors
    );

    // The check passes, with the norm of s·B·A computed densely.
    let norm = check_update(&fx.setup, None, &up.adapter_dir)
        .unwrap()
        .unwrap();
    let dense = dense_delta(&trained, None);
    assert!(norm > 0.0);
    assert!(
        (norm - dense).abs() <= 1e-9 * dense,
        "Gram {norm} vs dense {dense}"
    );
    // Trained from it, a second round's update is measured against it.
    let out2 = tempfile::tempdir().unwrap();
    let up2 = train_update(
        &fx.setup,
        Some(&up.adapter_dir),
        &shard(1),
        6,
        out2.path(),
        &go(),
    )
    .unwrap();
    let norm2 = check_update(&fx.setup, Some(&up.adapter_dir), &up2.adapter_dir)
        .unwrap()
        .unwrap();
    let second = AdapterWeights::load_peft(&up2.adapter_dir).unwrap();
    let dense2 = dense_delta(&second, Some(&trained));
    assert!(
        norm2 > 0.0 && (norm2 - dense2).abs() <= 1e-6 * dense2,
        "{norm2} vs {dense2}"
    );
    assert_eq!(
        check_update(&fx.setup, Some(&up.adapter_dir), &up.adapter_dir).unwrap(),
        Ok(0.0),
        "no change, no delta"
    );
}

#[test]
fn broken_updates_are_refused_with_their_defect() {
    let fx = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let good = synthetic(&fx, &fx.setup.lora, 1, 0.05);
    let good_dir = save(&good, &tmp.path().join("good"));
    let norm = check_update(&fx.setup, None, &good_dir).unwrap().unwrap();
    assert!((norm - dense_delta(&good, None)).abs() <= 1e-9 * norm);
    let defect = |w: &AdapterWeights, name: &str| -> UpdateDefect {
        let dir = save(w, &tmp.path().join(name));
        check_update(&fx.setup, None, &dir).unwrap().unwrap_err()
    };

    let mut nan = good.clone();
    nan.factors.values_mut().nth(3).unwrap().b[5] = f32::NAN;
    assert!(matches!(defect(&nan, "nan"), UpdateDefect::NonFinite(_)));
    let mut inf = good.clone();
    inf.factors.values_mut().next().unwrap().a[0] = f32::INFINITY;
    assert!(matches!(defect(&inf, "inf"), UpdateDefect::NonFinite(_)));

    let rank2 = synthetic(
        &fx,
        &LoraSpec {
            rank: 2,
            alpha: 4.0,
            ..fx.setup.lora.clone()
        },
        2,
        0.05,
    );
    match defect(&rank2, "rank2") {
        UpdateDefect::Shape(m) => assert!(m.contains("rank 2"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut missing = good.clone();
    let key = *missing.factors.keys().nth(2).unwrap();
    missing.factors.remove(&key);
    assert!(matches!(
        defect(&missing, "missing"),
        UpdateDefect::Shape(_)
    ));
    let mut more = fx.setup.lora.clone();
    more.targets.push("k_proj".into());
    assert!(matches!(
        defect(&synthetic(&fx, &more, 3, 0.05), "extra"),
        UpdateDefect::Shape(_)
    ));
    let mut alpha = good.clone();
    alpha.spec.alpha = 16.0;
    assert!(matches!(defect(&alpha, "alpha"), UpdateDefect::Shape(_)));

    let garbage = tmp.path().join("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    std::fs::write(garbage.join("adapter_config.json"), "{not json").unwrap();
    assert!(matches!(
        check_update(&fx.setup, None, &garbage).unwrap(),
        Err(UpdateDefect::Unreadable(_))
    ));
    assert!(matches!(
        check_update(&fx.setup, None, &tmp.path().join("absent")).unwrap(),
        Err(UpdateDefect::Unreadable(_))
    ));
    // A bad start adapter is this peer's problem, not the worker's.
    assert!(matches!(
        check_update(&fx.setup, Some(&garbage), &good_dir),
        Err(FederatedError::BadStart { .. })
    ));
}

#[test]
fn a_segment_replays_to_its_commitment_and_a_changed_record_does_not() {
    let fx = fixture();
    let out = tempfile::tempdir().unwrap();
    let records = shard(2);
    let up = train_update(&fx.setup, None, &records, 9, out.path(), &go()).unwrap();
    let s = &up.segments;

    // The first segment, from the run's own start.
    let started = std::time::Instant::now();
    let first = replay(&fx.setup, None, &records, 9, None, 2).unwrap();
    eprintln!(
        "replay of 2 steps: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        first,
        Replay {
            start: up.snapshots[0].state,
            segment: s[0]
        }
    );
    // The second, from the snapshot at step 2 after it travelled as a bundle.
    let bundle = pack_dir(&up.snapshots[1].dir).unwrap();
    let snap = tempfile::tempdir().unwrap();
    let snap_dir = snap.path().join("step-2");
    unpack_dir(&bundle, &snap_dir).unwrap();
    let second = replay(&fx.setup, None, &records, 9, Some(&snap_dir), 4).unwrap();
    assert_eq!(
        second,
        Replay {
            start: s[0].state,
            segment: s[1]
        }
    );
    // The whole run from the start reproduces the last state.
    let whole = replay(&fx.setup, None, &records, 9, None, 6).unwrap();
    assert_eq!(whole.segment.state, s[2].state);

    // One changed record: a different state (same indices, so the same batch root).
    let mut changed = records.clone();
    changed[1] = chat("the", "an inn");
    let other = replay(&fx.setup, None, &changed, 9, Some(&snap_dir), 4).unwrap();
    assert_eq!(other.start, s[0].state, "the snapshot is the same");
    assert_ne!(other.segment.state, s[1].state);
    // Another seed: another order, another root.
    let reseeded = replay(&fx.setup, None, &records, 10, None, 2).unwrap();
    assert_ne!(reseeded.segment.batches, s[0].batches);
    // Past the run's end.
    assert!(matches!(
        replay(&fx.setup, None, &records, 9, None, 7),
        Err(FederatedError::Verify(_))
    ));
}

#[test]
fn a_stop_flag_ends_training() {
    let fx = fixture();
    let out = tempfile::tempdir().unwrap();
    let stop = AtomicBool::new(true);
    assert!(matches!(
        train_update(&fx.setup, None, &shard(0), 1, out.path(), &stop),
        Err(FederatedError::Stopped)
    ));
}

/// `merge::naive` of the updates, per projection (the baseline the exact merge must beat).
fn naive_merge(parts: &[(f64, &AdapterWeights)]) -> AdapterWeights {
    let mut out = parts[0].1.clone();
    for (key, f) in out.factors.iter_mut() {
        let lows: Vec<LowRank> = parts
            .iter()
            .map(|(_, a)| {
                let g = &a.factors[key];
                let r = g.a.len() / g.d_in;
                LowRank::new(
                    g.d_out,
                    g.d_in,
                    r,
                    g.b.iter().map(|x| *x as f64).collect(),
                    g.a.iter().map(|x| *x as f64).collect(),
                )
                .unwrap()
            })
            .collect();
        let weighted: Vec<(f64, &LowRank)> = parts.iter().map(|(w, _)| *w).zip(&lows).collect();
        let m = naive(&weighted).unwrap();
        f.b = m.b.iter().map(|x| *x as f32).collect();
        f.a = m.a.iter().map(|x| *x as f32).collect();
    }
    out
}

#[test]
fn a_merged_round_lowers_the_loss_and_its_credits_sum_to_the_gain() {
    let fx = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let mut updates = Vec::new();
    let mut tokens = Vec::new();
    let started = std::time::Instant::now();
    for which in 0..3 {
        let out = tmp.path().join(format!("worker-{which}"));
        let up = train_update(&fx.setup, None, &shard(which), which as u64, &out, &go()).unwrap();
        tokens.push(up.tokens as f64);
        updates.push(up.adapter_dir);
    }
    eprintln!("3 updates: {:.2} s", started.elapsed().as_secs_f64());
    let total: f64 = tokens.iter().sum();
    let weighted: Vec<(f64, PathBuf)> = tokens
        .iter()
        .map(|t| t / total)
        .zip(updates.iter().cloned())
        .collect();
    let merged_dir = tmp.path().join("merged");
    let started = std::time::Instant::now();
    let m = merge_round(&fx.setup, None, &weighted, &validation(), 77, &merged_dir).unwrap();
    eprintln!(
        "merge_round: {:.2} s, {m:?}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(m.adapter_dir, merged_dir);
    assert!(
        m.loss_after < m.loss_before,
        "{} -> {}",
        m.loss_before,
        m.loss_after
    );
    let gain = f64::from(m.loss_before) - f64::from(m.loss_after);
    let sum: f64 = m.values.iter().sum();
    assert!(
        (sum - gain).abs() <= 1e-6,
        "values {:?} sum to {sum}, gain {gain}",
        m.values
    );
    assert_eq!(m.values.len(), 3);
    assert!(m.exact_shapley);
    assert_eq!(m.evaluations, 8, "each of the 2^3 coalitions once");
    assert!(m.truncation_error > 0.0 && m.truncation_error < 1.0);
    // The merge is what evaluate sees, and it has the job's layout.
    assert_eq!(
        evaluate(&fx.setup, Some(&merged_dir), &validation()).unwrap(),
        m.loss_after
    );
    assert_eq!(
        evaluate(&fx.setup, None, &validation()).unwrap(),
        m.loss_before
    );
    assert!(check_update(&fx.setup, None, &merged_dir).unwrap().is_ok());

    // Exact (truncated SVD of Σ w_i B_i A_i) against naive factor averaging, in product space.
    let loaded: Vec<AdapterWeights> = updates
        .iter()
        .map(|p| AdapterWeights::load_peft(p).unwrap())
        .collect();
    let parts: Vec<(f64, &AdapterWeights)> =
        weighted.iter().map(|(w, _)| *w).zip(&loaded).collect();
    let exact = AdapterWeights::load_peft(&merged_dir).unwrap();
    let exact_err = merge_error(&parts, &exact).unwrap();
    let naive_err = merge_error(&parts, &naive_merge(&parts)).unwrap();
    eprintln!("relative product-space merge error: exact {exact_err:.4e}, naive {naive_err:.4e}");
    assert!((exact_err - f64::from(m.truncation_error)).abs() <= 1e-6);
    assert!(
        exact_err < naive_err,
        "exact {exact_err} vs naive {naive_err}"
    );

    // The full-rank merge keeps everything: no truncation error, rank 3·4.
    let full = JobSetup {
        merge: MergeMethod::ExactFullRank,
        ..fx.setup.clone()
    };
    let full_dir = tmp.path().join("full");
    let f = merge_round(&full, None, &weighted, &validation(), 77, &full_dir).unwrap();
    assert!(f.truncation_error < 1e-6, "{}", f.truncation_error);
    assert_eq!(AdapterWeights::load_peft(&full_dir).unwrap().spec.rank, 12);
    let sum: f64 = f.values.iter().sum();
    assert!((sum - (f64::from(f.loss_before) - f64::from(f.loss_after))).abs() <= 1e-6);

    // The next round trains at rank 12 from the full-rank merge, and is checked against it.
    let next = train_update(
        &full,
        Some(&full_dir),
        &shard(0),
        3,
        &tmp.path().join("next"),
        &go(),
    )
    .unwrap();
    let norm = check_update(&full, Some(&full_dir), &next.adapter_dir)
        .unwrap()
        .unwrap();
    assert!(norm > 0.0);
    assert_eq!(
        AdapterWeights::load_peft(&next.adapter_dir)
            .unwrap()
            .spec
            .rank,
        12
    );
    let rank4 = check_update(&full, Some(&full_dir), &updates[0]).unwrap();
    assert!(matches!(rank4, Err(UpdateDefect::Shape(_))), "{rank4:?}");

    // No updates: the start stands.
    let none = merge_round(
        &fx.setup,
        None,
        &[],
        &validation(),
        77,
        &tmp.path().join("none"),
    )
    .unwrap();
    assert_eq!(none.loss_after, none.loss_before);
    assert_eq!(none.loss_before, m.loss_before);
    assert!(none.values.is_empty());
    assert_eq!(none.evaluations, 1);
    // A weight must be positive.
    let bad = vec![(0.0, updates[0].clone()), (1.0, updates[1].clone())];
    assert!(matches!(
        merge_round(
            &fx.setup,
            None,
            &bad,
            &validation(),
            77,
            &tmp.path().join("bad")
        ),
        Err(FederatedError::BadWeight { index: 0, .. })
    ));
}

#[test]
fn many_updates_are_valued_by_gtg_sampling() {
    let fx = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let updates: Vec<(f64, PathBuf)> = (0..9)
        .map(|i| {
            let w = synthetic(&fx, &fx.setup.lora, 100 + i, 0.02);
            (1.0 + i as f64, save(&w, &tmp.path().join(format!("u{i}"))))
        })
        .collect();
    let started = std::time::Instant::now();
    let m = merge_round(
        &fx.setup,
        None,
        &updates,
        &validation()[..2],
        5,
        &tmp.path().join("merged"),
    )
    .unwrap();
    eprintln!(
        "GTG over 9 updates: {} evaluations, {:.2} s",
        m.evaluations,
        started.elapsed().as_secs_f64()
    );
    assert!(!m.exact_shapley);
    assert_eq!(m.values.len(), 9);
    let gain = f64::from(m.loss_before) - f64::from(m.loss_after);
    let sum: f64 = m.values.iter().sum();
    assert!((sum - gain).abs() <= 1e-6, "{sum} vs {gain}");
    assert!(m.evaluations <= 1 << 9);
}

#[test]
fn bundles_round_trip_deterministically_and_refuse_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("b.txt"), "bee").unwrap();
    std::fs::write(src.join("a.bin"), [0u8, 1, 2, 255]).unwrap();
    std::fs::write(src.join("sub/c"), "").unwrap();
    std::fs::write(src.join("sub/deeper/d.json"), "{}").unwrap();
    let bytes = pack_dir(&src).unwrap();
    assert_eq!(pack_dir(&src).unwrap(), bytes, "deterministic");
    assert!(bytes.starts_with(BUNDLE_MAGIC));
    let dest = tmp.path().join("dest");
    unpack_dir(&bytes, &dest).unwrap();
    assert_eq!(
        pack_dir(&dest).unwrap(),
        bytes,
        "the same files give the same bytes"
    );
    assert_eq!(std::fs::read(dest.join("a.bin")).unwrap(), [0u8, 1, 2, 255]);
    assert_eq!(
        std::fs::read_to_string(dest.join("sub/deeper/d.json")).unwrap(),
        "{}"
    );
    // Unpacking over files is refused.
    assert!(matches!(
        unpack_dir(&bytes, &dest),
        Err(FederatedError::Bundle(_))
    ));

    // The format, byte for byte.
    let one = tmp.path().join("one");
    std::fs::create_dir_all(&one).unwrap();
    std::fs::write(one.join("a"), "hi").unwrap();
    let bundle = |entries: &[(&str, &[u8])]| -> Vec<u8> {
        let mut b = b"cohort-bundle/v1".to_vec();
        b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for (name, data) in entries {
            b.extend_from_slice(&(name.len() as u64).to_le_bytes());
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&(data.len() as u64).to_le_bytes());
            b.extend_from_slice(data);
        }
        b
    };
    assert_eq!(pack_dir(&one).unwrap(), bundle(&[("a", b"hi")]));
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_eq!(pack_dir(&empty).unwrap(), bundle(&[]));

    let refused = |b: &[u8], what: &str| {
        let dest = tmp.path().join(format!("refused-{what}"));
        match unpack_dir(b, &dest) {
            Err(FederatedError::Bundle(m)) => eprintln!("{what}: {m}"),
            other => panic!("{what}: {other:?}"),
        }
        assert!(!dest.exists(), "{what}: nothing written");
    };
    refused(&bundle(&[("../x", b"evil")]), "parent");
    refused(&bundle(&[("a/../../x", b"evil")]), "inner parent");
    refused(&bundle(&[("/etc/x", b"evil")]), "absolute");
    refused(&bundle(&[("a//b", b"")]), "empty component");
    refused(&bundle(&[("a", b"1"), ("a", b"2")]), "duplicate");
    refused(&bundle(&[("b", b"1"), ("a", b"2")]), "unsorted");
    let mut trailing = bundle(&[("a", b"hi")]);
    trailing.push(0);
    refused(&trailing, "trailing");
    let full = bundle(&[("a", b"hi")]);
    refused(&full[..full.len() - 1], "truncated");
    let mut huge = bundle(&[]);
    huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    refused(&huge, "count");
    let mut long = bundle(&[("a", b"hi")]);
    let at = 16 + 8 + 8 + 1;
    long[at..at + 8].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
    refused(&long, "length");
    refused(b"cohort-bundle/v2\0\0\0\0\0\0\0\0", "magic");
    // The whole adapter directory travels too.
    let fx_dir = tmp.path().join("adapter");
    let spec = LoraSpec::default();
    let w = AdapterWeights {
        spec,
        factors: [(
            (0, 0),
            Factors {
                a: vec![0.5; 8 * 4],
                b: vec![0.25; 4 * 8],
                d_in: 4,
                d_out: 4,
            },
        )]
        .into_iter()
        .collect(),
    };
    w.save_peft(&fx_dir, "tiny").unwrap();
    let b = pack_dir(&fx_dir).unwrap();
    let back = tmp.path().join("adapter-back");
    unpack_dir(&b, &back).unwrap();
    assert_eq!(AdapterWeights::load_peft(&back).unwrap(), w);
    assert_eq!(
        ContentHash::of(&pack_dir(&back).unwrap()),
        ContentHash::of(&b)
    );
}
