//! Llama-family models: configuration, weight layout, and the burn module.

mod config;
pub mod llama;
pub mod packed;
pub mod safetensors;
pub mod weights;

pub use config::LlamaConfig;
pub use llama::{BaseWeights, ContextLengthError, Frozen, KvCache, Llama, LoraDropout};
pub use weights::{LoadError, Weights};
