//! The ops of the op set at the shapes SD 2.1 really runs, with the FLOPs and the bytes each must
//! move (counted by formula), and the timing harness that runs them on any backend.

use std::time::Instant;

use anyhow::Result;
use sd21::backend::{Activation, Backend, Mask};

use crate::device::BenchDevice;
use sd21::random::SeededRng;

/// One op at one shape. Activations are NHWC / `[B, N, C]` as in the models.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OpCase {
    Conv {
        batch: usize,
        h: usize,
        w: usize,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
    },
    GroupNorm {
        batch: usize,
        h: usize,
        w: usize,
        c: usize,
        groups: usize,
        activation: Activation,
    },
    LayerNorm {
        rows: usize,
        c: usize,
    },
    Linear {
        rows: usize,
        k: usize,
        n: usize,
    },
    Attention {
        batch: usize,
        nq: usize,
        nk: usize,
        c: usize,
        heads: usize,
    },
    Geglu {
        rows: usize,
        f: usize,
    },
    Upsample {
        batch: usize,
        h: usize,
        w: usize,
        c: usize,
    },
    Concat {
        batch: usize,
        h: usize,
        w: usize,
        ca: usize,
        cb: usize,
    },
}

/// A named op case.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub op: OpCase,
}

impl OpCase {
    /// Floating-point operations (a multiply-add is 2); elementwise ops count their arithmetic.
    pub fn flops(&self) -> f64 {
        let f = |x: usize| x as f64;
        match *self {
            OpCase::Conv {
                batch,
                h,
                w,
                cin,
                cout,
                k,
                stride,
            } => {
                let (ho, wo) = conv_out(h, w, k, stride);
                2.0 * f(batch * ho * wo) * f(cout) * f(cin * k * k)
            }
            OpCase::Linear { rows, k, n } => 2.0 * f(rows) * f(k) * f(n),
            // QKᵀ and P·V, each 2·Nq·Nk·D per head: 4·B·Nq·Nk·C in all.
            OpCase::Attention {
                batch, nq, nk, c, ..
            } => 4.0 * f(batch) * f(nq) * f(nk) * f(c),
            OpCase::GroupNorm { batch, h, w, c, .. } => 8.0 * f(batch * h * w * c),
            OpCase::LayerNorm { rows, c } => 8.0 * f(rows * c),
            OpCase::Geglu { rows, f: ff } => 10.0 * f(rows * ff),
            OpCase::Upsample { .. } | OpCase::Concat { .. } => 0.0,
        }
    }

    /// The least bytes the op must read and write with `elem` bytes per value (every input once,
    /// every output once).
    pub fn bytes(&self, elem: usize) -> f64 {
        let values = match *self {
            OpCase::Conv {
                batch,
                h,
                w,
                cin,
                cout,
                k,
                stride,
            } => {
                let (ho, wo) = conv_out(h, w, k, stride);
                batch * h * w * cin + cout * k * k * cin + cout + batch * ho * wo * cout
            }
            OpCase::Linear { rows, k, n } => rows * k + n * k + n + rows * n,
            OpCase::Attention {
                batch, nq, nk, c, ..
            } => 2 * batch * nq * c + 2 * batch * nk * c,
            OpCase::GroupNorm { batch, h, w, c, .. } => 2 * batch * h * w * c + 2 * c,
            OpCase::LayerNorm { rows, c } => 2 * rows * c + 2 * c,
            OpCase::Geglu { rows, f } => 3 * rows * f,
            OpCase::Upsample { batch, h, w, c } => 5 * batch * h * w * c,
            OpCase::Concat {
                batch,
                h,
                w,
                ca,
                cb,
            } => 2 * batch * h * w * (ca + cb),
        };
        (values * elem) as f64
    }

