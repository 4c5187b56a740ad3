//! The mutating file commands (`mkdir`, `rm`, `mv`, `put`, `vdisk create`), implemented once
//! for both ways they run: the command line's own short-lived host of the datastore, and the
//! local agent's long-lived one ([`crate::files_api`]). Both build a [`FileRequest`] and call
//! [`apply`], so they change the datastore the same way and fail with the same message.

use std::io::Read;

use serde::{Deserialize, Serialize};
use vmfs::{Creds, Datastore, Kind};

/// One mutating file command, as the command line spells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum FileOp {
    Mkdir {
        path: String,
        /// Create missing parents; an existing directory is fine.
        parents: bool,
    },
    Rm {
        path: String,
        recursive: bool,
    },
    /// Like mv(1): into an existing directory keeps the name.
    Mv {
        src: String,
        dst: String,
    },
    /// Copies the bytes that follow into `path` (into it, when it is a directory).
    Put {
        path: String,
        from: PutSource,
        thick: bool,
        /// The input's length when known up front (a regular file).
        size: Option<u64>,
    },
    VdiskCreate {
        path: String,
        size: u64,
        thick: bool,
    },
}

/// Where `put` reads from, for the name of a copy into a directory and for messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PutSource {
    Stdin,
    File {
        /// The local path as the user gave it.
        shown: String,
        /// Its last component, if it has one.
        name: Option<String>,
    },
}

/// A [`FileOp`] and who asks for it: new files and directories are theirs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRequest {
    #[serde(flatten)]
    pub op: FileOp,
    pub uid: u32,
    pub gid: u32,
}

impl FileRequest {
    /// `op` on behalf of this process's effective user.
    pub fn current(op: FileOp) -> FileRequest {
        let creds = Creds::current();
        FileRequest {
            op,
            uid: creds.uid,
            gid: creds.gid,
        }
    }

    fn creds(&self) -> Creds {
        Creds {
            uid: self.uid,
            gid: self.gid,
        }
    }
}

/// What a successful [`FileOp`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "done", rename_all = "kebab-case")]
pub enum Done {
    Nothing,
    Put { path: String, bytes: u64 },
    VdiskCreate { size: u64, allocated: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Vmfs(#[from] vmfs::Error),
    /// Bad input caught before the datastore was touched.
    #[error("{0}")]
    Refused(String),
    /// A `put` without the bytes to copy (a caller's bug, or a request cut short).
    #[error("put {0}: no input")]
    NoInput(String),
}

/// Runs `request` on `ds`. `input` is what `put` copies; `progress` hears how many bytes of it
/// have been copied so far. When it returns, the change is durable and every host reads it,
/// as when a command that mounted the datastore itself has ended: a long-lived host (the
/// agent) would otherwise keep it in memory until its next periodic commit. The locks it took
/// stay held until then, so a burst of commands in one directory takes them once.
pub fn apply(
    ds: &Datastore,
    request: &FileRequest,
    input: Option<&mut dyn Read>,
    progress: &mut dyn FnMut(u64),
) -> Result<Done, FileError> {
    let outcome = run(ds, request, input, progress);
    // A failed command may have changed something too (a failed put removes its temporary
    // file): that is made visible as well.
    let committed = ds.commit();
    let done = outcome?;
    committed?;
    Ok(done)
}

fn run(
    ds: &Datastore,
    request: &FileRequest,
    input: Option<&mut dyn Read>,
    progress: &mut dyn FnMut(u64),
) -> Result<Done, FileError> {
    let creds = request.creds();
    match &request.op {
        FileOp::Mkdir { path, parents } => {
            if *parents {
                ds.mkdir_all(path, 0o755, creds)?;
            } else {
                ds.mkdir_path(path, 0o755, creds)?;
            }
            Ok(Done::Nothing)
        }
        FileOp::Rm { path, recursive } => {
            ds.remove_path(path, *recursive)?;
            Ok(Done::Nothing)
        }
        FileOp::Mv { src, dst } => {
            let dst = match ds.stat_path(dst) {
                Ok(a) if a.kind == Kind::Dir => {
                    format!("{}/{}", dst.trim_end_matches('/'), last_component(src))
                }
                _ => dst.clone(),
            };
            ds.rename_path(src, &dst)?;
            Ok(Done::Nothing)
        }
        FileOp::Put {
            path,
            from,
            thick,
            size,
        } => {
            let input = input.ok_or_else(|| FileError::NoInput(path.clone()))?;
            let path = target_path(ds, path, from)?;
            let options = vmfs::PutOptions {
                new: vmfs::NewFile {
                    mode: 0o644,
                    creds,
                    thick: *thick,
                    vdisk: false,
                },
                overwrite: true,
                expected_size: *size,
            };
            let bytes = ds.put(input, &path, &options, progress)?;
            Ok(Done::Put { path, bytes })
        }
        FileOp::VdiskCreate { path, size, thick } => {
            let attr = ds.create_vdisk(path, *size, *thick, creds)?;
            Ok(Done::VdiskCreate {
                size: attr.size,
                allocated: attr.allocated,
            })
        }
    }
}

/// A path inside the datastore: into `dst` when it is a directory (or ends in '/').
fn target_path(ds: &Datastore, dst: &str, from: &PutSource) -> Result<String, FileError> {
    let into_dir = dst.ends_with('/') || ds.stat_path(dst).is_ok_and(|a| a.kind == Kind::Dir);
    if !into_dir {
        return Ok(dst.to_string());
    }
    let name = match from {
        PutSource::Stdin => {
            return Err(FileError::Refused(format!(
                "{dst}: is a directory; standard input has no name to copy it under, so give the file's path"
            )));
        }
        PutSource::File {
            name: Some(name), ..
        } => name,
        PutSource::File { shown, name: None } => {
            return Err(FileError::Refused(format!("{shown}: has no file name")));
        }
    };
    Ok(format!("{}/{name}", dst.trim_end_matches('/')))
}

/// The last component of a datastore path, as mv(1) and cp(1) name a copy in a directory.
pub fn last_component(path: &str) -> &str {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
}

/// An error and its causes on one line, as the command line prints a failure (anyhow's
/// `{:#}`), so a command run through the agent fails with the same words.
pub fn error_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        line.push_str(": ");
        line.push_str(&e.to_string());
        cause = e.source();
    }
    line
}
