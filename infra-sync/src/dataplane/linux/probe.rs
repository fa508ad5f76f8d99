//! What the DPU's kernel can do, found by trying it on throw-away devices at start.

use std::collections::BTreeMap;

use super::cmd::{ip, run};

const PROBE: &str = "xpuprobe0";

/// Capability names reported in the DPU inventory.
pub const BRIDGE: &str = "bridge";
pub const VLAN_FILTERING: &str = "bridge-vlan-filtering";
pub const DOT1Q: &str = "802.1q";
pub const VRF: &str = "vrf-device";
pub const VXLAN: &str = "vxlan";
pub const TC_FLOWER: &str = "tc-flower";
pub const NFTABLES: &str = "nftables-netdev-ingress";
pub const POLICY_ROUTING: &str = "policy-routing";

async fn try_del(name: &str) {
    let _ = ip(&["link", "del", name]).await;
}

/// Probes each mechanism the linux dataplane can use and cleans up after itself.
pub async fn probe() -> BTreeMap<String, bool> {
    let mut caps = BTreeMap::new();
    try_del(PROBE).await;
    let bridge = ip(&["link", "add", PROBE, "type", "bridge"]).await.is_ok();
    caps.insert(BRIDGE.into(), bridge);
    if bridge {
        let _ = ip(&["link", "set", PROBE, "up"]).await;
    }

    let vf = "xpuprobef";
    try_del(vf).await;
    let filtering = ip(&["link", "add", vf, "type", "bridge", "vlan_filtering", "1"]).await.is_ok();
    try_del(vf).await;
    caps.insert(VLAN_FILTERING.into(), filtering);

    let vlan = "xpuprobe0.9";
    let dot1q = bridge && ip(&["link", "add", "link", PROBE, "name", vlan, "type", "vlan", "id", "9"]).await.is_ok();
    try_del(vlan).await;
    caps.insert(DOT1Q.into(), dot1q);

    let vrf = "xpuprobev";
    let has_vrf = ip(&["link", "add", vrf, "type", "vrf", "table", "4242"]).await.is_ok();
    try_del(vrf).await;
    caps.insert(VRF.into(), has_vrf);

    let vx = "xpuprobex";
    let has_vxlan = ip(&["link", "add", vx, "type", "vxlan", "id", "42", "dstport", "4789"]).await.is_ok();
    try_del(vx).await;
    caps.insert(VXLAN.into(), has_vxlan);

    let flower = bridge
        && run("tc", &["qdisc", "add", "dev", PROBE, "clsact"]).await.is_ok()
        && run(
            "tc",
            &[
                "filter", "add", "dev", PROBE, "ingress", "protocol", "ip", "flower", "ip_proto", "icmp", "action",
                "drop",
            ],
        )
        .await
        .is_ok();
    caps.insert(TC_FLOWER.into(), flower);

    let table = "xpuprobe";
    let _ = run("nft", &["delete", "table", "netdev", table]).await;
    let chain = format!("{{ type filter hook ingress device \"{PROBE}\" priority 0; }}");
    let nft = bridge
        && run("nft", &["add", "table", "netdev", table]).await.is_ok()
        && run("nft", &["add", "chain", "netdev", table, "c", &chain]).await.is_ok();
    let _ = run("nft", &["delete", "table", "netdev", table]).await;
    caps.insert(NFTABLES.into(), nft);

    caps.insert(POLICY_ROUTING.into(), ip(&["rule", "show"]).await.is_ok());
    try_del(PROBE).await;
    caps
}
