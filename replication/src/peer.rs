//! What the engine needs of the other site: send a message, receive the answer. The TCP
//! transport (`tcp.rs`) is one implementation; [`LocalPeer`] hands frames straight to an
//! in-process [`Secondary`], so the engine is tested without sockets, through the same
//! encoding.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
}

/// Expects `Ok`; the peer's error frame becomes [`ReplError::Refused`].
pub(crate) fn expect_ok(peer: &mut dyn Peer, reply: Message) -> Result<()> {
    match reply {
        Message::Ok => Ok(()),
        Message::Error { reason } => Err(ReplError::Refused {
            peer: peer.name().to_string(),
            reason,
        }),
        other => Err(ReplError::Protocol {
            peer: peer.name().to_string(),
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
