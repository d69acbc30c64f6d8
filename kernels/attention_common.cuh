// attention_common.cuh — what the two head-dim-64 flash kernels (attention.cu's mma.sync one and
// attention_sm90a.cu's wgmma one) share: the per-tile scale, mask and online-softmax update, and
// the final normalise-and-store. Both hold, per warp, a 16-query × 64-key score tile S and a
// 16 × 64 output O in the mma accumulator layout (g = lane/4, t = lane%4): element e of n8 tile
// i is row g + 8(e/2), column 8i + 2t + e%2. The kernels store those arrays differently, so the
// helpers take accessors: `S(i, e)` and `O(i, e)` return a reference to that element.
#pragma once

#include "common.cuh"

namespace sd21 {

// What one flash block (grid (⌈Nq/64⌉, B·H), 64 queries, head dim 64) works on: its head's
// slices of q, k, v and out (row stride H·64 halves), its first query, and how many 64-key tiles
// it needs (all keys, or with `causal` only up to its last query).
struct FaBlock {
    long long row_stride;
    const __half *q, *k, *v;
    __half *out;
    int q0, tiles;
};

SD21_DEV FaBlock fa_block(const __half *q, const __half *k, const __half *v, __half *out,
                          const AttentionParams &p) {
    const int b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
    const long long row_stride = (long long)p.heads * 64;
    const int q0 = blockIdx.x * 64;
    int kv_end = p.kv_len;
    if (p.causal) kv_end = min(kv_end, min(q0 + 64, p.q_len));
    return {row_stride,
            q + (long long)b * p.q_len * row_stride + h * 64,
            k + (long long)b * p.kv_len * row_stride + h * 64,
            v + (long long)b * p.kv_len * row_stride + h * 64,
            out + (long long)b * p.q_len * row_stride + h * 64,
            q0,
            (kv_end + 63) / 64};
}

// Scores of keys kv0.. into log2 units (× scale_log2); keys ≥ kv_len, and with `causal` keys
// after the query (query row of element e: q_row0 + g + 8(e/2)), become −∞.
template <typename SAt>
SD21_DEV void fa_scale_mask(SAt S, const AttentionParams &p, int kv0, int q_row0, int g, int t) {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = kv0 + nt * 8 + 2 * t + (e & 1);
            const int qi = q_row0 + g + (e >> 1) * 8;
            const bool masked = key >= p.kv_len || (p.causal && key > qi);
            S(nt, e) = masked ? -INFINITY : S(nt, e) * p.scale_log2;
        }
}

// Online softmax (FlashAttention-2) over one tile for rows g (r = 0) and g + 8 (r = 1), each
// spread over the 4 lanes of its quad: new running max m, S ← exp2(S − m), running sum l (this
// thread's columns only) and O rescaled by exp2(m_old − m).
template <typename SAt, typename OAt>
SD21_DEV void fa_online_softmax(SAt S, OAt O, float (&m)[2], float (&l)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(S(nt, 2 * r), S(nt, 2 * r + 1)));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[r], mx);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a fully masked row so far
        const float alpha = exp2f(m[r] - m_use);
        m[r] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            S(nt, 2 * r) = exp2f(S(nt, 2 * r) - m_use);
            S(nt, 2 * r + 1) = exp2f(S(nt, 2 * r + 1) - m_use);
            sum += S(nt, 2 * r) + S(nt, 2 * r + 1);
        }
        l[r] = l[r] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < 8; ++dt) {
            O(dt, 2 * r) *= alpha;
            O(dt, 2 * r + 1) *= alpha;
        }
    }
}

// O / (row sum), rows g and g + 8 (query q_row0 + g + 8r, stored only when < q_len) into `ob`
// (row stride `row_stride` halves), columns 8i + 2t, 8i + 2t + 1 as half2.
template <typename OAt>
SD21_DEV void fa_store_rows(OAt O, const float (&l)[2], __half *ob, long long row_stride,
                            int q_len, int q_row0, int g, int t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = l[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        const int qi = q_row0 + g + r * 8;
        if (qi < q_len) {
            __half *dst = ob + (long long)qi * row_stride + 2 * t;
#pragma unroll
            for (int dt = 0; dt < 8; ++dt)
                *reinterpret_cast<__half2 *>(dst + dt * 8) =
                    __floats2half2_rn(O(dt, 2 * r) * inv, O(dt, 2 * r + 1) * inv);
        }
    }
}

}  // namespace sd21
