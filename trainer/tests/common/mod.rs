//! Shared test helpers: tiny Llama GGUF files with random weights, and an independent f64
//! reference of the architecture and of the GGUF block formats.
//!
//! The reference is written from the formats' and the architecture's definitions, separately from
//! the crate's code: its own block decoders (scalar, f64), Hugging Face's weight layout and
//! rotary embedding (`rotate_half`), and llama.cpp's row permutation of the query and key
//! projections applied when the file is written (the crate undoes it when reading).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use cohort_protocol::rng::SplitMix64;
use cohort_trainer::gguf::write::GgufWriter;
use cohort_trainer::gguf::{GgmlType, Value};
use half::{bf16, f16};

/// The shape of a tiny test model (hidden and intermediate are multiples of 256 so that every
/// block type, K-quants included, can hold its rows).
#[derive(Debug, Clone)]
pub struct Tiny {
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub rope_theta: f64,
    pub eps: f64,
    pub ctx: usize,
    pub tied: bool,
    /// Type of the seven projections.
    pub proj_ty: GgmlType,
    /// Type of the token embedding (and of the output when untied).
    pub embed_ty: GgmlType,
    pub seed: u64,
}

impl Tiny {
    pub fn new(proj_ty: GgmlType) -> Tiny {
        Tiny {
            vocab: 96,
            hidden: 256,
            inter: 512,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            rope_theta: 10000.0,
            eps: 1e-5,
            ctx: 64,
            tied: true,
            proj_ty,
            embed_ty: GgmlType::Q8_0,
            seed: 7,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// A reference model: every weight as f64, HF layout, exactly the values the file's blocks decode to.
#[derive(Debug, Clone)]
pub struct RefModel {
    pub t: Tiny,
    pub embed: Vec<f64>,
    pub output: Option<Vec<f64>>,
    pub layers: Vec<RefLayer>,
    pub norm: Vec<f64>,
}

#[derive(Debug, Clone)]
pub struct RefLayer {
    pub attn_norm: Vec<f64>,
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub o: Vec<f64>,
    pub ffn_norm: Vec<f64>,
    pub gate: Vec<f64>,
    pub up: Vec<f64>,
    pub down: Vec<f64>,
}

fn random(rng: &mut SplitMix64, n: usize, scale: f64) -> Vec<f32> {
    (0..n)
        .map(|_| ((2.0 * rng.next_f64() - 1.0) * scale) as f32)
        .collect()
}

/// Encodes with the crate's quantizer (the format's validity is what the reference checks) and
/// decodes with the reference's own decoder.
fn encode(ty: GgmlType, values: &[f32]) -> (Vec<u8>, Vec<f64>) {
    let mut bytes = Vec::new();
    cohort_trainer::gguf::quant::quantize(ty, values, &mut bytes);
    let decoded = ref_dequantize(ty, &bytes, values.len());
    (bytes, decoded)
}

/// llama.cpp's converter: within each head, HF row `t·(d/2) + i` goes to GGUF row `2i + t`.
fn permute_rows(bytes: &[u8], heads: usize, head_dim: usize, rows: usize) -> Vec<u8> {
    let rb = bytes.len() / rows;
    let half = head_dim / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for t in 0..2 {
            for i in 0..half {
                let hf = h * head_dim + t * half + i;
                let gg = h * head_dim + 2 * i + t;
                out[gg * rb..(gg + 1) * rb].copy_from_slice(&bytes[hf * rb..(hf + 1) * rb]);
            }
        }
    }
    out
}

/// Builds the GGUF bytes of a tiny model and its reference.
pub fn tiny_model(t: &Tiny) -> (Vec<u8>, RefModel) {
    let mut rng = SplitMix64::new(t.seed);
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", Value::String("llama".into()))
        .metadata("general.name", Value::String("tiny-test".into()))
        .metadata("llama.block_count", Value::U32(t.layers as u32))
        .metadata("llama.context_length", Value::U32(t.ctx as u32))
        .metadata("llama.embedding_length", Value::U32(t.hidden as u32))
        .metadata("llama.feed_forward_length", Value::U32(t.inter as u32))
        .metadata("llama.attention.head_count", Value::U32(t.heads as u32))
        .metadata(
            "llama.attention.head_count_kv",
            Value::U32(t.kv_heads as u32),
        )
        .metadata("llama.rope.freq_base", Value::F32(t.rope_theta as f32))
        .metadata(
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(t.eps as f32),
        )
        .metadata(
            "llama.rope.dimension_count",
            Value::U32(t.head_dim() as u32),
        );
    let (h, i, hd) = (t.hidden, t.inter, t.head_dim());
    let kv = t.kv_heads * hd;
    let (eb, embed) = encode(t.embed_ty, &random(&mut rng, t.vocab * h, 0.5));
    w.tensor_raw(
        "token_embd.weight",
        &[h as u64, t.vocab as u64],
        t.embed_ty,
        eb,
    );
    let norm_values = |rng: &mut SplitMix64| -> Vec<f32> {
        random(rng, h, 0.2).iter().map(|x| 1.0 + x).collect()
    };
    let mut layers = Vec::new();
    for l in 0..t.layers {
        let mut proj = |name: &str, rows: usize, cols: usize, permute: Option<usize>| -> Vec<f64> {
            let scale = 1.0 / (cols as f64).sqrt() * 1.5;
            let (bytes, decoded) = encode(t.proj_ty, &random(&mut rng, rows * cols, scale));
            let bytes = match permute {
                Some(heads) => permute_rows(&bytes, heads, hd, rows),
                None => bytes,
            };
            w.tensor_raw(
                format!("blk.{l}.{name}.weight"),
                &[cols as u64, rows as u64],
                t.proj_ty,
                bytes,
            );
            decoded
        };
        let q = proj("attn_q", h, h, Some(t.heads));
        let k = proj("attn_k", kv, h, Some(t.kv_heads));
        let v = proj("attn_v", kv, h, None);
        let o = proj("attn_output", h, h, None);
        let gate = proj("ffn_gate", i, h, None);
        let up = proj("ffn_up", i, h, None);
        let down = proj("ffn_down", h, i, None);
        let an = norm_values(&mut rng);
        let fnorm = norm_values(&mut rng);
        w.tensor_f32(
            format!("blk.{l}.attn_norm.weight"),
            &[h as u64],
            GgmlType::F32,
            &an,
        );
        w.tensor_f32(
            format!("blk.{l}.ffn_norm.weight"),
            &[h as u64],
            GgmlType::F32,
            &fnorm,
        );
        layers.push(RefLayer {
            attn_norm: an.iter().map(|x| *x as f64).collect(),
            q,
            k,
            v,
            o,
            ffn_norm: fnorm.iter().map(|x| *x as f64).collect(),
            gate,
            up,
            down,
        });
    }
    let norm = norm_values(&mut rng);
    w.tensor_f32("output_norm.weight", &[h as u64], GgmlType::F32, &norm);
    let output = if t.tied {
        None
    } else {
        let (ob, out) = encode(t.embed_ty, &random(&mut rng, t.vocab * h, 0.5));
        w.tensor_raw("output.weight", &[h as u64, t.vocab as u64], t.embed_ty, ob);
        Some(out)
    };
    let model = RefModel {
        t: t.clone(),
        embed,
        output,
        layers,
        norm: norm.iter().map(|x| *x as f64).collect(),
    };
    (w.to_bytes(), model)
}

/// The reference block decoder, written from the format definitions (f64, scalar).
pub fn ref_dequantize(ty: GgmlType, b: &[u8], n: usize) -> Vec<f64> {
    let h = |i: usize| f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f64();
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => {
            for c in b.chunks(4) {
                out.push(f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            }
        }
        GgmlType::F16 => {
            for k in 0..n {
                out.push(h(2 * k))
            }
        }
        GgmlType::BF16 => {
            for k in 0..n {
                out.push(bf16::from_bits(u16::from_le_bytes([b[2 * k], b[2 * k + 1]])).to_f64())
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
            let bs = ty.block_bytes();
            for blk in 0..n / 32 {
                let o = blk * bs;
                let d = h(o);
                for e in 0..32 {
                    let v = match ty {
                        GgmlType::Q8_0 => d * (b[o + 2 + e] as i8) as f64,
                        _ => {
                            let base = if ty == GgmlType::Q4_1 { o + 4 } else { o + 2 };
                            let byte = b[base + e % 16];
                            let q = if e < 16 { byte & 15 } else { byte >> 4 } as f64;
                            if ty == GgmlType::Q4_1 {
                                d * q + h(o + 2)
                            } else {
                                d * (q - 8.0)
                            }
                        }
                    };
                    out.push(v);
                }
            }
        }
        GgmlType::Q4K => {
            for blk in 0..n / 256 {
                let o = blk * 144;
                let (d, dmin) = (h(o), h(o + 2));
                let s = &b[o + 4..o + 16];
                let qs = &b[o + 16..o + 144];
                for e in 0..256 {
                    let sub = e / 32; // 8 sub-blocks of 32
                    let (sc, m) = if sub < 4 {
                        (s[sub] & 63, s[sub + 4] & 63)
                    } else {
                        (
                            (s[sub + 4] & 15) | ((s[sub - 4] >> 6) << 4),
                            (s[sub + 4] >> 4) | ((s[sub] >> 6) << 4),
                        )
                    };
                    // Each 64-element chunk shares 32 bytes: low nibbles first, then high nibbles.
                    let chunk = e / 64;
                    let within = e % 64;
                    let byte = qs[chunk * 32 + within % 32];
                    let q = if within < 32 { byte & 15 } else { byte >> 4 };
                    out.push(d * sc as f64 * q as f64 - dmin * m as f64);
                }
            }
        }
        GgmlType::Q6K => {
            for blk in 0..n / 256 {
                let o = blk * 210;
                let ql = &b[o..o + 128];
                let qh = &b[o + 128..o + 192];
                let sc = &b[o + 192..o + 208];
                let d = h(o + 208);
                for e in 0..256 {
                    let half = e / 128;
                    let r = e % 128;
                    let quarter = r / 32; // which 32-element group of the half
                    let l = r % 32;
                    let low_byte = ql[64 * half + l + if quarter % 2 == 1 { 32 } else { 0 }];
                    let low = if quarter < 2 {
                        low_byte & 15
                    } else {
                        low_byte >> 4
                    };
                    let high = (qh[32 * half + l] >> (2 * quarter)) & 3;
                    let q = ((low | (high << 4)) as i32 - 32) as f64;
                    let scale = sc[e / 16] as i8 as f64;
                    out.push(d * scale * q);
                }
            }
        }
        other => panic!("no reference decoder for {other}"),
    }
    out
}

fn matvec(w: &[f64], x: &[f64], rows: usize) -> Vec<f64> {
    let cols = x.len();
    (0..rows)
        .map(|r| (0..cols).map(|c| w[r * cols + c] * x[c]).sum())
        .collect()
}

fn rmsnorm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * inv * g).collect()
}

fn rope(v: &mut [f64], pos: usize, hd: usize, theta: f64) {
    let half = hd / 2;
    for head in v.chunks_mut(hd) {
        for i in 0..half {
            let angle = pos as f64 * theta.powf(-2.0 * i as f64 / hd as f64);
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * angle.cos() - b * angle.sin();
            head[i + half] = b * angle.cos() + a * angle.sin();
        }
    }
}

/// Logits for every position of `tokens`.
pub fn ref_forward(m: &RefModel, tokens: &[u32]) -> Vec<Vec<f64>> {
    let t = &m.t;
    let (h, hd) = (t.hidden, t.head_dim());
    let group = t.heads / t.kv_heads;
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&tok| m.embed[tok as usize * h..(tok as usize + 1) * h].to_vec())
        .collect();
    for layer in &m.layers {
        let mut keys = Vec::new();
        let mut values = Vec::new();
        let mut queries = Vec::new();
        for (p, x) in xs.iter().enumerate() {
            let n = rmsnorm(x, &layer.attn_norm, t.eps);
            let mut q = matvec(&layer.q, &n, h);
            let mut k = matvec(&layer.k, &n, t.kv_heads * hd);
            rope(&mut q, p, hd, t.rope_theta);
            rope(&mut k, p, hd, t.rope_theta);
            queries.push(q);
            keys.push(k);
            values.push(matvec(&layer.v, &n, t.kv_heads * hd));
        }
        for p in 0..xs.len() {
            let mut attn = vec![0f64; h];
            for head in 0..t.heads {
                let kvh = head / group;
                let q = &queries[p][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=p)
                    .map(|j| {
                        q.iter()
                            .zip(&keys[j][kvh * hd..(kvh + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for (j, e) in exps.iter().enumerate() {
                    for d in 0..hd {
                        attn[head * hd + d] += e / total * values[j][kvh * hd + d];
                    }
                }
            }
            let o = matvec(&layer.o, &attn, h);
            for (x, y) in xs[p].iter_mut().zip(o) {
                *x += y;
            }
            let n = rmsnorm(&xs[p], &layer.ffn_norm, t.eps);
            let g = matvec(&layer.gate, &n, t.inter);
            let u = matvec(&layer.up, &n, t.inter);
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = matvec(&layer.down, &act, h);
            for (x, y) in xs[p].iter_mut().zip(d) {
                *x += y;
            }
        }
    }
    let head = m.output.as_ref().unwrap_or(&m.embed);
    xs.iter()
        .map(|x| matvec(head, &rmsnorm(x, &m.norm, t.eps), t.vocab))
        .collect()
}

/// Writes bytes to a fresh temporary file and returns its guard and path.
pub fn temp_gguf(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

/// GPT-2's byte-to-character map, written from its definition: printable Latin-1 bytes stand
/// for themselves, the other 68 bytes for code points 256, 257, ... in byte order.
pub fn byte_char(b: u8) -> char {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|x| !printable(*x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

/// The specials of the tiny tokenizer, after the 256 byte tokens.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// Vocabulary of a tiny model with the tiny tokenizer: 256 bytes, 3 specials, a few merges.
pub const TOKENIZER_VOCAB: usize = 256 + SPECIALS.len() + 5;

/// Adds a byte-level tokenizer (every byte a token, a handful of merges, ChatML specials and
/// template) to a tiny model's metadata; the model's `vocab` must be [`TOKENIZER_VOCAB`].
pub fn tiny_model_with_tokenizer(t: &Tiny) -> (Vec<u8>, RefModel) {
    assert_eq!(t.vocab, TOKENIZER_VOCAB);
    let (bytes, model) = tiny_model(t);
    // Re-read the written metadata and append the tokenizer keys: simplest is to rebuild.
    let file_dir = tempfile::tempdir().unwrap();
    let path = file_dir.path().join("m.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let file = cohort_trainer::gguf::GgufFile::open(&path).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in file.metadata() {
        w.metadata(k.clone(), v.clone());
    }
    cohort_trainer::bench::add_tiny_chat_tokenizer(&mut w);
    for info in file.tensors() {
        let (_, data) = file.tensor_bytes(&info.name).unwrap();
        w.tensor_raw(info.name.clone(), &info.dims, info.ty, data.to_vec());
    }
    (w.to_bytes(), model)
}

/// Writes the reference model as a Hugging Face checkpoint (`config.json` and
/// `model.safetensors`, all tensors F32), written from the published safetensors layout.
pub fn write_hf_checkpoint(m: &RefModel, dir: &std::path::Path) {
    let t = &m.t;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": t.vocab,
        "hidden_size": t.hidden,
        "intermediate_size": t.inter,
        "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads,
        "num_key_value_heads": t.kv_heads,
        "rope_theta": t.rope_theta,
        "rms_norm_eps": t.eps,
        "max_position_embeddings": t.ctx,
        "tie_word_embeddings": t.tied,
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    let mut tensors: Vec<(String, Vec<usize>, &[f64])> = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![t.vocab, t.hidden],
            &m.embed,
        ),
        ("model.norm.weight".into(), vec![t.hidden], &m.norm),
    ];
    if let Some(out) = &m.output {
        tensors.push(("lm_head.weight".into(), vec![t.vocab, t.hidden], out));
    }
    let kv = t.kv_heads * t.head_dim();
    for (l, layer) in m.layers.iter().enumerate() {
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        tensors.push((p("input_layernorm"), vec![t.hidden], &layer.attn_norm));
        tensors.push((
            p("post_attention_layernorm"),
            vec![t.hidden],
            &layer.ffn_norm,
        ));
        tensors.push((p("self_attn.q_proj"), vec![t.hidden, t.hidden], &layer.q));
        tensors.push((p("self_attn.k_proj"), vec![kv, t.hidden], &layer.k));
        tensors.push((p("self_attn.v_proj"), vec![kv, t.hidden], &layer.v));
        tensors.push((p("self_attn.o_proj"), vec![t.hidden, t.hidden], &layer.o));
        tensors.push((p("mlp.gate_proj"), vec![t.inter, t.hidden], &layer.gate));
        tensors.push((p("mlp.up_proj"), vec![t.inter, t.hidden], &layer.up));
        tensors.push((p("mlp.down_proj"), vec![t.hidden, t.inter], &layer.down));
    }
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut data = Vec::new();
    for (name, shape, values) in &tensors {
        let start = data.len();
        for v in values.iter() {
            data.extend_from_slice(&(*v as f32).to_le_bytes());
        }
        header.insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}));
    }
    let mut head = serde_json::to_vec(&header).unwrap();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut file = (head.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&head);
    file.extend_from_slice(&data);
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
}

/// A job on the tiny model: rank 4 on q, v and down; 2 epochs of batches of 2; a segment every
/// 2 steps.
pub fn tiny_job() -> cohort_protocol::types::job::JobSpec {
    use cohort_protocol::ContentHash;
    use cohort_protocol::types::Timestamp;
    use cohort_protocol::types::datanet::DatanetId;
    use cohort_protocol::types::job::{
        AdapterConfig, AdapterKind, DatanetRef, Deadlines, Hyperparameters, JobSpec, LrSchedule,
        MergeMethod, Quorum, TargetModule, ValidationSpec, VerificationSpec,
    };
    let h = |i: u8| ContentHash::of(&[i]);
    JobSpec {
        name: "tiny".into(),
        base_model: h(1),
        adapter: AdapterConfig {
            kind: AdapterKind::Lora,
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec![TargetModule::Q, TargetModule::V, TargetModule::Down],
            rslora: false,
        },
        hyper: Hyperparameters {
            learning_rate: 2e-2,
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            epochs: 2,
            batch_size: 2,
            grad_accumulation: 1,
            seq_len: 64,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 21,
        },
        datanets: vec![DatanetRef {
            datanet: DatanetId(h(2)),
            version: 1,
            manifest: h(3),
        }],
        validation: ValidationSpec {
            fraction_ppm: 100_000,
            seed: 4,
            set: h(5),
        },
        rounds: 2,
        quorum: Quorum {
            min_updates: 1,
            max_workers: 4,
        },
        deadlines: Deadlines {
            enroll_ms: 1_000,
            train_ms: 60_000,
            validate_ms: 60_000,
        },
        merge: MergeMethod::ExactTruncated,
        early_stopping: None,
        verification: VerificationSpec {
            segment_steps: 2,
            audit_ppm: 50_000,
            norm_bound_ppm: 3_000_000,
            robust: cohort_protocol::types::RobustAggregation::None,
        },
        created_at: Timestamp(1_764_000_000_000),
    }
}
