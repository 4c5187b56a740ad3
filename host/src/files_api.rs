//! The file commands through the agent: a command line on this host uses the agent's
//! heartbeat slot instead of taking one of its own, which over NBD costs two lease periods
//! per command (VMware's hostd serves its CLI the same way).
//!
//! - `GET /datastores`: the datastores this agent joined, as `[{"uuid", "label", "lun"}]`.
//! - `POST /datastores/<uuid>/files`: runs one [`FileRequest`] there. The body is chunked;
//!   its first line is the request as JSON and, for `put`, the bytes to copy follow it in
//!   frames that also carry an error reading them and an end mark. The
//!   answer is 200 and the [`Done`] as JSON, or 409 and `{"error": LINE}` with the line the
//!   command line prints for the same failure, 404 for a datastore the agent has not joined,
//!   400 for a malformed request.
//!
//! The command line asks only when the datastore it was given has a UUID the agent joined
//! and is not a copy (see [`AgentDatastore::find`]); otherwise it runs the command itself.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use lun::Lun;
use serde::{Deserialize, Serialize};
use tiny_http::Method;
use vmfs::Datastore;

use crate::files::{self, Done, FileOp, FileRequest, PutSource};
use crate::{Agent, Error, Result};

/// The longest first line of a request body: a JSON request with two paths.
const MAX_REQUEST_LINE: u64 = 64 << 10;
const CHUNK: usize = 1 << 20;
/// How long the command line waits for the agent to say which datastores it joined; a
/// longer silence means it is stuck, and the command runs by itself instead.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// A row of `GET /datastores`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    pub uuid: String,
    pub label: String,
    /// The LUN as the agent's configuration names it.
    pub lun: String,
}

/// The datastores this agent is a host of.
fn joined(agent: &Agent) -> Vec<(Joined, Arc<Datastore>)> {
    agent
        .stores
        .iter()
        .map(|store| {
            let ds = store.ds();
            (
                Joined {
                    uuid: store.uuid.clone(),
                    label: ds.superblock().label.clone(),
                    lun: store.given.clone(),
                },
                ds,
            )
        })
        .collect()
}

/// File names `put`s copy to now, per datastore: vmfs names the temporary file after the
/// host and the file, so two copies to one name in one directory through one host must
/// take turns. Keyed by name, not path, since which directory a copy lands in is known only
/// once it runs; copies of one name into two directories then wait for each other needlessly.
static PUTTING: Mutex<Option<HashSet<(String, String)>>> = Mutex::new(None);
static PUT_DONE: Condvar = Condvar::new();

struct PutTurn(Vec<(String, String)>);

impl PutTurn {
    /// Waits until no other copy may land on the name `op` may land on, and claims it.
    fn take(uuid: &str, path: &str, from: &PutSource) -> PutTurn {
        let mut keys = vec![(uuid.to_string(), files::last_component(path).to_string())];
        if let PutSource::File {
            name: Some(name), ..
        } = from
        {
            keys.push((uuid.to_string(), name.clone()));
        }
        let mut busy = PUTTING.lock().unwrap_or_else(PoisonError::into_inner);
        while busy
            .as_ref()
            .is_some_and(|set| keys.iter().any(|k| set.contains(k)))
        {
            busy = PUT_DONE.wait(busy).unwrap_or_else(PoisonError::into_inner);
        }
        busy.get_or_insert_with(HashSet::new)
            .extend(keys.iter().cloned());
        PutTurn(keys)
    }
}

impl Drop for PutTurn {
    fn drop(&mut self) {
        let mut busy = PUTTING.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(set) = busy.as_mut() {
            for key in &self.0 {
                set.remove(key);
            }
        }
        PUT_DONE.notify_all();
    }
}

fn error(status: u16, message: String) -> (u16, serde_json::Value) {
    (status, serde_json::json!({ "error": message }))
}

