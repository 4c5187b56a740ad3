//! What a LUN is, whatever path reached it: a datastore records the identity of the LUN it
//! was formatted on, so a copy (an array snapshot, a clone, `cp` of an image) that carries
//! the original's bytes is told apart from the original by the LUN it is found on.
//!
//! The serialised form is one short line of text (at most [`IDENTITY_MAX`] bytes), stable
//! across versions: `KIND:FIELDS` then, after one space, the path it was found at as a
//! hint. Kinds:
//! - `file:DEV:INO:OFFSET PATH`: a regular file on a local file system (offset 0), or a
//!   loop device over one (its backing file's device and inode, and the loop's offset), so
//!   that a file reached once directly and once through a loop device is one LUN;
//! - `dev:ID:START PATH`: a block device by its stable id (`wwid`, `serial`, or a
//!   `/dev/disk/by-id` name) and a partition's start in bytes;
//! - `shared:FS:DEV:INO PATH`: a file on a network or FUSE file system, whose device number
//!   is this machine's mount's: recorded, never compared;
//! - `nbd:URI`: an NBD export. The client cannot see what the server serves, so it is
//!   recorded and never compared.
//!
//! Anything else read back is kept as text and never compared either. A LUN that vapp
//! itself produces from another (a snapshot view, a clone) reports a `dev` identity with
//! an id of its own (e.g. `vapp-snapshot.UUID`), so a datastore found on it is a copy.

use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::reach::{DeviceKind, Reach};

/// Longest serialised identity (the path hint is cut to fit).
pub const IDENTITY_MAX: usize = 160;

/// The identity of a LUN. See the module documentation for the serialised form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LunIdentity {
    /// A local regular file, or a loop device over one at `offset`.
    File {
        dev: u64,
        ino: u64,
        offset: u64,
        path: String,
    },
    /// A block device by a stable id; `start` is a partition's start in bytes.
    Device {
        id: String,
        start: u64,
        path: String,
    },
    /// A file on a network or FUSE file system: never compared.
    Shared {
        fs: String,
        dev: u64,
        ino: u64,
        path: String,
    },
    /// An NBD export: never compared.
    Nbd { uri: String },
    /// A form this version does not know: never compared.
    Other(String),
}

impl LunIdentity {
    /// Parses the serialised form; `None` for an empty string (nothing recorded).
    pub fn parse(text: &str) -> Option<LunIdentity> {
        let text = text.trim_end_matches('\0');
        if text.is_empty() {
            return None;
        }
        let (key, path) = text.split_once(' ').unwrap_or((text, ""));
        let path = path.to_string();
        let fields: Vec<&str> = key.split(':').collect();
        let hex = |s: &str| u64::from_str_radix(s, 16).ok();
        let parsed = match fields.as_slice() {
            ["file", dev, ino, offset] => {
                hex(dev)
                    .zip(hex(ino))
                    .zip(hex(offset))
                    .map(|((dev, ino), offset)| LunIdentity::File {
                        dev,
                        ino,
                        offset,
                        path: path.clone(),
                    })
            }
            ["shared", fs, dev, ino] => {
                hex(dev)
                    .zip(hex(ino))
                    .map(|(dev, ino)| LunIdentity::Shared {
                        fs: fs.to_string(),
                        dev,
                        ino,
                        path: path.clone(),
                    })
            }
            ["dev", .., start] if fields.len() >= 3 => {
                hex(start).map(|start| LunIdentity::Device {
                    id: fields[1..fields.len() - 1].join(":"),
                    start,
                    path: path.clone(),
                })
            }
            _ if key.starts_with("nbd:") => Some(LunIdentity::Nbd {
                uri: text["nbd:".len()..].to_string(),
            }),
            _ => None,
        };
        Some(parsed.unwrap_or_else(|| LunIdentity::Other(text.to_string())))
    }

