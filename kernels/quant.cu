// int8 kernels: per-token activation quantization, the decode GEMV, a tiled GEMM for
// shapes cuBLASLt's int8 path refuses, the f32 rescale of int32 products, LLM.int8's
// outlier-column split and 16-bit outlier product, and fake quantization (qat-sim).
// CPU references: src/scheme/int8_dynamic.rs, int8_gemm.rs, int8_outlier.rs, qat_sim.rs.

// Per row of x [rows, cols]: scale = absmax / 127 (1 for a zero row) and
// q = clamp(rint(x / scale), -127, 127). Columns flagged in `skip` (LLM.int8's outlier
// columns; may be null) count as zeros. One block per row, blockDim a multiple of 32.
extern "C" __global__ void quantize_rows_i8(const float* __restrict__ x, const u8* __restrict__ skip,
                                            i8* __restrict__ q, float* __restrict__ scales, int rows,
                                            int cols) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (long)row * cols;
    float m = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = (skip && skip[c]) ? 0.0f : xr[c];
        m = fmaxf(m, fabsf(v));
    }
    float s = symmetric_scale(block_max(m, scratch));
    i8* qr = q + (long)row * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = (skip && skip[c]) ? 0.0f : xr[c];
        qr[c] = quantize_i8(v, s);
    }
    if (threadIdx.x == 0) scales[row] = s;
}

// absmax over all n values into *out as f32 bits (non-negative floats order as their
// bits); *out must start at 0. Grid-stride.
extern "C" __global__ void absmax_bits(const float* __restrict__ x, long n, u32* __restrict__ out) {
    __shared__ float scratch[32];
    float m = 0.0f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        m = fmaxf(m, fabsf(x[i]));
    m = block_max(m, scratch);
    if (threadIdx.x == 0) atomicMax(out, __float_as_uint(m));
}

// Per-tensor activation quantization: one scale from absmax_bits for every row.
extern "C" __global__ void quantize_tensor_i8(const float* __restrict__ x, const u32* __restrict__ absmax,
                                              i8* __restrict__ q, float* __restrict__ scales, int rows,
                                              int cols) {
    float s = symmetric_scale(__uint_as_float(*absmax));
    long n = (long)rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        q[i] = quantize_i8(x[i], s);
        if (i % cols == 0) scales[i / cols] = s;
    }
}

// out[i, j] = acc * (sx[i] * sw[j]) + bias[j], each product and the sum rounded once
// (no fused multiply-add), exactly as int8_dynamic::rescale without torch_compat.
__device__ __forceinline__ float rescale_one(int acc, float sx, float sw, const float* bias, int j) {
    float v = __fmul_rn((float)acc, __fmul_rn(sx, sw));
    return bias ? __fadd_rn(v, bias[j]) : v;
}

// The decode GEMV, general path: out[i, j] = rescale(sum_k qx[i, k] * w[j, k]) for
// i < m (m <= 8), one warp per output row j, 8 warps per block. Exact int32
// accumulation; 16-byte loads and __dp4a when k is a multiple of 16, bytes otherwise.
// The host takes gemv_i8_m<M> below when k % 16 == 0; this kernel serves other k.
extern "C" __global__ void gemv_i8(const i8* __restrict__ qx, const float* __restrict__ sx,
                                   const i8* __restrict__ w, const float* __restrict__ sw,
                                   const float* __restrict__ bias, float* __restrict__ out, int m, int n,
                                   int k, int act, int accumulate) {
    int lane = threadIdx.x & 31;
    int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= n) return;
    int acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) acc[i] = 0;
    const i8* wr = w + (long)j * k;
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
    for (int i = 0; i < 8; i++) {
        if (i < m) {
            int t = warp_sum_i32(acc[i]);
            if (lane == 0) store_fused(out, (long)i * n + j, rescale_one(t, sx[i], sw[j], bias, j), act, accumulate);
        }
    }
}

// ---- the bandwidth-bound decode GEMV ----------------------------------------------------
//
// out[i, j] = rescale(sum_k qx[i, k] * w[j, k]) for i < M, M = 1..8 a compile-time
// constant (entry points gemv_i8_m1 .. _m8); needs k % 16 == 0 (every row 16-byte
// aligned). Exact: int32 products and sums (any order gives the same integer), then
// rescale_one as the general path.
//
// Why it is fast (batch-1 decode streams the weight once):
// - The block's 128 threads take consecutive 16-byte chunks of a row (chunk c to thread
//   c % 128): every weight and x load is a coalesced 16-byte load.
// - I8_ROWS rows per block share each x load.
// - Memory-level parallelism: an iteration issues all I8_ROWS x I8_UNROLL weight loads
//   (64 bytes per lane at I8_UNROLL 1, which measured best on an H100 against 2 and 4)
//   before the first __dp4a.
// - Lanes, then the block's 4 warps, are summed once at the end.

