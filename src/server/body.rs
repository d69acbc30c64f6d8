//! A request body as the routes receive it: read ([`JsonBody`]: the content type, at most
//! the request type's `MAX_BODY_BYTES`), parsed as JSON (400 when it is not), then checked by its request type
//! (`crate::request`, 422 naming the field). The schema `/openapi.json` shows for a body is its
//! request type's, with the running server's limits.

use std::marker::PhantomData;

use poem::http::header;
use poem::{FromRequest, Request, RequestBody};
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
        registry.create_schema::<T, _>(T::NAME.to_string(), |_| {
            schema::json_schema(T::schema(&schema::context()))
        });
        if T::MULTIPART {
            registry.create_schema::<T, _>(form_name::<T>(), |_| {
                schema::form_schema(T::schema(&schema::context()))
            });
        }
    }

    fn request_meta() -> Option<MetaRequest> {
        let media = |content_type, name| MetaMediaType {
            content_type,
            schema: MetaSchemaRef::Reference(name),
        };
        let mut content = vec![media("application/json", T::NAME.to_string())];
        if T::MULTIPART {
            content.push(media("multipart/form-data", form_name::<T>()));
        }
        Some(MetaRequest {
            description: Some(if T::MULTIPART {
                "The request: JSON (images base64), or multipart/form-data with the same names \
                 (images as files, the other fields as text)."
            } else {
                "The request (JSON)."
            }),
            content,
            required: true,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        Ok(JsonBody {
            bytes: read_json_body(request, body, T::MAX_BODY_BYTES, multipart_text::<T>).await,
            request_type: PhantomData,
        })
    }
}

/// The body of a JSON request, at most `limit` bytes (the route's `RequestSchema::MAX_BODY_BYTES`). A missing Content-Type is taken
/// as JSON (as FastAPI does); any other than `application/json` or `…+json` is refused.
/// The name of a multipart request type's form schema.
fn form_name<T: RequestSchema>() -> String {
    format!("{}Form", T::NAME)
}

/// For a request type that reads multipart forms: its string-typed fields (their text parts stay
/// text), from its own schema. `None` when it reads JSON only.
fn multipart_text<T: RequestSchema>() -> Option<Vec<&'static str>> {
    if !T::MULTIPART {
        return None;
    }
    let schema = T::schema(&schema::context());
    let strings = schema
        .properties
        .iter()
        .filter_map(|(name, property)| match property {
            MetaSchemaRef::Inline(p) if p.ty == "string" => Some(*name),
            _ => None,
        });
    Some(strings.collect())
}

async fn read_json_body(
    request: &Request,
    body: &mut RequestBody,
    limit: usize,
    multipart_text: fn() -> Option<Vec<&'static str>>,
) -> Result<Vec<u8>, ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    if let Some(encoding) = unsupported_encoding(request) {
        return Err(drain(
            body,
            limit,
            ApiError::UnsupportedContentEncoding { encoding },
        )
        .await);
    }
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
        if essence == "multipart/form-data" {
            // The request type's schema is consulted only for a form.
            if let Some(text_fields) = multipart_text() {
                return read_multipart(request, body, limit, &text_fields).await;
            }
        }
        if !is_json {
            let content_type = text.chars().take(100).collect();
            return Err(drain(body, limit, ApiError::UnsupportedMediaType { content_type }).await);
        }
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

/// The request's `Content-Encoding` when it is anything but `identity`: bodies are read as sent,
/// never decoded (so no decompression bomb can get past the body limit).
fn unsupported_encoding(request: &Request) -> Option<String> {
    let values = request.headers().get_all(header::CONTENT_ENCODING);
    let codings: Vec<String> = values
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .collect();
    (!codings.is_empty()).then(|| codings.join(", ").chars().take(100).collect())
}

/// Reads the body (within the limit) and drops it, then gives `refusal`: answering while the
/// client still sends would reset the connection under it, and it would never see the answer.
async fn drain(body: &mut RequestBody, limit: usize, refusal: ApiError) -> ApiError {
    if let Ok(body) = body.take() {
        let _ = body.into_bytes_limit(limit).await;
    }
    refusal
}

/// A `multipart/form-data` body as the JSON object the request type reads: a file part (one
/// with a file name or an `image/…` type) becomes its base64 text; a text part stays text for a
/// field in `text_fields` (the schema's strings), else becomes its value as JSON when it reads as
/// a number, `true`, `false` or `null`.
async fn read_multipart(
    request: &Request,
    body: &mut RequestBody,
    limit: usize,
    text_fields: &[&str],
) -> Result<Vec<u8>, ApiError> {
    use base64::Engine as _;
    let mut parts = <poem::web::Multipart as FromRequest>::from_request(request, body)
        .await
        .map_err(|e| ApiError::BodyRead(e.to_string()))?;
    let (mut fields, mut total) = (serde_json::Map::new(), 0usize);
    while let Some(part) = parts
        .next_field()
        .await
        .map_err(|e| ApiError::BodyRead(e.to_string()))?
    {
        let name = part.name().unwrap_or_default().to_string();
        let is_file = part.file_name().is_some()
            || part.content_type().is_some_and(|t| t.starts_with("image/"));
        let bytes = part
            .bytes()
            .await
            .map_err(|e| ApiError::BodyRead(e.to_string()))?;
        total = total.saturating_add(bytes.len());
        if total > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        let value = if is_file {
            Value::String(base64::engine::general_purpose::STANDARD.encode(&bytes))
        } else if text_fields.contains(&name.as_str()) {
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        } else {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            match serde_json::from_str::<Value>(text.trim()) {
                Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::Null)) => v,
                _ => Value::String(text),
            }
        };
        fields.insert(name, value);
    }
    serde_json::to_vec(&Value::Object(fields)).map_err(|e| ApiError::Internal(e.to_string()))
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
