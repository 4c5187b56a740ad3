//! Client side of the fixed newstyle handshake: structured replies when the server offers
//! them, then NBD_OPT_GO asking for block size constraints, falling back to
//! NBD_OPT_EXPORT_NAME for servers that predate NBD_OPT_GO.

use std::io::{self, Read, Write};
use std::time::Duration;

use crate::nbd::proto::*;
use crate::nbd::transport::Stream;
use crate::{LunError, Result};

/// What the server told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    pub structured_replies: bool,
    /// Block size constraints; `None` when the server sent none.
    pub block_sizes: Option<BlockSizes>,
}

/// NBD_INFO_BLOCK_SIZE: minimum, preferred and maximum request sizes in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// Largest option reply we accept; real ones are a few dozen bytes.
const MAX_OPTION_REPLY: u32 = 64 * 1024;

pub(super) struct Handshake<'a> {
    pub stream: &'a mut Stream,
    /// LUN name for errors.
    pub lun: &'a str,
    pub export: &'a str,
    pub timeout: Duration,
}

struct OptionReply {
    kind: u32,
    data: Vec<u8>,
}

impl Handshake<'_> {
    pub fn run(mut self, want_structured: bool) -> Result<Negotiated> {
        let greeting = self.read_u64()?;
        if greeting != NBDMAGIC {
            return Err(self.protocol(format!(
                "not an NBD server: greeting {:02x?} is not NBDMAGIC",
                greeting.to_be_bytes()
            )));
        }
        match self.read_u64()? {
            IHAVEOPT => {}
            OLDSTYLE_MAGIC => {
                return Err(self.protocol(
                    "server speaks the oldstyle handshake, which cannot select an export or \
                     negotiate options; use a newstyle server"
                        .into(),
                ));
            }
            other => {
                return Err(self.protocol(format!(
                    "unexpected handshake magic {other:#018x} after NBDMAGIC"
                )));
            }
        }
        let server_flags = self.read_u16()?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol(
                "server does not support fixed newstyle negotiation, so it cannot report \
                 errors; refusing to guess"
                    .into(),
            ));
        }
        let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
        let client_flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        self.write_all(&client_flags.to_be_bytes())?;

        let structured_replies = want_structured && self.negotiate_structured_replies()?;
        let chosen = self.go().inspect_err(|_| {
            // A refused export ends the session the polite way; the server may already
            // have hung up, which is fine too.
            let _ = self.send_option(OPT_ABORT, &[]);
        });
        match chosen? {
            Some((size, flags, block_sizes)) => Ok(Negotiated {
                size,
                flags,
                structured_replies,
                block_sizes,
            }),
            None => {
                let (size, flags) = self.export_name(no_zeroes)?;
                Ok(Negotiated {
                    size,
                    flags,
                    structured_replies,
                    block_sizes: None,
                })
            }
        }
    }

    fn negotiate_structured_replies(&mut self) -> Result<bool> {
        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let reply = self.read_option_reply(OPT_STRUCTURED_REPLY)?;
        match reply.kind {
            REP_ACK => Ok(true),
            kind if kind & REP_FLAG_ERROR != 0 => {
                tracing::debug!(lun = self.lun, reply = %option_reply_name(kind),
                    "server declined structured replies; using simple replies");
                Ok(false)
            }
            kind => Err(self.protocol(format!(
                "unexpected {} to NBD_OPT_STRUCTURED_REPLY",
                option_reply_name(kind)
            ))),
        }
    }

    /// NBD_OPT_GO; `None` when the server does not know the option.
    fn go(&mut self) -> Result<Option<(u64, u16, Option<BlockSizes>)>> {
        let name = self.export.as_bytes();
        let name_len = u32::try_from(name.len())
            .ok()
            .filter(|&n| n as usize <= MAX_STRING)
            .ok_or_else(|| {
                self.refused(format!("export name is longer than {MAX_STRING} bytes"))
            })?;
        let mut data = Vec::with_capacity(name.len() + 8);
        data.extend_from_slice(&name_len.to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &data)?;

        let mut export = None;
        let mut block_sizes = None;
        loop {
            let reply = self.read_option_reply(OPT_GO)?;
            match reply.kind {
                REP_INFO => self.parse_info(&reply.data, &mut export, &mut block_sizes)?,
                REP_ACK => {
                    let (size, flags) = export.ok_or_else(|| {
                        self.protocol(
                            "server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT".into(),
                        )
                    })?;
                    return Ok(Some((size, flags, block_sizes)));
                }
                REP_ERR_UNSUP => return Ok(None),
                kind if kind & REP_FLAG_ERROR != 0 => {
                    return Err(self.go_refused(kind, &reply.data));
                }
                kind => {
                    return Err(self.protocol(format!(
                        "unexpected {} to NBD_OPT_GO",
                        option_reply_name(kind)
                    )));
                }
            }
        }
    }

    fn parse_info(
        &self,
        data: &[u8],
        export: &mut Option<(u64, u16)>,
        block_sizes: &mut Option<BlockSizes>,
    ) -> Result<()> {
        if data.len() < 2 {
            return Err(self.protocol("NBD_REP_INFO shorter than its type field".into()));
        }
        match be16(data) {
            INFO_EXPORT => {
                if data.len() != 12 {
                    return Err(self.protocol(format!(
                        "NBD_INFO_EXPORT of {} bytes, expected 12",
                        data.len()
                    )));
                }
                *export = Some((be64(&data[2..]), be16(&data[10..])));
            }
            INFO_BLOCK_SIZE => {
                if data.len() != 14 {
                    return Err(self.protocol(format!(
                        "NBD_INFO_BLOCK_SIZE of {} bytes, expected 14",
                        data.len()
                    )));
                }
                let sizes = BlockSizes {
                    minimum: be32(&data[2..]),
                    preferred: be32(&data[6..]),
                    maximum: be32(&data[10..]),
                };
                let valid = sizes.minimum.is_power_of_two()
                    && sizes.minimum <= 64 * 1024
                    && sizes.preferred.is_power_of_two()
                    && sizes.preferred >= sizes.minimum
                    && sizes.maximum >= sizes.minimum;
                if !valid {
                    return Err(
                        self.protocol(format!("server sent inconsistent block sizes {sizes:?}"))
                    );
                }
                *block_sizes = Some(sizes);
            }
            // Name, description and future items are informational.
            _ => {}
        }
        Ok(())
    }

    /// NBD_OPT_EXPORT_NAME: the server either enters transmission or hangs up.
    fn export_name(&mut self, no_zeroes: bool) -> Result<(u64, u16)> {
        let name = self.export.as_bytes().to_vec();
        self.send_option(OPT_EXPORT_NAME, &name)?;
        let mut reply = [0u8; 10];
        self.read_exact(&mut reply).map_err(|e| match e {
            LunError::Disconnected { .. } => self.refused(format!(
                "server closed the connection when asked for export {:?} (no such export?)",
                self.export
            )),
            other => other,
        })?;
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            self.read_exact(&mut zeroes)?;
        }
        Ok((be64(&reply), be16(&reply[8..])))
    }

    fn go_refused(&self, kind: u32, data: &[u8]) -> LunError {
        let message = String::from_utf8_lossy(data);
        let detail = if message.is_empty() {
            String::new()
        } else {
            format!(": {message}")
        };
        let export = self.export;
        self.refused(match kind {
            REP_ERR_UNKNOWN => format!("export {export:?} does not exist on the server{detail}"),
            REP_ERR_TLS_REQD => {
                format!("server requires TLS, which vapp does not implement{detail}")
            }
            REP_ERR_POLICY => format!("server policy refuses export {export:?}{detail}"),
            REP_ERR_SHUTDOWN => format!("server is shutting down{detail}"),
            REP_ERR_BLOCK_SIZE_REQD => {
                format!("server demands block size negotiation{detail}")
            }
            kind => format!(
                "server refused export {export:?} with {}{detail}",
                option_reply_name(kind)
            ),
        })
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let len =
            u32::try_from(data.len()).map_err(|_| self.protocol("option data too long".into()))?;
        let mut message = Vec::with_capacity(16 + data.len());
        message.extend_from_slice(&IHAVEOPT.to_be_bytes());
        message.extend_from_slice(&option.to_be_bytes());
        message.extend_from_slice(&len.to_be_bytes());
        message.extend_from_slice(data);
        self.write_all(&message)
    }

    fn read_option_reply(&mut self, option: u32) -> Result<OptionReply> {
        let mut header = [0u8; 20];
        self.read_exact(&mut header)?;
        if be64(&header) != OPTION_REPLY_MAGIC {
            return Err(self.protocol(format!("bad option reply magic {:#018x}", be64(&header))));
        }
        let replied_to = be32(&header[8..]);
        if replied_to != option {
            return Err(self.protocol(format!(
                "server answered {} while we asked {}",
                option_name(replied_to),
                option_name(option)
            )));
        }
        let kind = be32(&header[12..]);
        let len = be32(&header[16..]);
        if len > MAX_OPTION_REPLY {
            return Err(self.protocol(format!("option reply of {len} bytes is implausibly large")));
        }
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data)?;
        Ok(OptionReply { kind, data })
    }

    fn read_u16(&mut self) -> Result<u16> {
        let mut raw = [0u8; 2];
        self.read_exact(&mut raw)?;
        Ok(u16::from_be_bytes(raw))
    }

    fn read_u64(&mut self) -> Result<u64> {
        let mut raw = [0u8; 8];
        self.read_exact(&mut raw)?;
        Ok(u64::from_be_bytes(raw))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.stream.read_exact(buf).map_err(|e| self.io_error(e))
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<()> {
        self.stream.write_all(buf).map_err(|e| self.io_error(e))
    }

    fn io_error(&self, e: io::Error) -> LunError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => LunError::Timeout {
                lun: self.lun.to_string(),
                op: "NBD handshake",
                seconds: self.timeout.as_secs_f64(),
            },
            io::ErrorKind::UnexpectedEof => LunError::Disconnected {
                lun: self.lun.to_string(),
                reason: "server closed the connection during the handshake".into(),
            },
            _ => LunError::Disconnected {
                lun: self.lun.to_string(),
                reason: format!("handshake failed: {e}"),
            },
        }
    }

    fn protocol(&self, reason: String) -> LunError {
        LunError::Protocol {
            lun: self.lun.to_string(),
            reason,
        }
    }

    fn refused(&self, reason: String) -> LunError {
        LunError::Open {
            lun: self.lun.to_string(),
            reason,
        }
    }
}
