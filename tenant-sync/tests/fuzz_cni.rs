//! Bad CNI input, property-based: random stdin (text, JSON, mutated network configurations) and
//! random CNI environment through `cni::run` and through the real `xpu-cni` binary (random
//! bytes). The answer is always a CNI error result (JSON with `code` and `msg`, the spec's
//! codes) naming what is wrong, never a panic; `VERSION` always answers. Deep nesting and
//! oversized stdin are refused by the JSON decoder's depth limit, not the stack.
//!
//! The generators never point the plugin at real state: the host-agent socket and cache
//! directory are always paths in a fresh temporary directory, network namespaces never exist,
//! and container ids and interface names never hold a path separator (see the suite's report
//! about those).
//!
//! Cases: proptest's default (256, or `PROPTEST_CASES`) divided by the weight in `cases`.
#![allow(clippy::unwrap_used)]

use std::{
    collections::HashMap,
    io::Write,
    process::{Command, Stdio},
    sync::LazyLock,
};

use proptest::prelude::*;
use serde_json::{Value, json};
use xpu_tenant_sync::cni::{
    self,
    types::{NetConf, SUPPORTED_VERSIONS, code},
};

const XPU_CNI: &str = env!("CARGO_BIN_EXE_xpu-cni");

fn cases(weight: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    c.cases = (c.cases / weight).max(1);
    c.failure_persistence = None;
    c
}

/// Where the plugin may look: an empty directory of this test process.
static SANDBOX: LazyLock<tempfile::TempDir> = LazyLock::new(|| tempfile::tempdir().unwrap());

fn socket() -> String {
    SANDBOX.path().join("no-agent.sock").display().to_string()
}

fn cache_dir() -> String {
    SANDBOX.path().join("cache").display().to_string()
}

const CODES: [u32; 13] = [
    code::INCOMPATIBLE_VERSION,
    code::UNKNOWN_CONTAINER,
    code::INVALID_ENV,
    code::IO,
    code::DECODE,
    code::INVALID_CONFIG,
    8, // the spec's "failed to access the network namespace"
    code::TRY_AGAIN,
    code::NOT_ALLOCATED,
    code::DPU_REFUSED,
    code::CHECK_FAILED,
    code::PERMISSION_DENIED,
    code::INTERNAL,
];

// ---- generators ----

fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,16}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

const KEYS: [&str; 11] = [
    "cniVersion",
    "name",
    "type",
    "deviceID",
    "runtimeConfig",
    "xpuNetwork",
    "resourceName",
    "timeoutMs",
    "prevResult",
    "hostAgentSocket",
    "cacheDir",
];

/// A network configuration with some keys removed or set to arbitrary values.
fn mutated_conf() -> BoxedStrategy<Value> {
    let version = prop_oneof![
        prop::sample::select(SUPPORTED_VERSIONS.to_vec()).prop_map(str::to_string),
        prop::sample::select(vec!["0.2.0", "1.1.0", "", "1.0"]).prop_map(str::to_string),
        ".{0,8}",
    ];
    let edit = (prop::sample::select(KEYS.to_vec()), prop::option::of(any_json()));
    (version, prop_oneof![Just(String::new()), "[a-z-]{1,12}", ".{0,12}"], prop::collection::vec(edit, 0..3))
        .prop_map(|(version, name, edits)| {
            let mut conf = json!({
                "cniVersion": version,
                "name": name,
                "type": "xpu-cni",
                "runtimeConfig": {"deviceID": "0000:03:00.2"},
                "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "net1", "sandbox": "/none"}], "ips": []},
            });
            for (key, value) in edits {
                match value {
                    Some(v) => conf[key] = v,
                    None => {
                        conf.as_object_mut().unwrap().remove(key);
                    }
                }
            }
            // Never real state: the socket and cache directory stay in the sandbox.
            conf["hostAgentSocket"] = json!(socket());
            conf["cacheDir"] = json!(cache_dir());
            conf
        })
        .boxed()
}

fn stdin() -> BoxedStrategy<String> {
    prop_oneof![
        2 => ".{0,200}",
        1 => any_json().prop_map(|v| v.to_string()),
        3 => mutated_conf().prop_map(|v| v.to_string()),
        1 => Just(String::new()),
    ]
    .boxed()
}

