//! `vapp mount` and `vapp umount`: a datastore as a FUSE file system, served by a daemon that
//! is one host of the cluster.
//!
//! Without `--foreground` the command forks before anything else runs (the process is still
//! single-threaded there), the child opens the datastore and mounts it, and the parent exits
//! only when the child reports the mount live or tells it why it failed; the parent then
//! prints that error and nothing is left mounted. SIGTERM, SIGINT and SIGHUP unmount cleanly
//! (a busy mount is detached and served until its files close); a second signal aborts the
//! connection. Either way the datastore is closed before the daemon exits.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::ForkResult;

#[derive(Args)]
pub struct MountArgs {
    /// Directory to mount the datastore on.
    pub mountpoint: PathBuf,
    /// Open the datastore read-only: no host id, no locks, nothing written to the LUN.
    #[arg(long)]
    pub read_only: bool,
    /// Serve in the foreground, logging to stderr, instead of returning once mounted.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Let other users use the mount (unprivileged mounts need user_allow_other in
    /// /etc/fuse.conf). Permissions are checked against the mode and owner in the datastore.
    #[arg(long)]
    pub allow_other: bool,
    /// Worker threads serving requests.
    #[arg(long, default_value_t = fuse_mount::DEFAULT_THREADS as u16, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// File the background daemon appends its log to (default: discarded).
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    #[command(flatten)]
    pub host: super::HostIdentity,
}

#[derive(Args)]
pub struct UmountArgs {
    /// Where the datastore is mounted.
    pub mountpoint: PathBuf,
    /// Abort the FUSE connection even if the daemon is healthy: requests in flight fail
    /// with ENOTCONN. Data already written stays; the datastore is still closed cleanly.
    #[arg(long)]
    pub force: bool,
    /// Seconds to wait for the daemon to close the datastore.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

pub fn mount(datastore: Option<&str>, args: MountArgs) -> anyhow::Result<ExitCode> {
    let spec = super::require_datastore(datastore)?;
    // Plain mistakes are reported before forking, like any other command's.
    fuse_mount::check_mountpoint(&args.mountpoint)?;
    if args.foreground {
        return serve(spec, &args, None);
    }
    daemonize(spec, &args)
}

fn daemonize(spec: &str, args: &MountArgs) -> anyhow::Result<ExitCode> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1);
    if threads > 1 {
        bail!("cannot fork a daemon from a process with {threads} threads; use --foreground");
    }
    let (status_read, status_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating the status pipe")?;
    // SAFETY: the process is single-threaded (checked above), so the child is a complete
    // copy and may do anything the parent could.
    match unsafe { nix::unistd::fork() }.context("forking the mount daemon")? {
        ForkResult::Parent { child } => {
            drop(status_write);
            let mut status = String::new();
            let _ = File::from(status_read).read_to_string(&mut status);
            if status == "ready\n" {
                return Ok(ExitCode::SUCCESS);
            }
            let exit = nix::sys::wait::waitpid(child, None);
            if status.is_empty() {
                bail!("the mount process exited before the mount was ready ({exit:?})");
            }
            bail!("{}", status.trim_end());
        }
        ForkResult::Child => {
            drop(status_read);
            // A session of its own: the terminal closing does not signal the daemon.
            let _ = nix::unistd::setsid();
            let mut ready = Ready {
                pipe: Some(status_write),
                log: None,
            };
            // With a log file, everything the daemon logs goes there, from the start;
            // failures before the mount is ready still reach the caller through the pipe.
            if let Some(path) = &args.log_file {
                match File::options().create(true).append(true).open(path) {
                    Ok(file) => {
                        let _ = nix::unistd::dup2_stderr(&file);
                        ready.log = Some(file);
                    }
                    Err(e) => {
                        let message = format!("{}: cannot open the log file: {e}", path.display());
                        if let Some(pipe) = ready.pipe.take() {
                            let _ = File::from(pipe).write_all(message.as_bytes());
                        }
                        std::process::exit(1);
                    }
                }
            }
            let outcome = serve(spec, args, Some(&mut ready));
            let code = match outcome {
                Ok(_) => 0,
                Err(e) => {
                    match ready.pipe.take() {
                        Some(pipe) => {
                            let _ = File::from(pipe).write_all(format!("{e:#}").as_bytes());
                        }
                        None => tracing::error!(error = %format!("{e:#}"), "mount daemon failed"),
                    }
                    1
                }
            };
            std::process::exit(code);
        }
    }
}

/// The daemon's side of the status pipe.
struct Ready {
    pipe: Option<OwnedFd>,
    /// Where stderr goes once detached: the log file, or nowhere.
    log: Option<File>,
}

