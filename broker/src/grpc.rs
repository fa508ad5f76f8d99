//! gRPC transport: the generated service traits as thin adapters over [`crate::service`], the
//! mutual-TLS listener, health and reflection. There is no plaintext gRPC listener.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, transport::Server};
use xpu_proto::broker::v1::{
    self as pb,
    admin_service_server::{AdminService, AdminServiceServer},
    agent_service_server::{AgentService, AgentServiceServer},
    host_service_server::{HostService, HostServiceServer},
    sync_service_server::{SyncService, SyncServiceServer},
};

use crate::{
    error::{Error, Result},
    identity::Identity,
    service::{self, Context, watch::EventStream},
    tls::ReloadingConfig,
};

/// The caller's identity from its verified client certificate.
fn identity<T>(req: &Request<T>) -> Result<Identity, Status> {
    let certs = req.peer_certs().ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let leaf = certs.first().ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    Identity::from_certificate(leaf.as_ref()).map_err(|e| {
        tracing::warn!(error = %e, "refused a client certificate");
        Status::from(e)
    })
}

fn reply<T>(id: &Identity, method: &'static str, result: Result<T>) -> Result<Response<T>, Status> {
    match result {
        Ok(v) => Ok(Response::new(v)),
        Err(e) => {
            if matches!(e, Error::PermissionDenied(_) | Error::Unauthenticated(_)) {
                tracing::warn!(identity = %id, method, error = %e, "refused");
            } else {
                tracing::debug!(identity = %id, method, error = %e, "request failed");
            }
            Err(Status::from(e))
        }
    }
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

fn stream(s: EventStream) -> WatchStream {
    Box::pin(s.map(|r| r.map_err(Status::from)))
}

#[derive(Clone)]
pub struct Grpc {
    ctx: Context,
}

#[tonic::async_trait]
impl AgentService for Grpc {
    type WatchDesiredStream = WatchStream;

    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let id = identity(&req)?;
        reply(&id, "Register", service::agent::register(&self.ctx, &id, req.into_inner()).await)
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let id = identity(&req)?;
        reply(&id, "Heartbeat", service::agent::heartbeat(&self.ctx, &id, req.into_inner()).await)
    }

    async fn watch_desired(
        &self,
        req: Request<pb::WatchDesiredRequest>,
    ) -> Result<Response<Self::WatchDesiredStream>, Status> {
        let id = identity(&req)?;
        reply(&id, "WatchDesired", service::agent::watch_desired(&self.ctx, &id, req.into_inner()).map(stream))
    }

    async fn report_status(
        &self,
        req: Request<pb::ReportStatusRequest>,
    ) -> Result<Response<pb::ReportStatusResponse>, Status> {
        let id = identity(&req)?;
        reply(&id, "ReportStatus", service::agent::report_status(&self.ctx, &id, req.into_inner()).await)
    }
}

#[tonic::async_trait]
impl SyncService for Grpc {
    type WatchStream = WatchStream;

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::Resource>, Status> {
        let id = identity(&req)?;
        let result = match service::require_cluster(&id) {
            Ok(()) => service::objects::get(&self.ctx, &id, req.into_inner().key.as_ref()).await,
            Err(e) => Err(e),
        };
        reply(&id, "Sync.Get", result)
    }

    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let id = identity(&req)?;
        let result = match service::require_cluster(&id) {
            Ok(()) => service::objects::apply(&self.ctx, &id, req.into_inner()).await,
            Err(e) => Err(e),
        };
        reply(&id, "Sync.Apply", result)
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let id = identity(&req)?;
        let result = match service::require_cluster(&id) {
            Ok(()) => service::objects::delete(&self.ctx, &id, req.into_inner()).await,
            Err(e) => Err(e),
        };
        reply(&id, "Sync.Delete", result)
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let id = identity(&req)?;
        let result = match service::require_cluster(&id) {
            Ok(()) => service::objects::list(&self.ctx, &id, req.into_inner()).await,
            Err(e) => Err(e),
        };
        reply(&id, "Sync.List", result)
    }

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let id = identity(&req)?;
        let result = service::require_cluster(&id)
            .and_then(|()| service::objects::watch(&self.ctx, &id, req.into_inner()))
            .map(stream);
        reply(&id, "Sync.Watch", result)
    }
}

#[tonic::async_trait]
impl HostService for Grpc {
    async fn attach_netdev(
        &self,
        req: Request<pb::AttachNetdevRequest>,
    ) -> Result<Response<pb::AttachNetdevResponse>, Status> {
        let id = identity(&req)?;
        let started = std::time::Instant::now();
        let result = service::host::attach(&self.ctx, &id, req.into_inner()).await;
        crate::metrics::record_attach(started.elapsed(), result.is_ok());
        reply(&id, "AttachNetdev", result)
    }

