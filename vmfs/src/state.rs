//! In-memory state of an open datastore and the metadata primitives every operation is built
//! from: inodes, resource allocation, the block map, directory indexes.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Instant;

use crate::cluster::{LockTarget, Node};
use crate::codec::*;
use crate::dir::{self, DirIndex, Slot};
use crate::error::{Error, Result};
use crate::inode::{self, ADDR_MASK, AddrMode, Inode, InodeView, Kind};
use crate::journal::Orphan;
use crate::layout::{
    DIRECT_ADDRS, POINTER_BLOCK_SIZE, PTR_UNITS, PTRS_PER_BLOCK, PTRS_PER_UNIT, ResourceKind,
    Superblock,
};
use crate::locks::{Held, Wait};
use crate::store::Store;

pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Where a logical block's address lives.
enum Place {
    Direct(u64),
    Indirect { level: u32, index: u64 },
}

fn span(depth: u32) -> u64 {
    PTRS_PER_BLOCK.pow(depth)
}

fn place(n: u64) -> Option<Place> {
    if n < DIRECT_ADDRS {
        return Some(Place::Direct(n));
    }
    let mut index = n - DIRECT_ADDRS;
    for level in 1..=3 {
        if index < span(level) {
            return Some(Place::Indirect { level, index });
        }
        index -= span(level);
    }
    None
}

struct Cursor {
    cluster: u64,
    hint: u64,
}

/// Holders of in-process file locks (the on-disk lock records of the cluster layer take
/// the same shape).
#[derive(Debug, Clone)]
pub(crate) struct Holder {
    pub id: u64,
    pub access: crate::Access,
}

pub(crate) struct State {
    pub st: Store,
    cursors: HashMap<ResourceKind, Cursor>,
    /// Free resources per kind and when they were counted (other hosts allocate too).
    free: HashMap<ResourceKind, (u64, Instant)>,
    pub dirs: HashMap<u64, DirIndex>,
    pub orphans: Vec<Orphan>,
    /// Files this process is copying in under a temporary name: their `Staged` orphan
    /// entries are live work, not a crash's leftovers.
    pub staging: HashSet<u64>,
    /// This process's open handles per inode.
    pub locks: HashMap<u64, Vec<Holder>>,
    pub next_holder: u64,
    /// The joined host of a read-write open; None when read-only.
    pub node: Option<Arc<Node>>,
    /// On-disk locks this host holds.
    pub held: HashMap<LockTarget, Held>,
    /// Set by a lock request that should be waited for: the operation is retried after it.
    pub wait: Option<Wait>,
    /// Inodes whose unit was checked against the LUN during the current operation.
    validated: HashSet<u64>,
}

impl State {
    pub fn new(st: Store, seed: u64, node: Option<Arc<Node>>) -> State {
        let mut cursors = HashMap::new();
        for kind in ResourceKind::ALL {
            let clusters = st.sb.area(kind).clusters().max(1);
            // Hosts start allocating in different clusters so they rarely contend.
            let cluster = seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(kind.code() as u32 * 7)
                % clusters;
            cursors.insert(kind, Cursor { cluster, hint: 0 });
        }
        State {
            st,
            cursors,
            free: HashMap::new(),
            dirs: HashMap::new(),
            orphans: Vec::new(),
            staging: HashSet::new(),
            locks: HashMap::new(),
            next_holder: 1,
            node,
            held: HashMap::new(),
            wait: None,
            validated: HashSet::new(),
        }
    }

    /// Called at the start of every operation: what was checked for an earlier one may have
    /// changed since.
    pub fn begin_op(&mut self) -> Result<()> {
        self.validated.clear();
        self.wait = None;
        self.st.refresh_overlay()
    }

    pub fn sb(&self) -> &Superblock {
        &self.st.sb
    }

    /// Forgets derived state after a failed operation dropped its changes.
    pub fn forget_derived(&mut self) {
        self.dirs.clear();
        self.free.clear();
    }

    // ---- inodes ----------------------------------------------------------------------

    fn check_ino(&self, ino: u64) -> Result<()> {
        if ino == 0 || ino > self.sb().inodes.count {
            return Err(Error::NotFound {
                object: format!("inode {ino}"),
            });
        }
        Ok(())
    }

    pub fn holds_inode(&self, ino: u64) -> bool {
        self.held.contains_key(&LockTarget::Inode(ino))
    }

