//! File data: reads, writes, truncate, fallocate, hole punching and SEEK_DATA/SEEK_HOLE.
//!
//! Invariants that make thin files safe: a newly allocated block or sub-block is zeroed
//! wherever the write that allocates it does not cover, and its data is written before the
//! metadata that points to it can be committed (allocating writes hold the state lock until
//! the data is on the LUN). Storage past end-of-file always reads as zeroes, so growing a file
//! never exposes old bytes. Writes into already-allocated storage are not journaled.
//!
//! In the cluster: a write needs the file's exclusive lock (an exclusive handle's, or one
//! taken for the write), except that multi-writer holders overwrite allocated storage inside
//! the file without touching metadata. The lock is pinned while data moves without the state
//! lock, so a commit point cannot release it under the write. A read of a file this host
//! holds no lock on checks afterwards that the inode did not change while it read (another
//! host may have freed and reused the blocks), and reads again if it did.

use std::sync::Arc;

use lun::Lun;

use crate::cluster::LockMode;
use crate::codec::*;
use crate::datastore::{Datastore, release_storage};
use crate::error::{Error, Result};
use crate::inode::{ADDR_MASK, AddrMode, INLINE_MAX, Inode, InodeView, Kind};
use crate::journal::Orphan;
use crate::layout::ResourceKind;
use crate::state::{MAX_OP_UNITS, State, now_ns};

/// Reads `dst.len()` bytes at any byte offset, through an aligned bounce buffer if needed.
pub(crate) fn read_bytes(lun: &dyn Lun, off: u64, dst: &mut [u8]) -> Result<()> {
    let ss = u64::from(lun.sector_size());
    let len = dst.len() as u64;
    if len == 0 {
        return Ok(());
    }
    if off % ss == 0 && len % ss == 0 {
        return Ok(lun.read_at(dst, off)?);
    }
    if let Some((head, body)) = whole_sectors(off, len, ss) {
        // Only the partial sectors at the ends go through a bounce buffer: a large read from
        // a misaligned request (a FUSE read into an unaligned user buffer arrives as 1 MiB
        // less a few bytes) costs no extra copy of its body.
        lun.read_at(&mut dst[head..head + body], off + head as u64)?;
        read_bytes(lun, off, &mut dst[..head])?;
        return read_bytes(lun, off + (head + body) as u64, &mut dst[head + body..]);
    }
    let start = align_down(off, ss);
    let end = align_up(off + len, ss);
    let mut buf = vec![0u8; (end - start) as usize];
    lun.read_at(&mut buf, start)?;
    let at = (off - start) as usize;
    dst.copy_from_slice(&buf[at..at + dst.len()]);
    Ok(())
}

/// For a byte range that covers at least one whole sector and is not aligned: the length of
/// the partial sector before the first whole one and the length of the whole sectors.
fn whole_sectors(off: u64, len: u64, ss: u64) -> Option<(usize, usize)> {
    let first = align_up(off, ss);
    let last = align_down(off + len, ss);
    (first < last).then(|| ((first - off) as usize, (last - first) as usize))
}

/// Writes `data` at any byte offset. Partial sectors are read, patched and rewritten, or,
/// for `fresh` storage, padded with zeroes.
pub(crate) fn write_bytes(lun: &dyn Lun, off: u64, data: &[u8], fresh: bool) -> Result<()> {
    let ss = u64::from(lun.sector_size());
    let len = data.len() as u64;
    if len == 0 {
        return Ok(());
    }
    if off % ss == 0 && len % ss == 0 {
        return Ok(lun.write_at(data, off)?);
    }
    if let Some((head, body)) = whole_sectors(off, len, ss) {
        // Only the partial sectors at the ends are read, patched and rewritten: a large
        // misaligned write (a FUSE write from an unaligned user buffer arrives as 1 MiB less
        // a few bytes, then those bytes) is not copied into a bounce buffer whole.
        lun.write_at(&data[head..head + body], off + head as u64)?;
        write_bytes(lun, off, &data[..head], fresh)?;
        return write_bytes(lun, off + (head + body) as u64, &data[head + body..], fresh);
    }
    let start = align_down(off, ss);
    let end = align_up(off + len, ss);
    let mut buf = vec![0u8; (end - start) as usize];
    if !fresh {
        lun.read_at(&mut buf[..ss as usize], start)?;
        if end - ss > start {
            let tail = (end - ss - start) as usize;
            lun.read_at(&mut buf[tail..], end - ss)?;
        }
    }
    let at = (off - start) as usize;
    buf[at..at + data.len()].copy_from_slice(data);
    Ok(lun.write_at(&buf, start)?)
}

