//! `POST /generate/`'s body (the original FastAPI server's fields plus `negative_prompt` and
//! `scheduler`) and `sd21 generate`'s flags: one set of bounds ([`GenerateRules`]) read by the
//! parser and by the OpenAPI schema.

use poem_openapi::registry::MetaSchema;
use serde_json::{json, Map, Value};

use super::error::ValidationError;
use super::json::{in_range, integer, number, object, text};
use super::limits::{
    min_side, Limits, CFG_SCALE_RANGE, DEFAULT_CFG_SCALE, DEFAULT_IMAGES, DEFAULT_STEPS,
    MAX_PROMPT_CHARS,
};
use super::schema::{Property, RequestSchema, SchemaContext};
use crate::engine::ModelInfo;
use crate::pipeline::GenerationRequest;
use crate::sampling::SchedulerKind;

/// A validated request; `random_seed` says the seed was drawn, not given.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub request: GenerationRequest,
    pub random_seed: bool,
}

/// Every bound a generation request is checked against, from the limits and the model's latent
/// factor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateRules {
    pub limits: Limits,
    pub latent_factor: usize,
    /// Smallest and largest width or height (a multiple of `latent_factor`).
    pub side: (usize, usize),
}

impl GenerateRules {
    pub fn new(limits: Limits, latent_factor: usize) -> Self {
        GenerateRules {
            limits,
            latent_factor: latent_factor.max(1),
            side: (min_side(latent_factor), limits.max_side(latent_factor)),
        }
    }

    /// Reads and checks a body against these rules and `model` (its native size and scheduler
    /// are the defaults). `draw_seed` is called only when the request asks for a random seed.
    pub fn parse(
        &self,
        body: Value,
        model: &ModelInfo,
        draw_seed: impl FnOnce() -> u64,
    ) -> Result<Validated, ValidationError> {
        let fields = object(body)?;
        let prompt = text(&fields, "prompt", Some(MAX_PROMPT_CHARS))?
            .ok_or(ValidationError::Missing { field: "prompt" })?;
        let negative_prompt =
            text(&fields, "negative_prompt", Some(MAX_PROMPT_CHARS))?.unwrap_or_default();
        let (native_w, native_h) = model.native_size;
        let width = self.side(&fields, "width")?.unwrap_or(native_w);
        let height = self.side(&fields, "height")?.unwrap_or(native_h);
        if width * height > self.limits.max_pixels {
            return Err(ValidationError::TooManyPixels {
                width,
                height,
                max: self.limits.max_pixels,
            });
        }
        let seed = seed(&fields)?;
        Ok(Validated {
            random_seed: seed.is_none(),
            request: GenerationRequest {
                prompt,
                negative_prompt,
                width,
                height,
                steps: self.steps(&fields)?,
                cfg_scale: cfg_scale(&fields)?,
                seed: seed.unwrap_or_else(draw_seed),
                scheduler: scheduler(&fields, model)?,
                number_of_images: self.number_of_images(&fields)?,
            },
        })
    }

    /// Width or height: a multiple of the latent factor within [`GenerateRules::side`].
    fn side(
        &self,
        fields: &Map<String, Value>,
        field: &'static str,
    ) -> Result<Option<usize>, ValidationError> {
        let Some(value) = integer(fields, field)? else {
            return Ok(None);
        };
        let (min, max) = self.side;
        let Some(side) = in_range(value, min, max) else {
            return Err(ValidationError::SideOutOfRange {
                field,
                min,
                max,
                value,
            });
        };
        if side % self.latent_factor != 0 {
            return Err(ValidationError::NotMultiple {
                field,
                multiple: self.latent_factor,
                value,
            });
        }
        Ok(Some(side))
    }

    /// Steps: [`DEFAULT_STEPS`] (or `max_steps` when lower) when absent.
    fn steps(&self, fields: &Map<String, Value>) -> Result<usize, ValidationError> {
        let max = self.limits.max_steps;
        match integer(fields, "steps")? {
            None => Ok(DEFAULT_STEPS.min(max)),
            Some(value) => {
                in_range(value, 1, max).ok_or(ValidationError::StepsOutOfRange { max, value })
            }
        }
    }

    fn number_of_images(&self, fields: &Map<String, Value>) -> Result<usize, ValidationError> {
        let max = self.limits.max_images;
        match integer(fields, "number_of_images")? {
            None => Ok(DEFAULT_IMAGES),
            Some(value) => {
                in_range(value, 1, max).ok_or(ValidationError::ImagesOutOfRange { max, value })
            }
        }
    }

