//! Devices: where a case runs (`device:` in a suite), how `auto` is resolved, and the
//! CUDA backend (behind the `cuda` cargo feature, loaded dynamically so a build with it
//! runs on machines without a driver).
//!
//! [`resolve`] never calls into the CUDA driver blindly: cudarc panics when `libcuda` is
//! absent, so the driver library is looked up first ([`cuda_probe`]) and every driver
//! call after that is wrapped so a panic becomes an error.

pub mod bench;
#[cfg(feature = "cuda")]
pub mod cuda;
// The same names with and without CUDA: the rest of this file never asks which build it is.
#[cfg_attr(feature = "cuda", path = "gpu_cuda.rs")]
#[cfg_attr(not(feature = "cuda"), path = "gpu_stub.rs")]
mod gpu;

use std::fmt;
use std::str::FromStr;

/// Where a case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// The host CPU (always available).
    Cpu,
    /// The first CUDA device.
    Cuda,
}

impl Device {
    /// The name as spelled in suites and results.
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// What a suite asks for with `device:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// `cpu`.
    Cpu,
    /// `cuda`: CUDA or an error.
    Cuda,
    /// `auto` (the default): CUDA when usable, else the CPU.
    Auto,
}

impl FromStr for DeviceRequest {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s {
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda),
            "auto" => Ok(DeviceRequest::Auto),
            other => Err(DeviceError::Unknown(other.to_string())),
        }
    }
}

/// Why a device cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// A `device:` value that is not a device.
    #[error("device `{0}`, expected one of: cpu, cuda, auto")]
    Unknown(String),
    /// The binary was built without the `cuda` feature.
    #[error(
        "device `cuda`: this build has no CUDA support (built without the `cuda` cargo feature); use `cpu`"
    )]
    NotBuilt,
    /// No CUDA driver library could be loaded.
    #[error(
        "device `cuda`: no CUDA driver found ({0}); use `cpu`, or `auto` to use CUDA when it is available"
    )]
    NoDriver(String),
    /// The driver loaded but reported no usable device.
    #[error("device `cuda`: the CUDA driver is present but no device is usable ({0}); use `cpu`")]
    NoDevice(String),
    /// A device is usable, but the runner cannot run cases on it yet.
    #[error("device `cuda`: found {0}, but this build's runner has no CUDA forward pass; use `cpu`")]
    RunnerNotReady(String),
}

/// What the CUDA probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaProbe {
    /// Built without the `cuda` feature.
    NotBuilt,
    /// `libcuda` could not be loaded: the reason.
    NoDriver(String),
    /// The driver loaded but `cuInit` or the device count failed, or the count is 0.
    NoDevice(String),
    /// A device: its name and compute capability.
    Ready {
        /// Device 0's name.
        name: String,
        /// Compute capability (major, minor).
        capability: (i32, i32),
    },
}

/// Whether the runner can run cases on CUDA: decoders' forward passes go through
/// `backend::cuda::decoder` when the crate is built with the `cuda` feature.
pub const RUNNER_RUNS_CUDA: bool = cfg!(feature = "cuda");

/// Look for a usable CUDA device without letting cudarc panic.
pub fn cuda_probe() -> CudaProbe {
    gpu::probe()
}

/// The device a suite's request resolves to, given what the probe found and whether the
/// runner can run CUDA cases.
pub fn resolve_with(
    request: DeviceRequest,
    probe: &CudaProbe,
    runner_runs_cuda: bool,
) -> Result<Device, DeviceError> {
    let cuda = match probe {
        CudaProbe::NotBuilt => Err(DeviceError::NotBuilt),
        CudaProbe::NoDriver(why) => Err(DeviceError::NoDriver(why.clone())),
        CudaProbe::NoDevice(why) => Err(DeviceError::NoDevice(why.clone())),
        CudaProbe::Ready { name, capability: (major, minor) } if !runner_runs_cuda => {
            Err(DeviceError::RunnerNotReady(format!("{name} (compute capability {major}.{minor})")))
        }
        CudaProbe::Ready { .. } => Ok(Device::Cuda),
    };
    match request {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Cuda => cuda,
        DeviceRequest::Auto => Ok(cuda.unwrap_or(Device::Cpu)),
    }
}

/// Resolve a `device:` value on this machine (probing CUDA only when it matters).
pub fn resolve(request: DeviceRequest) -> Result<Device, DeviceError> {
    if request == DeviceRequest::Cpu {
        return Ok(Device::Cpu);
    }
    resolve_with(request, &cuda_probe(), RUNNER_RUNS_CUDA)
}

/// The GPU a CUDA run uses, as its results record it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuRecord {
    /// Device name and compute capability.
    pub name: String,
    /// Driver CUDA version.
    pub driver: String,
    /// Measured device-to-device copy bandwidth, GB/s (read and write counted).
    pub copy_gb_s: f64,
}

/// Bytes copied per timed copy when measuring the bandwidth of a run's GPU.
const BANDWIDTH_PROBE_BYTES: usize = 512 << 20;

