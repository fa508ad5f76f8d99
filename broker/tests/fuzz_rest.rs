//! Bad input to the status API, property-based: random query strings and path segments for
//! `/api/v1/netdevs`, `/dpus`, `/fabric`, `/flowpolicies`, `/netdevs/{id}` and `/dpus/{serial}`,
//! through the real router on both store backends. The answer is always 200, 400 or 404 with
//! JSON; an error is `{"error":{"code","message"}}` whose message names the parameter; never 500.
//!
//! Cases: proptest's default (256, or `PROPTEST_CASES`) divided by the weight in `cases`.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode, header},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use chrono::Utc;
use common::*;
use proptest::{prelude::*, test_runner::TestRunner};
use serde_json::Value;
use tower::ServiceExt;
use xpu_broker::{
    rest::{self, Access, RestState},
    token::TokenKey,
};

const KEY: [u8; 32] = [7; 32];

fn cases(weight: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    c.cases = (c.cases / weight).max(1);
    c.failure_persistence = None;
    c
}

// ---- requests ----

/// Every byte but the unreserved ones percent-encoded: always a valid URI component.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Components as a client may spell them: any text encoded, or raw escapes that do not decode
/// (lone `%`, `%zz`, bytes that are not UTF-8, NUL).
fn component() -> BoxedStrategy<String> {
    prop_oneof![
        4 => ".{0,30}".prop_map(|s| encode(&s)),
        2 => "[a-z0-9-]{1,12}",
        1 => prop::sample::select(vec!["%", "%zz", "%FF", "%C3%28", "%00", "a%00b", "+", "%2B", "%25", "%E2%82", "%F0%9F%98%80"])
            .prop_map(str::to_string),
        1 => (1usize..3000).prop_map(|n| "x".repeat(n)),
    ]
    .boxed()
}

fn token() -> BoxedStrategy<String> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..24).prop_map(|b| B64.encode(b)),
        (".{0,6}", ".{0,6}", ".{0,6}").prop_map(|(a, b, c)| B64.encode(format!("{a}\0{b}\0{c}"))),
        (".{0,6}", ".{0,6}").prop_map(|(ns, name)| B64.encode(format!("{ns}\0{name}"))),
        prop::sample::select(vec!["LogicalBridge", "Vrf", "Svi", "XpuNetwork", "Netdev"])
            .prop_flat_map(|k| (Just(k), "[a-z\\x00]{0,4}", "[a-z\\x00-]{0,8}"))
            .prop_map(|(k, ns, n)| B64.encode(format!("{k}\0{ns}\0{n}"))),
    ]
    .boxed()
}

fn value_for(key: &'static str) -> BoxedStrategy<String> {
    let numbers = prop_oneof![
        (0u64..1500).prop_map(|n| n.to_string()),
        Just("-1".to_string()),
        Just("99999999999999999999999".to_string()),
        Just("1e3".to_string()),
        Just(String::new()),
    ];
    let specific: BoxedStrategy<String> = match key {
        "phase" => {
            prop::sample::select(vec!["Pending", "Connecting", "Connected", "Disconnected", "Error", "Up", "error"])
                .prop_map(str::to_string)
                .boxed()
        }
        "kind" => prop::sample::select(vec!["LogicalBridge", "Vrf", "Svi", "XpuNetwork", "Netdev", "vrf"])
            .prop_map(str::to_string)
            .boxed(),
        "limit" | "history_limit" => numbers.boxed(),
        "continue" => token(),
        "dpu" | "node" => prop::sample::select(vec!["dpu-a", "node-1", "dpu-z"]).prop_map(str::to_string).boxed(),
        _ => "[a-z]{1,8}".boxed(),
    };
    prop_oneof![3 => specific.prop_map(|v| encode(&v)), 2 => component()].boxed()
}

fn query() -> BoxedStrategy<String> {
    let keys = prop::sample::select(vec![
        "dpu",
        "node",
        "phase",
        "namespace",
        "limit",
        "continue",
        "kind",
        "history_limit",
        "other",
    ]);
    let pair = prop_oneof![
        6 => keys.prop_flat_map(|k| value_for(k).prop_map(move |v| format!("{k}={v}"))),
        1 => (component(), component()).prop_map(|(k, v)| format!("{k}={v}")),
        1 => component(),
    ];
    prop::collection::vec(pair, 0..5).prop_map(|v| v.join("&")).boxed()
}

fn path() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(vec!["/api/v1/netdevs", "/api/v1/dpus", "/api/v1/fabric", "/api/v1/flowpolicies"])
            .prop_map(str::to_string),
        component().prop_map(|id| format!("/api/v1/netdevs/{id}")),
        Just("/api/v1/netdevs/dpu-a-pf0-vf0".to_string()),
        component().prop_map(|s| format!("/api/v1/dpus/{s}")),
        component().prop_map(|s| format!("/api/v1/{s}")),
    ]
    .boxed()
}

/// The parameters a refusal may name.
const FIELDS: [&str; 11] =
    ["query", "limit", "continue", "phase", "kind", "history_limit", "id", "serial", "dpu", "node", "namespace"];

#[derive(Default)]
struct Tally {
    by_status: BTreeMap<u16, u64>,
    by_field: BTreeMap<String, u64>,
}

fn router(b: &TestBroker) -> Router {
    rest::router(RestState {
        ctx: b.ctx.clone(),
        access: Arc::new(Access { token_key: Some(TokenKey::from_bytes(&KEY)), anonymous_read: false }),
    })
}

