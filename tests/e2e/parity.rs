//! Numerical parity with HF transformers 5.24 on the tiny random PaliGemma 1 and 2 fixtures
//! (tests/fixtures/README.md): every intermediate the fixtures store, at the tolerances they
//! recommend. The checks live in common/parity.rs so that parity_wgpu.rs runs them on wgpu too.

use crate::common::parity::{bf16_forward_close_to_hf, full_forward_parity, greedy_parity};

type B = burn::backend::Flex;

#[test]
fn gemma1_forward_matches_hf() {
    full_forward_parity::<B>("tiny-gemma1", &Default::default());
}
#[test]
fn gemma2_forward_matches_hf() {
    full_forward_parity::<B>("tiny-gemma2", &Default::default());
}
#[test]
fn gemma1_greedy_matches_hf() {
    greedy_parity::<B>("tiny-gemma1", &Default::default());
}
#[test]
fn gemma2_greedy_matches_hf() {
    greedy_parity::<B>("tiny-gemma2", &Default::default());
}
#[test]
fn bf16_compute_stays_close_to_hf() {
    bf16_forward_close_to_hf::<B>("tiny-gemma1", &Default::default());
    bf16_forward_close_to_hf::<B>("tiny-gemma2", &Default::default());
}
