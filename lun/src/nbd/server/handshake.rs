//! Server side of the fixed newstyle handshake: option haggling until the client picks the
//! export with NBD_OPT_GO or NBD_OPT_EXPORT_NAME, aborts, or breaks the protocol.

use std::io::{self, Read, Write};

use super::Export;
use crate::nbd::proto::*;
use crate::nbd::transport::Stream;

/// Options a client may send before we decide it is wasting our time.
const MAX_OPTIONS: usize = 64;

/// Option data we read; a name is at most 4096 bytes, so anything larger is hostile.
const MAX_OPTION_DATA: u32 = 16 * 1024;

/// How the handshake ended.
pub(super) enum Outcome {
    /// Enter transmission.
    Transmission { structured_replies: bool },
    /// The connection is over; the string says why, for the log.
    Closed(String),
}

pub(super) fn negotiate(export: &Export, stream: &mut Stream) -> io::Result<Outcome> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting)?;

    let mut raw = [0u8; 4];
    stream.read_exact(&mut raw)?;
    let client_flags = u32::from_be_bytes(raw);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        // The protocol requires dropping a client that sets flags we did not offer.
        return Ok(Outcome::Closed(format!(
            "client sent unknown handshake flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut haggle = Haggle {
        export,
        stream,
        structured_replies: false,
    };
    for _ in 0..MAX_OPTIONS {
        if let Some(outcome) = haggle.option(no_zeroes)? {
            return Ok(outcome);
        }
    }
    Ok(Outcome::Closed(format!(
        "client sent more than {MAX_OPTIONS} options without choosing an export"
    )))
}

struct Haggle<'a> {
    export: &'a Export,
    stream: &'a mut Stream,
    structured_replies: bool,
}

