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

// The tiled layout of the fast GEMV (see "the bandwidth-bound fused GEMV" below), for
// shapes with cols % 8 == 0: the byte holding value i (row-major index into [rows, cols]),
// whose nibble is, as in the plain layout, the high one when i is even.
__device__ __forceinline__ long tiled_byte(long i, int rows, int cols) {
    long r = i / cols;
    int col = (int)(i - r * cols);
    int words = cols >> 3, chunks = words >> 7, tail = words & 127;
    int w = col >> 3, k = (col & 7) >> 1;
    if (w < chunks << 7) {
        // Chunk w / 128, component (w / 32) % 4 of lane w % 32's uint4.
        long u = ((long)r * chunks + (w >> 7)) * 32 + (w & 31);
        return u * 16 + ((w >> 5) & 3) * 4 + k;
    }
    return ((long)rows * chunks * 128 + r * tail + (w - (chunks << 7))) * 4 + k;
}

// Dequantize n values: table[code] * scale, then + offset, each rounded once (as
// Packed4::value). Writes f32 (out_f32) or bf16 bits (out_bf16), whichever is not null.
// tiled: the bytes are in the fast GEMV's tiled layout of a [rows, cols] weight.
extern "C" __global__ void packed4_dequant(const u8* __restrict__ bytes, const float* __restrict__ table,
                                           const void* __restrict__ scales, const void* __restrict__ offsets,
                                           int bf16_params, long n, int block, int tiled, int rows, int cols,
                                           float* __restrict__ out_f32, u16* __restrict__ out_bf16) {
    __shared__ float t16[16];
    if (threadIdx.x < 16) t16[threadIdx.x] = table[threadIdx.x];
    __syncthreads();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long b = i / block;
        u32 code;
        if (tiled) {
            u32 byte = bytes[tiled_byte(i, rows, cols)];
            code = (i & 1) ? (byte & 15u) : (byte >> 4);
        } else {
            code = code_at(bytes, i);
        }
        float v = __fmul_rn(t16[code], param_at(scales, b, bf16_params));
        if (offsets) v = __fadd_rn(v, param_at(offsets, b, bf16_params));
        if (out_f32) out_f32[i] = v;
        if (out_bf16) out_bf16[i] = f32_to_bf16(v);
    }
}

#define GEMV_MAX_M 8

// Fused GEMV, general path: out[i, r] = sum_c W[r, c] * x[i, c] (+ bias[r]) for i < m
// (m <= 8), dequantizing in registers. One warp per output row, 8 warps per block. The
// host takes packed4_gemv_m<M> below whenever cols % 8 == 0 and block is a power of two
// of at least 8 (every format's usual shapes; their bytes are then uploaded in the tiled
// layout, which this kernel does not read); this kernel serves the other shapes, whose
// bytes keep the plain layout.
// Shapes with cols and block multiples of 32: each lane takes 32 consecutive values (one
// 16-byte load) of one block and applies the block's scale (and offset * sum x) once.
// Other shapes: value by value.
extern "C" __global__ void packed4_gemv(const u8* __restrict__ bytes, const float* __restrict__ table,
                                        const void* __restrict__ scales, const void* __restrict__ offsets,
                                        int bf16_params, const float* __restrict__ x, const float* __restrict__ bias,
                                        float* __restrict__ out, int rows, int cols, int block, int m, int act,
                                        int accumulate) {
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
            if (lane == 0) store_fused(out, (long)i * rows + r, bias ? t + bias[r] : t, act, accumulate);
        }
    }
}

