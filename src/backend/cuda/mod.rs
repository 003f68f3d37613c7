//! The CUDA backend on cudarc (dynamic loading: nothing CUDA is needed to build or to run
//! the CPU paths): driver probe, one context and stream per [`Gpu`], kernels compiled at
//! run time with NVRTC for the device's compute capability ([`kernels`]), host wrappers
//! that launch them ([`ops`]), and cuBLAS / cuBLASLt products ([`blas`]).
//!
//! Every kernel compiles under NVRTC in CI (no GPU needed); on a GPU, `tests/cuda`
//! compares every op, every scheme's layer ([`linear`]) and every decoder's forward pass
//! ([`decoder`]) with the CPU under named error budgets.
//!
//! cudarc panics instead of returning an error when a library or symbol is missing, so
//! the driver library is looked up before the first driver call, and calls go through
//! [`guard`], which turns a panic into [`CudaError::Panic`].

pub mod blas;
pub mod decoder;
pub mod fuse;
pub mod kernels;
pub mod libs;
pub mod linear;
pub mod ops;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::CudaProbe;

/// The NVRTC wheel `scripts/fetch_nvrtc.sh` installs (CUDA 13.0, the GPU machines').
pub const NVRTC_WHEEL_VERSION: &str = "13.0.88";

/// What can go wrong on the CUDA path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    /// `libcuda` could not be loaded.
    #[error("no CUDA driver found ({0})")]
    NoDriver(String),
    /// A CUDA library (NVRTC, cuBLAS, cuBLASLt) could not be loaded.
    #[error("cuda library {lib}: {message}")]
    Library {
        /// The library.
        lib: &'static str,
        /// What went wrong.
        message: String,
    },
    /// A driver call failed.
    #[error("cuda {op}: {message}")]
    Driver {
        /// The call or op.
        op: String,
        /// What went wrong.
        message: String,
    },
    /// NVRTC rejected a kernel file.
    #[error("kernel file kernels/{file} does not compile for {arch}:\n{log}")]
    Compile {
        /// The kernel file.
        file: &'static str,
        /// The GPU architecture compiled for.
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// A cuBLAS or cuBLASLt call failed.
    #[error("{op}: {message}")]
    Blas {
        /// The call or op.
        op: &'static str,
        /// What went wrong.
        message: String,
    },
    /// Arguments of an op do not fit together.
    #[error("cuda op {op}: {message}")]
    Shape {
        /// The call or op.
        op: &'static str,
        /// What went wrong.
        message: String,
    },
    /// cudarc panicked (a missing library or symbol); the message it gave.
    #[error("cuda {op}: cudarc panicked: {message}")]
    Panic {
        /// The call or op.
        op: &'static str,
        /// What went wrong.
        message: String,
    },
}

impl From<CudaError> for crate::error::Error {
    fn from(e: CudaError) -> Self {
        crate::error::Error::Cuda(Box::new(e))
    }
}

/// Run `f`, turning a cudarc panic into [`CudaError::Panic`].
pub fn guard<T>(op: &'static str, f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, CudaError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "(no message)".into());
            Err(CudaError::Panic { op, message })
        }
    }
}

/// A driver error as [`CudaError::Driver`].
pub(crate) fn driver(op: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError {
    let op = op.into();
    move |e| CudaError::Driver { op, message: format!("{e:?}") }
}

/// True when `libcuda` can be loaded (the check cudarc needs before any driver call).
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The first device's name and compute capability, without letting cudarc panic.
pub fn probe() -> CudaProbe {
    if !driver_present() {
        return CudaProbe::NoDriver(
            "libcuda.so could not be loaded: no NVIDIA driver on this machine".into(),
        );
    }
    let found = guard("probe", || {
        use cudarc::driver::result;
        result::init().map_err(driver("cuInit"))?;
        let count = result::device::get_count().map_err(driver("cuDeviceGetCount"))?;
        if count < 1 {
            return Ok(None);
        }
        let dev = result::device::get(0).map_err(driver("cuDeviceGet"))?;
        let name = result::device::get_name(dev).map_err(driver("cuDeviceGetName"))?;
        use cudarc::driver::sys::CUdevice_attribute as A;
        // SAFETY: `dev` came from cuDeviceGet.
        let major =
            unsafe { result::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) }
                .map_err(driver("cuDeviceGetAttribute"))?;
        // SAFETY: as above.
        let minor =
            unsafe { result::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR) }
                .map_err(driver("cuDeviceGetAttribute"))?;
        Ok(Some((name, (major, minor))))
    });
    match found {
        Ok(Some((name, capability))) => CudaProbe::Ready { name, capability },
        Ok(None) => CudaProbe::NoDevice("the driver reports 0 devices".into()),
        Err(e) => CudaProbe::NoDevice(e.to_string()),
    }
}

