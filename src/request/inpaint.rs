//! `POST /inpaint/`'s body: `/generate/`'s fields, plus `image` and `mask` (base64 PNG, JPEG or
//! WebP; white repaints, black keeps) and `strength` (default 1). Width and height default to the
//! image's size rounded down to the latent factor; the mask is resized to the image's size, and
//! both to the request's.

use poem_openapi::registry::MetaSchema;
use serde_json::Value;

use super::error::ValidationError;
use super::generate::{GenerateRules, Validated};
use super::img2img::{check_steps_left, fit, image_field, sized_generation, strength};
use super::json::object;
use super::limits::{Limits, DEFAULT_INPAINT_STRENGTH, MAX_IMAGE_BODY_BYTES};
use super::schema::{Property, RequestSchema, SchemaContext};
use crate::engine::ModelInfo;
use crate::image_io::RgbImage;

/// A validated inpainting request: the generation, its image and mask (the request's size) and
/// strength.
#[derive(Debug, Clone)]
pub struct InpaintValidated {
    pub generation: Validated,
    pub image: RgbImage,
    pub mask: RgbImage,
    pub strength: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct InpaintRules {
    pub generate: GenerateRules,
}

impl InpaintRules {
    pub fn new(limits: Limits, latent_factor: usize) -> Self {
        InpaintRules {
            generate: GenerateRules::new(limits, latent_factor),
        }
    }

    pub fn parse(
        &self,
        body: Value,
        model: &ModelInfo,
        draw_seed: impl FnOnce() -> u64,
    ) -> Result<InpaintValidated, ValidationError> {
        let fields = object(body)?;
        let max_pixels = self.generate.limits.max_pixels;
        let image = image_field(&fields, "image", max_pixels)?;
        let mask = image_field(&fields, "mask", max_pixels)?;
        let strength = strength(&fields, DEFAULT_INPAINT_STRENGTH)?;
        let generation = sized_generation(&self.generate, fields, &image, model, draw_seed)?;
        check_steps_left(&generation, strength)?;
        Ok(InpaintValidated {
            image: fit(image, &generation, "image")?,
            mask: fit(mask, &generation, "mask")?,
            generation,
            strength,
        })
    }

    /// `/generate/`'s schema with `image`, `mask` and `strength`.
    pub fn schema(&self) -> MetaSchema {
        let mut schema = self.generate.schema();
        schema.description = Some(
            "The /generate/ fields plus image and mask (base64 PNG, JPEG or WebP; a data: URL \
             prefix is accepted; white in the mask is repainted, black kept) and strength. Width \
             and height default to the image's size rounded down to a multiple of 8; the mask and \
             the image are resized to it when they differ (Lanczos). Ordinary and inpainting \
             (9-channel) models.",
        );
        schema.required = vec!["prompt", "image", "mask"];
        let image =
            Property::string("The image to repaint, base64 (PNG, JPEG or WebP).").format("byte");
        let mask = Property::string("The mask, base64: white (≥ 0.5 in grayscale) is repainted.")
            .format("byte");
        let strength =
            Property::number("How much of the schedule runs inside the mask (1: noise).")
                .range(0.0, 1.0)
                .default(DEFAULT_INPAINT_STRENGTH);
        schema.properties.push(("image", image.into_ref()));
        schema.properties.push(("mask", mask.into_ref()));
        schema.properties.push(("strength", strength.into_ref()));
        if let Some(Value::Object(example)) = &mut schema.example {
            example.remove("width");
            example.remove("height");
            example.insert("image".into(), "<base64 PNG>".into());
            example.insert("mask".into(), "<base64 PNG>".into());
        }
        schema
    }
}

/// The marker poem-openapi registers the `/inpaint/` body's schema under.
pub struct InpaintRequest;

impl RequestSchema for InpaintRequest {
    const NAME: &'static str = "InpaintRequest";
    const MAX_BODY_BYTES: usize = MAX_IMAGE_BODY_BYTES;
    const MULTIPART: bool = true;

    fn schema(context: &SchemaContext) -> MetaSchema {
        InpaintRules::new(context.limits, context.latent_factor).schema()
    }
}