/// A value for an env variable that names no real thing: no path separator, no `..`.
fn env_value() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[a-z0-9]{1,12}",
        1 => Just(String::new()),
        1 => ".{0,16}".prop_filter("no NUL", |s| !s.contains('\0')),
        1 => prop::sample::select(vec!["../../etc", "a/b", ".", "..", "eth 0", "net:1", "x-very-long-ifname0"])
            .prop_map(str::to_string),
    ]
    .boxed()
}

fn env() -> impl Strategy<Value = HashMap<String, String>> {
    let command = prop_oneof![
        4 => prop::sample::select(vec!["ADD", "DEL", "CHECK", "VERSION"]).prop_map(|s| Some(s.to_string())),
        1 => Just(None),
        1 => env_value().prop_map(Some),
    ];
    let netns = prop_oneof!["[a-z0-9]{1,8}".prop_map(|s| format!("/nonexistent/netns/{s}")), Just(String::new()),];
    let args = prop_oneof![
        3 => ("[a-z0-9-]{1,8}", "[a-z0-9-]{1,8}").prop_map(|(ns, n)| format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={n}")),
        1 => ".{0,30}".prop_filter("no NUL", |s| !s.contains('\0')),
    ];
    (
        command,
        prop::option::weighted(0.9, env_value()),
        prop::option::weighted(0.9, netns),
        prop::option::weighted(0.9, env_value()),
        prop::option::weighted(0.9, args),
    )
        .prop_map(|(command, container, netns, ifname, args)| {
            let mut env = HashMap::new();
            for (k, v) in [
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", container),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", ifname),
                ("CNI_ARGS", args),
            ] {
                if let Some(v) = v {
                    env.insert(k.to_string(), v);
                }
            }
            env.insert("CNI_PATH".into(), "/opt/cni/bin".into());
            env
        })
}

// ---- the oracle ----

/// What a refusal must say for this input, as far as it can be told without a host agent:
/// (code, words the message or details must contain). `None`: any well-formed error.
fn expected(env: &HashMap<String, String>, stdin: &str) -> Option<(u32, Vec<String>)> {
    let var = |k: &str| env.get(k).map(String::as_str).filter(|s| !s.is_empty());
    let Some(command) = var("CNI_COMMAND") else {
        return Some((code::INVALID_ENV, vec!["CNI_COMMAND".into()]));
    };
    let conf = match serde_json::from_str::<NetConf>(stdin) {
        Ok(c) => c,
        Err(_) => return Some((code::DECODE, vec!["network configuration".into()])),
    };
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Some((code::INCOMPATIBLE_VERSION, vec![format!("{:?}", conf.cni_version)]));
    }
    if conf.name.is_empty() {
        return Some((code::INVALID_CONFIG, vec!["name".into()]));
    }
    let required: &[&str] = match command {
        "ADD" | "CHECK" => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
        "DEL" => &["CNI_CONTAINERID", "CNI_IFNAME"],
        other => return Some((code::INVALID_ENV, vec![format!("unknown CNI_COMMAND: {other}")])),
    };
    let missing: Vec<String> = required.iter().filter(|k| var(k).is_none()).map(|k| k.to_string()).collect();
    if !missing.is_empty() {
        return Some((code::INVALID_ENV, missing));
    }
    // The spec's forms, written independently of the plugin's checks.
    let id = var("CNI_CONTAINERID").unwrap_or_default();
    let id_ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !id_ok {
        return Some((code::INVALID_ENV, vec!["CNI_CONTAINERID".into()]));
    }
    let ifname = var("CNI_IFNAME").unwrap_or_default();
    let ifname_ok = !ifname.is_empty()
        && ifname.len() <= 15
        && ifname != "."
        && ifname != ".."
        && !ifname.chars().any(|c| "/:".contains(c) || c.is_whitespace());
    if !ifname_ok {
        return Some((code::INVALID_ENV, vec!["CNI_IFNAME".into()]));
    }
    None
}

