//! `xpu-device-plugin`: the kubelet device plugin (v1beta1) advertising the node's VFs/SFs.
//!
//! It serves `DevicePlugin` on its socket in the kubelet's device-plugins directory *before*
//! registering (the kubelet dials back during `Register`), re-scans sysfs so VFs created later
//! appear, reports health and NUMA nodes, re-registers when the kubelet restarts (it wipes the
//! directory, removing our socket), and on `Allocate` only reserves the devices with the host
//! agent: no broker round trip, because the kubelet gives `Allocate` no pod identity, no
//! deadline and no retry.

pub mod args;
pub mod discover;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use futures::Stream;
use tokio::{net::UnixListener, sync::watch};
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tonic::{Request, Response, Status};
use xpu_proto::{
    host::v1::{self as hv, host_agent_client::HostAgentClient},
    kubelet::deviceplugin::v1beta1::{
        self as dp,
        device_plugin_server::{DevicePlugin, DevicePluginServer},
        registration_client::RegistrationClient,
    },
};

use self::discover::{Discovered, SfSpec};

pub const API_VERSION: &str = "v1beta1";

#[derive(Clone, Debug)]
pub struct PluginConfig {
    pub host_agent_socket: PathBuf,
    pub kubelet_dir: PathBuf,
    pub pfs: Vec<String>,
    pub sfs: Vec<SfSpec>,
    pub sysfs_root: PathBuf,
    pub resource_name: String,
    pub rescan_interval: Duration,
    /// Where Network Plumbing WG device-info files go.
    pub devinfo_dir: PathBuf,
}

impl PluginConfig {
    fn plugins_dir(&self) -> PathBuf {
        self.kubelet_dir.join("device-plugins")
    }

    /// Our socket's file name: the resource name made file-safe.
    pub fn endpoint(&self) -> String {
        let safe: String =
            self.resource_name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        format!("xpu-{safe}.sock")
    }

    /// `PCIDEVICE_<PREFIX>_<NAME>`: the resource name upper-cased, `.` and `/` as `_`.
    pub fn env_name(&self) -> String {
        let s: String = self
            .resource_name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
            .collect();
        format!("PCIDEVICE_{s}")
    }
}

struct Plugin {
    config: PluginConfig,
    devices: watch::Receiver<Vec<Discovered>>,
}

fn to_device(d: &Discovered) -> dp::Device {
    dp::Device {
        id: d.id.clone(),
        health: if d.healthy { "Healthy" } else { "Unhealthy" }.into(),
        topology: d.numa.map(|n| dp::TopologyInfo { nodes: vec![dp::NumaNode { id: n }] }),
    }
}

