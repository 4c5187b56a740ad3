//! An NBD server for any [`Lun`]: what `vapp export` runs.
//!
//! One thread accepts; each client gets a session thread and its own workers (see
//! `session`). All clients share the one LUN, so a flush on any connection covers writes
//! completed on every connection and the export advertises `NBD_FLAG_CAN_MULTI_CONN`.
//! [`ShutdownHandle::shutdown`] stops accepting, lets every session answer the requests it
//! has read, then [`NbdServer::serve`] flushes the LUN and returns.

mod handshake;
mod session;

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::proto::*;
use super::transport::{NbdTarget, Stream};
use crate::{Lun, LunError, lock};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// What to serve and how.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// Export name clients ask for; the empty (default) name is always accepted too.
    pub name: String,
    /// Shown to clients that ask (`nbdinfo`); defaults to the LUN's name.
    pub description: Option<String>,
    /// Refuse writes with EPERM even when the LUN is writable.
    pub read_only: bool,
    /// Clients served at once; more are turned away.
    pub max_clients: usize,
    /// Worker threads per client, i.e. requests of one client executed in parallel.
    pub workers_per_client: usize,
    /// Serve NBD_CMD_TRIM by `Lun::write_zeroes` of the whole granules of this many bytes
    /// it covers (rounded up to whole sectors); the ragged edges are left alone, as the
    /// protocol allows. Set it only where `write_zeroes` is cheap and gives space back (a
    /// hole punched in a file, freed blocks of a thin virtual disk). `None` advertises no
    /// TRIM, and trims sent anyway are accepted and ignored: elsewhere "discarding" would
    /// mean writing zeroes, which costs more than keeping the data.
    pub trim_granularity: Option<u32>,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            description: None,
            read_only: false,
            max_clients: 64,
            workers_per_client: 8,
            trim_granularity: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("{addr}: accepting connections failed: {source}")]
    Accept {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("final flush of the export failed: {0}")]
    Flush(#[source] LunError),
}

/// Payload limit we advertise and enforce; what qemu-nbd and nbdkit use too.
const MAX_PAYLOAD: u32 = 32 << 20;

/// The served LUN plus everything sessions need to know about it.
struct Export {
    lun: Arc<dyn Lun>,
    name: String,
    description: String,
    read_only: bool,
    max_payload: u32,
    workers: usize,
    /// Bytes a TRIM deallocates at a time; see [`ExportConfig::trim_granularity`].
    trim_granularity: Option<u64>,
    /// Serialises read-modify-write of partial sectors.
    partial_sectors: Mutex<()>,
    /// Running average of the time one read or write takes on the LUN, in nanoseconds.
    request_ns: AtomicU64,
}

impl Export {
    fn answers_to(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }

    fn transmission_flags(&self, structured_replies: bool) -> u16 {
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;
        if self.read_only {
            flags |= FLAG_READ_ONLY;
        } else {
            flags |= FLAG_SEND_WRITE_ZEROES;
            if self.trim_granularity.is_some() {
                flags |= FLAG_SEND_TRIM;
            }
        }
        if structured_replies {
            // Reads are always answered in one chunk.
            flags |= FLAG_SEND_DF;
        }
        flags
    }

    fn preferred_block_size(&self) -> u32 {
        self.lun.sector_size().max(4096)
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Shared between the accept loop, the sessions and shutdown handles.
struct Control {
    stopping: AtomicBool,
    /// Written once to wake the accept loop.
    wake_tx: OwnedFd,
    wake_rx: OwnedFd,
    /// A clone of each client socket, to cut reads short at shutdown.
    clients: Mutex<HashMap<u64, Stream>>,
}

/// Stops a running [`NbdServer`] gracefully; cheap to clone and usable from any thread.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Control>);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        let control = &self.0;
        let clients = lock(&control.clients);
        if control.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = nix::unistd::write(&control.wake_tx, &[1]);
        for client in clients.values() {
            // Sessions see end-of-stream, answer what they have read, and close.
            let _ = client.shutdown(Shutdown::Read);
        }
    }
}

pub struct NbdServer {
    export: Arc<Export>,
    listener: Listener,
    local: ListenAddr,
    control: Arc<Control>,
    max_clients: usize,
}

