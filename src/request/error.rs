//! One variant per rule a request value can break; each message states the limit and the value.

use super::limits::CFG_SCALE_RANGE;
use crate::sampling::SchedulerKind;

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
    #[error("{field} is not a usable image: {reason}")]
    InvalidImage { field: &'static str, reason: String },
    #[error("strength must be between 0 and 1, got {value}")]
    StrengthOutOfRange { value: f64 },
    #[error("strength {strength} of {steps} steps leaves no step to run (strength × steps < 1)")]
    NoStepLeft { strength: f64, steps: usize },
    #[error("unknown kind \"{value}\" (valid: txt2img, img2img, inpaint)")]
    UnknownKind { value: String },
    #[error("preview_every must be between 0 and {max} (--max-steps), got {value}")]
    PreviewEveryOutOfRange { max: usize, value: i128 },
    #[error(
        "{model} is an inpainting model (its UNet also takes a mask and the masked image), so it \
         cannot run {pipeline}, as in diffusers; use /inpaint/ (sd21 inpaint) or another model"
    )]
    InpaintingModelOnly {
        model: String,
        pipeline: &'static str,
    },
}

impl ValidationError {
    /// The request field at fault (`body` when it is the whole body).
    pub fn field(&self) -> &'static str {
        match self {
            ValidationError::NotAnObject { .. } | ValidationError::InpaintingModelOnly { .. } => {
                "body"
            }
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
            ValidationError::InvalidImage { field, .. } => field,
            ValidationError::UnknownKind { .. } => "kind",
            ValidationError::PreviewEveryOutOfRange { .. } => "preview_every",
            ValidationError::StrengthOutOfRange { .. } | ValidationError::NoStepLeft { .. } => {
                "strength"
            }
        }
    }
}

fn scheduler_names() -> String {
    let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
    names.join(", ")
}
