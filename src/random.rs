//! The one seeded generator (xorshift64*) behind random weights, the CUDA start-up checks, the
//! tests' inputs and the bench's: deterministic per seed, never all zeros.

use crate::tensor::HostTensor;
use crate::Result;

#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        SeededRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `n` values uniform in [-scale, scale).
    pub fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    /// A `shape` tensor of values uniform in [-scale, scale).
    pub fn tensor(&mut self, shape: &[usize], scale: f32) -> Result<HostTensor> {
        let n = shape.iter().product();
        HostTensor::new(shape.to_vec(), self.values(n, scale))
    }
}

#[cfg(test)]
mod tests {
    use super::SeededRng;

    #[test]
    fn same_seed_same_values_within_range() {
        let (a, b) = (
            SeededRng::new(7).values(1000, 2.0),
            SeededRng::new(7).values(1000, 2.0),
        );
        assert_eq!(a, b);
        assert!(a.iter().all(|v| (-2.0..2.0).contains(v)));
        assert_ne!(a, SeededRng::new(8).values(1000, 2.0));
        assert!(SeededRng::new(0).values(10, 1.0).iter().any(|&v| v != 0.0));
    }
}
