//! The tolerance path of a spot check, for workers of another kernel class: the distance between
//! two training states against a reference computed here; the verdicts of `spot_check` (an
//! honest end state passes, a forged one or one that is not the committed state does not); and,
//! with the `verify-ndarray` feature, segments trained on flex and replayed on burn's ndarray
//! backend: honest ones pass, forged ones (a skipped optimizer step) do not, and (ignored test
//! `measure_tolerance_across_kernel_classes`) the false-accusation rate and the detection power
//! behind `SPOT_CHECK_TOLERANCE`:
//!
//! ```text
//! cargo test -p cohort-trainer --features verify-ndarray --test tolerance -- \
//!     --ignored --nocapture measure_tolerance_across_kernel_classes
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]
// The runs across kernel classes (and their helpers) need the `verify-ndarray` feature.
#![cfg_attr(not(feature = "verify-ndarray"), allow(dead_code, unused_imports))]

mod common;

use std::path::Path;

use cohort_protocol::rng::SplitMix64;
use cohort_protocol::types::round::KernelClass;
use cohort_trainer::adapter::{AdapterWeights, LoraSpec, attach};
use cohort_trainer::data::{Example, Schema, parse_record, tokenize};
use cohort_trainer::gguf::{GgmlType, GgufFile};
use cohort_trainer::model::Llama;
use cohort_trainer::model::weights::Proj;
use cohort_trainer::tokenizer::{ChatTemplate, Tokenizer};
use cohort_trainer::train::{Schedule, TrainConfig};
use cohort_trainer::verify::{
    AdamState, FactorState, ParamState, SPOT_CHECK_TOLERANCE, Segmenting, TrainState, replay_from,
    snapshot_hash, snapshot_path, spot_check_tolerance, state_distance, train_segmented,
    update_error,
};
use common::{TOKENIZER_VOCAB, Tiny, temp_gguf, tiny_model_with_tokenizer};

// ----- The distance against a reference -----

fn values(rng: &mut SplitMix64, n: usize, scale: f64) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.next_u64() % 2001) as f64 / 1000.0 - 1.0) * scale)
        .map(|v| v as f32)
        .collect()
}

/// `‖x − y‖ / max(‖x − s‖, ‖y − s‖)` written out directly, in f64, with `s` zero when absent.
fn reference_error(s: Option<&[f32]>, x: &[f32], y: &[f32]) -> f64 {
    let at = |i: usize| s.map_or(0.0, |s| f64::from(s[i]));
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|a| a * a).sum::<f64>().sqrt();
    let d = norm(&mut x.iter().zip(y).map(|(a, b)| f64::from(*a) - f64::from(*b)));
    let dx = norm(&mut x.iter().enumerate().map(|(i, a)| f64::from(*a) - at(i)));
    let dy = norm(&mut y.iter().enumerate().map(|(i, b)| f64::from(*b) - at(i)));
    if d == 0.0 { 0.0 } else { d / dx.max(dy) }
}

fn param(rng: &mut SplitMix64, dims: [usize; 2], time: Option<u64>) -> ParamState {
    let n = dims[0] * dims[1];
    ParamState {
        dims,
        value: values(rng, n, 0.1),
        adam: time.map(|time| AdamState {
            time,
            moment_1: values(rng, n, 1e-3),
            moment_2: values(rng, n, 1e-6).iter().map(|v| v.abs()).collect(),
            max_moment_2: None,
        }),
    }
}

/// Two projections of rank 2, `d_in` 5, `d_out` 3, at `step`, with AdamW state (unless `step`
/// is 0: a fresh optimizer).
fn state(seed: u64, step: usize) -> TrainState {
    let mut rng = SplitMix64::new(seed);
    let time = (step > 0).then_some(step as u64);
    let factors = [(0, Proj::Q), (1, Proj::Down)]
        .into_iter()
        .map(|(layer, proj)| FactorState {
            layer,
            proj,
            a: param(&mut rng, [2, 5], time),
            b: param(&mut rng, [3, 2], time),
        })
        .collect();
    TrainState { step, factors }
}

/// Every tensor of `end` moved to `start + frac · (end − start)`: a segment whose update is
/// `frac` as large (the moments too, where `start` has them).
fn shrink_update(start: &TrainState, end: &mut TrainState, frac: f32) {
    let pull = |s: &[f32], e: &mut [f32]| {
        for (x, s) in e.iter_mut().zip(s) {
            *x = s + frac * (*x - s);
        }
    };
    for (f, g) in end.factors.iter_mut().zip(&start.factors) {
        for (p, q) in [(&mut f.a, &g.a), (&mut f.b, &g.b)] {
            pull(&q.value, &mut p.value);
            if let (Some(m), Some(n)) = (&mut p.adam, &q.adam) {
                pull(&n.moment_1, &mut m.moment_1);
                pull(&n.moment_2, &mut m.moment_2);
            }
        }
    }
}

