//! Syntactic validation of everything a request can carry. Every error names the field (in the
//! JSON/CRD spelling, e.g. `spec.rules[2].dstPorts[0]`) and says what is wrong with it.
//! References between objects are checked by the store, which sees them consistently.

use std::net::IpAddr;

use ipnet::IpNet;
use xpu_proto::broker::v1 as pb;

use super::{Key, Kind, Labels, NetdevId};
use crate::error::{Error, Result};

/// Configurable size caps.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest accepted spec or status, as JSON.
    pub max_object_bytes: usize,
    pub max_labels: usize,
    pub max_list_items: usize,
    pub max_flow_rules: usize,
    pub max_reports_per_call: usize,
    pub max_repeated: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_object_bytes: 64 * 1024,
            max_labels: 64,
            max_list_items: 1000,
            max_flow_rules: 1024,
            max_reports_per_call: 4096,
            max_repeated: 64,
        }
    }
}

/// DNS-1123 label: lowercase alphanumerics and '-', starting and ending alphanumeric, ≤ 63.
pub fn dns_label(value: &str, field: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.len() > 63 {
        return Err(Error::invalid(field, format!("{value:?} is longer than 63 characters")));
    }
    let ok_chars = value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ends_ok =
        value.starts_with(|c: char| c.is_ascii_alphanumeric()) && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok_chars || !ends_ok {
        return Err(Error::invalid(
            field,
            format!(
                "{value:?} is not a DNS-1123 label (lowercase letters, digits and '-', \
                 starting and ending with a letter or digit)"
            ),
        ));
    }
    Ok(())
}

/// DNS-1123 subdomain: dot-separated labels, ≤ 253.
pub fn dns_subdomain(value: &str, field: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.len() > 253 {
        return Err(Error::invalid(field, format!("is longer than 253 characters ({})", value.len())));
    }
    for part in value.split('.') {
        dns_label(part, field).map_err(|_| {
            Error::invalid(
                field,
                format!(
                    "{value:?} is not a DNS-1123 subdomain (lowercase letters, digits, '-' \
                     and '.', each part starting and ending with a letter or digit)"
                ),
            )
        })?;
    }
    Ok(())
}

/// Validates a key's name and namespace against its kind's scope.
pub fn key(key: &Key, field: &str) -> Result<()> {
    let sub = |name: &str| {
        if field.is_empty() { name.to_string() } else { format!("{field}.{name}") }
    };
    dns_subdomain(&key.name, &sub("name"))?;
    if key.kind.namespaced() {
        dns_label(&key.namespace, &sub("namespace"))
    } else if !key.namespace.is_empty() {
        Err(Error::invalid(sub("namespace"), format!("{} is cluster-scoped and takes no namespace", key.kind)))
    } else {
        Ok(())
    }
}

pub fn labels(labels: &Labels, field: &str, limits: &Limits) -> Result<()> {
    if labels.len() > limits.max_labels {
        return Err(Error::invalid(
            field,
            format!("{} labels exceed the limit of {}", labels.len(), limits.max_labels),
        ));
    }
    for (k, v) in labels {
        label_key(k, &format!("{field}[{k:?}]"))?;
        label_value(v, &format!("{field}[{k:?}]"))?;
    }
    Ok(())
}

fn label_key(key: &str, field: &str) -> Result<()> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        dns_subdomain(p, field)?;
    }
    if name.is_empty() || name.len() > 63 || !is_label_text(name) {
        return Err(Error::invalid(
            field,
            format!(
                "label key {key:?} must be an optional DNS prefix and a name of at most 63 \
                     characters [A-Za-z0-9_.-], starting and ending alphanumeric"
            ),
        ));
    }
    Ok(())
}

