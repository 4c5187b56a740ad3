//! The wire protocol: every message is one frame (a 24-byte header, then the payload),
//! and every frame carries a crc32c over header and payload. Layout in FORMAT.md.
//!
//! A connection starts with the shared-secret handshake ([`client_handshake`],
//! [`server_handshake`]); nothing else is accepted before it succeeds.

use std::io::{self, Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::handover::{self, HandoverReply, HandoverRequest};
use crate::meta::{Gens, get32, get64, put32};

pub const FRAME_MAGIC: [u8; 4] = *b"VRPL";
pub const PROTOCOL_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 24;
/// Largest payload: a 16 MiB block plus its fixed fields.
pub const MAX_PAYLOAD: u32 = (16 << 20) + 64;
pub const NONCE_LEN: usize = 32;
pub const PROOF_LEN: usize = 32;

const T_HELLO: u16 = 1;
const T_CHALLENGE: u16 = 2;
const T_AUTH: u16 = 3;
const T_AUTH_OK: u16 = 4;
const T_CONNECT: u16 = 10;
const T_STATE: u16 = 11;
const T_WRITE: u16 = 12;
const T_FLUSH: u16 = 13;
const T_RESYNC_BEGIN: u16 = 14;
const T_RESYNC_DATA: u16 = 15;
const T_RESYNC_END: u16 = 16;
const T_BITMAP_REQUEST: u16 = 17;
const T_BITMAP: u16 = 18;
const T_DELTA_BEGIN: u16 = 30;
const T_DELTA_DATA: u16 = 31;
const T_DELTA_END: u16 = 32;
const T_DELTA_COMMIT: u16 = 33;
const T_DELTA_END_GROUP: u16 = 34;
const T_CHECKSUM_REQUEST: u16 = 40;
const T_CHECKSUMS: u16 = 41;
const T_RESYNC_ZERO: u16 = 42;
const T_PING: u16 = 50;
const T_PONG: u16 = 51;
const T_HANDOVER: u16 = 60;
const T_HANDOVER_REPLY: u16 = 61;
const T_OK: u16 = 20;
const T_ERROR: u16 = 21;

/// What one side says about itself when a link comes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SideInfo {
    /// The primary's LUN size, or the replica's.
    pub lun_size: u64,
    pub region_size: u32,
    /// Metadata flags (FORMAT.md): role, inconsistent, resync, fractured.
    pub flags: u32,
    pub gens: Gens,
    /// Regions this side's bitmap holds: on a secondary, what it may have that the
    /// primary does not (writes of its own time as primary, an interrupted resync).
    pub dirty_regions: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello {
        nonce: [u8; NONCE_LEN],
    },
    Challenge {
        nonce: [u8; NONCE_LEN],
        proof: [u8; PROOF_LEN],
    },
    Auth {
        proof: [u8; PROOF_LEN],
    },
    AuthOk,
    /// Primary to secondary: who I am; the answer is [`Message::State`].
    Connect(SideInfo),
    State(SideInfo),
    /// A replicated write: acknowledged once the replica has it.
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// Acknowledged once every write acknowledged before is durable on the replica.
    Flush,
    /// The replica is about to become inconsistent: protect its point in time first.
    ResyncBegin {
        regions: u64,
    },
    ResyncData {
        offset: u64,
        data: Vec<u8>,
    },
    /// The replica now holds the primary's data of generation `gens.current`.
    ResyncEnd {
        gens: Gens,
    },
    /// An asynchronous delta set starts: the replica keeps a gold copy of its point in
    /// time until [`Message::DeltaEnd`] makes the set visible whole.
    DeltaBegin {
        id: u64,
        cut_ms: u64,
    },
    DeltaData {
        offset: u64,
        data: Vec<u8>,
    },
    /// The set is whole. With `group` (a consistency group's member; its own type on
    /// the wire) the secondary keeps the gold copy until [`Message::DeltaCommit`].
    DeltaEnd {
        id: u64,
        gens: Gens,
        group: bool,
    },
    /// A consistency group's set `id` has ended on every member: the secondary makes it
    /// visible on all of them at once (sent to each member; the first one commits).
    DeltaCommit {
        id: u64,
    },
    /// Asks for the crc32c of `count` whole regions from `first`; the answer is
    /// [`Message::Checksums`].
    ChecksumRequest {
        first: u64,
        count: u32,
    },
    Checksums {
        crcs: Vec<u32>,
    },
    /// A resync region that reads as zeroes: the replica zeroes (or deallocates) it.
    ResyncZero {
        offset: u64,
        len: u64,
    },
    /// Asks the secondary for its dirty bitmap; the answer is [`Message::Bitmap`].
    BitmapRequest,
    Bitmap {
        words: Vec<u64>,
    },
    /// Keepalive: sent by the primary when it has sent nothing for a while, answered
    /// at once with [`Message::Pong`], so an idle link is seen alive at both ends.
    Ping,
    Pong,
    /// The DR side asks the protected side for a planned handover (see
    /// [`crate::handover`]); the answer is [`Message::HandoverReply`].
    Handover(HandoverRequest),
    HandoverReply(HandoverReply),
    Ok,
    Error {
        reason: String,
    },
}

