// check.cpp — runs every kernel of kernels/*.cu on the CPU emulator (emu/common.cuh) at small,
// awkward shapes and compares with double-precision references: relative L2 error ≤ 2e-3 and no
// NaN (outputs are poisoned with NaN first, so an unwritten element fails). The launch
// configurations mirror the Rust wrappers in src/backend/cuda/.
#include "common.cuh"

#include "attention.cu"
#include "attention_sm90a.cu"
#include "conv.cu"
#include "conv_sm90a.cu"
#include "elementwise.cu"
#include "norm.cu"

#include <cstdio>
#include <string>

namespace {

int failures = 0;

struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull | 1) {}
    float uniform() {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        return (float)((s * 0x2545F4914F6CDD1Dull) >> 40) / (float)(1 << 24) * 2.0f - 1.0f;
    }
};

// Random f16 data, offset + scale·U(-1, 1).
std::vector<__half> rand_half(Rng &rng, size_t n, float scale, float offset = 0.0f) {
    std::vector<__half> v(n);
    for (auto &x : v) x = __float2half_rn(offset + scale * rng.uniform());
    return v;
}
std::vector<__half> poisoned(size_t n) { return std::vector<__half>(n, __half{0xFFFF}); }
double f(__half h) { return __half2float(h); }

void report(const std::string &what, const std::vector<__half> &got, const std::vector<double> &want) {
    double err2 = 0, ref2 = 0;
    bool finite = got.size() == want.size();
    for (size_t i = 0; i < got.size() && finite; ++i) {
        const double g = f(got[i]);
        if (!std::isfinite(g)) {
            std::printf("FAIL %s: non-finite output at %zu\n", what.c_str(), i);
            finite = false;
            break;
        }
        err2 += (g - want[i]) * (g - want[i]);
        ref2 += want[i] * want[i];
    }
    if (!finite) {
        ++failures;
        return;
    }
    const double rel = std::sqrt(err2 / std::max(ref2, 1e-300));
    const bool ok = rel <= 2e-3 && ref2 > 0;
    if (!ok) ++failures;
    std::printf("%s %s: rel_l2=%.3e\n", ok ? "ok  " : "FAIL", what.c_str(), rel);
}

// ---------------------------------------------------------------- attention