    /// Builds random inputs on the backend; `variant` changes the values so repeated runs can
    /// rotate through several input sets.
    fn inputs<B: Backend>(&self, backend: &B, variant: u64) -> Result<Vec<B::Tensor>> {
        let mut rng = SeededRng::new(variant);
        let mut tensor = |shape: Vec<usize>, scale: f32| -> Result<B::Tensor> {
            Ok(backend.upload(&rng.tensor(&shape, scale)?)?)
        };
        Ok(match *self {
            OpCase::Conv {
                batch,
                h,
                w,
                cin,
                cout,
                k,
                ..
            } => vec![
                tensor(vec![batch, h, w, cin], 1.0)?,
                tensor(vec![cout, k, k, cin], 0.05)?,
                tensor(vec![cout], 0.1)?,
            ],
            OpCase::Linear { rows, k, n } => {
                vec![
                    tensor(vec![rows, k], 1.0)?,
                    tensor(vec![n, k], 0.05)?,
                    tensor(vec![n], 0.1)?,
                ]
            }
            OpCase::Attention {
                batch, nq, nk, c, ..
            } => vec![
                tensor(vec![batch, nq, c], 1.0)?,
                tensor(vec![batch, nk, c], 1.0)?,
                tensor(vec![batch, nk, c], 1.0)?,
            ],
            OpCase::GroupNorm { batch, h, w, c, .. } => {
                vec![
                    tensor(vec![batch, h, w, c], 1.0)?,
                    tensor(vec![c], 1.0)?,
                    tensor(vec![c], 0.1)?,
                ]
            }
            OpCase::LayerNorm { rows, c } => {
                vec![
                    tensor(vec![rows, c], 1.0)?,
                    tensor(vec![c], 1.0)?,
                    tensor(vec![c], 0.1)?,
                ]
            }
            OpCase::Geglu { rows, f } => vec![tensor(vec![rows, 2 * f], 1.0)?],
            OpCase::Upsample { batch, h, w, c } => vec![tensor(vec![batch, h, w, c], 1.0)?],
            OpCase::Concat {
                batch,
                h,
                w,
                ca,
                cb,
            } => vec![
                tensor(vec![batch, h, w, ca], 1.0)?,
                tensor(vec![batch, h, w, cb], 1.0)?,
            ],
        })
    }

    fn run<B: Backend>(&self, backend: &B, t: &[B::Tensor]) -> Result<B::Tensor> {
        Ok(match *self {
            OpCase::Conv { k, stride, .. } => {
                backend.conv2d(&t[0], &t[1], Some(&t[2]), stride, k / 2, None)?
            }
            OpCase::Linear { .. } => backend.linear(&t[0], &t[1], Some(&t[2]))?,
            OpCase::Attention { heads, .. } => {
                backend.attention(&t[0], &t[1], &t[2], heads, Mask::None)?
            }
            OpCase::GroupNorm {
                groups, activation, ..
            } => backend.group_norm(&t[0], groups, &t[1], &t[2], 1e-5, activation)?,
            OpCase::LayerNorm { .. } => backend.layer_norm(&t[0], &t[1], &t[2], 1e-5)?,
            OpCase::Geglu { .. } => backend.geglu(&t[0])?,
            OpCase::Upsample { h, w, .. } => backend.upsample_nearest(&t[0], 2 * h, 2 * w)?,
            OpCase::Concat { .. } => backend.concat_channels(&t[0], &t[1])?,
        })
    }
}

fn conv_out(h: usize, w: usize, k: usize, stride: usize) -> (usize, usize) {
    let pad = k / 2;
    (
        (h + 2 * pad - k) / stride + 1,
        (w + 2 * pad - k) / stride + 1,
    )
}