impl Plugin {
    fn write_device_info(&self, d: &Discovered) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.config.devinfo_dir)?;
        let file = format!("{}-{}-device.json", self.config.resource_name.replace('/', "-"), d.id);
        let info = serde_json::json!({
            "type": "pci",
            "version": "1.1.0",
            "pci": { "pci-address": d.id },
        });
        std::fs::write(self.config.devinfo_dir.join(file), info.to_string())
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<dp::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for Plugin {
    type ListAndWatchStream = ListStream;

    async fn get_device_plugin_options(
        &self,
        _: Request<dp::Empty>,
    ) -> Result<Response<dp::DevicePluginOptions>, Status> {
        Ok(Response::new(dp::DevicePluginOptions {
            pre_start_required: false,
            get_preferred_allocation_available: false,
        }))
    }

    async fn list_and_watch(&self, _: Request<dp::Empty>) -> Result<Response<ListStream>, Status> {
        use futures::StreamExt;
        // Each message is the complete list; a new one goes out whenever a rescan changes it.
        let stream = WatchStream::new(self.devices.clone())
            .map(|devices| Ok(dp::ListAndWatchResponse { devices: devices.iter().map(to_device).collect() }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        req: Request<dp::PreferredAllocationRequest>,
    ) -> Result<Response<dp::PreferredAllocationResponse>, Status> {
        let container_responses = req
            .into_inner()
            .container_requests
            .into_iter()
            .map(|r| {
                let mut ids = r.must_include_device_i_ds.clone();
                for id in r.available_device_i_ds {
                    if ids.len() >= r.allocation_size as usize {
                        break;
                    }
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                dp::ContainerPreferredAllocationResponse { device_i_ds: ids }
            })
            .collect();
        Ok(Response::new(dp::PreferredAllocationResponse { container_responses }))
    }

    async fn allocate(&self, req: Request<dp::AllocateRequest>) -> Result<Response<dp::AllocateResponse>, Status> {
        let known: HashMap<String, Discovered> =
            self.devices.borrow().iter().map(|d| (d.id.clone(), d.clone())).collect();
        let mut responses = Vec::new();
        let mut reserve = Vec::new();
        for creq in req.into_inner().container_requests {
            let mut devices = Vec::new();
            for id in &creq.devices_ids {
                let d = known.get(id).ok_or_else(|| Status::invalid_argument(format!("unknown device {id}")))?;
                devices.push(d.clone());
            }
            let env = self.config.env_name();
            let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
            let info: serde_json::Map<String, serde_json::Value> = devices
                .iter()
                .map(|d| (d.id.clone(), serde_json::json!({"generic": {"deviceID": d.id, "netdev": d.interface}})))
                .collect();
            let envs = HashMap::from([
                (env.clone(), ids.join(",")),
                (format!("{env}_INFO"), serde_json::Value::Object(info).to_string()),
            ]);
            for d in &devices {
                self.write_device_info(d).map_err(|e| Status::internal(format!("writing device info: {e}")))?;
                reserve.push(hv::Device {
                    id: d.id.clone(),
                    pf: d.pf,
                    index: d.index,
                    sf: d.sf,
                    interface: d.interface.clone(),
                });
            }
            responses.push(dp::ContainerAllocateResponse { envs, ..Default::default() });
        }
        let channel = xpu_sync_common::unix_channel(&self.config.host_agent_socket)
            .await
            .map_err(|e| Status::unavailable(format!("host agent unreachable: {e:#}")))?;
        HostAgentClient::new(channel)
            .reserve(hv::ReserveRequest { resource_name: self.config.resource_name.clone(), devices: reserve })
            .await
            .map_err(|e| Status::new(e.code(), format!("host agent: {}", e.message())))?;
        Ok(Response::new(dp::AllocateResponse { container_responses: responses }))
    }

    async fn pre_start_container(
        &self,
        _: Request<dp::PreStartContainerRequest>,
    ) -> Result<Response<dp::PreStartContainerResponse>, Status> {
        Ok(Response::new(dp::PreStartContainerResponse {}))
    }
}

async fn register(config: &PluginConfig) -> anyhow::Result<()> {
    let channel = xpu_sync_common::unix_channel(config.plugins_dir().join("kubelet.sock")).await?;
    RegistrationClient::new(channel)
        .register(dp::RegisterRequest {
            version: API_VERSION.into(),
            endpoint: config.endpoint(),
            resource_name: config.resource_name.clone(),
            options: Some(dp::DevicePluginOptions {
                pre_start_required: false,
                get_preferred_allocation_available: false,
            }),
        })
        .await
        .map_err(|e| anyhow::anyhow!("Register: {}: {}", e.code(), e.message()))?;
    Ok(())
}

/// Serves one socket until it disappears (the kubelet restarted) or `stop` fires.
async fn serve_once(
    config: &PluginConfig,
    plugin: Arc<Plugin>,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let dir = config.plugins_dir();
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join(config.endpoint());
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DevicePluginServer::from_arc(plugin))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = gone_rx.await;
            }),
    );
    // Serving first: the kubelet dials back inside Register.
    let mut registered = false;
    loop {
        if !registered {
            match register(config).await {
                Ok(()) => {
                    registered = true;
                    tracing::info!(resource = %config.resource_name, endpoint = %config.endpoint(), "registered with the kubelet");
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "kubelet registration failed; retrying"),
            }
        }
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if !socket_exists(&socket) {
            tracing::info!("our socket is gone (kubelet restart): serving again and re-registering");
            break;
        }
    }
    // ListAndWatch streams never end by themselves: stop serving without waiting for them.
    let _ = gone_tx.send(());
    server.abort();
    Ok(())
}

fn socket_exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// Runs the plugin until `shutdown`.
pub async fn run(config: PluginConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let initial = discover::scan(&config.sysfs_root, &config.pfs, &config.sfs);
    tracing::info!(
        devices = initial.len(),
        healthy = initial.iter().filter(|d| d.healthy).count(),
        "discovered devices"
    );
    let (devices_tx, devices_rx) = watch::channel(initial);
    let plugin = Arc::new(Plugin { config: config.clone(), devices: devices_rx });
    let rescan = {
        let config = config.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(config.rescan_interval);
            loop {
                tick.tick().await;
                let found = discover::scan(&config.sysfs_root, &config.pfs, &config.sfs);
                devices_tx.send_if_modified(|current| {
                    if *current == found {
                        return false;
                    }
                    tracing::info!(
                        devices = found.len(),
                        healthy = found.iter().filter(|d| d.healthy).count(),
                        "devices changed"
                    );
                    *current = found;
                    true
                });
            }
        })
    };
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let serving = async {
        loop {
            if let Err(e) = serve_once(&config, Arc::clone(&plugin), &mut stop_rx).await {
                tracing::warn!(error = %format!("{e:#}"), "device plugin server failed; restarting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if *stop_rx.borrow() {
                return;
            }
        }
    };
    tokio::select! {
        () = serving => {}
        () = shutdown => {
            let _ = stop_tx.send(true);
        }
    }
    rescan.abort();
    let _ = std::fs::remove_file(config.plugins_dir().join(config.endpoint()));
    Ok(())
}
