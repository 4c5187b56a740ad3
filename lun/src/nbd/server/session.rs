//! One client of `vapp export`, from handshake to hang-up.
//!
//! The session thread reads requests. Sector-aligned reads and writes that arrive
//! together form a batch, carried out with one `Lun::submit` and answered with one write
//! of all its replies. A small batch on a fast LUN runs right on the session thread, which
//! costs less than waking a worker; anything else goes to a pool of workers (grown on
//! demand), so requests in flight run in parallel and replies go out of order, tagged by
//! handle. On a slow LUN batches are spread over the workers, so requests overlap even
//! where the LUN's `submit` runs them one by one.
//!
//! Memory held by requests in flight is bounded; a client that sends faster than the LUN
//! keeps up simply stops being read. Whatever ends the session (DISC, a hang-up, a
//! protocol violation, server shutdown), requests already read are finished and answered
//! before the socket closes.

use std::collections::VecDeque;
use std::io::{self, BufReader, IoSlice, Read};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::thread::Scope;
use std::time::{Duration, Instant};

use super::Export;
use super::handshake::{self, Outcome};
use crate::nbd::proto::*;
use crate::nbd::transport::Stream;
use crate::{IoRequest, Lun, LunError, lock};

/// Request and reply bytes a session may hold at once. At least one maximum-size request
/// always fits.
const BUDGET: u64 = 96 << 20;

/// The least a request counts against the budget, so payload-free requests are bounded too.
const MIN_COST: u64 = 4096;

/// Requests in one batch at most; more wait for the next one.
const MAX_BATCH: usize = 64;

/// Batches up to this many data bytes run on the session thread when the LUN is fast.
const INLINE_BYTES: u64 = 256 * 1024;

/// Data bytes in one batch at most.
const MAX_BATCH_BYTES: u64 = 16 << 20;

/// A LUN slower than this per request gets each batch spread over the workers instead of
/// submitted whole: then its requests overlap even when its `submit` runs them one by one.
/// Faster LUNs (the page cache, io_uring) gain more from fewer thread hand-offs.
const SLOW_REQUEST_NS: u64 = 200_000;

/// Workers keep their read buffer up to this size between requests.
const SCRATCH_KEEP: usize = 4 << 20;

/// A client has this long to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A client that takes no reply bytes for this long is dropped.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a connection to completion. Errors end the session and are logged, never
/// propagated: one client's trouble is not the server's.
pub(super) fn serve(export: &Export, mut stream: Stream, peer: &str, stopping: &AtomicBool) {
    let span = tracing::info_span!("nbd_session", export = %export.name, peer);
    let _entered = span.enter();
    let outcome = stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
        .and_then(|()| handshake::negotiate(export, &mut stream));
    let structured_replies = match outcome {
        Ok(Outcome::Transmission { structured_replies }) => structured_replies,
        Ok(Outcome::Closed(reason)) => {
            tracing::info!(reason, "handshake ended without an export");
            return;
        }
        Err(e) => {
            tracing::info!(error = %e, "handshake failed");
            return;
        }
    };
    let setup = stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
        .and_then(|()| Ok((stream.try_clone()?, stream.try_clone()?)));
    let (receiver, control) = match setup {
        Ok(streams) => streams,
        Err(e) => {
            tracing::warn!(error = %e, "cannot set up the connection");
            return;
        }
    };
    tracing::info!(structured_replies, "client connected");
    let session = Session {
        export,
        structured_replies,
        sender: Mutex::new(stream),
        control,
        broken: AtomicBool::new(false),
        queue: Mutex::new(Queue {
            jobs: VecDeque::new(),
            idle: 0,
            workers: 0,
            closed: false,
        }),
        work_ready: Condvar::new(),
        budget: Mutex::new(Budget::default()),
        budget_freed: Condvar::new(),
        inline_scratch: Mutex::new(Vec::new()),
    };
    let reason = session.run(receiver, stopping);
    tracing::info!(reason, "client disconnected");
}

