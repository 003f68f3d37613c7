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

// Fused GEMV, general path: out[i, r] = sum_c W[r, c] * x[i, c] (+ bias[r]) for i < m
// (m <= 8), dequantizing in registers. One warp per output row, 8 warps per block. The
// host takes packed4_gemv_m<M> below whenever cols % 8 == 0 and block is a power of two
// of at least 8 (every format's usual shapes); this kernel serves the other shapes.
// Shapes with cols and block multiples of 32: each lane takes 32 consecutive values (one
// 16-byte load) of one block and applies the block's scale (and offset * sum x) once.
// Other shapes: value by value.
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

// ---- the bandwidth-bound fused GEMV -------------------------------------------------------
//
// out[i, r] = sum_c W[r, c] * x[i, c] (+ bias[r]) for i < M, M = 1..8 a compile-time
// constant (entry points packed4_gemv_m1 .. _m8). Needs cols % 8 == 0 and block a power
// of two >= 8 (block == 1 << block_shift): then every 8-value word (4 bytes, one u32) lies
// in one row and one block, and every row starts 4-byte aligned.
//
// Why it is fast (batch-1 decode reads each weight byte once; the GEMV is a stream):
// - Coalesced everything: the block's 128 threads take consecutive words of a row
//   (word t of the row goes to thread t % 128), so each warp's weight load is 128
//   contiguous bytes and its x loads (8 floats per lane, two 16-byte loads) span 1 KiB;
//   the old kernel gave each lane 32 consecutive values, so each of its 16-byte x loads
//   touched 32 cache lines (8x the L1 wavefronts of the weight stream itself).
// - P4_ROWS rows per block share every x load (x is read from L1 once per P4_ROWS rows).
// - Memory-level parallelism: an iteration issues all P4_ROWS x P4_UNROLL weight loads
//   and their scale (offset) loads before using any of them. P4_UNROLL 1 measured best
//   on an H100 (2, 4 and __launch_bounds__(128, 8) variants were slower: more registers,
//   fewer resident warps); the parallelism comes from resident blocks.
// - No division: the block index is (r * cols + col) >> block_shift.
// - Code lookups: byte j of (w >> 2) & 0x3c3c3c3c is 4 * the high nibble of byte j,
//   byte j of (w << 2) & 0x3c3c3c3c 4 * the low one: one byte-permute per value gives
//   the shared-memory byte offset into the 16-entry table, whose 16 floats sit in 16
//   distinct banks (a warp's lookups never conflict).
// Sums: per word, dot = sum table[code] * x (f32, in order), then acc += scale * dot
// (+ offset * sum x): the scale is applied once per 8 values, finer than the general
// path's 32. Lanes, then the block's 4 warps, are summed in f32 at the end.

#define P4_THREADS 128
#define P4_WARPS (P4_THREADS / WARP)
#define P4_ROWS 4
#define P4_UNROLL 1

template <int M, int U = P4_UNROLL>
__device__ __forceinline__ void packed4_gemv_words(const u8* __restrict__ bytes, const float* __restrict__ table,
                                                   const void* __restrict__ scales,
                                                   const void* __restrict__ offsets, int bf16_params,
                                                   const float* __restrict__ x, const float* __restrict__ bias,
                                                   float* __restrict__ out, int rows, int cols,
                                                   int block_shift) {
    __shared__ float t16[16];
    __shared__ float partial[P4_WARPS][M * P4_ROWS];
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid < 16) t16[tid] = table[tid];
    int r0 = blockIdx.x * P4_ROWS;
    int words = cols >> 3;
    // Rows past the end read the last row (valid memory) and are not written.
    const u32* wrow[P4_ROWS];
    long rbase[P4_ROWS];
#pragma unroll
    for (int r = 0; r < P4_ROWS; r++) {
        int rr = min(r0 + r, rows - 1);
        rbase[r] = (long)rr * cols;
        wrow[r] = (const u32*)(bytes + (rbase[r] >> 1));
    }
    float acc[M][P4_ROWS];
#pragma unroll
    for (int i = 0; i < M; i++)
