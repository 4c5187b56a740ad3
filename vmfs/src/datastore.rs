//! An open datastore: mounting (superblock, host slot, journal replay, orphans), the
//! namespace operations, and unmounting.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use lun::Lun;
use serde::Serialize;
use uuid::Uuid;

use crate::codec::*;
use crate::dir;
use crate::error::{Error, Result};
use crate::host::{Heartbeat, SlotState};
use crate::inode::{self, AddrMode, FLAG_THICK, FLAG_VDISK, Inode, InodeView, Kind};
use crate::journal::{self, Orphan};
use crate::layout::{FORMAT_VERSION, ROOT_INO, ResourceKind, Superblock};
use crate::state::{State, now_ns};
use crate::store::{self, Store};

/// Who is opening the datastore.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open without a host slot and write nothing to the LUN.
    pub read_only: bool,
    pub host_name: String,
    /// Stable per host: a host that crashed finds its own slot and replays its journal.
    pub host_uuid: Uuid,
}

impl OpenOptions {
    pub fn read_only() -> OpenOptions {
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        }
    }
    pub fn read_write() -> OpenOptions {
        OpenOptions::default()
    }
}

impl Default for OpenOptions {
    /// This machine's identity: host name, and a UUID from /etc/machine-id.
    fn default() -> Self {
        let host_name = nix_hostname();
        let host_uuid = std::fs::read_to_string("/etc/machine-id")
            .ok()
            .and_then(|s| Uuid::try_parse(s.trim()).ok())
            .unwrap_or_else(|| {
                let mut b = [0u8; 16];
                let h = crc32c::crc32c(host_name.as_bytes());
                b[..4].copy_from_slice(&h.to_le_bytes());
                b[4..8].copy_from_slice(&crc32c::crc32c_append(h, b"vapp").to_le_bytes());
                Uuid::from_bytes(b)
            });
        OpenOptions {
            read_only: false,
            host_name,
            host_uuid,
        }
    }
}

fn nix_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Which superblock copy the datastore was opened from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SuperblockSource {
    Primary,
    /// The primary was unusable (the reason); run fsck --repair to rewrite it.
    Backup(String),
}

/// File attributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attr {
    pub ino: u64,
    pub generation: u64,
    /// Bumped on every metadata change (cache validation for the cluster layer).
    pub version: u64,
    pub kind: Kind,
    /// Permission bits (0o7777).
    pub perm: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Bytes of datastore storage the file holds (blocks, sub-block, pointer blocks).
    pub allocated: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub crtime_ns: i64,
    pub thick: bool,
    pub vdisk: bool,
    pub block_size: u32,
}

impl Attr {
    /// st_mode: type and permission bits.
    pub fn mode(&self) -> u32 {
        self.kind.type_bits() | self.perm
    }

    fn from_unit(u: &impl InodeView, block_size: u32) -> Attr {
        Attr {
            ino: u.ino(),
            generation: u.generation(),
            version: u.version(),
            kind: u.kind().unwrap_or(Kind::File),
            perm: u.mode(),
            nlink: u.nlink(),
            uid: u.uid(),
            gid: u.gid(),
            size: u.size(),
            allocated: u.allocated(),
            atime_ns: u.atime(),
            mtime_ns: u.mtime(),
            ctime_ns: u.ctime(),
            crtime_ns: u.crtime(),
            thick: u.flags() & FLAG_THICK != 0,
            vdisk: u.flags() & FLAG_VDISK != 0,
            block_size,
        }
    }
}

/// Attribute changes; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime_ns: Option<i64>,
    pub mtime_ns: Option<i64>,
}

/// Owner of new files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
}

impl Creds {
    /// The calling process's effective ids.
    pub fn current() -> Creds {
        // SAFETY: geteuid/getegid cannot fail and touch no memory.
        unsafe {
            Creds {
                uid: libc::geteuid(),
                gid: libc::getegid(),
            }
        }
    }
}

/// A new regular file.
#[derive(Debug, Clone)]
pub struct NewFile {
    pub mode: u32,
    pub creds: Creds,
    /// Eager-zeroed: every block is allocated and zeroed when the file is extended.
    pub thick: bool,
    /// Mark as a virtual disk.
    pub vdisk: bool,
}

impl Default for NewFile {
    fn default() -> Self {
        NewFile {
            mode: 0o644,
            creds: Creds::default(),
            thick: false,
            vdisk: false,
        }
    }
}

