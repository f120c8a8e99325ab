//! LoRA training on a generated tiny model: gradients against finite differences, the masked loss
//! going down, PEFT save/load round trips, determinism.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::tensor::{DType, Device, Tensor, TensorData};
use cohort_trainer::adapter::{AdapterWeights, LoraSpec, attach};
use cohort_trainer::data::{Batch, Record, Schema, parse_record, tokenize};
use cohort_trainer::gguf::{GgmlType, GgufFile};
use cohort_trainer::model::Llama;
use cohort_trainer::model::weights::Proj;
use cohort_trainer::tokenizer::{ChatTemplate, Tokenizer};
use cohort_trainer::train::{Schedule, TrainConfig, masked_loss, train};
use common::{TOKENIZER_VOCAB, Tiny, temp_gguf, tiny_model_with_tokenizer};

struct Fx {
    _dir: tempfile::TempDir,
    file: GgufFile,
}

fn fixture() -> Fx {
    let mut t = Tiny::new(GgmlType::F32);
    t.vocab = TOKENIZER_VOCAB;
    t.ctx = 128;
    let (bytes, _) = tiny_model_with_tokenizer(&t);
    let (dir, path) = temp_gguf(&bytes);
    Fx {
        _dir: dir,
        file: GgufFile::open(path).unwrap(),
    }
}

fn records() -> Vec<Record> {
    [
        r#"{"messages":[{"role":"user","content":"the tin"},{"role":"assistant","content":"an inn"}]}"#,
        r#"{"messages":[{"role":"user","content":"then"},{"role":"assistant","content":"an inn"}]}"#,
        r#"{"instruction":"tin","input":"","output":"an inn"}"#,
        r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"in"},{"role":"assistant","content":"an inn"}]}"#,
    ]
    .iter()
    .enumerate()
    .map(|(i, line)| {
        let schema = if line.contains("instruction") { Schema::Alpaca } else { Schema::Chat };
        parse_record(schema, line, i + 1).unwrap()
    })
    .collect()
}

#[test]
fn lora_gradients_match_finite_differences() {
    let fx = fixture();
    let device = Device::flex().autodiff();
    let mut model = Llama::from_gguf(&fx.file, &device).unwrap();
    let spec = LoraSpec {
        rank: 2,
        alpha: 2.0,
        targets: vec!["q_proj".into(), "down_proj".into()],
        seed: 3,
        ..LoraSpec::default()
    };
    attach(&mut model, &spec).unwrap();
    // Non-zero B everywhere, so that A has a gradient too.
    let mut weights = AdapterWeights::from_model(&model, &spec);
    for (i, f) in weights.factors.values_mut().enumerate() {
        for (j, b) in f.b.iter_mut().enumerate() {
            *b = ((i * 31 + j * 7) % 13) as f32 / 13.0 - 0.5;
        }
    }
    weights.apply(&mut model).unwrap();
    let tok = Tokenizer::from_gguf(&fx.file).unwrap();
    let tpl = ChatTemplate::from_gguf(&fx.file).unwrap();
    let ex: Vec<_> = records()
        .iter()
        .map(|r| tokenize(r, &tok, &tpl, 64).unwrap())
        .collect();
    let batch = Batch::pad(&ex.iter().collect::<Vec<_>>(), 0);
    let loss = masked_loss(&model, &batch, &device);
    let grads = loss.backward();
    let plain = Device::flex();
    let loss_with = |w: &AdapterWeights| -> f64 {
        let mut m = Llama::from_gguf(&fx.file, &plain).unwrap();
        w.apply(&mut m).unwrap();
        masked_loss(&m, &batch, &plain).into_scalar::<f32>() as f64
    };
    let layer0 = model.layers()[0].projection(Proj::Q).adapter().unwrap();
    let layer1 = model.layers()[1].projection(Proj::Down).adapter().unwrap();
    let checks = [
        (0usize, Proj::Q, 'a', layer0.a.val().grad(&grads).unwrap()),
        (1, Proj::Down, 'b', layer1.b.val().grad(&grads).unwrap()),
    ];
    for (layer, proj, which, grad) in checks {
        let grad: Vec<f32> = grad
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        for idx in [0usize, 5, 17, grad.len() - 1] {
            let eps = 3e-3f32;
            let key = (layer, Proj::ALL.iter().position(|p| *p == proj).unwrap());
            let bumped = |delta: f32| {
                let mut w = weights.clone();
                let f = w.factors.get_mut(&key).unwrap();
                if which == 'a' {
                    f.a[idx] += delta;
                } else {
                    f.b[idx] += delta;
                }
                w
            };
            let (plus, minus) = (bumped(eps), bumped(-eps));
            let numeric = (loss_with(&plus) - loss_with(&minus)) / (2.0 * eps as f64);
            let analytic = grad[idx] as f64;
            let tol = 2e-3 + 2e-2 * numeric.abs().max(analytic.abs());
            assert!(
                (numeric - analytic).abs() < tol,
                "layer {layer} {proj:?}.{which}[{idx}]: autodiff {analytic:e}, finite difference {numeric:e}"
            );
        }
    }
}

