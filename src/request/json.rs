//! The readers every request body shares. A body is untyped JSON read field by field (rather than
//! deserialised into a struct) so that a wrong type, a missing field and a value out of range each
//! get a message naming the field, as FastAPI's validation errors do. `null` means "the default"
//! for every optional field, integers may be sent as integral floats (`7.0`) and numbers as
//! integers (`7`); fields a body does not know are ignored (as pydantic does).

use serde_json::{Map, Value};

use super::error::ValidationError;

/// The fields of a body that must be a JSON object.
pub fn object(body: Value) -> Result<Map<String, Value>, ValidationError> {
    match body {
        Value::Object(fields) => Ok(fields),
        other => Err(ValidationError::NotAnObject {
            found: describe(&other),
        }),
    }
}

/// An optional string field of at most `max_chars` characters (when given).
pub fn text(
    fields: &Map<String, Value>,
    field: &'static str,
    max_chars: Option<usize>,
) -> Result<Option<String>, ValidationError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let chars = s.chars().count();
            match max_chars {
                Some(max) if chars > max => Err(ValidationError::TooLong { field, max, chars }),
                _ => Ok(Some(s.clone())),
            }
        }
        Some(other) => Err(ValidationError::WrongType {
            field,
            expected: "a string",
            found: describe(other),
        }),
    }
}

/// An optional integer field (integral floats accepted, as pydantic does).
pub fn integer(
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
pub fn number(
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
pub fn in_range(value: i128, min: usize, max: usize) -> Option<usize> {
    usize::try_from(value)
        .ok()
        .filter(|v| (min..=max).contains(v))
}

/// A short description of a JSON value for messages: its kind and, if short, the value.
pub fn describe(value: &Value) -> String {
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
