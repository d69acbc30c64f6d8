// attention_sm90a.cu — flash_attention_d64 (attention.cu) on Hopper's warpgroup tensor-core
// instructions (wgmma), for sm_90a only (built for that target alone; the CUDA backend loads it
// on compute capability 9.0 and uses it after a start-up check against flash_attention_d64).
//
// flash_attention_d64_sm90 — same layout, parameters and online softmax (f32, log2 units) as
//   flash_attention_d64: q [B, Nq, H·64], k and v [B, Nk, H·64], out like q, optional causal mask.
//   grid (⌈Nq/64⌉, B·H), block 128 threads = 1 warpgroup owning 64 queries (warp w: rows
//   16w..16w+15). Q (64×64) and double-buffered K, V tiles of 64 keys are staged by cp.async in
//   wgmma's no-swizzle core-matrix layouts (40 KiB of dynamic shared memory):
//   - Q and K K-major (head dim contiguous): row r, chunk c (8 dims) at (r/8)·1024 + c·128 +
//     (r%8)·16 bytes (LBO 128 along the head dim, SBO 1024 along rows);
//   - V MN-major for the P·V product (B = V is keys × dims with dims contiguous): key j, chunk c
//     at c·1024 + (j/8)·128 + (j%8)·16 (LBO 128 along keys, SBO 1024 along dims), read with
//     imm-trans-b.
//   Per key tile: S = Q·Kᵀ with 4 wgmma.m64n64k16 (A and B from shared memory), wait; scale,
//   mask and the online-softmax update on the accumulators (same fragment layout as mma.sync's
//   C: rows g and g + 8, columns 8i + 2t); rescale O; O += P·V with 4 wgmma.m64n64k16 whose A
//   (P, f16) comes straight from the S registers (the C layout of two n8 tiles is the A layout
//   of one k16 step), wait; barrier before the stage is refilled. Rows past Nq/Nk are
//   zero-filled and masked.
#include "common.cuh"
#include "attention_common.cuh"
#include "wgmma.cuh"

using namespace sd21;

namespace {
constexpr int HA_D = 64, HA_BQ = 64, HA_BK = 64;
constexpr int HA_THREADS = 128;
constexpr int HA_TILE_BYTES = 64 * 64 * 2;  // 8 KiB
// Dynamic shared memory: Q, two K and two V tiles = 40 960 bytes (no opt-in needed).
constexpr int HA_LBO = 128, HA_SBO = 1024;
}  // namespace

// Copies rows [row0, row0 + 64) × 64 halves of a [rows, H·64] head slice into `dst`: K-major
// core matrices (`mn_major` false: Q, K) or MN-major ones (true: V); rows ≥ `rows` zero-filled.
// 512 16-byte chunks, 4 per thread.
__device__ __forceinline__ void ha_load_tile(uint8_t *dst, const __half *src, long long row_stride,
                                             int row0, int rows, bool mn_major) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int c = threadIdx.x + i * HA_THREADS;
        const int r = c >> 3, chunk = c & 7;
        const bool valid = row0 + r < rows;
        const __half *s = src + (valid ? (long long)(row0 + r) * row_stride + chunk * 8 : 0);
        const int off = mn_major ? chunk * HA_SBO + (r >> 3) * HA_LBO + (r & 7) * 16
                                 : (r >> 3) * HA_SBO + chunk * HA_LBO + (r & 7) * 16;
        cp_async16(dst + off, s, valid);
    }
}

