//! One module per command group; each parses its own arguments and returns an exit code.

pub mod datastore;
pub mod export;
pub mod files;
pub mod host;
pub mod mount;
pub mod vm;

use anyhow::Context;

/// The `-d LUN` argument, required by every command that works inside a datastore.
pub fn require_datastore(datastore: Option<&str>) -> anyhow::Result<&str> {
    datastore.context("no datastore given: pass -d LUN or set VAPP_DATASTORE")
}