/// Checks one answer; returns the code of a refusal.
fn check(
    env: &HashMap<String, String>,
    stdin: &str,
    stdout: &str,
    success: bool,
) -> Result<Option<u32>, TestCaseError> {
    let out: Value =
        serde_json::from_str(stdout).map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {stdout:?}")))?;
    if env.get("CNI_COMMAND").map(String::as_str) == Some("VERSION") {
        prop_assert!(success, "{stdout}");
        prop_assert_eq!(&out["supportedVersions"], &json!(SUPPORTED_VERSIONS));
        return Ok(None);
    }
    prop_assert!(!success, "succeeded without a host agent: {stdout}");
    let code = out["code"].as_u64().ok_or_else(|| TestCaseError::fail(format!("no code: {stdout}")))?;
    let code = u32::try_from(code).unwrap();
    let msg = out["msg"].as_str().unwrap_or_default();
    let details = out["details"].as_str().unwrap_or_default();
    prop_assert!(CODES.contains(&code), "unknown code {code}: {stdout}");
    prop_assert!(!msg.is_empty(), "{stdout}");
    prop_assert!(out["cniVersion"].is_string(), "{stdout}");
    let version = serde_json::from_str::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| "1.0.0".into());
    prop_assert_eq!(out["cniVersion"].as_str(), Some(version.as_str()), "the error answers in the config's version");
    match expected(env, stdin) {
        Some((want, words)) => {
            prop_assert_eq!(code, want, "{}", stdout);
            for w in words {
                prop_assert!(msg.contains(&w) || details.contains(&w), "{stdout} does not name {w:?}");
            }
            if want == code::DECODE {
                prop_assert!(!details.is_empty(), "a decode error says why: {stdout}");
            }
        }
        // Past the checks: the namespace is missing, CNI_ARGS lacks the pod, no prevResult,
        // or the host agent is unreachable.
        None => prop_assert!(
            [code::UNKNOWN_CONTAINER, code::INVALID_ENV, code::DECODE, code::INVALID_CONFIG, 8, code::TRY_AGAIN]
                .contains(&code),
            "{stdout}"
        ),
    }
    Ok(Some(code))
}

/// Random stdin and environment through the plugin's entry point; prints the answers by code.
#[test]
fn random_stdin_and_env_yield_a_cni_error() {
    let config = cases(1);
    let n = config.cases;
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let tally = std::cell::RefCell::new(std::collections::BTreeMap::<String, u64>::new());
    let result = runner.run(&(env(), stdin()), |(env, stdin)| {
        let out = cni::run(&env, &stdin);
        let code = check(&env, &stdin, &out.stdout, out.success)?;
        let key = code.map_or_else(|| "VERSION ok".to_string(), |c| format!("code {c}"));
        *tally.borrow_mut().entry(key).or_default() += 1;
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!("cni: {n} cases, answers: {:?}", tally.into_inner());
}

proptest! {
    #![proptest_config(cases(8))]

    /// Random bytes (not always UTF-8) on the real binary's stdin.
    #[test]
    fn the_binary_answers_random_bytes_with_a_cni_error(
        env in env(),
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..300),
            stdin().prop_map(String::into_bytes),
        ],
    ) {
        let (stdout, success) = run_binary(&env, &bytes);
        match String::from_utf8(bytes) {
            Ok(text) => {
                check(&env, &text, &stdout, success)?;
            }
            Err(_) if env.get("CNI_COMMAND").map(String::as_str) == Some("VERSION") => {
                check(&env, "", &stdout, success)?;
            }
            Err(_) => {
                let out: Value = serde_json::from_str(&stdout).map_err(|e| TestCaseError::fail(format!("{e}: {stdout:?}")))?;
                prop_assert!(!success);
                prop_assert_eq!(out["code"].as_u64(), Some(u64::from(code::IO)), "{}", stdout);
                prop_assert!(out["msg"].as_str().unwrap_or_default().contains("stdin"), "{stdout}");
            }
        }
    }
}

fn run_binary(env: &HashMap<String, String>, stdin: &[u8]) -> (String, bool) {
    let mut child = Command::new(XPU_CNI)
        .env_clear()
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let bytes = stdin.to_vec();
    // Written from a thread: a large stdin must not deadlock against a full stdout pipe.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&bytes);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (String::from_utf8_lossy(&out.stdout).trim().to_string(), out.status.success())
}