extern "C" __global__ void __launch_bounds__(HA_THREADS)
    flash_attention_d64_sm90(const __half *__restrict__ q, const __half *__restrict__ k,
                             const __half *__restrict__ v, __half *__restrict__ out,
                             const AttentionParams p) {
    extern __shared__ __align__(1024) uint8_t ha_smem[];  // HA_SMEM_BYTES, dynamic
    // Q, then K stages 0 and 1, then V stages 0 and 1 (addresses computed, never a run-time
    // indexed array of pointers, which would live in local memory).
    uint8_t *sq = ha_smem;
    auto sk = [&](int stage) { return ha_smem + (1 + stage) * HA_TILE_BYTES; };
    auto sv = [&](int stage) { return ha_smem + (3 + stage) * HA_TILE_BYTES; };

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    // This block's head slices, first query and key-tile count (attention_common.cuh).
    const FaBlock blk = fa_block(q, k, v, out, p);
    const long long row_stride = blk.row_stride;
    const __half *qb = blk.q, *kb = blk.k, *vb = blk.v;
    __half *ob = blk.out;
    const int q0 = blk.q0, tiles = blk.tiles;

    ha_load_tile(sq, qb, row_stride, q0, p.q_len, false);
    ha_load_tile(sk(0), kb, row_stride, 0, p.kv_len, false);
    ha_load_tile(sv(0), vb, row_stride, 0, p.kv_len, true);
    cp_async_commit();

    float o[32];  // 16 rows × 64 dims per warp: d[4i + e] = O[g + 8(e/2)][8i + 2t + e%2]
#pragma unroll
    for (int i = 0; i < 32; ++i) o[i] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY};  // running max of rows g and g + 8 (log2 units)
    float l[2] = {0.0f, 0.0f};            // running sum (this thread's columns only)

    for (int j = 0; j < tiles; ++j) {
        if (j + 1 < tiles) {
            ha_load_tile(sk((j + 1) & 1), kb, row_stride, (j + 1) * HA_BK, p.kv_len, false);
            ha_load_tile(sv((j + 1) & 1), vb, row_stride, (j + 1) * HA_BK, p.kv_len, true);
        }
        cp_async_commit();
        cp_async_wait<1>();   // everything but the tile just requested has landed ...
        fence_proxy_async();  // ... is visible to the tensor cores ...
        __syncthreads();      // ... for every thread

        // S = Q·Kᵀ: 64 × 64 for the warpgroup, 4 k16 steps over the head dim; the first step
        // overwrites S (scale-d 0), so nothing is zeroed next to the fence.
        float s[32];
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < HA_D / 16; ++ks)
            wgmma_m64n64k16_ss(s, wgmma_desc(sq + ks * 2 * HA_LBO, HA_LBO, HA_SBO),
                               wgmma_desc(sk(j & 1) + ks * 2 * HA_LBO, HA_LBO, HA_SBO), ks > 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_operand(s);  // no read of S moves above the wait

        // Scale into log2 units, mask, and update the online softmax (attention_common.cuh).
        auto S = [&](int nt, int e) -> float & { return s[4 * nt + e]; };
        auto O = [&](int dt, int e) -> float & { return o[4 * dt + e]; };
        fa_scale_mask(S, p, j * HA_BK, q0 + warp * 16, g, t);
        fa_online_softmax(S, O, m, l);

        // O += P·V: 4 k16 steps over the tile's keys, P (f16) from the S registers, all packed
        // before the first wgmma so the four issue back to back.
        uint32_t pa[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) pa[kk][r] = pack_half2(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
        // O *= alpha and the packing finish before the fence; O is read only after the wait.
        fence_operand(o);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) fence_operand(pa[kk]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)  // keys 16kk..: two core matrices along K per step
            wgmma_m64n64k16_rs_tb(o, pa[kk],
                                  wgmma_desc(sv(j & 1) + kk * 2 * HA_LBO, HA_LBO, HA_SBO));
        wgmma_commit();
        wgmma_wait<0>();
        fence_operand(o);
        __syncthreads();  // this stage is refilled at the top of the next iteration
    }
    cp_async_wait<0>();

    // Normalise and store rows g and g + 8.
    fa_store_rows([&](int dt, int e) -> float & { return o[4 * dt + e]; }, l, ob, row_stride,
                  p.q_len, q0 + warp * 16, g, t);
}
