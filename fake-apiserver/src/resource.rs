//! The resource types the server serves: the built-in ones plus those of registered CRDs.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

/// A group and resource (plural), the storage key of a kind of object (all versions share one store).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupResource {
    /// API group, `""` for core.
    pub group: String,
    /// Plural resource name.
    pub resource: String,
}

impl GroupResource {
    pub fn new(group: &str, resource: &str) -> Self {
        Self { group: group.to_owned(), resource: resource.to_owned() }
    }
}

/// One `additionalPrinterColumns` entry (or a built-in column).
#[derive(Debug, Clone, PartialEq)]
pub struct PrinterColumn {
    pub name: String,
    /// `string`, `integer`, `number`, `boolean` or `date`.
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    /// A simple JSONPath such as `.spec.replicas` (or `#len .data` for the built-in "count" columns).
    pub json_path: String,
}

impl PrinterColumn {
    pub fn new(name: &str, type_: &str, json_path: &str, priority: i64) -> Self {
        Self {
            name: name.to_owned(),
            type_: type_.to_owned(),
            format: String::new(),
            description: String::new(),
            priority,
            json_path: json_path.to_owned(),
        }
    }

    /// The default `Age` column.
    pub fn age() -> Self {
        Self::new("Age", "date", ".metadata.creationTimestamp", 0)
    }
}

/// A served resource at one group/version.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub status_subresource: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Table columns after `Name`.
    pub columns: Vec<PrinterColumn>,
    /// Built into the server (not from a CRD).
    pub builtin: bool,
}

impl ResourceType {
    /// `v1` or `<group>/<version>`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    pub fn group_resource(&self) -> GroupResource {
        GroupResource::new(&self.group, &self.plural)
    }

    /// `widgets.example.com` (or `configmaps` for the core group), as used in error messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() { self.plural.clone() } else { format!("{}.{}", self.plural, self.group) }
    }

    /// Whether this type is `CustomResourceDefinition` itself.
    pub fn is_crd(&self) -> bool {
        self.group == "apiextensions.k8s.io" && self.plural == "customresourcedefinitions"
    }

    pub fn is_namespace(&self) -> bool {
        self.group.is_empty() && self.plural == "namespaces"
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k)).and_then(Value::as_str)
}

fn strings_at(v: &Value, path: &[&str]) -> Vec<String> {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

fn printer_columns(version: &Value) -> Vec<PrinterColumn> {
    let Some(cols) = version.get("additionalPrinterColumns").and_then(Value::as_array) else {
        return vec![PrinterColumn::age()];
    };
    if cols.is_empty() {
        return vec![PrinterColumn::age()];
    }
    cols.iter()
        .map(|c| PrinterColumn {
            name: str_at(c, &["name"]).unwrap_or_default().to_owned(),
            type_: str_at(c, &["type"]).unwrap_or("string").to_owned(),
            format: str_at(c, &["format"]).unwrap_or_default().to_owned(),
            description: str_at(c, &["description"]).unwrap_or_default().to_owned(),
            priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
            json_path: str_at(c, &["jsonPath"]).unwrap_or_default().to_owned(),
        })
        .collect()
}

/// The served resource types of a (validated) CRD object, one per served version.
pub fn types_of_crd(crd: &Value) -> Vec<ResourceType> {
    let spec = crd.get("spec").cloned().unwrap_or(Value::Null);
    let group = str_at(&spec, &["group"]).unwrap_or_default();
    let plural = str_at(&spec, &["names", "plural"]).unwrap_or_default();
    let kind = str_at(&spec, &["names", "kind"]).unwrap_or_default();
    let singular = str_at(&spec, &["names", "singular"]).map_or_else(|| kind.to_lowercase(), str::to_owned);
    let namespaced = str_at(&spec, &["scope"]) != Some("Cluster");
    let versions = spec.get("versions").and_then(Value::as_array).cloned().unwrap_or_default();
    versions
        .iter()
        .filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(true))
        .map(|v| ResourceType {
            group: group.to_owned(),
            version: str_at(v, &["name"]).unwrap_or_default().to_owned(),
            plural: plural.to_owned(),
            singular: singular.clone(),
            kind: kind.to_owned(),
            namespaced,
            status_subresource: v.get("subresources").and_then(|s| s.get("status")).is_some(),
            short_names: strings_at(&spec, &["names", "shortNames"]),
            categories: strings_at(&spec, &["names", "categories"]),
            columns: printer_columns(v),
            builtin: false,
        })
        .collect()
}

/// Kubernetes version priority: GA before beta before alpha, higher numbers first, others last.
pub fn version_priority(version: &str) -> (u8, i64, i64) {
    let Some(rest) = version.strip_prefix('v') else { return (3, 0, 0) };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let Ok(major) = digits.parse::<i64>() else { return (3, 0, 0) };
    let tail = &rest[digits.len()..];
    let minor = |s: &str| s.parse::<i64>().map_or(0, |n| -n);
    if tail.is_empty() {
        (0, -major, 0)
    } else if let Some(n) = tail.strip_prefix("beta") {
        (1, -major, minor(n))
    } else if let Some(n) = tail.strip_prefix("alpha") {
        (2, -major, minor(n))
    } else {
        (3, 0, 0)
    }
}

/// All served resource types, by group, version and plural.
#[derive(Debug, Default)]
pub struct Registry {
    types: BTreeMap<(String, String, String), Arc<ResourceType>>,
}

impl Registry {
    pub fn with_builtins() -> Self {
        let mut r = Self::default();
        for t in crate::builtins::builtins() {
            r.insert(t);
        }
        r
    }

    fn insert(&mut self, t: ResourceType) {
        self.types.insert((t.group.clone(), t.version.clone(), t.plural.clone()), Arc::new(t));
    }

    pub fn lookup(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types.get(&(group.to_owned(), version.to_owned(), plural.to_owned())).cloned()
    }

    /// Any served version of a group/resource (the preferred one).
    pub fn any_version(&self, gr: &GroupResource) -> Option<Arc<ResourceType>> {
        let mut all: Vec<_> =
            self.types.values().filter(|t| t.group == gr.group && t.plural == gr.resource).cloned().collect();
        all.sort_by_key(|t| version_priority(&t.version));
        all.into_iter().next()
    }

    /// The resource types of one group/version.
    pub fn resources_in(&self, group: &str, version: &str) -> Vec<Arc<ResourceType>> {
        self.types.values().filter(|t| t.group == group && t.version == version).cloned().collect()
    }

    /// Every non-core group with its versions, preferred version first.
    pub fn groups(&self) -> BTreeMap<String, Vec<String>> {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for t in self.types.values().filter(|t| !t.group.is_empty()) {
            let versions = groups.entry(t.group.clone()).or_default();
            if !versions.contains(&t.version) {
                versions.push(t.version.clone());
            }
        }
        for versions in groups.values_mut() {
            versions.sort_by_key(|v| version_priority(v));
        }
        groups
    }

    /// Replace the types served for a CRD's group/resource by those of `crd`.
    pub fn register_crd(&mut self, crd: &Value) {
        let types = types_of_crd(crd);
        if let Some(first) = types.first() {
            self.unregister(&first.group_resource());
        }
        for t in types {
            self.insert(t);
        }
    }

    pub fn unregister(&mut self, gr: &GroupResource) {
        self.types.retain(|_, t| !(t.group == gr.group && t.plural == gr.resource && !t.builtin));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order() {
        let mut v = vec!["v1alpha1", "v1beta1", "v2", "v1", "v1beta2", "foo"];
        v.sort_by_key(|v| version_priority(v));
        assert_eq!(v, ["v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]);
    }
}
