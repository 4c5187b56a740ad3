//! One client connection in the transmission phase.
//!
//! Requests from any number of threads go out under a send lock, each tagged with a fresh
//! handle; one receiver thread per connection matches replies to requests by handle and
//! completes them, so many requests are in flight at once. A request's caller waits on a
//! [`Batch`]; the receiver copies read data straight into the caller's buffer.
//!
//! When anything goes wrong with the stream (peer gone, protocol violation, timeout) the
//! connection is dead: every request still pending fails, nothing is ever completed with
//! data that did not arrive, and the owner opens a new connection for later requests.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io::{self, BufReader, IoSlice, Read};
use std::marker::PhantomData;
use std::net::Shutdown;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::NbdOptions;
use super::handshake::{Handshake, Negotiated};
use crate::nbd::proto::*;
use crate::nbd::transport::{NbdTarget, ReplyReader, Stream};
use crate::{LunError, Result, lock};

/// Read-ahead of the receiver. Large payloads bypass it and land directly in the caller's
/// buffer; small replies are parsed from it without a system call each.
const RECEIVE_BUFFER: usize = 256 * 1024;

/// writev(2) refuses more slices than this (IOV_MAX on Linux).
const MAX_IOVECS: usize = 1024;

/// Longest error message from the server we keep.
const MAX_ERROR_CHUNK: u32 = 64 * 1024;

/// Why a connection stopped working; decides the error its pending requests get.
#[derive(Debug, Clone)]
enum Death {
    /// We closed it (the LUN is being dropped).
    Closed,
    Lost(String),
    Protocol(String),
    /// A request had no reply within the I/O timeout, so the connection was torn down.
    TimedOut(Duration),
    /// The server answered ESHUTDOWN.
    ServerShutdown,
}

impl Death {
    fn error(&self, lun: &str, command: u16) -> LunError {
        let lun = lun.to_string();
        match self {
            Death::Closed => LunError::Disconnected {
                lun,
                reason: "connection closed".into(),
            },
            Death::Lost(reason) => LunError::Disconnected {
                lun,
                reason: reason.clone(),
            },
            Death::Protocol(reason) => LunError::Protocol {
                lun,
                reason: reason.clone(),
            },
            Death::TimedOut(after) => LunError::Timeout {
                lun,
                op: command_name(command),
                seconds: after.as_secs_f64(),
            },
            Death::ServerShutdown => LunError::Disconnected {
                lun,
                reason: "server is shutting down (ESHUTDOWN)".into(),
            },
        }
    }

    fn describe(&self) -> String {
        match self {
            Death::Closed => "connection closed".into(),
            Death::Lost(reason) | Death::Protocol(reason) => reason.clone(),
            Death::TimedOut(after) => format!("no reply within {:.1} s", after.as_secs_f64()),
            Death::ServerShutdown => "server shut down".into(),
        }
    }
}

/// The buffer a read lands in.
struct ReadTarget(NonNull<u8>);

// SAFETY: the pointer is only dereferenced by the receiver thread while the request is
// pending, and the submitting thread keeps the buffer borrowed and untouched until the
// request has completed (see `Batch`).
unsafe impl Send for ReadTarget {}

/// One request to put on the wire.
pub(super) struct Op<'a> {
    command: u16,
    flags: u16,
    offset: u64,
    len: u32,
    payload: Option<&'a [u8]>,
    target: Option<ReadTarget>,
    _buffer: PhantomData<&'a mut [u8]>,
}

impl<'a> Op<'a> {
    pub fn read(buf: &'a mut [u8], offset: u64) -> Self {
        Self {
            command: CMD_READ,
            flags: 0,
            offset,
            len: wire_len(buf.len()),
            payload: None,
            target: NonNull::new(buf.as_mut_ptr()).map(ReadTarget),
            _buffer: PhantomData,
        }
    }

    pub fn write(buf: &'a [u8], offset: u64, flags: u16) -> Self {
        Self {
            command: CMD_WRITE,
            flags,
            offset,
            len: wire_len(buf.len()),
            payload: Some(buf),
            target: None,
            _buffer: PhantomData,
        }
    }

