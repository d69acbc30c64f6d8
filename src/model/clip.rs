//! transformers `CLIPTextModel` (the OpenCLIP ViT-H text tower of SD 2.x): token + position
//! embeddings, pre-LN causal transformer layers with exact GELU, `final_layer_norm`.

use crate::backend::{Backend, Mask};
use crate::config::ClipTextConfig;
use crate::model::layers::{LayerNorm, Linear};
use crate::weights::WeightScope;
use crate::{Error, Result};

struct ClipLayer<B: Backend> {
    layer_norm1: LayerNorm<B>,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    out_proj: Linear<B>,
    layer_norm2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

/// The text encoder; its last hidden state is the UNet's context.
pub struct ClipTextModel<B: Backend> {
    config: ClipTextConfig,
    token_embedding: B::Tensor,
    position_embedding: B::Tensor,
    layers: Vec<ClipLayer<B>>,
    final_layer_norm: LayerNorm<B>,
}

impl<B: Backend> ClipTextModel<B> {
    /// Builds the encoder from the tensors under `w` (the root of `text_encoder/*.safetensors`).
    pub fn load(w: &WeightScope<B>, config: &ClipTextConfig) -> Result<Self> {
        config.validate()?;
        let d = config.hidden_size;
        let ff = config.intermediate_size;
        let eps = config.layer_norm_eps;
        // transformers ≤ 4 (the SD 2.1 repositories) saves under `text_model.`; transformers 5
        // saves the same tensors without the prefix.
        let m = if w.contains("text_model.embeddings.token_embedding.weight") {
            w.pp("text_model")
        } else {
            w.clone()
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = m.pp("encoder.layers").pp(i);
                let a = l.pp("self_attn");
                Ok(ClipLayer {
                    layer_norm1: LayerNorm::load(&l.pp("layer_norm1"), d, eps)?,
                    q_proj: Linear::load(&a.pp("q_proj"), d, d)?,
                    k_proj: Linear::load(&a.pp("k_proj"), d, d)?,
                    v_proj: Linear::load(&a.pp("v_proj"), d, d)?,
                    out_proj: Linear::load(&a.pp("out_proj"), d, d)?,
                    layer_norm2: LayerNorm::load(&l.pp("layer_norm2"), d, eps)?,
                    fc1: Linear::load(&l.pp("mlp.fc1"), d, ff)?,
                    fc2: Linear::load(&l.pp("mlp.fc2"), ff, d)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(ClipTextModel {
            config: config.clone(),
            token_embedding: m
                .tensor("embeddings.token_embedding.weight", &[config.vocab_size, d])?,
            position_embedding: m.tensor(
                "embeddings.position_embedding.weight",
                &[config.max_position_embeddings, d],
            )?,
            layers,
            final_layer_norm: LayerNorm::load(&m.pp("final_layer_norm"), d, eps)?,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `ids`: one row of token ids per prompt, all the same length N ≤ max positions →
    /// last hidden state `[B, N, D]`.
    pub fn forward(&self, b: &B, ids: &[Vec<u32>]) -> Result<B::Tensor> {
        let batch = ids.len();
        let n = ids.first().map_or(0, Vec::len);
        if batch == 0
            || n == 0
            || n > self.config.max_position_embeddings
            || ids.iter().any(|r| r.len() != n)
        {
            return Err(Error::InvalidArgument(format!(
                "text encoder needs rows of equal length between 1 and {} tokens",
                self.config.max_position_embeddings
            )));
        }
        let d = self.config.hidden_size;
        let flat: Vec<u32> = ids.concat();
        let tokens = b.embedding(&flat, &self.token_embedding)?; // [B·N, D]
        let positions: Vec<u32> = (0..batch).flat_map(|_| 0..n as u32).collect();
        let positions = b.embedding(&positions, &self.position_embedding)?; // [B·N, D]
        let mut x = b.reshape(&b.add(&tokens, &positions)?, &[batch, n, d])?; // [B, N, D]
        let heads = self.config.num_attention_heads;
        for layer in &self.layers {
            let h = layer.layer_norm1.forward(b, &x)?; // [B, N, D]
            let q = layer.q_proj.forward(b, &h)?; // [B, N, D]
            let k = layer.k_proj.forward(b, &h)?; // [B, N, D]
            let v = layer.v_proj.forward(b, &h)?; // [B, N, D]
            let h = b.attention(&q, &k, &v, heads, Mask::Causal)?; // [B, N, D], causal
            x = b.add(&layer.out_proj.forward(b, &h)?, &x)?; // [B, N, D]
            let h = layer.layer_norm2.forward(b, &x)?; // [B, N, D]
            let h = b.gelu(&layer.fc1.forward(b, &h)?)?; // [B, N, F]
            x = b.add(&layer.fc2.forward(b, &h)?, &x)?; // [B, N, D]
        }
        self.final_layer_norm.forward(b, &x) // [B, N, D]
    }
}
