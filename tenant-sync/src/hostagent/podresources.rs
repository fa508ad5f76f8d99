//! The kubelet's PodResources API: which devices of a resource the kubelet gave a pod.

use std::path::Path;

use xpu_proto::kubelet::podresources::v1::{self as pr, pod_resources_lister_client::PodResourcesListerClient};

pub async fn pod_devices(socket: &Path, namespace: &str, name: &str, resource: &str) -> anyhow::Result<Vec<String>> {
    let channel = xpu_sync_common::unix_channel(socket).await?;
    let list = PodResourcesListerClient::new(channel).list(pr::ListPodResourcesRequest {}).await?.into_inner();
    let pod = list
        .pod_resources
        .into_iter()
        .find(|p| p.namespace == namespace && p.name == name)
        .ok_or_else(|| anyhow::anyhow!("the kubelet knows no pod {namespace}/{name}"))?;
    Ok(pod
        .containers
        .into_iter()
        .flat_map(|c| c.devices)
        .filter(|d| d.resource_name == resource)
        .flat_map(|d| d.device_ids)
        .collect())
}
