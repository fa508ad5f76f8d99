//! Through a running broker (both store backends): random invalid applies are refused naming
//! the field and write nothing; text the validators let through never fails the store; size and
//! decoding limits answer with their exact status codes and the broker keeps serving.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use bytes::{Buf, BufMut};
use proptest::{prelude::*, test_runner::TestRunner};
use prost::Message;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};
use xpu_broker::{
    Config,
    model::{Kind, object::Spec},
};
use xpu_proto::broker::v1::{self as pb, resource::Kind as R};

use crate::{arb::*, breaks::*, common::*};

/// Whether a refusal's message names `field`. Messages are cut at
/// `MAX_CLIENT_MESSAGE_BYTES`, which can fall inside a field that quotes a huge label key.
fn names(message: &str, field: &str) -> bool {
    let want = format!("invalid {field}: ");
    match message.strip_suffix("… (truncated)") {
        Some(kept) => want.starts_with(kept) || message.starts_with(&want),
        None => message.starts_with(&want),
    }
}

async fn head(b: &TestBroker) -> i64 {
    b.admin().await.fleet_status(pb::FleetStatusRequest {}).await.unwrap().into_inner().revision
}

fn key_of(res: &pb::Resource) -> Option<pb::ObjectKey> {
    let key = xpu_broker::model::convert::resource_key(res)?;
    Some(key.to_proto())
}

/// Runs a property on a blocking thread: its body drives the broker with `Handle::block_on`
/// while the test's runtime serves.
async fn run_property<S: Strategy>(
    config: ProptestConfig,
    strategy: impl FnOnce() -> S + Send + 'static,
    test: impl Fn(S::Value) -> Result<(), TestCaseError> + Send + 'static,
) {
    tokio::task::spawn_blocking(move || {
        let mut runner = TestRunner::new(config);
        if let Err(e) = runner.run(&strategy(), test) {
            panic!("{e}");
        }
    })
    .await
    .unwrap()
}

conformance!(random_invalid_applies_are_refused_and_write_nothing);
async fn random_invalid_applies_are_refused_and_write_nothing(b: TestBroker) {
    let admin = b.admin().await;
    let tenant = b.sync("cluster/c/tenant").await;
    let before = head(&b).await;
    let rt = tokio::runtime::Handle::current();
    run_property(
        cases(4),
        || (invalid_case(), prop::bool::ANY),
        move |(case, via_sync)| {
            let key = key_of(&case.res);
            let status = rt
                .block_on(async {
                    if via_sync {
                        tenant.clone().apply(apply_req(case.res.clone())).await
                    } else {
                        admin.clone().apply(apply_req(case.res.clone())).await
                    }
                })
                .unwrap_err();
            prop_assert_eq!(status.code(), tonic::Code::InvalidArgument, "{:?}", status);
            prop_assert!(names(status.message(), &case.field), "{:?} for {}", status, case.field);
            // Nothing half-written: the object is absent (when its key can even be asked for).
            if let Some(key) = key.filter(|k| xpu_broker::model::Key::from_proto(Some(k), "key").is_ok()) {
                let got = rt.block_on(admin.clone().get(pb::GetRequest { key: Some(key) }));
                prop_assert_eq!(got.unwrap_err().code(), tonic::Code::NotFound);
            }
            Ok(())
        },
    )
    .await;
    assert_eq!(head(&b).await, before, "a refused apply wrote nothing");
    b.stop().await;
}