/// Answers the requests this module serves; `None` leaves `request` to the other routes.
pub(crate) fn route(
    agent: &Agent,
    request: &mut tiny_http::Request,
) -> Option<(u16, serde_json::Value)> {
    let url = request.url().to_string();
    let path = url.split('?').next().unwrap_or(&url);
    let method = request.method().clone();
    if path == "/datastores" {
        if method != Method::Get {
            return Some(error(405, format!("{method} {path}: only GET")));
        }
        let rows: Vec<Joined> = joined(agent).into_iter().map(|(j, _)| j).collect();
        return Some((200, serde_json::json!(rows)));
    }
    let rest = path.strip_prefix("/datastores/")?;
    let Some(uuid) = rest.strip_suffix("/files") else {
        return Some(error(404, format!("{method} {path}: no such endpoint")));
    };
    if method != Method::Post {
        return Some(error(405, format!("{method} {path}: only POST")));
    }
    let Some((_, ds)) = joined(agent).into_iter().find(|(j, _)| j.uuid == uuid) else {
        return Some(error(
            404,
            format!("datastore {uuid}: this host agent has not joined it"),
        ));
    };
    let mut body = BufReader::with_capacity(CHUNK, request.as_reader());
    let mut line = Vec::new();
    if let Err(e) = (&mut body)
        .take(MAX_REQUEST_LINE)
        .read_until(b'\n', &mut line)
    {
        return Some(error(
            400,
            format!("{method} {path}: reading the request: {e}"),
        ));
    }
    let file_request: FileRequest = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            return Some(error(
                400,
                format!("{method} {path}: the first line is not a file request: {e}"),
            ));
        }
    };
    let _turn = match &file_request.op {
        FileOp::Put { path, from, .. } => Some(PutTurn::take(uuid, path, from)),
        _ => None,
    };
    let mut framed = Framed::new(&mut body);
    let input: Option<&mut dyn Read> = match file_request.op {
        FileOp::Put { .. } => Some(&mut framed),
        _ => None,
    };
    let outcome = files::apply(&ds, &file_request, input, &mut |_| {});
    Some(match outcome {
        Ok(done) => {
            tracing::info!(datastore = uuid, request = ?file_request.op, "file command done for the command line");
            (200, serde_json::json!(done))
        }
        Err(e) => {
            let line = files::error_line(&e);
            tracing::info!(datastore = uuid, request = ?file_request.op, error = %line, "file command refused");
            error(409, line)
        }
    })
}

/// A datastore the local agent joined, as the command line reaches it.
pub struct AgentDatastore {
    socket: PathBuf,
    uuid: String,
}

