// emu/wgmma.cuh — stands in for kernels/wgmma.cuh on the CPU emulator (see emu/common.cuh).
//
// A wgmma is deferred like the hardware allows: wgmma_m64n128k16 only records (descriptors,
// accumulator array) for this thread, and the product is computed when a wgmma_wait retires its
// group, reading shared memory through the descriptors at that moment. So a kernel that refills
// a stage before waiting for the wgmma reading it, or reads its accumulators early, gets wrong
// results. Each thread computes its own 64 accumulators following the PTX ISA's layout for
// m64nNk16 (warp w of the warpgroup, g = lane/4, t = lane%4: d[4i + e] = D[16w + g + 8(e/2)]
// [8i + 2t + e%2]) and the descriptor fields of the no-swizzle K-major layout.
//
// SD21_EMU_MUTATION (run.sh's negative runs) makes the emulator misread the ISA on purpose:
// swap_lbo_sbo (the descriptor's two strides exchanged), flip_trans_b (imm-trans-b inverted) or
// accumulator_map (the roles of e/2 and e%2 in the accumulator layout exchanged). Each must make
// the wgmma cases fail; if one ever passes, the emulator has stopped checking that reading.
// non_uniform makes one thread's B descriptor differ from its warpgroup's, skip_proxy_fence
// makes fence.proxy.async do nothing, and write_after_fence changes an accumulator between the
// fence and its wgmma: the checks below must catch each.
//
// Registers a wgmma uses must not change between wgmma_fence and the wgmma (PTX ISA): the kernels
// pin them with fence_operand before the fence, which here records their values; the fence arms
// the records, and a wgmma whose accumulators or A registers differ from theirs aborts.
//
// All 128 threads of a warpgroup must issue the same wgmma sequence with the same descriptors
// and flags (the instruction is warpgroup-collective): each committed group's signature is
// compared with the one the warpgroup's first thread recorded, and a difference aborts.
#pragma once

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "common.cuh"