/// `v` plus noise of Frobenius size `rel · ‖v − from‖` (`from` zero when absent).
fn bump(v: &mut [f32], from: Option<&[f32]>, rng: &mut SplitMix64, rel: f64) {
    let noise = values(rng, v.len(), 1.0);
    let norm = |it: &mut dyn Iterator<Item = f64>| it.map(|x| x * x).sum::<f64>().sqrt();
    let size = norm(
        &mut v
            .iter()
            .enumerate()
            .map(|(i, x)| f64::from(*x) - from.map_or(0.0, |f| f64::from(f[i]))),
    );
    let nn = norm(&mut noise.iter().map(|x| f64::from(*x)));
    for (x, n) in v.iter_mut().zip(noise) {
        *x = (f64::from(*x) + f64::from(n) * rel * size / nn) as f32;
    }
}

#[test]
fn update_error_matches_a_reference() {
    let mut rng = SplitMix64::new(3);
    for (n, scale) in [(1, 1.0), (17, 1e-3), (1000, 1e3), (64, 1e-20)] {
        let s = values(&mut rng, n, scale);
        let x: Vec<f32> = s
            .iter()
            .zip(values(&mut rng, n, scale * 1e-2))
            .map(|(a, u)| a + u)
            .collect();
        let mut y = x.clone();
        for v in y.iter_mut().step_by(3) {
            *v *= 1.0 + 1e-4;
        }
        for start in [Some(s.as_slice()), None] {
            let want = reference_error(start, &x, &y);
            let got = update_error(start, &x, &y);
            assert!(
                (got - want).abs() <= 1e-12 * want.max(1e-300),
                "n {n}: {got} against {want}"
            );
            assert_eq!(update_error(start, &x, &x), 0.0);
            assert_eq!(update_error(start, &y, &x), got, "symmetric");
        }
        // Against the update, a disagreement looks ~100x larger than against the tensor
        // (the update is ~1% of it).
        if n > 1 {
            assert!(update_error(Some(&s), &x, &y) > 20.0 * update_error(None, &x, &y));
        }
    }
    assert_eq!(update_error(None, &[0.0; 4], &[0.0; 4]), 0.0);
    assert_eq!(update_error(None, &[0.0, 0.0], &[1.0, 0.0]), 1.0);
    assert_eq!(update_error(None, &[1.0], &[-1.0]), 2.0);
    // One side did not move: the whole update is the disagreement.
    assert_eq!(
        update_error(Some(&[2.0, 2.0]), &[2.0, 2.0], &[2.0, 3.0]),
        1.0
    );
    assert_eq!(update_error(Some(&[5.0]), &[5.5], &[5.5]), 0.0);
    assert_eq!(update_error(None, &[f32::NAN], &[1.0]), f64::INFINITY);
    assert_eq!(update_error(None, &[f32::INFINITY], &[1.0]), f64::INFINITY);
    assert_eq!(
        update_error(Some(&[f32::NAN]), &[1.0], &[2.0]),
        f64::INFINITY
    );
}

