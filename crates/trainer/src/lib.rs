//! The staged PaliGemma curriculum: run configs, schedules, the optimizer chain, position
//! embedding resampling, checkpoints and the training loop.

pub mod ckpt;
pub mod config;
pub mod error;
pub mod optim;
pub mod plot;
pub mod posemb;
pub mod schedule;
pub mod train;

pub use error::{Error, Result};
