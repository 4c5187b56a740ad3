//! NBD, the network block device protocol, in both directions: [`NbdLun`] is a LUN served
//! by any NBD server, [`NbdServer`] serves any LUN to any NBD client.
//!
//! Both sides are our own implementation of the protocol specification. The `nbd` crate
//! (0.3) was evaluated first: its client only knows NBD_OPT_EXPORT_NAME, keeps one request
//! in flight (handle 0) and has no structured replies, block sizes, multi-conn or timeouts;
//! its server serves one request at a time. `tokio-nbd` is a GPL server on an async
//! runtime this workspace does not use. libnbd's Rust bindings are not on crates.io.

mod client;
mod proto;
mod server;
mod transport;

pub use client::{BlockSizes, ExportInfo, NbdLun, NbdOptions};
pub use server::{ExportConfig, ListenAddr, NbdServer, ServeError, ShutdownHandle};
pub use transport::NbdTarget;
