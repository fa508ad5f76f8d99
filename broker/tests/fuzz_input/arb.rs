//! Generators of valid objects and of text, numbers and addresses of every kind, with oracles
//! for what the validators must accept, written independently of them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;
use xpu_broker::model::{Kind, Labels, NetdevId, object::Spec};
use xpu_proto::broker::v1::{self as pb, resource::Kind as R};

/// Proptest's default case count (256, or `PROPTEST_CASES`) divided by `weight`, at least 1:
/// the env variable scales every property of the suite at once. Failures print the minimal
/// input; no regression file is written into the tree.
pub fn cases(weight: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    c.cases = (c.cases / weight).max(1);
    c.failure_persistence = None;
    c
}

// ---- oracles, written independently of the validators ----

pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

pub fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

pub fn is_label_key(k: &str) -> bool {
    match k.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(k),
    }
}

pub fn is_label_value(v: &str) -> bool {
    v.is_empty() || is_label_name(v)
}

/// A unicast, non-zero MAC of six two-hex-digit groups separated by ':' or '-'.
pub fn is_usable_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 || parts.iter().any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit())) {
        return false;
    }
    let bytes: Vec<u8> = parts.iter().map(|p| u8::from_str_radix(p, 16).unwrap()).collect();
    bytes[0] & 1 == 0 && bytes.iter().any(|b| *b != 0)
}

// ---- text ----

/// Strings of every kind: arbitrary unicode (controls and NUL included), near-misses of the
/// accepted alphabets, empty, and long.
pub fn any_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => ".{0,40}",
        3 => "[a-zA-Z0-9._/ -]{0,70}",
        2 => "[\\x00-\\x7f]{0,30}",
        1 => "[\\u{80}-\\u{10ffff}]{0,10}",
        1 => Just(String::new()),
        1 => (64usize..5000, "[a-z.-]").prop_map(|(n, c)| c.repeat(n)),
    ]
    .boxed()
}

pub fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
}

pub fn subdomain() -> BoxedStrategy<String> {
    prop_oneof![
        4 => label().boxed(),
        2 => prop::collection::vec(label(), 1..4).prop_map(|v| v.join(".")).boxed(),
        // Exactly 253 characters.
        1 => Just(format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61))).boxed(),
    ]
    .boxed()
}

pub fn bad_label() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just("a".repeat(64)),
        "[A-Z][a-z0-9]{0,5}",
        "-[a-z0-9]{0,5}",
        "[a-z0-9]{0,5}-",
        "[a-z]{1,5}[._ /][a-z]{1,5}",
        any_text().prop_filter("not a DNS label", |s| !is_dns_label(s)),
    ]
    .boxed()
}

pub fn bad_subdomain() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just(format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(62))),
        Just("a..b".to_string()),
        "\\.[a-z]{1,5}",
        "[a-z]{1,5}\\.",
        "[a-z]{0,3}[A-Z_é ][a-z]{0,3}",
        any_text().prop_filter("not a DNS subdomain", |s| !is_dns_subdomain(s)),
    ]
    .boxed()
}

pub fn label_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9]([A-Za-z0-9_.-]{0,20}[A-Za-z0-9])?"
}

pub fn label_key() -> BoxedStrategy<String> {
    prop_oneof![
        3 => label_name().boxed(),
        1 => (subdomain(), label_name()).prop_map(|(p, n)| format!("{p}/{n}")).boxed(),
    ]
    .boxed()
}

pub fn labels(max: usize) -> impl Strategy<Value = Labels> {
    prop::collection::btree_map(label_key(), prop_oneof![Just(String::new()), label_name().boxed()], 0..max)
}

pub fn bad_label_key() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just("a/b/c".to_string()),
        Just("k".repeat(64)),
        "-[a-z]{1,5}",
        "[A-Z]{1,3}/[a-z]{1,3}",
        any_text().prop_filter("not a label key", |s| !is_label_key(s)),
    ]
    .boxed()
}

pub fn bad_label_value() -> BoxedStrategy<String> {
    prop_oneof![
        Just("v".repeat(64)),
        "_[a-z]{1,5}",
        any_text().prop_filter("not a label value", |s| !is_label_value(s))
    ]
    .boxed()
}

// ---- addresses ----

pub fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    any::<[u8; 4]>().prop_map(Ipv4Addr::from)
}

pub fn ipv6() -> impl Strategy<Value = Ipv6Addr> {
    any::<[u16; 8]>().prop_map(Ipv6Addr::from)
}

