//! The network side: [`TcpPeer`] is the primary's end of a link, [`SecondaryServer`] the
//! secondary's. Both authenticate (wire.rs) before any data flows; a peer that fails to,
//! speaks another version or sends a bad frame is disconnected with one log line, and
//! nothing it sent is applied.

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, IoSlice, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::error::{ReplError, Result};
use crate::peer::{AnswerSource, Completions, Reply};
use crate::secondary::Secondary;
use crate::wire::{self, AuthError, Message, WireError};

/// A peer silent this long is taken for dead, by default: a connect, a handshake, a
/// request's answer, and (thanks to keepalives) an idle link too.
pub const DEFAULT_LINK_TIMEOUT: Duration = Duration::from_secs(6);

/// The environment variable that overrides [`DEFAULT_LINK_TIMEOUT`], in milliseconds
/// (tests shorten it; a long-haul link may lengthen it).
pub const LINK_TIMEOUT_ENV: &str = "VAPP_REPL_TIMEOUT_MS";

/// The link timeout in force: [`LINK_TIMEOUT_ENV`] if set to a positive number of
/// milliseconds, else [`DEFAULT_LINK_TIMEOUT`]. Read once per process.
pub fn link_timeout() -> Duration {
    static TIMEOUT: OnceLock<Duration> = OnceLock::new();
    *TIMEOUT.get_or_init(|| match std::env::var(LINK_TIMEOUT_ENV) {
        Err(_) => DEFAULT_LINK_TIMEOUT,
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => {
                warn!(variable = LINK_TIMEOUT_ENV, value = %v, default_ms = DEFAULT_LINK_TIMEOUT.as_millis() as u64, "not a positive number of milliseconds; using the default");
                DEFAULT_LINK_TIMEOUT
            }
        },
    })
}

/// A primary that has sent nothing for this long sends a ping: four chances to be
/// heard before the other end's timeout.
fn ping_interval(timeout: Duration) -> Duration {
    (timeout / 4).max(Duration::from_millis(10))
}

/// The primary's end of a TCP link. Requests are pipelined: each frame carries a
/// sequence number and answers are filed by it, so a writer waits for its own answer
/// while others send. A keepalive thread pings an idle link; a link that answered
/// nothing for the link timeout is taken for dead.
#[derive(Debug)]
pub struct TcpPeer {
    addr: SocketAddr,
    name: String,
    secret: Vec<u8>,
    conn: Option<Conn>,
    /// Bytes per second, if limited.
    limit: Option<u64>,
    window_start: Instant,
    window_bytes: u64,
    /// Attempts a reconnect makes, waiting twice as long after each failure.
    attempts: u32,
    first_backoff: Duration,
    timeout: Duration,
}

/// One authenticated connection.
#[derive(Debug)]
struct Conn {
    out: Arc<Outgoing>,
    done: Arc<Completions>,
    /// Sequence numbers sent by [`crate::Peer::send`] whose answers
    /// [`crate::Peer::recv`] has yet to return, oldest first.
    unanswered: VecDeque<u64>,
}

/// The sending half, shared with the keepalive thread.
#[derive(Debug)]
struct Outgoing {
    wire: Mutex<(TcpStream, Instant)>,
    /// The last sequence number given out, pings' included.
    seq: AtomicU64,
    stop: Mutex<bool>,
    stopping: Condvar,
}

impl Outgoing {
    fn wire(&self) -> std::sync::MutexGuard<'_, (TcpStream, Instant)> {
        self.wire.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        self.send_parts(frame, &[])
    }

    /// One frame in two parts, written together without joining them in memory.
    fn send_parts(&self, head: &[u8], data: &[u8]) -> std::io::Result<()> {
        let mut w = self.wire();
        let (mut head, mut data) = (head, data);
        while !head.is_empty() || !data.is_empty() {
            let n = match w
                .0
                .write_vectored(&[IoSlice::new(head), IoSlice::new(data)])
            {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let from_head = n.min(head.len());
            head = &head[from_head..];
            data = &data[n - from_head..];
        }
        w.1 = Instant::now();
        Ok(())
    }

    fn close(&self) {
        *self.stop.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.stopping.notify_all();
        let _ = self.wire().0.shutdown(Shutdown::Both);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.out.close();
        self.done.kill("connection closed".into());
    }
}

