//! `vapp datastore ...`: format, info, fsck.

use std::process::ExitCode;

use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum DatastoreCommand {
    /// Format a LUN as a datastore (creates a sparse file if the path does not exist).
    Format(FormatArgs),
    /// Show a datastore's format, capacity and usage.
    Info(InfoArgs),
    /// Check (and with --repair, fix) a datastore. Exit 0 clean, 1 problems remain, 2 usage.
    Fsck(FsckArgs),
}

#[derive(Args)]
pub struct FormatArgs {
    pub lun: String,
    #[arg(long)]
    pub name: String,
    /// Size of the file to create when LUN does not exist (e.g. 8G).
    #[arg(long, default_value = "8G")]
    pub size: String,
    #[arg(long, default_value = "1M")]
    pub block_size: String,
}

#[derive(Args)]
pub struct InfoArgs {
    pub lun: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct FsckArgs {
    pub lun: String,
    #[arg(long)]
    pub repair: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: DatastoreCommand) -> anyhow::Result<ExitCode> {
    match command {
        DatastoreCommand::Format(_) | DatastoreCommand::Info(_) | DatastoreCommand::Fsck(_) => {
            anyhow::bail!("not built yet")
        }
    }
}
