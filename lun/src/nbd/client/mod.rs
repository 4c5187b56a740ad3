//! The `nbd://` LUN: a volume exported by any NBD server (qemu-nbd, nbdkit, rbd-nbd,
//! `vapp export`).
//!
//! Requests are split to the server's maximum payload and pipelined: a `submit` batch, a
//! large read, or calls from many threads all put their requests on the wire before
//! waiting. When the server allows several connections (`NBD_FLAG_CAN_MULTI_CONN`)
//! requests are spread over them. A connection that breaks fails its pending requests
//! and is re-established on the next request.

mod connection;
mod handshake;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use connection::{Batch, Connection, Op};
pub use handshake::BlockSizes;
use handshake::Negotiated;

use super::proto::*;
use super::transport::NbdTarget;
use crate::{IoRequest, Lun, LunError, Result, check_request, lock};

/// How to talk to the server.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// Refuse writes locally even when the export is writable.
    pub read_only: bool,
    /// Connections to open when the server allows more than one.
    pub connections: usize,
    /// Limit for connecting and for the handshake.
    pub connect_timeout: Duration,
    /// A request (or batch) with no reply for this long fails with [`LunError::Timeout`]
    /// and its connection is reset.
    pub io_timeout: Duration,
    /// Ask for structured replies (sparse reads, error messages). Off only to test
    /// servers in simple-reply mode.
    pub structured_replies: bool,
}

impl Default for NbdOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            connections: 4,
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            structured_replies: true,
        }
    }
}

/// What was negotiated with the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size the server reported (the LUN's size is this rounded down to whole sectors).
    pub export_size: u64,
    pub read_only: bool,
    pub can_flush: bool,
    pub can_fua: bool,
    pub can_trim: bool,
    pub can_write_zeroes: bool,
    pub can_multi_conn: bool,
    pub structured_replies: bool,
    pub block_sizes: Option<BlockSizes>,
    /// Connections in use.
    pub connections: usize,
}

/// Requests larger than this are split even when the server would take more: bigger
/// requests do not move data faster, they only pin more memory on both sides.
const MAX_REQUEST: u32 = 32 << 20;

/// Write-zeroes and trim carry no payload, so one request may cover much more.
const MAX_PAYLOADLESS: u64 = 1 << 30;

/// Requests per batch when a large write-zeroes falls back to writing zero buffers.
const FALLBACK_BATCH: usize = 64;

pub struct NbdLun {
    name: String,
    target: NbdTarget,
    export: String,
    options: NbdOptions,
    info: ExportInfo,
    flags: u16,
    size: u64,
    sector_size: u32,
    max_request: u32,
    slots: Vec<Mutex<Arc<Connection>>>,
    next_slot: AtomicUsize,
}

impl fmt::Debug for NbdLun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdLun")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("sector_size", &self.sector_size)
            .field("info", &self.info)
            .finish()
    }
}

