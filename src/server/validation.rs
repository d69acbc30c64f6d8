//! Request validation and the server's error kinds: one typed error per rule, whose message
//! states the limit and the value given, and the one place ([`ApiError::status`]) that maps
//! every kind of failure to its HTTP status (422 invalid, 429 overloaded, 503 not ready or
//! failed, 500 a bug).
//!
//! The body is read as untyped JSON and checked field by field (rather than deserialised into a
//! struct) so that a wrong type, a missing field and a value out of range each get a message
//! naming the field, as FastAPI's validation errors did for the API this server replaces.
//! Integers may be sent as integral floats (`7.0`), numbers as integers (`"cfg_scale": 7`),
//! and `null` means "use the default" for every optional field.

use poem::http::StatusCode;
use serde_json::{Map, Value};

use crate::engine::{JobError, ModelInfo, SubmitError};
use crate::pipeline::GenerationRequest;
use crate::sampling::SchedulerKind;

/// Longest prompt (and negative prompt), in characters.
pub const MAX_PROMPT_CHARS: usize = 2000;
/// Longest image side in pixels, whatever `--max-pixels` allows.
pub const MAX_SIDE: usize = 4096;
/// Classifier-free guidance scale range (AUTOMATIC1111's slider).
pub const CFG_SCALE_RANGE: (f64, f64) = (0.0, 30.0);
/// Largest request body accepted (a maximal request with escaped prompts is ~50 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Steps when the request gives none (as `sd21 generate`).
pub const DEFAULT_STEPS: usize = 30;
/// Guidance scale when the request gives none (as `sd21 generate`).
pub const DEFAULT_CFG_SCALE: f32 = 7.0;
/// Seconds a client is told to wait (`Retry-After`) when the server is busy or starting.
pub const RETRY_AFTER_SECONDS: u64 = 5;

/// The configurable limits (`--max-pixels`, `--max-steps`, `--max-images`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_pixels: usize,
    pub max_steps: usize,
    pub max_images: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pixels: 1024 * 1024,
            max_steps: 150,
            max_images: 8,
        }
    }
}

impl Limits {
    /// The largest width (or height) a request can have: limited by [`MAX_SIDE`] and by
    /// `max_pixels` with the other side at its minimum.
    pub fn max_side(&self, latent_factor: usize) -> usize {
        let f = latent_factor.max(1);
        let by_area = self.max_pixels / min_side(f);
        MAX_SIDE.min(by_area - by_area % f)
    }
}

/// The smallest width (or height): one latent pixel (8 for SD 2.1), as `sd21 generate` allows.
pub fn min_side(latent_factor: usize) -> usize {
    latent_factor.max(1)
}

/// One variant per rule a request can break. `field` names the JSON field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("the request body must be a JSON object, got {found}")]
    NotAnObject { found: String },
    #[error("{field} is required")]
    Missing { field: &'static str },
    #[error("{field} must be {expected}, got {found}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("{field} must be at most {max} characters long, got {chars}")]
    TooLong {
        field: &'static str,
        max: usize,
        chars: usize,
    },
    #[error("{field} must be a multiple of {multiple}, got {value}")]
    NotMultiple {
        field: &'static str,
        multiple: usize,
        value: i128,
    },
    #[error("{field} must be between {min} and {max} pixels, got {value}")]
    SideOutOfRange {
        field: &'static str,
        min: usize,
        max: usize,
        value: i128,
    },
    #[error(
        "width × height must be at most {max} pixels (--max-pixels), got {width}×{height} = {}",
        width * height
    )]
    TooManyPixels {
        width: usize,
        height: usize,
        max: usize,
    },
    #[error("steps must be between 1 and {max} (--max-steps), got {value}")]
    StepsOutOfRange { max: usize, value: i128 },
    #[error("number_of_images must be between 1 and {max} (--max-images), got {value}")]
    ImagesOutOfRange { max: usize, value: i128 },
    #[error("cfg_scale must be between {} and {}, got {value}", CFG_SCALE_RANGE.0, CFG_SCALE_RANGE.1)]
    CfgScaleOutOfRange { value: f64 },
    #[error(
        "seed must be between 0 and {} (or -1 for a random seed), got {value}",
        u64::MAX
    )]
    SeedOutOfRange { value: String },
    #[error("unknown scheduler \"{value}\" (valid: {})", scheduler_names())]
    UnknownScheduler { value: String },
    #[error(
        "the model's own scheduler cannot be used ({reason}); name one of: {}",
        scheduler_names()
    )]
    NoDefaultScheduler { reason: String },
}

