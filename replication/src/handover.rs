//! Planned handover: the DR site asks the protected site, over the replication link's
//! address and secret, to stop the VMs a recovery plan names, make its last writes reach
//! the replica and demote itself, and answers with what it did (FORMAT.md, "Planned
//! handover"). The request goes the other way from the data: the DR side (a secondary)
//! connects to the primary's `--listen` address, which a primary's daemon serves with a
//! [`HandoverServer`] while it is the primary (a secondary's listener answers it too, saying
//! it already is one). What the primary does to its VMs is the caller's: this module only
//! carries the request and the answer, authenticated as the link is.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{info, warn};

use crate::meta::get64;
use crate::wire::{self, Message, WireError};

/// The request layout this vapp speaks (the first two bytes of a `handover` payload).
pub const HANDOVER_VERSION: u16 = 1;

/// One VM the plan protects on the replicated LUN (or group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverVm {
    /// The datastore's UUID: the replica carries its original's, so both sites name it alike.
    pub datastore: String,
    /// The VM's folder on that datastore.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverRequest {
    pub vms: Vec<HandoverVm>,
    /// How long each VM's guest gets to power off after its power button.
    pub stop_timeout_ms: u64,
    /// Power off a VM still running after the timeout, instead of giving up.
    pub force: bool,
}

/// What the protected side did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverOutcome {
    /// Its VMs are stopped, every write it acknowledged is on the replica, and it is a
    /// secondary now: the DR side may promote.
    Demoted = 0,
    /// It already was a secondary (demoted by hand, or by an earlier request whose answer
    /// was lost): the members say what it holds.
    AlreadySecondary = 1,
    /// Refused before anything changed (a VM not on the LUN, the link not up).
    Refused = 2,
    /// Started and undone: it is still the primary; the steps say which VMs it started again.
    Aborted = 3,
}

impl HandoverOutcome {
    fn from_u16(v: u16) -> Option<HandoverOutcome> {
        Some(match v {
            0 => HandoverOutcome::Demoted,
            1 => HandoverOutcome::AlreadySecondary,
            2 => HandoverOutcome::Refused,
            3 => HandoverOutcome::Aborted,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            HandoverOutcome::Demoted => "demoted",
            HandoverOutcome::AlreadySecondary => "already-secondary",
            HandoverOutcome::Refused => "refused",
            HandoverOutcome::Aborted => "aborted",
        }
    }
}

/// One replicated LUN of the answering side, as it stood when it answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoverMember {
    /// Demoted: its current generation when its writers were stopped and the replica
    /// had everything (the replica's current generation is then the same). Otherwise
    /// its current generation now.
    pub generation: u64,
    /// Its bitmap generation (what it forked from when the link went).
    pub bitmap_generation: u64,
    /// Regions in its bitmap: what the replica may lack.
    pub dirty_regions: u64,
}

/// One step of the handover, timed from the request's arrival.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverStep {
    pub step: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverReply {
    pub outcome: HandoverOutcome,
    pub members: Vec<HandoverMember>,
    pub steps: Vec<HandoverStep>,
    pub message: String,
}

fn put_str(p: &mut Vec<u8>, s: &str) {
    // Names and details are short; a longer one is cut at a character boundary.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    p.extend_from_slice(&(end as u16).to_le_bytes());
    p.extend_from_slice(&s.as_bytes()[..end]);
}

struct Cursor<'a> {
    kind: &'static str,
    p: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        if self.p.len() - self.at < n {
            return Err(WireError::Malformed {
                kind: self.kind,
                reason: format!("{} bytes of payload end inside a field", self.p.len()),
            });
        }
        let b = &self.p[self.at..self.at + n];
        self.at += n;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(get64(self.take(8)?, 0))
    }

    fn str(&mut self) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        let kind = self.kind;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| WireError::Malformed {
            kind,
            reason: "a name that is not UTF-8".into(),
        })
    }

    fn end(&self) -> Result<(), WireError> {
        if self.at != self.p.len() {
            return Err(WireError::Malformed {
                kind: self.kind,
                reason: format!("{} bytes after the last field", self.p.len() - self.at),
            });
        }
        Ok(())
    }
}

