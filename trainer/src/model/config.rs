//! The shape of a Llama-family model, read from a GGUF file's metadata.

use burn::config::Config;

use crate::gguf::{GgufError, GgufErrorKind, GgufFile};

/// Hyper-parameters of a Llama-architecture decoder (Llama 2/3, SmolLM, TinyLlama, ...).
#[derive(Config, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    #[config(default = 1e-5)]
    pub rms_norm_eps: f64,
    /// The context length the model was trained for; longer inputs are refused.
    #[config(default = 2048)]
    pub max_seq_len: usize,
    /// The output projection reuses the token embedding.
    #[config(default = true)]
    pub tie_embeddings: bool,
}

impl LlamaConfig {
    /// Reads the configuration of a `llama`-architecture GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<LlamaConfig, GgufError> {
        let invalid = |msg: String| GgufError {
            path: file.path().to_path_buf(),
            kind: GgufErrorKind::Invalid(msg),
        };
        let arch = file.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(invalid(format!(
                "architecture {arch:?} is not supported (Cohort runs \"llama\" models)"
            )));
        }
        let u = |key: &str| file.get_u64(&format!("llama.{key}")).map(|v| v as usize);
        let hidden_size = u("embedding_length")?;
        let num_heads = u("attention.head_count")?;
        let num_kv_heads = match file.metadata().get("llama.attention.head_count_kv") {
            Some(_) => u("attention.head_count_kv")?,
            None => num_heads,
        };
        let vocab_size = match file.metadata().get("llama.vocab_size") {
            Some(_) => u("vocab_size")?,
            None => file
                .tensor("token_embd.weight")?
                .dims
                .get(1)
                .copied()
                .unwrap_or(0) as usize,
        };
        if num_heads == 0
            || num_kv_heads == 0
            || hidden_size % num_heads != 0
            || num_heads % num_kv_heads != 0
        {
            return Err(invalid(format!(
                "{num_heads} attention heads, {num_kv_heads} key/value heads and hidden size {hidden_size} do not fit together"
            )));
        }
        let head_dim = hidden_size / num_heads;
        if let Some(v) = file.metadata().get("llama.rope.dimension_count")
            && v.as_u64() != Some(head_dim as u64)
        {
            return Err(invalid(format!(
                "partial rotary embeddings (llama.rope.dimension_count {v:?}, head dimension {head_dim}) are not supported"
            )));
        }
        let f = |key: &str, default: f64| -> Result<f64, GgufError> {
            match file.metadata().get(key) {
                Some(_) => file.get_f64(key),
                None => Ok(default),
            }
        };
        let config = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_layers: u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: f("llama.rope.freq_base", 10000.0)?,
            rms_norm_eps: f("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
            max_seq_len: u("context_length").unwrap_or(2048),
            tie_embeddings: !file.has_tensor("output.weight"),
        };
        if head_dim % 2 != 0 || config.num_layers == 0 || config.vocab_size == 0 {
            return Err(invalid(format!("implausible model shape: {config:?}")));
        }
        Ok(config)
    }

    /// Parameters in the model (the tied output counted once).
    pub fn num_params(&self) -> usize {
        let (h, i, kv) = (
            self.hidden_size,
            self.intermediate_size,
            self.num_kv_heads * self.head_dim,
        );
        let per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h;
        let embed = self.vocab_size * h;
        embed + self.num_layers * per_layer + h + if self.tie_embeddings { 0 } else { embed }
    }
}