impl AgentDatastore {
    /// The agent at `socket`, if it answers and has joined the datastore on the LUN `spec`:
    /// the same UUID, and not a copy of it (a snapshot or replica keeps its original's UUID
    /// until resignatured, and must not be written through the original's host). `None`
    /// whenever the command should run by itself, whatever the reason; the reason is logged.
    pub fn find(socket: &Path, spec: &str) -> Option<AgentDatastore> {
        if !socket.exists() {
            return None;
        }
        if vmfs::OpenOptions::read_write().keep_signature {
            tracing::debug!("--keep-signature: not through the host agent");
            return None;
        }
        let rows = match crate::client::request(socket, "GET", "/datastores", ASK_TIMEOUT) {
            Ok((200, body)) => serde_json::from_value::<Vec<Joined>>(body),
            Ok((status, body)) => {
                tracing::debug!(status, %body, "the host agent serves no datastore list");
                return None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "no host agent answers");
                return None;
            }
        };
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "the host agent's datastore list is not as expected");
                return None;
            }
        };
        let lun = open_for_superblock(spec)?;
        let (sb, _) = vmfs::read_superblock(&*lun).ok()?;
        let uuid = sb.uuid.to_string();
        if !rows.iter().any(|row| row.uuid == uuid) {
            tracing::debug!(%uuid, "the host agent has not joined this datastore");
            return None;
        }
        let copy = sb
            .lun_identity
            .as_ref()
            .zip(lun.identity())
            .is_some_and(|(recorded, found)| recorded.same_lun(&found) == Some(false));
        if copy {
            tracing::debug!(%uuid, "a copy of the agent's datastore: not through the agent");
            return None;
        }
        Some(AgentDatastore {
            socket: socket.to_path_buf(),
            uuid,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The datastore's UUID, which names it to the agent whatever path each side opened.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// Runs `request` on the agent. `None`: the agent went away since [`Self::find`] and
    /// nothing was sent, so the command may run by itself. The outer error is the agent
    /// failing mid-request or answering nonsense; the inner one is the command's own failure,
    /// as the line to print.
    pub fn apply(
        &self,
        request: &FileRequest,
        input: Option<&mut dyn Read>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Option<Result<Done, String>>> {
        let what = || format!("host agent at {}", self.socket.display());
        let stream = match UnixStream::connect(&self.socket) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "the host agent went away");
                return Ok(None);
            }
        };
        // The answer is read while the body is still being sent: a request the agent refuses
        // at once (a directory as the target of standard input) is answered before the copy.
        let reader = stream.try_clone().map_err(api_io(what()))?;
        let answer = std::thread::Builder::new()
            .name("agent-answer".into())
            .spawn(move || {
                let mut raw = Vec::new();
                match (&reader).read_to_end(&mut raw) {
                    Ok(_) => Ok(raw),
                    // An agent that answers before reading the whole body closes on unread
                    // bytes, which resets the connection after its answer: keep the answer.
                    Err(_) if !raw.is_empty() => Ok(raw),
                    Err(e) => Err(e),
                }
            })
            .map_err(api_io("starting the agent answer thread".to_string()))?;
        let sent = send(&stream, &self.uuid, request, input, progress);
        // Our side is done either way; the agent's answer ends with its side closing.
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let raw = answer
            .join()
            .map_err(|_| Error::Api(format!("{}: the answer thread panicked", what())))?
            .map_err(api_io(what()))?;
        if raw.is_empty() {
            // No answer at all: whatever broke the sending is the story.
            sent.map_err(api_io(what()))?;
            return Err(Error::Api(format!("{}: closed without an answer", what())));
        }
        let (status, body) = crate::client::parse_answer(&raw, &what())?;
        match status {
            200 => serde_json::from_value(body)
                .map(|done| Some(Ok(done)))
                .map_err(|e| Error::Api(format!("{}: unexpected answer: {e}", what()))),
            409 => Ok(Some(Err(body
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("the host agent refused the command")
                .to_string()))),
            _ => Err(Error::Api(format!("{}: {status} {body}", what()))),
        }
    }
}

/// An I/O failure talking to the agent, as one message: `Error::Io` keeps its cause as a
/// source too, which the command line would print twice.
fn api_io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Api(format!("{what}: {e}"))
}

/// The LUN `spec`, read-only and, over NBD, on one connection: only its superblock is read,
/// and a server limits its connections (qemu-nbd's `--shared`).
fn open_for_superblock(spec: &str) -> Option<Arc<dyn Lun>> {
    let (target, export) = match lun::LunSpec::parse(spec).ok()? {
        lun::LunSpec::Path(_) => {
            let options = lun::OpenOptions {
                read_only: true,
                ..Default::default()
            };
            return lun::open(spec, &options).ok();
        }
        lun::LunSpec::NbdTcp { host, port, export } => (lun::NbdTarget::Tcp { host, port }, export),
        lun::LunSpec::NbdUnix { socket, export } => (lun::NbdTarget::Unix(socket), export),
    };
    let options = lun::NbdOptions {
        read_only: true,
        connections: 1,
        connect_timeout: ASK_TIMEOUT,
        io_timeout: ASK_TIMEOUT,
        ..Default::default()
    };
    match lun::NbdLun::connect(target, &export, options) {
        Ok(nbd) => Some(Arc::new(nbd)),
        Err(e) => {
            tracing::debug!(lun = spec, error = %e, "cannot read the datastore's UUID");
            None
        }
    }
}

