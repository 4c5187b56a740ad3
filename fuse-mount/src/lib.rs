//! A vmfs datastore mounted through FUSE, as one host of the cluster.
//!
//! [`mount`] takes an open [`vmfs::Datastore`] (read-write: a host with a heartbeat slot; or
//! read-only: no host id, no locks, nothing written) and mounts it on a directory. When it
//! returns, the mount is live. [`Mount::run`] serves requests on several worker threads
//! until the file system is unmounted (by [`unmount`], `umount`, `fusermount3 -u`), then
//! releases every lock and closes the datastore, reporting a close that failed.
//!
//! Inside: `fs` maps each FUSE operation onto the datastore (and says what the kernel may
//! cache, and why); `open_files` keeps the datastore locks behind this host's open files;
//! `kernel_mount` makes the mount; `mounts` finds mounts in the mount table, unmounts them
//! (lazily, or by aborting a dead connection) and registers the daemon serving each.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let lun = lun::open("/srv/ds1.vmfs", &lun::OpenOptions::default())?;
//! let ds = vmfs::Datastore::open(lun, &vmfs::OpenOptions::read_write())?;
//! let mount = fuse_mount::mount(ds, "/mnt/ds1".as_ref(), &fuse_mount::MountOptions::default())?;
//! mount.run()?; // until `vapp umount /mnt/ds1`
//! # Ok(()) }
//! ```

mod attr;
mod error;
mod fs;
mod kernel_mount;
mod mounts;
mod open_files;
mod rdm_files;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuser::SessionACL;
use vmfs::Datastore;

pub use error::{Error, Result};
pub use mounts::{
    Daemon, FSTYPE, MountEntry, Unmounted, daemon_state, find_mount, mount_table, mountpoint_path,
    unmount, wait_closed,
};

use fs::{Shared, VmfsFs};
use open_files::OpenFiles;

/// Worker threads by default: requests block on LUN I/O, so more threads than cores pay.
pub const DEFAULT_THREADS: usize = 4;

/// Kernel read-ahead on the mount: one default datastore block.
const READ_AHEAD_KIB: u32 = 1024;

#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Let users other than the one mounting use the mount (kernel `allow_other`;
    /// unprivileged users need `user_allow_other` in /etc/fuse.conf).
    pub allow_other: bool,
    /// Worker threads serving requests, each with its own /dev/fuse descriptor.
    pub threads: usize,
    /// Shown as the source in the mount table: the datastore's LUN.
    pub source: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            allow_other: false,
            threads: DEFAULT_THREADS,
            source: "vapp".into(),
        }
    }
}

/// A live mount that is not served yet.
pub struct Mount {
    session: fuser::Session<VmfsFs>,
    shared: Arc<Shared>,
    mountpoint: PathBuf,
    registration: Option<mounts::Registration>,
}

/// Checks that `mountpoint` can take a mount: an existing directory with nothing mounted on
/// it. Cheap and side-effect free, so callers run it before opening the datastore.
pub fn check_mountpoint(mountpoint: &Path) -> Result<PathBuf> {
    let busy = |m: MountEntry| Error::MountpointBusy {
        mountpoint: mountpoint.to_path_buf(),
        what: format!("{} ({})", m.source, m.fstype),
    };
    let at = mountpoint_path(mountpoint).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MountpointMissing {
            mountpoint: mountpoint.to_path_buf(),
        },
        _ => Error::io(mountpoint, "resolving the mount point", e),
    })?;
    // Look in the mount table before touching the directory: a dead FUSE mount there would
    // answer stat with ENOTCONN.
    let table = mount_table().map_err(|e| Error::io(mountpoint, "reading the mount table", e))?;
    if let Some(m) = table.iter().rev().find(|m| m.mountpoint == at) {
        return Err(busy(m.clone()));
    }
    let real = match std::fs::metadata(&at) {
        Ok(meta) if meta.is_dir() => at.canonicalize().unwrap_or(at),
        Ok(_) => {
            return Err(Error::MountpointNotADirectory {
                mountpoint: mountpoint.to_path_buf(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::MountpointMissing {
                mountpoint: mountpoint.to_path_buf(),
            });
        }
        Err(e) => return Err(Error::io(mountpoint, "checking the mount point", e)),
    };
    // The last component may be a symbolic link to a mount point.
    if let Some(m) = table.into_iter().rev().find(|m| m.mountpoint == real) {
        return Err(busy(m));
    }
    Ok(real)
}

/// Mounts `ds` on `mountpoint`. On return the mount is live (the kernel's INIT has been
/// answered); serve it with [`Mount::run`] or [`Mount::spawn`]. On failure nothing is
/// mounted and the datastore is closed.
pub fn mount(ds: Datastore, mountpoint: &Path, options: &MountOptions) -> Result<Mount> {
    let read_only = ds.is_read_only();
    let shared = Arc::new(Shared {
        ds,
        files: OpenFiles::new(read_only),
        rdms: rdm_files::RdmFiles::default(),
        read_only,
    });
    let at = match check_mountpoint(mountpoint) {
        Ok(at) => at,
        Err(e) => {
            let _ = close(shared, mountpoint);
            return Err(e);
        }
    };
    let fd = match kernel_mount::mount(
        &at,
        &kernel_mount::KernelOptions {
            source: &options.source,
            read_only,
            allow_other: options.allow_other,
        },
    ) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = close(shared, &at);
            return Err(Error::io(&at, "mounting", e));
        }
    };
    let mut config = fuser::Config::default();
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;
    let acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let session = match fuser::Session::from_fd(VmfsFs::new(shared.clone()), fd, acl, config) {
        Ok(s) => s,
        Err(e) => {
            // The kernel has the mount but nobody will ever answer it.
            if let Err(u) = unmount(&at, true) {
                tracing::warn!(mountpoint = %at.display(), error = %u, "removing the half-made mount failed");
            }
            let _ = close(shared, &at);
            return Err(Error::io(&at, "starting the FUSE session", e));
        }
    };
    if let Ok(Some(entry)) = find_mount(&at) {
        kernel_mount::set_read_ahead(entry.major, entry.minor, READ_AHEAD_KIB);
    }
    let registration = match mounts::register(&at, &options.source) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(mountpoint = %at.display(), error = %e, "mount not registered: `vapp umount` will not wait for the datastore to close");
            None
        }
    };
    tracing::info!(
        mountpoint = %at.display(),
        lun = %options.source,
        read_only,
        host_slot = ?shared.ds.host_slot(),
        threads = options.threads.max(1),
        "datastore mounted"
    );
    Ok(Mount {
        session,
        shared,
        mountpoint: at,
        registration,
    })
}