    /// The inode unit, live or free. An inode this host holds no lock on is reread from the
    /// LUN once per operation; when it changed, everything cached about it is dropped.
    pub fn inode_unit(&mut self, ino: u64) -> Result<Arc<Unit>> {
        self.check_ino(ino)?;
        let off = self.sb().inode_offset(ino);
        let unlocked =
            !self.holds_inode(ino) && !self.st.is_pending(off) && !self.validated.contains(&ino);
        let u = if unlocked {
            let before = self.st.clean_copy(off);
            let fresh = self
                .st
                .load_fresh(off, MAGIC_INODE, &|| format!("inode {ino}"))?;
            let same = before.is_some_and(|b| {
                b.generation() == fresh.generation()
                    && b.version() == fresh.version()
                    && b.kind_code() == fresh.kind_code()
            });
            if !same {
                self.forget_inode_contents(ino);
            }
            self.validated.insert(ino);
            fresh
        } else {
            self.st.load(off, MAGIC_INODE, &|| format!("inode {ino}"))?
        };
        if let Err(why) = inode::check(&u, ino) {
            return Err(self.st.corrupt(format!("inode {ino}"), off, why));
        }
        Ok(u)
    }

    /// A live inode.
    pub fn inode(&mut self, ino: u64) -> Result<Arc<Unit>> {
        let u = self.inode_unit(ino)?;
        if u.kind_code() == inode::KIND_FREE {
            return Err(Error::NotFound {
                object: format!("inode {ino}"),
            });
        }
        Ok(u)
    }

    /// Drops the cached directory index and directory/pointer units of `ino` (not its
    /// inode unit).
    pub fn forget_inode_contents(&mut self, ino: u64) {
        self.dirs.remove(&ino);
        self.st.forget_owned(ino);
    }

    /// Drops everything cached about `ino`, its inode unit included.
    pub fn forget_inode(&mut self, ino: u64) {
        let off = self.sb().inode_offset(ino);
        self.forget_inode_contents(ino);
        self.st.forget(off);
        self.validated.remove(&ino);
    }

    pub fn put_inode(&mut self, i: Inode) {
        let off = self.sb().inode_offset(i.ino());
        self.st.put(off, i.seal(off));
    }

    /// Allocates a descriptor and takes its lock; the generation continues from the
    /// previous owner's.
    pub fn alloc_inode(&mut self) -> Result<(u64, u64)> {
        let index = self.alloc(ResourceKind::Inode, None, "a new file")?;
        let ino = index + 1;
        self.lock_inode(ino)?;
        let off = self.sb().inode_offset(ino);
        let old = self.st.read_raw(off)?;
        let generation = if verify(&old[..], MAGIC_INODE, off, UNIT).is_ok() && old.ino() == ino {
            old.generation() + 1
        } else {
            1
        };
        Ok((ino, generation))
    }

    pub fn free_inode(&mut self, ino: u64, generation: u64) -> Result<()> {
        self.release(ResourceKind::Inode, ino - 1)?;
        self.put_inode(Inode::freed(ino, generation));
        self.dirs.remove(&ino);
        Ok(())
    }

    // ---- allocation --------------------------------------------------------------------

    pub fn holds_cluster(&self, kind: ResourceKind, cluster: u64) -> bool {
        self.held.contains_key(&LockTarget::Cluster(kind, cluster))
    }

    /// A cluster's bitmap: cached while this host holds the cluster's lock, otherwise read
    /// afresh (and then only a hint: another host may change it at any moment).
    pub fn bitmap(&mut self, kind: ResourceKind, cluster: u64) -> Result<Arc<Unit>> {
        let area = *self.sb().area(kind);
        let off = area.bitmap_offset(cluster);
        let object = || format!("{} bitmap of cluster {cluster}", kind.name());
        let u = if self.holds_cluster(kind, cluster) || self.st.is_pending(off) {
            self.st.load(off, MAGIC_BITMAP, &object)?
        } else {
            self.st.load_fresh(off, MAGIC_BITMAP, &object)?
        };
        if let Err(why) = crate::bitmap::check_header(&u, kind, cluster, area.in_cluster(cluster)) {
            return Err(self.st.corrupt(object(), off, why));
        }
        Ok(u)
    }