struct Session<'e> {
    export: &'e Export,
    structured_replies: bool,
    sender: Mutex<Stream>,
    /// Shuts the socket down when a reply cannot be sent, without waiting for `sender`.
    control: Stream,
    /// A reply failed to go out; the session is over.
    broken: AtomicBool,
    queue: Mutex<Queue>,
    work_ready: Condvar,
    budget: Mutex<Budget>,
    budget_freed: Condvar,
    /// Reply buffer of batches run on the session thread.
    inline_scratch: Mutex<Vec<u8>>,
}

struct Queue {
    jobs: VecDeque<Job>,
    idle: usize,
    workers: usize,
    closed: bool,
}

/// Bytes held by requests in flight.
#[derive(Default)]
struct Budget {
    used: u64,
    /// The session thread waits for room; only then is a wake-up worth a system call.
    waiting: bool,
}

/// Work for the pool.
struct Job {
    work: Work,
    cost: u64,
}

enum Work {
    /// Sector-aligned reads and writes that arrived together: one `Lun::submit` (which
    /// io_uring and NBD LUNs run in parallel) and one write of all the replies. `payload`
    /// holds the writes' data back to back, in request order.
    Batch {
        requests: Vec<Request>,
        payload: Vec<u8>,
    },
    /// Anything else: flush, trim, write-zeroes, FUA writes, partial-sector requests.
    Single { request: Request, payload: Vec<u8> },
}

fn cost_of(request: &Request) -> u64 {
    match request.command {
        CMD_READ | CMD_WRITE => u64::from(request.length).max(MIN_COST),
        _ => MIN_COST,
    }
}

/// Aligned reads and writes read so far, to be carried out as one batch.
#[derive(Default)]
struct Gathering {
    requests: Vec<Request>,
    payload: Vec<u8>,
    bytes: u64,
    cost: u64,
}

impl Gathering {
    /// The gathered requests as `parts` jobs (fewer if there are fewer requests).
    fn take_split(&mut self, parts: usize) -> Vec<Job> {
        if parts <= 1 || self.requests.len() <= 1 {
            return self.take().into_iter().collect();
        }
        let gathered = std::mem::take(self);
        let per_job = gathered.requests.len().div_ceil(parts);
        let mut data = &gathered.payload[..];
        gathered
            .requests
            .chunks(per_job)
            .map(|requests| {
                let bytes: usize = requests
                    .iter()
                    .filter(|r| r.command == CMD_WRITE)
                    .map(|r| r.length as usize)
                    .sum();
                let (payload, rest) = data.split_at(bytes);
                data = rest;
                Job {
                    work: Work::Batch {
                        requests: requests.to_vec(),
                        payload: payload.to_vec(),
                    },
                    cost: requests.iter().map(cost_of).sum(),
                }
            })
            .collect()
    }

    fn take(&mut self) -> Option<Job> {
        if self.requests.is_empty() {
            return None;
        }
        let gathered = std::mem::take(self);
        Some(Job {
            work: Work::Batch {
                requests: gathered.requests,
                payload: gathered.payload,
            },
            cost: gathered.cost,
        })
    }
}

enum Next {
    Job(Job),
    Gathered,
    Answered,
    Disconnect,
}