pub fn ip() -> BoxedStrategy<IpAddr> {
    prop_oneof![ipv4().prop_map(IpAddr::V4), ipv6().prop_map(IpAddr::V6)].boxed()
}

/// An interface address in CIDR notation (host bits allowed).
pub fn cidr() -> BoxedStrategy<String> {
    prop_oneof![
        (ipv4(), 0u8..=32).prop_map(|(a, l)| format!("{a}/{l}")),
        (ipv6(), 0u8..=128).prop_map(|(a, l)| format!("{a}/{l}")),
    ]
    .boxed()
}

pub fn not_ip() -> BoxedStrategy<String> {
    prop_oneof![
        Just("10.0.0.256".to_string()),
        Just("1.2.3".to_string()),
        Just("fd00::1::2".to_string()),
        Just("10.0.0.1/24".to_string()),
        any_text().prop_filter("not an IP", |s| s.parse::<IpAddr>().is_err()),
    ]
    .boxed()
}

pub fn not_cidr() -> BoxedStrategy<String> {
    prop_oneof![
        Just("10.0.0.0/33".to_string()),
        Just("10.1.1.1/99".to_string()),
        Just("fd00::/129".to_string()),
        Just("10.0.0.1".to_string()),
        Just("10.0.0.0/".to_string()),
        any_text().prop_filter("not a CIDR", |s| s.parse::<IpNet>().is_err()),
    ]
    .boxed()
}

/// Neither an address nor a prefix (host bits set counts as neither).
pub fn not_addr_or_prefix() -> BoxedStrategy<String> {
    prop_oneof![
        Just("10.0.0.1/8".to_string()),
        Just("fd00::1/64".to_string()),
        not_cidr().prop_filter("not an address", |s| s.parse::<IpAddr>().is_err()),
    ]
    .boxed()
}

pub fn usable_mac() -> impl Strategy<Value = String> {
    (any::<[u8; 6]>(), prop::bool::ANY, prop::bool::ANY)
        .prop_filter("non-zero", |(b, _, _)| b.iter().skip(1).any(|x| *x != 0) || b[0] & 0xfe != 0)
        .prop_map(|(mut b, dash, upper)| {
            b[0] &= 0xfe;
            let s = b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(if dash { "-" } else { ":" });
            if upper { s.to_uppercase() } else { s }
        })
}

pub fn bad_mac() -> BoxedStrategy<String> {
    prop_oneof![
        Just("01:00:5e:00:00:01".to_string()),
        Just("00:00:00:00:00:00".to_string()),
        Just("aa:bb:cc:00:00".to_string()),
        Just("aa:bb:cc:00:00:01:02".to_string()),
        Just("zz:bb:cc:00:00:01".to_string()),
        Just("+a:bb:cc:00:00:01".to_string()),
        Just("aabbcc000001".to_string()),
        any_text().prop_filter("not a usable MAC", |s| !s.is_empty() && !is_usable_mac(s)),
    ]
    .boxed()
}

// ---- valid objects ----

pub fn netdev_id() -> impl Strategy<Value = String> {
    (label(), 0u32..1000, prop::bool::ANY, 0u32..1_000_000)
        .prop_map(|(serial, pf, vf, i)| format!("{serial}-pf{pf}-{}{i}", if vf { "vf" } else { "sf" }))
}

pub fn mk_meta(name: String, namespace: String, labels: Labels) -> pb::ObjectMeta {
    pb::ObjectMeta { name, namespace, labels: labels.into_iter().collect(), ..Default::default() }
}

pub fn selector() -> impl Strategy<Value = Option<pb::LabelSelector>> {
    prop::option::of(labels(4).prop_map(|l| pb::LabelSelector { match_labels: l.into_iter().collect() }))
}

