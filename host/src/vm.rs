//! What a VM is and where it runs on this host, shared by the agent and `vapp vm`:
//! [`spec`] parses and checks `vm.toml`, [`runtime`] is this host's registry of running VM
//! processes and their control sockets.

pub mod runtime;
pub mod spec;

/// Errors of this host's VM registry and control sockets; each names the file or socket.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    // The cause is part of the message rather than a `source`, so a caller printing the
    // whole chain does not print it twice.
    #[error("{context}: {cause}")]
    Context { context: String, cause: String },
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Errno(#[from] nix::errno::Errno),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Names the object a failure is about, as the command line's `anyhow` context does.
pub(crate) trait Context<T> {
    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn with_context<S: Into<String>>(self, context: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| RuntimeError::Context {
            context: context().into(),
            cause: e.to_string(),
        })
    }
}

macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::vm::RuntimeError::Msg(format!($($arg)*)))
    };
}
pub(crate) use bail;
