//! The CLI's side of the agent's API: one request per connection over the Unix socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::{Error, Result};

/// Sends `method path` to the agent at `socket`; returns the status and the JSON body.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, serde_json::Value)> {
    let what = || format!("host agent at {}", socket.display());
    let mut stream = UnixStream::connect(socket).map_err(crate::io(what()))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(crate::io(what()))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(crate::io(what()))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(crate::io(what()))?;
    parse_answer(&raw, &what())
}

/// The status and JSON body of a whole answer; `what` names the agent in errors.
pub fn parse_answer(raw: &[u8], what: &str) -> Result<(u16, serde_json::Value)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::Api(format!("{what}: an answer without headers")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| Error::Api(format!("{what}: no status in {head:?}")))?;
    let value = if body.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body)
            .map_err(|e| Error::Api(format!("{what}: answer is not JSON: {e}")))?
    };
    Ok((status, value))
}

/// The API path that runs `action` (`start`, `stop`) on the VM at `folder` of `datastore`
/// (a UUID or the path the agent was given).
pub fn vm_path(folder: &str, action: &str, datastore: &str) -> String {
    let datastore =
        percent_encoding::utf8_percent_encode(datastore, percent_encoding::NON_ALPHANUMERIC);
    format!("/vms{folder}/{action}?datastore={datastore}")
}