    async fn get_netdev(&self, req: Request<pb::GetNetdevRequest>) -> Result<Response<pb::Netdev>, Status> {
        let id = identity(&req)?;
        reply(&id, "GetNetdev", service::host::get(&self.ctx, &id, req.into_inner()).await)
    }

    async fn detach_netdev(
        &self,
        req: Request<pb::DetachNetdevRequest>,
    ) -> Result<Response<pb::DetachNetdevResponse>, Status> {
        let id = identity(&req)?;
        reply(&id, "DetachNetdev", service::host::detach(&self.ctx, &id, req.into_inner()).await)
    }
}

#[tonic::async_trait]
impl AdminService for Grpc {
    type WatchStream = WatchStream;

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::Resource>, Status> {
        let id = identity(&req)?;
        reply(&id, "Admin.Get", service::admin::get(&self.ctx, &id, req.into_inner()).await)
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let id = identity(&req)?;
        reply(&id, "Admin.List", service::admin::list(&self.ctx, &id, req.into_inner()).await)
    }

    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let id = identity(&req)?;
        reply(&id, "Admin.Apply", service::admin::apply(&self.ctx, &id, req.into_inner()).await)
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let id = identity(&req)?;
        reply(&id, "Admin.Delete", service::admin::delete(&self.ctx, &id, req.into_inner()).await)
    }

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let id = identity(&req)?;
        reply(&id, "Admin.Watch", service::admin::watch(&self.ctx, &id, req.into_inner()).map(stream))
    }

    async fn fleet_status(
        &self,
        req: Request<pb::FleetStatusRequest>,
    ) -> Result<Response<pb::FleetStatusResponse>, Status> {
        let id = identity(&req)?;
        reply(&id, "Admin.FleetStatus", service::admin::fleet_status(&self.ctx, &id).await)
    }

    async fn compact(&self, req: Request<pb::CompactRequest>) -> Result<Response<pb::CompactResponse>, Status> {
        let id = identity(&req)?;
        reply(&id, "Admin.Compact", service::admin::compact(&self.ctx, &id, req.into_inner()).await)
    }

    async fn decommission_dpu(
        &self,
        req: Request<pb::DecommissionDpuRequest>,
    ) -> Result<Response<pb::DecommissionDpuResponse>, Status> {
        let id = identity(&req)?;
        reply(&id, "Admin.DecommissionDpu", service::admin::decommission(&self.ctx, &id, req.into_inner()).await)
    }
}

/// A TLS handshake that takes longer than this is dropped (slowloris).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections and completes the TLS handshake off the accept loop; only
/// connections with a verified client certificate reach gRPC.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ReloadingConfig>,
) -> (ReceiverStream<std::io::Result<TlsStream<TcpStream>>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.current());
            let conns = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = conns.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        crate::metrics::record_handshake_failure();
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    (ReceiverStream::new(rx), task)
}

pub struct GrpcOptions {
    pub max_message_bytes: usize,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

pub async fn serve(
    listener: TcpListener,
    tls: Arc<ReloadingConfig>,
    ctx: Context,
    opts: GrpcOptions,
    rest: axum::Router,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServiceServer<Grpc>>().await;
    health.set_serving::<SyncServiceServer<Grpc>>().await;
    health.set_serving::<HostServiceServer<Grpc>>().await;
    health.set_serving::<AdminServiceServer<Grpc>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let g = Grpc { ctx };
    let max = opts.max_message_bytes;
    let (incoming, accept_task) = tls_incoming(listener, tls);
    tracing::info!(addr = ?addr, "gRPC (mTLS) listening");
    // The status API rides along for operators with certificates (HTTP/1.1 or h2, not gRPC).
    let result = Server::builder()
        .tcp_nodelay(true)
        .accept_http1(true)
        .http2_keepalive_interval(Some(opts.keepalive_interval))
        .http2_keepalive_timeout(Some(opts.keepalive_timeout))
        .add_routes(tonic::service::Routes::from(rest))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(AgentServiceServer::new(g.clone()).max_decoding_message_size(max))
        .add_service(SyncServiceServer::new(g.clone()).max_decoding_message_size(max))
        .add_service(HostServiceServer::new(g.clone()).max_decoding_message_size(max))
        .add_service(AdminServiceServer::new(g).max_decoding_message_size(max))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    accept_task.abort();
    result.map_err(Into::into)
}
