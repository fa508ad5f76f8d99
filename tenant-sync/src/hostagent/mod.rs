//! `host-agent`: one per tenant node. Talks to the broker's `HostService` with the node's
//! identity (`xpu://host/<node>`) and serves the device plugin and the CNI on a unix socket.

pub mod args;
mod podresources;
pub mod state;

use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status, transport::Channel};
use xpu_proto::{
    broker::v1::{self as pb, host_service_client::HostServiceClient},
    host::v1::{
        self as hv,
        host_agent_server::{HostAgent, HostAgentServer},
    },
};
use xpu_sync_common::{TlsFiles, failpoint};

use self::state::{Attachment, Device, PendingDetach, State, StateFile, attachment_key};

#[derive(Clone, Debug)]
pub struct HostAgentConfig {
    pub broker: String,
    pub tls: TlsFiles,
    pub node: String,
    pub socket: PathBuf,
    pub kubelet_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Serial of the DPU that owns this node's VFs (netdev ids start with it).
    pub dpu_serial: String,
    /// Resource whose devices a PodResources lookup considers.
    pub resource_name: String,
    /// How long an attach waits for the DPU when the CNI does not say.
    pub attach_timeout: Duration,
}

pub struct Service {
    config: HostAgentConfig,
    state: Mutex<State>,
    file: StateFile,
    broker: HostServiceClient<Channel>,
    /// Serializes attaches and detaches of one attachment (the runtime may retry concurrently).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The broker's refusal, as the CNI should see it: unreachable or slow is "try again".
fn from_broker(op: &str, e: tonic::Status) -> Status {
    match e.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            Status::unavailable(format!("{op}: the broker is unreachable: {}", e.message()))
        }
        code => Status::new(code, format!("{op}: {}", e.message())),
    }
}

