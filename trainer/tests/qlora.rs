//! QLoRA: the frozen base kept in its quantized blocks. The reference for its hand-written
//! backward pass is burn's own autodiff of the ordinary f32 model built from the same blocks
//! (the LoRA path): same loss, same adapter gradients, same training run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::tensor::{Device, Tensor};
use cohort_trainer::adapter::{AdapterWeights, LoraSpec, attach};
use cohort_trainer::data::{Batch, Example, Schema, parse_record, tokenize};
use cohort_trainer::gguf::{GgmlType, GgufFile};
use cohort_trainer::model::weights::Proj;
use cohort_trainer::model::{BaseWeights, Frozen, Llama, Weights};
use cohort_trainer::tokenizer::{ChatTemplate, Tokenizer};
use cohort_trainer::train::{Schedule, TrainConfig, masked_loss, train};
use common::{TOKENIZER_VOCAB, Tiny, temp_gguf, tiny_model_with_tokenizer};

struct Fx {
    _dir: tempfile::TempDir,
    file: GgufFile,
    examples: Vec<Example>,
}

fn fixture(proj_ty: GgmlType) -> Fx {
    let mut t = Tiny::new(proj_ty);
    t.vocab = TOKENIZER_VOCAB;
    t.ctx = 128;
    let (bytes, _) = tiny_model_with_tokenizer(&t);
    let (dir, path) = temp_gguf(&bytes);
    let file = GgufFile::open(path).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let tpl = ChatTemplate::from_gguf(&file).unwrap();
    let examples = [
        r#"{"messages":[{"role":"user","content":"the tin"},{"role":"assistant","content":"an inn"}]}"#,
        r#"{"messages":[{"role":"user","content":"then"},{"role":"assistant","content":"an inn"}]}"#,
        r#"{"messages":[{"role":"user","content":"in"},{"role":"assistant","content":"the tin inn"}]}"#,
    ]
    .iter()
    .enumerate()
    .map(|(i, line)| tokenize(&parse_record(Schema::Chat, line, i + 1).unwrap(), &tok, &tpl, 64).unwrap())
    .collect();
    Fx {
        _dir: dir,
        file,
        examples,
    }
}

fn spec() -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        seed: 11,
        ..LoraSpec::default()
    }
}

/// The model with an adapter whose `B` is not zero (so that every factor has a gradient).
fn model(fx: &Fx, base: BaseWeights, device: &Device) -> Llama {
    let mut m = Llama::load(&Weights::gguf(&fx.file).unwrap(), device, base).unwrap();
    attach(&mut m, &spec()).unwrap();
    let mut w = AdapterWeights::from_model(&m, &spec());
    for (i, f) in w.factors.values_mut().enumerate() {
        for (j, b) in f.b.iter_mut().enumerate() {
            *b = ((i * 17 + j * 5) % 11) as f32 / 22.0 - 0.25;
        }
    }
    w.apply(&mut m).unwrap();
    m
}