/// Describe the GPU of a CUDA run, measuring its copy bandwidth on the first call.
pub fn gpu_record() -> Result<GpuRecord, crate::error::Error> {
    static RECORD: std::sync::OnceLock<GpuRecord> = std::sync::OnceLock::new();
    if let Some(r) = RECORD.get() {
        return Ok(r.clone());
    }
    let r = gpu::record(BANDWIDTH_PROBE_BYTES)?;
    Ok(RECORD.get_or_init(|| r).clone())
}

/// The floor of a decode step on the run's GPU: reading its weights once at the measured
/// copy speed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeFloor {
    /// The GPU's measured device-to-device copy bandwidth, GB/s.
    pub copy_gb_s: f64,
    /// Milliseconds to read the step's weight bytes at that speed.
    pub floor_ms: f64,
}

impl DecodeFloor {
    /// The floor of reading `weight_bytes` at `copy_gb_s`.
    pub fn of(weight_bytes: u64, copy_gb_s: f64) -> DecodeFloor {
        DecodeFloor { copy_gb_s, floor_ms: weight_bytes as f64 / (copy_gb_s * 1e9) * 1e3 }
    }
}

/// The floor of a decode step that reads `weight_bytes` on this run's GPU (its copy
/// bandwidth measured once).
pub fn decode_floor(weight_bytes: u64) -> Result<DecodeFloor, crate::error::Error> {
    Ok(DecodeFloor::of(weight_bytes, gpu_record()?.copy_gb_s))
}

/// Put a built `model` on `device`: unchanged for the CPU; on CUDA a decoder's forward
/// passes move to the GPU (`prefill_rows`: the prefill size whose kernel paths are
/// recorded next to the decode step's).
pub fn place(
    model: crate::model::Model,
    device: Device,
    prefill_rows: usize,
) -> Result<crate::model::Model, crate::error::Error> {
    use crate::model::Model;
    match (device, model) {
        (Device::Cpu, model) => Ok(model),
        (Device::Cuda, Model::Causal(lm)) => gpu::place_decoder(lm, prefill_rows).map(Model::Causal),
        (Device::Cuda, Model::Encoder(_)) => Err(crate::error::Error::Device {
            device: "cuda",
            message: "encoders (bert) have no CUDA forward pass yet; run them with `device: cpu`".into(),
        }),
    }
}

/// Start a new device-memory high-water mark (CUDA runs; nothing on the CPU).
pub fn reset_device_peak(device: Device) {
    if device == Device::Cuda {
        gpu::reset_peak();
    }
}

/// The device-memory high-water mark since [`reset_device_peak`], bytes (CUDA runs).
pub fn device_peak_bytes(device: Device) -> Option<u64> {
    (device == Device::Cuda).then(gpu::peak_bytes).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> CudaProbe {
        CudaProbe::Ready { name: "NVIDIA H100".into(), capability: (9, 0) }
    }

    #[test]
    fn requests_parse_and_unknown_names_list_the_choices() {
        assert_eq!("cpu".parse::<DeviceRequest>(), Ok(DeviceRequest::Cpu));
        assert_eq!("cuda".parse::<DeviceRequest>(), Ok(DeviceRequest::Cuda));
        assert_eq!("auto".parse::<DeviceRequest>(), Ok(DeviceRequest::Auto));
        let err = "gpu".parse::<DeviceRequest>().unwrap_err().to_string();
        assert_eq!(err, "device `gpu`, expected one of: cpu, cuda, auto");
    }

    #[test]
    fn cuda_without_a_driver_fails_and_auto_falls_back_to_the_cpu() {
        let none = CudaProbe::NoDriver("libcuda.so not loadable".into());
        let err = resolve_with(DeviceRequest::Cuda, &none, true).unwrap_err().to_string();
        assert!(err.contains("no CUDA driver found"), "{err}");
        assert_eq!(resolve_with(DeviceRequest::Auto, &none, true), Ok(Device::Cpu));
        assert_eq!(resolve_with(DeviceRequest::Cpu, &none, true), Ok(Device::Cpu));
        let built = resolve_with(DeviceRequest::Cuda, &CudaProbe::NotBuilt, true).unwrap_err();
        assert!(built.to_string().contains("without the `cuda` cargo feature"), "{built}");
        let nodev = resolve_with(DeviceRequest::Cuda, &CudaProbe::NoDevice("count 0".into()), true);
        assert!(nodev.unwrap_err().to_string().contains("no device is usable"));
    }

    #[test]
    fn auto_picks_cuda_only_when_the_device_and_the_runner_are_ready() {
        assert_eq!(resolve_with(DeviceRequest::Auto, &ready(), true), Ok(Device::Cuda));
        assert_eq!(resolve_with(DeviceRequest::Cuda, &ready(), true), Ok(Device::Cuda));
        assert_eq!(resolve_with(DeviceRequest::Auto, &ready(), false), Ok(Device::Cpu));
        let err = resolve_with(DeviceRequest::Cuda, &ready(), false).unwrap_err().to_string();
        assert!(err.contains("NVIDIA H100 (compute capability 9.0)") && err.contains("no CUDA forward pass"));
    }

    #[test]
    fn devices_print_and_serialize_as_their_suite_names() {
        assert_eq!(Device::Cuda.to_string(), "cuda");
        assert_eq!(serde_json::to_string(&Device::Cpu).unwrap(), "\"cpu\"");
    }
}
