//! The one error type of the crate. Every variant names the object it is about (a path, an
//! inode, a LUN offset), and maps to the errno a FUSE or NBD front end should report.

use lun::LunError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Lun(#[from] LunError),

    #[error(
        "{lun}: not a vapp datastore (no vmfs superblock at offset 0 or at the end of the LUN)"
    )]
    NotADatastore { lun: String },

    #[error(
        "{lun}: datastore format version {found} is newer than this vapp supports ({supported})"
    )]
    NewerVersion {
        lun: String,
        found: u32,
        supported: u32,
    },

    #[error(
        "{lun}: truncated image: the datastore needs {expected} bytes but the LUN has {actual}"
    )]
    Truncated {
        lun: String,
        expected: u64,
        actual: u64,
    },

    #[error(
        "{lun}: LUN of {size} bytes is too small for a datastore: {reason}; minimum is {min} bytes"
    )]
    TooSmall {
        lun: String,
        size: u64,
        min: u64,
        reason: String,
    },

    #[error(
        "{lun}: a datastore already exists on this LUN (label {label:?}); use --force to overwrite"
    )]
    AlreadyFormatted { lun: String, label: String },

    /// On-disk metadata failed verification. Never accompanied by data.
    #[error("{object} at LUN offset {offset} on {lun}: {reason}")]
    Corrupt {
        lun: String,
        object: String,
        offset: u64,
        reason: String,
    },

    #[error("{object}: no such file or directory")]
    NotFound { object: String },

    #[error("{object}: already exists")]
    Exists { object: String },

    #[error("{object}: not a directory")]
    NotADirectory { object: String },

    #[error("{object}: is a directory")]
    IsADirectory { object: String },

    #[error("{object}: directory not empty")]
    NotEmpty { object: String },

    /// Names the component by its first bytes: the whole of it fills a terminal line.
    #[error("{}: name of {len} bytes is longer than 255 bytes", abbreviate(name))]
    NameTooLong { name: String, len: usize },

    #[error("{object}: symbolic link target of {len} bytes is longer than 4095 bytes")]
    TargetTooLong { object: String, len: usize },

    #[error("{object}: {reason}")]
    Invalid { object: String, reason: String },

    #[error("{lun}: no space left for {what} ({resource} exhausted)")]
    NoSpace {
        lun: String,
        what: String,
        resource: &'static str,
    },

    #[error(
        "{object}: size {size} exceeds the largest file this datastore addresses ({max} bytes)"
    )]
    FileTooBig { object: String, size: u64, max: u64 },

    /// A lock conflict: the object is held in an incompatible mode.
    #[error("{object}: busy, held {mode} by {holder}")]
    Busy {
        object: String,
        holder: String,
        mode: String,
    },

    #[error("{lun}: datastore is open read-only")]
    ReadOnly { lun: String },

    #[error("{lun}: all {slots} heartbeat slots are taken by other hosts")]
    NoHostSlot { lun: String, slots: u32 },

    #[error("{object}: operation not permitted: {reason}")]
    NotPermitted { object: String, reason: String },

    /// A virtual disk with snapshot sessions, or its pool, opened for writing, removed,
    /// renamed or replaced around the snapshot engine.
    #[error(
        "{object}: operation not permitted: {}",
        snapshot_refusal(.object, *.pool)
    )]
    SnapshotProtected { object: String, pool: bool },

    /// Metadata could not be written back after it was committed; the datastore stops taking
    /// updates until it is reopened (which replays the journal).
    #[error("{lun}: datastore stopped after a failed metadata write ({reason}); reopen to recover")]
    Fenced { lun: String, reason: String },

    /// This host's heartbeat lease ran out (or another host took its slot over): it writes
    /// nothing more to the LUN. Other hosts recover its journal and locks.
    #[error(
        "{lun}: host fenced: {reason}; this host no longer writes to the datastore (unmount and mount again to rejoin)"
    )]
    HostFenced { lun: String, reason: String },
}

/// Why a protected file cannot be changed, naming the pool (or the disk) it goes with.
fn snapshot_refusal(object: &str, pool: bool) -> String {
    if pool {
        let disk = crate::path::snapshot_source_path(object)
            .unwrap_or_else(|| "its virtual disk".to_string());
        format!(
            "it is the snapshot pool of {disk}; only the snapshot engine changes it (delete the snapshots of {disk} to remove it)"
        )
    } else if object.starts_with('/') {
        format!(
            "it has snapshots kept in {}; only the snapshot engine writes it (vm start, export, snapshot rollback), and it is removed or renamed only after its snapshots are deleted",
            crate::path::snapshot_pool_path(object)
        )
    } else {
        "it has snapshots kept in the pool beside it; only the snapshot engine writes it (vm start, export, snapshot rollback), and it is removed or renamed only after its snapshots are deleted".to_string()
    }
}