fn values(t: Tensor<2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn the_packed_base_keeps_the_gguf_blocks_and_gives_lora_s_loss_and_gradients() {
    let fx = fixture(GgmlType::Q4_1);
    let device = Device::flex().autodiff();
    let dense = model(&fx, BaseWeights::F32, &device);
    let packed = model(&fx, BaseWeights::Packed, &device);

    // The blocks are the file's own, and they take a fraction of the f32 copy's memory.
    match packed.layers()[0].projection(Proj::Up).weight() {
        Frozen::Packed(p) => assert_eq!(p.ty(), GgmlType::Q4_1),
        Frozen::Dense(_) => panic!("a packed model holds a dense projection"),
    }
    let ratio = dense.base_bytes() as f64 / packed.base_bytes() as f64;
    assert!(ratio > 5.0, "f32 base / packed base = {ratio:.2}");

    let batch = Batch::pad(&fx.examples.iter().collect::<Vec<_>>(), 0);
    let (ld, lp) = (
        masked_loss(&dense, &batch, &device),
        masked_loss(&packed, &batch, &device),
    );
    let (vd, vp) = (
        ld.clone().into_scalar::<f32>(),
        lp.clone().into_scalar::<f32>(),
    );
    assert!(
        ((vd - vp) / vd).abs() < 1e-6,
        "loss: f32 base {vd}, packed base {vp}"
    );
    let (gd, gp) = (ld.backward(), lp.backward());
    // Layer 0's factors get their gradient through every packed product of layer 1 and the
    // packed output head: the hand-written backward pass, checked against burn's autodiff.
    for layer in 0..2 {
        for proj in Proj::ALL {
            let (ad, ap) = (
                dense.layers()[layer].projection(proj).adapter().unwrap(),
                packed.layers()[layer].projection(proj).adapter().unwrap(),
            );
            for (which, d, p) in [
                ('A', ad.a.val().grad(&gd), ap.a.val().grad(&gp)),
                ('B', ad.b.val().grad(&gd), ap.b.val().grad(&gp)),
            ] {
                let (d, p) = (values(d.unwrap()), values(p.unwrap()));
                let e = rel_diff(&p, &d);
                assert!(
                    e < 1e-5,
                    "layer {layer} {proj:?}.{which}: relative difference {e:e}"
                );
            }
        }
    }
}

#[test]
fn float_weights_are_packed_to_q4_1_and_stay_close_to_the_f32_model() {
    let fx = fixture(GgmlType::F32);
    let device = Device::flex();
    let dense = model(&fx, BaseWeights::F32, &device);
    let packed = model(&fx, BaseWeights::Packed, &device);
    match packed.layers()[1].projection(Proj::Down).weight() {
        Frozen::Packed(p) => assert_eq!(p.ty(), GgmlType::Q4_1),
        Frozen::Dense(_) => panic!("a packed model holds a dense projection"),
    }
    let batch = Batch::pad(&fx.examples.iter().collect::<Vec<_>>(), 0);
    let vd = masked_loss(&dense, &batch, &device).into_scalar::<f32>();
    let vp = masked_loss(&packed, &batch, &device).into_scalar::<f32>();
    // Q4_1 rounds each weight to 1/15 of its block's range: the loss moves, but only a little.
    assert!(
        ((vd - vp) / vd).abs() < 0.05 && vd != vp,
        "loss: f32 base {vd}, Q4_1 base {vp}"
    );
}

fn trained(fx: &Fx, base: BaseWeights) -> (Vec<f64>, AdapterWeights) {
    let device = Device::flex().autodiff();
    let mut m = Llama::load(&Weights::gguf(&fx.file).unwrap(), &device, base).unwrap();
    attach(&mut m, &spec()).unwrap();
    let cfg = TrainConfig {
        learning_rate: 1e-2,
        epochs: 100,
        batch_size: 3,
        warmup_steps: 2,
        schedule: Schedule::Cosine,
        seed: 4,
        max_steps: Some(20),
        ..TrainConfig::default()
    };
    let mut losses = Vec::new();
    let m = train(m, &fx.examples, &cfg, 0, |e| losses.push(e.loss)).unwrap();
    (losses, AdapterWeights::from_model(&m, &spec()))
}

#[test]
fn qlora_training_follows_lora_training_on_the_same_blocks() {
    let fx = fixture(GgmlType::Q4_1);
    let (lora, wl) = trained(&fx, BaseWeights::F32);
    let (qlora, wq) = trained(&fx, BaseWeights::Packed);
    let last = qlora[qlora.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(last < qlora[0] / 3.0, "QLoRA loss {} -> {last}", qlora[0]);
    for (step, (a, b)) in lora.iter().zip(&qlora).enumerate() {
        assert!(
            ((a - b) / a).abs() < 1e-4,
            "step {step}: LoRA loss {a}, QLoRA loss {b}"
        );
    }
    for (key, f) in &wl.factors {
        let g = &wq.factors[key];
        assert!(rel_diff(&g.b, &f.b) < 1e-3, "{key:?}: B differs");
    }
}
