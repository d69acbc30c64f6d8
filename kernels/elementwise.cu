// elementwise.cu — the memory-bound ops: f32↔f16 casts, GELU, SiLU, GEGLU, add, per-channel add
// (also the bias of linear layers), nearest upsample, channel concat, embedding gather, and a
// fill used to poison fresh outputs in debug mode.
//
// Thread mapping (every kernel here): a 1-D grid-stride loop over OUTPUT elements in chunks of
// 8; thread t handles elements [8t, 8t+8) of its stride. When the 8 outputs come from 8
// consecutive, 16-byte-aligned inputs (the channel counts are multiples of 8: every SD 2.1
// shape), the chunk moves as one 16-byte load and store; otherwise, and for the tail, it falls
// back to scalar accesses. Math is f32; storage f16 (casts excepted).
#include "common.cuh"

using namespace sd21;

// Loop over this thread's chunks: `base` is the first element of the chunk.
#define FOR_EACH_CHUNK(n)                                                                  \
    for (long long base = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8; base < (n); \
         base += (long long)gridDim.x * blockDim.x * 8)

// ---------------------------------------------------------------- casts and fill

extern "C" __global__ void cast_f32_to_f16(const float *__restrict__ x, __half *__restrict__ y,
                                           long long n) {
    FOR_EACH_CHUNK(n) {
        if (base + 8 <= n) {
            const float4 a = *reinterpret_cast<const float4 *>(x + base);
            const float4 b = *reinterpret_cast<const float4 *>(x + base + 4);
            const float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            store8(y + base, f);
        } else {
            for (long long i = base; i < n; ++i) y[i] = __float2half_rn(x[i]);
        }
    }
}

extern "C" __global__ void cast_f16_to_f32(const __half *__restrict__ x, float *__restrict__ y,
                                           long long n) {
    FOR_EACH_CHUNK(n) {
        if (base + 8 <= n) {
            float f[8];
            load8(x + base, f);
            *reinterpret_cast<float4 *>(y + base) = make_float4(f[0], f[1], f[2], f[3]);
            *reinterpret_cast<float4 *>(y + base + 4) = make_float4(f[4], f[5], f[6], f[7]);
        } else {
            for (long long i = base; i < n; ++i) y[i] = __half2float(x[i]);
        }
    }
}

// y[i] = bits (as raw 16-bit patterns; 0xFFFF is a NaN in f16).
extern "C" __global__ void fill_u16(unsigned short *__restrict__ y, long long n,
                                    unsigned short bits) {
    FOR_EACH_CHUNK(n) {
        for (long long i = base; i < n && i < base + 8; ++i) y[i] = bits;
    }
}

// ---------------------------------------------------------------- unary activations

struct Gelu {
    SD21_DEV float operator()(float v) const { return gelu_erf(v); }
};
struct Silu {
    SD21_DEV float operator()(float v) const { return silu(v); }
};

template <typename F>
SD21_DEV void unary(const __half *__restrict__ x, __half *__restrict__ y, long long n, F f) {
    FOR_EACH_CHUNK(n) {
        if (base + 8 <= n) {
            float v[8];
            load8(x + base, v);
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = f(v[i]);
            store8(y + base, v);
        } else {
            for (long long i = base; i < n; ++i) y[i] = __float2half_rn(f(__half2float(x[i])));
        }
    }
}

extern "C" __global__ void gelu_f16(const __half *__restrict__ x, __half *__restrict__ y,
                                    long long n) {
    unary(x, y, n, Gelu{});
}

extern "C" __global__ void silu_f16(const __half *__restrict__ x, __half *__restrict__ y,
                                    long long n) {
    unary(x, y, n, Silu{});
}

// ---------------------------------------------------------------- binary

// y = a + b, same shapes.
extern "C" __global__ void add_f16(const __half *__restrict__ a, const __half *__restrict__ b,
                                   __half *__restrict__ y, long long n) {
    FOR_EACH_CHUNK(n) {
        if (base + 8 <= n) {
            float u[8], v[8];
            load8(a + base, u);
            load8(b + base, v);
#pragma unroll
            for (int i = 0; i < 8; ++i) u[i] += v[i];
            store8(y + base, u);
        } else {
            for (long long i = base; i < n; ++i)
                y[i] = __float2half_rn(__half2float(a[i]) + __half2float(b[i]));
        }
    }
}

// y[i] = x[i] + v[(i / batch_elems)·C + i % C]: x [B, .., C] plus v [B, C] broadcast over the
// middle dimensions. With batch_elems = n it is the bias add of a linear layer (v = bias [C]).
// May run in place (y == x): each element is read and written by the same thread.
extern "C" __global__ void add_per_channel_f16(const __half *x, const __half *__restrict__ v,
                                               __half *y, long long n, int channels,
                                               long long batch_elems) {
    const bool vec = channels % 8 == 0;
    FOR_EACH_CHUNK(n) {
        if (vec && base + 8 <= n) {
            const long long c = base % channels;
            const long long vb = (base / batch_elems) * channels;
            float u[8], w[8];
            load8(x + base, u);
            load8(v + vb + c, w);
#pragma unroll
            for (int i = 0; i < 8; ++i) u[i] += w[i];
            store8(y + base, u);
        } else {
            for (long long i = base; i < n && i < base + 8; ++i) {
                const long long vi = (i / batch_elems) * channels + i % channels;
                y[i] = __float2half_rn(__half2float(x[i]) + __half2float(v[vi]));
            }
        }
    }
}

