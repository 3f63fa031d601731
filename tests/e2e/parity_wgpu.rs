//! The HF parity checks on Burn's wgpu backend (GPU kernels; in CI on Mesa's lavapipe software
//! Vulkan driver). Built only with `--features wgpu`. Lavapipe compiles every kernel shape on
//! the CPU (minutes for a decode loop), so the CPU-side greedy test covers decoding and this one
//! covers the forward pass of both variants, mask by mask and layer by layer.
#![cfg(feature = "wgpu")]

use crate::common::parity::full_forward_parity;

type B = burn::backend::Wgpu;

#[test]
fn hf_forward_parity_on_wgpu() {
    let dev = burn::backend::wgpu::WgpuDevice::DefaultDevice;
    for variant in ["tiny-gemma1", "tiny-gemma2"] {
        full_forward_parity::<B>(variant, &dev);
    }
}
