//! The FUSE operations, each mapped onto the datastore.
//!
//! FUSE node ids are vmfs inode numbers (the root is 1 in both) and generations are vmfs
//! generations, so the adapter keeps no inode table of its own and ignores `forget`.
//!
//! Caching, and why:
//! - Attributes and names are cached for one second: another host may change them, and one
//!   second is how stale a listing may be (NFS's close-to-open world, with a shorter timer).
//! - File data read under this host's lock is cached, and kept across opens while the lock
//!   is held or when the inode's version shows nobody changed the file in between (see
//!   `open_files`). A file another host holds is read with direct I/O. A read-only mount
//!   holds no locks: it drops a file's pages at each open, and when it sees the file's mtime
//!   or size change (`FUSE_AUTO_INVAL_DATA`).
//! - Writes use direct I/O (the kernel invalidates cached pages they overlap): the data is
//!   copied once less, and it reaches the datastore before write(2) returns, so errors
//!   (ENOSPC, a fenced host, a lock lost) reach the process that wrote. There is no
//!   write-back cache: no other host ever waits on data sitting in this kernel.
//! - Why not write-back, although a file open for writing is held exclusive by this host, so
//!   dirty pages under that lock would break no cluster rule as long as they reach the
//!   datastore before the lock goes (the kernel writes them back before FLUSH and RELEASE):
//!   FUSE's write-back mode is per mount, and in it the kernel trusts its own size and mtime
//!   of every regular file over the daemon's, so a file another host grew or truncated would
//!   keep its old size here; and a write-back that fails after this host is fenced would
//!   reach the writer, if at all, only at a later fsync or close.
//!   Direct writes cost the mount one extra copy per byte (the kernel copies the caller's
//!   pages into the daemon's buffer, then vmfs copies them into the LUN), done in turn with
//!   the caller's write; that is the gap left against the library on memory-speed storage.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileHandle as Fh, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use vmfs::{Attr, Creds, Datastore, DirEntry, Kind, NewFile, SetAttr};

use crate::attr::{errno, file_attr, file_type, time_ns};
use crate::open_files::{CachePolicy, Io, OpenFiles};
use crate::rdm_files::RdmFiles;

/// How long the kernel may trust attributes and directory entries.
const TTL: Duration = Duration::from_secs(1);

/// Largest read and write request: one datastore block at the default block size.
const MAX_REQUEST: u32 = 1 << 20;

/// Requests the kernel may queue in the background (readahead, async direct I/O).
const MAX_BACKGROUND: u16 = 64;