/// The op cases of one SD 2.1 generation at `image`×`image` pixels: UNet at latent size
/// image/8 with CFG (batch 2), VAE decoder at full size (batch 1).
pub fn sd21_cases(image: usize) -> Vec<Case> {
    let s = image / 8; // latent side: 64 at 512², 96 at 768²
    let mut cases = Vec::new();
    let mut add = |name: String, op: OpCase| cases.push(Case { name, op });
    let levels = [
        (s, 320, 5),
        (s / 2, 640, 10),
        (s / 4, 1280, 20),
        (s / 8, 1280, 20),
    ];
    for (i, &(side, c, heads)) in levels.iter().enumerate() {
        let n = side * side;
        add(
            format!("unet conv3x3 {side}x{side}x{c}->{c} b2"),
            OpCase::Conv {
                batch: 2,
                h: side,
                w: side,
                cin: c,
                cout: c,
                k: 3,
                stride: 1,
            },
        );
        add(
            format!("unet groupnorm+silu {side}x{side}x{c}/32 b2"),
            OpCase::GroupNorm {
                batch: 2,
                h: side,
                w: side,
                c,
                groups: 32,
                activation: Activation::Silu,
            },
        );
        if i < 3 {
            add(
                format!("unet conv3x3 s2 {side}x{side}x{c} b2"),
                OpCase::Conv {
                    batch: 2,
                    h: side,
                    w: side,
                    cin: c,
                    cout: c,
                    k: 3,
                    stride: 2,
                },
            );
            add(
                format!("unet self-attn {heads}h x {n} x 64 b2"),
                OpCase::Attention {
                    batch: 2,
                    nq: n,
                    nk: n,
                    c,
                    heads,
                },
            );
            add(
                format!("unet cross-attn {heads}h x {n} x 77 b2"),
                OpCase::Attention {
                    batch: 2,
                    nq: n,
                    nk: 77,
                    c,
                    heads,
                },
            );
            add(
                format!("unet layernorm {n}x{c} b2"),
                OpCase::LayerNorm { rows: 2 * n, c },
            );
            add(
                format!("unet linear to_q {n}x{c}->{c} b2"),
                OpCase::Linear {
                    rows: 2 * n,
                    k: c,
                    n: c,
                },
            );
            add(
                format!("unet linear ff.proj {n}x{c}->{} b2", 8 * c),
                OpCase::Linear {
                    rows: 2 * n,
                    k: c,
                    n: 8 * c,
                },
            );
            add(
                format!("unet geglu {n}x{} b2", 4 * c),
                OpCase::Geglu {
                    rows: 2 * n,
                    f: 4 * c,
                },
            );
            add(
                format!("unet linear ff.out {n}x{}->{c} b2", 4 * c),
                OpCase::Linear {
                    rows: 2 * n,
                    k: 4 * c,
                    n: c,
                },
            );
            add(
                format!("unet linear to_k ctx 77x1024->{c} b2"),
                OpCase::Linear {
                    rows: 154,
                    k: 1024,
                    n: c,
                },
            );
        }
    }
    add(
        format!("unet conv1x1 shortcut {0}x{0}x960->640 b2", s / 2),
        OpCase::Conv {
            batch: 2,
            h: s / 2,
            w: s / 2,
            cin: 960,
            cout: 640,
            k: 1,
            stride: 1,
        },
    );
    add(
        format!("unet concat {s}x{s}x320+320 b2"),
        OpCase::Concat {
            batch: 2,
            h: s,
            w: s,
            ca: 320,
            cb: 320,
        },
    );
    add(
        format!("unet upsample {0}x{0}x640 b2", s / 2),
        OpCase::Upsample {
            batch: 2,
            h: s / 2,
            w: s / 2,
            c: 640,
        },
    );
    // VAE decoder at full resolution, batch 1.
    for &(side, c) in &[(s, 512), (image / 4, 512), (image / 2, 256), (image, 128)] {
        add(
            format!("vae conv3x3 {side}x{side}x{c}->{c}"),
            OpCase::Conv {
                batch: 1,
                h: side,
                w: side,
                cin: c,
                cout: c,
                k: 3,
                stride: 1,
            },
        );
        add(
            format!("vae groupnorm+silu {side}x{side}x{c}/32"),
            OpCase::GroupNorm {
                batch: 1,
                h: side,
                w: side,
                c,
                groups: 32,
                activation: Activation::Silu,
            },
        );
    }
    add(
        format!("vae attention 1h x {} x 512", s * s),
        OpCase::Attention {
            batch: 1,
            nq: s * s,
            nk: s * s,
            c: 512,
            heads: 1,
        },
    );
    add(
        format!("vae upsample {0}x{0}x256", image / 2),
        OpCase::Upsample {
            batch: 1,
            h: image / 2,
            w: image / 2,
            c: 256,
        },
    );
    cases
}

/// A small shape set for smoke tests.
pub fn smoke_cases() -> Vec<Case> {
    vec![
        Case {
            name: "conv3x3 16x16x32->32".into(),
            op: OpCase::Conv {
                batch: 2,
                h: 16,
                w: 16,
                cin: 32,
                cout: 32,
                k: 3,
                stride: 1,
            },
        },
        Case {
            name: "groupnorm 16x16x32/8".into(),
            op: OpCase::GroupNorm {
                batch: 2,
                h: 16,
                w: 16,
                c: 32,
                groups: 8,
                activation: Activation::Silu,
            },
        },
        Case {
            name: "attention 2h x 256 x 77".into(),
            op: OpCase::Attention {
                batch: 2,
                nq: 256,
                nk: 77,
                c: 32,
                heads: 2,
            },
        },
        Case {
            name: "linear 512x32->64".into(),
            op: OpCase::Linear {
                rows: 512,
                k: 32,
                n: 64,
            },
        },
        Case {
            name: "layernorm 512x32".into(),
            op: OpCase::LayerNorm { rows: 512, c: 32 },
        },
        Case {
            name: "geglu 512x64".into(),
            op: OpCase::Geglu { rows: 512, f: 64 },
        },
        Case {
            name: "upsample 8x8x32".into(),
            op: OpCase::Upsample {
                batch: 1,
                h: 8,
                w: 8,
                c: 32,
            },
        },
        Case {
            name: "concat 8x8x16+16".into(),
            op: OpCase::Concat {
                batch: 1,
                h: 8,
                w: 8,
                ca: 16,
                cb: 16,
            },
        },
    ]
}