impl NbdServer {
    /// Binds `addr` for serving `lun`. A Unix socket path left behind by a dead server is
    /// replaced; one a live server answers on is not.
    pub fn bind(
        lun: Arc<dyn Lun>,
        config: ExportConfig,
        addr: &ListenAddr,
    ) -> Result<Self, ServeError> {
        let listen_error = |source: io::Error| ServeError::Listen {
            addr: describe(addr),
            source,
        };
        let (listener, local) = match addr {
            ListenAddr::Tcp(socket) => {
                let listener = TcpListener::bind(socket).map_err(listen_error)?;
                let local = listener.local_addr().map_err(listen_error)?;
                (Listener::Tcp(listener), ListenAddr::Tcp(local))
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).map_err(listen_error)?;
                let listener = UnixListener::bind(path).map_err(listen_error)?;
                (Listener::Unix(listener, path.clone()), addr.clone())
            }
        };
        let (wake_rx, wake_tx) = nix::unistd::pipe().map_err(|e| listen_error(e.into()))?;
        let read_only = config.read_only || lun.is_read_only();
        let description = config.description.unwrap_or_else(|| lun.name().to_string());
        let sector = u64::from(lun.sector_size());
        let trim_granularity = config
            .trim_granularity
            .map(|granule| u64::from(granule).max(1).next_multiple_of(sector));
        Ok(Self {
            export: Arc::new(Export {
                lun,
                name: config.name,
                description,
                read_only,
                max_payload: MAX_PAYLOAD,
                workers: config.workers_per_client.max(1),
                trim_granularity,
                partial_sectors: Mutex::new(()),
                request_ns: AtomicU64::new(0),
            }),
            listener,
            local,
            control: Arc::new(Control {
                stopping: AtomicBool::new(false),
                wake_tx,
                wake_rx,
                clients: Mutex::new(HashMap::new()),
            }),
            max_clients: config.max_clients.max(1),
        })
    }

    /// The address actually bound (with the port the kernel picked for port 0).
    pub fn local_addr(&self) -> &ListenAddr {
        &self.local
    }

    /// The client target for this server, e.g. to build an `nbd://` URL.
    pub fn target(&self) -> NbdTarget {
        match &self.local {
            ListenAddr::Tcp(addr) => NbdTarget::Tcp {
                host: addr.ip().to_string(),
                port: addr.port(),
            },
            ListenAddr::Unix(path) => NbdTarget::Unix(path.clone()),
        }
    }

    /// The URL clients connect to.
    pub fn url(&self) -> String {
        self.target().url(&self.export.name)
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::clone(&self.control))
    }

    /// Serves until [`ShutdownHandle::shutdown`], then waits for every session to answer
    /// what it has read, flushes the LUN and returns.
    pub fn serve(self) -> Result<(), ServeError> {
        let export = &self.export;
        tracing::info!(export = %export.name, lun = %export.lun.name(), url = %self.url(),
            read_only = export.read_only, "serving NBD export");
        let mut sessions: Vec<JoinHandle<()>> = Vec::new();
        let next_id = AtomicU64::new(0);
        let result = loop {
            match self.accept() {
                Ok(Some(stream)) => {
                    sessions.retain(|session| !session.is_finished());
                    let peer = stream.peer();
                    if sessions.len() >= self.max_clients {
                        tracing::warn!(
                            peer,
                            max_clients = self.max_clients,
                            "turning a client away: too many clients"
                        );
                        continue;
                    }
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    if let Some(session) = self.start_session(id, stream, peer) {
                        sessions.push(session);
                    }
                }
                Ok(None) => break Ok(()),
                Err(source) => {
                    break Err(ServeError::Accept {
                        addr: describe(&self.local),
                        source,
                    });
                }
            }
        };
        // Also on an accept failure: the clients we have deserve their answers.
        ShutdownHandle(Arc::clone(&self.control)).shutdown();
        for session in sessions {
            let _ = session.join();
        }
        let flushed = export.lun.flush().map_err(ServeError::Flush);
        tracing::info!(export = %export.name, "NBD export stopped");
        result.and(flushed)
    }

    /// The next client, or `None` once shutting down.
    fn accept(&self) -> io::Result<Option<Stream>> {
        loop {
            if self.control.stopping.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let listener_fd = match &self.listener {
                Listener::Tcp(l) => l.as_fd(),
                Listener::Unix(l, _) => l.as_fd(),
            };
            let mut fds = [
                PollFd::new(listener_fd, PollFlags::POLLIN),
                PollFd::new(self.control.wake_rx.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            if self.control.stopping.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let accepted = match &self.listener {
                Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                    s.set_nodelay(true)?;
                    Ok(Stream::Tcp(s))
                }),
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            };
            match accepted {
                Ok(stream) => return Ok(Some(stream)),
                // The client gave up before we got to it, or we are out of descriptors for
                // a moment: neither ends the server.
                Err(e) if transient_accept_error(&e) => {
                    tracing::warn!(error = %e, "accept failed; continuing");
                    if e.raw_os_error() == Some(libc::EMFILE)
                        || e.raw_os_error() == Some(libc::ENFILE)
                    {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn start_session(&self, id: u64, stream: Stream, peer: String) -> Option<JoinHandle<()>> {
        let watch = match stream.try_clone() {
            Ok(watch) => watch,
            Err(e) => {
                tracing::warn!(peer, error = %e, "cannot serve client");
                return None;
            }
        };
        {
            let mut clients = lock(&self.control.clients);
            if self.control.stopping.load(Ordering::SeqCst) {
                return None;
            }
            clients.insert(id, watch);
        }
        let export = Arc::clone(&self.export);
        let control = Arc::clone(&self.control);
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-session-{id}"))
            .spawn(move || {
                session::serve(&export, stream, &peer, &control.stopping);
                lock(&control.clients).remove(&id);
            });
        match spawned {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a session thread");
                lock(&self.control.clients).remove(&id);
                None
            }
        }
    }
}

fn transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
                | libc::EPERM
        )
    )
}

fn describe(addr: &ListenAddr) -> String {
    match addr {
        ListenAddr::Tcp(socket) => socket.to_string(),
        ListenAddr::Unix(path) => path.display().to_string(),
    }
}

/// Removes a socket file nobody listens on any more; refuses to touch anything else.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "path exists and is not a socket",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another server is listening on this socket",
        )),
        Err(_) => std::fs::remove_file(path),
    }
}