/// Zeroes `len` bytes at any byte offset: whole sectors through `write_zeroes`.
pub(crate) fn zero_bytes(lun: &dyn Lun, off: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let ss = u64::from(lun.sector_size());
    let inner_start = align_up(off, ss);
    let inner_end = align_down(off + len, ss);
    if inner_start >= inner_end {
        return write_bytes(lun, off, &vec![0u8; len as usize], false);
    }
    if inner_start > off {
        write_bytes(lun, off, &vec![0u8; (inner_start - off) as usize], false)?;
    }
    lun.write_zeroes(inner_start, inner_end - inner_start)?;
    if off + len > inner_end {
        write_bytes(
            lun,
            inner_end,
            &vec![0u8; (off + len - inner_end) as usize],
            false,
        )?;
    }
    Ok(())
}

/// What identifies an inode's state: it changes with every metadata change.
fn inode_tag(u: &impl InodeView) -> (u64, u64, u8) {
    (u.generation(), u.version(), u.kind_code())
}

/// One piece of a read: zeroes, bytes from the inode, or a LUN range.
enum Piece {
    Zero(usize),
    Inline(Vec<u8>),
    Lun { off: u64, len: usize },
}

/// A write that needs no allocation: LUN ranges for consecutive parts of the data.
struct Overwrite {
    pieces: Vec<(u64, usize)>,
}

fn file_kind_check(u: &impl InodeView) -> Result<()> {
    match u.kind() {
        Some(Kind::File) => Ok(()),
        Some(Kind::Dir) => Err(Error::IsADirectory {
            object: format!("inode {}", u.ino()),
        }),
        _ => Err(not_a_file(u)),
    }
}

fn not_a_file(u: &impl InodeView) -> Error {
    let reason = if u.kind() == Some(Kind::Rdm) {
        // Its size is the LUN's, its bytes are on the LUN: only the rdm crate reaches them.
        "a raw device mapping, not a regular file: its data is on the mapped LUN"
    } else {
        "not a regular file"
    };
    Error::Invalid {
        object: format!("inode {}", u.ino()),
        reason: reason.into(),
    }
}

impl State {
    fn read_plan(&mut self, ino: u64, off: u64, len: usize) -> Result<Vec<Piece>> {
        let u = self.inode(ino)?;
        if u.kind() == Some(Kind::Dir) {
            return Err(Error::IsADirectory {
                object: format!("inode {ino}"),
            });
        }
        if u.kind() == Some(Kind::Rdm) {
            return Err(not_a_file(&u));
        }
        let size = u.size();
        if off >= size || len == 0 {
            return Ok(Vec::new());
        }
        let n = (len as u64).min(size - off) as usize;
        match u.addr_mode() {
            Some(AddrMode::Inline) => {
                let s = off as usize;
                Ok(vec![Piece::Inline(u.inline()[s..s + n].to_vec())])
            }
            Some(AddrMode::SubBlock) => {
                let base = self.sub_block_offset(ino, u.sub_block())?;
                Ok(vec![Piece::Lun {
                    off: base + off,
                    len: n,
                }])
            }
            Some(AddrMode::Tree) => {
                let bs = u64::from(self.sb().block_size);
                let mut pieces: Vec<Piece> = Vec::new();
                let mut pos = off;
                let end = off + n as u64;
                while pos < end {
                    let block = pos / bs;
                    let within = pos % bs;
                    let take = (bs - within).min(end - pos) as usize;
                    let addr = self.block_at(&u, block)?;
                    if addr == 0 {
                        match pieces.last_mut() {
                            Some(Piece::Zero(z)) => *z += take,
                            _ => pieces.push(Piece::Zero(take)),
                        }
                    } else {
                        let b = self.block_index(ino, addr)?;
                        let lun_off = self.block_offset(b) + within;
                        match pieces.last_mut() {
                            Some(Piece::Lun { off, len }) if *off + *len as u64 == lun_off => {
                                *len += take
                            }
                            _ => pieces.push(Piece::Lun {
                                off: lun_off,
                                len: take,
                            }),
                        }
                    }
                    pos += take as u64;
                }
                Ok(pieces)
            }
            None => Err(self.st.corrupt(
                format!("inode {ino}"),
                self.sb().inode_offset(ino),
                "unknown address mode",
            )),
        }
    }

