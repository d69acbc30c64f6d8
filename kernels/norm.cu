// norm.cu — group norm over NHWC (optionally fused with SiLU) and layer norm.
//
// Group norm runs in three launches so that the whole GPU works on the statistics even when
// batch × groups is small (2 × 32 blocks would leave most of an H100 idle):
//   1. group_norm_stats_v{8,1}: grid (chunks, batch); a block reads `chunk_len` spatial rows of
//      one image, ALL channels (so every load is a coalesced row segment). Thread t owns a fixed
//      column of VW channels (VW = 8: one 16-byte vector; VW = 1 when C is not a multiple of 8)
//      and every R-th row of the chunk (R = blockDim / (C / VW) row lanes). It accumulates, per
//      channel, the sum and sum of squares of x − shift, where shift is the group's first value
//      x[b, 0, g·C/G] (this keeps E[x²] − E[x]² accurate when |mean| ≫ std), folds them into
//      per-channel shared-memory totals, and the block writes one (sum, sumsq) per group.
//   2. group_norm_finalize: one warp per (batch, group) adds the chunk partials in double and
//      writes (mean, 1/sqrt(var + eps)).
//   3. group_norm_apply: elementwise, 8 outputs per thread (16-byte vectors when C % 8 == 0):
//      y = (x − mean)·rstd·γ + β, then SiLU if asked.
// The input is read twice (the second read mostly from L2: an SD 2.1 activation is ≤ 42 MB).
//
// Layer norm: one warp per row, three passes over the row (mean, then the exact squared
// deviations, then the output); the later passes hit L1.
#include "common.cuh"

using namespace sd21;

template <int VW>
__device__ void group_norm_stats(const __half *__restrict__ x, float *__restrict__ partial,
                                 const GroupNormParams p) {
    extern __shared__ float totals[];  // [2·C]: per-channel sum, then per-channel sum of squares
    const int C = p.channels, VC = C / VW, cg = C / p.groups;
    const int b = blockIdx.y, chunk = blockIdx.x;
    const int row0 = chunk * p.chunk_len;
    const int row1 = min(row0 + p.chunk_len, p.spatial);
    const __half *xb = x + (long long)b * p.spatial * C;

    for (int i = threadIdx.x; i < 2 * C; i += blockDim.x) totals[i] = 0.0f;
    __syncthreads();

    const int lanes = max(1, (int)blockDim.x / VC);  // row lanes
    const int lane = threadIdx.x / VC;                 // 0 for every thread when VC > blockDim
    if (lane < lanes) {
        for (int vc = threadIdx.x % VC; vc < VC; vc += blockDim.x) {
            const int c0 = vc * VW;
            float shift[VW], s[VW], q[VW];
#pragma unroll
            for (int j = 0; j < VW; ++j) {
                shift[j] = __half2float(xb[((c0 + j) / cg) * cg]);
                s[j] = 0.0f;
                q[j] = 0.0f;
            }
            for (int row = row0 + lane; row < row1; row += lanes) {
                const __half *src = xb + (long long)row * C + c0;
                float v[VW];
                if constexpr (VW == 8) {
                    load8(src, v);
                } else {
                    v[0] = __half2float(src[0]);
                }
#pragma unroll
                for (int j = 0; j < VW; ++j) {
                    const float d = v[j] - shift[j];
                    s[j] += d;
                    q[j] = fmaf(d, d, q[j]);
                }
            }
#pragma unroll
            for (int j = 0; j < VW; ++j) {
                atomicAdd(&totals[c0 + j], s[j]);
                atomicAdd(&totals[C + c0 + j], q[j]);
            }
        }
    }
    __syncthreads();
    for (int g = threadIdx.x; g < p.groups; g += blockDim.x) {
        float s = 0.0f, q = 0.0f;
        for (int c = g * cg; c < (g + 1) * cg; ++c) {
            s += totals[c];
            q += totals[C + c];
        }
        float *out = partial + (((long long)b * p.groups + g) * p.chunks + chunk) * 2;
        out[0] = s;
        out[1] = q;
    }
}

// The statistics kernels run with up to 1024 threads (one per vector of a row, see norm.rs):
// declared, so the compiler never assumes the default 256 when it allocates registers.
#define GN_STATS_MAX_THREADS 1024

// Partial (sum, sumsq) of x − shift per (batch, group, chunk) → partial[B, G, chunks, 2].
// Needs C % 8 == 0. Dynamic shared memory: 2·C floats.
extern "C" __global__ void __launch_bounds__(GN_STATS_MAX_THREADS) group_norm_stats_v8(const __half *__restrict__ x,
                                               float *__restrict__ partial, GroupNormParams p) {
    group_norm_stats<8>(x, partial, p);
}

