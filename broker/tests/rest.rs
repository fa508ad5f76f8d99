//! The status API through the real router: filters, pagination, history, errors, access, the
//! OpenAPI document, the mutual-TLS listener and the metrics an attach moves.
#![allow(clippy::unwrap_used)]

mod common;

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    http::{Request, StatusCode, header},
};
use chrono::Utc;
use common::*;
use serde_json::Value;
use tower::ServiceExt;
use xpu_broker::{
    rest::{self, Access, RestState},
    token::TokenKey,
};
use xpu_proto::broker::v1 as pb;

const KEY: [u8; 32] = [42; 32];

fn state(b: &TestBroker, anonymous_read: bool) -> RestState {
    RestState {
        ctx: b.ctx.clone(),
        access: Arc::new(Access { token_key: Some(TokenKey::from_bytes(&KEY)), anonymous_read }),
    }
}

fn token() -> String {
    TokenKey::from_bytes(&KEY).issue("tester", Duration::from_secs(600), Utc::now())
}

/// GET through the router with a valid token: (status, JSON body).
async fn get(b: &TestBroker, path: &str) -> (StatusCode, Value) {
    let req = Request::get(path).header(header::AUTHORIZATION, format!("Bearer {}", token())).body(Body::empty());
    send(b, req.unwrap()).await
}

async fn send(b: &TestBroker, req: Request<Body>) -> (StatusCode, Value) {
    let resp = rest::router(state(b, false)).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn ids(page: &Value) -> Vec<String> {
    page["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_string()).collect()
}

fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str, message: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{}", got.1);
    assert_eq!(got.1["error"]["message"], message, "{}", got.1);
}

/// Two DPUs, eight netdevs (five on dpu-a at node-1, three on dpu-b at node-2), one reported
/// Connected, one Error.
async fn seed(b: &TestBroker) {
    seed_network(b, "net-a", "10.9.0.0/24", "10.9.0.1").await;
    register(b, "dpu-a").await;
    register(b, "dpu-b").await;
    let mut admin = b.admin().await;
    for vf in 0..5 {
        let ns = if vf < 4 { "default" } else { "other" };
        admin.apply(apply_req(mk_netdev(ns, "dpu-a", vf, "node-1", "net-a"))).await.unwrap();
    }
    for vf in 0..3 {
        admin.apply(apply_req(mk_netdev("default", "dpu-b", vf, "node-2", "net-a"))).await.unwrap();
    }
    let mut agent = b.agent("dpu-a").await;
    let mut failed = netdev_status("Error", "");
    failed.message = "no such VF".into();
    agent
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-a".into(),
            reports: vec![
                report(
                    key(pb::Kind::Netdev, "default", "dpu-a-pf0-vf0"),
                    1,
                    1,
                    netdev_status("Connected", "10.9.0.2/24"),
                ),
                report(key(pb::Kind::Netdev, "default", "dpu-a-pf0-vf1"), 1, 2, failed),
            ],
        })
        .await
        .unwrap();
}

