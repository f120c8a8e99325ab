//! Cohort's trainer: the only crate in the workspace that depends on burn.
//!
//! Every tensor in Cohort lives here. The other crates hand this one bytes and hashes (a base
//! model file, data shards, an adapter blob) and get bytes and numbers back; `protocol` and
//! `peer` never see a tensor type.
//!
//! Modules follow burn 0.22's Config -> init -> Module habit (see burn-nn's `Linear`): a
//! `#[derive(Config)]` struct, an `init` that builds the module on a run-time
//! [`Device`](burn::tensor::Device), and a `#[derive(Module)]` struct with a `forward`. Modules and
//! tensors carry no backend generic; the CPU device is `Device::flex()` and training runs on
//! `Device::flex().autodiff()`.
//!
//! What is here now:
//!
//! - [`lora`]: the LoRA linear layer (frozen base weight plus trainable low-rank factors), with
//!   PEFT's initialisation drawn from an explicit seed, and the delta / merged weights that
//!   merging and export need.
//!
//! What later work adds here: the GGUF (Q4_1 / Q8_0) and HF safetensors import, the Llama model
//! built from [`lora::LoraLinear`] layers, the quantized (QLoRA) linear, the training loop with its
//! state-hash commitments, generation, PEFT adapter export, and adapter merging.

pub mod adapter;
pub mod bench;
pub mod data;
pub mod engine;
pub mod generate;
pub mod gguf;
pub mod lora;
pub mod merge;
pub mod model;
pub mod models;
pub mod perplexity;
pub mod tokenizer;
pub mod train;