fn trained(fx: &Fx, seed: u64, steps: usize) -> (Vec<f64>, AdapterWeights) {
    let device = Device::flex().autodiff();
    let mut model = Llama::from_gguf(&fx.file, &device).unwrap();
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        seed,
        ..LoraSpec::default()
    };
    attach(&mut model, &spec).unwrap();
    let tok = Tokenizer::from_gguf(&fx.file).unwrap();
    let tpl = ChatTemplate::from_gguf(&fx.file).unwrap();
    let ex: Vec<_> = records()
        .iter()
        .map(|r| tokenize(r, &tok, &tpl, 64).unwrap())
        .collect();
    let cfg = TrainConfig {
        learning_rate: 1e-2,
        epochs: 100,
        batch_size: 2,
        grad_accum: 2,
        warmup_steps: 2,
        schedule: Schedule::Cosine,
        seed,
        max_steps: Some(steps),
        ..TrainConfig::default()
    };
    let mut losses = Vec::new();
    let model = train(model, &ex, &cfg, 0, |e| losses.push(e.loss)).unwrap();
    (losses, AdapterWeights::from_model(&model, &spec))
}

#[test]
fn training_drives_the_masked_loss_down_and_is_deterministic() {
    let fx = fixture();
    let (losses, weights) = trained(&fx, 5, 30);
    assert_eq!(losses.len(), 30);
    let first = losses[0];
    let last = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    eprintln!("loss {first:.3} -> {last:.3}");
    assert!(last < first / 4.0, "loss {first} -> {last} in 30 steps");
    let (again, weights2) = trained(&fx, 5, 30);
    assert_eq!(losses, again, "same seed, same losses");
    assert_eq!(weights, weights2, "same seed, same adapter bits");
}

#[test]
fn peft_save_and_load_round_trip_and_the_adapter_changes_the_output() {
    let fx = fixture();
    let (_, weights) = trained(&fx, 9, 6);
    let dir = tempfile::tempdir().unwrap();
    weights.save_peft(dir.path(), "tiny-test").unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["peft_type"].as_str(), cfg["r"].as_u64()),
        (Some("LORA"), Some(4))
    );
    let loaded = AdapterWeights::load_peft(dir.path()).unwrap();
    assert_eq!(loaded, weights);
    let device = Device::flex();
    let logits = |w: Option<&AdapterWeights>| -> Vec<f32> {
        let mut m = Llama::from_gguf(&fx.file, &device).unwrap();
        if let Some(w) = w {
            w.apply(&mut m).unwrap();
        }
        let input = Tensor::<2, burn::tensor::Int>::from_data(
            TensorData::new(vec![40i64, 41, 42], [1, 3]),
            &device,
        );
        m.forward(input, None)
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap()
    };
    let (base, adapted) = (logits(None), logits(Some(&loaded)));
    assert!(
        base.iter().zip(&adapted).any(|(a, b)| (a - b).abs() > 1e-3),
        "the adapter changes nothing"
    );
    let _ = Tensor::<1>::zeros([1], (&device, DType::F32));
}

