// kernels.cu: the custom kernels of tp-decode's CUDA implementation (src/cuda.rs): the weight
// generator, RMSNorm, RoPE with the KV-cache append, attention over the cache, SwiGLU and the
// residual add. bf16 in memory, f32 arithmetic. Compiled at run time by NVRTC; CPU twin in
// src/cpu.rs (and src/weights.rs for tp_fill). Every activation is [batch, cols] row-major.

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef unsigned long long u64;

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float ld(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ bf16 to_bf16(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------------------------------------
// Reductions over a block of whole warps; every thread gets the result.

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // an earlier call may still be reading `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    return warp_sum(lane < warps ? partial[lane] : 0.0f);
}

__device__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    return warp_max(lane < warps ? partial[lane] : NEG_INF);
}

// ---------------------------------------------------------------------------------------------
// Weights: a rows x cols block of a full tensor (full_cols columns) from (row0, col0), written
// contiguously to dst. Element i of the full tensor is bf16(offset + scale * k), k the top 8
// bits of splitmix64(key ^ i) as a signed integer (src/weights.rs: value).

__device__ __forceinline__ u64 splitmix64(u64 x) {
    u64 z = x + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

extern "C" __global__ void tp_fill(bf16* dst, u64 key, u64 full_cols, u64 row0, u64 col0,
                                   u64 rows, u64 cols, float offset, float scale) {
    const u64 n = rows * cols;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        const u64 index = (row0 + i / cols) * full_cols + col0 + i % cols;
        const float k = (float)(signed char)(splitmix64(key ^ index) >> 56);
        // No contraction: the CPU rounds the product and the sum separately.
        dst[i] = to_bf16(__fadd_rn(offset, __fmul_rn(scale, k)));
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm, one block per row: y = x * rsqrt(mean(x^2) + eps) * w.

extern "C" __global__ void tp_rmsnorm(const bf16* x, const bf16* w, bf16* y, int cols, float eps) {
    const bf16* xr = x + (u64)blockIdx.x * cols;
    bf16* yr = y + (u64)blockIdx.x * cols;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const float v = ld(xr + j);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss) / cols + eps);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) yr[j] = to_bf16(ld(xr + j) * r * ld(w + j));
}

// ---------------------------------------------------------------------------------------------
// RoPE at position `pos` (rotate-half pairs (i, i + d/2), angle pos * theta^(-2i/d)) on the q
// heads of a qkv row, in place, and on its k heads, written to the cache at `pos`; the v heads
// copied to the cache at `pos`. One block per batch row. qkv row: [q heads | k heads | v heads];
// cache: [batch, kv_heads, slots, head_dim].

extern "C" __global__ void tp_rope_append(bf16* qkv, bf16* kcache, bf16* vcache, int q_heads,
                                          int kv_heads, int head_dim, int slots, int pos,
                                          float log2_theta) {
    const int b = blockIdx.x, half = head_dim / 2;
    bf16* row = qkv + (u64)b * (q_heads + 2 * kv_heads) * head_dim;
    for (int p = threadIdx.x; p < (q_heads + kv_heads) * half; p += blockDim.x) {
        const int head = p / half, i = p % half;
        const float inv_freq = exp2f(-(2.0f * i / head_dim) * log2_theta);
        float s, c;
        sincosf(pos * inv_freq, &s, &c);
        const bf16* src = row + head * head_dim;
        const float x0 = ld(src + i), x1 = ld(src + i + half);
        bf16* dst = head < q_heads
                        ? row + head * head_dim
                        : kcache + (((u64)b * kv_heads + (head - q_heads)) * slots + pos) * head_dim;
        dst[i] = to_bf16(x0 * c - x1 * s);
        dst[i + half] = to_bf16(x1 * c + x0 * s);
    }
    const bf16* v = row + (q_heads + kv_heads) * head_dim;
    for (int e = threadIdx.x; e < kv_heads * head_dim; e += blockDim.x) {
        const int g = e / head_dim, d = e % head_dim;
        vcache[(((u64)b * kv_heads + g) * slots + pos) * head_dim + d] = v[e];
    }
}