conformance!(free_text_that_passes_validation_is_stored_or_refused);
/// Objects the validators accept, with arbitrary text (any unicode, NUL included) wherever
/// they allow free text: the store keeps them as given, or the broker refuses them with
/// INVALID_ARGUMENT naming the field; never an internal error.
async fn free_text_that_passes_validation_is_stored_or_refused(b: TestBroker) {
    seed_network(&b, "net-a", "10.9.0.0/16", "10.9.0.1").await;
    let admin = b.admin().await;
    let rt = tokio::runtime::Handle::current();
    let strategy = || (valid_netdev(), ".{0,32}", "[^/ ]{0,3}");
    run_property(cases(8), strategy, move |((meta, spec), uid, interface)| {
        let Spec::Netdev(mut spec) = spec else { unreachable!() };
        // References the store checks are made to hold: only the free text varies.
        spec.network = "net-a".into();
        spec.logical_bridges.clear();
        spec.port_type.clear();
        spec.ipam = None;
        spec.mtu = 0;
        spec.pod_ref = Some(pb::PodRef { uid: uid.clone(), interface: interface.clone(), ..Default::default() });
        let res = resource(Some(meta), Some(Spec::Netdev(spec)), Kind::Netdev);
        let key = key_of(&res).unwrap();
        match rt.block_on(admin.clone().apply(apply_req(res))) {
            Ok(_) => {
                let got =
                    rt.block_on(admin.clone().get(pb::GetRequest { key: Some(key.clone()) })).unwrap().into_inner();
                let Some(R::Netdev(n)) = got.kind else { unreachable!() };
                let pod = n.spec.unwrap().pod_ref.unwrap();
                prop_assert_eq!((pod.uid, pod.interface), (uid, interface));
                rt.block_on(admin.clone().delete(pb::DeleteRequest { key: Some(key), ..Default::default() })).unwrap();
            }
            Err(s) => {
                prop_assert_eq!(s.code(), tonic::Code::InvalidArgument, "{:?}", s);
                prop_assert!(s.message().starts_with("invalid spec.podRef."), "{:?}", s);
            }
        }
        Ok(())
    })
    .await;
    b.stop().await;
}

conformance!(agent_free_text_is_stored_or_refused);
/// Free text an agent may send: the status a DPU reports and the inventory it registers with.
/// Each is stored (and reads back as sent) or refused with INVALID_ARGUMENT naming the field.
async fn agent_free_text_is_stored_or_refused(b: TestBroker) {
    seed_network(&b, "net-a", "10.9.0.0/16", "10.9.0.1").await;
    register(&b, "dpu-a").await;
    let mut admin = b.admin().await;
    admin.apply(apply_req(mk_netdev("pods", "dpu-a", 0, "node-1", "net-a"))).await.unwrap();
    let agent = b.agent("dpu-a").await;
    let rt = tokio::runtime::Handle::current();
    let seq = Arc::new(AtomicU64::new(0));
    let text = || ".{0,24}";
    let strategy = move || ((text(), text(), text(), text(), text()), (text(), text(), text(), text()));
    run_property(cases(8), strategy, move |((message, port, oper, comp, details), (product, version, plane, cap))| {
        let mut status = netdev_status("Connected", "10.9.0.5/16");
        status.message = message.clone();
        status.bridge_port_name = port;
        status.oper_status = oper;
        status.components = vec![pb::Component { name: comp, status: "SUCCESS".into(), details }];
        let k = key(pb::Kind::Netdev, "pods", "dpu-a-pf0-vf0");
        let req = pb::ReportStatusRequest {
            serial: "dpu-a".into(),
            reports: vec![report(k.clone(), 1, seq.fetch_add(1, Ordering::Relaxed) + 1, status)],
        };
        match rt.block_on(agent.clone().report_status(req)) {
            Ok(_) => {
                let got = rt.block_on(admin.clone().get(pb::GetRequest { key: Some(k) })).unwrap().into_inner();
                let Some(R::Netdev(n)) = got.kind else { unreachable!() };
                prop_assert_eq!(n.status.unwrap().message, message);
            }
            Err(s) => {
                prop_assert_eq!(s.code(), Code::InvalidArgument, "{:?}", s);
                prop_assert!(s.message().starts_with("invalid reports[0].status."), "{:?}", s);
            }
        }
        let inventory = pb::DpuInventory {
            product: product.clone(),
            agent_version: version,
            dataplane: plane,
            capabilities: [(cap, true)].into(),
            ..Default::default()
        };
        let req = pb::RegisterRequest { serial: "dpu-a".into(), inventory: Some(inventory), ..Default::default() };
        match rt.block_on(agent.clone().register(req)) {
            Ok(_) => {
                let got = rt.block_on(admin.clone().get(pb::GetRequest { key: Some(key(pb::Kind::Dpu, "", "dpu-a")) }));
                let Some(R::Dpu(d)) = got.unwrap().into_inner().kind else { unreachable!() };
                prop_assert_eq!(d.status.unwrap().inventory.unwrap().product, product);
            }
            Err(s) => {
                prop_assert_eq!(s.code(), Code::InvalidArgument, "{:?}", s);
                prop_assert!(s.message().starts_with("invalid inventory."), "{:?}", s);
            }
        }
        Ok(())
    })
    .await;
    b.stop().await;
}