impl NbdLun {
    /// Connects to `export` on `target` and negotiates.
    pub fn connect(target: NbdTarget, export: &str, options: NbdOptions) -> Result<Self> {
        let name = target.url(export);
        let open = || Connection::open(&target, export, &name, &options);
        let (first, negotiated) = open()?;
        let flags = negotiated.flags;
        if flags & FLAG_HAS_FLAGS == 0 {
            return Err(LunError::Protocol {
                lun: name,
                reason: "transmission flags lack NBD_FLAG_HAS_FLAGS".into(),
            });
        }

        // The server may refuse anything smaller or less aligned than its minimum block
        // size, so that is our sector; never below 512, the granularity metadata above us
        // is written in.
        let minimum = negotiated.block_sizes.map_or(1, |b| b.minimum);
        let sector_size = minimum.max(512);
        let size = negotiated.size - negotiated.size % u64::from(sector_size);
        let server_max = negotiated
            .block_sizes
            .map_or(DEFAULT_MAX_PAYLOAD, |b| b.maximum);
        let max_request = {
            let max = server_max.min(MAX_REQUEST);
            (max - max % sector_size).max(sector_size)
        };

        let wanted = if flags & FLAG_CAN_MULTI_CONN != 0 {
            options.connections.max(1)
        } else {
            1
        };
        let mut slots = vec![Mutex::new(Arc::new(first))];
        for _ in 1..wanted {
            // Extra connections only add speed: a server that takes fewer clients than it
            // advertises still gets served, over what it accepted.
            match open() {
                Ok((connection, other)) => {
                    check_same_export(&name, &negotiated, &other)?;
                    slots.push(Mutex::new(Arc::new(connection)));
                }
                Err(error) => {
                    tracing::warn!(lun = %name, connections = slots.len(), %error,
                        "server refused another connection; carrying on with fewer");
                    break;
                }
            }
        }

        let info = ExportInfo {
            export_size: negotiated.size,
            read_only: flags & FLAG_READ_ONLY != 0,
            can_flush: flags & FLAG_SEND_FLUSH != 0,
            can_fua: flags & FLAG_SEND_FUA != 0,
            can_trim: flags & FLAG_SEND_TRIM != 0,
            can_write_zeroes: flags & FLAG_SEND_WRITE_ZEROES != 0,
            can_multi_conn: flags & FLAG_CAN_MULTI_CONN != 0,
            structured_replies: negotiated.structured_replies,
            block_sizes: negotiated.block_sizes,
            connections: slots.len(),
        };
        tracing::debug!(lun = %name, size, sector_size, max_request, ?info, "NBD export connected");
        Ok(Self {
            name,
            target,
            export: export.to_string(),
            options,
            info,
            flags,
            size,
            sector_size,
            max_request,
            slots,
            next_slot: AtomicUsize::new(0),
        })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Writes `buf` with Forced Unit Access: durable when this returns, without flushing
    /// anything else. Servers without FUA get a write followed by a flush.
    pub fn write_fua(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        if !self.info.can_fua {
            self.write_at(buf, offset)?;
            return self.flush();
        }
        self.run(self.write_ops(buf, offset, CMD_FLAG_FUA).collect())
    }

    /// Tells the server the range is no longer needed; afterwards its contents are
    /// undefined until rewritten. A no-op on servers that do not take trims.
    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        if !self.info.can_trim || len == 0 {
            return Ok(());
        }
        self.run(self.payloadless(CMD_TRIM, offset, len))
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self, offset, len)?;
        if self.is_read_only() {
            return Err(LunError::ReadOnly {
                lun: self.name.clone(),
            });
        }
        Ok(())
    }

    /// A read of `buf` at `offset`, cut into requests of at most the maximum size.
    fn read_ops<'a>(
        &self,
        buf: &'a mut [u8],
        offset: u64,
    ) -> impl Iterator<Item = Op<'a>> + use<'a> {
        let max = self.max_request as usize;
        buf.chunks_mut(max)
            .enumerate()
            .map(move |(i, chunk)| Op::read(chunk, offset + (i * max) as u64))
    }

    /// A write of `buf` at `offset`, cut into requests of at most the maximum size.
    fn write_ops<'a>(
        &self,
        buf: &'a [u8],
        offset: u64,
        flags: u16,
    ) -> impl Iterator<Item = Op<'a>> + use<'a> {
        let max = self.max_request as usize;
        buf.chunks(max)
            .enumerate()
            .map(move |(i, chunk)| Op::write(chunk, offset + (i * max) as u64, flags))
    }

    fn payloadless(&self, command: u16, offset: u64, len: u64) -> Vec<Op<'static>> {
        let step = MAX_PAYLOADLESS - MAX_PAYLOADLESS % u64::from(self.sector_size);
        (0..len)
            .step_by(step as usize)
            .map(|start| {
                let n = step.min(len - start);
                Op::control(command, 0, offset + start, n as u32)
            })
            .collect()
    }

    /// A live connection for `slot`, reconnecting if the last one died.
    fn connection(&self, slot: usize) -> Result<Arc<Connection>> {
        let mut current = lock(&self.slots[slot]);
        if !current.is_dead() {
            return Ok(Arc::clone(&current));
        }
        let cause = current.death();
        let (connection, negotiated) =
            Connection::open(&self.target, &self.export, &self.name, &self.options).map_err(
                |e| LunError::Disconnected {
                    lun: self.name.clone(),
                    reason: format!("{cause}; reconnecting failed: {}", reason_of(&e)),
                },
            )?;
        if negotiated.size != self.info.export_size || negotiated.flags != self.flags {
            return Err(LunError::Protocol {
                lun: self.name.clone(),
                reason: format!(
                    "export changed while reconnecting: size {} -> {}, flags {:#x} -> {:#x}",
                    self.info.export_size, negotiated.size, self.flags, negotiated.flags
                ),
            });
        }
        tracing::info!(lun = %self.name, slot, after = %cause, "NBD connection re-established");
        *current = Arc::new(connection);
        Ok(Arc::clone(&current))
    }

    /// Sends every request, spread over the connections, and waits for all of them.
    fn run(&self, ops: Vec<Op<'_>>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::new(self.options.io_timeout);
        let connections = self.slots.len();
        let start = self.next_slot.fetch_add(ops.len(), Ordering::Relaxed);
        if connections == 1 || ops.len() == 1 {
            match self.connection(start % connections) {
                Ok(connection) => batch.send(&connection, ops),
                Err(error) => batch.fail(error),
            }
            return batch.wait();
        }
        let mut groups: Vec<Vec<Op<'_>>> = (0..connections).map(|_| Vec::new()).collect();
        for (i, op) in ops.into_iter().enumerate() {
            groups[(start + i) % connections].push(op);
        }
        for (slot, group) in groups.into_iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            match self.connection(slot) {
                Ok(connection) => batch.send(&connection, group),
                Err(error) => batch.fail(error),
            }
        }
        batch.wait()
    }

    fn zeroes_by_writing(&self, offset: u64, len: u64) -> Result<()> {
        let chunk = u64::from(self.max_request).min(len);
        let zeroes = vec![0u8; chunk as usize];
        let mut ops = Vec::with_capacity(FALLBACK_BATCH);
        let mut done = 0;
        while done < len {
            let n = chunk.min(len - done) as usize;
            ops.push(Op::write(&zeroes[..n], offset + done, 0));
            done += n as u64;
            if ops.len() == FALLBACK_BATCH || done == len {
                self.run(std::mem::take(&mut ops))?;
            }
        }
        Ok(())
    }
}

