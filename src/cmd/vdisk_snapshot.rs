//! Snapshots of virtual disks inside a datastore (`vapp -d DS snapshot ... PATH`,
//! `PATH@NAME`, `vm snapshot`), and of virtual-mode raw device mappings, whose LUN is the
//! source (a physical-mode mapping is refused: the guest reaches its device directly).
//!
//! A disk's sessions live in a pool that is itself a virtual disk beside it,
//! `/vms/a/.disk0.vdisk.snap` ([`vmfs::snapshot_pool_path`]), whose data area holds a quarter
//! of the disk's size ([`pool_size`]). The pool is thick, reserved whole at the first
//! snapshot as an array's reserved LUN pool is: a copy-on-first-write then never needs
//! space from the datastore, so a full datastore cannot fail a guest's write; only the
//! pool's own slots run out, and then the engine invalidates sessions and the write goes on. While a
//! disk has sessions its inode is flagged as a snapshot source (a mapping's cannot be, so for
//! a mapping the flagged pool beside it says it has sessions) and the pool's as a pool:
//! vmfs then refuses to open either for writing except through
//! [`vmfs::Datastore::open_lun_through_engine`], and refuses to remove, rename or replace
//! them, so every writer (a VM, an export, a rollback) goes through the copy-on-first-write
//! engine. Deleting the last session removes the pool and the flag.
//!
//! Protection is set up in an order that a crash at any point leaves safe: the pool file
//! is created and flagged, then formatted, then the disk is flagged, then the first session
//! is taken. A pool found without a flagged disk holds no session (no session is taken
//! before the flag) and is removed and made again by the next snapshot.
//!
//! Serving `PATH@NAME` (export, a VM disk) takes the disk's and the pool's locks: while a
//! VM or an export holds the disk exclusively its engine state is only in that process, so
//! that open is refused naming the holder. Copying a snapshot out ([`read_session_unlocked`],
//! `vapp get`) needs no lock and works while a VM writes the disk: it reads a stretch of the
//! disk first and the pool's table after, from a fresh mount. Copy-on-first-write makes a
//! chunk's copy and its table entry durable before the disk's write, so a chunk the writer
//! changed before the disk was read has its copy in that table, and a chunk without one
//! still held the snapshot's data when it was read.

use std::sync::Arc;

use anyhow::{Context, bail};
use lun::Lun;
use snapshot::{PoolOptions, PoolUsage, SessionInfo, Snapshots};
use vmfs::{Access, Attr, Creds, Datastore, Kind, SnapshotRole};

const MIB: u64 = 1 << 20;

/// Size of a new pool for a disk of `disk_size` bytes: a quarter of the disk for copies,
/// plus the pool's metadata (two 32 KiB headers, a 32-byte table entry per slot and nine
/// bitmaps of one bit per disk chunk), rounded up to whole MiB, at least 1 MiB of slots.
pub fn pool_size(disk_size: u64) -> u64 {
    let chunk = u64::from(snapshot::DEFAULT_CHUNK_SIZE);
    let data = (disk_size / 4).max(MIB);
    let slots = data.div_ceil(chunk);
    let bitmap = disk_size.div_ceil(chunk).div_ceil(8).next_multiple_of(4096);
    let metadata = 64 * 1024 + (slots * 32).next_multiple_of(4096) + 9 * bitmap + chunk;
    (data + metadata).next_multiple_of(MIB)
}

/// A datastore path naming a disk's session, `PATH@NAME`, split; `None` for a plain path
/// (also when a file of that very name exists).
pub fn split_session<'a>(ds: &Datastore, path: &'a str) -> Option<(&'a str, &'a str)> {
    let (disk, name) = path.rsplit_once('@')?;
    if name.is_empty() || name.contains('/') || ds.stat_path(path).is_ok() {
        return None;
    }
    Some((disk, name))
}

