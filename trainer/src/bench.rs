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

/// The model and batch shape of a training benchmark (the anchors' `peft_cpu_lora.py` flags).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainShape {
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub seq: usize,
    pub batch: usize,
    pub rank: usize,
    pub targets: Vec<String>,
}

/// A training benchmark's figures.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainBench {
    pub shape: TrainShape,
    pub steps: usize,
    pub threads: usize,
    pub tokens_per_s: f64,
    pub loss: f64,
    /// QLoRA: the frozen base packed (the random f32 weights quantized to Q4_1 at load).
    pub qlora: bool,
    /// Bytes of the frozen weight matrices.
    pub base_bytes: usize,
}

/// Writes a GGUF file of a Llama with random F32 weights (tied embeddings, seeded).
pub fn random_model(shape: &TrainShape, seed: u64, path: &std::path::Path) -> std::io::Result<()> {
    random_model_writer(shape, seed).write(path)
}

/// GPT-2's byte-to-character map, from its definition: printable Latin-1 bytes stand for
/// themselves, the other 68 bytes for code points 256, 257, ... in byte order.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|x| !printable(*x)).count() as u32;
    char::from_u32(256 + n).unwrap_or('?')
}

/// The vocabulary of [`tiny_chat_model`]: 256 byte tokens, 3 ChatML specials, 5 merges.
pub const TINY_CHAT_VOCAB: usize = 256 + 3 + 5;

/// Writes a tiny chat model for tests and `cohort demo --quick`: a random F32 Llama (2 layers,
/// hidden 64) with a byte-level GPT-2 tokenizer (every byte a token, a few merges), ChatML
/// specials and a ChatML chat template, so JSONL chat records train and generate end to end.
pub fn tiny_chat_model(seed: u64, path: &std::path::Path) -> std::io::Result<()> {
    let shape = TrainShape {
        hidden: 64,
        inter: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: TINY_CHAT_VOCAB,
        seq: 256,
        batch: 1,
        rank: 4,
        targets: vec![],
    };
    let mut w = random_model_writer(&shape, seed);
    add_tiny_chat_tokenizer(&mut w);
    w.metadata(
        "tokenizer.ggml.padding_token_id",
        crate::gguf::Value::U32(256),
    );
    w.write(path)
}

/// Adds the tiny byte-level tokenizer to a model's metadata: 256 byte tokens, the ChatML
/// specials `<|endoftext|>` (256), `<|im_start|>` (257, also BOS) and `<|im_end|>` (258, also
/// EOS), five merges, and a ChatML chat template. The model's vocabulary must be
/// [`TINY_CHAT_VOCAB`].
pub fn add_tiny_chat_tokenizer(w: &mut crate::gguf::write::GgufWriter) {
    use crate::gguf::Value;
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let mut tokens: Vec<Value> = (0..=255u8)
        .map(|b| Value::String(byte_char(b).to_string()))
        .collect();
    let mut types: Vec<Value> = vec![Value::I32(1); 256];
    for s in specials {
        tokens.push(Value::String(s.into()));
        types.push(Value::I32(3));
    }
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"];
    for m in merges {
        tokens.push(Value::String(m.replace(' ', "")));
        types.push(Value::I32(1));
    }
    w.metadata("tokenizer.ggml.model", Value::String("gpt2".into()))
        .metadata("tokenizer.ggml.pre", Value::String("smollm".into()))
        .metadata("tokenizer.ggml.tokens", Value::Array(tokens))
        .metadata("tokenizer.ggml.token_type", Value::Array(types))
        .metadata(
            "tokenizer.ggml.merges",
            Value::Array(merges.iter().map(|m| Value::String((*m).into())).collect()),
        )
        .metadata("tokenizer.ggml.bos_token_id", Value::U32(257))
        .metadata("tokenizer.ggml.eos_token_id", Value::U32(258))
        .metadata(
            "tokenizer.chat_template",
            Value::String(
                "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + \
                 '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}\
                 {{ '<|im_start|>assistant\n' }}{% endif %}"
                    .into(),
            ),
        );
}

