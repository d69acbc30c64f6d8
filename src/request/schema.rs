//! The OpenAPI side of the request bodies. poem-openapi registers schemas through static
//! functions, so the running server's limits (and the loaded model's latent factor) reach them
//! through [`with_context`], which the server wraps around each generation of its spec.

use std::cell::Cell;

use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use serde_json::Value;

use super::limits::Limits;

/// What a body's schema depends on besides the body itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaContext {
    pub limits: Limits,
    /// Width and height are multiples of it (8 for SD 2.x, also before a model is loaded).
    pub latent_factor: usize,
}

impl Default for SchemaContext {
    fn default() -> Self {
        SchemaContext {
            limits: Limits::default(),
            latent_factor: 8,
        }
    }
}

thread_local! {
    static CONTEXT: Cell<Option<SchemaContext>> = const { Cell::new(None) };
}

/// Runs `f` (which generates a spec) with `context` visible to every body's schema.
pub fn with_context<T>(context: SchemaContext, f: impl FnOnce() -> T) -> T {
    let previous = CONTEXT.with(|c| c.replace(Some(context)));
    let out = f();
    CONTEXT.with(|c| c.set(previous));
    out
}

/// The context of the spec being generated (the defaults outside [`with_context`]).
pub fn context() -> SchemaContext {
    CONTEXT.with(Cell::get).unwrap_or_default()
}

/// A request body that documents itself.
pub trait RequestSchema {
    /// The schema's name under `#/components/schemas/`.
    const NAME: &'static str;
    /// The largest body the route reads.
    const MAX_BODY_BYTES: usize = super::limits::MAX_BODY_BYTES;
    /// Whether the route also reads `multipart/form-data` (image fields as files).
    const MULTIPART: bool = false;
    /// The body's schema for a server with this context.
    fn schema(context: &SchemaContext) -> MetaSchema;
}

/// A JSON body's schema as the readers take it (`json.rs`: `null` means the default for every
/// optional field): each property the body does not require is declared `nullable`.
pub fn json_schema(mut schema: MetaSchema) -> MetaSchema {
    let required = schema.required.clone();
    for (name, property) in &mut schema.properties {
        if let MetaSchemaRef::Inline(p) = property {
            p.nullable = !required.contains(name);
        }
    }
    schema
}

/// The `multipart/form-data` form of a JSON body's schema: its base64 image fields (format
/// `byte`) are files (format `binary`, a file picker in /docs) and leave the example, whose
/// other fields are the form's text parts.
pub fn form_schema(mut json: MetaSchema) -> MetaSchema {
    let mut files = Vec::new();
    for (name, property) in &mut json.properties {
        if let MetaSchemaRef::Inline(p) = property {
            if p.format == Some("byte") {
                p.format = Some("binary");
                files.push(*name);
            }
        }
    }
    if let Some(Value::Object(example)) = &mut json.example {
        for name in &files {
            example.remove(*name);
        }
    }
    json.description = Some(
        "The same fields as the JSON body, as a form: the images as files, every other field \
         as a text part.",
    );
    json
}

/// One property of a body's schema.
pub struct Property {
    schema: MetaSchema,
}

impl Property {
    pub fn string(description: &'static str) -> Self {
        Property::new("string", description)
    }

    pub fn integer(description: &'static str) -> Self {
        Property::new("integer", description)
    }

    pub fn number(description: &'static str) -> Self {
        Property::new("number", description)
    }

    fn new(ty: &'static str, description: &'static str) -> Self {
        let mut schema = MetaSchema::new(ty);
        schema.description = Some(description);
        Property { schema }
    }

    pub fn max_length(mut self, chars: usize) -> Self {
        self.schema.max_length = Some(chars);
        self
    }

    pub fn range(mut self, min: f64, max: f64) -> Self {
        self.schema.minimum = Some(min);
        self.schema.maximum = Some(max);
        self
    }

    pub fn minimum(mut self, min: f64) -> Self {
        self.schema.minimum = Some(min);
        self
    }

    pub fn multiple_of(mut self, step: usize) -> Self {
        self.schema.multiple_of = Some(step as f64);
        self
    }

    pub fn one_of(mut self, names: impl IntoIterator<Item = &'static str>) -> Self {
        self.schema.enum_items = names.into_iter().map(Value::from).collect();
        self
    }

    pub fn format(mut self, format: &'static str) -> Self {
        self.schema.format = Some(format);
        self
    }

    pub fn default(mut self, value: impl Into<Value>) -> Self {
        self.schema.default = Some(value.into());
        self
    }

    pub fn into_ref(self) -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(self.schema))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_properties_are_nullable_and_required_ones_are_not() {
        let mut schema = MetaSchema::new("object");
        schema.required = vec!["prompt"];
        schema.properties = vec![
            ("prompt", Property::string("p").into_ref()),
            ("steps", Property::integer("s").into_ref()),
        ];
        let schema = json_schema(schema);
        let nullable = |name: &str| match schema.properties.iter().find(|(n, _)| *n == name) {
            Some((_, MetaSchemaRef::Inline(p))) => p.nullable,
            _ => panic!("{name} missing"),
        };
        assert!(!nullable("prompt"));
        assert!(nullable("steps"));
    }

    #[test]
    fn the_context_is_seen_inside_and_restored_after() {
        assert_eq!(context(), SchemaContext::default());
        let small = SchemaContext {
            limits: Limits {
                max_pixels: 64 * 64,
                max_steps: 5,
                max_images: 2,
            },
            latent_factor: 8,
        };
        let seen = with_context(small, context);
        assert_eq!(seen, small);
        assert_eq!(context(), SchemaContext::default());
    }
}
