//! The burn Llama against the independent f64 reference, on generated tiny models in every
//! supported tensor type.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use cohort_trainer::gguf::{GgmlType, GgufFile};
use cohort_trainer::model::{KvCache, Llama, LlamaConfig};
use common::{Tiny, max_abs_diff, ref_forward, temp_gguf, tiny_model};

const TOKENS: [u32; 9] = [1, 17, 42, 5, 95, 0, 63, 17, 8];

fn logits(model: &Llama, tokens: &[u32], cache: Option<&mut KvCache>, device: &Device) -> Vec<f32> {
    let ids: Vec<i64> = tokens.iter().map(|t| *t as i64).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, tokens.len()]), device);
    model
        .forward(input, cache)
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

fn check(t: &Tiny) {
    let (bytes, reference) = tiny_model(t);
    let (_dir, path) = temp_gguf(&bytes);
    let file = GgufFile::open(&path).unwrap();
    let device = Device::flex();
    let model = Llama::from_gguf(&file, &device).unwrap();
    let got = logits(&model, &TOKENS, None, &device);
    let want: Vec<f64> = ref_forward(&reference, &TOKENS).concat();
    let diff = max_abs_diff(&got, &want);
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(
        diff < 1e-4,
        "{:?}/{:?}: max |burn - reference| = {diff:e} (logits up to {scale})",
        t.proj_ty,
        t.embed_ty
    );
    assert!(scale > 0.5, "degenerate test model: logits up to {scale}");
}

#[test]
fn every_tensor_type_matches_the_f64_reference() {
    for ty in GgmlType::ALL {
        let mut t = Tiny::new(ty);
        t.embed_ty = ty;
        check(&t);
    }
}

#[test]
fn untied_output_and_multi_query_attention_match_the_reference() {
    let mut t = Tiny::new(GgmlType::Q4_1);
    t.tied = false;
    t.embed_ty = GgmlType::Q6K;
    t.kv_heads = 1;
    t.rope_theta = 100000.0;
    check(&t);
    let mut t = Tiny::new(GgmlType::Q4_0);
    t.kv_heads = 4;
    check(&t);
}

#[test]
fn the_kv_cache_continues_exactly_where_a_full_pass_is() {
    let t = Tiny::new(GgmlType::Q8_0);
    let (bytes, reference) = tiny_model(&t);
    let (_dir, path) = temp_gguf(&bytes);
    let file = GgufFile::open(&path).unwrap();
    let device = Device::flex();
    let model = Llama::from_gguf(&file, &device).unwrap();
    let mut cache = KvCache::new();
    let mut got = logits(&model, &TOKENS[..5], Some(&mut cache), &device);
    for tok in &TOKENS[5..] {
        got.extend(logits(&model, &[*tok], Some(&mut cache), &device));
    }
    assert_eq!(cache.len(), TOKENS.len());
    let want: Vec<f64> = ref_forward(&reference, &TOKENS).concat();
    assert!(max_abs_diff(&got, &want) < 1e-4);
}

#[test]
fn a_context_overflow_is_an_error_not_a_crash() {
    let t = Tiny::new(GgmlType::F16);
    let (bytes, _) = tiny_model(&t);
    let (_dir, path) = temp_gguf(&bytes);
    let file = GgufFile::open(&path).unwrap();
    let device = Device::flex();
    let model = Llama::from_gguf(&file, &device).unwrap();
    let too_long: Vec<i64> = (0..t.ctx as i64 + 1).map(|i| i % 90).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(too_long, [1, t.ctx + 1]), &device);
    let err = model.forward(input, None).unwrap_err();
    assert_eq!((err.tokens, err.max), (t.ctx + 1, t.ctx));
}

#[test]
fn config_reads_the_tiny_model() {
    let t = Tiny::new(GgmlType::Q4K);
    let (bytes, _) = tiny_model(&t);
    let (_dir, path) = temp_gguf(&bytes);
    let c = LlamaConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.tie_embeddings
        ),
        (96, 256, 512, 2, 4, 2, 64, true)
    );
}

fn check_engine(t: &Tiny) {
    use cohort_trainer::engine::{Engine, EngineCache, Logits};
    let (bytes, reference) = tiny_model(t);
    let (_dir, path) = temp_gguf(&bytes);
    let engine = Engine::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let want: Vec<f64> = ref_forward(&reference, &TOKENS).concat();
    // One prefill of everything.
    let mut cache = EngineCache::new();
    let all = engine.forward(&TOKENS, &mut cache, Logits::All).unwrap();
    let diff = max_abs_diff(&all, &want);
    assert!(
        diff < 1e-4,
        "engine {:?}/{:?}: prefill max diff {diff:e}",
        t.proj_ty,
        t.embed_ty
    );
    // A prefill of four, then one token at a time.
    let mut cache = EngineCache::new();
    let mut got = engine
        .forward(&TOKENS[..4], &mut cache, Logits::All)
        .unwrap();
    for tok in &TOKENS[4..] {
        got.extend(engine.forward(&[*tok], &mut cache, Logits::Last).unwrap());
    }
    let diff = max_abs_diff(&got, &want);
    assert!(
        diff < 1e-4,
        "engine {:?}/{:?}: decode max diff {diff:e}",
        t.proj_ty,
        t.embed_ty
    );
}

#[test]
fn the_cpu_engine_matches_the_f64_reference_in_every_tensor_type() {
    for ty in GgmlType::ALL {
        let mut t = Tiny::new(ty);
        t.embed_ty = ty;
        check_engine(&t);
    }
    let mut t = Tiny::new(GgmlType::Q4_1);
    t.tied = false;
    t.kv_heads = 1;
    check_engine(&t);
}

#[test]
fn a_hugging_face_safetensors_checkpoint_loads_into_both_models() {
    use cohort_trainer::engine::{Engine, EngineCache, Logits};
    use cohort_trainer::model::Weights;
    use cohort_trainer::model::safetensors::Checkpoint;
    let mut t = Tiny::new(GgmlType::Q8_0);
    t.tied = false;
    let (_, reference) = tiny_model(&t);
    let dir = tempfile::tempdir().unwrap();
    common::write_hf_checkpoint(&reference, dir.path());
    let ck = Checkpoint::open(dir.path()).unwrap();
    let w = Weights::Hf(&ck);
    let want: Vec<f64> = ref_forward(&reference, &TOKENS).concat();
    let device = Device::flex();
    let model = Llama::from_weights(&w, &device).unwrap();
    let got = logits(&model, &TOKENS, None, &device);
    assert!(
        max_abs_diff(&got, &want) < 1e-4,
        "burn from safetensors: {:e}",
        max_abs_diff(&got, &want)
    );
    let engine = Engine::from_weights(&w).unwrap();
    let got = engine
        .forward(&TOKENS, &mut EngineCache::new(), Logits::All)
        .unwrap();
    assert!(
        max_abs_diff(&got, &want) < 1e-4,
        "engine from safetensors: {:e}",
        max_abs_diff(&got, &want)
    );
    // A missing tensor is named.
    std::fs::write(
        dir.path().join("config.json"),
        std::fs::read_to_string(dir.path().join("config.json"))
            .unwrap()
            .replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
    )
    .unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let err = Engine::from_weights(&Weights::Hf(&ck))
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.layers.2."), "{err}");
}
