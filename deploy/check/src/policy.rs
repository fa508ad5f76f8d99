//! The policy every rendered kustomization must follow.
//!
//! Containers: not root, not privileged, no privilege escalation, read-only root filesystem, all
//! capabilities dropped and none added, RuntimeDefault seccomp — unless a `# policy: allow` comment
//! says why ([`crate::exceptions`]); resources (CPU and memory requests, a memory limit); readiness
//! and liveness probes, over HTTP where the container has an HTTP port (an exec or TCP probe needs
//! an exception saying why); images pinned by tag or digest, never `latest`. Pods: no host
//! network, PID or IPC namespace and no hostPath volume without an exception. RBAC: no wildcards,
//! no `escalate`/`bind`/`impersonate`, no access to Secrets. Namespaces: every namespaced object
//! has one, and each namespace's Pod Security level is exactly what its pods need. References
//! resolve: Service, PodDisruptionBudget, NetworkPolicy and ServiceMonitor selectors select
//! something, named ports exist, ServiceAccounts, roles, ConfigMaps (in overlays) and Issuers
//! exist; every Deployment with more than one replica has a PodDisruptionBudget.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::{exceptions::Exceptions, ident, parse_yaml_stream, render::Rendered};

/// Cluster-scoped built-in kinds (everything else built in is namespaced).
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "Node",
    "PersistentVolume",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "StorageClass",
    "CSIDriver",
    "RuntimeClass",
    "IngressClass",
    "APIService",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];

/// Capabilities the "baseline" Pod Security level allows adding.
const BASELINE_CAPS: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// Volume types the "restricted" level allows.
const RESTRICTED_VOLUMES: &[&str] =
    &["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"];

/// Which custom kinds are cluster-scoped, from CRD documents (`apiVersion group`, kind).
#[derive(Debug, Default)]
pub struct Scopes {
    cluster: BTreeSet<(String, String)>,
}

impl Scopes {
    pub fn from_crd_files(files: &[std::path::PathBuf]) -> Result<Scopes, String> {
        let mut s = Scopes::default();
        for f in files {
            let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
            for crd in parse_yaml_stream(&text).map_err(|e| format!("{}: {e}", f.display()))? {
                if crd["spec"]["scope"] == "Cluster" {
                    let group = crd["spec"]["group"].as_str().unwrap_or_default().to_string();
                    let kind = crd["spec"]["names"]["kind"].as_str().unwrap_or_default().to_string();
                    s.cluster.insert((group, kind));
                }
            }
        }
        Ok(s)
    }

    fn namespaced(&self, o: &Value) -> bool {
        let kind = o["kind"].as_str().unwrap_or_default();
        let api = o["apiVersion"].as_str().unwrap_or_default();
        let group = api.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        !(CLUSTER_SCOPED.contains(&kind) || self.cluster.contains(&(group.to_string(), kind.to_string())))
    }
}