impl Ready {
    /// Detaches from the caller's terminal and pipes (so a parent that collects our output
    /// is not kept waiting) and tells the parent the mount is live.
    fn notify(&mut self) -> anyhow::Result<()> {
        let null = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .context("opening /dev/null")?;
        let log = match self.log.take() {
            Some(file) => file,
            None => null.try_clone().context("duplicating /dev/null")?,
        };
        nix::unistd::dup2_stdin(&null).context("redirecting stdin")?;
        nix::unistd::dup2_stdout(&null).context("redirecting stdout")?;
        nix::unistd::dup2_stderr(&log).context("redirecting stderr")?;
        // Holding no directory busy; everything relative was opened by now.
        std::env::set_current_dir("/").context("changing to /")?;
        if let Some(pipe) = self.pipe.take() {
            File::from(pipe)
                .write_all(b"ready\n")
                .context("reporting readiness")?;
        }
        Ok(())
    }
}

fn serve(spec: &str, args: &MountArgs, ready: Option<&mut Ready>) -> anyhow::Result<ExitCode> {
    // Blocked before any thread exists, so every thread inherits the mask and the signals
    // wait for the one thread that handles them.
    let signals = shutdown_signals();
    signals
        .thread_block()
        .context("blocking shutdown signals")?;
    let ds = super::datastore::open_datastore(spec, &args.host.open_options(args.read_only))?;
    let mounted = fuse_mount::mount(
        ds,
        &args.mountpoint,
        &fuse_mount::MountOptions {
            allow_other: args.allow_other,
            threads: usize::from(args.threads),
            source: mount_source(spec),
        },
    )
    .with_context(|| format!("{spec}: cannot mount on {}", args.mountpoint.display()))?;
    let mountpoint = mounted.mountpoint().to_path_buf();
    std::thread::Builder::new()
        .name("vapp-signals".into())
        .spawn(move || handle_signals(signals, &mountpoint))
        .context("starting the signal thread")?;
    if let Some(ready) = ready {
        ready.notify()?;
    }
    mounted
        .run()
        .with_context(|| format!("{spec}: mount on {}", args.mountpoint.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// What the mount table shows as the source: the LUN, as an absolute path when it is one.
fn mount_source(spec: &str) -> String {
    match lun::LunSpec::parse(spec) {
        Ok(lun::LunSpec::Path(path)) => path
            .canonicalize()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| spec.to_string()),
        _ => spec.to_string(),
    }
}

fn shutdown_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set
}

/// First signal: unmount (lazily when busy). Any further one: abort the connection.
fn handle_signals(signals: SigSet, mountpoint: &Path) {
    let mut force = false;
    loop {
        let Ok(signal) = signals.wait() else { continue };
        tracing::info!(?signal, mountpoint = %mountpoint.display(), force, "unmounting on signal");
        match fuse_mount::unmount(mountpoint, force) {
            Ok(fuse_mount::Unmounted::Detached) => tracing::warn!(
                mountpoint = %mountpoint.display(),
                "files are still open: serving them until they are closed (signal again to abort)"
            ),
            Ok(_) | Err(fuse_mount::Error::NotMounted { .. }) => {}
            Err(e) => tracing::error!(error = %e, "unmount on signal failed"),
        }
        force = true;
    }
}

pub fn umount(args: UmountArgs) -> anyhow::Result<ExitCode> {
    let entry = fuse_mount::find_mount(&args.mountpoint)
        .with_context(|| format!("{}: reading the mount table", args.mountpoint.display()))?;
    let mountpoint = entry
        .map(|e| e.mountpoint)
        .unwrap_or_else(|| args.mountpoint.clone());
    let daemon = fuse_mount::daemon_state(&mountpoint);
    let how = fuse_mount::unmount(&args.mountpoint, args.force)?;
    match how {
        fuse_mount::Unmounted::Detached => {
            eprintln!(
                "{}: busy: detached lazily; the datastore closes when the last open file is closed",
                mountpoint.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        fuse_mount::Unmounted::Clean | fuse_mount::Unmounted::Aborted => {
            if let fuse_mount::Daemon::Stopped(pid) = daemon {
                eprintln!(
                    "{}: unmounted, but the mount process {pid} is stopped and still holds the datastore: \
                     it closes it when continued (kill -CONT {pid}); if it is killed instead, the next mount recovers it",
                    mountpoint.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            if !fuse_mount::wait_closed(&mountpoint, Duration::from_secs(args.timeout)) {
                bail!(
                    "{}: unmounted, but the mount process did not close the datastore within {} s",
                    mountpoint.display(),
                    args.timeout
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
