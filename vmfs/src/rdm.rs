//! The payload of a raw device mapping: which LUN the mapping names and what it looked like
//! when the mapping was made. It lives inline in the mapping's inode (type 4), from byte
//! [`crate::inode::TAIL`]; the inode's size is the mapped LUN's size, so `stat` and every
//! consumer of [`crate::Attr`] see the device's size, as VMFS shows an RDM pointer's.
//!
//! vmfs stores and checks the payload; resolving the LUN and doing I/O to it is the `rdm`
//! crate's work.

use serde::Serialize;
use uuid::Uuid;

use crate::codec::*;
use crate::inode::TAIL;

/// Tells a mapping payload from stray bytes (and from a future layout, by the version).
pub const RDM_MAGIC: &[u8; 4] = b"VRDM";
/// The payload layout this vapp writes and reads.
pub const RDM_PAYLOAD_VERSION: u16 = 1;
/// Longest serialised LUN identity a mapping stores (more than `lun::IDENTITY_MAX`, so a
/// longer form in a later version still fits).
pub const RDM_IDENTITY_MAX: usize = 256;
/// Longest device serial a mapping stores.
pub const RDM_SERIAL_MAX: usize = 128;
/// Longest path or URI the LUN was named by at creation.
pub const RDM_SPEC_MAX: usize = 1024;

// Offsets within the inode unit (the payload starts at TAIL = 128).
const OFF_MAGIC: usize = TAIL;
const OFF_VERSION: usize = TAIL + 4;
const OFF_MODE: usize = TAIL + 6;
const OFF_DEVICE: usize = TAIL + 7;
const OFF_SECTOR: usize = TAIL + 8;
const OFF_SIZE: usize = TAIL + 16;
const OFF_CREATED: usize = TAIL + 24;
const OFF_DS_UUID: usize = TAIL + 32;
const OFF_IDENTITY_LEN: usize = TAIL + 48;
const OFF_SERIAL_LEN: usize = TAIL + 50;
const OFF_SPEC_LEN: usize = TAIL + 52;
const OFF_IDENTITY: usize = TAIL + 64;
const OFF_SERIAL: usize = OFF_IDENTITY + RDM_IDENTITY_MAX;
const OFF_SPEC: usize = OFF_SERIAL + RDM_SERIAL_MAX;
const _: () = assert!(
    OFF_SPEC + RDM_SPEC_MAX <= UNIT,
    "the payload fits the inode"
);

/// Compatibility mode of a mapping (VMware's terms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RdmMode {
    /// I/O goes through vapp's stack: snapshots and replication apply.
    Virtual,
    /// The device as directly as possible: O_DIRECT, its own serial, discard passed
    /// through; no vapp snapshots.
    Physical,
}

impl RdmMode {
    fn code(self) -> u8 {
        match self {
            RdmMode::Virtual => 1,
            RdmMode::Physical => 2,
        }
    }
    fn from_code(c: u8) -> Option<RdmMode> {
        match c {
            1 => Some(RdmMode::Virtual),
            2 => Some(RdmMode::Physical),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RdmMode::Virtual => "virtual",
            RdmMode::Physical => "physical",
        }
    }
}

impl std::fmt::Display for RdmMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RdmMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "virtual" => Ok(RdmMode::Virtual),
            "physical" => Ok(RdmMode::Physical),
            other => Err(format!(
                "unknown mapping mode {other:?} (use virtual or physical)"
            )),
        }
    }
}

/// What kind of object the mapped LUN was when mapped: where to look for it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RdmDevice {
    /// A block device (a SAN LUN, a loop device): found again among this machine's block
    /// devices by its identity.
    BlockDevice,
    /// A regular file: found at its path, checked by device and inode.
    File,
    /// An NBD export: found at its URI.
    Nbd,
}

impl RdmDevice {
    fn code(self) -> u8 {
        match self {
            RdmDevice::BlockDevice => 1,
            RdmDevice::File => 2,
            RdmDevice::Nbd => 3,
        }
    }
    fn from_code(c: u8) -> Option<RdmDevice> {
        match c {
            1 => Some(RdmDevice::BlockDevice),
            2 => Some(RdmDevice::File),
            3 => Some(RdmDevice::Nbd),
            _ => None,
        }
    }
}

/// The payload of a raw device mapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RdmRecord {
    pub mode: RdmMode,
    pub device: RdmDevice,
    /// Logical sector size of the LUN when mapped.
    pub sector_size: u32,
    /// Size of the LUN in bytes when mapped (also the inode's size).
    pub size: u64,
    /// When the mapping was made (ns since the epoch).
    pub created_ns: i64,
    /// UUID of the datastore the mapping was made on: a mapping found on another datastore
    /// was copied there.
    pub datastore_uuid: Uuid,
    /// The LUN's identity in `lun::LunIdentity`'s serialised form.
    pub identity: String,
    /// The device's own serial number (reported to a guest in physical mode); empty when
    /// the device has none.
    pub serial: String,
    /// The path or URI the LUN was named by when mapped: tried first when opening.
    pub spec: String,
}