impl Message {
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Challenge { .. } => "challenge",
            Message::Auth { .. } => "auth",
            Message::AuthOk => "auth-ok",
            Message::Connect(_) => "connect",
            Message::State(_) => "state",
            Message::Write { .. } => "write",
            Message::Flush => "flush",
            Message::ResyncBegin { .. } => "resync-begin",
            Message::ResyncData { .. } => "resync-data",
            Message::ResyncEnd { .. } => "resync-end",
            Message::DeltaBegin { .. } => "delta-begin",
            Message::DeltaData { .. } => "delta-data",
            Message::DeltaEnd { .. } => "delta-end",
            Message::DeltaCommit { .. } => "delta-commit",
            Message::ChecksumRequest { .. } => "checksum-request",
            Message::Checksums { .. } => "checksums",
            Message::ResyncZero { .. } => "resync-zero",
            Message::BitmapRequest => "bitmap-request",
            Message::Bitmap { .. } => "bitmap",
            Message::Ping => "ping",
            Message::Pong => "pong",
            Message::Handover(_) => "handover",
            Message::HandoverReply(_) => "handover-reply",
            Message::Ok => "ok",
            Message::Error { .. } => "error",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("peer speaks protocol version {0}, this vapp speaks {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("frame checksum mismatch (type {0})")]
    Checksum(u16),
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u32),
    #[error("unknown message type {0}")]
    UnknownType(u16),
    #[error("malformed {kind} message: {reason}")]
    Malformed { kind: &'static str, reason: String },
}

fn put_gens(b: &mut Vec<u8>, g: &Gens) {
    for v in [g.current, g.bitmap, g.history[0], g.history[1]] {
        b.extend_from_slice(&v.to_le_bytes());
    }
}

fn get_gens(b: &[u8], at: usize) -> Gens {
    Gens {
        current: get64(b, at),
        bitmap: get64(b, at + 8),
        history: [get64(b, at + 16), get64(b, at + 24)],
    }
}

fn put_side(b: &mut Vec<u8>, s: &SideInfo) {
    b.extend_from_slice(&s.lun_size.to_le_bytes());
    b.extend_from_slice(&s.region_size.to_le_bytes());
    b.extend_from_slice(&s.flags.to_le_bytes());
    put_gens(b, &s.gens);
    b.extend_from_slice(&s.dirty_regions.to_le_bytes());
}

const SIDE_LEN: usize = 56;

fn get_side(b: &[u8]) -> SideInfo {
    SideInfo {
        lun_size: get64(b, 0),
        region_size: get32(b, 8),
        flags: get32(b, 12),
        gens: get_gens(b, 16),
        dirty_regions: get64(b, 48),
    }
}

/// One frame: header then payload, the crc32c covering both (with the crc field zero).
pub fn encode(seq: u64, msg: &Message) -> Vec<u8> {
    // The payload goes straight after room for the header: one copy of the data.
    let mut p = vec![0u8; HEADER_LEN];
    let ty = match msg {
        Message::Hello { nonce } => {
            p.extend_from_slice(nonce);
            T_HELLO
        }
        Message::Challenge { nonce, proof } => {
            p.extend_from_slice(nonce);
            p.extend_from_slice(proof);
            T_CHALLENGE
        }
        Message::Auth { proof } => {
            p.extend_from_slice(proof);
            T_AUTH
        }
        Message::AuthOk => T_AUTH_OK,
        Message::Connect(s) => {
            put_side(&mut p, s);
            T_CONNECT
        }
        Message::State(s) => {
            put_side(&mut p, s);
            T_STATE
        }
        Message::Write { offset, data } => {
            p.extend_from_slice(&offset.to_le_bytes());
            p.extend_from_slice(data);
            T_WRITE
        }
        Message::Flush => T_FLUSH,
        Message::ResyncBegin { regions } => {
            p.extend_from_slice(&regions.to_le_bytes());
            T_RESYNC_BEGIN
        }
        Message::ResyncData { offset, data } => {
            p.extend_from_slice(&offset.to_le_bytes());
            p.extend_from_slice(data);
            T_RESYNC_DATA
        }
        Message::ResyncEnd { gens } => {
            put_gens(&mut p, gens);
            T_RESYNC_END
        }
        Message::DeltaBegin { id, cut_ms } => {
            p.extend_from_slice(&id.to_le_bytes());
            p.extend_from_slice(&cut_ms.to_le_bytes());
            T_DELTA_BEGIN
        }
        Message::DeltaData { offset, data } => {
            p.extend_from_slice(&offset.to_le_bytes());
            p.extend_from_slice(data);
            T_DELTA_DATA
        }
        Message::DeltaEnd { id, gens, group } => {
            p.extend_from_slice(&id.to_le_bytes());
            put_gens(&mut p, gens);
            if *group {
                T_DELTA_END_GROUP
            } else {
                T_DELTA_END
            }
        }
        Message::DeltaCommit { id } => {
            p.extend_from_slice(&id.to_le_bytes());
            T_DELTA_COMMIT
        }
        Message::ChecksumRequest { first, count } => {
            p.extend_from_slice(&first.to_le_bytes());
            p.extend_from_slice(&count.to_le_bytes());
            T_CHECKSUM_REQUEST
        }
        Message::Checksums { crcs } => {
            for c in crcs {
                p.extend_from_slice(&c.to_le_bytes());
            }
            T_CHECKSUMS
        }
        Message::ResyncZero { offset, len } => {
            p.extend_from_slice(&offset.to_le_bytes());
            p.extend_from_slice(&len.to_le_bytes());
            T_RESYNC_ZERO
        }
        Message::BitmapRequest => T_BITMAP_REQUEST,
        Message::Bitmap { words } => {
            for w in words {
                p.extend_from_slice(&w.to_le_bytes());
            }
            T_BITMAP
        }
        Message::Ping => T_PING,
        Message::Pong => T_PONG,
        Message::Handover(r) => {
            handover::encode_request(&mut p, r);
            T_HANDOVER
        }
        Message::HandoverReply(r) => {
            handover::encode_reply(&mut p, r);
            T_HANDOVER_REPLY
        }
        Message::Ok => T_OK,
        Message::Error { reason } => {
            p.extend_from_slice(reason.as_bytes());
            T_ERROR
        }
    };
    seal(&mut p, ty, seq);
    p
}

/// Fills in the header of a frame whose payload follows `HEADER_LEN` zero bytes.
fn seal(p: &mut [u8], ty: u16, seq: u64) {
    let len = (p.len() - HEADER_LEN) as u32;
    p[0..4].copy_from_slice(&FRAME_MAGIC);
    p[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    p[6..8].copy_from_slice(&ty.to_le_bytes());
    p[8..16].copy_from_slice(&seq.to_le_bytes());
    put32(p, 16, len);
    let crc = crc32c::crc32c(p);
    put32(p, 20, crc);
}

/// Reads one frame, checking magic, version, length and checksum before decoding.
pub fn read_frame(r: &mut impl Read) -> Result<(u64, Message), WireError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)?;
    let magic: [u8; 4] = [h[0], h[1], h[2], h[3]];
    if magic != FRAME_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != PROTOCOL_VERSION {
        return Err(WireError::Version(version));
    }
    let ty = u16::from_le_bytes([h[6], h[7]]);
    let seq = get64(&h, 8);
    let len = get32(&h, 16);
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLarge(len));
    }
    let want = get32(&h, 20);
    h[20..24].fill(0);
    if matches!(ty, T_WRITE | T_RESYNC_DATA | T_DELTA_DATA) && len >= 8 {
        // The data is read straight into its own buffer: no copy to strip the offset.
        let mut at = [0u8; 8];
        r.read_exact(&mut at)?;
        let mut data = vec![0u8; len as usize - 8];
        r.read_exact(&mut data)?;
        let crc = crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&h), &at), &data);
        if crc != want {
            return Err(WireError::Checksum(ty));
        }
        let offset = u64::from_le_bytes(at);
        return Ok((
            seq,
            match ty {
                T_WRITE => Message::Write { offset, data },
                T_RESYNC_DATA => Message::ResyncData { offset, data },
                _ => Message::DeltaData { offset, data },
            },
        ));
    }
    let mut p = vec![0u8; len as usize];
    r.read_exact(&mut p)?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h), &p);
    if crc != want {
        return Err(WireError::Checksum(ty));
    }
    Ok((seq, decode_payload(ty, p)?))
}

