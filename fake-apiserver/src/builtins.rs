//! The built-in resource types and their table columns.

use crate::resource::{PrinterColumn, ResourceType};

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    status: bool,
    short: &[&str],
    columns: Vec<PrinterColumn>,
) -> ResourceType {
    ResourceType {
        group: group.to_owned(),
        version: version.to_owned(),
        plural: plural.to_owned(),
        singular: kind.to_lowercase(),
        kind: kind.to_owned(),
        namespaced,
        status_subresource: status,
        short_names: short.iter().map(|s| (*s).to_owned()).collect(),
        categories: if ["pods"].contains(&plural) { vec!["all".to_owned()] } else { Vec::new() },
        columns,
        builtin: true,
    }
}

/// The built-in resource types.
pub fn builtins() -> Vec<ResourceType> {
    let age = PrinterColumn::age;
    let col = PrinterColumn::new;
    vec![
        builtin(
            "",
            "v1",
            "configmaps",
            "ConfigMap",
            true,
            false,
            &["cm"],
            vec![col("Data", "integer", "#len .data", 0), age()],
        ),
        builtin(
            "",
            "v1",
            "secrets",
            "Secret",
            true,
            false,
            &[],
            vec![col("Type", "string", ".type", 0), col("Data", "integer", "#len .data", 0), age()],
        ),
        builtin(
            "",
            "v1",
            "pods",
            "Pod",
            true,
            true,
            &["po"],
            vec![
                col("Status", "string", ".status.phase", 0),
                age(),
                col("IP", "string", ".status.podIP", 1),
                col("Node", "string", ".spec.nodeName", 1),
            ],
        ),
        builtin(
            "",
            "v1",
            "namespaces",
            "Namespace",
            false,
            true,
            &["ns"],
            vec![col("Status", "string", ".status.phase", 0), age()],
        ),
        builtin(
            "coordination.k8s.io",
            "v1",
            "leases",
            "Lease",
            true,
            false,
            &[],
            vec![col("Holder", "string", ".spec.holderIdentity", 0), age()],
        ),
        builtin("", "v1", "nodes", "Node", false, true, &["no"], vec![age()]),
        builtin(
            "",
            "v1",
            "events",
            "Event",
            true,
            false,
            &["ev"],
            vec![col("Reason", "string", ".reason", 0), col("Message", "string", ".message", 0), age()],
        ),
        builtin(
            "events.k8s.io",
            "v1",
            "events",
            "Event",
            true,
            false,
            &["ev"],
            vec![col("Reason", "string", ".reason", 0), col("Note", "string", ".note", 0), age()],
        ),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            true,
            &["crd", "crds"],
            vec![col("Created At", "string", ".metadata.creationTimestamp", 0)],
        ),
    ]
}