impl RdmRecord {
    /// Checks what can be checked without the device; the reason names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(512..=65536).contains(&self.sector_size) || !self.sector_size.is_power_of_two() {
            return Err(format!(
                "sector size {} is not a power of two in 512..=65536",
                self.sector_size
            ));
        }
        if self.size == 0 || self.size % u64::from(self.sector_size) != 0 {
            return Err(format!(
                "LUN size {} is not a non-zero multiple of its sector size {}",
                self.size, self.sector_size
            ));
        }
        if self.identity.is_empty() {
            return Err("no LUN identity recorded".into());
        }
        for (what, text, max) in [
            ("identity", &self.identity, RDM_IDENTITY_MAX),
            ("serial", &self.serial, RDM_SERIAL_MAX),
            ("path", &self.spec, RDM_SPEC_MAX),
        ] {
            if text.len() > max {
                return Err(format!(
                    "{what} of {} bytes is longer than {max}",
                    text.len()
                ));
            }
            if text.contains('\0') {
                return Err(format!("{what} contains a NUL byte"));
            }
        }
        Ok(())
    }

    /// Writes the payload into an inode unit's inline area (zeroing the rest of it).
    pub(crate) fn encode(&self, unit: &mut [u8]) {
        unit[TAIL..].fill(0);
        unit[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(RDM_MAGIC);
        put_u16(unit, OFF_VERSION, RDM_PAYLOAD_VERSION);
        put_u8(unit, OFF_MODE, self.mode.code());
        put_u8(unit, OFF_DEVICE, self.device.code());
        put_u32(unit, OFF_SECTOR, self.sector_size);
        put_u64(unit, OFF_SIZE, self.size);
        put_i64(unit, OFF_CREATED, self.created_ns);
        unit[OFF_DS_UUID..OFF_DS_UUID + 16].copy_from_slice(self.datastore_uuid.as_bytes());
        for (len_at, at, max, text) in [
            (
                OFF_IDENTITY_LEN,
                OFF_IDENTITY,
                RDM_IDENTITY_MAX,
                &self.identity,
            ),
            (OFF_SERIAL_LEN, OFF_SERIAL, RDM_SERIAL_MAX, &self.serial),
            (OFF_SPEC_LEN, OFF_SPEC, RDM_SPEC_MAX, &self.spec),
        ] {
            let n = text.len().min(max);
            put_u16(unit, len_at, n as u16);
            unit[at..at + n].copy_from_slice(&text.as_bytes()[..n]);
        }
    }

    /// Reads the payload of an inode unit; the reason names what is damaged.
    pub(crate) fn decode(unit: &[u8]) -> std::result::Result<RdmRecord, String> {
        if &unit[OFF_MAGIC..OFF_MAGIC + 4] != RDM_MAGIC {
            return Err("mapping payload has no VRDM magic".into());
        }
        let version = get_u16(unit, OFF_VERSION);
        if version != RDM_PAYLOAD_VERSION {
            return Err(format!(
                "mapping payload version {version} is not {RDM_PAYLOAD_VERSION}"
            ));
        }
        let mode = RdmMode::from_code(get_u8(unit, OFF_MODE))
            .ok_or_else(|| format!("unknown mapping mode {}", get_u8(unit, OFF_MODE)))?;
        let device = RdmDevice::from_code(get_u8(unit, OFF_DEVICE))
            .ok_or_else(|| format!("unknown mapped device kind {}", get_u8(unit, OFF_DEVICE)))?;
        let text = |what: &str, len_at: usize, at: usize, max: usize| {
            let n = usize::from(get_u16(unit, len_at));
            if n > max {
                return Err(format!("{what} length {n} is longer than {max}"));
            }
            String::from_utf8(unit[at..at + n].to_vec()).map_err(|_| format!("{what} is not UTF-8"))
        };
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&unit[OFF_DS_UUID..OFF_DS_UUID + 16]);
        let record = RdmRecord {
            mode,
            device,
            sector_size: get_u32(unit, OFF_SECTOR),
            size: get_u64(unit, OFF_SIZE),
            created_ns: get_i64(unit, OFF_CREATED),
            datastore_uuid: Uuid::from_bytes(uuid),
            identity: text("identity", OFF_IDENTITY_LEN, OFF_IDENTITY, RDM_IDENTITY_MAX)?,
            serial: text("serial", OFF_SERIAL_LEN, OFF_SERIAL, RDM_SERIAL_MAX)?,
            spec: text("path", OFF_SPEC_LEN, OFF_SPEC, RDM_SPEC_MAX)?,
        };
        record.validate()?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> RdmRecord {
        RdmRecord {
            mode: RdmMode::Physical,
            device: RdmDevice::BlockDevice,
            sector_size: 4096,
            size: 64 << 20,
            created_ns: 1_795_598_011_873_132_631,
            datastore_uuid: Uuid::from_u128(0x1234),
            identity: "file:fe00:98c0a1:0 /srv/lun0.img".into(),
            serial: "VAPP0001".into(),
            spec: "/dev/loop3".into(),
        }
    }

    #[test]
    fn payload_round_trips_and_fits_the_inline_area() {
        let mut unit = [0u8; UNIT];
        record().encode(&mut unit);
        assert_eq!(RdmRecord::decode(&unit), Ok(record()));
    }

    #[test]
    fn damage_is_named() {
        let mut unit = [0u8; UNIT];
        record().encode(&mut unit);
        let mut bad = unit;
        bad[OFF_MODE] = 9;
        assert_eq!(
            RdmRecord::decode(&bad),
            Err("unknown mapping mode 9".to_string())
        );
        let mut bad = unit;
        put_u32(&mut bad, OFF_SECTOR, 1000);
        assert!(
            RdmRecord::decode(&bad)
                .unwrap_err()
                .contains("sector size 1000")
        );
        let mut bad = unit;
        bad[OFF_MAGIC] = b'X';
        assert!(RdmRecord::decode(&bad).unwrap_err().contains("magic"));
        let mut bad = unit;
        put_u16(&mut bad, OFF_IDENTITY_LEN, 0);
        assert!(RdmRecord::decode(&bad).unwrap_err().contains("identity"));
    }

    #[test]
    fn modes_parse_by_name() {
        assert_eq!("virtual".parse(), Ok(RdmMode::Virtual));
        assert_eq!("physical".parse(), Ok(RdmMode::Physical));
        assert!("raw".parse::<RdmMode>().is_err());
    }
}