#[test]
fn the_distance_is_the_largest_error_relative_to_the_update_of_any_tensor() {
    let start = state(1, 3);
    let mut a = state(2, 7);
    let same = state_distance(&start, &a, &a.clone());
    assert_eq!(same.relative, 0.0);
    assert_eq!(
        same.tensors,
        2 * 2 * 3,
        "A, B and two moments each, of two projections"
    );

    // Perturb one tensor of each kind by a known amount relative to its update: the distance
    // is the largest.
    let mut b = a.clone();
    let mut rng = SplitMix64::new(9);
    let from = |s: &TrainState, f: usize| s.factors[f].b.adam.clone().unwrap().moment_2;
    bump(
        &mut b.factors[0].a.value,
        Some(&start.factors[0].a.value),
        &mut rng,
        1e-5,
    );
    bump(
        &mut b.factors[1].b.adam.as_mut().unwrap().moment_2,
        Some(&from(&start, 1)),
        &mut rng,
        3e-3,
    );
    bump(
        &mut b.factors[1].b.value,
        Some(&start.factors[1].b.value),
        &mut rng,
        1e-3,
    );
    let want = [
        reference_error(
            Some(&start.factors[0].a.value),
            &a.factors[0].a.value,
            &b.factors[0].a.value,
        ),
        reference_error(Some(&from(&start, 1)), &from(&a, 1), &from(&b, 1)),
        reference_error(
            Some(&start.factors[1].b.value),
            &a.factors[1].b.value,
            &b.factors[1].b.value,
        ),
    ];
    let d = state_distance(&start, &a, &b);
    assert!(
        (d.relative - want[1]).abs() <= 1e-12,
        "{d:?} against {want:?}"
    );
    assert!(want[1] > want[2] && want[2] > want[0]);
    assert_eq!(d.worst, "layer 1 down_proj B.moment_2");
    assert!(
        (d.relative - 3e-3).abs() < 1e-5,
        "the bump was 3e-3 of the update (to f32 rounding)"
    );
    assert!(d.within(SPOT_CHECK_TOLERANCE.max(d.relative)));
    assert!(!d.within(d.relative * 0.99));
    // Symmetric in the end states.
    assert_eq!(state_distance(&start, &b, &a).relative, d.relative);

    // The same disagreement after a segment that moved the state a tenth as far is ten times
    // the error: what counts is the share of the segment's work.
    let mut small = a.clone();
    shrink_update(&start, &mut small, 0.1);
    let mut small_b = small.clone();
    small_b.factors[1].b.value = b.factors[1].b.value.clone();
    for (x, (y, z)) in small_b.factors[1]
        .b
        .value
        .iter_mut()
        .zip(a.factors[1].b.value.iter().zip(&small.factors[1].b.value))
    {
        *x = z + (*x - y); // the same noise on the smaller update
    }
    let e = state_distance(&start, &small, &small_b).relative;
    assert!((e / want[2] - 10.0).abs() < 0.05, "{e} against {}", want[2]);

    // From a fresh optimizer (step 0), the moments' update is the moments themselves.
    let fresh = state(1, 0);
    let d0 = state_distance(&fresh, &a, &b);
    assert!(
        (d0.relative - reference_error(None, &from(&a, 1), &from(&b, 1))).abs() <= 1e-12,
        "{d0:?}"
    );

    // Any difference in structure is infinitely far.
    type Edit<'a> = &'a dyn Fn(&mut TrainState);
    let cases: [(&str, Edit<'_>); 6] = [
        ("step", &|c| c.step += 1),
        ("time", &|c| c.factors[0].b.adam.as_mut().unwrap().time += 1),
        ("no moments", &|c| c.factors[1].a.adam = None),
        ("projection", &|c| c.factors[1].proj = Proj::Up),
        ("count", &|c| {
            c.factors.pop();
        }),
        ("amsgrad", &|c| {
            let m = c.factors[0].a.adam.as_mut().unwrap();
            m.max_moment_2 = Some(m.moment_2.clone());
        }),
    ];
    for (what, f) in cases {
        let mut c = a.clone();
        f(&mut c);
        let d = state_distance(&start, &a, &c);
        assert_eq!(d.relative, f64::INFINITY, "{what}: {d:?}");
        assert!(!d.within(f64::MAX), "{what}");
    }
    // A start that cannot lead to the end states.
    let starts: [(&str, Edit<'_>); 4] = [
        ("start after the end", &|c| c.step = 7),
        ("start's optimizer ahead", &|c| {
            c.factors[1].a.adam.as_mut().unwrap().time = 7;
        }),
        ("start's shape", &|c| c.factors[0].b.dims = [2, 3]),
        ("start's projection", &|c| c.factors[0].proj = Proj::K),
    ];
    for (what, f) in starts {
        let mut s = start.clone();
        f(&mut s);
        let d = state_distance(&s, &a, &b);
        assert_eq!(d.relative, f64::INFINITY, "{what}: {d:?}");
    }
    let mut nan = a.clone();
    nan.factors[0].b.value[1] = f32::NAN;
    assert_eq!(state_distance(&start, &a, &nan).relative, f64::INFINITY);
    a.factors[0].b.value[1] = f32::INFINITY;
    assert_eq!(state_distance(&start, &a, &a).relative, f64::INFINITY);
}

// ----- Runs on the tiny model -----

struct Fx {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    file: GgufFile,
    spec: LoraSpec,
}

fn fixture(model_seed: u64) -> Fx {
    let mut t = Tiny::new(GgmlType::F32);
    t.vocab = TOKENIZER_VOCAB;
    t.ctx = 128;
    t.seed = model_seed;
    let (bytes, _) = tiny_model_with_tokenizer(&t);
    let (dir, path) = temp_gguf(&bytes);
    let file = GgufFile::open(&path).unwrap();
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        seed: 21 + model_seed,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        ..LoraSpec::default()
    };
    Fx {
        _dir: dir,
        path,
        file,
        spec,
    }
}

const WORDS: [&str; 8] = ["the", "tin", "an", "inn", "then", "in", "net", "ten"];

/// `n` chat records of a few words each, drawn from `shard`'s own stream.
fn examples(fx: &Fx, shard: u64, n: usize) -> Vec<Example> {
    let tok = Tokenizer::from_gguf(&fx.file).unwrap();
    let tpl = ChatTemplate::from_gguf(&fx.file).unwrap();
    let mut rng = SplitMix64::new(0xDA7A ^ shard);
    let mut words = |k: usize| {
        (0..k)
            .map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize])
            .collect::<Vec<_>>()
            .join(" ")
    };
    (0..n)
        .map(|i| {
            let (q, a) = (words(2 + i % 3), words(3 + i % 5));
            let line = serde_json::json!({"messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]})
            .to_string();
            let r = parse_record(Schema::Chat, &line, i + 1).unwrap();
            tokenize(&r, &tok, &tpl, 64).unwrap()
        })
        .collect()
}

impl Fx {
    fn model(&self, device: &burn::tensor::Device) -> Llama {
        let mut m = Llama::from_gguf(&self.file, &device.clone().autodiff()).unwrap();
        attach(&mut m, &self.spec).unwrap();
        m
    }
}

fn flex() -> burn::tensor::Device {
    burn::tensor::Device::flex()
}

/// The forged end states a cheating worker might commit to, for a segment `from..=end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Forgery {
    /// The state after `end − 1` steps, relabelled as `end` (the step count and every AdamW
    /// time step advanced by one): one optimizer step skipped, the structure intact.
    SkippedStep,
    /// The segment trained with one example of its first step replaced by another example
    /// (the same indices, so the same batch root).
    OtherExample,
    /// The honest end state with noise added to every `B`, of Frobenius size `10^-k` (`k` =
    /// the payload) times the segment's update of that `B`.
    NoiseOnB(u8),
}

