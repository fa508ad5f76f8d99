//! Server-side apply: creation, field-manager conflicts, force, field removal.

use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use crate::common::{Env, api_error};

fn config(spec: Value) -> Value {
    json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": spec})
}

fn managers_of(w: &crate::common::Widget, field: &str) -> Vec<String> {
    w.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|e| e.fields_v1.as_ref().is_some_and(|f| f.0.pointer(&format!("/f:spec/f:{field}")).is_some()))
        .filter_map(|e| e.manager.clone())
        .collect()
}

#[tokio::test]
async fn apply_creates_conflicts_and_forces() {
    let env = Env::with_widgets().await;
    let api = env.widgets();

    // Apply creates.
    let alice = PatchParams::apply("alice");
    let w = api.patch("w", &alice, &Patch::Apply(config(json!({"color": "red", "size": 1})))).await.unwrap();
    assert_eq!((w.spec.color.as_str(), w.spec.size, w.metadata.generation), ("red", Some(1), Some(1)));
    assert_eq!(managers_of(&w, "color"), ["alice"]);

    // The same value: shared ownership, no conflict.
    let bob = PatchParams::apply("bob");
    let w = api.patch("w", &bob, &Patch::Apply(config(json!({"color": "red"})))).await.unwrap();
    assert_eq!(managers_of(&w, "color"), ["alice", "bob"]);

    // A different value for a field another manager owns: 409 with the conflicts listed.
    let err = api.patch("w", &bob, &Patch::Apply(config(json!({"color": "blue", "size": 2})))).await.unwrap_err();
    let kube::Error::Api(status) = err else { panic!("expected an API error") };
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert!(status.message.contains("conflict with \"alice\""), "{}", status.message);
    let causes = status.details.unwrap().causes;
    let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
    // Shared ownership does not let one co-owner change the value: color conflicts too.
    assert_eq!(fields, [".spec.color", ".spec.size"]);
    assert!(causes.iter().all(|c| c.reason == "FieldManagerConflict"));
    assert_eq!(api.get("w").await.unwrap().spec.size, Some(1), "a conflicting apply changes nothing");

    // Force: ownership moves.
    let w =
        api.patch("w", &bob.clone().force(), &Patch::Apply(config(json!({"color": "blue", "size": 2})))).await.unwrap();
    assert_eq!((w.spec.color.as_str(), w.spec.size), ("blue", Some(2)));
    assert_eq!(managers_of(&w, "color"), ["bob"]);
    assert_eq!(managers_of(&w, "size"), ["bob"]);
    assert_eq!(w.metadata.generation, Some(2));

    // Now alice conflicts with bob.
    let err = api.patch("w", &alice, &Patch::Apply(config(json!({"color": "red"})))).await.unwrap_err();
    assert_eq!(api_error(err), (409, "Conflict".to_owned()));

    // A field the applier no longer applies, owned by nobody else, is removed.
    let w = api.patch("w", &bob, &Patch::Apply(config(json!({"color": "blue"})))).await.unwrap();
    assert_eq!(w.spec.size, None);
}

#[tokio::test]
async fn apply_conflicts_with_update_managers_too() {
    let env = Env::with_widgets().await;
    let api = env.widgets();
    let w = api.patch("w", &PatchParams::apply("alice"), &Patch::Apply(config(json!({"color": "red"})))).await.unwrap();
    assert_eq!(w.metadata.managed_fields.as_ref().unwrap()[0].operation.as_deref(), Some("Apply"));
    // A merge patch by another manager takes ownership of what it changes...
    let editor = PatchParams { field_manager: Some("editor".into()), ..PatchParams::default() };
    let w = api.patch("w", &editor, &Patch::Merge(json!({"spec": {"color": "green"}}))).await.unwrap();
    assert_eq!(managers_of(&w, "color"), ["editor"]);
    // ...so alice's apply of another value now conflicts.
    let err = api.patch("w", &PatchParams::apply("alice"), &Patch::Apply(config(json!({"color": "red"})))).await;
    assert_eq!(api_error(err.unwrap_err()).0, 409);
}
