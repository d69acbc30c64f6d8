// attention.cu — fused multi-head attention, softmax(Q·Kᵀ/√D)·V, never materialising the N×N
// score matrix: scores live in registers one key tile at a time, with the online (running max,
// running sum) softmax of FlashAttention-2, in f32. Layout: q [B, Nq, H·D], k and v [B, Nk, H·D],
// out like q; head h uses channels h·D .. (h+1)·D. Optional causal mask (key j > query i).
//
// flash_attention_d64 — head dim 64 on tensor cores (SD 2.1's UNet and CLIP).
//   grid (⌈Nq/64⌉, B·H), block 128 threads = 4 warps; warp w owns query rows 16w..16w+15 of the
//   block's 64. Q (64×64), and K, V tiles of 64 keys, are staged in shared memory by cp.async
//   (rows padded to 72 halves so ldmatrix is conflict-free; K/V double-buffered, the next tile
//   loading while this one is used; rows past Nq/Nk are zero-filled). Per key tile a warp does
//   S = Q·Kᵀ (16×64, 32 mma.sync m16n8k16, f32 accumulators), scales, masks, updates the running
//   max and sum, rescales its O accumulators (16×64 f32), turns S into f16 A-fragments directly
//   from the accumulator registers (the C layout of two n8 tiles is the A layout of one k16
//   step) and does O += P·V (32 more mma.sync, V through ldmatrix.trans). The end divides by the
//   row sum and writes f16. Any Nq, Nk ≥ 1 (77-key cross-attention: one full tile + one of 13).
//
// attention_generic_{1,2,4,8,16} — any head dim D ≤ 32·DPL (the tiny test model's 8, the VAE's
//   single head of 512, …), on CUDA cores. grid (⌈Nq/16⌉, B·H), block 4 warps; warp w owns 4
//   queries. Per tile of 32 keys (K, V and the block's 16 queries in shared memory as f16): lane
//   l computes the scores of key l against the warp's 4 queries (K rows padded to an odd length
//   so the 32 lanes hit different banks), the warp updates the online softmax, then for each key
//   the 4 probabilities are broadcast by shuffle and lane l accumulates output channels
//   l, l+32, … (DPL of them) in f32 registers.
#include "common.cuh"
#include "attention_common.cuh"

using namespace sd21;

namespace {
constexpr int FA_D = 64;             // head dim
constexpr int FA_BQ = 64;            // queries per block
constexpr int FA_BK = 64;            // keys per tile
constexpr int FA_STRIDE = FA_D + 8;  // halves per shared-memory row (16 bytes of padding)
constexpr int FA_THREADS = 128;
}  // namespace

// Copies rows [row0, row0 + 64) × 64 halves of a [rows, H·64] head slice into `dst` (row stride
// FA_STRIDE), zero-filling rows ≥ `rows`. 512 16-byte chunks, 4 per thread.
__device__ __forceinline__ void fa_load_tile(__half *dst, const __half *src, long long row_stride,
                                             int row0, int rows) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int c = threadIdx.x + i * FA_THREADS;
        const int r = c >> 3, col = (c & 7) * 8;
        const bool valid = row0 + r < rows;
        const __half *s = src + (valid ? (long long)(row0 + r) * row_stride + col : 0);
        cp_async16(dst + r * FA_STRIDE + col, s, valid);
    }
}

