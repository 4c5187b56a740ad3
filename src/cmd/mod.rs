//! One module per command group; each parses its own arguments and returns an exit code.

pub mod clone;
pub mod datastore;
pub mod dr;
pub mod dr_net;
pub mod export;
pub mod files;
pub mod host;
pub mod mount;
pub mod network;
pub mod rdm;
pub mod replica;
pub mod resources;
pub mod snapshot;
pub mod vdisk_snapshot;
pub mod vm;

use std::io::{self, Write};

use anyhow::Context;
use clap::Args;

/// Standard output was closed by its reader (`vapp ls | head -1`). Not a failure of the
/// command: `main` ends the process as coreutils end, by SIGPIPE, without a message.
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// The error of a write to standard output: a closed pipe becomes [`StdoutClosed`].
pub fn stdout_error(e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("writing to standard output")
    }
}

/// Writes `text` to standard output; `println!` would panic on a closed pipe.
pub fn print(text: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    out.write_fmt(text)
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}

/// `println!` that returns [`StdoutClosed`] instead of panicking when the reader is gone.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cmd::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// The `-d LUN` argument, required by every command that works inside a datastore.
/// `YYYY-MM-DD HH:MM:SS` (UTC) of a time in nanoseconds since the Unix epoch, as `ls -l`,
/// `stat` and `snapshot list` show it; `@SECONDS` for one no calendar holds.
pub fn utc_time(ns: i128) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ns)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]"
            ))
            .ok()
        })
        .unwrap_or_else(|| format!("@{}", ns.div_euclid(1_000_000_000)))
}

pub fn require_datastore(datastore: Option<&str>) -> anyhow::Result<&str> {
    datastore.context("no datastore given: pass -d LUN or set VAPP_DATASTORE")
}

/// Who a long-running command (mount, datastore export) is in the datastore's cluster.
#[derive(Args)]
pub struct HostIdentity {
    /// Host name in the datastore's cluster (default: the machine's).
    #[arg(long, env = vmfs::HOST_NAME_ENV)]
    pub host_name: Option<String>,
    /// Host UUID in the datastore's cluster (default: from /etc/machine-id). It names the
    /// machine; every process is a host of its own with its own heartbeat slot, so two
    /// commands on one machine need no UUIDs of their own.
    #[arg(long, env = vmfs::HOST_UUID_ENV)]
    pub host_uuid: Option<uuid::Uuid>,
}

impl HostIdentity {
    pub fn open_options(&self, read_only: bool) -> vmfs::OpenOptions {
        let mut options = if read_only {
            vmfs::OpenOptions::read_only()
        } else {
            vmfs::OpenOptions::read_write()
        };
        if let Some(name) = &self.host_name {
            options.host_name = name.clone();
        }
        if let Some(uuid) = self.host_uuid {
            options.host_uuid = uuid;
        }
        options
    }
}