#define I8_THREADS 128
#define I8_WARPS (I8_THREADS / WARP)
#define I8_ROWS 4
#define I8_UNROLL 1

template <int M, int U = I8_UNROLL>
__device__ __forceinline__ void gemv_i8_chunks(const i8* __restrict__ qx, const float* __restrict__ sx,
                                               const i8* __restrict__ w, const float* __restrict__ sw,
                                               const float* __restrict__ bias, float* __restrict__ out, int n,
                                               int k, int act, int accumulate) {
    __shared__ int partial[I8_WARPS][M * I8_ROWS];
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int j0 = blockIdx.x * I8_ROWS;
    int chunks = k >> 4;
    // Rows past the end read the last row (valid memory) and are not written.
    const int4* wrow[I8_ROWS];
#pragma unroll
    for (int r = 0; r < I8_ROWS; r++) wrow[r] = (const int4*)(w + (long)min(j0 + r, n - 1) * k);
    int acc[M][I8_ROWS];
#pragma unroll
    for (int i = 0; i < M; i++)
#pragma unroll
        for (int r = 0; r < I8_ROWS; r++) acc[i][r] = 0;
    for (int c0 = tid; c0 < chunks; c0 += I8_THREADS * U) {
        int4 wv[U][I8_ROWS];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int c = c0 + u * I8_THREADS;
#pragma unroll
            for (int r = 0; r < I8_ROWS; r++) wv[u][r] = c < chunks ? __ldg(wrow[r] + c) : make_int4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int c = c0 + u * I8_THREADS;
            if (c < chunks) {
#pragma unroll
                for (int i = 0; i < M; i++) {
                    int4 xv = __ldg((const int4*)(qx + (long)i * k) + c);
#pragma unroll
                    for (int r = 0; r < I8_ROWS; r++) {
                        int a = acc[i][r];
                        a = __dp4a(wv[u][r].x, xv.x, a);
                        a = __dp4a(wv[u][r].y, xv.y, a);
                        a = __dp4a(wv[u][r].z, xv.z, a);
                        a = __dp4a(wv[u][r].w, xv.w, a);
                        acc[i][r] = a;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < M; i++)
#pragma unroll
        for (int r = 0; r < I8_ROWS; r++) {
            int s = warp_sum_i32(acc[i][r]);
            if (lane == 0) partial[warp][i * I8_ROWS + r] = s;
        }
    __syncthreads();
    if (tid < M * I8_ROWS) {
        int i = tid / I8_ROWS, j = j0 + tid % I8_ROWS;
        int s = 0;
#pragma unroll
        for (int q = 0; q < I8_WARPS; q++) s += partial[q][tid];
        if (j < n) store_fused(out, (long)i * n + j, rescale_one(s, sx[i], sw[j], bias, j), act, accumulate);
    }
}

#define I8_ARGS                                                                                                \
    const i8 *__restrict__ qx, const float *__restrict__ sx, const i8 *__restrict__ w,                         \
        const float *__restrict__ sw, const float *__restrict__ bias, float *__restrict__ out, int n, int k,     \
        int act, int accumulate
#define I8_PASS qx, sx, w, sw, bias, out, n, k, act, accumulate

// gemv_i8_chunks for m = 1 .. 8 activation rows; blockDim I8_THREADS, one block per
// I8_ROWS output rows.
extern "C" __global__ void gemv_i8_m1(I8_ARGS) { gemv_i8_chunks<1>(I8_PASS); }
extern "C" __global__ void gemv_i8_m2(I8_ARGS) { gemv_i8_chunks<2>(I8_PASS); }
extern "C" __global__ void gemv_i8_m3(I8_ARGS) { gemv_i8_chunks<3>(I8_PASS); }
extern "C" __global__ void gemv_i8_m4(I8_ARGS) { gemv_i8_chunks<4>(I8_PASS); }
extern "C" __global__ void gemv_i8_m5(I8_ARGS) { gemv_i8_chunks<5>(I8_PASS); }
extern "C" __global__ void gemv_i8_m6(I8_ARGS) { gemv_i8_chunks<6>(I8_PASS); }
extern "C" __global__ void gemv_i8_m7(I8_ARGS) { gemv_i8_chunks<7>(I8_PASS); }
extern "C" __global__ void gemv_i8_m8(I8_ARGS) { gemv_i8_chunks<8>(I8_PASS); }

// int32 product acc[m, n] = qx[m, k] . w[n, k]^T, 16x16 tiles: the fallback for shapes
// cuBLASLt's int8 path does not take (k or n not a multiple of 4). blockDim (16, 16).
extern "C" __global__ void gemm_i8_tiled(const i8* __restrict__ qx, const i8* __restrict__ w,
                                         int* __restrict__ acc, int m, int n, int k) {
    __shared__ int xs[16][17];
    __shared__ int ws[16][17];
    int tx = threadIdx.x, ty = threadIdx.y;
    int i = blockIdx.y * 16 + ty, j = blockIdx.x * 16 + tx;
    int sum = 0;
    for (int k0 = 0; k0 < k; k0 += 16) {
        int kx = k0 + tx;
        xs[ty][tx] = (i < m && kx < k) ? (int)qx[(long)i * k + kx] : 0;
        int jw = blockIdx.x * 16 + ty;
        ws[ty][tx] = (jw < n && kx < k) ? (int)w[(long)jw * k + kx] : 0;
        __syncthreads();
#pragma unroll
        for (int t = 0; t < 16; t++) sum += xs[ty][t] * ws[tx][t];
        __syncthreads();
    }
    if (i < m && j < n) acc[(long)i * n + j] = sum;
}

// out[i, j] = rescale(acc[i, j]) (after cuBLASLt or gemm_i8_tiled). Grid-stride.
extern "C" __global__ void rescale_i32(const int* __restrict__ acc, const float* __restrict__ sx,
                                       const float* __restrict__ sw, const float* __restrict__ bias,
                                       float* __restrict__ out, int m, int n) {
    long total = (long)m * n;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
        int i = (int)(e / n), j = (int)(e % n);
        out[e] = rescale_one(acc[e], sx[i], sw[j], bias, j);
    }
}

// LLM.int8 split: mask[c] = 1 when some |x[i, c]| > threshold (strictly), else 0.
// One thread per column.
extern "C" __global__ void outlier_mask(const float* __restrict__ x, int rows, int cols, float threshold,
                                        u8* __restrict__ mask) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    u8 flag = 0;
    for (int i = 0; i < rows; i++) flag |= fabsf(x[(long)i * cols + c]) > threshold;
    mask[c] = flag;
}

// The flagged columns in increasing order into idx, their number into *count. One block
// of 1024 threads; each thread owns a contiguous run of columns.
extern "C" __global__ void compact_mask(const u8* __restrict__ mask, int cols, int* __restrict__ idx,
                                        int* __restrict__ count) {
    __shared__ int offsets[1024];
    int t = threadIdx.x, nt = blockDim.x;
    int per = (cols + nt - 1) / nt;
    int c0 = min(cols, t * per), c1 = min(cols, c0 + per);
    int local = 0;
    for (int c = c0; c < c1; c++) local += mask[c] != 0;
    offsets[t] = local;
    __syncthreads();
    // Inclusive scan (Hillis-Steele).
    for (int d = 1; d < nt; d <<= 1) {
        int v = t >= d ? offsets[t - d] : 0;
        __syncthreads();
        offsets[t] += v;
        __syncthreads();
    }
    int o = offsets[t] - local;
    for (int c = c0; c < c1; c++)
        if (mask[c]) idx[o++] = c;
    if (t == nt - 1) *count = offsets[t];
}

// out[i, j] += sum over the outlier columns c (in idx order) of round16(x[i, c]) *
// round16(w[j, c] * sw[j]), summed in f32 in that order, each product and sum rounded
// once: int8_outlier.rs's add_outlier_product. kind 0 = f16, 1 = bf16. One thread per
// output element.
extern "C" __global__ void outlier_product(const float* __restrict__ x, int rows, int cols,
                                           const int* __restrict__ idx, const int* __restrict__ count,
                                           const i8* __restrict__ w, const float* __restrict__ sw,
                                           float* __restrict__ out, int n, int kind) {
    long e = blockIdx.x * (long)blockDim.x + threadIdx.x;
    int no = *count;
    if (e >= (long)rows * n || no == 0) return;
    int i = (int)(e / n), j = (int)(e % n);
    float s = sw[j], sum = 0.0f;
    for (int t = 0; t < no; t++) {
        int c = idx[t];
        float a = round16(x[(long)i * cols + c], kind);
        float b = round16(__fmul_rn((float)w[(long)j * cols + c], s), kind);
        sum = __fadd_rn(sum, __fmul_rn(a, b));
    }
    out[e] = __fadd_rn(out[e], sum);
}

// Fake quantization: out = s * (clamp(rint(u) + zp, qmin, qmax) - zp) with u = x / s
// (reciprocal = 0, weights) or x * (1 / s) (reciprocal = 1, uint8 activations), s the
// scale of the row (per_row = 1, rows of `cols`) or scales[0]. qat_sim.rs / observer.rs.
extern "C" __global__ void fake_quant(const float* __restrict__ x, float* __restrict__ out, long n, int cols,
                                      const float* __restrict__ scales, int per_row, float zp, float qmin,
                                      float qmax, int reciprocal) {
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < n; e += (long)gridDim.x * blockDim.x) {
        float s = per_row ? scales[e / cols] : scales[0];
        float u = reciprocal ? __fmul_rn(x[e], __frcp_rn(s)) : __fdiv_rn(x[e], s);
        float q = fminf(fmaxf(__fadd_rn(rintf(u), zp), qmin), qmax);
        out[e] = __fmul_rn(__fsub_rn(q, zp), s);
    }
}

