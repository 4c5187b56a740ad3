//! SCSI COMPARE AND WRITE ("ATS") through SG_IO: the device's own atomic test-and-set,
//! which excludes every machine that reaches the device, as VMFS relies on.
//!
//! Command encoding and sense decoding are pure functions so they are tested without a SCSI
//! device; [`sg_io`] is the only code that talks to the kernel.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// COMPARE AND WRITE (16), SBC-3.
pub(crate) const COMPARE_AND_WRITE: u8 = 0x89;
const INQUIRY: u8 = 0x12;
const MAINTENANCE_IN: u8 = 0xA3;
const REPORT_SUPPORTED_OPERATION_CODES: u8 = 0x0C;
/// Block Limits VPD page: byte 5 is MAXIMUM COMPARE AND WRITE LENGTH in logical blocks.
const BLOCK_LIMITS_VPD: u8 = 0xB0;

pub(crate) const SENSE_KEY_MISCOMPARE: u8 = 0x0E;
const ASC_MISCOMPARE_DURING_VERIFY: (u8, u8) = (0x1D, 0x00);
const STATUS_CHECK_CONDITION: u8 = 0x02;

/// The 16-byte CDB comparing then writing `blocks` logical blocks at `lba`. The data-out
/// buffer is the compare data followed by the write data, each `blocks` blocks long.
pub(crate) fn compare_and_write_cdb(lba: u64, blocks: u8) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = COMPARE_AND_WRITE;
    // Byte 1: WRPROTECT 0, DPO 0, FUA 0: the write is as durable as any other until flushed.
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[13] = blocks;
    cdb
}

/// INQUIRY for the Block Limits VPD page.
pub(crate) fn block_limits_cdb(allocation: u16) -> [u8; 6] {
    let [hi, lo] = allocation.to_be_bytes();
    [INQUIRY, 0x01, BLOCK_LIMITS_VPD, hi, lo, 0]
}

/// The device's MAXIMUM COMPARE AND WRITE LENGTH from a Block Limits VPD page (0 means it
/// has no COMPARE AND WRITE), or `None` when the page is not that page or too short.
pub(crate) fn max_compare_and_write_blocks(vpd: &[u8]) -> Option<u8> {
    if vpd.len() < 6 || vpd[1] != BLOCK_LIMITS_VPD {
        return None;
    }
    Some(vpd[5])
}

/// REPORT SUPPORTED OPERATION CODES for one opcode without service action
/// (REPORTING OPTIONS 001b).
pub(crate) fn report_opcode_cdb(opcode: u8, allocation: u32) -> [u8; 12] {
    let mut cdb = [0u8; 12];
    cdb[0] = MAINTENANCE_IN;
    cdb[1] = REPORT_SUPPORTED_OPERATION_CODES;
    cdb[2] = 0x01;
    cdb[3] = opcode;
    cdb[6..10].copy_from_slice(&allocation.to_be_bytes());
    cdb
}

/// Whether a one-command REPORT SUPPORTED OPERATION CODES answer says the opcode is
/// supported (SUPPORT 011b per the standard, 101b vendor-specific); `None` when the device
/// says it cannot tell (000b) or the answer is too short.
pub(crate) fn opcode_supported(answer: &[u8]) -> Option<bool> {
    match answer.get(1)? & 0x07 {
        0b011 | 0b101 => Some(true),
        0b001 => Some(false),
        _ => None,
    }
}

/// Sense key and additional sense code of fixed (0x70/0x71) or descriptor (0x72/0x73)
/// format sense data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    pub fn decode(sense: &[u8]) -> Option<Sense> {
        match sense.first()? & 0x7F {
            0x70 | 0x71 if sense.len() >= 14 => Some(Sense {
                key: sense[2] & 0x0F,
                asc: sense[12],
                ascq: sense[13],
            }),
            0x72 | 0x73 if sense.len() >= 4 => Some(Sense {
                key: sense[1] & 0x0F,
                asc: sense[2],
                ascq: sense[3],
            }),
            _ => None,
        }
    }

    /// The compare half did not match: nothing was written.
    pub fn is_miscompare(&self) -> bool {
        self.key == SENSE_KEY_MISCOMPARE && (self.asc, self.ascq) == ASC_MISCOMPARE_DURING_VERIFY
    }
}

/// What a SCSI command came back with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Good,
    CheckCondition(Sense),
}