    /// End of `[off, off + len)`, refused when past the largest file size.
    fn checked_end(&self, ino: u64, off: u64, len: u64) -> Result<u64> {
        let max = self.sb().max_file_size();
        off.checked_add(len)
            .filter(|&e| e <= max)
            .ok_or_else(|| Error::FileTooBig {
                object: format!("inode {ino}"),
                size: off.saturating_add(len),
                max,
            })
    }

    /// Where to look first for a new block at logical block `n`: right after block `n - 1`
    /// of the same file, when it is mapped.
    fn goal_after(&mut self, i: &impl InodeView, n: u64) -> Option<u64> {
        if n == 0 {
            return None;
        }
        self.block_at(i, n - 1)
            .ok()
            .filter(|&a| a != 0)
            .map(|a| a & ADDR_MASK)
    }

    /// The LUN ranges of a write when every byte already has storage and no conversion is
    /// needed; `None` sends the write down the allocating path.
    fn overwrite_plan(&mut self, ino: u64, off: u64, len: u64) -> Result<Option<Overwrite>> {
        let u = self.inode(ino)?;
        file_kind_check(&u)?;
        let end = self.checked_end(ino, off, len)?;
        match u.addr_mode() {
            Some(AddrMode::SubBlock) if end <= u64::from(self.sb().sub_block_size) => {
                let base = self.sub_block_offset(ino, u.sub_block())?;
                Ok(Some(Overwrite {
                    pieces: vec![(base + off, len as usize)],
                }))
            }
            Some(AddrMode::Tree) => {
                let bs = u64::from(self.sb().block_size);
                let mut pieces: Vec<(u64, usize)> = Vec::new();
                let mut pos = off;
                while pos < end {
                    let within = pos % bs;
                    let take = (bs - within).min(end - pos) as usize;
                    let addr = self.block_at(&u, pos / bs)?;
                    if addr == 0 {
                        return Ok(None);
                    }
                    let lun_off = self.block_offset(self.block_index(ino, addr)?) + within;
                    match pieces.last_mut() {
                        Some((o, l)) if *o + *l as u64 == lun_off => *l += take,
                        _ => pieces.push((lun_off, take)),
                    }
                    pos += take as u64;
                }
                Ok(Some(Overwrite { pieces }))
            }
            _ => Ok(None),
        }
    }

    fn finish_write(&mut self, ino: u64, end: u64) -> Result<()> {
        let mut i = Inode::from_unit(&self.inode(ino)?);
        if end > i.size() {
            i.set_size(end);
        }
        let now = now_ns();
        i.set_times(None, Some(now), now);
        self.put_inode(i);
        Ok(())
    }

    /// Moves inline or sub-block content into file block 0 (allocated here when there is
    /// content) and switches the inode to the block tree.
    fn convert_to_tree(&mut self, i: &mut Inode) -> Result<()> {
        let mode = i.addr_mode();
        if mode == Some(AddrMode::Tree) {
            return Ok(());
        }
        let size = i.size();
        let mut content = vec![0u8; size as usize];
        match mode {
            Some(AddrMode::Inline) => content.copy_from_slice(&i.inline()[..size as usize]),
            Some(AddrMode::SubBlock) => {
                let base = self.sub_block_offset(i.ino(), i.sub_block())?;
                read_bytes(&*self.st.lun, base, &mut content)?;
            }
            _ => {}
        }
        release_storage(self, i)?;
        i.set_addr_mode(AddrMode::Tree);
        i.set_size(size);
        if size > 0 {
            let b = self.alloc(ResourceKind::FileBlock, None, &format!("inode {}", i.ino()))?;
            self.write_new_block(b, 0, &content)?;
            i.set_direct(0, b + 1);
            i.add_allocated(i64::from(self.sb().block_size));
        }
        Ok(())
    }

