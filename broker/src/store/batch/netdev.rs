//! Netdev preparation and broker IPAM inside a batch: defaults from the network, references,
//! MACs, and address allocation from the pool (unique per network, guaranteed by the database).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use xpu_proto::broker::v1 as pb;

use super::{Working, WriteTx, decode};
use crate::{
    error::{Error, Result},
    model::{Key, Kind, NetdevId, ipam::Pool, validate},
    store::rows::ObjectRow,
};

/// Address candidates checked against the database per round trip.
const IPAM_WINDOW: usize = 32;

pub(super) struct PoolState {
    pub(super) offset: u128,
    pub(super) offset_dirty: bool,
    pub(super) reserved: HashSet<IpAddr>,
    /// Addresses already checked against the database in this transaction, with their holder
    /// there. The database does not change under the transaction, so each address is asked once.
    pub(super) checked: HashMap<IpAddr, Option<(String, String)>>,
}

impl PoolState {
    /// Asks the database about the addresses of `addrs` not checked yet.
    async fn check<T: WriteTx>(&mut self, tx: &mut T, network: &str, addrs: &[IpAddr]) -> Result<()> {
        let unknown: Vec<IpAddr> = addrs.iter().copied().filter(|ip| !self.checked.contains_key(ip)).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let mut taken = tx.taken(network.to_string(), unknown.iter().map(ToString::to_string).collect()).await?;
        for ip in unknown {
            self.checked.insert(ip, taken.remove(&ip.to_string()));
        }
        Ok(())
    }
}

/// A stable, locally administered unicast MAC derived from the netdev id (FNV-1a).
fn generated_mac(netdev_id: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in netdev_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    validate::format_mac([0x02, b[3], b[4], b[5], b[6], b[7]])
}

fn ip_of(address: &str) -> Option<IpAddr> {
    address.split('/').next().and_then(|a| a.parse().ok())
}

