//! Making, reading and checking mappings.

use std::ffi::OsString;
use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;

use lun::{Lun, LunIdentity, LunSpec};
use serde::Serialize;
use vmfs::{Access, Creds, Datastore, Kind};

use crate::device::{self, RdmLun};
use crate::error::{Error, Result};
use crate::{DeviceKind, Mode, RdmRecord};

/// A mapping as stored on the datastore.
#[derive(Debug, Clone, Serialize)]
pub struct Mapping {
    /// Path of the mapping file in the datastore.
    pub path: String,
    pub ino: u64,
    pub mode: Mode,
    /// What the LUN was when mapped: where to look for it again.
    pub device: DeviceKind,
    /// The LUN's identity, serialised (`lun::LunIdentity`).
    pub identity: String,
    /// The identity in words, e.g. `file /srv/lun0.img (device 8:1, inode 12)`.
    pub identity_text: String,
    /// The path or URI the LUN was named by when mapped.
    pub recorded_path: String,
    pub size: u64,
    pub sector_size: u32,
    pub created_ns: i64,
    pub datastore_uuid: String,
    /// The device's own serial number; `None` when it has none.
    pub serial: Option<String>,
}

impl Mapping {
    pub(crate) fn new(path: &str, ino: u64, record: RdmRecord) -> Mapping {
        let identity_text = LunIdentity::parse(&record.identity)
            .map(|i| i.to_string())
            .unwrap_or_default();
        Mapping {
            path: path.to_string(),
            ino,
            mode: record.mode,
            device: record.device,
            identity: record.identity,
            identity_text,
            recorded_path: record.spec,
            size: record.size,
            sector_size: record.sector_size,
            created_ns: record.created_ns,
            datastore_uuid: record.datastore_uuid.to_string(),
            serial: Some(record.serial).filter(|s| !s.is_empty()),
        }
    }

    /// The recorded identity; `Other` text when it does not parse (then nothing matches it).
    pub fn lun_identity(&self) -> LunIdentity {
        LunIdentity::parse(&self.identity).unwrap_or_else(|| LunIdentity::Other(String::new()))
    }
}

/// What [`verify`] found: the mapping and where its LUN is now.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub mapping: Mapping,
    /// Where the LUN was found.
    pub found_at: String,
    /// True when that is not the recorded path (the device moved, e.g. loop devices
    /// attached again in another order).
    pub moved: bool,
}

/// Maps the LUN named by `lun_spec` (a block device, a file, or an NBD URI) at `path` on
/// `ds`. Refuses a LUN with no stable identity, the datastore's own LUN, and a LUN that
/// another mapping on this datastore already names.
pub fn create(ds: &Datastore, path: &str, lun_spec: &str, mode: Mode) -> Result<Mapping> {
    let (kind, lun) = open_spec(lun_spec)?;
    let identity = lun.identity().ok_or_else(|| Error::Unmappable {
        lun: lun_spec.to_string(),
        reason: "it has no stable identity (no WWN, serial or /dev/disk/by-id name)".into(),
    })?;
    if let Some(own) = ds.lun().identity()
        && (own.is_exactly(&identity) || own.same_lun(&identity) == Some(true))
    {
        return Err(Error::DatastoreLun {
            lun: lun_spec.to_string(),
            datastore: ds.lun().name().to_string(),
        });
    }
    if let Some(other) = find_mapping_of(ds, &identity, None)? {
        return Err(Error::AlreadyMapped {
            lun: lun_spec.to_string(),
            other,
        });
    }
    let spec = match kind {
        DeviceKind::Nbd => lun_spec.to_string(),
        // Absolute but with links kept: a /dev/disk/by-id name outlives /dev/sdX.
        _ => std::path::absolute(lun_spec)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| lun_spec.to_string()),
    };
    let record = RdmRecord {
        mode,
        device: kind,
        sector_size: lun.sector_size(),
        size: lun.size(),
        created_ns: now_ns(),
        datastore_uuid: ds.superblock().uuid,
        identity: identity.serialise(),
        serial: match kind {
            DeviceKind::BlockDevice => lun::device_serial(std::path::Path::new(&spec)),
            _ => None,
        }
        .unwrap_or_default(),
        spec,
    };
    let attr = ds.create_rdm_path(path, &record, Creds::current())?;
    // Another host may have mapped the same LUN meanwhile: once ours is committed, whoever
    // then sees the other's backs off, so at most one of two racing mappings survives.
    ds.sync()?;
    if let Some(other) = find_mapping_of(ds, &identity, Some(attr.ino))? {
        ds.remove_path(path, false)?;
        return Err(Error::AlreadyMapped {
            lun: lun_spec.to_string(),
            other,
        });
    }
    tracing::info!(path, lun = lun_spec, identity = %record.identity, mode = %mode, size = record.size, "raw device mapping created");
    Ok(Mapping::new(path, attr.ino, record))
}

/// Whether `path` on `ds` is a raw device mapping (false when it does not exist).
pub fn is_mapping(ds: &Datastore, path: &str) -> bool {
    ds.stat_path(path).is_ok_and(|a| a.kind == Kind::Rdm)
}