#[test]
fn dataset_records_are_validated_with_line_and_field() {
    let cases = [
        (Schema::Chat, r#"{"messages":[]}"#, "messages\" is empty"),
        (
            Schema::Chat,
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
            "last message must be the assistant",
        ),
        (
            Schema::Chat,
            r#"{"messages":[{"role":"robot","content":"hi"},{"role":"assistant","content":"x"}]}"#,
            "messages[0].role",
        ),
        (
            Schema::Chat,
            r#"{"messages":[{"role":"user","content":" "},{"role":"assistant","content":"x"}]}"#,
            "messages[0].content is empty",
        ),
        (
            Schema::Alpaca,
            r#"{"instruction":"x","output":""}"#,
            "\"output\" is empty",
        ),
        (
            Schema::Alpaca,
            r#"{"instruction":"x","output":"y","extra":1}"#,
            "unknown field",
        ),
        (Schema::Chat, "not json", "not a chat record"),
    ];
    for (schema, text, want) in cases {
        let err = parse_record(schema, text, 7).unwrap_err();
        assert!(err.contains(want), "{text}: {err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    std::fs::write(
        &path,
        "{\"instruction\":\"a\",\"output\":\"b\"}\n\n{\"instruction\":\"\",\"output\":\"b\"}\n",
    )
    .unwrap();
    let err = cohort_trainer::data::read_jsonl(&path, Schema::Alpaca)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("d.jsonl:3:") && err.contains("instruction"),
        "{err}"
    );
}

#[test]
fn only_assistant_tokens_are_targets() {
    let fx = fixture();
    let tok = Tokenizer::from_gguf(&fx.file).unwrap();
    let tpl = ChatTemplate::from_gguf(&fx.file).unwrap();
    let r = &records()[0];
    let ex = tokenize(r, &tok, &tpl, 256).unwrap();
    let target_text = tok.decode(
        &ex.tokens
            .iter()
            .zip(&ex.target_mask)
            .filter(|(_, m)| **m)
            .map(|(t, _)| *t)
            .collect::<Vec<_>>(),
    );
    assert_eq!(target_text, "an inn<|im_end|>\n");
    let all = tok.decode(&ex.tokens);
    assert_eq!(all, tpl.render(&r.messages, false).unwrap());
}

#[test]
fn the_cpu_engine_applies_an_adapter_like_the_burn_model() {
    use cohort_trainer::engine::{Engine, EngineCache, Logits};
    let fx = fixture();
    let (_, weights) = trained(&fx, 4, 5);
    let device = Device::flex();
    let mut m = Llama::from_gguf(&fx.file, &device).unwrap();
    weights.apply(&mut m).unwrap();
    let tokens = [40u32, 41, 42, 100, 7];
    let ids: Vec<i64> = tokens.iter().map(|t| *t as i64).collect();
    let input =
        Tensor::<2, burn::tensor::Int>::from_data(TensorData::new(ids, [1, tokens.len()]), &device);
    let want: Vec<f32> = m
        .forward(input, None)
        .unwrap()
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let mut engine = Engine::from_gguf(&fx.file).unwrap();
    let base = engine
        .forward(&tokens, &mut EngineCache::new(), Logits::All)
        .unwrap();
    engine.set_adapter(Some(weights)).unwrap();
    let got = engine
        .forward(&tokens, &mut EngineCache::new(), Logits::All)
        .unwrap();
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let moved = base
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff < 1e-3 * (1.0 + moved),
        "engine vs burn with the adapter: {diff} (the adapter moves logits by {moved})"
    );
    assert!(
        moved > 1e-2,
        "the adapter barely changes the logits: {moved}"
    );
}

#[test]
fn merging_adapters_and_merging_into_the_base() {
    use cohort_trainer::adapter::{MergeMethod, merge_adapters, merge_into_base};
    use cohort_trainer::engine::{Engine, EngineCache, Logits};
    let fx = fixture();
    let (_, a1) = trained(&fx, 21, 4);
    // A second adapter trained from the same seed shares A's start but not its end.
    let (_, a2) = trained(&fx, 22, 6);
    let tokens = [40u32, 41, 42, 100, 7];
    let run = |adapter: Option<cohort_trainer::adapter::AdapterWeights>| -> Vec<f32> {
        let mut e = Engine::from_gguf(&fx.file).unwrap();
        e.set_adapter(adapter).unwrap();
        e.forward(&tokens, &mut EngineCache::new(), Logits::All)
            .unwrap()
    };
    // Full-rank exact merge of (a1, a1) is a1 itself, functionally.
    let (same, errs) =
        merge_adapters(&[(1.0, &a1), (3.0, &a1)], MergeMethod::ExactFullRank).unwrap();
    assert!(errs.values().all(|e| *e < 1e-6));
    let (x, y) = (run(Some(a1.clone())), run(Some(same)));
    assert!(x.iter().zip(&y).all(|(p, q)| (p - q).abs() < 1e-4));
    // The exact full-rank merge of two different adapters equals applying half of each delta,
    // which (the model being linear in each projection's delta) is checked on the weights: the
    // merged product equals the average of the products.
    let (m, _) = merge_adapters(&[(1.0, &a1), (1.0, &a2)], MergeMethod::ExactFullRank).unwrap();
    for (key, f) in &m.factors {
        let dense = |f: &cohort_trainer::adapter::Factors, r: usize| -> Vec<f32> {
            let mut out = vec![0f32; f.d_out * f.d_in];
            for i in 0..f.d_out {
                for j in 0..f.d_in {
                    out[i * f.d_in + j] =
                        (0..r).map(|t| f.b[i * r + t] * f.a[t * f.d_in + j]).sum();
                }
            }
            out
        };
        let (p, q, got) = (
            dense(&a1.factors[key], 4),
            dense(&a2.factors[key], 4),
            dense(f, m.spec.rank),
        );
        for ((x, y), z) in p.iter().zip(&q).zip(&got) {
            assert!(((x + y) / 2.0 - z).abs() < 1e-5, "{key:?}");
        }
    }
    assert!((m.spec.scaling() - a1.spec.scaling()).abs() < 1e-6);
    // Merged into the base (F32), the model computes what base + adapter computes.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged.gguf");
    merge_into_base(&fx.file, &a1, GgmlType::F32, &out).unwrap();
    let merged = Engine::from_gguf(&GgufFile::open(&out).unwrap()).unwrap();
    let got = merged
        .forward(&tokens, &mut EngineCache::new(), Logits::All)
        .unwrap();
    let diff = got
        .iter()
        .zip(&x)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-3, "merged model vs base + adapter: {diff}");
}