/// One directory entry from [`Datastore::readdir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: OsString,
    pub ino: u64,
    pub kind: Kind,
    /// Pass to the next `readdir` call to continue after this entry. Stable while the
    /// entry exists.
    pub cookie: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatFs {
    pub block_size: u32,
    pub blocks: u64,
    pub blocks_free: u64,
    pub files: u64,
    pub files_free: u64,
    pub name_max: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResourceInfo {
    pub kind: ResourceKind,
    pub total: u64,
    pub free: u64,
    pub clusters: u64,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostSlotInfo {
    pub slot: u32,
    pub state: String,
    pub host_uuid: String,
    pub host_name: String,
    pub generation: u64,
    pub pid: u32,
    pub heartbeat_time_ns: i64,
}

/// What `datastore info` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub lun: String,
    pub uuid: String,
    pub label: String,
    pub format_version: u32,
    pub created_ns: i64,
    pub lun_size: u64,
    pub fs_size: u64,
    pub sector_size: u32,
    pub block_size: u32,
    pub sub_block_size: u32,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub max_file_size: u64,
    pub journal_size: u64,
    pub host_slots: u32,
    pub superblock: String,
    pub superblock_warning: Option<String>,
    pub read_only: bool,
    pub resources: Vec<ResourceInfo>,
    pub hosts: Vec<HostSlotInfo>,
}

pub(crate) struct HostInfo {
    pub uuid: Uuid,
    pub name: String,
    pub slot: u32,
    pub generation: u64,
}

pub(crate) struct Inner {
    pub lun: Arc<dyn Lun>,
    pub sb: Superblock,
    pub source: SuperblockSource,
    pub host: Option<HostInfo>,
    pub state: Mutex<State>,
    io: Mutex<HashMap<u64, Arc<RwLock<()>>>>,
    closed: AtomicBool,
}

/// An open datastore. `Send + Sync`: operations lock internally; data reads and writes of
/// already-allocated blocks run in parallel.
pub struct Datastore {
    pub(crate) inner: Arc<Inner>,
}

/// Reads and validates the superblock, falling back to the backup copy.
pub(crate) fn read_superblock(lun: &dyn Lun) -> Result<(Superblock, SuperblockSource)> {
    use crate::layout::SuperFault;
    let name = lun.name().to_string();
    let sector = lun.sector_size();
    if sector == 0 || sector as usize > UNIT || UNIT % sector as usize != 0 {
        return Err(Error::Invalid {
            object: name,
            reason: format!("sector size {sector} is not supported (512..=4096)"),
        });
    }
    if lun.size() < 2 * UNIT_U64 {
        return Err(Error::NotADatastore { lun: name });
    }
    let mut u = zero_unit();
    lun.read_at(&mut u[..], 0)?;
    let primary = Superblock::decode(&u[..], 0);
    let (sb, source) = match primary {
        Ok(sb) => (sb, SuperblockSource::Primary),
        Err(SuperFault::Newer(found)) => {
            return Err(Error::NewerVersion {
                lun: name,
                found,
                supported: FORMAT_VERSION,
            });
        }
        Err(fault) => {
            let at = align_down(lun.size(), UNIT_U64) - UNIT_U64;
            let mut b = zero_unit();
            lun.read_at(&mut b[..], at)?;
            match Superblock::decode(&b[..], at) {
                Ok(sb) => {
                    tracing::warn!(lun = %name, primary = %fault, "primary superblock unusable, using the backup copy");
                    (
                        sb,
                        SuperblockSource::Backup(format!("primary superblock: {fault}")),
                    )
                }
                Err(SuperFault::Newer(found)) => {
                    return Err(Error::NewerVersion {
                        lun: name,
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
                Err(_) if fault == SuperFault::NotASuperblock => {
                    return Err(Error::NotADatastore { lun: name });
                }
                Err(backup) => {
                    return Err(Error::Corrupt {
                        lun: name,
                        object: "superblock".into(),
                        offset: 0,
                        reason: format!("{fault}; backup at offset {at}: {backup}"),
                    });
                }
            }
        }
    };
    if lun.size() < sb.fs_size {
        return Err(Error::Truncated {
            lun: name,
            expected: sb.fs_size,
            actual: lun.size(),
        });
    }
    Ok((sb, source))
}

impl Datastore {
    /// Mounts the datastore on `lun`. Read-write opens take a heartbeat slot, replay this
    /// host's journal and finish interrupted deletes; read-only opens write nothing.
    pub fn open(lun: Arc<dyn Lun>, options: &OpenOptions) -> Result<Datastore> {
        let (sb, source) = read_superblock(&*lun)?;
        let read_only = options.read_only || lun.is_read_only();
        if read_only {
            let mut st = Store::new(lun.clone(), sb.clone());
            st.set_overlay(store::overlay(&*lun, &sb)?);
            let state = State::new(st, 0);
            return Ok(Datastore::assemble(lun, sb, source, None, state));
        }
        let (slot, generation) = take_slot(&*lun, &sb, options)?;
        let host = HostInfo {
            uuid: options.host_uuid,
            name: options.host_name.clone(),
            slot,
            generation,
        };
        // From here on the slot is ours; give it back if the rest of the mount fails.
        let mounted = (|| {
            let (replayed, seq) = store::replay(&*lun, &sb, slot, options.host_uuid)?;
            for other in 0..sb.host_slots {
                if other != slot && slot_is_free(&*lun, &sb, other)? {
                    match store::replay(&*lun, &sb, other, options.host_uuid) {
                        Ok(_) => {}
                        Err(e @ Error::Corrupt { .. }) => {
                            tracing::warn!(slot = other, error = %e, "journal of a free slot unreadable (run fsck)");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            let mut st = Store::new(lun.clone(), sb.clone());
            st.attach_journal(slot, seq, options.host_uuid);
            let orphan_off = sb.journal_area(slot) + journal::ORPHAN_UNIT * UNIT_U64;
            let raw = st.read_raw(orphan_off)?;
            let orphans =
                journal::decode_orphans(&raw, orphan_off).map_err(|f| Error::Corrupt {
                    lun: lun.name().to_string(),
                    object: format!("orphan list of host slot {slot}"),
                    offset: orphan_off,
                    reason: f.to_string(),
                })?;
            let seed = u64::from_le_bytes(
                options.host_uuid.as_bytes()[..8]
                    .try_into()
                    .unwrap_or([0; 8]),
            );
            let mut state = State::new(st, seed);
            state.orphans = orphans;
            tracing::info!(lun = %lun.name(), slot, generation, replayed, host = %options.host_name, "datastore mounted read-write");
            Ok::<_, Error>(state)
        })();
        let state = match mounted {
            Ok(s) => s,
            Err(e) => {
                let _ = free_slot(&*lun, &sb, &host);
                return Err(e);
            }
        };
        let ds = Datastore::assemble(lun, sb, source, Some(host), state);
        ds.finish_orphans()?;
        Ok(ds)
    }

    fn assemble(
        lun: Arc<dyn Lun>,
        sb: Superblock,
        source: SuperblockSource,
        host: Option<HostInfo>,
        state: State,
    ) -> Datastore {
        Datastore {
            inner: Arc::new(Inner {
                lun,
                sb,
                source,
                host,
                state: Mutex::new(state),
                io: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
            }),
        }
    }

    pub(crate) fn share(&self) -> Datastore {
        Datastore {
            inner: self.inner.clone(),
        }
    }

    /// Finishes deletes and truncates that a crash interrupted.
    fn finish_orphans(&self) -> Result<()> {
        let list = self.lock().orphans.clone();
        for orphan in list {
            tracing::info!(ino = orphan.ino(), "finishing interrupted delete/truncate");
            match orphan {
                Orphan::Unlinked { ino } => self.reap(ino)?,
                Orphan::Truncating { ino, size } => {
                    let r = self.truncate(ino, size);
                    self.write_op(|s| s.remove_orphan(ino))?;
                    match r {
                        Ok(()) | Err(Error::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    /// Commits, checkpoints the journal and frees the host slot. Fails with `Busy` while
    /// file handles or virtual-disk LUNs of this datastore are still open.
    pub fn close(self) -> Result<()> {
        let holders = Arc::strong_count(&self.inner) - 1;
        if holders > 0 {
            return Err(Error::Busy {
                object: format!("datastore {}", self.inner.sb.label),
                holder: format!("{holders} open file handle(s) or disk(s) in this process"),
                mode: "open".into(),
            });
        }
        self.inner.shutdown()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }

    pub(crate) fn io_lock(&self, ino: u64) -> Arc<RwLock<()>> {
        let mut map = self.inner.io.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(ino).or_default().clone()
    }

    /// Runs a metadata operation: on success its changes join the running transaction
    /// (committed when large), on failure they are dropped and nothing changed.
    pub(crate) fn write_op<R>(&self, f: impl FnOnce(&mut State) -> Result<R>) -> Result<R> {
        let mut s = self.lock();
        s.st.check_writable()?;
        match f(&mut s) {
            Ok(v) => {
                s.st.end_op(true);
                if s.st.should_commit() {
                    s.st.commit()?;
                }
                Ok(v)
            }
            Err(e) => {
                s.st.end_op(false);
                s.forget_derived();
                Err(e)
            }
        }
    }

    pub(crate) fn read_op<R>(&self, f: impl FnOnce(&mut State) -> Result<R>) -> Result<R> {
        let mut s = self.lock();
        f(&mut s)
    }

    pub fn lun(&self) -> &Arc<dyn Lun> {
        &self.inner.lun
    }

    pub fn superblock(&self) -> &Superblock {
        &self.inner.sb
    }

    pub fn superblock_source(&self) -> &SuperblockSource {
        &self.inner.source
    }

    pub fn is_read_only(&self) -> bool {
        self.inner.host.is_none()
    }

    /// Heartbeat slot held by this open (None when read-only).
    pub fn host_slot(&self) -> Option<u32> {
        self.inner.host.as_ref().map(|h| h.slot)
    }

    pub fn max_file_size(&self) -> u64 {
        self.inner.sb.max_file_size()
    }

    /// Commits metadata and flushes the LUN: everything written so far is durable.
    pub fn sync(&self) -> Result<()> {
        let mut s = self.lock();
        if !s.st.writable() {
            return Ok(());
        }
        s.st.check_writable()?;
        s.st.commit()?;
        self.inner.lun.flush()?;
        Ok(())
    }

    /// Makes a file's data and metadata durable.
    pub fn fsync(&self, ino: u64) -> Result<()> {
        self.getattr(ino)?;
        self.sync()
    }

    // ---- namespace ---------------------------------------------------------------------

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let bs = self.inner.sb.block_size;
        self.read_op(|s| Ok(Attr::from_unit(&s.inode(ino)?, bs)))
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        let bs = self.inner.sb.block_size;
        self.read_op(|s| {
            let d = dir_inode(s, parent)?;
            let slot = s
                .dir_lookup(&d, name)?
                .ok_or_else(|| not_found(parent, name))?;
            Ok(Attr::from_unit(&s.inode(slot.ino)?, bs))
        })
    }

    /// The next batch of entries after `after` (0 to start), "." and ".." first. An empty
    /// batch is the end.
    pub fn readdir(&self, ino: u64, after: u64) -> Result<Vec<DirEntry>> {
        const BATCH: usize = 512;
        self.read_op(|s| {
            let d = dir_inode(s, ino)?;
            let mut out = Vec::new();
            if after < 1 {
                out.push(DirEntry {
                    name: ".".into(),
                    ino,
                    kind: Kind::Dir,
                    cookie: 1,
                });
            }
            if after < 2 {
                out.push(DirEntry {
                    name: "..".into(),
                    ino: if ino == ROOT_INO {
                        ROOT_INO
                    } else {
                        d.parent()
                    },
                    kind: Kind::Dir,
                    cookie: 2,
                });
            }
            let first = if after > 2 { (after - 1) / UNIT_U64 } else { 0 };
            for k in first..d.size() / UNIT_U64 {
                let (_, _, recs) = s.dir_unit(&d, k)?;
                for r in recs.iter().filter(|r| r.ino != 0) {
                    let cookie = k * UNIT_U64 + r.off as u64 + 1;
                    if cookie <= after {
                        continue;
                    }
                    out.push(DirEntry {
                        name: OsStr::from_bytes(&r.name).to_os_string(),
                        ino: r.ino,
                        kind: Kind::from_code(r.kind).unwrap_or(Kind::File),
                        cookie,
                    });
                }
                if out.len() >= BATCH {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// Creates a regular file.
    pub fn create(&self, parent: u64, name: &OsStr, new: &NewFile) -> Result<Attr> {
        let bs = self.inner.sb.block_size;
        self.write_op(|s| {
            let (ino, generation) = prepare_entry(s, parent, name)?;
            let now = now_ns();
            let mut i = Inode::new(
                ino,
                generation,
                Kind::File,
                new.mode,
                new.creds.uid,
                new.creds.gid,
                parent,
                now,
            );
            let mut flags = 0;
            if new.thick {
                flags |= FLAG_THICK;
                i.set_addr_mode(AddrMode::Tree);
            }
            if new.vdisk {
                flags |= FLAG_VDISK;
            }
            i.set_flags(flags);
            link_entry(s, parent, name, ino, Kind::File, false)?;
            let attr = Attr::from_unit(&i, bs);
            s.put_inode(i);
            Ok(attr)
        })
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, creds: Creds) -> Result<Attr> {
        let bs = self.inner.sb.block_size;
        self.write_op(|s| {
            let (ino, generation) = prepare_entry(s, parent, name)?;
            let sub = s.alloc(
                ResourceKind::SubBlock,
                None,
                &format!("directory {:?}", name.to_string_lossy()),
            )?;
            let now = now_ns();
            let mut i = Inode::new(
                ino,
                generation,
                Kind::Dir,
                mode,
                creds.uid,
                creds.gid,
                parent,
                now,
            );
            i.set_addr_mode(AddrMode::SubBlock);
            i.set_sub_block(sub + 1);
            i.set_size(UNIT_U64);
            i.set_allocated(u64::from(s.sb().sub_block_size));
            let off = s.sb().sub_blocks.resource_offset(sub);
            s.st.put(off, dir::new_unit(ino, 0, off));
            link_entry(s, parent, name, ino, Kind::Dir, true)?;
            let attr = Attr::from_unit(&i, bs);
            s.put_inode(i);
            Ok(attr)
        })
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &OsStr, creds: Creds) -> Result<Attr> {
        let bs = self.inner.sb.block_size;
        let bytes = target.as_bytes();
        if bytes.is_empty() || bytes.len() > inode::INLINE_MAX || bytes.contains(&0) {
            return Err(Error::NameTooLong {
                name: target.to_string_lossy().into_owned(),
            });
        }
        self.write_op(|s| {
            let (ino, generation) = prepare_entry(s, parent, name)?;
            let mut i = Inode::new(
                ino,
                generation,
                Kind::Symlink,
                0o777,
                creds.uid,
                creds.gid,
                parent,
                now_ns(),
            );
            i.inline_mut()[..bytes.len()].copy_from_slice(bytes);
            i.set_size(bytes.len() as u64);
            link_entry(s, parent, name, ino, Kind::Symlink, false)?;
            let attr = Attr::from_unit(&i, bs);
            s.put_inode(i);
            Ok(attr)
        })
    }

    pub fn readlink(&self, ino: u64) -> Result<OsString> {
        self.read_op(|s| {
            let i = s.inode(ino)?;
            if i.kind() != Some(Kind::Symlink) {
                return Err(Error::Invalid {
                    object: format!("inode {ino}"),
                    reason: "not a symbolic link".into(),
                });
            }
            Ok(OsStr::from_bytes(&i.inline()[..i.size() as usize]).to_os_string())
        })
    }

    /// Hard link: another name for a file (not a directory).
    pub fn link(&self, ino: u64, parent: u64, name: &OsStr) -> Result<Attr> {
        let bs = self.inner.sb.block_size;
        self.write_op(|s| {
            let u = s.inode(ino)?;
            if u.kind() == Some(Kind::Dir) {
                return Err(Error::NotPermitted {
                    object: format!("inode {ino}"),
                    reason: "hard links to directories are not allowed".into(),
                });
            }
            let d = dir_inode(s, parent)?;
            dir::check_name(name)?;
            if s.dir_lookup(&d, name)?.is_some() {
                return Err(exists(parent, name));
            }
            let kind = u.kind().unwrap_or(Kind::File);
            link_entry(s, parent, name, ino, kind, false)?;
            let mut i = Inode::from_unit(&u);
            i.set_nlink(u.nlink() + 1);
            i.set_times(None, None, now_ns());
            let attr = Attr::from_unit(&i, bs);
            s.put_inode(i);
            Ok(attr)
        })
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        let reap = self.write_op(|s| {
            let d = dir_inode(s, parent)?;
            let slot = s
                .dir_lookup(&d, name)?
                .ok_or_else(|| not_found(parent, name))?;
            if slot.kind == Kind::Dir {
                return Err(Error::IsADirectory {
                    object: describe(parent, name),
                });
            }
            s.dir_remove(&d, name)?;
            touch_dir(s, parent, 0)?;
            drop_link(s, slot.ino)
        })?;
        if let Some(ino) = reap {
            self.reap(ino)?;
        }
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        let reap = self.write_op(|s| {
            let d = dir_inode(s, parent)?;
            let slot = s
                .dir_lookup(&d, name)?
                .ok_or_else(|| not_found(parent, name))?;
            if slot.kind != Kind::Dir {
                return Err(Error::NotADirectory {
                    object: describe(parent, name),
                });
            }
            let child = s.inode(slot.ino)?;
            if s.dir_len(&child)? > 0 {
                return Err(Error::NotEmpty {
                    object: describe(parent, name),
                });
            }
            s.dir_remove(&d, name)?;
            touch_dir(s, parent, -1)?;
            drop_link(s, slot.ino)
        })?;
        if let Some(ino) = reap {
            self.reap(ino)?;
        }
        Ok(())
    }

    /// Atomic rename, replacing an existing target (which is then unlinked in the same
    /// transaction). With `no_replace`, an existing target is an error.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<()> {
        let reap = self.write_op(|s| {
            let d = dir_inode(s, parent)?;
            let src = s
                .dir_lookup(&d, name)?
                .ok_or_else(|| not_found(parent, name))?;
            let nd = dir_inode(s, new_parent)?;
            dir::check_name(new_name)?;
            let dst = s.dir_lookup(&nd, new_name)?;
            if let Some(dst) = dst {
                if no_replace {
                    return Err(exists(new_parent, new_name));
                }
                if dst.ino == src.ino {
                    return Ok(None);
                }
                match (src.kind == Kind::Dir, dst.kind == Kind::Dir) {
                    (true, false) => {
                        return Err(Error::NotADirectory {
                            object: describe(new_parent, new_name),
                        });
                    }
                    (false, true) => {
                        return Err(Error::IsADirectory {
                            object: describe(new_parent, new_name),
                        });
                    }
                    (true, true) => {
                        let victim = s.inode(dst.ino)?;
                        if s.dir_len(&victim)? > 0 {
                            return Err(Error::NotEmpty {
                                object: describe(new_parent, new_name),
                            });
                        }
                    }
                    (false, false) => {}
                }
            }
            if src.kind == Kind::Dir {
                // A directory may not move below itself.
                let mut at = new_parent;
                while at != ROOT_INO {
                    if at == src.ino {
                        return Err(Error::Invalid {
                            object: describe(parent, name),
                            reason: "cannot move a directory into itself".into(),
                        });
                    }
                    at = s.inode(at)?.parent();
                }
            }
            let is_dir = src.kind == Kind::Dir;
            let mut reap = None;
            match dst {
                Some(dst) => {
                    s.dir_retarget(&nd, new_name, src.ino, src.kind)?;
                    if dst.kind == Kind::Dir {
                        touch_dir(s, new_parent, -1)?;
                    }
                    reap = drop_link(s, dst.ino)?;
                }
                None => link_entry(s, new_parent, new_name, src.ino, src.kind, false)?,
            }
            let d = s.inode(parent)?;
            s.dir_remove(&d, name)?;
            let now = now_ns();
            if is_dir && parent != new_parent {
                touch_dir(s, parent, -1)?;
                touch_dir(s, new_parent, 1)?;
            } else {
                touch_dir(s, parent, 0)?;
                if parent != new_parent {
                    touch_dir(s, new_parent, 0)?;
                }
            }
            let mut moved = Inode::from_unit(&s.inode(src.ino)?);
            if is_dir {
                moved.set_parent(new_parent);
            }
            moved.set_times(None, None, now);
            s.put_inode(moved);
            Ok(reap)
        })?;
        if let Some(ino) = reap {
            self.reap(ino)?;
        }
        Ok(())
    }

    pub fn setattr(&self, ino: u64, set: &SetAttr) -> Result<Attr> {
        if let Some(size) = set.size {
            self.truncate(ino, size)?;
        }
        let bs = self.inner.sb.block_size;
        self.write_op(|s| {
            let mut i = Inode::from_unit(&s.inode(ino)?);
            if let Some(mode) = set.mode {
                i.set_mode(mode);
            }
            if set.uid.is_some() || set.gid.is_some() {
                i.set_owner(set.uid.unwrap_or(i.uid()), set.gid.unwrap_or(i.gid()));
            }
            i.set_times(set.atime_ns, set.mtime_ns, now_ns());
            let attr = Attr::from_unit(&i, bs);
            s.put_inode(i);
            Ok(attr)
        })
    }

    /// Frees an unlinked inode once nothing holds it open.
    pub(crate) fn reap(&self, ino: u64) -> Result<()> {
        let io = self.io_lock(ino);
        let _guard = io.write().unwrap_or_else(|e| e.into_inner());
        self.write_op(|s| {
            if s.locks.get(&ino).is_some_and(|h| !h.is_empty()) {
                return Ok(());
            }
            let u = match s.inode(ino) {
                Ok(u) => u,
                Err(Error::NotFound { .. }) => return s.remove_orphan(ino),
                Err(e) => return Err(e),
            };
            if u.nlink() > 0 {
                return s.remove_orphan(ino);
            }
            let mut i = Inode::from_unit(&u);
            release_storage(s, &mut i)?;
            s.free_inode(ino, i.generation())?;
            s.remove_orphan(ino)
        })
    }

    pub fn statfs(&self) -> Result<StatFs> {
        self.read_op(|s| {
            let sb = s.sb().clone();
            Ok(StatFs {
                block_size: sb.block_size,
                blocks: sb.file_blocks.count,
                blocks_free: s.free_count(ResourceKind::FileBlock)?,
                files: sb.inodes.count,
                files_free: s.free_count(ResourceKind::Inode)?,
                name_max: dir::NAME_MAX as u32,
            })
        })
    }

    pub fn info(&self) -> Result<Info> {
        let lun = &self.inner.lun;
        let sb = &self.inner.sb;
        let mut resources = Vec::new();
        let mut free_blocks = 0;
        self.read_op(|s| {
            for kind in ResourceKind::ALL {
                let a = *sb.area(kind);
                let free = s.free_count(kind)?;
                if kind == ResourceKind::FileBlock {
                    free_blocks = free;
                }
                resources.push(ResourceInfo {
                    kind,
                    total: a.count,
                    free,
                    clusters: a.clusters(),
                    size: a.size,
                });
            }
            Ok(())
        })?;
        let mut hosts = Vec::new();
        let mut region = vec![0u8; sb.host_slots as usize * UNIT];
        lun.read_at(&mut region, sb.heartbeat_offset)?;
        for slot in 0..sb.host_slots {
            let at = slot as usize * UNIT;
            let off = sb.heartbeat_slot_offset(slot);
            match Heartbeat::decode(&region[at..at + UNIT], off, slot) {
                Ok(Some(hb)) => hosts.push(HostSlotInfo {
                    slot,
                    state: match hb.state {
                        SlotState::Live => "live".into(),
                        SlotState::Free => "free".into(),
                    },
                    host_uuid: hb.host.to_string(),
                    host_name: hb.hostname,
                    generation: hb.generation,
                    pid: hb.pid,
                    heartbeat_time_ns: hb.time_ns,
                }),
                Ok(None) => {}
                Err(why) => hosts.push(HostSlotInfo {
                    slot,
                    state: format!("damaged: {why}"),
                    host_uuid: String::new(),
                    host_name: String::new(),
                    generation: 0,
                    pid: 0,
                    heartbeat_time_ns: 0,
                }),
            }
        }
        let (superblock, superblock_warning) = match &self.inner.source {
            SuperblockSource::Primary => ("primary".to_string(), None),
            SuperblockSource::Backup(why) => (
                "backup".to_string(),
                Some(format!(
                    "{why}; opened from the backup copy, run `vapp datastore fsck --repair`"
                )),
            ),
        };
        Ok(Info {
            lun: lun.name().to_string(),
            uuid: sb.uuid.to_string(),
            label: sb.label.clone(),
            format_version: sb.version,
            created_ns: sb.created_ns,
            lun_size: lun.size(),
            fs_size: sb.fs_size,
            sector_size: lun.sector_size(),
            block_size: sb.block_size,
            sub_block_size: sb.sub_block_size,
            capacity_bytes: sb.file_blocks.count * u64::from(sb.block_size),
            free_bytes: free_blocks * u64::from(sb.block_size),
            max_file_size: sb.max_file_size(),
            journal_size: sb.journal_size,
            host_slots: sb.host_slots,
            superblock,
            superblock_warning,
            read_only: self.is_read_only(),
            resources,
            hosts,
        })
    }
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shutdown(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let Some(host) = &self.host else {
            return Ok(());
        };
        let result = {
            let mut s = self.lock();
            if s.st.check_writable().is_ok() {
                s.st.sync()
            } else {
                Ok(())
            }
        };
        // Keep the slot when metadata could not be made durable: the next open of this host
        // must find it and replay the journal.
        result?;
        free_slot(&*self.lun, &self.sb, host)?;
        tracing::info!(lun = %self.lun.name(), slot = host.slot, "datastore unmounted");
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(lun = %self.lun.name(), error = %e, "datastore close failed; the journal will be replayed at next open");
        }
    }
}

// ---- helpers shared by the namespace operations -----------------------------------------

pub(crate) fn describe(parent: u64, name: &OsStr) -> String {
    format!("{:?} in directory inode {parent}", name.to_string_lossy())
}

fn not_found(parent: u64, name: &OsStr) -> Error {
    Error::NotFound {
        object: describe(parent, name),
    }
}

fn exists(parent: u64, name: &OsStr) -> Error {
    Error::Exists {
        object: describe(parent, name),
    }
}

pub(crate) fn dir_inode(s: &mut State, ino: u64) -> Result<Arc<Unit>> {
    let d = s.inode(ino)?;
    if d.kind() != Some(Kind::Dir) {
        return Err(Error::NotADirectory {
            object: format!("inode {ino}"),
        });
    }
    Ok(d)
}

/// Checks the parent and the name and allocates the new descriptor.
fn prepare_entry(s: &mut State, parent: u64, name: &OsStr) -> Result<(u64, u64)> {
    dir::check_name(name)?;
    let d = dir_inode(s, parent)?;
    if s.dir_lookup(&d, name)?.is_some() {
        return Err(exists(parent, name));
    }
    s.alloc_inode()
}

/// Adds the entry and updates the parent's times (and link count for a new subdirectory).
fn link_entry(
    s: &mut State,
    parent: u64,
    name: &OsStr,
    ino: u64,
    kind: Kind,
    new_dir: bool,
) -> Result<()> {
    let mut d = Inode::from_unit(&dir_inode(s, parent)?);
    s.dir_insert(&mut d, name, ino, kind)?;
    let now = now_ns();
    d.set_times(None, Some(now), now);
    if new_dir {
        d.set_nlink(d.nlink() + 1);
    }
    s.put_inode(d);
    Ok(())
}

fn touch_dir(s: &mut State, ino: u64, nlink_delta: i32) -> Result<()> {
    let mut d = Inode::from_unit(&s.inode(ino)?);
    let now = now_ns();
    d.set_times(None, Some(now), now);
    d.set_nlink((d.nlink() as i64 + i64::from(nlink_delta)).max(0) as u32);
    s.put_inode(d);
    Ok(())
}

/// Drops one name of `ino`. When none is left the inode becomes an orphan; returns it when
/// no handle holds it, so the caller frees it right after this transaction.
fn drop_link(s: &mut State, ino: u64) -> Result<Option<u64>> {
    let u = s.inode(ino)?;
    let mut i = Inode::from_unit(&u);
    let left = if u.kind() == Some(Kind::Dir) {
        0
    } else {
        u.nlink().saturating_sub(1)
    };
    i.set_nlink(left);
    i.set_times(None, None, now_ns());
    s.put_inode(i);
    if left > 0 {
        return Ok(None);
    }
    s.add_orphan(Orphan::Unlinked { ino })?;
    let open = s.locks.get(&ino).is_some_and(|h| !h.is_empty());
    Ok(if open { None } else { Some(ino) })
}

/// Frees everything an inode's data occupies, leaving it empty and inline.
pub(crate) fn release_storage(s: &mut State, i: &mut Inode) -> Result<()> {
    match i.addr_mode() {
        Some(AddrMode::SubBlock) => {
            let index = s.sub_block_offset(i.ino(), i.sub_block())?;
            let sb_index = (index - s.sb().sub_blocks.area_offset) / s.sb().sub_blocks.size;
            s.release(ResourceKind::SubBlock, sb_index)?;
        }
        Some(AddrMode::Tree) => s.trim(i, 0)?,
        _ => {}
    }
    i.set_addr_mode(AddrMode::Inline);
    i.set_size(0);
    i.set_allocated(0);
    Ok(())
}

/// Takes a heartbeat slot: ours from a previous run if there is one, else a free one.
fn take_slot(lun: &dyn Lun, sb: &Superblock, options: &OpenOptions) -> Result<(u32, u64)> {
    let mut region = vec![0u8; sb.host_slots as usize * UNIT];
    lun.read_at(&mut region, sb.heartbeat_offset)?;
    let mut mine = None;
    let mut free = None;
    for slot in 0..sb.host_slots {
        let at = slot as usize * UNIT;
        let off = sb.heartbeat_slot_offset(slot);
        match Heartbeat::decode(&region[at..at + UNIT], off, slot) {
            Ok(Some(hb)) if hb.host == options.host_uuid => {
                if hb.state == SlotState::Live {
                    tracing::warn!(
                        slot,
                        "this host's slot is still live: recovering after a crash"
                    );
                }
                mine = Some((slot, hb.generation));
                break;
            }
            Ok(Some(hb)) if hb.state == SlotState::Free => {
                free.get_or_insert((slot, hb.generation));
            }
            Ok(None) => {
                free.get_or_insert((slot, 0));
            }
            Ok(Some(_)) => {}
            Err(why) => {
                tracing::warn!(slot, error = %why, "damaged heartbeat slot skipped");
            }
        }
    }
    let Some((slot, generation)) = mine.or(free) else {
        return Err(Error::NoHostSlot {
            lun: lun.name().to_string(),
            slots: sb.host_slots,
        });
    };
    let generation = generation + 1;
    let hb = Heartbeat {
        slot,
        state: SlotState::Live,
        host: options.host_uuid,
        hostname: options.host_name.clone(),
        generation,
        counter: 0,
        time_ns: now_ns(),
        pid: std::process::id(),
    };
    let off = sb.heartbeat_slot_offset(slot);
    lun.write_at(&hb.encode(off)[..], off)?;
    lun.flush()?;
    Ok((slot, generation))
}

fn slot_is_free(lun: &dyn Lun, sb: &Superblock, slot: u32) -> Result<bool> {
    let off = sb.heartbeat_slot_offset(slot);
    let mut u = zero_unit();
    lun.read_at(&mut u[..], off)?;
    Ok(matches!(
        Heartbeat::decode(&u[..], off, slot),
        Ok(None)
            | Ok(Some(Heartbeat {
                state: SlotState::Free,
                ..
            }))
    ))
}

fn free_slot(lun: &dyn Lun, sb: &Superblock, host: &HostInfo) -> Result<()> {
    let hb = Heartbeat {
        slot: host.slot,
        state: SlotState::Free,
        host: host.uuid,
        hostname: host.name.clone(),
        generation: host.generation,
        counter: 0,
        time_ns: now_ns(),
        pid: 0,
    };
    let off = sb.heartbeat_slot_offset(host.slot);
    lun.write_at(&hb.encode(off)[..], off)?;
    lun.flush()?;
    Ok(())
}
