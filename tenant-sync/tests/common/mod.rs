//! Harness of the pod-attach tests: a node with a fake sysfs tree describing its VFs (each VF a
//! veth pair: the host end in the node, the other end in the DPU namespace as its representor),
//! the real host-agent, device plugin and CNI binaries, and a kubelet stand-in.
#![allow(dead_code, clippy::unwrap_used)]

pub mod cluster;
pub mod kubelet;

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};
use xpu_testkit::*;

pub const HOST_AGENT: &str = env!("CARGO_BIN_EXE_host-agent");
pub const DEVICE_PLUGIN: &str = env!("CARGO_BIN_EXE_xpu-device-plugin");
pub const CNI: &str = env!("CARGO_BIN_EXE_xpu-cni");
pub const RESOURCE: &str = "xpu.opi.dev/vf";

/// The node's side of the topology: VFs (`<prefix>h<N>` in the root namespace), the fake sysfs
/// tree that describes them, and the directories the node components use.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub vfs: Vec<String>,
    pub macs: Vec<String>,
}

impl Node {
    /// `count` VFs of PF `<prefix>p`, whose representors `pf0vf<N>` sit in the DPU namespace.
    pub fn new(topo: &Topology, count: usize) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let pf = format!("{}p", topo.prefix);
        let pf_dev = sys.join("class/net").join(&pf).join("device");
        std::fs::create_dir_all(&pf_dev).unwrap();
        std::fs::write(sys.join("class/net").join(&pf).join("operstate"), "up\n").unwrap();
        let mut vfs = Vec::new();
        let mut macs = Vec::new();
        for n in 0..count {
            let vf = format!("{}h{n}", topo.prefix);
            sh(&format!("ip link add {vf} type veth peer name pf0vf{n} netns {}", topo.dpu));
            let pci = sys.join(format!("bus/pci/devices/0000:03:00.{}", n + 1));
            std::fs::create_dir_all(pci.join("net").join(&vf)).unwrap();
            std::fs::write(pci.join("numa_node"), "0\n").unwrap();
            std::os::unix::fs::symlink(&pci, pf_dev.join(format!("virtfn{n}"))).unwrap();
            let l = sh(&format!("ip -j link show dev {vf}"));
            let v: Value = serde_json::from_str(&l).unwrap();
            macs.push(v[0]["address"].as_str().unwrap().to_string());
            vfs.push(vf);
        }
        Node { dir, vfs, macs }
    }

    pub fn pf(&self, topo: &Topology) -> String {
        format!("{}p", topo.prefix)
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("run/host-agent.sock")
    }

    pub fn device_id(n: usize) -> String {
        format!("0000:03:00.{}", n + 1)
    }

    pub fn spawn_host_agent(&self, broker: &str, certs: &Path, node: &str, serial: &str) -> Process {
        let mut cmd = Command::new(HOST_AGENT);
        cmd.args(["--broker", broker])
            .args(["--tls-cert", certs.join("tls.crt").to_str().unwrap()])
            .args(["--tls-key", certs.join("tls.key").to_str().unwrap()])
            .args(["--ca", certs.join("ca.crt").to_str().unwrap()])
            .args(["--node", node, "--dpu-serial", serial])
            .args(["--socket", self.socket().to_str().unwrap()])
            .args(["--kubelet-dir", self.path("kubelet").to_str().unwrap()])
            .args(["--state-dir", self.path("host-agent").to_str().unwrap()])
            .args(["--attach-timeout", "20s"]);
        Process::spawn(cmd, &self.path("host-agent.log"))
    }

    pub fn spawn_device_plugin(&self, topo: &Topology) -> Process {
        let mut cmd = Command::new(DEVICE_PLUGIN);
        cmd.args(["--host-agent-socket", self.socket().to_str().unwrap()])
            .args(["--kubelet-dir", self.path("kubelet").to_str().unwrap()])
            .args(["--pf", &self.pf(topo)])
            .args(["--sysfs-root", self.path("sys").to_str().unwrap()])
            .args(["--devinfo-dir", self.path("devinfo").to_str().unwrap()])
            .args(["--rescan-interval", "300ms"]);
        Process::spawn(cmd, &self.path("device-plugin.log"))
    }

    pub fn cni_config(&self, device_id: Option<&str>) -> Value {
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": "tenant-a",
            "type": "xpu-cni",
            "hostAgentSocket": self.socket(),
            "cacheDir": self.path("cni-cache"),
        });
        if let Some(id) = device_id {
            conf["deviceID"] = json!(id);
        }
        conf
    }
}

/// A long-running binary with its log in a file; killed on drop.
pub struct Process {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(mut cmd: Command, log: &Path) -> Process {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        cmd.stdout(Stdio::null()).stderr(f).env("XPU_LOG", "info");
        Process { child: cmd.spawn().unwrap(), log: log.to_path_buf() }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct CniRun {
    pub code: i32,
    pub stdout: String,
    pub json: Value,
}

/// Runs `xpu-cni` as a container runtime does (off the test's runtime thread, which also runs
/// the broker).
pub async fn cni(command: &str, container: &str, netns: &str, ifname: &str, pod: (&str, &str), conf: &Value) -> CniRun {
    let env: HashMap<&'static str, String> = HashMap::from([
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", container.to_string()),
        ("CNI_NETNS", netns.to_string()),
        ("CNI_IFNAME", ifname.to_string()),
        ("CNI_PATH", "/opt/cni/bin".to_string()),
        (
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID=uid-{}", pod.0, pod.1, pod.1),
        ),
    ]);
    cni_raw(env, conf.to_string()).await
}

pub async fn cni_raw(env: HashMap<&'static str, String>, stdin: String) -> CniRun {
    tokio::task::spawn_blocking(move || cni_blocking(&env, &stdin)).await.unwrap()
}

fn cni_blocking(env: &HashMap<&str, String>, stdin: &str) -> CniRun {
    let mut child = Command::new(CNI)
        .env_clear()
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    CniRun { code: out.status.code().unwrap_or(-1), stdout, json }
}

/// A pod sandbox: a network namespace, removed on drop.
pub struct Sandbox {
    pub name: String,
}

impl Sandbox {
    pub fn new(name: &str) -> Sandbox {
        let _ = sh_ok(&format!("ip netns del {name}"));
        sh(&format!("ip netns add {name} && ip -n {name} link set lo up"));
        Sandbox { name: name.to_string() }
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    pub fn ping(&self, ip: &str) -> bool {
        sh_ok(&format!("ip netns exec {} ping -c 2 -i 0.2 -W 1 {ip}", self.name))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = sh_ok(&format!("ip netns del {}", self.name));
    }
}