/// The receiving half: a frame, or why the connection is dead (it is then shut down,
/// so the sending half fails too). Its socket's read timeout is the link timeout.
#[derive(Debug)]
struct Incoming {
    r: BufReader<TcpStream>,
    timeout: Duration,
}

impl AnswerSource for Incoming {
    fn next(&mut self) -> std::result::Result<(u64, Message), String> {
        let reason = match wire::read_frame(&mut self.r) {
            Ok(frame) => return Ok(frame),
            Err(WireError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                format!(
                    "no answer for {} ms; taking the link for dead",
                    self.timeout.as_millis()
                )
            }
            Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                "connection closed by the peer".into()
            }
            Err(e) => e.to_string(),
        };
        let _ = self.r.get_ref().shutdown(Shutdown::Both);
        Err(reason)
    }
}

/// Pings whenever nothing was sent for `interval` and waits for the answer (reading
/// the connection if nobody else is), so a dead idle link is found within `interval`
/// plus the link timeout; stops when the connection closes.
fn keep_alive(out: &Outgoing, done: &Completions, interval: Duration) {
    let mut stop = out.stop.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        stop = out
            .stopping
            .wait_timeout(stop, interval)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        if *stop || done.dead().is_some() {
            return;
        }
        if out.wire().1.elapsed() < interval {
            continue;
        }
        let seq = out.next_seq();
        if let Err(e) = out.send(&wire::encode(seq, &Message::Ping)) {
            done.kill(format!("keepalive: {e}"));
            return;
        }
        drop(stop);
        if done.wait(seq).is_err() {
            return;
        }
        stop = out.stop.lock().unwrap_or_else(PoisonError::into_inner);
    }
}