fn label_value(value: &str, field: &str) -> Result<()> {
    if value.is_empty() {
        return Ok(());
    }
    if value.len() > 63 || !is_label_text(value) {
        return Err(Error::invalid(
            field,
            format!(
                "label value {value:?} must be at most 63 characters [A-Za-z0-9_.-], \
                     starting and ending alphanumeric"
            ),
        ));
    }
    Ok(())
}

fn is_label_text(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with '-'), returning the normalized lowercase form.
pub fn mac(value: &str, field: &str) -> Result<String> {
    let bytes = parse_mac(value)
        .ok_or_else(|| Error::invalid(field, format!("{value:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")))?;
    if bytes[0] & 1 == 1 {
        return Err(Error::invalid(field, format!("{value:?} is a multicast MAC address")));
    }
    if bytes == [0; 6] {
        return Err(Error::invalid(field, "the all-zero MAC address is not usable"));
    }
    Ok(format_mac(bytes))
}

pub fn parse_mac(value: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = value.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut out = [0u8; 6];
    for (slot, part) in out.iter_mut().zip(parts) {
        // Hex digits only: `from_str_radix` alone would take a sign ("+a").
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *slot = u8::from_str_radix(part, 16).ok()?;
    }
    Some(out)
}

pub fn format_mac(bytes: [u8; 6]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

pub fn ip(value: &str, field: &str) -> Result<IpAddr> {
    value.parse::<IpAddr>().map_err(|_| Error::invalid(field, format!("{value:?} is not an IP address")))
}

/// An interface address in CIDR notation (host bits allowed, e.g. `10.0.0.5/24`).
pub fn cidr(value: &str, field: &str) -> Result<IpNet> {
    value
        .parse::<IpNet>()
        .map_err(|_| Error::invalid(field, format!("{value:?} is not an address in CIDR notation (e.g. 10.0.0.0/24)")))
}

/// A network prefix: like [`cidr`] but the host bits must be zero.
pub fn prefix(value: &str, field: &str) -> Result<IpNet> {
    let net = cidr(value, field)?;
    if net.trunc() != net {
        return Err(Error::invalid(field, format!("{value:?} has host bits set; did you mean {}?", net.trunc())));
    }
    Ok(net)
}

/// Either an address or a prefix (pool exclusions, flow rule matches).
pub fn address_or_prefix(value: &str, field: &str) -> Result<IpNet> {
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    prefix(value, field)
}

const VLAN_RANGE: std::ops::RangeInclusive<u32> = 1..=4094;
const VNI_RANGE: std::ops::RangeInclusive<u32> = 1..=16_777_215;

fn vni(value: Option<u32>, field: &str) -> Result<()> {
    match value {
        Some(v) if !VNI_RANGE.contains(&v) => Err(Error::invalid(field, format!("{v} is outside 1..16777215"))),
        _ => Ok(()),
    }
}

fn one_of(value: &str, allowed: &[&str], field: &str) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(Error::invalid(field, format!("{value:?} is not one of {}", allowed.join(", "))))
    }
}

fn bounded<T>(items: &[T], max: usize, field: &str) -> Result<()> {
    if items.len() > max {
        return Err(Error::invalid(field, format!("{} items exceed the limit of {max}", items.len())));
    }
    Ok(())
}

fn selector(sel: Option<&pb::LabelSelector>, field: &str, limits: &Limits) -> Result<()> {
    if let Some(sel) = sel {
        let labels: Labels = sel.match_labels.clone().into_iter().collect();
        self::labels(&labels, &format!("{field}.matchLabels"), limits)?;
    }
    Ok(())
}