/// Releases the locks and closes the datastore; `Err` when its last commit failed (the
/// journal is then replayed at the next mount).
fn close(shared: Arc<Shared>, mountpoint: &Path) -> Result<()> {
    shared.files.close_all();
    match Arc::try_unwrap(shared) {
        Ok(shared) => shared.ds.close().map_err(|error| Error::Close {
            mountpoint: mountpoint.to_path_buf(),
            error,
        }),
        Err(still_shared) => {
            // A worker thread outlived the session; the datastore closes when it goes.
            tracing::warn!(mountpoint = %mountpoint.display(), "datastore still referenced at unmount");
            drop(still_shared);
            Ok(())
        }
    }
}

impl Mount {
    /// The mount point as it appears in the mount table.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Serves requests until the file system is unmounted, then closes the datastore. The
    /// registration that `vapp umount` waits on is dropped only after that.
    pub fn run(self) -> Result<()> {
        let Mount {
            session,
            shared,
            mountpoint,
            registration,
        } = self;
        let served = session.run();
        let closed = close(shared, &mountpoint);
        tracing::info!(mountpoint = %mountpoint.display(), clean = closed.is_ok(), "unmounted");
        drop(registration);
        served.map_err(|e| Error::io(&mountpoint, "serving the mount", e))?;
        closed
    }

    /// Serves requests on background threads.
    pub fn spawn(self) -> Result<BackgroundMount> {
        let mountpoint = self.mountpoint.clone();
        let thread = std::thread::Builder::new()
            .name("vapp-mount".into())
            .spawn(move || self.run())
            .map_err(|e| Error::io(&mountpoint, "starting the mount thread", e))?;
        Ok(BackgroundMount {
            mountpoint,
            thread: Some(thread),
        })
    }
}

/// A mount served by background threads of this process. Dropping it aborts and unmounts.
pub struct BackgroundMount {
    mountpoint: PathBuf,
    thread: Option<JoinHandle<Result<()>>>,
}

impl BackgroundMount {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts (which fails with `MountpointBusy`-like errors only if the kernel refuses),
    /// waits for the session to end and closes the datastore.
    pub fn unmount(mut self) -> Result<()> {
        let how = unmount(&self.mountpoint, false)?;
        if how == Unmounted::Detached {
            tracing::warn!(mountpoint = %self.mountpoint.display(), "files still open: waiting for them to close");
        }
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(Error::io(
                    &self.mountpoint,
                    "serving the mount",
                    std::io::Error::other("mount thread panicked"),
                ))
            }),
            None => Ok(()),
        }
    }
}

impl Drop for BackgroundMount {
    fn drop(&mut self) {
        if self.thread.is_some() {
            if let Err(e) = unmount(&self.mountpoint, true) {
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount at drop failed");
            }
            if let Err(e) = self.join() {
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "mount ended with an error");
            }
        }
    }
}