// `hopper`: flash_attention_d64_sm90 (wgmma) instead of flash_attention_d64 (d must be 64).
void attention_case(Rng &rng, int b, int nq, int nk, int heads, int d, bool causal,
                    bool hopper = false) {
    const int hd = heads * d;
    auto q = rand_half(rng, (size_t)b * nq * hd, 2.0f);
    auto k = rand_half(rng, (size_t)b * nk * hd, 1.0f);
    auto v = rand_half(rng, (size_t)b * nk * hd, 1.0f);
    auto out = poisoned(q.size());
    AttentionParams p{b, heads, nq, nk, d, causal, (float)(M_LOG2E / std::sqrt((double)d))};
    std::string name;
    if (hopper) {
        name = "flash_attention_d64_sm90";
        emu::launch({(unsigned)((nq + 63) / 64), (unsigned)(b * heads), 1}, {128, 1, 1},
                    5 * 64 * 64 * 2,
                    [&] { flash_attention_d64_sm90(q.data(), k.data(), v.data(), out.data(), p); });
    } else if (d == 64) {
        name = "flash_attention_d64";
        emu::launch({(unsigned)((nq + 63) / 64), (unsigned)(b * heads), 1}, {128, 1, 1}, 0,
                    [&] { flash_attention_d64(q.data(), k.data(), v.data(), out.data(), p); });
    } else {
        int dpl = 1;
        while (dpl * 32 < d) dpl *= 2;
        name = "attention_generic_" + std::to_string(dpl);
        const size_t smem = (16 * d + 32 * (d | 1) + 32 * d) * 2;
        emu::launch({(unsigned)((nq + 15) / 16), (unsigned)(b * heads), 1}, {128, 1, 1}, smem, [&] {
            switch (dpl) {
                case 1: attention_generic_1(q.data(), k.data(), v.data(), out.data(), p); break;
                case 2: attention_generic_2(q.data(), k.data(), v.data(), out.data(), p); break;
                case 4: attention_generic_4(q.data(), k.data(), v.data(), out.data(), p); break;
                case 8: attention_generic_8(q.data(), k.data(), v.data(), out.data(), p); break;
                default: attention_generic_16(q.data(), k.data(), v.data(), out.data(), p); break;
            }
        });
    }
    std::vector<double> want(q.size());
    const double scale = 1.0 / std::sqrt((double)d);
    for (int bi = 0; bi < b; ++bi)
        for (int h = 0; h < heads; ++h)
            for (int i = 0; i < nq; ++i) {
                std::vector<double> s(nk);
                double mx = -INFINITY;
                for (int j = 0; j < nk; ++j) {
                    double acc = 0;
                    for (int e = 0; e < d; ++e)
                        acc += f(q[((size_t)bi * nq + i) * hd + h * d + e]) *
                               f(k[((size_t)bi * nk + j) * hd + h * d + e]);
                    s[j] = (causal && j > i) ? -INFINITY : acc * scale;
                    mx = std::max(mx, s[j]);
                }
                double sum = 0;
                for (auto &x : s) sum += (x = std::exp(x - mx));
                for (int e = 0; e < d; ++e) {
                    double acc = 0;
                    for (int j = 0; j < nk; ++j) acc += s[j] * f(v[((size_t)bi * nk + j) * hd + h * d + e]);
                    want[((size_t)bi * nq + i) * hd + h * d + e] = acc / sum;
                }
            }
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s b%d nq%d nk%d h%d d%d causal=%d", name.c_str(), b, nq, nk,
                  heads, d, (int)causal);
    report(buf, out, want);
}

// ---------------------------------------------------------------- convolution

// `splits` > 1: the implicit GEMM splits K over gridDim.z (as src/backend/cuda/conv.rs does for
// small M × N), then conv2d_splitk_reduce adds the f32 partials.
// `hopper`: conv2d_implicit_gemm_sm90 (wgmma, k-tiles of 64) instead of conv2d_implicit_gemm.
void conv_case(Rng &rng, int b, int h, int w, int c_in, int c_out, int k, int stride, int pad,
               bool bias, bool residual, int splits = 1, bool hopper = false) {
    const int oh = (h + 2 * pad - k) / stride + 1, ow = (w + 2 * pad - k) / stride + 1;
    auto x = rand_half(rng, (size_t)b * h * w * c_in, 1.0f);
    auto wt = rand_half(rng, (size_t)c_out * k * k * c_in, 1.0f / std::sqrt((float)(k * k * c_in)));
    auto bs = rand_half(rng, c_out, 0.5f);
    auto res = rand_half(rng, (size_t)b * oh * ow * c_out, 1.0f);
    auto out = poisoned(res.size());
    const int tile_k = hopper ? 64 : 32;
    const int k_tiles = (k * k * c_in + tile_k - 1) / tile_k;
    const int per_split = (k_tiles + splits - 1) / splits;
    splits = (k_tiles + per_split - 1) / per_split;  // no empty split
    ConvParams p{b, h, w, c_in, oh, ow, c_out, k, k, stride, pad, bias, residual, splits, per_split};
    std::string name;
    if (c_in % 8 == 0) {
        name = hopper ? "conv2d_implicit_gemm_sm90" : "conv2d_implicit_gemm";
        if (splits > 1) name += " split-K " + std::to_string(splits) + " +reduce";
        const long long m = (long long)b * oh * ow;
        std::vector<float> partial(splits > 1 ? (size_t)splits * m * c_out : 0, NAN);
        const dim3 grid{(unsigned)((m + 127) / 128), (unsigned)((c_out + 127) / 128),
                        (unsigned)splits};
        if (hopper)
            emu::launch(grid, {256, 1, 1}, 4 * 2 * 128 * 64 * 2, [&] {
                conv2d_implicit_gemm_sm90(x.data(), wt.data(), bs.data(), res.data(), out.data(),
                                          partial.data(), p);
            });
        else
            emu::launch(grid, {256, 1, 1}, 3 * 256 * 40 * 2, [&] {
                conv2d_implicit_gemm(x.data(), wt.data(), bs.data(), res.data(), out.data(),
                                     partial.data(), p);
            });
        if (splits > 1)
            emu::launch({7, 1, 1}, {256, 1, 1}, 0, [&] {
                conv2d_splitk_reduce(partial.data(), bs.data(), res.data(), out.data(), p);
            });
    } else {
        name = "conv2d_direct";
        emu::launch({(unsigned)((out.size() + 255) / 256), 1, 1}, {256, 1, 1}, 0, [&] {
            conv2d_direct(x.data(), wt.data(), bs.data(), res.data(), out.data(), p);
        });
    }
    std::vector<double> want(out.size());
    for (int bi = 0; bi < b; ++bi)
        for (int oy = 0; oy < oh; ++oy)
            for (int ox = 0; ox < ow; ++ox)
                for (int n = 0; n < c_out; ++n) {
                    double acc = bias ? f(bs[n]) : 0.0;
                    for (int r = 0; r < k; ++r)
                        for (int s = 0; s < k; ++s) {
                            const int iy = oy * stride - pad + r, ix = ox * stride - pad + s;
                            if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                            for (int c = 0; c < c_in; ++c)
                                acc += f(x[(((size_t)bi * h + iy) * w + ix) * c_in + c]) *
                                       f(wt[(((size_t)n * k + r) * k + s) * c_in + c]);
                        }
                    const size_t o = (((size_t)bi * oh + oy) * ow + ox) * c_out + n;
                    if (residual) acc += f(res[o]);
                    want[o] = acc;
                }
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s [%d,%d,%d,%d]->%d k%d s%d p%d bias=%d res=%d", name.c_str(), b,
                  h, w, c_in, c_out, k, stride, pad, (int)bias, (int)residual);
    report(buf, out, want);
}

