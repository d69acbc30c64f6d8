/* params.h — the structs passed by value to the kernels, shared with Rust.
 *
 * build.rs runs bindgen on this file, so the Rust side (src/backend/cuda/params.rs includes the
 * generated file) always has the same layout as the CUDA side. Plain C, no includes: `int` is
 * 32 bits and `long long` 64 bits on every platform CUDA supports. Tensor buffers are NOT in
 * here; they are separate kernel arguments so cudarc can track them. All tensors are row-major,
 * channels last (NHWC / [rows, C]); element offsets that can pass 2^31 are `long long`.
 */
#ifndef SD21_PARAMS_H
#define SD21_PARAMS_H

/* 2-D convolution, NHWC input [batch, in_h, in_w, in_c], OHWI weight
 * [out_c, kernel_h, kernel_w, in_c], output [batch, out_h, out_w, out_c]. */
typedef struct ConvParams {
    int batch;
    int in_h;
    int in_w;
    int in_c;
    int out_h;
    int out_w;
    int out_c;
    int kernel_h;
    int kernel_w;
    int stride;
    int pad;
    int has_bias;     /* bias [out_c] is read only when non-zero */
    int has_residual; /* residual [batch, out_h, out_w, out_c] is added when non-zero */
    /* conv2d_implicit_gemm split-K: `splits` blocks along gridDim.z each sum `k_tiles_per_split`
     * k-tiles of 32; with splits > 1 each writes f32 partial sums [splits, M, out_c] and
     * conv2d_splitk_reduce adds them up with the bias and residual. splits = 1: no partials. */
    int splits;
    int k_tiles_per_split;
} ConvParams;

/* Multi-head attention: q [batch, q_len, heads*head_dim], k and v [batch, kv_len, heads*head_dim],
 * out like q. */
typedef struct AttentionParams {
    int batch;
    int heads;
    int q_len;
    int kv_len;
    int head_dim;
    int causal;       /* mask key j > query i */
    float scale_log2; /* (1/sqrt(head_dim)) * log2(e): scores go straight into exp2 */
} AttentionParams;

/* Group norm over x [batch, spatial, channels] (any spatial shape flattened), `groups` groups
 * of channels/groups consecutive channels. The statistics pass splits the spatial axis into
 * `chunks` pieces of `chunk_len` rows. */
typedef struct GroupNormParams {
    int batch;
    int spatial;
    int channels;
    int groups;
    int chunks;
    int chunk_len;
    float eps;
    int silu;
} GroupNormParams;

/* Layer norm over the last dimension of x [rows, channels]. */
typedef struct LayerNormParams {
    int rows;
    int channels;
    float eps;
} LayerNormParams;

/* Nearest resize x [batch, in_h, in_w, channels] -> [batch, out_h, out_w, channels] with
 * PyTorch's rule: src = min(floor(dst * scale), in - 1), scale = in / out computed in f32 on the
 * host (the same float the CPU backend uses, so both pick the same source pixel). */
typedef struct UpsampleParams {
    int batch;
    int in_h;
    int in_w;
    int out_h;
    int out_w;
    int channels;
    float scale_h;
    float scale_w;
} UpsampleParams;

typedef struct PadParams {
    int batch;
    int in_h;
    int in_w;
    int out_h;
    int out_w;
    int channels;
    int top;
    int left;
} PadParams;

#endif /* SD21_PARAMS_H */