    fn set_bit(&mut self, kind: ResourceKind, index: u64, value: bool) -> Result<bool> {
        let area = *self.sb().area(kind);
        let per = u64::from(area.per_cluster);
        let cluster = index / per;
        let u = self.bitmap(kind, cluster)?;
        let mut m = Box::new(*u);
        let off = area.bitmap_offset(cluster);
        if !crate::bitmap::set(&mut m, index % per, value, off) {
            return Ok(false);
        }
        self.st.put(off, m);
        if let Some((f, _)) = self.free.get_mut(&kind) {
            *f = if value { f.saturating_sub(1) } else { *f + 1 };
        }
        Ok(true)
    }

    /// Takes one resource, preferring `goal` (the next block of the same file), then the
    /// host's current cluster, then any cluster with room. A host allocates only from
    /// clusters whose lock it holds; clusters locked by other hosts are skipped, and only
    /// when every cluster with room is locked elsewhere does the operation wait.
    pub fn alloc(&mut self, kind: ResourceKind, goal: Option<u64>, what: &str) -> Result<u64> {
        let area = *self.sb().area(kind);
        let per = u64::from(area.per_cluster);
        if let Some(g) = goal.filter(|&g| g < area.count) {
            let u = self.bitmap(kind, g / per)?;
            if !crate::bitmap::get(&u, g % per) && self.lock_cluster(kind, g / per, false)? {
                let u = self.bitmap(kind, g / per)?;
                if !crate::bitmap::get(&u, g % per) {
                    self.set_bit(kind, g, true)?;
                    return Ok(g);
                }
            }
        }
        let clusters = area.clusters();
        let (start, hint) = self
            .cursors
            .get(&kind)
            .map(|c| (c.cluster, c.hint))
            .unwrap_or((0, 0));
        let mut busy = None;
        for step in 0..clusters {
            let cluster = (start + step) % clusters;
            let u = self.bitmap(kind, cluster)?;
            if crate::bitmap::free(&u) == 0 {
                continue;
            }
            if !self.lock_cluster(kind, cluster, false)? {
                busy.get_or_insert(cluster);
                continue;
            }
            let u = self.bitmap(kind, cluster)?;
            let from = if step == 0 { hint } else { 0 };
            if let Some(bit) = crate::bitmap::find_free(&u, from) {
                let index = cluster * per + bit;
                self.set_bit(kind, index, true)?;
                self.cursors.insert(
                    kind,
                    Cursor {
                        cluster,
                        hint: bit + 1,
                    },
                );
                return Ok(index);
            }
        }
        if let Some(cluster) = busy {
            // Every cluster with room is locked by another host: wait for this one.
            self.lock_cluster(kind, cluster, true)?;
            return self.alloc(kind, goal, what);
        }
        Err(Error::NoSpace {
            lun: self.st.lun_name(),
            what: what.to_string(),
            resource: kind.name(),
        })
    }

    /// Frees one resource, taking its cluster's lock (waiting for it if another host holds
    /// it).
    pub fn release(&mut self, kind: ResourceKind, index: u64) -> Result<()> {
        let area = *self.sb().area(kind);
        let cluster = index / u64::from(area.per_cluster);
        self.lock_cluster(kind, cluster, true)?;
        if !self.set_bit(kind, index, false)? {
            let off = area.bitmap_offset(cluster);
            return Err(self.st.corrupt(
                format!("{} bitmap", kind.name()),
                off,
                format!("freeing resource {index}, which is already free"),
            ));
        }
        Ok(())
    }

    /// Free resources of a kind: every bitmap of that kind is read, at most once per
    /// commit interval (other hosts allocate too, so the figure is an estimate).
    pub fn free_count(&mut self, kind: ResourceKind) -> Result<u64> {
        let ttl = self.sb().timing().commit_interval();
        if let Some((f, at)) = self.free.get(&kind) {
            if at.elapsed() < ttl {
                return Ok(*f);
            }
        }
        let clusters = self.sb().area(kind).clusters();
        let mut total = 0;
        for c in 0..clusters {
            total += crate::bitmap::free(&*self.bitmap(kind, c)?);
        }
        self.free.insert(kind, (total, Instant::now()));
        Ok(total)
    }

    pub fn forget_free_count(&mut self, kind: ResourceKind) {
        self.free.remove(&kind);
    }

