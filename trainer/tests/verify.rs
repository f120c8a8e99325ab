//! Spot-check re-execution on a generated tiny model: every segment of a run replays from its
//! snapshot to the committed hash bit for bit; a changed example or one flipped bit in a snapshot
//! does not; the state hash follows its documented byte layout (recomputed here from the
//! snapshot's files); and how the bits depend on the thread count.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use burn::store::burn_pack::{Reader, Scalar};
use burn::tensor::{Device, TensorData};
use cohort_protocol::ContentHash;
use cohort_trainer::adapter::{AdapterWeights, LoraSpec, attach, param_ids};
use cohort_trainer::data::{Example, Record, Schema, parse_record, tokenize};
use cohort_trainer::gguf::{GgmlType, GgufFile};
use cohort_trainer::model::Llama;
use cohort_trainer::model::weights::Proj;
use cohort_trainer::tokenizer::{ChatTemplate, Tokenizer};
use cohort_trainer::train::{Schedule, TrainConfig, train};
use cohort_trainer::verify::{
    Segment, Segmenting, VerifyError, batch_leaf, merkle_root, replay_segment,
    replay_segment_model, snapshot_hash, snapshot_path, train_segmented,
};
use common::{TOKENIZER_VOCAB, Tiny, temp_gguf, tiny_model_with_tokenizer};

/// Segment length used throughout: with 3 steps an epoch, segments start mid-epoch.
const K: usize = 4;

struct Fx {
    _dir: tempfile::TempDir,
    file: GgufFile,
    examples: Vec<Example>,
    spec: LoraSpec,
    cfg: TrainConfig,
}

fn records() -> Vec<Record> {
    [
        r#"{"messages":[{"role":"user","content":"the tin"},{"role":"assistant","content":"an inn"}]}"#,
        r#"{"messages":[{"role":"user","content":"then"},{"role":"assistant","content":"an inn"}]}"#,
        r#"{"instruction":"tin","input":"","output":"an inn"}"#,
        r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"in"},{"role":"assistant","content":"the tin"}]}"#,
        r#"{"messages":[{"role":"user","content":"inn"},{"role":"assistant","content":"then the tin"}]}"#,
    ]
    .iter()
    .enumerate()
    .map(|(i, line)| {
        let schema = if line.contains("instruction") { Schema::Alpaca } else { Schema::Chat };
        parse_record(schema, line, i + 1).unwrap()
    })
    .collect()
}

fn fixture() -> Fx {
    let mut t = Tiny::new(GgmlType::F32);
    t.vocab = TOKENIZER_VOCAB;
    t.ctx = 128;
    let (bytes, _) = tiny_model_with_tokenizer(&t);
    let (dir, path) = temp_gguf(&bytes);
    let file = GgufFile::open(path).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let tpl = ChatTemplate::from_gguf(&file).unwrap();
    let examples = records()
        .iter()
        .map(|r| tokenize(r, &tok, &tpl, 64).unwrap())
        .collect();
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        seed: 21,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        ..LoraSpec::default()
    };
    // 5 examples in groups of 2 (batch 1, two micro-batches): 3 steps an epoch, the last group
    // short; 10 steps in all (max_steps), so segments end at 4, 8 and 10. Dropout is on, to
    // check that its seeded masks replay too.
    let cfg = TrainConfig {
        learning_rate: 1e-2,
        epochs: 4,
        batch_size: 1,
        grad_accum: 2,
        warmup_steps: 2,
        schedule: Schedule::Cosine,
        weight_decay: 0.01,
        seed: 21,
        max_steps: Some(10),
        lora_dropout: 0.1,
        ..TrainConfig::default()
    };
    Fx {
        _dir: dir,
        file,
        examples,
        spec,
        cfg,
    }
}

impl Fx {
    fn fresh(&self) -> Llama {
        let mut m = Llama::from_gguf(&self.file, &Device::flex().autodiff()).unwrap();
        attach(&mut m, &self.spec).unwrap();
        m
    }

    fn segmented(&self, dir: &Path) -> (ContentHash, Vec<Segment>, AdapterWeights) {
        let (start, segments, weights, _) = self.segmented_batches(dir);
        (start, segments, weights)
    }

