//! The io_uring engine: a batch goes to a ring with up to [`DEPTH`] requests in flight.
//!
//! Each call borrows a whole ring from a per-LUN pool, so threads never share a ring and a
//! completion never has to be routed to another thread; the pool grows to the number of
//! concurrent callers and keeps a few idle rings for reuse. A call returns only after every
//! request it handed to the kernel has completed: the kernel writes into the caller's
//! buffers, which must stay borrowed until then.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use io_uring::{IoUring, Probe, opcode, squeue, types};

use crate::IoRequest;
use crate::engine::{Failure, run_sync};

/// Ring size and the most requests one call keeps in flight.
pub(crate) const DEPTH: u32 = 64;
const MAX_IDLE_RINGS: usize = 4;
/// Largest single transfer handed to the kernel (it caps one read/write near 2 GiB anyway).
const MAX_TRANSFER: usize = 1 << 30;

pub(crate) struct RingPool {
    idle: Mutex<Vec<IoUring>>,
}

impl std::fmt::Debug for RingPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().map_or(0, |idle| idle.len());
        f.debug_struct("RingPool")
            .field("idle_rings", &idle)
            .finish()
    }
}

impl RingPool {
    /// Sets up a first ring, proving the kernel lets this process use io_uring.
    pub fn new() -> io::Result<RingPool> {
        let ring = new_ring()?;
        Ok(RingPool {
            idle: Mutex::new(vec![ring]),
        })
    }

    pub fn run(&self, file: &File, batch: &mut [IoRequest<'_>]) -> Result<(), Failure> {
        let pooled = self.idle.lock().map(|mut idle| idle.pop()).ok().flatten();
        let mut ring = match pooled.map_or_else(new_ring, Ok) {
            Ok(ring) => ring,
            Err(error) => {
                // Setup worked before, so this is a transient shortage (memory, locked-memory
                // limit with many concurrent callers): this batch simply runs synchronously.
                tracing::debug!(%error, "no io_uring ring available, running batch with pread/pwrite");
                return run_sync(file, batch);
            }
        };
        match drive(&mut ring, file, batch) {
            Drive::Done(outcome) => {
                if let Ok(mut idle) = self.idle.lock() {
                    if idle.len() < MAX_IDLE_RINGS {
                        idle.push(ring);
                    }
                }
                outcome
            }
            // The ring may hold unsubmitted entries pointing at this batch, so it is dropped
            // unused. Nothing of the batch is with the kernel any more, and its requests are
            // independent reads and writes, so running it again synchronously is safe.
            Drive::RingFailed(error) => {
                tracing::debug!(%error, "io_uring submission failed, rerunning batch with pread/pwrite");
                run_sync(file, batch)
            }
        }
    }
}

fn new_ring() -> io::Result<IoUring> {
    let ring = IoUring::builder().setup_clamp().build(DEPTH)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if !probe.is_supported(opcode::Read::CODE) || !probe.is_supported(opcode::Write::CODE) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel's io_uring lacks READ/WRITE",
        ));
    }
    Ok(ring)
}

enum Drive {
    Done(Result<(), Failure>),
    RingFailed(io::Error),
}

/// One request of the batch as the kernel sees it.
struct Transfer {
    ptr: *mut u8,
    len: usize,
    offset: u64,
    write: bool,
    /// Bytes already transferred; short transfers are resubmitted for the rest.
    done: usize,
}

impl Transfer {
    fn entry(&self, fd: types::Fd, index: usize) -> squeue::Entry {
        let len = (self.len - self.done).min(MAX_TRANSFER) as u32;
        // The pointer stays inside the request's buffer: done < len.
        let ptr = self.ptr.wrapping_add(self.done);
        let offset = self.offset + self.done as u64;
        let entry = if self.write {
            opcode::Write::new(fd, ptr.cast_const(), len)
                .offset(offset)
                .build()
        } else {
            opcode::Read::new(fd, ptr, len).offset(offset).build()
        };
        entry.user_data(index as u64)
    }

    fn failure(&self, error: io::Error) -> Failure {
        Failure {
            offset: self.offset + self.done as u64,
            len: (self.len - self.done) as u64,
            error,
        }
    }
}