conformance!(fleet_and_dpus_summarise_the_seeded_fleet);
async fn fleet_and_dpus_summarise_the_seeded_fleet(b: TestBroker) {
    seed(&b).await;
    let (s, fleet) = get(&b, "/api/v1/fleet").await;
    assert_eq!(s, StatusCode::OK, "{fleet}");
    assert_eq!(fleet["dpus"]["total"], 2);
    assert_eq!(fleet["dpus"]["ready"], 2);
    assert_eq!(fleet["netdevs"]["total"], 8);
    assert_eq!(fleet["netdevs"]["by_phase"]["Connected"], 1);
    assert_eq!(fleet["netdevs"]["by_phase"]["Error"], 1);
    assert_eq!(fleet["netdevs"]["by_phase"]["Pending"], 6);
    assert_eq!(fleet["objects"]["Netdev"], 8);
    assert!(fleet["revision"].as_i64().unwrap() > 10);

    let (s, page) = get(&b, "/api/v1/dpus").await;
    assert_eq!(s, StatusCode::OK);
    let dpus = page["items"].as_array().unwrap();
    assert_eq!(dpus.len(), 2);
    let a = &dpus[0];
    assert_eq!(a["serial"], "dpu-a");
    assert_eq!(a["lease_state"], "Ready");
    assert_eq!(a["stale"], false);
    assert_eq!(a["netdevs"], 5);
    assert_eq!(a["pending"], 3, "vf0 and vf1 were reported at their generation");
    assert_eq!(a["last_error"], "Netdev default/dpu-a-pf0-vf1: no such VF");
    assert_eq!(a["connected"], false, "no desired-state stream is open");
    assert!(a["lease_age_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(dpus[1]["serial"], "dpu-b");
    assert_eq!(dpus[1]["pending"], 3);
    assert!(dpus[1]["last_error"].is_null());
    assert!(page["continue"].is_null());

    // Pages of one.
    let (_, first) = get(&b, "/api/v1/dpus?limit=1").await;
    assert_eq!(first["items"][0]["serial"], "dpu-a");
    let token = first["continue"].as_str().unwrap();
    let (_, second) = get(&b, &format!("/api/v1/dpus?limit=1&continue={token}")).await;
    assert_eq!(second["items"][0]["serial"], "dpu-b");

    let (s, one) = get(&b, "/api/v1/dpus/dpu-b").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(one["serial"], "dpu-b");
    assert_eq!(one["conditions"][0]["type"], "Ready");
    assert_error(&get(&b, "/api/v1/dpus/dpu-z").await, StatusCode::NOT_FOUND, "not_found", "dpu dpu-z not found");
    assert_error(
        &get(&b, "/api/v1/dpus?limit=0").await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "invalid limit: 0 is out of range 1..=1000",
    );
    assert_error(
        &get(&b, "/api/v1/dpus?limit=1001").await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "invalid limit: 1001 is out of range 1..=1000",
    );
    b.stop().await;
}

conformance!(netdevs_filter_and_page);
async fn netdevs_filter_and_page(b: TestBroker) {
    seed(&b).await;
    let (_, all) = get(&b, "/api/v1/netdevs").await;
    assert_eq!(ids(&all).len(), 8);
    let (_, on_b) = get(&b, "/api/v1/netdevs?dpu=dpu-b").await;
    assert_eq!(ids(&on_b), ["dpu-b-pf0-vf0", "dpu-b-pf0-vf1", "dpu-b-pf0-vf2"]);
    let (_, node1) = get(&b, "/api/v1/netdevs?node=node-1").await;
    assert_eq!(ids(&node1).len(), 5);
    assert!(node1["items"].as_array().unwrap().iter().all(|n| n["node"] == "node-1"));
    let (_, errors) = get(&b, "/api/v1/netdevs?phase=Error").await;
    assert_eq!(ids(&errors), ["dpu-a-pf0-vf1"]);
    assert_eq!(errors["items"][0]["message"], "no such VF");
    let (_, connected) = get(&b, "/api/v1/netdevs?phase=Connected").await;
    assert_eq!(ids(&connected), ["dpu-a-pf0-vf0"]);
    assert_eq!(connected["items"][0]["ip"], "10.9.0.2/24");
    let (_, pending) = get(&b, "/api/v1/netdevs?phase=Pending").await;
    assert_eq!(ids(&pending).len(), 6, "Pending includes netdevs without a report");
    let (_, other) = get(&b, "/api/v1/netdevs?namespace=other").await;
    assert_eq!(ids(&other), ["dpu-a-pf0-vf4"]);
    let (_, combined) = get(&b, "/api/v1/netdevs?dpu=dpu-a&phase=Pending&namespace=default").await;
    assert_eq!(ids(&combined), ["dpu-a-pf0-vf2", "dpu-a-pf0-vf3"]);
    let (_, none) = get(&b, "/api/v1/netdevs?node=node-9").await;
    assert!(ids(&none).is_empty());

    // Pages of three cover everything once, in (namespace, name) order.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let path = match &token {
            Some(t) => format!("/api/v1/netdevs?limit=3&continue={t}"),
            None => "/api/v1/netdevs?limit=3".to_string(),
        };
        let (s, page) = get(&b, &path).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        seen.extend(ids(&page));
        match page["continue"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ids(&all));
    // Filters and pages combine.
    let (_, p1) = get(&b, "/api/v1/netdevs?phase=Pending&limit=4").await;
    let t = p1["continue"].as_str().unwrap().to_string();
    let (_, p2) = get(&b, &format!("/api/v1/netdevs?phase=Pending&limit=4&continue={t}")).await;
    assert_eq!(ids(&p1).len() + ids(&p2).len(), 6);
    assert!(p2["continue"].is_null());

    assert_error(
        &get(&b, "/api/v1/netdevs?phase=Up").await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "invalid phase: \"Up\" is not one of Pending, Connecting, Connected, Disconnected, Error",
    );
    assert_error(
        &get(&b, "/api/v1/netdevs?continue=%21%21").await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "invalid continue: not a token this API returned",
    );
    assert_error(
        &get(&b, "/api/v1/netdevs?limit=many").await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "invalid query: Failed to deserialize query string: limit: invalid digit found in string",
    );
    b.stop().await;
}

conformance!(a_netdev_shows_its_history_newest_first);
async fn a_netdev_shows_its_history_newest_first(b: TestBroker) {
    seed(&b).await;
    // A second spec change and a second status.
    let mut admin = b.admin().await;
    let mut nd = mk_netdev("default", "dpu-a", 0, "node-1", "net-a");
    if let Some(pb::resource::Kind::Netdev(n)) = nd.kind.as_mut() {
        n.spec.as_mut().unwrap().mtu = 9000;
    }
    admin.apply(apply_req(nd)).await.unwrap();
    let mut agent = b.agent("dpu-a").await;
    agent
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-a".into(),
            reports: vec![report(
                key(pb::Kind::Netdev, "default", "dpu-a-pf0-vf0"),
                2,
                3,
                netdev_status("Connected", "10.9.0.2/24"),
            )],
        })
        .await
        .unwrap();

    let (s, detail) = get(&b, "/api/v1/netdevs/dpu-a-pf0-vf0").await;
    assert_eq!(s, StatusCode::OK, "{detail}");
    assert_eq!(detail["netdev"]["generation"], 2);
    assert_eq!(detail["netdev"]["observed_generation"], 2);
    assert_eq!(detail["netdev"]["phase"], "Connected");
    let history = detail["history"].as_array().unwrap();
    let changes: Vec<&str> = history.iter().map(|h| h["change"].as_str().unwrap()).collect();
    assert_eq!(changes, ["status", "spec", "status", "spec"]);
    let revs: Vec<i64> = history.iter().map(|h| h["revision"].as_i64().unwrap()).collect();
    assert!(revs.windows(2).all(|w| w[0] > w[1]), "newest first: {revs:?}");
    assert_eq!(history[0]["author"], "dpu/dpu-a");
    assert_eq!(history[0]["summary"], "phase Connected, ip 10.9.0.2/24, oper UP");
    assert_eq!(history[3]["author"], "admin/test");
    assert!(history[3]["summary"].as_str().unwrap().starts_with("generation 1, network net-a, node node-1"));

    let (_, limited) = get(&b, "/api/v1/netdevs/dpu-a-pf0-vf0?history_limit=1").await;
    assert_eq!(limited["history"].as_array().unwrap().len(), 1);
    assert_error(
        &get(&b, "/api/v1/netdevs/dpu-a-pf0-vf0?history_limit=0").await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "invalid history_limit: 0 is out of range 1..=1000",
    );
    assert_error(
        &get(&b, "/api/v1/netdevs/dpu-q-pf0-vf0").await,
        StatusCode::NOT_FOUND,
        "not_found",
        "netdev dpu-q-pf0-vf0 not found",
    );

    // A deleted netdev still shows, as its tombstone, with the delete on top.
    admin
        .delete(pb::DeleteRequest {
            key: Some(key(pb::Kind::Netdev, "default", "dpu-a-pf0-vf3")),
            ..Default::default()
        })
        .await
        .unwrap();
    let (_, gone) = get(&b, "/api/v1/netdevs/dpu-a-pf0-vf3").await;
    assert!(gone["netdev"]["deleted_revision"].as_i64().is_some(), "{gone}");
    assert_eq!(gone["history"][0]["change"], "deleted");
    b.stop().await;
}

