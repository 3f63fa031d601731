//! `--device cpu|wgpu|cuda[:N]` → a Burn backend, chosen at run time among those compiled in.

use std::str::FromStr;

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;

#[cfg(feature = "flex")]
pub type Cpu = burn::backend::Flex;
#[cfg(all(not(feature = "flex"), feature = "ndarray"))]
pub type Cpu = burn::backend::NdArray;
#[cfg(not(any(feature = "flex", feature = "ndarray")))]
compile_error!("enable a CPU backend: feature `flex` (default) or `ndarray`");

/// Where to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Wgpu(usize),
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (kind, idx) = match s.split_once(':') {
            Some((k, i)) => (
                k,
                i.parse::<usize>()
                    .map_err(|_| format!("bad device index in `{s}`"))?,
            ),
            None => (s, 0),
        };
        match kind {
            "cpu" => Ok(DeviceSpec::Cpu),
            "wgpu" => Ok(DeviceSpec::Wgpu(idx)),
            "cuda" => Ok(DeviceSpec::Cuda(idx)),
            _ => Err(format!(
                "unknown device `{s}`: expected cpu, wgpu[:N] or cuda[:N]"
            )),
        }
    }
}

/// Work that runs on any backend.
pub trait Job {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output>;
}

/// Runs `job` on the backend named by `spec`.
pub fn dispatch<J: Job>(spec: DeviceSpec, job: J) -> Result<J::Output> {
    match spec {
        DeviceSpec::Cpu => job.run::<Cpu>(Default::default()),
        #[cfg(feature = "wgpu")]
        DeviceSpec::Wgpu(i) => {
            let device = if i == 0 {
                burn::backend::wgpu::WgpuDevice::DefaultDevice
            } else {
                burn::backend::wgpu::WgpuDevice::DiscreteGpu(i)
            };
            job.run::<burn::backend::Wgpu>(device)
        }
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => job.run::<burn::backend::Cuda>(burn::backend::cuda::CudaDevice::new(i)),
        #[allow(unreachable_patterns)]
        other => bail!("device {other:?} is not compiled in: rebuild with `--features wgpu` or `--features cuda`"),
    }
}