    /// A request without payload in either direction (flush, trim, write-zeroes).
    pub fn control(command: u16, flags: u16, offset: u64, len: u32) -> Self {
        Self {
            command,
            flags,
            offset,
            len,
            payload: None,
            target: None,
            _buffer: PhantomData,
        }
    }
}

/// Callers split requests to the negotiated maximum, far below 4 GiB.
fn wire_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// A request on the wire, waiting for its reply.
struct Pending {
    command: u16,
    offset: u64,
    len: u32,
    target: Option<ReadTarget>,
    completion: Arc<Completion>,
    /// Byte ranges of the request a structured reply has filled so far.
    covered: Vec<(u64, u64)>,
    /// First error chunk of a structured reply.
    error: Option<LunError>,
}

impl Pending {
    fn destination(&mut self, at: u64, len: usize) -> &mut [u8] {
        match &self.target {
            // SAFETY: the submitter guarantees `len` bytes at the target stay valid and
            // unaliased while the request is pending; callers check `at + len` lies within
            // the request.
            Some(target) => unsafe {
                std::slice::from_raw_parts_mut(target.0.as_ptr().add(at as usize), len)
            },
            None => &mut [],
        }
    }

    fn server_error(&self, lun: &str, errno: u32, message: &str) -> LunError {
        if !message.is_empty() {
            tracing::warn!(
                lun,
                offset = self.offset,
                len = self.len,
                errno,
                message,
                "{} failed on the server",
                command_name(self.command)
            );
        }
        LunError::Io {
            lun: lun.to_string(),
            offset: self.offset,
            len: u64::from(self.len),
            source: io::Error::from_raw_os_error(errno as i32),
        }
    }
}

/// Counts a batch's outstanding requests and remembers the first failure.
struct Completion {
    state: Mutex<Progress>,
    changed: Condvar,
}

struct Progress {
    outstanding: usize,
    first_error: Option<LunError>,
    last_progress: Instant,
}

impl Completion {
    fn new() -> Self {
        Self {
            state: Mutex::new(Progress {
                outstanding: 0,
                first_error: None,
                last_progress: Instant::now(),
            }),
            changed: Condvar::new(),
        }
    }

    fn add(&self, n: usize) {
        lock(&self.state).outstanding += n;
    }

    fn record_error(&self, error: LunError) {
        lock(&self.state).first_error.get_or_insert(error);
    }

    fn finish(&self, outcome: Result<()>) {
        let mut state = lock(&self.state);
        state.outstanding -= 1;
        state.last_progress = Instant::now();
        if let Err(error) = outcome {
            state.first_error.get_or_insert(error);
        }
        if state.outstanding == 0 {
            self.changed.notify_all();
        }
    }

