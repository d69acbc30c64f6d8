//! Every way a request can fail, from the HTTP layer to the engine, and the one place that maps
//! each to its HTTP status ([`ApiError::status`]): 4xx the client's (422 names the field, the limit
//! and the value), 429 and 503 busy or unavailable (with `Retry-After` where waiting helps), 500 a
//! bug (logged with its cause).

use poem::http::{header, HeaderValue, StatusCode};
use poem::Response;
use poem_openapi::payload::Json;
use poem_openapi::registry::{MetaHeader, MetaMediaType, MetaResponse, MetaResponses, Registry};
use poem_openapi::types::Type;
use poem_openapi::{ApiResponse, Object};

use crate::engine::{JobError, SubmitError};
use crate::request::ValidationError;

/// Seconds a client is told to wait (`Retry-After`) when the server is busy or starting.
pub const RETRY_AFTER_SECONDS: u64 = 5;

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
    #[error("unsupported Content-Encoding `{encoding}`: send the body unencoded (identity)")]
    UnsupportedContentEncoding { encoding: String },
    #[error(transparent)]
    Rejected(#[from] SubmitError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("no job {id}: unknown, or its results expired (--job-ttl, --max-stored-bytes)")]
    JobNotFound { id: String },
    #[error("job {id} already finished ({status}); nothing to cancel")]
    JobFinished { id: String, status: &'static str },
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
            ApiError::JobNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::JobFinished { .. } => StatusCode::CONFLICT,
            ApiError::NotAcceptable { .. } => StatusCode::NOT_ACCEPTABLE,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType { .. } | ApiError::UnsupportedContentEncoding { .. } => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
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

/// The JSON body of every error answer.
#[derive(Debug, Object)]
pub struct ErrorBody {
    /// What went wrong, with the limit and the value given.
    pub error: String,
    /// The request field at fault (422 answers).
    #[oai(skip_serializing_if_is_none)]
    pub field: Option<String>,
}

impl poem::error::ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        ApiError::status(self)
    }

    fn as_response(&self) -> Response {
        let body = ErrorBody {
            error: self.to_string(),
            field: self.field().map(str::to_string),
        };
        let mut response = poem::IntoResponse::into_response(Json(body));
        response.set_status(ApiError::status(self));
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if matches!(self, ApiError::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(self, ApiError::UnsupportedContentEncoding { .. }) {
            // RFC 9110 §15.5.16: name the codings that would have been accepted.
            response.headers_mut().insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        if matches!(self, ApiError::PayloadTooLarge { .. }) {
            // The rest of the body is never read, so the connection cannot carry another request:
            // say so (RFC 9112 §9.6), and the server closes it after this answer.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl ApiResponse for ApiError {
    fn meta() -> MetaResponses {
        let error = |status: u16, description: &'static str, retry_after: bool| MetaResponse {
            description,
            status: Some(status),
            status_range: None,
            content: vec![MetaMediaType {
                content_type: <Json<ErrorBody> as poem_openapi::payload::Payload>::CONTENT_TYPE,
                schema: ErrorBody::schema_ref(),
            }],
            headers: if retry_after {
                vec![MetaHeader {
                    name: "Retry-After".into(),
                    description: Some("Seconds to wait before retrying.".into()),
                    required: false,
                    deprecated: false,
                    schema: u64::schema_ref(),
                }]
            } else {
                vec![]
            },
        };
        MetaResponses {
            responses: vec![
                error(400, "Malformed JSON or an unreadable body.", false),
                error(401, "Missing or wrong API key (when the server has one).", false),
                error(404, "Jobs routes: no such job (unknown, or its results expired).", false),
                error(409, "DELETE /jobs/{id}: the job already finished.", false),
                error(406, "The Accept header allows neither image/png nor application/json.", false),
                error(413, "The body is larger than 64 KiB.", false),
                error(415, "The Content-Type is not application/json, or the body has a Content-Encoding (bodies are read as sent: identity only).", false),
                error(
                    422,
                    "Invalid request: `field` names the field, `error` the limit and the value given.",
                    false,
                ),
                error(429, "The queue is full; retry after Retry-After seconds.", true),
                error(500, "A bug in the server (the generation failed or panicked); logged with its cause.", false),
                error(
                    503,
                    "Not ready yet or the device is out of memory or failed (both with Retry-After), shutting down, or past the request deadline.",
                    true,
                ),
            ],
        }
    }

    fn register(registry: &mut Registry) {
        ErrorBody::register(registry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_kind_has_one_status() {
        let cases: Vec<(ApiError, u16)> = vec![
            (ApiError::MalformedJson("x".into()), 400),
            (
                ApiError::Invalid(ValidationError::Missing { field: "prompt" }),
                422,
            ),
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
                ApiError::UnsupportedContentEncoding {
                    encoding: "gzip".into(),
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
