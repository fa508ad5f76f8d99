//! The last broker revision the syncer finished, kept in a ConfigMap of the cluster it syncs.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;

use super::engine::FIELD_MANAGER;

pub struct RevisionStore {
    api: Api<ConfigMap>,
    name: String,
}

impl RevisionStore {
    pub fn new(client: Client, namespace: &str, name: String) -> RevisionStore {
        RevisionStore { api: Api::namespaced(client, namespace), name }
    }

    pub async fn load(&self) -> Result<i64, kube::Error> {
        Ok(self
            .api
            .get_opt(&self.name)
            .await?
            .and_then(|cm| cm.data)
            .and_then(|d| d.get("revision").cloned())
            .and_then(|r| r.parse().ok())
            .unwrap_or(0))
    }

    pub async fn save(&self, revision: i64) -> Result<(), kube::Error> {
        let body = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": self.name},
            "data": {"revision": revision.to_string()},
        });
        self.api.patch(&self.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body)).await?;
        Ok(())
    }
}
