//! Prints every CRD of `xpu.opi.dev` as YAML (`crdgen`), or writes them as files (`crdgen DIR`,
//! which is how `deploy/crds/` is produced; a test fails when the committed files drift).

fn main() -> std::process::ExitCode {
    let files = match xpu_sync_common::crd::yaml_files() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match std::env::args().nth(1) {
        None => {
            for (_, body) in files {
                println!("---\n{body}");
            }
        }
        Some(dir) => {
            for (name, body) in files {
                let path = std::path::Path::new(&dir).join(name);
                if let Err(e) = std::fs::write(&path, body) {
                    eprintln!("error: {}: {e}", path.display());
                    return std::process::ExitCode::FAILURE;
                }
                println!("wrote {}", path.display());
            }
        }
    }
    std::process::ExitCode::SUCCESS
}
