//! Launchers of `kernels/cast.cu`: f32 to and from the 16-bit float types.

use super::*;

/// A 16-bit float type of the cuBLAS products.
pub trait Half16: cudarc::driver::DeviceRepr {
    /// The kernel converting f32 to it.
    const FROM_F32: &'static str;
    /// The kernel converting it to f32.
    const TO_F32: &'static str;
}

impl Half16 for half::f16 {
    const FROM_F32: &'static str = "f32_to_f16_kernel";
    const TO_F32: &'static str = "f16_to_f32_kernel";
}

impl Half16 for half::bf16 {
    const FROM_F32: &'static str = "f32_to_bf16_kernel";
    const TO_F32: &'static str = "bf16_to_f32_kernel";
}

/// `out = x` rounded to `T` (nearest even).
pub fn to_half<T: Half16>(gpu: &Gpu, x: &CudaSlice<f32>, out: &mut CudaSlice<T>) -> Result<(), CudaError> {
    cast(gpu, T::FROM_F32, x, out)
}

/// `out = x` widened to f32.
pub fn from_half<T: Half16>(gpu: &Gpu, x: &CudaSlice<T>, out: &mut CudaSlice<f32>) -> Result<(), CudaError> {
    cast(gpu, T::TO_F32, x, out)
}

/// One element-wise conversion kernel `op` of the cast module over `x` into `out`.
pub(super) fn cast<A: cudarc::driver::DeviceRepr, B: cudarc::driver::DeviceRepr>(
    gpu: &Gpu,
    op: &'static str,
    x: &CudaSlice<A>,
    out: &mut CudaSlice<B>,
) -> Result<(), CudaError> {
    need(op, "out", out.len(), x.len())?;
    let n = long(op, "values", x.len())?;
    let mut f = None;
    launch(
        gpu,
        &CAST,
        op,
        grid_stride(x.len()),
        |b| {
            b.arg(x).arg(out).arg(&n);
        },
        &mut f,
    )
}
