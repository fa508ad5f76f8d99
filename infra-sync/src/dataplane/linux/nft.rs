//! FlowPolicy rules as nftables: one `netdev` table per policy, one ingress chain per targeted
//! representor, one rule per policy rule (identified by its comment), each with a counter.
//!
//! Semantics: within a policy, rules run in priority order and the first match decides. Each
//! policy is its own base chain, so policies combine conservatively: a packet any policy drops is
//! dropped. The whole table is replaced in one `nft -f` transaction, so a policy never runs half
//! updated. A regular chain named `owner` (never jumped to) carries the policy's identity, which
//! is how the agent finds its tables again after a restart.

use std::collections::BTreeMap;

use serde_json::Value;
use xpu_proto::broker::v1 as pb;

use super::cmd::{nft_json, run, run_stdin};
use crate::dataplane::{DpResult, ObjKey, ObjKind, fnv32};

pub const OWNER_PREFIX: &str = "xpu:FlowPolicy/";

pub fn table_name(namespace: &str, name: &str) -> String {
    format!("xpu_{:08x}", fnv32(&format!("{namespace}/{name}")))
}

fn rule_expr(rule: &pb::FlowRule) -> String {
    let mut parts = Vec::new();
    let family = |p: &str| if p.contains(':') { "ip6" } else { "ip" };
    if !rule.src_prefix.is_empty() {
        parts.push(format!("{} saddr {}", family(&rule.src_prefix), rule.src_prefix));
    }
    if !rule.dst_prefix.is_empty() {
        parts.push(format!("{} daddr {}", family(&rule.dst_prefix), rule.dst_prefix));
    }
    match rule.protocol.as_str() {
        "icmp" => parts.push("meta l4proto icmp".into()),
        "icmpv6" => parts.push("meta l4proto ipv6-icmp".into()),
        p @ ("tcp" | "udp") => {
            parts.push(format!("meta l4proto {p}"));
            if !rule.dst_ports.is_empty() {
                let ports: Vec<String> =
                    rule.dst_ports
                        .iter()
                        .map(|r| {
                            if r.to == 0 || r.to == r.from {
                                r.from.to_string()
                            } else {
                                format!("{}-{}", r.from, r.to)
                            }
                        })
                        .collect();
                parts.push(format!("th dport {{ {} }}", ports.join(", ")));
            }
        }
        _ => {}
    }
    let verdict = if rule.action == "deny" { "drop" } else { "accept" };
    format!("{} counter {verdict} comment \"{}\"", parts.join(" "), rule.name)
}

/// The `nft -f` script that replaces the policy's table.
pub fn script(namespace: &str, name: &str, spec: &pb::FlowPolicySpec, representors: &[String]) -> String {
    let table = table_name(namespace, name);
    let mut rules: Vec<&pb::FlowRule> = spec.rules.iter().collect();
    rules.sort_by_key(|r| r.priority);
    let mut s = format!("table netdev {table}\ndelete table netdev {table}\ntable netdev {table} {{\n");
    s.push_str(&format!("  chain owner {{\n    counter comment \"{OWNER_PREFIX}{namespace}/{name}\"\n  }}\n"));
    for repr in representors {
        s.push_str(&format!(
            "  chain {repr} {{\n    type filter hook ingress device \"{repr}\" priority 0; policy accept;\n"
        ));
        for rule in &rules {
            s.push_str("    ");
            s.push_str(&rule_expr(rule));
            s.push('\n');
        }
        s.push_str("  }\n");
    }
    s.push_str("}\n");
    s
}

pub async fn apply(namespace: &str, name: &str, spec: &pb::FlowPolicySpec, representors: &[String]) -> DpResult<()> {
    run_stdin("nft", &["-f", "-"], &script(namespace, name, spec, representors)).await.map(|_| ())
}