    /// The request schema for these bounds (see [`RequestSchema`]).
    pub fn schema(&self) -> MetaSchema {
        let (min, max) = (self.side.0 as f64, self.side.1 as f64);
        let properties = vec![
            (
                "prompt",
                Property::string("What to draw.").max_length(MAX_PROMPT_CHARS),
            ),
            (
                "negative_prompt",
                Property::string(
                    "What to steer away from (default empty). Used when cfg_scale > 1.",
                )
                .max_length(MAX_PROMPT_CHARS),
            ),
            (
                "width",
                Property::integer(
                    "Image width in pixels (default: the model's native size). width × height is \
                     limited by --max-pixels.",
                )
                .range(min, max)
                .multiple_of(self.latent_factor),
            ),
            (
                "height",
                Property::integer("Image height in pixels (default: the model's native size).")
                    .range(min, max)
                    .multiple_of(self.latent_factor),
            ),
            (
                "cfg_scale",
                Property::number(
                    "Classifier-free guidance scale, integer or float (≤ 1 turns guidance off).",
                )
                .range(CFG_SCALE_RANGE.0, CFG_SCALE_RANGE.1)
                .default(DEFAULT_CFG_SCALE),
            ),
            (
                "steps",
                Property::integer("Denoising steps (at most --max-steps).")
                    .range(1.0, self.limits.max_steps as f64)
                    .default(DEFAULT_STEPS.min(self.limits.max_steps)),
            ),
            (
                "number_of_images",
                Property::integer(
                    "Images to generate (at most --max-images); image i uses seed + i.",
                )
                .range(1.0, self.limits.max_images as f64)
                .default(DEFAULT_IMAGES),
            ),
            (
                "seed",
                Property::integer(
                    "Seed of image 0, 0 ≤ seed < 2⁶⁴; absent or -1: a random seed (returned in \
                     X-Seeds).",
                )
                .minimum(-1.0),
            ),
            (
                "scheduler",
                Property::string("The sampler (default: the model's own scheduler).")
                    .one_of(SchedulerKind::ALL.iter().map(|k| k.name())),
            ),
        ];
        let mut schema = MetaSchema::new("object");
        schema.description = Some(
            "The original API's fields plus negative_prompt and scheduler. Every field but prompt \
             is optional; null means the default. The bounds shown are this server's.",
        );
        schema.required = vec!["prompt"];
        schema.properties = properties
            .into_iter()
            .map(|(name, p)| (name, p.into_ref()))
            .collect();
        schema.example = Some(original_example());
        schema
    }
}

/// The marker poem-openapi registers the `/generate/` body's schema under.
pub struct GenerateRequest;

impl RequestSchema for GenerateRequest {
    const NAME: &'static str = "GenerateRequest";

    fn schema(context: &SchemaContext) -> MetaSchema {
        GenerateRules::new(context.limits, context.latent_factor).schema()
    }
}

/// The original API's documented example request.
fn original_example() -> Value {
    json!({
        "prompt": "Illustration of a Stable Diffusion FastAPI API, comic novel, ligth pastel colors",
        "width": 512,
        "height": 512,
        "cfg_scale": 7.0,
        "steps": 30,
        "number_of_images": 1,
        "seed": 208513106212u64,
    })
}

fn cfg_scale(fields: &Map<String, Value>) -> Result<f32, ValidationError> {
    match number(fields, "cfg_scale")? {
        None => Ok(DEFAULT_CFG_SCALE),
        Some(value) if (CFG_SCALE_RANGE.0..=CFG_SCALE_RANGE.1).contains(&value) => Ok(value as f32),
        Some(value) => Err(ValidationError::CfgScaleOutOfRange { value }),
    }
}

/// The seed: absent, null or -1 → None (random); otherwise a u64.
fn seed(fields: &Map<String, Value>) -> Result<Option<u64>, ValidationError> {
    let value = match integer(fields, "seed") {
        Ok(v) => v,
        // A float beyond i128 or with a fraction: still a seed problem, say so with the value.
        Err(ValidationError::WrongType { found, .. })
            if matches!(fields.get("seed"), Some(Value::Number(_))) =>
        {
            return Err(ValidationError::SeedOutOfRange { value: found });
        }
        Err(e) => return Err(e),
    };
    match value {
        None | Some(-1) => Ok(None),
        Some(v) => u64::try_from(v)
            .map(Some)
            .map_err(|_| ValidationError::SeedOutOfRange {
                value: v.to_string(),
            }),
    }
}

