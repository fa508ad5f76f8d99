//! get and list.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};
use crate::resource::ResourceType;
use crate::selector::Selectors;
use crate::store::{State, name_of, namespace_of};

/// What a request addresses.
#[derive(Debug, Clone)]
pub struct Target {
    pub rt: Arc<ResourceType>,
    /// The namespace of the URL (`None` for cluster-scoped resources and all-namespace lists).
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The request is to the `/status` subresource.
    pub status: bool,
}

impl Target {
    /// The storage namespace (`""` when cluster-scoped).
    pub fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or_default()
    }

    pub fn name(&self) -> ApiResult<&str> {
        self.name.as_deref().ok_or_else(|| ApiError::method_not_allowed("a resource name is required"))
    }

    pub fn subresource(&self) -> &'static str {
        if self.status { "status" } else { "" }
    }

    pub fn not_found(&self, name: &str) -> ApiError {
        ApiError::not_found(&self.rt.qualified(), name)
    }
}

/// An object as served at the target's version (storage is shared by all versions; no conversion).
pub fn present(rt: &ResourceType, mut v: Value) -> Value {
    v["apiVersion"] = json!(rt.api_version());
    v["kind"] = json!(rt.kind);
    v
}

pub fn get(st: &State, t: &Target) -> ApiResult<Value> {
    let name = t.name()?;
    st.get(&t.rt.group_resource(), t.ns(), name).cloned().map(|v| present(&t.rt, v)).ok_or_else(|| t.not_found(name))
}

/// List parameters.
#[derive(Debug, Clone, Default)]
pub struct ListOpts {
    pub selectors: Selectors,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
}

fn encode_token(rv: u64, ns: &str, name: &str) -> String {
    format!("{rv}\n{ns}\n{name}").bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(token: &str) -> Option<(u64, String, String)> {
    let bytes: Option<Vec<u8>> =
        (0..token.len()).step_by(2).map(|i| token.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    let text = String::from_utf8(bytes?).ok()?;
    let mut parts = text.splitn(3, '\n');
    Some((parts.next()?.parse().ok()?, parts.next()?.to_owned(), parts.next()?.to_owned()))
}

/// List objects as a `<Kind>List`. Pages (`limit`/`continue`) report the resourceVersion of the first page
/// but read the current state (not a consistent snapshot as etcd gives).
pub fn list(st: &State, t: &Target, opts: &ListOpts) -> ApiResult<Value> {
    let (list_rv, after) = match &opts.continue_token {
        Some(token) if !token.is_empty() => {
            let (rv, ns, name) =
                decode_token(token).ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
            (rv, Some((ns, name)))
        }
        _ => (st.rv, None),
    };
    let matching: Vec<&Value> = st
        .list(&t.rt.group_resource(), t.namespace.as_deref())
        .into_iter()
        .filter(|v| {
            after.as_ref().is_none_or(|(ns, name)| (namespace_of(v), name_of(v)) > (ns.as_str(), name.as_str()))
        })
        .filter(|v| opts.selectors.matches(v))
        .collect();
    let take = opts.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
    let items: Vec<Value> = matching.iter().take(take).map(|v| present(&t.rt, (*v).clone())).collect();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if matching.len() > items.len()
        && let Some(last) = items.last()
    {
        metadata["continue"] = json!(encode_token(list_rv, namespace_of(last), name_of(last)));
        metadata["remainingItemCount"] = json!(matching.len() - items.len());
    }
    Ok(json!({
        "apiVersion": t.rt.api_version(),
        "kind": format!("{}List", t.rt.kind),
        "metadata": metadata,
        "items": items,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_roundtrip() {
        let t = encode_token(42, "ns", "a.b");
        assert_eq!(decode_token(&t), Some((42, "ns".into(), "a.b".into())));
        assert_eq!(decode_token("zz"), None);
    }
}
