//! etcd 3.4 as the peer: installed from Debian (`etcd-server`) when missing, started on loopback
//! ports in a temporary directory with the run's certificates (client-certificate auth, like
//! the broker), and driven with a minimal hand-written v3 client (KV.Put, Watch.Watch).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use arc_swap::ArcSwapOption;
use futures::StreamExt as _;
use tokio::{
    process::{Child, Command},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::{
    agents::{self, Probe},
    broker_proc::free_port,
    pb::etcd::{self as epb, kv_client::KvClient, watch_client::WatchClient},
    pki::Pki,
};

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

async fn apt_get(args: &[&str]) -> anyhow::Result<bool> {
    eprintln!("  running: apt-get {}", args.join(" "));
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .stderr(std::io::stderr())
        .status()
        .await
        .context("running apt-get")?;
    Ok(status.success())
}

/// The `etcd` binary, installing Debian's `etcd-server` (etcd 3.4) when it is not on PATH.
pub async fn ensure_installed() -> anyhow::Result<PathBuf> {
    if let Some(p) = which("etcd") {
        return Ok(p);
    }
    eprintln!("  etcd is not on PATH: installing Debian's etcd-server (etcd 3.4)");
    let install = ["install", "-y", "--no-install-recommends", "etcd-server"];
    if !apt_get(&install).await? {
        apt_get(&["update"]).await?;
        anyhow::ensure!(apt_get(&install).await?, "apt-get install -y etcd-server failed");
    }
    which("etcd")
        .or_else(|| Some(PathBuf::from("/usr/bin/etcd")).filter(|p| p.is_file()))
        .context("etcd not found after installing etcd-server")
}

pub async fn version(bin: &Path) -> String {
    match Command::new(bin).arg("--version").output().await {
        Ok(o) => String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

pub struct EtcdProc {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
}

impl EtcdProc {
    pub async fn start(bin: &Path, pki: &Pki) -> anyhow::Result<EtcdProc> {
        let client = free_port()?;
        let peer = free_port()?;
        let data = pki.dir.join(format!("etcd-{client}"));
        let log = pki.dir.join(format!("etcd-{client}.log"));
        let log_file = std::fs::File::create(&log)?;
        let peer_url = format!("http://127.0.0.1:{peer}");
        let client_url = format!("https://127.0.0.1:{client}");
        let mut child = Command::new(bin)
            .args(["--name", "bench", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}"), "--initial-cluster-state", "new"])
            .arg("--cert-file")
            .arg(&pki.server.cert)
            .arg("--key-file")
            .arg(&pki.server.key)
            .arg("--trusted-ca-file")
            .arg(&pki.server.client_ca)
            .arg("--client-cert-auth")
            .args(["--logger", "zap", "--log-level", "warn", "--quota-backend-bytes", "8589934592"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file.try_clone()?))
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("etcd exited at once")?;
        let addr: SocketAddr = ([127, 0, 0, 1], client).into();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait()? {
                anyhow::bail!("etcd exited with {st}: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            if let Ok(mut kv) = kv(addr, pki).await
                && kv
                    .put(epb::PutRequest { key: b"/bench/ready".to_vec(), value: b"1".to_vec(), ..Default::default() })
                    .await
                    .is_ok()
            {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "etcd did not answer within 30s (log {})", log.display());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("  etcd pid {pid} on {addr}, log {}", log.display());
        Ok(EtcdProc { child, pid, addr })
    }

    pub async fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

pub async fn channel(addr: SocketAddr, pki: &Pki) -> anyhow::Result<Channel> {
    let pem = pki.one("admin/etcd-client")?;
    Ok(agents::connect_retrying(addr, pki.client_tls(&pem), 5).await?.0)
}

pub async fn kv(addr: SocketAddr, pki: &Pki) -> anyhow::Result<KvClient<Channel>> {
    Ok(KvClient::new(channel(addr, pki).await?))
}

/// A value that carries the write's sequence number in its first 8 bytes, then `body`.
pub fn value(seq: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + body.len());
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(body);
    v
}

fn seq_of(value: &[u8]) -> Option<u64> {
    value.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes)
}

/// `key` + 1 in its last byte: the range end that watches a prefix.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// One watcher: its own connection and Watch stream, with the given watches.
pub struct Watcher {
    _requests: mpsc::Sender<epb::WatchRequest>,
    task: JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct WatchCounters {
    pub probe: ArcSwapOption<Probe>,
    pub events: AtomicU64,
    pub errors: AtomicU64,
}

pub async fn watcher(
    addr: SocketAddr,
    pki: &Pki,
    watches: Vec<(Vec<u8>, Vec<u8>)>,
    counters: Arc<WatchCounters>,
) -> anyhow::Result<Watcher> {
    let mut client = WatchClient::new(channel(addr, pki).await?);
    let (tx, rx) = mpsc::channel(16);
    let n = watches.len();
    for (key, range_end) in watches {
        let create = epb::WatchCreateRequest { key, range_end, ..Default::default() };
        tx.send(epb::WatchRequest { request_union: Some(epb::watch_request::RequestUnion::CreateRequest(create)) })
            .await?;
    }
    let mut stream = client.watch(ReceiverStream::new(rx)).await?.into_inner();
    let mut created = 0;
    while created < n {
        let resp = stream.message().await?.context("the watch stream ended before the watches were created")?;
        if resp.created {
            created += 1;
        }
    }
    let task = tokio::spawn(async move {
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    for ev in resp.events {
                        counters.events.fetch_add(1, Ordering::Relaxed);
                        if let (Some(kv), Some(probe)) = (ev.kv, counters.probe.load().as_ref())
                            && let Some(seq) = seq_of(&kv.value)
                        {
                            probe.arrived(seq);
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    });
    Ok(Watcher { _requests: tx, task })
}

/// Starts `n` watchers, `concurrency` at a time.
pub async fn watchers(
    addr: SocketAddr,
    pki: &Pki,
    specs: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
    counters: &Arc<WatchCounters>,
) -> anyhow::Result<Vec<Watcher>> {
    let started: Vec<anyhow::Result<Watcher>> =
        futures::stream::iter(specs.into_iter().map(|w| watcher(addr, pki, w, Arc::clone(counters))))
            .buffer_unordered(64)
            .collect()
            .await;
    started.into_iter().collect()
}