/// Data to page through: two DPUs, a network, three netdevs, one reported.
async fn seed(b: &TestBroker) {
    seed_network(b, "net-a", "10.9.0.0/24", "10.9.0.1").await;
    register(b, "dpu-a").await;
    register(b, "dpu-b").await;
    let mut admin = b.admin().await;
    for vf in 0..3 {
        admin.apply(apply_req(mk_netdev("default", "dpu-a", vf, "node-1", "net-a"))).await.unwrap();
    }
    let mut agent = b.agent("dpu-a").await;
    agent
        .report_status(xpu_proto::broker::v1::ReportStatusRequest {
            serial: "dpu-a".into(),
            reports: vec![report(
                key(xpu_proto::broker::v1::Kind::Netdev, "default", "dpu-a-pf0-vf0"),
                1,
                1,
                netdev_status("Connected", "10.9.0.2/24"),
            )],
        })
        .await
        .unwrap();
}

conformance!(random_queries_answer_200_400_or_404_with_json);
async fn random_queries_answer_200_400_or_404_with_json(b: TestBroker) {
    seed(&b).await;
    let app = router(&b);
    let bearer = format!("Bearer {}", TokenKey::from_bytes(&KEY).issue("fuzz", Duration::from_secs(3600), Utc::now()));
    let rt = tokio::runtime::Handle::current();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let counts = tally.clone();
    tokio::task::spawn_blocking(move || {
        let mut runner = TestRunner::new(cases(1));
        let result = runner.run(&(path(), query()), |(path, query)| {
            let uri = if query.is_empty() { path.clone() } else { format!("{path}?{query}") };
            let Ok(req) = Request::get(&uri).header(header::AUTHORIZATION, &bearer).body(Body::empty()) else {
                // Not a URI a client could send; the generator avoids these.
                return Err(TestCaseError::reject("not a URI"));
            };
            let resp = rt.block_on(app.clone().oneshot(req)).unwrap();
            let status = resp.status();
            let content_type =
                resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let bytes = rt.block_on(axum::body::to_bytes(resp.into_body(), 1 << 26)).unwrap();
            let body: Value = serde_json::from_slice(&bytes).map_err(|e| {
                TestCaseError::fail(format!(
                    "{uri}: {status} with a body that is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&bytes)
                ))
            })?;
            prop_assert!(content_type.starts_with("application/json"), "{uri}: content-type {content_type:?}");
            let mut t = counts.lock().unwrap();
            *t.by_status.entry(status.as_u16()).or_default() += 1;
            match status {
                StatusCode::OK => prop_assert!(body.is_object() && body.get("error").is_none(), "{uri}: {body}"),
                StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND => {
                    let code = body["error"]["code"].as_str();
                    let message = body["error"]["message"].as_str().unwrap_or_default();
                    let expected = if status == StatusCode::NOT_FOUND { "not_found" } else { "invalid_argument" };
                    prop_assert_eq!(code, Some(expected), "{}: {}", uri, body);
                    prop_assert!(!message.is_empty(), "{uri}: {body}");
                    if status == StatusCode::BAD_REQUEST {
                        let field = FIELDS.iter().find(|f| message.starts_with(&format!("invalid {f}: ")));
                        prop_assert!(field.is_some(), "{uri}: the message names no parameter: {message}");
                        *t.by_field.entry(field.unwrap().to_string()).or_default() += 1;
                    }
                }
                other => prop_assert!(false, "{uri}: status {other}: {body}"),
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    })
    .await
    .unwrap();
    {
        let t = tally.lock().unwrap();
        eprintln!("status API: answers by status {:?}, refusals by parameter {:?}", t.by_status, t.by_field);
        assert!(t.by_status.get(&200).is_some_and(|n| *n > 0), "some queries were valid: {:?}", t.by_status);
        assert!(t.by_status.get(&400).is_some_and(|n| *n > 0), "some queries were refused: {:?}", t.by_status);
    }
    b.stop().await;
}

conformance!(undecodable_and_nul_parameters_are_json_400s);
/// The refusals the properties above found as 500s or plain-text bodies, pinned.
async fn undecodable_and_nul_parameters_are_json_400s(b: TestBroker) {
    seed(&b).await;
    let app = router(&b);
    let bearer = format!("Bearer {}", TokenKey::from_bytes(&KEY).issue("fuzz", Duration::from_secs(60), Utc::now()));
    let nul_token = B64.encode("default\0dpu-a\0x");
    let fabric_token = B64.encode("Vrf\0\0a\0b");
    for (uri, field) in [
        ("/api/v1/dpus/%FF".to_string(), "serial"),
        ("/api/v1/netdevs/%C3%28".to_string(), "id"),
        ("/api/v1/dpus/a%00".to_string(), "serial"),
        ("/api/v1/netdevs/%00".to_string(), "id"),
        ("/api/v1/netdevs?dpu=%00".to_string(), "dpu"),
        ("/api/v1/netdevs?node=a%00b".to_string(), "node"),
        ("/api/v1/netdevs?namespace=%00".to_string(), "namespace"),
        (format!("/api/v1/netdevs?continue={nul_token}"), "continue"),
        (format!("/api/v1/fabric?continue={fabric_token}"), "continue"),
    ] {
        let req = Request::get(&uri).header(header::AUTHORIZATION, &bearer).body(Body::empty()).unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body: Value =
            serde_json::from_slice(&axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap()).unwrap_or_default();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert_eq!(body["error"]["code"], "invalid_argument", "{uri}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(&format!("invalid {field}: ")), "{uri}: {body}");
    }
    b.stop().await;
}