// ---- the bandwidth-bound fused GEMV -------------------------------------------------------
//
// out[i, r] = sum_c W[r, c] * x[i, c] (+ bias[r]) for i < M, M = 1..8 a compile-time
// constant (entry points packed4_gemv_m1 .. _m8). Needs cols % 8 == 0 and block a power
// of two >= 8 (block == 1 << block_shift): then every 8-value word (4 bytes, one u32) lies
// in one row and one block.
//
// The tiled layout. For these shapes DevicePacked4::upload reorders the words of the
// plain layout (the bytes of a word, and so its nibble order, are unchanged). With
// words = cols / 8, chunks = words / 128 and tail = words % 128 per row:
// - first, for every row r and chunk c (row-major), 32 uint4 (512 bytes): component q of
//   uint4 l is word c * 128 + q * 32 + l of row r;
// - then, for every row, its last `tail` words in their plain order (u32 each).
// The size is exactly the plain layout's (rows * cols / 2 bytes, no padding), every uint4
// is 16-byte aligned, and tiled_byte above maps a value to its byte (packed4_dequant).
//
// Why (batch-1 decode reads each weight byte once; the GEMV is a stream, and an H100
// needs ~40 KiB of loads in flight per SM to stream at copy bandwidth):
// - 16 bytes per load: warp w of the block takes chunks w, w + 4, ... of each of its
//   P4_ROWS rows; lane l loads one uint4 per row (4 words 32 apart), so a warp's weight
//   load is 512 contiguous bytes and an iteration has P4_ROWS x 16 bytes in flight per
//   thread (4x the previous one-u32-per-row kernel).
// - Coalesced x: for component q the warp's lanes take 32 consecutive words, so their x
//   loads (8 floats per lane, two 16-byte loads) span 1 KiB contiguously.
// - P4_ROWS rows per block share every x load and every code decode is shared by the M
//   activation rows.
// - The tail words (fewer than 128 per row) go one per thread, after the chunks.
// - No division: the block index is (r * cols + col) >> block_shift; one scale (and
//   offset) load per word per row, issued with the weight loads before any use.
// - Code lookups, general tables: byte j of (w >> 2) & 0x3c3c3c3c is 4 * the high nibble
//   of byte j, byte j of (w << 2) & 0x3c3c3c3c 4 * the low one: one byte-permute per
//   value gives the shared-memory byte offset into the 16-entry table, whose 16 floats
//   sit in 16 distinct banks (a warp's lookups never conflict).
// - Integer tables (int4-block's [0..7, -8..-1], or any table[c] == (c ^ X) - B with X
//   0 or 8 and B a small integer, exactly: int_magic = 2^23 + B, int_xor = X * 0x11111111,
//   else int_magic = 0): no shared-memory lookup; one byte-permute builds the f32 bits
//   0x4b00000n = 2^23 + n of nibble n = c ^ X, and one subtraction of 2^23 + B gives
//   table[c] exactly. This moves the lookups off the L1/shared-memory data path, which
//   the x loads and (general tables) lookups otherwise nearly saturate.
// Sums: per word, dot = sum table[code] * x (f32, in value order), then acc += scale * dot
// (+ offset * sum x): the scale is applied once per 8 values, finer than the general
// path's 32. Lanes, then the block's 4 warps, are summed in f32 at the end.

#define P4_THREADS 128
#define P4_WARPS (P4_THREADS / WARP)
#define P4_ROWS 4
#define P4_CHUNK 128

// One word (8 values) of each of the P4_ROWS rows: word `word` of the row, codes w[r],
// scales sc[r], offsets of[r] (OFF). INT: the integer-table decode (see above).
template <int M, bool OFF, bool INT>
__device__ __forceinline__ void p4_word(const char* tb, u32 int_xor, float int_magic, const u32 (&w)[P4_ROWS],
                                        const float (&sc)[P4_ROWS], const float (&of)[P4_ROWS],
                                        const float* __restrict__ x, int cols, int word,
                                        float (&acc)[M][P4_ROWS]) {
    // The 8 table values of each row's word, in value order: value 2j is the high nibble
    // of byte j, value 2j + 1 the low one.
    float v[P4_ROWS][8];
#pragma unroll
    for (int r = 0; r < P4_ROWS; r++) {
        if (INT) {
            u32 c = w[r] ^ int_xor;
            u32 hi = (c >> 4) & 0x0f0f0f0fu, lo = c & 0x0f0f0f0fu;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                v[r][2 * j] = __int_as_float(__byte_perm(hi, 0x4b000000u, 0x7640u + j)) - int_magic;
                v[r][2 * j + 1] = __int_as_float(__byte_perm(lo, 0x4b000000u, 0x7640u + j)) - int_magic;
            }
        } else {
            u32 hi = (w[r] >> 2) & 0x3c3c3c3cu, lo = (w[r] << 2) & 0x3c3c3c3cu;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                v[r][2 * j] = *(const float*)(tb + __byte_perm(hi, 0u, 0x4440u + j));
                v[r][2 * j + 1] = *(const float*)(tb + __byte_perm(lo, 0u, 0x4440u + j));
            }
        }
    }
#pragma unroll
    for (int i = 0; i < M; i++) {
        const float4* x4 = (const float4*)(x + (long)i * cols + ((long)word << 3));
        float4 xa = __ldg(x4), xb = __ldg(x4 + 1);
        float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
        float xs = 0.0f;
        if (OFF) xs = ((xv[0] + xv[1]) + (xv[2] + xv[3])) + ((xv[4] + xv[5]) + (xv[6] + xv[7]));
#pragma unroll
        for (int r = 0; r < P4_ROWS; r++) {
            float dot = 0.0f;
#pragma unroll
            for (int k = 0; k < 8; k++) dot = fmaf(v[r][k], xv[k], dot);
            acc[i][r] = fmaf(sc[r], dot, acc[i][r]);
            if (OFF) acc[i][r] = fmaf(of[r], xs, acc[i][r]);
        }
    }
}