    pub fn ensure_free(&mut self, kind: ResourceKind, needed: u64, what: &str) -> Result<()> {
        if needed > 0 && self.free_count(kind)? < needed {
            return Err(Error::NoSpace {
                lun: self.st.lun_name(),
                what: what.to_string(),
                resource: kind.name(),
            });
        }
        Ok(())
    }

    // ---- block map ---------------------------------------------------------------------

    /// Index of a file block from an address, checked against the datastore.
    pub fn block_index(&self, owner: u64, addr: u64) -> Result<u64> {
        self.resource_index(ResourceKind::FileBlock, owner, addr)
    }

    pub fn resource_index(&self, kind: ResourceKind, owner: u64, addr: u64) -> Result<u64> {
        let index = (addr & ADDR_MASK).wrapping_sub(1);
        if addr & !ADDR_MASK != 0 || index >= self.sb().area(kind).count {
            return Err(self.st.corrupt(
                format!("inode {owner}"),
                self.sb().inode_offset(owner),
                format!("address {addr:#x} is outside the {}", kind.name()),
            ));
        }
        Ok(index)
    }

    pub fn block_offset(&self, index: u64) -> u64 {
        self.sb().file_blocks.resource_offset(index)
    }

    pub fn sub_block_offset(&self, owner: u64, addr: u64) -> Result<u64> {
        let i = self.resource_index(ResourceKind::SubBlock, owner, addr)?;
        Ok(self.sb().sub_blocks.resource_offset(i))
    }

    fn ptr_unit(&mut self, owner: u64, addr: u64, k: u64) -> Result<(u64, Arc<Unit>)> {
        let p = self.resource_index(ResourceKind::PointerBlock, owner, addr)?;
        let off = self.sb().pointer_blocks.resource_offset(p) + k * UNIT_U64;
        let u = self.st.load_owned(off, MAGIC_POINTER, owner, &|| {
            format!("pointer block {p} unit {k} of inode {owner}")
        })?;
        if let Err(why) = inode::pointer_check(&u, p, k) {
            return Err(self.st.corrupt(
                format!("pointer block {p} unit {k} of inode {owner}"),
                off,
                why,
            ));
        }
        Ok((off, u))
    }

    fn new_pointer_block(&mut self, i: &mut Inode) -> Result<u64> {
        let p = self.alloc(
            ResourceKind::PointerBlock,
            None,
            &format!("inode {}", i.ino()),
        )?;
        let base = self.sb().pointer_blocks.resource_offset(p);
        for k in 0..PTR_UNITS {
            let off = base + k * UNIT_U64;
            self.st
                .put_owned(off, inode::pointer_unit_new(p, k, off), i.ino());
        }
        i.add_allocated(POINTER_BLOCK_SIZE as i64);
        Ok(p + 1)
    }

    /// Address of logical block `n` (0 = hole).
    pub fn block_at(&mut self, i: &impl InodeView, n: u64) -> Result<u64> {
        let owner = i.ino();
        match place(n) {
            None => Ok(0),
            Some(Place::Direct(d)) => Ok(i.direct(d)),
            Some(Place::Indirect { level, mut index }) => {
                let mut addr = i.indirect(level);
                for depth in (0..level).rev() {
                    if addr == 0 {
                        return Ok(0);
                    }
                    let slot = index / span(depth);
                    index %= span(depth);
                    let (_, u) = self.ptr_unit(owner, addr, slot / PTRS_PER_UNIT)?;
                    addr = inode::pointer_get(&u, slot % PTRS_PER_UNIT);
                }
                Ok(addr)
            }
        }
    }