fn drive(ring: &mut IoUring, file: &File, batch: &mut [IoRequest<'_>]) -> Drive {
    let fd = types::Fd(file.as_raw_fd());
    // Raw pointers are taken once, up front, and `batch` is not touched again until every
    // transfer has completed, so the kernel is the only writer of the read buffers meanwhile.
    let mut transfers: Vec<Transfer> = batch
        .iter_mut()
        .map(|request| match request {
            IoRequest::Read { buf, offset } => Transfer {
                ptr: buf.as_mut_ptr(),
                len: buf.len(),
                offset: *offset,
                write: false,
                done: 0,
            },
            IoRequest::Write { buf, offset } => Transfer {
                ptr: buf.as_ptr().cast_mut(),
                len: buf.len(),
                offset: *offset,
                write: true,
                done: 0,
            },
        })
        .collect();
    let mut queue: VecDeque<usize> = (0..transfers.len())
        .filter(|&i| transfers[i].len > 0)
        .collect();
    let mut in_flight = 0usize;
    let mut failure: Option<Failure> = None;

    loop {
        if failure.is_none() {
            let mut submission = ring.submission();
            while in_flight < DEPTH as usize {
                let Some(&index) = queue.front() else { break };
                let entry = transfers[index].entry(fd, index);
                // SAFETY: the entry points into a buffer of `batch`, which stays mutably
                // borrowed by this function until the entry's completion has been reaped;
                // we never return with entries in flight (see below).
                if unsafe { submission.push(&entry) }.is_err() {
                    break;
                }
                queue.pop_front();
                in_flight += 1;
            }
        }
        if in_flight == 0 {
            break;
        }
        if let Err(error) = ring.submit_and_wait(1) {
            let with_kernel = in_flight - ring.submission().len();
            if error.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if with_kernel == 0 {
                // Nothing of this batch is in the kernel's hands: safe to give up. The
                // entries still queued in the submission ring die with the ring.
                return Drive::RingFailed(error);
            }
            // EAGAIN/EBUSY: the kernel is short of resources until completions are reaped;
            // wait for one without submitting anything.
            if let Err(wait_error) = wait_for_completion(ring) {
                if wait_error.raw_os_error() != Some(libc::EINTR) {
                    // The ring is unusable while the kernel still holds requests pointing
                    // into the caller's buffers: returning would let the kernel write into
                    // freed memory, so stop here.
                    tracing::error!(%error, %wait_error, with_kernel, "io_uring failed with requests in flight");
                    std::process::abort();
                }
            }
        }
        for cqe in ring.completion() {
            in_flight = in_flight.saturating_sub(1);
            let index = cqe.user_data() as usize;
            let Some(transfer) = transfers.get_mut(index) else {
                continue;
            };
            match cqe.result() {
                res if res < 0 => {
                    if res == -libc::EINTR || res == -libc::EAGAIN {
                        queue.push_back(index);
                    } else if failure.is_none() {
                        failure = Some(transfer.failure(io::Error::from_raw_os_error(-res)));
                    }
                }
                0 => {
                    if failure.is_none() {
                        let (kind, what) = if transfer.write {
                            (io::ErrorKind::WriteZero, "write made no progress")
                        } else {
                            (
                                io::ErrorKind::UnexpectedEof,
                                "read past the end of the file",
                            )
                        };
                        failure = Some(transfer.failure(io::Error::new(kind, what)));
                    }
                }
                res => {
                    transfer.done += res as usize;
                    if transfer.done < transfer.len {
                        queue.push_back(index);
                    }
                }
            }
        }
    }
    Drive::Done(failure.map_or(Ok(()), Err))
}

/// Blocks until at least one completion is posted, submitting nothing.
fn wait_for_completion(ring: &IoUring) -> io::Result<usize> {
    // <linux/io_uring.h>; not exported by the io-uring crate.
    const IORING_ENTER_GETEVENTS: u32 = 1;
    // SAFETY: io_uring_enter on our own ring, submitting nothing, with no extra argument.
    unsafe {
        ring.submitter()
            .enter::<libc::sigset_t>(0, 1, IORING_ENTER_GETEVENTS, None)
    }
}
