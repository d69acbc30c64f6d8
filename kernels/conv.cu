// conv.cu — 2-D convolution, NHWC input, OHWI weights, bias and residual-add epilogue.
//
// conv2d_implicit_gemm — the fast path, for C_in % 8 == 0 (every SD 2.1 conv except conv_in,
//   whose 4 latent channels go to the fallback). The convolution is the GEMM
//     out[m, n] = Σ_k A[m, k] · W[n, k],   m = (b, oy, ox), n = out channel,
//     k = (r, s, c) = (r·kW + s)·C_in + c  (exactly the OHWI weight row, contiguous in k),
//     A[m, k] = x[b, oy·stride − pad + r, ox·stride − pad + s, c]  (0 outside the image),
//   and A is never built: each k-tile of A is gathered straight from x. Any kernel size, stride
//   and padding work (3×3 s1/s2 p1 and 1×1 are the ones SD uses).
//   Block tile 128 (m) × 128 (n) × 32 (k), 256 threads = 8 warps in a 4 (m) × 2 (n) grid, each
//   warp computing 32 × 64 with mma.sync m16n8k16 (f16 in, f32 accumulators: 2 × 8 tiles).
//   Loads: each thread moves two 16-byte chunks (8 channels of one tap of one pixel — C_in % 8
//   == 0 keeps a chunk inside one tap) of A and two of W per k-tile with cp.async, zero-filling
//   padding, the k tail and the m/n edges; 3 shared-memory stages (61 440 bytes, dynamic) keep two
//   tiles in flight while one is multiplied. Rows are padded to 40 halves: ldmatrix reads 8 rows
//   of 16 bytes at an 80-byte stride, which touches all 32 banks once.
//   Epilogue from registers: + bias[n] + residual[m, n], rounded to f16, half2 stores when C_out
//   is even.
//   Split-K (p.splits > 1, for the low-resolution layers, whose M × N tiles are too few to fill
//   the chip: 8×8×1280 at batch 2 is 10 blocks): blockIdx.z takes k-tiles
//   [z·k_tiles_per_split, (z+1)·k_tiles_per_split) and writes its f32 sums to
//   partial[z, m, n]; conv2d_splitk_reduce then adds the splits in order (deterministic), the
//   bias and the residual, and writes f16.
//
// conv2d_direct — the simple fallback for any shape: one thread per output element (consecutive
//   threads = consecutive output channels), a plain loop over the kernel window in f32.
#include "common.cuh"
#include "conv_common.cuh"

using namespace sd21;

namespace {
constexpr int CV_BM = 128, CV_BN = 128, CV_BK = 32;
constexpr int CV_STAGES = 3;
constexpr int CV_THREADS = 256;
constexpr int CV_STRIDE = CV_BK + 8;  // halves per shared-memory row
constexpr int CV_STAGE_HALVES = (CV_BM + CV_BN) * CV_STRIDE;
}  // namespace

