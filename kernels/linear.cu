// Kernels of the device linear layers (src/backend/cuda/linear.rs) beyond quant.cu's:
// LLM.int8's fused decode split and GEMV with the outlier product in its epilogue,
// int8-static's uint8 activation quantization, GEMV and rescale, torch-compatible dynamic
// activation quantization with its fused rescale, f32 -> 16-bit rounding for the cuBLAS
// 16-bit products, and kmeans code book dequantization.
// CPU references: src/scheme/int8_outlier.rs, int8_static.rs, int8_dynamic.rs, kmeans.rs.

// acc[i] = sum_k qx[i, k] * w[j, k] for i < m (m <= 8) and the weight row wr of output j,
// exact in int32, summed over the warp (every lane gets the sums). 16-byte loads and __dp4a
// when k is a multiple of 16 (rows then stay 16-byte aligned), bytes otherwise.
__device__ __forceinline__ void dot_rows_i8(const i8* __restrict__ qx, const i8* __restrict__ wr, int m,
                                            int k, int lane, int* acc) {
#pragma unroll
    for (int i = 0; i < 8; i++) acc[i] = 0;
    if ((k & 15) == 0) {
        const int4* w4 = (const int4*)wr;
        int chunks = k >> 4;
        for (int c = lane; c < chunks; c += WARP) {
            int4 wv = __ldg(w4 + c);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                if (i < m) {
                    int4 xv = __ldg((const int4*)(qx + (long)i * k) + c);
                    int a = acc[i];
                    a = __dp4a(wv.x, xv.x, a);
                    a = __dp4a(wv.y, xv.y, a);
                    a = __dp4a(wv.z, xv.z, a);
                    a = __dp4a(wv.w, xv.w, a);
                    acc[i] = a;
                }
            }
        }
    } else {
        for (int c = lane; c < k; c += WARP) {
            int wv = wr[c];
#pragma unroll
            for (int i = 0; i < 8; i++)
                if (i < m) acc[i] += wv * (int)qx[(long)i * k + c];
        }
    }
#pragma unroll
    for (int i = 0; i < 8; i++)
        if (i < m) acc[i] = warp_sum_i32(acc[i]);
}

// out = acc * (sx * sw) + bias[j], each product and the sum rounded once, as quant.cu's
// rescale_one (int8_dynamic::rescale without torch_compat).
__device__ __forceinline__ float rescale_dyn(int acc, float sx, float sw, const float* bias, int j) {
    float v = __fmul_rn((float)acc, __fmul_rn(sx, sw));
    return bias ? __fadd_rn(v, bias[j]) : v;
}

// ---- LLM.int8 (int8-outlier) -------------------------------------------------------------