// GEGLU: x [rows, 2F] → y [rows, F], y = x[.., :F] · gelu(x[.., F:]) (diffusers' chunk(2) order:
// hidden first, gate second).
extern "C" __global__ void geglu_f16(const __half *__restrict__ x, __half *__restrict__ y,
                                     long long n, int f) {
    const bool vec = f % 8 == 0;
    FOR_EACH_CHUNK(n) {
        if (vec && base + 8 <= n) {
            const long long r = base / f, j = base % f;
            const __half *row = x + r * 2 * f;
            float h[8], g[8];
            load8(row + j, h);
            load8(row + f + j, g);
#pragma unroll
            for (int i = 0; i < 8; ++i) h[i] *= gelu_erf(g[i]);
            store8(y + base, h);
        } else {
            for (long long i = base; i < n && i < base + 8; ++i) {
                const long long r = i / f, j = i % f;
                const __half *row = x + r * 2 * f;
                y[i] = __float2half_rn(__half2float(row[j]) * gelu_erf(__half2float(row[f + j])));
            }
        }
    }
}

// ---------------------------------------------------------------- data movement

// Nearest resize, NHWC. Output element (b, oy, ox, c) copies input (b, sy, sx, c) with
// sy = min(⌊oy·scale_h⌋, in_h − 1) and likewise for x (PyTorch's `nearest`).
extern "C" __global__ void upsample_nearest_f16(const __half *__restrict__ x,
                                                __half *__restrict__ y, UpsampleParams p) {
    const long long n = (long long)p.batch * p.out_h * p.out_w * p.channels;
    const bool vec = p.channels % 8 == 0;
    FOR_EACH_CHUNK(n) {
        for (long long i = base; i < n && i < base + 8; i += (vec ? 8 : 1)) {
            const int c = (int)(i % p.channels);
            long long rest = i / p.channels;
            const int ox = (int)(rest % p.out_w);
            rest /= p.out_w;
            const int oy = (int)(rest % p.out_h);
            const long long b = rest / p.out_h;
            const int sy = min((int)floorf((float)oy * p.scale_h), p.in_h - 1);
            const int sx = min((int)floorf((float)ox * p.scale_w), p.in_w - 1);
            const long long src = ((b * p.in_h + sy) * p.in_w + sx) * p.channels + c;
            if (vec) {
                *reinterpret_cast<Half8 *>(y + i) = *reinterpret_cast<const Half8 *>(x + src);
            } else {
                y[i] = x[src];
            }
        }
    }
}

// Zero padding, NHWC: output element (b, oy, ox, c) is input (b, oy − top, ox − left, c) where
// that lies inside the input, else 0.
extern "C" __global__ void pad_f16(const __half *__restrict__ x, __half *__restrict__ y,
                                   PadParams p) {
    const long long n = (long long)p.batch * p.out_h * p.out_w * p.channels;
    FOR_EACH_CHUNK(n) {
        for (long long i = base; i < n && i < base + 8; ++i) {
            const int c = (int)(i % p.channels);
            long long rest = i / p.channels;
            const int ox = (int)(rest % p.out_w);
            rest /= p.out_w;
            const int oy = (int)(rest % p.out_h);
            const long long b = rest / p.out_h;
            const int sy = oy - p.top, sx = ox - p.left;
            const bool inside = sy >= 0 && sy < p.in_h && sx >= 0 && sx < p.in_w;
            y[i] = inside ? x[((b * p.in_h + sy) * p.in_w + sx) * p.channels + c]
                          : __float2half_rn(0.0f);
        }
    }
}

// y [rows, ca + cb] = [a [rows, ca] | b [rows, cb]].
extern "C" __global__ void concat_channels_f16(const __half *__restrict__ a,
                                               const __half *__restrict__ b,
                                               __half *__restrict__ y, long long rows, int ca,
                                               int cb) {
    const int ct = ca + cb;
    const long long n = rows * ct;
    const bool vec = ca % 8 == 0 && cb % 8 == 0;
    FOR_EACH_CHUNK(n) {
        for (long long i = base; i < n && i < base + 8; i += (vec ? 8 : 1)) {
            const long long r = i / ct;
            const int c = (int)(i % ct);
            const __half *src = c < ca ? a + r * ca + c : b + r * cb + (c - ca);
            if (vec) {
                *reinterpret_cast<Half8 *>(y + i) = *reinterpret_cast<const Half8 *>(src);
            } else {
                y[i] = *src;
            }
        }
    }
}

// y [n_ids, d] = table[ids[r]] row by row. The ids were range-checked on the host.
extern "C" __global__ void embedding_f16(const unsigned int *__restrict__ ids,
                                         const __half *__restrict__ table, __half *__restrict__ y,
                                         long long n_ids, int d) {
    const long long n = n_ids * d;
    const bool vec = d % 8 == 0;
    FOR_EACH_CHUNK(n) {
        for (long long i = base; i < n && i < base + 8; i += (vec ? 8 : 1)) {
            const long long r = i / d;
            const int c = (int)(i % d);
            const __half *src = table + (long long)ids[r] * d + c;
            if (vec) {
                *reinterpret_cast<Half8 *>(y + i) = *reinterpret_cast<const Half8 *>(src);
            } else {
                y[i] = *src;
            }
        }
    }
}

// y[i] += bias[i % channels], in place: the bias of a linear layer after the cuBLAS GEMM.
extern "C" __global__ void bias_add_f16(__half *y, const __half *__restrict__ bias, long long n,
                                        int channels) {
    const bool vec = channels % 8 == 0;
    FOR_EACH_CHUNK(n) {
        if (vec && base + 8 <= n) {
            float u[8], w[8];
            load8(y + base, u);
            load8(bias + base % channels, w);
#pragma unroll
            for (int i = 0; i < 8; ++i) u[i] += w[i];
            store8(y + base, u);
        } else {
            for (long long i = base; i < n && i < base + 8; ++i)
                y[i] = __float2half_rn(__half2float(y[i]) + __half2float(bias[i % channels]));
        }
    }
}
