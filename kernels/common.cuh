// Shared by every kernel file: prepended to each .cu source before NVRTC compiles it
// (see src/backend/cuda/kernels.rs), so no header search path is needed on any machine.
// Conversions are bit operations or single PTX instructions: cuda_fp16.h and
// cuda_bf16.h would need the toolkit's include folder under NVRTC.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu
#define WARP 32
#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)

// bf16 bits -> f32 (exact).
__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

// f32 -> bf16 bits, round to nearest even (NaN stays NaN), as half::bf16::from_f32.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u32 rounding = 0x7fffu + ((u >> 16) & 1u);
    return (u16)((u + rounding) >> 16);
}

// f16 bits -> f32 (exact), one PTX conversion.
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// f32 -> f16 bits, round to nearest even.
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Round an f32 through a 16-bit type and back: 0 = f16, 1 = bf16.
__device__ __forceinline__ float round16(float v, int kind) {
    return kind == 0 ? f16_to_f32(f32_to_f16(v)) : bf16_to_f32(f32_to_bf16(v));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ int warp_sum_i32(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `scratch` holds 32 floats of shared memory; the call synchronises the block.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    float t = lane < nw ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

// Maximum over the block, as block_sum.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    float t = lane < nw ? scratch[lane] : NEG_INF;
    return warp_max(t);
}

// Sum in f64 over the block (statistics of norms, as the CPU reference), as block_sum.
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    __syncthreads();
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    double t = lane < nw ? scratch[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(FULL_MASK, t, o);
    return t;
}

// ---- the fused epilogue of the products ---------------------------------------------------
//
// A product kernel's value v (its bias already added) goes through the activation `act`
// (ACT_NONE, ACT_GELU_TANH, ACT_GELU_ERF: the same functions as the gelu kernels) and is
// then stored, or added to what out holds when `accumulate` is 1 (the residual add:
// out = out + v, as add_in_place). One launch instead of three in a decode step.

#define ACT_NONE 0
#define ACT_GELU_TANH 1
#define ACT_GELU_ERF 2

// GELU, tanh approximation (GPT-2 gelu_new, BLOOM).
__device__ __forceinline__ float gelu_tanh_of(float u) {
    return 0.5f * u * (1.0f + tanhf(0.7978846f * (u + 0.044715f * u * u * u)));
}

// GELU with the exact error function (BERT), computed in f64 as the CPU reference.
__device__ __forceinline__ float gelu_erf_of(float x) {
    double u = (double)x;
    return (float)(0.5 * u * (1.0 + erf(u * 0.70710678118654752440)));
}

__device__ __forceinline__ float activate(float v, int act) {
    if (act == ACT_GELU_TANH) return gelu_tanh_of(v);
    if (act == ACT_GELU_ERF) return gelu_erf_of(v);
    return v;
}

// out[idx] = act(v), or out[idx] + act(v) when accumulate.
__device__ __forceinline__ void store_fused(float* out, long idx, float v, int act, int accumulate) {
    v = activate(v, act);
    out[idx] = accumulate ? out[idx] + v : v;
}

// Symmetric int8 scale of a vector whose largest magnitude is `absmax` (1 for zeros), as
// int8_dynamic::symmetric_scale.
__device__ __forceinline__ float symmetric_scale(float absmax) { return absmax > 0.0f ? absmax / 127.0f : 1.0f; }

// clamp(round_half_even(v / s), -127, 127), the division correctly rounded.
__device__ __forceinline__ i8 quantize_i8(float v, float s) {
    float q = rintf(__fdiv_rn(v, s));
    return (i8)fminf(fmaxf(q, -127.0f), 127.0f);
}
