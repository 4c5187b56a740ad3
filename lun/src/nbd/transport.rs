//! The byte streams NBD runs over: TCP or a Unix domain socket, behind one type so the
//! protocol code does not care which.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Where an NBD server listens, as a client addresses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdTarget {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl NbdTarget {
    /// The URL a user would type for `export` on this target.
    pub fn url(&self, export: &str) -> String {
        match self {
            NbdTarget::Tcp { host, port } if host.contains(':') => {
                format!("nbd://[{host}]:{port}/{export}")
            }
            NbdTarget::Tcp { host, port } => format!("nbd://{host}:{port}/{export}"),
            NbdTarget::Unix(path) => format!("nbd+unix:///{export}?socket={}", path.display()),
        }
    }

    /// Connects, trying every address the host name resolves to.
    pub(crate) fn connect(&self, timeout: Duration) -> io::Result<Stream> {
        match self {
            NbdTarget::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
            NbdTarget::Tcp { host, port } => {
                let mut last = None;
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(stream) => {
                            // Requests are small and latency-bound: never wait to coalesce.
                            stream.set_nodelay(true)?;
                            return Ok(Stream::Tcp(stream));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "host name resolves to no address")
                }))
            }
        }
    }
}

/// A connected socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        match self {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
        }
    }

    /// The peer, for logs.
    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp:?".to_string(), |a| a.to_string()),
            Stream::Unix(_) => "unix".to_string(),
        }
    }

    /// Acknowledges received data at once instead of up to 40 ms later. Servers that
    /// leave Nagle's algorithm on (qemu-nbd does) hold each further small reply until the
    /// previous one is acknowledged, which with delayed ACKs stalls every batch of
    /// requests by 40 ms. Linux clears the flag again by itself, so it is set per read.
    fn quick_ack(&self) {
        if let Stream::Tcp(stream) = self {
            let on: libc::c_int = 1;
            // SAFETY: a valid socket descriptor and a c_int option of the declared size.
            unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_QUICKACK,
                    (&raw const on).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }

    /// Writes every byte of every slice, in one system call when the kernel takes them all.
    pub fn write_all_vectored(&mut self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match self.write_vectored(bufs) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "peer stopped accepting data",
                    ));
                }
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The receiving side of a client connection: reads, acknowledging each read at once
/// (see [`Stream::quick_ack`]).
pub(crate) struct ReplyReader(pub Stream);

impl Read for ReplyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.read(buf)?;
        if n > 0 {
            self.0.quick_ack();
        }
        Ok(n)
    }
}