pub fn valid_netdev() -> impl Strategy<Value = (pb::ObjectMeta, Spec)> {
    let ipam = prop::option::of(prop_oneof![
        (prop_oneof![Just(""), Just("broker")], prop_oneof![Just(String::new()), cidr()])
            .prop_map(|(m, a)| { pb::NetdevIpam { mode: m.into(), address: a, gateway: String::new() } }),
        (cidr(), prop::option::of(ip())).prop_map(|(a, g)| pb::NetdevIpam {
            mode: "host".into(),
            address: a,
            gateway: g.map(|g| g.to_string()).unwrap_or_default(),
        }),
    ]);
    let pod = prop::option::of(
        (
            prop_oneof![Just(String::new()), label().boxed()],
            prop_oneof![Just(String::new()), subdomain()],
            // Free text: anything but NUL, which the store cannot keep.
            "[^\\x00]{0,32}",
            "[^/ \\x00]{0,3}",
        )
            .prop_map(|(namespace, name, uid, interface)| pb::PodRef { namespace, name, uid, interface }),
    );
    (
        (netdev_id(), label(), labels(4)),
        (subdomain(), prop::bool::ANY, prop_oneof![Just(String::new()), usable_mac().boxed()], subdomain()),
        (
            prop_oneof![Just(""), Just("access"), Just("trunk")],
            prop::collection::vec(subdomain(), 0..3),
            ipam,
            pod,
            prop_oneof![Just(0u32), 68u32..=65535],
        ),
    )
        .prop_map(|((id, ns, labels), (hostname, say_backend, mac, network), (port_type, lbs, ipam, pod, mtu))| {
            let backend =
                if say_backend { NetdevId::parse(&id).unwrap().backend.as_str().to_string() } else { String::new() };
            let spec = pb::NetdevSpec {
                netdev_id: id.clone(),
                hostname,
                backend,
                mac_address: mac,
                network,
                port_type: port_type.into(),
                logical_bridges: lbs,
                ipam,
                pod_ref: pod,
                mtu,
            };
            (mk_meta(id, ns, labels), Spec::Netdev(spec))
        })
}

pub fn vni() -> impl Strategy<Value = Option<u32>> {
    prop::option::of(1u32..=16_777_215)
}

pub fn valid_lb() -> impl Strategy<Value = pb::LogicalBridgeSpec> {
    (1u32..=4094, vni(), prop_oneof![Just(String::new()), cidr()], selector()).prop_map(|(vlan_id, vni, vtep, sel)| {
        pb::LogicalBridgeSpec { vlan_id, vni, vtep_ip_prefix: vtep, dpu_selector: sel }
    })
}

pub fn valid_vrf() -> impl Strategy<Value = pb::VrfSpec> {
    (vni(), cidr(), prop_oneof![Just(String::new()), cidr()], any::<u32>(), selector())
        .prop_filter("not a reserved table", |(_, _, _, t, _)| !(253..=255).contains(t))
        .prop_map(|(vni, lo, vtep, routing_table, sel)| pb::VrfSpec {
            vni,
            loopback_ip_prefix: lo,
            vtep_ip_prefix: vtep,
            routing_table,
            dpu_selector: sel,
        })
}

pub fn valid_svi() -> impl Strategy<Value = pb::SviSpec> {
    (
        subdomain(),
        subdomain(),
        prop_oneof![Just(String::new()), usable_mac().boxed()],
        prop::collection::vec(cidr(), 1..4),
        prop::bool::ANY,
        1u32..,
        selector(),
    )
        .prop_map(|(vrf, lb, mac, gw, bgp, remote_as, sel)| pb::SviSpec {
            vrf,
            logical_bridge: lb,
            mac_address: mac,
            gw_ip_prefix: gw,
            enable_bgp: bgp,
            remote_as,
            dpu_selector: sel,
        })
}

/// A v4 pool of /8 to /30 with the gateway (when given) inside.
pub fn valid_pool() -> impl Strategy<Value = pb::IpPool> {
    (ipv4(), 8u8..=30, prop::bool::ANY).prop_map(|(a, len, gw)| {
        let net = IpNet::new(IpAddr::V4(a), len).unwrap().trunc();
        let gateway = if gw { net.hosts().next().unwrap().to_string() } else { String::new() };
        pb::IpPool { cidr: net.to_string(), gateway, ..Default::default() }
    })
}

pub fn valid_network() -> impl Strategy<Value = pb::XpuNetworkSpec> {
    (
        prop::bool::ANY,
        prop::collection::vec(subdomain(), 0..4),
        prop_oneof![Just(String::new()), subdomain()],
        prop::option::of(valid_pool()),
        prop_oneof![Just(0u32), 68u32..=65535],
        prop::collection::vec((cidr(), prop::option::of(ip())), 0..3),
    )
        .prop_map(|(trunk, mut lbs, vrf, ipam, mtu, routes)| {
            if !trunk {
                lbs.truncate(1);
            }
            let routes = routes
                .into_iter()
                .map(|(dst, gw)| pb::Route {
                    dst: dst.parse::<IpNet>().unwrap().trunc().to_string(),
                    gw: gw.map(|g| g.to_string()).unwrap_or_default(),
                })
                .collect();
            pb::XpuNetworkSpec {
                logical_bridges: lbs,
                vrf,
                port_type: if trunk { "trunk".into() } else { "access".into() },
                ipam,
                mtu,
                routes,
            }
        })
}