/// Judges the status fields of a finished SG_IO: good, a CHECK CONDITION with decodable
/// sense, or an error describing what failed.
pub(crate) fn outcome(
    status: u8,
    host_status: u16,
    driver_status: u16,
    sense: &[u8],
) -> io::Result<Outcome> {
    const DRIVER_SENSE: u16 = 0x08;
    if host_status != 0 {
        return Err(io::Error::other(format!(
            "SCSI transport error (host status {host_status:#x})"
        )));
    }
    let checked = status & 0x7E == STATUS_CHECK_CONDITION || driver_status & DRIVER_SENSE != 0;
    if checked {
        return match Sense::decode(sense) {
            Some(sense) => Ok(Outcome::CheckCondition(sense)),
            None => Err(io::Error::other(
                "CHECK CONDITION without readable sense data",
            )),
        };
    }
    if status != 0 || driver_status & !DRIVER_SENSE != 0 {
        return Err(io::Error::other(format!(
            "SCSI command failed (status {status:#x}, driver status {driver_status:#x})"
        )));
    }
    Ok(Outcome::Good)
}

/// `struct sg_io_hdr` of <scsi/sg.h>.
#[repr(C)]
struct SgIoHdr {
    interface_id: libc::c_int,
    dxfer_direction: libc::c_int,
    cmd_len: libc::c_uchar,
    mx_sb_len: libc::c_uchar,
    iovec_count: libc::c_ushort,
    dxfer_len: libc::c_uint,
    dxferp: *mut libc::c_void,
    cmdp: *const libc::c_uchar,
    sbp: *mut libc::c_uchar,
    timeout: libc::c_uint,
    flags: libc::c_uint,
    pack_id: libc::c_int,
    usr_ptr: *mut libc::c_void,
    status: libc::c_uchar,
    masked_status: libc::c_uchar,
    msg_status: libc::c_uchar,
    sb_len_wr: libc::c_uchar,
    host_status: libc::c_ushort,
    driver_status: libc::c_ushort,
    resid: libc::c_int,
    duration: libc::c_uint,
    info: libc::c_uint,
}

nix::ioctl_readwrite_bad!(sg_io_ioctl, 0x2285, SgIoHdr);