    /// Waits until nothing is outstanding, or until no request completed for `stall`.
    /// Returns false on a stall.
    fn wait(&self, stall: Option<Duration>) -> bool {
        let mut state = lock(&self.state);
        loop {
            if state.outstanding == 0 {
                return true;
            }
            state = match stall {
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(stall) => {
                    let idle = state.last_progress.elapsed();
                    if idle >= stall {
                        return false;
                    }
                    self.changed
                        .wait_timeout(state, stall - idle)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    fn take_error(&self) -> Option<LunError> {
        lock(&self.state).first_error.take()
    }
}

/// Requests submitted together; waiting on (or dropping) the batch returns only once the
/// receivers are done with every buffer it lent them.
pub(super) struct Batch<'a> {
    completion: Arc<Completion>,
    connections: Vec<Arc<Connection>>,
    io_timeout: Duration,
    _buffers: PhantomData<&'a mut [u8]>,
}

impl<'a> Batch<'a> {
    pub fn new(io_timeout: Duration) -> Self {
        Self {
            completion: Arc::new(Completion::new()),
            connections: Vec::new(),
            io_timeout,
            _buffers: PhantomData,
        }
    }

    pub fn send(&mut self, connection: &Arc<Connection>, ops: Vec<Op<'a>>) {
        if !self.connections.iter().any(|c| Arc::ptr_eq(c, connection)) {
            self.connections.push(Arc::clone(connection));
        }
        connection.send(ops, &self.completion);
    }

    /// Records a failure for requests that could not be sent at all.
    pub fn fail(&mut self, error: LunError) {
        self.completion.record_error(error);
    }

    /// Waits for every request; the first error wins. A batch that makes no progress for
    /// the I/O timeout tears its connections down, which fails what is still pending.
    pub fn wait(self) -> Result<()> {
        if !self.completion.wait(Some(self.io_timeout)) {
            for connection in &self.connections {
                connection.kill(Death::TimedOut(self.io_timeout));
            }
            self.completion.wait(None);
        }
        match self.completion.take_error() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        // Normally a no-op: `wait` already drained the batch. If the submitter unwinds
        // early, the receivers may still hold pointers into its buffers.
        if !self.completion.wait(Some(Duration::ZERO)) {
            for connection in &self.connections {
                connection.kill(Death::Lost("request abandoned by its caller".into()));
            }
            self.completion.wait(None);
        }
    }
}

/// A live connection.
pub(super) struct Connection {
    shared: Arc<Shared>,
    receiver: Option<JoinHandle<()>>,
}

struct Shared {
    lun: String,
    structured_replies: bool,
    sender: Mutex<Stream>,
    /// Used only to shut the socket down, which must not wait for a blocked sender.
    control: Stream,
    table: Mutex<Table>,
    next_handle: AtomicU64,
}

struct Table {
    pending: HashMap<u64, Pending>,
    dead: Option<Death>,
}

impl Connection {
    /// Connects, negotiates and starts the receiver.
    pub fn open(
        target: &NbdTarget,
        export: &str,
        lun: &str,
        options: &NbdOptions,
    ) -> Result<(Connection, Negotiated)> {
        let NbdOptions {
            connect_timeout,
            io_timeout,
            structured_replies,
            ..
        } = *options;
        let mut stream = target.connect(connect_timeout).map_err(|e| {
            if e.kind() == io::ErrorKind::TimedOut {
                LunError::Timeout {
                    lun: lun.to_string(),
                    op: "NBD connect",
                    seconds: connect_timeout.as_secs_f64(),
                }
            } else {
                LunError::Open {
                    lun: lun.to_string(),
                    reason: format!("cannot connect: {e}"),
                }
            }
        })?;
        let setup = |e: io::Error| LunError::Open {
            lun: lun.to_string(),
            reason: format!("cannot set up the socket: {e}"),
        };
        stream
            .set_read_timeout(Some(connect_timeout))
            .map_err(setup)?;
        stream
            .set_write_timeout(Some(connect_timeout))
            .map_err(setup)?;
        let negotiated = Handshake {
            stream: &mut stream,
            lun,
            export,
            timeout: connect_timeout,
        }
        .run(structured_replies)?;
        // From here on a reply may take as long as the I/O timeout (see `Batch::wait`) and
        // an idle connection is healthy; but a server that stops taking our requests must
        // not block a sender forever.
        stream.set_read_timeout(None).map_err(setup)?;
        stream.set_write_timeout(Some(io_timeout)).map_err(setup)?;

        let shared = Arc::new(Shared {
            lun: lun.to_string(),
            structured_replies: negotiated.structured_replies,
            control: stream.try_clone().map_err(setup)?,
            sender: Mutex::new(stream.try_clone().map_err(setup)?),
            table: Mutex::new(Table {
                pending: HashMap::new(),
                dead: None,
            }),
            next_handle: AtomicU64::new(1),
        });
        let receiver_shared = Arc::clone(&shared);
        let receiver = std::thread::Builder::new()
            .name("nbd-receiver".into())
            .spawn(move || receive(receiver_shared, stream))
            .map_err(|e| LunError::Open {
                lun: lun.to_string(),
                reason: format!("cannot start the receiver thread: {e}"),
            })?;
        Ok((
            Connection {
                shared,
                receiver: Some(receiver),
            },
            negotiated,
        ))
    }

    pub fn is_dead(&self) -> bool {
        lock(&self.shared.table).dead.is_some()
    }

    /// Why the connection died, for the error of a failed reconnect.
    pub fn death(&self) -> String {
        lock(&self.shared.table)
            .dead
            .as_ref()
            .map_or_else(|| "connection alive".into(), Death::describe)
    }

    fn send(&self, ops: Vec<Op<'_>>, completion: &Arc<Completion>) {
        let shared = &self.shared;
        completion.add(ops.len());
        let mut headers = Vec::with_capacity(ops.len());
        {
            let mut table = lock(&shared.table);
            if let Some(death) = &table.dead {
                for op in &ops {
                    completion.finish(Err(death.error(&shared.lun, op.command)));
                }
                return;
            }
            for op in &ops {
                let handle = shared.next_handle.fetch_add(1, Ordering::Relaxed);
                headers.push(
                    Request {
                        flags: op.flags,
                        command: op.command,
                        handle,
                        offset: op.offset,
                        length: op.len,
                    }
                    .encode(),
                );
                table.pending.insert(
                    handle,
                    Pending {
                        command: op.command,
                        offset: op.offset,
                        len: op.len,
                        target: op.target.as_ref().map(|t| ReadTarget(t.0)),
                        completion: Arc::clone(completion),
                        covered: Vec::new(),
                        error: None,
                    },
                );
            }
        }

        let mut slices = Vec::with_capacity(ops.len() * 2);
        for (op, header) in ops.iter().zip(&headers) {
            slices.push(IoSlice::new(header));
            if let Some(payload) = op.payload {
                slices.push(IoSlice::new(payload));
            }
        }
        let result = {
            let mut sender = lock(&shared.sender);
            slices
                .chunks_mut(MAX_IOVECS)
                .try_for_each(|group| sender.write_all_vectored(group))
        };
        if let Err(e) = result {
            // The receiver fails everything still pending, including these requests.
            self.kill(Death::Lost(format!("sending to the server failed: {e}")));
        }
    }

    fn kill(&self, death: Death) {
        {
            let mut table = lock(&self.shared.table);
            if table.dead.is_none() {
                tracing::warn!(lun = %self.shared.lun, reason = %death.describe(),
                    "NBD connection reset");
                table.dead = Some(death);
            }
        }
        // Wakes the receiver (and a blocked sender) with an error.
        let _ = self.shared.control.shutdown(Shutdown::Both);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !self.is_dead() {
            // Marked closed before the request: a server answers a disconnect by closing
            // the connection, which the receiver must see as ours, not as a loss.
            lock(&self.shared.table).dead.get_or_insert(Death::Closed);
            // Soft disconnect, as the protocol asks of a client that is done. Nothing is
            // pending: every batch holds its connections until it has drained.
            if let Ok(mut sender) = self.shared.sender.try_lock() {
                let _ = sender.write_all_vectored(&mut [IoSlice::new(&disconnect_request())]);
            }
        }
        let _ = self.shared.control.shutdown(Shutdown::Both);
        if let Some(receiver) = self.receiver.take() {
            let _ = receiver.join();
        }
    }
}

fn disconnect_request() -> [u8; REQUEST_SIZE] {
    Request {
        flags: 0,
        command: CMD_DISC,
        handle: 0,
        offset: 0,
        length: 0,
    }
    .encode()
}

/// The receiver thread: reads replies until the connection dies.
fn receive(shared: Arc<Shared>, stream: Stream) {
    let mut drain = Drain {
        shared: &shared,
        partial: HashMap::new(),
        death: None,
    };
    let mut rx = BufReader::with_capacity(RECEIVE_BUFFER, ReplyReader(stream));
    loop {
        if let Err(death) = receive_one(&shared, &mut rx, &mut drain.partial) {
            drain.death = Some(death);
            break;
        }
    }
}

/// Fails every request still pending when the receiver stops, however it stops (even by
/// panicking), so no caller waits forever.
struct Drain<'s> {
    shared: &'s Shared,
    /// Requests whose reply is partly received.
    partial: HashMap<u64, Pending>,
    death: Option<Death>,
}

impl Drop for Drain<'_> {
    fn drop(&mut self) {
        let lun = &self.shared.lun;
        let (death, pending) = {
            let mut table = lock(&self.shared.table);
            let fallback = self
                .death
                .take()
                .unwrap_or_else(|| Death::Lost("the receiver thread stopped".into()));
            if table.dead.is_none() && !matches!(fallback, Death::Closed) {
                tracing::warn!(lun = %lun, reason = %fallback.describe(), "NBD connection lost");
            }
            let death = table.dead.get_or_insert(fallback).clone();
            (death, std::mem::take(&mut table.pending))
        };
        if matches!(death, Death::ServerShutdown) {
            // The protocol asks for a soft disconnect after ESHUTDOWN.
            if let Ok(mut sender) = self.shared.sender.try_lock() {
                let _ = sender.write_all_vectored(&mut [IoSlice::new(&disconnect_request())]);
            }
        }
        let _ = self.shared.control.shutdown(Shutdown::Both);
        for request in pending
            .into_values()
            .chain(self.partial.drain().map(|(_, p)| p))
        {
            request
                .completion
                .finish(Err(death.error(lun, request.command)));
        }
    }
}

fn lost(e: io::Error) -> Death {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Death::Lost("server closed the connection".into())
    } else {
        Death::Lost(format!("receiving from the server failed: {e}"))
    }
}

