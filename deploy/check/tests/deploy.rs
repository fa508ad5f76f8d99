//! The checks of `deploy/`, offline. Each test says what it guarantees; `src/` has the machinery
//! and unit tests proving that every policy rule can fail.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use clap::CommandFactory as _;
use serde_json::{Value, json};
use xpu_deploy_check::{
    deploy_dir, exceptions::Exceptions, ident, manifest_files, parse_yaml_stream, policy, render, render::Rendered,
    repo_root, schema,
};

struct Fixture {
    rendered: Vec<Rendered>,
    errors: Vec<String>,
}

/// Every kustomization rendered once for all tests.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let kubectl = render::kubectl().unwrap_or_else(|e| panic!("{e}"));
        let (rendered, errors) = render::render_all(&kubectl);
        Fixture { rendered, errors }
    })
}

fn rendered() -> &'static [Rendered] {
    &fixture().rendered
}

fn overlays() -> impl Iterator<Item = &'static Rendered> {
    rendered().iter().filter(|r| r.is_overlay())
}

fn find<'a>(r: &'a Rendered, kind: &str, name: &str) -> Option<&'a Value> {
    r.objects.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

fn get<'a>(r: &'a Rendered, kind: &str, name: &str) -> &'a Value {
    find(r, kind, name).unwrap_or_else(|| panic!("{}: no {kind}/{name}", r.dir))
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn strs(v: &Value) -> Vec<&str> {
    arr(v).iter().filter_map(Value::as_str).collect()
}

fn fail_on(what: &str, errors: &[String]) {
    assert!(errors.is_empty(), "{what}:\n  {}", errors.join("\n  "));
}

// ---- (1) rendering --------------------------------------------------------------------------------

/// Every kustomization under deploy/ (bases, overlays, examples) renders with `kubectl kustomize`,
/// and the three areas each have a base and at least one overlay.
#[test]
fn every_kustomization_renders() {
    fail_on("kustomizations that do not render", &fixture().errors);
    let dirs: BTreeSet<&str> = rendered().iter().map(|r| r.dir.as_str()).collect();
    for area in ["management", "tenant", "infra"] {
        assert!(dirs.contains(format!("{area}/base").as_str()), "no {area}/base in {dirs:?}");
        assert!(dirs.iter().any(|d| d.starts_with(&format!("{area}/overlays/"))), "no {area} overlay in {dirs:?}");
    }
    for must in ["management/overlays/production", "management/overlays/cloudnativepg", "tenant/examples"] {
        assert!(dirs.contains(must), "{must} is missing: {dirs:?}");
    }
}

/// A broken kustomization is reported, not skipped.
#[test]
fn the_render_check_catches_a_broken_kustomization() {
    let kubectl = render::kubectl().unwrap_or_else(|e| panic!("{e}"));
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("broken-kustomization-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kustomization.yaml"), "resources:\n  - missing.yaml\n").unwrap();
    let err = render::render(&kubectl, &dir).unwrap_err();
    assert!(err.contains("missing.yaml"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- (2) schemas ----------------------------------------------------------------------------------

fn python() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        schema::python(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xpu-deploy-check"))
            .unwrap_or_else(|e| panic!("{e}"))
    })
}

/// Every rendered object, and every CRD in deploy/crds/, validates against the Kubernetes
/// OpenAPI schemas of the supported versions (strict: unknown fields are errors), or — for a
/// custom kind — against its CRD's openAPIV3Schema (ours from deploy/crds/, third-party subsets
/// from deploy/check/schemas/).
#[test]
fn rendered_objects_validate_against_their_schemas() {
    let mut objects = schema::objects_of(rendered());
    for f in std::fs::read_dir(deploy_dir().join("crds")).unwrap() {
        let f = f.unwrap().path();
        for o in parse_yaml_stream(&std::fs::read_to_string(&f).unwrap()).unwrap() {
            objects.push((xpu_deploy_check::rel(&f), o));
        }
    }
    let (checked, errors) = schema::validate(python(), &objects, schema::VERSIONS).unwrap_or_else(|e| panic!("{e}"));
    fail_on("objects that do not validate", &errors.iter().map(ToString::to_string).collect::<Vec<_>>());
    assert_eq!(checked as usize, objects.len() * schema::VERSIONS.len(), "every object checked for every version");
}

/// The schema check rejects what the API server (or the CRD) would: unknown fields, wrong types,
/// missing required fields, bad enums, unknown kinds.
#[test]
fn the_schema_check_catches_invalid_objects() {
    let bad = [
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "a"},
               "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "c", "image": "i:1", "imagePullPolicyy": "Always"}]}}}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": "http"}]}}),
        json!({"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "a"},
               "spec": {"secretName": "s", "issuerRef": {"name": "i"}, "usages": ["server-auth"]}}),
        json!({"apiVersion": "xpu.opi.dev/v1alpha1", "kind": "XpuNetwork", "metadata": {"name": "a"},
               "spec": {"ipam": {"gateway": "10.0.0.1"}}}),
        json!({"apiVersion": "xpu.opi.dev/v1alpha1", "kind": "Netdev", "metadata": {"name": "a", "namespace": "n"},
               "spec": {"netdevId": "x", "bogus": 1}}),
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "a"}}),
    ];
    let objects: Vec<(String, Value)> = bad.iter().map(|o| ("synthetic".to_string(), o.clone())).collect();
    let (_, errors) = schema::validate(python(), &objects, &["1.30"]).unwrap_or_else(|e| panic!("{e}"));
    for o in &bad {
        let id = format!("{}/{}", o["kind"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap());
        assert!(errors.iter().any(|e| e.object == id), "no schema error for {id}: {errors:#?}");
    }
}