fn check_same_export(lun: &str, first: &Negotiated, other: &Negotiated) -> Result<()> {
    if first == other {
        return Ok(());
    }
    Err(LunError::Protocol {
        lun: lun.to_string(),
        reason: format!("connections to one export disagree: {first:?} versus {other:?}"),
    })
}

/// The part of an error after the LUN name, to nest it in another error of the same LUN.
fn reason_of(error: &LunError) -> String {
    match error {
        LunError::Open { reason, .. }
        | LunError::Disconnected { reason, .. }
        | LunError::Protocol { reason, .. } => reason.clone(),
        LunError::Timeout { op, seconds, .. } => format!("{op} timed out after {seconds:.1} s"),
        other => other.to_string(),
    }
}

impl Lun for NbdLun {
    fn reach(&self) -> crate::Reach {
        crate::Reach::Nbd
    }

    fn identity(&self) -> Option<crate::LunIdentity> {
        Some(crate::LunIdentity::Nbd {
            uri: self.name().to_string(),
        })
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn sector_size(&self) -> u32 {
        self.sector_size
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_request(self, offset, buf.len() as u64)?;
        self.run(self.read_ops(buf, offset).collect())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        self.run(self.write_ops(buf, offset, 0).collect())
    }

    fn flush(&self) -> Result<()> {
        if !self.info.can_flush || self.is_read_only() {
            // A server without NBD_FLAG_SEND_FLUSH writes through; the protocol forbids
            // sending it a flush.
            return Ok(());
        }
        self.run(vec![Op::control(CMD_FLUSH, 0, 0, 0)])
    }

    fn is_read_only(&self) -> bool {
        self.options.read_only || self.info.read_only
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.info.can_write_zeroes {
            self.run(self.payloadless(CMD_WRITE_ZEROES, offset, len))
        } else {
            self.zeroes_by_writing(offset, len)
        }
    }

    fn submit(&self, batch: &mut [IoRequest<'_>]) -> Result<()> {
        // Validate everything first so a bad request fails the batch before any I/O.
        for request in batch.iter() {
            match request {
                IoRequest::Read { buf, offset } => check_request(self, *offset, buf.len() as u64)?,
                IoRequest::Write { buf, offset } => self.check_write(*offset, buf.len() as u64)?,
            }
        }
        let mut ops = Vec::with_capacity(batch.len());
        for request in batch.iter_mut() {
            match request {
                IoRequest::Read { buf, offset } => ops.extend(self.read_ops(buf, *offset)),
                IoRequest::Write { buf, offset } => ops.extend(self.write_ops(buf, *offset, 0)),
            }
        }
        self.run(ops)
    }
}
