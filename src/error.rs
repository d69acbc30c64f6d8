//! The library's typed error: every failure a file, a request or a backend can cause.

use std::path::PathBuf;

/// Everything that can go wrong inside the library. Messages name the file and the tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: missing file ({what})")]
    MissingFile { path: PathBuf, what: String },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: invalid safetensors file: {message}")]
    SafeTensors { path: PathBuf, message: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "{path}: tensor `{name}` has unsupported dtype {dtype} (f32, f16 and bf16 are accepted)"
    )]
    TensorDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An op was given tensors whose shapes break its contract: a bug in the caller.
    #[error("shape mismatch in {op}: {message}")]
    Shape { op: &'static str, message: String },
    /// An op was given a scalar argument outside its contract (stride 0, a bad eps): a bug.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The request asks for what the model or its scheduler cannot do (too many steps, a size
    /// that is not a multiple of the latent factor, an unknown scheduler): the client's fault.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The work exceeds a kernel's or the device's limit (an output too large to index or
    /// allocate): the client's limit, to be answered with the limit.
    #[error("{op}: {message}")]
    TooLarge { op: &'static str, message: String },
    /// The device or its driver failed (out of memory among others): retrying later may work.
    #[error("backend error: {0}")]
    Backend(String),
    /// The model produced NaN or infinity where it must not (an overflow the f32 decode could not
    /// repair, or in the UNet): this request fails, and retrying it will not help.
    #[error("numerical failure: {0}")]
    NonFinite(String),
    #[error("cancelled")]
    Cancelled,
    #[error("image encoding: {0}")]
    Image(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whose fault an error is: the one place that tells a client's mistake from a bug or a busy
/// device (the engine turns each into a job error with one HTTP status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request asked for something invalid or beyond a limit (422).
    Client,
    /// The device is out of memory or failed; retrying later may work (503).
    Unavailable,
    /// A broken invariant, model file or configuration: a bug to log (500).
    Bug,
    /// The work was cancelled on purpose.
    Cancelled,
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Whose fault this error is.
    pub fn fault(&self) -> Fault {
        match self {
            Error::InvalidRequest(_) | Error::TooLarge { .. } => Fault::Client,
            Error::Backend(_) => Fault::Unavailable,
            Error::Cancelled => Fault::Cancelled,
            Error::Io { .. }
            | Error::MissingFile { .. }
            | Error::Json { .. }
            | Error::SafeTensors { .. }
            | Error::MissingTensor { .. }
            | Error::TensorShape { .. }
            | Error::TensorDtype { .. }
            | Error::Config(_)
            | Error::Tokenizer(_)
            | Error::Shape { .. }
            | Error::InvalidArgument(_)
            | Error::NonFinite(_)
            | Error::Image(_) => Fault::Bug,
        }
    }

    /// A work size beyond what `op` can index or allocate.
    pub fn too_large(op: &'static str, message: impl Into<String>) -> Self {
        Error::TooLarge {
            op,
            message: message.into(),
        }
    }

    /// A shape error raised by an op.
    pub fn shape(op: &'static str, message: impl Into<String>) -> Self {
        Error::Shape {
            op,
            message: message.into(),
        }
    }
}