extern "C" __global__ void __launch_bounds__(FA_THREADS, 4)  // ≤ 128 registers: 4 blocks per SM
    flash_attention_d64(const __half *__restrict__ q, const __half *__restrict__ k,
                        const __half *__restrict__ v, __half *__restrict__ out,
                        const AttentionParams p) {
    __shared__ __align__(16) __half sq[FA_BQ * FA_STRIDE];
    __shared__ __align__(16) __half sk[2][FA_BK * FA_STRIDE];
    __shared__ __align__(16) __half sv[2][FA_BK * FA_STRIDE];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;  // mma fragment row group and column pair
    // This block's head slices, first query and key-tile count (attention_common.cuh).
    const FaBlock blk = fa_block(q, k, v, out, p);
    const long long row_stride = blk.row_stride;
    const __half *qb = blk.q, *kb = blk.k, *vb = blk.v;
    __half *ob = blk.out;
    const int q0 = blk.q0, tiles = blk.tiles;

    fa_load_tile(sq, qb, row_stride, q0, p.q_len);
    fa_load_tile(sk[0], kb, row_stride, 0, p.kv_len);
    fa_load_tile(sv[0], vb, row_stride, 0, p.kv_len);
    cp_async_commit();

    uint32_t qf[4][4];  // this warp's 16 query rows as A fragments, 4 k16 steps over D
    float o[8][4];      // 16 rows × 64 dims of output: 8 n8 tiles
    float m[2] = {-INFINITY, -INFINITY};  // running max of rows g and g+8 (log2 units)
    float l[2] = {0.0f, 0.0f};            // running sum (this thread's columns only)
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[i][e] = 0.0f;

    for (int j = 0; j < tiles; ++j) {
        if (j + 1 < tiles) {
            fa_load_tile(sk[(j + 1) & 1], kb, row_stride, (j + 1) * FA_BK, p.kv_len);
            fa_load_tile(sv[(j + 1) & 1], vb, row_stride, (j + 1) * FA_BK, p.kv_len);
        }
        cp_async_commit();
        cp_async_wait<1>();  // everything but the tile just requested has landed
        __syncthreads();

        if (j == 0) {
#pragma unroll
            for (int ks = 0; ks < 4; ++ks)
                ldmatrix_x4(qf[ks], sq + (warp * 16 + (lane & 15)) * FA_STRIDE + ks * 16 +
                                        (lane >> 4) * 8);
        }
        const __half *kt = sk[j & 1];
        const __half *vt = sv[j & 1];

        // S = Q·Kᵀ: 16 × 64 per warp.
        float s[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[i][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                uint32_t r[4];
                ldmatrix_x4(r, kt + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * FA_STRIDE +
                                   ks * 16 + ((lane >> 3) & 1) * 8);
                mma_16816(s[2 * np], qf[ks], r[0], r[1]);
                mma_16816(s[2 * np + 1], qf[ks], r[2], r[3]);
            }
        }

        // Scale into log2 units, mask, and update the online softmax (attention_common.cuh).
        auto S = [&](int nt, int e) -> float & { return s[nt][e]; };
        auto O = [&](int dt, int e) -> float & { return o[dt][e]; };
        fa_scale_mask(S, p, j * FA_BK, q0 + warp * 16, g, t);
        fa_online_softmax(S, O, m, l);

        // O += P·V, P straight from the S registers.
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const uint32_t a[4] = {
                pack_half2(s[2 * kk][0], s[2 * kk][1]),
                pack_half2(s[2 * kk][2], s[2 * kk][3]),
                pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
#pragma unroll
            for (int dp = 0; dp < 4; ++dp) {
                uint32_t r[4];
                ldmatrix_x4_trans(r, vt + (kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3)) *
                                              FA_STRIDE +
                                         dp * 16 + (lane >> 4) * 8);
                mma_16816(o[2 * dp], a, r[0], r[1]);
                mma_16816(o[2 * dp + 1], a, r[2], r[3]);
            }
        }
        __syncthreads();  // this stage is refilled two iterations from now
    }
    cp_async_wait<0>();

    // Normalise and store rows g and g + 8.
    fa_store_rows([&](int dt, int e) -> float & { return o[dt][e]; }, l, ob, row_stride, p.q_len,
                  q0 + warp * 16, g, t);
}

// ---------------------------------------------------------------- generic head dim

namespace {
constexpr int GA_WARPS = 4;
constexpr int GA_QW = 4;                    // queries per warp
constexpr int GA_BQ = GA_WARPS * GA_QW;     // queries per block
constexpr int GA_BK = 32;                   // keys per tile (one per lane)
}  // namespace