// ---------------------------------------------------------------- norms

void group_norm_case(Rng &rng, int b, int spatial, int c, int groups, bool silu_on, float offset) {
    auto x = rand_half(rng, (size_t)b * spatial * c, 1.0f, offset);
    auto gamma = rand_half(rng, c, 0.5f, 1.0f);
    auto beta = rand_half(rng, c, 0.5f);
    auto out = poisoned(x.size());
    const int vw = c % 8 == 0 ? 8 : 1, vc = c / vw;
    const int threads = vc <= 256 ? 256 : std::min(1024, (vc + 31) / 32 * 32);
    const int chunk_len = std::clamp(16 * 1024 / c, 1, spatial);
    const int chunks = (spatial + chunk_len - 1) / chunk_len;
    GroupNormParams p{b, spatial, c, groups, chunks, chunk_len, 1e-5f, silu_on};
    std::vector<float> partial((size_t)b * groups * chunks * 2, NAN), stats((size_t)b * groups * 2, NAN);
    emu::launch({(unsigned)chunks, (unsigned)b, 1}, {(unsigned)threads, 1, 1}, 2 * c * 4, [&] {
        if (vw == 8)
            group_norm_stats_v8(x.data(), partial.data(), p);
        else
            group_norm_stats_v1(x.data(), partial.data(), p);
    });
    emu::launch({(unsigned)((b * groups + 7) / 8), 1, 1}, {256, 1, 1}, 0,
                [&] { group_norm_finalize(x.data(), partial.data(), stats.data(), p); });
    emu::launch({(unsigned)((x.size() / 8 + 255) / 256 + 1), 1, 1}, {256, 1, 1}, 0, [&] {
        group_norm_apply(x.data(), stats.data(), gamma.data(), beta.data(), out.data(), p);
    });
    std::vector<double> want(x.size());
    const int cg = c / groups;
    for (int bi = 0; bi < b; ++bi)
        for (int g = 0; g < groups; ++g) {
            double s = 0, q = 0;
            const double n = (double)spatial * cg;
            for (int i = 0; i < spatial; ++i)
                for (int ch = g * cg; ch < (g + 1) * cg; ++ch) s += f(x[((size_t)bi * spatial + i) * c + ch]);
            const double mean = s / n;
            for (int i = 0; i < spatial; ++i)
                for (int ch = g * cg; ch < (g + 1) * cg; ++ch) {
                    const double d = f(x[((size_t)bi * spatial + i) * c + ch]) - mean;
                    q += d * d;
                }
            const double rstd = 1.0 / std::sqrt(q / n + 1e-5);
            for (int i = 0; i < spatial; ++i)
                for (int ch = g * cg; ch < (g + 1) * cg; ++ch) {
                    const size_t o = ((size_t)bi * spatial + i) * c + ch;
                    double y = (f(x[o]) - mean) * rstd * f(gamma[ch]) + f(beta[ch]);
                    want[o] = silu_on ? y / (1 + std::exp(-y)) : y;
                }
        }
    char buf[160];
    std::snprintf(buf, sizeof buf, "group_norm_v%d b%d s%d c%d g%d silu=%d offset=%g", vw, b, spatial,
                  c, groups, (int)silu_on, offset);
    report(buf, out, want);
}

