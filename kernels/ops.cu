// Model ops of the forward passes: norms, activations, rotary embedding, softmax,
// attention over a key/value cache (causal, ALiBi, key padding), embedding lookup and
// element-wise adds. CPU references: src/tensor/mod.rs and src/tensor/attention.rs.

// RMSNorm per row of dim values: out = x * (1 / sqrt(mean(x^2) + eps)) * w, the mean
// accumulated in f64 and then rounded to f32, as tensor::rms_norm_rows. One block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ out, int rows, int dim, float eps) {
    __shared__ double scratch[32];
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (long)row * dim;
    double ss = 0.0;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) ss += (double)xr[c] * (double)xr[c];
    float mean_sq = (float)(block_sum_f64(ss, scratch) / (double)dim);
    float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean_sq, eps)));
    float* o = out + (long)row * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) o[c] = __fmul_rn(__fmul_rn(xr[c], inv), w[c]);
}

// LayerNorm per row: ((x - mean) / sqrt(var + eps)) * w + b, statistics in f64 (two
// passes), as tensor::layer_norm_rows. One block per row.
extern "C" __global__ void layer_norm(const float* __restrict__ x, const float* __restrict__ w,
                                      const float* __restrict__ b, float* __restrict__ out, int rows, int dim,
                                      float eps) {
    __shared__ double scratch[32];
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (long)row * dim;
    double s = 0.0;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) s += (double)xr[c];
    double mean = block_sum_f64(s, scratch) / (double)dim;
    double v = 0.0;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        double d = (double)xr[c] - mean;
        v += d * d;
    }
    double var = block_sum_f64(v, scratch) / (double)dim;
    double inv = 1.0 / sqrt(var + (double)eps);
    float* o = out + (long)row * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x)
        o[c] = __fadd_rn(__fmul_rn((float)(((double)xr[c] - mean) * inv), w[c]), b[c]);
}

// GELU, tanh approximation (GPT-2 gelu_new, BLOOM): gelu_tanh_of (common.cuh).
extern "C" __global__ void gelu_tanh(const float* __restrict__ x, float* __restrict__ out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = gelu_tanh_of(x[i]);
}

// GELU with the exact error function (BERT), in f64 as the CPU reference: gelu_erf_of.
extern "C" __global__ void gelu_erf(const float* __restrict__ x, float* __restrict__ out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = gelu_erf_of(x[i]);
}

// out = gate * sigmoid(gate) * up (Llama's MLP).
extern "C" __global__ void silu_mul(const float* __restrict__ gate, const float* __restrict__ up,
                                    float* __restrict__ out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// dst += src.
extern "C" __global__ void add_in_place(float* __restrict__ dst, const float* __restrict__ src, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        dst[i] += src[i];
}

// x[i, j] += bias[j] for rows of n.
extern "C" __global__ void add_bias_rows(float* __restrict__ x, const float* __restrict__ bias, int rows, int n) {
    long total = (long)rows * n;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x)
        x[e] += bias[e % n];
}

// The epilogue of a product computed without one (cuBLAS, the dequantize-then-GEMM paths):
// out[i, j] = store_fused(raw[i, j] + bias[j]) (bias may be null), rows of n values.
extern "C" __global__ void bias_act_rows(const float* raw, const float* __restrict__ bias, float* out, int rows, int n, int act, int accumulate) {
    long total = (long)rows * n;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
        float v = raw[e];
        if (bias) v += bias[e % n];
        store_fused(out, e, v, act, accumulate);
    }
}

// Numerically stable softmax of each row of cols values. One block per row.
extern "C" __global__ void softmax_rows(const float* __restrict__ x, float* __restrict__ out, int rows, int cols) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (long)row * cols;
    float m = NEG_INF;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, xr[c]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += expf(xr[c] - m);
    float inv = 1.0f / block_sum(s, scratch);
    float* o = out + (long)row * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = expf(xr[c] - m) * inv;
}

