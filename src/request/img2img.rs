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
        let init = image_field(&fields, "init_image", self.generate.limits.max_pixels)?;
        let strength = strength(&fields, DEFAULT_STRENGTH)?;
        let generation = sized_generation(&self.generate, fields, &init, model, draw_seed)?;
        check_steps_left(&generation, strength)?;
        Ok(Img2ImgValidated {
            init: fit(init, &generation, "init_image")?,
            generation,
            strength,
        })
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

/// An image field: base64 (a `data:` URL prefix accepted), decoded within `max_pixels`.
pub(super) fn image_field(
    fields: &Map<String, Value>,
    field: &'static str,
    max_pixels: usize,
) -> Result<RgbImage, ValidationError> {
    let invalid = |reason: String| ValidationError::InvalidImage { field, reason };
    let encoded = text(fields, field, None)?.ok_or(ValidationError::Missing { field })?;
    let data = match encoded.split_once(";base64,") {
        Some((prefix, data)) if prefix.starts_with("data:") => data,
        _ => encoded.as_str(),
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| invalid(format!("not base64 ({e})")))?;
    decode_image(&bytes, max_pixels).map_err(|e| invalid(e.to_string()))
}

/// `strength` in [0, 1], `default` when absent.
pub(super) fn strength(fields: &Map<String, Value>, default: f64) -> Result<f64, ValidationError> {
    match number(fields, "strength")? {
        None => Ok(default),
        Some(value) if (0.0..=1.0).contains(&value) => Ok(value),
        Some(value) => Err(ValidationError::StrengthOutOfRange { value }),
    }
}

/// The generation fields as `/generate/` reads them, with `image`'s size (rounded down to the
/// latent factor) as the default size.
pub(super) fn sized_generation(
    rules: &GenerateRules,
    fields: Map<String, Value>,
    image: &RgbImage,
    model: &ModelInfo,
    draw_seed: impl FnOnce() -> u64,
) -> Result<Validated, ValidationError> {
    let f = rules.latent_factor;
    let mut sized = model.clone();
    sized.native_size = ((image.width / f * f).max(f), (image.height / f * f).max(f));
    rules.parse(Value::Object(fields), &sized, draw_seed)
}

/// At least one step must run at this strength.
pub(super) fn check_steps_left(
    generation: &Validated,
    strength: f64,
) -> Result<(), ValidationError> {
    let steps = generation.request.steps;
    match img2img_first_step(steps, strength) {
        Ok(_) => Ok(()),
        Err(_) => Err(ValidationError::NoStepLeft { strength, steps }),
    }
}

/// `image` at the request's size (resized with a Lanczos filter when it is not).
pub(super) fn fit(
    image: RgbImage,
    generation: &Validated,
    field: &'static str,
) -> Result<RgbImage, ValidationError> {
    let (width, height) = (generation.request.width, generation.request.height);
    if (image.width, image.height) == (width, height) {
        return Ok(image);
    }
    resize(&image, width, height).map_err(|e| ValidationError::InvalidImage {
        field,
        reason: e.to_string(),
    })
}

/// The marker poem-openapi registers the `/img2img/` body's schema under.
pub struct Img2ImgRequest;

impl RequestSchema for Img2ImgRequest {
    const NAME: &'static str = "Img2ImgRequest";
    const MAX_BODY_BYTES: usize = MAX_IMAGE_BODY_BYTES;
    const MULTIPART: bool = true;

    fn schema(context: &SchemaContext) -> MetaSchema {
        Img2ImgRules::new(context.limits, context.latent_factor).schema()
    }
}