fn receive_one(
    shared: &Shared,
    rx: &mut BufReader<ReplyReader>,
    partial: &mut HashMap<u64, Pending>,
) -> std::result::Result<(), Death> {
    let mut magic = [0u8; 4];
    rx.read_exact(&mut magic).map_err(lost)?;
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => receive_simple(shared, rx, partial),
        STRUCTURED_REPLY_MAGIC if shared.structured_replies => receive_chunk(shared, rx, partial),
        other => Err(Death::Protocol(format!(
            "reply with bad magic {other:#010x}"
        ))),
    }
}

fn take_pending(shared: &Shared, handle: u64) -> std::result::Result<Pending, Death> {
    lock(&shared.table)
        .pending
        .remove(&handle)
        .ok_or_else(|| Death::Protocol(format!("reply for unknown handle {handle:#x}")))
}

fn receive_simple(
    shared: &Shared,
    rx: &mut BufReader<ReplyReader>,
    partial: &mut HashMap<u64, Pending>,
) -> std::result::Result<(), Death> {
    let mut rest = [0u8; 12];
    rx.read_exact(&mut rest).map_err(lost)?;
    let errno = be32(&rest);
    let handle = be64(&rest[4..]);
    let mut request = take_pending(shared, handle)?;
    if errno != 0 {
        let error = request.server_error(&shared.lun, errno, "");
        request.completion.finish(Err(error));
        return shutdown_check(errno);
    }
    if request.command == CMD_READ {
        let len = request.len as usize;
        // Until the data is in, the request is owned by the drain list: if the stream
        // breaks now, the request fails rather than completing with a torn buffer.
        let result = rx.read_exact(request.destination(0, len));
        if let Err(e) = result {
            partial.insert(handle, request);
            return Err(lost(e));
        }
    }
    request.completion.finish(Ok(()));
    Ok(())
}

