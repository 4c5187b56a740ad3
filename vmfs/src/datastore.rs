//! An open datastore: mounting (superblock, joining the cluster, orphans), the namespace
//! operations, and unmounting.
//!
//! A read-write open is a host of the cluster: it takes a heartbeat slot, renews it from a
//! background thread, and runs every metadata change under the on-disk locks of what it
//! changes (see `locks.rs`). A background committer commits the running transaction every
//! commit interval, releases transient locks, and recovers dead hosts (`recovery.rs`). A
//! read-only open takes no slot and no lock, and overlays every host's pending journal
//! transactions.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use lun::Lun;
use serde::Serialize;
use uuid::Uuid;

use crate::cluster::heartbeat::Heartbeat;
use crate::cluster::{Identity, LockProtocol, Node};
use crate::codec::*;
use crate::dir;
use crate::error::{Error, Result};
use crate::inode::{
    self, AddrMode, FLAG_SNAP_POOL, FLAG_SNAP_SOURCE, FLAG_THICK, FLAG_VDISK, Inode, InodeView,
    Kind,
};
use crate::journal::Orphan;
use crate::layout::{
    FORMAT_VERSION, LONG_SYMLINKS_VERSION, ROOT_INO, ResourceKind, SPECIAL_FILES_VERSION,
    Superblock,
};
use crate::rdm::RdmRecord;
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
    /// Open a copy of a datastore read-write with the original's signature, as failover
    /// does once the original is gone (still refused while it is reachable). Default:
    /// `VAPP_KEEP_SIGNATURE` set to `1`, `true` or `yes`.
    pub keep_signature: bool,
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

/// Environment variables that set a host's identity (e.g. for several hosts on one machine).
pub const HOST_NAME_ENV: &str = "VAPP_HOST_NAME";
pub const HOST_UUID_ENV: &str = "VAPP_HOST_UUID";
/// Set to `1` to open copies of datastores with the original's signature (see
/// [`OpenOptions::keep_signature`]); child processes (a VM's) inherit it.
pub const KEEP_SIGNATURE_ENV: &str = "VAPP_KEEP_SIGNATURE";

impl Default for OpenOptions {
    /// This machine's identity: `VAPP_HOST_NAME` or the host name, and `VAPP_HOST_UUID` or
    /// a UUID from /etc/machine-id.
    fn default() -> Self {
        let host_name = std::env::var(HOST_NAME_ENV)
            .ok()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(nix_hostname);
        let env_uuid = std::env::var(HOST_UUID_ENV)
            .ok()
            .and_then(|s| Uuid::try_parse(s.trim()).ok());
        let host_uuid = env_uuid
            .or_else(|| {
                std::fs::read_to_string("/etc/machine-id")
                    .ok()
                    .and_then(|s| Uuid::try_parse(s.trim()).ok())
            })
            .unwrap_or_else(|| {
                let mut b = [0u8; 16];
                let h = crc32c::crc32c(host_name.as_bytes());
                b[..4].copy_from_slice(&h.to_le_bytes());
                b[4..8].copy_from_slice(&crc32c::crc32c_append(h, b"vapp").to_le_bytes());
                Uuid::from_bytes(b)
            });
        let keep_signature = std::env::var(KEEP_SIGNATURE_ENV)
            .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
        OpenOptions {
            read_only: false,
            host_name,
            host_uuid,
            keep_signature,
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
    /// A virtual disk with snapshot sessions: written only through the snapshot engine.
    pub snapshot_source: bool,
    /// The snapshot pool of a virtual disk.
    pub snapshot_pool: bool,
    pub block_size: u32,
    /// Device number of a character or block device node (Linux `dev_t`), else 0.
    pub rdev: u64,
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
            snapshot_source: u.flags() & FLAG_SNAP_SOURCE != 0,
            snapshot_pool: u.flags() & FLAG_SNAP_POOL != 0,
            block_size,
            rdev: u.rdev(),
        }
    }
}

/// What a file is to the snapshot engine (recorded in its inode's flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotRole {
    /// An ordinary file.
    None,
    /// A virtual disk with snapshot sessions.
    Source,
    /// The pool keeping a virtual disk's sessions.
    Pool,
}