/// The forgeries the measurements try on every segment.
const MEASURED_FORGERIES: [Forgery; 5] = [
    Forgery::SkippedStep,
    Forgery::OtherExample,
    Forgery::NoiseOnB(3),
    Forgery::NoiseOnB(2),
    Forgery::NoiseOnB(1),
];

/// The honest end state with noise on every `B` of Frobenius size `rel` times the segment's
/// update of that `B` (from `start`).
fn noisy_b(start: &TrainState, honest: &TrainState, rel: f64, seed: u64) -> TrainState {
    let mut s = honest.clone();
    let mut rng = SplitMix64::new(seed);
    for (f, g) in s.factors.iter_mut().zip(&start.factors) {
        bump(&mut f.b.value, Some(&g.b.value), &mut rng, rel);
    }
    s
}

fn skipped_step(mut before_last: TrainState) -> TrainState {
    before_last.step += 1;
    for f in &mut before_last.factors {
        for p in [&mut f.a, &mut f.b] {
            if let Some(m) = &mut p.adam {
                m.time += 1;
            }
        }
    }
    before_last
}

/// One training run on flex, its segments replayed on `other` and compared with the worker's
/// end snapshots, and the forgeries of each segment compared with the same replays.
struct RunResult {
    /// By segment, the first (from step 0, a fresh optimizer) first.
    honest: Vec<f64>,
    /// The honest distances with the tensor where each was reached and the segment's end step.
    honest_at: Vec<(f64, String, usize)>,
    /// With whether the segment is the run's first.
    forged: Vec<(Forgery, bool, f64)>,
}

#[allow(clippy::too_many_arguments)]
fn run_case(
    fx: &Fx,
    examples: &[Example],
    cfg: &TrainConfig,
    every: usize,
    other: &burn::tensor::Device,
    forgeries: &[Forgery],
    dir: &Path,
) -> RunResult {
    let seg = Segmenting {
        every,
        dir: dir.to_path_buf(),
        spec: fx.spec.clone(),
    };
    let run = train_segmented(fx.model(&flex()), examples, cfg, 0, &seg, |_| {}, |_| {}).unwrap();
    let mut out = RunResult {
        honest: Vec::new(),
        honest_at: Vec::new(),
        forged: Vec::new(),
    };
    let mut from = 0;
    let mut previous = run.start;
    for s in &run.segments {
        let start = snapshot_path(dir, from);
        let end = snapshot_path(dir, s.end_step);
        // The verifier: the segment again on the other kernel class.
        let replayed =
            replay_from(fx.model(other), examples, cfg, 0, Some(&start), s.end_step).unwrap();
        assert_eq!(
            replayed.start, previous,
            "the start snapshot loads bit for bit"
        );
        assert_eq!(replayed.segment.batches, s.batches);
        // The worker's end state, authentic: it hashes to the commitment.
        let claimed = TrainState::load(fx.model(other), examples, cfg, &end).unwrap();
        assert_eq!(claimed.hash(), s.state);
        let d = state_distance(&replayed.start_state, &replayed.state, &claimed);
        out.honest.push(d.relative);
        out.honest_at.push((d.relative, d.worst, s.end_step));
        for &f in forgeries {
            let forged = match f {
                Forgery::SkippedStep => {
                    if s.end_step - from < 2 {
                        continue;
                    }
                    let r = replay_from(
                        fx.model(&flex()),
                        examples,
                        cfg,
                        0,
                        Some(&start),
                        s.end_step - 1,
                    )
                    .unwrap();
                    skipped_step(r.state)
                }
                Forgery::OtherExample => {
                    let used = run.batches[from][0];
                    let mut changed = examples.to_vec();
                    let substitute = (1..examples.len())
                        .map(|k| (used + k) % examples.len())
                        .find(|&j| examples[j].tokens != examples[used].tokens)
                        .unwrap();
                    changed[used] = examples[substitute].clone();
                    let r = replay_from(
                        fx.model(&flex()),
                        &changed,
                        cfg,
                        0,
                        Some(&start),
                        s.end_step,
                    )
                    .unwrap();
                    assert_eq!(r.segment.batches, s.batches, "the same indices");
                    r.state
                }
                Forgery::NoiseOnB(k) => noisy_b(
                    &replayed.start_state,
                    &claimed,
                    10f64.powi(-i32::from(k)),
                    s.end_step as u64,
                ),
            };
            out.forged.push((
                f,
                from == 0,
                state_distance(&replayed.start_state, &replayed.state, &forged).relative,
            ));
        }
        previous = s.state;
        from = s.end_step;
    }
    out
}

