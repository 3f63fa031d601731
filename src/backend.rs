//! `--device cpu|wgpu|cuda[:N]` → a Burn backend, chosen at run time among those compiled in.
//! Training takes a list of devices of one kind (`cuda:0,cuda:1`) for data parallelism.

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;

#[cfg(feature = "flex")]
pub type Cpu = burn::backend::Flex;
#[cfg(all(not(feature = "flex"), feature = "ndarray"))]
pub type Cpu = burn::backend::NdArray;
#[cfg(not(any(feature = "flex", feature = "ndarray")))]
compile_error!("enable a CPU backend: feature `flex` (default) or `ndarray`");

pub use crate::devices::{DeviceSpec, Devices};

/// Work that runs on any backend.
pub trait Job: Sized {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output>;
    /// Runs on several devices of one backend; only data-parallel jobs override this.
    fn run_on<B: Backend>(self, devices: Vec<B::Device>) -> Result<Self::Output> {
        if devices.len() > 1 {
            bail!("this command runs on one device, not {}", devices.len());
        }
        self.run::<B>(devices.into_iter().next().expect("a device"))
    }
}

/// Runs `job` on the backend named by `spec`.
pub fn dispatch<J: Job>(spec: DeviceSpec, job: J) -> Result<J::Output> {
    dispatch_many(&Devices(vec![spec]), job)
}

/// Runs `job` on the backend of `devices` (all of one kind), with all of them. The devices are
/// probed first ([`crate::devices::probe`]); a panic inside the backend becomes an error.
pub fn dispatch_many<J: Job>(devices: &Devices, job: J) -> Result<J::Output> {
    crate::devices::probe(devices)?;
    let list: Vec<String> = devices.0.iter().map(crate::devices::name).collect();
    crate::devices::at_device(&list.join(","), || run_on(devices, job))
}

fn run_on<J: Job>(devices: &Devices, job: J) -> Result<J::Output> {
    let d = &devices.0;
    match d[0] {
        DeviceSpec::Cpu => job.run_on::<Cpu>(vec![Default::default(); d.len()]),
        #[cfg(feature = "wgpu")]
        DeviceSpec::Wgpu(_) => {
            let wgpu = |s: &DeviceSpec| match s {
                DeviceSpec::Wgpu(0) => burn::backend::wgpu::WgpuDevice::DefaultDevice,
                DeviceSpec::Wgpu(i) => burn::backend::wgpu::WgpuDevice::DiscreteGpu(*i),
                _ => unreachable!("one kind"),
            };
            job.run_on::<burn::backend::Wgpu>(d.iter().map(wgpu).collect())
        }
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(_) => {
            let cuda = |s: &DeviceSpec| match s {
                DeviceSpec::Cuda(i) => burn::backend::cuda::CudaDevice::new(*i),
                _ => unreachable!("one kind"),
            };
            job.run_on::<burn::backend::Cuda>(d.iter().map(cuda).collect())
        }
        #[allow(unreachable_patterns)]
        other => bail!("device {other:?} is not compiled in: rebuild with `--features wgpu` or `--features cuda`"),
    }
}