template <int M, bool OFF, bool INT>
__device__ __forceinline__ void packed4_gemv_tiled(const float* t16, float (*partial)[M * P4_ROWS],
                                                   const u8* __restrict__ bytes, const void* __restrict__ scales,
                                                   const void* __restrict__ offsets, int bf16_params,
                                                   u32 int_xor, float int_magic, const float* __restrict__ x,
                                                   const float* __restrict__ bias, float* __restrict__ out,
                                                   int rows, int cols, int block_shift, int act, int accumulate) {
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int r0 = blockIdx.x * P4_ROWS;
    int words = cols >> 3, chunks = words / P4_CHUNK, tail = words % P4_CHUNK;
    // Rows past the end read the last row (valid memory) and are not written.
    const uint4* wchunk[P4_ROWS];
    const u32* wtail[P4_ROWS];
    long rbase[P4_ROWS];
#pragma unroll
    for (int r = 0; r < P4_ROWS; r++) {
        long rr = min(r0 + r, rows - 1);
        rbase[r] = rr * cols;
        wchunk[r] = (const uint4*)bytes + rr * chunks * 32 + lane;
        wtail[r] = (const u32*)bytes + (long)rows * chunks * P4_CHUNK + rr * tail;
    }
    float acc[M][P4_ROWS];
#pragma unroll
    for (int i = 0; i < M; i++)
#pragma unroll
        for (int r = 0; r < P4_ROWS; r++) acc[i][r] = 0.0f;
    const char* tb = (const char*)t16;
#pragma unroll 1
    for (int c = warp; c < chunks; c += P4_WARPS) {
        // Issue every load of the iteration first: the weights, then their scales.
        uint4 wv[P4_ROWS];
#pragma unroll
        for (int r = 0; r < P4_ROWS; r++) wv[r] = __ldg(wchunk[r] + c * 32);
        int word0 = c * P4_CHUNK + lane;
        float sc[4][P4_ROWS], of[4][P4_ROWS];
#pragma unroll
        for (int q = 0; q < 4; q++)
#pragma unroll
            for (int r = 0; r < P4_ROWS; r++) {
                long b = (rbase[r] + ((long)(word0 + 32 * q) << 3)) >> block_shift;
                sc[q][r] = param_at(scales, b, bf16_params);
                of[q][r] = OFF ? param_at(offsets, b, bf16_params) : 0.0f;
            }
        // One component at a time, not unrolled (unrolled, the compiler hoists all four
        // components' decodes and x loads: 170-210 registers): component q is moved into
        // .x / sc[0] / of[0] by rotation, so every index stays static.
#pragma unroll 1
        for (int q = 0; q < 4; q++) {
            u32 w[P4_ROWS];
#pragma unroll
            for (int r = 0; r < P4_ROWS; r++) w[r] = wv[r].x;
            p4_word<M, OFF, INT>(tb, int_xor, int_magic, w, sc[0], of[0], x, cols, word0 + 32 * q, acc);
#pragma unroll
            for (int r = 0; r < P4_ROWS; r++) {
                wv[r] = make_uint4(wv[r].y, wv[r].z, wv[r].w, 0u);
#pragma unroll
                for (int k = 0; k < 3; k++) {
                    sc[k][r] = sc[k + 1][r];
                    of[k][r] = of[k + 1][r];
                }
            }
        }
    }
    if (tid < tail) {
        int word = chunks * P4_CHUNK + tid;
        u32 w[P4_ROWS];
        float sc[P4_ROWS], of[P4_ROWS];
#pragma unroll
        for (int r = 0; r < P4_ROWS; r++) w[r] = __ldg(wtail[r] + tid);
#pragma unroll
        for (int r = 0; r < P4_ROWS; r++) {
            long b = (rbase[r] + ((long)word << 3)) >> block_shift;
            sc[r] = param_at(scales, b, bf16_params);
            of[r] = OFF ? param_at(offsets, b, bf16_params) : 0.0f;
        }
        p4_word<M, OFF, INT>(tb, int_xor, int_magic, w, sc, of, x, cols, word, acc);
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
        if (r0 + r < rows) store_fused(out, (long)i * rows + r0 + r, bias ? s + bias[r0 + r] : s, act, accumulate);
    }
}

// The entry point for M activation rows: the variant for offsets or none, integer table
// or shared-memory table (uniform branches).
template <int M>
__device__ __forceinline__ void packed4_gemv_words(const u8* __restrict__ bytes, const float* __restrict__ table,
                                                   const void* __restrict__ scales,
                                                   const void* __restrict__ offsets, int bf16_params,
                                                   const float* __restrict__ x, const float* __restrict__ bias,
                                                   float* __restrict__ out, int rows, int cols, int block_shift,
                                                   u32 int_xor, float int_magic, int act, int accumulate) {
    __shared__ float t16[16];
    __shared__ float partial[P4_WARPS][M * P4_ROWS];
    if (threadIdx.x < 16) t16[threadIdx.x] = table[threadIdx.x];
    __syncthreads();
#define P4_TILED(OFF, INT)                                                                                     \
    packed4_gemv_tiled<M, OFF, INT>(t16, partial, bytes, scales, offsets, bf16_params, int_xor, int_magic, x,  \
                                    bias, out, rows, cols, block_shift, act, accumulate)
    if (int_magic != 0.0f) {
        if (offsets) P4_TILED(true, true);
        else P4_TILED(false, true);
    } else {
        if (offsets) P4_TILED(true, false);
        else P4_TILED(false, false);
    }
#undef P4_TILED
}

#define P4_ARGS                                                                                                \
    const u8 *__restrict__ bytes, const float *__restrict__ table, const void *__restrict__ scales,             \
        const void *__restrict__ offsets, int bf16_params, const float *__restrict__ x,                         \
        const float *__restrict__ bias, float *__restrict__ out, int rows, int cols, int block_shift,           \
        u32 int_xor, float int_magic, int act, int accumulate
