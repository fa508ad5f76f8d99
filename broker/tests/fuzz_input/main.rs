//! Bad input from the network, property-based: every validator and decoder a gRPC request reaches
//! (`input_from_resource`, `Identity::parse`, the netdev id parser, label selectors, IPAM pools,
//! keys and kinds) never panics and refuses every invalid class with `InvalidArgument` naming
//! the field ([`breaks`]); through a running broker ([`broker`]) random invalid applies are
//! refused writing nothing, free text never fails the store, and size and decoding limits hold.
//!
//! Cases per property are proptest's default (256, or `PROPTEST_CASES`) divided by a weight
//! ([`arb::cases`]). The bad-input suite is this target with `fuzz_rest`, `fuzz_manifest` and
//! tenant-sync's `fuzz_cni`; CI runs it as is (about 20 s of tests). The long run, over a million
//! cases (23.1 × `PROPTEST_CASES`), with `DATABASE_URL` set as `scripts/test.sh` sets it:
//!
//! ```sh
//! PROPTEST_CASES=50000 cargo test -p xpu-broker --test fuzz_input --test fuzz_rest --test fuzz_manifest
//! PROPTEST_CASES=50000 cargo test -p xpu-tenant-sync --test fuzz_cni
//! ```
#![allow(clippy::unwrap_used)]

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod arb;
mod breaks;
mod broker;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;
use xpu_broker::{
    error::Error,
    identity::Identity,
    model::{
        Key, Kind, NetdevId, Selector,
        convert::input_from_resource,
        ipam::Pool,
        object::{ObjectInput, Spec},
        validate::{self, Limits},
    },
};
use xpu_proto::broker::v1 as pb;

use crate::{arb::*, breaks::*};

