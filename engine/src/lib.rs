//! rlaifd engine: model math for LLaVA-1.5-family checkpoints (CLIP ViT + projector + LLaMA decoder) and
//! plain LLaMA models, on the CPU backend.
//!
//! Conventions (llm.c style): activations are plain `Vec<f32>` row-major buffers whose shape is written in a
//! comment beside them, e.g. `// (T, C)`; sizes are `usize`. Weights are loaded once and never mutated;
//! LoRA adapters live beside the base model and are passed into every forward call, so swapping an adapter
//! costs nothing.

pub mod adapter;
pub mod backend;
pub mod batch;
pub mod clip;
pub mod config;
pub mod cuda;
pub mod cuda_bench;
pub mod cuda_clip;
pub mod cuda_llama;
pub mod cuda_lora;
pub mod cuda_train;
pub mod error;
pub mod failpoint;
pub mod family;
pub mod feedback;
pub mod generate;
pub mod hallucination;
pub mod image;
pub mod init;
pub mod interrupt;
pub mod limits;
pub mod linear;
pub mod llama;
pub mod llava;
pub mod ops;
pub mod qwen_vit;
pub mod rng;
pub mod sampling;
pub mod shapes;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use adapter::Adapter;
pub use error::{EngineError, Result};
pub use llava::{LoadOptions, Model};
