//! Opening a LUN from the string a user typed: a path to a file or block device, or an NBD URL.

use std::path::PathBuf;
use std::sync::Arc;

use crate::{FileLun, IoEngine, Lun, LunError, NbdLun, NbdOptions, NbdTarget, Result};

/// Where a LUN lives, parsed from a user-supplied string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LunSpec {
    /// A regular file or a block device.
    Path(PathBuf),
    /// `nbd://HOST[:PORT][/EXPORT]`.
    NbdTcp {
        host: String,
        port: u16,
        export: String,
    },
    /// `nbd+unix:///EXPORT?socket=PATH`.
    NbdUnix { socket: PathBuf, export: String },
}

/// How to open a LUN.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT) for a regular file. Block devices always use
    /// direct I/O: a LUN shared between hosts must never be served from one host's cache.
    pub direct: bool,
    /// Create a sparse file of this many bytes when the path does not exist.
    pub create_size: Option<u64>,
    /// Logical sector size of a file LUN (default 512, or more when O_DIRECT on its file
    /// system needs more). For a block device, a multiple of its own logical sector size;
    /// by default that size itself.
    pub sector_size: Option<u32>,
    /// Which I/O engine files and block devices use; see [`IoEngine`].
    pub engine: IoEngine,
}

pub const NBD_DEFAULT_PORT: u16 = 10809;

impl LunSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        let invalid = |reason: &str| LunError::Open {
            lun: spec.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = spec.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').ok_or_else(|| {
                invalid(
                    "nbd+unix:// needs ?socket=PATH, e.g. nbd+unix:///disk?socket=/run/nbd.sock",
                )
            })?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|s| !s.is_empty())
                .ok_or_else(|| invalid("nbd+unix:// needs ?socket=PATH"))?;
            return Ok(LunSpec::NbdUnix {
                socket: PathBuf::from(socket),
                export: path.trim_start_matches('/').to_string(),
            });
        }
        if let Some(rest) = spec.strip_prefix("nbd://") {
            let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
            if authority.is_empty() {
                return Err(invalid(
                    "nbd:// needs a host, e.g. nbd://127.0.0.1:10809/disk",
                ));
            }
            let (host, port) = split_host_port(authority).map_err(|r| invalid(&r))?;
            return Ok(LunSpec::NbdTcp {
                host,
                port,
                export: export.to_string(),
            });
        }
        if spec.contains("://") {
            return Err(invalid(
                "unknown URL scheme (use a path, nbd:// or nbd+unix://)",
            ));
        }
        if spec.is_empty() {
            return Err(invalid("empty LUN path"));
        }
        Ok(LunSpec::Path(PathBuf::from(spec)))
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(authority: &str) -> std::result::Result<(String, u16), String> {
    let parse_port = |p: &str| p.parse::<u16>().map_err(|_| format!("invalid port {p:?}"));
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "unterminated [IPv6] address".to_string())?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(p)?,
            None if after.is_empty() => NBD_DEFAULT_PORT,
            None => return Err(format!("unexpected {after:?} after IPv6 address")),
        };
        return Ok((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Ok((host.to_string(), parse_port(port)?)),
        None => Ok((authority.to_string(), NBD_DEFAULT_PORT)),
    }
}

/// Opens the LUN named by `spec`.
pub fn open(spec: &str, options: &OpenOptions) -> Result<Arc<dyn Lun>> {
    let (target, export) = match LunSpec::parse(spec)? {
        LunSpec::Path(path) => {
            if let (Some(size), false) = (options.create_size, path.exists()) {
                match FileLun::create_with(&path, size, options) {
                    // Someone else created it in the meantime: open theirs.
                    Err(_) if path.exists() => {}
                    created => return Ok(Arc::new(created?)),
                }
            }
            return Ok(Arc::new(FileLun::open_with(&path, options)?));
        }
        LunSpec::NbdTcp { host, port, export } => (NbdTarget::Tcp { host, port }, export),
        LunSpec::NbdUnix { socket, export } => (NbdTarget::Unix(socket), export),
    };
    let options = NbdOptions {
        read_only: options.read_only,
        ..NbdOptions::default()
    };
    Ok(Arc::new(NbdLun::connect(target, &export, options)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_urls() {
        assert_eq!(
            LunSpec::parse("/srv/ds.vmfs").unwrap(),
            LunSpec::Path("/srv/ds.vmfs".into())
        );
        assert_eq!(
            LunSpec::parse("nbd://10.0.0.2/ds1").unwrap(),
            LunSpec::NbdTcp {
                host: "10.0.0.2".into(),
                port: NBD_DEFAULT_PORT,
                export: "ds1".into()
            }
        );
        assert_eq!(
            LunSpec::parse("nbd://[::1]:10900").unwrap(),
            LunSpec::NbdTcp {
                host: "::1".into(),
                port: 10900,
                export: String::new()
            }
        );
        assert_eq!(
            LunSpec::parse("nbd+unix:///disk?socket=/run/n.sock").unwrap(),
            LunSpec::NbdUnix {
                socket: "/run/n.sock".into(),
                export: "disk".into()
            }
        );
        assert!(LunSpec::parse("nbd://host:99999/x").is_err());
        assert!(LunSpec::parse("iscsi://x").is_err());
        assert!(LunSpec::parse("nbd+unix:///disk").is_err());
    }
}
