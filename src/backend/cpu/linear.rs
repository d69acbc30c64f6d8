//! Linear layers: `x [M, K] · Wᵀ` where `W [N, K]` is viewed as a `[K, N]` matrix with strides
//! (1, K), so no transposed copy exists. The bias is written into the output first and the GEMM
//! accumulates.

use super::gemm::{init_output, matmul, MatRef, Par};
use super::CpuTensor;
use crate::backend::contract::Linear;
use crate::Result;

pub(super) fn linear(op: Linear<'_, CpuTensor>) -> Result<CpuTensor> {
    let (rows, k, n) = (op.rows, op.k, op.n);
    let (mut out, accumulate) = init_output(rows, n, op.bias, None);
    matmul(
        &mut out,
        n,
        rows,
        n,
        k,
        MatRef::new(op.x.data(), k, 1),
        MatRef::new(op.weight.data(), 1, k),
        accumulate,
        1.0,
        Par::Rayon,
    )?;
    CpuTensor::new(op.out_shape, out)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_close, Rng};
    use super::super::{CpuBackend, CpuTensor};
    use crate::backend::{Backend, Tensor};

    #[test]
    fn linear_matches_reference() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(31);
        for (xs, n, with_bias) in [
            (&[2usize, 77, 37][..], 19usize, true),
            (&[1, 5, 64], 33, false),
            (&[3, 1], 7, true),
            (&[13], 5, true),
        ] {
            let k = xs[xs.len() - 1];
            let x = rng.tensor(xs, 1.0);
            let w = rng.tensor(&[n, k], 0.5);
            let bias = rng.tensor(&[n], 1.0);
            let got = be.linear(&x, &w, with_bias.then_some(&bias)).unwrap();
            let mut want = Vec::new();
            for row in x.data().chunks(k) {
                for j in 0..n {
                    let mut acc = if with_bias {
                        bias.data()[j] as f64
                    } else {
                        0.0
                    };
                    for (d, &xv) in row.iter().enumerate() {
                        acc += xv as f64 * w.data()[j * k + d] as f64;
                    }
                    want.push(acc);
                }
            }
            let mut out_shape = xs.to_vec();
            *out_shape.last_mut().unwrap() = n;
            assert_close(&format!("linear {xs:?}→{n}"), &got, &out_shape, &want);
        }
    }

    #[test]
    fn linear_rejects_bad_shapes() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(32);
        let x = rng.tensor(&[2, 3, 8], 1.0);
        assert!(be.linear(&x, &rng.tensor(&[4, 7], 1.0), None).is_err());
        assert!(be.linear(&x, &rng.tensor(&[4, 8, 1], 1.0), None).is_err());
        let w = rng.tensor(&[4, 8], 1.0);
        assert!(be.linear(&x, &w, Some(&rng.tensor(&[5], 1.0))).is_err());
        let scalar = CpuTensor::new(vec![], vec![1.0]).unwrap();
        assert!(be.linear(&scalar, &w, None).is_err());
        // K = 0 and empty batches are fine.
        let x0 = CpuTensor::new(vec![3, 0], vec![]).unwrap();
        let w0 = CpuTensor::new(vec![4, 0], vec![]).unwrap();
        let b = rng.tensor(&[4], 1.0);
        let y = be.linear(&x0, &w0, Some(&b)).unwrap();
        assert_eq!(y.data(), [b.data(), b.data(), b.data()].concat());
        let huge = CpuTensor::new(vec![1 << 40, 0], vec![]).unwrap();
        assert!(be.linear(&huge, &huge, None).is_err(), "2⁸⁰-element output");
        let xe = CpuTensor::new(vec![0, 8], vec![]).unwrap();
        assert_eq!(be.linear(&xe, &w, None).unwrap().shape(), &[0, 4]);
    }
}
