//! Errors of mounting and unmounting; each names the mount point or datastore it is about.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: mount point does not exist", mountpoint.display())]
    MountpointMissing { mountpoint: PathBuf },

    #[error("{}: mount point is not a directory", mountpoint.display())]
    MountpointNotADirectory { mountpoint: PathBuf },

    #[error("{}: mount point is busy: {what} is already mounted there", mountpoint.display())]
    MountpointBusy { mountpoint: PathBuf, what: String },

    #[error("{}: not mounted", mountpoint.display())]
    NotMounted { mountpoint: PathBuf },

    #[error("{}: not a vapp mount (file system type {fstype})", mountpoint.display())]
    NotAVappMount { mountpoint: PathBuf, fstype: String },

    // The cause is part of the message rather than a `source`, so that `{:#}` chains do not
    // print it twice.
    #[error("{}: {action} failed: {error}", mountpoint.display())]
    Io {
        mountpoint: PathBuf,
        action: &'static str,
        error: io::Error,
    },

    /// The datastore could not be closed cleanly; its journal is replayed at the next mount.
    #[error("{}: closing the datastore failed: {error}", mountpoint.display())]
    Close {
        mountpoint: PathBuf,
        error: vmfs::Error,
    },
}

impl Error {
    pub(crate) fn io(mountpoint: &std::path::Path, action: &'static str, error: io::Error) -> Self {
        Error::Io {
            mountpoint: mountpoint.to_path_buf(),
            action,
            error,
        }
    }
}
