//! The `Allow` header of 405 answers (RFC 9110 §15.5.6): which methods each route takes, read
//! from the served OpenAPI spec's paths (plus the undocumented routes), so it cannot drift from
//! the router.

use std::sync::Arc;

use poem::http::{header, HeaderValue, StatusCode};
use poem::{Endpoint, IntoResponse, Request, Response};

/// Every route's path template (`/jobs/{id}/images/{index}.png`, trailing slash trimmed, split
/// into segments) and its `Allow` value (`DELETE, GET`).
#[derive(Debug, Default)]
pub(crate) struct AllowedMethods {
    routes: Vec<(Vec<String>, HeaderValue)>,
}

impl AllowedMethods {
    /// The paths of an OpenAPI document (JSON) and `extra` (path, methods) routes. A document
    /// that does not parse gives only `extra` (405s then lack `Allow`, nothing else changes).
    pub fn new(spec_json: &str, extra: &[(&str, &[&str])]) -> Self {
        let spec: serde_json::Value = serde_json::from_str(spec_json).unwrap_or_default();
        let documented = spec["paths"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(path, item)| {
                let methods: Vec<String> = item
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(method, _)| method.to_ascii_uppercase())
                    .collect();
                (path.clone(), methods)
            });
        let extra = extra.iter().map(|(path, methods)| {
            let methods = methods.iter().map(|m| m.to_string()).collect();
            (path.to_string(), methods)
        });
        let routes = documented
            .chain(extra)
            .filter_map(|(path, mut methods)| {
                methods.sort();
                methods.dedup();
                let value = HeaderValue::from_str(&methods.join(", ")).ok()?;
                Some((segments(&path), value))
            })
            .collect();
        AllowedMethods { routes }
    }

    /// The `Allow` value of the route `path` matches, if any.
    pub fn for_path(&self, path: &str) -> Option<&HeaderValue> {
        let actual = segments(path);
        self.routes
            .iter()
            .find(|(template, _)| {
                template.len() == actual.len()
                    && template
                        .iter()
                        .zip(&actual)
                        .all(|(t, a)| segment_matches(t, a))
            })
            .map(|(_, allow)| allow)
    }
}

fn segments(path: &str) -> Vec<String> {
    path.trim_end_matches('/')
        .split('/')
        .map(str::to_string)
        .collect()
}

/// A template segment with at most one `{param}` (`{index}.png`) against an actual one: the
/// text around the parameter must match and the parameter must not be empty.
fn segment_matches(template: &str, actual: &str) -> bool {
    match (template.find('{'), template.find('}')) {
        (Some(open), Some(close)) if open < close => {
            let (prefix, suffix) = (&template[..open], &template[close + 1..]);
            actual.len() > prefix.len() + suffix.len()
                && actual.starts_with(prefix)
                && actual.ends_with(suffix)
        }
        _ => template == actual,
    }
}

/// Middleware: a 405 without an `Allow` header gets the route's.
pub(crate) async fn add_allow<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
    table: Arc<AllowedMethods>,
) -> poem::Result<Response> {
    let path = req.uri().path().to_string();
    let mut response = ep.call(req).await?.into_response();
    if response.status() == StatusCode::METHOD_NOT_ALLOWED
        && !response.headers().contains_key(header::ALLOW)
    {
        if let Some(allow) = table.for_path(&path) {
            response.headers_mut().insert(header::ALLOW, allow.clone());
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_come_from_the_spec_and_templates_match_their_parameters() {
        let spec = r#"{"paths": {
            "/generate/": {"post": {}},
            "/jobs/{id}": {"get": {}, "delete": {}},
            "/jobs/{id}/images/{index}.png": {"get": {}}
        }}"#;
        let table = AllowedMethods::new(spec, &[("/docs", &["GET", "HEAD"])]);
        let allow = |p: &str| {
            table
                .for_path(p)
                .map(|v| v.to_str().unwrap_or("?").to_string())
        };
        assert_eq!(allow("/generate").as_deref(), Some("POST"));
        assert_eq!(allow("/generate/").as_deref(), Some("POST"));
        assert_eq!(allow("/jobs/abc").as_deref(), Some("DELETE, GET"));
        assert_eq!(allow("/jobs/abc/images/0.png").as_deref(), Some("GET"));
        assert_eq!(allow("/jobs/abc/images/.png"), None);
        assert_eq!(allow("/jobs/abc/images/0.jpg"), None);
        assert_eq!(allow("/docs").as_deref(), Some("GET, HEAD"));
        assert_eq!(allow("/nope"), None);
        assert!(AllowedMethods::new("not json", &[])
            .for_path("/generate")
            .is_none());
    }
}