// The decode split in one launch (rows <= 8, ONE block, blockDim a multiple of 32 up to
// 1024): mask[c] = some |x[i, c]| > threshold; the flagged columns in increasing order into
// idx and their number into *count; each row quantized with scale = absmax / 127 over its
// inlier columns, outliers written as 0 (quantize_rows_i8 with skip); observed[0] += count,
// observed[1] += 1 (the CPU layer's outlier-fraction record, kept on the device).
extern "C" __global__ void llm_int8_prepare(const float* __restrict__ x, int rows, int cols, float threshold,
                                            i8* __restrict__ q, float* __restrict__ scales,
                                            u8* __restrict__ mask, int* __restrict__ idx,
                                            int* __restrict__ count, u64* __restrict__ observed) {
    __shared__ float scratch[32];
    __shared__ int warp_counts[32];
    int t = threadIdx.x, lane = t & 31, wid = t >> 5, nw = blockDim.x >> 5;
    float am[8];
#pragma unroll
    for (int i = 0; i < 8; i++) am[i] = 0.0f;
    int base = 0;
    for (int c0 = 0; c0 < cols; c0 += blockDim.x) {
        int c = c0 + t;
        bool flag = false;
        if (c < cols) {
            float v[8];
#pragma unroll
            for (int i = 0; i < 8; i++) {
                v[i] = i < rows ? x[(long)i * cols + c] : 0.0f;
                flag |= i < rows && fabsf(v[i]) > threshold;
            }
            if (!flag) {
#pragma unroll
                for (int i = 0; i < 8; i++) am[i] = fmaxf(am[i], fabsf(v[i]));
            }
            mask[c] = flag;
        }
        unsigned ballot = __ballot_sync(FULL_MASK, flag);
        if (lane == 0) warp_counts[wid] = __popc(ballot);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < nw; w++) {
            int n = warp_counts[w];
            before += w < wid ? n : 0;
            total += n;
        }
        if (flag) idx[base + before + __popc(ballot & ((1u << lane) - 1u))] = c;
        base += total;
        __syncthreads();
    }
    float sc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (i < rows) {
            sc[i] = symmetric_scale(block_max(am[i], scratch));
            if (t == 0) scales[i] = sc[i];
        }
    }
    // Each thread reads back only the mask entries it wrote (same columns, same stride).
    for (int c = t; c < cols; c += blockDim.x) {
        bool skip = mask[c] != 0;
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (i < rows) q[(long)i * cols + c] = skip ? (i8)0 : quantize_i8(x[(long)i * cols + c], sc[i]);
    }
    if (t == 0) {
        *count = base;
        observed[0] += (u64)base;
        observed[1] += 1;
    }
}

// observed[0] += *count, observed[1] += 1 (the prefill path's record). One thread.
extern "C" __global__ void record_outliers(const int* __restrict__ count, u64* __restrict__ observed) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        observed[0] += (u64)*count;
        observed[1] += 1;
    }
}

// The LLM.int8 decode GEMV (m <= 8): out[i, j] = rescale(sum_k qx[i, k] * w[j, k]) + bias[j],
// then, when *count > 0, + sum over the outlier columns c = idx[0..count) in that order of
// round16(x[i, c]) * round16(w[j, c] * sw[j]), each product and sum rounded once, from -0
// (Rust's f32 sum): int8_outlier.rs's forward bit for bit. One warp per output row j; the
// lanes form 32 products at a time and every lane adds them in order through shuffles.
extern "C" __global__ void gemv_i8_outlier(const i8* __restrict__ qx, const float* __restrict__ sx,
                                           const i8* __restrict__ w, const float* __restrict__ sw,
                                           const float* __restrict__ bias, const float* __restrict__ x,
                                           const int* __restrict__ idx, const int* __restrict__ count, int kind,
                                           float* __restrict__ out, int m, int n, int k, int act, int accumulate) {
    int lane = threadIdx.x & 31;
    int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= n) return;
    const i8* wr = w + (long)j * k;
    int acc[8];
    dot_rows_i8(qx, wr, m, k, lane, acc);
    float s = sw[j];
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; i++)
        if (i < m) v[i] = rescale_dyn(acc[i], sx[i], s, bias, j);
    int no = *count;
    if (no > 0) {
        float sum[8];
#pragma unroll
        for (int i = 0; i < 8; i++) sum[i] = -0.0f;
        for (int t0 = 0; t0 < no; t0 += WARP) {
            int t = t0 + lane;
            bool live = t < no;
            int c = live ? idx[t] : 0;
            float b = live ? round16(__fmul_rn((float)wr[c], s), kind) : 0.0f;
            int lim = min(WARP, no - t0);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                if (i < m) {
                    float p = live ? __fmul_rn(round16(x[(long)i * k + c], kind), b) : 0.0f;
                    float acc_i = sum[i];
                    for (int u = 0; u < lim; u++) acc_i = __fadd_rn(acc_i, __shfl_sync(FULL_MASK, p, u));
                    sum[i] = acc_i;
                }
            }
        }
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (i < m) v[i] = __fadd_rn(v[i], sum[i]);
    }
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (i < m) store_fused(out, (long)i * n + j, v[i], act, accumulate);
    }
}

