// emu/common.cuh — stands in for kernels/common.cuh when kernels/emu/run.sh compiles the kernel
// sources with g++ to run them on the CPU (no GPU needed).
//
// Every CUDA thread of a block is an OS thread; blocks run one after another, so `__shared__`
// variables become function statics (emu/run.sh rewrites them) shared by the block's threads.
// Warp-collective operations (shuffles, ldmatrix, mma.sync) are rendezvous of the warp's 32
// threads on a std::barrier: each lane posts its operands, the warp waits, each lane computes its
// own part of the result from everybody's operands following the PTX ISA's fragment layouts,
// the warp waits again. cp.async lands as late as the ISA allows (at the wait_group that retires
// it), so a missing wait or an early buffer reuse shows as a wrong result; a wgmma that reads what
// a cp.async wrote before its writer's fence.proxy.async and a barrier stops the run (see
// chunk_state below); other races between threads are not looked for.
//
// The non-tensor-core helpers below are copies of kernels/common.cuh; keep them in step.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "params.h"

// ---------------------------------------------------------------- CUDA syntax

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline thread_local unsigned char *dyn_smem = nullptr;

// Which 16-byte chunks of dynamic shared memory the async proxy (wgmma) may read: a chunk a
// cp.async wrote is `written` until its writer runs fence.proxy.async (`fenced`), and visible
// only after a barrier that follows the fence (PTX ISA: generic-proxy writes need
// fence.proxy.async before async-proxy reads; the barrier orders them for the other threads).
// emu/wgmma.cuh refuses to read a chunk that is not visible.
enum : uint8_t { chunk_visible = 0, chunk_written = 1, chunk_fenced = 2 };
inline std::unique_ptr<std::atomic<uint8_t>[]> chunk_state;
inline size_t chunk_count = 0;
inline std::mutex fenced_lock;
inline std::vector<size_t> fenced_chunks;          // fenced since the last barrier
inline thread_local std::vector<size_t> written_chunks;  // this thread's, not fenced yet

// Barrier completion: what was fenced before it is visible after it.
struct PublishFenced {
    void operator()() noexcept {
        std::lock_guard<std::mutex> guard(fenced_lock);
        for (size_t c : fenced_chunks) chunk_state[c].store(chunk_visible);
        fenced_chunks.clear();
    }
};

struct Block {
    explicit Block(int threads)
        : sync(threads, PublishFenced{}), warps((threads + 31) / 32) {
        for (auto &w : warps) w = std::make_unique<std::barrier<>>(32);
    }
    std::barrier<PublishFenced> sync;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    uint64_t slots[1024][16];  // per-thread mailbox for warp collectives
};
inline Block *block = nullptr;
inline std::vector<unsigned char> smem_storage;
// Kernel launches so far (checks that key their records by launch).
inline unsigned launches = 0;
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

namespace emu {
inline int lane() { return thread_idx.x & 31; }
inline void warp_wait() { block->warps[thread_idx.x >> 5]->arrive_and_wait(); }
inline uint64_t *mailbox(int lane_in_warp) {
    return block->slots[(thread_idx.x & ~31u) + lane_in_warp];
}

// Runs `kernel` over the grid, one block at a time, one OS thread per CUDA thread.
template <typename F>
void launch(dim3 grid, dim3 threads, size_t dyn_smem_bytes, F kernel) {
    ++launches;
    grid_dim = grid;
    block_dim = threads;
    const int n = threads.x * threads.y * threads.z;
    smem_storage.assign(dyn_smem_bytes + 16, 0xFF);  // poisoned
    chunk_count = smem_storage.size() / 16 + 1;
    chunk_state = std::make_unique<std::atomic<uint8_t>[]>(chunk_count);  // all visible
    fenced_chunks.clear();
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                Block b(n);
                block = &b;
                std::vector<std::thread> pool;
                for (int t = 0; t < n; ++t)
                    pool.emplace_back([&, t] {
                        thread_idx = dim3{(unsigned)t, 0, 0};
                        block_idx = dim3{bx, by, bz};
                        dyn_smem = smem_storage.data();
                        kernel();
                    });
                for (auto &th : pool) th.join();
                block = nullptr;
            }
}
}  // namespace emu

inline void __syncthreads() { emu::block->sync.arrive_and_wait(); }

// ---------------------------------------------------------------- half precision