    /// Maps logical block `n` to `addr`, creating pointer blocks on the way.
    pub fn set_block(&mut self, i: &mut Inode, n: u64, addr: u64) -> Result<()> {
        let owner = i.ino();
        match place(n) {
            None => Err(Error::FileTooBig {
                object: format!("inode {owner}"),
                size: n,
                max: self.sb().max_file_size(),
            }),
            Some(Place::Direct(d)) => {
                i.set_direct(d, addr);
                Ok(())
            }
            Some(Place::Indirect { level, mut index }) => {
                let mut pb = i.indirect(level);
                if pb == 0 {
                    if addr == 0 {
                        return Ok(());
                    }
                    pb = self.new_pointer_block(i)?;
                    i.set_indirect(level, pb);
                }
                for depth in (0..level).rev() {
                    let slot = index / span(depth);
                    index %= span(depth);
                    let (off, u) = self.ptr_unit(owner, pb, slot / PTRS_PER_UNIT)?;
                    let s = slot % PTRS_PER_UNIT;
                    if depth == 0 {
                        let mut m = Box::new(*u);
                        inode::pointer_set(&mut m, s, addr, off);
                        self.st.put_owned(off, m, owner);
                        return Ok(());
                    }
                    let mut child = inode::pointer_get(&u, s);
                    if child == 0 {
                        if addr == 0 {
                            return Ok(());
                        }
                        child = self.new_pointer_block(i)?;
                        let mut m = Box::new(*u);
                        inode::pointer_set(&mut m, s, child, off);
                        self.st.put_owned(off, m, owner);
                    }
                    pb = child;
                }
                Ok(())
            }
        }
    }

    /// Pointer blocks that mapping every hole among `blocks` would create.
    pub fn pointer_blocks_needed(&mut self, i: &impl InodeView, blocks: &[u64]) -> Result<u64> {
        let mut missing = std::collections::HashSet::new();
        for &n in blocks {
            let Some(Place::Indirect { level, mut index }) = place(n) else {
                continue;
            };
            let mut addr = i.indirect(level);
            let mut prefix = 0u64;
            for depth in (0..level).rev() {
                if addr == 0 {
                    missing.insert((level, depth, prefix));
                } else {
                    let slot = index / span(depth);
                    let (_, u) = self.ptr_unit(i.ino(), addr, slot / PTRS_PER_UNIT)?;
                    addr = if depth > 0 {
                        inode::pointer_get(&u, slot % PTRS_PER_UNIT)
                    } else {
                        0
                    };
                }
                prefix = prefix * PTRS_PER_BLOCK + index / span(depth);
                index %= span(depth);
            }
        }
        Ok(missing.len() as u64)
    }

    /// First mapped block at or after `from`: (logical block, address).
    pub fn next_mapped(&mut self, i: &impl InodeView, from: u64) -> Result<Option<(u64, u64)>> {
        for n in from..DIRECT_ADDRS {
            if i.direct(n) != 0 {
                return Ok(Some((n, i.direct(n))));
            }
        }
        let mut base = DIRECT_ADDRS;
        for level in 1..=3 {
            let total = span(level);
            let root = i.indirect(level);
            if root != 0 && from < base + total {
                if let Some(hit) = self.next_in(i.ino(), root, level, base, from.max(base))? {
                    return Ok(Some(hit));
                }
            }
            base += total;
        }
        Ok(None)
    }

    fn next_in(
        &mut self,
        owner: u64,
        addr: u64,
        level: u32,
        base: u64,
        from: u64,
    ) -> Result<Option<(u64, u64)>> {
        let child_span = span(level - 1);
        let first = (from - base) / child_span;
        for k in first / PTRS_PER_UNIT..PTR_UNITS {
            let (_, u) = self.ptr_unit(owner, addr, k)?;
            let mut s = if k == first / PTRS_PER_UNIT {
                first % PTRS_PER_UNIT
            } else {
                0
            };
            while let Some(hit) = inode::pointer_next(&u, s) {
                let child = inode::pointer_get(&u, hit);
                let child_base = base + (k * PTRS_PER_UNIT + hit) * child_span;
                if level == 1 {
                    return Ok(Some((child_base, child)));
                }
                if let Some(found) =
                    self.next_in(owner, child, level - 1, child_base, from.max(child_base))?
                {
                    return Ok(Some(found));
                }
                s = hit + 1;
            }
        }
        Ok(None)
    }

    /// Frees every block mapped at or past logical block `keep`, and the pointer blocks that
    /// become empty. Commits along the way for huge files; each intermediate state is
    /// consistent (pointers cleared before or with their blocks' bits).
    pub fn trim(&mut self, i: &mut Inode, keep: u64) -> Result<()> {
        let bs = i64::from(self.sb().block_size);
        for n in keep.min(DIRECT_ADDRS)..DIRECT_ADDRS {
            let d = i.direct(n);
            if d != 0 {
                let b = self.block_index(i.ino(), d)?;
                self.release(ResourceKind::FileBlock, b)?;
                i.set_direct(n, 0);
                i.add_allocated(-bs);
                self.intermediate(i)?;
            }
        }
        let mut base = DIRECT_ADDRS;
        for level in 1..=3 {
            let total = span(level);
            let root = i.indirect(level);
            if root != 0 && keep < base + total && self.trim_pb(i, root, level, base, keep)? {
                let p = self.resource_index(ResourceKind::PointerBlock, i.ino(), root)?;
                self.release(ResourceKind::PointerBlock, p)?;
                i.set_indirect(level, 0);
                i.add_allocated(-(POINTER_BLOCK_SIZE as i64));
                self.intermediate(i)?;
            }
            base += total;
        }
        Ok(())
    }