void layer_norm_case(Rng &rng, int rows, int c, float offset) {
    auto x = rand_half(rng, (size_t)rows * c, 1.0f, offset);
    auto gamma = rand_half(rng, c, 0.5f, 1.0f);
    auto beta = rand_half(rng, c, 0.5f);
    auto out = poisoned(x.size());
    LayerNormParams p{rows, c, 1e-5f};
    emu::launch({(unsigned)((rows + 7) / 8), 1, 1}, {256, 1, 1}, 0,
                [&] { layer_norm_f16(x.data(), gamma.data(), beta.data(), out.data(), p); });
    std::vector<double> want(x.size());
    for (int r = 0; r < rows; ++r) {
        double s = 0, q = 0;
        for (int i = 0; i < c; ++i) s += f(x[(size_t)r * c + i]);
        const double mean = s / c;
        for (int i = 0; i < c; ++i) q += (f(x[(size_t)r * c + i]) - mean) * (f(x[(size_t)r * c + i]) - mean);
        const double rstd = 1.0 / std::sqrt(q / c + 1e-5);
        for (int i = 0; i < c; ++i)
            want[(size_t)r * c + i] = (f(x[(size_t)r * c + i]) - mean) * rstd * f(gamma[i]) + f(beta[i]);
    }
    report("layer_norm rows" + std::to_string(rows) + " c" + std::to_string(c), out, want);
}

// ---------------------------------------------------------------- elementwise

dim3 chunk_grid(size_t n) { return {(unsigned)std::max<size_t>(1, (n / 8 + 255) / 256), 1, 1}; }