impl Working<'_> {
    pub(super) async fn check_network<T: WriteTx>(
        &mut self,
        tx: &mut T,
        key: &Key,
        spec: &pb::XpuNetworkSpec,
        live: Option<&ObjectRow>,
    ) -> Result<()> {
        for (i, lb) in spec.logical_bridges.iter().enumerate() {
            self.require(tx, Key::cluster(Kind::LogicalBridge, lb), &format!("spec.logicalBridges[{i}]")).await?;
        }
        if !spec.vrf.is_empty() {
            self.require(tx, Key::cluster(Kind::Vrf, &spec.vrf), "spec.vrf").await?;
        }
        if let Some(o) = live {
            let old: pb::XpuNetworkSpec = decode(&o.spec, "XpuNetwork spec")?;
            if old.ipam != spec.ipam {
                let in_use = self.allocations_in(tx, &key.name).await?;
                if in_use > 0 {
                    return Err(Error::FailedPrecondition(format!(
                        "XpuNetwork {} has {in_use} allocated addresses; its ipam pool cannot change while netdevs use it",
                        key.name
                    )));
                }
                self.pools.remove(&key.name);
            }
        }
        Ok(())
    }

    pub(super) async fn allocations_in<T: WriteTx>(&mut self, tx: &mut T, network: &str) -> Result<i64> {
        let mut n = tx.count_allocations(network.to_string()).await?;
        // Adjust for what this batch changed but has not written yet.
        for (slot, now) in &self.allocations {
            let before = self.loaded_allocations.get(slot).cloned().flatten();
            let was = before.as_ref().is_some_and(|(net, _)| net == network);
            let is = now.as_ref().is_some_and(|(net, _)| net == network);
            n += i64::from(is) - i64::from(was);
        }
        Ok(n)
    }

    pub(super) async fn prepare_netdev<T: WriteTx>(
        &mut self,
        tx: &mut T,
        key: &Key,
        nd: &mut pb::NetdevSpec,
        live: Option<&ObjectRow>,
    ) -> Result<pb::XpuNetworkSpec> {
        let id = NetdevId::parse(&nd.netdev_id).ok_or_else(|| Error::invalid("spec.netdevId", "is not a netdev id"))?;
        self.ensure_netdev_names(tx, vec![key.name.clone()]).await?;
        if let Some(Some(ns)) = self.netdev_namespaces.get(&key.name)
            && *ns != key.namespace
        {
            return Err(Error::AlreadyExists(format!(
                "netdev {} already exists in namespace {ns}; a VF carries one Netdev at a time",
                key.name
            )));
        }
        let net_row = self.require(tx, Key::cluster(Kind::XpuNetwork, &nd.network), "spec.network").await?;
        let net: pb::XpuNetworkSpec = decode(&net_row.spec, "XpuNetwork spec")?;
        let old: Option<pb::NetdevSpec> = live.map(|o| decode(&o.spec, "Netdev spec")).transpose()?;

        if nd.backend.is_empty() {
            nd.backend = id.backend.as_str().to_string();
        }
        if nd.port_type.is_empty() {
            nd.port_type = if net.port_type.is_empty() { "access".into() } else { net.port_type.clone() };
        }
        if nd.logical_bridges.is_empty() {
            nd.logical_bridges = net.logical_bridges.clone();
        }
        for (i, lb) in nd.logical_bridges.clone().iter().enumerate() {
            self.require(tx, Key::cluster(Kind::LogicalBridge, lb), &format!("spec.logicalBridges[{i}]")).await?;
        }
        match (nd.port_type.as_str(), nd.logical_bridges.len()) {
            ("access", 1) => {}
            ("access", n) => {
                return Err(Error::invalid(
                    "spec.logicalBridges",
                    format!("an access port needs exactly one logical bridge, got {n}"),
                ));
            }
            (_, 0) => {
                return Err(Error::invalid("spec.logicalBridges", "a trunk port needs at least one logical bridge"));
            }
            _ => {}
        }
        nd.mac_address = if nd.mac_address.is_empty() {
            old.as_ref().map(|o| o.mac_address.clone()).unwrap_or_else(|| generated_mac(&nd.netdev_id))
        } else {
            validate::mac(&nd.mac_address, "spec.macAddress")?
        };
        if nd.mtu == 0 {
            nd.mtu = net.mtu;
        }
        self.prepare_ipam(tx, key, nd, &net).await?;
        Ok(net)
    }

    pub(super) async fn current_allocation<T: WriteTx>(
        &mut self,
        tx: &mut T,
        key: &Key,
    ) -> Result<Option<(String, IpAddr)>> {
        let slot = (key.namespace.clone(), key.name.clone());
        if let Some(a) = self.allocations.get(&slot) {
            return Ok(a.clone());
        }
        self.load_allocations(tx, vec![slot.clone()]).await?;
        Ok(self.loaded_allocations.get(&slot).cloned().flatten())
    }

    /// Loads the stored allocations of these Netdevs that are not known yet, in one query.
    pub(super) async fn load_allocations<T: WriteTx>(
        &mut self,
        tx: &mut T,
        slots: Vec<(String, String)>,
    ) -> Result<()> {
        let missing = super::unknown(slots, &self.loaded_allocations);
        if missing.is_empty() {
            return Ok(());
        }
        let found = tx.allocations_of(missing.clone()).await?;
        for slot in missing {
            self.loaded_allocations.insert(slot, None);
        }
        for (ns, name, network, address) in found {
            self.allocation_rows.insert((ns.clone(), name.clone()));
            // An address that does not parse holds nothing: the Netdev gets a new one and the
            // row is replaced.
            if let Ok(ip) = address.parse() {
                self.loaded_allocations.insert((ns, name), Some((network, ip)));
            }
        }
        Ok(())
    }

    pub(super) async fn prepare_ipam<T: WriteTx>(
        &mut self,
        tx: &mut T,
        key: &Key,
        nd: &mut pb::NetdevSpec,
        net: &pb::XpuNetworkSpec,
    ) -> Result<()> {
        let pool =
            net.ipam.as_ref().map(Pool::from_spec).transpose().map_err(|_| {
                Error::FailedPrecondition(format!("XpuNetwork {} has an invalid ipam pool", nd.network))
            })?;
        let network = nd.network.clone();
        let prev = self.current_allocation(tx, key).await?;
        let ipam = nd.ipam.get_or_insert_with(Default::default);
        if ipam.mode.is_empty() {
            ipam.mode = "broker".into();
        }
        let requested = if ipam.address.is_empty() { None } else { ip_of(&ipam.address) };
        let slot = (key.namespace.clone(), key.name.clone());
        let next = if ipam.mode == "broker" {
            let pool = pool.as_ref().ok_or_else(|| {
                Error::invalid(
                    "spec.network",
                    format!("XpuNetwork {network} has no ipam pool; set spec.ipam.mode to host and give an address"),
                )
            })?;
            let ip = match &prev {
                Some((pn, pa)) if *pn == network && requested.is_none_or(|r| r == *pa) => *pa,
                Some((pn, pa)) if *pn == network => {
                    return Err(Error::invalid(
                        "spec.ipam.address",
                        format!("the broker allocated {pa}; delete the netdev to get another address"),
                    ));
                }
                _ => self.allocate(tx, &network, pool, requested).await?,
            };
            ipam.address = pool.interface_address(ip);
            if ipam.gateway.is_empty() {
                ipam.gateway = pool.gateway().map(|g| g.to_string()).unwrap_or_default();
            }
            Some((network, ip))
        } else {
            let ip = requested.ok_or_else(|| Error::invalid("spec.ipam.address", "is required in mode host"))?;
            match &pool {
                Some(pool) if pool.network().contains(&ip) => {
                    if ipam.gateway.is_empty() {
                        ipam.gateway = pool.gateway().map(|g| g.to_string()).unwrap_or_default();
                    }
                    match &prev {
                        Some((pn, pa)) if *pn == network && *pa == ip => Some((network, ip)),
                        _ => Some((network.clone(), self.allocate(tx, &network, pool, Some(ip)).await?)),
                    }
                }
                _ => None,
            }
        };
        if next != prev {
            self.set_allocation(slot, next);
        }
        Ok(())
    }

    pub(super) async fn pool_state<T: WriteTx>(&mut self, tx: &mut T, network: &str) -> Result<()> {
        if !self.pools.contains_key(network) {
            let offset = tx.pool_offset(network.to_string()).await?.unwrap_or(0);
            self.pools.insert(
                network.to_string(),
                PoolState { offset, offset_dirty: false, reserved: HashSet::new(), checked: HashMap::new() },
            );
            self.journal.push(super::Undo::PoolCreated(network.to_string()));
        }
        Ok(())
    }

    /// Reserves `requested`, or the next free address of the pool.
    pub(super) async fn allocate<T: WriteTx>(
        &mut self,
        tx: &mut T,
        network: &str,
        pool: &Pool,
        requested: Option<IpAddr>,
    ) -> Result<IpAddr> {
        self.pool_state(tx, network).await?;
        if let Some(ip) = requested {
            if !pool.usable(ip) {
                return Err(Error::invalid(
                    "spec.ipam.address",
                    format!("{ip} is not an assignable address of the pool of XpuNetwork {network}"),
                ));
            }
            let state = self.pools.get_mut(network).ok_or_else(|| Error::internal("pool state missing"))?;
            state.check(tx, network, &[ip]).await?;
            if let Some(Some((ns, name))) = state.checked.get(&ip) {
                return Err(Error::AlreadyExists(format!(
                    "address {ip} of XpuNetwork {network} is in use by netdev {ns}/{name}"
                )));
            }
            if !state.reserved.insert(ip) {
                return Err(Error::AlreadyExists(format!("address {ip} of XpuNetwork {network} is in use")));
            }
            self.journal.push(super::Undo::PoolReserved(network.to_string(), ip));
            return Ok(ip);
        }
        let capacity = pool.capacity();
        let mut scanned: u128 = 0;
        loop {
            let state = self.pools.get_mut(network).ok_or_else(|| Error::internal("pool state missing"))?;
            let window: Vec<(IpAddr, u128)> = pool
                .candidates(state.offset, IPAM_WINDOW)
                .into_iter()
                .filter(|(ip, _)| !state.reserved.contains(ip))
                .collect();
            if window.is_empty() || scanned >= capacity {
                return Err(Error::ResourceExhausted(format!(
                    "the address pool of XpuNetwork {network} is exhausted ({capacity} addresses in use)"
                )));
            }
            let undo_offset = super::Undo::PoolOffset(network.to_string(), state.offset, state.offset_dirty);
            // Candidates already checked are decided without the database; the first one not
            // checked yet starts a fresh window of IPAM_WINDOW addresses asked in one round trip
            // (asking for the window's unknown tail as the offset moves one allocation at a
            // time would cost a round trip per allocation).
            let mut unknown_from = None;
            for (i, (ip, next)) in window.iter().enumerate() {
                match state.checked.get(ip) {
                    Some(None) => {
                        state.reserved.insert(*ip);
                        state.offset = *next;
                        state.offset_dirty = true;
                        self.journal.push(undo_offset);
                        self.journal.push(super::Undo::PoolReserved(network.to_string(), *ip));
                        return Ok(*ip);
                    }
                    Some(Some(_)) => {}
                    None => {
                        unknown_from = Some(if i == 0 { state.offset } else { window[i - 1].1 });
                        scanned += i as u128;
                        break;
                    }
                }
            }
            match unknown_from {
                Some(at) => {
                    state.offset = at;
                    let addrs: Vec<IpAddr> = pool
                        .candidates(at, IPAM_WINDOW)
                        .into_iter()
                        .map(|(ip, _)| ip)
                        .filter(|ip| !state.reserved.contains(ip))
                        .collect();
                    state.check(tx, network, &addrs).await?;
                }
                None => {
                    scanned += window.len() as u128;
                    if let Some((_, next)) = window.last() {
                        state.offset = *next;
                    }
                }
            }
            state.offset_dirty = true;
            self.journal.push(undo_offset);
        }
    }
}
