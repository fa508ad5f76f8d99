//! `xpu-broker ctl`: a kubectl-like operator CLI over AdminService.

pub mod manifest;
pub mod output;

use std::{io::Read, path::PathBuf, process::ExitCode};

use clap::{Subcommand, ValueEnum};
use futures::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};
use xpu_proto::broker::v1::{self as pb, admin_service_client::AdminServiceClient};

use crate::model::{
    Key, Kind,
    convert::{resource_key, resource_kind},
};

#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// Broker address, e.g. https://broker.example:50051
    #[arg(long, env = "XPU_BROKER", default_value = "https://127.0.0.1:50051")]
    broker: String,
    /// Client certificate with an admin identity (xpu://admin/<name>).
    #[arg(long, env = "XPU_TLS_CERT")]
    tls_cert: PathBuf,
    #[arg(long, env = "XPU_TLS_KEY")]
    tls_key: PathBuf,
    /// CA that issued the broker's certificate.
    #[arg(long, env = "XPU_CA")]
    ca: PathBuf,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Wide,
    Yaml,
    Json,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Create or update objects from a file (YAML or JSON; `-` reads stdin).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: String,
    },
    /// Show objects of a kind, or one object.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Equality selector: k=v[,k=v]
        #[arg(short = 'l', long)]
        selector: Option<String>,
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
    },
    /// Delete one object.
    Delete {
        kind: String,
        name: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Follow changes (all kinds, or one).
    Watch {
        kind: Option<String>,
        /// Resume after this revision (0: start with a snapshot).
        #[arg(long, default_value_t = 0)]
        since: i64,
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
    },
    /// Fleet summary.
    Status,
    /// Compact the log up to a revision (0: keep the configured retention).
    Compact {
        #[arg(long, default_value_t = 0)]
        revision: i64,
    },
    /// Remove a DPU and every Netdev routed to it.
    Decommission { serial: String },
}

#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("{0}")]
    Connect(String),
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}").chars().fold(String::new(), |mut s, c| {
        if c.is_uppercase() && !s.is_empty() {
            s.push('_');
        }
        s.push(c.to_ascii_uppercase());
        s
    })
}

pub async fn run(args: CtlArgs) -> ExitCode {
    match execute(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(args: &CtlArgs) -> Result<AdminServiceClient<Channel>, CtlError> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| CtlError::Connect(format!("{}: {e}", p.display())));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&args.ca)?))
        .identity(TlsIdentity::from_pem(read(&args.tls_cert)?, read(&args.tls_key)?));
    let endpoint = Endpoint::from_shared(args.broker.clone())
        .map_err(|e| CtlError::Connect(format!("--broker {}: {e}", args.broker)))?
        .tls_config(tls)
        .map_err(|e| CtlError::Connect(format!("TLS: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(10));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| CtlError::Connect(format!("cannot reach {}: {}", args.broker, source_chain(&e))))?;
    Ok(AdminServiceClient::new(channel))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn kind_arg(s: &str) -> Result<Kind, CtlError> {
    Kind::parse_cli(s).ok_or_else(|| {
        CtlError::Usage(format!(
            "unknown kind {s:?} (one of {})",
            Kind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
        ))
    })
}

fn key_arg(kind: Kind, name: String, namespace: Option<String>) -> Key {
    let ns = if kind.namespaced() { namespace.unwrap_or_else(|| "default".into()) } else { String::new() };
    Key::new(kind, ns, name)
}

fn print_objects(items: &[pb::Resource], output: Option<Output>) -> Result<(), CtlError> {
    match output {
        Some(Output::Json) => {
            let docs: Vec<_> = items.iter().map(manifest::to_manifest).collect();
            let value = if docs.len() == 1 {
                docs.into_iter().next().unwrap_or_default()
            } else {
                serde_json::json!({"apiVersion": "v1", "kind": "List", "items": docs})
            };
            println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        }
        Some(Output::Yaml) => {
            for item in items {
                println!(
                    "---\n{}",
                    serde_yaml_ng::to_string(&manifest::to_manifest(item)).unwrap_or_default().trim_end()
                );
            }
        }
        wide => print!("{}", output::render(&output::table(items, wide == Some(Output::Wide)))),
    }
    Ok(())
}

async fn execute(args: CtlArgs) -> Result<(), CtlError> {
    let mut client = connect(&args).await?;
    match args.command {
        CtlCommand::Apply { file } => {
            let text = if file == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).map_err(|e| CtlError::Usage(format!("stdin: {e}")))?;
                s
            } else {
                std::fs::read_to_string(&file).map_err(|e| CtlError::Usage(format!("{file}: {e}")))?
            };
            let objects = manifest::parse(&text).map_err(|e| CtlError::Usage(e.to_string()))?;
            if objects.is_empty() {
                return Err(CtlError::Usage(format!("{file}: no objects")));
            }
            for obj in objects {
                let what = resource_key(&obj).map(|k| k.to_string()).unwrap_or_default();
                let resp = client
                    .apply(pb::ApplyRequest { object: Some(obj), expected_generation: 0 })
                    .await
                    .map_err(|s| tonic::Status::new(s.code(), format!("{what}: {}", s.message())))?
                    .into_inner();
                let verb = if resp.changed { "configured" } else { "unchanged" };
                println!("{} {verb}", what.to_lowercase().replacen(' ', "/", 1));
            }
        }
        CtlCommand::Get { kind, name, namespace, selector, output } => {
            let kind = kind_arg(&kind)?;
            let items = match name {
                Some(name) => {
                    let key = key_arg(kind, name, namespace);
                    vec![client.get(pb::GetRequest { key: Some(key.to_proto()) }).await?.into_inner()]
                }
                None => {
                    let mut match_labels = std::collections::HashMap::new();
                    for pair in selector.iter().flat_map(|s| s.split(',')).filter(|p| !p.is_empty()) {
                        let (k, v) = pair
                            .split_once('=')
                            .ok_or_else(|| CtlError::Usage(format!("selector {pair:?} is not key=value")))?;
                        match_labels.insert(k.to_string(), v.to_string());
                    }
                    let mut items = Vec::new();
                    let mut token = String::new();
                    loop {
                        let page = client
                            .list(pb::ListRequest {
                                kind: kind.to_proto() as i32,
                                namespace: namespace.clone().unwrap_or_default(),
                                limit: 0,
                                continue_token: token,
                                label_selector: Some(pb::LabelSelector { match_labels: match_labels.clone() }),
                            })
                            .await?
                            .into_inner();
                        items.extend(page.items);
                        if page.continue_token.is_empty() {
                            break;
                        }
                        token = page.continue_token;
                    }
                    if items.is_empty() {
                        eprintln!("no {} objects", kind);
                        return Ok(());
                    }
                    items
                }
            };
            print_objects(&items, output)?;
        }
        CtlCommand::Delete { kind, name, namespace } => {
            let key = key_arg(kind_arg(&kind)?, name, namespace);
            let resp = client
                .delete(pb::DeleteRequest { key: Some(key.to_proto()), uid: String::new(), expected_generation: 0 })
                .await?
                .into_inner();
            if resp.existed {
                println!("{key} deleted (revision {})", resp.revision);
            } else {
                println!("{key} not found (nothing to delete)");
            }
        }
        CtlCommand::Watch { kind, since, output } => {
            let kinds = match kind {
                Some(k) => vec![kind_arg(&k)?.to_proto() as i32],
                None => vec![],
            };
            let mut stream = client.watch(pb::WatchRequest { kinds, since_revision: since }).await?.into_inner();
            while let Some(ev) = stream.next().await {
                let ev = ev?;
                print_event(&ev, output);
            }
        }
        CtlCommand::Status => {
            let s = client.fleet_status(pb::FleetStatusRequest {}).await?.into_inner();
            println!("revision:           {}", s.revision);
            println!("compacted revision: {}", s.compacted_revision);
            println!("dpus:               {} ready, {} unknown", s.dpus_ready, s.dpus_unknown);
            let mut phases: Vec<_> = s.netdevs_by_phase.into_iter().collect();
            phases.sort();
            let phases: Vec<String> = phases.iter().map(|(p, n)| format!("{n} {p}")).collect();
            println!("netdevs:            {}", if phases.is_empty() { "none".into() } else { phases.join(", ") });
            let mut kinds: Vec<_> = s.objects_by_kind.into_iter().collect();
            kinds.sort();
            let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k}={n}")).collect();
            println!("objects:            {}", kinds.join(" "));
            println!("streams:            {} (on the replica that answered)", s.active_streams);
        }
        CtlCommand::Compact { revision } => {
            let c = client.compact(pb::CompactRequest { revision }).await?.into_inner();
            println!(
                "compacted to revision {} ({} log entries, {} tombstones removed)",
                c.compacted_revision, c.log_entries_removed, c.tombstones_removed
            );
        }
        CtlCommand::Decommission { serial } => {
            let r = client.decommission_dpu(pb::DecommissionDpuRequest { serial: serial.clone() }).await?.into_inner();
            println!("dpu {serial} decommissioned ({} netdevs deleted, revision {})", r.netdevs_deleted, r.revision);
        }
    }
    Ok(())
}