thread_local! {
    /// Each worker thread reuses one read buffer instead of allocating per request.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What the worker threads share.
pub(crate) struct Shared {
    pub ds: Datastore,
    pub files: OpenFiles,
    /// Raw device mappings open here: their data is on the mapped LUN.
    pub rdms: RdmFiles,
    pub read_only: bool,
}

pub(crate) struct VmfsFs {
    shared: Arc<Shared>,
}

impl VmfsFs {
    pub fn new(shared: Arc<Shared>) -> VmfsFs {
        VmfsFs { shared }
    }

    fn ds(&self) -> &Datastore {
        &self.shared.ds
    }

    /// Owner of a new file: the caller, except that a set-group-id directory passes its group
    /// on (and, to subdirectories, the set-group-id bit itself).
    fn creds(&self, req: &Request, parent: u64) -> vmfs::Result<(Creds, bool)> {
        let dir = self.ds().getattr(parent)?;
        let sgid = dir.perm & libc::S_ISGID != 0;
        let gid = if sgid { dir.gid } else { req.gid() };
        Ok((
            Creds {
                uid: req.uid(),
                gid,
            },
            sgid,
        ))
    }

    /// Runs `f` with this host holding `ino` exclusive: through the open file `fh` when it is
    /// a write open, otherwise by taking the lock for this one change.
    fn write_locked<R>(
        &self,
        ino: u64,
        fh: Option<u64>,
        f: impl FnOnce(&Io<'_>) -> vmfs::Result<R>,
    ) -> vmfs::Result<R> {
        let files = &self.shared.files;
        if let Some((inode, true)) = fh.and_then(|fh| files.get(fh)) {
            return f(&inode.io());
        }
        let (tmp, _) = files.open(self.ds(), ino, true)?;
        let result = match files.get(tmp) {
            Some((inode, _)) => f(&inode.io()),
            None => Err(vmfs::Error::NotFound {
                object: format!("inode {ino}"),
            }),
        };
        files.release(self.ds(), tmp);
        result
    }

    fn entry(&self, reply: ReplyEntry, op: &'static str, ino: u64, attr: vmfs::Result<Attr>) {
        match attr {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(a.generation)),
            Err(e) => reply.error(errno(op, ino, &e)),
        }
    }

    fn check_writable(&self) -> Result<(), Errno> {
        if self.shared.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    /// Opens `ino` for this host and applies O_TRUNC (which, as any truncate by a user other
    /// than root, clears set-user-id).
    fn open_file(&self, uid: u32, ino: u64, flags: OpenFlags) -> Result<(u64, CachePolicy), Errno> {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if write {
            self.check_writable()?;
        }
        let (fh, policy) = self
            .shared
            .files
            .open(self.ds(), ino, write)
            .map_err(|e| errno("open", ino, &e))?;
        if write && flags.0 & libc::O_TRUNC != 0 {
            let truncated = self
                .write_locked(ino, Some(fh), |io| io.truncate(self.ds(), 0))
                .and_then(|()| self.kill_suid(uid, ino));
            if let Err(e) = truncated {
                self.shared.files.release(self.ds(), fh);
                return Err(errno("open", ino, &e));
            }
        }
        Ok((fh, policy))
    }

    /// Clears set-user-id, and set-group-id on a group-executable file, before a write by
    /// anyone but root, as the kernel does for local file systems: a modified program must not
    /// keep running with its owner's rights. The kernel leaves this to FUSE file systems on
    /// direct-I/O writes. The inode is held by the write open, so its attributes come from
    /// this host's cache.
    fn kill_suid(&self, uid: u32, ino: u64) -> vmfs::Result<()> {
        if uid == 0 {
            return Ok(());
        }
        let perm = self.ds().getattr(ino)?.perm;
        let mut kill = perm & libc::S_ISUID;
        if perm & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
            kill |= libc::S_ISGID;
        }
        if kill != 0 {
            let change = SetAttr {
                mode: Some(perm & !kill),
                ..SetAttr::default()
            };
            self.ds().setattr(ino, &change)?;
        }
        Ok(())
    }

    /// Hands the entries of directory `ino` after `offset` to `add` in batches, until `add`
    /// says the reply is full (true) or the directory ends.
    fn list_dir(
        &self,
        op: &'static str,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(&DirEntry) -> Result<bool, Errno>,
    ) -> Result<(), Errno> {
        let mut after = offset;
        loop {
            let batch = self
                .ds()
                .readdir(ino, after)
                .map_err(|e| errno(op, ino, &e))?;
            if batch.is_empty() {
                return Ok(());
            }
            for e in &batch {
                if add(e)? {
                    return Ok(());
                }
                after = e.cookie;
            }
        }
    }

    /// Creates regular file `name` in `parent` for the caller (mknod and create).
    fn create_file(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> vmfs::Result<Attr> {
        let (creds, _) = self.creds(req, parent)?;
        self.ds().create(
            parent,
            name,
            &NewFile {
                mode: mode & !umask & 0o7777,
                creds,
                ..NewFile::default()
            },
        )
    }
}

fn fopen_flags(policy: CachePolicy) -> FopenFlags {
    let mut flags = FopenFlags::empty();
    if policy.keep_cache {
        flags |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    if policy.direct_io {
        flags |= FopenFlags::FOPEN_DIRECT_IO;
    }
    flags
}

impl Filesystem for VmfsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(nearest) = config.set_max_write(MAX_REQUEST) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_readahead(MAX_REQUEST) {
            let _ = config.set_max_readahead(nearest);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        let wanted = [
            // O_TRUNC arrives with open, so the truncate happens under the lock just taken.
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            // Listings come with attributes: one request per directory block for `ls -l`.
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ASYNC_DIO,
            // A symlink's target never changes (vmfs has no way to rewrite it in place).
            InitFlags::FUSE_CACHE_SYMLINKS,
            // Direct-I/O files (held by another host) can still be mapped.
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ];
        for flag in wanted {
            if let Err(missing) = config.add_capabilities(flag) {
                tracing::debug!(capability = ?missing, "FUSE capability not offered by the kernel");
            }
        }
        if self.shared.read_only {
            // Without locks, the kernel drops a file's pages when it sees another host's
            // change in its mtime or size. With locks the adapter decides at each open, and
            // this would also throw pages away after our own writes.
            let _ = config.add_capabilities(InitFlags::FUSE_AUTO_INVAL_DATA);
        }
        let coherent = config
            .capabilities()
            .contains(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        self.shared.files.set_direct_writes(coherent);
        tracing::debug!(abi = ?config.kernel_abi(), "FUSE session initialised");
        Ok(())
    }

    fn destroy(&mut self) {
        let open = self.shared.files.open_count();
        if open > 0 {
            tracing::info!(open, "session ended with files open: releasing their locks");
        }
        self.shared.files.close_all();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, "lookup", parent.0, self.ds().lookup(parent.0, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<Fh>, reply: ReplyAttr) {
        match self.ds().getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno("getattr", ino.0, &e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<Fh>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if let Err(e) = self.check_writable() {
            return reply.error(e);
        }
        let ino = ino.0;
        if let Some(size) = size {
            if let Err(e) =
                self.write_locked(ino, fh.map(|f| f.0), |io| io.truncate(self.ds(), size))
            {
                return reply.error(errno("truncate", ino, &e));
            }
        }
        let change = SetAttr {
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size: None,
            atime_ns: atime.map(time_ns),
            mtime_ns: mtime.map(time_ns),
        };
        let attr = if mode.is_some()
            || uid.is_some()
            || gid.is_some()
            || atime.is_some()
            || mtime.is_some()
        {
            self.ds().setattr(ino, &change)
        } else {
            self.ds().getattr(ino)
        };
        match attr {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno("setattr", ino, &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        use std::os::unix::ffi::OsStrExt;
        match self.ds().readlink(ino.0) {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(errno("readlink", ino.0, &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        if let Err(e) = self.check_writable() {
            return reply.error(e);
        }
        let file_type = mode & libc::S_IFMT;
        // mknod(2) with no type makes a regular file.
        let attr = if file_type == 0 || file_type == libc::S_IFREG {
            self.create_file(req, parent.0, name, mode, umask)
        } else {
            let Some(kind) = Kind::from_type_bits(mode).filter(|k| k.is_special()) else {
                return reply.error(Errno::EINVAL);
            };
            self.creds(req, parent.0).and_then(|(creds, _)| {
                let perm = mode & !umask & 0o7777;
                let rdev = u64::from(rdev);
                self.ds().mknod(parent.0, name, kind, perm, rdev, creds)
            })
        };
        self.entry(reply, "mknod", parent.0, attr);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        if let Err(e) = self.check_writable() {
            return reply.error(e);
        }
        let attr = self.creds(req, parent.0).and_then(|(creds, sgid)| {
            let mut mode = mode & !umask & 0o7777;
            if sgid {
                mode |= libc::S_ISGID;
            }
            self.ds().mkdir(parent.0, name, mode, creds)
        });
        self.entry(reply, "mkdir", parent.0, attr);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if let Err(e) = self.check_writable() {
            return reply.error(e);
        }
        let _removal = self.shared.files.removal();
        match self.ds().unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("unlink", parent.0, &e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if let Err(e) = self.check_writable() {
            return reply.error(e);
        }
        let _removal = self.shared.files.removal();
        match self.ds().rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("rmdir", parent.0, &e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        if let Err(e) = self.check_writable() {
            return reply.error(e);
        }
        let attr = self.creds(req, parent.0).and_then(|(creds, _)| {
            self.ds()
                .symlink(parent.0, link_name, target.as_os_str(), creds)
        });
        self.entry(reply, "symlink", parent.0, attr);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if let Err(e) = self.check_writable() {
            return reply.error(e);
        }
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let _removal = self.shared.files.removal();
        match self
            .ds()
            .rename(parent.0, name, newparent.0, newname, no_replace)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("rename", parent.0, &e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        if let Err(e) = self.check_writable() {
            return reply.error(e);
        }
        self.entry(
            reply,
            "link",
            ino.0,
            self.ds().link(ino.0, newparent.0, newname),
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.ds().getattr(ino.0).is_ok_and(|a| a.kind == Kind::Rdm) {
            let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
            if write && let Err(e) = self.check_writable() {
                return reply.error(e);
            }
            // O_TRUNC cannot shrink a device: the mapping keeps its LUN's size.
            return match self.shared.rdms.open(self.ds(), ino.0, write) {
                Ok(fh) => reply.opened(Fh(fh), FopenFlags::FOPEN_DIRECT_IO),
                Err(e) => reply.error(e),
            };
        }
        match self.open_file(req.uid(), ino.0, flags) {
            Ok((fh, policy)) => reply.opened(Fh(fh), fopen_flags(policy)),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: Fh,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if RdmFiles::is_rdm(fh.0) {
            return match self.shared.rdms.read(fh.0, offset, size as usize) {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(e),
            };
        }
        let Some((inode, _)) = self.shared.files.get(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let io = inode.io();
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            let size = size as usize;
            if buf.len() < size {
                buf.resize(size, 0);
            }
            match io.read(self.ds(), &mut buf[..size], offset) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(errno("read", ino.0, &e)),
            }
        });
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: Fh,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if RdmFiles::is_rdm(fh.0) {
            // A request is at most MAX_REQUEST bytes.
            return match self.shared.rdms.write(fh.0, offset, data) {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(e),
            };
        }
        let Some((inode, true)) = self.shared.files.get(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        if let Err(e) = self.kill_suid(req.uid(), ino.0) {
            return reply.error(errno("write", ino.0, &e));
        }
        match inode.io().write(self.ds(), data, offset) {
            // A request is at most MAX_REQUEST bytes.
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno("write", ino.0, &e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: Fh, _owner: LockOwner, reply: ReplyEmpty) {
        // Writes are on the datastore when they return; close needs nothing more.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: Fh,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if RdmFiles::is_rdm(fh.0) {
            self.shared.rdms.release(fh.0);
        } else {
            self.shared.files.release(self.ds(), fh.0);
        }
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: Fh, _datasync: bool, reply: ReplyEmpty) {
        if RdmFiles::is_rdm(fh.0) {
            return match self.shared.rdms.fsync(fh.0) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            };
        }
        // Data is written in place before write returns; fsync commits the journal (size,
        // new blocks) and flushes the LUN, which makes both durable.
        match self.ds().fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fsync", ino.0, &e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.ds().getattr(ino.0) {
            Ok(a) if a.kind == Kind::Dir => reply.opened(Fh(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(errno("opendir", ino.0, &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: Fh,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self.list_dir("readdir", ino.0, offset, |e| {
            Ok(reply.add(INodeNo(e.ino), e.cookie, file_type(e.kind), &e.name))
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: Fh,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let listed = self.list_dir("readdirplus", ino.0, offset, |e| {
            let attr = match self.ds().getattr(e.ino) {
                Ok(a) => a,
                // Removed since the directory block was read.
                Err(vmfs::Error::NotFound { .. }) => return Ok(false),
                Err(err) => return Err(errno("readdirplus", e.ino, &err)),
            };
            Ok(reply.add(
                INodeNo(e.ino),
                e.cookie,
                &e.name,
                &TTL,
                &file_attr(&attr),
                Generation(attr.generation),
            ))
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: Fh, _datasync: bool, reply: ReplyEmpty) {
        match self.ds().sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fsyncdir", ino.0, &e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.ds().statfs() {
            Ok(s) => reply.statfs(
                s.blocks,
                s.blocks_free,
                s.blocks_free,
                s.files,
                s.files_free,
                s.block_size,
                s.name_max,
                s.block_size,
            ),
            Err(e) => reply.error(errno("statfs", 0, &e)),
        }
    }

    // No extended attributes. ENOSYS (rather than ENOTSUP) makes the kernel remember that and
    // answer every later call itself.
    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if let Err(e) = self.check_writable() {
            return reply.error(e);
        }
        let created = self.create_file(req, parent.0, name, mode, umask);
        let (attr, flags) = match created {
            // A new file is empty: nothing to truncate.
            Ok(a) => (a, flags & !libc::O_TRUNC),
            // Another host created it between the kernel's lookup and now: without O_EXCL
            // that is an ordinary open.
            Err(vmfs::Error::Exists { .. }) if flags & libc::O_EXCL == 0 => {
                match self.ds().lookup(parent.0, name) {
                    Ok(a) if a.kind == Kind::File => (a, flags),
                    Ok(_) => return reply.error(Errno::EISDIR),
                    Err(e) => return reply.error(errno("create", parent.0, &e)),
                }
            }
            Err(e) => return reply.error(errno("create", parent.0, &e)),
        };
        let (fh, policy) = match self.open_file(req.uid(), attr.ino, OpenFlags(flags)) {
            Ok(opened) => opened,
            Err(e) => return reply.error(e),
        };
        match self.ds().getattr(attr.ino) {
            Ok(a) => reply.created(
                &TTL,
                &file_attr(&a),
                Generation(a.generation),
                Fh(fh),
                fopen_flags(policy),
            ),
            Err(e) => {
                self.shared.files.release(self.ds(), fh);
                reply.error(errno("create", attr.ino, &e));
            }
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: Fh,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        if let Err(e) = self.check_writable() {
            return reply.error(e);
        }
        let ino = ino.0;
        let ds = self.ds();
        let result = match mode {
            0 | KEEP => self.write_locked(ino, Some(fh.0), |io| {
                io.fallocate(ds, offset, length, mode == KEEP)
            }),
            m if m == PUNCH | KEEP => {
                self.write_locked(ino, Some(fh.0), |io| io.punch_hole(ds, offset, length))
            }
            m if m & !KEEP == ZERO => self.write_locked(ino, Some(fh.0), |io| {
                io.punch_hole(ds, offset, length)?;
                io.fallocate(ds, offset, length, m & KEEP != 0)
            }),
            _ => return reply.error(Errno::from_i32(libc::EOPNOTSUPP)),
        };
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fallocate", ino, &e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: Fh,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Ok(from) = u64::try_from(offset) else {
            return reply.error(Errno::ENXIO);
        };
        let found = match whence {
            libc::SEEK_DATA => self.ds().seek_data(ino.0, from),
            libc::SEEK_HOLE => self.ds().seek_hole(ino.0, from),
            // The kernel answers SEEK_SET, SEEK_CUR and SEEK_END itself.
            _ => return reply.error(Errno::EINVAL),
        };
        match found {
            Ok(Some(at)) => match i64::try_from(at) {
                Ok(at) => reply.offset(at),
                Err(_) => reply.error(Errno::EOVERFLOW),
            },
            Ok(None) => reply.error(Errno::ENXIO),
            Err(e) => reply.error(errno("lseek", ino.0, &e)),
        }
    }
}