    /// Writes `data` at byte `within` of a block nobody has used yet, zeroing the rest.
    fn write_new_block(&mut self, b: u64, within: u64, data: &[u8]) -> Result<()> {
        let lun = self.st.lun.clone();
        let ss = u64::from(lun.sector_size());
        let bs = u64::from(self.sb().block_size);
        let base = self.block_offset(b);
        let head = align_down(within, ss);
        if head > 0 {
            lun.write_zeroes(base, head)?;
        }
        if !data.is_empty() {
            write_bytes(&*lun, base + within, data, true)?;
        }
        let tail = align_up(within + data.len() as u64, ss).max(head);
        if tail < bs {
            lun.write_zeroes(base + tail, bs - tail)?;
        }
        Ok(())
    }

    /// Blocks (and pointer blocks) a write or allocation of `[from, to)` still needs.
    fn missing_blocks(
        &mut self,
        i: &impl InodeView,
        from: u64,
        to: u64,
    ) -> Result<(Vec<u64>, u64)> {
        let bs = u64::from(self.sb().block_size);
        let mut missing = Vec::new();
        if to > from {
            for n in from / bs..to.div_ceil(bs) {
                if self.block_at(i, n)? == 0 {
                    missing.push(n);
                }
            }
        }
        let pbs = self.pointer_blocks_needed(i, &missing)?;
        Ok((missing, pbs))
    }

    fn write_alloc(&mut self, ino: u64, off: u64, data: &[u8]) -> Result<()> {
        let u = self.inode(ino)?;
        file_kind_check(&u)?;
        let len = data.len() as u64;
        let end = off + len;
        let sbs = u64::from(self.sb().sub_block_size);
        let bs = u64::from(self.sb().block_size);
        let what = format!("inode {ino}");
        let mut i = Inode::from_unit(&u);
        let mode = u.addr_mode();
        let small = !u.is_thick() && mode != Some(AddrMode::Tree);
        if small && mode == Some(AddrMode::Inline) && end <= INLINE_MAX as u64 {
            i.inline_mut()[off as usize..end as usize].copy_from_slice(data);
            if end > i.size() {
                i.set_size(end);
            }
            let now = now_ns();
            i.set_times(None, Some(now), now);
            self.put_inode(i);
            return Ok(());
        }
        if small && end <= sbs {
            // Only reached from inline: an existing sub-block takes the overwrite path.
            let sb_index = self.alloc(ResourceKind::SubBlock, None, &what)?;
            let base = self.sb().sub_blocks.resource_offset(sb_index);
            let mut content = vec![0u8; sbs as usize];
            let size = u.size() as usize;
            content[..size].copy_from_slice(&u.inline()[..size]);
            content[off as usize..end as usize].copy_from_slice(data);
            self.st.lun.write_at(&content, base)?;
            i.set_addr_mode(AddrMode::SubBlock);
            i.set_sub_block(sb_index + 1);
            i.set_size(size as u64);
            i.set_allocated(sbs);
            self.put_inode(i);
            return self.finish_write(ino, end);
        }
        // Block tree: check for room first so a full datastore changes nothing.
        let converting = mode != Some(AddrMode::Tree) && u.size() > 0;
        let (missing, pbs) = if mode == Some(AddrMode::Tree) {
            self.missing_blocks(&u, off, end)?
        } else {
            let first = off / bs;
            let mut all: Vec<u64> = (first..end.div_ceil(bs)).collect();
            if converting && first > 0 {
                all.push(0);
            }
            let mut probe = Inode::from_unit(&u);
            probe.set_addr_mode(AddrMode::Tree);
            let pbs = self.pointer_blocks_needed(&probe, &all)?;
            (all, pbs)
        };
        self.ensure_free(ResourceKind::FileBlock, missing.len() as u64, &what)?;
        self.ensure_free(ResourceKind::PointerBlock, pbs, &what)?;
        self.convert_to_tree(&mut i)?;

        let mut pos = off;
        let mut goal: Option<u64> = None;
        while pos < end {
            let n = pos / bs;
            let within = pos % bs;
            let take = (bs - within).min(end - pos);
            let chunk = &data[(pos - off) as usize..(pos - off + take) as usize];
            let addr = self.block_at(&i, n)?;
            if addr == 0 {
                let goal_here = goal.or_else(|| self.goal_after(&i, n));
                let b = self.alloc(ResourceKind::FileBlock, goal_here, &what)?;
                self.write_new_block(b, within, chunk)?;
                self.set_block(&mut i, n, b + 1)?;
                i.add_allocated(bs as i64);
                goal = Some(b + 1);
            } else {
                let b = self.block_index(ino, addr)?;
                write_bytes(
                    &*self.st.lun.clone(),
                    self.block_offset(b) + within,
                    chunk,
                    false,
                )?;
                goal = Some(b + 1);
            }
            pos += take;
            if pos > i.size() {
                i.set_size(pos);
            }
            self.commit_if_full(&i)?;
        }
        let now = now_ns();
        i.set_times(None, Some(now), now);
        self.put_inode(i);
        Ok(())
    }