void elementwise_cases(Rng &rng) {
    // GEGLU
    for (int fdim : {16, 9}) {
        const int rows = 5;
        auto x = rand_half(rng, (size_t)rows * 2 * fdim, 3.0f);
        auto out = poisoned((size_t)rows * fdim);
        const long long n = (long long)rows * fdim;
        emu::launch(chunk_grid(n), {256, 1, 1}, 0, [&] { geglu_f16(x.data(), out.data(), n, fdim); });
        std::vector<double> want(n);
        for (int r = 0; r < rows; ++r)
            for (int j = 0; j < fdim; ++j) {
                const double hv = f(x[(size_t)r * 2 * fdim + j]), g = f(x[(size_t)r * 2 * fdim + fdim + j]);
                want[(size_t)r * fdim + j] = hv * 0.5 * g * (1 + std::erf(g / std::sqrt(2.0)));
            }
        report("geglu F" + std::to_string(fdim), out, want);
    }
    // add_per_channel and the linear bias add
    for (int c : {16, 7}) {
        const int b = 2, s = 5;
        auto x = rand_half(rng, (size_t)b * s * c, 1.0f);
        auto v = rand_half(rng, (size_t)b * c, 1.0f);
        auto out = poisoned(x.size());
        const long long n = x.size();
        emu::launch(chunk_grid(n), {256, 1, 1}, 0,
                    [&] { add_per_channel_f16(x.data(), v.data(), out.data(), n, c, (long long)s * c); });
        std::vector<double> want(n);
        for (long long i = 0; i < n; ++i) want[i] = f(x[i]) + f(v[(i / (s * c)) * c + i % c]);
        report("add_per_channel C" + std::to_string(c), out, want);
        auto y = x;
        emu::launch(chunk_grid(n), {256, 1, 1}, 0, [&] { bias_add_f16(y.data(), v.data(), n, c); });
        for (long long i = 0; i < n; ++i) want[i] = f(x[i]) + f(v[i % c]);
        report("bias_add C" + std::to_string(c), y, want);
    }
    // nearest upsample (scale computed in f32 as the host does)
    struct Up { int b, h, w, c, oh, ow; };
    for (Up u : {Up{1, 5, 5, 3, 9, 9}, Up{1, 4, 3, 16, 8, 6}, Up{2, 6, 7, 8, 4, 3}}) {
        auto x = rand_half(rng, (size_t)u.b * u.h * u.w * u.c, 1.0f);
        auto out = poisoned((size_t)u.b * u.oh * u.ow * u.c);
        UpsampleParams p{u.b, u.h, u.w, u.oh, u.ow, u.c, (float)u.h / (float)u.oh, (float)u.w / (float)u.ow};
        emu::launch(chunk_grid(out.size()), {256, 1, 1}, 0, [&] { upsample_nearest_f16(x.data(), out.data(), p); });
        std::vector<double> want(out.size());
        for (int bi = 0; bi < u.b; ++bi)
            for (int oy = 0; oy < u.oh; ++oy)
                for (int ox = 0; ox < u.ow; ++ox)
                    for (int c = 0; c < u.c; ++c) {
                        const int sy = std::min((int)std::floor(oy * p.scale_h), u.h - 1);
                        const int sx = std::min((int)std::floor(ox * p.scale_w), u.w - 1);
                        want[(((size_t)bi * u.oh + oy) * u.ow + ox) * u.c + c] =
                            f(x[(((size_t)bi * u.h + sy) * u.w + sx) * u.c + c]);
                    }
        report("upsample " + std::to_string(u.h) + "x" + std::to_string(u.w) + "->" + std::to_string(u.oh) +
                   "x" + std::to_string(u.ow) + " C" + std::to_string(u.c),
               out, want);
    }
    // zero padding (the VAE encoder's downsamplers pad bottom and right by one)
    struct Pad { int b, h, w, c, top, bottom, left, right; };
    for (Pad q : {Pad{1, 5, 4, 3, 0, 1, 0, 1}, Pad{2, 3, 6, 8, 2, 1, 1, 0}}) {
        const int oh = q.h + q.top + q.bottom, ow = q.w + q.left + q.right;
        auto x = rand_half(rng, (size_t)q.b * q.h * q.w * q.c, 1.0f);
        auto out = poisoned((size_t)q.b * oh * ow * q.c);
        PadParams p{q.b, q.h, q.w, oh, ow, q.c, q.top, q.left};
        emu::launch(chunk_grid(out.size()), {256, 1, 1}, 0, [&] { pad_f16(x.data(), out.data(), p); });
        std::vector<double> want(out.size(), 0.0);
        for (int bi = 0; bi < q.b; ++bi)
            for (int y = 0; y < q.h; ++y)
                for (int xx = 0; xx < q.w; ++xx)
                    for (int c = 0; c < q.c; ++c)
                        want[(((size_t)bi * oh + y + q.top) * ow + xx + q.left) * q.c + c] =
                            f(x[(((size_t)bi * q.h + y) * q.w + xx) * q.c + c]);
        report("pad " + std::to_string(q.h) + "x" + std::to_string(q.w) + " C" + std::to_string(q.c), out, want);
    }
    // concat
    for (auto [ca, cb] : {std::pair{8, 16}, std::pair{5, 7}}) {
        const int rows = 3;
        auto a = rand_half(rng, (size_t)rows * ca, 1.0f), bb = rand_half(rng, (size_t)rows * cb, 1.0f);
        auto out = poisoned((size_t)rows * (ca + cb));
        emu::launch(chunk_grid(out.size()), {256, 1, 1}, 0,
                    [&] { concat_channels_f16(a.data(), bb.data(), out.data(), rows, ca, cb); });
        std::vector<double> want(out.size());
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < ca + cb; ++c)
                want[(size_t)r * (ca + cb) + c] = c < ca ? f(a[(size_t)r * ca + c]) : f(bb[(size_t)r * cb + c - ca]);
        report("concat " + std::to_string(ca) + "+" + std::to_string(cb), out, want);
    }
    // embedding
    for (int d : {16, 7}) {
        const int v = 11;
        auto table = rand_half(rng, (size_t)v * d, 1.0f);
        std::vector<unsigned> ids = {3, 0, 10, 3, 7};
        auto out = poisoned(ids.size() * d);
        emu::launch(chunk_grid(out.size()), {256, 1, 1}, 0, [&] {
            embedding_f16(ids.data(), table.data(), out.data(), (long long)ids.size(), d);
        });
        std::vector<double> want(out.size());
        for (size_t r = 0; r < ids.size(); ++r)
            for (int c = 0; c < d; ++c) want[r * d + c] = f(table[(size_t)ids[r] * d + c]);
        report("embedding D" + std::to_string(d), out, want);
    }
    // casts round trip, gelu, silu, add
    {
        const long long n = 37;
        auto x = rand_half(rng, n, 4.0f), y = rand_half(rng, n, 4.0f);
        std::vector<float> f32(n, NAN);
        auto back = poisoned(n), g = poisoned(n), s = poisoned(n), a = poisoned(n);
        emu::launch(chunk_grid(n), {256, 1, 1}, 0, [&] { cast_f16_to_f32(x.data(), f32.data(), n); });
        emu::launch(chunk_grid(n), {256, 1, 1}, 0, [&] { cast_f32_to_f16(f32.data(), back.data(), n); });
        emu::launch(chunk_grid(n), {256, 1, 1}, 0, [&] { gelu_f16(x.data(), g.data(), n); });
        emu::launch(chunk_grid(n), {256, 1, 1}, 0, [&] { silu_f16(x.data(), s.data(), n); });
        emu::launch(chunk_grid(n), {256, 1, 1}, 0, [&] { add_f16(x.data(), y.data(), a.data(), n); });
        std::vector<double> wx(n), wg(n), ws(n), wa(n);
        for (long long i = 0; i < n; ++i) {
            const double v = f(x[i]);
            wx[i] = v;
            wg[i] = 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
            ws[i] = v / (1 + std::exp(-v));
            wa[i] = v + f(y[i]);
        }
        report("cast f16->f32->f16", back, wx);
        report("gelu", g, wg);
        report("silu", s, ws);
        report("add", a, wa);
    }
}

}  // namespace

