//! `POST /jobs`'s body: any generation body with `kind` (`txt2img`, the default, `img2img` or
//! `inpaint`) saying which, plus `preview_every` (a preview image every n steps; none when 0 or
//! absent). The rest is read by that kind's own rules, exactly as its synchronous route does.

use std::sync::Arc;

use poem_openapi::registry::MetaSchema;
use serde_json::Value;

use super::error::ValidationError;
use super::generate::{GenerateRules, Validated};
use super::img2img::Img2ImgRules;
use super::inpaint::InpaintRules;
use super::json::{in_range, integer, object, text};
use super::limits::{Limits, MAX_IMAGE_BODY_BYTES};
use super::schema::{Property, RequestSchema, SchemaContext};
use crate::engine::ModelInfo;
use crate::pipeline::{Pipelines, Start};

/// The `kind` names, in the order of [`Pipelines`].
pub const KINDS: [(&str, Pipelines); 3] = [
    ("txt2img", Pipelines::Txt2Img),
    ("img2img", Pipelines::Img2Img),
    ("inpaint", Pipelines::Inpaint),
];

/// The `kind` name of `pipeline`.
pub fn kind_name(pipeline: Pipelines) -> &'static str {
    KINDS
        .iter()
        .find(|(_, p)| *p == pipeline)
        .map_or("txt2img", |(name, _)| name)
}

/// A validated job: the generation, where it starts and how often it previews.
#[derive(Debug, Clone)]
pub struct JobValidated {
    pub generation: Validated,
    pub start: Start,
    /// A preview every this many steps; `None`: no previews.
    pub preview_every: Option<usize>,
}

#[derive(Debug, Clone, Copy)]
pub struct JobRules {
    limits: Limits,
    latent_factor: usize,
}

impl JobRules {
    pub fn new(limits: Limits, latent_factor: usize) -> Self {
        JobRules {
            limits,
            latent_factor,
        }
    }

    /// Reads `kind` and `preview_every`, then the body as that kind's route reads it.
    pub fn parse(
        &self,
        body: Value,
        model: &ModelInfo,
        draw_seed: impl FnOnce() -> u64,
    ) -> Result<JobValidated, ValidationError> {
        let fields = object(body)?;
        let kind = match text(&fields, "kind", None)? {
            None => Pipelines::Txt2Img,
            Some(name) => KINDS
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, p)| *p)
                .ok_or_else(|| ValidationError::UnknownKind {
                    value: name.chars().take(40).collect(),
                })?,
        };
        let preview_every = match integer(&fields, "preview_every")? {
            None | Some(0) => None,
            Some(v) => Some(in_range(v, 1, self.limits.max_steps).ok_or(
                ValidationError::PreviewEveryOutOfRange {
                    max: self.limits.max_steps,
                    value: v,
                },
            )?),
        };
        let (generation, start) = parse_generation(
            kind,
            Value::Object(fields),
            model,
            self.limits,
            self.latent_factor,
            draw_seed,
        )?;
        Ok(JobValidated {
            generation,
            start,
            preview_every,
        })
    }

    /// Every kind's fields (the inpainting body's, with `init_image`), `kind` and
    /// `preview_every`.
    pub fn schema(&self) -> MetaSchema {
        let mut schema = InpaintRules::new(self.limits, self.latent_factor).schema();
        let img2img = Img2ImgRules::new(self.limits, self.latent_factor).schema();
        schema.description = Some(
            "Any generation body: kind says which (txt2img when absent) and the fields are that \
             route's (/generate/, /img2img/ or /inpaint/), read and checked as there (strength \
             defaults to 0.75 for img2img, 1 for inpaint); preview_every asks for a preview image every n steps in the job's events.",
        );
        schema.required = vec!["prompt"];
        let kind = Property::string("Which generation: the route whose body this is.")
            .one_of(KINDS.map(|(name, _)| name))
            .default("txt2img");
        let preview_every = Property::integer(
            "A preview (a cheap latent-to-RGB projection at latent size) every this many steps; \
             0 or absent: none.",
        )
        .range(0.0, self.limits.max_steps as f64)
        .default(0);
        let init_image = img2img
            .properties
            .iter()
            .find(|(name, _)| *name == "init_image")
            .map(|(_, p)| p.clone());
        schema.properties.insert(0, ("kind", kind.into_ref()));
        if let Some(init_image) = init_image {
            schema.properties.push(("init_image", init_image));
        }
        schema
            .properties
            .push(("preview_every", preview_every.into_ref()));
        if let Some(Value::Object(example)) = &mut schema.example {
            example.remove("image");
            example.remove("mask");
            example.remove("strength");
            example.insert("kind".into(), "txt2img".into());
            example.insert("preview_every".into(), 5.into());
        }
        schema
    }
}