#define P4_PASS                                                                                                \
    bytes, table, scales, offsets, bf16_params, x, bias, out, rows, cols, block_shift, int_xor, int_magic, act, \
        accumulate

// packed4_gemv_words for m = 1 .. 8 activation rows; blockDim P4_THREADS, one block per
// P4_ROWS output rows; bytes in the tiled layout. The launch bounds are the most resident
// blocks per SM at which ptxas (CUDA 13.0, sm_90) spills nothing: 80 registers for m = 1
// (6 blocks, 24 warps: 48 KiB of weight loads in flight per SM), 128 for m = 2, 168 for
// m = 3 .. 5; m >= 6 2 blocks (about 230).
extern "C" __global__ void __launch_bounds__(P4_THREADS, 6) packed4_gemv_m1(P4_ARGS) { packed4_gemv_words<1>(P4_PASS); }
extern "C" __global__ void __launch_bounds__(P4_THREADS, 4) packed4_gemv_m2(P4_ARGS) { packed4_gemv_words<2>(P4_PASS); }
extern "C" __global__ void __launch_bounds__(P4_THREADS, 3) packed4_gemv_m3(P4_ARGS) { packed4_gemv_words<3>(P4_PASS); }
extern "C" __global__ void __launch_bounds__(P4_THREADS, 3) packed4_gemv_m4(P4_ARGS) { packed4_gemv_words<4>(P4_PASS); }
extern "C" __global__ void __launch_bounds__(P4_THREADS, 3) packed4_gemv_m5(P4_ARGS) { packed4_gemv_words<5>(P4_PASS); }
extern "C" __global__ void __launch_bounds__(P4_THREADS, 2) packed4_gemv_m6(P4_ARGS) { packed4_gemv_words<6>(P4_PASS); }
extern "C" __global__ void __launch_bounds__(P4_THREADS, 2) packed4_gemv_m7(P4_ARGS) { packed4_gemv_words<7>(P4_PASS); }
extern "C" __global__ void __launch_bounds__(P4_THREADS, 2) packed4_gemv_m8(P4_ARGS) { packed4_gemv_words<8>(P4_PASS); }

// ---- the fixed-point GEMV of integer tables ------------------------------------------------
//
// out[i, r] = sum_c W[r, c] * x[i, c] (+ bias[r]) for i < M (M = 1..8, entry points
// packed4_gemv_fixed_m1 .. _m8), for tables table[c] = (c ^ X) - B (int4-block's, see
// integer_table in ops.rs), cols % 32 == 0, block a power of two and a multiple of 32, and
// the plain layout. The numerics of the CPU's default GEMV (src/scheme/packed4_gemv.rs):
// each 32-value chunk of an activation row is quantized to 16-bit integers q =
// round_half_even(x * (32767 / absmax)) with d = absmax / 32767, the chunk's integer dot
// product sum (c ^ X) * q - B * sum q is exact (at most 32 * 15 * 32767 < 2^31), and only
// its conversion, d * scale and the f32 sums round. A chunk holding a non-finite value gets
// d = NaN, so NaN reaches the output (the CPU takes its exact path there, also non-finite).
//
// Why: the f32 GEMV spends about 4.4 instructions per weight (a byte-permute and a
// subtraction to decode each value, an FMA, per-word scale loads). Here a 16-byte load
// holds a whole 32-value chunk of one block (one scale load), three logic instructions
// decode a word into its even and odd nibbles as bytes, and four __dp2a (two 16x8-bit
// products each) consume it: about 1.1 instructions per weight at batch 1. Measured on an
// H200 at batch 1 (reports/cuda/cuda-kernels.txt): 1.04-1.45x the f32 GEMV's speed, 26-55%
// of copy bandwidth; what is left is latency: each slab's quantization runs alone between
// two barriers, and a 4096-row weight makes only 256 blocks. At 8 rows it is slower than the
// f32 GEMV (30 against 21 us at 4096 x 4096): each thread quantizes 4 chunks in turn.
//
// Shape of the work: Q4_THREADS threads, warp w owns rows blockIdx.x * Q4_WARPS * R + w * R
// .. + R; lanes take chunks lane, lane + 32 of each slab of Q4_SLAB chunks, so a warp's
// weight load of one row is 512 contiguous bytes and a lane has R loads of 16 bytes in
// flight. The block quantizes each slab of x once into shared memory (one thread per chunk
// and activation row), laid out [i][word j][chunk] so that a warp's 16-byte reads of one
// word of 32 consecutive chunks fall in distinct banks; in a word the codes are ordered
// [q1 q3 q5 q7 q0 q2 q4 q6], the order in which __dp2a pairs them with the odd nibbles
// (low, as bytes of (w ^ X) & 0x0f0f0f0f) and the even ones (high).

#define Q4_THREADS 128
#define Q4_WARPS (Q4_THREADS / WARP)
#define Q4_SLAB 64