pub fn netdev_spec(name: &str, spec: &pb::NetdevSpec, limits: &Limits) -> Result<NetdevId> {
    if spec.netdev_id != name {
        return Err(Error::invalid("spec.netdevId", format!("{:?} must equal metadata.name {name:?}", spec.netdev_id)));
    }
    let id = NetdevId::parse(&spec.netdev_id).ok_or_else(|| {
        Error::invalid(
            "spec.netdevId",
            format!("{:?} is not <dpuSerial>-pf<P>-vf<V> or <dpuSerial>-pf<P>-sf<S>", spec.netdev_id),
        )
    })?;
    dns_label(&id.serial, "spec.netdevId")?;
    dns_subdomain(&spec.hostname, "spec.hostname")?;
    if !spec.backend.is_empty() {
        one_of(&spec.backend, &["vf", "sf"], "spec.backend")?;
        if spec.backend != id.backend.as_str() {
            return Err(Error::invalid(
                "spec.backend",
                format!("{:?} contradicts netdevId {:?}", spec.backend, spec.netdev_id),
            ));
        }
    }
    if !spec.mac_address.is_empty() {
        mac(&spec.mac_address, "spec.macAddress")?;
    }
    dns_subdomain(&spec.network, "spec.network")?;
    if !spec.port_type.is_empty() {
        one_of(&spec.port_type, &["access", "trunk"], "spec.portType")?;
    }
    bounded(&spec.logical_bridges, limits.max_repeated, "spec.logicalBridges")?;
    for (i, lb) in spec.logical_bridges.iter().enumerate() {
        dns_subdomain(lb, &format!("spec.logicalBridges[{i}]"))?;
    }
    if let Some(ipam) = &spec.ipam {
        let mode = if ipam.mode.is_empty() { "broker" } else { ipam.mode.as_str() };
        one_of(mode, &["broker", "host"], "spec.ipam.mode")?;
        if mode == "host" {
            if ipam.address.is_empty() {
                return Err(Error::invalid("spec.ipam.address", "is required when spec.ipam.mode is host"));
            }
            cidr(&ipam.address, "spec.ipam.address")?;
        } else if !ipam.address.is_empty() {
            // Allowed only when it repeats what the broker allocated; the store checks that.
            cidr(&ipam.address, "spec.ipam.address")?;
        }
        if !ipam.gateway.is_empty() {
            ip(&ipam.gateway, "spec.ipam.gateway")?;
        }
    }
    if let Some(pod) = &spec.pod_ref {
        if !pod.namespace.is_empty() {
            dns_label(&pod.namespace, "spec.podRef.namespace")?;
        }
        if !pod.name.is_empty() {
            dns_subdomain(&pod.name, "spec.podRef.name")?;
        }
        if pod.uid.len() > 128 {
            return Err(Error::invalid("spec.podRef.uid", "is longer than 128 characters"));
        }
        if !pod.interface.is_empty() && (pod.interface.len() > 15 || pod.interface.contains(['/', ' '])) {
            return Err(Error::invalid(
                "spec.podRef.interface",
                format!("{:?} is not a Linux interface name (≤ 15 characters, no '/' or space)", pod.interface),
            ));
        }
    }
    if spec.mtu != 0 && !(68..=65535).contains(&spec.mtu) {
        return Err(Error::invalid("spec.mtu", format!("{} is outside 68..65535", spec.mtu)));
    }
    Ok(id)
}

pub fn logical_bridge_spec(spec: &pb::LogicalBridgeSpec, limits: &Limits) -> Result<()> {
    if !VLAN_RANGE.contains(&spec.vlan_id) {
        return Err(Error::invalid("spec.vlanId", format!("{} is outside 1..4094", spec.vlan_id)));
    }
    vni(spec.vni, "spec.vni")?;
    if !spec.vtep_ip_prefix.is_empty() {
        cidr(&spec.vtep_ip_prefix, "spec.vtepIpPrefix")?;
    }
    selector(spec.dpu_selector.as_ref(), "spec.dpuSelector", limits)
}

