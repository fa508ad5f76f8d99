//! mTLS and authorization: who may connect, and what each identity may read and write. Every
//! refusal leaves the store as it was. Certificates are refused case by case with the exact alert
//! or message; against the real binary, refusals are logged with the caller's identity, only the
//! TLS port and the HTTP port listen, and the HTTP port gives no data without a credential.
//! (`tls_scan.rs` covers protocol versions, cipher suites and the rest of the TLS policy.)

#![allow(clippy::unwrap_used)]

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::{
    AlertDescription, ClientConfig, HandshakeKind, RootCertStore, SupportedProtocolVersion,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tonic::Code;
use xpu_broker::ca::{DevCa, IssueOptions, Pem};
use xpu_proto::broker::v1::{
    self as pb, admin_service_client::AdminServiceClient, agent_service_client::AgentServiceClient,
    host_service_client::HostServiceClient, sync_service_client::SyncServiceClient,
};

async fn head(b: &TestBroker) -> i64 {
    b.admin().await.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision
}

// ---- certificates: every refusal, with the exact alert or message ----

/// What the mutual-TLS port made of a client certificate.
#[derive(Debug, PartialEq)]
enum Tls {
    /// The handshake failed with this alert from the broker.
    Alert(AlertDescription),
    /// The handshake completed; the status API on the same port answered this status and body.
    Http(u16, String),
}

fn client_config(ca_pem: &str, client: Option<&Pem>, version: &'static SupportedProtocolVersion) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some(p) => {
            let chain = CertificateDer::pem_slice_iter(p.cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(p.key.as_bytes()).unwrap()).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

fn received_alert(e: &std::io::Error) -> Option<AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// Handshakes with `client` (only `version`), then reads the status API over the connection.
async fn probe_mtls(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<&Pem>,
    version: &'static SupportedProtocolVersion,
) -> Tls {
    probe_with(addr, client_config(ca_pem, client, version)).await.0
}

/// [`probe_mtls`] with a given client config (whose session cache may resume an earlier
/// session), and what kind of handshake it was.
async fn probe_with(addr: SocketAddr, config: Arc<ClientConfig>) -> (Tls, Option<HandshakeKind>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = match TlsConnector::from(config).connect(name, tcp).await {
        Ok(s) => s,
        Err(e) => {
            let alert = received_alert(&e).unwrap_or_else(|| panic!("handshake failed without an alert: {e}"));
            return (Tls::Alert(alert), None);
        }
    };
    let kind = tls.get_ref().1.handshake_kind();
    // With TLS 1.3 the client finishes first: a refused certificate shows up as an alert on read.
    let _ = tls.write_all(b"GET /api/v1/fleet HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await.expect("an answer");
    if let Err(e) = read {
        if let Some(a) = received_alert(&e) {
            return (Tls::Alert(a), kind);
        }
        assert!(!out.is_empty(), "no answer and no alert: {e}");
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{text}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (Tls::Http(status, body), kind)
}

/// The gRPC call a case makes once through TLS.
#[derive(Clone, Copy, Debug)]
enum Call {
    FleetStatus,
    Register,
    SyncList,
    GetNetdev,
}

async fn grpc_call(ch: tonic::transport::Channel, call: Call) -> Result<(), tonic::Status> {
    match call {
        Call::FleetStatus => AdminServiceClient::new(ch).fleet_status(pb::FleetStatusRequest {}).await.map(drop),
        Call::Register => AgentServiceClient::new(ch)
            .register(pb::RegisterRequest { serial: "dpu-a".into(), ..Default::default() })
            .await
            .map(drop),
        Call::SyncList => SyncServiceClient::new(ch)
            .list(pb::ListRequest { kind: pb::Kind::Netdev as i32, ..Default::default() })
            .await
            .map(drop),
        Call::GetNetdev => HostServiceClient::new(ch)
            .get_netdev(pb::GetNetdevRequest { namespace: "pods".into(), name: "x".into() })
            .await
            .map(drop),
    }
}

#[derive(Debug)]
enum Expect {
    /// Refused in the handshake with this alert, under TLS 1.3 and TLS 1.2 alike.
    Handshake(AlertDescription),
    /// Through TLS, then refused by the broker: this gRPC code and exact message; the status API
    /// answers 401 with the same message (unauthenticated) or 403 (permission denied).
    Refused(Code, String),
    /// The control: the call succeeds and the status API answers 200.
    Allowed,
}

struct Case {
    name: String,
    pem: Pem,
    call: Call,
    expect: Expect,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// rcgen parameters of a client certificate as `ca issue` makes them, without a SAN.
fn client_params(common_name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.not_before = now() - time::Duration::minutes(5);
    p.not_after = now() + time::Duration::days(1);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    p
}

fn with_uri(mut p: CertificateParams, uri: &str) -> CertificateParams {
    p.subject_alt_names.push(SanType::URI(uri.try_into().unwrap()));
    p
}

/// Signs `params` with `issuer`'s key (whatever `issuer` is: the point of some cases).
fn signed_by(params: &CertificateParams, issuer: &Pem) -> Pem {
    let issuer_key = KeyPair::from_pem(&issuer.key).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&issuer.cert, &issuer_key).unwrap();
    let key = KeyPair::generate().unwrap();
    Pem { cert: params.signed_by(&key, &issuer).unwrap().pem(), key: key.serialize_pem() }
}

fn refused(code: Code, message: &str) -> Expect {
    Expect::Refused(code, message.to_string())
}

fn certificate_cases(ca: &DevCa) -> Vec<Case> {
    use AlertDescription as A;
    let id = |s: &str| xpu_broker::identity::Identity::parse(s).unwrap();
    let days = IssueOptions::valid_for_days;
    let admin = with_uri(client_params("admin/x"), "xpu://admin/x");
    let mut cases = vec![Case {
        name: "admin (control)".into(),
        pem: signed_by(&admin, &ca.pem),
        call: Call::FleetStatus,
        expect: Expect::Allowed,
    }];
    let mut handshake = |name: &str, pem, alert| {
        cases.push(Case { name: name.into(), pem, call: Call::FleetStatus, expect: Expect::Handshake(alert) });
    };
    let rogue = DevCa::generate("rogue CA").unwrap();
    handshake("from another CA", rogue.issue_client(&id("admin/x"), &days(1)).unwrap(), A::UnknownCA);
    // Same subject as the broker's CA, other key: the name matches, the signature does not.
    let twin = DevCa::generate("test CA").unwrap();
    handshake("from a CA with our CA's name", twin.issue_client(&id("admin/x"), &days(1)).unwrap(), A::DecryptError);
    let key = KeyPair::generate().unwrap();
    let self_signed = Pem { cert: admin.self_signed(&key).unwrap().pem(), key: key.serialize_pem() };
    handshake("self-signed", self_signed, A::UnknownCA);
    let expired = IssueOptions {
        not_before: now() - time::Duration::days(10),
        not_after: now() - time::Duration::days(1),
        is_ca: false,
    };
    handshake("expired", ca.issue_client(&id("admin/x"), &expired).unwrap(), A::CertificateExpired);
    let future = IssueOptions {
        not_before: now() + time::Duration::days(1),
        not_after: now() + time::Duration::days(10),
        is_ca: false,
    };
    handshake("not yet valid", ca.issue_client(&id("admin/x"), &future).unwrap(), A::CertificateExpired);
    let ca_bit = IssueOptions { is_ca: true, ..days(1) };
    handshake("CA bit set", ca.issue_client(&id("admin/x"), &ca_bit).unwrap(), A::CertificateUnknown);
    handshake("the broker's CA certificate itself", ca.pem.clone(), A::CertificateUnknown);
    let server_only = ca.issue_server(&["admin".into()], &days(1)).unwrap();
    handshake("server-only (EKU serverAuth)", server_only, A::UnsupportedCertificate);
    // A valid client certificate is not an issuer.
    let leaf = signed_by(&with_uri(client_params("dpu/dpu-a"), "xpu://dpu/dpu-a"), &ca.pem);
    let mut by_leaf = signed_by(&admin, &leaf);
    by_leaf.cert.push_str(&leaf.cert);
    // The CA allows no intermediate (pathLenConstraint 0): a client certificate must be issued
    // by it directly, so a presented chain is not followed.
    handshake("signed by a client certificate", by_leaf, A::UnknownCA);
    // A CA certificate issued under it (refused as a client above) cannot issue client
    // certificates either, whatever it says of itself.
    let mut sub = client_params("sub CA");
    sub.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    sub.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    sub.extended_key_usages = vec![];
    let sub = signed_by(&sub, &ca.pem);
    let mut via_sub = signed_by(&admin, &sub);
    via_sub.cert.push_str(&sub.cert);
    handshake("issued by a sub-CA despite the CA's pathLen 0", via_sub, A::UnknownCA);

    let unauthenticated = |m: &str| refused(Code::Unauthenticated, m);
    let mut dns_only = client_params("xpu://admin/x");
    dns_only.subject_alt_names.push(SanType::DnsName("admin-x.example".try_into().unwrap()));
    for (name, params, expect) in [
        (
            "no SAN (identity only in the CN)",
            client_params("xpu://admin/x"),
            unauthenticated("the client certificate has no SAN with an xpu:// identity"),
        ),
        ("a DNS SAN, no URI SAN", dns_only, unauthenticated("the client certificate has no xpu:// URI SAN")),
        (
            "a foreign URI SAN only",
            with_uri(client_params("x"), "spiffe://cluster/ns/x"),
            unauthenticated("the client certificate has no xpu:// URI SAN"),
        ),
        (
            "two identities",
            with_uri(admin.clone(), "xpu://admin/y"),
            unauthenticated("the client certificate carries more than one xpu:// identity"),
        ),
        (
            "two identities, one foreign",
            with_uri(with_uri(client_params("x"), "xpu://admin/x"), "xpu://dpu/dpu-a"),
            unauthenticated("the client certificate carries more than one xpu:// identity"),
        ),
        (
            "an unknown identity kind",
            with_uri(client_params("x"), "xpu://root/x"),
            unauthenticated(
                "bad identity in client certificate: invalid identity: \"root/x\": expected dpu/<serial>, host/<node>, cluster/<name>/tenant|infra or admin/<name>",
            ),
        ),
        (
            "an identity in upper case",
            with_uri(client_params("x"), "xpu://dpu/BF3"),
            unauthenticated(
                "bad identity in client certificate: invalid identity: \"dpu/BF3\": a DPU serial must be a DNS-1123 label",
            ),
        ),
        (
            "the identity under another scheme",
            with_uri(client_params("x"), "XPU://admin/x"),
            unauthenticated("the client certificate has no xpu:// URI SAN"),
        ),
    ] {
        cases.push(Case { name: name.into(), pem: signed_by(&params, &ca.pem), call: Call::FleetStatus, expect });
    }

    // Valid certificates whose identity is not allowed the call.
    let denied = |m: &str| refused(Code::PermissionDenied, m);
    for (identity, call, expect) in [
        (
            "dpu/dpu-a",
            Call::FleetStatus,
            denied("dpu/dpu-a may not call AdminService; it is for operators (xpu://admin/<name>)"),
        ),
        (
            "cluster/east/infra",
            Call::FleetStatus,
            denied("cluster/east/infra may not call AdminService; it is for operators (xpu://admin/<name>)"),
        ),
        (
            "host/node-a",
            Call::Register,
            denied("host/node-a may not call AgentService; it is for DPU agents (xpu://dpu/<serial>)"),
        ),
        (
            "admin/x",
            Call::Register,
            denied("admin/x may not call AgentService; it is for DPU agents (xpu://dpu/<serial>)"),
        ),
        (
            "dpu/dpu-a",
            Call::SyncList,
            denied(
                "dpu/dpu-a may not call SyncService; it is for cluster identities (xpu://cluster/<name>/tenant|infra)",
            ),
        ),
        (
            "cluster/east/tenant",
            Call::GetNetdev,
            denied("cluster/east/tenant may not call HostService; it is for host agents (xpu://host/<node>)"),
        ),
    ] {
        let name = format!("{identity} calling {call:?}");
        cases.push(Case { name, pem: ca.issue_client(&id(identity), &days(1)).unwrap(), call, expect });
    }
    cases
}

conformance!(every_refused_certificate_fails_the_way_it_should);
async fn every_refused_certificate_fails_the_way_it_should(b: TestBroker) {
    let ca_pem = b.pki.ca.pem.cert.clone();
    let before = head(&b).await;
    let mut failures = Vec::new();
    let cases = certificate_cases(&b.pki.ca);
    for case in &cases {
        let name = &case.name;
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let got = probe_mtls(b.grpc, &ca_pem, Some(&case.pem), version).await;
            let ok = match (&case.expect, &got) {
                (Expect::Handshake(want), Tls::Alert(a)) => a == want,
                (Expect::Refused(Code::Unauthenticated, m), Tls::Http(401, body)) => {
                    let v: serde_json::Value = serde_json::from_str(body).unwrap();
                    v["error"]["code"] == "unauthenticated" && v["error"]["message"] == m.as_str()
                }
                (Expect::Refused(Code::PermissionDenied, _), Tls::Http(status, _)) => {
                    // The status API is for operators; admins get 200 for it.
                    *status == if name.starts_with("admin/") { 200 } else { 403 }
                }
                (Expect::Allowed, Tls::Http(200, _)) => true,
                _ => false,
            };
            if !ok {
                failures.push(format!("{name} ({:?}): expected {:?}, got {got:?}", version.version, case.expect));
            }
        }
        if let Expect::Handshake(_) = case.expect {
            continue;
        }
        let ch = b.channel_with(b.tls_for(Some(&case.pem), &ca_pem)).await.unwrap();
        match (grpc_call(ch, case.call).await, &case.expect) {
            (Ok(()), Expect::Allowed) => {}
            (Err(s), Expect::Refused(code, message)) if s.code() == *code && s.message() == message => {}
            (got, want) => failures.push(format!("{name} over gRPC: expected {want:?}, got {got:?}")),
        }
    }
    // Without any certificate the handshake ends with certificate_required, under TLS 1.2 too
    // (rustls sends the TLS 1.3 alert there).
    for (version, want) in [
        (&rustls::version::TLS13, AlertDescription::CertificateRequired),
        (&rustls::version::TLS12, AlertDescription::CertificateRequired),
    ] {
        let got = probe_mtls(b.grpc, &ca_pem, None, version).await;
        if got != Tls::Alert(want) {
            failures.push(format!("no certificate ({:?}): expected {want:?}, got {got:?}", version.version));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases:\n{}", failures.len(), cases.len() + 1, failures.join("\n"));
    assert_eq!(head(&b).await, before, "no refused request wrote anything");
    b.stop().await;
}

/// A session resumed after the client certificate expired must not get in. Resumption skips
/// certificate verification, so the broker offers none (`tls::server_config`): the reconnecting
/// client gets a full handshake and the expired certificate is refused there.
#[sqlx::test(migrations = "../migrations/postgres")]
async fn an_expired_certificate_does_not_get_in_by_resuming_a_session(pool: sqlx::PgPool) {
    let b = TestBroker::start(pool).await;
    let ca_pem = b.pki.ca.pem.cert.clone();
    let expires = now() + time::Duration::seconds(3);
    let opts = IssueOptions { not_after: expires, ..IssueOptions::valid_for_days(1) };
    let pem = b.pki.ca.issue_client(&xpu_broker::identity::Identity::Admin("short".into()), &opts).unwrap();
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    // One client config per version: its session cache is what resumes.
    let configs: Vec<_> = versions.iter().map(|v| client_config(&ca_pem, Some(&pem), v)).collect();
    for config in &configs {
        let (got, kind) = probe_with(b.grpc, Arc::clone(config)).await;
        assert!(matches!(got, Tls::Http(200, _)) && kind == Some(HandshakeKind::Full), "{got:?} {kind:?}");
    }
    let wait = expires - now() + time::Duration::milliseconds(1500);
    tokio::time::sleep(Duration::from_millis(u64::try_from(wait.whole_milliseconds()).unwrap())).await;
    let mut failures = Vec::new();
    for (config, version) in configs.iter().zip(versions) {
        // The control: a new session with the expired certificate is refused in the handshake.
        let fresh = probe_mtls(b.grpc, &ca_pem, Some(&pem), version).await;
        assert_eq!(fresh, Tls::Alert(AlertDescription::CertificateExpired), "{:?}", version.version);
        let (got, kind) = probe_with(b.grpc, Arc::clone(config)).await;
        if got != Tls::Alert(AlertDescription::CertificateExpired) {
            failures.push(format!("{:?}: {kind:?} handshake with an expired certificate: {got:?}", version.version));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    b.stop().await;
}

conformance!(each_identity_reaches_only_its_own_objects);
async fn each_identity_reaches_only_its_own_objects(b: TestBroker) {
    seed_network(&b, "net-a", "10.8.0.0/24", "10.8.0.1").await;
    register(&b, "dpu-a").await;
    register(&b, "dpu-b").await;
    let mut admin = b.admin().await;
    admin.apply(apply_req(mk_netdev("pods", "dpu-b", 0, "node-b", "net-a"))).await.unwrap();
    let before = head(&b).await;

    // DPU A cannot act as B: register, heartbeat, watch, report.
    let mut a = b.agent("dpu-a").await;
    let e = a.register(pb::RegisterRequest { serial: "dpu-b".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "dpu dpu-a cannot act for dpu dpu-b");
    let e = a.heartbeat(pb::HeartbeatRequest { serial: "dpu-b".into(), applied_revision: 0 }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = a.watch_desired(pb::WatchDesiredRequest { serial: "dpu-b".into(), since_revision: 0 }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let k = key(pb::Kind::Netdev, "pods", "dpu-b-pf0-vf0");
    let e = a
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-b".into(),
            reports: vec![report(k.clone(), 1, 1, netdev_status("Connected", ""))],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // …nor report, under its own name, for a netdev that belongs to B.
    let e = a
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-a".into(),
            reports: vec![report(k.clone(), 1, 1, netdev_status("Connected", ""))],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("belongs to dpu dpu-b"), "{}", e.message());

    // Host node-a cannot attach, read or detach node-b's netdevs.
    let mut host_a = b.host("node-a").await;
    let e = host_a
        .attach_netdev(pb::AttachNetdevRequest {
            namespace: "pods".into(),
            spec: Some(mk_netdev_spec("dpu-b", 1, "node-b", "net-a")),
            timeout_ms: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "host node-a cannot attach netdevs of node node-b");
    // Claiming an existing netdev of node-b by naming itself as hostname is refused too.
    let e = host_a
        .attach_netdev(pb::AttachNetdevRequest {
            namespace: "pods".into(),
            spec: Some(mk_netdev_spec("dpu-b", 0, "node-a", "net-a")),
            timeout_ms: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = host_a
        .get_netdev(pb::GetNetdevRequest { namespace: "pods".into(), name: "dpu-b-pf0-vf0".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = host_a
        .detach_netdev(pb::DetachNetdevRequest { namespace: "pods".into(), name: "dpu-b-pf0-vf0".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // A tenant cluster cannot write fabric kinds or read DPUs; an infra cluster cannot write Netdevs.
    let mut tenant = b.sync("cluster/east/tenant").await;
    let e = tenant.apply(apply_req(mk_lb("lb-x", 20))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "cluster/east/tenant may not write LogicalBridge objects; it owns Netdev, FlowPolicy");
    let e = tenant.watch(pb::WatchRequest { kinds: vec![pb::Kind::Dpu as i32], since_revision: 0 }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = tenant
        .delete(pb::DeleteRequest { key: Some(key(pb::Kind::XpuNetwork, "", "net-a")), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut infra = b.sync("cluster/east/infra").await;
    let e = infra.apply(apply_req(mk_netdev("pods", "dpu-a", 5, "node-a", "net-a"))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Services are for their identities only.
    let e = AdminServiceClient::new(b.channel("cluster/east/infra").await)
        .fleet_status(pb::FleetStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = AgentServiceClient::new(b.channel("host/node-a").await)
        .register(pb::RegisterRequest { serial: "node-a".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut dpu_as_cluster =
        xpu_proto::broker::v1::sync_service_client::SyncServiceClient::new(b.channel("dpu/dpu-a").await);
    let e =
        dpu_as_cluster.list(pb::ListRequest { kind: pb::Kind::Netdev as i32, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    assert_eq!(head(&b).await, before, "no refused request wrote anything");

    // What each may do still works.
    let ok = tenant.apply(apply_req(mk_netdev("pods", "dpu-a", 6, "node-a", "net-a"))).await.unwrap();
    assert!(ok.into_inner().changed);
    infra.apply(apply_req(mk_lb("lb-y", 30))).await.unwrap();
    b.stop().await;
}

// ---- the real binary: refusals in its log, its listeners, its HTTP port ----

const BIN: &str = env!("CARGO_BIN_EXE_xpu-broker");

/// `xpu-broker serve --dev` on a fresh data dir (embedded store), its stderr in `broker.log`.
struct Binary {
    child: std::process::Child,
    grpc: u16,
    http: u16,
    dir: tempfile::TempDir,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 exchange on a plain TCP connection: everything the peer sent until it closed.
fn raw_exchange(port: u16, request: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // A reset after the alert, or a peer that keeps the connection open (HTTP keep-alive).
            Err(_) => break,
        }
    }
    out
}

fn http_get(port: u16, path: &str, headers: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n");
    let text = String::from_utf8_lossy(&raw_exchange(port, req.as_bytes())).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{text:?}"));
    (status, text)
}

impl Binary {
    async fn start() -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let (grpc, http) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("broker.log")).unwrap();
        let child = std::process::Command::new(BIN)
            .args(["serve", "--dev", "--data-dir", dir.path().to_str().unwrap()])
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}"), "--http-addr", &format!("127.0.0.1:{http}")])
            .env_clear()
            .env("XPU_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let b = Binary { child, grpc, http, dir };
        let started = std::time::Instant::now();
        loop {
            let ready = std::net::TcpStream::connect(("127.0.0.1", http)).is_ok()
                && http_get(http, "/readyz", "").0 == 200
                && std::net::TcpStream::connect(("127.0.0.1", grpc)).is_ok();
            if ready {
                return b;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "not ready: {}", b.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    fn ca(&self) -> DevCa {
        DevCa::load(&self.dir.path().join("dev-ca")).unwrap()
    }

    fn pem(&self, identity: &str) -> Pem {
        let id = xpu_broker::identity::Identity::parse(identity).unwrap();
        self.ca().issue_client(&id, &IssueOptions::valid_for_days(1)).unwrap()
    }

    async fn channel_with(&self, pem: &Pem) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca().pem.cert))
            .identity(Identity::from_pem(&pem.cert, &pem.key))
            .domain_name("localhost");
        Endpoint::from_shared(format!("https://127.0.0.1:{}", self.grpc)).unwrap().tls_config(tls)?.connect().await
    }

    async fn channel(&self, identity: &str) -> tonic::transport::Channel {
        self.channel_with(&self.pem(identity)).await.unwrap()
    }

    /// Waits until every `needle` is in the log (each line is written when the event happens).
    async fn log_containing(&self, needles: &[String]) -> String {
        let started = std::time::Instant::now();
        loop {
            let log = self.log();
            let missing: Vec<_> = needles.iter().filter(|n| !log.contains(n.as_str())).collect();
            if missing.is_empty() {
                return log;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "not logged: {missing:#?}\nlog:\n{log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The `refused` warning of grpc.rs for one call, as the binary writes it.
fn refusal_line(identity: &str, method: &str, error: &str) -> String {
    format!("WARN xpu_broker::grpc: refused identity={identity} method=\"{method}\" error={error}")
}

#[tokio::test]
async fn cross_identity_calls_are_refused_and_logged_with_the_identity() {
    let b = Binary::start().await;
    let mut admin = AdminServiceClient::new(b.channel("admin/ops").await);
    admin.apply(apply_req(mk_lb("lb-10", 10))).await.unwrap();
    admin.apply(apply_req(mk_network("net-a", "lb-10", "10.8.0.0/24", "10.8.0.1"))).await.unwrap();
    for serial in ["dpu-a", "dpu-b"] {
        AgentServiceClient::new(b.channel(&format!("dpu/{serial}")).await)
            .register(pb::RegisterRequest { serial: serial.into(), ..Default::default() })
            .await
            .unwrap();
    }
    admin.apply(apply_req(mk_netdev("pods", "dpu-b", 0, "node-b", "net-a"))).await.unwrap();
    let before = admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision;

    // (identity, method, message) of every refusal below, in order.
    let mut expected: Vec<(&str, &str, String)> = Vec::new();
    let mut refused = |e: tonic::Status, identity: &'static str, method: &'static str, message: &str| {
        assert_eq!((e.code(), e.message()), (Code::PermissionDenied, message), "{identity} {method}");
        expected.push((identity, method, message.to_string()));
    };

    // DPU A reporting and watching for DPU B.
    let mut a = AgentServiceClient::new(b.channel("dpu/dpu-a").await);
    let b_netdev = key(pb::Kind::Netdev, "pods", "dpu-b-pf0-vf0");
    let status = || vec![report(b_netdev.clone(), 1, 1, netdev_status("Connected", "10.8.0.9/24"))];
    let e = a.report_status(pb::ReportStatusRequest { serial: "dpu-b".into(), reports: status() }).await.unwrap_err();
    refused(e, "dpu/dpu-a", "ReportStatus", "dpu dpu-a cannot act for dpu dpu-b");
    let e = a.report_status(pb::ReportStatusRequest { serial: "dpu-a".into(), reports: status() }).await.unwrap_err();
    refused(
        e,
        "dpu/dpu-a",
        "ReportStatus",
        "Netdev pods/dpu-b-pf0-vf0 belongs to dpu dpu-b; dpu dpu-a cannot report its status",
    );
    let e = a.watch_desired(pb::WatchDesiredRequest { serial: "dpu-b".into(), since_revision: 0 }).await.unwrap_err();
    refused(e, "dpu/dpu-a", "WatchDesired", "dpu dpu-a cannot act for dpu dpu-b");
    let e = a.heartbeat(pb::HeartbeatRequest { serial: "dpu-b".into(), applied_revision: 0 }).await.unwrap_err();
    refused(e, "dpu/dpu-a", "Heartbeat", "dpu dpu-a cannot act for dpu dpu-b");

    // Host node-a attaching (and detaching) a netdev of node-b.
    let mut host = HostServiceClient::new(b.channel("host/node-a").await);
    let attach = pb::AttachNetdevRequest {
        namespace: "pods".into(),
        spec: Some(mk_netdev_spec("dpu-b", 1, "node-b", "net-a")),
        timeout_ms: 1,
        ..Default::default()
    };
    let e = host.attach_netdev(attach).await.unwrap_err();
    refused(e, "host/node-a", "AttachNetdev", "host node-a cannot attach netdevs of node node-b");
    let e = host
        .detach_netdev(pb::DetachNetdevRequest { namespace: "pods".into(), name: "dpu-b-pf0-vf0".into() })
        .await
        .unwrap_err();
    refused(
        e,
        "host/node-a",
        "DetachNetdev",
        "Netdev pods/dpu-b-pf0-vf0 belongs to node node-b; host node-a cannot change it",
    );

    // The tenant cluster writing fabric kinds.
    let mut tenant = SyncServiceClient::new(b.channel("cluster/east/tenant").await);
    let owns = "it owns Netdev, FlowPolicy";
    let e = tenant.apply(apply_req(mk_lb("lb-20", 20))).await.unwrap_err();
    refused(
        e,
        "cluster/east/tenant",
        "Sync.Apply",
        &format!("cluster/east/tenant may not write LogicalBridge objects; {owns}"),
    );
    let e = tenant.apply(apply_req(mk_network("net-b", "lb-10", "10.9.0.0/24", "10.9.0.1"))).await.unwrap_err();
    refused(
        e,
        "cluster/east/tenant",
        "Sync.Apply",
        &format!("cluster/east/tenant may not write XpuNetwork objects; {owns}"),
    );
    for (kind, name) in [(pb::Kind::LogicalBridge, "LogicalBridge"), (pb::Kind::Vrf, "Vrf"), (pb::Kind::Svi, "Svi")] {
        let e = tenant
            .delete(pb::DeleteRequest { key: Some(key(kind, "", "lb-10")), ..Default::default() })
            .await
            .unwrap_err();
        refused(
            e,
            "cluster/east/tenant",
            "Sync.Delete",
            &format!("cluster/east/tenant may not write {name} objects; {owns}"),
        );
    }

    // Every non-admin identity calling AdminService (what `xpu-broker ctl` uses).
    let not_admin = |id: &str| format!("{id} may not call AdminService; it is for operators (xpu://admin/<name>)");
    for identity in ["dpu/dpu-a", "host/node-a", "cluster/east/tenant", "cluster/east/infra"] {
        let mut c = AdminServiceClient::new(b.channel(identity).await);
        let e = c.fleet_status(pb::FleetStatusRequest {}).await.unwrap_err();
        refused(e, identity, "Admin.FleetStatus", &not_admin(identity));
        let e = c.apply(apply_req(mk_lb("lb-30", 30))).await.unwrap_err();
        refused(e, identity, "Admin.Apply", &not_admin(identity));
        let e = c.list(pb::ListRequest { kind: pb::Kind::Dpu as i32, ..Default::default() }).await.unwrap_err();
        refused(e, identity, "Admin.List", &not_admin(identity));
        let e = c.decommission_dpu(pb::DecommissionDpuRequest { serial: "dpu-b".into() }).await.unwrap_err();
        refused(e, identity, "Admin.DecommissionDpu", &not_admin(identity));
        let e = c.compact(pb::CompactRequest { revision: before }).await.unwrap_err();
        refused(e, identity, "Admin.Compact", &not_admin(identity));
    }
    // …and `xpu-broker ctl` itself with a DPU's certificate.
    let certs = b.dir.path().join("dpu-a");
    xpu_broker::ca::write_issued(&certs, &b.pem("dpu/dpu-a"), &b.ca()).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["ctl", "--broker", &format!("https://127.0.0.1:{}", b.grpc)])
        .args(["--tls-cert", certs.join("tls.crt").to_str().unwrap()])
        .args(["--tls-key", certs.join("tls.key").to_str().unwrap()])
        .args(["--ca", certs.join("ca.crt").to_str().unwrap()])
        .args(["get", "dpus"])
        .env_clear()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ctl with a DPU certificate must fail: {stderr}");
    assert!(stderr.contains(&not_admin("dpu/dpu-a")), "{stderr}");
    assert!(out.stdout.is_empty(), "ctl printed data: {}", String::from_utf8_lossy(&out.stdout));
    expected.push(("dpu/dpu-a", "Admin.List", not_admin("dpu/dpu-a")));

    // Certificates refused before any identity exists are logged too.
    let two =
        b.ca().issue_client_with_uris(&["xpu://admin/a", "xpu://admin/b"], &IssueOptions::valid_for_days(1)).unwrap();
    let e = AdminServiceClient::new(b.channel_with(&two).await.unwrap())
        .fleet_status(pb::FleetStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let rogue = DevCa::generate("rogue").unwrap();
    let foreign = rogue
        .issue_client(&xpu_broker::identity::Identity::Admin("ops".into()), &IssueOptions::valid_for_days(1))
        .unwrap();
    let probe = probe_mtls(
        SocketAddr::from(([127, 0, 0, 1], b.grpc)),
        &b.ca().pem.cert,
        Some(&foreign),
        &rustls::version::TLS13,
    )
    .await;
    assert_eq!(probe, Tls::Alert(AlertDescription::UnknownCA));

    let mut needles: Vec<String> = expected.iter().map(|(id, m, e)| refusal_line(id, m, e)).collect();
    needles.push(
        "WARN xpu_broker::grpc: refused a client certificate error=the client certificate carries more than one xpu:// identity"
            .into(),
    );
    needles.push("xpu_broker::grpc: TLS handshake refused peer=127.0.0.1:".into());
    needles.push("error=invalid peer certificate: UnknownIssuer".into());
    let log = b.log_containing(&needles).await;
    // Exactly one line per refused call, and none for what was allowed.
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("xpu_broker::grpc: refused identity=")).collect();
    assert_eq!(lines.len(), expected.len(), "one warning per refusal:\n{}", lines.join("\n"));
    for (identity, method, error) in &expected {
        let want = refusal_line(identity, method, error);
        let n = expected.iter().filter(|(i, m, e)| refusal_line(i, m, e) == want).count();
        assert_eq!(lines.iter().filter(|l| l.ends_with(&want)).count(), n, "{want}");
    }
    assert!(!log.contains("refused identity=admin/ops"), "allowed calls are not refusals");
    let (_, metrics) = http_get(b.http, "/metrics", "");
    let refused_handshakes = metrics
        .lines()
        .find_map(|l| l.strip_prefix("xpu_tls_handshake_failures_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(refused_handshakes.is_some_and(|n| n >= 1.0), "handshake refusals are counted: {refused_handshakes:?}");
    let after = admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision;
    assert_eq!(after, before, "no refused call wrote anything");
}

/// Local ports of the sockets that `pid` holds, from /proc: `(listening TCP, UDP)`.
fn sockets_of(pid: u32) -> (std::collections::BTreeSet<u16>, std::collections::BTreeSet<u16>) {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(String::from))
        .collect();
    assert!(!inodes.is_empty(), "the broker holds sockets");
    let ports = |files: &[&str], only_state: Option<&str>| {
        let mut out = std::collections::BTreeSet::new();
        for f in files {
            let table = std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).unwrap_or_default();
            for row in table.lines().skip(1) {
                let cols: Vec<&str> = row.split_whitespace().collect();
                // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
                let (local, state, inode) = (cols[1], cols[3], cols[9]);
                if inodes.contains(inode) && only_state.is_none_or(|s| s == state) {
                    let port = local.rsplit(':').next().unwrap();
                    out.insert(u16::from_str_radix(port, 16).unwrap());
                }
            }
        }
        out
    };
    // 0A is LISTEN.
    (ports(&["tcp", "tcp6"], Some("0A")), ports(&["udp", "udp6", "raw", "raw6"], None))
}

#[tokio::test]
async fn only_the_tls_port_and_the_http_port_listen() {
    let b = Binary::start().await;
    // Plaintext on the gRPC port: HTTP/2 with prior knowledge, HTTP/1.1, a gRPC request. The TLS
    // layer answers each with a fatal alert (or nothing) and closes; no application answers.
    let settings = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&settings);
    let probes: [(&str, Vec<u8>); 4] = [
        ("h2 prior knowledge", h2),
        ("HTTP/1.1 status API", b"GET /api/v1/fleet HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec()),
        ("HTTP/1.1 health", b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec()),
        (
            "gRPC over HTTP/1.1 upgrade",
            b"POST /xpu.broker.v1.AdminService/FleetStatus HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/grpc\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\n\0\0\0\0\0".to_vec(),
        ),
    ];
    for (name, bytes) in &probes {
        let answer = raw_exchange(b.grpc, bytes);
        let fatal_alert = answer.len() == 7 && answer[..3] == [0x15, 0x03, 0x03] && answer[5] == 2;
        assert!(answer.is_empty() || fatal_alert, "{name}: the gRPC port answered plaintext: {answer:?}");
        assert!(!String::from_utf8_lossy(&answer).contains("HTTP/"), "{name}: {answer:?}");
        // The same bytes get an application answer on the HTTP port: the probe can tell.
        if name.starts_with("HTTP/1.1") {
            let on_http = raw_exchange(b.http, bytes);
            assert!(on_http.starts_with(b"HTTP/1.1 "), "{name} on the HTTP port: {on_http:?}");
        }
    }
    assert_eq!(http_get(b.http, "/healthz", "").0, 200, "the broker still serves");

    let (tcp, other) = sockets_of(b.child.id());
    assert_eq!(tcp, [b.grpc, b.http].into_iter().collect(), "listening TCP ports");
    assert!(other.is_empty(), "UDP or raw sockets: {other:?}");
    // The same from ss, when it is there.
    if let Ok(out) = std::process::Command::new("ss").args(["-Hltnup"]).output() {
        let text = String::from_utf8_lossy(&out.stdout);
        let mine: Vec<&str> = text.lines().filter(|l| l.contains(&format!("pid={},", b.child.id()))).collect();
        assert_eq!(mine.len(), 2, "ss: {mine:#?}");
        for port in [b.grpc, b.http] {
            assert!(mine.iter().any(|l| l.contains(&format!("127.0.0.1:{port} "))), "ss: {mine:#?}");
        }
    }
}

#[tokio::test]
async fn the_http_port_serves_probes_but_no_data_without_credentials() {
    let b = Binary::start().await;
    let want = r#"{"error":{"code":"unauthenticated","message":"a client certificate or a bearer token is required"}}"#;
    for path in [
        "/api/v1",
        "/api/v1/fleet",
        "/api/v1/dpus",
        "/api/v1/dpus/dpu-a",
        "/api/v1/clusters",
        "/api/v1/netdevs",
        "/api/v1/netdevs/pods.x",
        "/api/v1/fabric",
        "/api/v1/flowpolicies",
        "/api/v1/sli",
        "/api/v1/events",
        "/api/v1/openapi.json",
        "/api/v1/no-such-route",
    ] {
        let (status, text) = http_get(b.http, path, "");
        assert_eq!(status, 401, "{path}: {text}");
        assert!(text.to_ascii_lowercase().contains("content-type: application/json"), "{path}: {text}");
        assert!(text.ends_with(&format!("\r\n\r\n{want}")), "{path}: {text}");
    }
    // A wrong credential is no better than none.
    for header in [
        "Authorization: Bearer xpu1.e30.AAAA\r\n",
        "Authorization: Basic YWRtaW46YWRtaW4=\r\n",
        "Cookie: xpu_token=forged\r\n",
    ] {
        let (status, text) = http_get(b.http, "/api/v1/fleet", header);
        assert_eq!(status, 401, "{header}: {text}");
        assert!(text.contains(r#""code":"unauthenticated""#), "{header}: {text}");
    }
    // The dashboard sends a browser to its login page rather than showing data.
    let (status, text) = http_get(b.http, "/", "");
    assert!((300..400).contains(&status) && text.contains("location: /login"), "{text}");
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(http_get(b.http, path, "").0, 200, "{path}");
    }
    assert!(http_get(b.http, "/healthz", "").1.ends_with("\r\n\r\nok\n"));
    // The control: a token signed with this broker's key reads the same API.
    let token = std::process::Command::new(BIN)
        .args(["token", "--subject", "ops", "--ttl", "1h", "--data-dir", b.dir.path().to_str().unwrap()])
        .env_clear()
        .output()
        .unwrap();
    assert!(token.status.success(), "{}", String::from_utf8_lossy(&token.stderr));
    let token = String::from_utf8(token.stdout).unwrap();
    let (status, text) = http_get(b.http, "/api/v1/fleet", &format!("Authorization: Bearer {}\r\n", token.trim()));
    assert_eq!(status, 200, "{text}");
}
