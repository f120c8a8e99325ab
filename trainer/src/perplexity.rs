//! Perplexity of a text, computed the way llama.cpp's `perplexity` tool computes it.
//!
//! The text is tokenized whole (with BOS when the model's tokenizer adds one), cut into
//! consecutive windows of `ctx` tokens (a trailing partial window is dropped), and each window is
//! evaluated from an empty context. Only the second half of each window is scored: the token at
//! position `j` is predicted from positions `..j` for `j` in `ctx/2 + 1 .. ctx`, so every scored
//! token sees at least `ctx/2` tokens of context. The figure is `exp(mean negative
//! log-likelihood)` over all scored tokens.

use crate::engine::{Engine, EngineCache, EngineError, Logits};
use crate::tokenizer::Tokenizer;

/// The outcome of a perplexity run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PerplexityReport {
    pub text_tokens: usize,
    pub ctx: usize,
    pub windows: usize,
    pub scored_tokens: usize,
    /// Mean negative log-likelihood in nats per scored token.
    pub mean_nll: f64,
    pub perplexity: f64,
    /// The running perplexity after each window (what llama.cpp prints as `[1]..., [2]...`).
    pub running: Vec<f64>,
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PerplexityError {
    #[error("the text has {tokens} tokens; at least one window of {ctx} is needed")]
    TooShort { tokens: usize, ctx: usize },
    #[error("a window of {ctx} tokens is outside 4..={max} (the model's context)")]
    BadWindow { ctx: usize, max: usize },
    #[error(transparent)]
    Model(#[from] EngineError),
}

/// Computes the perplexity of `text`; `on_window(i, running_ppl)` is called after each window.
pub fn perplexity(
    engine: &Engine,
    tokenizer: &Tokenizer,
    text: &str,
    ctx: usize,
    mut on_window: impl FnMut(usize, f64),
) -> Result<PerplexityReport, PerplexityError> {
    let max = engine.config().max_seq_len;
    if !(4..=max).contains(&ctx) {
        return Err(PerplexityError::BadWindow { ctx, max });
    }
    let tokens = if tokenizer.add_bos() {
        tokenizer.encode_with_bos(text, false)
    } else {
        tokenizer.encode(text, false)
    };
    let windows = tokens.len() / ctx;
    if windows == 0 {
        return Err(PerplexityError::TooShort {
            tokens: tokens.len(),
            ctx,
        });
    }
    let vocab = engine.config().vocab_size;
    let first = ctx / 2;
    let (mut nll, mut count) = (0f64, 0usize);
    let mut running = Vec::with_capacity(windows);
    for w in 0..windows {
        let mut window = tokens[w * ctx..(w + 1) * ctx].to_vec();
        if let (true, Some(bos)) = (tokenizer.add_bos(), tokenizer.bos()) {
            window[0] = bos;
        }
        let logits = engine.forward(&window, &mut EngineCache::new(), Logits::All)?;
        for j in first..ctx - 1 {
            let row = &logits[j * vocab..(j + 1) * vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = row
                .iter()
                .map(|l| (*l as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            nll += lse - row[window[j + 1] as usize] as f64;
            count += 1;
        }
        let ppl = (nll / count as f64).exp();
        running.push(ppl);
        on_window(w, ppl);
    }
    let mean_nll = nll / count as f64;
    Ok(PerplexityReport {
        text_tokens: tokens.len(),
        ctx,
        windows,
        scored_tokens: count,
        mean_nll,
        perplexity: mean_nll.exp(),
        running,
    })
}