/// A small job: 12 examples in batches of 2, a segment every 4 steps, 12 steps.
fn small_cfg(lr: f64, seed: u64) -> TrainConfig {
    TrainConfig {
        learning_rate: lr,
        epochs: 3,
        batch_size: 2,
        grad_accum: 1,
        warmup_steps: 2,
        schedule: Schedule::Cosine,
        weight_decay: 0.01,
        seed,
        max_steps: Some(12),
        lora_dropout: 0.0,
        ..TrainConfig::default()
    }
}

/// The tolerance path of `spot_check` on flex alone, with the worker's class reported as
/// another: the honest end state passes (its replay reproduces it bit for bit), a forged end
/// state the worker committed to is refused by its distance, and an end snapshot that is not
/// the committed state is refused as such.
#[test]
fn spot_check_verdicts_on_the_tolerance_path() {
    use cohort_protocol::types::job::JobSpec;
    use cohort_trainer::federated::{
        Audit, JobSetup, SpotMismatch, SpotPass, Verifier, spot_check, train_update,
    };
    let fx = fixture(7);
    let gguf = fx.path.clone();
    let spec: JobSpec = common::tiny_job();
    let setup = JobSetup::from_spec(&spec, &gguf).unwrap();
    let records: Vec<String> = (0..6)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": WORDS[i]},
                {"role": "assistant", "content": WORDS[(i * 3 + 1) % 8]},
            ]})
            .to_string()
        })
        .collect();
    let out = tempfile::tempdir().unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let up = train_update(&setup, None, &records, 9, out.path(), &stop).unwrap();
    assert_eq!(up.segments.len(), 3);
    let (s, start_snap, end_snap) = (up.segments[1], &up.snapshots[1], &up.snapshots[2]);
    assert_eq!((start_snap.step, end_snap.step), (2, 4));
    let verifier = Verifier::local();
    let other = KernelClass {
        backend: "cuda".into(),
        kernel: "sm_90".into(),
        threads: 1,
    };
    assert!(verifier.exact_for(&up.kernel));
    assert!(!verifier.exact_for(&other));
    let audit =
        |worker: &KernelClass, segment, end: Option<&Path>| -> Result<SpotPass, SpotMismatch> {
            let a = Audit {
                segment,
                start_state: Some(start_snap.state),
                start_snapshot: Some(&start_snap.dir),
                end_snapshot: end,
                worker,
            };
            spot_check(&setup, None, &records, 9, &a, &verifier).unwrap()
        };
    // Same class: bit for bit.
    assert_eq!(audit(&up.kernel, s, None), Ok(SpotPass::Reproduced));
    // Another class without its end snapshot: the checker cannot check.
    let a = Audit {
        segment: s,
        start_state: Some(start_snap.state),
        start_snapshot: Some(&start_snap.dir),
        end_snapshot: None,
        worker: &other,
    };
    assert!(spot_check(&setup, None, &records, 9, &a, &verifier).is_err());
    // Another class, honest: flex reproduces the bits anyway.
    assert_eq!(
        audit(&other, s, Some(&end_snap.dir)),
        Ok(SpotPass::Reproduced)
    );

    // Forged end states, committed to by their own hash: B with noise of a size relative to
    // the segment's update of B: 1e-9 of it (under the tolerance) passes within it, 10% does
    // not.
    let before = AdapterWeights::load_peft(&start_snap.dir).unwrap();
    let forge = |rel: f64, name: &str| -> (cohort_trainer::verify::Segment, std::path::PathBuf) {
        let forged = out.path().join(name);
        copy_dir(&end_snap.dir, &forged);
        let mut w = AdapterWeights::load_peft(&forged).unwrap();
        let mut rng = SplitMix64::new(5);
        for (key, f) in &mut w.factors {
            bump(&mut f.b, Some(&before.factors[key].b), &mut rng, rel);
        }
        w.save_peft(&forged, "checkpoint").unwrap();
        let mut model = Llama::from_gguf(&fx.file, &flex().autodiff()).unwrap();
        attach(&mut model, &setup.lora).unwrap();
        let ex = cohort_trainer::federated::examples(&setup, &records).unwrap();
        let state = snapshot_hash(model, &ex, &setup.train_config(9), &forged).unwrap();
        let mut seg = s;
        seg.state = state;
        (seg, forged)
    };
    let (tiny, tiny_dir) = forge(1e-6 * SPOT_CHECK_TOLERANCE, "tiny");
    assert_ne!(tiny.state, s.state);
    match audit(&other, tiny, Some(&tiny_dir)) {
        Ok(SpotPass::Within(d)) => assert!(d.relative > 0.0 && d.within(SPOT_CHECK_TOLERANCE)),
        other => panic!("{other:?}"),
    }
    // The same class gets no tolerance.
    assert_eq!(audit(&up.kernel, tiny, None), Err(SpotMismatch::State));
    let (big, big_dir) = forge(1e-1, "big");
    match audit(&other, big, Some(&big_dir)) {
        Err(SpotMismatch::Distance { distance, .. }) => {
            assert!((distance.relative - 1e-1).abs() < 1e-2, "{distance:?}");
            assert!(distance.worst.ends_with(" B"), "{distance:?}");
        }
        other => panic!("{other:?}"),
    }
    // An end snapshot that is not the committed state.
    assert_eq!(
        audit(&other, big, Some(&end_snap.dir)),
        Err(SpotMismatch::EndSnapshot)
    );
    // A wrong start.
    let a = Audit {
        segment: s,
        start_state: Some(up.snapshots[0].state),
        start_snapshot: Some(&start_snap.dir),
        end_snapshot: Some(&end_snap.dir),
        worker: &other,
    };
    assert_eq!(
        spot_check(&setup, None, &records, 9, &a, &verifier).unwrap(),
        Err(SpotMismatch::Start)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

// ----- Across kernel classes: flex against ndarray -----

#[cfg(feature = "verify-ndarray")]
#[allow(deprecated)] // burn 0.22 deprecates ndarray; it is the second kernel class here
fn ndarray() -> burn::tensor::Device {
    burn::tensor::Device::ndarray()
}

/// A run trained on flex, every segment replayed on ndarray: each honest segment is within the
/// tolerance of the worker's end state (but not bit-identical: exact comparison would accuse),
/// and each with a skipped optimizer step is not.
#[cfg(feature = "verify-ndarray")]
#[test]
fn an_honest_segment_passes_on_another_kernel_class_and_a_skipped_step_does_not() {
    let fx = fixture(7);
    let ex = examples(&fx, 0, 12);
    let dir = tempfile::tempdir().unwrap();
    let r = run_case(
        &fx,
        &ex,
        &small_cfg(1e-3, 3),
        4,
        &ndarray(),
        &[Forgery::SkippedStep],
        dir.path(),
    );
    assert_eq!(r.honest.len(), 3);
    eprintln!("honest distances {:?}, forged {:?}", r.honest, r.forged);
    for (i, d) in r.honest.iter().enumerate() {
        assert!(*d <= spot_check_tolerance(i == 0), "honest {d:e}");
    }
    assert!(
        r.honest.iter().any(|d| *d > 0.0),
        "ndarray's bits differ from flex's: comparing hashes would accuse"
    );
    assert_eq!(r.forged.len(), 3);
    for (_, first, d) in &r.forged {
        assert!(*d > spot_check_tolerance(*first), "skipped step {d:e}");
    }
}

/// Through `spot_check`: a worker on flex, the verifier on ndarray.
#[cfg(feature = "verify-ndarray")]
#[test]
fn spot_check_on_ndarray_accepts_an_honest_flex_worker() {
    use cohort_trainer::federated::{
        Audit, JobSetup, SpotMismatch, SpotPass, Verifier, spot_check, train_update,
    };
    let fx = fixture(8);
    let gguf = fx.path.clone();
    let setup = JobSetup::from_spec(&common::tiny_job(), &gguf).unwrap();
    let records: Vec<String> = (0..6)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": WORDS[i]},
                {"role": "assistant", "content": WORDS[(i * 5 + 2) % 8]},
            ]})
            .to_string()
        })
        .collect();
    let out = tempfile::tempdir().unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let up = train_update(&setup, None, &records, 9, out.path(), &stop).unwrap();
    let verifier = Verifier::ndarray();
    assert!(!verifier.exact_for(&up.kernel));
    for (i, s) in up.segments.iter().enumerate() {
        let start = (i > 0).then(|| &up.snapshots[i]);
        let a = Audit {
            segment: *s,
            start_state: start.map(|p| p.state),
            start_snapshot: start.map(|p| p.dir.as_path()),
            end_snapshot: Some(&up.snapshots[i + 1].dir),
            worker: &up.kernel,
        };
        let verdict = spot_check(&setup, None, &records, 9, &a, &verifier).unwrap();
        eprintln!("segment {i}: {verdict:?}");
        assert!(matches!(verdict, Ok(SpotPass::Within(_))), "{verdict:?}");
        // Held to the exact path instead (as if the worker had reported ndarray's class),
        // the same honest segment would be refused.
        let exact = Audit {
            worker: &verifier.kernel,
            ..a
        };
        assert_eq!(
            spot_check(&setup, None, &records, 9, &exact, &verifier).unwrap(),
            Err(SpotMismatch::State)
        );
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// The measurement behind `SPOT_CHECK_TOLERANCE` (BENCHMARKS.md, "Spot checks across kernel
/// classes"): many honest segments trained on flex and replayed on ndarray (5 generated
/// models, 4 learning rates, 24 training seeds, each seed its own data shard, dropout and
/// gradient accumulation on in some runs), their distances from the worker's end states, and
/// the distances of forged end states.
#[cfg(feature = "verify-ndarray")]
#[test]
#[ignore = "a measurement: minutes"]
fn measure_tolerance_across_kernel_classes() {
    use std::collections::BTreeMap;
    let forgeries = MEASURED_FORGERIES;
    let started = std::time::Instant::now();
    // Index 0: the runs' first segments (from step 0: a fresh optimizer); 1: the others.
    let mut honest: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut by_lr: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut forged: [BTreeMap<Forgery, Vec<f64>>; 2] = [BTreeMap::new(), BTreeMap::new()];
    let mut runs = 0;
    let mut worst: Vec<(f64, String)> = Vec::new();
    for model_seed in [7, 8, 9, 10, 11] {
        let fx = fixture(model_seed);
        for (li, lr) in [1e-4, 1e-3, 1e-2, 3e-2].into_iter().enumerate() {
            for seed in 0..24u64 {
                let ex = examples(&fx, seed + 10 * model_seed, 12);
                let mut cfg = small_cfg(lr, seed);
                if seed % 2 == 1 {
                    cfg.lora_dropout = 0.1;
                }
                if seed % 4 == 2 {
                    cfg.batch_size = 1;
                    cfg.grad_accum = 2;
                }
                if li % 2 == 1 {
                    cfg.schedule = Schedule::Constant;
                    cfg.weight_decay = 0.0;
                }
                let dir = tempfile::tempdir().unwrap();
                let r = run_case(&fx, &ex, &cfg, 4, &ndarray(), &forgeries, dir.path());
                runs += 1;
                by_lr
                    .entry(format!("{lr:e}"))
                    .or_default()
                    .extend(&r.honest);
                for (i, d) in r.honest.iter().enumerate() {
                    honest[usize::from(i > 0)].push(*d);
                }
                worst.extend(r.honest_at.into_iter().map(|(d, at, end)| {
                    (
                        d,
                        format!("model {model_seed} lr {lr:e} seed {seed} step {end}: {at}"),
                    )
                }));
                for (f, first, d) in r.forged {
                    forged[usize::from(!first)].entry(f).or_default().push(d);
                }
            }
            eprintln!(
                "model {model_seed} lr {lr:e}: {} runs, {:.0} s",
                runs,
                started.elapsed().as_secs_f64()
            );
        }
    }
    eprintln!("\n{runs} runs, {:.0} s", started.elapsed().as_secs_f64());
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    for first in [true, false] {
        eprintln!(
            "  largest honest distances, {} segments:",
            ["later", "first"][usize::from(first)]
        );
        let of_kind = worst
            .iter()
            .filter(|(_, at)| at.contains(" step 4: ") == first);
        for (d, at) in of_kind.take(5) {
            eprintln!("    {d:.2e} at {at}");
        }
    }
    for (lr, mut ds) in by_lr {
        ds.sort_by(f64::total_cmp);
        eprintln!(
            "  lr {lr}: N {}, median {:.2e}, max {:.2e}",
            ds.len(),
            percentile(&ds, 0.5),
            ds.last().copied().unwrap_or(f64::NAN)
        );
    }
    let refused = summarize(&mut honest, &mut forged);
    assert_eq!(refused, [0, 0], "a false accusation");
}

/// Prints the honest distances' statistics and, for candidate tolerances, how many honest
/// segments each would refuse and how many forgeries of each kind it would let pass (by
/// first and later segments); returns how many honest segments the chosen tolerances refuse.
fn summarize(
    honest: &mut [Vec<f64>; 2],
    forged: &mut [std::collections::BTreeMap<Forgery, Vec<f64>>; 2],
) -> [usize; 2] {
    let candidates: [&[f64]; 2] = [
        &[3e-3, 1e-2, 3e-2, 5e-2, 1e-1, 2e-1, 3e-1],
        &[1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 1e-2, 3e-2, 5e-2, 1e-1],
    ];
    for which in 0..2 {
        let tau = spot_check_tolerance(which == 0);
        let h = &mut honest[which];
        h.sort_by(f64::total_cmp);
        eprintln!(
            "\n{} segments: honest (flex -> ndarray) N {}, zero {}, median {:.2e}, p99 {:.2e}, \
             max {:.2e}; refused at tau {tau:e}: {}",
            ["first", "later"][which],
            h.len(),
            h.iter().filter(|d| **d == 0.0).count(),
            percentile(h, 0.5),
            percentile(h, 0.99),
            h.last().copied().unwrap_or(f64::NAN),
            h.iter().filter(|d| **d > tau).count()
        );
        for ds in forged[which].values_mut() {
            ds.sort_by(f64::total_cmp);
        }
        for (f, ds) in &forged[which] {
            eprintln!(
                "  forged {f:?}: N {}, min {:.2e}, median {:.2e}, detected at tau: {}",
                ds.len(),
                ds[0],
                percentile(ds, 0.5),
                ds.iter().filter(|d| **d > tau).count()
            );
        }
        eprintln!("  tau | honest refused | forgeries passed, by kind");
        for &t in candidates[which] {
            let line: Vec<String> = forged[which]
                .iter()
                .map(|(f, ds)| {
                    format!(
                        "{f:?} {}/{}",
                        ds.iter().filter(|d| **d <= t).count(),
                        ds.len()
                    )
                })
                .collect();
            eprintln!(
                "  {t:e} | {}/{} | {}",
                h.iter().filter(|d| **d > t).count(),
                h.len(),
                line.join(", ")
            );
        }
    }
    [0, 1].map(|which| {
        let tau = spot_check_tolerance(which == 0);
        honest[which].iter().filter(|d| **d > tau).count()
    })
}

/// The same measurement on the default model (SmolLM2-135M-Instruct, Q4_1, 30 layers): runs
/// trained on flex, every segment replayed on ndarray, with the same forgeries; then two jobs
/// spot-checked on ndarray through `spot_check` (BENCHMARKS.md, "Spot checks across kernel
/// classes"). Skipped when the model is not in the cache.
///
/// ```text
/// cargo test -p cohort-trainer --features verify-ndarray --test tolerance -- \
///     --ignored --nocapture measure_tolerance_on_the_default_model
/// ```
#[cfg(feature = "verify-ndarray")]
#[test]
#[ignore = "a measurement on the default model: minutes"]
fn measure_tolerance_on_the_default_model() {
    use std::collections::BTreeMap;
    let path = cohort_trainer::models::default_model_path();
    if !path.is_file() {
        eprintln!(
            "skipped: {} is missing (run scripts/fetch-model.sh)",
            path.display()
        );
        return;
    }
    let fx = Fx {
        _dir: tempfile::tempdir().unwrap(),
        file: GgufFile::open(&path).unwrap(),
        path,
        spec: LoraSpec {
            rank: 8,
            alpha: 16.0,
            seed: 5,
            targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
            ..LoraSpec::default()
        },
    };
    let forgeries = MEASURED_FORGERIES;
    let started = std::time::Instant::now();
    let mut honest: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut forged: [BTreeMap<Forgery, Vec<f64>>; 2] = [BTreeMap::new(), BTreeMap::new()];
    let mut worst: Vec<(f64, String)> = Vec::new();
    for lr in [1e-4, 1e-3, 1e-2] {
        for seed in 0..4u64 {
            let ex = examples(&fx, seed + 100, 12);
            let cfg = small_cfg(lr, seed);
            let dir = tempfile::tempdir().unwrap();
            let r = run_case(&fx, &ex, &cfg, 4, &ndarray(), &forgeries, dir.path());
            for (i, (d, at, end)) in r.honest_at.into_iter().enumerate() {
                honest[usize::from(i > 0)].push(d);
                worst.push((d, format!("lr {lr:e} seed {seed} step {end}: {at}")));
            }
            for (f, first, d) in r.forged {
                forged[usize::from(!first)].entry(f).or_default().push(d);
            }
            eprintln!(
                "lr {lr:e} seed {seed}: {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    // And through `spot_check` itself, as a coordinator runs it: a job of 48 arithmetic chats
    // in batches of 4, on the job's own targets.
    let records: Vec<String> = (0..48)
        .map(|i| {
            let (a, b) = (3 + i * 7 % 41, 2 + i * 11 % 37);
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is {a} plus {b}?")},
                {"role": "assistant", "content": format!("{a} plus {b} is {}.", a + b)},
            ]})
            .to_string()
        })
        .collect();
    let verifier = cohort_trainer::federated::Verifier::ndarray();
    for (lr, seed) in [(1e-3, 1u64), (1e-2, 2)] {
        use cohort_protocol::types::job::TargetModule;
        use cohort_trainer::federated::{Audit, JobSetup, SpotPass, spot_check, train_update};
        let mut spec = common::tiny_job();
        spec.adapter.rank = 8;
        spec.adapter.alpha = 16.0;
        spec.adapter.targets = vec![TargetModule::Q, TargetModule::V, TargetModule::Down];
        spec.hyper.learning_rate = lr;
        spec.hyper.epochs = 1;
        spec.hyper.batch_size = 4;
        spec.verification.segment_steps = 4;
        let setup = JobSetup::from_spec(&spec, &fx.path).unwrap();
        let out = tempfile::tempdir().unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let up = train_update(&setup, None, &records, seed, out.path(), &stop).unwrap();
        for (i, s) in up.segments.iter().enumerate() {
            let start = (i > 0).then(|| &up.snapshots[i]);
            let audit = Audit {
                segment: *s,
                start_state: start.map(|p| p.state),
                start_snapshot: start.map(|p| p.dir.as_path()),
                end_snapshot: Some(&up.snapshots[i + 1].dir),
                worker: &up.kernel,
            };
            let verdict = spot_check(&setup, None, &records, seed, &audit, &verifier).unwrap();
            let d = match &verdict {
                Ok(SpotPass::Within(d)) => d.clone(),
                Err(cohort_trainer::federated::SpotMismatch::Distance { distance, .. }) => {
                    distance.clone()
                }
                other => panic!("{other:?}"),
            };
            eprintln!(
                "spot_check, lr {lr:e} seed {seed}, segment ending at step {}: {:.2e} at {} \
                 ({})",
                s.end_step,
                d.relative,
                d.worst,
                if verdict.is_ok() { "passed" } else { "REFUSED" }
            );
            honest[usize::from(i > 0)].push(d.relative);
            worst.push((
                d.relative,
                format!(
                    "spot_check lr {lr:e} seed {seed} step {}: {}",
                    s.end_step, d.worst
                ),
            ));
        }
    }
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (d, at) in worst.iter().take(10) {
        eprintln!("  {d:.2e} at {at}");
    }
    let refused = summarize(&mut honest, &mut forged);
    assert_eq!(refused, [0, 0], "a false accusation");
}
