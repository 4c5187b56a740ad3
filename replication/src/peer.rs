//! What the engine needs of the other site: send a message, receive the answer. The TCP
//! transport (`tcp.rs`) is one implementation; [`LocalPeer`] hands frames straight to an
//! in-process [`Secondary`], so the engine is tested without sockets, through the same
//! encoding.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::error::{ReplError, Result};
use crate::secondary::Secondary;
use crate::wire::{self, Message};

/// The other site, as the primary sees it. Answers come back in request order.
pub trait Peer: Send + std::fmt::Debug {
    fn name(&self) -> &str;
    fn send(&mut self, msg: &Message) -> Result<()>;
    fn recv(&mut self) -> Result<Message>;
    /// (Re)establishes the link, authenticating before anything else flows.
    fn reconnect(&mut self) -> Result<()>;

    /// Drops the link on command (a fracture), so the other site sees its primary go.
    fn close(&mut self) {}

    fn call(&mut self, msg: &Message) -> Result<Message> {
        self.send(msg)?;
        self.recv()
    }

    /// Sends `msg` and hands back its answer to wait for without this peer, so the
    /// caller can let others send meanwhile (pipelined writes). An error here means
    /// the message never left; one from [`Reply::wait`] that it may have arrived.
    /// By default the answer is awaited here, as [`Peer::call`] does.
    fn submit(&mut self, msg: &Message) -> Result<Reply> {
        self.send(msg)?;
        Ok(Reply::ready(self.recv()))
    }

    /// [`Peer::submit`] of a write, framed straight from the caller's buffer where the
    /// transport can.
    fn submit_write(&mut self, offset: u64, data: &[u8]) -> Result<Reply> {
        self.submit(&Message::Write {
            offset,
            data: data.to_vec(),
        })
    }

    /// Why the link is known to be gone without anything being sent (keepalive
    /// answers missing, the connection closed), if it is.
    fn broken(&self) -> Option<String> {
        None
    }
}

/// The answer to a [`Peer::submit`], ready or on its way.
#[derive(Debug)]
pub struct Reply(ReplyState);

#[derive(Debug)]
enum ReplyState {
    Ready(Result<Message>),
    Waiting {
        done: Arc<Completions>,
        seq: u64,
        peer: String,
    },
}

impl Reply {
    pub fn ready(answer: Result<Message>) -> Reply {
        Reply(ReplyState::Ready(answer))
    }

    pub(crate) fn waiting(done: Arc<Completions>, seq: u64, peer: String) -> Reply {
        Reply(ReplyState::Waiting { done, seq, peer })
    }

    /// Blocks until the answer arrives or the link is lost.
    pub fn wait(self) -> Result<Message> {
        match self.0 {
            ReplyState::Ready(r) => r,
            ReplyState::Waiting { done, seq, peer } => done
                .wait(seq)
                .map_err(|reason| ReplError::LinkDown { peer, reason }),
        }
    }
}

/// Where a connection's answers come from: the next frame, or why there is none (the
/// connection is then unusable).
pub(crate) trait AnswerSource: Send + std::fmt::Debug {
    fn next(&mut self) -> std::result::Result<(u64, Message), String>;
}

/// Answers of one connection by frame sequence number. There is no reader thread: a
/// waiter whose answer has not come reads the connection itself if nobody else is
/// (filing whatever arrives for whoever waits for it), or sleeps until an answer is
/// filed; so a lone writer reads its own answer with no thread switch. Once the
/// connection dies every waiter learns why.
#[derive(Debug)]
pub(crate) struct Completions {
    state: Mutex<Done>,
    arrived: Condvar,
    source: Mutex<Box<dyn AnswerSource>>,
}

#[derive(Debug, Default)]
struct Done {
    answers: HashMap<u64, Message>,
    dead: Option<String>,
}

