//! The real `xpu-broker serve` binary as a process: started on fixed ports so it can be killed
//! (SIGKILL) and restarted where its clients expect it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use xpu_testkit::Pki;

pub struct BrokerProcess {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub log: PathBuf,
    binary: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    pub starts: u32,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

impl BrokerProcess {
    /// Starts the broker on `database_url` with the test PKI's certificates; `extra` flags are
    /// appended (e.g. `--lease-duration 5s`). Waits until it is ready.
    pub async fn start(database_url: &str, pki: &Pki, work: &Path, extra: &[&str]) -> BrokerProcess {
        let binary = xpu_testkit::workspace_binary("xpu-broker", "xpu-broker");
        let grpc: SocketAddr = format!("127.0.0.1:{}", crate::free_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", crate::free_port()).parse().unwrap();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--database-url".into(),
            database_url.into(),
            "--grpc-addr".into(),
            grpc.to_string(),
            "--http-addr".into(),
            http.to_string(),
            "--data-dir".into(),
            work.join("broker-data").display().to_string(),
            "--tls-cert".into(),
            pki.tls.cert.display().to_string(),
            "--tls-key".into(),
            pki.tls.key.display().to_string(),
            "--client-ca".into(),
            pki.tls.client_ca.display().to_string(),
            "--bookmark-interval".into(),
            "300ms".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut b = BrokerProcess { grpc, http, log: work.join("broker.log"), binary, args, child: None, starts: 0 };
        b.spawn();
        if b.wait_ready(Duration::from_secs(30)).await.is_none() {
            panic!("the broker did not become ready:\n{}", b.log_text());
        }
        b
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(&self.binary)
            .args(&self.args)
            .env("XPU_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.starts += 1;
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL, then start again on the same ports and wait until ready.
    pub async fn crash_and_restart(&mut self) -> Duration {
        self.kill();
        let t = std::time::Instant::now();
        self.spawn();
        self.wait_ready(Duration::from_secs(60)).await.expect("the broker comes back");
        t.elapsed()
    }

    /// Waits for `/readyz` to answer 200.
    pub async fn wait_ready(&self, within: Duration) -> Option<()> {
        crate::wait_for(within, || async {
            matches!(crate::http::get(self.http, "/readyz").await, Some((200, _))).then_some(())
        })
        .await
    }

    /// `/readyz` status, if it answers.
    pub async fn readyz(&self) -> Option<u16> {
        crate::http::get(self.http, "/readyz").await.map(|(s, _)| s)
    }

    pub async fn metrics(&self) -> String {
        crate::http::get(self.http, "/metrics").await.map(|(_, b)| b).unwrap_or_default()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident memory (bytes) and open file descriptors of the running process.
    pub fn resources(&self) -> Option<(u64, usize)> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kb: u64 =
            status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
        Some((rss_kb * 1024, fds))
    }
}