// Rotary embedding, "rotate half" layout (Hugging Face Llama), in place on
// x [tokens, heads * head_dim]: for i < head_dim / 2, angle = pos[token] * inv_freq[i]
// (f32), (a, b) = (x[i], x[i + half]) -> (a cos - b sin, b cos + a sin).
extern "C" __global__ void rotary(float* __restrict__ x, const int* __restrict__ positions,
                                  const float* __restrict__ inv_freq, int tokens, int heads, int head_dim) {
    int half = head_dim / 2;
    long total = (long)tokens * heads * half;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
        int i = (int)(e % half);
        long th = e / half;
        int t = (int)(th / heads);
        float* v = x + th * head_dim;
        float angle = __fmul_rn((float)positions[t], inv_freq[i]);
        float s, c;
        sincosf(angle, &s, &c);
        float a = v[i], b = v[i + half];
        v[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        v[i + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
}

// Embedding lookup: out[t, :] = table[tokens[t], :]; a token >= vocab gives NaN (the
// host checks tokens before the launch).
extern "C" __global__ void embedding(const float* __restrict__ table, const u32* __restrict__ tokens,
                                     float* __restrict__ out, int n_tokens, int vocab, int dim) {
    long total = (long)n_tokens * dim;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
        int t = (int)(e / dim), d = (int)(e % dim);
        u32 tok = tokens[t];
        out[e] = tok < (u32)vocab ? table[(long)tok * dim + d] : __int_as_float(0x7fc00000);
    }
}

// Append seq new positions of one layer's keys or values to its cache:
// src [batch, seq, kv_heads * head_dim] -> cache [batch * kv_heads, capacity, head_dim]
// at positions start .. start + seq (the host checks start + seq <= capacity). start_at
// (may be null) replaces start with *start_at: a captured decode graph reads the cache
// length from the device, as it changes between replays; positions past the capacity are
// then skipped, since the host cannot check a value it does not pass.
extern "C" __global__ void kv_append(const float* __restrict__ src, float* __restrict__ cache, int batch, int seq,
                                     int kv_heads, int head_dim, int capacity, int start,
                                     const int* __restrict__ start_at) {
    if (start_at) start = *start_at;
    long total = (long)batch * seq * kv_heads * head_dim;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
        int d = (int)(e % head_dim);
        long r = e / head_dim;
        int h = (int)(r % kv_heads);
        long bt = r / kv_heads;
        int t = (int)(bt % seq), b = (int)(bt / seq);
        if (start + t >= capacity) continue;
        cache[(((long)b * kv_heads + h) * capacity + start + t) * head_dim + d] = src[e];
    }
}

// kv_append of a layer's keys and values in one launch (k_src and v_src alike).
extern "C" __global__ void kv_append_pair(const float* __restrict__ k_src, const float* __restrict__ v_src,
                                          float* __restrict__ k_cache, float* __restrict__ v_cache, int batch,
                                          int seq, int kv_heads, int head_dim, int capacity, int start,
                                          const int* __restrict__ start_at) {
    if (start_at) start = *start_at;
    long total = (long)batch * seq * kv_heads * head_dim;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
        int d = (int)(e % head_dim);
        long r = e / head_dim;
        int h = (int)(r % kv_heads);
        long bt = r / kv_heads;
        int t = (int)(bt % seq), b = (int)(bt / seq);
        if (start + t >= capacity) continue;
        long at = (((long)b * kv_heads + h) * capacity + start + t) * head_dim + d;
        k_cache[at] = k_src[e];
        v_cache[at] = v_src[e];
    }
}

// split_qkv and kv_append of k and v in one launch, for a fused projection of heads heads
// of head_dim (keys and values have as many heads): q [batch * seq, heads * head_dim] gets
// the queries, the caches the keys and values at start .. start + seq (start_at as in
// kv_append).
extern "C" __global__ void split_qkv_append(const float* __restrict__ fused, float* __restrict__ q,
                                            float* __restrict__ k_cache, float* __restrict__ v_cache, int batch,
                                            int seq, int heads, int head_dim, int run, int capacity, int start,
                                            const int* __restrict__ start_at) {
    if (start_at) start = *start_at;
    int width = heads * head_dim;
    long n = (long)batch * seq * width;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < n; e += (long)gridDim.x * blockDim.x) {
        long r = e / width;
        int c = (int)(e % width);
        long src = r * 3 * (long)width + (long)(c / run) * 3 * run + c % run;
        q[e] = fused[src];
        int t = (int)(r % seq), b = (int)(r / seq);
        if (start + t >= capacity) continue;
        long at = (((long)b * heads + c / head_dim) * capacity + start + t) * head_dim + c % head_dim;
        k_cache[at] = fused[src + run];
        v_cache[at] = fused[src + 2 * run];
    }
}

// Threads per block of attention (the host launches this many).
#define ATTN_THREADS 128

