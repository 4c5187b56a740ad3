use lun::LunError;

pub type Result<T, E = ReplError> = std::result::Result<T, E>;

/// What went wrong, naming the LUN, the metadata or the peer.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error(transparent)]
    Lun(#[from] LunError),

    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapError),

    #[error("{meta}: not replication metadata: {reason}")]
    BadMetadata { meta: String, reason: String },

    #[error("{meta}: already holds replication metadata; refusing to overwrite it")]
    AlreadyFormatted { meta: String },

    #[error("{meta}: {needed} bytes of metadata needed, the LUN has {size}")]
    MetadataTooSmall {
        meta: String,
        needed: u64,
        size: u64,
    },

    #[error("{lun}: bad replication setting: {reason}")]
    BadConfig { lun: String, reason: String },

    /// The link to the peer is down or broke during the request.
    #[error("peer {peer}: link down: {reason}")]
    LinkDown { peer: String, reason: String },

    /// The peer broke the protocol: bad frame, other version, unexpected message.
    #[error("peer {peer}: protocol error: {reason}")]
    Protocol { peer: String, reason: String },

    #[error("peer {peer}: authentication failed: {reason}")]
    AuthFailed { peer: String, reason: String },

    /// The peer understood the request and refused it, saying why.
    #[error("peer {peer} refused: {reason}")]
    Refused { peer: String, reason: String },

    /// Both sides were written while apart; resync refuses until the operator picks a survivor.
    #[error("{lun}: split brain: {reason}")]
    SplitBrain { lun: String, reason: String },

    #[error("{lun}: {reason}")]
    WrongState { lun: String, reason: String },
}

impl ReplError {
    /// True when the error means the link is gone (the peer may still be fine).
    pub fn is_link_error(&self) -> bool {
        matches!(self, ReplError::LinkDown { .. })
    }
}
