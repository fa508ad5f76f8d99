//! Address pool arithmetic for broker-side IPAM. No storage here: the store keeps the
//! allocations (unique per network and address in the database) and a cursor per pool, and asks
//! the pool which addresses come next.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use xpu_proto::broker::v1 as pb;

use super::validate;
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct Pool {
    net: IpNet,
    gateway: Option<IpAddr>,
    /// Inclusive offsets from the network address that may be handed out.
    first: u128,
    last: u128,
    /// Sorted, merged, inclusive offset ranges that are never handed out.
    excluded: Vec<(u128, u128)>,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl Pool {
    pub fn from_spec(spec: &pb::IpPool) -> Result<Pool> {
        let net = validate::prefix(&spec.cidr, "spec.ipam.cidr")?;
        let size_bits = u32::from(net.max_prefix_len() - net.prefix_len());
        if size_bits > 64 {
            return Err(Error::invalid(
                "spec.ipam.cidr",
                format!("{} is larger than a /64; pools are limited to 2^64 addresses", spec.cidr),
            ));
        }
        let span: u128 = (1u128 << size_bits) - 1;
        // IPv4 networks larger than /31 lose their network and broadcast addresses.
        let (mut first, mut last) = (0u128, span);
        if net.addr().is_ipv4() && size_bits >= 2 {
            first = 1;
            last = span - 1;
        } else if net.addr().is_ipv6() && size_bits >= 1 {
            // The subnet-router anycast address.
            first = 1;
        }
        let gateway = if spec.gateway.is_empty() {
            None
        } else {
            let gw = validate::ip(&spec.gateway, "spec.ipam.gateway")?;
            if !net.contains(&gw) {
                return Err(Error::invalid("spec.ipam.gateway", format!("{gw} is outside {}", spec.cidr)));
            }
            Some(gw)
        };
        let base = to_u128(net.network());
        let offset_in = |ip: IpAddr, field: &str| -> Result<u128> {
            if !net.contains(&ip) {
                return Err(Error::invalid(field, format!("{ip} is outside {}", spec.cidr)));
            }
            Ok(to_u128(ip) - base)
        };
        if !spec.range_start.is_empty() {
            let start = validate::ip(&spec.range_start, "spec.ipam.rangeStart")?;
            first = first.max(offset_in(start, "spec.ipam.rangeStart")?);
        }
        if !spec.range_end.is_empty() {
            let end = validate::ip(&spec.range_end, "spec.ipam.rangeEnd")?;
            last = last.min(offset_in(end, "spec.ipam.rangeEnd")?);
        }
        if first > last {
            return Err(Error::invalid("spec.ipam.rangeEnd", "the range holds no usable address"));
        }
        let mut excluded = Vec::new();
        for (i, ex) in spec.exclude.iter().enumerate() {
            let field = format!("spec.ipam.exclude[{i}]");
            let ex_net = validate::address_or_prefix(ex, &field)?;
            if ex_net.addr().is_ipv4() != net.addr().is_ipv4() {
                return Err(Error::invalid(field, format!("{ex} is not in the pool's address family")));
            }
            let lo = to_u128(ex_net.network()).saturating_sub(base);
            let hi = to_u128(ex_net.broadcast()).saturating_sub(base);
            if to_u128(ex_net.broadcast()) < base || lo > span {
                continue;
            }
            excluded.push((lo, hi.min(span)));
        }
        if let Some(gw) = gateway {
            let off = to_u128(gw) - base;
            excluded.push((off, off));
        }
        excluded.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(excluded.len());
        for (lo, hi) in excluded {
            match merged.last_mut() {
                Some(prev) if lo <= prev.1.saturating_add(1) => prev.1 = prev.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Ok(Pool { net, gateway, first, last, excluded: merged })
    }

    pub fn prefix_len(&self) -> u8 {
        self.net.prefix_len()
    }

    pub fn gateway(&self) -> Option<IpAddr> {
        self.gateway
    }

    pub fn network(&self) -> IpNet {
        self.net
    }

    /// Number of addresses the pool can hand out.
    pub fn capacity(&self) -> u128 {
        let mut total = self.last - self.first + 1;
        for &(lo, hi) in &self.excluded {
            let (lo, hi) = (lo.max(self.first), hi.min(self.last));
            if lo <= hi {
                total -= hi - lo + 1;
            }
        }
        total
    }

    fn addr_at(&self, offset: u128) -> IpAddr {
        let value = to_u128(self.net.network()) + offset;
        match self.net {
            // Offsets stay inside the network, so the value fits the family.
            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(value).unwrap_or(u32::MAX))),
            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(value)),
        }
    }

    /// Whether `ip` may be handed out by this pool (inside the range, not excluded).
    pub fn usable(&self, ip: IpAddr) -> bool {
        if !self.net.contains(&ip) {
            return false;
        }
        let off = to_u128(ip) - to_u128(self.net.network());
        off >= self.first && off <= self.last && self.exclusion_end(off).is_none()
    }

    fn exclusion_end(&self, off: u128) -> Option<u128> {
        self.excluded.iter().find(|(lo, hi)| off >= *lo && off <= *hi).map(|(_, hi)| *hi)
    }

    /// Up to `n` usable addresses starting at offset `cursor` (wrapping around once), with the
    /// offset to continue from after each.
    pub fn candidates(&self, cursor: u128, n: usize) -> Vec<(IpAddr, u128)> {
        let mut out = Vec::with_capacity(n);
        let span = self.last - self.first + 1;
        let mut off = if cursor < self.first || cursor > self.last { self.first } else { cursor };
        let mut scanned: u128 = 0;
        while out.len() < n && scanned < span {
            if let Some(hi) = self.exclusion_end(off) {
                let skip = hi.min(self.last) - off + 1;
                scanned += skip;
                off = if hi >= self.last { self.first } else { hi + 1 };
                continue;
            }
            let next = if off == self.last { self.first } else { off + 1 };
            out.push((self.addr_at(off), next));
            scanned += 1;
            off = next;
        }
        out
    }

    /// `ip/prefix` as an interface address.
    pub fn interface_address(&self, ip: IpAddr) -> String {
        format!("{ip}/{}", self.net.prefix_len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str, gw: &str, exclude: &[&str]) -> Pool {
        Pool::from_spec(&pb::IpPool {
            cidr: cidr.into(),
            gateway: gw.into(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn v4_pool_skips_network_broadcast_gateway_and_exclusions() {
        let p = pool("10.0.0.0/29", "10.0.0.1", &["10.0.0.4/31"]);
        // .1 gateway, .4-.5 excluded, .0/.7 network/broadcast: .2 .3 .6 left.
        assert_eq!(p.capacity(), 3);
        let got: Vec<String> = p.candidates(0, 10).into_iter().map(|(ip, _)| ip.to_string()).collect();
        assert_eq!(got, ["10.0.0.2", "10.0.0.3", "10.0.0.6"]);
        assert!(!p.usable("10.0.0.5".parse().unwrap()));
        assert!(p.usable("10.0.0.6".parse().unwrap()));
    }

    #[test]
    fn cursor_wraps_around_once() {
        let p = pool("10.0.0.0/29", "", &[]);
        let (_, after_first) = p.candidates(0, 1)[0];
        let got: Vec<String> = p.candidates(6, 10).into_iter().map(|(ip, _)| ip.to_string()).collect();
        assert_eq!(got, ["10.0.0.6", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]);
        assert_eq!(after_first, 2);
    }

    #[test]
    fn v6_and_errors() {
        let p = pool("fd00::/120", "fd00::1", &[]);
        assert_eq!(p.capacity(), 254);
        assert_eq!(p.candidates(0, 1)[0].0.to_string(), "fd00::2");
        let bad = Pool::from_spec(&pb::IpPool {
            cidr: "10.0.0.0/24".into(),
            gateway: "10.0.1.1".into(),
            ..Default::default()
        });
        assert!(matches!(bad, Err(Error::InvalidArgument { field, .. }) if field == "spec.ipam.gateway"));
        let bad = Pool::from_spec(&pb::IpPool { cidr: "10.0.0.1/24".into(), ..Default::default() });
        assert!(matches!(bad, Err(Error::InvalidArgument { field, .. }) if field == "spec.ipam.cidr"));
    }
}