// Attention of seq queries q [batch, seq, heads * head_dim] at positions start .. start +
// seq against the cache (the new positions already appended): one block per (query row,
// head), scores of the keys_total = start + seq keys in dynamic shared memory (4 bytes a
// key). Causal: query t sees keys 0 ..= start + t. alibi (may be null): slope[h] * key
// position added. key_mask (may be null) [batch, keys_total]: 0 marks a padding key whose
// score becomes the most negative float, as transformers. As KvCache::attend. start_at
// (may be null) replaces start with *start_at (a captured decode graph: the host then
// sizes the shared memory for the whole capacity, and a block whose keys would pass it
// writes nothing rather than read past the scores).
extern "C" __global__ void attention(const float* __restrict__ q, const float* __restrict__ k_cache,
                                     const float* __restrict__ v_cache, float* __restrict__ out, int batch,
                                     int seq, int heads, int kv_heads, int head_dim, int capacity, int start,
                                     int causal, const float* __restrict__ alibi, const u8* __restrict__ key_mask,
                                     float scale, const int* __restrict__ start_at) {
    extern __shared__ float scores[];
    __shared__ float scratch[32];
    int row = blockIdx.x, h = blockIdx.y;
    if (row >= batch * seq || h >= heads) return;
    if (start_at) start = *start_at;
    if (start + seq > capacity) return;
    int b = row / seq, t = row % seq;
    int keys_total = start + seq;
    int visible = causal ? start + t + 1 : keys_total;
    int kvh = h / (heads / kv_heads);
    const float* qh = q + ((long)row * heads + h) * head_dim;
    const float* keys = k_cache + ((long)b * kv_heads + kvh) * capacity * head_dim;
    const float* values = v_cache + ((long)b * kv_heads + kvh) * capacity * head_dim;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    // Scores: one warp per key.
    for (int p = warp; p < visible; p += warps) {
        const float* kp = keys + (long)p * head_dim;
        float d = 0.0f;
        for (int c = lane; c < head_dim; c += WARP) d += qh[c] * kp[c];
        d = warp_sum(d);
        if (lane == 0) {
            float s = d * scale;
            if (alibi) s += alibi[h] * (float)p;
            if (key_mask && key_mask[(long)b * keys_total + p] == 0) s = -3.40282347e38f;
            scores[p] = s;
        }
    }
    __syncthreads();
    float m = NEG_INF;
    for (int p = threadIdx.x; p < visible; p += blockDim.x) m = fmaxf(m, scores[p]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int p = threadIdx.x; p < visible; p += blockDim.x) {
        float e = expf(scores[p] - m);
        scores[p] = e;
        sum += e;
    }
    float inv = 1.0f / block_sum(sum, scratch);
    __syncthreads();
    float* oh = out + ((long)row * heads + h) * head_dim;
    if (head_dim > ATTN_THREADS || blockDim.x != ATTN_THREADS) {
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float o = 0.0f;
            for (int p = 0; p < visible; p++) o += scores[p] * inv * values[(long)p * head_dim + d];
            oh[d] = o;
        }
        return;
    }
    // The weighted sum of the values: the block's threads form groups of head_dim, group g
    // sums keys g, g + groups, ... (a decode step's one query would otherwise leave all but
    // head_dim threads idle and walk every key in one dependent chain), then the groups'
    // partial sums are added in group order.
    __shared__ float partial[ATTN_THREADS];
    int groups = ATTN_THREADS / head_dim;
    int d = threadIdx.x % head_dim, g = threadIdx.x / head_dim;
    float o = 0.0f;
    if (g < groups)
        for (int p = g; p < visible; p += groups) o += scores[p] * inv * values[(long)p * head_dim + d];
    partial[threadIdx.x] = o;
    __syncthreads();
    if (g == 0) {
        float s = 0.0f;
        for (int k = 0; k < groups; k++) s += partial[k * head_dim + d];
        oh[d] = s;
    }
}

// q, k and v from a fused projection whose rows are runs of 3·run values [q | k | v]
// (run = one head for BLOOM, the whole width for GPT-2): q[r, c] = fused[r, g·3·run + o]
// with g = c / run and o = c % run, k and v one and two runs further.
extern "C" __global__ void split_qkv(const float* __restrict__ fused, float* __restrict__ q,
                                     float* __restrict__ k, float* __restrict__ v, long rows, int width,
                                     int run) {
    long n = rows * width;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / width;
        int c = (int)(i % width);
        long src = r * 3 * (long)width + (long)(c / run) * 3 * run + c % run;
        q[i] = fused[src];
        k[i] = fused[src + run];
        v[i] = fused[src + 2 * run];
    }
}

// The last of every `seq` rows of `width` values: out[b, :] = x[b·seq + seq − 1, :].
extern "C" __global__ void last_rows(const float* __restrict__ x, float* __restrict__ out, int batch, int seq,
                                     int width) {
    long n = (long)batch * width;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long b = i / width;
        out[i] = x[(b * seq + seq - 1) * width + i % width];
    }
}
