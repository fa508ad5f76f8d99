//! The agent's view of its desired state, and its persistence: the last revision applied and the
//! objects desired at that revision, written atomically (temp file, fsync, rename) so that a
//! restart resumes from the revision without the broker and without a full resync.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use xpu_proto::broker::v1 as pb;

use crate::dataplane::{ObjKey, ObjKind};

const FILE: &str = "state.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DesiredObject {
    pub uid: String,
    pub generation: i64,
    pub labels: BTreeMap<String, String>,
    /// The object as the broker sent it (metadata and spec).
    pub resource: pb::Resource,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Persisted {
    pub serial: String,
    pub revision: i64,
    pub objects: Vec<DesiredObject>,
}

/// What the agent wants its DPU to hold.
#[derive(Debug, Default)]
pub struct DesiredState {
    /// Last revision whose changes are reflected in `objects`.
    pub revision: i64,
    pub objects: BTreeMap<ObjKey, DesiredObject>,
    /// False until a state file was loaded or a snapshot received: until then, what the
    /// dataplane holds beyond `objects` may still be wanted, so nothing is treated as an orphan.
    pub known: bool,
    /// True once this process saw the broker's current state (a snapshot, or a replay up to the
    /// revision the broker had at registration). A persisted state may lag the dataplane (the
    /// last changes were programmed but not yet saved when the process died): acting on it
    /// would remove live ports and re-create deleted ones, so nothing is touched until then.
    pub current: bool,
    /// The broker's revision at the last registration: reaching it makes the state current.
    pub catch_up_to: i64,
    pub dirty: bool,
}

impl DesiredState {
    /// Marks the state current once it reached the registration revision; true if it just did.
    pub fn check_current(&mut self) -> bool {
        if !self.current && self.known && self.revision >= self.catch_up_to {
            self.current = true;
            return true;
        }
        false
    }
}

/// The key, uid, generation and labels of a resource from the broker.
pub fn identify(res: &pb::Resource) -> Option<(ObjKey, DesiredObject)> {
    use pb::resource::Kind as R;
    let (kind, meta) = match res.kind.as_ref()? {
        R::Vrf(o) => (ObjKind::Vrf, o.metadata.as_ref()?),
        R::LogicalBridge(o) => (ObjKind::LogicalBridge, o.metadata.as_ref()?),
        R::Svi(o) => (ObjKind::Svi, o.metadata.as_ref()?),
        R::Netdev(o) => (ObjKind::Netdev, o.metadata.as_ref()?),
        R::FlowPolicy(o) => (ObjKind::FlowPolicy, o.metadata.as_ref()?),
        R::Dpu(_) | R::XpuNetwork(_) => return None,
    };
    let key = ObjKey::new(kind, meta.namespace.clone(), meta.name.clone());
    let obj = DesiredObject {
        uid: meta.uid.clone(),
        generation: meta.generation,
        labels: meta.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        resource: res.clone(),
    };
    Some((key, obj))
}

pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> std::io::Result<StateFile> {
        std::fs::create_dir_all(dir)?;
        Ok(StateFile { dir: dir.to_path_buf() })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The persisted state, or None on a first start. A state file that does not parse is an
    /// error: the agent refuses to guess rather than tear down a dataplane it cannot account for.
    pub fn load(&self, serial: &str) -> anyhow::Result<Option<DesiredState>> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        };
        let p: Persisted = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not a valid state file: {e}", path.display()))?;
        anyhow::ensure!(
            p.serial == serial,
            "{} belongs to dpu {}, not {serial}; use another --state-dir",
            path.display(),
            p.serial
        );
        let objects = p.objects.into_iter().filter_map(|o| identify(&o.resource).map(|(k, _)| (k, o))).collect();
        Ok(Some(DesiredState {
            revision: p.revision,
            objects,
            known: true,
            current: false,
            catch_up_to: i64::MAX,
            dirty: false,
        }))
    }

    pub fn save(&self, serial: &str, state: &DesiredState) -> std::io::Result<()> {
        let p = Persisted {
            serial: serial.to_string(),
            revision: state.revision,
            objects: state.objects.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec(&p).map_err(std::io::Error::other)?;
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.path())?;
        // The rename itself must survive a crash too.
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path()).unwrap();
        assert!(file.load("dpu-a").unwrap().is_none());
        let res = pb::Resource {
            kind: Some(pb::resource::Kind::LogicalBridge(pb::LogicalBridge {
                metadata: Some(pb::ObjectMeta {
                    name: "lb-1".into(),
                    uid: "u".into(),
                    generation: 2,
                    ..Default::default()
                }),
                spec: Some(pb::LogicalBridgeSpec { vlan_id: 7, ..Default::default() }),
                status: None,
            })),
        };
        let (key, obj) = identify(&res).unwrap();
        let mut state = DesiredState { revision: 42, ..Default::default() };
        state.objects.insert(key.clone(), obj.clone());
        file.save("dpu-a", &state).unwrap();
        let loaded = file.load("dpu-a").unwrap().unwrap();
        assert_eq!(loaded.revision, 42);
        assert_eq!(loaded.objects.get(&key), Some(&obj));
        assert!(loaded.known);
        assert!(file.load("dpu-b").is_err(), "another DPU's state is refused");
        std::fs::write(file.path(), "{not json").unwrap();
        assert!(file.load("dpu-a").is_err());
    }
}
