//! The end-to-end tests of the `pali` workspace, in one test binary: each file below is a
//! module (one binary links Burn once, instead of once per file).

mod common;

mod ablate;
mod bad_input;

mod checkpoint;
mod cli_data;
mod cli_eval;
mod cli_model;
mod distributed;
mod parity;
mod parity_wgpu;
mod stage0;
mod train;
mod vqvae;