// ---- int8-static ---------------------------------------------------------------------------

// The calibrated uint8 code of each input, clamp(rint(x * inv) + zp, 0, 255) with inv the
// f32 1 / s_x (AffineU8::quantize; NaN gives code 0), stored shifted to int8 as code - 128
// so the signed int8 products take it exactly. Grid-stride.
extern "C" __global__ void quantize_static_i8(const float* __restrict__ x, long n, float inv, int zp,
                                              i8* __restrict__ q) {
    float z = (float)zp;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < n; e += (long)gridDim.x * blockDim.x) {
        float u = fminf(fmaxf(__fadd_rn(rintf(__fmul_rn(x[e], inv)), z), 0.0f), 255.0f);
        q[e] = (i8)((int)u - 128);
    }
}

// int8-static's output: with acc = sum (code - 128) * w and corr[j] = (128 - zp) * sum_k w[j, k],
// acc + corr[j] = sum (code - zp) * w exactly, then * out_scales[j] + bias[j] (0 without a
// bias), each rounded once, as StaticInt8Linear::forward.
__device__ __forceinline__ float static_one(int acc, int corr, float os, const float* bias, int j) {
    return __fadd_rn(__fmul_rn((float)(acc + corr), os), bias ? bias[j] : 0.0f);
}

// The int8-static decode GEMV (m <= 8), one warp per output row j, as gemv_i8_outlier.
extern "C" __global__ void gemv_i8_static(const i8* __restrict__ qx, const i8* __restrict__ w,
                                          const int* __restrict__ corr, const float* __restrict__ out_scales,
                                          const float* __restrict__ bias, float* __restrict__ out, int m, int n,
                                          int k, int act, int accumulate) {
    int lane = threadIdx.x & 31;
    int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= n) return;
    int acc[8];
    dot_rows_i8(qx, w + (long)j * k, m, k, lane, acc);
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (i < m)
                store_fused(out, (long)i * n + j, static_one(acc[i], corr[j], out_scales[j], bias, j), act,
                            accumulate);
    }
}

// int8-static's output from an int32 product acc[m, n] (cuBLASLt or the tiled kernel).
extern "C" __global__ void rescale_static(const int* __restrict__ acc, const int* __restrict__ corr,
                                          const float* __restrict__ out_scales, const float* __restrict__ bias,
                                          float* __restrict__ out, int m, int n) {
    long total = (long)m * n;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
        int j = (int)(e % n);
        out[e] = static_one(acc[e], corr[j], out_scales[j], bias, j);
    }
}

// ---- int8-dynamic with torch_compat ----------------------------------------------------------