impl TcpPeer {
    pub fn new(addr: SocketAddr, secret: Vec<u8>) -> TcpPeer {
        TcpPeer {
            addr,
            name: format!("tcp://{addr}"),
            secret,
            conn: None,
            limit: None,
            window_start: Instant::now(),
            window_bytes: 0,
            attempts: 1,
            first_backoff: Duration::from_millis(100),
            timeout: link_timeout(),
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

    /// Overrides [`link_timeout`] for this link.
    pub fn with_link_timeout(mut self, timeout: Duration) -> TcpPeer {
        self.timeout = timeout.max(Duration::from_millis(40));
        self
    }

    fn down(&mut self, reason: String) -> ReplError {
        self.conn = None;
        ReplError::LinkDown {
            peer: self.name.clone(),
            reason,
        }
    }

    fn connect_once(&mut self) -> Result<()> {
        let stream = TcpStream::connect_timeout(&self.addr, self.timeout)
            .map_err(|e| self.down(format!("connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
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
        let timeout = self.timeout;
        let out = Arc::new(Outgoing {
            wire: Mutex::new((s, Instant::now())),
            seq: AtomicU64::new(0),
            stop: Mutex::new(false),
            stopping: Condvar::new(),
        });
        let done = Arc::new(Completions::new(Box::new(Incoming {
            r: BufReader::with_capacity(64 << 10, r),
            timeout,
        })));
        let spawned = {
            let (out, done) = (out.clone(), done.clone());
            std::thread::Builder::new()
                .name("repl-keepalive".into())
                .spawn(move || keep_alive(&out, &done, ping_interval(timeout)))
        };
        let conn = Conn {
            out,
            done,
            unanswered: VecDeque::new(),
        };
        if let Err(e) = spawned {
            drop(conn);
            return Err(self.down(format!("cannot start the keepalive thread: {e}")));
        }
        self.conn = Some(conn);
        info!(peer = %self.name, timeout_ms = timeout.as_millis() as u64, "replication link authenticated");
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

    /// A fresh sequence number (0, which no answer carries, when not connected: the
    /// frame is then refused anyway).
    fn next_seq(&self) -> u64 {
        self.conn.as_ref().map_or(0, |c| c.out.next_seq())
    }

    /// Puts one frame on the wire; its answer will be filed in what this returns.
    fn put(&mut self, frame: &[u8]) -> Result<Arc<Completions>> {
        self.put_parts(frame, &[])
    }

    fn put_parts(&mut self, head: &[u8], data: &[u8]) -> Result<Arc<Completions>> {
        self.throttle((head.len() + data.len()) as u64);
        let Some(conn) = self.conn.as_ref() else {
            return Err(self.down("not connected".into()));
        };
        if let Some(reason) = conn.done.dead() {
            return Err(self.down(reason));
        }
        if let Err(e) = conn.out.send_parts(head, data) {
            return Err(self.down(e.to_string()));
        }
        Ok(conn.done.clone())
    }
}

impl crate::Peer for TcpPeer {
    fn name(&self) -> &str {
        &self.name
    }

    fn send(&mut self, msg: &Message) -> Result<()> {
        let seq = self.next_seq();
        self.put(&wire::encode(seq, msg))?;
        if let Some(c) = self.conn.as_mut() {
            c.unanswered.push_back(seq);
        }
        Ok(())
    }

    fn recv(&mut self) -> Result<Message> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(self.down("not connected".into()));
        };
        let Some(seq) = conn.unanswered.pop_front() else {
            return Err(ReplError::Protocol {
                peer: self.name.clone(),
                reason: "receive with no request outstanding".into(),
            });
        };
        let answer = conn.done.wait(seq);
        answer.map_err(|reason| self.down(reason))
    }

    fn submit(&mut self, msg: &Message) -> Result<Reply> {
        let seq = self.next_seq();
        let done = self.put(&wire::encode(seq, msg))?;
        Ok(Reply::waiting(done, seq, self.name.clone()))
    }

    fn submit_write(&mut self, offset: u64, data: &[u8]) -> Result<Reply> {
        let seq = self.next_seq();
        let head = wire::write_header(seq, offset, data);
        let done = self.put_parts(&head, data)?;
        Ok(Reply::waiting(done, seq, self.name.clone()))
    }

    fn broken(&self) -> Option<String> {
        self.conn.as_ref().and_then(|c| c.done.dead())
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
/// A primary that sends nothing (not even a keepalive) for the link timeout is taken
/// for dead and dropped, so a promote no longer sees it connected.
#[derive(Debug)]
pub struct SecondaryServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    primary: Arc<Mutex<Option<SocketAddr>>>,
}

impl SecondaryServer {
    /// Serves with the [`link_timeout`] in force.
    pub fn start(
        listener: TcpListener,
        secondary: Arc<Secondary>,
        secret: Vec<u8>,
    ) -> std::io::Result<SecondaryServer> {
        SecondaryServer::start_with_timeout(listener, secondary, secret, link_timeout())
    }

    pub fn start_with_timeout(
        listener: TcpListener,
        secondary: Arc<Secondary>,
        secret: Vec<u8>,
        timeout: Duration,
    ) -> std::io::Result<SecondaryServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let primary = Arc::new(Mutex::new(None));
        let serving = primary.clone();
        let thread = std::thread::Builder::new()
            .name("repl-secondary".into())
            .spawn(move || {
                while !stopping.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, from)) => {
                            serve(s, from, &secondary, &secret, &stopping, &serving, timeout);
                            *serving.lock().unwrap_or_else(PoisonError::into_inner) = None;
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
            primary,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the primary connected now (authenticated and alive), if any.
    pub fn connected_primary(&self) -> Option<SocketAddr> {
        *self.primary.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_connected(&self) -> bool {
        self.connected_primary().is_some()
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
    primary: &Mutex<Option<SocketAddr>>,
    timeout: Duration,
) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(timeout)))
        .and_then(|()| stream.set_write_timeout(Some(timeout)));
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
    *primary.lock().unwrap_or_else(PoisonError::into_inner) = Some(from);
    let mut reader = BufReader::new(r);
    let out = Answers {
        writer: Mutex::new(BufWriter::new(s)),
        busy: Mutex::new(0),
        idle: Condvar::new(),
        broken: AtomicBool::new(false),
    };
    // Writes are applied by a pool, concurrently (the primary never has two
    // overlapping ones in flight) and answered as each lands; any other request waits
    // for every earlier write first, so it is handled in the order it was sent.
    let (jobs, queue) = std::sync::mpsc::sync_channel::<(u64, Message)>(APPLIERS);
    let queue = Mutex::new(queue);
    std::thread::scope(|scope| {
        for _ in 0..APPLIERS {
            scope.spawn(|| {
                loop {
                    let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    let Ok((seq, msg)) = job else {
                        return;
                    };
                    let reply = secondary.handle(msg);
                    out.answer(seq, &reply);
                    out.done_one();
                }
            });
        }
        read_requests(&mut reader, from, secondary, &out, &jobs, stop, timeout);
        drop(jobs);
    });
    let _ = out
        .writer
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .get_ref()
        .shutdown(Shutdown::Both);
}

/// Threads applying one connection's writes at a secondary.
const APPLIERS: usize = 8;

/// The answering half of a secondary's connection, shared by its appliers.
struct Answers {
    writer: Mutex<BufWriter<TcpStream>>,
    /// Writes handed to the appliers and not yet answered.
    busy: Mutex<usize>,
    idle: Condvar,
    broken: AtomicBool,
}

impl Answers {
    fn answer(&self, seq: u64, reply: &Message) {
        let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if w.write_all(&wire::encode(seq, reply))
            .and_then(|()| w.flush())
            .is_err()
        {
            self.broken.store(true, Ordering::SeqCst);
        }
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, usize> {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn done_one(&self) {
        let mut b = self.busy();
        *b = b.saturating_sub(1);
        drop(b);
        self.idle.notify_all();
    }

    fn wait_idle(&self) {
        let mut b = self.busy();
        while *b > 0 {
            b = self.idle.wait(b).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Whether another frame has (at least partly) arrived. Peeks without blocking, and
/// without making the socket non-blocking: the appliers write answers on it meanwhile.
fn more_to_read(reader: &BufReader<TcpStream>) -> bool {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    if !reader.buffer().is_empty() {
        return true;
    }
    let mut b = [0u8; 1];
    !matches!(
        recv(
            reader.get_ref().as_raw_fd(),
            &mut b,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
        ),
        Err(nix::errno::Errno::EAGAIN)
    )
}

/// Reads the primary's frames until it hangs up, goes silent past `timeout`, sends a
/// bad frame or the server stops; waits for every write handed out before returning.
fn read_requests(
    reader: &mut BufReader<TcpStream>,
    from: SocketAddr,
    secondary: &Secondary,
    out: &Answers,
    jobs: &std::sync::mpsc::SyncSender<(u64, Message)>,
    stop: &AtomicBool,
    timeout: Duration,
) {
    let mut heard = Instant::now();
    // Between frames the read times out so a stop is noticed.
    let _ = reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(200)));
    loop {
        if stop.load(Ordering::SeqCst) || out.broken.load(Ordering::SeqCst) {
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
                    if heard.elapsed() > timeout {
                        warn!(peer = %from, timeout_ms = timeout.as_millis() as u64, "replication primary silent past the link timeout; dropping it");
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    warn!(peer = %from, error = %e, "replication connection failed");
                    break;
                }
            }
        }
        let _ = reader.get_ref().set_read_timeout(Some(timeout));
        let frame = wire::read_frame(reader);
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)));
        let (seq, msg) = match frame {
            Ok(f) => f,
            Err(e) => {
                warn!(peer = %from, error = %e, "bad frame from replication primary; disconnecting, nothing applied");
                out.wait_idle();
                out.answer(
                    0,
                    &Message::Error {
                        reason: e.to_string(),
                    },
                );
                break;
            }
        };
        heard = Instant::now();
        match msg {
            // Answered at once, even while writes are being applied.
            Message::Ping => out.answer(seq, &Message::Pong),
            // Alone and with nothing behind it (a queue depth of one), a write is
            // applied here: handing it over would cost a thread switch of latency.
            msg @ Message::Write { .. } if *out.busy() == 0 && !more_to_read(reader) => {
                let reply = secondary.handle(msg);
                out.answer(seq, &reply);
            }
            msg @ Message::Write { .. } => {
                *out.busy() += 1;
                if jobs.send((seq, msg)).is_err() {
                    out.done_one();
                    break;
                }
            }
            msg => {
                out.wait_idle();
                let reply = secondary.handle(msg);
                out.answer(seq, &reply);
            }
        }
    }
    out.wait_idle();
}