proptest! {
    #![proptest_config(cases(1))]

    /// The generator of valid objects is right, so that a breakage alone explains a refusal.
    #[test]
    fn valid_objects_are_accepted((meta, spec) in valid_object()) {
        let kind = spec.kind();
        let res = resource(Some(meta), Some(spec), kind);
        let got = input_from_resource(&res, &Limits::default());
        prop_assert!(got.is_ok(), "{got:?}");
    }

    /// Every invalid class is refused with InvalidArgument naming exactly the broken field.
    #[test]
    fn each_invalid_class_names_its_field(case in invalid_case()) {
        let got = input_from_resource(&case.res, &Limits::default());
        prop_assert_eq!(field_of(&got), Some(case.field.as_str()), "{:?}", got);
        let msg = got.unwrap_err().to_string();
        prop_assert!(msg.starts_with(&format!("invalid {}: ", case.field)), "{msg}");
    }

    /// Arbitrary values in place of any part of a valid spec (types, sizes and unicode all
    /// wrong): the decoder and validators refuse with InvalidArgument naming a spec field, or
    /// accept something that still meets the invariants.
    #[test]
    fn mutated_specs_never_panic(
        (meta, spec) in valid_object(),
        pick in 0usize..64,
        with in any_json(),
        name in prop_oneof![3 => Just(None), 1 => any_text().prop_map(Some)],
        namespace in prop_oneof![3 => Just(None), 1 => any_text().prop_map(Some)],
        extra in prop::option::of((any_text(), any_text())),
    ) {
        let kind = spec.kind();
        let mut json = spec.to_json().unwrap();
        let mut n = pick;
        replace_nth(&mut json, &mut n, &with);
        let mut meta = meta;
        if let Some(name) = name { meta.name = name; }
        if let Some(ns) = namespace { meta.namespace = ns; }
        if let Some((k, v)) = extra { meta.labels.insert(k, v); }
        let spec = match Spec::from_json(kind, json, "spec") {
            Ok(s) => s,
            Err(e) => {
                prop_assert!(matches!(&e, Error::InvalidArgument { field, .. } if field == "spec"), "{e:?}");
                return Ok(());
            }
        };
        let got = input_from_resource(&resource(Some(meta), Some(spec), kind), &Limits::default());
        match got {
            Ok(input) => {
                prop_assert!(is_dns_subdomain(&input.key.name), "{:?}", input.key);
                prop_assert_eq!(input.key.namespace.is_empty(), !kind.namespaced());
                prop_assert!(input.labels.iter().all(|(k, v)| is_label_key(k) && is_label_value(v)));
                let again = input_from_resource(&resource(Some(meta_of(&input)), Some(input.spec.clone()), kind), &Limits::default());
                prop_assert!(again.is_ok(), "accepted input must stay accepted: {again:?}");
            }
            Err(Error::InvalidArgument { field, reason }) => {
                prop_assert!(field.starts_with("metadata") || field.starts_with("spec"), "{field}: {reason}");
                prop_assert!(!reason.is_empty());
            }
            Err(other) => prop_assert!(false, "not InvalidArgument: {other:?}"),
        }
    }

    #[test]
    fn identities_parse_or_name_the_identity(s in prop_oneof![
        any_text(),
        (prop_oneof![Just("dpu"), Just("host"), Just("admin"), Just("cluster"), Just("root"), Just("")],
            any_text(), prop::option::of(prop_oneof![Just("tenant".to_string()), Just("infra".to_string()), any_text()]))
            .prop_map(|(k, n, side)| match side { Some(s) => format!("{k}/{n}/{s}"), None => format!("{k}/{n}") }),
    ]) {
        match Identity::parse(&s) {
            Ok(id) => {
                prop_assert_eq!(id.to_string(), s.clone(), "an accepted identity is spelled one way");
                let name = s.split('/').nth(1).unwrap();
                let ok = match &id {
                    Identity::Host(_) => is_dns_subdomain(name),
                    _ => is_dns_label(name),
                };
                prop_assert!(ok, "{s:?} accepted with a bad name");
            }
            Err(e) => prop_assert_eq!(named(e), "identity"),
        }
    }

    #[test]
    fn valid_identities_round_trip(name in label(), node in subdomain(), which in 0u8..5) {
        let s = match which {
            0 => format!("dpu/{name}"),
            1 => format!("host/{node}"),
            2 => format!("admin/{name}"),
            3 => format!("cluster/{name}/tenant"),
            _ => format!("cluster/{name}/infra"),
        };
        prop_assert_eq!(Identity::parse(&s).unwrap().to_string(), s);
    }

    /// The netdev id parser: arbitrary text never panics, and whatever parses is spelled one
    /// way (so two ids never name the same VF).
    #[test]
    fn netdev_ids_parse_canonically(s in prop_oneof![
        any_text(),
        (any_text(), any_text(), prop_oneof![Just("-vf"), Just("-sf"), Just("-xf")], "[0-9]{0,8}")
            .prop_map(|(a, b, m, d)| format!("{a}-pf{b}{m}{d}")),
    ]) {
        if let Some(id) = NetdevId::parse(&s) {
            prop_assert_eq!(id.format(), s.clone());
            prop_assert!(!id.serial.is_empty());
        }
    }

    #[test]
    fn generated_netdev_ids_round_trip(id in netdev_id()) {
        let parsed = NetdevId::parse(&id);
        prop_assert!(parsed.is_some(), "{id}");
        prop_assert_eq!(parsed.unwrap().format(), id);
    }

    /// Labels and selectors: accepted exactly when every key and value is valid (the oracle),
    /// refused naming the label.
    #[test]
    fn labels_agree_with_the_kubernetes_rules(
        map in prop::collection::btree_map(
            prop_oneof![label_key(), any_text()], prop_oneof![label_name().boxed(), Just(String::new()), any_text()], 0..6),
    ) {
        let got = validate::labels(&map, "labelSelector.matchLabels", &Limits::default());
        let bad = map.iter().find(|(k, v)| !is_label_key(k) || !is_label_value(v));
        match bad {
            None => prop_assert!(got.is_ok(), "{got:?}"),
            Some((k, _)) => {
                let field = format!("labelSelector.matchLabels[{k:?}]");
                prop_assert_eq!(field_of(&got), Some(field.as_str()));
            }
        }
        // A selector made of a subset of labels matches them.
        let sel = Selector(map.iter().take(2).map(|(k, v)| (k.clone(), v.clone())).collect());
        prop_assert!(sel.matches(&map));
    }

    #[test]
    fn macs_agree_with_the_oracle(s in prop_oneof![usable_mac().boxed(), bad_mac(), any_text()]) {
        let got = validate::mac(&s, "spec.macAddress");
        prop_assert_eq!(got.is_ok(), is_usable_mac(&s), "{:?} → {:?}", s, got);
        match got {
            Ok(norm) => prop_assert_eq!(norm, s.to_ascii_lowercase().replace('-', ":")),
            Err(e) => prop_assert_eq!(named(e), "spec.macAddress"),
        }
    }

    /// Keys and kinds of requests: any number as a kind, any text as name or namespace.
    #[test]
    fn keys_are_validated(kind in any::<i32>(), namespace in any_text(), name in any_text()) {
        let key = pb::ObjectKey { kind, namespace: namespace.clone(), name: name.clone() };
        match Key::from_proto(Some(&key), "key") {
            Ok(k) => {
                prop_assert!(is_dns_subdomain(&k.name));
                let scoped = if k.kind.namespaced() { is_dns_label(&k.namespace) } else { k.namespace.is_empty() };
                prop_assert!(scoped, "{:?}", k);
            }
            Err(e) => {
                let f = Some(named(e));
                let expected = if !(1..=7).contains(&kind) { "key.kind" } else if !is_dns_subdomain(&name) { "key.name" } else { "key.namespace" };
                prop_assert_eq!(f.as_deref(), Some(expected));
            }
        }
    }

    /// IPAM pools of arbitrary text and of near-valid random shapes: refused naming a
    /// `spec.ipam` field, or a pool whose candidates are all usable, inside, not the gateway
    /// nor excluded, and no more than its capacity.
    #[test]
    fn ipam_pools_are_validated(
        v6 in prop::bool::ANY,
        a in any::<u128>(),
        len in 0u8..=128,
        fuzz in prop::option::of((0u8..5, any_text())),
        gw_off in prop::option::of(any::<u128>()),
        range in (prop::option::of(any::<u128>()), prop::option::of(any::<u128>())),
        excl in prop::collection::vec((any::<u128>(), 0u8..=128), 0..4),
        cursor in any::<u128>(),
    ) {
        let (base, max): (IpAddr, u8) =
            if v6 { (IpAddr::V6(Ipv6Addr::from(a)), 128) } else { (IpAddr::V4(Ipv4Addr::from(a as u32)), 32) };
        let net = IpNet::new(base, len % (max + 1)).unwrap().trunc();
        let at = |off: u128| -> String {
            match net {
                IpNet::V4(n) => Ipv4Addr::from(u32::from(n.network()).wrapping_add(off as u32)).to_string(),
                IpNet::V6(n) => Ipv6Addr::from(u128::from(n.network()).wrapping_add(off)).to_string(),
            }
        };
        let span_bits = u32::from(max - net.prefix_len());
        let small = |x: u128| if span_bits >= 128 { x } else { x % (1u128 << span_bits).max(1) * 2 };
        let mut p = pb::IpPool {
            cidr: net.to_string(),
            gateway: gw_off.map(|o| at(small(o))).unwrap_or_default(),
            exclude: excl.iter().map(|(o, l)| {
                let ip: IpAddr = at(small(*o)).parse().unwrap();
                IpNet::new(ip, l % (max + 1)).unwrap().trunc().to_string()
            }).collect(),
            range_start: range.0.map(|o| at(small(o))).unwrap_or_default(),
            range_end: range.1.map(|o| at(small(o))).unwrap_or_default(),
        };
        if let Some((which, text)) = fuzz {
            match which {
                0 => p.cidr = text,
                1 => p.gateway = text,
                2 => p.range_start = text,
                3 => p.range_end = text,
                _ => p.exclude.push(text),
            }
        }
        match Pool::from_spec(&p) {
            Ok(pool) => {
                let cap = pool.capacity();
                prop_assert!(cap <= 1u128 << 64, "capacity {cap}");
                let got = pool.candidates(cursor, 16);
                prop_assert!(got.len() as u128 <= cap.min(16));
                prop_assert_eq!(got.len() as u128, cap.min(16), "a pool hands out up to its capacity");
                for (ip, _) in &got {
                    prop_assert!(pool.network().contains(ip));
                    prop_assert!(pool.usable(*ip), "{ip} handed out but not usable");
                    prop_assert!(Some(*ip) != pool.gateway(), "the gateway {ip} handed out");
                    for ex in &p.exclude {
                        if let Ok(ex) = ex.parse::<IpNet>() { prop_assert!(!ex.contains(ip), "{ip} is excluded by {ex}"); }
                        if let Ok(ex) = ex.parse::<IpAddr>() { prop_assert!(ex != *ip, "{ip} is excluded"); }
                    }
                }
            }
            Err(e) => {
                let f = Some(named(e));
                prop_assert!(f.as_deref().is_some_and(|f| f.starts_with("spec.ipam.")), "{f:?}");
            }
        }
    }

    #[test]
    fn kinds_from_any_number(v in any::<i32>()) {
        match Kind::from_proto(v, "kind") {
            Ok(k) => prop_assert_eq!(k.to_proto() as i32, v),
            Err(e) => {
                prop_assert!(!(1..=7).contains(&v));
                prop_assert_eq!(named(e), "kind");
            }
        }
    }
}