conformance!(fabric_and_flow_policies_show_per_dpu_status);
async fn fabric_and_flow_policies_show_per_dpu_status(b: TestBroker) {
    seed(&b).await;
    let mut admin = b.admin().await;
    let policy = pb::Resource {
        kind: Some(pb::resource::Kind::FlowPolicy(pb::FlowPolicy {
            metadata: meta("allow-dns", "default"),
            spec: Some(pb::FlowPolicySpec {
                rules: vec![pb::FlowRule {
                    name: "dns".into(),
                    priority: 10,
                    action: "allow".into(),
                    protocol: "udp".into(),
                    dst_ports: vec![pb::PortRange { from: 53, to: 53 }],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: None,
        })),
    };
    admin.apply(apply_req(policy)).await.unwrap();
    let mut agent = b.agent("dpu-a").await;
    let object_report = |k: pb::ObjectKey, seq: u64, status: pb::DpuObjectStatus| pb::StatusReport {
        key: Some(k),
        observed_generation: 1,
        seq,
        status: Some(pb::status_report::Status::Object(status)),
        removed: false,
    };
    agent
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-a".into(),
            reports: vec![
                object_report(
                    key(pb::Kind::LogicalBridge, "", "lb-10"),
                    10,
                    pb::DpuObjectStatus { phase: "Programmed".into(), observed_generation: 1, ..Default::default() },
                ),
                object_report(
                    key(pb::Kind::FlowPolicy, "default", "allow-dns"),
                    11,
                    pb::DpuObjectStatus {
                        phase: "Programmed".into(),
                        observed_generation: 1,
                        rules: vec![pb::FlowRuleStatus {
                            name: "dns".into(),
                            programmed: true,
                            offload: "software".into(),
                            packets: 12,
                            bytes: 960,
                            message: String::new(),
                        }],
                        ..Default::default()
                    },
                ),
            ],
        })
        .await
        .unwrap();

    let (s, fabric) = get(&b, "/api/v1/fabric").await;
    assert_eq!(s, StatusCode::OK, "{fabric}");
    let items = fabric["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{fabric}");
    assert_eq!(items[0]["kind"], "LogicalBridge");
    assert_eq!(items[0]["ready"], 1);
    assert_eq!(items[0]["total"], 1);
    assert_eq!(items[0]["dpus"][0]["serial"], "dpu-a");
    assert_eq!(items[1]["kind"], "XpuNetwork");
    assert_eq!(items[1]["allocated"], 8, "one address per seeded netdev");
    assert_eq!(items[1]["capacity"], 253);
    // One kind; pages across kinds.
    let (_, vrfs) = get(&b, "/api/v1/fabric?kind=Vrf").await;
    assert!(vrfs["items"].as_array().unwrap().is_empty());
    let (_, p1) = get(&b, "/api/v1/fabric?limit=1").await;
    assert_eq!(p1["items"][0]["kind"], "LogicalBridge");
    let t = p1["continue"].as_str().unwrap().to_string();
    let (_, p2) = get(&b, &format!("/api/v1/fabric?limit=1&continue={t}")).await;
    assert_eq!(p2["items"][0]["kind"], "XpuNetwork");
    assert_error(
        &get(&b, "/api/v1/fabric?kind=Netdev").await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "invalid kind: \"Netdev\" is not one of LogicalBridge, Vrf, Svi, XpuNetwork",
    );

    let (_, policies) = get(&b, "/api/v1/flowpolicies").await;
    let p = &policies["items"][0];
    assert_eq!(p["name"], "allow-dns");
    assert_eq!(p["rules"], 1);
    assert_eq!(p["dpus"][0]["serial"], "dpu-a");
    assert_eq!(p["dpus"][0]["rules"][0]["packets"], 12);
    assert_eq!(p["dpus"][0]["rules"][0]["bytes"], 960);
    b.stop().await;
}

conformance!(clusters_and_agents_show_while_streaming);
async fn clusters_and_agents_show_while_streaming(b: TestBroker) {
    seed(&b).await;
    let mut sync = b.sync("cluster/east/tenant").await;
    let mut stream =
        sync.watch(pb::WatchRequest { since_revision: 3, ..Default::default() }).await.unwrap().into_inner();
    let mut agent = b.agent("dpu-b").await;
    let mut desired = agent
        .watch_desired(pb::WatchDesiredRequest { serial: "dpu-b".into(), since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    // Both streams have sent something, so both are registered.
    stream.message().await.unwrap();
    desired.message().await.unwrap();
    let head = get(&b, "/api/v1/fleet").await.1["revision"].as_i64().unwrap();
    let clusters = eventually(&b, "/api/v1/clusters", |c| {
        c["items"].as_array().unwrap().iter().any(|i| i["delivered_revision"].as_i64() == Some(head))
    })
    .await;
    let c = &clusters["items"][0];
    assert_eq!(c["identity"], "cluster/east/tenant");
    assert_eq!(c["cluster"], "east");
    assert_eq!(c["side"], "tenant");
    assert_eq!(c["resumed_from"], 3);
    assert_eq!(c["lag"], 0);
    let (_, dpu_b) = get(&b, "/api/v1/dpus/dpu-b").await;
    assert_eq!(dpu_b["connected"], true);
    drop(stream);
    drop(desired);
    eventually(&b, "/api/v1/clusters", |c| c["items"].as_array().unwrap().is_empty()).await;
    b.stop().await;
}

async fn eventually(b: &TestBroker, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = get(b, path).await;
        if pred(&v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{path} never matched: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn reading_needs_a_certificate_or_a_token(pool: sqlx::PgPool) {
    let b = TestBroker::start(pool).await;
    let plain = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    assert_error(
        &send(&b, plain("/api/v1/fleet")).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "a client certificate or a bearer token is required",
    );
    let bearer = |path: &str, t: &str| {
        Request::get(path).header(header::AUTHORIZATION, format!("Bearer {t}")).body(Body::empty()).unwrap()
    };
    assert_error(
        &send(&b, bearer("/api/v1/fleet", "xpu1.e30.AAAA")).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "the token's signature does not match this broker's key",
    );
    let expired =
        TokenKey::from_bytes(&KEY).issue("old", Duration::from_secs(1), Utc::now() - chrono::Duration::hours(1));
    let got = send(&b, bearer("/api/v1/fleet", &expired)).await;
    assert_eq!(got.0, StatusCode::UNAUTHORIZED);
    assert!(got.1["error"]["message"].as_str().unwrap().starts_with("the token expired at "), "{}", got.1);
    let foreign = TokenKey::from_bytes(&[1; 32]).issue("x", Duration::from_secs(60), Utc::now());
    assert_eq!(send(&b, bearer("/api/v1/fleet", &foreign)).await.0, StatusCode::UNAUTHORIZED);
    let basic = Request::get("/api/v1/dpus").header(header::AUTHORIZATION, "Basic YTpi").body(Body::empty()).unwrap();
    assert_error(
        &send(&b, basic).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "the Authorization header must be `Bearer <token>`",
    );
    assert_eq!(send(&b, bearer("/api/v1/fleet", &token())).await.0, StatusCode::OK);

    // Probes and metrics stay open.
    let app = || rest::router(state(&b, false));
    for path in ["/healthz", "/readyz", "/metrics", "/login", "/assets/style.css"] {
        let resp = app().oneshot(plain(path)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
    // The page sends a browser without credentials to the login form; the form sets a cookie
    // that opens the page, the script and the API.
    let resp = app().oneshot(plain("/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[header::LOCATION], "/login");
    assert_eq!(app().oneshot(plain("/assets/app.js")).await.unwrap().status(), StatusCode::SEE_OTHER);
    let login = |t: &str| {
        Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("token={t}")))
            .unwrap()
    };
    assert_eq!(app().oneshot(login("nope")).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let resp = app().oneshot(login(&token())).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cookie = resp.headers()[header::SET_COOKIE].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let session = cookie.split(';').next().unwrap().to_string();
    for path in ["/", "/assets/app.js", "/api/v1/dpus"] {
        let req = Request::get(path).header(header::COOKIE, &session).body(Body::empty()).unwrap();
        assert_eq!(app().oneshot(req).await.unwrap().status(), StatusCode::OK, "{path}");
    }

    // Anonymous read, when switched on.
    let open = rest::router(state(&b, true));
    assert_eq!(open.oneshot(plain("/api/v1/fleet")).await.unwrap().status(), StatusCode::OK);
    // No token key: tokens cannot work.
    let keyless = rest::router(RestState { ctx: b.ctx.clone(), access: Arc::new(Access::default()) });
    let resp = keyless.oneshot(bearer("/api/v1/fleet", &token())).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    b.stop().await;
}

/// HTTP/1.1 GET over TLS with a client certificate, on the broker's gRPC port.
async fn mtls_get(b: &TestBroker, identity: &str, path: &str) -> (u16, Value) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pem = b.pki.client_pem(identity);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(b.pki.ca.pem.cert.as_bytes()).unwrap()).unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(pem.cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(b.grpc).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // Chunked or not, the JSON object is the part between the outer braces.
    let json = body.find('{').and_then(|s| body.rfind('}').map(|e| &body[s..=e])).unwrap_or("null");
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn operators_read_with_their_certificate_on_the_mtls_port(pool: sqlx::PgPool) {
    let b = TestBroker::start(pool).await;
    let (status, fleet) = mtls_get(&b, "admin/ops", "/api/v1/fleet").await;
    assert_eq!(status, 200, "{fleet}");
    assert!(fleet["revision"].is_i64());
    let (status, err) = mtls_get(&b, "dpu/dpu-a", "/api/v1/fleet").await;
    assert_eq!(status, 403);
    assert_eq!(err["error"]["code"], "permission_denied");
    assert_eq!(
        err["error"]["message"],
        "dpu/dpu-a may not read the status API; it is for operators (xpu://admin/<name>)"
    );
    // gRPC still works on the same port.
    let mut admin = b.admin().await;
    admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap();
    b.stop().await;
}

#[test]
fn the_openapi_document_matches_the_routes_and_is_checked_in() {
    let doc = serde_json::to_value(rest::openapi()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths: Vec<&str> = doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/clusters",
            "/api/v1/dpus",
            "/api/v1/dpus/{serial}",
            "/api/v1/fabric",
            "/api/v1/fleet",
            "/api/v1/flowpolicies",
            "/api/v1/netdevs",
            "/api/v1/netdevs/{id}",
            "/api/v1/sli",
        ]
    );
    // Every reference resolves, every operation has an id and a 200 response.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let text = doc.to_string();
    for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &r[..r.find('"').unwrap()];
        assert!(schemas.contains_key(name), "dangling $ref {name}");
    }
    let mut op_ids = std::collections::HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let op = &item["get"];
        assert!(op_ids.insert(op["operationId"].as_str().unwrap().to_string()), "{path}");
        assert!(op["responses"]["200"].is_object(), "{path}");
        for p in path.split('{').skip(1) {
            let name = &p[..p.find('}').unwrap()];
            let declared = op["parameters"].as_array().unwrap().iter().any(|x| x["name"] == name && x["in"] == "path");
            assert!(declared, "{path}: path parameter {name} undeclared");
        }
    }
    // The checked-in copy is what the code generates (`xpu-broker openapi > docs/openapi.json`).
    let checked_in = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json")).unwrap();
    let generated = serde_json::to_string_pretty(&rest::openapi()).unwrap() + "\n";
    assert!(checked_in == generated, "docs/openapi.json is stale: run `xpu-broker openapi > docs/openapi.json`");
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn every_documented_route_answers(pool: sqlx::PgPool) {
    let b = TestBroker::start(pool).await;
    let doc = serde_json::to_value(rest::openapi()).unwrap();
    for path in doc["paths"].as_object().unwrap().keys() {
        let concrete = path.replace("{serial}", "nope").replace("{id}", "nope");
        let (status, body) = get(&b, &concrete).await;
        assert!(status == StatusCode::OK || status == StatusCode::NOT_FOUND, "{path}: {status}");
        if status == StatusCode::NOT_FOUND {
            assert_ne!(body["error"]["message"], format!("route {concrete} not found"), "{path} is not routed");
        }
    }
    assert_error(
        &get(&b, "/api/v1/nothing").await,
        StatusCode::NOT_FOUND,
        "not_found",
        "route /api/v1/nothing not found",
    );
    let (s, served) = get(&b, "/api/v1/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(served, doc);
    b.stop().await;
}

/// Reads one sample value (`name` exactly, labels included) from the metrics text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.parse().unwrap()))
        .unwrap_or_else(|| panic!("{name} missing"))
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn an_attach_moves_the_histograms_and_counters(pool: sqlx::PgPool) {
    let b = TestBroker::start(pool).await;
    seed_network(&b, "net-m", "10.8.0.0/24", "10.8.0.1").await;
    register(&b, "dpu-m").await;
    let metrics = || async {
        let resp = rest::router(state(&b, false))
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        String::from_utf8(axum::body::to_bytes(resp.into_body(), 1 << 24).await.unwrap().to_vec()).unwrap()
    };
    let before = metrics().await;
    let mut agent = b.agent("dpu-m").await;
    let mut desired = agent
        .watch_desired(pb::WatchDesiredRequest { serial: "dpu-m".into(), since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    snapshot_end(&mut desired).await;
    let mut host = b.host("node-m").await;
    let spec = mk_netdev_spec("dpu-m", 0, "node-m", "net-m");
    let attach = tokio::spawn(async move {
        host.attach_netdev(pb::AttachNetdevRequest {
            namespace: "pods".into(),
            spec: Some(spec),
            timeout_ms: 10_000,
            ..Default::default()
        })
        .await
    });
    let generation = loop {
        let ev = next_change(&mut desired, Duration::from_secs(5)).await.expect("desired change");
        if let Some(pb::watch_event::Event::Change(c)) = ev.event
            && c.r#type == pb::ChangeType::Spec as i32
            && let Some(pb::resource::Kind::Netdev(n)) = c.object.and_then(|o| o.kind)
        {
            break n.metadata.unwrap().generation;
        }
    };
    agent
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-m".into(),
            reports: vec![report(
                key(pb::Kind::Netdev, "pods", "dpu-m-pf0-vf0"),
                generation,
                1,
                netdev_status("Connected", "10.8.0.2/24"),
            )],
        })
        .await
        .unwrap();
    attach.await.unwrap().unwrap();
    let after = metrics().await;
    let moved = |name: &str| metric(&after, name) - metric(&before, name);
    assert!(moved("xpu_attach_duration_seconds_count") >= 1.0);
    assert!(moved("xpu_attach_duration_seconds_bucket{le=\"+Inf\"}") >= 1.0);
    assert!(moved("xpu_first_status_seconds_count") >= 1.0);
    assert!(moved("xpu_changes_total{change=\"status\"}") >= 1.0);
    assert!(moved("xpu_changes_total{change=\"spec\"}") >= 1.0);
    assert!(moved("xpu_store_batches_total") >= 1.0);
    assert_eq!(metric(&after, "xpu_streams_active{class=\"agent\"}"), 1.0);
    assert!(metric(&after, "process_resident_memory_bytes") > 0.0);
    assert!(metric(&after, "process_start_time_seconds") > 1.7e9);
    b.stop().await;
}