    /// Allocates (zeroed) every block of `[from, to)` that has none.
    /// Commits a long operation as one step once its journal transaction is full:
    /// everything so far is on the LUN and consistent, and `i` is the inode as of now.
    fn commit_if_full(&mut self, i: &Inode) -> Result<()> {
        if self.st.op_len() >= MAX_OP_UNITS {
            self.put_inode(i.clone());
            self.st.end_op(true);
            self.st.commit()?;
        }
        Ok(())
    }

    fn allocate_range(&mut self, i: &mut Inode, from: u64, to: u64) -> Result<()> {
        let bs = u64::from(self.sb().block_size);
        let what = format!("inode {}", i.ino());
        let (missing, pbs) = self.missing_blocks(i, from, to)?;
        self.ensure_free(ResourceKind::FileBlock, missing.len() as u64, &what)?;
        self.ensure_free(ResourceKind::PointerBlock, pbs, &what)?;
        let lun = self.st.lun.clone();
        let mut goal = None;
        let mut run: Option<(u64, u64)> = None; // (first block index, count) to zero
        for n in missing {
            let goal_here = goal.or_else(|| self.goal_after(i, n));
            let b = self.alloc(ResourceKind::FileBlock, goal_here, &what)?;
            run = match run {
                Some((first, count)) if first + count == b => Some((first, count + 1)),
                Some((first, count)) => {
                    lun.write_zeroes(self.block_offset(first), count * bs)?;
                    Some((b, 1))
                }
                None => Some((b, 1)),
            };
            self.set_block(i, n, b + 1)?;
            i.add_allocated(bs as i64);
            goal = Some(b + 1);
            if self.st.op_len() >= MAX_OP_UNITS {
                if let Some((first, count)) = run.take() {
                    lun.write_zeroes(self.block_offset(first), count * bs)?;
                }
                self.put_inode(i.clone());
                self.st.end_op(true);
                self.st.commit()?;
            }
        }
        if let Some((first, count)) = run {
            lun.write_zeroes(self.block_offset(first), count * bs)?;
        }
        Ok(())
    }

