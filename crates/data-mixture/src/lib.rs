//! Turns raw datasets into exactly the batches PaliGemma trains on: tokenization and sequence
//! layout (`sequence`), with big_vision's per-token masks.

pub mod batch;
pub mod dataset;
pub mod dedup;
pub mod error;
pub mod font;
pub mod image;
pub mod import;
pub mod masks;
pub mod mixture;
pub mod rng;
pub mod sequence;
pub mod shards;
pub mod synth;
pub mod tasks;
pub mod tokenizer;
pub mod tokenizer_train;
pub mod transform;

pub use error::{Error, Result};
pub use sequence::{SequenceBuilder, TextExample, Truncation};
pub use tokenizer::PaliTokenizer;