fn print_event(ev: &pb::WatchEvent, output: Option<Output>) {
    use pb::watch_event::Event as E;
    if output == Some(Output::Json) {
        let value = match &ev.event {
            Some(E::Change(c)) => serde_json::json!({
                "revision": ev.revision,
                "type": pb::ChangeType::try_from(c.r#type).map(|t| t.as_str_name()).unwrap_or("UNKNOWN"),
                "object": c.object.as_ref().map(manifest::to_manifest),
            }),
            Some(E::Bookmark(_)) => {
                serde_json::json!({"revision": ev.revision, "type": "BOOKMARK"})
            }
            Some(E::Resync(r)) => {
                serde_json::json!({"revision": ev.revision, "type": "RESYNC", "reason": r.reason})
            }
            Some(E::SnapshotEnd(_)) => {
                serde_json::json!({"revision": ev.revision, "type": "SNAPSHOT_END"})
            }
            None => return,
        };
        println!("{value}");
        return;
    }
    match &ev.event {
        Some(E::Change(c)) => {
            let ty = pb::ChangeType::try_from(c.r#type).map(|t| t.as_str_name()).unwrap_or("UNKNOWN");
            let ty = ty.trim_start_matches("CHANGE_TYPE_");
            let (kind, key) = c
                .object
                .as_ref()
                .map(|o| (resource_kind(o).map(Kind::as_str).unwrap_or("?"), resource_key(o)))
                .unwrap_or(("?", None));
            let name = key.map(|k| if k.namespace.is_empty() { k.name } else { format!("{}/{}", k.namespace, k.name) });
            println!("{:>8}  {ty:<8}  {kind:<13}  {}", ev.revision, name.unwrap_or_default());
        }
        Some(E::Bookmark(_)) => {}
        Some(E::Resync(r)) => {
            let reason = pb::resync::Reason::try_from(r.reason).map(|r| r.as_str_name()).unwrap_or("UNKNOWN");
            println!("{:>8}  RESYNC    ({reason}; snapshot follows)", ev.revision);
        }
        Some(E::SnapshotEnd(_)) => println!("{:>8}  SNAPSHOT-END", ev.revision),
        None => {}
    }
}
