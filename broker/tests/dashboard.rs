//! The dashboard in a real browser: headless Chromium, driven over the DevTools protocol, loads
//! the page of a broker with seeded DPUs and netdevs, shows a stale DPU as stale, and shows a
//! status change without a reload.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use chrono::Utc;
use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use xpu_broker::{rest::Access, token::TokenKey};
use xpu_proto::broker::v1 as pb;

const BROWSERS: [&str; 3] = ["chromium", "chromium-browser", "google-chrome"];

fn find_browser() -> Option<String> {
    BROWSERS
        .iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
        .map(|b| b.to_string())
}

/// The browser, installed with apt when it is missing and this is a Debian machine we may
/// change; `None` (with the reason) when neither works.
fn browser() -> Result<String, String> {
    if let Some(b) = find_browser() {
        return Ok(b);
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "chromium"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => find_browser().ok_or_else(|| "apt installed chromium but it does not run".into()),
        Ok(s) => Err(format!("chromium is not installed and `apt-get install chromium` failed ({s})")),
        Err(e) => Err(format!("chromium is not installed and apt-get cannot run: {e}")),
    }
}

struct Chromium {
    child: Child,
    ws_url: String,
    _profile: tempfile::TempDir,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch(binary: &str) -> Chromium {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--metrics-recording-only",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.split("DevTools listening on ").nth(1) {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let ws_url = rx.recv_timeout(Duration::from_secs(30)).expect("chromium announces its DevTools endpoint");
    Chromium { child, ws_url, _profile: profile }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A DevTools session on one page.
struct Page {
    ws: Ws,
    next_id: u64,
    session: Option<String>,
}

impl Page {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::Text(msg.to_string().into())).await.unwrap();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(20), self.ws.next()).await.unwrap().unwrap().unwrap();
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v["error"].is_null(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true })).await;
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page.
    async fn until(&mut self, expression: &str, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if self.eval(expression).await == json!(true) {
                return;
            }
            if std::time::Instant::now() > deadline {
                let body = self.eval("document.body ? document.body.innerText.slice(0, 2000) : ''").await;
                panic!("{what}: never true: {expression}\npage text: {body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn open_page(chrome: &Chromium) -> Page {
    let (ws, _) = tokio_tungstenite::connect_async(chrome.ws_url.as_str()).await.unwrap();
    let mut page = Page { ws, next_id: 0, session: None };
    let target = page.call("Target.createTarget", json!({ "url": "about:blank" })).await;
    let attached = page.call("Target.attachToTarget", json!({ "targetId": target["targetId"], "flatten": true })).await;
    page.session = Some(attached["sessionId"].as_str().unwrap().to_string());
    page.call("Page.enable", json!({})).await;
    page.call("Network.enable", json!({})).await;
    page
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn the_dashboard_shows_the_fleet_and_follows_changes_live(pool: sqlx::PgPool) {
    let binary = match browser() {
        Ok(b) => b,
        Err(reason) => {
            println!("SKIPPED: the browser test needs Chromium: {reason}");
            return;
        }
    };
    let pki = Pki::new();
    let mut config = test_config(&pki);
    let key = TokenKey::from_bytes(&[9; 32]);
    config.access = Access { token_key: Some(key.clone()), anonymous_read: false };
    let b = TestBroker::start_with(pool, pki, config).await;

    // Two DPUs; dpu-quiet stops heartbeating and goes stale; netdevs on both.
    seed_network(&b, "net-w", "10.7.0.0/24", "10.7.0.1").await;
    register(&b, "dpu-live").await;
    register(&b, "dpu-quiet").await;
    let mut admin = b.admin().await;
    for vf in 0..3 {
        admin.apply(apply_req(mk_netdev("web", "dpu-live", vf, "node-1", "net-w"))).await.unwrap();
    }
    admin.apply(apply_req(mk_netdev("web", "dpu-quiet", 0, "node-2", "net-w"))).await.unwrap();
    let mut live = b.agent("dpu-live").await;
    let beating = {
        let mut agent = live.clone();
        tokio::spawn(async move {
            loop {
                let _ = agent.heartbeat(pb::HeartbeatRequest { serial: "dpu-live".into(), applied_revision: 1 }).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    let chrome = launch(&binary);
    let mut page = open_page(&chrome).await;
    let origin = format!("http://127.0.0.1:{}", b.http.port());
    // Signed in: the session cookie the login form would set.
    let token = key.issue("browser-test", Duration::from_secs(600), Utc::now());
    page.call(
        "Network.setCookie",
        json!({ "name": "xpu_token", "value": token, "url": format!("{origin}/"), "httpOnly": true }),
    )
    .await;
    page.call("Page.navigate", json!({ "url": format!("{origin}/") })).await;

    page.until("document.querySelectorAll('#dpus tbody tr').length === 2", "both DPUs listed").await;
    page.until("document.querySelectorAll('#netdevs tbody tr').length === 4", "all netdevs listed").await;
    assert_eq!(
        page.eval(
            "Array.from(document.querySelectorAll('#dpus tbody tr')).map(r => r.dataset.serial).sort().join(',')"
        )
        .await,
        json!("dpu-live,dpu-quiet")
    );
    assert_eq!(page.eval("location.pathname").await, json!("/"), "signed in, not sent to /login");

    // The lease of dpu-quiet lapses (3 s in tests): its row is marked stale, dpu-live's is not.
    let quiet = "document.querySelector('#dpus tr[data-serial=\"dpu-quiet\"]')";
    page.until(
        &format!("{quiet} !== null && {quiet}.classList.contains('stale') && {quiet}.textContent.includes('stale')"),
        "the stale DPU is marked",
    )
    .await;
    let live_row = "document.querySelector('#dpus tr[data-serial=\"dpu-live\"]')";
    assert_eq!(page.eval(&format!("{live_row}.classList.contains('stale')")).await, json!(false));

    // A status change in the broker shows up without a reload (the marker survives).
    page.eval("window.__notReloaded = 42").await;
    let netdev = "document.querySelector('#netdevs tr[data-id=\"dpu-live-pf0-vf1\"]')";
    assert_eq!(page.eval(&format!("{netdev}.dataset.phase")).await, json!("Pending"));
    live.report_status(pb::ReportStatusRequest {
        serial: "dpu-live".into(),
        reports: vec![report(key_of("web", "dpu-live-pf0-vf1"), 1, 1, netdev_status("Connected", "10.7.0.3/24"))],
    })
    .await
    .unwrap();
    page.until(&format!("{netdev}.dataset.phase === 'Connected'"), "the new phase appears").await;
    assert_eq!(page.eval(&format!("{netdev}.textContent.includes('10.7.0.3/24')")).await, json!(true));
    assert_eq!(page.eval("window.__notReloaded").await, json!(42), "the page was not reloaded");

    beating.abort();
    drop(page);
    drop(chrome);
    b.stop().await;
}

fn key_of(namespace: &str, name: &str) -> pb::ObjectKey {
    key(pb::Kind::Netdev, namespace, name)
}
