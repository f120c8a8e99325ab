//! Where each weight of a Llama model lives in a GGUF file, and how it is laid out.
//!
//! Cohort keeps every weight in Hugging Face's layout (`[out_features, in_features]`, rows of the
//! query and key projections in HF order, rotary embedding applied NeoX-style to the two halves
//! of each head), so that PEFT adapters trained on the HF model apply unchanged. llama.cpp's
//! converter permutes the rows of `attn_q` and `attn_k` within each head so that the rotary pairs
//! are interleaved (`(2i, 2i+1)` instead of `(i, i + d/2)`); [`unpermute_rows`] undoes it. Whole
//! rows move, so quantized blocks (which run along a row) move intact.

use crate::gguf::{GgmlType, GgufError, GgufFile};

use super::LlamaConfig;

/// The projections of one transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The GGUF tensor name of this projection in block `layer`.
    pub fn gguf_name(self, layer: usize) -> String {
        let short = match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
        };
        format!("blk.{layer}.{short}.weight")
    }

    /// PEFT / Hugging Face module name (`q_proj`, ..., `down_proj`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// `(out_features, in_features)` of this projection.
    pub fn shape(self, c: &LlamaConfig) -> (usize, usize) {
        let kv = c.num_kv_heads * c.head_dim;
        match self {
            Proj::Q => (c.num_heads * c.head_dim, c.hidden_size),
            Proj::K | Proj::V => (kv, c.hidden_size),
            Proj::O => (c.hidden_size, c.num_heads * c.head_dim),
            Proj::Gate | Proj::Up => (c.intermediate_size, c.hidden_size),
            Proj::Down => (c.hidden_size, c.intermediate_size),
        }
    }

    /// Heads whose rows llama.cpp interleaved (query and key projections).
    pub fn permuted_heads(self, c: &LlamaConfig) -> Option<usize> {
        match self {
            Proj::Q => Some(c.num_heads),
            Proj::K => Some(c.num_kv_heads),
            _ => None,
        }
    }
}

/// Reorders rows from llama.cpp's interleaved rotary layout to Hugging Face's: within each head
/// of `head_dim` rows, GGUF row `2i + t` becomes HF row `t·head_dim/2 + i`. `row_bytes` is the size
/// of one row in `data` (any element type).
pub fn unpermute_rows(data: &[u8], heads: usize, head_dim: usize, row_bytes: usize) -> Vec<u8> {
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for t in 0..2 {
                let src = (h * head_dim + 2 * i + t) * row_bytes;
                let dst = (h * head_dim + t * half + i) * row_bytes;
                out[dst..dst + row_bytes].copy_from_slice(&data[src..src + row_bytes]);
            }
        }
    }
    out
}

/// A weight matrix as stored: type, `[rows, cols]` and the encoded rows in HF order.
#[derive(Debug, Clone)]
pub struct RawMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: Vec<u8>,
}

impl RawMatrix {
    /// Bytes of one encoded row.
    pub fn row_bytes(&self) -> usize {
        self.bytes.len() / self.rows.max(1)
    }

    /// The matrix dequantized to f32, row-major `[rows, cols]`.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        crate::gguf::quant::dequantize(self.ty, &self.bytes, &mut out);
        out
    }
}

/// Reads a projection's matrix (checked against the configuration, rows in HF order).
pub fn projection(
    file: &GgufFile,
    c: &LlamaConfig,
    layer: usize,
    proj: Proj,
) -> Result<RawMatrix, GgufError> {
    let (rows, cols) = proj.shape(c);
    matrix(
        file,
        &proj.gguf_name(layer),
        rows,
        cols,
        proj.permuted_heads(c).map(|h| (h, c.head_dim)),
    )
}

/// Reads a `[rows, cols]` matrix by GGUF name, optionally undoing the rotary row permutation.
pub fn matrix(
    file: &GgufFile,
    name: &str,
    rows: usize,
    cols: usize,
    permuted: Option<(usize, usize)>,
) -> Result<RawMatrix, GgufError> {
    file.expect_shape(name, &[cols as u64, rows as u64])?;
    let (info, bytes) = file.tensor_bytes(name)?;
    let bytes = match permuted {
        Some((heads, head_dim)) => unpermute_rows(bytes, heads, head_dim, bytes.len() / rows),
        None => bytes.to_vec(),
    };
    Ok(RawMatrix {
        ty: info.ty,
        rows,
        cols,
        bytes,
    })
}

