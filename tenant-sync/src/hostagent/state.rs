//! The host agent's working state: devices the device plugin reserved, attachments in progress
//! or done, and detaches still owed to the broker. Kept in memory and in a small file written
//! atomically, so a restart loses nothing in flight.

use std::{collections::BTreeMap, io::Write, path::PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub pf: u32,
    pub index: u32,
    pub sf: bool,
    pub interface: String,
    pub reserved_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    pub netdev_id: String,
    pub device_id: String,
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub network: String,
    /// True once the broker answered Connected.
    pub connected: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingDetach {
    pub namespace: String,
    pub netdev_id: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub devices: BTreeMap<String, Device>,
    /// Keyed by `<container id>/<interface>`.
    pub attachments: BTreeMap<String, Attachment>,
    pub pending_detaches: Vec<PendingDetach>,
}

pub fn attachment_key(container_id: &str, interface: &str) -> String {
    format!("{container_id}/{interface}")
}

pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(dir: &std::path::Path) -> std::io::Result<StateFile> {
        std::fs::create_dir_all(dir)?;
        Ok(StateFile { path: dir.join("host-agent-state.json") })
    }

    pub fn load(&self) -> anyhow::Result<State> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not a valid state file: {e}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", self.path.display())),
        }
    }

    pub fn save(&self, state: &State) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}