impl Session<'_> {
    /// Reads requests until the session ends; returns why it ended.
    fn run(&self, receiver: Stream, stopping: &AtomicBool) -> String {
        let mut rx = BufReader::with_capacity(256 * 1024, receiver);
        std::thread::scope(|scope| {
            let mut gathering = Gathering::default();
            let reason = loop {
                if stopping.load(Ordering::Relaxed) {
                    break "server shutting down".to_string();
                }
                if self.broken.load(Ordering::Relaxed) {
                    break "replies could not be delivered".to_string();
                }
                // Everything that arrived together goes out together; never sit on a
                // batch while waiting for the client.
                if rx.buffer().len() < REQUEST_SIZE {
                    self.dispatch_gathered(scope, &mut gathering);
                }
                match self.next_request(&mut rx, &mut gathering, scope) {
                    Ok(Next::Job(job)) => {
                        self.dispatch_gathered(scope, &mut gathering);
                        self.dispatch(scope, job);
                    }
                    Ok(Next::Gathered) => {
                        if gathering.requests.len() >= MAX_BATCH
                            || gathering.bytes >= MAX_BATCH_BYTES
                        {
                            self.dispatch_gathered(scope, &mut gathering);
                        }
                    }
                    Ok(Next::Answered) => {}
                    Ok(Next::Disconnect) => break "client sent NBD_CMD_DISC".to_string(),
                    Err(_) if stopping.load(Ordering::Relaxed) => {
                        break "server shutting down".to_string();
                    }
                    Err(reason) => break reason,
                }
            };
            self.dispatch_gathered(scope, &mut gathering);
            // Workers drain what was read, answer it, and exit; the scope joins them.
            let mut queue = lock(&self.queue);
            queue.closed = true;
            self.work_ready.notify_all();
            reason
        })
    }

    fn next_request<'s>(
        &'s self,
        rx: &mut BufReader<Stream>,
        gathering: &mut Gathering,
        scope: &'s Scope<'s, '_>,
    ) -> Result<Next, String> {
        let mut raw = [0u8; REQUEST_SIZE];
        rx.read_exact(&mut raw).map_err(|e| receive_error(&e))?;
        let Some(request) = Request::decode(&raw) else {
            return Err(format!("request with bad magic {:02x?}", &raw[..4]));
        };
        let length = u64::from(request.length);
        match request.command {
            CMD_DISC => return Ok(Next::Disconnect),
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES => {}
            other => {
                self.refuse(
                    &request,
                    EINVAL,
                    &format!("command {other} is not supported"),
                );
                return Ok(Next::Answered);
            }
        }
        if let Some((errno, message)) = self.validate(&request) {
            if request.command == CMD_WRITE {
                // Skip the payload so the stream stays in step, then refuse.
                let skipped = io::copy(&mut rx.by_ref().take(length), &mut io::sink())
                    .map_err(|e| receive_error(&e))?;
                if skipped < length {
                    return Err("client hung up in the middle of a write request".into());
                }
            }
            self.refuse(&request, errno, &message);
            return Ok(Next::Answered);
        }

        let data = match request.command {
            CMD_READ | CMD_WRITE => length,
            _ => 0,
        };
        let cost = cost_of(&request);
        if !self.try_acquire(cost) {
            // What we hold back would never free room: send it off, then wait.
            self.dispatch_gathered(scope, gathering);
            self.acquire(cost);
        }
        let batched = matches!(request.command, CMD_READ | CMD_WRITE)
            && request.flags & CMD_FLAG_FUA == 0
            && self.export.is_aligned(request.offset, length);
        if batched {
            if request.command == CMD_WRITE {
                receive_payload(rx, length, &mut gathering.payload)
                    .inspect_err(|_| self.release(cost))?;
            }
            gathering.requests.push(request);
            gathering.bytes += data;
            gathering.cost += cost;
            return Ok(Next::Gathered);
        }
        let mut payload = Vec::new();
        if request.command == CMD_WRITE {
            payload.reserve_exact(data as usize);
            receive_payload(rx, length, &mut payload).inspect_err(|_| self.release(cost))?;
        }
        Ok(Next::Job(Job {
            work: Work::Single { request, payload },
            cost,
        }))
    }

    /// The error to answer a well-formed request with, if any.
    fn validate(&self, request: &Request) -> Option<(u32, String)> {
        let export = self.export;
        let allowed = match request.command {
            CMD_READ if self.structured_replies => CMD_FLAG_FUA | CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            _ => CMD_FLAG_FUA,
        };
        let name = command_name(request.command);
        if request.flags & !allowed != 0 {
            return Some((
                EINVAL,
                format!("flags {:#x} are not valid for {name}", request.flags),
            ));
        }
        if request.command == CMD_FLUSH {
            return None;
        }
        let (offset, length) = (request.offset, u64::from(request.length));
        if matches!(request.command, CMD_READ | CMD_WRITE) && request.length > export.max_payload {
            return Some((
                EINVAL,
                format!(
                    "{name} of {length} bytes exceeds the {}-byte maximum",
                    export.max_payload
                ),
            ));
        }
        let writes = request.command != CMD_READ;
        if writes && export.read_only {
            return Some((EPERM, "the export is read-only".into()));
        }
        if length == 0 {
            return Some((EINVAL, format!("zero-length {name}")));
        }
        let size = export.lun.size();
        match offset.checked_add(length) {
            Some(end) if end <= size => None,
            _ => Some((
                // What the spec asks for: ENOSPC for data that does not fit, EINVAL for
                // reads and trims of what is not there.
                if matches!(request.command, CMD_WRITE | CMD_WRITE_ZEROES) {
                    ENOSPC
                } else {
                    EINVAL
                },
                format!(
                    "{name} at {offset} (+{length}) runs past the end of the {size}-byte export"
                ),
            )),
        }
    }

    fn dispatch_gathered<'s>(&'s self, scope: &'s Scope<'s, '_>, gathering: &mut Gathering) {
        let slow = self.export.request_ns.load(Ordering::Relaxed) > SLOW_REQUEST_NS;
        if !slow && gathering.bytes <= INLINE_BYTES && lock(&self.queue).jobs.is_empty() {
            // A fast LUN and a small batch: doing it here costs less than waking a worker,
            // and nothing is waiting behind it.
            if let Some(job) = gathering.take() {
                let mut scratch = lock(&self.inline_scratch);
                self.execute(job, &mut scratch);
                if scratch.capacity() > SCRATCH_KEEP {
                    *scratch = Vec::new();
                }
            }
            return;
        }
        let parts = if slow { self.export.workers } else { 1 };
        for job in gathering.take_split(parts) {
            self.dispatch(scope, job);
        }
    }

    fn dispatch<'s>(&'s self, scope: &'s Scope<'s, '_>, job: Job) {
        let spawn = {
            let mut queue = lock(&self.queue);
            queue.jobs.push_back(job);
            if queue.idle > 0 {
                self.work_ready.notify_one();
            }
            let spawn = queue.workers == 0
                || (queue.jobs.len() > queue.idle && queue.workers < self.export.workers);
            if spawn {
                queue.workers += 1;
            }
            spawn
        };
        if spawn {
            let started = std::thread::Builder::new()
                .name("nbd-worker".into())
                .spawn_scoped(scope, || self.work());
            if let Err(e) = started {
                let mut queue = lock(&self.queue);
                queue.workers -= 1;
                if queue.workers == 0 {
                    // Without any worker nobody would answer; do it here.
                    tracing::warn!(error = %e, "cannot start a worker thread; serving inline");
                    let jobs: Vec<Job> = queue.jobs.drain(..).collect();
                    drop(queue);
                    let mut scratch = Vec::new();
                    for job in jobs {
                        self.execute(job, &mut scratch);
                    }
                }
            }
        }
    }

    fn work(&self) {
        let mut scratch = Vec::new();
        while let Some(job) = self.next_job() {
            self.execute(job, &mut scratch);
            if scratch.capacity() > SCRATCH_KEEP {
                scratch = Vec::new();
            }
        }
    }

    fn next_job(&self) -> Option<Job> {
        let mut queue = lock(&self.queue);
        loop {
            if let Some(job) = queue.jobs.pop_front() {
                return Some(job);
            }
            if queue.closed {
                return None;
            }
            queue.idle += 1;
            queue = self
                .work_ready
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
            queue.idle -= 1;
        }
    }

    fn execute(&self, job: Job, scratch: &mut Vec<u8>) {
        match job.work {
            Work::Batch { requests, payload } => self.execute_batch(&requests, &payload, scratch),
            Work::Single { request, payload } => self.execute_one(&request, &payload, scratch),
        }
        self.release(job.cost);
    }

    /// Bytes in front of the data of a successful read reply.
    fn read_header_size(&self) -> usize {
        if self.structured_replies {
            CHUNK_HEADER_SIZE + 8
        } else {
            SIMPLE_REPLY_SIZE
        }
    }

    fn read_header(&self, request: &Request, header: &mut [u8]) {
        if self.structured_replies {
            header[..CHUNK_HEADER_SIZE].copy_from_slice(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                request.handle,
                request.length + 8,
            ));
            header[CHUNK_HEADER_SIZE..].copy_from_slice(&request.offset.to_be_bytes());
        } else {
            header.copy_from_slice(&simple_reply(0, request.handle));
        }
    }

    /// All replies of the batch are laid out in `scratch` in request order — a read's
    /// header and data, a write's simple reply — so the LUN reads straight into the reply
    /// and one write sends them all.
    fn execute_batch(&self, requests: &[Request], payload: &[u8], scratch: &mut Vec<u8>) {
        let read_header = self.read_header_size();
        let reply_size = |r: &Request| match r.command {
            CMD_READ => read_header + r.length as usize,
            _ => SIMPLE_REPLY_SIZE,
        };
        let total: usize = requests.iter().map(reply_size).sum();
        if scratch.len() < total {
            scratch.resize(total, 0);
        }
        let outcome = {
            let mut io = Vec::with_capacity(requests.len());
            let mut replies = &mut scratch[..total];
            let mut data = payload;
            for request in requests {
                let (reply, rest) = std::mem::take(&mut replies).split_at_mut(reply_size(request));
                replies = rest;
                if request.command == CMD_READ {
                    io.push(IoRequest::Read {
                        buf: &mut reply[read_header..],
                        offset: request.offset,
                    });
                } else {
                    let (buf, rest) = data.split_at(request.length as usize);
                    data = rest;
                    io.push(IoRequest::Write {
                        buf,
                        offset: request.offset,
                    });
                }
            }
            let started = Instant::now();
            let outcome = self.export.lun.submit(&mut io);
            self.export.observe(started.elapsed(), requests.len());
            outcome
        };
        if outcome.is_err() {
            // A batch reports only its first failure; redo it request by request so each
            // gets its own answer (reads and whole-sector writes can be repeated safely).
            let mut data = payload;
            for request in requests {
                let len = if request.command == CMD_WRITE {
                    request.length as usize
                } else {
                    0
                };
                let (buf, rest) = data.split_at(len);
                data = rest;
                self.execute_one(request, buf, scratch);
            }
            return;
        }
        let mut at = 0;
        for request in requests {
            let size = reply_size(request);
            if request.command == CMD_READ {
                self.read_header(request, &mut scratch[at..at + read_header]);
            } else {
                scratch[at..at + SIMPLE_REPLY_SIZE]
                    .copy_from_slice(&simple_reply(0, request.handle));
            }
            at += size;
        }
        self.send(&mut [IoSlice::new(&scratch[..total])]);
    }

    fn execute_one(&self, request: &Request, payload: &[u8], scratch: &mut Vec<u8>) {
        let export = self.export;
        let lun = &*export.lun;
        let fua = request.flags & CMD_FLAG_FUA != 0;
        let durable = |result: Result<(), LunError>| {
            result.and_then(|()| if fua { lun.flush() } else { Ok(()) })
        };
        let outcome = match request.command {
            CMD_READ => {
                let header = self.read_header_size();
                let total = header + request.length as usize;
                if scratch.len() < total {
                    scratch.resize(total, 0);
                }
                let reply = &mut scratch[..total];
                match export.read(&mut reply[header..], request.offset) {
                    Ok(()) => {
                        self.read_header(request, &mut reply[..header]);
                        self.send(&mut [IoSlice::new(reply)]);
                        return;
                    }
                    Err(error) => Err(error),
                }
            }
            CMD_WRITE => durable(export.write(payload, request.offset)),
            CMD_FLUSH => lun.flush(),
            CMD_TRIM => match export.trim(request.offset, u64::from(request.length)) {
                // FUA matters only when something was written.
                Ok(true) => durable(Ok(())),
                Ok(false) => Ok(()),
                Err(error) => Err(error),
            },
            CMD_WRITE_ZEROES => durable(export.write_zeroes(
                request.offset,
                u64::from(request.length),
                request.flags & CMD_FLAG_NO_HOLE != 0,
            )),
            _ => Ok(()),
        };
        match outcome {
            Ok(()) => self.send(&mut [IoSlice::new(&simple_reply(0, request.handle))]),
            Err(error) => {
                tracing::warn!(offset = request.offset, length = request.length, %error,
                    "{} failed", command_name(request.command));
                let errno = wire_errno(error.errno());
                self.answer_error(request.handle, errno, &error);
            }
        }
    }

    fn refuse(&self, request: &Request, errno: u32, message: &str) {
        tracing::debug!(command = %command_name(request.command), offset = request.offset,
            length = request.length, errno, message, "refusing request");
        self.answer_error(request.handle, errno, &message);
    }

    fn answer_error(&self, handle: u64, errno: u32, message: &dyn std::fmt::Display) {
        if !self.structured_replies {
            self.send(&mut [IoSlice::new(&simple_reply(errno, handle))]);
            return;
        }
        // Errors travel as structured chunks so the client can show why.
        let text = message.to_string();
        let mut end = text.len().min(MAX_STRING);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let text = &text.as_bytes()[..end];
        let mut payload = Vec::with_capacity(6 + text.len());
        payload.extend_from_slice(&errno.to_be_bytes());
        payload.extend_from_slice(&(text.len() as u16).to_be_bytes());
        payload.extend_from_slice(text);
        let header = chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            handle,
            payload.len() as u32,
        );
        self.send(&mut [IoSlice::new(&header), IoSlice::new(&payload)]);
    }

    fn send(&self, parts: &mut [IoSlice<'_>]) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let result = lock(&self.sender).write_all_vectored(parts);
        if let Err(e) = result {
            if !self.broken.swap(true, Ordering::Relaxed) {
                tracing::info!(error = %e, "cannot deliver replies; closing the connection");
                let _ = self.control.shutdown(Shutdown::Both);
            }
        }
    }

    fn try_acquire(&self, cost: u64) -> bool {
        let mut budget = lock(&self.budget);
        if budget.used > 0 && budget.used + cost > BUDGET {
            return false;
        }
        budget.used += cost;
        true
    }

    fn acquire(&self, cost: u64) {
        let mut budget = lock(&self.budget);
        while budget.used > 0 && budget.used + cost > BUDGET {
            budget.waiting = true;
            budget = self
                .budget_freed
                .wait(budget)
                .unwrap_or_else(PoisonError::into_inner);
        }
        budget.waiting = false;
        budget.used += cost;
    }

    fn release(&self, cost: u64) {
        let mut budget = lock(&self.budget);
        budget.used -= cost;
        if budget.waiting {
            self.budget_freed.notify_one();
        }
    }
}

