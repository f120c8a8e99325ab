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
//! What is here:
//!
//! - [`gguf`]: the GGUF reader and writer and the ggml block types (F32, F16, BF16, Q8_0, Q4_0,
//!   Q4_1, Q4_K, Q6_K).
//! - [`tokenizer`]: byte-level BPE and the chat template, built from the GGUF's metadata.
//! - [`model`]: the Llama decoder in burn (the model that trains, on any device), its
//!   configuration, its weights from GGUF or Hugging Face safetensors in HF layout.
//! - [`engine`]: the CPU inference engine over the GGUF's own blocks, with its SIMD kernels.
//! - [`generate`] and [`perplexity`]: text generation (sampling, stops, streaming) and
//!   llama.cpp-style perplexity.
//! - [`data`], [`adapter`], [`train`], [`merge`]: datasets with masked targets, LoRA adapters in
//!   PEFT's format, the training loop with checkpoints, and exact adapter merging.
//! - [`lora`]: the standalone LoRA linear layer and PEFT's seeded initialisation of `A`.
//! - [`verify`]: training commitments for spot checks: the hash of the whole training state, a
//!   commitment every K steps with a snapshot, and the replay of one segment.
//! - [`federated`]: what a peer calls in a federated round: train an update with commitments,
//!   check one, replay a segment, merge a round with Shapley values, bundle a directory.
//! - [`models`], [`bench`](mod@bench): the local model cache, and the inference and training benchmarks.
//!
//! What later work adds here: the quantized (QLoRA) base.

pub mod adapter;
pub mod bench;
pub mod data;
pub mod engine;
pub mod federated;
pub mod generate;
pub mod gguf;
pub mod lora;
pub mod merge;
pub mod model;
pub mod models;
pub mod perplexity;
pub mod tokenizer;
pub mod train;
pub mod verify;