namespace sd21 {

enum class EmuMutation {
    None,
    SwapLboSbo,
    FlipTransB,
    AccumulatorMap,
    NonUniform,
    SkipProxyFence,
    WriteAfterFence,
};

inline EmuMutation emu_mutation() {
    static const EmuMutation m = [] {
        const char *v = std::getenv("SD21_EMU_MUTATION");
        if (v == nullptr || *v == 0) return EmuMutation::None;
        if (!std::strcmp(v, "swap_lbo_sbo")) return EmuMutation::SwapLboSbo;
        if (!std::strcmp(v, "flip_trans_b")) return EmuMutation::FlipTransB;
        if (!std::strcmp(v, "accumulator_map")) return EmuMutation::AccumulatorMap;
        if (!std::strcmp(v, "non_uniform")) return EmuMutation::NonUniform;
        if (!std::strcmp(v, "skip_proxy_fence")) return EmuMutation::SkipProxyFence;
        if (!std::strcmp(v, "write_after_fence")) return EmuMutation::WriteAfterFence;
        std::fprintf(stderr, "unknown SD21_EMU_MUTATION=%s\n", v);
        std::abort();
    }();
    return m;
}

// The emulator's shared-memory "address" is the offset into the launch's dynamic shared memory
// (wgmma operands must live there).
SD21_DEV uint32_t emu_smem_offset(const void *p) {
    const auto off = (const unsigned char *)p - emu::dyn_smem;
    if (off < 0 || (size_t)off >= emu::smem_storage.size()) {
        std::fprintf(stderr, "wgmma: operand outside dynamic shared memory\n");
        std::abort();
    }
    return (uint32_t)off;
}

SD21_DEV uint64_t wgmma_desc(const void *smem, uint32_t lbo, uint32_t sbo) {
    const uint64_t addr = emu_smem_offset(smem);
    if ((addr & 15) || (lbo & 15) || (sbo & 15)) {
        std::fprintf(stderr, "wgmma: descriptor fields must be multiples of 16 bytes\n");
        std::abort();
    }
    return ((addr >> 4) & 0x3FFF) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
           (uint64_t((sbo >> 4) & 0x3FFF) << 32);
}

// This thread's cp.async writes become visible to wgmma after the next barrier.
// fence_operand's records: (first register's address, its values), armed by wgmma_fence.
struct PinnedRegisters {
    const void *address;
    std::vector<uint32_t> bits;
};
inline thread_local std::vector<PinnedRegisters> pinned;
inline thread_local bool pinned_armed = false;

template <int N, typename T>
SD21_DEV void fence_operand(T (&r)[N]) {
    static_assert(sizeof(T) == 4);
    PinnedRegisters p{r, std::vector<uint32_t>(N)};
    std::memcpy(p.bits.data(), r, sizeof(T) * N);
    if (pinned_armed) {  // after a wait: a new pin for the next fence
        pinned.clear();
        pinned_armed = false;
    }
    pinned.push_back(std::move(p));
}

// At a wgmma: the registers `r` must hold what fence_operand recorded before the fence.
template <typename T>
inline void check_unchanged(const T *r, int n, const char *what) {
    if (!pinned_armed) return;
    for (const PinnedRegisters &p : pinned) {
        if (p.address != r) continue;
        if ((int)p.bits.size() != n || std::memcmp(p.bits.data(), r, 4 * n) != 0) {
            std::fprintf(stderr,
                         "wgmma: %s registers changed between wgmma.fence and the wgmma that "
                         "uses them (thread %u)\n",
                         what, threadIdx.x);
            std::abort();
        }
    }
}

SD21_DEV void fence_proxy_async() {
    if (emu_mutation() == EmuMutation::SkipProxyFence) return;
    std::lock_guard<std::mutex> guard(emu::fenced_lock);
    for (size_t c : emu::written_chunks)
        if (emu::chunk_state[c].load() == emu::chunk_written) {
            emu::chunk_state[c].store(emu::chunk_fenced);
            emu::fenced_chunks.push_back(c);
        }
    emu::written_chunks.clear();
}
SD21_DEV void wgmma_fence() { pinned_armed = true; }

struct WgmmaOp {
    int n;             // N of m64nNk16
    uint64_t a, b;     // descriptors (a unused when A comes from registers)
    bool a_in_regs;    // A from registers: this thread's two rows below
    float a_rows[2][16];  // A[16w + g][0..16) and A[16w + g + 8][0..16)
    bool b_mn_major;   // imm-trans-b: B's 8-element rows run along N
    float *d;
    bool accumulate;   // scale-d: D = A·B + D (true) or D = A·B (false)
};
inline thread_local std::vector<WgmmaOp> wgmma_open;
inline thread_local std::vector<std::vector<WgmmaOp>> wgmma_groups;  // oldest first

// write_after_fence: the first wgmma after a fence finds an accumulator changed.
inline void inject_write_after_fence(float *d) {
    thread_local bool done = false;
    if (emu_mutation() == EmuMutation::WriteAfterFence && pinned_armed && !done) {
        for (const PinnedRegisters &p : pinned)
            if (p.address == d) {
                d[0] += 1.0f;
                done = true;
            }
    }
}

SD21_DEV void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b, int scale_d) {
    inject_write_after_fence(d);
    check_unchanged(d, 64, "accumulator");
    wgmma_open.push_back({128, a, b, false, {}, false, d, scale_d != 0});
}

SD21_DEV void wgmma_m64n64k16_ss(float (&d)[32], uint64_t a, uint64_t b, int scale_d) {
    inject_write_after_fence(d);
    check_unchanged(d, 32, "accumulator");
    wgmma_open.push_back({64, a, b, false, {}, false, d, scale_d != 0});
}


// A from registers: the warp's lanes exchange their fragments (mma.sync's m16n8k16 A layout) so
// each thread keeps its rows g and g + 8 whole.
SD21_DEV void wgmma_m64n64k16_rs_tb(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
    inject_write_after_fence(d);
    check_unchanged(d, 32, "accumulator");
    check_unchanged(a, 4, "A");
    const int l = emu::lane();
    uint64_t *box = emu::mailbox(l);
    for (int i = 0; i < 4; ++i) box[i] = a[i];
    emu::warp_wait();
    WgmmaOp op{64, 0, b, true, {}, true, d, true};
    const int g = l / 4;
    for (int tt = 0; tt < 4; ++tt) {
        const uint64_t *m = emu::mailbox(4 * g + tt);
        for (int half = 0; half < 2; ++half) {  // columns 2tt.. (regs 0, 1) and 2tt + 8.. (2, 3)
            for (int r = 0; r < 2; ++r) {       // rows g (regs 0, 2) and g + 8 (regs 1, 3)
                const uint32_t reg = (uint32_t)m[2 * half + r];
                op.a_rows[r][2 * tt + 8 * half] = __half2float(lo_half(reg));
                op.a_rows[r][2 * tt + 8 * half + 1] = __half2float(hi_half(reg));
            }
        }
    }
    emu::warp_wait();
    wgmma_open.push_back(op);
}