// ---------------------------------------------------------------------------------------------
// Attention of one query token over `slots` cached tokens, one block per (query head, batch
// row), grouped-query (query head h reads KV head h / (q_heads / kv_heads)). Blocks of whole
// warps; head_dim a power of two from 8 to 256 (Dims::validate), so that a token's row is
// head_dim / 8 lanes of 16-byte loads and a warp takes 32 / (head_dim / 8) tokens at a time:
// every load of a step is issued before any result is needed, and the loops over tokens are
// short (the block's warps split them). Dynamic shared memory: slots floats (the scores), then
// warps x head_dim floats (each warp's share of the output).

// Eight bf16 at p (16-byte aligned) as floats.
__device__ __forceinline__ void load8(const bf16* p, float* f) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 v = __bfloat1622float2(h[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

extern "C" __global__ void tp_attention(const bf16* qkv, const bf16* kcache, const bf16* vcache,
                                        bf16* out, int q_heads, int kv_heads, int head_dim,
                                        int slots, float scale) {
    extern __shared__ float smem[];
    float* p = smem;
    float* share = smem + slots;
    const int h = blockIdx.x, b = blockIdx.y, g = h / (q_heads / kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    // A token is `width` lanes, lane `part` of it holding dimensions 8 part .. 8 part + 7; a
    // warp holds `per_warp` tokens, this lane's being number `slot_in_warp`.
    const int width = head_dim / 8, per_warp = 32 / width;
    const int part = lane % width, slot_in_warp = lane / width, step = warps * per_warp;
    const bf16* qh = qkv + ((u64)b * (q_heads + 2 * kv_heads) + h) * head_dim;
    const u64 base = ((u64)b * kv_heads + g) * slots * head_dim + part * 8;
    const bf16* k = kcache + base;
    const bf16* v = vcache + base;

    float q[8];
    load8(qh + part * 8, q);
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] *= scale;
    // Scores: each token's dot product summed over its `width` lanes (the loop bound is the
    // warp's, so every lane takes part in the shuffles).
#pragma unroll 4
    for (int t0 = warp * per_warp; t0 < slots; t0 += step) {
        const int t = t0 + slot_in_warp;
        float s = 0.0f;
        if (t < slots) {
            float kk[8];
            load8(k + (u64)t * head_dim, kk);
#pragma unroll
            for (int i = 0; i < 8; ++i) s += q[i] * kk[i];
        }
        for (int o = width / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (t < slots && part == 0) p[t] = s;
    }
    __syncthreads();
    // Softmax (block_max and block_sum synchronise, so every p[t] is visible after them).
    float m = NEG_INF;
    for (int t = threadIdx.x; t < slots; t += blockDim.x) m = fmaxf(m, p[t]);
    m = block_max(m);
    float sum = 0.0f;
    for (int t = threadIdx.x; t < slots; t += blockDim.x) {
        const float e = expf(p[t] - m);
        p[t] = e;
        sum += e;
    }
    const float inv = 1.0f / block_sum(sum);
    // Output: each lane sums its 8 dimensions over its tokens, then over the warp's tokens
    // (lanes of the same part), then thread d over the warps.
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 4
    for (int t = warp * per_warp + slot_in_warp; t < slots; t += step) {
        float vv[8];
        load8(v + (u64)t * head_dim, vv);
        const float w = p[t];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += w * vv[i];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        for (int o = width; o < 32; o <<= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
    }
    if (slot_in_warp == 0) {
#pragma unroll
        for (int i = 0; i < 8; ++i) share[warp * head_dim + part * 8 + i] = acc[i];
    }
    __syncthreads();
    bf16* o = out + ((u64)b * q_heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float total = 0.0f;
        for (int w = 0; w < warps; ++w) total += share[w * head_dim + d];
        o[d] = to_bf16(total * inv);
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: out[b, j] = silu(gate[b, j]) * up[b, j], gate_up row: [gate (inter) | up (inter)].

extern "C" __global__ void tp_swiglu(const bf16* gate_up, bf16* out, int n, int inter) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const int b = i / inter, j = i % inter;
        const float g = ld(gate_up + (u64)b * 2 * inter + j);
        const float u = ld(gate_up + (u64)b * 2 * inter + inter + j);
        out[i] = to_bf16(g / (1.0f + expf(-g)) * u);
    }
}

// ---------------------------------------------------------------------------------------------
// Residual add: h += r.

extern "C" __global__ void tp_add(bf16* h, const bf16* r, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        h[i] = to_bf16(ld(h + i) + ld(r + i));
}
