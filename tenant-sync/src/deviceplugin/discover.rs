//! VF discovery from sysfs: `class/net/<pf>/device/virtfn<N>` links to each VF's PCI device,
//! whose `net/` directory names its netdev. The root is configurable so that tests (and
//! containers with sysfs elsewhere) can point it at another tree.

use std::path::{Path, PathBuf};

/// A statically configured SF: `<id>:<pf index>:<sf index>:<netdev>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SfSpec {
    pub id: String,
    pub pf: u32,
    pub index: u32,
    pub interface: String,
}

impl std::str::FromStr for SfSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<SfSpec, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || format!("{s:?} is not <id>:<pf index>:<sf index>:<netdev>");
        let [id, pf, index, interface] = parts.as_slice() else { return Err(bad()) };
        Ok(SfSpec {
            id: id.to_string(),
            pf: pf.parse().map_err(|_| bad())?,
            index: index.parse().map_err(|_| bad())?,
            interface: interface.to_string(),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovered {
    /// PCI address of the VF (or the SF's configured id): the device plugin's device ID.
    pub id: String,
    pub pf: u32,
    pub pf_name: String,
    pub index: u32,
    pub sf: bool,
    pub interface: String,
    pub numa: Option<i64>,
    pub healthy: bool,
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn pf_up(root: &Path, pf: &str) -> bool {
    read_trimmed(&root.join("class/net").join(pf).join("operstate")).is_some_and(|s| s == "up")
}

/// Every VF of the PFs (in order: PF index = position) and the configured SFs, sorted by id.
pub fn scan(root: &Path, pfs: &[String], sfs: &[SfSpec]) -> Vec<Discovered> {
    let mut out = Vec::new();
    for (pf_index, pf) in pfs.iter().enumerate() {
        let pf_index = pf_index as u32;
        let up = pf_up(root, pf);
        let device: PathBuf = root.join("class/net").join(pf).join("device");
        let Ok(entries) = std::fs::read_dir(&device) else {
            tracing::warn!(pf, path = %device.display(), "PF not found");
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(n) = name.strip_prefix("virtfn").and_then(|n| n.parse::<u32>().ok()) else { continue };
            let link = entry.path();
            let Some(id) =
                std::fs::read_link(&link).ok().and_then(|t| t.file_name().map(|f| f.to_string_lossy().into_owned()))
            else {
                continue;
            };
            let interface = std::fs::read_dir(link.join("net"))
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .unwrap_or_default();
            let numa = read_trimmed(&link.join("numa_node")).and_then(|s| s.parse::<i64>().ok()).filter(|n| *n >= 0);
            let healthy = up && !interface.is_empty();
            out.push(Discovered {
                id,
                pf: pf_index,
                pf_name: pf.clone(),
                index: n,
                sf: false,
                interface,
                numa,
                healthy,
            });
        }
    }
    for sf in sfs {
        let pf_name = pfs.get(sf.pf as usize).cloned().unwrap_or_default();
        let healthy = !pf_name.is_empty() && pf_up(root, &pf_name);
        out.push(Discovered {
            id: sf.id.clone(),
            pf: sf.pf,
            pf_name,
            index: sf.index,
            sf: true,
            interface: sf.interface.clone(),
            numa: None,
            healthy,
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_a_sysfs_tree() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("class/net/hpf0/device")).unwrap();
        std::fs::write(r.join("class/net/hpf0/operstate"), "up\n").unwrap();
        for (n, iface) in [(0, "hvf0"), (1, "")] {
            let dev = r.join(format!("bus/pci/devices/0000:03:00.{}", n + 1));
            std::fs::create_dir_all(dev.join("net")).unwrap();
            if !iface.is_empty() {
                std::fs::create_dir_all(dev.join("net").join(iface)).unwrap();
            }
            std::fs::write(dev.join("numa_node"), "1\n").unwrap();
            std::os::unix::fs::symlink(&dev, r.join(format!("class/net/hpf0/device/virtfn{n}"))).unwrap();
        }
        let sf: SfSpec = "sf-a:0:3:hsf3".parse().unwrap();
        let found = scan(r, &["hpf0".into()], &[sf]);
        assert_eq!(found.len(), 3);
        assert_eq!(found[0].id, "0000:03:00.1");
        assert_eq!(found[0].interface, "hvf0");
        assert_eq!(found[0].numa, Some(1));
        assert!(found[0].healthy);
        assert!(!found[1].healthy, "a VF without a netdev is unhealthy");
        assert!(found[2].sf && found[2].healthy);
        std::fs::write(r.join("class/net/hpf0/operstate"), "down\n").unwrap();
        assert!(scan(r, &["hpf0".into()], &[]).iter().all(|d| !d.healthy), "PF down: every VF unhealthy");
        assert!("a:b".parse::<SfSpec>().is_err());
    }
}