// Quantize chunk g (32 values from xc, 16-byte aligned) into the 4 words of codes, its d,
// sum q and (OFF) the f32 sum of its values; one thread per chunk. (A warp-cooperative
// version, one value per lane with warp reductions, with the slab's weight loads issued
// before it, measured 2x slower on an H200: 15.4 against 7.9 us at 4096 x 4096.)
template <bool OFF>
__device__ __forceinline__ void q4_quantize_chunk(const float* __restrict__ xc, uint4 (&words)[4], float& d,
                                                  int& qsum, float& xsum) {
    float v[32];
    const float4* x4 = (const float4*)xc;
#pragma unroll
    for (int t = 0; t < 8; t++) {
        float4 f = __ldg(x4 + t);
        v[4 * t] = f.x;
        v[4 * t + 1] = f.y;
        v[4 * t + 2] = f.z;
        v[4 * t + 3] = f.w;
    }
    // The largest magnitude as bits: a NaN or an infinity has bits >= 0x7f800000.
    u32 mbits = 0;
#pragma unroll
    for (int t = 0; t < 32; t++) mbits = max(mbits, __float_as_uint(v[t]) & 0x7fffffffu);
    float absmax = __uint_as_float(mbits);
    float inv = 0.0f;
    if (mbits >= 0x7f800000u) {
        d = __int_as_float(0x7fc00000);
    } else if (mbits == 0) {
        d = 0.0f;
    } else {
        d = __fdiv_rn(absmax, 32767.0f);
        inv = __fdiv_rn(32767.0f, absmax);
    }
    // round_half_even(v * inv): |v * inv| <= 32767 (plus a rounding), so adding 1.5 * 2^23
    // leaves the integer in the low mantissa bits, two's complement in the low 16.
    int q[32];
    int s = 0;
#pragma unroll
    for (int t = 0; t < 32; t++) {
        float p = __fadd_rn(__fmul_rn(v[t], inv), 12582912.0f);
        q[t] = (int)(__float_as_uint(p) & 0xffffu);
        s += (int)(short)q[t];
    }
    qsum = s;
    if (OFF) {
        float a = 0.0f;
#pragma unroll
        for (int t = 0; t < 32; t++) a += v[t];
        xsum = a;
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int* w = q + 8 * j;
        words[j] = make_uint4((u32)w[1] | ((u32)w[3] << 16), (u32)w[5] | ((u32)w[7] << 16),
                              (u32)w[0] | ((u32)w[2] << 16), (u32)w[4] | ((u32)w[6] << 16));
    }
}

// The quantized slab of x in shared memory: codes, d, sum q, sum x per chunk.
template <int M>
struct Q4Slab {
    uint4 xs[M][4][Q4_SLAB];
    float xd[M][Q4_SLAB];
    int xq[M][Q4_SLAB];
    float xt[M][Q4_SLAB];
};

// The plain-layout rows r0 .. r0 + R of a [rows, cols] weight: each row's 16-byte words
// and its first value's index. Rows past the end read the last row (valid memory) and are
// not written.
template <int R>
__device__ __forceinline__ void q4_rows(const u8* __restrict__ bytes, int r0, int rows, int cols,
                                        const uint4* (&wrow)[R], long (&rbase)[R]) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        long rr = min(r0 + r, rows - 1);
        rbase[r] = rr * cols;
        wrow[r] = (const uint4*)bytes + rr * (cols >> 5);
    }
}

// One 32-value chunk g of R weight rows against M quantized activation rows, shared by
// both fixed-point kernels: load each row's 16-byte word and block parameters, take the
// exact integer dot products through __dp2a, then acc += (dot - B * sum q) * d * scale
// (+ offset * sum x). X supplies the quantized chunk: word(i, j), the uint4 of word j of
// row i (codes in the order q4_quantize_chunk gives), and chunk(i, d, qsum, xsum).
template <int M, int R, bool OFF, class X>
__device__ __forceinline__ void q4_chunk(const X& x, const uint4* const (&wrow)[R], const long (&rbase)[R], int g,
                                         const void* __restrict__ scales, const void* __restrict__ offsets,
                                         int bf16_params, int block_shift, u32 int_xor, int int_bias,
                                         float (&acc)[M][R]) {
    uint4 wv[R];
#pragma unroll
    for (int r = 0; r < R; r++) wv[r] = __ldg(wrow[r] + g);
    float sc[R], of[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        long b = (rbase[r] + ((long)g << 5)) >> block_shift;
        sc[r] = param_at(scales, b, bf16_params);
        of[r] = OFF ? param_at(offsets, b, bf16_params) : 0.0f;
    }
    int dot[M][R];
#pragma unroll
    for (int i = 0; i < M; i++)
#pragma unroll
        for (int r = 0; r < R; r++) dot[i][r] = 0;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        uint4 xv[M];
#pragma unroll
        for (int i = 0; i < M; i++) xv[i] = x.word(i, j);
#pragma unroll
        for (int r = 0; r < R; r++) {
            u32 w = j == 0 ? wv[r].x : j == 1 ? wv[r].y : j == 2 ? wv[r].z : wv[r].w;
            int odd = (int)((w ^ int_xor) & 0x0f0f0f0fu);
            int even = (int)(((w >> 4) ^ int_xor) & 0x0f0f0f0fu);
#pragma unroll
            for (int i = 0; i < M; i++) {
                int a = dot[i][r];
                a = __dp2a_lo((int)xv[i].x, odd, a);
                a = __dp2a_hi((int)xv[i].y, odd, a);
                a = __dp2a_lo((int)xv[i].z, even, a);
                a = __dp2a_hi((int)xv[i].w, even, a);
                dot[i][r] = a;
            }
        }
    }