fn disk_attr(ds: &Datastore, path: &str) -> anyhow::Result<Attr> {
    let attr = ds.stat_path(path)?;
    if attr.kind == Kind::Rdm {
        let mapping = rdm::show(ds, path)?;
        if mapping.mode == rdm::Mode::Physical {
            bail!(
                "{path}: a physical-mode raw device mapping: the guest reaches the device \
                 directly, so vapp takes no snapshot of it; use the array's snapshots, or map \
                 the LUN in virtual mode"
            );
        }
        return Ok(attr);
    }
    if attr.snapshot_pool {
        bail!("{path}: a snapshot pool; snapshot the virtual disk it is named after");
    }
    if attr.kind != Kind::File || attr.size == 0 || attr.size % 512 != 0 {
        bail!(
            "{path}: not a virtual disk (a regular file whose size is a non-zero multiple of 512); only virtual disks have snapshots"
        );
    }
    Ok(attr)
}

fn pool_access(source: &dyn Lun) -> Access {
    if source.is_read_only() {
        Access::ReadOnly
    } else {
        Access::Exclusive
    }
}

/// Opens the disk at `path` for the snapshot engine to sit on: a virtual disk's file
/// through the engine's door (see [`attach`]), or a virtual-mode raw device
/// mapping's LUN under the mapping file's lock (`vm start` presents a physical-mode one
/// itself, with the device's serial and discard).
pub fn open_disk(ds: &Datastore, path: &str, access: Access) -> anyhow::Result<Arc<dyn Lun>> {
    if ds.stat_path(path)?.kind == Kind::Rdm {
        return Ok(Arc::new(rdm::open(ds, path, access)?));
    }
    Ok(ds.open_lun_through_engine(path, access)?)
}

/// The engine of the disk at `path`, whose LUN `source` the caller opened with
/// [`Datastore::open_lun_through_engine`]. A disk without sessions gets a pool when
/// `create` is set; otherwise `None`.
pub fn attach(
    ds: &Datastore,
    path: &str,
    source: Arc<dyn Lun>,
    create: bool,
) -> anyhow::Result<Option<Snapshots>> {
    let attr = disk_attr(ds, path)?;
    let pool_path = vmfs::snapshot_pool_path(path);
    if has_sessions(ds, path, &attr) {
        let pool = ds
            .open_lun_through_engine(&pool_path, pool_access(&*source))
            .with_context(|| format!("{path}: its snapshot pool"))?;
        let snaps = Snapshots::open(source, pool)
            .with_context(|| format!("{path}: opening its snapshot pool {pool_path}"))?;
        return Ok(Some(snaps));
    }
    if !create {
        return Ok(None);
    }
    if source.is_read_only() {
        bail!("{path}: opened read-only; a first snapshot needs it writable");
    }
    match ds.stat_path(&pool_path) {
        Ok(old) if old.snapshot_pool => {
            // Left by a crash before the disk was flagged: it holds no session.
            tracing::info!(
                path,
                pool = pool_path,
                "removing an unfinished snapshot pool"
            );
            remove_pool(ds, &pool_path)?;
        }
        Ok(_) => bail!(
            "{path}: {pool_path} exists and is not its snapshot pool; move it away to snapshot this disk"
        ),
        Err(vmfs::Error::NotFound { .. }) => {}
        Err(e) => return Err(e).with_context(|| pool_path.clone()),
    }
    let made = ds
        .create_vdisk(&pool_path, pool_size(attr.size), true, Creds::current())
        .with_context(|| format!("{path}: creating its snapshot pool"))?;
    let formatted = (|| {
        ds.set_snapshot_role(made.ino, SnapshotRole::Pool)?;
        ds.fsync(made.ino)?;
        let pool = ds.open_lun_through_engine(&pool_path, Access::Exclusive)?;
        let snaps = Snapshots::create(source, pool, PoolOptions::default())?;
        if attr.kind == Kind::File {
            ds.set_snapshot_role(attr.ino, SnapshotRole::Source)?;
            ds.fsync(attr.ino)?;
        }
        anyhow::Ok(snaps)
    })();
    match formatted {
        Ok(snaps) => {
            tracing::info!(
                path,
                pool = pool_path,
                size = made.size,
                "snapshot pool created"
            );
            Ok(Some(snaps))
        }
        Err(e) => {
            if let Err(cleanup) = remove_pool(ds, &pool_path) {
                tracing::warn!(path, error = %cleanup, "cannot remove the unfinished snapshot pool; the next snapshot removes it");
            }
            Err(e.context(format!("{path}: making its snapshot pool {pool_path}")))
        }
    }
}

