//! A request body as the routes receive it: read ([`JsonBody`]: the content type, at most
//! the request type's `MAX_BODY_BYTES`), parsed as JSON (400 when it is not), then checked by its request type
//! (`crate::request`, 422 naming the field). The schema `/openapi.json` shows for a body is its
//! request type's, with the running server's limits.

use std::marker::PhantomData;

use poem::http::header;
use poem::{Request, RequestBody};
use poem_openapi::registry::{MetaMediaType, MetaRequest, MetaSchemaRef, Registry};
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};
use serde_json::Value;

use super::error::ApiError;
use crate::request::{schema, RequestSchema};

/// The raw JSON body of a route whose request type is `T`, or why it could not be read (wrong
/// content type, too large). Reading never fails the extraction: the handler answers every
/// error itself, as JSON.
pub struct JsonBody<T> {
    bytes: Result<Vec<u8>, ApiError>,
    request_type: PhantomData<fn() -> T>,
}

impl<T> JsonBody<T> {
    /// The bytes, or why they could not be read.
    pub fn bytes(self) -> Result<Vec<u8>, ApiError> {
        self.bytes
    }
}

/// `bytes` as JSON, or [`ApiError::MalformedJson`].
pub fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))
}

impl<'a, T: RequestSchema + Send + Sync + 'static> ApiExtractor<'a> for JsonBody<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        registry.create_schema::<T, _>(T::NAME.to_string(), |_| T::schema(&schema::context()));
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: Some("The request (JSON)."),
            content: vec![MetaMediaType {
                content_type: "application/json",
                schema: MetaSchemaRef::Reference(T::NAME.to_string()),
            }],
            required: true,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        Ok(JsonBody {
            bytes: read_json_body(request, body, T::MAX_BODY_BYTES).await,
            request_type: PhantomData,
        })
    }
}

/// The body of a JSON request, at most `limit` bytes (the route's `RequestSchema::MAX_BODY_BYTES`). A missing Content-Type is taken
/// as JSON (as FastAPI does); any other than `application/json` or `…+json` is refused.
async fn read_json_body(
    request: &Request,
    body: &mut RequestBody,
    limit: usize,
) -> Result<Vec<u8>, ApiError> {
    if let Some(content_type) = request.headers().get(header::CONTENT_TYPE) {
        let text = content_type.to_str().unwrap_or("");
        let essence = text
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let is_json = essence == "application/json"
            || (essence.starts_with("application/") && essence.ends_with("+json"));
        if !is_json {
            return Err(ApiError::UnsupportedMediaType {
                content_type: text.chars().take(100).collect(),
            });
        }
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let body = body.take().map_err(|e| ApiError::Internal(e.to_string()))?;
    match body.into_bytes_limit(limit).await {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(poem::error::ReadBodyError::PayloadTooLarge) => {
            Err(ApiError::PayloadTooLarge { limit })
        }
        Err(e) => Err(ApiError::BodyRead(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_json_is_400_not_422() {
        for body in ["", "{", r#"{"prompt": "a",}"#, "nul"] {
            let e = parse_json(body.as_bytes()).unwrap_err();
            assert!(matches!(e, ApiError::MalformedJson(_)), "{body}: {e:?}");
            assert_eq!(e.status(), poem::http::StatusCode::BAD_REQUEST);
        }
    }
}