fn add_env() -> HashMap<String, String> {
    [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/nonexistent/netns/c1"),
        ("CNI_IFNAME", "net1"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn deep(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// 100,000 nested arrays as the whole stdin and inside `prevResult`: refused as a decode error
/// (serde_json's depth limit, 128, for the nested value), in process on a 2 MiB test thread and
/// in the binary. Under a key the plugin ignores they are skipped without recursion, and the
/// invocation goes on to its next check (the missing network namespace, code 8).
#[test]
fn deep_nesting_is_refused_by_the_depth_limit() {
    let env = add_env();
    let nested = deep(100_000);
    let conf = |key: &str| {
        format!("{{\"cniVersion\":\"1.0.0\",\"name\":\"n\",\"hostAgentSocket\":{:?},\"{key}\":{nested}}}", socket())
    };
    let cases = [
        // A bare array is not a configuration: refused at its first element.
        (nested.clone(), code::DECODE, "invalid type"),
        (conf("prevResult"), code::DECODE, "recursion limit exceeded"),
        (conf("unknownKey"), 8, "network namespace"),
    ];
    for (stdin, want, why) in cases {
        let o = cni::run(&env, &stdin);
        for (stdout, success) in [(o.stdout, o.success), run_binary(&env, stdin.as_bytes())] {
            assert!(!success);
            let out: Value = serde_json::from_str(&stdout).unwrap();
            assert_eq!(out["code"], want, "{stdout}");
            let said = format!("{} {}", out["msg"], out["details"]);
            assert!(said.contains(why), "{stdout}");
        }
    }
}

/// 64 MiB of stdin: refused as a decode error by the plugin's 1 MiB limit, in bounded time,
/// without reading the rest.
#[test]
fn oversized_stdin_is_refused_as_a_decode_error() {
    let env = add_env();
    let mut stdin = vec![b' '; 64 << 20];
    stdin.extend_from_slice(b"{\"cniVersion\": ");
    let started = std::time::Instant::now();
    let (stdout, success) = run_binary(&env, &stdin);
    assert!(!success);
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["code"], code::DECODE, "{stdout}");
    assert_eq!(out["msg"], "failed to decode the network configuration", "{stdout}");
    assert_eq!(out["details"], "stdin exceeds 1048576 bytes", "{stdout}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "{:?}", started.elapsed());
}

/// A container id or interface name that could lead the plugin's cache file out of its
/// directory is refused before anything is read or written, naming the variable.
#[test]
fn container_ids_and_interface_names_that_are_not_the_specs_are_refused() {
    let conf = format!("{{\"cniVersion\":\"1.0.0\",\"name\":\"n\",\"hostAgentSocket\":{:?}}}", socket());
    for (var, value, msg) in [
        ("CNI_CONTAINERID", "../../etc/passwd", "CNI_CONTAINERID \"../../etc/passwd\" is not a valid container id"),
        ("CNI_CONTAINERID", "-c1", "CNI_CONTAINERID \"-c1\" is not a valid container id"),
        ("CNI_IFNAME", "../x", "CNI_IFNAME \"../x\" is not a valid interface name"),
        ("CNI_IFNAME", "net1:0", "CNI_IFNAME \"net1:0\" is not a valid interface name"),
        ("CNI_IFNAME", "name-of-16-bytes", "CNI_IFNAME \"name-of-16-bytes\" is not a valid interface name"),
        ("CNI_IFNAME", "name-of-15-byte", "CNI_IFNAME \"name-of-15-byte\" is not a valid interface name"),
    ] {
        for command in ["ADD", "DEL", "CHECK"] {
            let mut env = add_env();
            env.insert("CNI_COMMAND".into(), command.into());
            env.insert(var.into(), value.into());
            let (stdout, success) = run_binary(&env, conf.as_bytes());
            let out: Value = serde_json::from_str(&stdout).unwrap();
            if value == "name-of-15-byte" {
                // 15 bytes: allowed; the call fails later (no such namespace or host agent).
                assert_ne!(out["msg"], msg, "{stdout}");
                continue;
            }
            assert!(!success, "{command} {var}={value}: {stdout}");
            assert_eq!(out["code"], code::INVALID_ENV, "{stdout}");
            assert_eq!(out["msg"], msg, "{stdout}");
        }
    }
}
