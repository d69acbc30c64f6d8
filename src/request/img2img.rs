//! `POST /img2img/`'s body: `/generate/`'s fields, plus `init_image` (a base64 PNG, JPEG or WebP;
//! a `data:image/...;base64,` prefix accepted) and `strength`. Width and height default to the
//! init image's size rounded down to the latent factor; a different size resizes the image.

use base64::Engine as _;
use poem_openapi::registry::MetaSchema;
use serde_json::{Map, Value};

use super::error::ValidationError;
use super::generate::{GenerateRules, Validated};
use super::json::{number, object, text};
use super::limits::{Limits, DEFAULT_STRENGTH, MAX_IMAGE_BODY_BYTES};
use super::schema::{Property, RequestSchema, SchemaContext};
use crate::engine::ModelInfo;
use crate::image_io::{decode_image, resize, RgbImage};
use crate::sampling::img2img_first_step;

/// A validated img2img request: the generation, its init image (the request's size) and strength.
#[derive(Debug, Clone)]
pub struct Img2ImgValidated {
    pub generation: Validated,
    pub init: RgbImage,
    pub strength: f64,
}

/// `/generate/`'s bounds plus the init image's (at most `max_pixels`).
#[derive(Debug, Clone, Copy)]
pub struct Img2ImgRules {
    pub generate: GenerateRules,
}

impl Img2ImgRules {
    pub fn new(limits: Limits, latent_factor: usize) -> Self {
        Img2ImgRules {
            generate: GenerateRules::new(limits, latent_factor),
        }
    }

    /// Reads and checks a body: the init image first (its size is the default size), then the
    /// generation fields as `/generate/` reads them, then the strength against the steps.
    pub fn parse(
        &self,
        body: Value,
        model: &ModelInfo,
        draw_seed: impl FnOnce() -> u64,
    ) -> Result<Img2ImgValidated, ValidationError> {
        let fields = object(body)?;
        let init = self.init_image(&fields)?;
        let strength = match number(&fields, "strength")? {
            None => DEFAULT_STRENGTH,
            Some(value) if (0.0..=1.0).contains(&value) => value,
            Some(value) => return Err(ValidationError::StrengthOutOfRange { value }),
        };
        let f = self.generate.latent_factor;
        let mut sized = model.clone();
        sized.native_size = ((init.width / f * f).max(f), (init.height / f * f).max(f));
        let generation = self
            .generate
            .parse(Value::Object(fields), &sized, draw_seed)?;
        let steps = generation.request.steps;
        if img2img_first_step(steps, strength).is_err() {
            return Err(ValidationError::NoStepLeft { strength, steps });
        }
        let (width, height) = (generation.request.width, generation.request.height);
        let init = if (init.width, init.height) == (width, height) {
            init
        } else {
            resize(&init, width, height).map_err(|e| invalid_image(e.to_string()))?
        };
        Ok(Img2ImgValidated {
            generation,
            init,
            strength,
        })
    }

    /// `init_image`: base64 (a `data:` URL prefix accepted), decoded within `max_pixels`.
    fn init_image(&self, fields: &Map<String, Value>) -> Result<RgbImage, ValidationError> {
        let encoded = text(fields, "init_image", None)?.ok_or(ValidationError::Missing {
            field: "init_image",
        })?;
        let data = match encoded.split_once(";base64,") {
            Some((prefix, data)) if prefix.starts_with("data:") => data,
            _ => encoded.as_str(),
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| invalid_image(format!("not base64 ({e})")))?;
        decode_image(&bytes, self.generate.limits.max_pixels)
            .map_err(|e| invalid_image(e.to_string()))
    }

    /// `/generate/`'s schema with `init_image` and `strength`.
    pub fn schema(&self) -> MetaSchema {
        let mut schema = self.generate.schema();
        schema.description = Some(
            "The /generate/ fields plus init_image (a base64 PNG, JPEG or WebP; a data: URL \
             prefix is accepted) and strength. Width and height default to the init image's size \
             rounded down to a multiple of 8; a different size resizes it (Lanczos). The bounds \
             shown are this server's.",
        );
        schema.required = vec!["prompt", "init_image"];
        let image =
            Property::string("The image to start from, base64 (PNG, JPEG or WebP).").format("byte");
        let strength = Property::number(
            "How much of the schedule runs from the noised init image: 0 keeps it, 1 ignores it.",
        )
        .range(0.0, 1.0)
        .default(DEFAULT_STRENGTH);
        schema.properties.push(("init_image", image.into_ref()));
        schema.properties.push(("strength", strength.into_ref()));
        if let Some(Value::Object(example)) = &mut schema.example {
            example.remove("width");
            example.remove("height");
            example.insert("init_image".into(), "<base64 PNG>".into());
            example.insert("strength".into(), DEFAULT_STRENGTH.into());
        }
        schema
    }
}

fn invalid_image(reason: String) -> ValidationError {
    ValidationError::InvalidImage {
        field: "init_image",
        reason,
    }
}

/// The marker poem-openapi registers the `/img2img/` body's schema under.
pub struct Img2ImgRequest;

impl RequestSchema for Img2ImgRequest {
    const NAME: &'static str = "Img2ImgRequest";
    const MAX_BODY_BYTES: usize = MAX_IMAGE_BODY_BYTES;

    fn schema(context: &SchemaContext) -> MetaSchema {
        Img2ImgRules::new(context.limits, context.latent_factor).schema()
    }
}