// ---- (3) policy ---------------------------------------------------------------------------------

/// The security and operability policy (see `policy.rs`) holds for every rendered kustomization,
/// every exception is declared by a well-formed `# policy: allow` comment, and every such
/// comment excuses something that is really there.
#[test]
fn policy_holds() {
    let ex =
        Exceptions::scan(&manifest_files()).unwrap_or_else(|e| panic!("bad policy comments:\n  {}", e.join("\n  ")));
    let scopes = policy::Scopes::from_crd_files(&schema::crd_files()).unwrap();
    let violations = policy::check(rendered(), &ex, &scopes);
    fail_on("policy violations", &violations);
    fail_on("unused policy exceptions", &ex.unused());
    assert!(!ex.is_empty());
}

/// What the issue asks of each area is in every overlay.
#[test]
fn overlays_have_what_each_area_needs() {
    let wanted: &[(&str, &[(&str, &str)])] = &[
        (
            "management",
            &[
                ("Deployment", "xpu-broker"),
                ("Service", "xpu-broker"),
                ("Service", "xpu-broker-http"),
                ("PodDisruptionBudget", "xpu-broker"),
                ("NetworkPolicy", "xpu-broker"),
                ("ServiceMonitor", "xpu-broker"),
                ("ConfigMap", "xpu-broker-dashboard"),
            ],
        ),
        (
            "tenant",
            &[
                ("Deployment", "xpu-tenant-sync"),
                ("PodDisruptionBudget", "xpu-tenant-sync"),
                ("ClusterRole", "xpu-tenant-sync"),
                ("Role", "xpu-tenant-sync"),
                ("DaemonSet", "xpu-node"),
                ("Certificate", "xpu-tenant-sync"),
            ],
        ),
        (
            "infra",
            &[
                ("Deployment", "xpu-infra-sync"),
                ("PodDisruptionBudget", "xpu-infra-sync"),
                ("ClusterRole", "xpu-infra-sync"),
                ("Role", "xpu-infra-sync"),
                ("DaemonSet", "xpu-dpu-agent"),
                ("Certificate", "xpu-infra-sync"),
            ],
        ),
    ];
    for r in overlays() {
        let (_, objs) = wanted.iter().find(|(a, _)| *a == r.area()).unwrap_or_else(|| panic!("unknown area {}", r.dir));
        for (kind, name) in *objs {
            if *kind == "Certificate" && !r.objects.iter().any(|o| o["kind"] == "Issuer") {
                continue;
            }
            get(r, kind, name);
        }
        match r.area() {
            "management" => {
                let d = get(r, "Deployment", "xpu-broker");
                assert!(d["spec"]["replicas"].as_i64().unwrap_or(1) >= 2, "{}: the broker needs 2+ replicas", r.dir);
                let anti = &d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
                assert!(!anti.is_null(), "{}: the broker has no pod anti-affinity", r.dir);
                let env = &d["spec"]["template"]["spec"]["containers"][0]["env"];
                let db = arr(env).iter().find(|e| e["name"] == "DATABASE_URL").expect("DATABASE_URL");
                assert!(!db["valueFrom"]["secretKeyRef"].is_null(), "{}: DATABASE_URL must come from a Secret", r.dir);
            }
            area => {
                let sync = get(r, "Deployment", &format!("xpu-{area}-sync"));
                let env: Vec<&str> = arr(&sync["spec"]["template"]["spec"]["containers"][0]["env"])
                    .iter()
                    .filter_map(|e| e["name"].as_str())
                    .collect();
                for leader_election in ["POD_NAME", "POD_NAMESPACE", "XPU_LEASE_NAME"] {
                    assert!(env.contains(&leader_election), "{}: {area}-sync has no {leader_election}", r.dir);
                }
            }
        }
        if r.area() == "tenant" {
            let ds = get(r, "DaemonSet", "xpu-node");
            let spec = &ds["spec"]["template"]["spec"];
            let host_paths: BTreeMap<&str, &str> = arr(&spec["volumes"])
                .iter()
                .filter_map(|v| Some((v["name"].as_str()?, v["hostPath"]["path"].as_str()?)))
                .collect();
            for p in ["/var/lib/kubelet/device-plugins", "/var/lib/kubelet/pod-resources", "/opt/cni/bin", "/run/xpu"] {
                assert!(host_paths.values().any(|h| *h == p), "{}: xpu-node does not mount {p}", r.dir);
            }
            let init = arr(&spec["initContainers"]);
            let installs = init.iter().any(|c| {
                let script = strs(&c["command"]).join(" ");
                script.contains("xpu-cni")
                    && arr(&c["volumeMounts"]).iter().any(|m| {
                        host_paths.get(m["name"].as_str().unwrap_or_default()) == Some(&"/opt/cni/bin")
                            && script.contains(m["mountPath"].as_str().unwrap_or("\u{0}"))
                    })
            });
            assert!(installs, "{}: no init container installs xpu-cni into the host's CNI bin dir", r.dir);
            assert!(!spec["nodeSelector"].is_null(), "{}: xpu-node runs on every node", r.dir);
        }
        if r.area() == "infra" {
            let ds = get(r, "DaemonSet", "xpu-dpu-agent");
            let spec = &ds["spec"]["template"]["spec"];
            assert_eq!(spec["hostNetwork"], true, "{}: dpu-agent needs the host network", r.dir);
            assert!(spec["nodeSelector"].as_object().is_some_and(|m| !m.is_empty()), "{}: no DPU node selector", r.dir);
            let c = &spec["containers"][0];
            let added = strs(&c["securityContext"]["capabilities"]["add"]);
            assert!(
                added.iter().all(|c| *c == "NET_ADMIN"),
                "{}: dpu-agent adds {added:?}; it needs NET_ADMIN only",
                r.dir
            );
            let dataplane = config_value(r, c, "XPU_DATAPLANE").unwrap_or_else(|| "linux".into());
            assert_eq!(
                added == ["NET_ADMIN"],
                dataplane == "linux",
                "{}: NET_ADMIN is for (and only for) the linux dataplane, this one is {dataplane}",
                r.dir
            );
        }
    }
}