impl Service {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self) -> Result<(), Status> {
        let state = self.lock_state().clone();
        self.file.save(&state).map_err(|e| {
            tracing::error!(error = %e, "cannot persist the host agent state");
            Status::internal("cannot persist the host agent state")
        })
    }

    fn key_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(key.to_string()).or_default())
    }

    fn netdev_id(&self, d: &Device) -> String {
        format!("{}-pf{}-{}{}", self.config.dpu_serial, d.pf, if d.sf { "sf" } else { "vf" }, d.index)
    }

    /// The pod's device for a new attachment, from the kubelet's PodResources.
    async fn device_from_kubelet(&self, pod: &hv::PodIdentity, resource: &str) -> Result<String, Status> {
        let socket = self.config.kubelet_dir.join("pod-resources/kubelet.sock");
        let ids = podresources::pod_devices(&socket, &pod.namespace, &pod.name, resource).await.map_err(|e| {
            Status::unavailable(format!("no deviceID given and the kubelet's PodResources API failed: {e:#}"))
        })?;
        let state = self.lock_state();
        ids.into_iter().find(|id| !state.attachments.values().any(|a| &a.device_id == id)).ok_or_else(|| {
            Status::failed_precondition(format!(
                "pod {}/{} has no {resource} device left to attach (PodResources)",
                pod.namespace, pod.name
            ))
        })
    }

    async fn attach(&self, req: hv::AttachRequest) -> Result<hv::AttachResponse, Status> {
        let pod = req
            .pod
            .clone()
            .filter(|p| !p.namespace.is_empty() && !p.name.is_empty())
            .ok_or_else(|| Status::invalid_argument("pod (namespace and name) is required"))?;
        for (value, field) in
            [(&req.container_id, "container_id"), (&req.interface, "interface"), (&req.network, "network")]
        {
            if value.is_empty() {
                return Err(Status::invalid_argument(format!("{field} is required")));
            }
        }
        let key = attachment_key(&req.container_id, &req.interface);
        let lock = self.key_lock(&key);
        let _guard = lock.lock().await;

        let existing = self.lock_state().attachments.get(&key).cloned();
        let device_id = match (&existing, req.device_id.as_str()) {
            (Some(a), _) => a.device_id.clone(),
            (None, "") => {
                let resource =
                    if req.resource_name.is_empty() { &self.config.resource_name } else { &req.resource_name };
                self.device_from_kubelet(&pod, resource).await?
            }
            (None, id) => id.to_string(),
        };
        let (device, attachment) = {
            let mut state = self.lock_state();
            let device = state.devices.get(&device_id).cloned().ok_or_else(|| {
                Status::failed_precondition(format!(
                    "device {device_id} was not allocated by the device plugin on this node"
                ))
            })?;
            if let Some((other, a)) = state.attachments.iter().find(|(k, a)| a.device_id == device_id && **k != key) {
                return Err(Status::failed_precondition(format!(
                    "device {device_id} is already attached to pod {}/{} ({other})",
                    a.namespace, a.pod
                )));
            }
            let attachment = Attachment {
                netdev_id: self.netdev_id(&device),
                device_id: device_id.clone(),
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                pod_uid: pod.uid.clone(),
                network: req.network.clone(),
                connected: existing.as_ref().is_some_and(|a| a.connected),
            };
            // Recorded before the broker call: a DEL after a failed ADD still finds it.
            state.attachments.insert(key.clone(), attachment.clone());
            (device, attachment)
        };
        self.persist()?;

        let spec = pb::NetdevSpec {
            netdev_id: attachment.netdev_id.clone(),
            hostname: self.config.node.clone(),
            backend: if device.sf { "sf" } else { "vf" }.into(),
            network: req.network.clone(),
            pod_ref: Some(pb::PodRef {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                interface: req.interface.clone(),
            }),
            ..Default::default()
        };
        let timeout_ms =
            if req.timeout_ms == 0 { self.config.attach_timeout.as_millis() as u32 } else { req.timeout_ms };
        let started = std::time::Instant::now();
        failpoint::hit("hostagent.attach.before");
        let resp = self
            .broker
            .clone()
            .attach_netdev(pb::AttachNetdevRequest {
                namespace: pod.namespace.clone(),
                labels: [("xpu.opi.dev/pod".to_string(), pod.name.clone())].into(),
                spec: Some(spec),
                timeout_ms,
            })
            .await
            .map_err(|e| from_broker("AttachNetdev", e))?
            .into_inner();
        failpoint::hit("hostagent.attach.after");
        tracing::info!(netdev = %attachment.netdev_id, pod = %format!("{}/{}", pod.namespace, pod.name), took_ms = started.elapsed().as_millis() as u64, "attached");
        if let Some(a) = self.lock_state().attachments.get_mut(&key) {
            a.connected = true;
        }
        self.persist()?;
        let att = resp.attachment.unwrap_or_default();
        Ok(hv::AttachResponse {
            netdev_id: attachment.netdev_id,
            device_id,
            vf_interface: device.interface,
            address: att.address,
            gateway: att.gateway,
            mac_address: att.mac_address,
            mtu: att.mtu,
            routes: att.routes.into_iter().map(|r| hv::Route { dst: r.dst, gw: r.gw }).collect(),
        })
    }

    async fn detach(&self, req: hv::DetachRequest) -> Result<hv::DetachResponse, Status> {
        let key = attachment_key(&req.container_id, &req.interface);
        let lock = self.key_lock(&key);
        let _guard = lock.lock().await;
        let found = {
            let state = self.lock_state();
            state.attachments.get(&key).map(|a| (key.clone(), a.clone())).or_else(|| {
                (!req.netdev_id.is_empty())
                    .then(|| state.attachments.iter().find(|(_, a)| a.netdev_id == req.netdev_id))
                    .flatten()
                    .map(|(k, a)| (k.clone(), a.clone()))
            })
        };
        let Some((key, attachment)) = found else {
            return Ok(hv::DetachResponse { existed: false });
        };
        let pending =
            PendingDetach { namespace: attachment.namespace.clone(), netdev_id: attachment.netdev_id.clone() };
        failpoint::hit("hostagent.detach.before");
        let result = self
            .broker
            .clone()
            .detach_netdev(pb::DetachNetdevRequest {
                namespace: pending.namespace.clone(),
                name: pending.netdev_id.clone(),
            })
            .await;
        failpoint::hit("hostagent.detach.after");
        {
            let mut state = self.lock_state();
            state.attachments.remove(&key);
            state.devices.remove(&attachment.device_id);
            if let Err(e) = &result {
                // The pod is gone either way; the broker learns of it as soon as it answers.
                tracing::warn!(netdev = %pending.netdev_id, error = %e.message(), "detach queued until the broker answers");
                state.pending_detaches.push(pending);
            }
        }
        self.persist()?;
        Ok(hv::DetachResponse { existed: true })
    }

    /// Sends the detaches the broker could not take when they happened.
    async fn retry_detaches(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            let pending = self.lock_state().pending_detaches.clone();
            for p in pending {
                let req = pb::DetachNetdevRequest { namespace: p.namespace.clone(), name: p.netdev_id.clone() };
                match self.broker.clone().detach_netdev(req).await {
                    Ok(_) => tracing::info!(netdev = %p.netdev_id, "queued detach delivered"),
                    Err(e)
                        if matches!(
                            e.code(),
                            tonic::Code::PermissionDenied | tonic::Code::InvalidArgument | tonic::Code::NotFound
                        ) =>
                    {
                        // Retrying cannot change the answer.
                        tracing::warn!(netdev = %p.netdev_id, error = %e.message(), "queued detach refused; dropped");
                    }
                    Err(_) => continue,
                }
                self.lock_state().pending_detaches.retain(|x| *x != p);
                let _ = self.persist();
            }
        }
    }
}

