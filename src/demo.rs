//! The demo model (`sd21 serve --model demo`): the tiny test model's SD 2.1 architecture with
//! random weights built in memory, so the page, the API and /docs work offline in seconds. Its
//! images are noise. The bench's `--random tiny` is the same model.

use crate::backend::{Backend, Device, OpenedBackend};
use crate::pipeline::{ComponentSources, ImageGenerator, ModelConfigs, Pipeline};
use crate::tokenizer::ClipTokenizer;
use crate::weights::RandomWeights;
use crate::Result;

/// The `--model` name that selects it.
pub const DEMO_MODEL: &str = "demo";

/// The name it reports (logs, /ready, PNG parameters).
pub const DEMO_MODEL_NAME: &str = "demo (random weights: its images are noise)";

/// The tiny model's UNet config (the fixture model's dimensions).
pub const TINY_UNET: &str = r#"{"attention_head_dim":[2,4,4,4],"block_out_channels":[16,32,32,32],"cross_attention_dim":32,
"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],"in_channels":4,
"layers_per_block":2,"norm_num_groups":8,"out_channels":4,"sample_size":8,"up_block_types":["UpBlock2D","CrossAttnUpBlock2D",
"CrossAttnUpBlock2D","CrossAttnUpBlock2D"],"use_linear_projection":true,"upcast_attention":true}"#;

/// Its VAE config.
pub const TINY_VAE: &str = r#"{"block_out_channels":[16,32,32,32],"down_block_types":["DownEncoderBlock2D","DownEncoderBlock2D",
"DownEncoderBlock2D","DownEncoderBlock2D"],"in_channels":3,"latent_channels":4,"layers_per_block":2,"norm_num_groups":8,
"out_channels":3,"up_block_types":["UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D"]}"#;

/// Its text encoder config.
pub const TINY_TEXT_ENCODER: &str = r#"{"hidden_act":"gelu","hidden_size":32,"intermediate_size":64,"num_attention_heads":4,
"num_hidden_layers":3,"vocab_size":49408}"#;

/// SD 2.1-base's scheduler config (PNDM, epsilon).
pub const SD21_BASE_SCHEDULER: &str = r#"{"_class_name":"PNDMScheduler","beta_end":0.012,"beta_schedule":"scaled_linear",
"beta_start":0.00085,"clip_sample":false,"num_train_timesteps":1000,"prediction_type":"epsilon","set_alpha_to_one":false,
"skip_prk_steps":true,"steps_offset":1,"trained_betas":null}"#;

/// The tiny model's configs, parsed as model files would be.
pub fn tiny_configs() -> Result<ModelConfigs> {
    fn parse<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T> {
        serde_json::from_str(text)
            .map_err(|e| crate::Error::Config(format!("the tiny model's {what} config: {e}")))
    }
    Ok(ModelConfigs {
        unet: parse("unet", TINY_UNET)?,
        vae: parse("vae", TINY_VAE)?,
        text_encoder: parse("text encoder", TINY_TEXT_ENCODER)?,
        scheduler: parse("scheduler", SD21_BASE_SCHEDULER)?,
    })
}

/// A model of these configs with random weights (seed 0) on `backend`, named `name` (the
/// demo's, and the bench's `--random` models).
pub fn random_model<B: Backend>(
    backend: B,
    configs: ModelConfigs,
    name: String,
) -> Result<Pipeline<B>> {
    let weights = RandomWeights::new(0);
    let sources = ComponentSources {
        text_encoder: &weights,
        unet: &weights,
        vae: &weights,
    };
    Pipeline::build(backend, ClipTokenizer::embedded()?, configs, sources, name)
}

/// The tiny model with random weights on `backend`, named `name`.
pub fn random_tiny<B: Backend>(backend: B, name: String) -> Result<Pipeline<B>> {
    random_model(backend, tiny_configs()?, name)
}

/// The demo model on the backend [`Device::open`] starts for `device`.
pub fn load_demo(device: Device) -> Result<Box<dyn ImageGenerator>> {
    tracing::warn!("serving the demo model: random weights built in memory, its images are noise");
    let name = DEMO_MODEL_NAME.to_string();
    Ok(match device.open()? {
        OpenedBackend::Cpu(backend) => Box::new(random_tiny(backend, name)?),
        OpenedBackend::Cuda(backend) => Box::new(random_tiny(*backend, name)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn the_demo_model_generates_at_its_native_size() {
        let model = random_tiny(CpuBackend::new(), DEMO_MODEL_NAME.into()).unwrap();
        assert_eq!(model.native_size(), (64, 64));
        let request = crate::pipeline::GenerationRequest {
            prompt: "a".into(),
            negative_prompt: String::new(),
            width: 64,
            height: 64,
            steps: 2,
            cfg_scale: 7.0,
            seed: 1,
            scheduler: crate::sampling::SchedulerKind::Ddim,
            number_of_images: 1,
        };
        let images = model.generate(&request, &mut |_| true).unwrap();
        assert_eq!(images[0].image.pixels.len(), 64 * 64 * 3);
    }
}