/// The value of an env var of a container as deployed (literal or from a rendered ConfigMap).
fn config_value(r: &Rendered, c: &Value, var: &str) -> Option<String> {
    let e = arr(&c["env"]).iter().find(|e| e["name"] == var)?;
    if let Some(v) = e["value"].as_str() {
        return Some(v.to_string());
    }
    let cm = &e["valueFrom"]["configMapKeyRef"];
    let name = cm["name"].as_str()?;
    r.objects.iter().find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == name)?["data"][cm["key"].as_str()?]
        .as_str()
        .map(str::to_string)
}

// ---- manifests ↔ code -----------------------------------------------------------------------------

/// The clap command of one of our binaries.
fn binary_command(bin: &str) -> Option<clap::Command> {
    Some(match bin {
        "xpu-broker" => xpu_broker::cli::Args::command(),
        "tenant-sync" | "infra-sync" => xpu_sync_common::cluster::args::Args::command(),
        "host-agent" => xpu_tenant_sync::hostagent::args::Args::command(),
        "xpu-device-plugin" => xpu_tenant_sync::deviceplugin::args::Args::command(),
        "dpu-agent" => xpu_infra_sync::agent::args::Args::command(),
        _ => return None,
    })
}

/// The same without environment fallbacks: the manifest's env is turned into flags, so the
/// test's own environment (DATABASE_URL in CI, …) cannot satisfy a setting the manifest lacks.
fn without_env(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| a.env(None::<&'static str>)).mut_subcommands(|s| s.mut_args(|a| a.env(None::<&'static str>)))
}

