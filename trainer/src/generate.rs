//! Text generation: a causal LM behind a small trait, seeded sampling, stop tokens and stop
//! strings, streaming through a callback.
//!
//! [`CausalLm`] is what generation needs from a model: feed tokens, get the last position's
//! logits, know the context length. The CPU [`Engine`] implements it, and so does the burn
//! [`Llama`] on any device ([`BurnLm`]), so `cohort chat --device cuda` runs the same loop.
//!
//! Sampling follows the usual order (llama.cpp's and Hugging Face's): repetition penalty on the
//! logits of tokens already in the context, then temperature, top-k, top-p, and a draw from a
//! [`SplitMix64`] seeded by the caller (the same seed gives the same text). Temperature 0 is
//! greedy. Text is streamed in whole UTF-8 pieces; text that could still turn out to be the start
//! of a stop string is held back until it cannot.

use std::ops::ControlFlow;

use burn::tensor::{Device, Int, Tensor, TensorData};
use cohort_protocol::rng::SplitMix64;

use crate::engine::{Engine, EngineCache, EngineError, Logits};
use crate::model::{ContextLengthError, KvCache, Llama};
use crate::tokenizer::Tokenizer;

/// A model that generation can drive.
pub trait CausalLm {
    /// Runs `tokens` after the context so far and returns the last position's logits.
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError>;
    /// Positions in the context.
    fn position(&self) -> usize;
    /// The most positions the model takes.
    fn context_len(&self) -> usize;
    /// Forgets the context.
    fn reset(&mut self);
}

/// The CPU engine with its own KV cache.
#[derive(Debug)]
pub struct EngineLm<'a> {
    engine: &'a Engine,
    cache: EngineCache,
    /// An adapter for this generation only (else the engine's own, if any).
    adapter: Option<&'a crate::adapter::AdapterWeights>,
}

impl<'a> EngineLm<'a> {
    pub fn new(engine: &'a Engine) -> EngineLm<'a> {
        EngineLm {
            engine,
            cache: EngineCache::new(),
            adapter: None,
        }
    }

    /// Generation with `adapter` applied on the fly; the shared engine is untouched (check the
    /// adapter with [`Engine::check_adapter`] first).
    pub fn with_adapter(
        engine: &'a Engine,
        adapter: Option<&'a crate::adapter::AdapterWeights>,
    ) -> EngineLm<'a> {
        EngineLm {
            engine,
            cache: EngineCache::new(),
            adapter,
        }
    }
}

impl CausalLm for EngineLm<'_> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        match self.adapter {
            Some(a) => self
                .engine
                .forward_with(tokens, &mut self.cache, Logits::Last, Some(a)),
            None => self.engine.forward(tokens, &mut self.cache, Logits::Last),
        }
    }

    fn position(&self) -> usize {
        self.cache.len()
    }

    fn context_len(&self) -> usize {
        self.engine.config().max_seq_len
    }

    fn reset(&mut self) {
        self.cache = EngineCache::new();
    }
}

/// The burn model on a device, with its KV cache.
#[derive(Debug)]
pub struct BurnLm<'a> {
    model: &'a Llama,
    device: Device,
    cache: KvCache,
    vocab: usize,
}

impl<'a> BurnLm<'a> {
    pub fn new(model: &'a Llama, device: Device, vocab: usize) -> BurnLm<'a> {
        BurnLm {
            model,
            device,
            cache: KvCache::new(),
            vocab,
        }
    }
}

impl CausalLm for BurnLm<'_> {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        if let Some(&bad) = tokens.iter().find(|t| **t as usize >= self.vocab) {
            return Err(EngineError::BadToken {
                token: bad,
                vocab: self.vocab,
            });
        }
        let ids: Vec<i64> = tokens.iter().map(|t| i64::from(*t)).collect();
        let n = ids.len();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &self.device);
        let logits = self.model.forward(input, Some(&mut self.cache))?;
        let last = logits.narrow(1, n - 1, 1);
        last.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| EngineError::Device(format!("reading logits back: {e:?}")))
    }

    fn position(&self) -> usize {
        self.cache.len()
    }

    fn context_len(&self) -> usize {
        self.model.max_seq_len()
    }

    fn reset(&mut self) {
        self.cache = KvCache::new();
    }
}

