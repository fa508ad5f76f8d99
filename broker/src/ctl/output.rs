//! Tables for `ctl get`, kubectl style.

use chrono::{DateTime, Utc};
use xpu_proto::broker::v1 as pb;

use crate::model::convert::resource_meta;

fn age(ts: &str) -> String {
    let Ok(t) = DateTime::parse_from_rfc3339(ts) else {
        return "-".into();
    };
    let secs = (Utc::now() - t.with_timezone(&Utc)).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.to_string() }
}

fn ready(st: Option<&pb::FabricStatus>) -> (String, String) {
    let Some(st) = st else {
        return ("-".into(), "0".into());
    };
    let cond = st.conditions.iter().find(|c| c.r#type == "Ready").map(|c| c.status.clone()).unwrap_or_default();
    (or_dash(&cond), st.dpus.len().to_string())
}

/// Header and rows for a list of resources of one kind.
pub fn table(items: &[pb::Resource], wide: bool) -> Vec<Vec<String>> {
    use pb::resource::Kind as R;
    let mut rows: Vec<Vec<String>> = Vec::new();
    let header: Vec<&str> = match items.first().and_then(|r| r.kind.as_ref()) {
        Some(R::Netdev(_)) if wide => {
            vec!["NAMESPACE", "NAME", "PHASE", "IP", "DPU", "NODE", "MAC", "NETWORK", "GENERATION", "OBSERVED", "AGE"]
        }
        Some(R::Netdev(_)) => vec!["NAMESPACE", "NAME", "PHASE", "IP", "DPU", "AGE"],
        Some(R::Dpu(_)) if wide => {
            vec!["NAME", "LEASE", "PRODUCT", "AGENT", "DATAPLANE", "LAST-HEARTBEAT", "APPLIED-REV", "AGE"]
        }
        Some(R::Dpu(_)) => vec!["NAME", "LEASE", "PRODUCT", "AGENT", "AGE"],
        Some(R::LogicalBridge(_)) => {
            vec!["NAME", "VLAN", "VNI", "READY", "DPUS", "GENERATION", "AGE"]
        }
        Some(R::Vrf(_)) => vec!["NAME", "VNI", "LOOPBACK", "READY", "DPUS", "GENERATION", "AGE"],
        Some(R::Svi(_)) => vec!["NAME", "VRF", "BRIDGE", "GATEWAYS", "READY", "DPUS", "AGE"],
        Some(R::XpuNetwork(_)) => vec!["NAME", "CIDR", "GATEWAY", "BRIDGES", "ALLOCATED", "CAPACITY", "AGE"],
        Some(R::FlowPolicy(_)) => vec!["NAMESPACE", "NAME", "RULES", "READY", "DPUS", "GENERATION", "AGE"],
        None => return rows,
    };
    rows.push(header.into_iter().map(String::from).collect());
    for res in items {
        let meta = resource_meta(res).cloned().unwrap_or_default();
        let created = age(&meta.creation_timestamp);
        let row = match res.kind.as_ref() {
            Some(R::Netdev(o)) => {
                let spec = o.spec.clone().unwrap_or_default();
                let st = o.status.clone().unwrap_or_default();
                let phase = if st.stale { format!("{} (stale)", st.phase) } else { st.phase.clone() };
                let ip = if st.ip.is_empty() {
                    spec.ipam.as_ref().map(|i| i.address.clone()).unwrap_or_default()
                } else {
                    st.ip.clone()
                };
                let mut r =
                    vec![meta.namespace.clone(), meta.name.clone(), or_dash(&phase), or_dash(&ip), or_dash(&st.dpu)];
                if wide {
                    r.extend([
                        or_dash(&spec.hostname),
                        or_dash(&spec.mac_address),
                        or_dash(&spec.network),
                        meta.generation.to_string(),
                        st.observed_generation.to_string(),
                    ]);
                }
                r.push(created);
                r
            }
            Some(R::Dpu(o)) => {
                let st = o.status.clone().unwrap_or_default();
                let inv = st.inventory.clone().unwrap_or_default();
                let mut r = vec![
                    meta.name.clone(),
                    or_dash(&st.lease_state),
                    or_dash(&inv.product),
                    or_dash(&inv.agent_version),
                ];
                if wide {
                    r.extend([or_dash(&inv.dataplane), or_dash(&st.last_heartbeat), st.applied_revision.to_string()]);
                }
                r.push(created);
                r
            }
            Some(R::LogicalBridge(o)) => {
                let spec = o.spec.clone().unwrap_or_default();
                let (rd, n) = ready(o.status.as_ref());
                vec![
                    meta.name.clone(),
                    spec.vlan_id.to_string(),
                    spec.vni.map_or("-".into(), |v| v.to_string()),
                    rd,
                    n,
                    meta.generation.to_string(),
                    created,
                ]
            }
            Some(R::Vrf(o)) => {
                let spec = o.spec.clone().unwrap_or_default();
                let (rd, n) = ready(o.status.as_ref());
                vec![
                    meta.name.clone(),
                    spec.vni.map_or("-".into(), |v| v.to_string()),
                    or_dash(&spec.loopback_ip_prefix),
                    rd,
                    n,
                    meta.generation.to_string(),
                    created,
                ]
            }
            Some(R::Svi(o)) => {
                let spec = o.spec.clone().unwrap_or_default();
                let (rd, n) = ready(o.status.as_ref());
                vec![meta.name.clone(), spec.vrf, spec.logical_bridge, spec.gw_ip_prefix.join(","), rd, n, created]
            }
            Some(R::XpuNetwork(o)) => {
                let spec = o.spec.clone().unwrap_or_default();
                let st = o.status.unwrap_or_default();
                let pool = spec.ipam.clone().unwrap_or_default();
                vec![
                    meta.name.clone(),
                    or_dash(&pool.cidr),
                    or_dash(&pool.gateway),
                    or_dash(&spec.logical_bridges.join(",")),
                    st.allocated.to_string(),
                    st.capacity.to_string(),
                    created,
                ]
            }
            Some(R::FlowPolicy(o)) => {
                let spec = o.spec.clone().unwrap_or_default();
                let (rd, n) = ready(o.status.as_ref());
                vec![
                    meta.namespace.clone(),
                    meta.name.clone(),
                    spec.rules.len().to_string(),
                    rd,
                    n,
                    meta.generation.to_string(),
                    created,
                ]
            }
            None => continue,
        };
        rows.push(row);
    }
    rows
}

/// Left-aligned columns separated by three spaces.
pub fn render(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| if i + 1 == row.len() { cell.clone() } else { format!("{cell:<w$}", w = widths[i]) })
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}
