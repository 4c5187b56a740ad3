//! File commands inside a datastore: ls, mkdir, rm, mv, stat, cat, put, get, vdisk.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

#[derive(Args)]
pub struct LsArgs {
    /// Long listing: type, mode, size, allocated, modification time.
    #[arg(short = 'l')]
    pub long: bool,
    #[arg(default_value = "/")]
    pub path: String,
}

#[derive(Args)]
pub struct MkdirArgs {
    /// Create missing parents; no error if the directory exists.
    #[arg(short = 'p')]
    pub parents: bool,
    pub path: String,
}

#[derive(Args)]
pub struct RmArgs {
    /// Remove directories and their contents.
    #[arg(short = 'r')]
    pub recursive: bool,
    pub path: String,
}

#[derive(Args)]
pub struct MvArgs {
    pub src: String,
    pub dst: String,
}

#[derive(Args)]
pub struct StatArgs {
    pub path: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CatArgs {
    pub path: String,
}

#[derive(Args)]
pub struct PutArgs {
    pub local_file: PathBuf,
    pub path: String,
    /// Allocate and zero every block up front (eager-zeroed thick).
    #[arg(long)]
    pub thick: bool,
}

#[derive(Args)]
pub struct GetArgs {
    pub path: String,
    pub local_file: PathBuf,
}

#[derive(Subcommand)]
pub enum VdiskCommand {
    /// Create a virtual disk (thin unless --thick).
    Create(VdiskCreateArgs),
}

#[derive(Args)]
pub struct VdiskCreateArgs {
    pub path: String,
    #[arg(long)]
    pub size: String,
    #[arg(long)]
    pub thick: bool,
}

macro_rules! not_built {
    ($($name:ident: $args:ty),*) => {$(
        pub fn $name(datastore: Option<&str>, _args: $args) -> anyhow::Result<ExitCode> {
            super::require_datastore(datastore)?;
            anyhow::bail!("not built yet")
        }
    )*};
}
not_built!(ls: LsArgs, mkdir: MkdirArgs, rm: RmArgs, mv: MvArgs, stat: StatArgs, cat: CatArgs,
    put: PutArgs, get: GetArgs, vdisk: VdiskCommand);