/// The mapping at `path`, as stored.
pub fn show(ds: &Datastore, path: &str) -> Result<Mapping> {
    let attr = ds.stat_path(path)?;
    if attr.kind != Kind::Rdm {
        return Err(Error::NotAMapping {
            path: path.to_string(),
        });
    }
    let record = ds.rdm_record(attr.ino).map_err(|e| e.at(path))?;
    Ok(Mapping::new(path, attr.ino, record))
}

/// Checks that the mapping at `path` belongs to this datastore and that its LUN is on this
/// machine, unique, with the size and sector size it had when mapped. Opens nothing for
/// writing and takes no lock.
pub fn verify(ds: &Datastore, path: &str) -> Result<Verified> {
    let mapping = show(ds, path)?;
    check_datastore(ds, &mapping)?;
    let found = device::resolve(&mapping, false)?;
    let found_at = found.path.clone();
    drop(found);
    Ok(Verified {
        moved: found_at != mapping.recorded_path,
        found_at,
        mapping,
    })
}

/// Opens the mapping at `path` as a LUN: takes the mapping file's lock in `access` (refused
/// naming the holder when another host or handle conflicts), resolves the LUN by identity
/// and checks it. The lock is held until the returned LUN is dropped.
pub fn open(ds: &Datastore, path: &str, access: Access) -> Result<RdmLun> {
    let attr = ds.stat_path(path)?;
    if attr.kind != Kind::Rdm {
        return Err(Error::NotAMapping {
            path: path.to_string(),
        });
    }
    open_ino(ds, attr.ino, path, access)
}

/// [`open`] for the mapping at inode `ino`, which errors name `path` (a caller that knows the
/// inode, such as the FUSE mount, need not find its path).
pub fn open_ino(ds: &Datastore, ino: u64, path: &str, access: Access) -> Result<RdmLun> {
    let record = ds.rdm_record(ino).map_err(|e| e.at(path))?;
    let mapping = Mapping::new(path, ino, record);
    check_datastore(ds, &mapping)?;
    let handle = ds.open_file(ino, access).map_err(|e| e.at(path))?;
    let found = device::resolve(&mapping, access.can_write())?;
    let name = format!("rdm:{}:{}", ds.superblock().label, path);
    tracing::info!(path, device = %found.path, mode = %mapping.mode, access = %access, "raw device mapping opened");
    Ok(RdmLun::new(name, mapping, found, handle))
}

fn check_datastore(ds: &Datastore, mapping: &Mapping) -> Result<()> {
    let actual = ds.superblock().uuid.to_string();
    if mapping.datastore_uuid != actual {
        return Err(Error::ForeignDatastore {
            path: mapping.path.clone(),
            recorded: mapping.datastore_uuid.clone(),
            actual,
        });
    }
    Ok(())
}

/// Opens what the user named, read-only, and says what it is.
fn open_spec(spec: &str) -> Result<(DeviceKind, Arc<dyn Lun>)> {
    let kind = match LunSpec::parse(spec)? {
        LunSpec::Path(p) => {
            let md = std::fs::metadata(&p).map_err(|e| Error::Unmappable {
                lun: spec.to_string(),
                reason: e.to_string(),
            })?;
            if md.file_type().is_block_device() {
                DeviceKind::BlockDevice
            } else if md.is_file() {
                DeviceKind::File
            } else {
                return Err(Error::Unmappable {
                    lun: spec.to_string(),
                    reason: "neither a block device nor a regular file".into(),
                });
            }
        }
        LunSpec::NbdTcp { .. } | LunSpec::NbdUnix { .. } => DeviceKind::Nbd,
    };
    let lun = lun::open(
        spec,
        &lun::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )?;
    Ok((kind, lun))
}

/// The path of a mapping on `ds` other than inode `except` that names `identity`, if any: a
/// LUN mapped twice would be written by two VMs that each hold their own mapping's lock.
fn find_mapping_of(
    ds: &Datastore,
    identity: &LunIdentity,
    except: Option<u64>,
) -> Result<Option<String>> {
    let mut dirs = vec![String::from("/")];
    while let Some(dir) = dirs.pop() {
        let Some(entries) = list_settled(ds, &dir)? else {
            continue;
        };
        for (name, attr) in entries {
            let child = if dir == "/" {
                format!("/{}", name.to_string_lossy())
            } else {
                format!("{dir}/{}", name.to_string_lossy())
            };
            match attr.kind {
                Kind::Dir => dirs.push(child),
                Kind::Rdm if Some(attr.ino) != except => {
                    // A damaged mapping names nothing; fsck reports it.
                    let Ok(record) = ds.rdm_record(attr.ino) else {
                        continue;
                    };
                    if LunIdentity::parse(&record.identity).is_some_and(|i| i.is_exactly(identity))
                    {
                        return Ok(Some(child));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(None)
}

/// The entries of `dir`, or `None` once it is gone. An entry another host removes while it is
/// listed (a racing `create` backing off) fails the listing: list again until one holds.
fn list_settled(ds: &Datastore, dir: &str) -> Result<Option<Vec<(OsString, vmfs::Attr)>>> {
    let mut tries = 0;
    loop {
        match ds.list(dir) {
            Ok(entries) => return Ok(Some(entries)),
            Err(e) if e.errno() == libc::ENOENT && ds.stat_path(dir).is_err() => return Ok(None),
            Err(e) if e.errno() == libc::ENOENT && tries < 20 => tries += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}