int main() {
    Rng rng(42);
    // Flash attention, head dim 64: partial tiles, 77 keys, causal over several tiles, tiny.
    attention_case(rng, 1, 70, 77, 2, 64, false);
    attention_case(rng, 2, 64, 64, 1, 64, true);
    attention_case(rng, 1, 130, 130, 1, 64, true);
    attention_case(rng, 1, 1, 1, 1, 64, false);
    attention_case(rng, 1, 100, 37, 1, 64, false);
    attention_case(rng, 1, 65, 200, 1, 64, false);
    // The Hopper (wgmma) kernel on the same shapes: 77 keys (one full tile and one of 13),
    // causal, a single query and key, fewer keys than a tile, several key tiles.
    attention_case(rng, 1, 70, 77, 2, 64, false, true);
    attention_case(rng, 2, 64, 64, 1, 64, true, true);
    attention_case(rng, 1, 130, 130, 1, 64, true, true);
    attention_case(rng, 1, 1, 1, 1, 64, false, true);
    attention_case(rng, 1, 100, 37, 1, 64, false, true);
    attention_case(rng, 1, 65, 200, 1, 64, false, true);
    // Generic attention: every register width.
    attention_case(rng, 2, 33, 77, 2, 8, false);
    attention_case(rng, 1, 77, 77, 4, 8, true);
    attention_case(rng, 1, 50, 61, 2, 40, false);
    attention_case(rng, 1, 17, 300, 1, 100, true);
    attention_case(rng, 1, 20, 45, 2, 160, false);
    attention_case(rng, 1, 20, 40, 1, 512, false);
    // Convolution: implicit GEMM (C_in % 8 == 0) and the direct fallback.
    conv_case(rng, 1, 17, 15, 64, 72, 3, 2, 1, true, false);
    conv_case(rng, 2, 9, 7, 16, 24, 3, 1, 1, false, true);
    conv_case(rng, 1, 8, 8, 64, 136, 1, 1, 0, true, true);
    conv_case(rng, 1, 6, 6, 8, 5, 3, 2, 1, true, false);
    conv_case(rng, 1, 5, 5, 24, 16, 3, 1, 0, true, true);
    conv_case(rng, 1, 12, 11, 40, 3, 3, 1, 1, true, false);
    conv_case(rng, 1, 6, 5, 4, 10, 3, 1, 1, true, false);
    conv_case(rng, 1, 5, 5, 12, 7, 3, 1, 1, true, true);
    // Split-K: 3 and 4 splits of 3×3 convs (K = 576 and 1152 = 18 and 36 k-tiles, the last split
    // shorter), an odd C_out, and a 1×1 with 2 splits of 5 tiles.
    conv_case(rng, 2, 4, 4, 64, 72, 3, 1, 1, true, true, 3);
    conv_case(rng, 1, 3, 5, 128, 131, 3, 1, 1, true, true, 5);
    conv_case(rng, 1, 6, 6, 64, 40, 3, 2, 1, false, true, 4);
    conv_case(rng, 1, 4, 4, 320, 24, 1, 1, 0, true, false, 2);
    // The Hopper (wgmma) kernel: the same awkward shapes (m and n edges, stride 2, a k tail of
    // 16 or 48 channels inside the last 64-wide k-tile, odd C_out, residual) and split-K.
    conv_case(rng, 1, 17, 15, 64, 72, 3, 2, 1, true, false, 1, true);
    conv_case(rng, 2, 9, 7, 16, 24, 3, 1, 1, false, true, 1, true);
    conv_case(rng, 1, 8, 8, 64, 136, 1, 1, 0, true, true, 1, true);
    conv_case(rng, 1, 12, 11, 40, 3, 3, 1, 1, true, false, 1, true);
    conv_case(rng, 1, 12, 12, 48, 131, 3, 1, 1, true, true, 1, true);
    conv_case(rng, 2, 4, 4, 64, 72, 3, 1, 1, true, true, 3, true);
    conv_case(rng, 1, 4, 4, 320, 24, 1, 1, 0, true, false, 2, true);
    // Norms.
    group_norm_case(rng, 2, 63, 64, 32, true, 0.0f);
    group_norm_case(rng, 1, 9, 30, 3, true, 0.0f);
    group_norm_case(rng, 1, 16, 2560, 32, false, 0.0f);
    group_norm_case(rng, 2, 40, 64, 8, false, 20.0f);
    group_norm_case(rng, 1, 3000, 16, 4, true, 0.0f);  // several statistics chunks
    layer_norm_case(rng, 15, 40, 0.0f);
    layer_norm_case(rng, 6, 64, 0.0f);
    layer_norm_case(rng, 1, 7, 10.0f);
    elementwise_cases(rng);
    std::printf("%d failure(s)\n", failures);
    return failures == 0 ? 0 : 1;
}
