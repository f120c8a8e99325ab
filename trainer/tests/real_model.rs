//! The default base model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the model cache.
//!
//! These tests need the file that `scripts/fetch-model.sh` puts in the cache. Under CI
//! (`CI=true`) a missing file fails the test; elsewhere the test says it skipped and passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ops::ControlFlow;

use cohort_trainer::engine::Engine;
use cohort_trainer::generate::{EngineLm, FinishReason, SamplingParams, generate};
use cohort_trainer::gguf::GgufFile;
use cohort_trainer::model::LlamaConfig;
use cohort_trainer::models;
use cohort_trainer::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};

fn model() -> Option<GgufFile> {
    let path = models::default_model_path();
    if !path.is_file() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "{} is missing under CI: run scripts/fetch-model.sh",
                path.display()
            );
        }
        eprintln!(
            "skipped: {} is missing (run scripts/fetch-model.sh)",
            path.display()
        );
        return None;
    }
    Some(GgufFile::open(&path).unwrap())
}

#[test]
fn the_default_model_has_the_documented_shape() {
    let Some(file) = model() else { return };
    let c = LlamaConfig::from_gguf(&file).unwrap();
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim
        ),
        (49152, 576, 1536, 30, 9, 3, 64)
    );
    assert_eq!(
        (c.rope_theta, c.max_seq_len, c.tie_embeddings),
        (100000.0, 8192, true)
    );
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert_eq!(file.tensor("token_embd.weight").unwrap().ty.name(), "Q8_0");
    assert_eq!(
        file.tensor("blk.0.attn_q.weight").unwrap().ty.name(),
        "Q4_1"
    );
    assert_eq!(file.tensors().len(), 272);
}

#[test]
fn greedy_chat_knows_the_capital_of_france() {
    let Some(file) = model() else { return };
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    let template = ChatTemplate::from_gguf(&file).unwrap();
    let engine = Engine::from_gguf(&file).unwrap();
    let prompt = template
        .render(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    let ids = tokenizer.encode(&prompt, true);
    let params = SamplingParams {
        max_tokens: 40,
        ..SamplingParams::default()
    };
    let mut streamed = String::new();
    let out = generate(
        &mut EngineLm::new(&engine),
        &tokenizer,
        &ids,
        &params,
        |piece| {
            streamed.push_str(piece);
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    eprintln!("answer: {:?} ({:?})", out.text, out.finish);
    assert!(out.text.contains("Paris"), "answer: {:?}", out.text);
    assert_eq!(
        streamed, out.text,
        "the streamed pieces make the whole text"
    );
    assert!(matches!(
        out.finish,
        FinishReason::Stop | FinishReason::Length
    ));
}