#pragma unroll
        for (int r = 0; r < P4_ROWS; r++) acc[i][r] = 0.0f;
    const char* tb = (const char*)t16;
    __syncthreads();
    for (int t0 = tid; t0 < words; t0 += P4_THREADS * U) {
        u32 wv[U][P4_ROWS];
        float sc[U][P4_ROWS], of[U][P4_ROWS];
        // Issue every load of the iteration first.
#pragma unroll
        for (int u = 0; u < U; u++) {
            int t = t0 + u * P4_THREADS;
#pragma unroll
            for (int r = 0; r < P4_ROWS; r++) {
                wv[u][r] = 0u;
                sc[u][r] = 0.0f;
                of[u][r] = 0.0f;
                if (t < words) {
                    wv[u][r] = __ldg(wrow[r] + t);
                    long b = (rbase[r] + ((long)t << 3)) >> block_shift;
                    sc[u][r] = param_at(scales, b, bf16_params);
                    if (offsets) of[u][r] = param_at(offsets, b, bf16_params);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int t = t0 + u * P4_THREADS;
            if (t < words) {
                // Shared-memory byte offsets of the 8 codes' table entries, in value order:
                // value 2j is the high nibble of byte j, value 2j + 1 the low one.
                u32 hi[P4_ROWS], lo[P4_ROWS];
#pragma unroll
                for (int r = 0; r < P4_ROWS; r++) {
                    hi[r] = (wv[u][r] >> 2) & 0x3c3c3c3cu;
                    lo[r] = (wv[u][r] << 2) & 0x3c3c3c3cu;
                }
#pragma unroll
                for (int i = 0; i < M; i++) {
                    const float4* x4 = (const float4*)(x + (long)i * cols + ((long)t << 3));
                    float4 xa = __ldg(x4), xb = __ldg(x4 + 1);
                    float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
                    float xs = 0.0f;
                    if (offsets) xs = ((xv[0] + xv[1]) + (xv[2] + xv[3])) + ((xv[4] + xv[5]) + (xv[6] + xv[7]));
#pragma unroll
                    for (int r = 0; r < P4_ROWS; r++) {
                        float dot = 0.0f;
#pragma unroll
                        for (int j = 0; j < 4; j++) {
                            u32 oh = __byte_perm(hi[r], 0u, 0x4440u + j);
                            u32 ol = __byte_perm(lo[r], 0u, 0x4440u + j);
                            dot = fmaf(*(const float*)(tb + oh), xv[2 * j], dot);
                            dot = fmaf(*(const float*)(tb + ol), xv[2 * j + 1], dot);
                        }
                        acc[i][r] = fmaf(sc[u][r], dot, acc[i][r]);
                        if (offsets) acc[i][r] = fmaf(of[u][r], xs, acc[i][r]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < M; i++)
#pragma unroll
        for (int r = 0; r < P4_ROWS; r++) {
            float s = warp_sum(acc[i][r]);
            if (lane == 0) partial[warp][i * P4_ROWS + r] = s;
        }
    __syncthreads();
    if (tid < M * P4_ROWS) {
        int i = tid / P4_ROWS, r = tid % P4_ROWS;
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < P4_WARPS; w++) s += partial[w][tid];
        if (r0 + r < rows) out[(long)i * rows + r0 + r] = bias ? s + bias[r0 + r] : s;
    }
}

#define P4_ARGS                                                                                                \
    const u8 *__restrict__ bytes, const float *__restrict__ table, const void *__restrict__ scales,             \
        const void *__restrict__ offsets, int bf16_params, const float *__restrict__ x,                         \
        const float *__restrict__ bias, float *__restrict__ out, int rows, int cols, int block_shift
#define P4_PASS bytes, table, scales, offsets, bf16_params, x, bias, out, rows, cols, block_shift

// packed4_gemv_words for m = 1 .. 8 activation rows; blockDim P4_THREADS, one block per
// P4_ROWS output rows.
extern "C" __global__ void packed4_gemv_m1(P4_ARGS) { packed4_gemv_words<1>(P4_PASS); }
extern "C" __global__ void packed4_gemv_m2(P4_ARGS) { packed4_gemv_words<2>(P4_PASS); }
extern "C" __global__ void packed4_gemv_m3(P4_ARGS) { packed4_gemv_words<3>(P4_PASS); }
extern "C" __global__ void packed4_gemv_m4(P4_ARGS) { packed4_gemv_words<4>(P4_PASS); }
extern "C" __global__ void packed4_gemv_m5(P4_ARGS) { packed4_gemv_words<5>(P4_PASS); }
extern "C" __global__ void packed4_gemv_m6(P4_ARGS) { packed4_gemv_words<6>(P4_PASS); }
extern "C" __global__ void packed4_gemv_m7(P4_ARGS) { packed4_gemv_words<7>(P4_PASS); }
extern "C" __global__ void packed4_gemv_m8(P4_ARGS) { packed4_gemv_words<8>(P4_PASS); }

