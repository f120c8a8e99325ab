//! Inference speed on a GGUF model: prefill and greedy decode tokens per second, measured the way
//! llama.cpp's anchor script measures them (`shared/anchors/llama_cpp_bench.py`): a prompt of
//! `prompt_tokens` evaluated in one batch, then `gen_tokens` greedy tokens one at a time with the
//! KV cache, best of `runs`.

use std::time::Instant;

use crate::engine::{Engine, EngineCache, EngineError, Logits};

/// One benchmark's figures.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct InferenceBench {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub threads: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// Runs the benchmark with `prompt` (already tokenized; cut to `prompt_tokens`).
pub fn inference(
    engine: &Engine,
    prompt: &[u32],
    prompt_tokens: usize,
    gen_tokens: usize,
    runs: usize,
) -> Result<InferenceBench, EngineError> {
    let prompt = &prompt[..prompt_tokens.min(prompt.len())];
    let (mut best_pre, mut best_dec) = (0f64, 0f64);
    for _ in 0..runs.max(1) {
        let mut cache = EngineCache::new();
        let t = Instant::now();
        let mut logits = engine.forward(prompt, &mut cache, Logits::Last)?;
        best_pre = best_pre.max(prompt.len() as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..gen_tokens {
            let next = argmax(&logits);
            logits = engine.forward(&[next], &mut cache, Logits::Last)?;
        }
        best_dec = best_dec.max(gen_tokens as f64 / t.elapsed().as_secs_f64());
    }
    Ok(InferenceBench {
        prompt_tokens: prompt.len(),
        gen_tokens,
        threads: rayon::current_num_threads(),
        prefill_tokens_per_s: best_pre,
        decode_tokens_per_s: best_dec,
    })
}

/// Index of the largest value (the first among equals).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}
