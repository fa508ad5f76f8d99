//! The OPI EVPN gateway simulator (through raw gRPC clients) and the `opi` dataplane against it.
//! No broker, database or root needed: the simulator runs in-process on 127.0.0.1.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tonic::{Code, transport::Channel};
use xpu_infra_sync::{
    dataplane::{
        Dataplane, Desired, ObjKey, ObjKind,
        opi::{OpiDataplane, OpiOptions, STATE_FILE, ip_prefix, opi_id},
    },
    opisim::{NAME_PREFIX, OpiSim, SimCounts, SimHandle},
};
use xpu_proto::{
    broker::v1 as pb,
    opi::{
        evpn_gw::{
            self as gw, bridge_port_service_client::BridgePortServiceClient,
            logical_bridge_service_client::LogicalBridgeServiceClient, svi_service_client::SviServiceClient,
            vrf_service_client::VrfServiceClient,
        },
        opinetcommon::ip_address::V4OrV6,
    },
};

const UP: Duration = Duration::from_millis(50);

async fn start(up_delay: Duration) -> (OpiSim, SimHandle) {
    let sim = OpiSim::new(up_delay);
    let handle = sim.clone().start("127.0.0.1:0").await.unwrap();
    (sim, handle)
}

async fn channel(h: &SimHandle) -> Channel {
    Channel::from_shared(h.endpoint()).unwrap().connect().await.unwrap()
}

fn lb_msg(vlan_id: u32, vni: Option<u32>) -> Option<gw::LogicalBridge> {
    Some(gw::LogicalBridge {
        spec: Some(gw::LogicalBridgeSpec { vlan_id, vni, vtep_ip_prefix: None }),
        ..Default::default()
    })
}

fn port_msg(mac: &[u8], ptype: gw::BridgePortType, bridges: &[&str]) -> Option<gw::BridgePort> {
    Some(gw::BridgePort {
        spec: Some(gw::BridgePortSpec {
            mac_address: mac.to_vec(),
            ptype: ptype as i32,
            logical_bridges: bridges.iter().map(|s| s.to_string()).collect(),
        }),
        ..Default::default()
    })
}

async fn create_lb(c: &mut LogicalBridgeServiceClient<Channel>, id: &str, vlan: u32) -> gw::LogicalBridge {
    let req = gw::CreateLogicalBridgeRequest { logical_bridge_id: id.into(), logical_bridge: lb_msg(vlan, None) };
    c.create_logical_bridge(req).await.unwrap().into_inner()
}

async fn create_port(
    c: &mut BridgePortServiceClient<Channel>,
    id: &str,
    mac: &[u8],
    ptype: gw::BridgePortType,
    bridges: &[&str],
) -> Result<gw::BridgePort, tonic::Status> {
    let req = gw::CreateBridgePortRequest { bridge_port_id: id.into(), bridge_port: port_msg(mac, ptype, bridges) };
    c.create_bridge_port(req).await.map(|r| r.into_inner())
}

fn oper(status: &Option<gw::LogicalBridgeStatus>) -> i32 {
    status.as_ref().map_or(0, |s| s.oper_status)
}

