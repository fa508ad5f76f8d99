//! The linux dataplane: the DPU's own kernel, as on switchdev DPUs where each VF has a
//! representor netdev.
//!
//! - LogicalBridge: a Linux bridge of its own (bridge per VLAN), with a VXLAN device enslaved
//!   when it has a VNI;
//! - Vrf: a kernel routing table (a VRF device when the kernel has them, else policy routing),
//!   with a device (VRF device, else a port-less bridge) holding the loopback address;
//! - Svi: the gateway addresses on the bridge, routed in the Vrf's table (`ip rule iif <bridge>`);
//! - Netdev: the VF representor enslaved to its bridge as an access port (a trunk port needs
//!   bridge VLAN filtering; without it the Netdev is refused with that reason);
//! - FlowPolicy: nftables rules on the representors' ingress (see [`nft`]).
//!
//! Every device the agent creates carries an `ifalias` starting with `xpu:` naming the objects it
//! realises, so a restarted agent finds its own devices (and only those) again.

mod cmd;
pub mod nft;
pub mod probe;

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde_json::Value;
use xpu_proto::broker::v1 as pb;

use self::cmd::{ip, ip_json, is_missing, link, link_up, str_field};
use super::{Dataplane, DataplaneError, Desired, DpResult, ObjKey, ObjKind, Observed, fnv32, parse_netdev_id};

const ALIAS_PREFIX: &str = "xpu:";
/// Priority of the policy-routing rules that send a bridge's traffic to its Vrf's table.
const RULE_PREF: &str = "20000";
/// Metric of the unreachable default that keeps a Vrf's table from falling through to main.
const VRF_DEFAULT_METRIC: &str = "4278198272";

#[derive(Clone, Debug)]
pub struct LinuxConfig {
    /// Representor name of a VF: `{pf}` and `{vf}` are replaced.
    pub vf_representor: String,
    /// Representor name of an SF: `{pf}` and `{sf}` are replaced.
    pub sf_representor: String,
}

impl Default for LinuxConfig {
    fn default() -> Self {
        LinuxConfig { vf_representor: "pf{pf}vf{vf}".into(), sf_representor: "pf{pf}sf{sf}".into() }
    }
}

pub struct LinuxDataplane {
    config: LinuxConfig,
    caps: BTreeMap<String, bool>,
}

pub fn bridge_name(lb: &str) -> String {
    format!("xb{:08x}", fnv32(lb))
}

fn vxlan_name(lb: &str) -> String {
    format!("xx{:08x}", fnv32(lb))
}

fn vrf_device(vrf: &str) -> String {
    format!("xd{:08x}", fnv32(vrf))
}

pub fn vrf_table(vrf: &str, spec: &pb::VrfSpec) -> u32 {
    if spec.routing_table != 0 { spec.routing_table } else { 1000 + fnv32(vrf) % 1_000_000 }
}

fn component(name: &str, ok: bool, details: impl Into<String>) -> pb::Component {
    pb::Component { name: name.into(), status: if ok { "SUCCESS" } else { "ERROR" }.into(), details: details.into() }
}

/// The `xpu:` marks in an alias: e.g. `xpu:LogicalBridge/lb-10;Svi/svi-1`.
fn marks(alias: &str) -> Vec<ObjKey> {
    let Some(rest) = alias.strip_prefix(ALIAS_PREFIX) else { return vec![] };
    rest.split(';')
        .filter_map(|m| {
            let mut parts = m.splitn(3, '/');
            let kind = ObjKind::parse(parts.next()?)?;
            let a = parts.next()?;
            match parts.next() {
                Some(b) => Some(ObjKey::new(kind, a, b)),
                None => Some(ObjKey::new(kind, "", a)),
            }
        })
        .collect()
}

fn alias_of(keys: &[ObjKey]) -> String {
    let parts: Vec<String> = keys
        .iter()
        .map(|k| {
            if k.namespace.is_empty() {
                format!("{}/{}", k.kind.as_str(), k.name)
            } else {
                format!("{}/{}/{}", k.kind.as_str(), k.namespace, k.name)
            }
        })
        .collect();
    format!("{ALIAS_PREFIX}{}", parts.join(";"))
}

async fn set_alias(dev: &str, keys: &[ObjKey]) -> DpResult<()> {
    let alias = if keys.is_empty() { String::new() } else { alias_of(keys) };
    ip(&["link", "set", "dev", dev, "alias", &alias]).await.map(|_| ())
}

async fn ensure_up(dev: &str) -> DpResult<()> {
    ip(&["link", "set", "dev", dev, "up"]).await.map(|_| ())
}

