use std::io;

pub type Result<T, E = LunError> = std::result::Result<T, E>;

/// What went wrong, always naming the LUN.
#[derive(Debug, thiserror::Error)]
pub enum LunError {
    #[error("{lun}: cannot open: {reason}")]
    Open { lun: String, reason: String },

    #[error("{lun}: I/O error at offset {offset} ({len} bytes): {source}")]
    Io {
        lun: String,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },

    #[error(
        "{lun}: request at offset {offset} of {len} bytes is not aligned to the {sector_size}-byte sector"
    )]
    Misaligned {
        lun: String,
        offset: u64,
        len: u64,
        sector_size: u32,
    },

    #[error(
        "{lun}: request at offset {offset} of {len} bytes runs past the end of the LUN ({size} bytes)"
    )]
    OutOfRange {
        lun: String,
        offset: u64,
        len: u64,
        size: u64,
    },

    #[error("{lun}: {op} is not supported by this LUN")]
    Unsupported { lun: String, op: &'static str },

    #[error("{lun}: the LUN is read-only")]
    ReadOnly { lun: String },

    /// The transport to a remote LUN failed; the request's outcome is unknown.
    #[error("{lun}: connection lost: {reason}")]
    Disconnected { lun: String, reason: String },

    /// The peer broke the protocol (bad magic, unexpected reply, refused option).
    #[error("{lun}: protocol error: {reason}")]
    Protocol { lun: String, reason: String },

    #[error("{lun}: {op} timed out after {seconds:.1} s")]
    Timeout {
        lun: String,
        op: &'static str,
        seconds: f64,
    },

    /// Injected by the fault-injecting wrapper.
    #[error("{lun}: injected I/O error at offset {offset} ({len} bytes)")]
    Injected { lun: String, offset: u64, len: u64 },
}

impl LunError {
    /// The errno a block protocol (NBD, FUSE, virtio-blk) should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            LunError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            LunError::Misaligned { .. } => libc::EINVAL,
            LunError::OutOfRange { .. } => libc::ENOSPC,
            LunError::Unsupported { .. } => libc::EOPNOTSUPP,
            LunError::ReadOnly { .. } => libc::EPERM,
            LunError::Timeout { .. } => libc::ETIMEDOUT,
            LunError::Open { .. }
            | LunError::Disconnected { .. }
            | LunError::Protocol { .. }
            | LunError::Injected { .. } => libc::EIO,
        }
    }
}