pub fn valid_rule() -> impl Strategy<Value = pb::FlowRule> {
    let ports = prop::collection::vec((1u32..=65535, 0u32..=65535), 0..4).prop_map(|v| {
        v.into_iter()
            .map(
                |(a, b)| {
                    if b == 0 || b >= a { pb::PortRange { from: a, to: b } } else { pb::PortRange { from: b, to: a } }
                },
            )
            .collect::<Vec<_>>()
    });
    (
        label(),
        0u32..=65534,
        prop_oneof![Just("allow"), Just("deny")],
        prop_oneof![Just(""), Just("any"), Just("tcp"), Just("udp"), Just("icmp"), Just("icmpv6")],
        prop::bool::ANY,
        prop::option::of((0u8..=32, any::<[u8; 4]>())),
        prop::option::of((0u8..=32, any::<[u8; 4]>())),
        ports,
    )
        .prop_map(|(name, priority, action, protocol, v6, src, dst, ports)| {
            let prefix = |p: Option<(u8, [u8; 4])>| {
                p.map(|(len, b)| {
                    let addr = if v6 {
                        IpAddr::V6(Ipv6Addr::from([b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]))
                    } else {
                        IpAddr::V4(Ipv4Addr::from(b))
                    };
                    IpNet::new(addr, len).unwrap().trunc().to_string()
                })
                .unwrap_or_default()
            };
            pb::FlowRule {
                name,
                priority,
                action: action.into(),
                protocol: protocol.into(),
                src_prefix: prefix(src),
                dst_prefix: prefix(dst),
                dst_ports: if matches!(protocol, "tcp" | "udp") { ports } else { vec![] },
            }
        })
}

pub fn valid_flow_policy() -> impl Strategy<Value = pb::FlowPolicySpec> {
    (selector(), selector(), prop::collection::vec(valid_rule(), 0..5)).prop_map(|(nsel, dsel, mut rules)| {
        let mut seen = std::collections::HashSet::new();
        rules.retain(|r| seen.insert(r.name.clone()));
        pb::FlowPolicySpec { netdev_selector: nsel, dpu_selector: dsel, rules }
    })
}

/// A valid object of any kind, as metadata and spec.
pub fn valid_object() -> BoxedStrategy<(pb::ObjectMeta, Spec)> {
    let cluster = |spec: BoxedStrategy<Spec>| {
        (subdomain(), labels(4), spec).prop_map(|(n, l, s)| (mk_meta(n, String::new(), l), s)).boxed()
    };
    prop_oneof![
        2 => valid_netdev().boxed(),
        1 => cluster(label().prop_map(|serial| Spec::Dpu(pb::DpuSpec { serial, ..Default::default() })).boxed()),
        1 => cluster(valid_lb().prop_map(Spec::LogicalBridge).boxed()),
        1 => cluster(valid_vrf().prop_map(Spec::Vrf).boxed()),
        1 => cluster(valid_svi().prop_map(Spec::Svi).boxed()),
        1 => cluster(valid_network().prop_map(Spec::XpuNetwork).boxed()),
        1 => (subdomain(), label(), labels(4), valid_flow_policy())
            .prop_map(|(n, ns, l, s)| (mk_meta(n, ns, l), Spec::FlowPolicy(s))),
    ]
    .boxed()
}

pub fn resource(meta: Option<pb::ObjectMeta>, spec: Option<Spec>, kind: Kind) -> pb::Resource {
    macro_rules! wrap {
        ($variant:ident, $ty:ident) => {{
            let spec = spec.map(|s| match s {
                Spec::$variant(s) => s,
                other => panic!("{other:?} is not a {}", stringify!($variant)),
            });
            R::$variant(pb::$ty { metadata: meta, spec, status: None })
        }};
    }
    let kind = match kind {
        Kind::Dpu => wrap!(Dpu, Dpu),
        Kind::Netdev => wrap!(Netdev, Netdev),
        Kind::LogicalBridge => wrap!(LogicalBridge, LogicalBridge),
        Kind::Vrf => wrap!(Vrf, Vrf),
        Kind::Svi => wrap!(Svi, Svi),
        Kind::XpuNetwork => wrap!(XpuNetwork, XpuNetwork),
        Kind::FlowPolicy => wrap!(FlowPolicy, FlowPolicy),
    };
    pb::Resource { kind: Some(kind) }
}
