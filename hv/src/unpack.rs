//! Unpacking a bzImage's compressed kernel on the host.
//!
//! A bzImage carries the kernel (an ELF, "vmlinux") compressed, behind a decompressor that runs
//! in the guest before anything else. Where guest kernel code is emulated (PVM) that
//! decompressor alone takes minutes; the host does the same work in a fraction of a second.
//! The unpacked ELF is then started through the same Linux 64-bit boot protocol, with the
//! bzImage's own setup header in the zero page, at its link-time physical address (what the
//! decompressor does when it does not randomise the physical load address).

use std::io::Read;

/// Why a payload could not be unpacked; the caller can still boot the bzImage as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UnpackError {
    /// A compression we do not unpack (bzip2, lzma, xz, lzo): the guest must decompress.
    Unsupported(&'static str),
    Corrupt(String),
}

impl std::fmt::Display for UnpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnpackError::Unsupported(format) => write!(f, "{format} payloads are not unpacked"),
            UnpackError::Corrupt(reason) => f.write_str(reason),
        }
    }
}

const SETUP_SECTS: usize = 0x1f1;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
/// The kernel's LZ4 "legacy" container: this magic, then (u32 length, LZ4 block) pairs.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// A legacy LZ4 block never holds more than this.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Larger than any kernel; refuses a payload that claims more.
const MAX_KERNEL: usize = 512 << 20;

/// The compressed kernel of `bzimage`, by the setup header's payload fields (protocol 2.08+).
pub(crate) fn payload(bzimage: &[u8]) -> Option<&[u8]> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            bzimage.get(at..at + 4)?.try_into().ok()?,
        ))
    };
    let setup_sects = match *bzimage.get(SETUP_SECTS)? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(PAYLOAD_OFFSET)? as usize;
    let len = u32_at(PAYLOAD_LENGTH)? as usize;
    bzimage.get(start..start.checked_add(len)?)
}

/// Decompresses a bzImage payload into the kernel ELF.
pub(crate) fn unpack(payload: &[u8]) -> Result<Vec<u8>, UnpackError> {
    let corrupt = |format: &str, e: &dyn std::fmt::Display| {
        UnpackError::Corrupt(format!("{format} payload: {e}"))
    };
    // The build appends the decompressed size, little endian, after every format's stream.
    let expected = payload
        .len()
        .checked_sub(4)
        .map(|at| {
            u32::from_le_bytes([
                payload[at],
                payload[at + 1],
                payload[at + 2],
                payload[at + 3],
            ]) as usize
        })
        .filter(|&n| n > 0 && n <= MAX_KERNEL)
        .ok_or_else(|| {
            UnpackError::Corrupt("payload without a plausible size trailer".to_string())
        })?;
    let kernel = match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => {
            unpack_lz4_legacy(payload, expected).map_err(|e| corrupt("LZ4", &e))?
        }
        [0x28, 0xb5, 0x2f, 0xfd, ..] => {
            let mut out = Vec::with_capacity(expected);
            ruzstd::decoding::StreamingDecoder::new(payload)
                .map_err(|e| corrupt("zstd", &e))?
                .read_to_end(&mut out)
                .map_err(|e| corrupt("zstd", &e))?;
            out
        }
        [0x1f, 0x8b, ..] => {
            let mut out = Vec::with_capacity(expected);
            flate2::read::GzDecoder::new(payload)
                .read_to_end(&mut out)
                .map_err(|e| corrupt("gzip", &e))?;
            out
        }
        [b'B', b'Z', b'h', ..] => return Err(UnpackError::Unsupported("bzip2")),
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => return Err(UnpackError::Unsupported("xz")),
        [0x5d, 0x00, 0x00, ..] => return Err(UnpackError::Unsupported("lzma")),
        [0x89, b'L', b'Z', b'O', ..] => return Err(UnpackError::Unsupported("lzo")),
        _ => return Err(UnpackError::Unsupported("unrecognised")),
    };
    if kernel.len() != expected {
        return Err(UnpackError::Corrupt(format!(
            "payload unpacked to {} bytes, its trailer says {expected}",
            kernel.len()
        )));
    }
    if !kernel.starts_with(b"\x7fELF") {
        return Err(UnpackError::Corrupt(
            "payload is not an ELF kernel".to_string(),
        ));
    }
    Ok(kernel)
}

fn unpack_lz4_legacy(payload: &[u8], expected: usize) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; expected];
    let mut written = 0;
    let mut at = LZ4_LEGACY_MAGIC.len();
    // Blocks follow until the input ends, another stream's magic starts, or what is left is
    // the size trailer.
    while written < expected {
        let Some(header) = payload.get(at..at + 4) else {
            break;
        };
        if header == LZ4_LEGACY_MAGIC {
            at += 4;
            continue;
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let block = payload
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| format!("block at {at} of {len} bytes runs past the payload"))?;
        let room = (expected - written).min(LZ4_LEGACY_BLOCK);
        written += lz4_flex::block::decompress_into(block, &mut out[written..written + room])
            .map_err(|e| format!("block at {at}: {e}"))?;
        at += 4 + len;
    }
    out.truncate(written);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_trailer(mut stream: Vec<u8>, size: usize) -> Vec<u8> {
        stream.extend_from_slice(&(size as u32).to_le_bytes());
        stream
    }

    fn fake_kernel() -> Vec<u8> {
        let mut kernel = b"\x7fELF".to_vec();
        kernel.extend((0..100_000u32).map(|i| (i % 251) as u8));
        kernel
    }

    #[test]
    fn lz4_legacy_blocks_unpack() {
        let kernel = fake_kernel();
        let mut stream = LZ4_LEGACY_MAGIC.to_vec();
        for chunk in kernel.chunks(40_000) {
            let block = lz4_flex::block::compress(chunk);
            stream.extend_from_slice(&(block.len() as u32).to_le_bytes());
            stream.extend_from_slice(&block);
        }
        assert_eq!(unpack(&with_trailer(stream, kernel.len())).unwrap(), kernel);
    }

    #[test]
    fn gzip_unpacks_and_sizes_are_checked() {
        use std::io::Write;
        let kernel = fake_kernel();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&kernel).unwrap();
        let stream = encoder.finish().unwrap();
        assert_eq!(
            unpack(&with_trailer(stream.clone(), kernel.len())).unwrap(),
            kernel
        );
        assert!(matches!(
            unpack(&with_trailer(stream, kernel.len() + 1)),
            Err(UnpackError::Corrupt(_))
        ));
    }

    #[test]
    fn other_formats_are_left_to_the_guest() {
        let xz = with_trailer(vec![0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2], 100);
        assert_eq!(unpack(&xz), Err(UnpackError::Unsupported("xz")));
        assert!(matches!(unpack(&[1, 2]), Err(UnpackError::Corrupt(_))));
    }

    #[test]
    fn payload_is_found_from_the_setup_header() {
        let mut image = vec![0u8; 3 * 512 + 64];
        image[SETUP_SECTS] = 2;
        image[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&16u32.to_le_bytes());
        image[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&8u32.to_le_bytes());
        image[3 * 512 + 16..3 * 512 + 24].copy_from_slice(b"payload!");
        assert_eq!(payload(&image), Some(&b"payload!"[..]));
        image[PAYLOAD_LENGTH] = 200;
        assert_eq!(payload(&image), None);
    }
}
