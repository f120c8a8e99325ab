//! Generation on a generated tiny model with a byte-level tokenizer: the CPU engine and the burn
//! model agree token for token, and sampling, stops and limits behave as documented.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::ops::ControlFlow;

use burn::tensor::Device;
use cohort_trainer::engine::Engine;
use cohort_trainer::generate::{
    BurnLm, EngineLm, FinishReason, GenerateError, SamplingParams, generate,
};
use cohort_trainer::gguf::{GgmlType, GgufFile};
use cohort_trainer::model::Llama;
use cohort_trainer::tokenizer::Tokenizer;
use common::{TOKENIZER_VOCAB, Tiny, temp_gguf, tiny_model_with_tokenizer};

struct Fixture {
    _dir: tempfile::TempDir,
    file: GgufFile,
}

fn fixture() -> Fixture {
    let mut t = Tiny::new(GgmlType::Q8_0);
    t.vocab = TOKENIZER_VOCAB;
    t.ctx = 96;
    t.seed = 11;
    let (bytes, _) = tiny_model_with_tokenizer(&t);
    let (dir, path) = temp_gguf(&bytes);
    Fixture {
        _dir: dir,
        file: GgufFile::open(path).unwrap(),
    }
}

fn run(
    engine: &Engine,
    tok: &Tokenizer,
    prompt: &str,
    params: &SamplingParams,
) -> (cohort_trainer::generate::Generation, String) {
    let ids = tok.encode(prompt, true);
    let mut streamed = String::new();
    let out = generate(&mut EngineLm::new(engine), tok, &ids, params, |piece| {
        streamed.push_str(piece);
        ControlFlow::Continue(())
    })
    .unwrap();
    (out, streamed)
}

#[test]
fn engine_and_burn_model_generate_the_same_greedy_tokens() {
    let f = fixture();
    let tok = Tokenizer::from_gguf(&f.file).unwrap();
    let engine = Engine::from_gguf(&f.file).unwrap();
    let device = Device::flex();
    let model = Llama::from_gguf(&f.file, &device).unwrap();
    let ids = tok.encode("<|im_start|>user\nthe tin man<|im_end|>\n", true);
    let params = SamplingParams {
        max_tokens: 24,
        stop_tokens: vec![],
        ..SamplingParams::default()
    };
    let a = generate(&mut EngineLm::new(&engine), &tok, &ids, &params, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    let b = generate(
        &mut BurnLm::new(&model, device, tok.vocab_size()),
        &tok,
        &ids,
        &params,
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert!(!a.tokens.is_empty());
    for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
        assert!((x - y).abs() < 1e-3, "logprobs {x} vs {y}");
    }
}

#[test]
fn the_same_seed_gives_the_same_text_and_streaming_gives_all_of_it() {
    let f = fixture();
    let tok = Tokenizer::from_gguf(&f.file).unwrap();
    let engine = Engine::from_gguf(&f.file).unwrap();
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        top_k: 50,
        max_tokens: 30,
        seed: 42,
        ..SamplingParams::default()
    };
    let (a, streamed) = run(&engine, &tok, "hello there", &params);
    let (b, _) = run(&engine, &tok, "hello there", &params);
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(streamed, a.text);
    let others: Vec<Vec<u32>> = (0..4)
        .map(|s| {
            run(
                &engine,
                &tok,
                "hello there",
                &SamplingParams {
                    seed: 100 + s,
                    ..params.clone()
                },
            )
            .0
            .tokens
        })
        .collect();
    assert!(
        others.iter().any(|o| *o != a.tokens),
        "four other seeds all gave the same tokens"
    );
    // top_k = 1 is greedy whatever the temperature.
    let greedy = run(
        &engine,
        &tok,
        "hello there",
        &SamplingParams {
            max_tokens: 30,
            ..SamplingParams::default()
        },
    )
    .0;
    let k1 = run(
        &engine,
        &tok,
        "hello there",
        &SamplingParams {
            top_k: 1,
            ..params.clone()
        },
    )
    .0;
    assert_eq!(greedy.tokens, k1.tokens);
}