// ---------------------------------------------------------------------------------------------
// (a) the simulator, through raw gRPC clients
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sim_create_is_idempotent_by_id() {
    let (sim, h) = start(UP).await;
    let mut lbs = LogicalBridgeServiceClient::new(channel(&h).await);

    let first = create_lb(&mut lbs, "bridge-a", 10).await;
    assert_eq!(first.name, "//network.opiproject.org/bridges/bridge-a");
    let writes = sim.writes();

    // Same id, different spec: the stored object comes back unchanged.
    let again = create_lb(&mut lbs, "bridge-a", 20).await;
    assert_eq!(again.name, first.name);
    assert_eq!(again.spec.unwrap().vlan_id, 10);
    assert_eq!(sim.writes(), writes);
    assert_eq!(sim.counts().logical_bridges, 1);

    // No id: the server generates one (a UUID).
    let generated = create_lb(&mut lbs, "", 30).await;
    let id = generated.name.strip_prefix("//network.opiproject.org/bridges/").unwrap();
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(id.matches('-').count(), 4, "{id}");
    assert_eq!(sim.counts().logical_bridges, 2);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn sim_status_is_down_and_pending_then_up() {
    let (_sim, h) = start(Duration::from_millis(150)).await;
    let mut vrfs = VrfServiceClient::new(channel(&h).await);
    let spec = gw::VrfSpec {
        vni: Some(1000),
        loopback_ip_prefix: Some(ip_prefix("10.255.0.1/32").unwrap()),
        vtep_ip_prefix: None,
    };
    let req =
        gw::CreateVrfRequest { vrf_id: "blue".into(), vrf: Some(gw::Vrf { spec: Some(spec), ..Default::default() }) };
    let created = vrfs.create_vrf(req).await.unwrap().into_inner();
    let status = created.status.unwrap();
    assert_eq!(status.oper_status, gw::VrfOperStatus::Down as i32);
    let names: Vec<&str> = status.components.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["frr", "linux", "vendor"]);
    assert!(status.components.iter().all(|c| c.status == gw::CompStatus::Pending as i32));

    let name = created.name.clone();
    let get = async |vrfs: &mut VrfServiceClient<Channel>| {
        vrfs.get_vrf(gw::GetVrfRequest { name: name.clone() }).await.unwrap().into_inner()
    };
    let early = get(&mut vrfs).await.status.unwrap();
    assert_eq!(early.oper_status, gw::VrfOperStatus::Down as i32);

    tokio::time::sleep(Duration::from_millis(250)).await;
    let late = get(&mut vrfs).await.status.unwrap();
    assert_eq!(late.oper_status, gw::VrfOperStatus::Up as i32);
    assert_eq!(late.components.len(), 3);
    assert!(late.components.iter().all(|c| c.status == gw::CompStatus::Success as i32));
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn sim_port_macs_are_unique() {
    let (sim, h) = start(UP).await;
    let ch = channel(&h).await;
    let mut lbs = LogicalBridgeServiceClient::new(ch.clone());
    let mut ports = BridgePortServiceClient::new(ch);
    let lb = create_lb(&mut lbs, "bridge-a", 10).await.name;
    let mac = [0xaa, 0xbb, 0xcc, 0, 0, 1];

    create_port(&mut ports, "port-a", &mac, gw::BridgePortType::Access, &[&lb]).await.unwrap();
    let err = create_port(&mut ports, "port-b", &mac, gw::BridgePortType::Access, &[&lb]).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("aa:bb:cc:00:00:01"), "{}", err.message());
    assert!(err.message().contains("port-a"), "{}", err.message());
    assert_eq!(sim.counts().bridge_ports, 1);

    // Another MAC is fine.
    create_port(&mut ports, "port-b", &[0xaa, 0xbb, 0xcc, 0, 0, 2], gw::BridgePortType::Access, &[&lb]).await.unwrap();
    assert_eq!(sim.counts().bridge_ports, 2);

    // A MAC of the wrong length is refused.
    let err = create_port(&mut ports, "port-c", &[1, 2, 3], gw::BridgePortType::Access, &[&lb]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("6 bytes"), "{}", err.message());
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn sim_access_ports_need_exactly_one_bridge() {
    let (sim, h) = start(UP).await;
    let ch = channel(&h).await;
    let mut lbs = LogicalBridgeServiceClient::new(ch.clone());
    let mut ports = BridgePortServiceClient::new(ch);
    let a = create_lb(&mut lbs, "bridge-a", 10).await.name;
    let b = create_lb(&mut lbs, "bridge-b", 20).await.name;
    let mac = |n: u8| [0x02, 0, 0, 0, 0, n];

    for (i, bridges) in [vec![], vec![a.as_str(), b.as_str()]].into_iter().enumerate() {
        let err = create_port(&mut ports, "port-x", &mac(1), gw::BridgePortType::Access, &bridges).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "case {i}: {err:?}");
        assert!(err.message().contains("exactly one logical bridge"), "{}", err.message());
    }
    let err = create_port(&mut ports, "port-x", &mac(1), gw::BridgePortType::Trunk, &[]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let missing = format!("{NAME_PREFIX}bridges/nope");
    let err = create_port(&mut ports, "port-x", &mac(1), gw::BridgePortType::Access, &[&missing]).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(sim.counts().bridge_ports, 0);

    create_port(&mut ports, "port-x", &mac(1), gw::BridgePortType::Access, &[&a]).await.unwrap();
    create_port(&mut ports, "port-y", &mac(2), gw::BridgePortType::Trunk, &[&a, &b]).await.unwrap();
    assert_eq!(sim.counts().bridge_ports, 2);

    // A bridge in use cannot be deleted.
    let err = lbs
        .delete_logical_bridge(gw::DeleteLogicalBridgeRequest { name: a.clone(), allow_missing: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn sim_delete_honours_allow_missing_and_is_asynchronous() {
    let (sim, h) = start(UP).await;
    let mut lbs = LogicalBridgeServiceClient::new(channel(&h).await);
    let missing = format!("{NAME_PREFIX}bridges/nothing-here");

    let err = lbs
        .delete_logical_bridge(gw::DeleteLogicalBridgeRequest { name: missing.clone(), allow_missing: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    lbs.delete_logical_bridge(gw::DeleteLogicalBridgeRequest { name: missing.clone(), allow_missing: true })
        .await
        .unwrap();
    let err = lbs.get_logical_bridge(gw::GetLogicalBridgeRequest { name: missing }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let name = create_lb(&mut lbs, "bridge-a", 10).await.name;
    lbs.delete_logical_bridge(gw::DeleteLogicalBridgeRequest { name: name.clone(), allow_missing: false })
        .await
        .unwrap();
    let deleting = lbs.get_logical_bridge(gw::GetLogicalBridgeRequest { name: name.clone() }).await.unwrap();
    assert_eq!(oper(&deleting.into_inner().status), gw::LbOperStatus::ToBeDeleted as i32);

    // An object being deleted cannot be updated.
    let mut msg = lb_msg(11, None).unwrap();
    msg.name = name.clone();
    let err = lbs
        .update_logical_bridge(gw::UpdateLogicalBridgeRequest {
            logical_bridge: Some(msg),
            update_mask: None,
            allow_missing: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("TO_BE_DELETED"), "{}", err.message());

    tokio::time::sleep(UP * 3).await;
    let err = lbs.get_logical_bridge(gw::GetLogicalBridgeRequest { name }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(sim.counts(), SimCounts::default());
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn sim_rejects_invalid_input() {
    let (sim, h) = start(UP).await;
    let ch = channel(&h).await;
    let mut lbs = LogicalBridgeServiceClient::new(ch.clone());
    let mut vrfs = VrfServiceClient::new(ch.clone());
    let mut svis = SviServiceClient::new(ch);

    for id in ["ab", "Bridge-A", "bridge_a", "1bridge", "bridge-", &"a".repeat(64)] {
        let req =
            gw::CreateLogicalBridgeRequest { logical_bridge_id: id.to_string(), logical_bridge: lb_msg(10, None) };
        let err = lbs.create_logical_bridge(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{id}: {err:?}");
        assert!(err.message().contains("logical_bridge_id"), "{id}: {}", err.message());
    }
    for (vlan, vni, what) in [(4096, None, "vlan_id"), (10, Some(0), "vni"), (10, Some(16_777_216), "vni")] {
        let req =
            gw::CreateLogicalBridgeRequest { logical_bridge_id: "bridge-a".into(), logical_bridge: lb_msg(vlan, vni) };
        let err = lbs.create_logical_bridge(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(what), "{}", err.message());
    }
    let req = gw::CreateLogicalBridgeRequest { logical_bridge_id: "bridge-a".into(), logical_bridge: lb_msg(0, None) };
    let err = lbs.create_logical_bridge(req).await.unwrap_err();
    assert_eq!(err.message(), "missing required field: logical_bridge.spec.vlan_id");
    let req = gw::CreateLogicalBridgeRequest { logical_bridge_id: "bridge-a".into(), logical_bridge: None };
    let err = lbs.create_logical_bridge(req).await.unwrap_err();
    assert_eq!(err.message(), "missing required field: logical_bridge");

    let req = gw::CreateVrfRequest {
        vrf_id: "blue".into(),
        vrf: Some(gw::Vrf { spec: Some(gw::VrfSpec::default()), ..Default::default() }),
    };
    let err = vrfs.create_vrf(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "missing required field: vrf.spec.loopback_ip_prefix");

    let svi = gw::SviSpec {
        vrf: format!("{NAME_PREFIX}vrfs/none"),
        logical_bridge: format!("{NAME_PREFIX}bridges/none"),
        mac_address: vec![2, 0, 0, 0, 0, 1],
        gw_ip_prefix: vec![ip_prefix("10.0.0.1/24").unwrap()],
        ..Default::default()
    };
    let req =
        gw::CreateSviRequest { svi_id: "svi-a".into(), svi: Some(gw::Svi { spec: Some(svi), ..Default::default() }) };
    let err = svis.create_svi(req).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("VRF"), "{}", err.message());

    assert_eq!(sim.counts(), SimCounts::default());
    assert_eq!(sim.writes(), 0);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn sim_lists_in_stable_pages() {
    let (_sim, h) = start(UP).await;
    let mut lbs = LogicalBridgeServiceClient::new(channel(&h).await);
    for (i, id) in ["lb-e", "lb-b", "lb-d", "lb-a", "lb-c"].into_iter().enumerate() {
        create_lb(&mut lbs, &format!("{id}x"), 10 + i as u32).await;
    }
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    loop {
        let page = lbs
            .list_logical_bridges(gw::ListLogicalBridgesRequest { page_size: 2, page_token: token.clone() })
            .await
            .unwrap()
            .into_inner();
        sizes.push(page.logical_bridges.len());
        seen.extend(page.logical_bridges.into_iter().map(|b| b.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(sizes, [2, 2, 1]);
    let expected: Vec<String> =
        ["lb-a", "lb-b", "lb-c", "lb-d", "lb-e"].iter().map(|id| format!("{NAME_PREFIX}bridges/{id}x")).collect();
    assert_eq!(seen, expected);

    let all = lbs.list_logical_bridges(gw::ListLogicalBridgesRequest::default()).await.unwrap().into_inner();
    assert_eq!(all.logical_bridges.len(), 5);
    assert!(all.next_page_token.is_empty());

    let err = lbs
        .list_logical_bridges(gw::ListLogicalBridgesRequest { page_size: 2, page_token: "garbage".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = lbs
        .list_logical_bridges(gw::ListLogicalBridgesRequest { page_size: -1, page_token: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn sim_update_applies_the_mask() {
    let (sim, h) = start(UP).await;
    let mut lbs = LogicalBridgeServiceClient::new(channel(&h).await);
    let req =
        gw::CreateLogicalBridgeRequest { logical_bridge_id: "bridge-a".into(), logical_bridge: lb_msg(10, Some(5000)) };
    let name = lbs.create_logical_bridge(req).await.unwrap().into_inner().name;
    tokio::time::sleep(UP * 2).await;

    let update = |vlan: u32, vni: Option<u32>, paths: &[&str], allow_missing: bool, name: &str| {
        let mut msg = lb_msg(vlan, vni).unwrap();
        msg.name = name.to_string();
        let update_mask = (!paths.is_empty())
            .then(|| prost_types::FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() });
        gw::UpdateLogicalBridgeRequest { logical_bridge: Some(msg), update_mask, allow_missing }
    };

    // Only vlan_id changes; vni (absent in the request) stays.
    let r = lbs.update_logical_bridge(update(20, None, &["spec.vlan_id"], false, &name)).await.unwrap().into_inner();
    let spec = r.spec.clone().unwrap();
    assert_eq!((spec.vlan_id, spec.vni), (20, Some(5000)));
    assert_eq!(oper(&r.status), gw::LbOperStatus::Down as i32, "a change restarts the asynchronous status");

    // No mask replaces the spec.
    let r = lbs.update_logical_bridge(update(30, None, &[], false, &name)).await.unwrap().into_inner();
    let spec = r.spec.unwrap();
    assert_eq!((spec.vlan_id, spec.vni), (30, None));

    // An update that changes nothing is not a write.
    let writes = sim.writes();
    lbs.update_logical_bridge(update(30, None, &[], false, &name)).await.unwrap();
    assert_eq!(sim.writes(), writes);

    let err = lbs.update_logical_bridge(update(30, None, &["spec.colour"], false, &name)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = lbs.update_logical_bridge(update(5000, None, &["spec.vlan_id"], false, &name)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Missing objects: NOT_FOUND, or created with allow_missing.
    let other = format!("{NAME_PREFIX}bridges/bridge-b");
    let err = lbs.update_logical_bridge(update(40, None, &["spec.vlan_id"], false, &other)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let r = lbs.update_logical_bridge(update(40, None, &["spec.vni"], true, &other)).await.unwrap().into_inner();
    assert_eq!(r.name, other);
    assert_eq!(r.spec.unwrap().vlan_id, 40, "the mask does not apply when creating");
    assert_eq!(sim.counts().logical_bridges, 2);
    h.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// (b) the opi dataplane against the simulator
// ---------------------------------------------------------------------------------------------

fn vrf(name: &str, vni: u32) -> Desired {
    Desired::Vrf {
        name: name.into(),
        spec: pb::VrfSpec {
            vni: Some(vni),
            loopback_ip_prefix: "10.255.0.1/32".into(),
            vtep_ip_prefix: "192.0.2.1/32".into(),
            ..Default::default()
        },
    }
}

fn lb(name: &str, vlan_id: u32, vni: u32) -> Desired {
    Desired::LogicalBridge {
        name: name.into(),
        spec: pb::LogicalBridgeSpec { vlan_id, vni: Some(vni), ..Default::default() },
    }
}

fn svi(name: &str, vrf: &str, lb: &str) -> Desired {
    Desired::Svi {
        name: name.into(),
        spec: pb::SviSpec {
            vrf: vrf.into(),
            logical_bridge: lb.into(),
            mac_address: "02:00:00:00:00:fe".into(),
            gw_ip_prefix: vec!["10.0.0.1/24".into()],
            enable_bgp: true,
            remote_as: 65001,
            ..Default::default()
        },
        vrf: pb::VrfSpec::default(),
        bridge: pb::LogicalBridgeSpec::default(),
    }
}

fn netdev(ns: &str, name: &str, mac: &str, bridges: &[&str]) -> Desired {
    Desired::Netdev {
        namespace: ns.into(),
        name: name.into(),
        spec: pb::NetdevSpec {
            netdev_id: name.into(),
            mac_address: mac.into(),
            port_type: "access".into(),
            logical_bridges: bridges.iter().map(|s| s.to_string()).collect(),
            ipam: Some(pb::NetdevIpam {
                mode: "broker".into(),
                address: "10.0.0.5/24".into(),
                gateway: "10.0.0.1".into(),
            }),
            ..Default::default()
        },
    }
}

fn options() -> OpiOptions {
    OpiOptions {
        poll_interval: Duration::from_millis(10),
        ready_timeout: Duration::from_secs(5),
        ..OpiOptions::default()
    }
}

async fn dataplane(h: &SimHandle, dir: &std::path::Path) -> OpiDataplane {
    // Plain host:port, as the agent's --opi-endpoint gives it.
    OpiDataplane::connect_with(&h.addr.to_string(), dir, options()).await.unwrap()
}

fn assert_up(o: &xpu_infra_sync::dataplane::Observed, what: &str) {
    assert_eq!(o.oper_status, "UP", "{what}: {o:?}");
    assert!(!o.components.is_empty(), "{what}: {o:?}");
    assert!(o.components.iter().all(|c| c.status == "SUCCESS"), "{what}: {o:?}");
}

#[tokio::test]
async fn dp_programs_vrf_bridge_svi_netdev() {
    let (sim, h) = start(UP).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = dataplane(&h, dir.path()).await;
    assert_eq!(dp.name(), "opi");
    assert_eq!(dp.capabilities().get("flow-rules"), Some(&false));

    let objs = [
        vrf("blue", 1000),
        lb("web", 10, 2010),
        svi("web-gw", "blue", "web"),
        netdev("tenant-a", "pod1-net", "aa:bb:cc:00:00:01", &["web"]),
    ];
    for o in &objs {
        let seen = dp.apply(o).await.unwrap();
        assert_up(&seen, &o.key().to_string());
    }
    let port = dp.apply(&objs[3]).await.unwrap();
    assert_eq!(port.port_name, format!("{NAME_PREFIX}ports/xpu-tenant-a-pod1-net"));
    assert_eq!(port.mac, "aa:bb:cc:00:00:01");
    assert_eq!(port.ip, "10.0.0.5/24");
    assert_eq!(sim.counts(), SimCounts { vrfs: 1, logical_bridges: 1, bridge_ports: 1, svis: 1 });

    // What the server holds, as OPI encodes it.
    let ch = channel(&h).await;
    let v = VrfServiceClient::new(ch.clone())
        .get_vrf(gw::GetVrfRequest { name: format!("{NAME_PREFIX}vrfs/xpu-blue") })
        .await
        .unwrap()
        .into_inner();
    let loopback = v.spec.unwrap().loopback_ip_prefix.unwrap();
    assert_eq!(loopback.len, 32);
    assert_eq!(loopback.addr.unwrap().v4_or_v6, Some(V4OrV6::V4Addr(0x0aff_0001)));
    let p = BridgePortServiceClient::new(ch.clone())
        .get_bridge_port(gw::GetBridgePortRequest { name: port.port_name.clone() })
        .await
        .unwrap()
        .into_inner()
        .spec
        .unwrap();
    assert_eq!(p.mac_address, [0xaa, 0xbb, 0xcc, 0, 0, 1]);
    assert_eq!(p.ptype, gw::BridgePortType::Access as i32);
    assert_eq!(p.logical_bridges, [format!("{NAME_PREFIX}bridges/xpu-web")]);
    let s = SviServiceClient::new(ch.clone())
        .get_svi(gw::GetSviRequest { name: format!("{NAME_PREFIX}svis/xpu-web-gw") })
        .await
        .unwrap()
        .into_inner()
        .spec
        .unwrap();
    assert_eq!(s.vrf, format!("{NAME_PREFIX}vrfs/xpu-blue"));
    assert_eq!(s.logical_bridge, format!("{NAME_PREFIX}bridges/xpu-web"));
    assert_eq!((s.enable_bgp, s.remote_as), (true, 65001));

    // The name map is on disk.
    let saved = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
    assert!(saved.contains(&port.port_name), "{saved}");

    // Applying the same again changes nothing on the server: not even a Create or Update is sent.
    let writes = sim.writes();
    let requests = sim.change_requests();
    for o in &objs {
        assert_up(&dp.apply(o).await.unwrap(), "re-apply");
    }
    assert_eq!(sim.writes(), writes, "re-applying must not write");
    assert_eq!(sim.change_requests(), requests, "re-applying must only read");

    // observe reads without writing.
    assert_up(&dp.observe(&objs[3]).await.unwrap(), "observe");
    assert_eq!(sim.change_requests(), requests);

    // A changed spec is updated in place.
    let up = dp.apply(&lb("web", 20, 2010)).await.unwrap();
    assert_up(&up, "updated bridge");
    assert_eq!(sim.writes(), writes + 1);
    let b = LogicalBridgeServiceClient::new(ch.clone())
        .get_logical_bridge(gw::GetLogicalBridgeRequest { name: format!("{NAME_PREFIX}bridges/xpu-web") })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.spec.unwrap().vlan_id, 20);
    let moved = dp.apply(&netdev("tenant-a", "pod1-net", "aa:bb:cc:00:00:09", &["web"])).await.unwrap();
    assert_eq!(moved.mac, "aa:bb:cc:00:00:09");
    assert_eq!(sim.counts().bridge_ports, 1);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn dp_removes_idempotently_and_after_a_restart() {
    let (sim, h) = start(UP).await;
    let dir = tempfile::tempdir().unwrap();
    let objs = [
        vrf("blue", 1000),
        lb("web", 10, 2010),
        svi("web-gw", "blue", "web"),
        netdev("ns1", "nd1", "02:00:00:00:00:01", &["web"]),
    ];
    {
        let dp = dataplane(&h, dir.path()).await;
        for o in &objs {
            dp.apply(o).await.unwrap();
        }
        let mut owned = dp.owned().await.unwrap();
        owned.sort();
        let mut keys: Vec<ObjKey> = objs.iter().map(Desired::key).collect();
        keys.sort();
        assert_eq!(owned, keys);
    }
    // A new instance with the same state directory removes what the first created, in reverse.
    let dp = dataplane(&h, dir.path()).await;
    assert_eq!(dp.opi_name(&objs[3].key()).await.as_deref(), Some("//network.opiproject.org/ports/xpu-ns1-nd1"));
    for o in objs.iter().rev() {
        dp.remove(&o.key(), Some(o)).await.unwrap();
    }
    assert_eq!(sim.counts(), SimCounts::default());
    assert!(dp.owned().await.unwrap().is_empty());
    for o in objs.iter().rev() {
        dp.remove(&o.key(), None).await.unwrap();
    }
    assert!(dp.opi_name(&objs[0].key()).await.is_none());

    // Removed objects can be created again.
    assert_up(&dp.apply(&objs[0]).await.unwrap(), "re-created vrf");
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn dp_finds_its_objects_without_the_name_map() {
    let (sim, h) = start(UP).await;
    let dir = tempfile::tempdir().unwrap();
    {
        let dp = dataplane(&h, dir.path()).await;
        dp.apply(&lb("web", 10, 2010)).await.unwrap();
        dp.apply(&netdev("ns1", "nd1", "02:00:00:00:00:01", &["web"])).await.unwrap();
    }
    // Something that is not ours.
    let mut lbs = LogicalBridgeServiceClient::new(channel(&h).await);
    create_lb(&mut lbs, "foreign-bridge", 99).await;

    std::fs::remove_file(dir.path().join(STATE_FILE)).unwrap();
    let dp = dataplane(&h, dir.path()).await;
    let mut owned = dp.owned().await.unwrap();
    owned.sort();
    assert_eq!(
        owned,
        [ObjKey::new(ObjKind::LogicalBridge, "", "web"), ObjKey::new(ObjKind::Netdev, "", "ns1-nd1")],
        "orphans get keys derived from their ids; foreign objects are not listed"
    );
    // The exact key works too (found by id), and so does the derived one.
    dp.remove(&ObjKey::new(ObjKind::Netdev, "ns1", "nd1"), None).await.unwrap();
    dp.remove(&owned[0], None).await.unwrap();
    assert_eq!(sim.counts().bridge_ports, 0);
    assert_eq!(sim.counts().logical_bridges, 1, "only the foreign bridge is left");
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn dp_refuses_a_duplicate_mac_permanently() {
    let (sim, h) = start(UP).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = dataplane(&h, dir.path()).await;
    dp.apply(&lb("web", 10, 2010)).await.unwrap();
    dp.apply(&netdev("ns1", "nd1", "02:00:00:00:00:01", &["web"])).await.unwrap();
    let err = dp.apply(&netdev("ns1", "nd2", "02:00:00:00:00:01", &["web"])).await.unwrap_err();
    assert!(!err.retryable, "{err:?}");
    assert!(err.message.starts_with("CreateBridgePort: "), "{}", err.message);
    assert!(err.message.contains("02:00:00:00:00:01 is already in use"), "{}", err.message);
    assert_eq!(sim.counts().bridge_ports, 1);

    // A bad MAC in the desired spec is refused before reaching the server.
    let err = dp.apply(&netdev("ns1", "nd3", "not-a-mac", &["web"])).await.unwrap_err();
    assert!(!err.retryable);
    assert!(err.message.contains("mac_address"), "{}", err.message);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn dp_refuses_flow_policies() {
    let (_sim, h) = start(UP).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = dataplane(&h, dir.path()).await;
    let fp = Desired::FlowPolicy {
        namespace: "ns1".into(),
        name: "deny-all".into(),
        spec: pb::FlowPolicySpec::default(),
        targets: Vec::new(),
    };
    let err = dp.apply(&fp).await.unwrap_err();
    assert!(!err.retryable);
    assert!(err.message.contains("no flow rule service"), "{}", err.message);
    assert!(!dp.observe(&fp).await.unwrap_err().retryable);
    dp.remove(&fp.key(), Some(&fp)).await.unwrap();
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn dp_waits_for_references_and_the_server() {
    let (sim, h) = start(UP).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = dataplane(&h, dir.path()).await;

    // An SVI before its VRF: retry later.
    let err = dp.apply(&svi("web-gw", "blue", "web")).await.unwrap_err();
    assert!(err.retryable, "{err:?}");
    assert_eq!(err.message, "vrf blue is not programmed yet");
    let err = dp.apply(&netdev("ns1", "nd1", "02:00:00:00:00:01", &["web"])).await.unwrap_err();
    assert!(err.retryable, "{err:?}");
    assert!(err.message.contains("logical bridge web is not programmed yet"), "{}", err.message);

    // A component that keeps failing: a retryable timeout that says why.
    sim.fail_component("vendor", "no free VLAN on the uplink");
    let quick = OpiOptions { ready_timeout: Duration::from_millis(300), ..options() };
    let dp_quick = OpiDataplane::connect_with(&h.endpoint(), dir.path(), quick).await.unwrap();
    let err = dp_quick.apply(&lb("web", 10, 2010)).await.unwrap_err();
    assert!(err.retryable, "{err:?}");
    assert!(err.message.contains("not UP"), "{}", err.message);
    assert!(err.message.contains("vendor=ERROR (no free VLAN on the uplink)"), "{}", err.message);
    sim.clear_failure();
    assert_up(&dp_quick.apply(&lb("web", 10, 2010)).await.unwrap(), "bridge after the failure cleared");

    // No server: retryable.
    h.shutdown().await.unwrap();
    let err = dp.apply(&lb("web", 10, 2010)).await.unwrap_err();
    assert!(err.retryable, "{err:?}");
    let err = dp.remove(&ObjKey::new(ObjKind::LogicalBridge, "", "web"), None).await.unwrap_err();
    assert!(err.retryable, "{err:?}");
}

#[tokio::test]
async fn dp_ids_are_bounded_and_distinct() {
    let (_sim, h) = start(UP).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = dataplane(&h, dir.path()).await;
    dp.apply(&lb("web", 10, 2010)).await.unwrap();
    let long = "Very.Long_Name-".repeat(6);
    let a = netdev("tenant-with-a-long-namespace", &format!("{long}a"), "02:00:00:00:00:0a", &["web"]);
    let b = netdev("tenant-with-a-long-namespace", &format!("{long}b"), "02:00:00:00:00:0b", &["web"]);
    let pa = dp.apply(&a).await.unwrap().port_name;
    let pb_ = dp.apply(&b).await.unwrap().port_name;
    assert_ne!(pa, pb_);
    for (d, name) in [(&a, &pa), (&b, &pb_)] {
        let id = name.rsplit('/').next().unwrap();
        assert_eq!(id, opi_id(&d.key()));
        assert_eq!(id.len(), 63, "{id}");
        assert!(id.starts_with("xpu-tenant-with-a-long-namespace-very-long-name-"), "{id}");
    }
    h.shutdown().await.unwrap();
}