#[tonic::async_trait]
impl HostAgent for Service {
    async fn reserve(&self, req: Request<hv::ReserveRequest>) -> Result<Response<hv::ReserveResponse>, Status> {
        let req = req.into_inner();
        {
            let mut state = self.lock_state();
            for d in &req.devices {
                if d.id.is_empty() || d.interface.is_empty() {
                    return Err(Status::invalid_argument("every device needs an id and an interface"));
                }
                state.devices.insert(
                    d.id.clone(),
                    Device {
                        pf: d.pf,
                        index: d.index,
                        sf: d.sf,
                        interface: d.interface.clone(),
                        reserved_at_ms: now_ms(),
                    },
                );
            }
        }
        self.persist()?;
        tracing::info!(devices = ?req.devices.iter().map(|d| &d.id).collect::<Vec<_>>(), "reserved");
        Ok(Response::new(hv::ReserveResponse {}))
    }

    async fn attach(&self, req: Request<hv::AttachRequest>) -> Result<Response<hv::AttachResponse>, Status> {
        Service::attach(self, req.into_inner()).await.map(Response::new)
    }

    async fn detach(&self, req: Request<hv::DetachRequest>) -> Result<Response<hv::DetachResponse>, Status> {
        Service::detach(self, req.into_inner()).await.map(Response::new)
    }
}

/// Serves the local API until `shutdown`.
pub async fn run(config: HostAgentConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let file = StateFile::new(&config.state_dir)?;
    let state = file.load()?;
    let endpoint = xpu_sync_common::broker_endpoint(&config.broker, &config.tls)?;
    // Lazy: the agent serves (and reserves) while the broker is down.
    let broker = HostServiceClient::new(endpoint.connect_lazy());
    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&config.socket);
    let listener =
        UnixListener::bind(&config.socket).map_err(|e| anyhow::anyhow!("{}: {e}", config.socket.display()))?;
    // Only root (the kubelet's plugins) may talk to it.
    std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o600))?;
    let service =
        Arc::new(Service { config: config.clone(), state: Mutex::new(state), file, broker, locks: Mutex::default() });
    let retries = tokio::spawn(Arc::clone(&service).retry_detaches());
    tracing::info!(socket = %config.socket.display(), node = %config.node, "host agent serving");
    let result = tonic::transport::Server::builder()
        .add_service(HostAgentServer::from_arc(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    retries.abort();
    let _ = std::fs::remove_file(&config.socket);
    result.map_err(Into::into)
}