struct __half {
    uint16_t bits;
};
struct __half2 {
    __half x, y;
};
struct float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }

inline __half __float2half_rn(float f) {
    _Float16 h = (_Float16)f;
    __half r;
    std::memcpy(&r.bits, &h, 2);
    return r;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) {
    _Float16 v;
    std::memcpy(&v, &h.bits, 2);
    return (float)v;
}
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }

using std::fmaxf;
using std::max;
using std::min;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float exp2f(float x) { return std::exp2(x); }

// atomicAdd on (shared) floats.
inline float atomicAdd(float *p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

// ---------------------------------------------------------------- warp shuffles

template <typename T>
T emu_shfl(T v, int src_lane) {
    static_assert(sizeof(T) <= 8);
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    emu::mailbox(emu::lane())[0] = bits;
    emu::warp_wait();
    uint64_t got = emu::mailbox(src_lane & 31)[0];
    emu::warp_wait();
    T r;
    std::memcpy(&r, &got, sizeof(T));
    return r;
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
    return emu_shfl(v, emu::lane() ^ mask);
}
template <typename T>
T __shfl_sync(unsigned, T v, int src) {
    return emu_shfl(v, src);
}

#define SD21_DEV inline

namespace sd21 {

// ---------------------------------------------------------------- copies of common.cuh

SD21_DEV float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

SD21_DEV float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

SD21_DEV float block_sum(float v, float *scratch, int nwarps) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

SD21_DEV float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.7071067811865475f)); }
SD21_DEV float silu(float x) { return x / (1.0f + expf(-x)); }

struct alignas(16) Half8 {
    __half2 h[4];
};

