//! The I/O engines that carry a file or block-device LUN's requests to the kernel:
//! io_uring, with many requests in flight, or plain pread/pwrite when io_uring is refused.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::str::FromStr;
use std::sync::Once;

use crate::IoRequest;
use crate::uring::RingPool;

/// Environment variable that picks the engine when [`IoEngine::Auto`] is asked for.
pub const IO_ENGINE_ENV: &str = "VAPP_IO_ENGINE";

/// Which I/O engine a file or block-device LUN uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngine {
    /// What `VAPP_IO_ENGINE` (`auto`, `sync` or `uring`) says; when unset, io_uring if the
    /// kernel allows it, else pread/pwrite.
    #[default]
    Auto,
    /// pread/pwrite, one request at a time.
    Sync,
    /// io_uring, required: opening fails when the kernel refuses it.
    Uring,
}

impl FromStr for IoEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(IoEngine::Auto),
            "sync" | "pread" => Ok(IoEngine::Sync),
            "uring" | "io_uring" | "io-uring" => Ok(IoEngine::Uring),
            other => Err(format!(
                "unknown I/O engine {other:?} (use auto, sync or uring)"
            )),
        }
    }
}

impl fmt::Display for IoEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoEngine::Auto => "auto",
            IoEngine::Sync => "sync",
            IoEngine::Uring => "uring",
        })
    }
}

/// A request of a batch that failed, with the part of it that was being transferred.
#[derive(Debug)]
pub(crate) struct Failure {
    pub offset: u64,
    pub len: u64,
    pub error: io::Error,
}

#[derive(Debug)]
pub(crate) enum Engine {
    Sync,
    Uring(RingPool),
}

impl Engine {
    /// Resolves `requested` (and, for `Auto`, the environment) to a working engine.
    pub fn select(requested: IoEngine) -> Result<Engine, String> {
        let requested = match requested {
            IoEngine::Auto => match std::env::var(IO_ENGINE_ENV) {
                Ok(value) => value
                    .parse::<IoEngine>()
                    .map_err(|e| format!("{IO_ENGINE_ENV}: {e}"))?,
                Err(_) => IoEngine::Auto,
            },
            explicit => explicit,
        };
        match requested {
            IoEngine::Sync => Ok(Engine::Sync),
            IoEngine::Uring => RingPool::new()
                .map(Engine::Uring)
                .map_err(|e| format!("io_uring was requested but the kernel refused it: {e}")),
            IoEngine::Auto => Ok(RingPool::new().map_or_else(
                |error| {
                    static LOGGED: Once = Once::new();
                    LOGGED.call_once(|| {
                        tracing::warn!(
                            reason = %error,
                            "io_uring unavailable, falling back to pread/pwrite"
                        );
                    });
                    Engine::Sync
                },
                Engine::Uring,
            )),
        }
    }

    pub fn kind(&self) -> IoEngine {
        match self {
            Engine::Sync => IoEngine::Sync,
            Engine::Uring(_) => IoEngine::Uring,
        }
    }

    /// Carries out every request of `batch` against `file`. Offsets and lengths have been
    /// validated and buffers suit the file's open mode (aligned for O_DIRECT).
    pub fn run(&self, file: &File, batch: &mut [IoRequest<'_>]) -> Result<(), Failure> {
        match self {
            // One request gains nothing from a queue: pread/pwrite is the same one syscall
            // without the ring round trip.
            Engine::Uring(rings) if batch.len() > 1 => rings.run(file, batch),
            _ => run_sync(file, batch),
        }
    }
}

/// pread/pwrite each request in turn, finishing short transfers and retrying EINTR.
pub(crate) fn run_sync(file: &File, batch: &mut [IoRequest<'_>]) -> Result<(), Failure> {
    for request in batch.iter_mut() {
        let (offset, len, result) = match request {
            IoRequest::Read { buf, offset } => {
                (*offset, buf.len(), file.read_exact_at(buf, *offset))
            }
            IoRequest::Write { buf, offset } => {
                (*offset, buf.len(), file.write_all_at(buf, *offset))
            }
        };
        result.map_err(|error| Failure {
            offset,
            len: len as u64,
            error,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_names_parse() {
        assert_eq!("sync".parse::<IoEngine>(), Ok(IoEngine::Sync));
        assert_eq!("io_uring".parse::<IoEngine>(), Ok(IoEngine::Uring));
        assert_eq!(" Auto ".parse::<IoEngine>(), Ok(IoEngine::Auto));
        let err = "aio".parse::<IoEngine>().unwrap_err();
        assert!(err.contains("aio"), "{err}");
    }
}