conformance!(forged_continue_tokens_are_refused_or_page);
/// List continue tokens are the caller's to forge: any text, any hex, any decoded
/// `<revision>/<namespace>/<name>` gives a page or INVALID_ARGUMENT naming `continueToken`.
async fn forged_continue_tokens_are_refused_or_page(b: TestBroker) {
    seed_network(&b, "net-a", "10.9.0.0/16", "10.9.0.1").await;
    let admin = b.admin().await;
    let rt = tokio::runtime::Handle::current();
    let strategy = || {
        prop_oneof![
            any_text(),
            any_text().prop_map(hex::encode),
            (any::<i64>(), ".{0,8}", ".{0,8}").prop_map(|(r, ns, n)| hex::encode(format!("{r}/{ns}/{n}"))),
        ]
    };
    run_property(cases(4), strategy, move |token| {
        let kind = if token.len() % 2 == 0 { pb::Kind::LogicalBridge } else { pb::Kind::Netdev };
        let req = pb::ListRequest { kind: kind as i32, continue_token: token.clone(), limit: 1, ..Default::default() };
        match rt.block_on(admin.clone().list(req)) {
            Ok(page) => prop_assert!(page.into_inner().items.len() <= 1),
            Err(s) => {
                prop_assert_eq!(s.code(), Code::InvalidArgument, "{:?} for {:?}", s, token);
                prop_assert!(s.message().starts_with("invalid continueToken: "), "{:?}", s);
            }
        }
        Ok(())
    })
    .await;
    b.stop().await;
}

// ---- limits ----

const MAX_MESSAGE_BYTES: usize = 256 * 1024;

fn small_messages(pki: &Pki) -> Config {
    let mut config = test_config(pki);
    config.max_message_bytes = MAX_MESSAGE_BYTES;
    config
}

/// An apply of exactly `len` encoded bytes: a LogicalBridge with one long label value.
fn apply_of_len(len: usize) -> pb::ApplyRequest {
    let mut value_len = len;
    for _ in 0..10 {
        let mut res = mk_lb("lb-big", 10);
        if let Some(R::LogicalBridge(l)) = res.kind.as_mut() {
            l.metadata.as_mut().unwrap().labels.insert("big".into(), "v".repeat(value_len));
        }
        let req = apply_req(res);
        let got = req.encoded_len();
        if got == len {
            return req;
        }
        value_len = (value_len + len).checked_sub(got).unwrap();
    }
    panic!("no apply request of exactly {len} bytes");
}

