// conv_sm90a.cu — the implicit-GEMM convolution of conv.cu on Hopper's warpgroup tensor-core
// instructions (wgmma), for sm_90a only (build.rs compiles *_sm90a.cu for that target alone; the
// CUDA backend loads it on compute capability 9.0 and checks it against conv2d_implicit_gemm
// before using it).
//
// conv2d_implicit_gemm_sm90 — same GEMM view, parameters, split-K and epilogue as
//   conv2d_implicit_gemm (conv.cu): out[m, n] = Σ_k A[m, k]·W[n, k], m = (b, oy, ox), n = output
//   channel, k = (r, s, c), A gathered from x (zero outside the image), C_in % 8 == 0.
//   Block tile 128 (m) × 128 (n) × 64 (k), 256 threads = 2 warpgroups; warpgroup j computes rows
//   64j..64j+63 × all 128 columns with 4 wgmma.m64n128k16 per k-tile (64 f32 accumulators per
//   thread). Loads: 16-byte cp.async chunks (8 channels of one tap), 4 of A and 4 of W per thread
//   per k-tile, zero-filling padding, the k tail and the m/n edges, into 4 shared-memory stages of
//   32 KiB (131 072 bytes, dynamic). Each operand tile is stored as wgmma's K-major "core
//   matrices" without swizzling: row r, chunk kc (8 halves) of a 128 × 64 tile lives at byte
//   (r/8)·1024 + kc·128 + (r%8)·16, so core matrices adjacent along K are 128 bytes apart (LBO)
//   and along M/N 1024 bytes apart (SBO). Per k-tile: wait for its cp.async group, proxy fence,
//   barrier, issue the loads of the tile 2 ahead (into the stage of tile kt − 2), 4 wgmma,
//   commit, and wait for the previous tile's group only, so the tensor cores always have the
//   next group queued while the stage they finished is refilled. Epilogue: as conv.cu, from wgmma's accumulator layout
//   (warp w of the warpgroup: d[4i + e] = D[16w + g + 8(e/2)][8i + 2t + e%2]).
#include "common.cuh"
#include "conv_common.cuh"
#include "wgmma.cuh"

using namespace sd21;

namespace {
constexpr int H_BM = 128, H_BN = 128, H_BK = 64;
constexpr int H_STAGES = 4;
constexpr int H_AHEAD = 2;  // tiles loaded ahead of the one multiplied
constexpr int H_THREADS = 256;
constexpr int H_TILE_BYTES = H_BM * H_BK * 2;        // 16 KiB per operand tile
constexpr int H_STAGE_BYTES = 2 * H_TILE_BYTES;      // A then W
constexpr int H_LBO = 128, H_SBO = (H_BK / 8) * 128;  // core-matrix strides along K and M/N
}  // namespace

// Byte offset of row r, 8-half chunk kc of a 128 × 64 operand tile (core-matrix layout).
__device__ __forceinline__ int h_tile_offset(int r, int kc) {
    return (r >> 3) * H_SBO + kc * H_LBO + (r & 7) * 16;
}

// Dynamic shared memory: H_STAGES · H_STAGE_BYTES = 131 072 bytes.
extern "C" __global__ void __launch_bounds__(H_THREADS)
    conv2d_implicit_gemm_sm90(const __half *__restrict__ x, const __half *__restrict__ w,
                              const __half *__restrict__ bias, const __half *__restrict__ residual,
                              __half *__restrict__ y, float *__restrict__ partial,
                              const ConvParams p) {
    extern __shared__ __align__(1024) uint8_t h_smem[];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wg = warp >> 2, wq = warp & 3;  // warpgroup, warp within it
    const long long M = (long long)p.batch * p.out_h * p.out_w;
    const int N = p.out_c;
    const int K = p.kernel_h * p.kernel_w * p.in_c;
    const long long m0 = (long long)blockIdx.x * H_BM;
    const int n0 = blockIdx.y * H_BN;

    // This thread's load slots: chunk column kc (the same for its 4 rows), rows tid/8 + 32i.
    const int kc = tid & 7;
    const ConvLoadRows<4> rows(p, w, M, N, K, m0, n0, tid >> 3, 32);
    auto load_stage = [&](int stage, int kt) {
        uint8_t *As = h_smem + stage * H_STAGE_BYTES;
        uint8_t *Bs = As + H_TILE_BYTES;
        const ConvTap tap = conv_tap(p, K, kt * H_BK + kc * 8);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int off = h_tile_offset((tid >> 3) + 32 * i, kc);
            rows.load(p, x, tap, i, As + off, Bs + off);
        }
    };

    // This block's k-tiles (of 64): all of them, or (split-K) its slice.
    const int kt_all = (K + H_BK - 1) / H_BK;
    const int kt0 = p.splits > 1 ? blockIdx.z * p.k_tiles_per_split : 0;
    const int KT = p.splits > 1 ? min(kt_all - kt0, p.k_tiles_per_split) : kt_all;

    // The first k-step overwrites the accumulators (scale-d 0); only a block without k-tiles
    // (uniform across it) zeroes them.
    float acc[64];
    if (KT <= 0) {
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    }
    // Loads run H_AHEAD tiles ahead and one wgmma group stays in flight, so a stage is refilled
    // only after the group that read it (H_AHEAD + 1 < H_STAGES iterations earlier) retired.
#pragma unroll
    for (int s = 0; s < H_AHEAD; ++s) {
        if (s < KT) load_stage(s, kt0 + s);
        cp_async_commit();
    }

    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<H_AHEAD - 1>();  // tile kt has landed (for this thread) ...
        fence_proxy_async();           // ... and is visible to the tensor cores ...
        __syncthreads();  // ... for every thread, which all retired the wgmma of tile kt − 2
        const int next = kt + H_AHEAD;
        if (next < KT) load_stage(next % H_STAGES, kt0 + next);  // the stage of tile kt − 2
        cp_async_commit();

        const uint8_t *As = h_smem + (kt % H_STAGES) * H_STAGE_BYTES + wg * 8 * H_SBO;
        const uint8_t *Bs = h_smem + (kt % H_STAGES) * H_STAGE_BYTES + H_TILE_BYTES;
        if (kt > 0) fence_operand(acc);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < H_BK / 16; ++ks)
            wgmma_m64n128k16(acc, wgmma_desc(As + ks * 2 * H_LBO, H_LBO, H_SBO),
                             wgmma_desc(Bs + ks * 2 * H_LBO, H_LBO, H_SBO), kt > 0 || ks > 0);
        wgmma_commit();
        wgmma_wait<1>();  // tile kt − 1's group retires; tile kt's stays in flight
        fence_operand(acc);
    }
    wgmma_wait<0>();
    fence_operand(acc);
    cp_async_wait<0>();

    // Epilogue: rows g and g + 8 of this warp's 16, columns 8i + 2t, 8i + 2t + 1; with split-K,
    // f32 partial sums of this split (bias and residual come in the reduce).
    const bool pairs = (N & 1) == 0;
    float *part = p.splits > 1 ? partial + (long long)blockIdx.z * M * N : nullptr;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const long long m = m0 + wg * 64 + wq * 16 + g + hh * 8;
        if (m >= M) continue;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int n = n0 + i * 8 + 2 * t;
            if (n >= N) continue;
            conv_store_pair(p, y, part, bias, residual, m, n, N, pairs, acc[4 * i + 2 * hh],
                            acc[4 * i + 2 * hh + 1]);
        }
    }
}