/// Refuses a change around the snapshot engine to a protected file or a pool.
pub(crate) fn check_unprotected(u: &impl InodeView, object: impl FnOnce() -> String) -> Result<()> {
    let flags = u.flags();
    if flags & (FLAG_SNAP_SOURCE | FLAG_SNAP_POOL) != 0 {
        return Err(Error::SnapshotProtected {
            object: object(),
            pool: flags & FLAG_SNAP_POOL != 0,
        });
    }
    Ok(())
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
    /// `compare-and-write`, `disk-paxos` or `host-local`.
    pub lock_protocol: LockProtocol,
    /// What the locks rest on through this LUN and whether they hold across machines.
    pub lock_safety: crate::cluster::LockSafety,
    pub io_timeout_ms: u32,
    /// After how long without a heartbeat other hosts declare a host dead.
    pub dead_host_timeout_ms: u64,
    pub superblock: String,
    pub superblock_warning: Option<String>,
    pub read_only: bool,
    pub resources: Vec<ResourceInfo>,
    pub hosts: Vec<HostSlotInfo>,
    /// `yes` when the datastore is found on another LUN than the one it was formatted on
    /// (a snapshot, clone or copy), `no`, or `unknown`.
    pub copy: &'static str,
    /// The recorded and found LUN identities, and where the original is for a copy.
    pub lun_identity: crate::copy::CopyStatus,
}

pub(crate) struct HostInfo {
    pub uuid: Uuid,
    pub name: String,
    pub slot: u32,
}

pub(crate) struct Inner {
    /// Read-write opens: the LUN as the host may use it (writes refused once fenced).
    pub lun: Arc<dyn Lun>,
    pub sb: Superblock,
    pub source: SuperblockSource,
    pub host: Option<HostInfo>,
    pub node: Option<Arc<Node>>,
    pub state: Mutex<State>,
    io: Mutex<HashMap<u64, Arc<RwLock<()>>>>,
    closed: AtomicBool,
    /// `Datastore` values handed out (the caller's and every open file's).
    users: AtomicUsize,
    /// One recovery of a dead host at a time in this process.
    pub recovering: Mutex<()>,
    committer: Mutex<Option<JoinHandle<()>>>,
    pub stop: Mutex<bool>,
    pub wake: Condvar,
}

/// An open datastore. `Send + Sync`: operations lock internally; data reads and writes of
/// already-allocated blocks run in parallel. The last `Datastore` of an open (the caller's
/// and those inside open files) to go unmounts it.
pub struct Datastore {
    pub(crate) inner: Arc<Inner>,
    /// Counted among the users (false for the background committer's handle).
    counted: bool,
}