    fn truncate_locked(&mut self, ino: u64, size: u64) -> Result<()> {
        let u = self.inode(ino)?;
        file_kind_check(&u)?;
        let max = self.sb().max_file_size();
        if size > max {
            return Err(Error::FileTooBig {
                object: format!("inode {ino}"),
                size,
                max,
            });
        }
        let old = u.size();
        let sbs = u64::from(self.sb().sub_block_size);
        let bs = u64::from(self.sb().block_size);
        let lun = self.st.lun.clone();
        let mut i = Inode::from_unit(&u);
        let mode = u.addr_mode();
        if size > old {
            let fits = match mode {
                Some(AddrMode::Inline) => size <= INLINE_MAX as u64,
                Some(AddrMode::SubBlock) => size <= sbs,
                _ => true,
            };
            if !fits || u.is_thick() {
                if u.is_thick() {
                    let (missing, pbs) = {
                        let mut probe = i.clone();
                        if probe.addr_mode() != Some(AddrMode::Tree) {
                            probe.set_addr_mode(AddrMode::Tree);
                        }
                        self.missing_blocks(&probe, old, size)?
                    };
                    let what = format!("inode {ino}");
                    self.ensure_free(ResourceKind::FileBlock, missing.len() as u64, &what)?;
                    self.ensure_free(ResourceKind::PointerBlock, pbs, &what)?;
                }
                self.convert_to_tree(&mut i)?;
                if u.is_thick() {
                    self.allocate_range(&mut i, old, size)?;
                }
            }
            i.set_size(size);
        } else if size < old {
            match mode {
                Some(AddrMode::Inline) => {
                    i.inline_mut()[size as usize..old as usize].fill(0);
                    i.set_size(size);
                }
                Some(AddrMode::SubBlock) => {
                    if size == 0 {
                        release_storage(self, &mut i)?;
                    } else {
                        let base = self.sub_block_offset(ino, i.sub_block())?;
                        zero_bytes(&*lun, base + size, old - size)?;
                        i.set_size(size);
                    }
                }
                _ => {
                    if size % bs != 0 {
                        let addr = self.block_at(&i, size / bs)?;
                        if addr != 0 {
                            let base = self.block_offset(self.block_index(ino, addr)?);
                            let end = bs.min(old - size / bs * bs);
                            zero_bytes(&*lun, base + size % bs, end - size % bs)?;
                        }
                    }
                    let keep = size.div_ceil(bs);
                    i.set_size(size);
                    if self.next_mapped(&i, keep)?.is_some() {
                        // An unlinked file stays listed as unlinked: freeing it (at its last
                        // close or the next mount) finishes this truncate too, and replacing
                        // its entry would leak it.
                        let unlinked = self.orphans.iter().any(
                            |o| matches!(o, Orphan::Unlinked { ino: listed, .. } if *listed == ino),
                        );
                        if !unlinked {
                            self.add_orphan(Orphan::Truncating {
                                ino,
                                size,
                                generation: i.generation() as u32,
                            })?;
                        }
                        self.put_inode(i.clone());
                        self.trim(&mut i, keep)?;
                        if !unlinked {
                            self.remove_orphan(ino)?;
                        }
                    }
                    if size == 0 && !i.is_thick() && i.allocated() == 0 {
                        i.set_addr_mode(AddrMode::Inline);
                    }
                }
            }
        }
        let now = now_ns();
        i.set_times(None, Some(now), now);
        self.put_inode(i);
        Ok(())
    }

    /// Frees every block mapped past end of file: the rest of a truncate a crash cut short.
    pub(crate) fn trim_past_eof(&mut self, ino: u64) -> Result<()> {
        let u = self.inode(ino)?;
        if u.kind() != Some(Kind::File) || u.addr_mode() != Some(AddrMode::Tree) {
            return Ok(());
        }
        let keep = u.size().div_ceil(u64::from(self.sb().block_size));
        if self.next_mapped(&u, keep)?.is_none() {
            return Ok(());
        }
        let mut i = Inode::from_unit(&u);
        self.trim(&mut i, keep)?;
        self.put_inode(i);
        Ok(())
    }

    /// The lock a write of `[off, end)` needs. Multi-writer holders overwrite allocated
    /// storage within the file without metadata; everything else needs the exclusive lock
    /// (for multi-writer holders only while no other host holds the file).
    fn write_lock(&mut self, ino: u64, end: u64, overwrite: bool) -> Result<bool> {
        let multi = self
            .held
            .get(&crate::cluster::LockTarget::Inode(ino))
            .is_some_and(|h| h.mode == LockMode::MultiWriter);
        if multi && overwrite && end <= self.inode(ino)?.size() {
            return Ok(false);
        }
        self.lock_inode(ino)?;
        Ok(true)
    }

