// Conversions between f32 and the 16-bit float types (bf16, f16) for the cuBLAS
// products, round to nearest even. Grid-stride.

extern "C" __global__ void f32_to_bf16_kernel(const float* __restrict__ x, u16* __restrict__ out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void bf16_to_f32_kernel(const u16* __restrict__ x, float* __restrict__ out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = bf16_to_f32(x[i]);
}

extern "C" __global__ void f32_to_f16_kernel(const float* __restrict__ x, u16* __restrict__ out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = f32_to_f16(x[i]);
}

extern "C" __global__ void f16_to_f32_kernel(const u16* __restrict__ x, float* __restrict__ out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = f16_to_f32(x[i]);
}