pub fn vrf_spec(spec: &pb::VrfSpec, limits: &Limits) -> Result<()> {
    vni(spec.vni, "spec.vni")?;
    if spec.loopback_ip_prefix.is_empty() {
        return Err(Error::invalid("spec.loopbackIpPrefix", "is required"));
    }
    cidr(&spec.loopback_ip_prefix, "spec.loopbackIpPrefix")?;
    if !spec.vtep_ip_prefix.is_empty() {
        cidr(&spec.vtep_ip_prefix, "spec.vtepIpPrefix")?;
    }
    // 253..255 are the kernel's default, main and local tables.
    if spec.routing_table != 0 && (253..=255).contains(&spec.routing_table) {
        return Err(Error::invalid(
            "spec.routingTable",
            format!("{} is a reserved kernel table (253 default, 254 main, 255 local)", spec.routing_table),
        ));
    }
    selector(spec.dpu_selector.as_ref(), "spec.dpuSelector", limits)
}

pub fn svi_spec(spec: &pb::SviSpec, limits: &Limits) -> Result<()> {
    dns_subdomain(&spec.vrf, "spec.vrf")?;
    dns_subdomain(&spec.logical_bridge, "spec.logicalBridge")?;
    if !spec.mac_address.is_empty() {
        mac(&spec.mac_address, "spec.macAddress")?;
    }
    if spec.gw_ip_prefix.is_empty() {
        return Err(Error::invalid("spec.gwIpPrefix", "needs at least one gateway address"));
    }
    bounded(&spec.gw_ip_prefix, limits.max_repeated, "spec.gwIpPrefix")?;
    for (i, gw) in spec.gw_ip_prefix.iter().enumerate() {
        cidr(gw, &format!("spec.gwIpPrefix[{i}]"))?;
    }
    if spec.enable_bgp && spec.remote_as == 0 {
        return Err(Error::invalid("spec.remoteAs", "is required when spec.enableBgp is true"));
    }
    selector(spec.dpu_selector.as_ref(), "spec.dpuSelector", limits)
}

pub fn xpu_network_spec(spec: &pb::XpuNetworkSpec, limits: &Limits) -> Result<()> {
    bounded(&spec.logical_bridges, limits.max_repeated, "spec.logicalBridges")?;
    for (i, lb) in spec.logical_bridges.iter().enumerate() {
        dns_subdomain(lb, &format!("spec.logicalBridges[{i}]"))?;
    }
    if !spec.vrf.is_empty() {
        dns_subdomain(&spec.vrf, "spec.vrf")?;
    }
    if !spec.port_type.is_empty() {
        one_of(&spec.port_type, &["access", "trunk"], "spec.portType")?;
    }
    if spec.port_type != "trunk" && spec.logical_bridges.len() > 1 {
        return Err(Error::invalid("spec.logicalBridges", "an access network has at most one logical bridge"));
    }
    if let Some(pool) = &spec.ipam {
        super::ipam::Pool::from_spec(pool)?;
    }
    if spec.mtu != 0 && !(68..=65535).contains(&spec.mtu) {
        return Err(Error::invalid("spec.mtu", format!("{} is outside 68..65535", spec.mtu)));
    }
    bounded(&spec.routes, limits.max_repeated, "spec.routes")?;
    for (i, r) in spec.routes.iter().enumerate() {
        address_or_prefix(&r.dst, &format!("spec.routes[{i}].dst"))?;
        if !r.gw.is_empty() {
            ip(&r.gw, &format!("spec.routes[{i}].gw"))?;
        }
    }
    Ok(())
}

