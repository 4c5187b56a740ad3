use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("[resources] {0}")]
    Config(String),
    /// `resource` is "CPU", "memory" or "network"; `detail` gives the numbers.
    #[error("cannot power on {vm}: its {resource} reservation {detail}")]
    Admission {
        vm: String,
        resource: &'static str,
        detail: String,
    },
    #[error("{path}: all {slots} scheduler slots are in use by running VMs")]
    NoSlot { path: PathBuf, slots: usize },
}

pub type Result<T> = std::result::Result<T, SchedError>;

pub(crate) fn io(
    path: impl Into<PathBuf>,
    what: impl Into<String>,
) -> impl FnOnce(std::io::Error) -> SchedError {
    let path = path.into();
    let what = what.into();
    move |source| SchedError::Io { path, what, source }
}