async fn delete_link(dev: &str) -> DpResult<()> {
    match ip(&["link", "del", "dev", dev]).await {
        Err(e) if !is_missing(&e) => Err(e),
        _ => Ok(()),
    }
}

fn oper(link: &Value) -> String {
    match str_field(link, "operstate") {
        "UP" | "UNKNOWN" if link_up(link) => "UP".into(),
        _ => "DOWN".into(),
    }
}

impl LinuxDataplane {
    /// Probes the kernel and builds the backend.
    pub async fn new(config: LinuxConfig) -> LinuxDataplane {
        let caps = probe::probe().await;
        tracing::info!(capabilities = ?caps, "probed the kernel");
        LinuxDataplane { config, caps }
    }

    fn has(&self, cap: &str) -> bool {
        self.caps.get(cap).copied().unwrap_or(false)
    }

    pub fn representor(&self, netdev_id: &str) -> DpResult<String> {
        let (_, pf, sf, index) = parse_netdev_id(netdev_id)
            .ok_or_else(|| DataplaneError::permanent(format!("{netdev_id:?} is not a netdev id")))?;
        let name = if sf {
            self.config.sf_representor.replace("{pf}", &pf.to_string()).replace("{sf}", &index.to_string())
        } else {
            self.config.vf_representor.replace("{pf}", &pf.to_string()).replace("{vf}", &index.to_string())
        };
        if name.is_empty() || name.len() > 15 {
            return Err(DataplaneError::permanent(format!("representor name {name:?} is not a valid interface name")));
        }
        Ok(name)
    }

    async fn mark(&self, dev: &str, add: Option<&ObjKey>, drop: Option<&ObjKey>) -> DpResult<()> {
        let Some(l) = link(dev).await? else { return Ok(()) };
        let mut keys = marks(str_field(&l, "ifalias"));
        if let Some(d) = drop {
            keys.retain(|k| k != d);
        }
        if let Some(a) = add
            && !keys.contains(a)
        {
            keys.push(a.clone());
        }
        set_alias(dev, &keys).await
    }

    /// Deletes devices this agent created (bridges, VXLANs, VRF holders) that carry `key`'s
    /// mark under another name, e.g. from an older naming scheme.
    async fn delete_marked(&self, key: &ObjKey) -> DpResult<()> {
        for l in ip_json(&["link", "show"]).await? {
            let name = str_field(&l, "ifname");
            let ours = name.starts_with("xb") || name.starts_with("xx") || name.starts_with("xd");
            if ours && marks(str_field(&l, "ifalias")).contains(key) {
                delete_link(name).await?;
            }
        }
        Ok(())
    }

    async fn apply_bridge(&self, name: &str, spec: &pb::LogicalBridgeSpec) -> DpResult<Observed> {
        let br = bridge_name(name);
        if link(&br).await?.is_none() {
            ip(&["link", "add", &br, "type", "bridge", "stp_state", "0", "forward_delay", "0"]).await?;
        }
        self.mark(&br, Some(&ObjKey::new(ObjKind::LogicalBridge, "", name)), None).await?;
        ensure_up(&br).await?;
        let mut components = vec![component("bridge", true, format!("{br} (vlan {})", spec.vlan_id))];
        let vx = vxlan_name(name);
        match spec.vni {
            Some(vni) => {
                if !self.has(probe::VXLAN) {
                    return Err(DataplaneError::permanent("a VNI needs VXLAN, which this kernel lacks"));
                }
                let current = ip_json(&["-d", "link", "show", "dev", &vx]).await.ok().and_then(|mut v| v.pop());
                let current_vni =
                    current.as_ref().and_then(|l| l.pointer("/linkinfo/info_data/id")).and_then(Value::as_u64);
                if current.is_some() && current_vni != Some(u64::from(vni)) {
                    delete_link(&vx).await?;
                }
                if current.is_none() || current_vni != Some(u64::from(vni)) {
                    let vni_s = vni.to_string();
                    let mut args = vec![
                        "link",
                        "add",
                        vx.as_str(),
                        "type",
                        "vxlan",
                        "id",
                        vni_s.as_str(),
                        "dstport",
                        "4789",
                        "nolearning",
                    ];
                    let local = spec.vtep_ip_prefix.split('/').next().unwrap_or_default().to_string();
                    if !local.is_empty() {
                        args.extend(["local", local.as_str()]);
                    }
                    ip(&args).await?;
                }
                set_alias(&vx, &[ObjKey::new(ObjKind::LogicalBridge, "", name)]).await?;
                ip(&["link", "set", "dev", &vx, "master", &br]).await?;
                ensure_up(&vx).await?;
                components.push(component("vxlan", true, format!("{vx} vni {vni}")));
            }
            None => delete_link(&vx).await?,
        }
        Ok(Observed { oper_status: "UP".into(), components, ..Default::default() })
    }