/// The virtual architecture NVRTC compiles for on a device of this capability.
pub fn arch_for(capability: (i32, i32)) -> String {
    format!("compute_{}{}", capability.0, capability.1)
}

/// One CUDA device: its context, a stream, and the kernel modules loaded so far.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    capability: (i32, i32),
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Kernels looked up so far, by file and name: a forward pass launches hundreds, and
    /// each lookup would otherwise be a driver call.
    functions: Mutex<HashMap<(&'static str, String), CudaFunction>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("name", &self.name).field("capability", &self.capability).finish()
    }
}

impl Gpu {
    /// Device `ordinal`, after checking the driver is there.
    pub fn new(ordinal: usize) -> Result<Gpu, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDriver("libcuda.so could not be loaded".into()));
        }
        guard("context", || {
            let ctx = CudaContext::new(ordinal).map_err(driver(format!("context on device {ordinal}")))?;
            let name = ctx.name().map_err(driver("device name"))?;
            let capability = ctx.compute_capability().map_err(driver("compute capability"))?;
            // One stream per device and nothing shared across streams: cudarc's per-buffer
            // event tracking (two events per allocation, waits around launches once a
            // second stream exists) would only add cost.
            // SAFETY: called before any buffer exists; this crate uses a single stream.
            unsafe { ctx.disable_event_tracking() };
            // A created stream rather than the legacy default one, so a decode step can
            // later be captured into a CUDA graph.
            let stream = ctx.new_stream().map_err(driver("create stream"))?;
            Ok(Gpu {
                ctx,
                stream,
                name,
                capability,
                modules: Mutex::new(HashMap::new()),
                functions: Mutex::new(HashMap::new()),
            })
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's compute capability.
    pub fn capability(&self) -> (i32, i32) {
        self.capability
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every op of this device runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Kernel `name` of `file`, compiling (or loading cached PTX) and loading the module
    /// on first use.
    pub fn function(
        &self,
        file: &'static kernels::KernelFile,
        name: &str,
    ) -> Result<CudaFunction, CudaError> {
        let key = (file.name, name.to_string());
        if let Some(f) = self.functions.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(f.clone());
        }
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match modules.get(file.name) {
                Some(m) => m.clone(),
                None => {
                    let ptx = kernels::cached_ptx(file, &arch_for(self.capability))?;
                    let m = guard("load module", || {
                        self.ctx
                            .load_module(Ptx::from_src(ptx))
                            .map_err(driver(format!("load kernels/{}", file.name)))
                    })?;
                    modules.insert(file.name, m.clone());
                    m
                }
            }
        };
        let f =
            guard("load function", || module.load_function(name).map_err(driver(format!("kernel {name}"))))?;
        self.functions.lock().unwrap_or_else(|e| e.into_inner()).insert(key, f.clone());
        Ok(f)
    }

    /// `len` elements on the device, not initialised: for outputs a kernel writes whole
    /// (saves the memset [`Gpu::zeros`] queues).
    pub fn uninit<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>, CudaError> {
        // SAFETY: the caller hands the buffer to a kernel that writes every element before
        // anything reads it.
        guard("alloc", || {
            unsafe { self.stream.alloc(len) }.map_err(driver(format!("allocate {len} elements")))
        })
    }

    /// A copy of `data` on the device.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>, CudaError> {
        guard("upload", || self.stream.clone_htod(data).map_err(driver("copy to device")))
    }

    /// The device buffer's contents.
    pub fn download<T: DeviceRepr>(&self, data: &CudaSlice<T>) -> Result<Vec<T>, CudaError> {
        guard("download", || self.stream.clone_dtoh(data).map_err(driver("copy to host")))
    }

    /// `len` zeroed elements on the device.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>, CudaError> {
        guard("alloc", || self.stream.alloc_zeros(len).map_err(driver(format!("allocate {len} elements"))))
    }

    /// Wait for everything queued on the stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        guard("synchronize", || self.stream.synchronize().map_err(driver("synchronize")))
    }

    /// Free and total device memory in bytes (`cuMemGetInfo`).
    pub fn memory(&self) -> Result<(usize, usize), CudaError> {
        guard("memory", || self.ctx.mem_get_info().map_err(driver("cuMemGetInfo")))
    }

    /// The device's stream-ordered memory pool (where cudarc's allocations come from).
    fn pool(&self) -> Result<cudarc::driver::sys::CUmemoryPool, CudaError> {
        guard("memory pool", || {
            let mut pool = std::mem::MaybeUninit::uninit();
            // SAFETY: writes one pool handle for a valid device.
            unsafe { cudarc::driver::sys::cuDeviceGetMemPool(pool.as_mut_ptr(), self.ctx.cu_device()) }
                .result()
                .map_err(driver("cuDeviceGetMemPool"))?;
            // SAFETY: initialised by the successful call above.
            Ok(unsafe { pool.assume_init() })
        })
    }

    fn pool_attribute(
        &self,
        attr: cudarc::driver::sys::CUmemPool_attribute,
        set: Option<u64>,
    ) -> Result<u64, CudaError> {
        let pool = self.pool()?;
        guard("memory pool attribute", || {
            use cudarc::driver::sys::{cuMemPoolGetAttribute, cuMemPoolSetAttribute};
            let mut value = set.unwrap_or(0);
            let ptr = (&mut value as *mut u64).cast();
            // SAFETY: the attributes used here are 64-bit values.
            let r = unsafe {
                if set.is_some() {
                    cuMemPoolSetAttribute(pool, attr, ptr)
                } else {
                    cuMemPoolGetAttribute(pool, attr, ptr)
                }
            };
            r.result().map_err(driver("cuMemPoolGet/SetAttribute"))?;
            Ok(value)
        })
    }

    /// Keep freed memory in the pool instead of returning it to the driver at every
    /// synchronisation, so a forward pass's short-lived buffers cost no new mappings.
    pub fn keep_pool_memory(&self) -> Result<(), CudaError> {
        use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
        self.pool_attribute(CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, Some(u64::MAX)).map(|_| ())
    }

    /// The pool's high-water mark of memory in use since the last reset, bytes.
    pub fn peak_pool_bytes(&self) -> Result<u64, CudaError> {
        use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        self.pool_attribute(CU_MEMPOOL_ATTR_USED_MEM_HIGH, None)
    }

    /// Start a new high-water mark (the pool's use now).
    pub fn reset_peak_pool_bytes(&self) -> Result<(), CudaError> {
        use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        self.pool_attribute(CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0)).map(|_| ())
    }

    /// Record what `record` queues on the stream into a graph (nothing runs) and
    /// instantiate it. Relaxed capture: calls that are not stream operations (a module or
    /// function lookup, a function attribute) are allowed on this thread meanwhile; the
    /// ones that would break it (synchronisation, pageable copies) must not be made.
    pub fn capture(
        &self,
        record: impl FnOnce() -> Result<(), CudaError>,
    ) -> Result<cudarc::driver::CudaGraph, CudaError> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        guard("begin capture", || {
            self.stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(driver("cuStreamBeginCapture"))
        })?;
        let recorded = record();
        // cudarc keeps errors of calls that cannot return one (a free in a broken capture)
        // and returns them from the next call: clear them so that call ends the capture.
        let pending = self.ctx.check_err().map_err(driver("capture"));
        let ended = guard("end capture", || {
            self.stream
                .end_capture(CUgraphInstantiate_flags(0))
                .map_err(driver("cuStreamEndCapture / cuGraphInstantiate"))
        });
        recorded?;
        pending?;
        ended?
            .ok_or(CudaError::Driver { op: "cuStreamEndCapture".into(), message: "no graph captured".into() })
    }

    /// Milliseconds the device spends on `f`'s work, between two events recorded on the
    /// stream around it.
    pub fn time_ms(&self, f: impl FnOnce() -> Result<(), CudaError>) -> Result<f32, CudaError> {
        use cudarc::driver::sys::CUevent_flags;
        let (start, end) = guard("events", || {
            let s =
                self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver("create event"))?;
            let e =
                self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver("create event"))?;
            Ok((s, e))
        })?;
        guard("record event", || start.record(&self.stream).map_err(driver("record event")))?;
        f()?;
        guard("elapsed", || {
            end.record(&self.stream).map_err(driver("record event"))?;
            end.synchronize().map_err(driver("event synchronize"))?;
            start.elapsed_ms(&end).map_err(driver("event elapsed time"))
        })
    }
}

