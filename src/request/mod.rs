//! Request bodies, each parsed, validated and documented by one type, so the server, the CLI and
//! `/openapi.json` share one set of rules and defaults.
//!
//! Files: `limits.rs` (every limit and default), `error.rs` (one variant per rule a value can
//! break), `json.rs` (the readers every body shares: `null` is "the default", an integral float
//! is an integer, messages name the field and the value), `schema.rs` (the OpenAPI side: the
//! running server's limits reach the schema through [`schema::with_context`]) and one file per
//! body: `generate.rs` (`POST /generate/` and `sd21 generate`), `img2img.rs` (`POST /img2img/`), `inpaint.rs`
//! (`POST /inpaint/`), `job.rs` (`POST /jobs`: any of them, by `kind`).
//!
//! Adding a body: a rules type built from [`Limits`] (and the model), whose `parse` reads the
//! fields with `json.rs` and whose `schema` lists the same bounds, plus `impl RequestSchema`.

mod error;
pub mod generate;
pub mod img2img;
pub mod inpaint;
pub mod job;
mod json;
mod limits;
pub mod schema;

pub use error::ValidationError;
pub use generate::{GenerateRules, Validated};
pub use limits::{
    min_side, Limits, CFG_SCALE_RANGE, DEFAULT_CFG_SCALE, DEFAULT_IMAGES, DEFAULT_INPAINT_STRENGTH,
    DEFAULT_STEPS, DEFAULT_STRENGTH, MAX_BODY_BYTES, MAX_IMAGE_BODY_BYTES, MAX_PROMPT_CHARS,
    MAX_SIDE,
};
pub use schema::RequestSchema;