/// The pod template (metadata + spec) of a workload, or the pod itself.
pub fn pod_template(o: &Value) -> Option<&Value> {
    match o["kind"].as_str()? {
        "Deployment" | "DaemonSet" | "StatefulSet" | "ReplicaSet" | "Job" => Some(&o["spec"]["template"]),
        "CronJob" => Some(&o["spec"]["jobTemplate"]["spec"]["template"]),
        "Pod" => Some(o),
        _ => None,
    }
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn strs(v: &Value) -> Vec<&str> {
    arr(v).iter().filter_map(Value::as_str).collect()
}

fn ns(o: &Value) -> &str {
    o["metadata"]["namespace"].as_str().unwrap_or("")
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or("")
}

/// Whether a label selector (`matchLabels` / `matchExpressions`, or a plain map for Services)
/// selects `labels`. An empty selector selects everything.
pub fn selects(selector: &Value, labels: &Value) -> bool {
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    let plain = selector.get("matchLabels").is_none() && selector.get("matchExpressions").is_none();
    let match_labels = if plain { selector } else { &selector["matchLabels"] };
    if let Some(m) = match_labels.as_object()
        && !m.iter().all(|(k, v)| label(k) == v.as_str())
    {
        return false;
    }
    arr(&selector["matchExpressions"]).iter().all(|e| {
        let key = e["key"].as_str().unwrap_or_default();
        let values = strs(&e["values"]);
        match e["operator"].as_str().unwrap_or_default() {
            "In" => label(key).is_some_and(|v| values.contains(&v)),
            "NotIn" => label(key).is_none_or(|v| !values.contains(&v)),
            "Exists" => label(key).is_some(),
            "DoesNotExist" => label(key).is_none(),
            _ => false,
        }
    })
}

/// A container image pinned by a tag other than `latest`, or by digest.
pub fn image_pinned(image: &str) -> Result<(), String> {
    if image.contains("@sha256:") {
        return Ok(());
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        None => Err(format!("image {image:?} has no tag (pin a version or a digest)")),
        Some((_, "latest")) => Err(format!("image {image:?} uses the `latest` tag (pin a version or a digest)")),
        Some((_, "")) => Err(format!("image {image:?} has an empty tag")),
        Some(_) => Ok(()),
    }
}

/// Pod Security levels, ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Restricted,
    Baseline,
    Privileged,
}

impl Level {
    fn parse(s: &str) -> Option<Level> {
        match s {
            "restricted" => Some(Level::Restricted),
            "baseline" => Some(Level::Baseline),
            "privileged" => Some(Level::Privileged),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Level::Restricted => "restricted",
            Level::Baseline => "baseline",
            Level::Privileged => "privileged",
        }
    }
}

fn containers(spec: &Value) -> impl Iterator<Item = (&Value, bool)> {
    arr(&spec["initContainers"]).iter().map(|c| (c, true)).chain(arr(&spec["containers"]).iter().map(|c| (c, false)))
}

/// The least Pod Security level a pod spec satisfies.
pub fn required_level(spec: &Value) -> Level {
    let psc = &spec["securityContext"];
    let mut baseline_ok = spec["hostNetwork"] != true && spec["hostPID"] != true && spec["hostIPC"] != true;
    baseline_ok &= arr(&spec["volumes"]).iter().all(|v| v.get("hostPath").is_none());
    baseline_ok &= psc["seccompProfile"]["type"] != "Unconfined";
    let mut restricted_ok = arr(&spec["volumes"]).iter().all(|v| {
        v.as_object().is_some_and(|m| {
            m.keys().any(|k| k == "name")
                && m.keys().filter(|k| *k != "name").all(|k| RESTRICTED_VOLUMES.contains(&k.as_str()))
        })
    });
    for (c, _) in containers(spec) {
        let sc = &c["securityContext"];
        let caps = strs(&sc["capabilities"]["add"]);
        baseline_ok &= sc["privileged"] != true;
        baseline_ok &= caps.iter().all(|c| BASELINE_CAPS.contains(c));
        baseline_ok &= arr(&c["ports"]).iter().all(|p| p.get("hostPort").is_none());
        baseline_ok &= sc["seccompProfile"]["type"] != "Unconfined";
        let run_as_non_root = sc["runAsNonRoot"].as_bool().or(psc["runAsNonRoot"].as_bool()) == Some(true);
        let uid = sc["runAsUser"].as_i64().or(psc["runAsUser"].as_i64());
        let seccomp = sc["seccompProfile"]["type"].as_str().or(psc["seccompProfile"]["type"].as_str());
        restricted_ok &= run_as_non_root && uid != Some(0);
        restricted_ok &= sc["allowPrivilegeEscalation"] == false;
        restricted_ok &= strs(&sc["capabilities"]["drop"]).contains(&"ALL");
        restricted_ok &= caps.iter().all(|c| *c == "NET_BIND_SERVICE");
        restricted_ok &= matches!(seccomp, Some("RuntimeDefault" | "Localhost"));
    }
    if !baseline_ok {
        Level::Privileged
    } else if !restricted_ok {
        Level::Baseline
    } else {
        Level::Restricted
    }
}