/// A named scheduler, or the model's own.
fn scheduler(
    fields: &Map<String, Value>,
    model: &ModelInfo,
) -> Result<SchedulerKind, ValidationError> {
    match text(fields, "scheduler", None)? {
        Some(name) => SchedulerKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| ValidationError::UnknownScheduler {
                value: name.chars().take(40).collect(),
            }),
        None => model
            .default_scheduler
            .clone()
            .map_err(|reason| ValidationError::NoDefaultScheduler { reason }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::ValidationError;

    fn model() -> ModelInfo {
        ModelInfo {
            name: "tiny".into(),
            device: "cpu".into(),
            native_size: (512, 512),
            latent_factor: 8,
            default_scheduler: Ok(SchedulerKind::Pndm),
            inpainting_model: false,
        }
    }

    fn parse(body: &str, limits: Limits, model: &ModelInfo) -> Result<Validated, ValidationError> {
        let value: Value = serde_json::from_str(body).expect("test bodies are JSON");
        GenerateRules::new(limits, model.latent_factor).parse(value, model, || 0)
    }

    fn check(body: &str) -> Result<Validated, ValidationError> {
        let value: Value = serde_json::from_str(body).expect("test bodies are JSON");
        GenerateRules::new(Limits::default(), 8).parse(value, &model(), || 42)
    }

    fn invalid(body: &str) -> ValidationError {
        match check(body) {
            Err(e) => e,
            other => panic!("{body}: expected a validation error, got {other:?}"),
        }
    }

    /// The original API's documented example, byte for byte as in its README's curl.
    pub const ORIGINAL_EXAMPLE: &str = r#"{
  "prompt": "Illustration of a Stable Diffusion FastAPI API, comic novel, ligth pastel colors",
  "width": 512,
  "height": 512,
  "cfg_scale": 7,
  "steps": 30,
  "number_of_images": 1,
  "seed": 208513106212
}"#;

    #[test]
    fn the_original_api_example_validates() {
        let v = check(ORIGINAL_EXAMPLE).expect("valid");
        assert_eq!(
            v.request,
            GenerationRequest {
                prompt:
                    "Illustration of a Stable Diffusion FastAPI API, comic novel, ligth pastel colors"
                        .into(),
                negative_prompt: String::new(),
                width: 512,
                height: 512,
                steps: 30,
                cfg_scale: 7.0,
                seed: 208513106212,
                scheduler: SchedulerKind::Pndm,
                number_of_images: 1,
            }
        );
        assert!(!v.random_seed);
    }

    #[test]
    fn defaults_follow_the_cli_and_the_model() {
        let v = check(r#"{"prompt": "a cat", "seed": -1, "scheduler": null}"#).expect("valid");
        assert!(v.random_seed);
        let r = v.request;
        assert_eq!(
            (r.width, r.height, r.steps, r.number_of_images),
            (512, 512, 30, 1)
        );
        assert_eq!(
            (r.cfg_scale, r.seed, r.scheduler),
            (7.0, 42, SchedulerKind::Pndm)
        );
        let r = check(
            r#"{"prompt": "", "steps": 20.0, "cfg_scale": 7.5, "scheduler": "dpmpp_2m_karras",
                "seed": 18446744073709551615, "negative_prompt": "blurry", "extra": 1}"#,
        )
        .expect("valid")
        .request;
        assert_eq!((r.steps, r.cfg_scale, r.seed), (20, 7.5, u64::MAX));
        assert_eq!(r.scheduler, SchedulerKind::DpmPp2mKarras);
        assert_eq!(r.negative_prompt, "blurry");
    }

    #[test]
    fn each_rule_names_its_field_the_limit_and_the_value() {
        let long = "x".repeat(2001);
        let cases: Vec<(String, &str, &[&str])> = vec![
            (r#"{"width": 64}"#.into(), "prompt", &["prompt is required"]),
            (r#"{"prompt": 5}"#.into(), "prompt", &["a string", "5"]),
            (
                format!(r#"{{"prompt": "{long}"}}"#),
                "prompt",
                &["2000", "2001"],
            ),
            (
                format!(r#"{{"prompt": "a", "negative_prompt": "{long}"}}"#),
                "negative_prompt",
                &["2000"],
            ),
            (
                r#"{"prompt": "a", "width": 513}"#.into(),
                "width",
                &["multiple of 8", "513"],
            ),
            (
                r#"{"prompt": "a", "height": 0}"#.into(),
                "height",
                &["between 8 and 4096", "got 0"],
            ),
            (
                r#"{"prompt": "a", "width": 1024, "height": 1032}"#.into(),
                "width",
                &["1048576", "1024×1032"],
            ),
            (
                r#"{"prompt": "a", "width": "512"}"#.into(),
                "width",
                &["an integer", "\"512\""],
            ),
            (
                r#"{"prompt": "a", "steps": 0}"#.into(),
                "steps",
                &["between 1 and 150", "got 0"],
            ),
            (
                r#"{"prompt": "a", "steps": 151}"#.into(),
                "steps",
                &["150", "151"],
            ),
            (
                r#"{"prompt": "a", "steps": 7.5}"#.into(),
                "steps",
                &["an integer", "7.5"],
            ),
            (
                r#"{"prompt": "a", "number_of_images": 9}"#.into(),
                "number_of_images",
                &["between 1 and 8", "9"],
            ),
            (
                r#"{"prompt": "a", "cfg_scale": 31}"#.into(),
                "cfg_scale",
                &["between 0 and 30", "31"],
            ),
            (
                r#"{"prompt": "a", "cfg_scale": "7"}"#.into(),
                "cfg_scale",
                &["a number"],
            ),
            (
                r#"{"prompt": "a", "seed": -2}"#.into(),
                "seed",
                &["-1", "-2"],
            ),
            (
                r#"{"prompt": "a", "seed": 18446744073709551616}"#.into(),
                "seed",
                &["18446744073709551615"],
            ),
            (r#"{"prompt": "a", "seed": 1.5}"#.into(), "seed", &["1.5"]),
            (
                r#"{"prompt": "a", "scheduler": "lms"}"#.into(),
                "scheduler",
                &["\"lms\"", "euler_a"],
            ),
            (r#"[1, 2]"#.into(), "body", &["JSON object", "an array"]),
        ];
        for (body, field, words) in cases {
            let e = invalid(&body);
            assert_eq!(e.field(), field, "{body}: {e}");
            let message = e.to_string();
            for word in words {
                assert!(message.contains(word), "{body}: {message:?} lacks {word:?}");
            }
        }
    }

    #[test]
    fn limits_come_from_the_configuration() {
        let limits = Limits {
            max_pixels: 128 * 128,
            max_steps: 5,
            max_images: 2,
        };
        assert_eq!(limits.max_side(8), 2048);
        let e = parse(
            r#"{"prompt": "a", "steps": 6, "width": 64, "height": 64}"#,
            limits,
            &model(),
        );
        assert!(matches!(
            e,
            Err(ValidationError::StepsOutOfRange { max: 5, value: 6 })
        ));
        // The default steps (30) shrink to the limit rather than failing.
        let mut small = model();
        small.native_size = (64, 64);
        let v = parse(r#"{"prompt": "a"}"#, limits, &small).expect("valid");
        assert_eq!(v.request.steps, 5);
    }

    #[test]
    fn a_model_without_a_usable_scheduler_needs_one_named() {
        let mut m = model();
        m.default_scheduler =
            Err("scheduler class \"LMSDiscreteScheduler\" is not supported".into());
        let e = parse(r#"{"prompt": "a"}"#, Limits::default(), &m).unwrap_err();
        assert_eq!(e.field(), "scheduler");
        assert!(e.to_string().contains("LMSDiscreteScheduler"), "{e}");
        assert!(parse(
            r#"{"prompt": "a", "scheduler": "ddim"}"#,
            Limits::default(),
            &m
        )
        .is_ok());
    }

    #[test]
    fn the_schema_shows_the_bounds_the_parser_checks() {
        let limits = Limits {
            max_pixels: 128 * 128,
            max_steps: 5,
            max_images: 2,
        };
        let rules = GenerateRules::new(limits, 8);
        let schema = rules.schema();
        let property = |name: &str| match schema.properties.iter().find(|(n, _)| *n == name) {
            Some((_, poem_openapi::registry::MetaSchemaRef::Inline(s))) => s.clone(),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(property("steps").maximum, Some(5.0));
        assert_eq!(property("number_of_images").maximum, Some(2.0));
        assert_eq!(property("width").maximum, Some(rules.side.1 as f64));
        assert_eq!(property("width").multiple_of, Some(8.0));
        assert_eq!(property("prompt").max_length, Some(MAX_PROMPT_CHARS));
        assert_eq!(schema.required, vec!["prompt"]);
        // Each bound shown is the parser's: the maximum passes, one more fails.
        let side = rules.side.1;
        let at = |field: &str, value: usize| {
            parse(
                &format!(r#"{{"prompt": "a", "{field}": {value}, "width": 8, "height": 8}}"#),
                limits,
                &model(),
            )
        };
        assert!(at("steps", 5).is_ok() && at("steps", 6).is_err());
        assert!(at("number_of_images", 2).is_ok() && at("number_of_images", 3).is_err());
        let wide = |w: usize| {
            parse(
                &format!(r#"{{"prompt": "a", "width": {w}, "height": 8}}"#),
                limits,
                &model(),
            )
        };
        assert!(wide(side).is_ok() && wide(side + 8).is_err());
    }
}