// torch's dynamic input quantization (int8_dynamic.rs torch_activation_params and
// torch_quantize_activations, fbgemm's ChooseQuantizationParams with reduce_range): range
// [min(x, 0), max(x, 0)] over all n values, scale and zero point in f64 as the CPU, then
// q = clamp(clamp(rint(fma(x, 1/scale, zp)), 0, 255) - zp, -128, 127); scales[r] = scale for
// every row. ONE block (blockDim a multiple of 32).
extern "C" __global__ void torch_quantize_i8(const float* __restrict__ x, long n, int rows, i8* __restrict__ q,
                                             float* __restrict__ scales) {
    __shared__ float scratch[32];
    __shared__ float params[2];
    float lo = POS_INF, hi = NEG_INF;
    for (long e = threadIdx.x; e < n; e += blockDim.x) {
        lo = fminf(lo, x[e]);
        hi = fmaxf(hi, x[e]);
    }
    hi = block_max(hi, scratch);
    lo = -block_max(-lo, scratch);
    if (threadIdx.x == 0) {
        const float small = 6.1e-5f;
        float mn = fminf(lo, 0.0f), mx = fmaxf(hi, 0.0f);
        if (n == 0) mn = mx = 0.0f;
        double scale = __ddiv_rn((double)mx - (double)mn, 127.0);
        float sf = (float)scale;
        if (sf == 0.0f || isinf(__fdiv_rn(1.0f, sf))) scale = 0.1;
        if (scale < (double)small) {
            float org = (float)scale;
            scale = (double)small;
            float span = __fmul_rn(small, 127.0f);
            if (mn == 0.0f) {
                mx = span;
            } else if (mx == 0.0f) {
                mn = -span;
            } else {
                float amp = __fdiv_rn(small, org);
                mn = __fmul_rn(mn, amp);
                mx = __fmul_rn(mx, amp);
            }
        }
        double from_min = 0.0 - __ddiv_rn((double)mn, scale);
        double from_max = 127.0 - __ddiv_rn((double)mx, scale);
        double min_error = 0.0 - fabs(__ddiv_rn((double)mn, scale));
        double max_error = 127.0 - fabs(__ddiv_rn((double)mx, scale));
        double initial = min_error < max_error ? from_min : from_max;
        int zp = initial < 0.0 ? 0 : initial > 127.0 ? 127 : (int)rint(initial);
        params[0] = (float)scale;
        params[1] = (float)zp;
    }
    __syncthreads();
    float s = params[0], z = params[1];
    float inv = __fdiv_rn(1.0f, s);
    int zi = (int)z;
    for (long e = threadIdx.x; e < n; e += blockDim.x) {
        float u = fminf(fmaxf(rintf(__fmaf_rn(x[e], inv, z)), 0.0f), 255.0f);
        q[e] = (i8)max(-128, min(127, (int)u - zi));
    }
    for (int r = threadIdx.x; r < rows; r += blockDim.x) scales[r] = s;
}

// torch mode's output: fma(acc, sx[i] * sw[j], bias[j] or 0), one rounding for the multiply
// and the add (fbgemm's AVX2 output stage; int8_dynamic::rescale with fused = true).
__device__ __forceinline__ float torch_one(int acc, float sx, float sw, const float* bias, int j) {
    return __fmaf_rn((float)acc, __fmul_rn(sx, sw), bias ? bias[j] : 0.0f);
}

// The torch-mode decode GEMV (m <= 8), one warp per output row.
extern "C" __global__ void gemv_i8_torch(const i8* __restrict__ qx, const float* __restrict__ sx,
                                         const i8* __restrict__ w, const float* __restrict__ sw,
                                         const float* __restrict__ bias, float* __restrict__ out, int m, int n,
                                         int k, int act, int accumulate) {
    int lane = threadIdx.x & 31;
    int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= n) return;
    int acc[8];
    dot_rows_i8(qx, w + (long)j * k, m, k, lane, acc);
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (i < m)
                store_fused(out, (long)i * n + j, torch_one(acc[i], sx[i], sw[j], bias, j), act, accumulate);
    }
}

// The torch-mode output from an int32 product acc[m, n]. Grid-stride.
extern "C" __global__ void rescale_torch(const int* __restrict__ acc, const float* __restrict__ sx,
                                         const float* __restrict__ sw, const float* __restrict__ bias,
                                         float* __restrict__ out, int m, int n) {
    long total = (long)m * n;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
        int i = (int)(e / n), j = (int)(e % n);
        out[e] = torch_one(acc[e], sx[i], sw[j], bias, j);
    }
}

// ---- floats and code books -----------------------------------------------------------------

// out = the 16-bit bits of x (kind 0 = f16, 1 = bf16), round to nearest even, for n values.
extern "C" __global__ void round_to_16(const float* __restrict__ x, u16* __restrict__ out, long n, int kind) {
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < n; e += (long)gridDim.x * blockDim.x)
        out[e] = kind == 0 ? f32_to_f16(x[e]) : f32_to_bf16(x[e]);
}