// Dynamic shared memory: CV_STAGES · CV_STAGE_HALVES · 2 = 61 440 bytes.
extern "C" __global__ void __launch_bounds__(CV_THREADS)
    conv2d_implicit_gemm(const __half *__restrict__ x, const __half *__restrict__ w,
                         const __half *__restrict__ bias, const __half *__restrict__ residual,
                         __half *__restrict__ y, float *__restrict__ partial, const ConvParams p) {
    extern __shared__ __align__(16) __half cv_smem[];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int warp_m = warp >> 1, warp_n = warp & 1;
    const long long M = (long long)p.batch * p.out_h * p.out_w;
    const int N = p.out_c;
    const int K = p.kernel_h * p.kernel_w * p.in_c;
    const long long m0 = (long long)blockIdx.x * CV_BM;
    const int n0 = blockIdx.y * CV_BN;

    // This thread's load slots: chunk column kc, rows (tid >> 2) and (tid >> 2) + 64 of each tile.
    const int kc = tid & 3;
    const ConvLoadRows<2> rows(p, w, M, N, K, m0, n0, tid >> 2, 64);
    auto load_stage = [&](int stage, int kt) {
        __half *As = cv_smem + stage * CV_STAGE_HALVES;
        __half *Bs = As + CV_BM * CV_STRIDE;
        const ConvTap tap = conv_tap(p, K, kt * CV_BK + kc * 8);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int row = (tid >> 2) + 64 * i;
            rows.load(p, x, tap, i, As + row * CV_STRIDE + kc * 8, Bs + row * CV_STRIDE + kc * 8);
        }
    };

    float acc[2][8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;

    // This block's k-tiles: all of them, or (split-K) its slice.
    const int kt_all = (K + CV_BK - 1) / CV_BK;
    const int kt0 = p.splits > 1 ? blockIdx.z * p.k_tiles_per_split : 0;
    const int KT = p.splits > 1 ? min(kt_all - kt0, p.k_tiles_per_split) : kt_all;
#pragma unroll
    for (int s = 0; s < CV_STAGES - 1; ++s) {
        if (s < KT) load_stage(s, kt0 + s);
        cp_async_commit();
    }

    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<CV_STAGES - 2>();  // tile kt has landed (for this thread)
        __syncthreads();                 // ... for every thread; tile kt − 1 is consumed
        const int next = kt + CV_STAGES - 1;
        if (next < KT) load_stage(next % CV_STAGES, kt0 + next);
        cp_async_commit();

        const __half *As = cv_smem + (kt % CV_STAGES) * CV_STAGE_HALVES;
        const __half *Bs = As + CV_BM * CV_STRIDE;
#pragma unroll
        for (int ks = 0; ks < CV_BK / 16; ++ks) {
            uint32_t af[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
                ldmatrix_x4(af[mi], As + (warp_m * 32 + mi * 16 + (lane & 15)) * CV_STRIDE +
                                        ks * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                uint32_t r[4];
                ldmatrix_x4(r, Bs + (warp_n * 64 + np * 16 + (lane & 7) + ((lane >> 4) << 3)) *
                                        CV_STRIDE +
                                   ks * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) {
                    mma_16816(acc[mi][2 * np], af[mi], r[0], r[1]);
                    mma_16816(acc[mi][2 * np + 1], af[mi], r[2], r[3]);
                }
            }
        }
    }
    cp_async_wait<0>();

    // Epilogue: rows g and g + 8 of each m16 tile, columns 2t, 2t + 1 of each n8 tile; with
    // split-K, f32 partial sums of this split (bias and residual come in the reduce).
    const bool pairs = (N & 1) == 0;
    float *part = p.splits > 1 ? partial + (long long)blockIdx.z * M * N : nullptr;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const long long m = m0 + warp_m * 32 + mi * 16 + g + hh * 8;
            if (m >= M) continue;
#pragma unroll
            for (int ni = 0; ni < 8; ++ni) {
                const int n = n0 + warp_n * 64 + ni * 8 + 2 * t;
                if (n >= N) continue;
                conv_store_pair(p, y, part, bias, residual, m, n, N, pairs,
                                acc[mi][ni][2 * hh], acc[mi][ni][2 * hh + 1]);
            }
        }
}

// Split-K: y[i] = Σ_z partial[z, i] (z in order) + bias + residual, one thread per element,
// grid-stride over M·N.
extern "C" __global__ void conv2d_splitk_reduce(const float *__restrict__ partial,
                                                const __half *__restrict__ bias,
                                                const __half *__restrict__ residual,
                                                __half *__restrict__ y, const ConvParams p) {
    const long long total = (long long)p.batch * p.out_h * p.out_w * p.out_c;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int z = 0; z < p.splits; ++z) acc += partial[z * total + i];
        if (p.has_bias) acc += __half2float(bias[i % p.out_c]);
        if (p.has_residual) acc += __half2float(residual[i]);
        y[i] = __float2half_rn(acc);
    }
}

// Fallback: one thread per output element, grid-stride.
extern "C" __global__ void conv2d_direct(const __half *__restrict__ x, const __half *__restrict__ w,
                                         const __half *__restrict__ bias,
                                         const __half *__restrict__ residual,
                                         __half *__restrict__ y, const ConvParams p) {
    const long long total = (long long)p.batch * p.out_h * p.out_w * p.out_c;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int n = (int)(i % p.out_c);
        long long rest = i / p.out_c;
        const int ox = (int)(rest % p.out_w);
        rest /= p.out_w;
        const int oy = (int)(rest % p.out_h);
        const long long b = rest / p.out_h;
        float acc = 0.0f;
        for (int r = 0; r < p.kernel_h; ++r) {
            const int iy = oy * p.stride - p.pad + r;
            if (iy < 0 || iy >= p.in_h) continue;
            for (int s = 0; s < p.kernel_w; ++s) {
                const int ix = ox * p.stride - p.pad + s;
                if (ix < 0 || ix >= p.in_w) continue;
                const __half *xp = x + ((b * p.in_h + iy) * p.in_w + ix) * p.in_c;
                const __half *wp =
                    w + (((long long)n * p.kernel_h + r) * p.kernel_w + s) * p.in_c;
                for (int c = 0; c < p.in_c; ++c)
                    acc = fmaf(__half2float(xp[c]), __half2float(wp[c]), acc);
            }
        }
        if (p.has_bias) acc += __half2float(bias[n]);
        if (p.has_residual) acc += __half2float(residual[i]);
        y[i] = __float2half_rn(acc);
    }
}