// Same for any C. Dynamic shared memory: 2·C floats.
extern "C" __global__ void __launch_bounds__(GN_STATS_MAX_THREADS) group_norm_stats_v1(const __half *__restrict__ x,
                                               float *__restrict__ partial, GroupNormParams p) {
    group_norm_stats<1>(x, partial, p);
}

// stats[B, G, 2] = (mean, rstd) from the partials. One warp per (batch, group).
extern "C" __global__ void group_norm_finalize(const __half *__restrict__ x,
                                               const float *__restrict__ partial,
                                               float *__restrict__ stats, GroupNormParams p) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= p.batch * p.groups) return;  // whole warps exit together
    const int b = warp / p.groups, g = warp % p.groups, cg = p.channels / p.groups;
    const float *src = partial + (long long)warp * p.chunks * 2;
    double s = 0.0, q = 0.0;
    for (int i = lane; i < p.chunks; i += 32) {
        s += src[2 * i];
        q += src[2 * i + 1];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
        q += __shfl_xor_sync(0xffffffffu, q, o);
    }
    if (lane == 0) {
        const double n = (double)p.spatial * cg;
        const double mean_d = s / n;
        const double var = fmax(q / n - mean_d * mean_d, 0.0);
        const float shift = __half2float(x[(long long)b * p.spatial * p.channels + g * cg]);
        stats[2 * warp] = shift + (float)mean_d;
        stats[2 * warp + 1] = (float)(1.0 / sqrt(var + (double)p.eps));
    }
}

// y = (x − mean)·rstd·γ + β (then SiLU when p.silu), 8 elements per thread.
extern "C" __global__ void group_norm_apply(const __half *__restrict__ x,
                                            const float *__restrict__ stats,
                                            const __half *__restrict__ gamma,
                                            const __half *__restrict__ beta,
                                            __half *__restrict__ y, GroupNormParams p) {
    const int C = p.channels, cg = C / p.groups;
    const long long image = (long long)p.spatial * C;
    const long long n = image * p.batch;
    const bool vec = C % 8 == 0;
    for (long long base = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8; base < n;
         base += (long long)gridDim.x * blockDim.x * 8) {
        if (vec) {
            const int c0 = (int)(base % C);
            const float *st = stats + (base / image) * p.groups * 2;
            float v[8], ga[8], be[8];
            load8(x + base, v);
            load8(gamma + c0, ga);
            load8(beta + c0, be);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int g = (c0 + j) / cg;
                float t = (v[j] - st[2 * g]) * st[2 * g + 1] * ga[j] + be[j];
                v[j] = p.silu ? silu(t) : t;
            }
            store8(y + base, v);
        } else {
            for (long long i = base; i < n && i < base + 8; ++i) {
                const int c = (int)(i % C), g = c / cg;
                const float *st = stats + (i / image) * p.groups * 2;
                float t = (__half2float(x[i]) - st[2 * g]) * st[2 * g + 1] * __half2float(gamma[c]) +
                          __half2float(beta[c]);
                y[i] = __float2half_rn(p.silu ? silu(t) : t);
            }
        }
    }
}

// Layer norm over rows of x [rows, C]: one warp per row, 8 rows per 256-thread block.
extern "C" __global__ void layer_norm_f16(const __half *__restrict__ x,
                                          const __half *__restrict__ gamma,
                                          const __half *__restrict__ beta,
                                          __half *__restrict__ y, LayerNormParams p) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= p.rows) return;  // whole warps exit together
    const int C = p.channels;
    const __half *xr = x + row * C;
    __half *yr = y + row * C;
    const bool vec = C % 8 == 0;

    float s = 0.0f;
    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float v[8];
            load8(xr + c, v);
#pragma unroll
            for (int j = 0; j < 8; ++j) s += v[j];
        }
    } else {
        for (int c = lane; c < C; c += 32) s += __half2float(xr[c]);
    }
    const float mean = warp_sum(s) / C;

    float q = 0.0f;
    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float v[8];
            load8(xr + c, v);
#pragma unroll
            for (int j = 0; j < 8; ++j) q = fmaf(v[j] - mean, v[j] - mean, q);
        }
    } else {
        for (int c = lane; c < C; c += 32) {
            const float d = __half2float(xr[c]) - mean;
            q = fmaf(d, d, q);
        }
    }
    const float rstd = rsqrtf(warp_sum(q) / C + p.eps);

    if (vec) {
        for (int c = lane * 8; c < C; c += 256) {
            float v[8], ga[8], be[8];
            load8(xr + c, v);
            load8(gamma + c, ga);
            load8(beta + c, be);
#pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = (v[j] - mean) * rstd * ga[j] + be[j];
            store8(yr + c, v);
        }
    } else {
        for (int c = lane; c < C; c += 32)
            yr[c] = __float2half_rn((__half2float(xr[c]) - mean) * rstd * __half2float(gamma[c]) +
                                    __half2float(beta[c]));
    }
}