    /// Commits mid-operation when the transaction is large, with `i` in its current state.
    fn intermediate(&mut self, i: &Inode) -> Result<()> {
        if self.st.op_len() + 8 >= MAX_OP_UNITS {
            self.put_inode(i.clone());
            self.st.end_op(true);
            self.st.commit()?;
        }
        Ok(())
    }

    fn trim_pb(
        &mut self,
        i: &mut Inode,
        addr: u64,
        level: u32,
        base: u64,
        keep: u64,
    ) -> Result<bool> {
        let child_span = span(level - 1);
        let bs = i64::from(self.sb().block_size);
        let mut empty = true;
        for k in 0..PTR_UNITS {
            let (off, u) = self.ptr_unit(i.ino(), addr, k)?;
            let mut m = Box::new(*u);
            let mut dirty = false;
            let mut s = 0;
            while let Some(hit) = inode::pointer_next(&m, s) {
                s = hit + 1;
                let child = inode::pointer_get(&m, hit);
                let child_base = base + (k * PTRS_PER_UNIT + hit) * child_span;
                if child_base + child_span <= keep {
                    empty = false;
                    continue;
                }
                if level == 1 {
                    let b = self.block_index(i.ino(), child)?;
                    self.release(ResourceKind::FileBlock, b)?;
                    inode::pointer_set(&mut m, hit, 0, off);
                    i.add_allocated(-bs);
                    dirty = true;
                    if self.st.op_len() + 8 >= MAX_OP_UNITS {
                        self.st.put_owned(off, m.clone(), i.ino());
                        dirty = false;
                        self.intermediate(i)?;
                    }
                } else if self.trim_pb(i, child, level - 1, child_base, keep)? {
                    let p = self.resource_index(ResourceKind::PointerBlock, i.ino(), child)?;
                    self.release(ResourceKind::PointerBlock, p)?;
                    inode::pointer_set(&mut m, hit, 0, off);
                    i.add_allocated(-(POINTER_BLOCK_SIZE as i64));
                    self.st.put_owned(off, m.clone(), i.ino());
                    dirty = false;
                    self.intermediate(i)?;
                } else {
                    empty = false;
                }
            }
            if dirty {
                self.st.put_owned(off, m, i.ino());
            }
        }
        Ok(empty)
    }

    // ---- directories -------------------------------------------------------------------

    /// LUN offset of directory unit `k`.
    pub fn dir_unit_location(&mut self, d: &impl InodeView, k: u64) -> Result<u64> {
        let ino = d.ino();
        let bs = u64::from(self.sb().block_size);
        match d.addr_mode() {
            Some(AddrMode::SubBlock) => {
                if (k + 1) * UNIT_U64 > u64::from(self.sb().sub_block_size) {
                    return Err(self.st.corrupt(
                        format!("directory inode {ino}"),
                        self.sb().inode_offset(ino),
                        format!("size {} does not fit its sub-block", d.size()),
                    ));
                }
                Ok(self.sub_block_offset(ino, d.sub_block())? + k * UNIT_U64)
            }
            Some(AddrMode::Tree) => {
                let n = k * UNIT_U64 / bs;
                let addr = self.block_at(d, n)?;
                if addr == 0 {
                    return Err(self.st.corrupt(
                        format!("directory inode {ino}"),
                        self.sb().inode_offset(ino),
                        format!("unit {k} is not mapped"),
                    ));
                }
                let b = self.block_index(ino, addr)?;
                Ok(self.block_offset(b) + k * UNIT_U64 % bs)
            }
            _ => Err(self.st.corrupt(
                format!("directory inode {ino}"),
                self.sb().inode_offset(ino),
                "directory without storage",
            )),
        }
    }