// What must be equal across a warpgroup for one committed group: per wgmma, (N, A descriptor
// or "A from registers", B descriptor, imm-trans-b, scale-d).
using WgmmaSignature = std::vector<std::tuple<int, uint64_t, uint64_t, bool, bool>>;

inline void check_warpgroup_uniform(const std::vector<WgmmaOp> &group) {
    static std::mutex lock;
    static std::map<std::tuple<unsigned, unsigned, unsigned, unsigned, unsigned, int>,
                    WgmmaSignature>
        first;
    thread_local int commits = 0;
    WgmmaSignature sig;
    for (const WgmmaOp &op : group) {
        uint64_t b = op.b;
        if (emu_mutation() == EmuMutation::NonUniform && threadIdx.x == 37) b += 1;
        sig.emplace_back(op.n, op.a_in_regs ? 0 : op.a, b, op.b_mn_major, op.accumulate);
    }
    const auto key = std::make_tuple(emu::launches, blockIdx.x, blockIdx.y, blockIdx.z,
                                     threadIdx.x / 128, commits++);
    std::lock_guard<std::mutex> guard(lock);
    auto [it, inserted] = first.emplace(key, sig);
    if (!inserted && it->second != sig) {
        std::fprintf(stderr,
                     "wgmma: the warpgroup's threads issued different wgmma groups (thread %u, "
                     "group %d): every thread of a warpgroup must issue the same wgmma with the "
                     "same descriptors\n",
                     threadIdx.x, std::get<5>(key));
        std::abort();
    }
}

SD21_DEV void wgmma_commit() {
    check_warpgroup_uniform(wgmma_open);
    wgmma_groups.push_back(std::move(wgmma_open));
    wgmma_open.clear();
}

// Element (row, k) of a no-swizzle operand described by `desc`: K-major (8-element rows along K)
// or MN-major (8-element rows along M/N; LBO then steps along K, SBO along M/N).
inline float wgmma_operand(uint64_t desc, int row, int k, bool mn_major) {
    if ((desc >> 62) != 0 || ((desc >> 49) & 7) != 0) {
        std::fprintf(stderr, "wgmma: only the no-swizzle layout with base offset 0 is emulated\n");
        std::abort();
    }
    const size_t start = (desc & 0x3FFF) << 4;
    size_t lbo = ((desc >> 16) & 0x3FFF) << 4, sbo = ((desc >> 32) & 0x3FFF) << 4;
    if (emu_mutation() == EmuMutation::SwapLboSbo) std::swap(lbo, sbo);
    const size_t off =
        mn_major ? start + (row / 8) * sbo + (k / 8) * lbo + (k % 8) * 16 + (row % 8) * 2
                 : start + (row / 8) * sbo + (k / 8) * lbo + (row % 8) * 16 + (k % 8) * 2;
    if (off + 2 > emu::smem_storage.size()) {
        std::fprintf(stderr, "wgmma: operand element outside shared memory\n");
        std::abort();
    }
    if (emu::chunk_state[off / 16].load() != emu::chunk_visible) {
        std::fprintf(stderr,
                     "wgmma: read shared memory (byte %zu) that a cp.async wrote with no "
                     "fence.proxy.async by its writer and barrier since\n",
                     off);
        std::abort();
    }
    __half h;
    std::memcpy(&h, emu::dyn_smem + off, 2);
    return __half2float(h);
}

template <int N>
SD21_DEV void wgmma_wait() {
    const int w = (threadIdx.x >> 5) & 3, l = threadIdx.x & 31, g = l / 4, t = l % 4;
    while (wgmma_groups.size() > size_t(N)) {
        for (const WgmmaOp &op : wgmma_groups.front())
            for (int i = 0; i < op.n / 8; ++i)
                for (int e = 0; e < 4; ++e) {
                    const bool swapped = emu_mutation() == EmuMutation::AccumulatorMap;
                    const int row = 16 * w + g + 8 * (swapped ? e % 2 : e / 2);
                    const int col = 8 * i + 2 * t + (swapped ? e / 2 : e % 2);
                    const bool b_mn_major =
                        op.b_mn_major != (emu_mutation() == EmuMutation::FlipTransB);
                    float acc = op.accumulate ? op.d[4 * i + e] : 0.0f;
                    for (int k = 0; k < 16; ++k) {
                        const float av = op.a_in_regs ? op.a_rows[e / 2][k]
                                                      : wgmma_operand(op.a, row, k, false);
                        acc += av * wgmma_operand(op.b, col, k, b_mn_major);
                    }
                    op.d[4 * i + e] = acc;
                }
        wgmma_groups.erase(wgmma_groups.begin());
    }
}

}  // namespace sd21