/// The header and offset of a write frame whose data follows separately (sent with a
/// vectored write, so the data is never copied into a frame).
pub fn write_header(seq: u64, offset: u64, data: &[u8]) -> [u8; HEADER_LEN + 8] {
    let mut p = [0u8; HEADER_LEN + 8];
    p[0..4].copy_from_slice(&FRAME_MAGIC);
    p[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    p[6..8].copy_from_slice(&T_WRITE.to_le_bytes());
    p[8..16].copy_from_slice(&seq.to_le_bytes());
    put32(&mut p, 16, (8 + data.len()) as u32);
    p[HEADER_LEN..].copy_from_slice(&offset.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&p), data);
    put32(&mut p, 20, crc);
    p
}

fn decode_payload(ty: u16, mut p: Vec<u8>) -> Result<Message, WireError> {
    let need = |kind: &'static str, p: &[u8], n: usize, exact: bool| {
        if p.len() < n || (exact && p.len() != n) {
            Err(WireError::Malformed {
                kind,
                reason: format!("{} bytes of payload, {n} expected", p.len()),
            })
        } else {
            Ok(())
        }
    };
    let arr32 = |b: &[u8]| -> [u8; 32] {
        let mut a = [0u8; 32];
        a.copy_from_slice(&b[..32]);
        a
    };
    Ok(match ty {
        T_HELLO => {
            need("hello", &p, NONCE_LEN, true)?;
            Message::Hello { nonce: arr32(&p) }
        }
        T_CHALLENGE => {
            need("challenge", &p, NONCE_LEN + PROOF_LEN, true)?;
            Message::Challenge {
                nonce: arr32(&p),
                proof: arr32(&p[NONCE_LEN..]),
            }
        }
        T_AUTH => {
            need("auth", &p, PROOF_LEN, true)?;
            Message::Auth { proof: arr32(&p) }
        }
        T_AUTH_OK => {
            need("auth-ok", &p, 0, true)?;
            Message::AuthOk
        }
        T_CONNECT => {
            need("connect", &p, SIDE_LEN, true)?;
            Message::Connect(get_side(&p))
        }
        T_STATE => {
            need("state", &p, SIDE_LEN, true)?;
            Message::State(get_side(&p))
        }
        T_WRITE | T_RESYNC_DATA => {
            let kind = if ty == T_WRITE {
                "write"
            } else {
                "resync-data"
            };
            need(kind, &p, 8, false)?;
            let offset = get64(&p, 0);
            p.drain(..8);
            let data = p;
            if ty == T_WRITE {
                Message::Write { offset, data }
            } else {
                Message::ResyncData { offset, data }
            }
        }
        T_FLUSH => {
            need("flush", &p, 0, true)?;
            Message::Flush
        }
        T_RESYNC_BEGIN => {
            need("resync-begin", &p, 8, true)?;
            Message::ResyncBegin {
                regions: get64(&p, 0),
            }
        }
        T_RESYNC_END => {
            need("resync-end", &p, 32, true)?;
            Message::ResyncEnd {
                gens: get_gens(&p, 0),
            }
        }
        T_DELTA_BEGIN => {
            need("delta-begin", &p, 16, true)?;
            Message::DeltaBegin {
                id: get64(&p, 0),
                cut_ms: get64(&p, 8),
            }
        }
        T_DELTA_DATA => {
            need("delta-data", &p, 8, false)?;
            let offset = get64(&p, 0);
            p.drain(..8);
            Message::DeltaData { offset, data: p }
        }
        T_DELTA_END | T_DELTA_END_GROUP => {
            need("delta-end", &p, 40, true)?;
            Message::DeltaEnd {
                id: get64(&p, 0),
                gens: get_gens(&p, 8),
                group: ty == T_DELTA_END_GROUP,
            }
        }
        T_DELTA_COMMIT => {
            need("delta-commit", &p, 8, true)?;
            Message::DeltaCommit { id: get64(&p, 0) }
        }
        T_CHECKSUM_REQUEST => {
            need("checksum-request", &p, 12, true)?;
            Message::ChecksumRequest {
                first: get64(&p, 0),
                count: get32(&p, 8),
            }
        }
        T_CHECKSUMS => {
            if p.len() % 4 != 0 {
                return Err(WireError::Malformed {
                    kind: "checksums",
                    reason: format!("{} bytes is not a whole number of checksums", p.len()),
                });
            }
            Message::Checksums {
                crcs: p.chunks_exact(4).map(|c| get32(c, 0)).collect(),
            }
        }
        T_RESYNC_ZERO => {
            need("resync-zero", &p, 16, true)?;
            Message::ResyncZero {
                offset: get64(&p, 0),
                len: get64(&p, 8),
            }
        }
        T_BITMAP_REQUEST => {
            need("bitmap-request", &p, 0, true)?;
            Message::BitmapRequest
        }
        T_BITMAP => {
            if p.len() % 8 != 0 {
                return Err(WireError::Malformed {
                    kind: "bitmap",
                    reason: format!("{} bytes is not a whole number of words", p.len()),
                });
            }
            Message::Bitmap {
                words: p.chunks_exact(8).map(|w| get64(w, 0)).collect(),
            }
        }
        T_PING => {
            need("ping", &p, 0, true)?;
            Message::Ping
        }
        T_PONG => {
            need("pong", &p, 0, true)?;
            Message::Pong
        }
        T_HANDOVER => Message::Handover(handover::decode_request(&p)?),
        T_HANDOVER_REPLY => Message::HandoverReply(handover::decode_reply(&p)?),
        T_OK => {
            need("ok", &p, 0, true)?;
            Message::Ok
        }
        T_ERROR => Message::Error {
            reason: String::from_utf8_lossy(&p).into_owned(),
        },
        other => return Err(WireError::UnknownType(other)),
    })
}