    async fn apply_vrf(&self, name: &str, spec: &pb::VrfSpec) -> DpResult<Observed> {
        let dev = vrf_device(name);
        let table = vrf_table(name, spec).to_string();
        let vrf_dev = self.has(probe::VRF);
        if link(&dev).await?.is_none() {
            if vrf_dev {
                ip(&["link", "add", &dev, "type", "vrf", "table", &table]).await?;
            } else {
                // A port-less bridge holds the loopback address: unlike `dummy`, bridges exist
                // in every kernel this dataplane supports.
                ip(&["link", "add", &dev, "type", "bridge"]).await?;
            }
        }
        set_alias(&dev, &[ObjKey::new(ObjKind::Vrf, "", name)]).await?;
        ensure_up(&dev).await?;
        ip(&["addr", "replace", &spec.loopback_ip_prefix, "dev", &dev]).await?;
        ip(&["route", "replace", "unreachable", "default", "table", &table, "metric", VRF_DEFAULT_METRIC]).await?;
        let how = if vrf_dev { "vrf device" } else { "policy routing" };
        let mut components = vec![component("routing-table", true, format!("table {table} ({how})"))];
        if let Some(vni) = spec.vni {
            components.push(pb::Component {
                name: "l3-vni".into(),
                status: "SUCCESS".into(),
                details: format!("vni {vni} recorded; symmetric IRB is not realised by the linux dataplane"),
            });
        }
        Ok(Observed { oper_status: "UP".into(), components, ..Default::default() })
    }

    async fn apply_svi(&self, name: &str, spec: &pb::SviSpec, vrf: &pb::VrfSpec) -> DpResult<Observed> {
        let br = bridge_name(&spec.logical_bridge);
        if link(&br).await?.is_none() {
            return Err(DataplaneError::retry(format!("logical bridge {} is not programmed yet", spec.logical_bridge)));
        }
        let table = vrf_table(&spec.vrf, vrf).to_string();
        if !spec.mac_address.is_empty() {
            ip(&["link", "set", "dev", &br, "address", &spec.mac_address]).await?;
        }
        for gw in &spec.gw_ip_prefix {
            let net: IpNet = gw.parse().map_err(|_| DataplaneError::permanent(format!("{gw} is not an address")))?;
            ip(&["addr", "replace", gw, "dev", &br]).await?;
            ip(&["route", "replace", &net.trunc().to_string(), "dev", &br, "table", &table, "proto", "static"]).await?;
        }
        if self.has(probe::VRF) {
            ip(&["link", "set", "dev", &br, "master", &vrf_device(&spec.vrf)]).await?;
        } else {
            let rules = ip_json(&["rule", "show", "pref", RULE_PREF]).await?;
            let present = rules.iter().any(|r| str_field(r, "iif") == br && str_field(r, "table") == table);
            if !present {
                ip(&["rule", "add", "iif", &br, "lookup", &table, "pref", RULE_PREF]).await?;
            }
        }
        self.mark(&br, Some(&ObjKey::new(ObjKind::Svi, "", name)), None).await?;
        Ok(Observed {
            oper_status: "UP".into(),
            components: vec![component(
                "gateway",
                true,
                format!("{} on {br}, table {table}", spec.gw_ip_prefix.join(",")),
            )],
            ..Default::default()
        })
    }

    async fn remove_svi(&self, name: &str, last: Option<&pb::SviSpec>) -> DpResult<()> {
        let key = ObjKey::new(ObjKind::Svi, "", name);
        // The bridge is named by the last spec, or found by its mark.
        let br = match last {
            Some(s) => Some(bridge_name(&s.logical_bridge)),
            None => ip_json(&["link", "show"])
                .await?
                .into_iter()
                .find(|l| marks(str_field(l, "ifalias")).contains(&key))
                .map(|l| str_field(&l, "ifname").to_string()),
        };
        let Some(br) = br else { return Ok(()) };
        if link(&br).await?.is_none() {
            return Ok(());
        }
        match last {
            Some(s) => {
                for gw in &s.gw_ip_prefix {
                    if let Err(e) = ip(&["addr", "del", gw, "dev", &br]).await
                        && !is_missing(&e)
                    {
                        return Err(e);
                    }
                }
            }
            None => {
                ip(&["addr", "flush", "dev", &br]).await?;
            }
        }
        for r in ip_json(&["rule", "show", "pref", RULE_PREF]).await? {
            if str_field(&r, "iif") == br {
                let table = str_field(&r, "table").to_string();
                let _ = ip(&["rule", "del", "iif", &br, "lookup", &table, "pref", RULE_PREF]).await;
                let _ = ip(&["route", "flush", "table", &table, "dev", &br]).await;
            }
        }
        self.mark(&br, None, Some(&key)).await
    }