/// A body of `pipeline`'s route, read by that route's rules: the generation and its start.
pub fn parse_generation(
    pipeline: Pipelines,
    body: Value,
    model: &ModelInfo,
    limits: Limits,
    latent_factor: usize,
    draw_seed: impl FnOnce() -> u64,
) -> Result<(Validated, Start), ValidationError> {
    Ok(match pipeline {
        Pipelines::Txt2Img => {
            let rules = GenerateRules::new(limits, latent_factor);
            (rules.parse(body, model, draw_seed)?, Start::Noise)
        }
        Pipelines::Img2Img => {
            let v = Img2ImgRules::new(limits, latent_factor).parse(body, model, draw_seed)?;
            let start = Start::Image {
                init: Arc::new(v.init),
                strength: v.strength,
            };
            (v.generation, start)
        }
        Pipelines::Inpaint => {
            let v = InpaintRules::new(limits, latent_factor).parse(body, model, draw_seed)?;
            let start = Start::Masked {
                image: Arc::new(v.image),
                mask: Arc::new(v.mask),
                strength: v.strength,
            };
            (v.generation, start)
        }
    })
}

/// The marker poem-openapi registers the `/jobs` body's schema under.
pub struct JobRequest;

impl RequestSchema for JobRequest {
    const NAME: &'static str = "JobRequest";
    const MAX_BODY_BYTES: usize = MAX_IMAGE_BODY_BYTES;
    const MULTIPART: bool = true;

    fn schema(context: &SchemaContext) -> MetaSchema {
        JobRules::new(context.limits, context.latent_factor).schema()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SchedulerKind;
    use serde_json::json;

    fn model() -> ModelInfo {
        ModelInfo {
            name: "tiny".into(),
            device: "cpu".into(),
            native_size: (64, 64),
            latent_factor: 8,
            default_scheduler: Ok(SchedulerKind::Ddim),
            inpainting_model: false,
        }
    }

    fn parse(body: Value) -> Result<JobValidated, ValidationError> {
        JobRules::new(Limits::default(), 8).parse(body, &model(), || 7)
    }

    #[test]
    fn kind_defaults_to_txt2img_and_the_kinds_rules_apply() {
        let job = parse(json!({"prompt": "a", "steps": 3, "preview_every": 2})).unwrap();
        assert!(matches!(job.start, Start::Noise));
        assert_eq!(job.preview_every, Some(2));
        assert_eq!(job.generation.request.steps, 3);
        assert_eq!(
            parse(json!({"prompt": "a", "preview_every": 0}))
                .unwrap()
                .preview_every,
            None
        );
        let err = parse(json!({"kind": "img2img", "prompt": "a"})).unwrap_err();
        assert_eq!(
            err,
            ValidationError::Missing {
                field: "init_image"
            }
        );
        let err = parse(json!({"kind": "inpaint", "prompt": "a"})).unwrap_err();
        assert_eq!(err, ValidationError::Missing { field: "image" });
        let err = parse(json!({"kind": "upscale", "prompt": "a"})).unwrap_err();
        assert_eq!(err.field(), "kind");
        let err = parse(json!({"prompt": "a", "preview_every": 1000})).unwrap_err();
        assert_eq!(err.field(), "preview_every");
        let err = parse(json!({"prompt": "a", "steps": 0})).unwrap_err();
        assert_eq!(err.field(), "steps");
    }
}
