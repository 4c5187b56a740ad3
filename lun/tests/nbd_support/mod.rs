//! Shared by the NBD tests: real servers (qemu-nbd, nbdkit) as child processes, a random
//! I/O workload checked against a shadow copy, a raw protocol client to send what no
//! polite client sends, and scripted misbehaving servers.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lun::{IoRequest, Lun};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

pub const MIB: u64 = 1 << 20;

/// A server process, killed when dropped.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    what: String,
}

impl Daemon {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(mut command: Command, socket: PathBuf, what: &str) -> Daemon {
    let _ = std::fs::remove_file(&socket);
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let mut daemon = Daemon {
        child,
        socket,
        what: what.to_string(),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !answers_handshake(&daemon.socket) {
        if let Ok(Some(status)) = daemon.child.try_wait() {
            panic!("{} exited before listening: {status}", daemon.what);
        }
        assert!(
            Instant::now() < deadline,
            "{} did not start listening",
            daemon.what
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon
}

/// True once a server on `socket` greets; the probe then aborts politely so the server
/// has nothing to complain about.
fn answers_handshake(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let mut greeting = [0u8; 18];
    if stream.read_exact(&mut greeting).is_err() {
        return false;
    }
    let _ = stream.write_all(&1u32.to_be_bytes());
    send_option(&mut stream, 2, &[]);
    let mut reply = [0u8; 20];
    let _ = stream.read_exact(&mut reply);
    true
}

/// qemu-nbd serving `file` raw as `export` on a Unix socket in `dir`.
pub fn qemu_nbd(file: &Path, export: &str, dir: &Path) -> Daemon {
    let socket = dir.join("qemu-nbd.sock");
    let mut command = Command::new("qemu-nbd");
    command
        .args([
            "-f",
            "raw",
            "--persistent",
            "--shared=16",
            "-x",
            export,
            "-k",
        ])
        .arg(&socket)
        .arg(file);
    spawn(command, socket, "qemu-nbd")
}

/// nbdkit with `args` (filters, plugin and parameters) on a Unix socket in `dir`.
pub fn nbdkit(dir: &Path, args: &[&str]) -> Daemon {
    let socket = dir.join("nbdkit.sock");
    let mut command = Command::new("nbdkit");
    command
        .args(["--foreground", "--exit-with-parent", "-U"])
        .arg(&socket)
        .args(args);
    spawn(command, socket, "nbdkit")
}

pub fn have_qemu_nbd() -> bool {
    lun::prereq::require(
        lun::prereq::have_command("qemu-nbd"),
        "qemu-nbd (Debian package qemu-utils)",
    )
}

pub fn have_nbdkit() -> bool {
    lun::prereq::require(
        lun::prereq::have_command("nbdkit"),
        "nbdkit (Debian package nbdkit)",
    )
}

/// A sparse file of `size` bytes.
pub fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

pub fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    buf
}

/// Random single and batched writes and reads over `range` of `lun`, each read checked
/// against `shadow` (the expected contents of the whole LUN); ends with a flush and a
/// full comparison of the range.
pub fn exercise(lun: &dyn Lun, shadow: &mut [u8], range: std::ops::Range<u64>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let sector = u64::from(lun.sector_size());
    let sectors = (range.end - range.start) / sector;
    let random_span = |rng: &mut StdRng, max_sectors: u64| {
        let len = rng.random_range(1..=max_sectors.min(sectors)) * sector;
        let offset = range.start + rng.random_range(0..=(sectors - len / sector)) * sector;
        (offset, len as usize)
    };
    for round in 0..40 {
        match round % 4 {
            0 => {
                let (offset, len) = random_span(&mut rng, 256);
                let data = random_bytes(&mut rng, len);
                lun.write_at(&data, offset).unwrap();
                shadow[offset as usize..][..len].copy_from_slice(&data);
            }
            1 => {
                // A batch of non-overlapping writes: one slot of the range each.
                let slot = (range.end - range.start) / 16 / sector * sector;
                let mut writes = Vec::new();
                for i in 0..16u64 {
                    let len = rng.random_range(1..=(slot / sector).min(64)) * sector;
                    writes.push((range.start + i * slot, random_bytes(&mut rng, len as usize)));
                }
                let mut batch: Vec<IoRequest<'_>> = writes
                    .iter()
                    .map(|(offset, data)| IoRequest::Write {
                        buf: data,
                        offset: *offset,
                    })
                    .collect();
                lun.submit(&mut batch).unwrap();
                for (offset, data) in &writes {
                    shadow[*offset as usize..][..data.len()].copy_from_slice(data);
                }
            }
            2 => {
                let (offset, len) = random_span(&mut rng, 512);
                let mut buf = vec![0xa5u8; len];
                lun.read_at(&mut buf, offset).unwrap();
                assert!(
                    buf == shadow[offset as usize..][..len],
                    "{}: read at {offset} (+{len}) differs from what was written",
                    lun.name()
                );
            }
            _ => {
                let spans: Vec<(u64, usize)> = (0..16).map(|_| random_span(&mut rng, 16)).collect();
                let mut bufs: Vec<Vec<u8>> = spans.iter().map(|&(_, l)| vec![0x5au8; l]).collect();
                let mut batch: Vec<IoRequest<'_>> = bufs
                    .iter_mut()
                    .zip(&spans)
                    .map(|(buf, &(offset, _))| IoRequest::Read { buf, offset })
                    .collect();
                lun.submit(&mut batch).unwrap();
                for (buf, &(offset, len)) in bufs.iter().zip(&spans) {
                    assert!(
                        buf[..] == shadow[offset as usize..][..len],
                        "{}: batched read at {offset} (+{len}) differs",
                        lun.name()
                    );
                }
            }
        }
    }
    lun.flush().unwrap();
    let len = (range.end - range.start) as usize;
    let mut all = vec![0u8; len];
    lun.read_at(&mut all, range.start).unwrap();
    assert!(
        all == shadow[range.start as usize..][..len],
        "{}: final read-back differs",
        lun.name()
    );
}

/// Asserts the file holds exactly `expected`.
pub fn assert_file_holds(path: &Path, expected: &[u8]) {
    let contents = std::fs::read(path).unwrap();
    assert_eq!(
        contents.len(),
        expected.len(),
        "{} has the wrong size",
        path.display()
    );
    if let Some(at) = contents.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{} differs from what was written at byte {at}",
            path.display()
        );
    }
}

// ---- Protocol-level pieces: a raw client and scripted servers. ----

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST: u32 = 3;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Reads one option reply: (reply type, data).
pub fn read_option_reply<S: Read>(stream: &mut S) -> (u32, Vec<u8>) {
    let mut header = [0u8; 20];
    stream.read_exact(&mut header).unwrap();
    assert_eq!(be64(&header), OPTION_REPLY_MAGIC);
    let mut data = vec![0u8; be32(&header[16..]) as usize];
    stream.read_exact(&mut data).unwrap();
    (be32(&header[12..]), data)
}

pub fn send_option<S: Write>(stream: &mut S, option: u32, data: &[u8]) {
    let mut message = Vec::new();
    message.extend_from_slice(&IHAVEOPT.to_be_bytes());
    message.extend_from_slice(&option.to_be_bytes());
    message.extend_from_slice(&(data.len() as u32).to_be_bytes());
    message.extend_from_slice(data);
    stream.write_all(&message).unwrap();
}

/// One reply as the raw client saw it.
#[derive(Debug)]
pub struct RawReply {
    pub handle: u64,
    pub errno: u32,
    pub data: Vec<u8>,
}

/// A client that speaks the protocol literally, to send requests no library would.
pub struct RawClient {
    pub stream: std::net::TcpStream,
    pub size: u64,
    pub flags: u16,
    structured: bool,
    /// Read lengths by handle, to know whether a simple reply carries data.
    reads: std::collections::HashMap<u64, u32>,
}

impl RawClient {
    pub fn connect(addr: std::net::SocketAddr, export: &str, structured: bool) -> RawClient {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).unwrap();
        assert_eq!(be64(&greeting), NBDMAGIC);
        assert_eq!(be64(&greeting[8..]), IHAVEOPT);
        stream.write_all(&3u32.to_be_bytes()).unwrap();
        if structured {
            send_option(&mut stream, OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(read_option_reply(&mut stream).0, 1);
        }
        let mut go = Vec::new();
        go.extend_from_slice(&(export.len() as u32).to_be_bytes());
        go.extend_from_slice(export.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        send_option(&mut stream, OPT_GO, &go);
        let (mut size, mut flags) = (0, 0);
        loop {
            let (kind, data) = read_option_reply(&mut stream);
            match kind {
                3 if be16(&data) == 0 => {
                    size = be64(&data[2..]);
                    flags = be16(&data[10..]);
                }
                3 => {}
                1 => break,
                other => panic!(
                    "NBD_OPT_GO refused: {other:#x} {:?}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
        RawClient {
            stream,
            size,
            flags,
            structured,
            reads: Default::default(),
        }
    }

    /// Enters transmission the old way, with NBD_OPT_EXPORT_NAME.
    pub fn connect_by_export_name(
        addr: std::net::SocketAddr,
        export: &str,
        no_zeroes: bool,
    ) -> std::io::Result<RawClient> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        let flags: u32 = if no_zeroes { 3 } else { 1 };
        stream.write_all(&flags.to_be_bytes())?;
        send_option(&mut stream, 1, export.as_bytes());
        let mut reply = vec![0u8; if no_zeroes { 10 } else { 134 }];
        stream.read_exact(&mut reply)?;
        assert!(reply[10..].iter().all(|&b| b == 0));
        Ok(RawClient {
            stream,
            size: be64(&reply),
            flags: be16(&reply[8..]),
            structured: false,
            reads: Default::default(),
        })
    }

    pub fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, len: u32) {
        let mut raw = Vec::with_capacity(28);
        raw.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        raw.extend_from_slice(&flags.to_be_bytes());
        raw.extend_from_slice(&command.to_be_bytes());
        raw.extend_from_slice(&handle.to_be_bytes());
        raw.extend_from_slice(&offset.to_be_bytes());
        raw.extend_from_slice(&len.to_be_bytes());
        self.stream.write_all(&raw).unwrap();
        if command == CMD_READ {
            self.reads.insert(handle, len);
        }
    }

    pub fn write(&mut self, handle: u64, offset: u64, data: &[u8]) {
        self.request(CMD_WRITE, 0, handle, offset, data.len() as u32);
        self.stream.write_all(data).unwrap();
    }

    /// Reads the next complete reply (all chunks of a structured one).
    pub fn reply(&mut self) -> RawReply {
        let mut magic = [0u8; 4];
        self.stream.read_exact(&mut magic).unwrap();
        match be32(&magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut rest = [0u8; 12];
                self.stream.read_exact(&mut rest).unwrap();
                let (errno, handle) = (be32(&rest), be64(&rest[4..]));
                assert!(
                    !self.structured || !self.reads.contains_key(&handle),
                    "simple reply to a read with structured replies negotiated"
                );
                let len = self.reads.remove(&handle).unwrap_or(0);
                let mut data = vec![0u8; if errno == 0 { len as usize } else { 0 }];
                self.stream.read_exact(&mut data).unwrap();
                RawReply {
                    handle,
                    errno,
                    data,
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut reply = RawReply {
                    handle: 0,
                    errno: 0,
                    data: Vec::new(),
                };
                let mut first = true;
                loop {
                    if !first {
                        self.stream.read_exact(&mut magic).unwrap();
                        assert_eq!(be32(&magic), STRUCTURED_REPLY_MAGIC);
                    }
                    first = false;
                    let mut rest = [0u8; 16];
                    self.stream.read_exact(&mut rest).unwrap();
                    let (flags, kind, handle) = (be16(&rest), be16(&rest[2..]), be64(&rest[4..]));
                    let mut payload = vec![0u8; be32(&rest[12..]) as usize];
                    self.stream.read_exact(&mut payload).unwrap();
                    reply.handle = handle;
                    match kind {
                        0 => {}
                        1 => reply.data.extend_from_slice(&payload[8..]),
                        k if k & 0x8000 != 0 => reply.errno = be32(&payload),
                        other => panic!("unexpected chunk type {other}"),
                    }
                    if flags & 1 != 0 {
                        self.reads.remove(&handle);
                        return reply;
                    }
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }
}

/// A scripted server on a Unix socket, serving one connection with `script`.
pub fn scripted_server(
    dir: &Path,
    script: impl FnOnce(UnixStream) + Send + 'static,
) -> (PathBuf, JoinHandle<()>) {
    let path = dir.join("scripted.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        script(stream);
    });
    (path, handle)
}

/// The server half of a correct handshake for an export of `size` bytes; structured
/// replies are accepted when `structured`.
pub fn scripted_handshake(stream: &mut UnixStream, size: u64, structured: bool) {
    let mut greeting = Vec::new();
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&3u16.to_be_bytes());
    stream.write_all(&greeting).unwrap();
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags).unwrap();
    loop {
        let mut header = [0u8; 16];
        stream.read_exact(&mut header).unwrap();
        let option = be32(&header[8..]);
        let mut data = vec![0u8; be32(&header[12..]) as usize];
        stream.read_exact(&mut data).unwrap();
        let reply = |stream: &mut UnixStream, kind: u32, data: &[u8]| {
            let mut message = Vec::new();
            message.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
            message.extend_from_slice(&option.to_be_bytes());
            message.extend_from_slice(&kind.to_be_bytes());
            message.extend_from_slice(&(data.len() as u32).to_be_bytes());
            message.extend_from_slice(data);
            stream.write_all(&message).unwrap();
        };
        match option {
            OPT_STRUCTURED_REPLY if structured => reply(stream, 1, &[]),
            OPT_GO => {
                let mut info = Vec::new();
                info.extend_from_slice(&0u16.to_be_bytes());
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&(1u16 | 1 << 2).to_be_bytes());
                reply(stream, 3, &info);
                reply(stream, 1, &[]);
                return;
            }
            _ => reply(stream, (1 << 31) | 1, &[]),
        }
    }
}

/// Reads one request header: (command, handle, offset, length).
pub fn scripted_request(stream: &mut UnixStream) -> (u16, u64, u64, u32) {
    let mut raw = [0u8; 28];
    stream.read_exact(&mut raw).unwrap();
    assert_eq!(be32(&raw), REQUEST_MAGIC);
    (
        be16(&raw[6..]),
        be64(&raw[8..]),
        be64(&raw[16..]),
        be32(&raw[24..]),
    )
}

pub fn simple_reply(stream: &mut UnixStream, errno: u32, handle: u64, data: &[u8]) {
    let mut message = Vec::new();
    message.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    message.extend_from_slice(&errno.to_be_bytes());
    message.extend_from_slice(&handle.to_be_bytes());
    message.extend_from_slice(data);
    stream.write_all(&message).unwrap();
}

pub fn chunk(stream: &mut UnixStream, flags: u16, kind: u16, handle: u64, payload: &[u8]) {
    let mut message = Vec::new();
    message.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    message.extend_from_slice(&flags.to_be_bytes());
    message.extend_from_slice(&kind.to_be_bytes());
    message.extend_from_slice(&handle.to_be_bytes());
    message.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    message.extend_from_slice(payload);
    stream.write_all(&message).unwrap();
}