// ---- the dense decode GEMV (f32, f16 and bf16 weights) -------------------------------------
//
// out[i, r] = sum_c W[r, c] * x[i, c] (+ bias[r]) for i < M (M = 1..8), with the fused
// epilogue (store_fused), for weights of KIND 0 (f32), 1 (f16 bits) or 2 (bf16 bits) and
// cols a multiple of the values in 16 bytes (V = 4 or 8). With 16-bit weights each
// activation is rounded to the same type first and the products are exact in f32, summed
// in f32: what cublasGemmEx with f32 accumulation computes on the rounded activations
// (round_to_16), in another summation order. One launch replaces round_to_16, the GEMM,
// the bias add and the residual add of a decode step.
//
// Warp w of the block owns DG_ROWS rows; lane l takes the 16-byte chunks l, l + 32, ... of
// each, DG_UNROLL chunks per row in flight (a warp's load of one row is 512 contiguous
// bytes), and each x load (coalesced, V floats a lane) serves the DG_ROWS rows.

#define DG_THREADS 128
#define DG_ROWS 4
#define DG_UNROLL 2

template <int KIND>
__device__ __forceinline__ void dense_decode(uint4 w, float (&out)[KIND == 0 ? 4 : 8]) {
    u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int t = 0; t < 4; t++) {
        if (KIND == 0) {
            out[t] = __uint_as_float(words[t]);
        } else if (KIND == 1) {
            out[2 * t] = f16_to_f32((u16)(words[t] & 0xffffu));
            out[2 * t + 1] = f16_to_f32((u16)(words[t] >> 16));
        } else {
            out[2 * t] = __uint_as_float(words[t] << 16);
            out[2 * t + 1] = __uint_as_float(words[t] & 0xffff0000u);
        }
    }
}