#[test]
fn stop_strings_cut_the_text_before_them_and_limits_end_with_length() {
    let f = fixture();
    let tok = Tokenizer::from_gguf(&f.file).unwrap();
    let engine = Engine::from_gguf(&f.file).unwrap();
    let base = SamplingParams {
        max_tokens: 40,
        repetition_penalty: 3.0,
        ..SamplingParams::default()
    };
    let (full, _) = run(&engine, &tok, "once upon a time", &base);
    eprintln!(
        "greedy: {:?} ({:?}, {} tokens)",
        full.text,
        full.finish,
        full.tokens.len()
    );
    assert!(
        full.text.chars().count() >= 6,
        "too little text to test stops: {:?}",
        full.text
    );
    // A stop string taken from the middle of the greedy text.
    let chars: Vec<char> = full.text.chars().collect();
    let stop: String = chars[3..5].iter().collect();
    let cut = full.text.find(&stop).unwrap();
    let (stopped, streamed) = run(
        &engine,
        &tok,
        "once upon a time",
        &SamplingParams {
            stop_strings: vec![stop.clone()],
            ..base.clone()
        },
    );
    assert_eq!(stopped.text, full.text[..cut], "stop {stop:?}");
    assert_eq!(
        streamed, stopped.text,
        "held-back text never leaks the stop string"
    );
    assert_eq!(stopped.finish, FinishReason::Stop);
    // A stop token: the third greedy token.
    let third = full.tokens[2];
    let first_at = full.tokens.iter().position(|t| *t == third).unwrap();
    let (by_token, _) = run(
        &engine,
        &tok,
        "once upon a time",
        &SamplingParams {
            stop_tokens: vec![third],
            ..base.clone()
        },
    );
    assert_eq!(by_token.tokens, full.tokens[..=first_at]);
    assert_eq!(by_token.finish, FinishReason::Stop);
    // max_tokens.
    let (short, _) = run(
        &engine,
        &tok,
        "once upon a time",
        &SamplingParams {
            max_tokens: 3,
            ..base.clone()
        },
    );
    assert!(full.tokens.len() > 3);
    assert_eq!(short.tokens, full.tokens[..3]);
    assert_eq!(short.finish, FinishReason::Length);
}

#[test]
fn a_full_context_ends_with_length_and_a_long_prompt_is_an_error() {
    let f = fixture();
    let tok = Tokenizer::from_gguf(&f.file).unwrap();
    let engine = Engine::from_gguf(&f.file).unwrap();
    let max = engine.config().max_seq_len;
    let prompt: Vec<u32> = (0..max as u32 - 4).map(|i| 40 + i % 50).collect();
    let params = SamplingParams {
        max_tokens: 100,
        stop_tokens: vec![],
        ..SamplingParams::default()
    };
    let out = generate(&mut EngineLm::new(&engine), &tok, &prompt, &params, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    eprintln!(
        "full-context run: {:?} after {} tokens",
        out.finish,
        out.tokens.len()
    );
    assert!(
        out.tokens.len() <= 5,
        "{} tokens after a prompt of {}",
        out.tokens.len(),
        prompt.len()
    );
    assert!(
        out.finish == FinishReason::Length || out.tokens.len() < 5,
        "{:?}",
        out.finish
    );
    let too_long: Vec<u32> = (0..max as u32 + 1).map(|i| 40 + i % 50).collect();
    let err = generate(
        &mut EngineLm::new(&engine),
        &tok,
        &too_long,
        &params,
        |_| ControlFlow::Continue(()),
    )
    .unwrap_err();
    assert!(
        matches!(err, GenerateError::PromptTooLong { prompt, max: m } if prompt == max + 1 && m == max),
        "{err}"
    );
}

#[test]
fn the_callback_can_cancel_and_bad_parameters_are_named() {
    let f = fixture();
    let tok = Tokenizer::from_gguf(&f.file).unwrap();
    let engine = Engine::from_gguf(&f.file).unwrap();
    let ids = tok.encode("abc", true);
    let mut calls = 0;
    let out = generate(
        &mut EngineLm::new(&engine),
        &tok,
        &ids,
        &SamplingParams {
            max_tokens: 50,
            ..SamplingParams::default()
        },
        |_| {
            calls += 1;
            ControlFlow::Break(())
        },
    )
    .unwrap();
    assert_eq!(out.finish, FinishReason::Cancelled);
    assert_eq!(calls, 1);
    let bad = SamplingParams {
        top_p: 1.5,
        ..SamplingParams::default()
    };
    let err = generate(&mut EngineLm::new(&engine), &tok, &ids, &bad, |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(err.to_string().contains("top_p"), "{err}");
}
