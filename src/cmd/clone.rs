//! `vapp clone`: full copies of a LUN on another LUN, kept by the source's snapshot engine.
//!
//! The engine keeps the clone relationship (state, fracture log) in the source's pool; this
//! host's registry (`clones/<key>.toml` in the state directory) maps the clone LUN back to
//! its source, so `clone sync DEST` finds the pool from DEST alone. Clones on files are
//! re-attached whenever the source's engine is opened, so a synchronized clone follows
//! every write made through vapp.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use lun::Lun;
use serde::{Deserialize, Serialize};
use snapshot::{CloneInfo, CloneState, Snapshots};

use super::snapshot::{Service, progress};
use crate::lunspec::{self, Claim, Spec};
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
    match command {
        CloneCommand::Create(args) => create(args),
        CloneCommand::Fracture(args) => on_clone(&args.dest, |snaps, name| {
            snaps.fracture(name)?;
            outln!("{}: fractured", args.dest)
        }),
        CloneCommand::Sync(args) => on_clone(&args.dest, |snaps, name| {
            snaps.sync(name)?;
            run_sync(snaps, name, "sync")?;
            outln!("{}: synchronized with its source", args.dest)
        }),
        CloneCommand::ReverseSync(args) => on_clone(&args.dest, |snaps, name| {
            snaps.reverse_sync(name)?;
            run_sync(snaps, name, "reverse sync")?;
            outln!("{}: its source now equals it", args.dest)
        }),
        CloneCommand::Status(args) => on_clone(&args.dest, |snaps, name| {
            let info = info(snaps, name)?;
            if args.json {
                let value = serde_json::json!({
                    "clone": args.dest,
                    "name": info.name,
                    "lun": info.lun,
                    "state": state_name(info.state),
                    "logged_chunks": info.logged_chunks,
                });
                outln!("{}", serde_json::to_string_pretty(&value)?)
            } else {
                outln!(
                    "{}: {}, {} chunks to copy at the next sync",
                    args.dest,
                    state_name(info.state),
                    info.logged_chunks
                )
            }
        }),
    }
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

/// Claims `spec`'s source and opens its engine, making a default pool when it has none.
fn claim_source(spec: &Spec) -> anyhow::Result<(Claim, Arc<Snapshots>)> {
    let claim = match Claim::take(spec)? {
        Ok(claim) => claim,
        Err(holder) => bail!(
            "{}: {} (clones of a served LUN are made with the server stopped, for now)",
            spec.typed,
            holder.refusal(&spec.typed)
        ),
    };
    let source = lunspec::open_raw(&spec.source, false)?;
    let service = Service::open(spec.clone(), source, None)?;
    let snaps = service.ensure_pool()?;
    Ok((claim, snaps))
}

fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let src = Spec::parse(&args.src);
    if src.session.is_some() {
        bail!("{}: clone a LUN, not a session", args.src);
    }
    let (_claim, snaps) = claim_source(&src)?;
    let created = !std::path::Path::new(&args.dest).exists();
    let make = || -> anyhow::Result<String> {
        let dest_lun = lun::open(
            &args.dest,
            &lun::OpenOptions {
                create_size: created.then(|| snaps.source().size()),
                ..Default::default()
            },
        )
        .with_context(|| format!("{}: cannot open the clone LUN", args.dest))?;
        let dest = Spec::parse(&args.dest);
        if lookup(&dest)?.is_some() {
            bail!("{}: already a clone", args.dest);
        }
        let name = format!("clone-{}", &dest.key()[dest.key().len() - 16..]);
        snaps
            .add_clone(&name, dest_lun)
            .with_context(|| format!("{}: cannot make it a clone of {}", args.dest, args.src))?;
        lunspec::write_toml(
            &entry_path(&dest),
            &CloneEntry {
                source: src.source.clone(),
                dest: dest.source.clone(),
                name: name.clone(),
            },
        )?;
        Ok(name)
    };
    let name = match make() {
        Ok(name) => name,
        Err(e) => {
            if created {
                let _ = std::fs::remove_file(&args.dest);
            }
            return Err(e);
        }
    };
    run_sync(&snaps, &name, "copying")?;
    if !args.synchronized {
        snaps.fracture(&name)?;
    }
    outln!(
        "{}: a {} clone of {}",
        args.dest,
        if args.synchronized {
            "synchronized"
        } else {
            "fractured (point-in-time)"
        },
        args.src
    )?;
    Ok(ExitCode::SUCCESS)
}

fn on_clone(
    typed: &str,
    work: impl FnOnce(&Snapshots, &str) -> anyhow::Result<()>,
) -> anyhow::Result<ExitCode> {
    let dest = Spec::parse(typed);
    let entry = lookup(&dest)?.with_context(|| {
        format!("{typed}: not a clone on this host (no vapp clone create made it)")
    })?;
    let src = Spec::parse(&entry.source);
    let (_claim, snaps) = claim_source(&src)?;
    work(&snaps, &entry.name).with_context(|| format!("{typed}: clone of {}", entry.source))?;
    Ok(ExitCode::SUCCESS)
}