impl ValidationError {
    /// The request field at fault (`body` when it is the whole body).
    pub fn field(&self) -> &'static str {
        match self {
            ValidationError::NotAnObject { .. } => "body",
            ValidationError::Missing { field }
            | ValidationError::WrongType { field, .. }
            | ValidationError::TooLong { field, .. }
            | ValidationError::NotMultiple { field, .. }
            | ValidationError::SideOutOfRange { field, .. } => field,
            ValidationError::TooManyPixels { .. } => "width",
            ValidationError::StepsOutOfRange { .. } => "steps",
            ValidationError::ImagesOutOfRange { .. } => "number_of_images",
            ValidationError::CfgScaleOutOfRange { .. } => "cfg_scale",
            ValidationError::SeedOutOfRange { .. } => "seed",
            ValidationError::UnknownScheduler { .. }
            | ValidationError::NoDefaultScheduler { .. } => "scheduler",
        }
    }
}

fn scheduler_names() -> String {
    let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
    names.join(", ")
}

/// Every way a request can fail, from the HTTP layer to the engine.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("reading the request body: {0}")]
    BodyRead(String),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("missing or wrong API key: send the header `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error(
        "cannot answer `Accept: {accept}`: this endpoint answers image/png or application/json"
    )]
    NotAcceptable { accept: String },
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("unsupported Content-Type `{content_type}`: send application/json")]
    UnsupportedMediaType { content_type: String },
    #[error(transparent)]
    Rejected(#[from] SubmitError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("internal error: {0}")]
    Internal(String),
    /// An error the HTTP framework produced (no such route, method not allowed, …).
    #[error("{message}")]
    Http { status: StatusCode, message: String },
}

impl ApiError {
    /// The single mapping from error kind to HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_) | ApiError::BodyRead(_) => StatusCode::BAD_REQUEST,
            ApiError::Invalid(_) | ApiError::Job(JobError::Invalid(_)) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotAcceptable { .. } => StatusCode::NOT_ACCEPTABLE,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Rejected(SubmitError::QueueFull { .. }) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Rejected(SubmitError::NotReady | SubmitError::ShuttingDown) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Job(
                JobError::Cancelled
                | JobError::DeadlineExceeded(_)
                | JobError::ShuttingDown
                | JobError::Unavailable(_)
                | JobError::EngineStopped,
            ) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Job(JobError::Failed(_) | JobError::Panicked(_)) | ApiError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ApiError::Http { status, .. } => *status,
        }
    }

    /// The request field at fault, for 422 answers.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            ApiError::Invalid(e) => Some(e.field()),
            _ => None,
        }
    }

    /// Seconds for `Retry-After`, when waiting may help.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Rejected(SubmitError::QueueFull { .. } | SubmitError::NotReady)
            | ApiError::Job(JobError::Unavailable(_)) => Some(RETRY_AFTER_SECONDS),
            _ => None,
        }
    }
}

/// A validated request; `random_seed` says the seed was drawn by the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub request: GenerationRequest,
    pub random_seed: bool,
}

/// Parses and checks a `/generate/` body against the limits and the loaded model.
/// `draw_seed` is called only when the request asks for a random seed.
pub fn validate(
    body: &[u8],
    limits: &Limits,
    model: &ModelInfo,
    draw_seed: impl FnOnce() -> u64,
) -> Result<Validated, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let Value::Object(fields) = value else {
        return Err(ValidationError::NotAnObject {
            found: describe(&value),
        }
        .into());
    };
    Ok(validate_fields(&fields, limits, model, draw_seed)?)
}

