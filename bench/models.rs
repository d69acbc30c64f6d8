//! The exact SD 2.1 component configs (as the sd2-community repositories ship them) and the tiny
//! fixture model's, so `sd21-bench pipeline --random` can build any of them with no download.

use anyhow::{bail, Result};
use sd21::demo::{SD21_BASE_SCHEDULER, TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE};
use sd21::pipeline::ModelConfigs;

const SD21_UNET: &str = r#"{"act_fn":"silu","attention_head_dim":[5,10,20,20],"block_out_channels":[320,640,1280,1280],
"center_input_sample":false,"cross_attention_dim":1024,"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D",
"CrossAttnDownBlock2D","DownBlock2D"],"downsample_padding":1,"dual_cross_attention":false,"flip_sin_to_cos":true,"freq_shift":0,
"in_channels":4,"layers_per_block":2,"mid_block_scale_factor":1,"norm_eps":1e-05,"norm_num_groups":32,"num_class_embeds":null,
"only_cross_attention":false,"out_channels":4,"sample_size":SAMPLE,"up_block_types":["UpBlock2D","CrossAttnUpBlock2D",
"CrossAttnUpBlock2D","CrossAttnUpBlock2D"],"use_linear_projection":true,"upcast_attention":UPCAST}"#;

const SD21_VAE: &str = r#"{"act_fn":"silu","block_out_channels":[128,256,512,512],"down_block_types":["DownEncoderBlock2D",
"DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D"],"in_channels":3,"latent_channels":4,"layers_per_block":2,
"norm_num_groups":32,"out_channels":3,"sample_size":768,"up_block_types":["UpDecoderBlock2D","UpDecoderBlock2D",
"UpDecoderBlock2D","UpDecoderBlock2D"]}"#;

const SD21_TEXT_ENCODER: &str = r#"{"architectures":["CLIPTextModel"],"hidden_act":"gelu","hidden_size":1024,
"intermediate_size":4096,"layer_norm_eps":1e-05,"max_position_embeddings":77,"num_attention_heads":16,
"num_hidden_layers":23,"projection_dim":512,"vocab_size":49408}"#;

const SD21_768_SCHEDULER: &str = r#"{"_class_name":"DDIMScheduler","beta_end":0.012,"beta_schedule":"scaled_linear",
"beta_start":0.00085,"clip_sample":false,"num_train_timesteps":1000,"prediction_type":"v_prediction","set_alpha_to_one":false,
"skip_prk_steps":true,"steps_offset":1,"trained_betas":null}"#;

/// A model the bench can build with random weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomModel {
    /// SD 2.1-base: 512×512, epsilon.
    Sd21_512,
    /// SD 2.1: 768×768, v-prediction, upcast attention.
    Sd21_768,
    /// The tiny test model's dimensions.
    Tiny,
}

impl RandomModel {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "sd21-512" => Ok(RandomModel::Sd21_512),
            "sd21-768" => Ok(RandomModel::Sd21_768),
            "tiny" => Ok(RandomModel::Tiny),
            other => bail!("unknown model `{other}` (sd21-512, sd21-768, tiny)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RandomModel::Sd21_512 => "sd21-512",
            RandomModel::Sd21_768 => "sd21-768",
            RandomModel::Tiny => "tiny",
        }
    }

    /// The scheduler config text.
    pub fn scheduler_text(self) -> &'static str {
        match self {
            RandomModel::Sd21_512 | RandomModel::Tiny => SD21_BASE_SCHEDULER,
            RandomModel::Sd21_768 => SD21_768_SCHEDULER,
        }
    }

    /// The component configs, parsed exactly as the model files would be.
    pub fn configs(self) -> Result<ModelConfigs> {
        let (unet, vae, text) = self.config_texts();
        Ok(ModelConfigs {
            unet: serde_json::from_str(&unet)?,
            vae: serde_json::from_str(&vae)?,
            text_encoder: serde_json::from_str(&text)?,
            scheduler: serde_json::from_str(self.scheduler_text())?,
        })
    }

    /// The config JSON texts (for the PyTorch reference script, so both sides build the same model).
    pub fn config_texts(self) -> (String, String, String) {
        match self {
            RandomModel::Sd21_512 => (
                SD21_UNET.replace("SAMPLE", "64").replace("UPCAST", "false"),
                SD21_VAE.to_string(),
                SD21_TEXT_ENCODER.to_string(),
            ),
            RandomModel::Sd21_768 => (
                SD21_UNET.replace("SAMPLE", "96").replace("UPCAST", "true"),
                SD21_VAE.to_string(),
                SD21_TEXT_ENCODER.to_string(),
            ),
            RandomModel::Tiny => (
                TINY_UNET.to_string(),
                TINY_VAE.to_string(),
                TINY_TEXT_ENCODER.to_string(),
            ),
        }
    }
}
