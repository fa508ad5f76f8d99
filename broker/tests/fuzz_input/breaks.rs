//! Invalid classes: one breakage of a valid object each, with the field its refusal must name.

use std::fmt::Debug;

use proptest::prelude::*;
use serde_json::Value;
use xpu_broker::{
    error::Error,
    model::{Backend, Kind, NetdevId, object::Spec},
};
use xpu_proto::broker::v1 as pb;

use crate::arb::*;

// ---- invalid classes ----

/// One way to make a valid object invalid, and the field the refusal must name.
#[derive(Clone, Debug)]
pub enum Break {
    NoObject,
    NoMetadata,
    NoSpec,
    Name(String),
    Namespace(String),
    LabelKey(String),
    LabelValue(String, String),
    TooManyLabels(usize),
    /// A string field of the spec set to a value it must not take, by JSON field path.
    Text(&'static str, String),
    /// A number field set out of range.
    Number(&'static str, u32),
    /// A list field with an invalid element at a position, or too many elements.
    Element(&'static str, usize, String),
    TooMany(&'static str, usize),
    /// A `dpuSelector`/`netdevSelector` with a bad key.
    SelectorKey(&'static str, String),
    /// Breakages that need more than one field.
    Special(Special),
}

#[derive(Clone, Debug)]
pub enum Special {
    NetdevIdDiffers(String),
    BackendContradicts,
    HostIpamWithoutAddress,
    AccessWithTwoBridges,
    BgpWithoutRemoteAs,
    GatewayOutsidePool,
    EmptyRange,
    ExcludeOtherFamily,
    DuplicateRuleName,
    MixedFamilies,
    PortsWithoutTcpOrUdp,
    BadPortRange(u32, u32),
    SpecTooLarge,
    TooManyRules,
}

pub fn meta_breaks(kind: Kind) -> BoxedStrategy<Break> {
    let namespace = if kind.namespaced() { bad_label() } else { label().boxed() };
    prop_oneof![
        Just(Break::NoObject),
        Just(Break::NoMetadata),
        Just(Break::NoSpec),
        // A netdev's name must also equal its id, which is checked after the key.
        bad_subdomain().prop_map(Break::Name),
        namespace.prop_map(Break::Namespace),
        bad_label_key().prop_map(Break::LabelKey),
        (label_key(), bad_label_value()).prop_map(|(k, v)| Break::LabelValue(k, v)),
        (65usize..100).prop_map(Break::TooManyLabels),
    ]
    .boxed()
}

pub fn text(field: &'static str, s: BoxedStrategy<String>) -> BoxedStrategy<Break> {
    s.prop_map(move |v| Break::Text(field, v)).boxed()
}

pub fn element(field: &'static str, s: BoxedStrategy<String>) -> BoxedStrategy<Break> {
    (0usize..3, s).prop_map(move |(i, v)| Break::Element(field, i, v)).boxed()
}

pub fn not_one_of(allowed: &'static [&'static str]) -> BoxedStrategy<String> {
    any_text().prop_filter("not allowed", move |s| !s.is_empty() && !allowed.contains(&s.as_str())).boxed()
}

pub fn spec_breaks(kind: Kind) -> BoxedStrategy<Break> {
    let sp = |s: Special| Just(Break::Special(s)).boxed();
    let sel = |f: &'static str| bad_label_key().prop_map(move |k| Break::SelectorKey(f, k)).boxed();
    let bad_mtu = prop_oneof![1u32..68, 65536u32..].prop_map(|m| Break::Number("spec.mtu", m)).boxed();
    let bad_vni = prop_oneof![Just(0u32), 16_777_216u32..].prop_map(|v| Break::Number("spec.vni", v)).boxed();
    let variants: Vec<BoxedStrategy<Break>> = match kind {
        Kind::Dpu => vec![text("spec.serial", bad_label())],
        Kind::Netdev => vec![
            netdev_id().prop_map(|id| Break::Special(Special::NetdevIdDiffers(id))).boxed(),
            text(
                "spec.netdevId",
                prop_oneof![
                    Just("pf0-vf1".to_string()),
                    Just("a-pf0-vf01".to_string()),
                    Just("a-pf0-xf1".to_string()),
                    Just("a-vf1".to_string()),
                    Just("a-pf0-vf1234567".to_string()),
                    Just("a.b-pf0-vf1".to_string()),
                    Just("a-pf-vf1".to_string()),
                ]
                .boxed(),
            ),
            text("spec.hostname", bad_subdomain()),
            text("spec.backend", not_one_of(&["vf", "sf"])),
            sp(Special::BackendContradicts),
            text("spec.macAddress", bad_mac()),
            text("spec.network", bad_subdomain()),
            text("spec.portType", not_one_of(&["access", "trunk"])),
            element("spec.logicalBridges", bad_subdomain()),
            (65usize..80).prop_map(|n| Break::TooMany("spec.logicalBridges", n)).boxed(),
            text("spec.ipam.mode", not_one_of(&["broker", "host"])),
            sp(Special::HostIpamWithoutAddress),
            text("spec.ipam.address", not_cidr().prop_filter("non-empty", |s| !s.is_empty()).boxed()),
            text("spec.ipam.gateway", not_ip().prop_filter("non-empty", |s| !s.is_empty()).boxed()),
            text("spec.podRef.namespace", bad_label().prop_filter("non-empty", |s| !s.is_empty()).boxed()),
            text("spec.podRef.name", bad_subdomain().prop_filter("non-empty", |s| !s.is_empty()).boxed()),
            text("spec.podRef.uid", prop_oneof!["[a-z]{129,300}", "[a-z]{0,5}\\x00.{0,5}"].boxed()),
            text("spec.podRef.interface", prop_oneof!["[a-z]{16,40}", "[a-z]{0,5}[/ \\x00][a-z]{0,5}"].boxed()),
            bad_mtu,
        ],
        Kind::LogicalBridge => vec![
            prop_oneof![Just(0u32), 4095u32..].prop_map(|v| Break::Number("spec.vlanId", v)).boxed(),
            bad_vni,
            text("spec.vtepIpPrefix", not_cidr().prop_filter("non-empty", |s| !s.is_empty()).boxed()),
            sel("spec.dpuSelector"),
        ],
        Kind::Vrf => vec![
            bad_vni,
            text("spec.loopbackIpPrefix", not_cidr()),
            text("spec.vtepIpPrefix", not_cidr().prop_filter("non-empty", |s| !s.is_empty()).boxed()),
            (253u32..=255).prop_map(|t| Break::Number("spec.routingTable", t)).boxed(),
            sel("spec.dpuSelector"),
        ],
        Kind::Svi => vec![
            text("spec.vrf", bad_subdomain()),
            text("spec.logicalBridge", bad_subdomain()),
            text("spec.macAddress", bad_mac()),
            Just(Break::TooMany("spec.gwIpPrefix", 0)).boxed(),
            (65usize..80).prop_map(|n| Break::TooMany("spec.gwIpPrefix", n)).boxed(),
            element("spec.gwIpPrefix", not_cidr()),
            sp(Special::BgpWithoutRemoteAs),
            sel("spec.dpuSelector"),
        ],
        Kind::XpuNetwork => vec![
            element("spec.logicalBridges", bad_subdomain()),
            (65usize..80).prop_map(|n| Break::TooMany("spec.logicalBridges", n)).boxed(),
            text("spec.vrf", bad_subdomain().prop_filter("non-empty", |s| !s.is_empty()).boxed()),
            text("spec.portType", not_one_of(&["access", "trunk"])),
            sp(Special::AccessWithTwoBridges),
            text(
                "spec.ipam.cidr",
                prop_oneof![not_cidr(), Just("10.0.0.1/24".to_string()), Just("fd00::/63".to_string())].boxed(),
            ),
            text("spec.ipam.gateway", not_ip().prop_filter("non-empty", |s| !s.is_empty()).boxed()),
            sp(Special::GatewayOutsidePool),
            text(
                "spec.ipam.rangeStart",
                prop_oneof![not_ip(), Just("fd00::1".to_string())].prop_filter("non-empty", |s| !s.is_empty()).boxed(),
            ),
            text(
                "spec.ipam.rangeEnd",
                prop_oneof![not_ip(), Just("0.0.0.0".to_string())].prop_filter("non-empty", |s| !s.is_empty()).boxed(),
            ),
            sp(Special::EmptyRange),
            element("spec.ipam.exclude", not_addr_or_prefix()),
            sp(Special::ExcludeOtherFamily),
            bad_mtu,
            element("spec.routes.dst", not_addr_or_prefix()),
            element("spec.routes.gw", not_ip().prop_filter("non-empty", |s| !s.is_empty()).boxed()),
            (65usize..80).prop_map(|n| Break::TooMany("spec.routes", n)).boxed(),
        ],
        Kind::FlowPolicy => vec![
            sel("spec.netdevSelector"),
            sel("spec.dpuSelector"),
            element("spec.rules.name", bad_label()),
            sp(Special::DuplicateRuleName),
            element("spec.rules.action", not_one_of(&["allow", "deny"])),
            element("spec.rules.protocol", not_one_of(&["any", "tcp", "udp", "icmp", "icmpv6"])),
            element("spec.rules.srcPrefix", not_addr_or_prefix().prop_filter("non-empty", |s| !s.is_empty()).boxed()),
            element("spec.rules.dstPrefix", not_addr_or_prefix().prop_filter("non-empty", |s| !s.is_empty()).boxed()),
            (0usize..3, 65535u32..).prop_map(|(i, p)| Break::Element("spec.rules.priority", i, p.to_string())).boxed(),
            sp(Special::MixedFamilies),
            sp(Special::PortsWithoutTcpOrUdp),
            (0u32..70000, 0u32..70000)
                .prop_filter("a bad range", |(f, t)| {
                    let to = if *t == 0 { *f } else { *t };
                    *f == 0 || *f > 65535 || to > 65535 || to < *f
                })
                .prop_map(|(f, t)| Break::Special(Special::BadPortRange(f, t)))
                .boxed(),
            sp(Special::TooManyRules),
            sp(Special::SpecTooLarge),
        ],
    };
    prop::strategy::Union::new(variants).boxed()
}

#[derive(Clone, Debug)]
pub struct Case {
    pub field: String,
    pub res: pb::Resource,
}

pub fn ensure_len<T: Clone>(v: &mut Vec<T>, n: usize, fill: T) -> usize {
    while v.len() < n {
        v.push(fill.clone());
    }
    n - 1
}

/// Applies a breakage to a valid object; returns the field the refusal must name.
pub fn apply(meta: pb::ObjectMeta, spec: Spec, brk: &Break) -> Case {
    let kind = spec.kind();
    let (mut meta, mut spec) = (Some(meta), Some(spec));
    let m = meta.as_mut().unwrap();
    let field: String = match brk {
        Break::NoObject => return Case { field: "object".into(), res: pb::Resource { kind: None } },
        Break::NoMetadata => {
            meta = None;
            "metadata".into()
        }
        Break::NoSpec => {
            spec = None;
            "spec".into()
        }
        Break::Name(n) => {
            m.name = n.clone();
            "metadata.name".into()
        }
        Break::Namespace(ns) => {
            m.namespace = ns.clone();
            "metadata.namespace".into()
        }
        Break::LabelKey(k) => {
            // Sorted first so that it is the label the refusal names.
            m.labels.retain(|other, _| other > k);
            m.labels.insert(k.clone(), "v".into());
            format!("metadata.labels[{k:?}]")
        }
        Break::LabelValue(k, v) => {
            m.labels.retain(|other, _| other > k);
            m.labels.insert(k.clone(), v.clone());
            format!("metadata.labels[{k:?}]")
        }
        Break::TooManyLabels(n) => {
            m.labels = (0..*n).map(|i| (format!("k{i}"), "v".to_string())).collect();
            "metadata.labels".into()
        }
        other => break_spec(spec.as_mut().unwrap(), other),
    };
    Case { field, res: resource(meta, spec, kind) }
}

pub fn sel_with(sel: &mut Option<pb::LabelSelector>, key: &str) -> String {
    let s = sel.get_or_insert_with(Default::default);
    s.match_labels.retain(|k, _| k.as_str() > key);
    s.match_labels.insert(key.to_string(), "v".into());
    format!("matchLabels[{key:?}]")
}

pub fn break_spec(spec: &mut Spec, brk: &Break) -> String {
    use Special as S;
    let set = |slot: &mut String, v: &str, f: &str| {
        *slot = v.to_string();
        f.to_string()
    };
    match (spec, brk) {
        (Spec::Dpu(s), Break::Text(f, v)) => set(&mut s.serial, v, f),
        (Spec::Netdev(s), Break::Special(S::NetdevIdDiffers(id))) => {
            if *id == s.netdev_id {
                s.netdev_id.push('0');
            } else {
                s.netdev_id = id.clone();
            }
            "spec.netdevId".into()
        }
        (Spec::Netdev(s), Break::Text(f, v)) => {
            let slot = match *f {
                "spec.netdevId" => {
                    // Equal to the name so that only the id's form is wrong: the name stays valid.
                    s.netdev_id = v.clone();
                    return f.to_string();
                }
                "spec.hostname" => &mut s.hostname,
                "spec.backend" => &mut s.backend,
                "spec.macAddress" => &mut s.mac_address,
                "spec.network" => &mut s.network,
                "spec.portType" => &mut s.port_type,
                "spec.ipam.mode" => &mut s.ipam.get_or_insert_with(Default::default).mode,
                "spec.ipam.address" => &mut s.ipam.get_or_insert_with(Default::default).address,
                "spec.ipam.gateway" => &mut s.ipam.get_or_insert_with(Default::default).gateway,
                "spec.podRef.namespace" => &mut s.pod_ref.get_or_insert_with(Default::default).namespace,
                "spec.podRef.name" => &mut s.pod_ref.get_or_insert_with(Default::default).name,
                "spec.podRef.uid" => &mut s.pod_ref.get_or_insert_with(Default::default).uid,
                "spec.podRef.interface" => &mut s.pod_ref.get_or_insert_with(Default::default).interface,
                other => panic!("no netdev text field {other}"),
            };
            set(slot, v, f)
        }
        (Spec::Netdev(s), Break::Special(S::BackendContradicts)) => {
            let backend = NetdevId::parse(&s.netdev_id).unwrap().backend;
            s.backend = if backend == Backend::Vf { "sf".into() } else { "vf".into() };
            "spec.backend".into()
        }
        (Spec::Netdev(s), Break::Special(S::HostIpamWithoutAddress)) => {
            s.ipam = Some(pb::NetdevIpam { mode: "host".into(), ..Default::default() });
            "spec.ipam.address".into()
        }
        (Spec::Netdev(s), Break::Element(f, i, v)) => {
            let i = ensure_len(&mut s.logical_bridges, i + 1, "lb".into());
            s.logical_bridges[i] = v.clone();
            format!("{f}[{i}]")
        }
        (Spec::Netdev(s), Break::TooMany(f, n)) => {
            s.logical_bridges = vec!["lb".into(); *n];
            f.to_string()
        }
        (Spec::Netdev(s), Break::Number(f, v)) => {
            s.mtu = *v;
            f.to_string()
        }
        (Spec::LogicalBridge(s), Break::Number(f, v)) => {
            match *f {
                "spec.vlanId" => s.vlan_id = *v,
                _ => s.vni = Some(*v),
            }
            f.to_string()
        }
        (Spec::LogicalBridge(s), Break::Text(f, v)) => set(&mut s.vtep_ip_prefix, v, f),
        (Spec::LogicalBridge(s), Break::SelectorKey(f, k)) => format!("{f}.{}", sel_with(&mut s.dpu_selector, k)),
        (Spec::Vrf(s), Break::Number(f, v)) => {
            match *f {
                "spec.routingTable" => s.routing_table = *v,
                _ => s.vni = Some(*v),
            }
            f.to_string()
        }
        (Spec::Vrf(s), Break::Text(f, v)) => {
            let slot = if *f == "spec.loopbackIpPrefix" { &mut s.loopback_ip_prefix } else { &mut s.vtep_ip_prefix };
            set(slot, v, f)
        }
        (Spec::Vrf(s), Break::SelectorKey(f, k)) => format!("{f}.{}", sel_with(&mut s.dpu_selector, k)),
        (Spec::Svi(s), Break::Text(f, v)) => {
            let slot = match *f {
                "spec.vrf" => &mut s.vrf,
                "spec.logicalBridge" => &mut s.logical_bridge,
                _ => &mut s.mac_address,
            };
            set(slot, v, f)
        }
        (Spec::Svi(s), Break::TooMany(f, n)) => {
            s.gw_ip_prefix = vec!["10.0.0.1/24".into(); *n];
            f.to_string()
        }
        (Spec::Svi(s), Break::Element(f, i, v)) => {
            let i = ensure_len(&mut s.gw_ip_prefix, i + 1, "10.0.0.1/24".into());
            s.gw_ip_prefix[i] = v.clone();
            format!("{f}[{i}]")
        }
        (Spec::Svi(s), Break::Special(S::BgpWithoutRemoteAs)) => {
            s.enable_bgp = true;
            s.remote_as = 0;
            "spec.remoteAs".into()
        }
        (Spec::Svi(s), Break::SelectorKey(f, k)) => format!("{f}.{}", sel_with(&mut s.dpu_selector, k)),
        (Spec::XpuNetwork(s), brk) => break_network(s, brk),
        (Spec::FlowPolicy(s), brk) => break_flow_policy(s, brk),
        (spec, brk) => panic!("{brk:?} does not apply to {:?}", spec.kind()),
    }
}

pub fn break_network(s: &mut pb::XpuNetworkSpec, brk: &Break) -> String {
    use Special as S;
    let pool = |s: &mut pb::XpuNetworkSpec| {
        s.ipam.get_or_insert_with(|| pb::IpPool { cidr: "10.0.0.0/24".into(), ..Default::default() }).clone()
    };
    match brk {
        Break::Element("spec.logicalBridges", i, v) => {
            s.port_type = "trunk".into();
            let i = ensure_len(&mut s.logical_bridges, i + 1, "lb".into());
            s.logical_bridges[i] = v.clone();
            format!("spec.logicalBridges[{i}]")
        }
        Break::TooMany("spec.logicalBridges", n) => {
            s.port_type = "trunk".into();
            s.logical_bridges = vec!["lb".into(); *n];
            "spec.logicalBridges".into()
        }
        Break::TooMany(f, n) => {
            s.routes = vec![pb::Route { dst: "10.0.0.0/8".into(), gw: String::new() }; *n];
            f.to_string()
        }
        Break::Text("spec.vrf", v) => {
            s.vrf = v.clone();
            "spec.vrf".into()
        }
        Break::Text("spec.portType", v) => {
            s.port_type = v.clone();
            "spec.portType".into()
        }
        Break::Special(S::AccessWithTwoBridges) => {
            s.port_type = if s.port_type.is_empty() { String::new() } else { "access".into() };
            s.logical_bridges = vec!["a".into(), "b".into()];
            "spec.logicalBridges".into()
        }
        Break::Text(f, v) => {
            let mut p = pool(s);
            match *f {
                "spec.ipam.cidr" => p.cidr = v.clone(),
                "spec.ipam.gateway" => p.gateway = v.clone(),
                "spec.ipam.rangeStart" => p.range_start = v.clone(),
                _ => p.range_end = v.clone(),
            }
            s.ipam = Some(p);
            f.to_string()
        }
        Break::Special(S::GatewayOutsidePool) => {
            s.ipam = Some(pb::IpPool { cidr: "10.0.0.0/24".into(), gateway: "10.0.1.1".into(), ..Default::default() });
            "spec.ipam.gateway".into()
        }
        Break::Special(S::EmptyRange) => {
            s.ipam = Some(pb::IpPool {
                cidr: "10.0.0.0/24".into(),
                range_start: "10.0.0.9".into(),
                range_end: "10.0.0.8".into(),
                ..Default::default()
            });
            "spec.ipam.rangeEnd".into()
        }
        Break::Special(S::ExcludeOtherFamily) => {
            s.ipam = Some(pb::IpPool {
                cidr: "10.0.0.0/24".into(),
                exclude: vec!["fd00::/64".into()],
                ..Default::default()
            });
            "spec.ipam.exclude[0]".into()
        }
        Break::Element("spec.ipam.exclude", i, v) => {
            let mut p = pool(s);
            let i = ensure_len(&mut p.exclude, i + 1, p.cidr.split('/').next().unwrap().to_string());
            p.exclude[i] = v.clone();
            s.ipam = Some(p);
            format!("spec.ipam.exclude[{i}]")
        }
        Break::Element(f, i, v) => {
            let i = ensure_len(&mut s.routes, i + 1, pb::Route { dst: "10.0.0.0/8".into(), gw: String::new() });
            if *f == "spec.routes.dst" {
                s.routes[i].dst = v.clone();
                format!("spec.routes[{i}].dst")
            } else {
                s.routes[i].gw = v.clone();
                format!("spec.routes[{i}].gw")
            }
        }
        Break::Number(f, v) => {
            s.mtu = *v;
            f.to_string()
        }
        other => panic!("{other:?} does not apply to XpuNetwork"),
    }
}

pub fn break_flow_policy(s: &mut pb::FlowPolicySpec, brk: &Break) -> String {
    use Special as S;
    let rule = |name: String| pb::FlowRule { name, action: "allow".into(), ..Default::default() };
    // Rules are renamed r0, r1, … so that a breakage never meets a duplicate name by chance.
    for (i, r) in s.rules.iter_mut().enumerate() {
        r.name = format!("r{i}");
    }
    let nth = |s: &mut pb::FlowPolicySpec, i: usize| -> usize {
        while s.rules.len() <= i {
            let n = s.rules.len();
            s.rules.push(rule(format!("r{n}")));
        }
        i
    };
    match brk {
        Break::SelectorKey(f, k) => {
            let sel = if *f == "spec.dpuSelector" { &mut s.dpu_selector } else { &mut s.netdev_selector };
            format!("{f}.{}", sel_with(sel, k))
        }
        Break::Element(f, i, v) => {
            let i = nth(s, *i);
            let r = &mut s.rules[i];
            let name = f.trim_start_matches("spec.rules.");
            match name {
                "name" => r.name = v.clone(),
                "action" => r.action = v.clone(),
                "protocol" => r.protocol = v.clone(),
                "srcPrefix" => r.src_prefix = v.clone(),
                "dstPrefix" => r.dst_prefix = v.clone(),
                _ => r.priority = v.parse().unwrap(),
            }
            format!("spec.rules[{i}].{name}")
        }
        Break::Special(S::DuplicateRuleName) => {
            let i = nth(s, 1);
            s.rules[i].name = "r0".into();
            format!("spec.rules[{i}].name")
        }
        Break::Special(S::MixedFamilies) => {
            let i = nth(s, 0);
            s.rules[i].src_prefix = "10.0.0.0/8".into();
            s.rules[i].dst_prefix = "fd00::1".into();
            format!("spec.rules[{i}].dstPrefix")
        }
        Break::Special(S::PortsWithoutTcpOrUdp) => {
            let i = nth(s, 0);
            s.rules[i].protocol = "icmp".into();
            s.rules[i].dst_ports = vec![pb::PortRange { from: 80, to: 0 }];
            format!("spec.rules[{i}].dstPorts")
        }
        Break::Special(S::BadPortRange(from, to)) => {
            let i = nth(s, 0);
            s.rules[i].protocol = "tcp".into();
            s.rules[i].dst_ports = vec![pb::PortRange { from: 22, to: 0 }, pb::PortRange { from: *from, to: *to }];
            format!("spec.rules[{i}].dstPorts[1]")
        }
        Break::Special(S::TooManyRules) => {
            s.rules = (0..1025).map(|i| rule(format!("r{i}"))).collect();
            "spec.rules".into()
        }
        Break::Special(S::SpecTooLarge) => {
            // 80 rules of 64 port ranges: about 130 KiB of JSON, over the 64 KiB default cap.
            s.rules = (0..80)
                .map(|i| pb::FlowRule {
                    protocol: "tcp".into(),
                    dst_ports: (0..64).map(|p| pb::PortRange { from: 10000 + p, to: 20000 + p }).collect(),
                    ..rule(format!("r{i}"))
                })
                .collect();
            "spec".into()
        }
        other => panic!("{other:?} does not apply to FlowPolicy"),
    }
}

pub fn invalid_case() -> impl Strategy<Value = Case> {
    valid_object().prop_flat_map(|(meta, spec)| {
        let kind = spec.kind();
        prop_oneof![1 => meta_breaks(kind), 3 => spec_breaks(kind)]
            .prop_map(move |brk| apply(meta.clone(), spec.clone(), &brk))
    })
}

/// The field an `InvalidArgument` names (anything else reads as a mismatch).
pub fn named(e: Error) -> String {
    match e {
        Error::InvalidArgument { field, .. } => field,
        other => format!("<not InvalidArgument: {other:?}>"),
    }
}

pub fn field_of<T: Debug>(r: &xpu_broker::Result<T>) -> Option<&str> {
    match r {
        Err(Error::InvalidArgument { field, .. }) => Some(field),
        _ => None,
    }
}

// ---- JSON mutation: arbitrary values in place of a valid spec's leaves ----

pub fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        any_text().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any_text(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// Replaces the `pick`-th node (pre-order) of `v` with `with`.
pub fn replace_nth(v: &mut Value, pick: &mut usize, with: &Value) -> bool {
    if *pick == 0 {
        *v = with.clone();
        return true;
    }
    *pick -= 1;
    match v {
        Value::Array(a) => a.iter_mut().any(|x| replace_nth(x, pick, with)),
        Value::Object(o) => o.values_mut().any(|x| replace_nth(x, pick, with)),
        _ => false,
    }
}