fn validate_fields(
    fields: &Map<String, Value>,
    limits: &Limits,
    model: &ModelInfo,
    draw_seed: impl FnOnce() -> u64,
) -> Result<Validated, ValidationError> {
    let prompt = text(fields, "prompt")?.ok_or(ValidationError::Missing { field: "prompt" })?;
    let negative_prompt = text(fields, "negative_prompt")?.unwrap_or_default();

    let f = model.latent_factor;
    let (native_w, native_h) = model.native_size;
    let width = side(fields, "width", native_w, limits, f)?;
    let height = side(fields, "height", native_h, limits, f)?;
    if width * height > limits.max_pixels {
        return Err(ValidationError::TooManyPixels {
            width,
            height,
            max: limits.max_pixels,
        });
    }

    let steps = match integer(fields, "steps")? {
        None => DEFAULT_STEPS.min(limits.max_steps),
        Some(value) => {
            in_range(value, 1, limits.max_steps).ok_or(ValidationError::StepsOutOfRange {
                max: limits.max_steps,
                value,
            })?
        }
    };
    let number_of_images = match integer(fields, "number_of_images")? {
        None => 1,
        Some(value) => {
            in_range(value, 1, limits.max_images).ok_or(ValidationError::ImagesOutOfRange {
                max: limits.max_images,
                value,
            })?
        }
    };
    let cfg_scale = match number(fields, "cfg_scale")? {
        None => DEFAULT_CFG_SCALE,
        Some(value) if (CFG_SCALE_RANGE.0..=CFG_SCALE_RANGE.1).contains(&value) => value as f32,
        Some(value) => return Err(ValidationError::CfgScaleOutOfRange { value }),
    };
    let seed = seed(fields)?;
    let scheduler = match text(fields, "scheduler")? {
        Some(name) => SchedulerKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| ValidationError::UnknownScheduler {
                value: name.chars().take(40).collect(),
            })?,
        None => model
            .default_scheduler
            .clone()
            .map_err(|reason| ValidationError::NoDefaultScheduler { reason })?,
    };
    Ok(Validated {
        random_seed: seed.is_none(),
        request: GenerationRequest {
            prompt,
            negative_prompt,
            width,
            height,
            steps,
            cfg_scale,
            seed: seed.unwrap_or_else(draw_seed),
            scheduler,
            number_of_images,
        },
    })
}

/// An optional string field of at most [`MAX_PROMPT_CHARS`] characters.
fn text(
    fields: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, ValidationError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let chars = s.chars().count();
            if field != "scheduler" && chars > MAX_PROMPT_CHARS {
                return Err(ValidationError::TooLong {
                    field,
                    max: MAX_PROMPT_CHARS,
                    chars,
                });
            }
            Ok(Some(s.clone()))
        }
        Some(other) => Err(ValidationError::WrongType {
            field,
            expected: "a string",
            found: describe(other),
        }),
    }
}

/// An optional integer field (integral floats accepted, as pydantic does).
fn integer(
    fields: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<i128>, ValidationError> {
    let wrong = |v: &Value| ValidationError::WrongType {
        field,
        expected: "an integer",
        found: describe(v),
    };
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i128::from(i)))
            } else if let Some(u) = n.as_u64() {
                Ok(Some(i128::from(u)))
            } else {
                match n.as_f64() {
                    // Beyond ±1e38 an integral float no longer fits i128; 1e30 already fails
                    // every range check, so that bound loses nothing.
                    Some(x) if x.fract() == 0.0 && x.abs() < 1e38 => Ok(Some(x as i128)),
                    _ => Err(wrong(v)),
                }
            }
        }
        Some(other) => Err(wrong(other)),
    }
}

/// An optional number field (integers accepted).
fn number(
    fields: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<f64>, ValidationError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(ValidationError::WrongType {
            field,
            expected: "a number",
            found: describe(other),
        }),
    }
}

/// `value` as usize when `min ≤ value ≤ max`.
fn in_range(value: i128, min: usize, max: usize) -> Option<usize> {
    usize::try_from(value)
        .ok()
        .filter(|v| (min..=max).contains(v))
}