fn shutdown_check(errno: u32) -> std::result::Result<(), Death> {
    // The protocol makes a client that sees ESHUTDOWN disconnect.
    if errno == ESHUTDOWN {
        Err(Death::ServerShutdown)
    } else {
        Ok(())
    }
}

fn receive_chunk(
    shared: &Shared,
    rx: &mut BufReader<ReplyReader>,
    partial: &mut HashMap<u64, Pending>,
) -> std::result::Result<(), Death> {
    let mut rest = [0u8; 16];
    rx.read_exact(&mut rest).map_err(lost)?;
    let flags = be16(&rest);
    let kind = be16(&rest[2..]);
    let handle = be64(&rest[4..]);
    let length = be32(&rest[12..]);
    let request = match partial.entry(handle) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(entry) => entry.insert(take_pending(shared, handle)?),
    };
    let is_read = request.command == CMD_READ;
    match kind {
        REPLY_TYPE_NONE => {
            if length != 0 || flags & REPLY_FLAG_DONE == 0 {
                return Err(Death::Protocol(
                    "NBD_REPLY_TYPE_NONE chunk with payload or without the DONE flag".into(),
                ));
            }
        }
        REPLY_TYPE_OFFSET_DATA if is_read && length > 8 => {
            let mut raw = [0u8; 8];
            rx.read_exact(&mut raw).map_err(lost)?;
            let at = chunk_position(request, u64::from_be_bytes(raw), u64::from(length - 8))?;
            let len = (length - 8) as usize;
            rx.read_exact(request.destination(at, len)).map_err(lost)?;
            request.covered.push((at, len as u64));
        }
        REPLY_TYPE_OFFSET_HOLE if is_read && length == 12 => {
            let mut raw = [0u8; 12];
            rx.read_exact(&mut raw).map_err(lost)?;
            let hole = u64::from(be32(&raw[8..]));
            if hole == 0 {
                return Err(Death::Protocol("empty NBD_REPLY_TYPE_OFFSET_HOLE".into()));
            }
            let at = chunk_position(request, be64(&raw), hole)?;
            request.destination(at, hole as usize).fill(0);
            request.covered.push((at, hole));
        }
        kind if kind & REPLY_TYPE_ERROR_BIT != 0 => {
            if !(6..=MAX_ERROR_CHUNK).contains(&length) {
                return Err(Death::Protocol(format!(
                    "error chunk of implausible length {length}"
                )));
            }
            let mut payload = vec![0u8; length as usize];
            rx.read_exact(&mut payload).map_err(lost)?;
            let errno = be32(&payload);
            let message_len = usize::from(be16(&payload[4..]));
            if errno == 0 || 6 + message_len > payload.len() {
                return Err(Death::Protocol("malformed error chunk".into()));
            }
            let message = String::from_utf8_lossy(&payload[6..6 + message_len]).into_owned();
            if request.error.is_none() {
                request.error = Some(request.server_error(&shared.lun, errno, &message));
            }
            if errno == ESHUTDOWN {
                // Left in the drain list: it fails with the connection.
                return Err(Death::ServerShutdown);
            }
        }
        other => {
            return Err(Death::Protocol(format!(
                "unexpected structured reply type {other} ({length} bytes) to {}",
                command_name(request.command)
            )));
        }
    }
    if flags & REPLY_FLAG_DONE != 0 {
        return finish_chunked(shared, partial, handle);
    }
    Ok(())
}