/// The argv a container runs: its command and args, or the `exec` line of a `sh -c` wrapper
/// (command substitutions become a placeholder).
fn container_argv(c: &Value) -> Vec<String> {
    let cmd: Vec<String> = strs(&c["command"]).into_iter().chain(strs(&c["args"])).map(str::to_string).collect();
    let script = match cmd.as_slice() {
        [sh, flag, script, ..] if sh.ends_with("/sh") && flag == "-c" => script.clone(),
        [bb, sh, flag, script, ..] if bb.ends_with("busybox") && sh == "sh" && flag == "-c" => script.clone(),
        _ => return cmd,
    };
    let Some(exec) = script.split("exec ").nth(1) else { return vec![] };
    let mut argv = Vec::new();
    let mut cur = String::new();
    let (mut quote, mut depth, mut in_token) = (None::<char>, 0usize, false);
    for ch in exec.chars() {
        match ch {
            '(' if cur.ends_with('$') => {
                depth += 1;
                cur.pop();
                cur.push_str("node-1");
            }
            ')' if depth > 0 => depth -= 1,
            _ if depth > 0 => {}
            '"' | '\'' if quote == Some(ch) => quote = None,
            '"' | '\'' if quote.is_none() => {
                quote = Some(ch);
                in_token = true;
            }
            ';' | '\n' if quote.is_none() => break,
            c if c.is_whitespace() && quote.is_none() => {
                if in_token {
                    argv.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            c => {
                cur.push(c);
                in_token = true;
            }
        }
    }
    if in_token {
        argv.push(cur);
    }
    argv
}

/// Every container of our images runs one of our binaries with flags and environment variables
/// that binary really has, the parse succeeds (required settings present, values valid), the
/// HTTP/gRPC addresses it listens on are the ports the pod declares, and every file or directory
/// it is told to use is on a volume mounted into the container.
#[test]
fn containers_match_the_binaries_command_lines() {
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for r in overlays() {
        for o in &r.objects {
            let Some(t) = policy::pod_template(o) else { continue };
            let spec = &t["spec"];
            for c in arr(&spec["containers"]) {
                let at = format!("{}: {} container {}", r.dir, ident(o), c["name"].as_str().unwrap_or("?"));
                let image = c["image"].as_str().unwrap_or_default();
                if !image.starts_with("ghcr.io/xpu-broker/") {
                    continue;
                }
                let argv = container_argv(c);
                let bin = argv.first().map(|a| a.rsplit('/').next().unwrap_or(a).to_string()).unwrap_or_default();
                let Some(pristine) = binary_command(&bin) else {
                    errors.push(format!("{at}: runs {argv:?}, not one of our binaries (set `command` explicitly)"));
                    continue;
                };
                seen.insert(bin.clone());
                let sub = argv.get(1).filter(|a| !a.starts_with('-')).cloned();
                let mut full = argv.clone();
                for e in arr(&c["env"]) {
                    let name = e["name"].as_str().unwrap_or_default();
                    let value = if let Some(v) = e["value"].as_str() {
                        v.to_string()
                    } else if let Some(v) = config_value(r, c, name) {
                        v
                    } else if !e["valueFrom"]["fieldRef"].is_null() {
                        "field-value".to_string()
                    } else {
                        "from-a-secret".to_string()
                    };
                    let target = sub.as_deref().and_then(|s| pristine.find_subcommand(s)).unwrap_or(&pristine);
                    let long = target
                        .get_arguments()
                        .chain(pristine.get_arguments())
                        .find(|a| a.get_env().is_some_and(|n| n == name))
                        .and_then(|a| a.get_long());
                    match long {
                        Some(long) => full.push(format!("--{long}={value}")),
                        None => errors.push(format!("{at}: {bin} does not read the environment variable {name}")),
                    }
                }
                let mut cmd = without_env(pristine);
                full[0] = bin.clone();
                let matches = match cmd.try_get_matches_from_mut(&full) {
                    Ok(m) => m,
                    Err(e) => {
                        errors.push(format!("{at}: `{}` does not parse: {}", full.join(" "), e.render()));
                        continue;
                    }
                };
                let (m, target) = match &sub {
                    Some(s) => {
                        (matches.subcommand_matches(s).unwrap_or(&matches), cmd.find_subcommand(s).unwrap_or(&cmd))
                    }
                    None => (&matches, &cmd),
                };
                for (id, port_name) in [("http_addr", "http"), ("grpc_addr", "grpc")] {
                    if let Ok(Some(addr)) = m.try_get_one::<std::net::SocketAddr>(id) {
                        let declared = arr(&c["ports"]).iter().find(|p| p["name"] == port_name);
                        match declared {
                            Some(p) if p["containerPort"].as_u64() == Some(u64::from(addr.port())) => {}
                            _ => errors.push(format!(
                                "{at}: {bin} listens on {addr} ({id}) but the container's port {port_name:?} is {:?}",
                                declared.map(|p| &p["containerPort"])
                            )),
                        }
                    }
                }
                let mounts: Vec<&str> =
                    arr(&c["volumeMounts"]).iter().filter_map(|m| m["mountPath"].as_str()).collect();
                for a in target.get_arguments() {
                    let Ok(Some(path)) = m.try_get_one::<PathBuf>(a.get_id().as_str()) else { continue };
                    if !path.is_absolute() || path.starts_with("/usr") {
                        continue;
                    }
                    let related = mounts.iter().any(|mp| path.starts_with(mp) || Path::new(mp).starts_with(path));
                    if !related {
                        errors.push(format!(
                            "{at}: {bin} uses {} ({}) but no volume is mounted there",
                            path.display(),
                            a.get_id()
                        ));
                    }
                }
            }
        }
    }
    fail_on("containers that do not match their binary", &errors);
    for bin in ["xpu-broker", "tenant-sync", "infra-sync", "host-agent", "xpu-device-plugin", "dpu-agent"] {
        assert!(seen.contains(bin), "no overlay runs {bin}: {seen:?}");
    }
}

/// RBAC grants each syncer exactly the xpu.opi.dev kinds its side watches (from the code), with
/// the verbs the sync engine uses, all of them CRDs in deploy/crds/; its Lease and state ConfigMap
/// are the names the Deployment configures.
#[test]
fn rbac_grants_what_the_syncers_use() {
    use xpu_sync_common::cluster::{Side, kinds};
    let crd_files: BTreeSet<String> = std::fs::read_dir(deploy_dir().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for r in overlays().filter(|r| r.area() != "management") {
        let side = if r.area() == "tenant" { Side::Tenant } else { Side::Infra };
        let name = format!("xpu-{}-sync", side.as_str());
        let plurals: BTreeSet<String> = side.kinds().into_iter().map(|k| kinds::api_resource(k).plural).collect();
        for p in &plurals {
            assert!(crd_files.contains(&format!("{p}.xpu.opi.dev.yaml")), "{p}: not a CRD in deploy/crds/");
        }
        let grants = |o: &Value| -> BTreeMap<(String, String), BTreeSet<String>> {
            let mut g: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
            for rule in arr(&o["rules"]) {
                for group in strs(&rule["apiGroups"]) {
                    for res in strs(&rule["resources"]) {
                        g.entry((group.to_string(), res.to_string()))
                            .or_default()
                            .extend(strs(&rule["verbs"]).into_iter().map(str::to_string));
                    }
                }
            }
            g
        };
        let cluster = grants(get(r, "ClusterRole", &name));
        let xpu: BTreeSet<String> =
            cluster.keys().filter(|(g, _)| g == "xpu.opi.dev").map(|(_, r)| r.clone()).collect();
        let expected: BTreeSet<String> = plurals.iter().flat_map(|p| [p.clone(), format!("{p}/status")]).collect();
        assert_eq!(xpu, expected, "{}: {name} must cover exactly the kinds the {} side watches", r.dir, side.as_str());
        let need = |group: &str, res: &str, verbs: &[&str]| {
            let have = cluster.get(&(group.to_string(), res.to_string()));
            for v in verbs {
                assert!(have.is_some_and(|h| h.contains(*v)), "{}: {name} lacks {v} on {res}", r.dir);
            }
        };
        for p in &plurals {
            need("xpu.opi.dev", p, &["get", "list", "watch", "create", "update", "patch", "delete"]);
            need("xpu.opi.dev", &format!("{p}/status"), &["patch"]);
        }
        need("", "namespaces", &["get", "create"]);
        let pods = cluster.get(&(String::new(), "pods".to_string()));
        match side {
            Side::Tenant => need("", "pods", &["list"]),
            Side::Infra => assert!(pods.is_none(), "{}: infra-sync does not touch pods", r.dir),
        }
        let sync = get(r, "Deployment", &name);
        let lease = config_value(r, &sync["spec"]["template"]["spec"]["containers"][0], "XPU_LEASE_NAME")
            .expect("XPU_LEASE_NAME");
        let role = get(r, "Role", &name);
        let named = |res: &str| -> BTreeSet<String> {
            arr(&role["rules"])
                .iter()
                .filter(|rule| strs(&rule["resources"]).contains(&res))
                .flat_map(|rule| strs(&rule["resourceNames"]))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(named("leases"), BTreeSet::from([lease.clone()]), "{}: the Lease RBAC names", r.dir);
        assert_eq!(
            named("configmaps"),
            BTreeSet::from([format!("{lease}-state")]),
            "{}: the state ConfigMap RBAC",
            r.dir
        );
    }
}

/// Go durations as cert-manager takes them (`2160h`, `90m`, `1h30m`), in seconds.
fn go_duration(s: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let n_end = rest.find(|c: char| !c.is_ascii_digit() && c != '.')?;
        let n: f64 = rest[..n_end].parse().ok()?;
        let unit_end = rest[n_end..].find(|c: char| c.is_ascii_digit()).map_or(rest.len(), |i| n_end + i);
        total += n * match &rest[n_end..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            _ => return None,
        };
        rest = &rest[unit_end..];
    }
    Some(total)
}

/// Every certificate gives its component the identity the broker expects: client certificates
/// carry exactly one `xpu://` URI that the broker's own parser accepts (cluster certificates for
/// the right side and the cluster named in the overlay), server certificates DNS names; all
/// renew before they expire; pods mount the Secrets the Certificates write.
#[test]
fn certificates_carry_the_identities_the_broker_expects() {
    let mut checked = 0;
    for r in overlays() {
        let certs: Vec<&Value> = r.objects.iter().filter(|o| o["kind"] == "Certificate").collect();
        let cluster = find(r, "ConfigMap", "xpu-sync").and_then(|c| c["data"]["cluster"].as_str());
        for c in &certs {
            let id = format!("{}: {}", r.dir, ident(c));
            let spec = &c["spec"];
            let duration = go_duration(spec["duration"].as_str().unwrap_or("2160h")).expect("duration");
            let renew =
                spec["renewBefore"].as_str().and_then(go_duration).unwrap_or_else(|| panic!("{id}: no renewBefore"));
            assert!(renew > 0.0 && renew < duration, "{id}: renewBefore must be within the lifetime");
            let usages = strs(&spec["usages"]);
            let uris: Vec<&str> = strs(&spec["uris"]).into_iter().filter(|u| u.starts_with("xpu://")).collect();
            if spec["isCA"] == true {
                assert!(uris.is_empty(), "{id}: a CA carries no identity");
                continue;
            }
            if usages.contains(&"client auth") {
                assert_eq!(uris.len(), 1, "{id}: a client certificate carries exactly one xpu:// URI: {uris:?}");
                let identity = xpu_broker::identity::Identity::parse(uris[0].trim_start_matches("xpu://"))
                    .unwrap_or_else(|e| panic!("{id}: the broker refuses {}: {e}", uris[0]));
                let s = identity.to_string();
                match r.area() {
                    "management" => assert!(s.starts_with("admin/"), "{id}: {s}"),
                    area => assert_eq!(
                        Some(s.as_str()),
                        cluster.map(|c| format!("cluster/{c}/{area}")).as_deref(),
                        "{id}: the identity must be this cluster's {area} syncer"
                    ),
                }
                checked += 1;
            } else {
                assert!(usages.contains(&"server auth"), "{id}: neither a client nor a server certificate");
                assert!(
                    uris.is_empty() && !strs(&spec["dnsNames"]).is_empty(),
                    "{id}: a server certificate has DNS names"
                );
                checked += 1;
            }
        }
        if certs.is_empty() {
            continue;
        }
        let secrets: BTreeSet<&str> = certs.iter().filter_map(|c| c["spec"]["secretName"].as_str()).collect();
        for o in &r.objects {
            let Some(t) = policy::pod_template(o) else { continue };
            for v in arr(&t["spec"]["volumes"]) {
                if let Some(s) = v["secret"]["secretName"].as_str().filter(|s| s.ends_with("-tls")) {
                    assert!(secrets.contains(s), "{}: {} mounts {s}, which no Certificate writes", r.dir, ident(o));
                }
            }
        }
    }
    assert!(checked >= 4, "only {checked} certificates checked");
}

/// The Grafana dashboard queries only metrics the code exports (the broker's from its renderer,
/// the syncers' from their HTTP handler), shows every one of them, and the monitoring component
/// ships exactly this file.
#[test]
fn dashboard_covers_the_metrics_the_code_exports() {
    let file = deploy_dir().join("management/components/monitoring/dashboards/xpu-broker.json");
    let text = std::fs::read_to_string(&file).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    // What the code exports: name → type.
    let mut exported: BTreeMap<String, String> = BTreeMap::new();
    let broker = xpu_broker::metrics::render(&xpu_broker::metrics::Gauges {
        streams: Vec::new(),
        streams_lagged: 0,
        revision: 0,
    });
    let sync_src = std::fs::read_to_string(repo_root().join("sync-common/src/cluster/http.rs")).unwrap();
    for t in broker.lines().chain(sync_src.split("\\n")) {
        if let Some(rest) = t.find("# TYPE ").map(|i| &t[i + "# TYPE ".len()..]) {
            let mut it = rest.split_whitespace();
            if let (Some(n), Some(k)) = (it.next(), it.next()) {
                exported.insert(n.to_string(), k.to_string());
            }
        }
    }
    for m in [
        "xpu_attach_duration_seconds",
        "xpu_store_commit_duration_seconds",
        "xpu_store_batch_requests_total",
        "xpu_store_batches_total",
        "xpu_streams_active",
        "xpu_streams_lagged_total",
        "xpu_revision",
        "xpu_lease_expirations_total",
        "xpu_tls_handshake_failures_total",
        "xpu_attach_failures_total",
        "xpu_sync_leader",
        "xpu_sync_errors_total",
    ] {
        assert!(exported.contains_key(m), "the code no longer exports {m}: {exported:?}");
    }
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    for p in arr(&dash["panels"]) {
        assert!(ids.insert(p["id"].as_i64().unwrap()), "duplicate panel id {}", p["id"]);
        let g = &p["gridPos"];
        assert!(
            g["x"].as_i64().unwrap() + g["w"].as_i64().unwrap() <= 24,
            "panel {} is wider than the grid",
            p["title"]
        );
        for t in arr(&p["targets"]) {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    // Every metric named anywhere in the dashboard (queries and descriptions) exists; the
    // queries show every exported one.
    let mut used = BTreeSet::new();
    for (e, in_query) in exprs.iter().map(|e| (e.as_str(), true)).chain([(text.as_str(), false)]) {
        let mut rest = e;
        while let Some(i) = [rest.find("xpu_"), rest.find("process_")].into_iter().flatten().min() {
            let tail = &rest[i..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            let series = &tail[..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| series.strip_suffix(s).filter(|b| exported.get(*b).is_some_and(|k| k == "histogram")))
                .unwrap_or(series);
            assert!(exported.contains_key(base), "the dashboard names {series}, which the code does not export");
            if in_query {
                used.insert(base.to_string());
            }
            rest = &tail[end..];
        }
    }
    let unused: Vec<&String> = exported.keys().filter(|m| !used.contains(*m)).collect();
    assert!(unused.is_empty(), "exported metrics the dashboard does not show: {unused:?}");
    for h in exported.iter().filter(|(_, k)| *k == "histogram").map(|(n, _)| n) {
        for q in ["0.5", "0.99"] {
            let want = format!("histogram_quantile({q}, sum by (le) (rate({h}_bucket");
            assert!(exprs.iter().any(|e| e.contains(&want)), "no p{q} panel for {h}");
        }
    }
    for r in rendered().iter().filter(|r| r.area() == "management" && r.is_overlay()) {
        let cm = get(r, "ConfigMap", "xpu-broker-dashboard");
        assert_eq!(
            cm["data"]["xpu-broker.json"].as_str(),
            Some(text.as_str()),
            "{}: the ConfigMap is not the file",
            r.dir
        );
        assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    }
}

/// The NetworkAttachmentDefinition example is a CNI config xpu-cni understands: its type, the
/// keys it reads, the host agent's socket path and resource name as the node DaemonSet sets them.
#[test]
fn the_network_attachment_example_configures_xpu_cni() {
    let examples = rendered().iter().find(|r| r.dir == "tenant/examples").expect("tenant/examples");
    let tenant = overlays().find(|r| r.area() == "tenant").expect("a tenant overlay");
    let node = get(tenant, "DaemonSet", "xpu-node");
    let containers = arr(&node["spec"]["template"]["spec"]["containers"]);
    let agent = containers.iter().find(|c| c["name"] == "host-agent").expect("host-agent");
    let socket = config_value(tenant, agent, "XPU_HOST_AGENT_SOCKET").expect("the host agent's socket");
    let resource = config_value(tenant, agent, "XPU_RESOURCE_NAME").expect("the resource name");
    let known = [
        "cniVersion",
        "name",
        "type",
        "hostAgentSocket",
        "deviceID",
        "runtimeConfig",
        "xpuNetwork",
        "resourceName",
        "cacheDir",
        "timeoutMs",
    ];
    let nads: Vec<&Value> = examples.objects.iter().filter(|o| o["kind"] == "NetworkAttachmentDefinition").collect();
    assert!(!nads.is_empty());
    for nad in nads {
        let conf: Value = serde_json::from_str(nad["spec"]["config"].as_str().unwrap()).expect("config is JSON");
        assert_eq!(conf["type"], "xpu-cni");
        for k in conf.as_object().unwrap().keys() {
            assert!(known.contains(&k.as_str()), "xpu-cni does not read {k:?}");
        }
        assert_eq!(conf["hostAgentSocket"].as_str(), Some(socket.as_str()));
        assert_eq!(conf["resourceName"].as_str(), Some(resource.as_str()));
        assert_eq!(nad["metadata"]["annotations"]["k8s.v1.cni.cncf.io/resourceName"].as_str(), Some(resource.as_str()));
        assert!(xpu_tenant_sync::cni::types::SUPPORTED_VERSIONS.contains(&conf["cniVersion"].as_str().unwrap()));
    }
}

// ---- images -------------------------------------------------------------------------------------

fn cargo_metadata() -> &'static Value {
    static M: OnceLock<Value> = OnceLock::new();
    M.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args(["metadata", "--no-deps", "--format-version", "1", "--offline"])
            .current_dir(repo_root())
            .output()
            .expect("running cargo metadata");
        assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("cargo metadata output")
    })
}

/// One Dockerfile stage: its name and instructions (continuation lines joined).
struct Stage {
    name: Option<String>,
    from: String,
    lines: Vec<String>,
    comment_before_healthcheck: bool,
}

fn dockerfile_stages(text: &str) -> (BTreeMap<String, String>, Vec<Stage>) {
    let mut args = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    let mut joined = String::new();
    let mut last_comment = false;
    for raw in text.lines() {
        let line = raw.trim();
        if joined.is_empty() && (line.starts_with('#') || line.is_empty()) {
            last_comment = line.starts_with('#') && !line.starts_with("# syntax");
            continue;
        }
        joined.push_str(line.trim_end_matches('\\'));
        joined.push(' ');
        if line.ends_with('\\') {
            continue;
        }
        let ins = std::mem::take(&mut joined).trim().to_string();
        let (word, rest) = ins.split_once(' ').unwrap_or((&ins, ""));
        match word {
            "ARG" if stages.is_empty() => {
                if let Some((k, v)) = rest.split_once('=') {
                    args.insert(k.trim().to_string(), v.trim().to_string());
                }
            }
            "FROM" => {
                let mut it = rest.split_whitespace();
                let from = it.next().unwrap_or_default().to_string();
                let name = match (it.next(), it.next()) {
                    (Some(a), Some(n)) if a.eq_ignore_ascii_case("AS") => Some(n.to_string()),
                    _ => None,
                };
                stages.push(Stage { name, from, lines: Vec::new(), comment_before_healthcheck: false });
            }
            _ => {
                if let Some(s) = stages.last_mut() {
                    if word == "HEALTHCHECK" {
                        s.comment_before_healthcheck = last_comment;
                    }
                    s.lines.push(ins.clone());
                }
            }
        }
        last_comment = false;
    }
    (args, stages)
}

/// The Dockerfiles under deploy/images/ are multi-stage, pin every base image by tag, build only
/// binaries the workspace has, run them as a non-root user with a health check on /healthz (or
/// say why not), and every image the manifests use is built by one of them, containing the
/// binary the manifest runs, tagged with the workspace's version.
#[test]
fn dockerfiles_build_the_images_the_manifests_use() {
    let meta = cargo_metadata();
    let version = meta["packages"].as_array().unwrap().iter().find(|p| p["name"] == "xpu-broker").unwrap()["version"]
        .as_str()
        .unwrap()
        .to_string();
    let bins: BTreeSet<String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| arr(&p["targets"]).iter())
        .filter(|t| strs(&t["kind"]).contains(&"bin"))
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect();
    // image repository → binaries it contains
    let mut images: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let dir = deploy_dir().join("images");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "Dockerfile"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "a Dockerfile per binary family: {files:?}");
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            dir.join(format!("{name}.dockerignore")).exists(),
            "{name}: no {name}.dockerignore (target/ would be sent)"
        );
        let (args, stages) = dockerfile_stages(&text);
        assert!(stages.len() >= 2, "{name}: not multi-stage");
        let built: BTreeSet<String> =
            text.split("--bin ").skip(1).map(|s| s.split_whitespace().next().unwrap().to_string()).collect();
        assert!(!built.is_empty(), "{name}: builds no binary");
        for b in &built {
            assert!(bins.contains(b), "{name}: builds {b}, which is not a binary of the workspace ({bins:?})");
        }
        let stage_names: BTreeSet<String> = stages.iter().filter_map(|s| s.name.clone()).collect();
        for s in &stages {
            let mut from = s.from.clone();
            for (k, v) in &args {
                from = from.replace(&format!("${{{k}}}"), v);
            }
            if !stage_names.contains(&from) {
                policy::image_pinned(&from).unwrap_or_else(|e| panic!("{name}: FROM {e}"));
            }
        }
        for s in stages.iter().filter(|s| s.lines.iter().any(|l| l.starts_with("ENTRYPOINT"))) {
            let stage = s.name.clone().unwrap_or_else(|| "(last)".into());
            let user = s
                .lines
                .iter()
                .rev()
                .find_map(|l| l.strip_prefix("USER "))
                .unwrap_or_else(|| panic!("{name} {stage}: no USER"));
            let uid: u32 = user
                .split(':')
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name} {stage}: USER {user} is not numeric"));
            assert_ne!(uid, 0, "{name} {stage}: runs as root");
            let hc = s
                .lines
                .iter()
                .find(|l| l.starts_with("HEALTHCHECK"))
                .unwrap_or_else(|| panic!("{name} {stage}: no HEALTHCHECK"));
            if hc.contains("NONE") {
                assert!(s.comment_before_healthcheck, "{name} {stage}: HEALTHCHECK NONE needs a comment saying why");
            } else {
                assert!(hc.contains("/healthz"), "{name} {stage}: the health check does not use /healthz: {hc}");
            }
            let contents: BTreeSet<String> = s
                .lines
                .iter()
                .filter(|l| l.starts_with("COPY --from=build"))
                .flat_map(|l| {
                    let src = l.split_whitespace().nth(2).unwrap_or_default();
                    match src.strip_prefix("/out/") {
                        Some("") => built.iter().cloned().collect::<Vec<_>>(),
                        Some(b) => vec![b.to_string()],
                        None => vec![],
                    }
                })
                .collect();
            let entry = s.lines.iter().find_map(|l| l.strip_prefix("ENTRYPOINT ")).unwrap();
            assert!(
                contents.iter().any(|b| entry.contains(&format!("/{b}\""))),
                "{name} {stage}: ENTRYPOINT {entry} is not a copied binary"
            );
            // Which image this stage is: the `-t` in the header next to `--target <stage>` (or
            // the only `-t` of a single-image Dockerfile).
            let tags: Vec<(Option<String>, String)> = text
                .lines()
                .filter(|l| l.trim_start().starts_with('#'))
                .collect::<Vec<_>>()
                .windows(2)
                .filter_map(|w| {
                    let t = w[1].split("-t ").nth(1)?.split_whitespace().next()?.to_string();
                    let both = format!("{} {}", w[0], w[1]);
                    let target =
                        both.split("--target ").nth(1).and_then(|x| x.split_whitespace().next()).map(str::to_string);
                    Some((target, t))
                })
                .collect();
            let tag = tags
                .iter()
                .find(|(t, _)| t.as_deref() == s.name.as_deref())
                .or_else(|| (tags.len() == 1).then(|| &tags[0]))
                .map(|(_, t)| t.clone())
                .unwrap_or_else(|| panic!("{name} {stage}: the header does not say which image (-t) it builds"));
            let (repo, tag_version) = tag.rsplit_once(':').unwrap();
            assert_eq!(tag_version, version, "{name}: documented tag {tag} is not the workspace version");
            images.entry(repo.to_string()).or_default().extend(contents);
        }
    }
    for r in rendered() {
        for o in &r.objects {
            let Some(t) = policy::pod_template(o) else { continue };
            for c in arr(&t["spec"]["initContainers"]).iter().chain(arr(&t["spec"]["containers"])) {
                let image = c["image"].as_str().unwrap();
                let Some((repo, tag)) = image.rsplit_once(':') else { continue };
                if !repo.starts_with("ghcr.io/xpu-broker/") {
                    continue;
                }
                let contents =
                    images.get(repo).unwrap_or_else(|| panic!("{}: {image} is built by no Dockerfile", r.dir));
                assert_eq!(tag, version, "{}: {image} is not the workspace version {version}", r.dir);
                let argv = strs(&c["command"]).join(" ");
                assert!(
                    contents.iter().any(|b| argv.contains(&format!("/usr/local/bin/{b}"))),
                    "{}: {} runs {argv:?}, which {image} does not contain ({contents:?})",
                    r.dir,
                    ident(o)
                );
            }
        }
    }
}

// ---- docs and scripts -----------------------------------------------------------------------------

/// The scripts parse, and the README covers what the issue asks.
#[test]
fn scripts_parse_and_the_readme_covers_operations() {
    let mut scripts = Vec::new();
    xpu_deploy_check::walk(&deploy_dir(), &mut |p| {
        if p.extension().is_some_and(|e| e == "sh") {
            scripts.push(p.to_path_buf());
        }
    });
    assert!(!scripts.is_empty());
    for s in scripts {
        let out = Command::new("bash").arg("-n").arg(&s).output().unwrap();
        assert!(out.status.success(), "{}: {}", s.display(), String::from_utf8_lossy(&out.stderr));
    }
    let readme = std::fs::read_to_string(deploy_dir().join("README.md")).unwrap();
    for section in ["## Install", "## Values to change", "## Verify", "## Upgrade", "## Remove", "## Certificates"] {
        assert!(readme.contains(section), "deploy/README.md has no {section:?} section");
    }
    for cmd in ["kubectl get dpus", "xpu-broker ca", "kubectl apply"] {
        assert!(readme.contains(cmd), "deploy/README.md does not mention {cmd:?}");
    }
}