SD21_DEV void load8(const __half *p, float (&f)[8]) {
    Half8 v = *reinterpret_cast<const Half8 *>(p);
    for (int i = 0; i < 4; ++i) {
        float2 t = __half22float2(v.h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

SD21_DEV void store8(__half *p, const float (&f)[8]) {
    Half8 v;
    for (int i = 0; i < 4; ++i) v.h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    *reinterpret_cast<Half8 *>(p) = v;
}

// ---------------------------------------------------------------- tensor-core emulation

inline uint32_t pack2(__half lo, __half hi) { return lo.bits | (uint32_t(hi.bits) << 16); }
inline __half lo_half(uint32_t r) { return __half{uint16_t(r & 0xFFFF)}; }
inline __half hi_half(uint32_t r) { return __half{uint16_t(r >> 16)}; }

// cp.async is deferred as far as the PTX ISA allows, so that a kernel which reads its shared
// memory before `cp.async.wait_group` says the copy landed, or reuses a buffer whose copy is still
// in flight, reads or keeps stale data and fails its check: the 16 source bytes are read at issue,
// written to shared memory only when a wait_group retires their group (copies never committed
// are never written, as nothing makes them visible).
struct AsyncCopy {
    unsigned char *dst;
    unsigned char bytes[16];
};
inline thread_local std::vector<AsyncCopy> cp_async_open;
inline thread_local std::vector<std::vector<AsyncCopy>> cp_async_groups;  // oldest first

// SD21_EMU_CP_ASYNC=early lands every copy at issue instead (the other extreme the ISA allows):
// then a stage refilled while a deferred wgmma (emu/wgmma.cuh) still has to read it shows up.
inline const bool cp_async_early = [] {
    const char *v = std::getenv("SD21_EMU_CP_ASYNC");
    return v != nullptr && std::strcmp(v, "early") == 0;
}();

// A cp.async landing in dynamic shared memory: written by this thread, not yet fenced.
inline void mark_written(const unsigned char *dst) {
    const auto off = dst - emu::dyn_smem;
    if (emu::dyn_smem == nullptr || off < 0 || (size_t)off >= emu::smem_storage.size()) return;
    const size_t chunk = (size_t)off / 16;
    emu::chunk_state[chunk].store(emu::chunk_written);
    emu::written_chunks.push_back(chunk);
}

SD21_DEV void cp_async16(void *dst, const void *src, bool valid) {
    if (((uintptr_t)dst & 15) != 0 || (valid && ((uintptr_t)src & 15) != 0)) {
        std::fprintf(stderr, "cp.async: misaligned 16-byte copy\n");
        std::abort();
    }
    AsyncCopy c{static_cast<unsigned char *>(dst), {}};
    if (valid) std::memcpy(c.bytes, src, 16);  // else zero-fill (src-size 0)
    if (cp_async_early) {
        std::memcpy(c.dst, c.bytes, 16);
        mark_written(c.dst);
    } else {
        cp_async_open.push_back(c);
    }
}
SD21_DEV void cp_async_commit() {
    cp_async_groups.push_back(std::move(cp_async_open));
    cp_async_open.clear();
}
// Retires every committed group but the newest N.
template <int N>
SD21_DEV void cp_async_wait() {
    while (cp_async_groups.size() > size_t(N)) {
        for (const AsyncCopy &c : cp_async_groups.front()) {
            std::memcpy(c.dst, c.bytes, 16);
            mark_written(c.dst);
        }
        cp_async_groups.erase(cp_async_groups.begin());
    }
}

// ldmatrix .x4: lanes 8i..8i+7 give the row addresses of matrix i; lane l receives, in
// register i, row l/4, columns 2(l%4) and 2(l%4)+1 of matrix i.
SD21_DEV void ldmatrix_x4(uint32_t (&r)[4], const void *p) {
    if (((uintptr_t)p & 15) != 0) {
        std::fprintf(stderr, "ldmatrix: row address not 16-byte aligned\n");
        std::abort();
    }
    const int l = emu::lane();
    emu::mailbox(l)[0] = (uint64_t)(uintptr_t)p;
    emu::warp_wait();
    for (int i = 0; i < 4; ++i) {
        const __half *row = (const __half *)(uintptr_t)emu::mailbox(8 * i + l / 4)[0];
        r[i] = pack2(row[2 * (l % 4)], row[2 * (l % 4) + 1]);
    }
    emu::warp_wait();
}

// .trans: lane l receives rows 2(l%4) and 2(l%4)+1, column l/4, of matrix i.
SD21_DEV void ldmatrix_x4_trans(uint32_t (&r)[4], const void *p) {
    if (((uintptr_t)p & 15) != 0) {
        std::fprintf(stderr, "ldmatrix: row address not 16-byte aligned\n");
        std::abort();
    }
    const int l = emu::lane();
    emu::mailbox(l)[0] = (uint64_t)(uintptr_t)p;
    emu::warp_wait();
    for (int i = 0; i < 4; ++i) {
        const __half *r0 = (const __half *)(uintptr_t)emu::mailbox(8 * i + 2 * (l % 4))[0];
        const __half *r1 = (const __half *)(uintptr_t)emu::mailbox(8 * i + 2 * (l % 4) + 1)[0];
        r[i] = pack2(r0[l / 4], r1[l / 4]);
    }
    emu::warp_wait();
}

// mma.sync.m16n8k16.row.col f32 += f16·f16, fragments as in the PTX ISA (g = lane/4, t = lane%4):
// a0: A[g][2t..2t+1], a1: A[g+8][2t..], a2: A[g][2t+8..], a3: A[g+8][2t+8..];
// b0: B[2t..2t+1][g], b1: B[2t+8..][g]; d0,d1: D[g][2t..], d2,d3: D[g+8][2t..].
SD21_DEV void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const int l = emu::lane();
    uint64_t *box = emu::mailbox(l);
    for (int i = 0; i < 4; ++i) box[i] = a[i];
    box[4] = b0;
    box[5] = b1;
    emu::warp_wait();
    float A[16][16], B[16][8];
    for (int ln = 0; ln < 32; ++ln) {
        const uint64_t *m = emu::mailbox(ln);
        const int g = ln / 4, t = ln % 4;
        const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
        for (int i = 0; i < 4; ++i) {
            A[rows[i]][cols[i]] = __half2float(lo_half((uint32_t)m[i]));
            A[rows[i]][cols[i] + 1] = __half2float(hi_half((uint32_t)m[i]));
        }
        B[2 * t][g] = __half2float(lo_half((uint32_t)m[4]));
        B[2 * t + 1][g] = __half2float(hi_half((uint32_t)m[4]));
        B[2 * t + 8][g] = __half2float(lo_half((uint32_t)m[5]));
        B[2 * t + 9][g] = __half2float(hi_half((uint32_t)m[5]));
    }
    emu::warp_wait();
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
        float acc = d[e];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        d[e] = acc;
    }
}

SD21_DEV uint32_t pack_half2(float lo, float hi) {
    return pack2(__float2half_rn(lo), __float2half_rn(hi));
}

}  // namespace sd21