fn remove_pool(ds: &Datastore, pool_path: &str) -> anyhow::Result<()> {
    let attr = ds.stat_path(pool_path)?;
    ds.set_snapshot_role(attr.ino, SnapshotRole::None)?;
    ds.remove_path(pool_path, false)?;
    Ok(())
}

/// Once a disk has no session left, removes its pool and its protection (the engine is
/// given up first). Returns whether it did.
pub fn release_if_empty(ds: &Datastore, path: &str, snaps: Snapshots) -> anyhow::Result<bool> {
    if !snaps.list().is_empty() || snaps.rollback_progress().is_some() {
        return Ok(false);
    }
    drop(snaps);
    let attr = ds.stat_path(path)?;
    // The disk first: a crash then leaves an unflagged pool, which the next snapshot
    // replaces.
    if attr.kind == Kind::File {
        ds.set_snapshot_role(attr.ino, SnapshotRole::None)?;
        ds.fsync(attr.ino)?;
    }
    remove_pool(ds, &vmfs::snapshot_pool_path(path))?;
    tracing::info!(path, "last snapshot deleted: pool removed");
    Ok(true)
}

/// A protected disk's engine with its LUN opened writable through it, for commands that
/// change it.
pub fn open_engine(ds: &Datastore, path: &str) -> anyhow::Result<Snapshots> {
    let attr = disk_attr(ds, path)?;
    if !has_sessions(ds, path, &attr) {
        bail!("{path}: has no snapshots");
    }
    let source = open_disk(ds, path, Access::Exclusive).map_err(busy_hint)?;
    attach(ds, path, source, false)?.with_context(|| format!("{path}: has no snapshots"))
}

/// Whether the disk at `path` has snapshot sessions, so every writer goes through their
/// engine. A virtual disk's inode carries the flag; a mapping's inode cannot (vmfs flags
/// only regular files), so the pool beside it says it.
fn has_sessions(ds: &Datastore, path: &str, attr: &Attr) -> bool {
    if attr.kind == Kind::Rdm {
        return ds
            .stat_path(&vmfs::snapshot_pool_path(path))
            .is_ok_and(|pool| pool.snapshot_pool);
    }
    attr.snapshot_source
}

/// Adds advice to an error that carries a lock conflict (vmfs's, or a mapping's).
fn busy_hint(e: anyhow::Error) -> anyhow::Error {
    let busy = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<vmfs::Error>(),
            Some(vmfs::Error::Busy { .. })
        ) || matches!(
            cause.downcast_ref::<rdm::Error>(),
            Some(rdm::Error::Vmfs(vmfs::Error::Busy { .. }))
        )
    });
    if busy { e.context(BUSY_HINT) } else { e }
}

const BUSY_HINT: &str =
    "a VM or an export is writing this disk: stop it, or snapshot a VM through `vapp vm snapshot`";

/// Runs `body` on the datastore `spec` mounted read-write (a short-lived host), closing
/// it cleanly however `body` ends.
fn with_datastore<T>(
    spec: &str,
    read_only: bool,
    body: impl FnOnce(&Datastore) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let options = if read_only {
        vmfs::OpenOptions::read_only()
    } else {
        vmfs::OpenOptions::read_write()
    };
    let ds = super::datastore::open_datastore(spec, &options)?;
    let out = body(&ds);
    let closed = ds.close().context("closing the datastore");
    let out = out?;
    closed?;
    Ok(out)
}

/// Takes session `name` of the virtual disk at `path`, making its pool on the first one.
/// Refused, changing nothing, while a VM or an export writes the disk (`vm snapshot` takes
/// a running VM's snapshots).
pub fn create(ds: &str, path: &str, name: &str, writable: bool) -> anyhow::Result<SessionInfo> {
    with_datastore(ds, false, |ds| {
        disk_attr(ds, path)?;
        let source = open_disk(ds, path, Access::Exclusive).map_err(busy_hint)?;
        let snaps = attach(ds, path, source, true)?
            .with_context(|| format!("{path}: no snapshot engine"))?;
        match snaps.create_session(name, writable) {
            Ok(info) => Ok(info),
            Err(e) => {
                release_if_empty(ds, path, snaps)?;
                Err(anyhow::Error::new(e).context(format!("{path}: snapshot {name}")))
            }
        }
    })
}