/// `"abcd…"`: the first 24 characters of a name, quoted.
fn abbreviate(name: &str) -> String {
    const SHOWN: usize = 24;
    match name.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}", format!("{}…", &name[..cut])),
        None => format!("{name:?}"),
    }
}

impl Error {
    /// The errno a FUSE or NBD front end reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Lun(e) => e.errno(),
            Error::NotADatastore { .. }
            | Error::NewerVersion { .. }
            | Error::Truncated { .. }
            | Error::Corrupt { .. }
            | Error::Fenced { .. }
            | Error::HostFenced { .. } => libc::EIO,
            Error::TooSmall { .. } | Error::NoSpace { .. } => libc::ENOSPC,
            Error::AlreadyFormatted { .. } | Error::Exists { .. } => libc::EEXIST,
            Error::NotFound { .. } => libc::ENOENT,
            Error::NotADirectory { .. } => libc::ENOTDIR,
            Error::IsADirectory { .. } => libc::EISDIR,
            Error::NotEmpty { .. } => libc::ENOTEMPTY,
            Error::NameTooLong { .. } | Error::TargetTooLong { .. } => libc::ENAMETOOLONG,
            Error::Invalid { .. } => libc::EINVAL,
            Error::FileTooBig { .. } => libc::EFBIG,
            Error::Busy { .. } | Error::NoHostSlot { .. } => libc::EBUSY,
            Error::ReadOnly { .. } => libc::EROFS,
            Error::NotPermitted { .. } | Error::SnapshotProtected { .. } => libc::EPERM,
        }
    }

    /// Re-names the object of a name-level error, so path helpers report the path the user
    /// typed instead of an inode number.
    pub fn at(self, path: &str) -> Self {
        let object = path.to_string();
        match self {
            Error::NotFound { .. } => Error::NotFound { object },
            Error::Exists { .. } => Error::Exists { object },
            Error::NotADirectory { .. } => Error::NotADirectory { object },
            Error::IsADirectory { .. } => Error::IsADirectory { object },
            Error::NotEmpty { .. } => Error::NotEmpty { object },
            Error::Busy { holder, mode, .. } => Error::Busy {
                object,
                holder,
                mode,
            },
            Error::FileTooBig { size, max, .. } => Error::FileTooBig { object, size, max },
            Error::NotPermitted { reason, .. } => Error::NotPermitted { object, reason },
            Error::SnapshotProtected { pool, .. } => Error::SnapshotProtected { object, pool },
            Error::NoSpace { lun, resource, .. } => Error::NoSpace {
                lun,
                what: object,
                resource,
            },
            other => other,
        }
    }

    /// True when the error means the datastore itself is damaged (as opposed to bad input).
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_covers_the_documented_cases() {
        let o = || "/a".to_string();
        assert_eq!(Error::NotFound { object: o() }.errno(), libc::ENOENT);
        assert_eq!(Error::Exists { object: o() }.errno(), libc::EEXIST);
        assert_eq!(Error::NotADirectory { object: o() }.errno(), libc::ENOTDIR);
        assert_eq!(Error::IsADirectory { object: o() }.errno(), libc::EISDIR);
        assert_eq!(Error::NotEmpty { object: o() }.errno(), libc::ENOTEMPTY);
        assert_eq!(
            Error::NameTooLong { name: o(), len: 2 }.errno(),
            libc::ENAMETOOLONG
        );
        assert_eq!(
            Error::Invalid {
                object: o(),
                reason: "x".into()
            }
            .errno(),
            libc::EINVAL
        );
        assert_eq!(
            Error::NoSpace {
                lun: o(),
                what: o(),
                resource: "file blocks"
            }
            .errno(),
            libc::ENOSPC
        );
        assert_eq!(
            Error::Busy {
                object: o(),
                holder: "h".into(),
                mode: "exclusive".into()
            }
            .errno(),
            libc::EBUSY
        );
        assert_eq!(Error::ReadOnly { lun: o() }.errno(), libc::EROFS);
        assert_eq!(
            Error::Corrupt {
                lun: o(),
                object: o(),
                offset: 0,
                reason: "x".into()
            }
            .errno(),
            libc::EIO
        );
        assert_eq!(
            Error::FileTooBig {
                object: o(),
                size: 1,
                max: 0
            }
            .errno(),
            libc::EFBIG
        );
    }

    #[test]
    fn at_renames_the_object() {
        let e = Error::NotFound {
            object: "inode 7".into(),
        }
        .at("/vms/a");
        assert_eq!(e.to_string(), "/vms/a: no such file or directory");
    }

    #[test]
    fn a_long_name_is_shown_by_its_start_and_length() {
        let e = Error::NameTooLong {
            name: "n".repeat(300),
            len: 300,
        };
        assert_eq!(
            e.to_string(),
            format!(
                "\"{}…\": name of 300 bytes is longer than 255 bytes",
                "n".repeat(24)
            )
        );
    }
}