impl Haggle<'_> {
    /// Handles one option; `Some` when the handshake is over.
    fn option(&mut self, no_zeroes: bool) -> io::Result<Option<Outcome>> {
        let mut header = [0u8; 16];
        self.stream.read_exact(&mut header)?;
        if be64(&header) != IHAVEOPT {
            return Ok(Some(Outcome::Closed(format!(
                "bad option magic {:02x?}",
                &header[..8]
            ))));
        }
        let option = be32(&header[8..]);
        let len = be32(&header[12..]);
        if len > MAX_OPTION_DATA {
            return Ok(Some(Outcome::Closed(format!(
                "{} carries {len} bytes of data",
                option_name(option)
            ))));
        }
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data)?;

        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                if !self.export.answers_to(&name) {
                    // This option cannot fail politely: the protocol says hang up.
                    return Ok(Some(Outcome::Closed(format!(
                        "client asked for unknown export {name:?}"
                    ))));
                }
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&self.export.lun.size().to_be_bytes());
                reply.extend_from_slice(
                    &self
                        .export
                        .transmission_flags(self.structured_replies)
                        .to_be_bytes(),
                );
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                self.stream.write_all(&reply)?;
                return Ok(Some(self.transmission()));
            }
            OPT_ABORT => {
                // Best effort: the client may already have gone.
                let _ = self.reply(option, REP_ACK, &[]);
                return Ok(Some(Outcome::Closed("client aborted the handshake".into())));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                } else {
                    let name = self.export.name.as_bytes();
                    let mut entry = Vec::with_capacity(4 + name.len());
                    entry.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    entry.extend_from_slice(name);
                    self.reply(option, REP_SERVER, &entry)?;
                    self.reply(option, REP_ACK, &[])?;
                }
            }
            OPT_STARTTLS => {
                self.error(option, REP_ERR_UNSUP, "TLS is not supported by this server")?;
            }
            OPT_INFO | OPT_GO => {
                if self.info(option, &data)? && option == OPT_GO {
                    return Ok(Some(self.transmission()));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured_replies = true;
                    self.reply(option, REP_ACK, &[])?;
                } else {
                    self.error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if self.structured_replies {
                    // No metadata contexts (block status) are offered: an empty list.
                    self.reply(option, REP_ACK, &[])?;
                } else {
                    self.error(
                        option,
                        REP_ERR_INVALID,
                        "metadata contexts need structured replies first",
                    )?;
                }
            }
            _ => {
                self.error(option, REP_ERR_UNSUP, "option not supported")?;
            }
        }
        Ok(None)
    }

    fn transmission(&self) -> Outcome {
        Outcome::Transmission {
            structured_replies: self.structured_replies,
        }
    }

    /// NBD_OPT_INFO / NBD_OPT_GO; true when the export was described successfully.
    fn info(&mut self, option: u32, data: &[u8]) -> io::Result<bool> {
        let Some((name, requests)) = parse_info_request(data) else {
            self.error(
                option,
                REP_ERR_INVALID,
                "malformed export information request",
            )?;
            return Ok(false);
        };
        if !self.export.answers_to(&name) {
            let message = format!("no export named {name:?} here");
            self.error(option, REP_ERR_UNKNOWN, &message)?;
            return Ok(false);
        }
        let export = self.export;
        let mut item = Vec::with_capacity(16);
        item.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        item.extend_from_slice(&export.lun.size().to_be_bytes());
        item.extend_from_slice(
            &export
                .transmission_flags(self.structured_replies)
                .to_be_bytes(),
        );
        self.reply(option, REP_INFO, &item)?;

        for request in requests {
            let text = match request {
                INFO_NAME => &export.name,
                INFO_DESCRIPTION => &export.description,
                _ => continue,
            };
            let mut item = Vec::with_capacity(2 + text.len());
            item.extend_from_slice(&request.to_be_bytes());
            item.extend_from_slice(text.as_bytes());
            self.reply(option, REP_INFO, &item)?;
        }

        // Sent whether or not it was asked for, as the protocol permits: well-behaved
        // clients then align and size their requests for us.
        let mut item = Vec::with_capacity(14);
        item.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        item.extend_from_slice(&export.lun.sector_size().to_be_bytes());
        item.extend_from_slice(&export.preferred_block_size().to_be_bytes());
        item.extend_from_slice(&export.max_payload.to_be_bytes());
        self.reply(option, REP_INFO, &item)?;
        self.reply(option, REP_ACK, &[])?;
        Ok(true)
    }

    fn error(&mut self, option: u32, kind: u32, message: &str) -> io::Result<()> {
        tracing::debug!(export = %self.export.name, option = %option_name(option),
            reply = %option_reply_name(kind), message, "refusing option");
        self.reply(option, kind, message.as_bytes())
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        let mut message = Vec::with_capacity(20 + data.len());
        message.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        message.extend_from_slice(&option.to_be_bytes());
        message.extend_from_slice(&kind.to_be_bytes());
        message.extend_from_slice(&(data.len() as u32).to_be_bytes());
        message.extend_from_slice(data);
        self.stream.write_all(&message)
    }
}

/// Splits NBD_OPT_INFO/GO data into the export name and the information items asked for.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = usize::try_from(be32(data.get(..4)?)).ok()?;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = usize::from(be16(rest.get(..2)?));
    let items = rest.get(2..)?;
    if items.len() != count * 2 || name_len > MAX_STRING {
        return None;
    }
    let requests = items.chunks_exact(2).map(be16).collect();
    Some((String::from_utf8(name.to_vec()).ok()?, requests))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_requests_parse_and_malformed_ones_are_refused() {
        let mut data = Vec::new();
        data.extend_from_slice(&4u32.to_be_bytes());
        data.extend_from_slice(b"disk");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&data),
            Some(("disk".to_string(), vec![INFO_BLOCK_SIZE, INFO_NAME]))
        );
        // Count disagrees with the data.
        let mut short = data.clone();
        short.pop();
        assert_eq!(parse_info_request(&short), None);
        // Name length runs past the end.
        let mut long = data.clone();
        long[..4].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(parse_info_request(&long), None);
        assert_eq!(parse_info_request(&[0xff; 3]), None);
        let mut huge = data;
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_info_request(&huge), None);
    }
}
