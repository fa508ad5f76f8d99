//! The raw loopback mTLS gRPC limit: a trivial tonic echo service with rustls, run as its own
//! process (`xpu-bench echo-server`, like the broker is its own process), and the client load.

use std::{
    path::Path,
    pin::Pin,
    process::{ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::Stream;
use tokio::process::{Child, Command};
use tonic::{
    Request, Response, Status,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};

use crate::{
    agents,
    broker_proc::free_port,
    pb::echo::{
        EchoMessage, StreamRequest,
        echo_client::EchoClient,
        echo_server::{Echo, EchoServer},
    },
    pki::Pki,
    stats::{SharedLatency, Summary},
};

struct Svc;

type MessageStream = Pin<Box<dyn Stream<Item = Result<EchoMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Svc {
    async fn unary(&self, req: Request<EchoMessage>) -> Result<Response<EchoMessage>, Status> {
        Ok(Response::new(req.into_inner()))
    }

    type StreamStream = MessageStream;

    async fn stream(&self, req: Request<StreamRequest>) -> Result<Response<MessageStream>, Status> {
        let r = req.into_inner();
        let payload = vec![b'x'; r.size as usize];
        let s = futures::stream::iter((0..r.count).map(move |seq| Ok(EchoMessage { seq, payload: payload.clone() })));
        Ok(Response::new(Box::pin(s)))
    }
}

/// `xpu-bench echo-server --dir DIR`: serves on a free loopback port, written to `DIR/echo.port`.
pub fn serve_main(dir: &Path) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("echo-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(dir: &Path) -> anyhow::Result<()> {
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).with_context(|| format!("reading {n}"));
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read("server.crt")?, read("server.key")?))
        .client_ca_root(Certificate::from_pem(read("ca.crt")?));
    let port = free_port()?;
    let tmp = dir.join("echo.port.tmp");
    std::fs::write(&tmp, port.to_string())?;
    std::fs::rename(&tmp, dir.join("echo.port"))?;
    Server::builder()
        .tls_config(tls)?
        .tcp_nodelay(true)
        .add_service(EchoServer::new(Svc))
        .serve(([127, 0, 0, 1], port).into())
        .await?;
    Ok(())
}

pub struct EchoProc {
    child: Child,
    pub pid: u32,
    pub addr: std::net::SocketAddr,
}

impl EchoProc {
    pub async fn start(dir: &Path) -> anyhow::Result<EchoProc> {
        let _ = std::fs::remove_file(dir.join("echo.port"));
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .arg("echo-server")
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the echo server")?;
        let pid = child.id().context("the echo server exited at once")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let port: u16 = loop {
            if let Ok(p) = std::fs::read_to_string(dir.join("echo.port"))
                && let Ok(p) = p.trim().parse()
            {
                break p;
            }
            anyhow::ensure!(Instant::now() < deadline, "the echo server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok(EchoProc { child, pid, addr: ([127, 0, 0, 1], port).into() })
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    async fn client(&self, pki: &Pki) -> anyhow::Result<EchoClient<tonic::transport::Channel>> {
        let pem = pki.one("admin/echo")?;
        let (ch, _) = agents::connect_retrying(self.addr, pki.client_tls(&pem), 50).await?;
        Ok(EchoClient::new(ch))
    }

    /// Closed-loop unary calls, `concurrency` in flight over `connections` connections.
    pub async fn unary_rate(
        &self,
        pki: &Pki,
        concurrency: usize,
        connections: usize,
        duration: Duration,
        size: usize,
    ) -> anyhow::Result<(u64, Duration, Option<Summary>)> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            clients.push(self.client(pki).await?);
        }
        let count = Arc::new(AtomicU64::new(0));
        let lat = Arc::new(SharedLatency::default());
        let started = Instant::now();
        let deadline = started + duration;
        let mut tasks = Vec::new();
        for w in 0..concurrency.max(1) {
            let mut c = clients[w % clients.len()].clone();
            let count = Arc::clone(&count);
            let lat = Arc::clone(&lat);
            let payload = vec![b'x'; size];
            tasks.push(tokio::spawn(async move {
                let mut seq = 0;
                while Instant::now() < deadline {
                    seq += 1;
                    let t = Instant::now();
                    if c.unary(EchoMessage { seq, payload: payload.clone() }).await.is_ok() {
                        lat.record(t.elapsed());
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok((count.load(Ordering::Relaxed), started.elapsed(), lat.summary()))
    }

    /// Server-streamed messages received over `streams` streams (one connection each).
    pub async fn stream_rate(
        &self,
        pki: &Pki,
        streams: usize,
        duration: Duration,
        size: u32,
    ) -> anyhow::Result<(u64, Duration)> {
        let count = Arc::new(AtomicU64::new(0));
        let mut clients = Vec::new();
        for _ in 0..streams.max(1) {
            clients.push(self.client(pki).await?);
        }
        let started = Instant::now();
        let deadline = started + duration;
        let mut tasks = Vec::new();
        for mut c in clients {
            let count = Arc::clone(&count);
            tasks.push(tokio::spawn(async move {
                let Ok(resp) = c.stream(StreamRequest { count: u64::MAX, size }).await else { return };
                let mut s = resp.into_inner();
                while Instant::now() < deadline {
                    match s.message().await {
                        Ok(Some(_)) => {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => break,
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok((count.load(Ordering::Relaxed), started.elapsed()))
    }
}
