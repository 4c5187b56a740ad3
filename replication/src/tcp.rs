//! The network side: [`TcpPeer`] is the primary's end of a link, [`SecondaryServer`] the
//! secondary's. Both authenticate (wire.rs) before any data flows; a peer that fails to,
//! speaks another version or sends a bad frame is disconnected with one log line, and
//! nothing it sent is applied.

use std::io::{BufReader, BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::error::{ReplError, Result};
use crate::secondary::Secondary;
use crate::wire::{self, AuthError, Message, WireError};

/// How long a peer may take to finish the handshake or answer a request.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The primary's end of a TCP link.
#[derive(Debug)]
pub struct TcpPeer {
    addr: SocketAddr,
    name: String,
    secret: Vec<u8>,
    conn: Option<(BufReader<TcpStream>, BufWriter<TcpStream>)>,
    seq: u64,
    /// Bytes per second, if limited.
    limit: Option<u64>,
    window_start: Instant,
    window_bytes: u64,
    /// Attempts a reconnect makes, waiting twice as long after each failure.
    attempts: u32,
    first_backoff: Duration,
}

impl TcpPeer {
    pub fn new(addr: SocketAddr, secret: Vec<u8>) -> TcpPeer {
        TcpPeer {
            addr,
            name: format!("tcp://{addr}"),
            secret,
            conn: None,
            seq: 0,
            limit: None,
            window_start: Instant::now(),
            window_bytes: 0,
            attempts: 1,
            first_backoff: Duration::from_millis(100),
        }
    }

    /// Caps what this link sends, in bytes per second.
    pub fn with_bandwidth_limit(mut self, bytes_per_sec: u64) -> TcpPeer {
        self.limit = Some(bytes_per_sec.max(1));
        self
    }

    /// Makes a reconnect try `attempts` times, backing off from `first` and doubling
    /// (capped at 5 s) between tries.
    pub fn with_retries(mut self, attempts: u32, first: Duration) -> TcpPeer {
        self.attempts = attempts.max(1);
        self.first_backoff = first;
        self
    }

    fn down(&mut self, reason: String) -> ReplError {
        if let Some((_, w)) = self.conn.take() {
            let _ = w.get_ref().shutdown(Shutdown::Both);
        }
        ReplError::LinkDown {
            peer: self.name.clone(),
            reason,
        }
    }

    fn connect_once(&mut self) -> Result<()> {
        let stream = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT)
            .map_err(|e| self.down(format!("connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| self.down(e.to_string()))?;
        let mut s = stream;
        match wire::client_handshake(&mut s, &self.secret) {
            Ok(()) => {}
            Err(AuthError::Refused(reason)) => {
                let _ = s.shutdown(Shutdown::Both);
                warn!(peer = %self.name, %reason, "replication peer authentication failed");
                return Err(ReplError::AuthFailed {
                    peer: self.name.clone(),
                    reason,
                });
            }
            Err(AuthError::Wire(WireError::Io(e))) => {
                return Err(self.down(format!("handshake: {e}")));
            }
            Err(AuthError::Wire(e)) => {
                let _ = s.shutdown(Shutdown::Both);
                return Err(ReplError::Protocol {
                    peer: self.name.clone(),
                    reason: e.to_string(),
                });
            }
        }
        let r = s.try_clone().map_err(|e| self.down(e.to_string()))?;
        self.conn = Some((BufReader::new(r), BufWriter::new(s)));
        info!(peer = %self.name, "replication link authenticated");
        Ok(())
    }

    fn throttle(&mut self, bytes: u64) {
        let Some(limit) = self.limit else {
            return;
        };
        self.window_bytes += bytes;
        let due = Duration::from_secs_f64(self.window_bytes as f64 / limit as f64);
        let spent = self.window_start.elapsed();
        if due > spent {
            std::thread::sleep(due - spent);
        }
        if spent > Duration::from_secs(1) {
            self.window_start = Instant::now();
            self.window_bytes = 0;
        }
    }
}

impl crate::Peer for TcpPeer {
    fn name(&self) -> &str {
        &self.name
    }

    fn send(&mut self, msg: &Message) -> Result<()> {
        self.seq += 1;
        let frame = wire::encode(self.seq, msg);
        self.throttle(frame.len() as u64);
        let Some((_, w)) = self.conn.as_mut() else {
            return Err(self.down("not connected".into()));
        };
        if let Err(e) = w.write_all(&frame).and_then(|()| w.flush()) {
            return Err(self.down(e.to_string()));
        }
        Ok(())
    }

    fn recv(&mut self) -> Result<Message> {
        let Some((r, _)) = self.conn.as_mut() else {
            return Err(self.down("not connected".into()));
        };
        match wire::read_frame(r) {
            Ok((_, m)) => Ok(m),
            Err(WireError::Io(e)) => Err(self.down(e.to_string())),
            Err(e) => {
                warn!(peer = %self.name, error = %e, "bad frame from replication peer; disconnecting");
                Err(self.down(e.to_string()))
            }
        }
    }

    fn reconnect(&mut self) -> Result<()> {
        self.conn = None;
        let mut wait = self.first_backoff;
        let mut last = None;
        for attempt in 0..self.attempts {
            if attempt > 0 {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            match self.connect_once() {
                Ok(()) => return Ok(()),
                // A wrong secret will not get right by retrying.
                Err(e @ ReplError::AuthFailed { .. }) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| self.down("no attempt made".into())))
    }

    fn close(&mut self) {
        let _ = self.down("closed on command".into());
    }
}

/// The secondary's listener: one primary at a time, each connection authenticated
/// before any of its frames reach the [`Secondary`].
#[derive(Debug)]
pub struct SecondaryServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SecondaryServer {
    pub fn start(
        listener: TcpListener,
        secondary: Arc<Secondary>,
        secret: Vec<u8>,
    ) -> std::io::Result<SecondaryServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("repl-secondary".into())
            .spawn(move || {
                while !stopping.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, from)) => {
                            serve(s, from, &secondary, &secret, &stopping);
                            secondary.disconnected();
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => {
                            warn!(error = %e, "replication listener accept failed");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        Ok(SecondaryServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for SecondaryServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    stream: TcpStream,
    from: SocketAddr,
    secondary: &Secondary,
    secret: &[u8],
    stop: &AtomicBool,
) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)));
    if let Err(e) = setup {
        warn!(peer = %from, error = %e, "cannot set up replication connection");
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut s = stream;
    if let Err(e) = wire::server_handshake(&mut s, secret) {
        warn!(peer = %from, error = %e, "replication peer refused before any data");
        if let AuthError::Wire(
            e @ (WireError::Version(_)
            | WireError::BadMagic(_)
            | WireError::Checksum(_)
            | WireError::Malformed { .. }
            | WireError::UnknownType(_)
            | WireError::TooLarge(_)),
        ) = &e
        {
            let _ = s.write_all(&wire::encode(
                0,
                &Message::Error {
                    reason: e.to_string(),
                },
            ));
        }
        let _ = s.shutdown(Shutdown::Both);
        return;
    }
    info!(peer = %from, "replication primary authenticated");
    let Ok(r) = s.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(r);
    let mut writer = BufWriter::new(s);
    // Between frames the read times out so a stop is noticed.
    let _ = reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(200)));
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if reader.buffer().is_empty() {
            let mut peek = [0u8; 1];
            match reader.get_ref().peek(&mut peek) {
                Ok(0) => {
                    info!(peer = %from, "replication primary disconnected");
                    break;
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    warn!(peer = %from, error = %e, "replication connection failed");
                    break;
                }
            }
        }
        let _ = reader.get_ref().set_read_timeout(Some(IO_TIMEOUT));
        let frame = wire::read_frame(&mut reader);
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)));
        let (seq, msg) = match frame {
            Ok(f) => f,
            Err(e) => {
                warn!(peer = %from, error = %e, "bad frame from replication primary; disconnecting, nothing applied");
                let _ = writer.write_all(&wire::encode(
                    0,
                    &Message::Error {
                        reason: e.to_string(),
                    },
                ));
                let _ = writer.flush();
                break;
            }
        };
        let reply = secondary.handle(msg);
        if writer
            .write_all(&wire::encode(seq, &reply))
            .and_then(|()| writer.flush())
            .is_err()
        {
            break;
        }
    }
    let _ = writer.get_ref().shutdown(Shutdown::Both);
}