// Dynamic shared memory: (GA_BQ·D + GA_BK·(D|1) + GA_BK·D) halves.
template <int DPL>
__device__ __forceinline__ void attention_generic(const __half *__restrict__ q,
                                                  const __half *__restrict__ k,
                                                  const __half *__restrict__ v,
                                                  __half *__restrict__ out,
                                                  const AttentionParams &p) {
    extern __shared__ __align__(16) __half ga_smem[];
    const int D = p.head_dim, KS = D | 1;
    __half *sq = ga_smem;             // [GA_BQ][D]
    __half *sk = sq + GA_BQ * D;      // [GA_BK][KS]
    __half *sv = sk + GA_BK * KS;     // [GA_BK][D]

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int q0 = blockIdx.x * GA_BQ;
    const int b = blockIdx.y / p.heads, h = blockIdx.y % p.heads;
    const long long row_stride = (long long)p.heads * D;
    const __half *qb = q + (long long)b * p.q_len * row_stride + (long long)h * D;
    const __half *kb = k + (long long)b * p.kv_len * row_stride + (long long)h * D;
    const __half *vb = v + (long long)b * p.kv_len * row_stride + (long long)h * D;
    __half *ob = out + (long long)b * p.q_len * row_stride + (long long)h * D;

    for (int i = threadIdx.x; i < GA_BQ * D; i += blockDim.x) {
        const int r = i / D, d = i % D, qi = q0 + r;
        sq[i] = qi < p.q_len ? qb[(long long)qi * row_stride + d] : __float2half(0.0f);
    }

    float o[GA_QW][DPL];
    float m[GA_QW], l[GA_QW];
#pragma unroll
    for (int w = 0; w < GA_QW; ++w) {
        m[w] = -INFINITY;
        l[w] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) o[w][i] = 0.0f;
    }

    int kv_end = p.kv_len;
    if (p.causal) kv_end = min(kv_end, min(q0 + GA_BQ, p.q_len));
    const __half *myq = sq + warp * GA_QW * D;

    for (int kv0 = 0; kv0 < kv_end; kv0 += GA_BK) {
        __syncthreads();  // the previous tile is consumed (and, first time, Q is stored)
        for (int i = threadIdx.x; i < GA_BK * D; i += blockDim.x) {
            const int r = i / D, d = i % D, key = kv0 + r;
            const bool valid = key < p.kv_len;
            const long long off = (long long)key * row_stride + d;
            sk[r * KS + d] = valid ? kb[off] : __float2half(0.0f);
            sv[r * D + d] = valid ? vb[off] : __float2half(0.0f);
        }
        __syncthreads();

        // Scores of key kv0 + lane against the warp's queries.
        float s[GA_QW];
#pragma unroll
        for (int w = 0; w < GA_QW; ++w) s[w] = 0.0f;
        const __half *krow = sk + lane * KS;
        for (int d = 0; d < D; ++d) {
            const float kd = __half2float(krow[d]);
#pragma unroll
            for (int w = 0; w < GA_QW; ++w) s[w] = fmaf(__half2float(myq[w * D + d]), kd, s[w]);
        }
        const int key = kv0 + lane;
#pragma unroll
        for (int w = 0; w < GA_QW; ++w) {
            const int qi = q0 + warp * GA_QW + w;
            const bool masked = key >= p.kv_len || (p.causal && key > qi);
            const float val = masked ? -INFINITY : s[w] * p.scale_log2;
            const float m_new = fmaxf(m[w], warp_max(val));
            const float m_use = m_new == -INFINITY ? 0.0f : m_new;
            const float alpha = exp2f(m[w] - m_use);
            m[w] = m_new;
            s[w] = exp2f(val - m_use);  // this lane's probability (unnormalised)
            l[w] = l[w] * alpha + s[w];
#pragma unroll
            for (int i = 0; i < DPL; ++i) o[w][i] *= alpha;
        }

        // O += P·V: key by key, probabilities broadcast from the lane that owns the key.
        const int nk = min(GA_BK, kv_end - kv0);
        for (int jk = 0; jk < nk; ++jk) {
            float pj[GA_QW];
#pragma unroll
            for (int w = 0; w < GA_QW; ++w) pj[w] = __shfl_sync(0xffffffffu, s[w], jk);
            const __half *vrow = sv + jk * D;
#pragma unroll
            for (int i = 0; i < DPL; ++i) {
                const int d = lane + 32 * i;
                if (d < D) {
                    const float vd = __half2float(vrow[d]);
#pragma unroll
                    for (int w = 0; w < GA_QW; ++w) o[w][i] = fmaf(pj[w], vd, o[w][i]);
                }
            }
        }
    }

#pragma unroll
    for (int w = 0; w < GA_QW; ++w) {
        const float sum = warp_sum(l[w]);
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        const int qi = q0 + warp * GA_QW + w;
        if (qi < p.q_len) {
#pragma unroll
            for (int i = 0; i < DPL; ++i) {
                const int d = lane + 32 * i;
                if (d < D) ob[(long long)qi * row_stride + d] = __float2half_rn(o[w][i] * inv);
            }
        }
    }
}

#define SD21_GENERIC_ATTENTION(DPL)                                                            \
    extern "C" __global__ void __launch_bounds__(GA_WARPS * 32) attention_generic_##DPL(       \
        const __half *__restrict__ q, const __half *__restrict__ k, const __half *__restrict__ v, \
        __half *__restrict__ out, const AttentionParams p) {                                   \
        attention_generic<DPL>(q, k, v, out, p);                                               \
    }

SD21_GENERIC_ATTENTION(1)
SD21_GENERIC_ATTENTION(2)
SD21_GENERIC_ATTENTION(4)
SD21_GENERIC_ATTENTION(8)
SD21_GENERIC_ATTENTION(16)
