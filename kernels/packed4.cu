// The shared 4-bit block format of int4-block, nf4, fp4 and 16-cluster kmeans
// (src/scheme/packed4.rs): codes two per byte over the flattened [rows, cols] weight,
// value i in the high nibble of byte i/2 when i is even; value = table[code] *
// scale[i / block] (+ offset[i / block]). Scales and offsets are f32, or bf16 bits when
// `bf16_params` is 1 (int4-block stores them so: half the bytes).

__device__ __forceinline__ u32 code_at(const u8* bytes, long i) {
    u32 b = bytes[i >> 1];
    return (i & 1) ? (b & 15u) : (b >> 4);
}

__device__ __forceinline__ float param_at(const void* p, long b, int bf16_params) {
    return bf16_params ? bf16_to_f32(((const u16*)p)[b]) : ((const float*)p)[b];
}

// Dequantize n values: table[code] * scale, then + offset, each rounded once (as
// Packed4::value). Writes f32 (out_f32) or bf16 bits (out_bf16), whichever is not null.
extern "C" __global__ void packed4_dequant(const u8* __restrict__ bytes, const float* __restrict__ table,
                                           const void* __restrict__ scales, const void* __restrict__ offsets,
                                           int bf16_params, long n, int block, float* __restrict__ out_f32,
                                           u16* __restrict__ out_bf16) {
    __shared__ float t16[16];
    if (threadIdx.x < 16) t16[threadIdx.x] = table[threadIdx.x];
    __syncthreads();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long b = i / block;
        float v = __fmul_rn(t16[code_at(bytes, i)], param_at(scales, b, bf16_params));
        if (offsets) v = __fadd_rn(v, param_at(offsets, b, bf16_params));
        if (out_f32) out_f32[i] = v;
        if (out_bf16) out_bf16[i] = f32_to_bf16(v);
    }
}

#define GEMV_MAX_M 8

// Fused GEMV, dequantizing in registers (no copy of the weight):
// out[i, r] = sum_c W[r, c] * x[i, c] (+ bias[r]) for i < m (m <= 8). One warp per
// output row, 8 warps per block.
// Fast path (cols and block multiples of 32): each lane takes 32 consecutive values (16
// bytes, one 16-byte load) of one block, sums table[code] * x over them and applies the
// block's scale (and offset * sum x) once. Other shapes: value by value.
extern "C" __global__ void packed4_gemv(const u8* __restrict__ bytes, const float* __restrict__ table,
                                        const void* __restrict__ scales, const void* __restrict__ offsets,
                                        int bf16_params, const float* __restrict__ x, const float* __restrict__ bias,
                                        float* __restrict__ out, int rows, int cols, int block, int m) {
    __shared__ float t16[16];
    if (threadIdx.x < 16) t16[threadIdx.x] = table[threadIdx.x];
    __syncthreads();
    int lane = threadIdx.x & 31;
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    float acc[GEMV_MAX_M];
#pragma unroll
    for (int i = 0; i < GEMV_MAX_M; i++) acc[i] = 0.0f;
    long base = (long)r * cols;
    if ((cols & 31) == 0 && (block & 31) == 0) {
        const uint4* w4 = (const uint4*)(bytes + (base >> 1));
        int chunks = cols >> 5;
#pragma unroll 2
        for (int c = lane; c < chunks; c += WARP) {
            uint4 wv = __ldg(w4 + c);
            long b = (base + ((long)c << 5)) / block;
            float s = param_at(scales, b, bf16_params);
            float o = offsets ? param_at(offsets, b, bf16_params) : 0.0f;
            u32 words[4] = {wv.x, wv.y, wv.z, wv.w};
            // Dequantized code values of the 32 weights (before scale), in order.
            float wq[32];
#pragma unroll
            for (int t = 0; t < 4; t++) {
#pragma unroll
                for (int byte = 0; byte < 4; byte++) {
                    u32 v = (words[t] >> (8 * byte)) & 0xffu;
                    wq[t * 8 + byte * 2] = t16[v >> 4];
                    wq[t * 8 + byte * 2 + 1] = t16[v & 15u];
                }
            }
#pragma unroll
            for (int i = 0; i < GEMV_MAX_M; i++) {
                if (i < m) {
                    const float4* x4 = (const float4*)(x + (long)i * cols + ((long)c << 5));
                    float dot = 0.0f, xs = 0.0f;
#pragma unroll
                    for (int q = 0; q < 8; q++) {
                        float4 xv = __ldg(x4 + q);
                        dot += wq[4 * q] * xv.x + wq[4 * q + 1] * xv.y + wq[4 * q + 2] * xv.z + wq[4 * q + 3] * xv.w;
                        xs += (xv.x + xv.y) + (xv.z + xv.w);
                    }
                    acc[i] += s * dot + o * xs;
                }
            }
        }
    } else {
        for (int c = lane; c < cols; c += WARP) {
            long e = base + c;
            long b = e / block;
            float v = __fmul_rn(t16[code_at(bytes, e)], param_at(scales, b, bf16_params));
            if (offsets) v = __fadd_rn(v, param_at(offsets, b, bf16_params));
#pragma unroll
            for (int i = 0; i < GEMV_MAX_M; i++)
                if (i < m) acc[i] += v * x[(long)i * cols + c];
        }
    }
#pragma unroll
    for (int i = 0; i < GEMV_MAX_M; i++) {
        if (i < m) {
            float t = warp_sum(acc[i]);
            if (lane == 0) out[(long)i * rows + r] = bias ? t + bias[r] : t;
        }
    }
}
