//! The on-disk locks this host holds and the rules the datastore follows with them.
//!
//! - Every metadata change happens under the exclusive lock of what it changes: the inode
//!   (a directory for entry changes) or the resource cluster (bitmap). Locks taken for a
//!   change are kept until the next commit point, where the running transaction is
//!   committed, written in place and checkpointed before they are released: the next holder
//!   reads everything from the LUN, and no journal ever holds an image of a unit whose lock
//!   its host has given up (so replaying a dead host's journal never overwrites a later
//!   holder's change).
//! - Open files hold their inode's lock for as long as they are open: exclusive,
//!   read-only shared or multi-writer. A metadata change of an inode held by open handles
//!   of this host alone upgrades the lock to exclusive until the commit point.
//! - A request blocked by another host either fails at once (a live host has the object
//!   open) or is waited for: the operation drops its changes, this host commits and
//!   releases its own transient locks (so nobody waits on it), waits, and retries.
//! - On acquiring a lock that was not held, everything cached about the object is dropped.

use crate::cluster::{LockMode, LockTarget, Verdict};
use crate::error::{Error, Result};
use crate::handle::Access;
use crate::layout::ResourceKind;
use crate::state::State;

#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub mode: LockMode,
    pub open: bool,
    /// Taken or upgraded for a metadata change: at the next commit point it is released, or
    /// returned to what this host's open handles need.
    pub op: bool,
    /// Data I/O running outside the state lock relies on it: not released until unpinned.
    pub pins: u32,
}

/// A lock request to wait for before the operation is retried.
#[derive(Debug, Clone)]
pub(crate) struct Wait {
    pub target: LockTarget,
    pub want: (LockMode, bool),
    pub object: String,
}

impl State {
    fn acquire(&mut self, target: LockTarget, want: (LockMode, bool), op: bool) -> Result<()> {
        let Some(node) = self.node.clone() else {
            return Ok(());
        };
        let newly = !self.held.contains_key(&target);
        match node.change(target, Some(want))? {
            Ok(_) => {
                if newly {
                    self.forget_target(target);
                }
                let h = self.held.entry(target).or_insert(Held {
                    mode: want.0,
                    open: want.1,
                    op,
                    pins: 0,
                });
                h.mode = want.0;
                h.open = want.1 || want.0 != LockMode::Exclusive;
                h.op |= op;
                Ok(())
            }
            Err(c) => {
                let object = target.describe();
                let err = node.busy(object.clone(), &c);
                if !(c.verdict == Verdict::Alive && c.open) {
                    self.wait = Some(Wait {
                        target,
                        want,
                        object,
                    });
                }
                Err(err)
            }
        }
    }

    /// Another host may have changed the object while we did not hold its lock.
    fn forget_target(&mut self, target: LockTarget) {
        match target {
            LockTarget::Inode(ino) => self.forget_inode(ino),
            LockTarget::Cluster(kind, c) => {
                let off = self.sb().area(kind).bitmap_offset(c);
                self.st.forget(off);
                self.forget_free_count(kind);
            }
        }
    }

    /// Exclusive metadata rights on `ino` until the next commit point.
    pub fn lock_inode(&mut self, ino: u64) -> Result<()> {
        match self.held.get(&LockTarget::Inode(ino)) {
            Some(h) if h.mode == LockMode::Exclusive => Ok(()),
            Some(_) => self.acquire(LockTarget::Inode(ino), (LockMode::Exclusive, true), true),
            None => self.acquire(LockTarget::Inode(ino), (LockMode::Exclusive, false), true),
        }
    }