#pragma unroll
    for (int i = 0; i < M; i++) {
        float d, xsum;
        int qs;
        x.chunk(i, d, qs, xsum);
#pragma unroll
        for (int r = 0; r < R; r++) {
            float v = (float)(dot[i][r] - int_bias * qs);
            acc[i][r] = fmaf(v, __fmul_rn(d, sc[r]), acc[i][r]);
            if (OFF) acc[i][r] = fmaf(of[r], xsum, acc[i][r]);
        }
    }
}

// Chunk c of the one-launch kernel's quantized slab in shared memory.
template <int M, bool OFF>
struct Q4SlabChunk {
    const Q4Slab<M>& sh;
    int c;
    __device__ __forceinline__ uint4 word(int i, int j) const { return sh.xs[i][j][c]; }
    __device__ __forceinline__ void chunk(int i, float& d, int& qs, float& xsum) const {
        d = sh.xd[i][c];
        qs = sh.xq[i][c];
        xsum = OFF ? sh.xt[i][c] : 0.0f;
    }
};

template <int M, int R, bool OFF>
__device__ __forceinline__ void packed4_gemv_fixed(Q4Slab<M>& sh, const u8* __restrict__ bytes, const void* __restrict__ scales,
                                                   const void* __restrict__ offsets, int bf16_params,
                                                   const float* __restrict__ x, const float* __restrict__ bias,
                                                   float* __restrict__ out, int rows, int cols, int block_shift,
                                                   u32 int_xor, int int_bias, int act, int accumulate) {
    auto& xs = sh.xs;
    auto& xd = sh.xd;
    auto& xq = sh.xq;
    auto& xt = sh.xt;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int chunks = cols >> 5;
    int r0 = blockIdx.x * (Q4_WARPS * R) + warp * R;
    const uint4* wrow[R];
    long rbase[R];
    q4_rows<R>(bytes, r0, rows, cols, wrow, rbase);
    float acc[M][R] = {};
    for (int slab = 0; slab < chunks; slab += Q4_SLAB) {
        int here = min(Q4_SLAB, chunks - slab);
        __syncthreads();
        for (int t = tid; t < M * Q4_SLAB; t += Q4_THREADS) {
            int i = t / Q4_SLAB, c = t % Q4_SLAB;
            if (c < here) {
                uint4 words[4];
                float d, xsum = 0.0f;
                int qsum;
                q4_quantize_chunk<OFF>(x + (long)i * cols + ((long)(slab + c) << 5), words, d, qsum, xsum);
#pragma unroll
                for (int j = 0; j < 4; j++) xs[i][j][c] = words[j];
                xd[i][c] = d;
                xq[i][c] = qsum;
                if (OFF) xt[i][c] = xsum;
            }
        }
        __syncthreads();
#pragma unroll
        for (int h = 0; h < Q4_SLAB / WARP; h++) {
            int c = lane + h * WARP;
            if (c >= here) break;
            q4_chunk<M, R, OFF>(Q4SlabChunk<M, OFF>{sh, c}, wrow, rbase, slab + c, scales, offsets, bf16_params,
                                block_shift, int_xor, int_bias, acc);
        }
    }
#pragma unroll
    for (int i = 0; i < M; i++)
#pragma unroll
        for (int r = 0; r < R; r++) {
            float s = warp_sum(acc[i][r]);
            int row = r0 + r;
            if (lane == 0 && row < rows) store_fused(out, (long)i * rows + row, bias ? s + bias[row] : s, act, accumulate);
        }
}

// Rows per warp of the fixed-point GEMV, and so Q4_WARPS * Q4_ROWS rows per block.
#define Q4_ROWS 4

#define Q4_ARGS                                                                                                \
    const u8 *__restrict__ bytes, const void *__restrict__ scales, const void *__restrict__ offsets,             \
        int bf16_params, const float *__restrict__ x, const float *__restrict__ bias, float *__restrict__ out,  \
        int rows, int cols, int block_shift, u32 int_xor, int int_bias, int act, int accumulate
#define Q4_PASS bytes, scales, offsets, bf16_params, x, bias, out, rows, cols, block_shift, int_xor, int_bias, act, accumulate

template <int M>
__device__ __forceinline__ void packed4_gemv_fixed_any(Q4_ARGS) {
    // One shared allocation for both variants (each declaring its own would add up).
    __shared__ Q4Slab<M> sh;
    if (offsets) packed4_gemv_fixed<M, Q4_ROWS, true>(sh, Q4_PASS);
    else packed4_gemv_fixed<M, Q4_ROWS, false>(sh, Q4_PASS);
}