/// Checks every rendered kustomization; returns the violations.
pub fn check(rendered: &[Rendered], ex: &Exceptions, scopes: &Scopes) -> Vec<String> {
    let mut v = Vec::new();
    for r in rendered {
        let mut out = Vec::new();
        check_one(r, ex, scopes, &mut out);
        v.extend(out.into_iter().map(|m| format!("{}: {m}", r.dir)));
    }
    v
}

fn check_one(r: &Rendered, ex: &Exceptions, scopes: &Scopes, out: &mut Vec<String>) {
    let objs = &r.objects;
    for o in objs {
        let id = ident(o);
        if scopes.namespaced(o) && o["metadata"]["namespace"].as_str().is_none_or(str::is_empty) {
            out.push(format!("{id} is namespaced but has no namespace (set one in the manifest or the kustomization)"));
        }
        if let Some(t) = pod_template(o) {
            check_pod(o, &t["spec"], ex, out);
        }
        if matches!(o["kind"].as_str(), Some("Role" | "ClusterRole")) {
            check_rbac(o, out);
        }
    }
    check_pod_security(objs, out);
    check_references(r, out);
}

fn check_pod(o: &Value, spec: &Value, ex: &Exceptions, out: &mut Vec<String>) {
    let id = ident(o);
    let workload = name(o);
    for (field, rule) in [("hostNetwork", "host-network"), ("hostPID", "host-pid"), ("hostIPC", "host-ipc")] {
        if spec[field] == true && !ex.allows(rule, workload) {
            out.push(format!("{id}: {field} without a `# policy: allow {rule} for {workload}: <why>` comment"));
        }
    }
    if arr(&spec["volumes"]).iter().any(|v| v.get("hostPath").is_some()) && !ex.allows("host-path", workload) {
        out.push(format!("{id}: hostPath volumes without a `# policy: allow host-path for {workload}: <why>` comment"));
    }
    let psc = &spec["securityContext"];
    for (c, init) in containers(spec) {
        let cname = c["name"].as_str().unwrap_or("?");
        let at = format!("{id} container {cname}");
        let sc = &c["securityContext"];
        match c["image"].as_str() {
            Some(image) => {
                if let Err(e) = image_pinned(image) {
                    out.push(format!("{at}: {e}"));
                }
            }
            None => out.push(format!("{at}: no image")),
        }
        let res = &c["resources"];
        for (part, what) in [("requests", "cpu"), ("requests", "memory"), ("limits", "memory")] {
            if res[part][what].is_null() {
                out.push(format!("{at}: no resources.{part}.{what}"));
            }
        }
        // Who runs it.
        let uid = sc["runAsUser"].as_i64().or(psc["runAsUser"].as_i64());
        let non_root = sc["runAsNonRoot"].as_bool().or(psc["runAsNonRoot"].as_bool());
        if non_root == Some(true) && uid == Some(0) {
            out.push(format!("{at}: runAsNonRoot contradicts runAsUser 0"));
        }
        let root = uid == Some(0) || (uid.is_none() && non_root != Some(true));
        if root && !ex.allows("run-as-root", cname) {
            out.push(format!(
                "{at}: may run as root (set runAsNonRoot: true and a non-zero runAsUser, or add `# policy: allow \
                 run-as-root for {cname}: <why>`)"
            ));
        }
        if sc["privileged"] == true && !ex.allows("privileged", cname) {
            out.push(format!("{at}: privileged without a `# policy: allow privileged for {cname}: <why>` comment"));
        }
        if sc["allowPrivilegeEscalation"] != false {
            out.push(format!("{at}: securityContext.allowPrivilegeEscalation must be false"));
        }
        if sc["readOnlyRootFilesystem"] != true && !ex.allows("writable-root-fs", cname) {
            out.push(format!("{at}: securityContext.readOnlyRootFilesystem must be true"));
        }
        if !strs(&sc["capabilities"]["drop"]).contains(&"ALL") {
            out.push(format!("{at}: securityContext.capabilities.drop must contain ALL"));
        }
        for cap in strs(&sc["capabilities"]["add"]) {
            let rule = format!("capability:{cap}");
            if !ex.allows(&rule, cname) {
                out.push(format!("{at}: adds {cap} without a `# policy: allow {rule} for {cname}: <why>` comment"));
            }
        }
        let seccomp = sc["seccompProfile"]["type"].as_str().or(psc["seccompProfile"]["type"].as_str());
        if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
            out.push(format!("{at}: no RuntimeDefault (or Localhost) seccomp profile on the pod or container"));
        }
        if init {
            continue;
        }
        // Probes.
        let http_port = arr(&c["ports"]).iter().any(|p| p["name"].as_str().is_some_and(|n| n.starts_with("http")));
        for probe in ["readinessProbe", "livenessProbe"] {
            let p = &c[probe];
            if p.is_null() {
                out.push(format!("{at}: no {probe}"));
            } else if p.get("httpGet").is_none() {
                if http_port {
                    out.push(format!("{at}: {probe} is not httpGet although the container has an HTTP port"));
                } else if !ex.allows("exec-probe", cname) {
                    out.push(format!(
                        "{at}: {probe} is not an HTTP probe; say why with `# policy: allow exec-probe for {cname}: <why>`"
                    ));
                }
            } else if let Some(port) = p["httpGet"]["port"].as_str()
                && !arr(&c["ports"]).iter().any(|cp| cp["name"] == port)
            {
                out.push(format!("{at}: {probe} uses port {port:?}, which the container does not name"));
            }
        }
    }
}