    /// The serialised form, at most [`IDENTITY_MAX`] bytes: the path hint is shortened (or
    /// dropped) to fit, never the part that is compared.
    pub fn serialise(&self) -> String {
        let (key, hint) = match self {
            LunIdentity::File {
                dev,
                ino,
                offset,
                path,
            } => (format!("file:{dev:x}:{ino:x}:{offset:x}"), path.as_str()),
            LunIdentity::Device { id, start, path } => {
                (format!("dev:{id}:{start:x}"), path.as_str())
            }
            LunIdentity::Shared { fs, dev, ino, path } => {
                (format!("shared:{fs}:{dev:x}:{ino:x}"), path.as_str())
            }
            LunIdentity::Nbd { uri } => (format!("nbd:{uri}"), ""),
            LunIdentity::Other(text) => (text.clone(), ""),
        };
        let mut out = truncate(&key, IDENTITY_MAX).to_string();
        if !hint.is_empty() && out.len() + 1 < IDENTITY_MAX {
            out.push(' ');
            let room = IDENTITY_MAX - out.len();
            out.push_str(truncate(hint, room));
        }
        out
    }

    /// Where this LUN was found when the identity was taken (a hint: it may have moved).
    pub fn path(&self) -> Option<&str> {
        match self {
            LunIdentity::File { path, .. }
            | LunIdentity::Device { path, .. }
            | LunIdentity::Shared { path, .. } => Some(path.as_str()).filter(|p| !p.is_empty()),
            LunIdentity::Nbd { uri } => Some(uri),
            LunIdentity::Other(_) => None,
        }
    }

    /// Whether two identities name the same LUN: `None` when they cannot be compared (an
    /// NBD export, a file on a shared file system, an unknown form). Two local files are
    /// the same when device and inode match, or when they sit at the same path: a file
    /// copied back over its own path, or a disk whose device number changed across a
    /// reboot, is still in the original's place and is not a copy of it.
    pub fn same_lun(&self, other: &LunIdentity) -> Option<bool> {
        use LunIdentity::*;
        match (self, other) {
            (Nbd { .. } | Shared { .. } | Other(_), _)
            | (_, Nbd { .. } | Shared { .. } | Other(_)) => None,
            (
                File {
                    dev,
                    ino,
                    offset,
                    path,
                },
                File {
                    dev: d2,
                    ino: i2,
                    offset: o2,
                    path: p2,
                },
            ) => Some(offset == o2 && ((dev, ino) == (d2, i2) || (!path.is_empty() && path == p2))),
            (
                Device { id, start, .. },
                Device {
                    id: i2, start: s2, ..
                },
            ) => Some(id == i2 && start == s2),
            (File { .. }, Device { .. }) | (Device { .. }, File { .. }) => Some(false),
        }
    }

