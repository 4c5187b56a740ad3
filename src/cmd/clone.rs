//! `vapp clone`: full copies of a LUN on another LUN, kept by the source's snapshot engine.
//!
//! The engine keeps the clone relationship (state, fracture log) in the source's pool; this
//! host's registry (`clones/<key>.toml` in the state directory) maps the clone LUN back to
//! its source, so `clone sync DEST` finds the pool from DEST alone. Clones on files are
//! re-attached whenever the source's engine is opened, so a synchronized clone follows
//! every write made through vapp. Each operation runs where the source's engine is: here,
//! or in the process that holds the source (an export), sent over its control socket.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use lun::Lun;
use serde::{Deserialize, Serialize};
use snapshot::{CloneInfo, CloneState, Snapshots};

use super::snapshot::{Reply, Request, progress};
use crate::lunspec::{self, Spec};
use crate::outln;

#[derive(Subcommand)]
pub enum CloneCommand {
    /// Copy SRC onto DEST (a file is created at SRC's size when missing).
    Create(CreateArgs),
    /// Stop mirroring to a synchronized clone; both sides then change independently.
    Fracture(DestArg),
    /// Copy the chunks changed on either side since the fracture from the source to DEST.
    Sync(DestArg),
    /// Copy the chunks changed on either side since the fracture from DEST back to the source.
    ReverseSync(DestArg),
    /// Show a clone's state and the chunks its next sync copies.
    Status(StatusArgs),
}

/// What to do with a clone, as it travels to the process holding its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloneOp {
    Create { synchronized: bool },
    Fracture,
    Sync,
    ReverseSync,
    Status,
}

#[derive(Args)]
pub struct CreateArgs {
    pub src: String,
    pub dest: String,
    /// Keep DEST equal to SRC by mirroring every later write (until fractured).
    #[arg(long)]
    pub synchronized: bool,
}

#[derive(Args)]
pub struct DestArg {
    pub dest: String,
}

#[derive(Args)]
pub struct StatusArgs {
    pub dest: String,
    #[arg(long)]
    pub json: bool,
}

/// A clone as this host's registry records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloneEntry {
    pub source: String,
    pub dest: String,
    /// The clone's name in the source's pool.
    pub name: String,
}

fn entry_path(dest: &Spec) -> std::path::PathBuf {
    lunspec::state_dir()
        .join("clones")
        .join(format!("{}.toml", dest.key()))
}

/// The registry entry of the clone at `dest`, if it is one.
pub fn lookup(dest: &Spec) -> anyhow::Result<Option<CloneEntry>> {
    lunspec::read_toml(&entry_path(dest))
}