template <int M, int KIND>
__device__ __forceinline__ void dense_gemv(const void* __restrict__ w, const float* __restrict__ x,
                                           const float* __restrict__ bias, float* __restrict__ out, int rows,
                                           int cols, int act, int accumulate) {
    constexpr int V = KIND == 0 ? 4 : 8;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int r0 = (blockIdx.x * (DG_THREADS / WARP) + warp) * DG_ROWS;
    if (r0 >= rows) return;
    int chunks = cols / V;
    long row_bytes = (long)cols * (KIND == 0 ? 4 : 2);
    // Rows past the end read the last row (valid memory) and are not written.
    const uint4* wrow[DG_ROWS];
#pragma unroll
    for (int r = 0; r < DG_ROWS; r++) wrow[r] = (const uint4*)((const char*)w + (long)min(r0 + r, rows - 1) * row_bytes);
    float acc[M][DG_ROWS];
#pragma unroll
    for (int i = 0; i < M; i++)
#pragma unroll
        for (int r = 0; r < DG_ROWS; r++) acc[i][r] = 0.0f;
    for (int c0 = lane; c0 < chunks; c0 += WARP * DG_UNROLL) {
        uint4 wv[DG_UNROLL][DG_ROWS];
#pragma unroll
        for (int u = 0; u < DG_UNROLL; u++) {
            int c = c0 + u * WARP;
#pragma unroll
            for (int r = 0; r < DG_ROWS; r++) wv[u][r] = c < chunks ? __ldg(wrow[r] + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < DG_UNROLL; u++) {
            int c = c0 + u * WARP;
            if (c >= chunks) break;
#pragma unroll
            for (int i = 0; i < M; i++) {
                const float4* x4 = (const float4*)(x + (long)i * cols + (long)c * V);
                float xv[V];
#pragma unroll
                for (int t = 0; t < V / 4; t++) {
                    float4 f = __ldg(x4 + t);
                    xv[4 * t] = f.x;
                    xv[4 * t + 1] = f.y;
                    xv[4 * t + 2] = f.z;
                    xv[4 * t + 3] = f.w;
                }
                if (KIND != 0) {
#pragma unroll
                    for (int t = 0; t < V; t++) xv[t] = round16(xv[t], KIND - 1);
                }
#pragma unroll
                for (int r = 0; r < DG_ROWS; r++) {
                    float wf[V];
                    dense_decode<KIND>(wv[u][r], wf);
                    float a = acc[i][r];
#pragma unroll
                    for (int t = 0; t < V; t++) a = fmaf(wf[t], xv[t], a);
                    acc[i][r] = a;
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < M; i++)
#pragma unroll
        for (int r = 0; r < DG_ROWS; r++) {
            float s = warp_sum(acc[i][r]);
            int row = r0 + r;
            if (lane == 0 && row < rows) store_fused(out, (long)i * rows + row, bias ? s + bias[row] : s, act, accumulate);
        }
}

#define DG_ARGS                                                                                                \
    const void *__restrict__ w, const float *__restrict__ x, const float *__restrict__ bias,                   \
        float *__restrict__ out, int rows, int cols, int kind, int act, int accumulate
#define DG_PASS w, x, bias, out, rows, cols, act, accumulate

template <int M>
__device__ __forceinline__ void dense_gemv_any(DG_ARGS) {
    if (kind == 0) dense_gemv<M, 0>(DG_PASS);
    else if (kind == 1) dense_gemv<M, 1>(DG_PASS);
    else dense_gemv<M, 2>(DG_PASS);
}

// dense_gemv for m = 1 .. 8 activation rows; blockDim DG_THREADS, one block per
// DG_THREADS / 32 * DG_ROWS output rows; kind 0 f32, 1 f16, 2 bf16.
extern "C" __global__ void __launch_bounds__(DG_THREADS) dense_gemv_m1(DG_ARGS) { dense_gemv_any<1>(w, x, bias, out, rows, cols, kind, act, accumulate); }
extern "C" __global__ void __launch_bounds__(DG_THREADS) dense_gemv_m2(DG_ARGS) { dense_gemv_any<2>(w, x, bias, out, rows, cols, kind, act, accumulate); }
extern "C" __global__ void __launch_bounds__(DG_THREADS) dense_gemv_m3(DG_ARGS) { dense_gemv_any<3>(w, x, bias, out, rows, cols, kind, act, accumulate); }
extern "C" __global__ void __launch_bounds__(DG_THREADS) dense_gemv_m4(DG_ARGS) { dense_gemv_any<4>(w, x, bias, out, rows, cols, kind, act, accumulate); }
extern "C" __global__ void __launch_bounds__(DG_THREADS) dense_gemv_m5(DG_ARGS) { dense_gemv_any<5>(w, x, bias, out, rows, cols, kind, act, accumulate); }
extern "C" __global__ void __launch_bounds__(DG_THREADS) dense_gemv_m6(DG_ARGS) { dense_gemv_any<6>(w, x, bias, out, rows, cols, kind, act, accumulate); }
extern "C" __global__ void __launch_bounds__(DG_THREADS) dense_gemv_m7(DG_ARGS) { dense_gemv_any<7>(w, x, bias, out, rows, cols, kind, act, accumulate); }
extern "C" __global__ void __launch_bounds__(DG_THREADS) dense_gemv_m8(DG_ARGS) { dense_gemv_any<8>(w, x, bias, out, rows, cols, kind, act, accumulate); }

// kmeans: out[i] = codebook[index i], indices of `bits` bits packed most significant bit
// first (kmeans.rs unpack_bit_index). Grid-stride.
extern "C" __global__ void codebook_dequant(const u8* __restrict__ bytes, int bits,
                                            const float* __restrict__ codebook, float* __restrict__ out, long n) {
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < n; e += (long)gridDim.x * blockDim.x) {
        int index = 0;
        long pos = e * bits;
        for (int b = 0; b < bits; b++, pos++) index = (index << 1) | ((bytes[pos >> 3] >> (7 - (pos & 7))) & 1);
        out[e] = codebook[index];
    }
}
