//! What a GPU backend needs at run time, checked before any Burn call: a missing driver, a device
//! index past the devices there are, or a device list the backend cannot train on becomes one
//! line naming the device, what is missing and what to do, instead of a panic inside the
//! backend. Also what `pali doctor` reports.
//!
//! CUDA is probed through the driver's C API (`libcuda.so.1`, loaded with libloading, as
//! cudarc loads it); wgpu by enumerating adapters as cubecl-wgpu does.

use std::str::FromStr;

use anyhow::Result;

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

/// One or more devices of one kind, written `cuda:0,cuda:1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Devices(pub Vec<DeviceSpec>);

impl FromStr for Devices {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let d = s
            .split(',')
            .map(|x| x.trim().parse())
            .collect::<std::result::Result<Vec<DeviceSpec>, _>>()?;
        let kind = std::mem::discriminant(&d[0]);
        if d.iter().any(|x| std::mem::discriminant(x) != kind) {
            return Err(format!(
                "`{s}` mixes kinds of device; list devices of one kind"
            ));
        }
        Ok(Devices(d))
    }
}

/// Checks that `devices` can be used; the error is one line.
pub fn probe(devices: &Devices) -> Result<()> {
    let d = &devices.0;
    match d[0] {
        DeviceSpec::Cpu => Ok(()),
        DeviceSpec::Wgpu(_) => {
            if d.len() > 1 {
                anyhow::bail!(
                    "device list `{}`: data parallelism on wgpu is not supported (Burn 0.21's \
                     wgpu backend has no device-to-device path: tensors would go through the \
                     host, and its collectives are unimplemented); use one wgpu device, or CUDA \
                     devices",
                    names(devices)
                );
            }
            wgpu::probe(d[0])
        }
        DeviceSpec::Cuda(_) => cuda::probe(d),
    }
}

fn names(devices: &Devices) -> String {
    devices.0.iter().map(name).collect::<Vec<_>>().join(",")
}

/// The device as written on the command line.
pub fn name(d: &DeviceSpec) -> String {
    match d {
        DeviceSpec::Cpu => "cpu".into(),
        DeviceSpec::Wgpu(i) => format!("wgpu:{i}"),
        DeviceSpec::Cuda(i) => format!("cuda:{i}"),
    }
}