    async fn apply_netdev(&self, namespace: &str, name: &str, spec: &pb::NetdevSpec) -> DpResult<Observed> {
        if spec.port_type == "trunk" && !self.has(probe::VLAN_FILTERING) {
            return Err(DataplaneError::permanent(
                "a trunk port needs bridge VLAN filtering (802.1q), which this DPU's kernel lacks",
            ));
        }
        let [lb] = spec.logical_bridges.as_slice() else {
            return Err(DataplaneError::permanent(format!(
                "an access port joins exactly one logical bridge, got {}",
                spec.logical_bridges.len()
            )));
        };
        let br = bridge_name(lb);
        if link(&br).await?.is_none() {
            return Err(DataplaneError::retry(format!("logical bridge {lb} is not programmed yet")));
        }
        let repr = self.representor(&spec.netdev_id)?;
        let Some(l) = link(&repr).await? else {
            return Err(DataplaneError::retry(format!("representor {repr} of {} does not exist", spec.netdev_id)));
        };
        if str_field(&l, "master") != br {
            ip(&["link", "set", "dev", &repr, "master", &br]).await?;
        }
        ensure_up(&repr).await?;
        set_alias(&repr, &[ObjKey::new(ObjKind::Netdev, namespace, name)]).await?;
        self.observe_netdev(spec, &repr).await
    }

    async fn observe_netdev(&self, spec: &pb::NetdevSpec, repr: &str) -> DpResult<Observed> {
        let l = link(repr).await?.ok_or_else(|| DataplaneError::retry(format!("representor {repr} disappeared")))?;
        let br = spec.logical_bridges.first().map(|b| bridge_name(b)).unwrap_or_default();
        let attached = str_field(&l, "master") == br;
        Ok(Observed {
            oper_status: oper(&l),
            components: vec![component("bridge-port", attached, format!("{repr} on {br}"))],
            ip: spec.ipam.as_ref().map(|i| i.address.clone()).unwrap_or_default(),
            mac: spec.mac_address.clone(),
            port_name: repr.to_string(),
            rules: vec![],
        })
    }

    async fn flow_observed(
        &self,
        namespace: &str,
        name: &str,
        spec: &pb::FlowPolicySpec,
        targets: usize,
    ) -> DpResult<Observed> {
        let counters = nft::counters(namespace, name).await?.unwrap_or_default();
        let rules = spec
            .rules
            .iter()
            .map(|r| {
                let (chains, packets, bytes, offloaded) = counters.get(&r.name).copied().unwrap_or_default();
                pb::FlowRuleStatus {
                    name: r.name.clone(),
                    programmed: chains > 0,
                    // nftables shares the kernel's flow-offload path with tc-flower: a chain is
                    // offloaded only when the NIC accepted it; otherwise this is the slow path.
                    offload: if chains == 0 {
                        "none"
                    } else if offloaded {
                        "hardware"
                    } else {
                        "software"
                    }
                    .into(),
                    packets,
                    bytes,
                    message: if targets == 0 {
                        "no netdev on this DPU matches the netdevSelector".into()
                    } else {
                        String::new()
                    },
                }
            })
            .collect();
        Ok(Observed {
            oper_status: "UP".into(),
            components: vec![component(
                "nftables",
                true,
                format!("table netdev {} on {targets} representors", nft::table_name(namespace, name)),
            )],
            rules,
            ..Default::default()
        })
    }
}

