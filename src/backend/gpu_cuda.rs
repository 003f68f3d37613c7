//! The GPU seam in a build with the `cuda` feature: each call goes to `backend::cuda`.
//! `gpu_stub.rs` has the same names for a build without it.

use std::sync::Arc;

use super::{cuda, CudaProbe, GpuRecord};
use crate::error::Result;
use crate::model::CausalLm;

/// Look for a usable CUDA device without letting cudarc panic.
pub fn probe() -> CudaProbe {
    cuda::probe()
}

/// Describe the GPU, measuring its copy bandwidth with `probe_bytes` per copy.
pub fn record(probe_bytes: usize) -> Result<GpuRecord> {
    let gpu = cuda::shared_gpu()?;
    let (major, minor) = gpu.capability();
    Ok(GpuRecord {
        name: format!("{} (compute capability {major}.{minor})", gpu.name()),
        driver: cuda::driver_version()?,
        copy_gb_s: cuda::copy_bandwidth_gb_s(&gpu, probe_bytes, 20)?,
    })
}

/// A decoder whose forward passes run on the GPU.
pub fn place_decoder(lm: Box<dyn CausalLm>, prefill_rows: usize) -> Result<Box<dyn CausalLm>> {
    let gpu: Arc<cuda::Gpu> = cuda::shared_gpu()?;
    Ok(Box::new(cuda::decoder::CudaCausalLm::new(lm, gpu, prefill_rows)?))
}

/// Start a new device-memory high-water mark.
pub fn reset_peak() {
    if let Ok(gpu) = cuda::shared_gpu() {
        let _ = gpu.reset_peak_pool_bytes();
    }
}

/// The device-memory high-water mark since [`reset_peak`], bytes.
pub fn peak_bytes() -> Option<u64> {
    cuda::shared_gpu().ok().and_then(|g| g.peak_pool_bytes().ok())
}