    pub fn dir_unit(
        &mut self,
        d: &impl InodeView,
        k: u64,
    ) -> Result<(u64, Arc<Unit>, Vec<dir::Record>)> {
        let ino = d.ino();
        let off = self.dir_unit_location(d, k)?;
        let u = self.st.load_owned(off, MAGIC_DIR, ino, &|| {
            format!("directory inode {ino} unit {k}")
        })?;
        let recs = dir::records(&u, ino, k).map_err(|why| {
            self.st
                .corrupt(format!("directory inode {ino} unit {k}"), off, why)
        })?;
        Ok((off, u, recs))
    }

    fn load_dir(&mut self, d: &impl InodeView) -> Result<()> {
        let ino = d.ino();
        if self.dirs.contains_key(&ino) {
            return Ok(());
        }
        let mut index = DirIndex::default();
        for k in 0..d.size() / UNIT_U64 {
            let (_, _, recs) = self.dir_unit(d, k)?;
            index.load_unit(k, &recs);
        }
        self.dirs.insert(ino, index);
        Ok(())
    }

    /// The entry `name` of `d`. A name no directory can hold is `NameTooLong`, not absent,
    /// so every call that takes a path reports ENAMETOOLONG as ext4 does.
    pub fn dir_lookup(&mut self, d: &impl InodeView, name: &OsStr) -> Result<Option<Slot>> {
        if name.len() > dir::NAME_MAX {
            return Err(Error::NameTooLong {
                name: name.to_string_lossy().into_owned(),
                len: name.len(),
            });
        }
        self.load_dir(d)?;
        Ok(self
            .dirs
            .get(&d.ino())
            .and_then(|x| x.names.get(name).copied()))
    }

    /// Where `name` lives in `d`; `NotFound` when it is not there.
    fn dir_slot(&mut self, d: &impl InodeView, name: &OsStr) -> Result<Slot> {
        self.dir_lookup(d, name)?.ok_or_else(|| Error::NotFound {
            object: format!(
                "{:?} in directory inode {}",
                name.to_string_lossy(),
                d.ino()
            ),
        })
    }

    pub fn dir_len(&mut self, d: &impl InodeView) -> Result<usize> {
        self.load_dir(d)?;
        Ok(self.dirs.get(&d.ino()).map_or(0, |x| x.names.len()))
    }