    fn segmented_batches(
        &self,
        dir: &Path,
    ) -> (ContentHash, Vec<Segment>, AdapterWeights, Vec<Vec<usize>>) {
        let seg = Segmenting {
            every: K,
            dir: dir.to_path_buf(),
            spec: self.spec.clone(),
        };
        let mut seen = Vec::new();
        let run = train_segmented(
            self.fresh(),
            &self.examples,
            &self.cfg,
            0,
            &seg,
            |_| {},
            |s| seen.push(*s),
        )
        .unwrap();
        assert_eq!(seen, run.segments, "on_segment saw every commitment");
        // The batch roots are the Merkle roots of the reported batches.
        let mut from = 0;
        for s in &run.segments {
            let leaves: Vec<ContentHash> = (from + 1..=s.end_step)
                .map(|step| batch_leaf(step, &run.batches[step - 1]))
                .collect();
            assert_eq!(merkle_root(&leaves), s.batches);
            from = s.end_step;
        }
        let weights = AdapterWeights::from_model(&run.model, &self.spec);
        (run.start, run.segments, weights, run.batches)
    }
}

/// The step each segment starts from.
fn starts(segments: &[Segment]) -> Vec<usize> {
    std::iter::once(0)
        .chain(segments.iter().map(|s| s.end_step))
        .take(segments.len())
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn every_segment_replays_from_its_snapshot_to_the_committed_hash() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (start, segments, weights) = fx.segmented(dir.path());
    let ends: Vec<usize> = segments.iter().map(|s| s.end_step).collect();
    assert_eq!(
        ends,
        [4, 8, 10],
        "a boundary every K steps and at the last step"
    );
    // Committing does not change what is trained.
    let plain = train(fx.fresh(), &fx.examples, &fx.cfg, 0, |_| {}).unwrap();
    assert_eq!(AdapterWeights::from_model(&plain, &fx.spec), weights);
    // Every state hash differs (the state moves every step).
    let mut all: Vec<ContentHash> = segments.iter().map(|s| s.state).collect();
    all.push(start);
    all.sort_by_key(|h| *h.as_bytes());
    all.dedup();
    assert_eq!(all.len(), segments.len() + 1);

    let mut previous = start;
    for (s, from) in segments.iter().zip(starts(&segments)) {
        let snap = snapshot_path(dir.path(), from);
        assert_eq!(
            snapshot_hash(fx.fresh(), &fx.examples, &fx.cfg, &snap).unwrap(),
            previous,
            "the snapshot at step {from} is the committed state"
        );
        let replayed =
            replay_segment_model(fx.fresh(), &fx.examples, &fx.cfg, 0, &snap, s.end_step).unwrap();
        assert_eq!(replayed.start, previous);
        assert_eq!(
            replayed.segment, *s,
            "segment {from}..{} replayed bit for bit",
            s.end_step
        );
        previous = s.state;
        if s.end_step == 10 {
            assert_eq!(
                AdapterWeights::from_model(&replayed.model, &fx.spec),
                weights
            );
        }
    }
    // The snapshot of the last boundary is there too, and is the final state.
    let last = snapshot_path(dir.path(), 10);
    assert_eq!(
        snapshot_hash(fx.fresh(), &fx.examples, &fx.cfg, &last).unwrap(),
        previous
    );
    // Segments can't run backwards or past the run.
    let snap = snapshot_path(dir.path(), 8);
    for end in [8, 7, 11] {
        let r = replay_segment(fx.fresh(), &fx.examples, &fx.cfg, 0, &snap, end);
        assert!(
            matches!(r, Err(VerifyError::BadSegment(_))),
            "end {end}: {r:?}"
        );
    }
}