pub fn flow_policy_spec(spec: &pb::FlowPolicySpec, limits: &Limits) -> Result<()> {
    selector(spec.netdev_selector.as_ref(), "spec.netdevSelector", limits)?;
    selector(spec.dpu_selector.as_ref(), "spec.dpuSelector", limits)?;
    bounded(&spec.rules, limits.max_flow_rules, "spec.rules")?;
    let mut names = std::collections::HashSet::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let f = format!("spec.rules[{i}]");
        dns_label(&rule.name, &format!("{f}.name"))?;
        if !names.insert(rule.name.as_str()) {
            return Err(Error::invalid(format!("{f}.name"), format!("duplicate rule name {:?}", rule.name)));
        }
        if rule.priority > 65534 {
            return Err(Error::invalid(format!("{f}.priority"), format!("{} is outside 0..65534", rule.priority)));
        }
        one_of(&rule.action, &["allow", "deny"], &format!("{f}.action"))?;
        let protocol = if rule.protocol.is_empty() { "any" } else { rule.protocol.as_str() };
        one_of(protocol, &["any", "tcp", "udp", "icmp", "icmpv6"], &format!("{f}.protocol"))?;
        let src = (!rule.src_prefix.is_empty())
            .then(|| address_or_prefix(&rule.src_prefix, &format!("{f}.srcPrefix")))
            .transpose()?;
        let dst = (!rule.dst_prefix.is_empty())
            .then(|| address_or_prefix(&rule.dst_prefix, &format!("{f}.dstPrefix")))
            .transpose()?;
        if let (Some(s), Some(d)) = (src, dst)
            && s.addr().is_ipv4() != d.addr().is_ipv4()
        {
            return Err(Error::invalid(format!("{f}.dstPrefix"), "mixes IPv4 and IPv6 with srcPrefix"));
        }
        bounded(&rule.dst_ports, limits.max_repeated, &format!("{f}.dstPorts"))?;
        if !rule.dst_ports.is_empty() && !matches!(protocol, "tcp" | "udp") {
            return Err(Error::invalid(format!("{f}.dstPorts"), "ports need protocol tcp or udp"));
        }
        for (j, p) in rule.dst_ports.iter().enumerate() {
            let to = if p.to == 0 { p.from } else { p.to };
            if p.from == 0 || p.from > 65535 || to > 65535 || to < p.from {
                return Err(Error::invalid(
                    format!("{f}.dstPorts[{j}]"),
                    format!("{}..{} is not a port range within 1..65535", p.from, p.to),
                ));
            }
        }
    }
    Ok(())
}

/// Free text the store must keep: no NUL character (Postgres text and jsonb cannot hold one).
pub fn text(value: &str, field: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(Error::invalid(field, "contains a NUL character"));
    }
    Ok(())
}

