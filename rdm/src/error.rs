//! What can go wrong with a mapping: each error names the mapping (or the LUN given) and
//! what was expected.

use lun::LunError;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Vmfs(#[from] vmfs::Error),

    #[error(transparent)]
    Lun(#[from] LunError),

    #[error("{path}: not a raw device mapping")]
    NotAMapping { path: String },

    #[error("{lun}: cannot be mapped: {reason}")]
    Unmappable { lun: String, reason: String },

    #[error("{lun}: is the LUN of this datastore ({datastore}); a mapping cannot name it")]
    DatastoreLun { lun: String, datastore: String },

    #[error("{lun}: already mapped on this datastore by {other}")]
    AlreadyMapped { lun: String, other: String },

    #[error(
        "{path}: mapping was made on datastore {recorded}, but this datastore is {actual} (a copied mapping); make a new mapping here"
    )]
    ForeignDatastore {
        path: String,
        recorded: String,
        actual: String,
    },

    #[error("{path}: mapped LUN {expected} not found on this machine (looked at {looked})")]
    DeviceMissing {
        path: String,
        expected: String,
        looked: String,
    },

    #[error("{path}: devices {found} all claim to be mapped LUN {expected}; detach all but one")]
    Ambiguous {
        path: String,
        expected: String,
        found: String,
    },

    #[error(
        "{path}: mapped LUN {expected} was {recorded} bytes when mapped, {device} is {actual} bytes now"
    )]
    SizeChanged {
        path: String,
        expected: String,
        device: String,
        recorded: u64,
        actual: u64,
    },

    #[error(
        "{path}: mapped LUN {expected} had {recorded}-byte sectors when mapped, {device} has {actual}-byte sectors now"
    )]
    SectorSizeChanged {
        path: String,
        expected: String,
        device: String,
        recorded: u32,
        actual: u32,
    },

    #[error("{path}: {what} is not supported by {device} ({reason})")]
    Unsupported {
        path: String,
        what: &'static str,
        device: String,
        reason: String,
    },
}

impl Error {
    /// errno a FUSE or NBD front end reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Vmfs(e) => e.errno(),
            Error::Lun(_) => libc::EIO,
            Error::NotAMapping { .. } | Error::Unmappable { .. } => libc::EINVAL,
            Error::DatastoreLun { .. } | Error::AlreadyMapped { .. } => libc::EEXIST,
            Error::ForeignDatastore { .. } => libc::EPERM,
            Error::DeviceMissing { .. } => libc::ENODEV,
            Error::Ambiguous { .. } => libc::ENOTUNIQ,
            Error::SizeChanged { .. } | Error::SectorSizeChanged { .. } => libc::EMEDIUMTYPE,
            Error::Unsupported { .. } => libc::EOPNOTSUPP,
        }
    }
}