/// The disk's sessions, oldest first, and its pool's use. A disk without snapshots has
/// none and an empty pool. Read without locks, as `ls` reads, so it works while a VM runs.
pub fn list(ds: &str, path: &str) -> anyhow::Result<(Vec<SessionInfo>, PoolUsage)> {
    with_datastore(ds, true, |ds| {
        let attr = disk_attr(ds, path)?;
        if !has_sessions(ds, path, &attr) {
            return Ok((
                Vec::new(),
                PoolUsage {
                    chunk_size: snapshot::DEFAULT_CHUNK_SIZE,
                    used: 0,
                    total: 0,
                },
            ));
        }
        let source = open_disk(ds, path, Access::ReadOnly)?;
        let snaps = attach(ds, path, source, false)?
            .with_context(|| format!("{path}: has no snapshots"))?;
        Ok((snaps.list(), snaps.usage()))
    })
}

/// Deletes session `name`; deleting the last one removes the pool and the disk's
/// protection.
pub fn delete(ds: &str, path: &str, name: &str) -> anyhow::Result<()> {
    with_datastore(ds, false, |ds| {
        let snaps = open_engine(ds, path)?;
        snaps
            .delete_session(name)
            .with_context(|| format!("{path}: snapshot {name}"))?;
        release_if_empty(ds, path, snaps)?;
        Ok(())
    })
}

/// Returns the disk to session `name`'s point in time and waits until it is copied back.
/// Refused while a VM or an export writes the disk.
pub fn rollback(ds: &str, path: &str, name: &str) -> anyhow::Result<()> {
    with_datastore(ds, false, |ds| {
        let snaps = open_engine(ds, path)?;
        rollback_engine(path, &snaps, name)
    })
}

pub fn rollback_engine(path: &str, snaps: &Snapshots, name: &str) -> anyhow::Result<()> {
    snaps
        .rollback(name)
        .with_context(|| format!("{path}: rolling back to snapshot {name}"))?;
    snaps
        .wait_rollback()
        .with_context(|| format!("{path}: rolling back to snapshot {name}"))?;
    Ok(())
}

/// Opens a datastore file for serving (export): `PATH@NAME` is the session (read-only
/// unless it is a writable session and `access` writes), a disk with snapshots is its
/// source through the engine, a raw device mapping its LUN, any other file as it is. The returned attributes
/// are the disk's.
pub fn open_for_serving(
    ds: &Datastore,
    path: &str,
    access: Access,
) -> anyhow::Result<(Arc<dyn Lun>, Attr)> {
    if let Some((disk, name)) = split_session(ds, path) {
        let lun = open_session(ds, disk, name, access.can_write())?;
        return Ok((lun, disk_attr(ds, disk)?));
    }
    let attr = ds.stat_path(path)?;
    if attr.kind == Kind::Rdm && !(access.can_write() && has_sessions(ds, path, &attr)) {
        return Ok((Arc::new(rdm::open(ds, path, access)?), attr));
    }
    if attr.kind == Kind::File && (!attr.snapshot_source || !access.can_write()) {
        return Ok((ds.open_lun(path, access)?, attr));
    }
    let source = open_disk(ds, path, access)?;
    let snaps =
        attach(ds, path, source, false)?.with_context(|| format!("{path}: has no snapshots"))?;
    let view: Arc<dyn Lun> = snaps.source();
    Ok((Arc::new(lun::Keeping::new(view, snaps)), attr))
}

/// Session `name` of the disk at `path` as a LUN: writable when `write` is asked and the
/// session is a writable one, read-only otherwise.
pub fn open_session(
    ds: &Datastore,
    path: &str,
    name: &str,
    write: bool,
) -> anyhow::Result<Arc<dyn Lun>> {
    let session = open_session_as(ds, path, name, Access::ReadOnly)?;
    if !write || session.is_read_only() {
        return Ok(session);
    }
    drop(session);
    open_session_as(ds, path, name, Access::Exclusive)
}