fn check_rbac(o: &Value, out: &mut Vec<String>) {
    let id = ident(o);
    for (i, rule) in arr(&o["rules"]).iter().enumerate() {
        for field in ["apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"] {
            if strs(&rule[field]).iter().any(|s| s.contains('*')) {
                out.push(format!("{id} rule {i}: wildcard in {field}"));
            }
        }
        for verb in strs(&rule["verbs"]) {
            if matches!(verb, "escalate" | "bind" | "impersonate") {
                out.push(format!("{id} rule {i}: verb {verb} grants privilege escalation"));
            }
        }
        if strs(&rule["resources"]).contains(&"secrets") {
            out.push(format!("{id} rule {i}: access to Secrets (no component needs it)"));
        }
    }
    if !o["aggregationRule"].is_null() {
        out.push(format!("{id}: aggregated roles hide what they grant"));
    }
}

fn check_pod_security(objs: &[Value], out: &mut Vec<String>) {
    let mut need: BTreeMap<&str, (Level, Vec<String>)> = BTreeMap::new();
    for o in objs {
        if let Some(t) = pod_template(o) {
            let level = required_level(&t["spec"]);
            let e = need.entry(ns(o)).or_insert((Level::Restricted, Vec::new()));
            if level > e.0 {
                e.0 = level;
            }
            if level > Level::Restricted {
                e.1.push(format!("{} ({})", ident(o), level.as_str()));
            }
        }
    }
    for o in objs.iter().filter(|o| o["kind"] == "Namespace") {
        let n = name(o);
        let label = o["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str();
        let Some(have) = label.and_then(Level::parse) else {
            out.push(format!("Namespace/{n}: no valid pod-security.kubernetes.io/enforce label"));
            continue;
        };
        let (want, why) = need.get(n).cloned().unwrap_or((Level::Restricted, Vec::new()));
        if have < want {
            out.push(format!(
                "Namespace/{n} enforces {} but its pods need {}: {}",
                have.as_str(),
                want.as_str(),
                why.join(", ")
            ));
        } else if have > want {
            out.push(format!(
                "Namespace/{n} enforces {} but its pods would pass {}: tighten it",
                have.as_str(),
                want.as_str()
            ));
        }
    }
}

fn check_references(r: &Rendered, out: &mut Vec<String>) {
    let objs = &r.objects;
    let of_kind = |k: &'static str| objs.iter().filter(move |o| o["kind"] == k);
    let pods: Vec<(&Value, &Value)> = objs.iter().filter_map(|o| pod_template(o).map(|t| (o, t))).collect::<Vec<_>>();
    let pods_in = |namespace: &str, selector: &Value| -> Vec<(&Value, &Value)> {
        pods.iter()
            .filter(|(o, t)| ns(o) == namespace && selects(selector, &t["metadata"]["labels"]))
            .copied()
            .collect()
    };
    let port_named = |t: &Value, port: &str| {
        arr(&t["spec"]["containers"]).iter().any(|c| arr(&c["ports"]).iter().any(|p| p["name"] == port))
    };
    // Services.
    for s in of_kind("Service") {
        let selected = pods_in(ns(s), &s["spec"]["selector"]);
        if selected.is_empty() {
            out.push(format!("{}: its selector matches no pod template", ident(s)));
        }
        for p in arr(&s["spec"]["ports"]) {
            if let Some(tp) = p["targetPort"].as_str()
                && !selected.iter().any(|(_, t)| port_named(t, tp))
            {
                out.push(format!("{}: targetPort {tp:?} is not a port name of the pods it selects", ident(s)));
            }
        }
    }
    // PodDisruptionBudgets, and Deployments/StatefulSets that need one.
    let pdbs: Vec<&Value> = of_kind("PodDisruptionBudget").collect();
    for p in &pdbs {
        if pods_in(ns(p), &p["spec"]["selector"]).is_empty() {
            out.push(format!("{}: its selector matches no pod template", ident(p)));
        }
    }
    for o in objs.iter().filter(|o| matches!(o["kind"].as_str(), Some("Deployment" | "StatefulSet"))) {
        let replicas = o["spec"]["replicas"].as_i64().unwrap_or(1);
        let labels = &o["spec"]["template"]["metadata"]["labels"];
        if replicas > 1 && !pdbs.iter().any(|p| ns(p) == ns(o) && selects(&p["spec"]["selector"], labels)) {
            out.push(format!("{} has {replicas} replicas but no PodDisruptionBudget", ident(o)));
        }
    }
    // NetworkPolicies.
    for np in of_kind("NetworkPolicy") {
        let selected = pods_in(ns(np), &np["spec"]["podSelector"]);
        if selected.is_empty() {
            out.push(format!("{}: its podSelector matches no pod template", ident(np)));
        }
        for rule in arr(&np["spec"]["ingress"]) {
            for p in arr(&rule["ports"]) {
                if let Some(port) = p["port"].as_str()
                    && !selected.iter().any(|(_, t)| port_named(t, port))
                {
                    out.push(format!("{}: ingress port {port:?} is not a port name of the pods it selects", ident(np)));
                }
            }
        }
    }
    // ServiceMonitors.
    for sm in of_kind("ServiceMonitor") {
        let services: Vec<&Value> = objs
            .iter()
            .filter(|s| s["kind"] == "Service" && ns(s) == ns(sm))
            .filter(|s| selects(&sm["spec"]["selector"], &s["metadata"]["labels"]))
            .collect();
        if services.is_empty() {
            out.push(format!("{}: its selector matches no Service", ident(sm)));
        }
        for e in arr(&sm["spec"]["endpoints"]) {
            if let Some(port) = e["port"].as_str()
                && !services.iter().any(|s| arr(&s["spec"]["ports"]).iter().any(|p| p["name"] == port))
            {
                out.push(format!("{}: endpoint port {port:?} is not a port of the Services it selects", ident(sm)));
            }
        }
    }
    // ServiceAccounts and role bindings.
    let exists = |kind: &str, namespace: Option<&str>, n: &str| {
        objs.iter().any(|o| o["kind"] == kind && name(o) == n && namespace.is_none_or(|x| ns(o) == x))
    };
    for (o, t) in &pods {
        let sa = t["spec"]["serviceAccountName"].as_str().unwrap_or("default");
        if sa == "default" {
            out.push(format!("{}: uses the default ServiceAccount; give it its own", ident(o)));
        } else if !exists("ServiceAccount", Some(ns(o)), sa) {
            out.push(format!("{}: ServiceAccount {sa} is not defined", ident(o)));
        }
    }
    for b in objs.iter().filter(|o| matches!(o["kind"].as_str(), Some("RoleBinding" | "ClusterRoleBinding"))) {
        let role_kind = b["roleRef"]["kind"].as_str().unwrap_or_default();
        let role = b["roleRef"]["name"].as_str().unwrap_or_default();
        let role_ns = if role_kind == "Role" { Some(ns(b)) } else { None };
        if !exists(role_kind, role_ns, role) {
            out.push(format!("{}: roleRef {role_kind}/{role} is not defined", ident(b)));
        }
        for s in arr(&b["subjects"]).iter().filter(|s| s["kind"] == "ServiceAccount") {
            let (sn, sns) = (s["name"].as_str().unwrap_or_default(), s["namespace"].as_str().unwrap_or(ns(b)));
            if !exists("ServiceAccount", Some(sns), sn) {
                out.push(format!("{}: subject ServiceAccount {sns}/{sn} is not defined", ident(b)));
            }
        }
    }
    if !r.is_overlay() {
        return;
    }
    // In overlays (deployable as is): ConfigMaps the pods read, and Issuers of Certificates.
    for (o, t) in &pods {
        for (c, _) in containers(&t["spec"]) {
            for e in arr(&c["env"]) {
                let cm = &e["valueFrom"]["configMapKeyRef"];
                if cm.is_null() || cm["optional"] == true {
                    continue;
                }
                let (cn, key) = (cm["name"].as_str().unwrap_or_default(), cm["key"].as_str().unwrap_or_default());
                let found = objs.iter().find(|x| x["kind"] == "ConfigMap" && name(x) == cn && ns(x) == ns(o));
                match found {
                    None => out.push(format!("{}: ConfigMap {cn} (env {}) is not defined", ident(o), e["name"])),
                    Some(x) if x["data"][key].is_null() => {
                        out.push(format!("{}: ConfigMap {cn} has no key {key:?} (env {})", ident(o), e["name"]))
                    }
                    Some(_) => {}
                }
            }
        }
    }
    for cert in of_kind("Certificate") {
        let kind = cert["spec"]["issuerRef"]["kind"].as_str().unwrap_or("Issuer");
        let issuer = cert["spec"]["issuerRef"]["name"].as_str().unwrap_or_default();
        let issuer_ns = if kind == "Issuer" { Some(ns(cert)) } else { None };
        if !exists(kind, issuer_ns, issuer) {
            out.push(format!("{}: issuer {kind}/{issuer} is not defined", ident(cert)));
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rendered(objects: Vec<Value>) -> Rendered {
        Rendered { dir: "test/overlays/x".into(), objects }
    }

    fn good_deployment() -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "serviceAccountName": "web",
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "web", "image": "example/web:1.0",
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}},
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}},
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                            "capabilities": {"drop": ["ALL"]}}
                    }]
                }
            }}
        })
    }

    fn support() -> Vec<Value> {
        vec![
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns", "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": "ns"}}),
            json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "web", "namespace": "ns"},
                   "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "ns"},
                   "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
        ]
    }

    fn violations(objects: Vec<Value>, ex: &Exceptions) -> Vec<String> {
        check(&[rendered(objects)], ex, &Scopes::default())
    }

    fn with(mutate: impl FnOnce(&mut Value)) -> Vec<String> {
        let mut d = good_deployment();
        mutate(&mut d);
        let mut objs = support();
        objs.push(d);
        violations(objs, &Exceptions::default())
    }

    #[test]
    fn a_good_workload_passes() {
        assert_eq!(with(|_| {}), Vec::<String>::new());
    }

    #[test]
    fn every_rule_can_fail() {
        let c = "/spec/template/spec/containers/0";
        type Mutation = Box<dyn FnOnce(&mut Value)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("may run as root", Box::new(|d| d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = json!(0))),
            (
                "may run as root",
                Box::new(|d| {
                    let sc = d["spec"]["template"]["spec"]["securityContext"].as_object_mut().unwrap();
                    sc.remove("runAsNonRoot");
                    sc.remove("runAsUser");
                }),
            ),
            (
                "privileged",
                Box::new(
                    move |d| *d.pointer_mut(&format!("{c}/securityContext")).unwrap() = json!({"privileged": true, "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}}),
                ),
            ),
            (
                "allowPrivilegeEscalation",
                Box::new(move |d| {
                    d.pointer_mut(&format!("{c}/securityContext"))
                        .unwrap()
                        .as_object_mut()
                        .unwrap()
                        .remove("allowPrivilegeEscalation");
                }),
            ),
            (
                "readOnlyRootFilesystem",
                Box::new(move |d| {
                    *d.pointer_mut(&format!("{c}/securityContext/readOnlyRootFilesystem")).unwrap() = json!(false)
                }),
            ),
            (
                "drop must contain ALL",
                Box::new(move |d| {
                    *d.pointer_mut(&format!("{c}/securityContext/capabilities/drop")).unwrap() = json!(["NET_RAW"])
                }),
            ),
            (
                "adds NET_ADMIN",
                Box::new(move |d| {
                    d.pointer_mut(&format!("{c}/securityContext/capabilities")).unwrap()["add"] = json!(["NET_ADMIN"])
                }),
            ),
            (
                "no resources.limits.memory",
                Box::new(move |d| {
                    d.pointer_mut(&format!("{c}/resources")).unwrap().as_object_mut().unwrap().remove("limits");
                }),
            ),
            (
                "no resources.requests.cpu",
                Box::new(move |d| {
                    d.pointer_mut(&format!("{c}/resources/requests")).unwrap().as_object_mut().unwrap().remove("cpu");
                }),
            ),
            (
                "no readinessProbe",
                Box::new(move |d| {
                    d.pointer_mut(c).unwrap().as_object_mut().unwrap().remove("readinessProbe");
                }),
            ),
            (
                "not httpGet although",
                Box::new(move |d| {
                    *d.pointer_mut(&format!("{c}/livenessProbe")).unwrap() = json!({"tcpSocket": {"port": 8080}})
                }),
            ),
            (
                "does not name",
                Box::new(move |d| {
                    *d.pointer_mut(&format!("{c}/livenessProbe/httpGet/port")).unwrap() = json!("metrics")
                }),
            ),
            (
                "`latest` tag",
                Box::new(move |d| *d.pointer_mut(&format!("{c}/image")).unwrap() = json!("example/web:latest")),
            ),
            (
                "has no tag",
                Box::new(move |d| *d.pointer_mut(&format!("{c}/image")).unwrap() = json!("registry:5000/web")),
            ),
            (
                "seccomp",
                Box::new(|d| {
                    d["spec"]["template"]["spec"]["securityContext"].as_object_mut().unwrap().remove("seccompProfile");
                }),
            ),
            ("hostNetwork", Box::new(|d| d["spec"]["template"]["spec"]["hostNetwork"] = json!(true))),
            (
                "hostPath",
                Box::new(|d| {
                    d["spec"]["template"]["spec"]["volumes"] = json!([{"name": "h", "hostPath": {"path": "/"}}])
                }),
            ),
            (
                "has no namespace",
                Box::new(|d| {
                    d["metadata"].as_object_mut().unwrap().remove("namespace");
                }),
            ),
            (
                "no PodDisruptionBudget",
                Box::new(|d| {
                    d["spec"]["template"]["metadata"]["labels"] = json!({"app": "web", "x": "y"});
                    d["spec"]["selector"] = json!({"matchLabels": {"x": "y"}});
                    d["spec"]["template"]["metadata"]["labels"] = json!({"x": "y"});
                }),
            ),
            (
                "ServiceAccount nope is not defined",
                Box::new(|d| d["spec"]["template"]["spec"]["serviceAccountName"] = json!("nope")),
            ),
            (
                "default ServiceAccount",
                Box::new(|d| {
                    d["spec"]["template"]["spec"].as_object_mut().unwrap().remove("serviceAccountName");
                }),
            ),
            (
                "ConfigMap cfg",
                Box::new(move |d| {
                    d.pointer_mut(c).unwrap()["env"] =
                        json!([{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "x"}}}])
                }),
            ),
        ];
        for (want, mutate) in cases {
            let v = with(mutate);
            assert!(v.iter().any(|m| m.contains(want)), "expected a violation containing {want:?}, got {v:#?}");
        }
    }

    #[test]
    fn exceptions_excuse_exactly_what_they_name() {
        let mut ex = Exceptions::default();
        ex.parse_line(
            "# policy: allow run-as-root for web: it binds a root-owned socket of the host, nothing else",
            "t:1",
        )
        .unwrap();
        ex.parse_line(
            "# policy: allow host-network for web: it programs the node's own network namespace directly",
            "t:2",
        )
        .unwrap();
        let mut d = good_deployment();
        d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = json!(0);
        d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = json!(false);
        d["spec"]["template"]["spec"]["hostNetwork"] = json!(true);
        let mut objs = support();
        objs[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] = json!("privileged");
        objs.push(d.clone());
        assert_eq!(violations(objs.clone(), &ex), Vec::<String>::new());
        assert!(ex.unused().is_empty());
        // The namespace level must be what the pods need: not weaker, not stronger.
        objs[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] = json!("restricted");
        let v = violations(objs.clone(), &ex);
        assert!(v.iter().any(|m| m.contains("enforces restricted but its pods need privileged")), "{v:?}");
        let mut objs = support();
        objs[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] = json!("privileged");
        objs.push(good_deployment());
        let v = violations(objs, &Exceptions::default());
        assert!(v.iter().any(|m| m.contains("tighten it")), "{v:?}");
    }

    #[test]
    fn rbac_wildcards_and_escalation_fail() {
        let role = |rules: Value| json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "r"}, "rules": rules});
        let ok = role(json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]));
        assert!(violations(vec![ok], &Exceptions::default()).is_empty());
        for (rules, want) in [
            (json!([{"apiGroups": ["*"], "resources": ["pods"], "verbs": ["list"]}]), "wildcard in apiGroups"),
            (json!([{"apiGroups": [""], "resources": ["*"], "verbs": ["list"]}]), "wildcard in resources"),
            (json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]}]), "wildcard in verbs"),
            (json!([{"apiGroups": ["x.io"], "resources": ["*/status"], "verbs": ["get"]}]), "wildcard in resources"),
            (
                json!([{"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["bind"]}]),
                "escalation",
            ),
            (json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]), "Secrets"),
        ] {
            let v = violations(vec![role(rules)], &Exceptions::default());
            assert!(v.iter().any(|m| m.contains(want)), "{want}: {v:?}");
        }
    }

    #[test]
    fn selectors() {
        let labels = json!({"a": "1", "b": "2"});
        assert!(selects(&json!({"a": "1"}), &labels));
        assert!(selects(&json!({"matchLabels": {"a": "1"}}), &labels));
        assert!(!selects(&json!({"matchLabels": {"a": "2"}}), &labels));
        assert!(selects(&json!({"matchExpressions": [{"key": "b", "operator": "In", "values": ["2", "3"]}]}), &labels));
        assert!(!selects(&json!({"matchExpressions": [{"key": "c", "operator": "Exists"}]}), &labels));
    }
}