    fn fallocate_locked(&mut self, ino: u64, off: u64, len: u64, keep_size: bool) -> Result<()> {
        let u = self.inode(ino)?;
        file_kind_check(&u)?;
        let end = self.checked_end(ino, off, len)?;
        let mut i = Inode::from_unit(&u);
        let fits = match u.addr_mode() {
            Some(AddrMode::Inline) => end <= INLINE_MAX as u64,
            Some(AddrMode::SubBlock) => end <= u64::from(self.sb().sub_block_size),
            _ => false,
        };
        if !fits {
            let mut probe = i.clone();
            if probe.addr_mode() != Some(AddrMode::Tree) {
                probe.set_addr_mode(AddrMode::Tree);
            }
            let (missing, pbs) = self.missing_blocks(&probe, off, end)?;
            let what = format!("inode {ino}");
            let bs = u64::from(self.sb().block_size);
            let converts_content =
                u.addr_mode() != Some(AddrMode::Tree) && u.size() > 0 && off / bs > 0;
            let extra = u64::from(converts_content);
            self.ensure_free(ResourceKind::FileBlock, missing.len() as u64 + extra, &what)?;
            self.ensure_free(ResourceKind::PointerBlock, pbs, &what)?;
            self.convert_to_tree(&mut i)?;
            self.allocate_range(&mut i, off, end)?;
        }
        if !keep_size && end > i.size() {
            i.set_size(end);
        }
        let now = now_ns();
        i.set_times(None, None, now);
        self.put_inode(i);
        Ok(())
    }

    fn punch_locked(&mut self, ino: u64, off: u64, len: u64) -> Result<()> {
        let u = self.inode(ino)?;
        file_kind_check(&u)?;
        let end = off.saturating_add(len).min(u.size());
        if off >= end {
            return Ok(());
        }
        let lun = self.st.lun.clone();
        let mut i = Inode::from_unit(&u);
        match u.addr_mode() {
            Some(AddrMode::Inline) => i.inline_mut()[off as usize..end as usize].fill(0),
            Some(AddrMode::SubBlock) => {
                let base = self.sub_block_offset(ino, u.sub_block())?;
                zero_bytes(&*lun, base + off, end - off)?;
            }
            _ => {
                let bs = u64::from(self.sb().block_size);
                let mut pos = off;
                while pos < end {
                    let n = pos / bs;
                    let within = pos % bs;
                    let take = (bs - within).min(end - pos);
                    let addr = self.block_at(&i, n)?;
                    if addr != 0 {
                        let b = self.block_index(ino, addr)?;
                        if take == bs && !i.is_thick() {
                            self.release(ResourceKind::FileBlock, b)?;
                            self.set_block(&mut i, n, 0)?;
                            i.add_allocated(-(bs as i64));
                        } else {
                            zero_bytes(&*lun, self.block_offset(b) + within, take)?;
                        }
                    }
                    pos += take;
                    self.commit_if_full(&i)?;
                }
            }
        }
        let now = now_ns();
        i.set_times(None, Some(now), now);
        self.put_inode(i);
        Ok(())
    }
}

impl Datastore {
    /// Reads up to `buf.len()` bytes at `off`; returns how many (short only at end of file).
    pub fn read(&self, ino: u64, off: u64, buf: &mut [u8]) -> Result<usize> {
        const ATTEMPTS: u32 = 8;
        let io = self.io_lock(ino);
        let _guard = io.read().unwrap_or_else(|e| e.into_inner());
        let lun: Arc<dyn Lun> = self.lun().clone();
        for _ in 0..ATTEMPTS {
            let (pieces, before) = self.read_op(|s| {
                let pieces = s.read_plan(ino, off, buf.len())?;
                let before = if s.holds_inode(ino) {
                    None
                } else {
                    Some(inode_tag(&s.inode(ino)?))
                };
                Ok((pieces, before))
            })?;
            let mut at = 0;
            for piece in pieces {
                match piece {
                    Piece::Zero(n) => {
                        buf[at..at + n].fill(0);
                        at += n;
                    }
                    Piece::Inline(bytes) => {
                        buf[at..at + bytes.len()].copy_from_slice(&bytes);
                        at += bytes.len();
                    }
                    Piece::Lun { off, len } => {
                        read_bytes(&*lun, off, &mut buf[at..at + len])?;
                        at += len;
                    }
                }
            }
            let Some(before) = before else {
                return Ok(at);
            };
            // Another host may have changed the file (and reused its blocks) while we read.
            let after = self.read_op(|s| s.inode(ino).map(|u| inode_tag(&u)))?;
            if after == before {
                return Ok(at);
            }
        }
        Err(Error::Busy {
            object: format!("inode {ino}"),
            holder: "another host changing it continuously".into(),
            mode: "read".into(),
        })
    }