/// Sends the request line and, for `put`, the input, as one chunked body.
fn send(
    mut stream: &UnixStream,
    uuid: &str,
    request: &FileRequest,
    input: Option<&mut dyn Read>,
    progress: &mut dyn FnMut(u64),
) -> std::io::Result<()> {
    write!(
        stream,
        "POST /datastores/{uuid}/files HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    chunk(stream, &line)?;
    if let Some(input) = input {
        let mut buf = vec![0u8; CHUNK];
        let mut done = 0u64;
        loop {
            let n = match input.read(&mut buf[FRAME_HEADER..]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // The agent's copy fails with this very error, as a direct one would.
                    let message = e.to_string();
                    let mut frame = vec![FRAME_ERROR];
                    frame.extend_from_slice(&e.raw_os_error().unwrap_or(-1).to_be_bytes());
                    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
                    frame.extend_from_slice(message.as_bytes());
                    chunk(stream, &frame)?;
                    break;
                }
            };
            buf[0] = FRAME_DATA;
            buf[1..FRAME_HEADER].copy_from_slice(&(n as u32).to_be_bytes());
            chunk(stream, &buf[..FRAME_HEADER + n])?;
            done += n as u64;
            progress(done);
        }
        chunk(stream, &[FRAME_END])?;
    }
    stream.write_all(b"0\r\n\r\n")?;
    stream.flush()
}

/// `put`'s input after the request line: frames of a kind byte, then for data a big-endian
/// u32 length and the bytes; for an error reading the input, an i32 errno (-1: none) and a
/// u32-length message; and an end mark. A copy is committed only after the end mark, so a
/// command line killed mid-copy leaves no partial file.
const FRAME_DATA: u8 = b'D';
const FRAME_ERROR: u8 = b'E';
const FRAME_END: u8 = b'Z';
const FRAME_HEADER: usize = 5;
const MAX_ERROR_MESSAGE: u32 = 4096;

/// The input of a `put`, read out of its frames.
struct Framed<R> {
    inner: R,
    /// Bytes left in the current data frame.
    left: usize,
    ended: bool,
}

impl<R: Read> Framed<R> {
    fn new(inner: R) -> Framed<R> {
        Framed {
            inner,
            left: 0,
            ended: false,
        }
    }

    fn cut_short() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the command line's input ended before its end mark",
        )
    }

    fn read_u32(&mut self) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        self.inner
            .read_exact(&mut b)
            .map_err(|_| Self::cut_short())?;
        Ok(u32::from_be_bytes(b))
    }
}

impl<R: Read> Read for Framed<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.left > 0 {
                let want = self.left.min(buf.len());
                let n = self.inner.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(Self::cut_short());
                }
                self.left -= n;
                return Ok(n);
            }
            if self.ended {
                return Ok(0);
            }
            let mut kind = [0u8; 1];
            self.inner
                .read_exact(&mut kind)
                .map_err(|_| Self::cut_short())?;
            match kind[0] {
                FRAME_DATA => self.left = self.read_u32()? as usize,
                FRAME_END => {
                    self.ended = true;
                    return Ok(0);
                }
                FRAME_ERROR => {
                    let errno = self.read_u32()? as i32;
                    let len = self.read_u32()?.min(MAX_ERROR_MESSAGE);
                    let mut message = vec![0u8; len as usize];
                    self.inner
                        .read_exact(&mut message)
                        .map_err(|_| Self::cut_short())?;
                    return Err(if errno >= 0 {
                        std::io::Error::from_raw_os_error(errno)
                    } else {
                        std::io::Error::other(String::from_utf8_lossy(&message).into_owned())
                    });
                }
                other => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("put input: unknown frame kind {other:#04x}"),
                    ));
                }
            }
        }
    }
}

fn chunk(mut stream: &UnixStream, bytes: &[u8]) -> std::io::Result<()> {
    write!(stream, "{:x}\r\n", bytes.len())?;
    stream.write_all(bytes)?;
    stream.write_all(b"\r\n")
}
