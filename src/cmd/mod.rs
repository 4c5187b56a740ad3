//! One module per command group; each parses its own arguments and returns an exit code.

pub mod datastore;
pub mod export;
pub mod files;
pub mod host;
pub mod mount;
pub mod vm;

use anyhow::Context;
use clap::Args;

/// The `-d LUN` argument, required by every command that works inside a datastore.
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