#[test]
fn a_run_resumed_from_a_checkpoint_ends_with_the_same_bits() {
    use cohort_trainer::train::{Checkpointing, train_with};
    let fx = fixture();
    let tok = Tokenizer::from_gguf(&fx.file).unwrap();
    let tpl = ChatTemplate::from_gguf(&fx.file).unwrap();
    let ex: Vec<_> = records()
        .iter()
        .map(|r| tokenize(r, &tok, &tpl, 64).unwrap())
        .collect();
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        seed: 12,
        ..LoraSpec::default()
    };
    let cfg = TrainConfig {
        learning_rate: 1e-2,
        epochs: 4,
        batch_size: 2,
        warmup_steps: 1,
        seed: 12,
        ..TrainConfig::default()
    };
    let fresh = || {
        let mut m = Llama::from_gguf(&fx.file, &Device::flex().autodiff()).unwrap();
        attach(&mut m, &spec).unwrap();
        m
    };
    let straight = train(fresh(), &ex, &cfg, 0, |_| {}).unwrap();
    let want = AdapterWeights::from_model(&straight, &spec);
    // The same run, checkpointing every 3 steps, killed during step 4 (a panic out of the
    // progress callback), then resumed from the checkpoint of step 3.
    let dir = tempfile::tempdir().unwrap();
    let ck = Checkpointing {
        dir: dir.path().to_path_buf(),
        every: 3,
        resume: true,
        spec: spec.clone(),
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train_with(fresh(), &ex, &cfg, 0, Some(&ck), |e| {
            if e.step == 4 {
                panic!("interrupted");
            }
        })
    }));
    assert!(r.is_err(), "the first run was meant to be interrupted");
    assert!(dir.path().join("checkpoint/state.json").is_file());
    let mut steps_after = Vec::new();
    let resumed = train_with(fresh(), &ex, &cfg, 0, Some(&ck), |e| {
        steps_after.push(e.step)
    })
    .unwrap();
    assert_eq!(
        steps_after.first(),
        Some(&4),
        "resumed after the checkpoint at step 3"
    );
    assert_eq!(
        AdapterWeights::from_model(&resumed, &spec),
        want,
        "bit-identical to the uninterrupted run"
    );
}

#[test]
fn lora_dropout_is_seeded_and_still_learns() {
    let fx = fixture();
    let tok = Tokenizer::from_gguf(&fx.file).unwrap();
    let tpl = ChatTemplate::from_gguf(&fx.file).unwrap();
    let ex: Vec<_> = records()
        .iter()
        .map(|r| tokenize(r, &tok, &tpl, 64).unwrap())
        .collect();
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        seed: 2,
        dropout: 0.3,
        ..LoraSpec::default()
    };
    let run = |p: f32| {
        let mut m = Llama::from_gguf(&fx.file, &Device::flex().autodiff()).unwrap();
        attach(&mut m, &spec).unwrap();
        let cfg = TrainConfig {
            learning_rate: 1e-2,
            epochs: 40,
            batch_size: 2,
            seed: 2,
            lora_dropout: p,
            max_steps: Some(20),
            ..TrainConfig::default()
        };
        let mut losses = Vec::new();
        let m = train(m, &ex, &cfg, 0, |e| losses.push(e.loss)).unwrap();
        (losses, AdapterWeights::from_model(&m, &spec))
    };
    let (l1, w1) = run(0.3);
    let (_, w2) = run(0.3);
    let (_, w0) = run(0.0);
    assert_eq!(
        w1, w2,
        "the same seed gives the same masks and the same adapter"
    );
    assert_ne!(w1, w0, "dropout changes training");
    assert!(l1[l1.len() - 1] < l1[0] / 2.0, "still learns: {:?}", l1);
    let bad = TrainConfig {
        lora_dropout: 1.0,
        ..TrainConfig::default()
    };
    assert!(bad.validate().is_err());
}