pub(crate) fn encode_request(p: &mut Vec<u8>, r: &HandoverRequest) {
    p.extend_from_slice(&HANDOVER_VERSION.to_le_bytes());
    p.extend_from_slice(&u16::from(r.force).to_le_bytes());
    p.extend_from_slice(&r.stop_timeout_ms.to_le_bytes());
    p.extend_from_slice(&(r.vms.len() as u32).to_le_bytes());
    for vm in &r.vms {
        put_str(p, &vm.datastore);
        put_str(p, &vm.path);
    }
}

pub(crate) fn decode_request(p: &[u8]) -> Result<HandoverRequest, WireError> {
    let mut c = Cursor {
        kind: "handover",
        p,
        at: 0,
    };
    let version = c.u16()?;
    if version != HANDOVER_VERSION {
        return Err(WireError::Malformed {
            kind: "handover",
            reason: format!(
                "request version {version}; this vapp speaks version {HANDOVER_VERSION}"
            ),
        });
    }
    let flags = c.u16()?;
    let stop_timeout_ms = c.u64()?;
    let count = c.u32()?;
    let mut vms = Vec::new();
    for _ in 0..count {
        let datastore = c.str()?;
        let path = c.str()?;
        vms.push(HandoverVm { datastore, path });
    }
    c.end()?;
    Ok(HandoverRequest {
        vms,
        stop_timeout_ms,
        force: flags & 1 != 0,
    })
}

pub(crate) fn encode_reply(p: &mut Vec<u8>, r: &HandoverReply) {
    p.extend_from_slice(&(r.outcome as u16).to_le_bytes());
    p.extend_from_slice(&(r.members.len() as u16).to_le_bytes());
    for m in &r.members {
        p.extend_from_slice(&m.generation.to_le_bytes());
        p.extend_from_slice(&m.bitmap_generation.to_le_bytes());
        p.extend_from_slice(&m.dirty_regions.to_le_bytes());
    }
    p.extend_from_slice(&(r.steps.len() as u16).to_le_bytes());
    for s in &r.steps {
        put_str(p, &s.step);
        p.extend_from_slice(&s.start_ms.to_le_bytes());
        p.extend_from_slice(&s.end_ms.to_le_bytes());
        put_str(p, &s.detail);
    }
    put_str(p, &r.message);
}

pub(crate) fn decode_reply(p: &[u8]) -> Result<HandoverReply, WireError> {
    let mut c = Cursor {
        kind: "handover-reply",
        p,
        at: 0,
    };
    let code = c.u16()?;
    let outcome = HandoverOutcome::from_u16(code).ok_or_else(|| WireError::Malformed {
        kind: "handover-reply",
        reason: format!("unknown outcome {code}"),
    })?;
    let n = c.u16()?;
    let mut members = Vec::new();
    for _ in 0..n {
        members.push(HandoverMember {
            generation: c.u64()?,
            bitmap_generation: c.u64()?,
            dirty_regions: c.u64()?,
        });
    }
    let n = c.u16()?;
    let mut steps = Vec::new();
    for _ in 0..n {
        steps.push(HandoverStep {
            step: c.str()?,
            start_ms: c.u64()?,
            end_ms: c.u64()?,
            detail: c.str()?,
        });
    }
    let message = c.str()?;
    c.end()?;
    Ok(HandoverReply {
        outcome,
        members,
        steps,
        message,
    })
}

/// Why a handover request got no answer to act on.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Nothing reached the other side: it changed nothing.
    #[error("cannot reach {addr}: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    /// The other side refused the connection's proof or the request itself (a wrong
    /// secret, a vapp that does not know the request): it changed nothing.
    #[error("{addr} refused the request: {reason}")]
    Refused { addr: SocketAddr, reason: String },
    /// The request went out and no answer came back: the other side may have done all,
    /// part or none of it.
    #[error("{addr} did not answer the request: {reason}")]
    NoAnswer { addr: SocketAddr, reason: String },
}