#[test]
fn a_segment_trained_on_a_changed_example_does_not_reproduce() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (_, segments, _, batches) = fx.segmented_batches(dir.path());
    // The faked run changes one target token of one example the second segment (steps 5..=8)
    // used.
    let (from, s) = (segments[0].end_step, segments[1]);
    let used = batches[from][0];
    let mut faked = fx.examples.clone();
    let e = &mut faked[used];
    let last = e.tokens.len() - 1;
    assert!(e.target_mask[last], "the last token is a target");
    e.tokens[last] = (e.tokens[last] + 1) % TOKENIZER_VOCAB as u32;
    let snap = snapshot_path(dir.path(), from);
    let replayed = replay_segment(fx.fresh(), &faked, &fx.cfg, 0, &snap, s.end_step).unwrap();
    assert_eq!(
        replayed.batches, s.batches,
        "the same indices (the batch root binds which examples, not their contents)"
    );
    assert_ne!(replayed.state, s.state, "a faked segment is caught");
    // And the honest data still reproduces.
    let honest = replay_segment(fx.fresh(), &fx.examples, &fx.cfg, 0, &snap, s.end_step).unwrap();
    assert_eq!(honest, s);
    // A different seed visits the examples in another order: the batch root changes.
    let other = TrainConfig {
        seed: fx.cfg.seed + 1,
        ..fx.cfg.clone()
    };
    let dir2 = tempfile::tempdir().unwrap();
    let run = train_segmented(
        fx.fresh(),
        &fx.examples,
        &other,
        0,
        &Segmenting {
            every: K,
            dir: dir2.path().to_path_buf(),
            spec: fx.spec.clone(),
        },
        |_| {},
        |_| {},
    )
    .unwrap();
    assert_ne!(run.segments[0].batches, segments[0].batches);
}

#[test]
fn one_flipped_bit_in_a_snapshot_changes_the_hashes() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (_, segments, _) = fx.segmented(dir.path());
    let (committed_start, s) = (segments[0].state, segments[1]);
    // Bit 0 is the lowest of the mantissa, bit 22 the highest.
    for bit in [0, 22] {
        let tampered = tempfile::tempdir().unwrap();
        copy_dir(
            &snapshot_path(dir.path(), segments[0].end_step),
            tampered.path(),
        );
        let mut w = AdapterWeights::load_peft(tampered.path()).unwrap();
        let f = w.factors.values_mut().next().unwrap();
        f.a[5] = f32::from_bits(f.a[5].to_bits() ^ (1 << bit));
        w.save_peft(tampered.path(), "checkpoint").unwrap();
        assert_ne!(
            snapshot_hash(fx.fresh(), &fx.examples, &fx.cfg, tampered.path()).unwrap(),
            committed_start,
            "bit {bit}: the snapshot no longer matches the commitment it claims"
        );
        let replayed = replay_segment(
            fx.fresh(),
            &fx.examples,
            &fx.cfg,
            0,
            tampered.path(),
            s.end_step,
        )
        .unwrap();
        assert_eq!(replayed.batches, s.batches);
        // One ulp can be rounded away by K steps (weight decay multiplies by a factor just
        // under 1, which maps neighbouring floats to one): the start hash is what must be
        // checked. A larger change survives.
        eprintln!(
            "bit {bit} of A[5] flipped at step {}: end hash at step {} {}",
            segments[0].end_step,
            s.end_step,
            if replayed.state == s.state {
                "unchanged (absorbed)"
            } else {
                "changed"
            }
        );
        if bit == 22 {
            assert_ne!(replayed.state, s.state, "bit {bit}: nor does its replay");
        }
    }
}

/// The state hash recomputed from a snapshot's files by the layout in `state_hash`'s docs.
fn documented_hash(fx: &Fx, snap: &Path, step: usize) -> ContentHash {
    let w = AdapterWeights::load_peft(snap).unwrap();
    let reader = Reader::from_file(snap.join("optimizer.bpk")).unwrap();
    let scalars = reader.scalars().clone();
    let mut tensors = std::collections::BTreeMap::new();
    for t in reader.into_tensors().unwrap() {
        let (name, dtype, shape, _, bytes) = t.into_parts().unwrap();
        let data = TensorData::from_bytes(bytes, shape, dtype);
        tensors.insert(name, data.as_slice::<f32>().unwrap().to_vec());
    }
    let mut bytes = b"cohort/train-state/v1".to_vec();
    let u64s = |bytes: &mut Vec<u8>, vs: &[usize]| {
        for v in vs {
            bytes.extend_from_slice(&(*v as u64).to_le_bytes());
        }
    };
    u64s(&mut bytes, &[step, w.factors.len()]);
    for (&(layer, pi), f) in &w.factors {
        u64s(&mut bytes, &[layer, pi, fx.spec.rank, f.d_in, f.d_out]);
        for v in f.a.iter().chain(&f.b) {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let (ia, ib) = param_ids(layer, Proj::ALL[pi]);
        for id in [ia, ib] {
            let time = scalars.get(&format!("{id}.momentum.time"));
            match time {
                None => bytes.push(0),
                Some(t) => {
                    bytes.push(1);
                    let t = match t {
                        Scalar::UInt(t) => *t as usize,
                        Scalar::Int(t) => *t as usize,
                        other => panic!("time is {other:?}"),
                    };
                    u64s(&mut bytes, &[t]);
                    for m in ["moment_1", "moment_2"] {
                        for v in &tensors[&format!("{id}.momentum.{m}")] {
                            bytes.extend_from_slice(&v.to_le_bytes());
                        }
                    }
                    bytes.push(0);
                }
            }
        }
    }
    ContentHash::of(&bytes)
}

#[test]
fn the_state_hash_follows_its_documented_layout() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (start, segments, _) = fx.segmented(dir.path());
    assert_eq!(
        documented_hash(&fx, &snapshot_path(dir.path(), 0), 0),
        start
    );
    for s in &segments {
        let snap = snapshot_path(dir.path(), s.end_step);
        assert_eq!(
            documented_hash(&fx, &snap, s.end_step),
            s.state,
            "step {}",
            s.end_step
        );
    }
}