    /// A cluster's lock, for allocating from or freeing into it. Without `wait`, a cluster
    /// held by another host is reported as `Ok(false)` so the caller tries another.
    pub fn lock_cluster(&mut self, kind: ResourceKind, cluster: u64, wait: bool) -> Result<bool> {
        let target = LockTarget::Cluster(kind, cluster);
        if self.held.contains_key(&target) || self.node.is_none() {
            return Ok(true);
        }
        if wait {
            self.acquire(target, (LockMode::Exclusive, false), true)?;
            return Ok(true);
        }
        match self.acquire(target, (LockMode::Exclusive, false), true) {
            Ok(()) => Ok(true),
            Err(Error::Busy { .. }) => {
                self.wait = None;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The lock an open handle of `access` needs, kept while handles are open.
    pub fn lock_open(&mut self, ino: u64, access: Access) -> Result<()> {
        let mode = lock_mode(access);
        match self.held.get(&LockTarget::Inode(ino)) {
            Some(h) if h.mode == LockMode::Exclusive || (h.mode == mode && h.open) => Ok(()),
            _ => self.acquire(LockTarget::Inode(ino), (mode, true), false),
        }
    }

    /// Keeps `ino`'s lock held while data I/O runs without the state lock.
    pub fn pin(&mut self, ino: u64) {
        if let Some(h) = self.held.get_mut(&LockTarget::Inode(ino)) {
            h.pins += 1;
        }
    }

    pub fn unpin(&mut self, ino: u64) {
        if let Some(h) = self.held.get_mut(&LockTarget::Inode(ino)) {
            h.pins = h.pins.saturating_sub(1);
        }
    }

    /// The last handle of this host on `ino` closed: give the lock up at the commit point.
    pub fn handles_closed(&mut self, ino: u64) {
        if let Some(h) = self.held.get_mut(&LockTarget::Inode(ino)) {
            h.op = true;
        }
    }

    /// The mode this host's open handles of `ino` need.
    fn handle_mode(&self, ino: u64) -> Option<LockMode> {
        let holders = self.locks.get(&ino)?;
        if holders.iter().any(|h| h.access == Access::Exclusive) {
            return Some(LockMode::Exclusive);
        }
        holders.first().map(|h| lock_mode(h.access))
    }

    /// True when a commit point would do something.
    pub fn has_work(&self) -> bool {
        self.st.has_uncommitted() || self.held.values().any(|h| h.op && h.pins == 0)
    }

    /// Commit point: everything so far committed, in place and checkpointed; then the locks
    /// taken for metadata changes are released (or returned to what open handles need).
    pub fn sync_point(&mut self) -> Result<()> {
        if self.node.is_none() {
            return Ok(());
        }
        self.st.commit_point()?;
        self.release_ops();
        Ok(())
    }

    fn release_ops(&mut self) {
        let Some(node) = self.node.clone() else {
            return;
        };
        let due: Vec<LockTarget> = self
            .held
            .iter()
            .filter(|(_, h)| h.op && h.pins == 0)
            .map(|(t, _)| *t)
            .collect();
        for target in due {
            let keep = match target {
                LockTarget::Inode(ino) => self.handle_mode(ino),
                LockTarget::Cluster(..) => None,
            };
            match node.change(target, keep.map(|m| (m, true))) {
                Ok(Ok(_)) => match keep {
                    Some(mode) => {
                        if let Some(h) = self.held.get_mut(&target) {
                            h.mode = mode;
                            h.open = true;
                            h.op = false;
                        }
                    }
                    None => {
                        self.held.remove(&target);
                    }
                },
                Ok(Err(c)) => {
                    tracing::warn!(lock = %target.describe(), holder = ?c.holder, "lock could not be returned to its handles' mode");
                }
                Err(e) => {
                    tracing::warn!(lock = %target.describe(), error = %e, "releasing a lock failed; retried at the next commit point");
                }
            }
        }
    }

    /// Gives up every lock (unmount); the caller has made everything durable first.
    pub fn release_all(&mut self) -> Result<()> {
        let Some(node) = self.node.clone() else {
            return Ok(());
        };
        let mut first_error = None;
        for target in self.held.keys().copied().collect::<Vec<_>>() {
            match node.change(target, None) {
                Ok(_) => {
                    self.held.remove(&target);
                }
                Err(e) => {
                    tracing::warn!(lock = %target.describe(), error = %e, "releasing a lock at unmount failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

pub(crate) fn lock_mode(access: Access) -> LockMode {
    match access {
        Access::ReadOnly => LockMode::SharedRead,
        Access::Exclusive => LockMode::Exclusive,
        Access::MultiWriter => LockMode::MultiWriter,
    }
}
