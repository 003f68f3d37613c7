//! The GPU seam in a build without the `cuda` feature: the names of `gpu_cuda.rs`, each
//! saying that this build has no CUDA support.

use super::{CudaProbe, DeviceError, GpuRecord};
use crate::error::{Error, Result};
use crate::model::CausalLm;

fn not_built() -> Error {
    Error::Device { device: "cuda", message: DeviceError::NotBuilt.to_string() }
}

/// Built without the `cuda` feature: there is nothing to probe.
pub fn probe() -> CudaProbe {
    CudaProbe::NotBuilt
}

/// No GPU to describe.
pub fn record(_probe_bytes: usize) -> Result<GpuRecord> {
    Err(not_built())
}

/// No GPU to place a decoder on.
pub fn place_decoder(_lm: Box<dyn CausalLm>, _prefill_rows: usize) -> Result<Box<dyn CausalLm>> {
    Err(not_built())
}

/// No device memory to track.
pub fn reset_peak() {}

/// No device memory to track.
pub fn peak_bytes() -> Option<u64> {
    None
}