/// Long examples (cut to 64 tokens) in batches of 2: the projections' matrix products are
/// 128 x 256 x 512 and larger, over flex's threshold (192³) for splitting a product across
/// rayon's threads, so the thread count reaches the arithmetic.
fn long_fixture() -> Fx {
    let mut fx = fixture();
    let tok = Tokenizer::from_gguf(&fx.file).unwrap();
    let tpl = ChatTemplate::from_gguf(&fx.file).unwrap();
    let text = |i: usize| {
        let words = ["the", "tin", "an", "inn", "then", "in"];
        (0..40)
            .map(|j| words[(i * 7 + j * 3 + j / 5) % words.len()])
            .collect::<Vec<_>>()
            .join(" ")
    };
    fx.examples = (0..4)
        .map(|i| {
            let line = format!(
                r#"{{"messages":[{{"role":"user","content":"{}"}},{{"role":"assistant","content":"{}"}}]}}"#,
                ["tin", "inn", "then", "an"][i],
                text(i)
            );
            let r = parse_record(Schema::Chat, &line, i + 1).unwrap();
            tokenize(&r, &tok, &tpl, 64).unwrap()
        })
        .collect();
    for e in &fx.examples {
        assert_eq!((e.tokens.len(), e.truncated), (64, true));
        assert!(e.target_count() > 32);
    }
    fx.cfg = TrainConfig {
        batch_size: 2,
        grad_accum: 1,
        epochs: 3,
        max_steps: Some(6),
        ..fx.cfg.clone()
    };
    fx
}

#[test]
fn thread_count_and_replayed_bits() {
    let fx = long_fixture();
    let dir = tempfile::tempdir().unwrap();
    let pool = |n: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    let (_, segments, _) = pool(2).install(|| fx.segmented(dir.path()));
    let s = segments[1];
    assert_eq!((segments[0].end_step, s.end_step), (4, 6));
    let snap = snapshot_path(dir.path(), 4);
    let replay = |n: usize| {
        pool(n).install(|| {
            let r = replay_segment_model(fx.fresh(), &fx.examples, &fx.cfg, 0, &snap, s.end_step)
                .unwrap();
            (r.segment, AdapterWeights::from_model(&r.model, &fx.spec))
        })
    };
    let (same, reference) = replay(2);
    assert_eq!(same, s, "the same thread count reproduces the commitment");
    let flat = |w: &AdapterWeights| -> Vec<f64> {
        w.factors
            .values()
            .flat_map(|f| f.a.iter().chain(&f.b))
            .map(|v| f64::from(*v))
            .collect()
    };
    let want = flat(&reference);
    let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt();
    for n in [1, 3, 4] {
        let (seg, w) = replay(n);
        let got = flat(&w);
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        let differing = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        eprintln!(
            "replay of steps 5..=6 with {n} rayon threads vs 2: state hash {}, adapter \
             relative difference {:.3e} ({differing} of {} values differ)",
            if seg.state == s.state {
                "equal"
            } else {
                "different"
            },
            diff / norm,
            got.len()
        );
        assert_eq!(seg.batches, s.batches);
        assert!(diff / norm < 1e-3, "{n} threads: {:.3e}", diff / norm);
    }
}