conformance!(messages_and_objects_over_their_caps_are_refused, config = small_messages);
/// The transport's cap is exact: a message of the cap passes to validation, one byte more is
/// OUT_OF_RANGE; a spec or status over `max_object_bytes` is INVALID_ARGUMENT naming it.
async fn messages_and_objects_over_their_caps_are_refused(b: TestBroker) {
    register(&b, "dpu-a").await;
    seed_network(&b, "net-a", "10.9.0.0/16", "10.9.0.1").await;
    let mut admin = b.admin().await;
    admin.apply(apply_req(mk_netdev("pods", "dpu-a", 0, "node-1", "net-a"))).await.unwrap();
    let before = head(&b).await;

    let at_cap = apply_of_len(MAX_MESSAGE_BYTES);
    assert_eq!(at_cap.encoded_len(), MAX_MESSAGE_BYTES);
    let e = admin.apply(at_cap).await.unwrap_err();
    assert_invalid(&e, "metadata.labels[\"big\"]");
    let over = apply_of_len(MAX_MESSAGE_BYTES + 1);
    let e = admin.apply(over).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("message length too large"), "{e:?}");

    // A spec of ~130 KiB of JSON (80 rules of 64 port ranges) in a ~40 KiB message.
    let mut policy = pb::FlowPolicySpec::default();
    let field = break_flow_policy(&mut policy, &Break::Special(Special::SpecTooLarge));
    assert_eq!(field, "spec");
    let res = resource(
        Some(mk_meta("fp".into(), "pods".into(), Default::default())),
        Some(Spec::FlowPolicy(policy)),
        Kind::FlowPolicy,
    );
    let e = admin.apply(apply_req(res)).await.unwrap_err();
    assert_invalid(&e, "spec");
    assert!(e.message().contains("bytes exceed the limit of 65536 bytes"), "{e:?}");

    // A status of ~70 KiB: many components.
    let mut status = netdev_status("Connected", "");
    status.components = (0..2000)
        .map(|i| pb::Component { name: format!("c{i}"), status: "SUCCESS".into(), details: "x".repeat(20) })
        .collect();
    let e = b
        .agent("dpu-a")
        .await
        .report_status(pb::ReportStatusRequest {
            serial: "dpu-a".into(),
            reports: vec![report(key(pb::Kind::Netdev, "pods", "dpu-a-pf0-vf0"), 1, 1, status)],
        })
        .await
        .unwrap_err();
    assert_invalid(&e, "reports[0].status");
    assert!(e.message().contains("exceed the limit of 65536 bytes"), "{e:?}");

    assert_eq!(head(&b).await, before, "nothing was written");
    b.stop().await;
}

/// Passes request bytes through unchanged, to send what no generated client would.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

async fn raw_apply(channel: Channel, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/xpu.broker.v1.AdminService/Apply");
    grpc.unary(tonic::Request::new(body), path, Raw).await.map(tonic::Response::into_inner)
}

conformance!(undecodable_requests_are_refused_by_the_decoder);
/// Bytes that are not an `ApplyRequest`: random ones, and unknown groups nested 100,000 deep
/// (prost's recursion limit, not the stack, stops them). The decoder refuses them as
/// INVALID_ARGUMENT saying where decoding stopped (never INTERNAL: the request is at fault);
/// random bytes that happen to parse are refused by validation. Nothing is written and the
/// broker keeps serving.
async fn undecodable_requests_are_refused_by_the_decoder(b: TestBroker) {
    let channel = b.channel("admin/test").await;
    let before = head(&b).await;

    let depth = 100_000;
    let mut deep = vec![0x7b; depth]; // field 15, start group
    deep.extend(std::iter::repeat_n(0x7c, depth)); // field 15, end group
    let e = raw_apply(channel.clone(), deep).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("the message does not decode: "), "{e:?}");
    assert!(e.message().contains("recursion limit reached"), "{e:?}");

    let rt = tokio::runtime::Handle::current();
    let ch = channel.clone();
    let strategy = || {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            // A valid request with bytes flipped.
            (prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)).prop_map(|flips| {
                let mut bytes = apply_req(mk_lb("lb-1", 10)).encode_to_vec();
                for (at, x) in flips {
                    let n = bytes.len();
                    bytes[at % n] ^= x;
                }
                bytes
            }),
        ]
    };
    let applied = Arc::new(AtomicU64::new(0));
    let counted = applied.clone();
    run_property(cases(4), strategy, move |bytes| {
        match rt.block_on(raw_apply(ch.clone(), bytes.clone())) {
            Ok(_) => {
                counted.fetch_add(1, Ordering::Relaxed);
                // Flipped bytes may still be a valid object; it was written as applied.
                let decoded = pb::ApplyRequest::decode(bytes.as_slice());
                prop_assert!(decoded.is_ok(), "accepted bytes that do not decode");
            }
            Err(s) if s.message().starts_with("the message does not decode: ") => {
                prop_assert_eq!(s.code(), Code::InvalidArgument, "{:?}", s);
                prop_assert!(s.message().contains("failed to decode Protobuf message"), "{:?}", s);
                prop_assert!(pb::ApplyRequest::decode(bytes.as_slice()).is_err(), "{:?}", s);
            }
            // Bytes that decode reach the service: refused as any bad request is.
            Err(s) => prop_assert!(
                matches!(
                    s.code(),
                    Code::InvalidArgument
                        | Code::PermissionDenied
                        | Code::FailedPrecondition
                        | Code::NotFound
                        | Code::Aborted
                        | Code::AlreadyExists
                ),
                "{:?}",
                s
            ),
        }
        Ok(())
    })
    .await;
    // Only requests that decoded and were applied wrote anything (one revision each at most).
    let applied = i64::try_from(applied.load(Ordering::Relaxed)).unwrap();
    assert!(head(&b).await <= before + applied, "only applied requests wrote");
    let admin = b.admin().await;
    admin.clone().fleet_status(pb::FleetStatusRequest {}).await.unwrap();
    b.stop().await;
}

