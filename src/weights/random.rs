//! Generated weights with the right names and shapes, for measuring full-size models without a
//! download (`sd21-bench pipeline --random`). Values are deterministic per tensor name and scaled
//! like a fresh PyTorch init (uniform ±1/√fan_in; norms near 1), so activations stay finite.

use crate::random::SeededRng;
use crate::tensor::HostTensor;
use crate::weights::TensorSource;
use crate::{Error, Result};

/// A [`TensorSource`] that invents every tensor a model asks for, in the current diffusers naming.
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomWeights {
    pub seed: u64,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        RandomWeights { seed }
    }
}

impl TensorSource for RandomWeights {
    fn contains(&self, name: &str) -> bool {
        // SD UNets have no q/k/v biases; legacy VAE attention names are not generated.
        let no_bias = ["to_q.bias", "to_k.bias", "to_v.bias"];
        let legacy = [".query.", ".key.", ".value.", ".proj_attn."];
        let in_unet_attention = name.contains("attn1.") || name.contains("attn2.");
        let is_unet_qkv_bias = in_unet_attention && no_bias.iter().any(|s| name.ends_with(s));
        let is_legacy_name = legacy.iter().any(|s| name.contains(s));
        !is_unet_qkv_bias && !is_legacy_name
    }

    fn shape_of(&self, _name: &str) -> Option<Vec<usize>> {
        None
    }

    fn get(&self, name: &str, expected: Option<&[usize]>) -> Result<HostTensor> {
        let shape = expected
            .ok_or_else(|| {
                Error::InvalidArgument(format!("random weights need a shape for `{name}`"))
            })?
            .to_vec();
        let numel: usize = shape.iter().product();
        let mut rng = SeededRng::new(self.seed ^ fnv1a(name));
        let mut uniform = move || rng.uniform();
        let is_norm = name.contains("norm") || name.contains("ln_");
        let data = if is_norm && name.ends_with("weight") {
            (0..numel).map(|_| 1.0 + 0.1 * uniform()).collect()
        } else if name.ends_with("bias") || is_norm {
            (0..numel).map(|_| 0.02 * uniform()).collect()
        } else {
            let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
            let scale = 1.0 / (fan_in as f32).sqrt();
            (0..numel).map(|_| scale * uniform()).collect()
        };
        HostTensor::new(shape, data)
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_named_and_scaled() {
        let w = RandomWeights::new(1);
        let a = w
            .get("down_blocks.0.resnets.0.conv1.weight", Some(&[8, 4, 3, 3]))
            .unwrap();
        let b = w
            .get("down_blocks.0.resnets.0.conv1.weight", Some(&[8, 4, 3, 3]))
            .unwrap();
        let c = w
            .get("down_blocks.0.resnets.0.conv2.weight", Some(&[8, 4, 3, 3]))
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let bound = 1.0 / 36f32.sqrt();
        assert!(
            a.data.iter().all(|v| v.abs() <= bound) && a.data.iter().any(|v| v.abs() > bound / 2.0)
        );
        let norm = w.get("norm1.weight", Some(&[16])).unwrap();
        assert!(norm.data.iter().all(|v| (0.9..=1.1).contains(v)));
        assert!(!w.contains("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.bias"));
        assert!(w.contains("decoder.mid_block.attentions.0.to_q.bias"));
        assert!(!w.contains("decoder.mid_block.attentions.0.query.weight"));
        assert!(w.get("x", None).is_err());
    }
}