type HmacSha256 = Hmac<Sha256>;

fn proof(secret: &[u8], label: &[u8], a: &[u8], b: &[u8]) -> [u8; PROOF_LEN] {
    // HMAC accepts a key of any length, so this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return [0; PROOF_LEN],
    };
    mac.update(label);
    mac.update(a);
    mac.update(b);
    mac.finalize().into_bytes().into()
}

fn verify(secret: &[u8], label: &[u8], a: &[u8], b: &[u8], got: &[u8]) -> bool {
    match HmacSha256::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(label);
            mac.update(a);
            mac.update(b);
            // verify_slice compares in constant time.
            mac.verify_slice(got).is_ok()
        }
        Err(_) => false,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("{0}")]
    Refused(String),
}

fn nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

/// The connecting side: sends a challenge, checks the server's proof of the secret, then
/// proves its own. Each proof covers both nonces, so neither can be replayed.
pub fn client_handshake(s: &mut (impl Read + Write), secret: &[u8]) -> Result<(), AuthError> {
    let mine = nonce();
    s.write_all(&encode(0, &Message::Hello { nonce: mine }))
        .map_err(WireError::Io)?;
    let (_, m) = read_frame(s)?;
    let (theirs, server_proof) = match m {
        Message::Challenge { nonce, proof } => (nonce, proof),
        Message::Error { reason } => return Err(AuthError::Refused(reason)),
        other => {
            return Err(AuthError::Refused(format!(
                "expected a challenge, got {}",
                other.kind()
            )));
        }
    };
    if !verify(secret, b"vapp-repl server", &mine, &theirs, &server_proof) {
        return Err(AuthError::Refused(
            "the server does not know the shared secret".into(),
        ));
    }
    let p = proof(secret, b"vapp-repl client", &theirs, &mine);
    s.write_all(&encode(0, &Message::Auth { proof: p }))
        .map_err(WireError::Io)?;
    match read_frame(s)?.1 {
        Message::AuthOk => Ok(()),
        Message::Error { reason } => Err(AuthError::Refused(reason)),
        other => Err(AuthError::Refused(format!(
            "expected auth-ok, got {}",
            other.kind()
        ))),
    }
}