    /// Writes all of `data` at `off`, allocating (thin) storage as needed.
    pub fn write(&self, ino: u64, off: u64, data: &[u8]) -> Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let io = self.io_lock(ino);
        let _guard = io.write().unwrap_or_else(|e| e.into_inner());
        let end = off.saturating_add(data.len() as u64);
        let plan = self.write_op(|s| {
            let Some(plan) = s.overwrite_plan(ino, off, data.len() as u64)? else {
                return Ok(None);
            };
            let metadata = s.write_lock(ino, end, true)?;
            s.pin(ino);
            Ok(Some((plan, metadata)))
        })?;
        match plan {
            Some((plan, metadata)) => {
                let lun = self.lun().clone();
                let mut at = 0;
                let written = plan.pieces.iter().try_for_each(|&(lun_off, len)| {
                    let r = write_bytes(&*lun, lun_off, &data[at..at + len], false);
                    at += len;
                    r
                });
                let finished = written.and_then(|()| {
                    if metadata {
                        self.write_op(|s| s.finish_write(ino, end))
                    } else {
                        Ok(())
                    }
                });
                self.lock().unpin(ino);
                finished?;
            }
            None => self.write_op(|s| {
                s.write_lock(ino, end, false)?;
                s.write_alloc(ino, off, data)
            })?,
        }
        Ok(data.len())
    }

    /// Sets the file size. Shrinking frees storage past the end; growing a thin file
    /// allocates nothing, a thick one allocates and zeroes.
    pub fn truncate(&self, ino: u64, size: u64) -> Result<()> {
        let io = self.io_lock(ino);
        let _guard = io.write().unwrap_or_else(|e| e.into_inner());
        self.write_op(|s| {
            s.lock_inode(ino)?;
            s.truncate_locked(ino, size)
        })
    }

    /// Allocates zeroed storage for `[off, off+len)`; extends the size unless `keep_size`.
    pub fn fallocate(&self, ino: u64, off: u64, len: u64, keep_size: bool) -> Result<()> {
        let io = self.io_lock(ino);
        let _guard = io.write().unwrap_or_else(|e| e.into_inner());
        self.write_op(|s| {
            s.lock_inode(ino)?;
            s.fallocate_locked(ino, off, len, keep_size)
        })
    }

    /// Makes `[off, off+len)` read as zeroes; whole blocks of thin files are freed.
    pub fn punch_hole(&self, ino: u64, off: u64, len: u64) -> Result<()> {
        let io = self.io_lock(ino);
        let _guard = io.write().unwrap_or_else(|e| e.into_inner());
        self.write_op(|s| {
            s.lock_inode(ino)?;
            s.punch_locked(ino, off, len)
        })
    }

    /// SEEK_DATA: the first offset at or after `off` that holds data, None past the end.
    pub fn seek_data(&self, ino: u64, off: u64) -> Result<Option<u64>> {
        self.read_op(|s| {
            let u = s.inode(ino)?;
            if off >= u.size() {
                return Ok(None);
            }
            if u.addr_mode() != Some(AddrMode::Tree) {
                return Ok(Some(off));
            }
            let bs = u64::from(s.sb().block_size);
            Ok(s.next_mapped(&u, off / bs)?
                .map(|(n, _)| (n * bs).max(off))
                .filter(|&at| at < u.size()))
        })
    }

    /// SEEK_HOLE: the first offset at or after `off` in a hole (end of file counts as one),
    /// None past the end.
    pub fn seek_hole(&self, ino: u64, off: u64) -> Result<Option<u64>> {
        self.read_op(|s| {
            let u = s.inode(ino)?;
            let size = u.size();
            if off >= size {
                return Ok(None);
            }
            if u.addr_mode() != Some(AddrMode::Tree) {
                return Ok(Some(size));
            }
            let bs = u64::from(s.sb().block_size);
            let mut n = off / bs;
            loop {
                match s.next_mapped(&u, n)? {
                    Some((m, _)) if m == n => n += 1,
                    _ => return Ok(Some((n * bs).max(off).min(size))),
                }
                if n * bs >= size {
                    return Ok(Some(size));
                }
            }
        })
    }
}