#[async_trait::async_trait]
impl Dataplane for LinuxDataplane {
    fn name(&self) -> &'static str {
        "linux"
    }

    fn capabilities(&self) -> BTreeMap<String, bool> {
        self.caps.clone()
    }

    async fn apply(&self, obj: &Desired) -> DpResult<Observed> {
        match obj {
            Desired::LogicalBridge { name, spec } => self.apply_bridge(name, spec).await,
            Desired::Vrf { name, spec } => self.apply_vrf(name, spec).await,
            Desired::Svi { name, spec, vrf, .. } => self.apply_svi(name, spec, vrf).await,
            Desired::Netdev { namespace, name, spec } => self.apply_netdev(namespace, name, spec).await,
            Desired::FlowPolicy { namespace, name, spec, targets } => {
                if !self.has(probe::NFTABLES) {
                    return Err(DataplaneError::permanent(
                        "flow rules need nftables netdev ingress chains, which this kernel lacks",
                    ));
                }
                let mut reprs = Vec::new();
                for t in targets {
                    let repr = self.representor(&t.spec.netdev_id)?;
                    if link(&repr).await?.is_none() {
                        return Err(DataplaneError::retry(format!(
                            "representor {repr} of {} does not exist",
                            t.netdev
                        )));
                    }
                    reprs.push(repr);
                }
                nft::apply(namespace, name, spec, &reprs).await?;
                self.flow_observed(namespace, name, spec, reprs.len()).await
            }
        }
    }

    async fn observe(&self, obj: &Desired) -> DpResult<Observed> {
        match obj {
            Desired::Netdev { spec, .. } => self.observe_netdev(spec, &self.representor(&spec.netdev_id)?).await,
            Desired::FlowPolicy { namespace, name, spec, targets } => {
                self.flow_observed(namespace, name, spec, targets.len()).await
            }
            Desired::LogicalBridge { name, .. } => {
                let l = link(&bridge_name(name)).await?.ok_or_else(|| DataplaneError::retry("bridge missing"))?;
                Ok(Observed { oper_status: if link_up(&l) { "UP" } else { "DOWN" }.into(), ..Default::default() })
            }
            Desired::Vrf { .. } | Desired::Svi { .. } => {
                Ok(Observed { oper_status: "UP".into(), ..Default::default() })
            }
        }
    }

    async fn remove(&self, key: &ObjKey, last: Option<&Desired>) -> DpResult<()> {
        match key.kind {
            ObjKind::LogicalBridge => {
                delete_link(&vxlan_name(&key.name)).await?;
                delete_link(&bridge_name(&key.name)).await?;
                self.delete_marked(key).await
            }
            ObjKind::Vrf => {
                // Without the last spec (an orphan) the table is the one derived from the name.
                let table = match last {
                    Some(Desired::Vrf { spec, .. }) => vrf_table(&key.name, spec),
                    _ => vrf_table(&key.name, &pb::VrfSpec::default()),
                };
                delete_link(&vrf_device(&key.name)).await?;
                self.delete_marked(key).await?;
                // Flushing an empty table is fine; only a failure to talk to the kernel is not.
                let _ = ip(&["route", "flush", "table", &table.to_string()]).await;
                Ok(())
            }
            ObjKind::Svi => {
                let last = match last {
                    Some(Desired::Svi { spec, .. }) => Some(spec),
                    _ => None,
                };
                self.remove_svi(&key.name, last).await
            }
            ObjKind::Netdev => {
                let repr = self.representor(&key.name)?;
                if link(&repr).await?.is_none() {
                    return Ok(());
                }
                ip(&["link", "set", "dev", &repr, "nomaster"]).await?;
                set_alias(&repr, &[]).await
            }
            ObjKind::FlowPolicy => nft::remove(&key.namespace, &key.name).await,
        }
    }

    async fn owned(&self) -> DpResult<Vec<ObjKey>> {
        let mut keys = Vec::new();
        for l in ip_json(&["link", "show"]).await? {
            keys.extend(marks(str_field(&l, "ifalias")));
        }
        if self.has(probe::NFTABLES) {
            keys.extend(nft::owned().await?);
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip() {
        let keys =
            vec![ObjKey::new(ObjKind::LogicalBridge, "", "lb-10"), ObjKey::new(ObjKind::Netdev, "pods", "x-pf0-vf1")];
        assert_eq!(marks(&alias_of(&keys)), keys);
        assert!(marks("something else").is_empty());
    }

    #[test]
    fn representor_names_follow_the_template() {
        let dp = LinuxDataplane { config: LinuxConfig::default(), caps: BTreeMap::new() };
        assert_eq!(dp.representor("bf3-pf0-vf12").unwrap(), "pf0vf12");
        assert_eq!(dp.representor("bf3-pf1-sf2").unwrap(), "pf1sf2");
        let config = LinuxConfig { vf_representor: "eth{pf}_{vf}".into(), ..LinuxConfig::default() };
        let dp = LinuxDataplane { config, caps: BTreeMap::new() };
        assert_eq!(dp.representor("bf3-pf0-vf3").unwrap(), "eth0_3");
    }
}