fn random_model_writer(shape: &TrainShape, seed: u64) -> crate::gguf::write::GgufWriter {
    use crate::gguf::write::GgufWriter;
    use crate::gguf::{GgmlType, Value};
    let mut rng = cohort_protocol::rng::SplitMix64::new(seed);
    let mut random = |n: usize, scale: f64| -> Vec<f32> {
        (0..n)
            .map(|_| ((2.0 * rng.next_f64() - 1.0) * scale) as f32)
            .collect()
    };
    let (h, i) = (shape.hidden, shape.inter);
    let hd = h / shape.heads;
    let kv = shape.kv_heads * hd;
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", Value::String("llama".into()))
        .metadata("llama.block_count", Value::U32(shape.layers as u32))
        .metadata("llama.context_length", Value::U32((shape.seq * 2) as u32))
        .metadata("llama.embedding_length", Value::U32(h as u32))
        .metadata("llama.feed_forward_length", Value::U32(i as u32))
        .metadata("llama.attention.head_count", Value::U32(shape.heads as u32))
        .metadata(
            "llama.attention.head_count_kv",
            Value::U32(shape.kv_heads as u32),
        )
        .metadata("llama.vocab_size", Value::U32(shape.vocab as u32));
    let std = 0.02;
    w.tensor_f32(
        "token_embd.weight",
        &[h as u64, shape.vocab as u64],
        GgmlType::F32,
        &random(shape.vocab * h, std),
    );
    for l in 0..shape.layers {
        let mut m = |name: &str, rows: usize, cols: usize| {
            let values = random(rows * cols, std);
            w.tensor_f32(
                format!("blk.{l}.{name}.weight"),
                &[cols as u64, rows as u64],
                GgmlType::F32,
                &values,
            );
        };
        m("attn_q", h, h);
        m("attn_k", kv, h);
        m("attn_v", kv, h);
        m("attn_output", h, h);
        m("ffn_gate", i, h);
        m("ffn_up", i, h);
        m("ffn_down", h, i);
        w.tensor_f32(
            format!("blk.{l}.attn_norm.weight"),
            &[h as u64],
            GgmlType::F32,
            &vec![1.0; h],
        );
        w.tensor_f32(
            format!("blk.{l}.ffn_norm.weight"),
            &[h as u64],
            GgmlType::F32,
            &vec![1.0; h],
        );
    }
    w.tensor_f32(
        "output_norm.weight",
        &[h as u64],
        GgmlType::F32,
        &vec![1.0; h],
    );
    w
}

/// LoRA training throughput on a random model of `shape`: `warmup` steps, then `steps` timed
/// steps of forward, backward and AdamW on one random batch, every position a target (what the
/// anchor does with `labels = input_ids`). Tokens per second count `batch · seq` per step.
pub fn training(
    shape: &TrainShape,
    steps: usize,
    warmup: usize,
    base: crate::model::BaseWeights,
    dir: &std::path::Path,
) -> Result<TrainBench, String> {
    use burn::optim::{AdamWConfig, GradientsParams};
    let path = dir.join("bench-model.gguf");
    random_model(shape, 1, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file = crate::gguf::GgufFile::open(&path).map_err(|e| e.to_string())?;
    let device = burn::tensor::Device::flex().autodiff();
    let weights = crate::model::Weights::gguf(&file).map_err(|e| e.to_string())?;
    let mut model =
        crate::model::Llama::load(&weights, &device, base).map_err(|e| e.to_string())?;
    let base_bytes = model.base_bytes();
    let spec = crate::adapter::LoraSpec {
        rank: shape.rank,
        alpha: 2.0 * shape.rank as f32,
        rslora: false,
        dropout: 0.0,
        targets: shape.targets.clone(),
        seed: 0,
    };
    crate::adapter::attach(&mut model, &spec).map_err(|e| e.to_string())?;
    let mut rng = cohort_protocol::rng::SplitMix64::new(7);
    let tokens: Vec<u32> = (0..shape.batch * (shape.seq + 1))
        .map(|_| (rng.next_u64() % shape.vocab as u64) as u32)
        .collect();
    let mut batch = crate::data::Batch {
        batch: shape.batch,
        len: shape.seq,
        inputs: Vec::new(),
        targets: Vec::new(),
        weights: vec![1.0; shape.batch * shape.seq],
    };
    for row in tokens.chunks(shape.seq + 1) {
        batch.inputs.extend_from_slice(&row[..shape.seq]);
        batch.targets.extend_from_slice(&row[1..]);
    }
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut loss = 0.0;
    let mut start = Instant::now();
    for s in 0..warmup + steps {
        if s == warmup {
            start = Instant::now();
        }
        let l = crate::train::masked_loss(&model, &batch, &device);
        loss = l.clone().into_scalar::<f32>() as f64;
        let grads = GradientsParams::from_grads(l.backward(), &model);
        model = optim.step(1e-3, model, grads);
    }
    let dt = start.elapsed().as_secs_f64();
    Ok(TrainBench {
        shape: shape.clone(),
        steps,
        threads: rayon::current_num_threads(),
        tokens_per_s: (shape.batch * shape.seq * steps) as f64 / dt,
        loss,
        qlora: base == crate::model::BaseWeights::Packed,
        base_bytes,
    })
}