/// Reads and validates the superblock, falling back to the backup copy.
pub fn read_superblock(lun: &dyn Lun) -> Result<(Superblock, SuperblockSource)> {
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
    /// Mounts the datastore on `lun`. A read-write open joins the cluster (takes a heartbeat
    /// slot), recovers earlier crashed runs of this host, finishes interrupted deletes, and
    /// starts the background committer; a read-only open writes nothing.
    pub fn open(lun: Arc<dyn Lun>, options: &OpenOptions) -> Result<Datastore> {
        let (sb, source) = read_superblock(&*lun)?;
        let read_only = options.read_only || lun.is_read_only();
        let timing = sb.timing();
        if read_only {
            let mut st = Store::new(lun.clone(), sb.clone());
            st.set_overlay(store::overlay(&*lun, &sb)?, timing.commit_interval());
            let state = State::new(st, 0, None);
            return Ok(Datastore::assemble(lun, sb, source, None, None, state));
        }
        crate::copy::check_read_write(&*lun, &sb, options.keep_signature)?;
        let who = Identity {
            name: options.host_name.clone(),
            uuid: options.host_uuid,
        };
        let node = Node::join_with(lun.clone(), &sb, &who)?;
        let me = node.host().clone();
        let guarded = node.lun();
        let host = HostInfo {
            uuid: me.uuid,
            name: me.name.clone(),
            slot: me.slot,
        };
        let mounted = (|| {
            // A free slot's journal is clean: its last holder checkpointed before leaving,
            // or its recoverer replayed it.
            let jstate = store::read_journal(&*guarded, &sb, me.slot)?;
            if !jstate.pending.is_empty() {
                tracing::error!(lun = %lun.name(), slot = me.slot, pending = jstate.pending.len(), "a free slot's journal has pending transactions; they are not replayed (run fsck)");
            }
            let last_seq = jstate
                .pending
                .last()
                .map_or(jstate.header.checkpoint_seq, |t| t.seq);
            let mut st = Store::new(guarded.clone(), sb.clone());
            st.attach_journal(me.slot, last_seq, me.uuid);
            st.set_lease(node.lease());
            let orphans = store::read_orphans(&*guarded, &sb, me.slot)?;
            let seed = u64::from_le_bytes(me.uuid.as_bytes()[..8].try_into().unwrap_or([0; 8]))
                ^ u64::from(me.slot).wrapping_mul(0x2545_f491_4f6c_dd1d);
            let mut state = State::new(st, seed, Some(node.clone()));
            state.orphans = orphans;
            Ok::<_, Error>(state)
        })();
        let state = match mounted {
            Ok(s) => s,
            Err(e) => {
                let _ = node.leave();
                return Err(e);
            }
        };
        let safety = crate::cluster::lock_safety(sb.lock_protocol, &*lun);
        tracing::info!(lun = %lun.name(), host = %me, protocol = sb.lock_protocol.name(), primitive = %safety.primitive, safe_across_machines = safety.safe_across_machines, timing = %timing, "datastore mounted read-write");
        let ds = Datastore::assemble(guarded, sb, source, Some(host), Some(node.clone()), state);
        // Hosts of this machine that crashed hold slots and locks: recover them now
        // (journal replay first), instead of after the dead-host timeout, so a crashed
        // command leaves nothing behind the next one.
        for slot in node.dead_slots(true) {
            ds.recover_slot(slot, true)?;
        }
        ds.finish_orphans()?;
        ds.start_committer()?;
        Ok(ds)
    }

    fn assemble(
        lun: Arc<dyn Lun>,
        sb: Superblock,
        source: SuperblockSource,
        host: Option<HostInfo>,
        node: Option<Arc<Node>>,
        state: State,
    ) -> Datastore {
        Datastore {
            inner: Arc::new(Inner {
                lun,
                sb,
                source,
                host,
                node,
                state: Mutex::new(state),
                io: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
                users: AtomicUsize::new(1),
                recovering: Mutex::new(()),
                committer: Mutex::new(None),
                stop: Mutex::new(false),
                wake: Condvar::new(),
            }),
            counted: true,
        }
    }

    /// Another handle on this open, counted among its users (open files hold one).
    pub(crate) fn share(&self) -> Datastore {
        self.inner.users.fetch_add(1, Ordering::SeqCst);
        Datastore {
            inner: self.inner.clone(),
            counted: true,
        }
    }

    /// A handle for the background committer: it does not keep the datastore mounted.
    pub(crate) fn background(inner: Arc<Inner>) -> Datastore {
        Datastore {
            inner,
            counted: false,
        }
    }

    pub(crate) fn node(&self) -> Option<&Arc<Node>> {
        self.inner.node.as_ref()
    }

    /// Finishes deletes and truncates that a crash interrupted (this host's, or those of a
    /// dead host it recovered).
    pub(crate) fn finish_orphans(&self) -> Result<()> {
        let list = {
            let s = self.lock();
            let mut list = s.orphans.clone();
            list.retain(|o| !s.staging.contains(&o.ino()));
            list
        };
        for orphan in list {
            tracing::info!(ino = orphan.ino(), "finishing interrupted delete/truncate");
            match orphan {
                Orphan::Unlinked { ino, .. } => self.reap(ino)?,
                Orphan::Staged {
                    ino,
                    parent,
                    generation,
                } => self.discard_staged(ino, parent, generation)?,
                Orphan::Truncating { ino, .. } => self.write_op(|s| {
                    s.remove_orphan(ino)?;
                    s.lock_inode(ino)?;
                    match s.inode(ino) {
                        Ok(u) if orphan.concerns(u.generation()) => s.trim_past_eof(ino),
                        Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
                        Err(e) => Err(e),
                    }
                })?,
            }
        }
        Ok(())
    }

    /// Commits, releases every lock, checkpoints the journal and frees the host slot. Fails
    /// with `Busy` while file handles or virtual-disk LUNs of this datastore are still open.
    pub fn close(self) -> Result<()> {
        let holders = self.inner.users.load(Ordering::SeqCst).saturating_sub(1);
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
    /// (committed when large, or by the committer within a commit interval), on failure they
    /// are dropped and nothing changed. An operation blocked by another host's lock is
    /// retried once the lock can be had (see `locks.rs`), for at most the lock wait.
    pub(crate) fn write_op<R>(&self, mut f: impl FnMut(&mut State) -> Result<R>) -> Result<R> {
        let started = Instant::now();
        loop {
            let mut s = self.lock();
            s.st.check_writable()?;
            s.begin_op()?;
            let err = match f(&mut s) {
                Ok(v) => {
                    s.st.end_op(true);
                    if s.st.should_commit() {
                        s.st.commit()?;
                    }
                    return Ok(v);
                }
                Err(e) => e,
            };
            s.st.end_op(false);
            s.forget_derived();
            let err = self.fenced_or(err, &s);
            let Some(wait) = s.wait.take() else {
                return Err(err);
            };
            // Release what this host holds for metadata changes before waiting: the holder
            // we wait for may be waiting for one of ours.
            s.sync_point()?;
            drop(s);
            self.wait_for(&wait, started, err)?;
        }
    }

    /// A failure caused by this host being fenced is reported as such.
    fn fenced_or(&self, err: Error, s: &State) -> Error {
        match s.st.check_writable() {
            Err(fenced @ Error::HostFenced { .. }) if !matches!(err, Error::HostFenced { .. }) => {
                fenced
            }
            _ => err,
        }
    }

    pub(crate) fn read_op<R>(&self, f: impl FnOnce(&mut State) -> Result<R>) -> Result<R> {
        let mut s = self.lock();
        s.begin_op()?;
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

    /// The host id this open holds (None when read-only).
    pub fn host(&self) -> Option<crate::cluster::HostId> {
        self.node().map(|n| n.host().clone())
    }

    /// Why this host fenced itself (stopped writing), if it did: its heartbeat could not be
    /// renewed in time, or another host took its slot over.
    pub fn fenced(&self) -> Option<String> {
        self.node().and_then(|n| n.fenced())
    }

    /// The cluster timing of this datastore (fixed at format time).
    pub fn timing(&self) -> crate::cluster::Timing {
        self.inner.sb.timing()
    }

    pub fn max_file_size(&self) -> u64 {
        self.inner.sb.max_file_size()
    }

    /// Commits metadata and flushes the LUN: everything written so far is durable, and the
    /// locks taken for metadata changes are released.
    pub fn sync(&self) -> Result<()> {
        let mut s = self.lock();
        if !s.st.writable() {
            return Ok(());
        }
        s.st.check_writable()?;
        s.sync_point()?;
        self.inner.lun.flush()?;
        Ok(())
    }

    /// Commits metadata (journal, then in place) without a commit point: the change is
    /// durable and every host reads it, while the locks taken for it stay held until the
    /// periodic commit point, so a long-lived host's next operation on the same objects
    /// (the agent serving command lines) need not take them again.
    pub fn commit(&self) -> Result<()> {
        let mut s = self.lock();
        if !s.st.writable() {
            return Ok(());
        }
        s.st.check_writable()?;
        s.st.commit()?;
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
        self.create_file(parent, name, new, false)
    }

    /// Creates a regular file; a `staged` one is listed in this host's orphan list in the
    /// same transaction, so that it is removed if this host dies before
    /// [`Datastore::rename_staged`] gives it its final name.
    pub(crate) fn create_file(
        &self,
        parent: u64,
        name: &OsStr,
        new: &NewFile,
        staged: bool,
    ) -> Result<Attr> {
        let bs = self.inner.sb.block_size;
        self.write_op(|s| {
            s.lock_inode(parent)?;
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
            if staged {
                s.add_orphan(Orphan::Staged {
                    ino,
                    parent,
                    generation: generation as u32,
                })?;
                s.staging.insert(ino);
            }
            let attr = Attr::from_unit(&i, bs);
            s.put_inode(i);
            Ok(attr)
        })
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, creds: Creds) -> Result<Attr> {
        let bs = self.inner.sb.block_size;
        self.write_op(|s| {
            s.lock_inode(parent)?;
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
            s.st.put_owned(off, dir::new_unit(ino, 0, off), ino);
            link_entry(s, parent, name, ino, Kind::Dir, true)?;
            let attr = Attr::from_unit(&i, bs);
            s.put_inode(i);
            Ok(attr)
        })
    }

    /// Creates a FIFO, a character or block device node (`rdev`) or a UNIX socket: an inode
    /// with a type and no data.
    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        kind: Kind,
        mode: u32,
        rdev: u64,
        creds: Creds,
    ) -> Result<Attr> {
        if !kind.is_special() {
            return Err(Error::Invalid {
                object: describe(parent, name),
                reason: format!("mknod makes FIFOs, device nodes and sockets, not {kind:?}"),
            });
        }
        self.needs_version(SPECIAL_FILES_VERSION, &describe(parent, name), || {
            "FIFOs, device nodes and sockets".into()
        })?;
        let bs = self.inner.sb.block_size;
        self.write_op(|s| {
            s.lock_inode(parent)?;
            let (ino, generation) = prepare_entry(s, parent, name)?;
            let mut i = Inode::new(
                ino,
                generation,
                kind,
                mode,
                creds.uid,
                creds.gid,
                parent,
                now_ns(),
            );
            if matches!(kind, Kind::CharDevice | Kind::BlockDevice) {
                i.set_rdev(rdev);
            }
            link_entry(s, parent, name, ino, kind, false)?;
            let attr = Attr::from_unit(&i, bs);
            s.put_inode(i);
            Ok(attr)
        })
    }

    /// Creates a raw device mapping: an inode of type 4 whose inline data is `record` and
    /// whose size is the mapped LUN's. Resolving and checking the LUN is the caller's work
    /// (the `rdm` crate); this stores what it was given, after checking it is well formed.
    pub fn create_rdm(
        &self,
        parent: u64,
        name: &OsStr,
        record: &RdmRecord,
        mode: u32,
        creds: Creds,
    ) -> Result<Attr> {
        let object = describe(parent, name);
        record.validate().map_err(|reason| Error::Invalid {
            object: object.clone(),
            reason,
        })?;
        self.needs_version(crate::layout::RDM_VERSION, &object, || {
            "raw device mappings".into()
        })?;
        let bs = self.inner.sb.block_size;
        self.write_op(|s| {
            s.lock_inode(parent)?;
            let (ino, generation) = prepare_entry(s, parent, name)?;
            let mut i = Inode::new(
                ino,
                generation,
                Kind::Rdm,
                mode,
                creds.uid,
                creds.gid,
                parent,
                now_ns(),
            );
            i.set_size(record.size);
            record.encode(i.raw_mut());
            link_entry(s, parent, name, ino, Kind::Rdm, false)?;
            let attr = Attr::from_unit(&i, bs);
            s.put_inode(i);
            Ok(attr)
        })
    }

    /// The payload of raw device mapping `ino`; `Invalid` when it is not one, `Corrupt`
    /// naming the damage when its payload does not decode.
    pub fn rdm_record(&self, ino: u64) -> Result<RdmRecord> {
        self.read_op(|s| {
            let u = s.inode(ino)?;
            if u.kind() != Some(Kind::Rdm) {
                return Err(Error::Invalid {
                    object: format!("inode {ino}"),
                    reason: "not a raw device mapping".into(),
                });
            }
            RdmRecord::decode(&u[..]).map_err(|reason| {
                s.st.corrupt(
                    format!("raw device mapping inode {ino}"),
                    s.sb().inode_offset(ino),
                    reason,
                )
            })
        })
    }

    /// Refuses what a datastore of an older format version cannot store: hosts running an
    /// older vapp still mount it, and would misread it.
    fn needs_version(
        &self,
        version: u32,
        object: &str,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        let have = self.inner.sb.version;
        if have >= version {
            return Ok(());
        }
        Err(Error::NotPermitted {
            object: object.to_string(),
            reason: format!(
                "{} need datastore format version {version}; this datastore is version {have} (format a new one to use them)",
                what()
            ),
        })
    }

    /// Creates a symbolic link. Targets up to [`inode::INLINE_MAX`] bytes live in the inode,
    /// longer ones (up to PATH_MAX - 1) in a sub-block.
    pub fn symlink(&self, parent: u64, name: &OsStr, target: &OsStr, creds: Creds) -> Result<Attr> {
        let bs = self.inner.sb.block_size;
        let bytes = target.as_bytes();
        if bytes.is_empty() || bytes.contains(&0) {
            return Err(Error::Invalid {
                object: describe(parent, name),
                reason: "a symbolic link target is 1 or more bytes with no NUL".into(),
            });
        }
        if bytes.len() > inode::SYMLINK_MAX {
            return Err(Error::TargetTooLong {
                object: describe(parent, name),
                len: bytes.len(),
            });
        }
        let long = bytes.len() > inode::INLINE_MAX;
        if long {
            self.needs_version(LONG_SYMLINKS_VERSION, &describe(parent, name), || {
                format!(
                    "symbolic link targets longer than {} bytes",
                    inode::INLINE_MAX
                )
            })?;
        }
        self.write_op(|s| {
            s.lock_inode(parent)?;
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
            if long {
                // As a small file's data: on the LUN before the inode that points to it commits,
                // and the rest of the sub-block zero.
                let sbs = s.sb().sub_block_size;
                let what = format!("symbolic link {:?}", name.to_string_lossy());
                let sub = s.alloc(ResourceKind::SubBlock, None, &what)?;
                let base = s.sb().sub_blocks.resource_offset(sub);
                let mut content = vec![0u8; sbs as usize];
                content[..bytes.len()].copy_from_slice(bytes);
                s.st.lun.write_at(&content, base)?;
                i.set_addr_mode(AddrMode::SubBlock);
                i.set_sub_block(sub + 1);
                i.set_allocated(u64::from(sbs));
            } else {
                i.inline_mut()[..bytes.len()].copy_from_slice(bytes);
            }
            i.set_size(bytes.len() as u64);
            link_entry(s, parent, name, ino, Kind::Symlink, false)?;
            let attr = Attr::from_unit(&i, bs);
            s.put_inode(i);
            Ok(attr)
        })
    }

    pub fn readlink(&self, ino: u64) -> Result<OsString> {
        // A target in a sub-block is read like file data, outside the metadata lock.
        let (size, inline) = self.read_op(|s| {
            let i = s.inode(ino)?;
            if i.kind() != Some(Kind::Symlink) {
                return Err(Error::Invalid {
                    object: format!("inode {ino}"),
                    reason: "not a symbolic link".into(),
                });
            }
            let size = (i.size() as usize).min(inode::SYMLINK_MAX);
            let inline = (i.addr_mode() == Some(AddrMode::Inline))
                .then(|| i.inline()[..size.min(inode::INLINE_MAX)].to_vec());
            Ok((size, inline))
        })?;
        let bytes = match inline {
            Some(bytes) => bytes,
            None => {
                let mut buf = vec![0u8; size];
                let n = self.read(ino, 0, &mut buf)?;
                buf.truncate(n);
                buf
            }
        };
        Ok(OsString::from_vec(bytes))
    }

    /// Hard link: another name for a file (not a directory).
    pub fn link(&self, ino: u64, parent: u64, name: &OsStr) -> Result<Attr> {
        let bs = self.inner.sb.block_size;
        self.write_op(|s| {
            s.lock_inode(parent)?;
            s.lock_inode(ino)?;
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
        self.remove_entry(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.remove_entry(parent, name, true)
    }

    /// unlink (`dir` false) or rmdir (`dir` true) of `name` in `parent`.
    fn remove_entry(&self, parent: u64, name: &OsStr, dir: bool) -> Result<()> {
        let reap = self.write_op(|s| {
            s.lock_inode(parent)?;
            let d = dir_inode(s, parent)?;
            let slot = s
                .dir_lookup(&d, name)?
                .ok_or_else(|| not_found(parent, name))?;
            let object = || describe(parent, name);
            match (dir, slot.kind == Kind::Dir) {
                (false, true) => return Err(Error::IsADirectory { object: object() }),
                (true, false) => return Err(Error::NotADirectory { object: object() }),
                _ => {}
            }
            s.lock_inode(slot.ino).map_err(|e| e.at(&object()))?;
            check_unprotected(&s.inode(slot.ino)?, object)?;
            let d = dir_inode(s, parent)?;
            if dir {
                let child = s.inode(slot.ino)?;
                if s.dir_len(&child)? > 0 {
                    return Err(Error::NotEmpty { object: object() });
                }
            }
            s.dir_remove(&d, name)?;
            touch_dir(s, parent, if dir { -1 } else { 0 })?;
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
        self.rename_op(parent, name, new_parent, new_name, no_replace, None)
    }

    /// Renames the staged file `ino` (see [`Datastore::create_file`]) over its final name,
    /// dropping its orphan entry in the same transaction: a crash leaves either the old
    /// file under the final name and the staged one to be removed, or the new file.
    pub(crate) fn rename_staged(
        &self,
        parent: u64,
        staged: &OsStr,
        name: &OsStr,
        ino: u64,
    ) -> Result<()> {
        self.rename_op(parent, staged, parent, name, false, Some(ino))
    }

    fn rename_op(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
        staged: Option<u64>,
    ) -> Result<()> {
        let reap = self.write_op(|s| {
            // Directories in inode order; a directory moving to another parent also takes
            // the root's lock, so two such renames cannot build a loop between them.
            let (first, second) = (parent.min(new_parent), parent.max(new_parent));
            s.lock_inode(first)?;
            s.lock_inode(second)?;
            let src = {
                let d = dir_inode(s, parent)?;
                s.dir_lookup(&d, name)?
                    .ok_or_else(|| not_found(parent, name))?
            };
            if src.kind == Kind::Dir && parent != new_parent {
                s.lock_inode(ROOT_INO)?;
                s.lock_inode(src.ino)?;
            }
            let nd = dir_inode(s, new_parent)?;
            dir::check_name(new_name)?;
            let dst = s.dir_lookup(&nd, new_name)?;
            if let Some(dst) = dst.filter(|d| d.ino != src.ino) {
                s.lock_inode(dst.ino)
                    .map_err(|e| e.at(&describe(new_parent, new_name)))?;
            }
            if src.kind == Kind::File {
                check_unprotected(&s.inode(src.ino)?, || describe(parent, name))?;
            }
            if let Some(dst) = dst.filter(|d| d.ino != src.ino && d.kind == Kind::File) {
                check_unprotected(&s.inode(dst.ino)?, || describe(new_parent, new_name))?;
            }
            let nd = dir_inode(s, new_parent)?;
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
            // Only a directory changing parents changes the moved inode (its ".."): a file's
            // inode is left alone, so files held open by other hosts can be renamed.
            if is_dir && parent != new_parent {
                let mut moved = Inode::from_unit(&s.inode(src.ino)?);
                moved.set_parent(new_parent);
                moved.set_times(None, None, now);
                s.put_inode(moved);
            }
            if let Some(ino) = staged {
                if src.ino != ino {
                    return Err(Error::Invalid {
                        object: describe(parent, name),
                        reason: format!("no longer the file being copied in (inode {ino})"),
                    });
                }
                s.remove_orphan(ino)?;
            }
            Ok(reap)
        })?;
        if let Some(ino) = staged {
            self.lock().staging.remove(&ino);
        }
        if let Some(ino) = reap {
            self.reap(ino)?;
        }
        Ok(())
    }

    /// Removes the staged file `ino` of directory `parent` (a copy that failed, or one whose
    /// writer died) and its orphan entry; does nothing once the file has its final name. A
    /// name of `parent` is removed only while it still names that descriptor generation, so
    /// a file that took the inode number since is safe.
    pub(crate) fn discard_staged(&self, ino: u64, parent: u64, generation: u32) -> Result<()> {
        let mut names = Vec::new();
        let mut after = 2;
        loop {
            let batch = match self.readdir(parent, after) {
                Ok(b) => b,
                Err(Error::NotFound { .. } | Error::NotADirectory { .. }) => break,
                Err(e) => return Err(e),
            };
            let Some(last) = batch.last() else { break };
            after = last.cookie;
            names.extend(
                batch
                    .into_iter()
                    .filter(|e| e.cookie > 2 && e.ino == ino)
                    .map(|e| e.name),
            );
        }
        let reap = self.write_op(|s| {
            // The entry leaves the list in the transaction that renames the file to its
            // final name: without it, no name of this file is a temporary one.
            let listed = s
                .orphans
                .iter()
                .any(|o| matches!(o, Orphan::Staged { ino: i, .. } if *i == ino));
            if !listed {
                return Ok(None);
            }
            s.remove_orphan(ino)?;
            s.lock_inode(parent)?;
            s.lock_inode(ino)?;
            match s.inode(ino) {
                Ok(u) if u.generation() as u32 == generation && u.kind() == Some(Kind::File) => {}
                Ok(_) | Err(Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            }
            let mut reap = None;
            for name in &names {
                let d = dir_inode(s, parent)?;
                if s.dir_lookup(&d, name)?.is_some_and(|slot| slot.ino == ino) {
                    s.dir_remove(&d, name)?;
                    touch_dir(s, parent, 0)?;
                    reap = drop_link(s, ino)?;
                }
            }
            Ok(reap)
        })?;
        self.lock().staging.remove(&ino);
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
            s.lock_inode(ino)?;
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

    /// Records what file `ino` is to the snapshot engine. Only the engine's bookkeeping
    /// calls this: a protected file is refused to every other writer (see
    /// [`Datastore::open_lun_through_engine`]).
    pub fn set_snapshot_role(&self, ino: u64, role: SnapshotRole) -> Result<Attr> {
        let bs = self.inner.sb.block_size;
        self.write_op(|s| {
            s.lock_inode(ino)?;
            let mut i = Inode::from_unit(&s.inode(ino)?);
            if i.kind() != Some(Kind::File) {
                return Err(Error::Invalid {
                    object: format!("inode {ino}"),
                    reason: "only a regular file can be a snapshot source or pool".into(),
                });
            }
            let mut flags = i.flags() & !(FLAG_SNAP_SOURCE | FLAG_SNAP_POOL);
            flags |= match role {
                SnapshotRole::None => 0,
                SnapshotRole::Source => FLAG_SNAP_SOURCE,
                SnapshotRole::Pool => FLAG_SNAP_POOL,
            };
            i.set_flags(flags);
            i.set_times(None, None, now_ns());
            let attr = Attr::from_unit(&i, bs);
            s.put_inode(i);
            Ok(attr)
        })
    }

    /// Frees an unlinked inode once nothing in this process holds it open (other hosts
    /// cannot: unlinking a file another host has open is refused).
    pub(crate) fn reap(&self, ino: u64) -> Result<()> {
        let io = self.io_lock(ino);
        let _guard = io.write().unwrap_or_else(|e| e.into_inner());
        self.write_op(|s| {
            if s.locks.get(&ino).is_some_and(|h| !h.is_empty()) {
                return Ok(());
            }
            let entry = s.orphans.iter().find(|o| o.ino() == ino).copied();
            s.lock_inode(ino)?;
            let u = match s.inode(ino) {
                Ok(u) => u,
                Err(Error::NotFound { .. }) => return s.remove_orphan(ino),
                Err(e) => return Err(e),
            };
            if u.nlink() > 0 || entry.is_some_and(|o| !o.concerns(u.generation())) {
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
                    state: hb.state.name().into(),
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
        let copy = crate::copy::status(&**lun, sb);
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
            lock_protocol: sb.lock_protocol,
            lock_safety: crate::cluster::lock_safety(sb.lock_protocol, &**lun),
            io_timeout_ms: sb.io_timeout_ms,
            dead_host_timeout_ms: sb.timing().dead_after().as_millis() as u64,
            superblock,
            superblock_warning,
            read_only: self.is_read_only(),
            resources,
            hosts,
            copy: copy.copy,
            lun_identity: copy,
        })
    }
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Unmounts: stops the committer, commits and checkpoints, releases every lock, frees
    /// the slot. When metadata cannot be made durable the slot is left live (heartbeat
    /// stopped): the others recover this host's journal and locks as if it had crashed.
    pub(crate) fn shutdown(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.stop_committer();
        let Some(node) = &self.node else {
            return Ok(());
        };
        let result = {
            let mut s = self.lock();
            s.st.check_writable()
                .and_then(|()| s.st.commit_point())
                .and_then(|()| s.release_all())
                .and_then(|()| Ok(self.lun.flush()?))
        };
        match result {
            Ok(()) => {
                node.leave()?;
                tracing::info!(lun = %self.lun.name(), host = %node.host(), "datastore unmounted");
                Ok(())
            }
            Err(e) => {
                node.abandon();
                Err(e)
            }
        }
    }

    fn stop_committer(&self) {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
        let handle = self
            .committer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }

    pub(crate) fn set_committer(&self, handle: JoinHandle<()>) {
        *self.committer.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
    }
}

impl Drop for Datastore {
    fn drop(&mut self) {
        if self.counted && self.inner.users.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Err(e) = self.inner.shutdown() {
                tracing::error!(lun = %self.inner.lun.name(), error = %e, "datastore close failed; other hosts (or the next mount here) recover its journal");
            }
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
    s.add_orphan(Orphan::Unlinked {
        ino,
        generation: u.generation() as u32,
    })?;
    let open = s.locks.get(&ino).is_some_and(|h| !h.is_empty());
    Ok(if open { None } else { Some(ino) })
}

/// Frees everything an inode's data occupies, leaving it empty and inline.
pub(crate) fn release_storage(s: &mut State, i: &mut Inode) -> Result<()> {
    match i.addr_mode() {
        Some(AddrMode::SubBlock) => {
            let sb_index = s.resource_index(ResourceKind::SubBlock, i.ino(), i.sub_block())?;
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
