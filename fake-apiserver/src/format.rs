//! Response formats chosen by `Accept`: the object itself, a `Table`, or `PartialObjectMetadata`.

use serde_json::{Value, json};

use crate::resource::ResourceType;
use crate::table::{IncludeObject, table};

/// What the client asked for (only the first, preferred, media type of `Accept` is considered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Object,
    /// `application/json;as=Table;v=v1;g=meta.k8s.io`.
    Table(IncludeObject),
    /// `application/json;as=PartialObjectMetadata[List];v=v1;g=meta.k8s.io`.
    Metadata,
}

impl Format {
    pub fn from_accept(accept: &str, include_object: Option<&str>) -> Self {
        let first = accept.split(',').next().unwrap_or_default();
        if first.contains("as=Table") {
            Self::Table(IncludeObject::parse(include_object))
        } else if first.contains("as=PartialObjectMetadata") {
            Self::Metadata
        } else {
            Self::Object
        }
    }

    /// Render one object (already `present`ed at the request's version).
    pub fn object(self, rt: &ResourceType, obj: Value) -> Value {
        match self {
            Self::Object => obj,
            Self::Table(include) => table(rt, &[obj], json!({}), include),
            Self::Metadata => partial(&obj),
        }
    }

    /// Render a `<Kind>List`.
    pub fn list(self, rt: &ResourceType, mut list: Value) -> Value {
        let items = list.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
        match self {
            Self::Object => list,
            Self::Table(include) => table(rt, &items, list["metadata"].take(), include),
            Self::Metadata => json!({
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": list["metadata"].take(),
                "items": items.iter().map(partial).collect::<Vec<_>>(),
            }),
        }
    }
}

fn partial(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers() {
        let table = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io";
        assert_eq!(Format::from_accept(table, None), Format::Table(IncludeObject::Metadata));
        assert_eq!(Format::from_accept(table, Some("Object")), Format::Table(IncludeObject::Object));
        let meta = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";
        assert_eq!(Format::from_accept(meta, None), Format::Metadata);
        assert_eq!(Format::from_accept("application/json", None), Format::Object);
        assert_eq!(Format::from_accept("application/json, application/json;as=Table", None), Format::Object);
    }
}