pub fn run(command: CloneCommand) -> anyhow::Result<ExitCode> {
    let (src, dest, op, json) = match command {
        CloneCommand::Create(args) => {
            let src = Spec::parse(&args.src);
            if src.session.is_some() {
                bail!("{}: clone a LUN, not a session", args.src);
            }
            let op = CloneOp::Create {
                synchronized: args.synchronized,
            };
            (src, args.dest, op, false)
        }
        CloneCommand::Fracture(args) => {
            (source_of(&args.dest)?, args.dest, CloneOp::Fracture, false)
        }
        CloneCommand::Sync(args) => (source_of(&args.dest)?, args.dest, CloneOp::Sync, false),
        CloneCommand::ReverseSync(args) => (
            source_of(&args.dest)?,
            args.dest,
            CloneOp::ReverseSync,
            false,
        ),
        CloneCommand::Status(args) => (
            source_of(&args.dest)?,
            args.dest,
            CloneOp::Status,
            args.json,
        ),
    };
    let request = Request::Clone {
        dest: absolute(&dest)?,
        op,
    };
    let reply = super::snapshot::send(&src, &request)
        .with_context(|| format!("{dest}: clone of {}", src.typed))?;
    match (&reply.clone, json) {
        (Some(status), true) => outln!("{}", serde_json::to_string_pretty(status)?)?,
        _ => outln!("{}", reply.message)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The source of the clone at `typed`, from this host's registry.
fn source_of(typed: &str) -> anyhow::Result<Spec> {
    let entry = lookup(&Spec::parse(typed))?.with_context(|| {
        format!("{typed}: not a clone on this host (no vapp clone create made it)")
    })?;
    Ok(Spec::parse(&entry.source))
}

/// A path made absolute (the process holding the source has another working directory).
fn absolute(typed: &str) -> anyhow::Result<String> {
    match lun::LunSpec::parse(typed) {
        Ok(lun::LunSpec::Path(path)) => Ok(std::path::absolute(&path)
            .with_context(|| format!("{typed}: cannot make the path absolute"))?
            .display()
            .to_string()),
        _ => Ok(typed.to_string()),
    }
}

/// Runs `op` on the clone at `dest` of `src`, in the process that has `snaps` open.
pub fn apply(src: &Spec, snaps: &Snapshots, dest: &str, op: CloneOp) -> anyhow::Result<Reply> {
    let entry = || -> anyhow::Result<CloneEntry> {
        lookup(&Spec::parse(dest))?.with_context(|| format!("{dest}: not a clone on this host"))
    };
    let message = match op {
        CloneOp::Create { synchronized } => return create(src, snaps, dest, synchronized),
        CloneOp::Status => {
            let info = info(snaps, &entry()?.name)?;
            let status = serde_json::json!({
                "clone": dest,
                "name": info.name,
                "lun": info.lun,
                "state": state_name(info.state),
                "logged_chunks": info.logged_chunks,
            });
            let message = format!(
                "{dest}: {}, {} chunks to copy at the next sync",
                state_name(info.state),
                info.logged_chunks
            );
            return Ok(Reply {
                clone: Some(status),
                ..Reply::done(message)
            });
        }
        CloneOp::Fracture => {
            snaps.fracture(&entry()?.name)?;
            format!("{dest}: fractured")
        }
        CloneOp::Sync => {
            let name = entry()?.name;
            snaps.sync(&name)?;
            run_sync(snaps, &name, "sync")?;
            format!("{dest}: synchronized with its source")
        }
        CloneOp::ReverseSync => {
            let name = entry()?.name;
            snaps.reverse_sync(&name)?;
            run_sync(snaps, &name, "reverse sync")?;
            format!("{dest}: its source now equals it")
        }
    };
    Ok(Reply::done(message))
}

pub fn state_name(state: CloneState) -> &'static str {
    match state {
        CloneState::Syncing => "syncing",
        CloneState::Synchronized => "synchronized",
        CloneState::Fractured => "fractured",
        CloneState::ReverseSyncing => "reverse-syncing",
    }
}

fn info(snaps: &Snapshots, name: &str) -> anyhow::Result<CloneInfo> {
    snaps
        .clones()
        .into_iter()
        .find(|c| c.name == name)
        .with_context(|| format!("clone {name:?} is no longer in its source's pool"))
}

/// Runs a started sync to its end, with progress on a terminal.
fn run_sync(snaps: &Snapshots, name: &str, what: &str) -> anyhow::Result<()> {
    let total = info(snaps, name)?.logged_chunks;
    let bar = progress(total, what);
    while let Some(info) = snaps.sync_step(name, 64)? {
        bar.set_position(total.saturating_sub(info.logged_chunks));
    }
    bar.finish_and_clear();
    Ok(())
}

fn create(src: &Spec, snaps: &Snapshots, dest: &str, synchronized: bool) -> anyhow::Result<Reply> {
    let created = !std::path::Path::new(dest).exists();
    let make = || -> anyhow::Result<String> {
        let dest_lun = lun::open(
            dest,
            &lun::OpenOptions {
                create_size: created.then(|| snaps.source().size()),
                ..Default::default()
            },
        )
        .with_context(|| format!("{dest}: cannot open the clone LUN"))?;
        let dest_spec = Spec::parse(dest);
        if lookup(&dest_spec)?.is_some() {
            bail!("{dest}: already a clone");
        }
        let key = dest_spec.key();
        let name = format!("clone-{}", &key[key.len().saturating_sub(16)..]);
        snaps
            .add_clone(&name, dest_lun)
            .with_context(|| format!("{dest}: cannot make it a clone of {}", src.typed))?;
        lunspec::write_toml(
            &entry_path(&dest_spec),
            &CloneEntry {
                source: src.source.clone(),
                dest: dest_spec.source.clone(),
                name: name.clone(),
            },
        )?;
        Ok(name)
    };
    let name = match make() {
        Ok(name) => name,
        Err(e) => {
            if created {
                let _ = std::fs::remove_file(dest);
            }
            return Err(e);
        }
    };
    run_sync(snaps, &name, "copying")?;
    if !synchronized {
        snaps.fracture(&name)?;
    }
    Ok(Reply::done(format!(
        "{dest}: a {} clone of {}",
        if synchronized {
            "synchronized"
        } else {
            "fractured (point-in-time)"
        },
        src.typed
    )))
}