/// The lines of `pali doctor`.
pub fn report() -> Vec<String> {
    let mut out = vec![format!(
        "backends compiled in: cpu ({}){}{}",
        if cfg!(feature = "flex") {
            "flex"
        } else {
            "ndarray"
        },
        if cfg!(feature = "wgpu") { ", wgpu" } else { "" },
        if cfg!(feature = "cuda") { ", cuda" } else { "" },
    )];
    out.extend(cuda::report());
    out.extend(wgpu::report());
    out
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::ffi::{c_char, c_int, c_uint, CStr};

    use anyhow::{bail, Result};
    use libloading::{Library, Symbol};

    use super::DeviceSpec;

    /// The CUDA driver, initialised.
    struct Driver {
        lib: Library,
    }

    /// Loads the first of `names` that loads.
    fn load(names: &[&str]) -> Option<Library> {
        // SAFETY: these are the CUDA / NVRTC / NCCL shared libraries, whose initialisers are
        // safe to run (cudarc loads the same files).
        names.iter().find_map(|n| unsafe { Library::new(*n).ok() })
    }

    const CUDA: &[&str] = &["libcuda.so.1", "libcuda.so"];
    const NVRTC: &[&str] = &[
        "libnvrtc.so",
        "libnvrtc.so.13",
        "libnvrtc.so.12",
        "libnvrtc.so.11",
    ];
    const NCCL: &[&str] = &["libnccl.so.2", "libnccl.so"];

    impl Driver {
        fn open() -> std::result::Result<Self, String> {
            let lib = load(CUDA).ok_or("no CUDA driver: libcuda.so.1 not found")?;
            let d = Driver { lib };
            let rc = d.call_u(b"cuInit\0", 0)?;
            if rc != 0 {
                return Err(format!(
                    "the CUDA driver does not start (cuInit error {rc})"
                ));
            }
            Ok(d)
        }

        /// Calls `f(arg) -> CUresult`.
        fn call_u(&self, f: &[u8], arg: c_uint) -> std::result::Result<c_int, String> {
            // SAFETY: the symbol has the C signature `CUresult f(unsigned int)`.
            unsafe {
                let f: Symbol<unsafe extern "C" fn(c_uint) -> c_int> =
                    self.lib.get(f).map_err(|e| e.to_string())?;
                Ok(f(arg))
            }
        }

        /// Calls `f(&mut out) -> CUresult` for an int out-parameter.
        fn get_int(&self, f: &[u8]) -> Option<c_int> {
            let mut out: c_int = 0;
            // SAFETY: `CUresult f(int *)`.
            unsafe {
                let f: Symbol<unsafe extern "C" fn(*mut c_int) -> c_int> = self.lib.get(f).ok()?;
                (f(&mut out) == 0).then_some(out)
            }
        }

        fn count(&self) -> c_int {
            self.get_int(b"cuDeviceGetCount\0").unwrap_or(0)
        }

        /// Name, memory in bytes and compute capability of device `i`.
        fn device(&self, i: c_int) -> Option<(String, usize, (c_int, c_int))> {
            // SAFETY: the driver API signatures: cuDeviceGet(CUdevice*, int),
            // cuDeviceGetName(char*, int, CUdevice), cuDeviceTotalMem_v2(size_t*, CUdevice),
            // cuDeviceGetAttribute(int*, CUdevice_attribute, CUdevice).
            unsafe {
                let get: Symbol<unsafe extern "C" fn(*mut c_int, c_int) -> c_int> =
                    self.lib.get(b"cuDeviceGet\0").ok()?;
                let mut dev = 0;
                if get(&mut dev, i) != 0 {
                    return None;
                }
                let name: Symbol<unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int> =
                    self.lib.get(b"cuDeviceGetName\0").ok()?;
                let mut buf = [0 as c_char; 256];
                name(buf.as_mut_ptr(), 256, dev);
                let name = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
                let mem: Symbol<unsafe extern "C" fn(*mut usize, c_int) -> c_int> =
                    self.lib.get(b"cuDeviceTotalMem_v2\0").ok()?;
                let mut bytes = 0usize;
                mem(&mut bytes, dev);
                let attr: Symbol<unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int> =
                    self.lib.get(b"cuDeviceGetAttribute\0").ok()?;
                let (mut major, mut minor) = (0, 0);
                attr(&mut major, 75, dev); // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
                attr(&mut minor, 76, dev); // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
                Some((name, bytes, (major, minor)))
            }
        }
    }

    /// Version reported by `f(int*)` of a library (NVRTC and NCCL report theirs this way;
    /// NVRTC as two ints).
    fn version(lib: &Library, f: &[u8], two: bool) -> Option<String> {
        // SAFETY: `nvrtcVersion(int*, int*)` and `ncclGetVersion(int*)`.
        unsafe {
            if two {
                let f: Symbol<unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int> =
                    lib.get(f).ok()?;
                let (mut a, mut b) = (0, 0);
                (f(&mut a, &mut b) == 0).then(|| format!("{a}.{b}"))
            } else {
                let f: Symbol<unsafe extern "C" fn(*mut c_int) -> c_int> = lib.get(f).ok()?;
                let mut v = 0;
                (f(&mut v) == 0).then(|| format!("{v}"))
            }
        }
    }

    pub fn probe(devices: &[DeviceSpec]) -> Result<()> {
        let first = super::name(&devices[0]);
        let driver = match Driver::open() {
            Ok(d) => d,
            Err(e) => bail!(
                "device {first}: {e}; install the NVIDIA driver, or use --device cpu \
                 (`pali doctor` lists what this machine has)"
            ),
        };
        let n = driver.count();
        for d in devices {
            if let DeviceSpec::Cuda(i) = d {
                if *i as c_int >= n {
                    bail!(
                        "device {}: this machine has {n} CUDA device{}{}",
                        super::name(d),
                        if n == 1 { "" } else { "s" },
                        if n > 0 {
                            format!(" (cuda:0 to cuda:{})", n - 1)
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
        if load(NVRTC).is_none() {
            bail!(
                "device {first}: the CUDA driver is there but NVRTC (libnvrtc.so), which \
                 compiles the kernels, is not; install the CUDA toolkit's NVRTC (e.g. \
                 `pip install nvidia-cuda-nvrtc-cu12` and add its lib folder to \
                 LD_LIBRARY_PATH)"
            );
        }
        if devices.len() > 1 && load(NCCL).is_none() {
            bail!(
                "device list of {} CUDA devices: data parallelism needs NCCL (libnccl.so.2), \
                 which is not found; install it (e.g. `pip install nvidia-nccl-cu12` and add \
                 its lib folder to LD_LIBRARY_PATH), or train on one device",
                devices.len()
            );
        }
        Ok(())
    }

    pub fn report() -> Vec<String> {
        let driver = match Driver::open() {
            Ok(d) => d,
            Err(e) => return vec![format!("cuda: {e}")],
        };
        let v = driver
            .get_int(b"cuDriverGetVersion\0")
            .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10))
            .unwrap_or_else(|| "?".into());
        let mut out = vec![format!("cuda: driver {v}, {} device(s)", driver.count())];
        for i in 0..driver.count() {
            if let Some((name, bytes, (major, minor))) = driver.device(i) {
                out.push(format!(
                    "  cuda:{i}: {name}, {:.1} GiB, compute capability {major}.{minor}, bf16 {}",
                    bytes as f64 / (1u64 << 30) as f64,
                    if major >= 8 { "yes" } else { "no" }
                ));
            }
        }
        out.push(match load(NVRTC) {
            Some(l) => format!(
                "  nvrtc: {}",
                version(&l, b"nvrtcVersion\0", true).unwrap_or_else(|| "found".into())
            ),
            None => "  nvrtc: not found (CUDA kernels cannot be compiled)".into(),
        });
        out.push(match load(NCCL) {
            Some(l) => format!(
                "  nccl: {}",
                version(&l, b"ncclGetVersion\0", false).unwrap_or_else(|| "found".into())
            ),
            None => "  nccl: not found (needed for a list of CUDA devices)".into(),
        });
        out
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use anyhow::Result;

    use super::DeviceSpec;

    pub fn probe(devices: &[DeviceSpec]) -> Result<()> {
        anyhow::bail!(
            "device {} is not compiled in: rebuild with `--features cuda`",
            super::name(&devices[0])
        )
    }

    pub fn report() -> Vec<String> {
        vec!["cuda: not compiled in (`--features cuda`)".into()]
    }
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use anyhow::{bail, Result};
    use wgpu::{Backends, DeviceType, Instance, InstanceDescriptor};

    use super::DeviceSpec;

    /// Every adapter wgpu sees, as cubecl-wgpu enumerates them.
    fn adapters() -> Vec<wgpu::AdapterInfo> {
        let instance = Instance::new(InstanceDescriptor {
            backends: Backends::PRIMARY,
            ..InstanceDescriptor::new_without_display_handle()
        });
        futures_lite::future::block_on(instance.enumerate_adapters(Backends::PRIMARY))
            .into_iter()
            .map(|a| a.get_info())
            .collect()
    }

    pub fn probe(d: DeviceSpec) -> Result<()> {
        let DeviceSpec::Wgpu(i) = d else {
            return Ok(());
        };
        let all = adapters();
        if all.is_empty() {
            bail!(
                "device wgpu:{i}: no Vulkan, Metal or DX12 adapter found; install a GPU driver \
                 with Vulkan (on Debian without a GPU: `apt-get install mesa-vulkan-drivers \
                 libvulkan1`), or use --device cpu"
            );
        }
        // `wgpu:0` is Burn's default adapter; `wgpu:N` the N-th discrete GPU, else the N-th
        // adapter of type `Other` (cubecl-wgpu's `DiscreteGpu(N)`).
        let discrete = all
            .iter()
            .filter(|a| a.device_type == DeviceType::DiscreteGpu)
            .count();
        let other = all
            .iter()
            .filter(|a| a.device_type == DeviceType::Other)
            .count();
        if i > 0 && i >= discrete.max(other) {
            let seen: Vec<String> = all
                .iter()
                .map(|a| format!("{} ({:?}, {:?})", a.name, a.device_type, a.backend))
                .collect();
            bail!(
                "device wgpu:{i}: there are {discrete} discrete GPU(s) (wgpu:N picks the N-th; \
                 wgpu:0 is the default adapter); adapters: {}",
                seen.join("; ")
            );
        }
        Ok(())
    }

    pub fn report() -> Vec<String> {
        let all = adapters();
        let mut out = vec![format!("wgpu: {} adapter(s)", all.len())];
        for a in all {
            out.push(format!(
                "  {} ({:?}, {:?}, driver {} {}), bf16 no",
                a.name, a.device_type, a.backend, a.driver, a.driver_info
            ));
        }
        out
    }
}

#[cfg(not(feature = "wgpu"))]
mod wgpu {
    use anyhow::Result;

    use super::DeviceSpec;

    pub fn probe(d: DeviceSpec) -> Result<()> {
        anyhow::bail!(
            "device {} is not compiled in: rebuild with `--features wgpu`",
            super::name(&d)
        )
    }

    pub fn report() -> Vec<String> {
        vec!["wgpu: not compiled in (`--features wgpu`)".into()]
    }
}

/// The first panic inside [`at_device`], recorded by the hook of [`quiet_panics`].
static FIRST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
/// Whether a backend is running (its own threads panic too, so this is not thread-local).
static AT_DEVICE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Installs a panic hook: a panic while a backend runs ([`at_device`]) prints nothing unless
/// `RUST_BACKTRACE` is set, and its message is kept for the one-line error; any other panic is
/// printed as Rust prints it.
pub fn quiet_panics() {
    let default = std::panic::take_hook();
    let verbose = std::env::var_os("RUST_BACKTRACE").is_some();
    std::panic::set_hook(Box::new(move |info| {
        if !AT_DEVICE.load(std::sync::atomic::Ordering::SeqCst) {
            return default(info);
        }
        let p = info.payload();
        let text = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        let at = info
            .location()
            .map(|l| format!(" (at {}:{})", l.file(), l.line()))
            .unwrap_or_default();
        let mut first = FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            // One line, and not a page of it.
            let mut line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
            if line.len() > 400 {
                let cut = (0..=400)
                    .rev()
                    .find(|i| line.is_char_boundary(*i))
                    .unwrap_or(0);
                line.truncate(cut);
                line.push('…');
            }
            *first = Some(format!("{line}{at}"));
        }
        drop(first);
        if verbose {
            default(info);
        }
    }));
}

/// Runs `f` as backend work: a panic in it, or in a thread of the backend meanwhile, becomes an
/// error naming `device` and the first panic's message.
pub fn at_device<T>(device: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    use std::sync::atomic::Ordering::SeqCst;
    let slot = || FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
    slot(); // a panic from before is not this work's
    AT_DEVICE.store(true, SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    AT_DEVICE.store(false, SeqCst);
    let first = slot();
    match r {
        Ok(Ok(v)) => Ok(v),
        // An error that a panic in another thread caused: say so.
        Ok(Err(e)) => Err(match first {
            Some(p) => e.context(format!("device {device}: a thread panicked: {p}")),
            None => e,
        }),
        Err(payload) => {
            // The first panic is the cause (often a backend thread's); later ones its echoes.
            let msg = first.unwrap_or_else(|| {
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into())
            });
            anyhow::bail!("device {device}: panicked while running on it: {msg}")
        }
    }
}