/// Checks a content chunk lies inside its request; returns its position in the buffer.
fn chunk_position(request: &Pending, offset: u64, len: u64) -> std::result::Result<u64, Death> {
    let end = offset.checked_add(len);
    let request_end = request.offset + u64::from(request.len);
    match end {
        Some(end) if offset >= request.offset && end <= request_end => Ok(offset - request.offset),
        _ => Err(Death::Protocol(format!(
            "reply chunk at {offset} (+{len}) lies outside the read at {} (+{})",
            request.offset, request.len
        ))),
    }
}

/// Completes a structured reply once its last chunk arrived. A successful read must have
/// had every byte covered exactly once; anything else is a broken server, and its data
/// is never handed to the caller.
fn finish_chunked(
    shared: &Shared,
    partial: &mut HashMap<u64, Pending>,
    handle: u64,
) -> std::result::Result<(), Death> {
    let Some(mut request) = partial.remove(&handle) else {
        return Ok(());
    };
    if let Some(error) = request.error.take() {
        request.completion.finish(Err(error));
        return Ok(());
    }
    if request.command == CMD_READ {
        if let Some(reason) = coverage_fault(&mut request) {
            request.completion.finish(Err(LunError::Protocol {
                lun: shared.lun.clone(),
                reason: reason.clone(),
            }));
            return Err(Death::Protocol(reason));
        }
    }
    request.completion.finish(Ok(()));
    Ok(())
}

/// What is wrong with the byte ranges a structured read reply covered, if anything.
fn coverage_fault(request: &mut Pending) -> Option<String> {
    request.covered.sort_unstable();
    let mut next = 0;
    for &(at, len) in &request.covered {
        if at != next {
            let fault = if at > next {
                "leaves a gap"
            } else {
                "overlaps"
            };
            return Some(format!(
                "structured read reply at {} (+{}) {fault} at byte {next}",
                request.offset, request.len
            ));
        }
        next = at + len;
    }
    (next != u64::from(request.len)).then(|| {
        format!(
            "structured read reply at {} (+{}) ends after {next} bytes",
            request.offset, request.len
        )
    })
}