fn meta_of(input: &ObjectInput) -> pb::ObjectMeta {
    mk_meta(input.key.name.clone(), input.key.namespace.clone(), input.labels.clone())
}

/// Refusals by field over a run of the invalid classes (indices and label keys folded), printed
/// for the suite's report; every kind of spec and the metadata must have been refused.
#[test]
fn invalid_classes_tally() {
    // At least 2048 cases: with some sixty classes drawn uniformly, a class goes unseen with
    // probability below e^-30, so the coverage check cannot flake.
    let mut config = cases(1);
    config.cases = config.cases.max(2048);
    let n = config.cases;
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let tally = std::cell::RefCell::new(std::collections::BTreeMap::<String, u64>::new());
    runner
        .run(&invalid_case(), |case| {
            let got = input_from_resource(&case.res, &Limits::default());
            prop_assert_eq!(field_of(&got), Some(case.field.as_str()));
            let folded: String = {
                let mut out = String::new();
                let mut depth = 0;
                for c in case.field.chars() {
                    match c {
                        '[' => {
                            depth += 1;
                            if depth == 1 {
                                out.push_str("[_");
                            }
                        }
                        ']' => {
                            depth -= 1;
                            if depth == 0 {
                                out.push(']');
                            }
                        }
                        c if depth == 0 => out.push(c),
                        _ => {}
                    }
                }
                out
            };
            *tally.borrow_mut().entry(folded).or_default() += 1;
            Ok(())
        })
        .unwrap();
    let tally = tally.into_inner();
    eprintln!("invalid classes: {n} cases, refusals by field: {tally:?}");
    for prefix in ["object", "metadata.", "spec.netdevId", "spec.vlanId", "spec.loopbackIpPrefix", "spec.rules"] {
        assert!(tally.keys().any(|k| k.starts_with(prefix)), "no refusal of {prefix}: {tally:?}");
    }
}
