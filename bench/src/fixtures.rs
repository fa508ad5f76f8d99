//! Objects the scenarios write, built like the real writers build them.

use std::collections::HashMap;

use xpu_proto::broker::v1 as pb;

/// Label carrying the benchmark's sequence number of a write, so every stream that receives the
/// change can look up when it was sent.
pub const SEQ_LABEL: &str = "bench-seq";
pub const NETWORK: &str = "bench-net";
pub const FABRIC_LB: &str = "lb-fabric";
pub const NAMESPACE: &str = "bench";

pub fn serial(i: usize) -> String {
    format!("dpu-{i:05}")
}

pub fn node(i: usize) -> String {
    format!("node-{i:05}")
}

pub fn netdev_id(serial: &str, vf: usize) -> String {
    format!("{serial}-pf0-vf{vf}")
}

fn meta(name: &str, namespace: &str, labels: HashMap<String, String>) -> Option<pb::ObjectMeta> {
    Some(pb::ObjectMeta { name: name.into(), namespace: namespace.into(), labels, ..Default::default() })
}

/// About `bytes` of label text (labels are the only free-form part of these objects; a label
/// value holds at most 63 characters and an object at most 64 labels).
pub fn payload_labels(bytes: usize) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut left = bytes;
    let mut i = 0;
    while left > 0 && i < 60 {
        let n = left.min(63);
        out.insert(format!("bench-pad-{i:02}"), "x".repeat(n));
        left = left.saturating_sub(n + 12);
        i += 1;
    }
    out
}

pub fn labels(payload: &HashMap<String, String>, seq: Option<u64>) -> HashMap<String, String> {
    let mut l = payload.clone();
    if let Some(s) = seq {
        l.insert(SEQ_LABEL.into(), s.to_string());
    }
    l
}

pub fn seq_of(labels: &HashMap<String, String>) -> Option<u64> {
    labels.get(SEQ_LABEL).and_then(|v| v.parse().ok())
}

pub fn logical_bridge(
    name: &str,
    vlan: u32,
    selector: HashMap<String, String>,
    labels: HashMap<String, String>,
) -> pb::Resource {
    pb::Resource {
        kind: Some(pb::resource::Kind::LogicalBridge(pb::LogicalBridge {
            metadata: meta(name, "", labels),
            spec: Some(pb::LogicalBridgeSpec {
                vlan_id: vlan,
                vni: Some(10_000 + vlan),
                vtep_ip_prefix: String::new(),
                dpu_selector: Some(pb::LabelSelector { match_labels: selector }),
            }),
            status: None,
        })),
    }
}

pub fn network(name: &str, lb: &str, cidr: &str, gateway: &str) -> pb::Resource {
    pb::Resource {
        kind: Some(pb::resource::Kind::XpuNetwork(pb::XpuNetwork {
            metadata: meta(name, "", HashMap::new()),
            spec: Some(pb::XpuNetworkSpec {
                logical_bridges: vec![lb.into()],
                port_type: "access".into(),
                ipam: Some(pb::IpPool { cidr: cidr.into(), gateway: gateway.into(), ..Default::default() }),
                mtu: 1500,
                ..Default::default()
            }),
            status: None,
        })),
    }
}

pub fn netdev_spec(serial: &str, vf: usize, node: &str) -> pb::NetdevSpec {
    pb::NetdevSpec {
        netdev_id: netdev_id(serial, vf),
        hostname: node.into(),
        network: NETWORK.into(),
        pod_ref: Some(pb::PodRef {
            namespace: NAMESPACE.into(),
            name: format!("pod-{serial}-{vf}"),
            uid: String::new(),
            interface: "net1".into(),
        }),
        ..Default::default()
    }
}

pub fn netdev(serial: &str, vf: usize, node: &str, labels: HashMap<String, String>) -> pb::Resource {
    let spec = netdev_spec(serial, vf, node);
    pb::Resource {
        kind: Some(pb::resource::Kind::Netdev(pb::Netdev {
            metadata: meta(&spec.netdev_id, NAMESPACE, labels),
            spec: Some(spec),
            status: None,
        })),
    }
}

pub fn apply(res: pb::Resource) -> pb::ApplyRequest {
    pb::ApplyRequest { object: Some(res), expected_generation: 0 }
}

/// Metadata of any resource.
pub fn meta_of(res: &pb::Resource) -> Option<&pb::ObjectMeta> {
    use pb::resource::Kind as R;
    match res.kind.as_ref()? {
        R::Dpu(o) => o.metadata.as_ref(),
        R::Netdev(o) => o.metadata.as_ref(),
        R::LogicalBridge(o) => o.metadata.as_ref(),
        R::Vrf(o) => o.metadata.as_ref(),
        R::Svi(o) => o.metadata.as_ref(),
        R::XpuNetwork(o) => o.metadata.as_ref(),
        R::FlowPolicy(o) => o.metadata.as_ref(),
    }
}

pub fn netdev_status(phase: &str, ip: &str, mac: &str, details: &str) -> pb::NetdevStatus {
    pb::NetdevStatus {
        phase: phase.into(),
        ip: ip.into(),
        mac_address: mac.into(),
        oper_status: "UP".into(),
        components: vec![pb::Component {
            name: "bridge-port".into(),
            status: "SUCCESS".into(),
            details: details.into(),
        }],
        ..Default::default()
    }
}

pub fn netdev_key(name: &str) -> pb::ObjectKey {
    pb::ObjectKey { kind: pb::Kind::Netdev as i32, namespace: NAMESPACE.into(), name: name.into() }
}
