//! The staged PaliGemma curriculum: run configs, schedules, the optimizer chain, position
//! embedding resampling, checkpoints and the training loop; and the VQ-VAE mask tokenizer's
//! training (`vqvae`).

pub mod ablate;
pub mod ckpt;
pub mod config;
pub mod dist;
pub mod error;
pub mod evaluate;
pub mod events;
#[cfg(feature = "flex")]
pub mod fused_adam;
pub mod init;
pub mod inputs;
mod metrics;
pub mod optim;
pub mod parallel;
pub mod plot;
pub mod posemb;
pub mod report;
pub mod rundir;
pub mod schedule;
pub mod stage;
pub mod stage0;
pub mod step;
pub mod tensorboard;
pub mod train;
pub mod vqvae;

pub use error::{Error, Result};