/// Sends `request` to the replication listener at `addr` and waits up to `wait` for the
/// answer.
pub fn request_handover(
    addr: SocketAddr,
    secret: &[u8],
    request: &HandoverRequest,
    connect_timeout: Duration,
    wait: Duration,
) -> Result<HandoverReply, HandoverError> {
    let unreachable = |e: &dyn std::fmt::Display| HandoverError::Unreachable {
        addr,
        reason: e.to_string(),
    };
    let mut s = TcpStream::connect_timeout(&addr, connect_timeout).map_err(|e| unreachable(&e))?;
    s.set_read_timeout(Some(connect_timeout))
        .and_then(|()| s.set_write_timeout(Some(connect_timeout)))
        .map_err(|e| unreachable(&e))?;
    let _ = s.set_nodelay(true);
    wire::client_handshake(&mut s, secret).map_err(|e| match e {
        wire::AuthError::Wire(WireError::Io(e)) => unreachable(&e),
        e => HandoverError::Refused {
            addr,
            reason: e.to_string(),
        },
    })?;
    s.write_all(&wire::encode(1, &Message::Handover(request.clone())))
        .map_err(|e| unreachable(&e))?;
    s.set_read_timeout(Some(wait))
        .map_err(|e| HandoverError::NoAnswer {
            addr,
            reason: e.to_string(),
        })?;
    let answer = wire::read_frame(&mut s);
    let _ = s.shutdown(Shutdown::Both);
    match answer {
        Ok((_, Message::HandoverReply(r))) => Ok(r),
        Ok((_, Message::Error { reason })) => Err(HandoverError::Refused { addr, reason }),
        Ok((_, other)) => Err(HandoverError::NoAnswer {
            addr,
            reason: format!("answered with {}", other.kind()),
        }),
        Err(e) => Err(HandoverError::NoAnswer {
            addr,
            reason: e.to_string(),
        }),
    }
}

/// What a primary does when asked for a handover.
pub trait HandoverHandler: Send + Sync + 'static {
    fn handover(&self, from: SocketAddr, request: &HandoverRequest) -> HandoverReply;
    /// Called once the answer was sent (`sent`) or could not be: a demoted side must
    /// take its new role either way, since the demotion is on disk already.
    fn answered(&self, reply: &HandoverReply, sent: bool);
}

/// A primary's listener on its `--listen` address: takes handover requests from the
/// peer that proves the link's secret, one at a time, and nothing else.
pub struct HandoverServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HandoverServer {
    pub fn start(
        listener: TcpListener,
        secret: Vec<u8>,
        handler: Arc<dyn HandoverHandler>,
    ) -> std::io::Result<HandoverServer> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let timeout = crate::link_timeout();
        let thread = std::thread::Builder::new()
            .name("repl-handover".into())
            .spawn(move || {
                while !stopping.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, from)) => serve_one(s, from, &secret, &*handler, timeout),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            warn!(error = %e, "handover listener accept failed");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        Ok(HandoverServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for HandoverServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

fn serve_one(
    stream: TcpStream,
    from: SocketAddr,
    secret: &[u8],
    handler: &dyn HandoverHandler,
    timeout: Duration,
) {
    let mut s = stream;
    let setup = s
        .set_nonblocking(false)
        .and_then(|()| s.set_read_timeout(Some(timeout)))
        .and_then(|()| s.set_write_timeout(Some(timeout)));
    if setup.is_err() {
        return;
    }
    if let Err(e) = wire::server_handshake(&mut s, secret) {
        warn!(peer = %from, error = %e, "handover request refused before any data");
        let _ = s.shutdown(Shutdown::Both);
        return;
    }
    let reply = match wire::read_frame(&mut s) {
        Ok((seq, Message::Handover(request))) => {
            info!(peer = %from, vms = request.vms.len(), force = request.force, "planned handover requested");
            let reply = handler.handover(from, &request);
            let sent = s.write_all(&wire::encode(seq, &Message::HandoverReply(reply.clone())));
            if let Err(e) = &sent {
                warn!(peer = %from, error = %e, outcome = reply.outcome.name(), "cannot answer the handover request");
            }
            let _ = s.shutdown(Shutdown::Both);
            handler.answered(&reply, sent.is_ok());
            return;
        }
        Ok((seq, other)) => (
            seq,
            format!(
                "this side is the primary: it takes only handover requests here, not {}",
                other.kind()
            ),
        ),
        Err(e) => (0, e.to_string()),
    };
    warn!(peer = %from, reason = %reply.1, "bad request on the handover listener");
    let _ = s.write_all(&wire::encode(reply.0, &Message::Error { reason: reply.1 }));
    let _ = s.shutdown(Shutdown::Both);
}
