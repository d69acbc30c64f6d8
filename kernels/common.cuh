// common.cuh — helpers shared by every kernel file: f16 vector loads/stores (8 halves = 16 bytes,
// one memory transaction per thread), warp reductions, the activation functions (exact erf GELU,
// SiLU), and the tensor-core primitives (ldmatrix, mma.sync m16n8k16, cp.async) used by the
// attention and convolution kernels.
//
// Conventions: storage is f16 (`__half`), arithmetic f32. Buffers come from cuMemAlloc, so they
// are 256-byte aligned and an 8-element vector at an offset that is a multiple of 8 is aligned.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

#include "params.h"

#define SD21_DEV __device__ __forceinline__

namespace sd21 {

// ---------------------------------------------------------------- reductions

SD21_DEV float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

SD21_DEV float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of `nwarps` warps through `scratch[nwarps]`; every thread gets the total.
// Must be called by every thread of the block.
SD21_DEV float block_sum(float v, float *scratch, int nwarps) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

// ---------------------------------------------------------------- activations

// Exact GELU: x/2 · (1 + erf(x/√2)) (diffusers' `gelu`, not the tanh approximation).
SD21_DEV float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.7071067811865475f)); }

// SiLU x·σ(x). For x → −∞, expf(−x) = inf and the quotient is −0, as it should be.
SD21_DEV float silu(float x) { return x / (1.0f + expf(-x)); }

// ---------------------------------------------------------------- 8-wide f16 vectors

struct alignas(16) Half8 {
    __half2 h[4];
};

SD21_DEV void load8(const __half *p, float (&f)[8]) {
    Half8 v = *reinterpret_cast<const Half8 *>(p);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 t = __half22float2(v.h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

SD21_DEV void store8(__half *p, const float (&f)[8]) {
    Half8 v;
#pragma unroll
    for (int i = 0; i < 4; ++i) v.h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    *reinterpret_cast<Half8 *>(p) = v;
}

// ---------------------------------------------------------------- tensor cores (sm_80+)

// 32-bit shared-memory address of a generic pointer into shared memory.
SD21_DEV uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous global → shared copy; when `valid` is false the 16 bytes are zero-filled
// and `src` is not read (it must still be a valid address expression, never dereferenced).
SD21_DEV void cp_async16(void *dst, const void *src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(n));
}

SD21_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
SD21_DEV void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8×8 b16 matrices from shared memory. Lanes 8i..8i+7 give the row addresses of matrix i;
// register i receives matrix i, lane l holding row l/4, columns 2(l%4), 2(l%4)+1.
SD21_DEV void ldmatrix_x4(uint32_t (&r)[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// Same, transposed: lane l receives rows 2(l%4), 2(l%4)+1 of column l/4.
SD21_DEV void ldmatrix_x4_trans(uint32_t (&r)[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// D = A·B + D, A 16×16 (row), B 16×8 (col), f16 inputs, f32 accumulators.
// Fragments (g = lane/4, t = lane%4): a[0] = A[g][2t..], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
// a[3] = A[g+8][2t+8..]; b[0] = B[2t..][g], b[1] = B[2t+8..][g]; d[0..1] = D[g][2t..],
// d[2..3] = D[g+8][2t..].
SD21_DEV void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f32 → one register of two f16 (low half = `lo`).
SD21_DEV uint32_t pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}

}  // namespace sd21