/// [`text`] for every string of a JSON body (object keys included), naming the first offender
/// by its path, e.g. `spec.podRef.uid`.
pub fn json_text(value: &serde_json::Value, field: &str) -> Result<()> {
    use serde_json::Value;
    match value {
        Value::String(s) => text(s, field),
        Value::Array(items) => items.iter().enumerate().try_for_each(|(i, v)| json_text(v, &format!("{field}[{i}]"))),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            let field = format!("{field}.{k}");
            text(k, &field)?;
            json_text(v, &field)
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

/// Checks a JSON body against the configured size cap.
pub fn size(json_len: usize, field: &str, limits: &Limits) -> Result<()> {
    if json_len > limits.max_object_bytes {
        return Err(Error::invalid(
            field,
            format!("{json_len} bytes exceed the limit of {} bytes", limits.max_object_bytes),
        ));
    }
    Ok(())
}

pub fn netdev_status(status: &pb::NetdevStatus) -> Result<()> {
    one_of(&status.phase, &["Pending", "Connecting", "Connected", "Disconnected", "Error"], "status.phase")?;
    if !status.ip.is_empty() {
        cidr(&status.ip, "status.ip")?;
    }
    if !status.mac_address.is_empty() {
        mac(&status.mac_address, "status.macAddress")?;
    }
    components(&status.components)
}

pub fn object_status(status: &pb::DpuObjectStatus, kind: Kind) -> Result<()> {
    one_of(&status.phase, &["Pending", "Programmed", "Error"], "status.phase")?;
    if kind != Kind::FlowPolicy && !status.rules.is_empty() {
        return Err(Error::invalid("status.rules", "only a FlowPolicy status has rules"));
    }
    for (i, r) in status.rules.iter().enumerate() {
        one_of(&r.offload, &["hardware", "software", "none"], &format!("status.rules[{i}].offload"))?;
    }
    components(&status.components)
}

fn components(components: &[pb::Component]) -> Result<()> {
    for (i, c) in components.iter().enumerate() {
        one_of(&c.status, &["PENDING", "SUCCESS", "ERROR"], &format!("status.components[{i}].status"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn names() {
        assert!(dns_label("a-1", "f").is_ok());
        assert!(dns_subdomain("a.b-c", "f").is_ok());
        for bad in ["", "A", "-a", "a-", "a_b", &"a".repeat(64)] {
            assert_eq!(field_of(dns_label(bad, "metadata.name")), "metadata.name", "{bad}");
        }
        assert!(dns_subdomain("a..b", "f").is_err());
    }

    #[test]
    fn text_without_nul() {
        assert!(text("any ünïcode \u{7f}", "f").is_ok());
        assert_eq!(field_of(text("a\0b", "spec.podRef.uid")), "spec.podRef.uid");
        let body = serde_json::json!({"podRef": {"uid": "x"}, "components": [{"details": "ok"}, {"details": "a\0"}]});
        assert_eq!(field_of(json_text(&body, "status")), "status.components[1].details");
        assert!(json_text(&serde_json::json!({"a": ["b", 1, null]}), "spec").is_ok());
    }

    #[test]
    fn macs_and_addresses() {
        assert_eq!(mac("AA-BB-CC-00-00-01", "m").unwrap(), "aa:bb:cc:00:00:01");
        assert!(mac("01:00:5e:00:00:01", "m").is_err());
        assert!(mac("00:00:00:00:00:00", "m").is_err());
        assert!(mac("zz:bb:cc:00:00:01", "m").is_err());
        assert!(mac("aa:bb:cc:00:00", "m").is_err());
        assert!(mac("+a:bb:cc:00:00:01", "m").is_err(), "a sign is not a hex digit");
        assert!(cidr("10.0.0.5/24", "c").is_ok());
        assert!(prefix("10.0.0.5/24", "c").is_err());
        assert!(prefix("10.0.0.0/24", "c").is_ok());
        assert!(ip("10.0.0.256", "i").is_err());
        assert!(address_or_prefix("fd00::1", "a").is_ok());
    }

    #[test]
    fn labels_follow_kubernetes_rules() {
        let limits = Limits::default();
        let ok: Labels = [("xpu.opi.dev/rack".into(), "r-1".into())].into();
        assert!(labels(&ok, "metadata.labels", &limits).is_ok());
        let bad: Labels = [("rack".into(), "-x".into())].into();
        assert!(field_of(labels(&bad, "metadata.labels", &limits)).starts_with("metadata.labels"));
    }

    #[test]
    fn flow_rules() {
        let limits = Limits::default();
        let rule = |ports: Vec<pb::PortRange>, proto: &str| pb::FlowRule {
            name: "r1".into(),
            action: "deny".into(),
            protocol: proto.into(),
            dst_ports: ports,
            ..Default::default()
        };
        let spec = |rules| pb::FlowPolicySpec { rules, ..Default::default() };
        assert!(flow_policy_spec(&spec(vec![rule(vec![], "icmp")]), &limits).is_ok());
        let r = flow_policy_spec(&spec(vec![rule(vec![pb::PortRange { from: 80, to: 0 }], "icmp")]), &limits);
        assert_eq!(field_of(r), "spec.rules[0].dstPorts");
        let r = flow_policy_spec(&spec(vec![rule(vec![pb::PortRange { from: 90, to: 80 }], "tcp")]), &limits);
        assert_eq!(field_of(r), "spec.rules[0].dstPorts[0]");
        let r = flow_policy_spec(&spec(vec![rule(vec![], "icmp"), rule(vec![], "tcp")]), &limits);
        assert_eq!(field_of(r), "spec.rules[1].name");
    }
}
