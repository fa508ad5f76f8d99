//! The CRDs in `deploy/crds/` are exactly what the Rust types generate.

#[test]
fn committed_crds_match_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    for (name, body) in xpu_sync_common::crd::yaml_files().unwrap() {
        let committed = std::fs::read_to_string(dir.join(&name)).unwrap_or_else(|e| {
            panic!("deploy/crds/{name}: {e}; run `cargo run -p xpu-sync-common --bin crdgen deploy/crds`")
        });
        assert_eq!(
            committed, body,
            "deploy/crds/{name} drifted; run `cargo run -p xpu-sync-common --bin crdgen deploy/crds`"
        );
    }
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(files, xpu_sync_common::crd::all().len(), "deploy/crds/ holds exactly the generated CRDs");
}