pub async fn remove(namespace: &str, name: &str) -> DpResult<()> {
    match run("nft", &["delete", "table", "netdev", &table_name(namespace, name)]).await {
        Ok(_) => Ok(()),
        Err(e) if super::cmd::is_missing(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Per rule: (chains it is in, packets, bytes, offloaded), summed over the policy's chains.
pub async fn counters(namespace: &str, name: &str) -> DpResult<Option<BTreeMap<String, (u32, u64, u64, bool)>>> {
    let table = table_name(namespace, name);
    let items = match nft_json(&["list", "table", "netdev", &table]).await {
        Ok(items) => items,
        Err(e) if super::cmd::is_missing(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut offloaded_chains = std::collections::HashSet::new();
    for item in &items {
        if let Some(chain) = item.get("chain") {
            let flags = chain.get("flags").map(|f| f.to_string()).unwrap_or_default();
            if flags.contains("offload") {
                offloaded_chains.insert(chain.get("name").and_then(Value::as_str).unwrap_or_default().to_string());
            }
        }
    }
    let mut out: BTreeMap<String, (u32, u64, u64, bool)> = BTreeMap::new();
    for item in items {
        let Some(rule) = item.get("rule") else { continue };
        let chain = rule.get("chain").and_then(Value::as_str).unwrap_or_default();
        if chain == "owner" {
            continue;
        }
        let comment = rule.get("comment").and_then(Value::as_str).unwrap_or_default().to_string();
        let (mut packets, mut bytes) = (0, 0);
        for e in rule.get("expr").and_then(Value::as_array).into_iter().flatten() {
            if let Some(c) = e.get("counter") {
                packets += c.get("packets").and_then(Value::as_u64).unwrap_or(0);
                bytes += c.get("bytes").and_then(Value::as_u64).unwrap_or(0);
            }
        }
        let entry = out.entry(comment).or_default();
        entry.0 += 1;
        entry.1 += packets;
        entry.2 += bytes;
        entry.3 |= offloaded_chains.contains(chain);
    }
    Ok(Some(out))
}

/// Flow policies whose tables this agent created.
pub async fn owned() -> DpResult<Vec<ObjKey>> {
    let tables = nft_json(&["list", "tables", "netdev"]).await?;
    let mut keys = Vec::new();
    for t in tables {
        let Some(name) = t.get("table").and_then(|t| t.get("name")).and_then(Value::as_str) else { continue };
        if !name.starts_with("xpu_") {
            continue;
        }
        let Ok(items) = nft_json(&["list", "chain", "netdev", name, "owner"]).await else { continue };
        for item in items {
            let comment = item.get("rule").and_then(|r| r.get("comment")).and_then(Value::as_str).unwrap_or_default();
            if let Some(rest) = comment.strip_prefix(OWNER_PREFIX)
                && let Some((ns, n)) = rest.split_once('/')
            {
                keys.push(ObjKey::new(ObjKind::FlowPolicy, ns, n));
            }
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_orders_rules_and_maps_protocols() {
        let spec = pb::FlowPolicySpec {
            rules: vec![
                pb::FlowRule {
                    name: "web".into(),
                    priority: 20,
                    action: "allow".into(),
                    protocol: "tcp".into(),
                    dst_ports: vec![pb::PortRange { from: 80, to: 0 }, pb::PortRange { from: 8000, to: 8080 }],
                    ..Default::default()
                },
                pb::FlowRule {
                    name: "no-ping".into(),
                    priority: 10,
                    action: "deny".into(),
                    protocol: "icmp".into(),
                    dst_prefix: "10.0.0.3/32".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let s = script("pods", "p1", &spec, &["pf0vf1".to_string()]);
        let ping = s.find("ip daddr 10.0.0.3/32 meta l4proto icmp counter drop comment \"no-ping\"").unwrap();
        let web = s.find("meta l4proto tcp th dport { 80, 8000-8080 } counter accept comment \"web\"").unwrap();
        assert!(ping < web, "lower priority first:\n{s}");
        assert!(s.contains("hook ingress device \"pf0vf1\""));
        assert!(s.contains("counter comment \"xpu:FlowPolicy/pods/p1\""));
    }
}
