//! A kubelet stand-in: the Registration service on `kubelet.sock` (dialling the plugin back and
//! following its ListAndWatch, as the kubelet does), `Allocate` calls as the kubelet makes them,
//! and the PodResources `List` service on the pod-resources socket.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use xpu_proto::kubelet::{
    deviceplugin::v1beta1::{
        self as dp,
        device_plugin_client::DevicePluginClient,
        registration_server::{Registration, RegistrationServer},
    },
    podresources::v1::{
        self as pr,
        pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer},
    },
};

#[derive(Default)]
pub struct Seen {
    pub registrations: Vec<dp::RegisterRequest>,
    pub options: Option<dp::DevicePluginOptions>,
    pub devices: Vec<dp::Device>,
    pub lists: usize,
}

/// (namespace, pod, resource, device ids) the PodResources API reports.
pub type Allocation = (String, String, String, Vec<String>);

#[derive(Clone)]
pub struct Kubelet {
    pub dir: PathBuf,
    pub seen: Arc<Mutex<Seen>>,
    pub allocations: Arc<Mutex<Vec<Allocation>>>,
}

struct Reg(Kubelet);

#[tonic::async_trait]
impl Registration for Reg {
    async fn register(&self, req: Request<dp::RegisterRequest>) -> Result<Response<dp::Empty>, Status> {
        let req = req.into_inner();
        if req.version != "v1beta1" {
            return Err(Status::invalid_argument(format!("unsupported version {}", req.version)));
        }
        if !req.resource_name.contains('/') {
            return Err(Status::invalid_argument("not an extended resource name"));
        }
        // Dial back, as the kubelet does inside Register, and ask for the options.
        let socket = self.0.dir.join("device-plugins").join(&req.endpoint);
        let channel =
            xpu_sync_common::unix_channel(&socket).await.map_err(|e| Status::unavailable(format!("{e:#}")))?;
        let mut client = DevicePluginClient::new(channel);
        let options = client.get_device_plugin_options(dp::Empty {}).await?.into_inner();
        {
            let mut seen = self.0.seen.lock().unwrap();
            seen.registrations.push(req);
            seen.options = Some(options);
        }
        let seen = Arc::clone(&self.0.seen);
        tokio::spawn(async move {
            let Ok(resp) = client.list_and_watch(dp::Empty {}).await else { return };
            let mut stream = resp.into_inner();
            while let Ok(Some(msg)) = stream.message().await {
                let mut s = seen.lock().unwrap();
                s.devices = msg.devices;
                s.lists += 1;
            }
        });
        Ok(Response::new(dp::Empty {}))
    }
}

struct Lister(Kubelet);

#[tonic::async_trait]
impl PodResourcesLister for Lister {
    async fn list(
        &self,
        _: Request<pr::ListPodResourcesRequest>,
    ) -> Result<Response<pr::ListPodResourcesResponse>, Status> {
        let allocations = self.0.allocations.lock().unwrap().clone();
        let pod_resources = allocations
            .into_iter()
            .map(|(ns, name, resource, ids)| pr::PodResources {
                name,
                namespace: ns,
                containers: vec![pr::ContainerResources {
                    name: "main".into(),
                    devices: vec![pr::ContainerDevices { resource_name: resource, device_ids: ids, topology: None }],
                    ..Default::default()
                }],
            })
            .collect();
        Ok(Response::new(pr::ListPodResourcesResponse { pod_resources }))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<pr::AllocatableResourcesRequest>,
    ) -> Result<Response<pr::AllocatableResourcesResponse>, Status> {
        Ok(Response::new(pr::AllocatableResourcesResponse::default()))
    }

    async fn get(
        &self,
        _: Request<pr::GetPodResourcesRequest>,
    ) -> Result<Response<pr::GetPodResourcesResponse>, Status> {
        Err(Status::unimplemented("not used"))
    }
}

impl Kubelet {
    /// Serves `kubelet.sock` and the PodResources socket under `dir` (a kubelet root directory).
    pub fn start(dir: &Path) -> Kubelet {
        let k = Kubelet { dir: dir.to_path_buf(), seen: Arc::default(), allocations: Arc::default() };
        k.serve_registration();
        std::fs::create_dir_all(dir.join("pod-resources")).unwrap();
        let pr_sock = dir.join("pod-resources/kubelet.sock");
        let _ = std::fs::remove_file(&pr_sock);
        let listener = UnixListener::bind(&pr_sock).unwrap();
        let svc = PodResourcesListerServer::new(Lister(k.clone()));
        tokio::spawn(
            tonic::transport::Server::builder().add_service(svc).serve_with_incoming(UnixListenerStream::new(listener)),
        );
        k
    }

    fn serve_registration(&self) {
        let plugins = self.dir.join("device-plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        let sock = plugins.join("kubelet.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        let svc = RegistrationServer::new(Reg(self.clone()));
        tokio::spawn(
            tonic::transport::Server::builder().add_service(svc).serve_with_incoming(UnixListenerStream::new(listener)),
        );
    }

    /// What a kubelet restart does to plugins: the device-plugins directory is wiped and
    /// `kubelet.sock` re-created.
    pub fn restart(&self) {
        let plugins = self.dir.join("device-plugins");
        for e in std::fs::read_dir(&plugins).unwrap().flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        self.serve_registration();
    }

    pub fn registrations(&self) -> usize {
        self.seen.lock().unwrap().registrations.len()
    }

    pub fn devices(&self) -> Vec<dp::Device> {
        self.seen.lock().unwrap().devices.clone()
    }

    /// `Allocate` for one container, as the kubelet calls it on pod admission.
    pub async fn allocate(&self, ids: &[&str]) -> Result<dp::ContainerAllocateResponse, Status> {
        let endpoint = self.seen.lock().unwrap().registrations.last().map(|r| r.endpoint.clone()).expect("registered");
        let channel = xpu_sync_common::unix_channel(self.dir.join("device-plugins").join(endpoint)).await.unwrap();
        let resp = DevicePluginClient::new(channel)
            .allocate(dp::AllocateRequest {
                container_requests: vec![dp::ContainerAllocateRequest {
                    devices_ids: ids.iter().map(|s| s.to_string()).collect(),
                }],
            })
            .await?
            .into_inner();
        Ok(resp.container_responses.into_iter().next().unwrap())
    }
}
