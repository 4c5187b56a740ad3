//! `vapp`: the command line. Long-running commands (mount, export, vm start) are hosts of
//! the datastore's cluster for as long as they run; there is no separate agent.

mod cmd;
mod console;
mod lunspec;
mod replica_daemon;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vapp", version, about = "Storage-centric virtual appliance")]
struct Cli {
    /// Datastore LUN: a file, a block device or an nbd:// URL.
    #[arg(short = 'd', long = "datastore", env = "VAPP_DATASTORE", global = true)]
    datastore: Option<String>,

    /// Open a copy of a datastore (a snapshot, clone or replica) read-write with the
    /// original's signature: failover, once the original is gone. Refused while the
    /// original is reachable from this host. VAPP_KEEP_SIGNATURE=1 does the same.
    #[arg(long, global = true)]
    keep_signature: bool,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `vmfs=debug`.
    #[arg(long, env = "VAPP_LOG", default_value = "warn", global = true)]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Format, inspect and check datastores.
    #[command(subcommand)]
    Datastore(cmd::datastore::DatastoreCommand),
    /// List a directory.
    Ls(cmd::files::LsArgs),
    /// Create a directory.
    Mkdir(cmd::files::MkdirArgs),
    /// Remove a file or directory.
    Rm(cmd::files::RmArgs),
    /// Rename or move a file or directory.
    Mv(cmd::files::MvArgs),
    /// Show a file's attributes.
    Stat(cmd::files::StatArgs),
    /// Print a file's contents.
    Cat(cmd::files::CatArgs),
    /// Copy a local file into the datastore.
    Put(cmd::files::PutArgs),
    /// Copy a file out of the datastore.
    Get(cmd::files::GetArgs),
    /// Manage virtual disks.
    #[command(subcommand)]
    Vdisk(cmd::files::VdiskCommand),
    /// Raw device mappings: a mapping file that names a raw LUN by identity.
    #[command(subcommand)]
    Rdm(cmd::rdm::RdmCommand),
    /// Serve a LUN over NBD (qemu, nbdkit clients, other hosts' vapp).
    Export(cmd::export::ExportArgs),
    /// What this host offers for running VMs.
    #[command(subcommand)]
    Host(cmd::host::HostCommand),
    /// Mount a datastore through FUSE (as a host of the cluster).
    Mount(cmd::mount::MountArgs),
    /// Unmount a datastore mounted with `vapp mount`.
    Umount(cmd::mount::UmountArgs),
    /// Create, run, stop and list VMs that live on the datastore.
    #[command(subcommand)]
    Vm(cmd::vm::VmCommand),
    /// Point-in-time sessions of a LUN (LUN@NAME reads one), rollback, consistency groups.
    #[command(subcommand)]
    Snapshot(cmd::snapshot::SnapshotCommand),
    /// Full copies of a LUN on another LUN: synchronized, fractured, resynchronized.
    #[command(subcommand)]
    Clone(cmd::clone::CloneCommand),
    /// Two-site replication of a LUN: create, status, fracture, resume, promote, demote.
    #[command(subcommand)]
    Replica(cmd::replica::ReplicaCommand),
    /// Disaster recovery plans: validate, drill (test, cleanup, history).
    #[command(subcommand)]
    Dr(cmd::dr::DrCommand),
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    if cli.keep_signature {
        // Every read-write open reads it through vmfs::OpenOptions, VM processes too.
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var(vmfs::KEEP_SIGNATURE_ENV, "1") };
    }
    init_logging(&cli.log);
    let datastore = cli.datastore.as_deref();
    let outcome = match cli.command {
        Command::Datastore(command) => cmd::datastore::run(command),
        Command::Ls(args) => cmd::files::ls(datastore, args),
        Command::Mkdir(args) => cmd::files::mkdir(datastore, args),
        Command::Rm(args) => cmd::files::rm(datastore, args),
        Command::Mv(args) => cmd::files::mv(datastore, args),
        Command::Stat(args) => cmd::files::stat(datastore, args),
        Command::Cat(args) => cmd::files::cat(datastore, args),
        Command::Put(args) => cmd::files::put(datastore, args),
        Command::Get(args) => cmd::files::get(datastore, args),
        Command::Vdisk(command) => cmd::files::vdisk(datastore, command),
        Command::Rdm(command) => cmd::rdm::run(datastore, command),
        Command::Export(args) => cmd::export::run(datastore, args),
        Command::Host(command) => cmd::host::run(command),
        Command::Mount(args) => cmd::mount::mount(datastore, args),
        Command::Umount(args) => cmd::mount::umount(args),
        Command::Vm(command) => cmd::vm::run(datastore, command),
        Command::Snapshot(command) => cmd::snapshot::run(datastore, command),
        Command::Clone(command) => cmd::clone::run(command),
        Command::Replica(command) => cmd::replica::run(command),
        Command::Dr(command) => cmd::dr::run(command),
    };
    match outcome {
        Ok(code) => code,
        Err(error) if error.chain().any(|e| e.is::<cmd::StdoutClosed>()) => die_of_sigpipe(),
        Err(error) => {
            hostln!("vapp: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `println!` panics when standard output is a closed pipe; the commands that print much
/// report it as [`cmd::StdoutClosed`] instead, and this catches the other `println!` calls.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        // std's wording: "failed printing to stdout: Broken pipe (os error 32)".
        if message.starts_with("failed printing to stdout")
            && message.contains(&format!("(os error {})", libc::EPIPE))
        {
            die_of_sigpipe();
        }
        default(info);
    }));
}

/// Ends the process as `ls | head -1` ends ls: killed by SIGPIPE (status 141 to a shell),
/// with nothing on stderr. SIGPIPE stays ignored until here so that a write to a closed
/// socket (NBD, a VM's control socket) is an error the code handles, not a death.
fn die_of_sigpipe() -> ExitCode {
    // SAFETY: resetting a signal disposition and raising it on ourselves touch no memory.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    ExitCode::from(141)
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| console::HostStderr)
        // Daemons (a background mount, a VM under a service manager) log to files and pipes.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