fn open_session_as(
    ds: &Datastore,
    path: &str,
    name: &str,
    access: Access,
) -> anyhow::Result<Arc<dyn Lun>> {
    let attr = disk_attr(ds, path)?;
    if !has_sessions(ds, path, &attr) {
        bail!("{path}@{name}: {path} has no snapshots");
    }
    let source = open_disk(ds, path, access)
        .map_err(busy_hint)
        .with_context(|| format!("{path}@{name}"))?;
    let snaps =
        attach(ds, path, source, false)?.with_context(|| format!("{path}: has no snapshots"))?;
    let lun: Arc<dyn Lun> = snaps
        .session(name)
        .with_context(|| format!("{path}@{name}"))?;
    Ok(Arc::new(lun::Keeping::new(lun, snaps)))
}

/// Bytes of the disk in a datastore read without locks for the snapshot engine: one stretch
/// of the source, read before the pool's table is.
#[derive(Debug)]
struct Stretch {
    name: String,
    size: u64,
    offset: u64,
    data: Vec<u8>,
}

impl Lun for Stretch {
    fn name(&self) -> &str {
        &self.name
    }
    fn sector_size(&self) -> u32 {
        512
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> lun::Result<()> {
        let len = buf.len() as u64;
        let start = offset
            .checked_sub(self.offset)
            .filter(|&at| at + len <= self.data.len() as u64)
            .ok_or_else(|| lun::LunError::OutOfRange {
                lun: self.name.clone(),
                offset,
                len,
                size: self.offset + self.data.len() as u64,
            })?;
        let start = start as usize;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> lun::Result<()> {
        Err(lun::LunError::ReadOnly {
            lun: self.name.clone(),
        })
    }
    fn flush(&self) -> lun::Result<()> {
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        true
    }
}

/// Bytes read per stretch: a whole number of chunks of any chunk size.
pub const UNLOCKED_STRETCH: u64 = 8 << 20;

/// Copies session `name` of the disk at `path` on datastore `spec` without taking any lock,
/// so while a VM or an export writes the disk (see the module documentation). Calls
/// `sink` with each stretch in order; returns the disk's size.
pub fn read_session_unlocked(
    spec: &str,
    path: &str,
    name: &str,
    sink: &mut dyn FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let mount = || super::datastore::open_datastore(spec, &vmfs::OpenOptions::read_only());
    let attr = disk_attr(&mount()?, path)?;
    if attr.kind == Kind::Rdm {
        // Its LUN is reached only under the mapping's lock, which the VM using it holds.
        bail!(
            "{path}@{name}: a raw device mapping's snapshot is not copied out without a lock; \
             serve it with `vapp -d DS export {path}@{name} --read-only` instead"
        );
    }
    let size = attr.size;
    let pool_path = vmfs::snapshot_pool_path(path);
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(UNLOCKED_STRETCH);
        let stretch = {
            let ds = mount()?;
            if !disk_attr(&ds, path)?.snapshot_source {
                bail!("{path}@{name}: {path} has no snapshots");
            }
            let source = ds.open_lun_through_engine(path, Access::ReadOnly)?;
            let mut data = vec![0u8; usize::try_from(len)?];
            source
                .read_at(&mut data, offset)
                .with_context(|| format!("{path}@{name}"))?;
            Stretch {
                name: source.name().to_string(),
                size: source.size(),
                offset,
                data,
            }
        };
        // A fresh mount, so the pool's table and block map are read after the disk was.
        let ds = mount()?;
        let pool = ds
            .open_lun_through_engine(&pool_path, Access::ReadOnly)
            .with_context(|| format!("{path}: its snapshot pool"))?;
        let snaps = Snapshots::open(Arc::new(stretch), pool)
            .with_context(|| format!("{path}: opening its snapshot pool {pool_path}"))?;
        let session = snaps
            .session(name)
            .with_context(|| format!("{path}@{name}"))?;
        let mut out = vec![0u8; usize::try_from(len)?];
        session
            .read_at(&mut out, offset)
            .with_context(|| format!("{path}@{name}"))?;
        sink(&out)?;
        offset += len;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_hold_a_quarter_of_the_disk_and_their_metadata() {
        let size = pool_size(64 * MIB);
        assert!(size >= 16 * MIB + 64 * 1024, "{size}");
        assert!(size <= 18 * MIB, "{size}");
        assert_eq!(size % MIB, 0);
        assert!(pool_size(512) >= MIB);
    }
}