/// The process's one [`Gpu`] on device 0, created on first use: every case of a run
/// shares its context, stream and loaded kernels.
pub fn shared_gpu() -> Result<Arc<Gpu>, CudaError> {
    static GPU: std::sync::OnceLock<Result<Arc<Gpu>, CudaError>> = std::sync::OnceLock::new();
    GPU.get_or_init(|| {
        let gpu = Gpu::new(0)?;
        gpu.keep_pool_memory()?;
        Ok(Arc::new(gpu))
    })
    .clone()
}

/// The driver's CUDA version as `major.minor` (`cuDriverGetVersion`).
pub fn driver_version() -> Result<String, CudaError> {
    guard("driver version", || {
        let mut v = 0i32;
        // SAFETY: writes one int.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(driver("cuDriverGetVersion"))?;
        Ok(format!("{}.{}", v / 1000, (v % 1000) / 10))
    })
}

/// Device-to-device copy bandwidth in GB/s, bytes read and written both counted: the
/// median of `repeats` copies of `bytes`, timed with CUDA events (the roofline the
/// decode floor and the GEMV targets are measured against).
pub fn copy_bandwidth_gb_s(gpu: &Gpu, bytes: usize, repeats: usize) -> Result<f64, CudaError> {
    let src = gpu.zeros::<u8>(bytes)?;
    let mut dst = gpu.zeros::<u8>(bytes)?;
    let stream = gpu.stream().clone();
    let mut copy =
        || guard("memcpy dtod", || stream.memcpy_dtod(&src, &mut dst).map_err(driver("memcpy dtod")));
    copy()?;
    let mut ms = (0..repeats.max(1)).map(|_| gpu.time_ms(&mut copy)).collect::<Result<Vec<f32>, _>>()?;
    ms.sort_by(f32::total_cmp);
    let median = f64::from(ms[ms.len() / 2]);
    Ok(2.0 * bytes as f64 / (median * 1e-3) / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_turns_a_panic_into_an_error_naming_the_op() {
        let r: Result<(), CudaError> =
            guard("probe", || panic!("Unable to dynamically load the \"cuda\" library"));
        let e = r.unwrap_err().to_string();
        assert!(e.starts_with("cuda probe: cudarc panicked: Unable to dynamically load"), "{e}");
    }

    #[test]
    fn probe_without_a_driver_says_so_and_architectures_follow_the_capability() {
        if !driver_present() {
            assert!(matches!(probe(), CudaProbe::NoDriver(_)));
            assert!(Gpu::new(0).unwrap_err().to_string().starts_with("no CUDA driver found"));
        }
        assert_eq!(arch_for((9, 0)), "compute_90");
        assert_eq!(arch_for((8, 6)), "compute_86");
    }
}