impl Completions {
    pub(crate) fn new(source: Box<dyn AnswerSource>) -> Completions {
        Completions {
            state: Mutex::default(),
            arrived: Condvar::new(),
            source: Mutex::new(source),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Done> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection is gone; the first reason given is the one reported.
    pub(crate) fn kill(&self, reason: String) {
        let mut s = self.state();
        if s.dead.is_none() {
            s.dead = Some(reason);
        }
        drop(s);
        self.arrived.notify_all();
    }

    pub(crate) fn dead(&self) -> Option<String> {
        self.state().dead.clone()
    }

    /// An answer that arrived before the connection died is still delivered.
    pub(crate) fn wait(&self, seq: u64) -> std::result::Result<Message, String> {
        let mut s = self.state();
        loop {
            if let Some(m) = s.answers.remove(&seq) {
                return Ok(m);
            }
            if let Some(reason) = &s.dead {
                return Err(reason.clone());
            }
            // Never blocks while holding the state: the reader takes the state after
            // the source, so the two cannot wait on each other.
            if let Ok(mut source) = self.source.try_lock() {
                drop(s);
                let got = source.next();
                s = self.state();
                match got {
                    Ok((n, m)) => {
                        s.answers.insert(n, m);
                    }
                    Err(reason) => {
                        if s.dead.is_none() {
                            s.dead = Some(reason);
                        }
                    }
                }
                // Released under the state lock, so a waiter that found the source
                // busy is already asleep and hears this.
                drop(source);
                self.arrived.notify_all();
                continue;
            }
            s = self.arrived.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Expects `Ok`; the peer's error frame becomes [`ReplError::Refused`].
pub(crate) fn expect_ok(peer: &mut dyn Peer, reply: Message) -> Result<()> {
    expect_ok_from(peer.name(), reply)
}

pub(crate) fn expect_ok_from(peer: &str, reply: Message) -> Result<()> {
    match reply {
        Message::Ok => Ok(()),
        Message::Error { reason } => Err(ReplError::Refused {
            peer: peer.to_string(),
            reason,
        }),
        other => Err(ReplError::Protocol {
            peer: peer.to_string(),
            reason: format!("expected ok, got {}", other.kind()),
        }),
    }
}

/// A switch that cuts and restores an in-process link, as pulling a cable would.
#[derive(Debug, Clone, Default)]
pub struct LinkSwitch(Arc<AtomicBool>);

impl LinkSwitch {
    pub fn cut(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn restore(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
    fn is_cut(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// An in-process link to a [`Secondary`]: each message is encoded to a frame and decoded
/// on the other side, as over TCP.
#[derive(Debug)]
pub struct LocalPeer {
    secondary: Arc<Secondary>,
    link: LinkSwitch,
    replies: VecDeque<Message>,
    bytes_sent: Arc<AtomicU64>,
    connected: bool,
}

impl LocalPeer {
    pub fn new(secondary: Arc<Secondary>) -> LocalPeer {
        LocalPeer {
            secondary,
            link: LinkSwitch::default(),
            replies: VecDeque::new(),
            bytes_sent: Arc::new(AtomicU64::new(0)),
            connected: false,
        }
    }

    /// A peer on the same link as another: cutting either's switch cuts both, and the
    /// byte count is shared (a restarted primary on the same wire).
    pub fn sharing(mut self, link: LinkSwitch, bytes_sent: Arc<AtomicU64>) -> LocalPeer {
        self.link = link;
        self.bytes_sent = bytes_sent;
        self
    }

    pub fn switch(&self) -> LinkSwitch {
        self.link.clone()
    }

    /// Frame bytes sent to the secondary so far.
    pub fn bytes_sent(&self) -> Arc<AtomicU64> {
        self.bytes_sent.clone()
    }

    fn down(&mut self) -> ReplError {
        if self.connected {
            self.secondary.disconnected();
        }
        self.connected = false;
        self.replies.clear();
        ReplError::LinkDown {
            peer: self.name().to_string(),
            reason: "link cut".into(),
        }
    }
}

impl Drop for LocalPeer {
    /// The primary went away: its connection closes, as a socket's would.
    fn drop(&mut self) {
        if self.connected {
            self.secondary.disconnected();
        }
    }
}

impl Peer for LocalPeer {
    fn name(&self) -> &str {
        "local"
    }

    fn send(&mut self, msg: &Message) -> Result<()> {
        if self.link.is_cut() || !self.connected {
            return Err(self.down());
        }
        let frame = wire::encode(0, msg);
        self.bytes_sent
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        let (_, decoded) = wire::read_frame(&mut &frame[..]).map_err(|e| ReplError::Protocol {
            peer: "local".into(),
            reason: e.to_string(),
        })?;
        let reply = self.secondary.handle(decoded);
        self.replies.push_back(reply);
        Ok(())
    }

    fn recv(&mut self) -> Result<Message> {
        if self.link.is_cut() {
            return Err(self.down());
        }
        match self.replies.pop_front() {
            Some(m) => Ok(m),
            None => Err(ReplError::Protocol {
                peer: "local".into(),
                reason: "receive with no request outstanding".into(),
            }),
        }
    }

    fn reconnect(&mut self) -> Result<()> {
        if self.link.is_cut() {
            return Err(self.down());
        }
        if self.connected {
            self.secondary.disconnected();
        }
        self.replies.clear();
        self.connected = true;
        Ok(())
    }
}