/// Appends a write's `length` payload bytes to `buf`; if the client hangs up first, `buf`
/// is left as it was.
fn receive_payload(
    rx: &mut BufReader<Stream>,
    length: u64,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    let before = buf.len();
    let received = rx.by_ref().take(length).read_to_end(buf);
    if received.is_err() || ((buf.len() - before) as u64) < length {
        buf.truncate(before);
        return Err("client hung up in the middle of a write request".into());
    }
    Ok(())
}

fn receive_error(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        "client closed the connection".into()
    } else {
        format!("receiving from the client failed: {e}")
    }
}

/// Partial-sector requests, which clients that ignore our block size may send, are
/// served by read-modify-write of the sectors they touch.
impl Export {
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), LunError> {
        let (start, end) = self.aligned_span(offset, buf.len() as u64);
        if start == offset && end == offset + buf.len() as u64 {
            return self.lun.read_at(buf, offset);
        }
        let mut span = vec![0u8; (end - start) as usize];
        self.lun.read_at(&mut span, start)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&span[at..at + buf.len()]);
        Ok(())
    }

    fn write(&self, data: &[u8], offset: u64) -> Result<(), LunError> {
        let (start, end) = self.aligned_span(offset, data.len() as u64);
        if start == offset && end == offset + data.len() as u64 {
            return self.lun.write_at(data, offset);
        }
        // Two partial writes to one sector must not both read the old sector.
        let _serialised = lock(&self.partial_sectors);
        let mut span = vec![0u8; (end - start) as usize];
        self.lun.read_at(&mut span, start)?;
        let at = (offset - start) as usize;
        span[at..at + data.len()].copy_from_slice(data);
        self.lun.write_at(&span, start)
    }

    /// Zeroes `len` bytes at `offset`. `Lun::write_zeroes` may deallocate; a client that
    /// asked for NBD_CMD_FLAG_NO_HOLE gets the range written, hence provisioned, instead.
    fn write_zeroes(&self, offset: u64, len: u64, provision: bool) -> Result<(), LunError> {
        let sector = u64::from(self.lun.sector_size());
        let head_end = offset.next_multiple_of(sector).min(offset + len);
        let tail_start = ((offset + len) / sector * sector).max(head_end);
        if head_end > offset {
            self.write(&vec![0u8; (head_end - offset) as usize], offset)?;
        }
        if tail_start > head_end {
            if provision {
                crate::write_zero_buffers(&*self.lun, head_end, tail_start - head_end)?;
            } else {
                self.lun.write_zeroes(head_end, tail_start - head_end)?;
            }
        }
        if offset + len > tail_start {
            self.write(&vec![0u8; (offset + len - tail_start) as usize], tail_start)?;
        }
        Ok(())
    }

    /// Deallocates the whole trim granules inside the range; returns whether it did
    /// anything. Without a granularity, or when no granule fits, the trim is a no-op.
    fn trim(&self, offset: u64, len: u64) -> Result<bool, LunError> {
        let Some(granule) = self.trim_granularity else {
            return Ok(false);
        };
        let start = offset.next_multiple_of(granule);
        let end = (offset + len) / granule * granule;
        if start >= end {
            return Ok(false);
        }
        self.lun.write_zeroes(start, end - start)?;
        Ok(true)
    }

    /// Folds the time `requests` requests took into the running per-request average.
    fn observe(&self, took: Duration, requests: usize) {
        let sample = u64::try_from(took.as_nanos() / requests.max(1) as u128).unwrap_or(u64::MAX);
        let average = self.request_ns.load(Ordering::Relaxed);
        self.request_ns
            .store(average - average / 8 + sample / 8, Ordering::Relaxed);
    }

    fn is_aligned(&self, offset: u64, len: u64) -> bool {
        let sector = u64::from(self.lun.sector_size());
        offset % sector == 0 && len % sector == 0
    }

    /// The whole sectors covering `len` bytes at `offset`.
    fn aligned_span(&self, offset: u64, len: u64) -> (u64, u64) {
        let sector = u64::from(self.lun.sector_size());
        (
            offset / sector * sector,
            (offset + len).next_multiple_of(sector),
        )
    }
}