/// How to pick tokens and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1.0: all).
    pub top_p: f32,
    /// Divide positive (multiply negative) logits of tokens already in the context (1.0: off).
    pub repetition_penalty: f32,
    /// How many of the last context tokens the penalty looks at.
    pub repetition_window: usize,
    pub seed: u64,
    pub max_tokens: usize,
    /// Generation stops before any of these strings; they are not part of the output.
    pub stop_strings: Vec<String>,
    /// Generation stops at any of these tokens (added to the tokenizer's end-of-turn tokens).
    pub stop_tokens: Vec<u32>,
    /// Also return, for each generated token, this many most likely tokens and their
    /// log-probabilities (0: none).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            repetition_window: 64,
            seed: 0,
            max_tokens: 256,
            stop_strings: Vec::new(),
            stop_tokens: Vec::new(),
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the values, naming the first bad one.
    pub fn validate(&self) -> Result<(), GenerateError> {
        let bad =
            |field: &'static str, reason: String| Err(GenerateError::BadParam { field, reason });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "temperature",
                format!("{} is not a finite number >= 0", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!("{} is not a number > 0", self.repetition_penalty),
            );
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return bad("stop", "an empty stop string".into());
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens`, or the context is full.
    Length,
    /// The callback asked to stop.
    Cancelled,
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    /// Generated tokens (a stop token included when one ended it).
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish: FinishReason,
    /// Natural log-probability of each generated token under the sampling distribution's source
    /// (the model's softmax before penalties and temperature).
    pub logprobs: Vec<f32>,
    /// For each generated token, the [`SamplingParams::top_logprobs`] most likely tokens of the
    /// same distribution, most likely first.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
}

/// What can go wrong generating.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    #[error("the prompt has {prompt} tokens; the model's context holds {max}")]
    PromptTooLong { prompt: usize, max: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("bad {field}: {reason}")]
    BadParam { field: &'static str, reason: String },
    #[error(transparent)]
    Model(#[from] EngineError),
}

impl From<ContextLengthError> for GenerateError {
    fn from(e: ContextLengthError) -> Self {
        GenerateError::PromptTooLong {
            prompt: e.tokens,
            max: e.max,
        }
    }
}

/// Generates after `prompt` (token ids; the context of `lm` is reset first). `on_text` receives
/// each piece of text as soon as it is final and may return `ControlFlow::Break` to stop.
pub fn generate(
    lm: &mut dyn CausalLm,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &SamplingParams,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation, GenerateError> {
    generate_pieces(lm, tokenizer, prompt, params, |p| on_text(p.text))
}

/// A piece of final text and the generated tokens sampled since the previous piece (a streaming
/// API sends their log-probabilities with it). A token whose text is wholly held back (a possible
/// start of a stop string, or bytes of an unfinished character) goes with a later piece; a stop
/// token has no text and goes with none.
#[derive(Debug)]
pub struct Piece<'a> {
    /// The text.
    pub text: &'a str,
    /// Indices into [`Generation::tokens`], [`Generation::logprobs`] and
    /// [`Generation::top_logprobs`] of `generation`.
    pub tokens: std::ops::Range<usize>,
    /// The generation so far.
    pub generation: &'a Generation,
}

/// [`generate`], with each piece of text given with its tokens ([`Piece`]).
pub fn generate_pieces(
    lm: &mut dyn CausalLm,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &SamplingParams,
    mut on_piece: impl FnMut(Piece<'_>) -> ControlFlow<()>,
) -> Result<Generation, GenerateError> {
    // The first generated token not yet handed out with a piece.
    let mut handed = 0usize;
    let mut on_text = |text: &str, out: &Generation, upto: usize| {
        let piece = Piece {
            text,
            tokens: handed..upto.max(handed),
            generation: out,
        };
        handed = upto.max(handed);
        on_piece(piece)
    };
    params.validate()?;
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let max = lm.context_len();
    if prompt.len() > max {
        return Err(GenerateError::PromptTooLong {
            prompt: prompt.len(),
            max,
        });
    }
    lm.reset();
    let mut stops: Vec<u32> = tokenizer.stop_token_ids().to_vec();
    stops.extend(&params.stop_tokens);
    let mut rng = SplitMix64::new(params.seed);
    let mut context: Vec<u32> = prompt.to_vec();
    let mut logits = lm.feed(prompt)?;
    let mut decoder = tokenizer.stream_decoder();
    let mut out = Generation {
        text: String::new(),
        tokens: Vec::new(),
        prompt_tokens: prompt.len(),
        finish: FinishReason::Length,
        logprobs: Vec::new(),
        top_logprobs: Vec::new(),
    };
    // Text decoded but not yet handed to the callback (it may be the start of a stop string).
    let mut pending = String::new();
    let mut emitted = 0usize;
    let longest_stop = params
        .stop_strings
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0);
    while out.tokens.len() < params.max_tokens {
        if params.top_logprobs > 0 {
            out.top_logprobs
                .push(top_logprobs(&logits, params.top_logprobs));
        }
        let (token, logprob) = sample(&mut logits, &context, params, &mut rng);
        out.tokens.push(token);
        out.logprobs.push(logprob);
        if stops.contains(&token) {
            out.finish = FinishReason::Stop;
            break;
        }
        context.push(token);
        if let Some(piece) = decoder.push(token) {
            pending.push_str(&piece);
        }
        // A stop string anywhere in the generated text so far ends generation before it.
        let full = format!("{}{}", out.text, pending);
        if let Some(cut) = params
            .stop_strings
            .iter()
            .filter_map(|s| full.find(s.as_str()))
            .min()
        {
            let keep = &full[emitted.min(cut)..cut];
            if !keep.is_empty() && on_text(keep, &out, out.tokens.len()).is_break() {
                out.text = full[..cut].to_string();
                out.finish = FinishReason::Cancelled;
                return Ok(out);
            }
            out.text = full[..cut].to_string();
            out.finish = FinishReason::Stop;
            return Ok(out);
        }
        // Emit all but the last `longest_stop - 1` bytes (rounded to a char boundary).
        let hold = longest_stop.saturating_sub(1);
        let mut safe = full.len().saturating_sub(hold);
        while !full.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe > emitted {
            if on_text(&full[emitted..safe], &out, out.tokens.len()).is_break() {
                out.text = full[..safe].to_string();
                out.finish = FinishReason::Cancelled;
                return Ok(out);
            }
            emitted = safe;
        }
        out.text = full[..emitted].to_string();
        pending = full[emitted..].to_string();
        if lm.position() >= max {
            out.finish = FinishReason::Length;
            break;
        }
        if out.tokens.len() < params.max_tokens {
            logits = lm.feed(&[token])?;
        }
    }
    pending.push_str(&decoder.finish());
    if !pending.is_empty() {
        // The last token is a stop token (no text) when one ended the answer.
        let upto = out.tokens.len() - usize::from(out.finish == FinishReason::Stop);
        if on_text(&pending, &out, upto).is_break() {
            out.finish = FinishReason::Cancelled;
        }
        out.text.push_str(&pending);
    }
    Ok(out)
}

/// `ln Σ exp(l)` over `logits`, shifted by their maximum and summed in f64.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    logits
        .iter()
        .map(|l| ((l - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + max
}

/// The `n` most likely tokens of `logits` with their log-probabilities, most likely first (ties
/// by token id).
fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let lse = log_sum_exp(logits);
    let mut best: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, l - lse))
        .collect();
    let n = n.min(best.len());
    if n == 0 {
        return Vec::new();
    }
    best.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    best.truncate(n);
    best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    best
}

/// Picks the next token from `logits` (modified in place) and returns it with its log-probability
/// under the model's own distribution.
fn sample(
    logits: &mut [f32],
    context: &[u32],
    p: &SamplingParams,
    rng: &mut SplitMix64,
) -> (u32, f32) {
    let logprob_of = |logits: &[f32], t: usize| logits[t] - log_sum_exp(logits);
    let raw: Vec<f32> = logits.to_vec();
    if p.repetition_penalty != 1.0 {
        let start = context.len().saturating_sub(p.repetition_window);
        let mut seen: Vec<u32> = context[start..].to_vec();
        seen.sort_unstable();
        seen.dedup();
        for t in seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
    }
    if p.temperature == 0.0 {
        let t = crate::bench::argmax(logits) as usize;
        return (t as u32, logprob_of(&raw, t));
    }
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, l / p.temperature))
        .collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 {
        cand.truncate(p.top_k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|(_, l)| ((l - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        cand.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
    }
    let r = rng.next_f64();
    let mut acc = 0.0;
    let mut pick = cand.len() - 1;
    for (i, q) in probs.iter().enumerate() {
        acc += q;
        if r < acc {
            pick = i;
            break;
        }
    }
    let t = cand[pick].0 as usize;
    (t as u32, logprob_of(&raw, t))
}
