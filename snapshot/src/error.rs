use lun::LunError;

pub type Result<T, E = SnapError> = std::result::Result<T, E>;

/// What went wrong, naming the pool, the source or the session.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error(transparent)]
    Lun(#[from] LunError),

    #[error("{pool}: not a usable snapshot pool: {reason}")]
    BadPool { pool: String, reason: String },

    #[error("{pool}: pool of another source: it belongs to {expected}, not {found}")]
    WrongSource {
        pool: String,
        expected: String,
        found: String,
    },

    #[error(
        "{pool}: pool too small: {size} bytes hold no {chunk_size}-byte chunk after the metadata"
    )]
    PoolTooSmall {
        pool: String,
        size: u64,
        chunk_size: u32,
    },

    #[error("{pool}: bad chunk size {chunk_size}: {reason}")]
    BadChunkSize {
        pool: String,
        chunk_size: u32,
        reason: String,
    },

    #[error("{pool}: no snapshot session named {name:?}")]
    UnknownSession { pool: String, name: String },

    #[error("{pool}: a snapshot session named {name:?} already exists")]
    SessionExists { pool: String, name: String },

    #[error("{pool}: bad session name {name:?}: {reason}")]
    BadName {
        pool: String,
        name: String,
        reason: String,
    },

    #[error("{pool}: already {max} sessions, delete one first")]
    TooManySessions { pool: String, max: usize },

    #[error("{pool}: session {name:?} was invalidated (the pool filled up) and cannot be used")]
    SessionInvalid { pool: String, name: String },

    #[error("{pool}: a rollback to session {name:?} is in progress; wait for it to finish")]
    RollbackInProgress { pool: String, name: String },

    #[error("{pool}: no clone named {name:?}")]
    UnknownClone { pool: String, name: String },

    #[error("{pool}: a clone named {name:?} already exists")]
    CloneExists { pool: String, name: String },

    #[error("{pool}: already {max} clones, remove one first")]
    TooManyClones { pool: String, max: usize },

    #[error("{pool}: {lun} cannot be a clone of this source: {reason}")]
    BadClone {
        pool: String,
        lun: String,
        reason: String,
    },

    #[error("{pool}: clone {name:?}: {reason}")]
    CloneBusy {
        pool: String,
        name: String,
        reason: String,
    },

    #[error("{pool}: the pool is full")]
    PoolFull { pool: String },
}

impl SnapError {
    /// The error a `Lun` view reports: I/O errors pass through; a full pool is ENOSPC (as a
    /// thin disk out of space); anything else is EIO carrying this error's message.
    pub(crate) fn into_lun(self, lun: &str, offset: u64, len: u64) -> LunError {
        let source = match self {
            SnapError::Lun(e) => return e,
            SnapError::PoolFull { .. } => std::io::Error::from_raw_os_error(libc::ENOSPC),
            other => std::io::Error::other(other.to_string()),
        };
        LunError::Io {
            lun: lun.to_string(),
            offset,
            len,
            source,
        }
    }
}