/// How long something took: the median of the repeats, in seconds.
pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Times `case` on `backend`: warm-up runs, then the median of `repeats` timed runs, rotating
/// through `input_sets` different inputs so caches do not flatter.
pub fn time_case<B: BenchDevice>(
    backend: &B,
    op: &OpCase,
    repeats: usize,
    input_sets: usize,
) -> Result<f64> {
    let sets = (0..input_sets.max(1) as u64)
        .map(|v| op.inputs(backend, v + 1))
        .collect::<Result<Vec<_>>>()?;
    for set in sets.iter().take(2) {
        op.run(backend, set)?;
    }
    backend.synchronize()?;
    let mut samples = Vec::with_capacity(repeats);
    for i in 0..repeats.max(1) {
        let set = &sets[i % sets.len()];
        let start = Instant::now();
        let out = op.run(backend, set)?;
        backend.synchronize()?;
        samples.push(start.elapsed().as_secs_f64());
        drop(out);
    }
    Ok(median(samples))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flop_formulas() {
        // conv 3×3 64×64×320→320 batch 2: 2·(2·64·64)·320·(320·9)
        let conv = OpCase::Conv {
            batch: 2,
            h: 64,
            w: 64,
            cin: 320,
            cout: 320,
            k: 3,
            stride: 1,
        };
        assert_eq!(conv.flops(), 2.0 * 8192.0 * 320.0 * 2880.0);
        // stride 2 halves each side (padding 1): 32×32 outputs
        let down = OpCase::Conv {
            batch: 1,
            h: 64,
            w: 64,
            cin: 8,
            cout: 8,
            k: 3,
            stride: 2,
        };
        assert_eq!(down.flops(), 2.0 * 1024.0 * 8.0 * 72.0);
        let odd = OpCase::Conv {
            batch: 1,
            h: 7,
            w: 9,
            cin: 1,
            cout: 1,
            k: 3,
            stride: 2,
        };
        assert_eq!(odd.flops(), 2.0 * (4.0 * 5.0) * 9.0);
        assert_eq!(
            OpCase::Linear {
                rows: 10,
                k: 3,
                n: 4
            }
            .flops(),
            240.0
        );
        // 5 heads × 4096 × 4096 × 64, two matmuls, batch 2
        let attn = OpCase::Attention {
            batch: 2,
            nq: 4096,
            nk: 4096,
            c: 320,
            heads: 5,
        };
        assert_eq!(attn.flops(), 4.0 * 2.0 * 4096.0 * 4096.0 * 320.0);
    }

    #[test]
    fn byte_formulas() {
        let linear = OpCase::Linear {
            rows: 10,
            k: 3,
            n: 4,
        };
        assert_eq!(linear.bytes(4), ((30 + 12 + 4 + 40) * 4) as f64);
        let gn = OpCase::GroupNorm {
            batch: 1,
            h: 2,
            w: 2,
            c: 8,
            groups: 2,
            activation: Activation::None,
        };
        assert_eq!(gn.bytes(2), ((64 + 16) * 2) as f64);
        let attn = OpCase::Attention {
            batch: 1,
            nq: 10,
            nk: 77,
            c: 8,
            heads: 1,
        };
        assert_eq!(attn.bytes(4), ((2 * 80 + 2 * 616) * 4) as f64);
        let up = OpCase::Upsample {
            batch: 1,
            h: 2,
            w: 2,
            c: 3,
        };
        assert_eq!(up.bytes(4), ((12 + 48) * 4) as f64);
        let conv = OpCase::Conv {
            batch: 1,
            h: 4,
            w: 4,
            cin: 2,
            cout: 3,
            k: 1,
            stride: 1,
        };
        assert_eq!(conv.bytes(4), ((32 + 6 + 3 + 48) * 4) as f64);
    }

    #[test]
    fn sd21_shape_lists_cover_the_op_set() {
        let cases = sd21_cases(512);
        let has = |p: fn(&OpCase) -> bool| cases.iter().any(|c| p(&c.op));
        assert!(has(|o| matches!(
            o,
            OpCase::Conv {
                h: 64,
                cin: 320,
                k: 3,
                stride: 1,
                batch: 2,
                ..
            }
        )));
        assert!(has(|o| matches!(
            o,
            OpCase::Attention {
                nq: 4096,
                nk: 77,
                ..
            }
        )));
        assert!(has(|o| matches!(
            o,
            OpCase::Attention {
                nq: 4096,
                nk: 4096,
                heads: 5,
                ..
            }
        )));
        assert!(has(|o| matches!(
            o,
            OpCase::Conv {
                h: 512,
                cin: 128,
                ..
            }
        )));
        assert!(sd21_cases(768).iter().any(|c| matches!(
            c.op,
            OpCase::Attention {
                nq: 9216,
                nk: 9216,
                ..
            }
        )));
    }
}