    /// Adds a name to directory `d` (a private copy the caller puts afterwards).
    pub fn dir_insert(&mut self, d: &mut Inode, name: &OsStr, ino: u64, kind: Kind) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        self.load_dir(d)?;
        let dino = d.ino();
        let room = self
            .dirs
            .get(&dino)
            .and_then(|x| x.unit_with_room(name.len()));
        let k = match room {
            Some(k) => k,
            None => self.dir_grow(d)?,
        };
        let (off, u, recs) = self.dir_unit(d, k)?;
        let mut m = Box::new(*u);
        if dir::insert(&mut m, &recs, name.as_bytes(), ino, kind).is_none() {
            return Err(self.st.corrupt(
                format!("directory inode {dino} unit {k}"),
                off,
                "free-space index disagrees with the unit",
            ));
        }
        dir::reseal(&mut m, off);
        let recs = dir::records(&m, dino, k).map_err(|why| {
            self.st
                .corrupt(format!("directory inode {dino} unit {k}"), off, why)
        })?;
        self.st.put_owned(off, m, dino);
        if let Some(index) = self.dirs.get_mut(&dino) {
            index.load_unit(k, &recs);
        }
        Ok(())
    }

    /// Appends an empty unit to a directory, moving it from its sub-block to a file block
    /// when the sub-block is full.
    fn dir_grow(&mut self, d: &mut Inode) -> Result<u64> {
        let dino = d.ino();
        let k = d.size() / UNIT_U64;
        let sbs = u64::from(self.sb().sub_block_size);
        let bs = u64::from(self.sb().block_size);
        let what = format!("directory inode {dino}");
        if d.addr_mode() == Some(AddrMode::SubBlock) && (k + 1) * UNIT_U64 > sbs {
            let old_sb = d.sub_block();
            let b = self.alloc(ResourceKind::FileBlock, None, &what)?;
            let base = self.block_offset(b);
            let mut moved = Vec::new();
            for j in 0..k {
                let (_, u, _) = self.dir_unit(d, j)?;
                let mut m = Box::new(*u);
                dir::reseal(&mut m, base + j * UNIT_U64);
                moved.push((base + j * UNIT_U64, m));
            }
            for (off, m) in moved {
                self.st.put_owned(off, m, dino);
            }
            let sb_index = self.resource_index(ResourceKind::SubBlock, dino, old_sb)?;
            self.release(ResourceKind::SubBlock, sb_index)?;
            d.set_addr_mode(AddrMode::Tree);
            d.set_direct(0, b + 1);
            d.add_allocated(bs as i64 - sbs as i64);
        } else if d.addr_mode() == Some(AddrMode::Tree) {
            let n = k * UNIT_U64 / bs;
            if self.block_at(d, n)? == 0 {
                let prev = if n > 0 { self.block_at(d, n - 1)? } else { 0 };
                let goal = if prev != 0 {
                    Some(prev & ADDR_MASK)
                } else {
                    None
                };
                let b = self.alloc(ResourceKind::FileBlock, goal, &what)?;
                self.set_block(d, n, b + 1)?;
                d.add_allocated(bs as i64);
            }
        }
        d.set_size((k + 1) * UNIT_U64);
        let off = self.dir_unit_location(d, k)?;
        let unit = dir::new_unit(dino, k, off);
        if let Some(index) = self.dirs.get_mut(&dino) {
            index.load_unit(k, &dir::records(&unit, dino, k).unwrap_or_default());
        }
        self.st.put_owned(off, unit, dino);
        Ok(k)
    }

    pub fn dir_remove(&mut self, d: &impl InodeView, name: &OsStr) -> Result<Slot> {
        let dino = d.ino();
        let slot = self.dir_slot(d, name)?;
        let (off, u, recs) = self.dir_unit(d, slot.unit)?;
        let mut m = Box::new(*u);
        dir::remove(&mut m, &recs, slot.off);
        dir::reseal(&mut m, off);
        let recs = dir::records(&m, dino, slot.unit)
            .map_err(|why| self.st.corrupt(format!("directory inode {dino}"), off, why))?;
        self.st.put_owned(off, m, dino);
        if let Some(index) = self.dirs.get_mut(&dino) {
            index.names.remove(name);
            index.slack[slot.unit as usize] = dir::slack(&recs);
        }
        Ok(slot)
    }

    /// Points an existing name at another inode (rename over an existing name).
    pub fn dir_retarget(
        &mut self,
        d: &impl InodeView,
        name: &OsStr,
        ino: u64,
        kind: Kind,
    ) -> Result<()> {
        let dino = d.ino();
        let slot = self.dir_slot(d, name)?;
        let (off, u, _) = self.dir_unit(d, slot.unit)?;
        let mut m = Box::new(*u);
        dir::retarget(&mut m, slot.off, ino, kind);
        dir::reseal(&mut m, off);
        self.st.put_owned(off, m, dino);
        if let Some(index) = self.dirs.get_mut(&dino) {
            index
                .names
                .insert(name.to_os_string(), Slot { ino, kind, ..slot });
        }
        Ok(())
    }

    // ---- orphans -----------------------------------------------------------------------

    pub fn set_orphans(&mut self, list: Vec<Orphan>) -> Result<()> {
        let Some(slot) = self.st.journal_slot() else {
            return Ok(());
        };
        if list.len() > crate::journal::MAX_ORPHANS {
            return Err(Error::NoSpace {
                lun: self.st.lun_name(),
                what: "the list of files being freed".into(),
                resource: "orphan list",
            });
        }
        let off = self.sb().orphan_offset(slot);
        self.st.put(off, crate::journal::encode_orphans(&list, off));
        self.orphans = list;
        Ok(())
    }

    pub fn add_orphan(&mut self, o: Orphan) -> Result<()> {
        let mut list = self.orphans.clone();
        list.retain(|x| x.ino() != o.ino());
        list.push(o);
        self.set_orphans(list)
    }

    pub fn remove_orphan(&mut self, ino: u64) -> Result<()> {
        if !self.orphans.iter().any(|o| o.ino() == ino) {
            return Ok(());
        }
        let mut list = self.orphans.clone();
        list.retain(|x| x.ino() != ino);
        self.set_orphans(list)
    }
}

/// Most units one operation may touch before it must commit part of its work.
pub(crate) const MAX_OP_UNITS: usize = 24;