conformance!(nul_text_and_huge_values_are_refused_readably);
/// The refusals the properties above found as INTERNAL (a NUL the Postgres store cannot keep)
/// or as a dropped connection (a huge value quoted in the refusal), pinned.
async fn nul_text_and_huge_values_are_refused_readably(b: TestBroker) {
    seed_network(&b, "net-a", "10.9.0.0/16", "10.9.0.1").await;
    register(&b, "dpu-a").await;
    let mut admin = b.admin().await;
    let before = head(&b).await;
    let mut spec = mk_netdev_spec("dpu-a", 0, "node-1", "net-a");
    spec.pod_ref = Some(pb::PodRef { uid: "a\0b".into(), ..Default::default() });
    let nd = resource(
        Some(mk_meta(spec.netdev_id.clone(), "pods".into(), Default::default())),
        Some(Spec::Netdev(spec)),
        Kind::Netdev,
    );
    assert_invalid(&admin.apply(apply_req(nd)).await.unwrap_err(), "spec.podRef.uid");
    let token = hex::encode("0/\0/x");
    let list = pb::ListRequest { kind: pb::Kind::Netdev as i32, continue_token: token, ..Default::default() };
    assert_invalid(&admin.list(list).await.unwrap_err(), "continueToken");
    let mut agent = b.agent("dpu-a").await;
    let inventory = pb::DpuInventory { product: "bf3\0".into(), ..Default::default() };
    let e = agent.register(pb::RegisterRequest {
        serial: "dpu-a".into(),
        inventory: Some(inventory),
        ..Default::default()
    });
    assert_invalid(&e.await.unwrap_err(), "inventory.product");
    assert_eq!(head(&b).await, before, "nothing was written");
    admin.apply(apply_req(mk_netdev("pods", "dpu-a", 1, "node-1", "net-a"))).await.unwrap();
    let before = head(&b).await;
    let mut status = netdev_status("Error", "");
    status.message = "no\0such VF".into();
    let req = pb::ReportStatusRequest {
        serial: "dpu-a".into(),
        reports: vec![report(key(pb::Kind::Netdev, "pods", "dpu-a-pf0-vf1"), 1, 1, status)],
    };
    assert_invalid(&agent.report_status(req).await.unwrap_err(), "reports[0].status.message");

    // A 1 MiB label value (within the 4 MiB message cap): the refusal quotes it cut short, the
    // client reads it, and the same connection keeps working.
    let mut lb = mk_lb("lb-big", 10);
    if let Some(R::LogicalBridge(l)) = lb.kind.as_mut() {
        l.metadata.as_mut().unwrap().labels.insert("big".into(), "v".repeat(1 << 20));
    }
    let e = admin.apply(apply_req(lb)).await.unwrap_err();
    assert_invalid(&e, "metadata.labels[\"big\"]");
    assert!(e.message().len() <= xpu_broker::error::MAX_CLIENT_MESSAGE_BYTES, "{}", e.message().len());
    admin.fleet_status(pb::FleetStatusRequest {}).await.unwrap();
    assert_eq!(head(&b).await, before, "nothing was written");
    b.stop().await;
}