extern "C" __global__ void __launch_bounds__(Q4_THREADS) packed4_gemv_fixed_m1(Q4_ARGS) { packed4_gemv_fixed_any<1>(Q4_PASS); }
extern "C" __global__ void __launch_bounds__(Q4_THREADS) packed4_gemv_fixed_m2(Q4_ARGS) { packed4_gemv_fixed_any<2>(Q4_PASS); }
extern "C" __global__ void __launch_bounds__(Q4_THREADS) packed4_gemv_fixed_m3(Q4_ARGS) { packed4_gemv_fixed_any<3>(Q4_PASS); }
extern "C" __global__ void __launch_bounds__(Q4_THREADS) packed4_gemv_fixed_m4(Q4_ARGS) { packed4_gemv_fixed_any<4>(Q4_PASS); }
extern "C" __global__ void __launch_bounds__(Q4_THREADS) packed4_gemv_fixed_m5(Q4_ARGS) { packed4_gemv_fixed_any<5>(Q4_PASS); }
extern "C" __global__ void __launch_bounds__(Q4_THREADS) packed4_gemv_fixed_m6(Q4_ARGS) { packed4_gemv_fixed_any<6>(Q4_PASS); }
extern "C" __global__ void __launch_bounds__(Q4_THREADS) packed4_gemv_fixed_m7(Q4_ARGS) { packed4_gemv_fixed_any<7>(Q4_PASS); }
extern "C" __global__ void __launch_bounds__(Q4_THREADS) packed4_gemv_fixed_m8(Q4_ARGS) { packed4_gemv_fixed_any<8>(Q4_PASS); }

// ---- the fixed-point GEMV over activations quantized once ----------------------------------
//
// The same numerics as packed4_gemv_fixed_m* above (each 32-value chunk of an activation
// row as 16-bit integers, exact integer chunk sums through __dp2a), in two launches:
// q16_quantize_chunks quantizes the M activation rows once into a small buffer, then
// packed4_gemv_fixedq_m<M> streams the weight. Why: the one-launch kernel has every block
// quantize the whole of x into shared memory before it reads a weight byte (two barriers
// per 64-chunk slab), and its 16 rows per block leave a 4096-row weight 256 blocks, two per
// SM: too few loads in flight for the memory system. Here a block owns Q4Q_ROWS = 4 rows
// and its 128 threads split the row's chunks (thread t takes chunks t, t + 128, ...), so a
// 4096 x 4096 weight makes 1024 blocks, each thread has 4 independent 16-byte weight loads
// in flight, and the quantized x (76 bytes per chunk and row) is read from L1/L2 by every
// block.
//
// The buffer of m rows and `chunks` = cols / 32 chunks per row, 19 u32 per (row, chunk):
// codes as uint4 [m][4][chunks] (word j of chunk c of row i; its 8 codes in the order
// q4_quantize_chunk gives), then d as f32 [m][chunks], sum q as i32 [m][chunks], sum x as
// f32 [m][chunks].

struct Q16View {
    const uint4* words;
    const float* d;
    const int* qsum;
    const float* xsum;
};

__device__ __forceinline__ Q16View q16_view(const u32* xq, int m, int chunks) {
    long n = (long)m * chunks;
    Q16View v;
    v.words = (const uint4*)xq;
    v.d = (const float*)(xq + 16 * n);
    v.qsum = (const int*)(xq + 17 * n);
    v.xsum = (const float*)(xq + 18 * n);
    return v;
}

// Chunk g of the prequantized buffer, read through L1 by every block.
template <int M, bool OFF>
struct Q16Chunk {
    Q16View v;
    int chunks, g;
    __device__ __forceinline__ uint4 word(int i, int j) const { return __ldg(v.words + ((long)i * 4 + j) * chunks + g); }
    __device__ __forceinline__ void chunk(int i, float& d, int& qs, float& xsum) const {
        long at = (long)i * chunks + g;
        d = __ldg(v.d + at);
        qs = __ldg(v.qsum + at);
        xsum = OFF ? __ldg(v.xsum + at) : 0.0f;
    }
};

// One thread per (row, chunk) of x [m, cols] (cols % 32 == 0, rows 16-byte aligned).
extern "C" __global__ void q16_quantize_chunks(const float* __restrict__ x, int m, int cols, u32* __restrict__ xq) {
    int chunks = cols >> 5;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= m * chunks) return;
    int i = t / chunks, c = t - i * chunks;
    uint4 words[4];
    float d, xsum = 0.0f;
    int qsum;
    q4_quantize_chunk<true>(x + (long)i * cols + ((long)c << 5), words, d, qsum, xsum);
    long n = (long)m * chunks, at = (long)i * chunks + c;
    uint4* w = (uint4*)xq;
#pragma unroll
    for (int j = 0; j < 4; j++) w[((long)i * 4 + j) * chunks + c] = words[j];
    ((float*)(xq + 16 * n))[at] = d;
    ((int*)(xq + 17 * n))[at] = qsum;
    ((float*)(xq + 18 * n))[at] = xsum;
}