/// Which way data moves for [`sg_io`].
pub(crate) enum Data<'a> {
    ToDevice(&'a [u8]),
    FromDevice(&'a mut [u8]),
}

/// Runs one SCSI command on `device` through SG_IO.
pub(crate) fn sg_io(
    device: &File,
    cdb: &[u8],
    data: Data<'_>,
    timeout_ms: u32,
) -> io::Result<Outcome> {
    const SG_DXFER_TO_DEV: libc::c_int = -2;
    const SG_DXFER_FROM_DEV: libc::c_int = -3;
    let mut sense = [0u8; 64];
    let (direction, ptr, len) = match data {
        Data::ToDevice(buf) => (SG_DXFER_TO_DEV, buf.as_ptr().cast_mut(), buf.len()),
        Data::FromDevice(buf) => (SG_DXFER_FROM_DEV, buf.as_mut_ptr(), buf.len()),
    };
    let mut hdr = SgIoHdr {
        interface_id: libc::c_int::from(b'S'),
        dxfer_direction: direction,
        cmd_len: u8::try_from(cdb.len()).map_err(|_| io::Error::other("CDB too long"))?,
        mx_sb_len: sense.len() as u8,
        iovec_count: 0,
        dxfer_len: u32::try_from(len).map_err(|_| io::Error::other("transfer too long"))?,
        dxferp: ptr.cast(),
        cmdp: cdb.as_ptr(),
        sbp: sense.as_mut_ptr(),
        timeout: timeout_ms,
        flags: 0,
        pack_id: 0,
        usr_ptr: std::ptr::null_mut(),
        status: 0,
        masked_status: 0,
        msg_status: 0,
        sb_len_wr: 0,
        host_status: 0,
        driver_status: 0,
        resid: 0,
        duration: 0,
        info: 0,
    };
    // SAFETY: every pointer in hdr points at memory that outlives the call with the length
    // given beside it; for a to-device transfer the kernel only reads through dxferp.
    unsafe { sg_io_ioctl(device.as_raw_fd(), &mut hdr) }.map_err(io::Error::from)?;
    let written = usize::from(hdr.sb_len_wr).min(sense.len());
    outcome(
        hdr.status,
        hdr.host_status,
        hdr.driver_status,
        &sense[..written],
    )
}

/// The most logical blocks one COMPARE AND WRITE may cover on `device`, or `None` when it
/// has no COMPARE AND WRITE (or is not a SCSI device at all).
pub(crate) fn probe(device: &File) -> Option<u8> {
    let mut vpd = [0u8; 64];
    let by_vpd = match sg_io(
        device,
        &block_limits_cdb(64),
        Data::FromDevice(&mut vpd),
        5000,
    ) {
        Ok(Outcome::Good) => max_compare_and_write_blocks(&vpd),
        _ => None,
    };
    if let Some(blocks) = by_vpd {
        return (blocks > 0).then_some(blocks);
    }
    // No Block Limits page: ask for the opcode itself; one block is always allowed then.
    let mut answer = [0u8; 32];
    let cdb = report_opcode_cdb(COMPARE_AND_WRITE, 32);
    match sg_io(device, &cdb, Data::FromDevice(&mut answer), 5000) {
        Ok(Outcome::Good) if opcode_supported(&answer) == Some(true) => Some(1),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_and_write_cdb_layout() {
        let cdb = compare_and_write_cdb(0x0102_0304_0506_0708, 2);
        assert_eq!(
            cdb,
            [
                0x89, 0, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0, 0, 0, 2, 0, 0
            ]
        );
    }

    #[test]
    fn probe_cdbs() {
        assert_eq!(block_limits_cdb(0x0140), [0x12, 0x01, 0xB0, 0x01, 0x40, 0]);
        assert_eq!(
            report_opcode_cdb(0x89, 0x20),
            [0xA3, 0x0C, 0x01, 0x89, 0, 0, 0, 0, 0, 0x20, 0, 0]
        );
    }

    #[test]
    fn block_limits_page_gives_max_compare_and_write_length() {
        let mut page = [0u8; 64];
        page[1] = 0xB0;
        page[3] = 0x3C;
        page[5] = 1;
        assert_eq!(max_compare_and_write_blocks(&page), Some(1));
        page[5] = 0;
        assert_eq!(max_compare_and_write_blocks(&page), Some(0));
        page[1] = 0x83;
        assert_eq!(max_compare_and_write_blocks(&page), None);
        assert_eq!(max_compare_and_write_blocks(&[0, 0xB0, 0]), None);
    }

    #[test]
    fn report_opcode_support_field() {
        assert_eq!(opcode_supported(&[0, 0b011, 0, 16]), Some(true));
        assert_eq!(opcode_supported(&[0, 0b101, 0, 16]), Some(true));
        assert_eq!(opcode_supported(&[0, 0b001]), Some(false));
        assert_eq!(opcode_supported(&[0, 0b000]), None);
        assert_eq!(opcode_supported(&[0]), None);
    }

    fn fixed_sense(key: u8, asc: u8, ascq: u8) -> Vec<u8> {
        let mut s = vec![0u8; 18];
        s[0] = 0xF0; // current error, VALID bit set (the INFORMATION field holds the offset)
        s[2] = key;
        s[3..7].copy_from_slice(&512u32.to_be_bytes());
        s[7] = 10;
        s[12] = asc;
        s[13] = ascq;
        s
    }

    #[test]
    fn miscompare_sense_is_recognised_in_both_formats() {
        let fixed = Sense::decode(&fixed_sense(0x0E, 0x1D, 0x00)).unwrap();
        assert!(fixed.is_miscompare());
        let descriptor = Sense::decode(&[0x72, 0x0E, 0x1D, 0x00, 0, 0, 0, 0]).unwrap();
        assert!(descriptor.is_miscompare());

        // ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE: no ATS, not a miscompare.
        let illegal = Sense::decode(&fixed_sense(0x05, 0x20, 0x00)).unwrap();
        assert!(!illegal.is_miscompare());
        // MISCOMPARE key with another ASC is not COMPARE AND WRITE's miscompare.
        assert!(
            !Sense::decode(&fixed_sense(0x0E, 0x1D, 0x01))
                .unwrap()
                .is_miscompare()
        );
        assert_eq!(
            Sense::decode(&[0x70, 0, 0x0E]),
            None,
            "truncated fixed sense"
        );
        assert_eq!(Sense::decode(&[0x7F; 20]), None, "vendor-specific format");
    }

    #[test]
    fn status_fields_are_judged() {
        let miscompare = fixed_sense(0x0E, 0x1D, 0x00);
        assert_eq!(
            outcome(0x02, 0, 0x08, &miscompare).unwrap(),
            Outcome::CheckCondition(Sense {
                key: 0x0E,
                asc: 0x1D,
                ascq: 0
            })
        );
        // Sense reported by the driver alone still counts.
        assert!(matches!(
            outcome(0, 0, 0x08, &miscompare).unwrap(),
            Outcome::CheckCondition(s) if s.is_miscompare()
        ));
        assert_eq!(outcome(0, 0, 0, &[]).unwrap(), Outcome::Good);
        assert!(
            outcome(0x02, 0, 0, &[]).is_err(),
            "check condition without sense"
        );
        assert!(outcome(0, 0x07, 0, &[]).is_err(), "transport failure");
        assert!(outcome(0x18, 0, 0, &[]).is_err(), "reservation conflict");
    }
}
