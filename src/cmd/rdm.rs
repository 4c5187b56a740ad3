//! `vapp -d DS rdm create|show|verify`: raw device mappings.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum RdmCommand {
    /// Map a raw LUN (block device, file or nbd:// URL) into the datastore.
    Create(CreateArgs),
    /// Show what a mapping records.
    Show(ShowArgs),
    /// Find a mapping's LUN on this machine and check it is the one mapped, unchanged.
    Verify(ShowArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// Path of the mapping file in the datastore, e.g. /vms/a/db.rdm.
    pub path: String,
    /// The LUN to map.
    #[arg(long)]
    pub lun: String,
    /// virtual: I/O through vapp (snapshots allowed); physical: the device passed through
    /// (O_DIRECT, its own serial, discard; no vapp snapshots).
    #[arg(long)]
    pub mode: rdm::Mode,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ShowArgs {
    pub path: String,
    #[arg(long)]
    pub json: bool,
}

pub fn run(datastore: Option<&str>, command: RdmCommand) -> anyhow::Result<ExitCode> {
    let spec = super::require_datastore(datastore)?;
    match command {
        RdmCommand::Create(args) => {
            let ds = super::datastore::open_datastore(spec, &vmfs::OpenOptions::read_write())?;
            let mapping = rdm::create(&ds, &args.path, &args.lun, args.mode);
            // Close even after a refusal, so the slot is given back cleanly.
            ds.close().context("closing the datastore")?;
            let mapping = mapping?;
            if args.json {
                crate::outln!("{}", serde_json::to_string_pretty(&mapping)?)?;
            } else {
                crate::outln!(
                    "{}: {} mapping of {} ({} bytes, {}-byte sectors)",
                    mapping.path,
                    mapping.mode,
                    mapping.identity_text,
                    mapping.size,
                    mapping.sector_size
                )?;
            }
        }
        RdmCommand::Show(args) => {
            let ds = super::datastore::open_datastore(spec, &vmfs::OpenOptions::read_only())?;
            let mapping = rdm::show(&ds, &args.path)?;
            if args.json {
                crate::outln!("{}", serde_json::to_string_pretty(&mapping)?)?;
            } else {
                print_mapping(&mapping)?;
            }
        }
        RdmCommand::Verify(args) => {
            let ds = super::datastore::open_datastore(spec, &vmfs::OpenOptions::read_only())?;
            let verified = rdm::verify(&ds, &args.path);
            if args.json {
                // A failed check is an answer too: tools read it from the same document.
                let (value, code) = match verified {
                    Ok(v) => {
                        let mut value = serde_json::to_value(&v)?;
                        value["ok"] = true.into();
                        value["error"] = serde_json::Value::Null;
                        (value, ExitCode::SUCCESS)
                    }
                    Err(e) => (
                        serde_json::json!({ "ok": false, "error": e.to_string(), "path": args.path }),
                        ExitCode::FAILURE,
                    ),
                };
                crate::outln!("{}", serde_json::to_string_pretty(&value)?)?;
                return Ok(code);
            }
            let verified = verified?;
            {
                crate::outln!(
                    "{}: ok, {} found at {}{}",
                    verified.mapping.path,
                    verified.mapping.identity_text,
                    verified.found_at,
                    if verified.moved {
                        format!(" (mapped at {})", verified.mapping.recorded_path)
                    } else {
                        String::new()
                    }
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn print_mapping(m: &rdm::Mapping) -> anyhow::Result<()> {
    crate::outln!("     path: {}", m.path)?;
    crate::outln!("     mode: {}", m.mode)?;
    crate::outln!(" identity: {} [{}]", m.identity_text, m.identity)?;
    crate::outln!("mapped at: {}", m.recorded_path)?;
    crate::outln!("     size: {} bytes", m.size)?;
    crate::outln!("   sector: {} bytes", m.sector_size)?;
    crate::outln!("   serial: {}", m.serial.as_deref().unwrap_or("(none)"))?;
    crate::outln!("datastore: {}", m.datastore_uuid)?;
    crate::outln!("  created: {}", super::utc_time(m.created_ns.into()))?;
    Ok(())
}