#define Q4Q_THREADS 128
#define Q4Q_WARPS (Q4Q_THREADS / WARP)
#define Q4Q_ROWS 4

template <int M, bool OFF>
__device__ __forceinline__ void packed4_gemv_fixedq(float (*partial)[M * Q4Q_ROWS], const u8* __restrict__ bytes,
                                                    const void* __restrict__ scales, const void* __restrict__ offsets,
                                                    int bf16_params, const u32* __restrict__ xq,
                                                    const float* __restrict__ bias, float* __restrict__ out, int rows,
                                                    int cols, int block_shift, u32 int_xor, int int_bias, int act,
                                                    int accumulate) {
    constexpr int R = Q4Q_ROWS;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int chunks = cols >> 5;
    int r0 = blockIdx.x * R;
    Q16View xv_all = q16_view(xq, M, chunks);
    const uint4* wrow[R];
    long rbase[R];
    q4_rows<R>(bytes, r0, rows, cols, wrow, rbase);
    float acc[M][R] = {};
#pragma unroll 1
    for (int g = tid; g < chunks; g += Q4Q_THREADS)
        q4_chunk<M, R, OFF>(Q16Chunk<M, OFF>{xv_all, chunks, g}, wrow, rbase, g, scales, offsets, bf16_params,
                            block_shift, int_xor, int_bias, acc);
#pragma unroll
    for (int i = 0; i < M; i++)
#pragma unroll
        for (int r = 0; r < R; r++) {
            float s = warp_sum(acc[i][r]);
            if (lane == 0) partial[warp][i * R + r] = s;
        }
    __syncthreads();
    if (tid < M * R) {
        int i = tid / R, r = tid % R;
        float s = 0.0f;
#pragma unroll
        for (int w = 0; w < Q4Q_WARPS; w++) s += partial[w][tid];
        int row = r0 + r;
        if (row < rows) store_fused(out, (long)i * rows + row, bias ? s + bias[row] : s, act, accumulate);
    }
}

#define Q4Q_ARGS                                                                                               \
    const u8 *__restrict__ bytes, const void *__restrict__ scales, const void *__restrict__ offsets,             \
        int bf16_params, const u32 *__restrict__ xq, const float *__restrict__ bias, float *__restrict__ out,   \
        int rows, int cols, int block_shift, u32 int_xor, int int_bias, int act, int accumulate
#define Q4Q_PASS bytes, scales, offsets, bf16_params, xq, bias, out, rows, cols, block_shift, int_xor, int_bias, act, accumulate

template <int M>
__device__ __forceinline__ void packed4_gemv_fixedq_any(Q4Q_ARGS) {
    __shared__ float partial[Q4Q_WARPS][M * Q4Q_ROWS];
    if (offsets) packed4_gemv_fixedq<M, true>(partial, Q4Q_PASS);
    else packed4_gemv_fixedq<M, false>(partial, Q4Q_PASS);
}

// packed4_gemv_fixedq_any for m = 1 .. 8 activation rows; blockDim Q4Q_THREADS, one block
// per Q4Q_ROWS output rows; bytes in the plain layout; xq from q16_quantize_chunks with
// the same m. Launch bounds: as many resident blocks per SM as spill-free registers allow.
extern "C" __global__ void __launch_bounds__(Q4Q_THREADS, 8) packed4_gemv_fixedq_m1(Q4Q_ARGS) { packed4_gemv_fixedq_any<1>(Q4Q_PASS); }
extern "C" __global__ void __launch_bounds__(Q4Q_THREADS, 5) packed4_gemv_fixedq_m2(Q4Q_ARGS) { packed4_gemv_fixedq_any<2>(Q4Q_PASS); }
extern "C" __global__ void __launch_bounds__(Q4Q_THREADS, 4) packed4_gemv_fixedq_m3(Q4Q_ARGS) { packed4_gemv_fixedq_any<3>(Q4Q_PASS); }
extern "C" __global__ void __launch_bounds__(Q4Q_THREADS, 4) packed4_gemv_fixedq_m4(Q4Q_ARGS) { packed4_gemv_fixedq_any<4>(Q4Q_PASS); }
extern "C" __global__ void __launch_bounds__(Q4Q_THREADS, 3) packed4_gemv_fixedq_m5(Q4Q_ARGS) { packed4_gemv_fixedq_any<5>(Q4Q_PASS); }
extern "C" __global__ void __launch_bounds__(Q4Q_THREADS, 3) packed4_gemv_fixedq_m6(Q4Q_ARGS) { packed4_gemv_fixedq_any<6>(Q4Q_PASS); }
extern "C" __global__ void __launch_bounds__(Q4Q_THREADS, 2) packed4_gemv_fixedq_m7(Q4Q_ARGS) { packed4_gemv_fixedq_any<7>(Q4Q_PASS); }
extern "C" __global__ void __launch_bounds__(Q4Q_THREADS, 2) packed4_gemv_fixedq_m8(Q4Q_ARGS) { packed4_gemv_fixedq_any<8>(Q4Q_PASS); }
