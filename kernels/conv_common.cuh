// conv_common.cuh — what the two implicit-GEMM convolutions (conv.cu's mma.sync kernel and
// conv_sm90a.cu's wgmma one) share: the addressing of the input (A) and weight (W) rows a thread
// loads, and the epilogue of one output pair. See conv.cu for the GEMM view of the convolution.
#pragma once

#include "common.cuh"

namespace sd21 {

// GEMM column k (< K when `k_ok`) as a kernel tap (r, s) and input channel c. C_in % 8 == 0
// keeps an 8-channel chunk inside one tap: (tap, c) = divmod(k, C_in), (r, s) = divmod(tap, kW).
struct ConvTap {
    int k, r, s, c;
    bool k_ok;
};

SD21_DEV ConvTap conv_tap(const ConvParams &p, int K, int k) {
    const int tap = k / p.in_c;
    const int r = tap / p.kernel_w;
    return {k, r, tap - r * p.kernel_w, k - tap * p.in_c, k < K};
}

// The ROWS tile rows one thread loads, row r_i = first + i·step of the block's 128: for each, the
// input pixel its output row m0 + r_i reads from (batch offset, top-left tap; `a_ok` false past
// M) and the weight row of output channel n0 + r_i (`b_ok` false past N).
template <int ROWS>
struct ConvLoadRows {
    long long a_base[ROWS];
    int a_iy0[ROWS], a_ix0[ROWS];
    bool a_ok[ROWS];
    const __half *b_row[ROWS];
    bool b_ok[ROWS];

    SD21_DEV ConvLoadRows(const ConvParams &p, const __half *w, long long M, int N, int K,
                          long long m0, int n0, int first, int step) {
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            const int r = first + step * i;
            const long long m = m0 + r;
            a_ok[i] = m < M;
            const long long mm = a_ok[i] ? m : 0;
            const int ox = (int)(mm % p.out_w);
            const long long rest = mm / p.out_w;
            const int oy = (int)(rest % p.out_h);
            const long long b = rest / p.out_h;
            a_base[i] = b * p.in_h * p.in_w * p.in_c;
            a_iy0[i] = oy * p.stride - p.pad;
            a_ix0[i] = ox * p.stride - p.pad;
            const int n = n0 + r;
            b_ok[i] = n < N;
            b_row[i] = w + (long long)(b_ok[i] ? n : 0) * K;
        }
    }

    // Issues the cp.async of the 8-channel chunk at GEMM column `tap.k` for row i: input into
    // `a_dst`, weight into `b_dst`, zero-filled outside the image, past K and past M/N.
    SD21_DEV void load(const ConvParams &p, const __half *x, const ConvTap &tap, int i,
                       void *a_dst, void *b_dst) const {
        const int iy = a_iy0[i] + tap.r, ix = a_ix0[i] + tap.s;
        const bool ok = a_ok[i] && tap.k_ok && iy >= 0 && iy < p.in_h && ix >= 0 && ix < p.in_w;
        const __half *src =
            x + (ok ? a_base[i] + ((long long)iy * p.in_w + ix) * p.in_c + tap.c : 0);
        cp_async16(a_dst, src, ok);
        const bool okb = b_ok[i] && tap.k_ok;
        cp_async16(b_dst, b_row[i] + (okb ? tap.k : 0), okb);
    }
};

// Output row m, columns n and n + 1 (n + 1 only when < N) with f32 sums v0, v1: into `part`
// (split-K partials, f32, bias and residual left to the reduce) when non-null, else + bias +
// residual, rounded to f16 into y. `pairs` (N even): n is even, so the pair is one aligned
// 8-byte (partials) or 4-byte (f16) access.
SD21_DEV void conv_store_pair(const ConvParams &p, __half *y, float *part,
                              const __half *bias, const __half *residual, long long m, int n,
                              int N, bool pairs, float v0, float v1) {
    const long long o = m * N + n;
    if (part) {
        if (pairs) {
            *reinterpret_cast<float2 *>(part + o) = make_float2(v0, v1);
        } else {
            part[o] = v0;
            if (n + 1 < N) part[o + 1] = v1;
        }
    } else if (pairs) {
        if (p.has_bias) {
            const float2 bb = __half22float2(*reinterpret_cast<const __half2 *>(bias + n));
            v0 += bb.x;
            v1 += bb.y;
        }
        if (p.has_residual) {
            const float2 rr = __half22float2(*reinterpret_cast<const __half2 *>(residual + o));
            v0 += rr.x;
            v1 += rr.y;
        }
        *reinterpret_cast<__half2 *>(y + o) = __floats2half2_rn(v0, v1);
    } else {
        if (p.has_bias) v0 += __half2float(bias[n]);
        if (p.has_residual) v0 += __half2float(residual[o]);
        y[o] = __float2half_rn(v0);
        if (n + 1 < N) {
            if (p.has_bias) v1 += __half2float(bias[n + 1]);
            if (p.has_residual) v1 += __half2float(residual[o + 1]);
            y[o + 1] = __float2half_rn(v1);
        }
    }
}

}  // namespace sd21