/// Width or height: a multiple of the latent factor within [smallest, max side].
fn side(
    fields: &Map<String, Value>,
    field: &'static str,
    default: usize,
    limits: &Limits,
    latent_factor: usize,
) -> Result<usize, ValidationError> {
    let Some(value) = integer(fields, field)? else {
        return Ok(default);
    };
    let (min, max) = (min_side(latent_factor), limits.max_side(latent_factor));
    let Some(side) = in_range(value, min, max) else {
        return Err(ValidationError::SideOutOfRange {
            field,
            min,
            max,
            value,
        });
    };
    if side % latent_factor != 0 {
        return Err(ValidationError::NotMultiple {
            field,
            multiple: latent_factor,
            value,
        });
    }
    Ok(side)
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

/// A short description of a JSON value for messages: its kind and, if short, the value.
fn describe(value: &Value) -> String {
    let kind = match value {
        Value::Null => return "null".into(),
        Value::Bool(b) => return b.to_string(),
        Value::Number(n) => return n.to_string(),
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    let text = value.to_string();
    if text.chars().count() <= 40 {
        format!("{kind} {text}")
    } else {
        kind.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelInfo {
        ModelInfo {
            name: "tiny".into(),
            device: "cpu".into(),
            native_size: (512, 512),
            latent_factor: 8,
            default_scheduler: Ok(SchedulerKind::Pndm),
        }
    }

    fn check(body: &str) -> Result<Validated, ApiError> {
        validate(body.as_bytes(), &Limits::default(), &model(), || 42)
    }

    fn invalid(body: &str) -> ValidationError {
        match check(body) {
            Err(ApiError::Invalid(e)) => e,
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
            assert_eq!(ApiError::from(e).status(), StatusCode::UNPROCESSABLE_ENTITY);
        }
    }

    #[test]
    fn malformed_json_is_400_not_422() {
        for body in ["", "{", r#"{"prompt": "a",}"#, "nul"] {
            let e = check(body).unwrap_err();
            assert!(matches!(e, ApiError::MalformedJson(_)), "{body}: {e:?}");
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
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
        let e = validate(
            br#"{"prompt": "a", "steps": 6, "width": 64, "height": 64}"#,
            &limits,
            &model(),
            || 0,
        );
        assert!(matches!(
            e,
            Err(ApiError::Invalid(ValidationError::StepsOutOfRange {
                max: 5,
                value: 6
            }))
        ));
        // The default steps (30) shrink to the limit rather than failing.
        let mut small = model();
        small.native_size = (64, 64);
        let v = validate(br#"{"prompt": "a"}"#, &limits, &small, || 0).expect("valid");
        assert_eq!(v.request.steps, 5);
    }

    #[test]
    fn a_model_without_a_usable_scheduler_needs_one_named() {
        let mut m = model();
        m.default_scheduler =
            Err("scheduler class \"LMSDiscreteScheduler\" is not supported".into());
        let e = validate(br#"{"prompt": "a"}"#, &Limits::default(), &m, || 0).unwrap_err();
        assert_eq!(e.field(), Some("scheduler"));
        assert!(e.to_string().contains("LMSDiscreteScheduler"), "{e}");
        assert!(validate(
            br#"{"prompt": "a", "scheduler": "ddim"}"#,
            &Limits::default(),
            &m,
            || 0
        )
        .is_ok());
    }

    #[test]
    fn each_error_kind_has_one_status() {
        let cases: Vec<(ApiError, u16)> = vec![
            (ApiError::MalformedJson("x".into()), 400),
            (ApiError::Unauthorized, 401),
            (
                ApiError::NotAcceptable {
                    accept: "text/html".into(),
                },
                406,
            ),
            (ApiError::PayloadTooLarge { limit: 1 }, 413),
            (
                ApiError::UnsupportedMediaType {
                    content_type: "text/plain".into(),
                },
                415,
            ),
            (
                ApiError::Rejected(SubmitError::QueueFull { capacity: 1 }),
                429,
            ),
            (ApiError::Rejected(SubmitError::NotReady), 503),
            (ApiError::Rejected(SubmitError::ShuttingDown), 503),
            (
                ApiError::Job(JobError::Unavailable("out of memory".into())),
                503,
            ),
            (
                ApiError::Job(JobError::Failed("shape mismatch".into())),
                500,
            ),
            (ApiError::Job(JobError::Panicked("boom".into())), 500),
            (
                ApiError::Job(JobError::DeadlineExceeded(std::time::Duration::from_secs(
                    1,
                ))),
                503,
            ),
            (ApiError::Job(JobError::Invalid("x".into())), 422),
            (ApiError::Internal("bug".into()), 500),
        ];
        for (error, status) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
        }
        assert_eq!(
            ApiError::Rejected(SubmitError::QueueFull { capacity: 1 }).retry_after(),
            Some(5)
        );
        assert_eq!(
            ApiError::Job(JobError::Unavailable("out of memory".into())).retry_after(),
            Some(5)
        );
        assert_eq!(
            ApiError::Job(JobError::Panicked("boom".into())).retry_after(),
            None
        );
    }
}