/// Reads a vector (norm weights) as f32.
pub fn vector(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, GgufError> {
    file.expect_shape(name, &[len as u64])?;
    file.tensor_f32(name)
}

/// GGUF name of a block's attention norm.
pub fn attn_norm_name(layer: usize) -> String {
    format!("blk.{layer}.attn_norm.weight")
}

/// GGUF name of a block's feed-forward norm.
pub fn ffn_norm_name(layer: usize) -> String {
    format!("blk.{layer}.ffn_norm.weight")
}

/// Where a model's weights come from: a GGUF file or a Hugging Face checkpoint.
#[derive(Debug)]
pub enum Weights<'a> {
    Gguf(&'a GgufFile, LlamaConfig),
    Hf(&'a super::safetensors::Checkpoint),
}

/// A weight that could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Safetensors(#[from] super::safetensors::SafetensorsError),
}

impl<'a> Weights<'a> {
    /// The weights of a `llama` GGUF file.
    pub fn gguf(file: &'a GgufFile) -> Result<Weights<'a>, GgufError> {
        Ok(Weights::Gguf(file, LlamaConfig::from_gguf(file)?))
    }

    pub fn config(&self) -> &LlamaConfig {
        match self {
            Weights::Gguf(_, c) => c,
            Weights::Hf(ck) => ck.config(),
        }
    }

    /// The token embedding `[vocab, hidden]`.
    pub fn embed(&self) -> Result<RawMatrix, LoadError> {
        let c = self.config();
        Ok(match self {
            Weights::Gguf(f, _) => {
                matrix(f, "token_embd.weight", c.vocab_size, c.hidden_size, None)?
            }
            Weights::Hf(ck) => {
                ck.matrix("model.embed_tokens.weight", c.vocab_size, c.hidden_size)?
            }
        })
    }

    /// The output projection `[vocab, hidden]`, or `None` when it is tied to the embedding.
    pub fn output(&self) -> Result<Option<RawMatrix>, LoadError> {
        let c = self.config();
        if c.tie_embeddings {
            return Ok(None);
        }
        Ok(Some(match self {
            Weights::Gguf(f, _) => matrix(f, "output.weight", c.vocab_size, c.hidden_size, None)?,
            Weights::Hf(ck) => ck.matrix("lm_head.weight", c.vocab_size, c.hidden_size)?,
        }))
    }

    /// A projection of block `layer`, rows in HF order.
    pub fn projection(&self, layer: usize, proj: Proj) -> Result<RawMatrix, LoadError> {
        let c = self.config();
        Ok(match self {
            Weights::Gguf(f, _) => projection(f, c, layer, proj)?,
            Weights::Hf(ck) => {
                let (rows, cols) = proj.shape(c);
                ck.matrix(
                    &super::safetensors::hf_projection_name(layer, proj),
                    rows,
                    cols,
                )?
            }
        })
    }

    fn norm(&self, gguf: &str, hf: &str) -> Result<Vec<f32>, LoadError> {
        let h = self.config().hidden_size;
        Ok(match self {
            Weights::Gguf(f, _) => vector(f, gguf, h)?,
            Weights::Hf(ck) => ck.vector(hf, h)?,
        })
    }

    /// Block `layer`'s attention norm.
    pub fn attn_norm(&self, layer: usize) -> Result<Vec<f32>, LoadError> {
        self.norm(
            &attn_norm_name(layer),
            &format!("model.layers.{layer}.input_layernorm.weight"),
        )
    }

    /// Block `layer`'s feed-forward norm.
    pub fn ffn_norm(&self, layer: usize) -> Result<Vec<f32>, LoadError> {
        self.norm(
            &ffn_norm_name(layer),
            &format!("model.layers.{layer}.post_attention_layernorm.weight"),
        )
    }

    /// The final norm.
    pub fn final_norm(&self) -> Result<Vec<f32>, LoadError> {
        self.norm("output_norm.weight", "model.norm.weight")
    }
}

/// The inverse of [`unpermute_rows`]: Hugging Face row order back to llama.cpp's interleaved one
/// (HF row `t·head_dim/2 + i` of each head becomes GGUF row `2i + t`).
pub fn permute_rows(data: &[u8], heads: usize, head_dim: usize, row_bytes: usize) -> Vec<u8> {
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for t in 0..2 {
                let hf = (h * head_dim + t * half + i) * row_bytes;
                let gg = (h * head_dim + 2 * i + t) * row_bytes;
                out[gg..gg + row_bytes].copy_from_slice(&data[hf..hf + row_bytes]);
            }
        }
    }
    out
}