/// The listening side: answers the client's challenge and checks the client's proof.
/// A client that fails gets an error frame and nothing else.
pub fn server_handshake(s: &mut (impl Read + Write), secret: &[u8]) -> Result<(), AuthError> {
    let theirs = match read_frame(s)?.1 {
        Message::Hello { nonce } => nonce,
        other => {
            return Err(AuthError::Refused(format!(
                "expected hello, got {}",
                other.kind()
            )));
        }
    };
    let mine = nonce();
    let p = proof(secret, b"vapp-repl server", &theirs, &mine);
    s.write_all(&encode(
        0,
        &Message::Challenge {
            nonce: mine,
            proof: p,
        },
    ))
    .map_err(WireError::Io)?;
    let got = match read_frame(s)?.1 {
        Message::Auth { proof } => proof,
        other => {
            return Err(AuthError::Refused(format!(
                "expected auth, got {}",
                other.kind()
            )));
        }
    };
    if !verify(secret, b"vapp-repl client", &mine, &theirs, &got) {
        let _ = s.write_all(&encode(
            0,
            &Message::Error {
                reason: "authentication failed".into(),
            },
        ));
        return Err(AuthError::Refused(
            "the client does not know the shared secret".into(),
        ));
    }
    s.write_all(&encode(0, &Message::AuthOk))
        .map_err(WireError::Io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips() {
        let side = SideInfo {
            lun_size: 1 << 20,
            region_size: 65536,
            flags: 1,
            gens: Gens {
                current: 7,
                bitmap: 6,
                history: [5, 4],
            },
            dirty_regions: 9,
        };
        for m in [
            Message::Hello { nonce: [1; 32] },
            Message::Challenge {
                nonce: [2; 32],
                proof: [3; 32],
            },
            Message::Auth { proof: [4; 32] },
            Message::AuthOk,
            Message::Connect(side),
            Message::State(side),
            Message::Write {
                offset: 4096,
                data: vec![9; 512],
            },
            Message::Flush,
            Message::ResyncBegin { regions: 3 },
            Message::ResyncData {
                offset: 0,
                data: vec![8; 4096],
            },
            Message::ResyncEnd { gens: side.gens },
            Message::DeltaBegin { id: 3, cut_ms: 99 },
            Message::DeltaData {
                offset: 512,
                data: vec![1; 512],
            },
            Message::DeltaEnd {
                id: 3,
                gens: side.gens,
                group: false,
            },
            Message::DeltaEnd {
                id: 4,
                gens: side.gens,
                group: true,
            },
            Message::DeltaCommit { id: 3 },
            Message::ChecksumRequest { first: 2, count: 5 },
            Message::Checksums {
                crcs: vec![1, 2, 3],
            },
            Message::ResyncZero {
                offset: 65536,
                len: 65536,
            },
            Message::BitmapRequest,
            Message::Ping,
            Message::Pong,
            Message::Bitmap {
                words: vec![1, u64::MAX, 0],
            },
            Message::Handover(HandoverRequest {
                vms: vec![handover::HandoverVm {
                    datastore: "0b1c".into(),
                    path: "/vms/db".into(),
                }],
                stop_timeout_ms: 30_000,
                force: true,
            }),
            Message::HandoverReply(HandoverReply {
                outcome: handover::HandoverOutcome::Aborted,
                members: vec![handover::HandoverMember {
                    generation: 7,
                    bitmap_generation: 6,
                    dirty_regions: 0,
                }],
                steps: vec![handover::HandoverStep {
                    step: "stop /vms/db".into(),
                    start_ms: 1,
                    end_ms: 20,
                    detail: "shut down é".into(),
                }],
                message: "vm /vms/web would not stop".into(),
            }),
            Message::Ok,
            Message::Error {
                reason: "no".into(),
            },
        ] {
            let f = encode(42, &m);
            let (seq, back) = read_frame(&mut &f[..]).expect("decodes");
            assert_eq!((seq, &back), (42, &m));
        }
    }

    #[test]
    fn a_handover_request_of_a_newer_layout_is_refused_by_name() {
        let mut f = encode(
            1,
            &Message::Handover(HandoverRequest {
                vms: vec![],
                stop_timeout_ms: 1,
                force: false,
            }),
        );
        f[HEADER_LEN] = 2;
        f[20..24].fill(0);
        let crc = crc32c::crc32c(&f);
        put32(&mut f, 20, crc);
        let err = read_frame(&mut &f[..]).unwrap_err().to_string();
        assert!(err.contains("request version 2"), "{err}");
    }

    #[test]
    fn a_write_header_and_its_data_are_the_write_frame() {
        let data = vec![0x3c; 5000];
        let mut frame = write_header(4, 512, &data).to_vec();
        frame.extend_from_slice(&data);
        assert_eq!(
            frame,
            encode(
                4,
                &Message::Write {
                    offset: 512,
                    data: data.clone()
                }
            )
        );
        let (seq, m) = read_frame(&mut &frame[..]).expect("decodes");
        assert_eq!(
            (seq, m),
            (
                4,
                Message::Write {
                    offset: 512,
                    data: data.clone()
                }
            )
        );
        frame[HEADER_LEN + 8 + 100] ^= 1;
        assert!(matches!(
            read_frame(&mut &frame[..]),
            Err(WireError::Checksum(_))
        ));
    }

    #[test]
    fn a_flipped_payload_bit_fails_the_checksum() {
        let mut f = encode(
            1,
            &Message::Write {
                offset: 0,
                data: vec![0; 512],
            },
        );
        f[HEADER_LEN + 100] ^= 1;
        assert!(matches!(
            read_frame(&mut &f[..]),
            Err(WireError::Checksum(_))
        ));
    }
}