    /// Block devices of this machine that are this LUN, compared exactly (never by path):
    /// loop devices over the same file (device and inode) at the same offset, found through
    /// `/sys/block/loop*/loop/backing_file` and `offset`; disks and partitions with the same
    /// stable id and start, found through `/sys/class/block`. Empty for the kinds that are
    /// never compared.
    pub fn block_devices(&self) -> Vec<PathBuf> {
        let names = || -> Vec<String> {
            std::fs::read_dir("/sys/class/block")
                .map(|entries| {
                    let mut names: Vec<String> = entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    names.sort();
                    names
                })
                .unwrap_or_default()
        };
        match self {
            LunIdentity::File {
                dev, ino, offset, ..
            } => names()
                .into_iter()
                .filter(|name| {
                    loop_backing(name).is_some_and(|(d, i, o)| (d, i, o) == (*dev, *ino, *offset))
                })
                .map(|name| PathBuf::from("/dev").join(name))
                .collect(),
            LunIdentity::Device { id, start, .. } => names()
                .into_iter()
                .filter(|name| !name.starts_with("loop"))
                .filter(|name| {
                    let sys = PathBuf::from("/sys/class/block").join(name);
                    of_sysfs(&sys, String::new())
                        .is_some_and(|found| matches!(found, LunIdentity::Device { id: i, start: s, .. } if i == *id && s == *start))
                })
                .map(|name| PathBuf::from("/dev").join(name))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether `other` is exactly this LUN: same device and inode (and offset) for files,
    /// same id and start for devices, same URI for NBD. Unlike [`LunIdentity::same_lun`],
    /// a path is never enough: a mapping must reach the very LUN it was made on.
    pub fn is_exactly(&self, other: &LunIdentity) -> bool {
        use LunIdentity::*;
        match (self, other) {
            (
                File {
                    dev, ino, offset, ..
                },
                File {
                    dev: d2,
                    ino: i2,
                    offset: o2,
                    ..
                },
            ) => (dev, ino, offset) == (d2, i2, o2),
            (
                Device { id, start, .. },
                Device {
                    id: i2, start: s2, ..
                },
            ) => id == i2 && start == s2,
            (
                Shared { fs, dev, ino, .. },
                Shared {
                    fs: f2,
                    dev: d2,
                    ino: i2,
                    ..
                },
            ) => (fs, dev, ino) == (f2, d2, i2),
            (Nbd { uri }, Nbd { uri: u2 }) => uri == u2,
            (Other(a), Other(b)) => a == b,
            _ => false,
        }
    }

    /// Paths on this machine where the LUN may be found now: its recorded path, and for a
    /// file at an offset or a device every loop device or `/dev/disk/by-id` link. The
    /// caller opens each and compares identities.
    pub fn candidates(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self
            .path()
            .filter(|p| p.starts_with('/'))
            .map(PathBuf::from)
            .into_iter()
            .collect();
        let listed = |dir: &str, keep: &dyn Fn(&str) -> bool| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .filter(|e| keep(&e.file_name().to_string_lossy()))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default()
        };
        match self {
            LunIdentity::File { .. } => out.extend(listed("/dev", &|n| {
                n.strip_prefix("loop")
                    .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
            })),
            LunIdentity::Device { .. } => out.extend(listed("/dev/disk/by-id", &|_| true)),
            _ => {}
        }
        out.dedup();
        out
    }
}

impl fmt::Display for LunIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LunIdentity::File {
                dev,
                ino,
                offset,
                path,
            } => {
                let (major, minor) = (nix::sys::stat::major(*dev), nix::sys::stat::minor(*dev));
                write!(f, "file {path} (device {major}:{minor}, inode {ino}")?;
                if *offset != 0 {
                    write!(f, ", at offset {offset}")?;
                }
                write!(f, ")")
            }
            LunIdentity::Device { id, start, path } => {
                write!(f, "device {id}")?;
                if *start != 0 {
                    write!(f, " partition at {start}")?;
                }
                if !path.is_empty() {
                    write!(f, " ({path})")?;
                }
                Ok(())
            }
            LunIdentity::Shared { fs, path, .. } => write!(f, "file {path} on {fs}"),
            LunIdentity::Nbd { uri } => write!(f, "NBD export {uri}"),
            LunIdentity::Other(text) => write!(f, "{text}"),
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The identity of an open file or block device, `path` being how it was named: `None`
/// when a block device offers no stable id.
pub(crate) fn of_file(
    file: &File,
    metadata: &std::fs::Metadata,
    path: &Path,
    reach: Reach,
) -> Option<LunIdentity> {
    let canonical = std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned();
    if !metadata.file_type().is_block_device() {
        return Some(match reach {
            Reach::SharedFile(fs) => LunIdentity::Shared {
                fs: fs.to_string(),
                dev: metadata.dev(),
                ino: metadata.ino(),
                path: canonical,
            },
            _ => LunIdentity::File {
                dev: metadata.dev(),
                ino: metadata.ino(),
                offset: 0,
                path: canonical,
            },
        });
    }
    if reach == Reach::BlockDevice(DeviceKind::Loop) {
        if let Some(identity) = of_loop(file) {
            return Some(identity);
        }
    }
    of_block_device(metadata, canonical)
}

/// `struct loop_info64` of <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;

/// A loop device is its backing file at an offset: the kernel reports the file's device
/// and inode, which sysfs does not.
fn of_loop(file: &File) -> Option<LunIdentity> {
    let mut info = std::mem::MaybeUninit::<LoopInfo64>::zeroed();
    // SAFETY: LOOP_GET_STATUS64 fills a loop_info64, which `info` is sized and aligned for.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), LOOP_GET_STATUS64 as _, info.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: the ioctl succeeded and filled the zeroed buffer.
    let info = unsafe { info.assume_init() };
    let name_len = info.file_name.iter().position(|&b| b == 0).unwrap_or(64);
    let path = String::from_utf8_lossy(&info.file_name[..name_len]).into_owned();
    Some(LunIdentity::File {
        dev: info.device,
        ino: info.inode,
        offset: info.offset,
        path,
    })
}

/// The backing file's device and inode and the offset of attached loop device `name`
/// (e.g. `loop3`), from sysfs; `None` for anything else or a detached loop.
fn loop_backing(name: &str) -> Option<(u64, u64, u64)> {
    let sys = PathBuf::from("/sys/block").join(name).join("loop");
    let backing = std::fs::read_to_string(sys.join("backing_file")).ok()?;
    let backing = backing.trim_end_matches('\n');
    let offset = std::fs::read_to_string(sys.join("offset"))
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()?;
    match std::fs::metadata(backing) {
        Ok(md) => Some((md.dev(), md.ino(), offset)),
        // The backing file was deleted or renamed since: the kernel still knows it.
        Err(_) => {
            let file = File::open(PathBuf::from("/dev").join(name)).ok()?;
            match of_loop(&file)? {
                LunIdentity::File {
                    dev, ino, offset, ..
                } => Some((dev, ino, offset)),
                _ => None,
            }
        }
    }
}

/// A block device's stable id from sysfs (`wwid`, then `serial`), else its
/// `/dev/disk/by-id` name; a partition adds its start.
fn of_block_device(metadata: &std::fs::Metadata, path: String) -> Option<LunIdentity> {
    let rdev = metadata.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    of_sysfs(
        &PathBuf::from(format!("/sys/dev/block/{major}:{minor}")),
        path,
    )
}

/// The sysfs directory of a block device's whole disk, and a partition's start in bytes.
fn disk_of(sys: &Path) -> (PathBuf, u64) {
    match std::fs::read_to_string(sys.join("start")) {
        Ok(start) => (
            sys.join(".."),
            start.trim().parse::<u64>().ok().map_or(0, |s| s * 512),
        ),
        Err(_) => (sys.to_path_buf(), 0),
    }
}

/// A non-empty sysfs attribute `rel` of `disk`, trimmed.
fn disk_attribute(disk: &Path, rel: &str) -> Option<String> {
    std::fs::read_to_string(disk.join(rel))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// A block device's own serial number (`device/serial`, `serial`, then the WWID), as a guest
/// reads it through virtio-blk GET_ID; `None` for what is not a block device or has none (a
/// loop device).
pub fn device_serial(path: &Path) -> Option<String> {
    let md = std::fs::metadata(path).ok()?;
    if !md.file_type().is_block_device() {
        return None;
    }
    let rdev = md.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let (disk, _) = disk_of(&PathBuf::from(format!("/sys/dev/block/{major}:{minor}")));
    ["device/serial", "serial", "device/wwid", "wwid"]
        .iter()
        .find_map(|rel| disk_attribute(&disk, rel))
}

/// [`of_block_device`] from the device's sysfs directory.
fn of_sysfs(sys: &Path, path: String) -> Option<LunIdentity> {
    let (disk, start) = disk_of(sys);
    let read = |rel: &str| disk_attribute(&disk, rel).map(|s| s.replace([' ', ':'], "_"));
    let id = read("device/wwid")
        .or_else(|| read("wwid"))
        .or_else(|| read("device/serial"))
        .or_else(|| read("serial"))
        .or_else(|| by_id_name(disk.join("dev")))?;
    Some(LunIdentity::Device { id, start, path })
}

/// The name of a whole disk's `/dev/disk/by-id` link (a `wwn-` one first).
fn by_id_name(dev_file: PathBuf) -> Option<String> {
    let numbers = std::fs::read_to_string(dev_file).ok()?;
    let numbers = numbers.trim();
    let mut names: Vec<String> = std::fs::read_dir("/dev/disk/by-id")
        .ok()?
        .flatten()
        .filter(|e| {
            std::fs::metadata(e.path()).is_ok_and(|m| {
                let rdev = m.rdev();
                format!(
                    "{}:{}",
                    nix::sys::stat::major(rdev),
                    nix::sys::stat::minor(rdev)
                ) == numbers
            })
        })
        .map(|e| e.file_name().to_string_lossy().replace(':', "_"))
        .collect();
    names.sort_by_key(|n| (!n.starts_with("wwn-"), n.clone()));
    names.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialised_forms_round_trip() {
        let forms = [
            LunIdentity::File {
                dev: 0xfd01,
                ino: 1234,
                offset: 0,
                path: "/srv/ds 1.vmfs".into(),
            },
            LunIdentity::Device {
                id: "naa.600a0b80001234".into(),
                start: 1 << 20,
                path: "/dev/sdb1".into(),
            },
            LunIdentity::Shared {
                fs: "NFS".into(),
                dev: 0x2a,
                ino: 77,
                path: "/mnt/nfs/ds".into(),
            },
            LunIdentity::Nbd {
                uri: "nbd://10.0.0.2:10809/ds1".into(),
            },
            LunIdentity::Other("tape:9".into()),
        ];
        for form in forms {
            let text = form.serialise();
            assert!(text.len() <= IDENTITY_MAX);
            assert_eq!(LunIdentity::parse(&text), Some(form), "{text}");
        }
        assert_eq!(LunIdentity::parse(""), None);
        assert_eq!(LunIdentity::parse("\0\0"), None);
    }

    #[test]
    fn a_long_path_hint_is_cut_never_the_key() {
        let long = LunIdentity::File {
            dev: 1,
            ino: 2,
            offset: 0,
            path: format!("/{}", "é".repeat(200)),
        };
        let text = long.serialise();
        assert!(text.len() <= IDENTITY_MAX);
        let back = LunIdentity::parse(&text).unwrap();
        assert_eq!(long.same_lun(&back), Some(true));
    }

    #[test]
    fn files_compare_by_inode_or_place_and_nbd_never() {
        let file = |dev, ino, path: &str| LunIdentity::File {
            dev,
            ino,
            offset: 0,
            path: path.into(),
        };
        let a = file(1, 10, "/a");
        assert_eq!(a.same_lun(&file(1, 10, "/elsewhere")), Some(true));
        assert_eq!(a.same_lun(&file(9, 99, "/a")), Some(true));
        assert_eq!(a.same_lun(&file(1, 11, "/b")), Some(false));
        let nbd = LunIdentity::Nbd {
            uri: "nbd://h/a".into(),
        };
        assert_eq!(a.same_lun(&nbd), None);
    }

    #[test]
    fn exactly_the_same_lun_never_by_path() {
        let file = |dev, ino, offset, path: &str| LunIdentity::File {
            dev,
            ino,
            offset,
            path: path.into(),
        };
        let a = file(1, 10, 0, "/a");
        assert!(a.is_exactly(&file(1, 10, 0, "/dev/loop7")));
        assert!(!a.is_exactly(&file(9, 99, 0, "/a")));
        assert!(!a.is_exactly(&file(1, 10, 4096, "/a")));
        let disk = |id: &str, start| LunIdentity::Device {
            id: id.into(),
            start,
            path: String::new(),
        };
        assert!(disk("naa.6001", 0).is_exactly(&disk("naa.6001", 0)));
        assert!(!disk("naa.6001", 0).is_exactly(&disk("naa.6001", 1 << 20)));
        assert!(!a.is_exactly(&disk("naa.6001", 0)));
        let nbd = |uri: &str| LunIdentity::Nbd { uri: uri.into() };
        assert!(nbd("nbd://h/a").is_exactly(&nbd("nbd://h/a")));
        assert!(!nbd("nbd://h/a").is_exactly(&nbd("nbd://h/b")));
    }

    #[test]
    fn a_file_is_identified_by_device_and_inode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lun");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let file = File::open(&path).unwrap();
        let md = file.metadata().unwrap();
        let id = of_file(&file, &md, &path, Reach::LocalFile).unwrap();
        let LunIdentity::File {
            dev, ino, offset, ..
        } = id
        else {
            panic!("{id:?}")
        };
        assert_eq!((dev, ino, offset), (md.dev(), md.ino(), 0));
    }
}
