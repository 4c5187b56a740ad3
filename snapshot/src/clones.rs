//! Clones: full, independent copies of the source on another LUN.
//!
//! A clone starts `Syncing` with every chunk in its fracture log; writes to the source are
//! mirrored to it from the start, and sync steps copy the logged chunks. The log is a
//! bitmap in the pool: a chunk's bit is set, durably, before the first write to it on
//! either side since the log was last cleared, and cleared only after the chunk has been
//! copied and the copy flushed. So after a crash, or after a fracture, the log names every
//! chunk that may differ, and `sync` (source to clone) or `reverse_sync` (clone to source)
//! copies only those. During a reverse sync the source reads logged chunks from the clone,
//! so it is usable at once; copies to the source go through copy-on-first-write, so
//! sessions keep their point in time.

use std::sync::{Arc, PoisonError};

use lun::Lun;
use tracing::{info, warn};

use crate::engine::{Engine, State, check_name, lock};
use crate::error::{Result, SnapError};
use crate::format::{CloneRecord, CloneState, MAX_CLONES, UNIT};

/// A clone as [`crate::Snapshots::clones`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneInfo {
    pub name: String,
    /// The clone LUN's name.
    pub lun: String,
    pub state: CloneState,
    /// Chunks in the fracture log: what the next sync copies.
    pub logged_chunks: u64,
    /// True when the clone LUN is attached in this process.
    pub attached: bool,
}

fn bit(bits: &[u8], c: u64) -> bool {
    bits[(c / 8) as usize] & (1 << (c % 8)) != 0
}

impl State {
    fn clone_index(&self, pool: &str, name: &str) -> Result<usize> {
        self.header
            .clones
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| SnapError::UnknownClone {
                pool: pool.to_string(),
                name: name.to_string(),
            })
    }

    pub(crate) fn clone_infos(&self) -> Vec<CloneInfo> {
        self.header
            .clones
            .iter()
            .map(|c| CloneInfo {
                name: c.name.clone(),
                lun: c.lun_name.clone(),
                state: c.state,
                logged_chunks: self
                    .clone_bits
                    .get(&c.slot)
                    .map_or(0, |b| b.iter().map(|x| u64::from(x.count_ones())).sum()),
                attached: self.clone_luns.contains_key(&c.name),
            })
            .collect()
    }

    /// Clones whose writes follow the source's.
    pub(crate) fn mirrors(&self) -> Vec<(String, Arc<dyn Lun>)> {
        self.header
            .clones
            .iter()
            .filter(|c| c.state != CloneState::Fractured)
            .filter_map(|c| Some((c.name.clone(), self.clone_luns.get(&c.name)?.clone())))
            .collect()
    }

    /// The clone LUN a source read of `chunk` must come from: a reverse sync's clone
    /// while the chunk is still logged.
    pub(crate) fn reverse_source(&self, chunk: u64) -> Option<Arc<dyn Lun>> {
        let c = self
            .header
            .clones
            .iter()
            .find(|c| c.state == CloneState::ReverseSyncing)?;
        let bits = self.clone_bits.get(&c.slot)?;
        if bit(bits, chunk) {
            self.clone_luns.get(&c.name).cloned()
        } else {
            None
        }
    }

    pub(crate) fn reverse_syncing(&self) -> Option<&CloneRecord> {
        self.header
            .clones
            .iter()
            .find(|c| c.state == CloneState::ReverseSyncing)
    }
}

impl Engine {
    /// Sets the fracture-log bits of `chunks` in the clones selected by `which` and makes
    /// them durable before the caller's write is issued.
    pub(crate) fn log_changes(
        &self,
        st: &mut State,
        chunks: std::ops::RangeInclusive<u64>,
        which: Option<u32>,
    ) -> Result<()> {
        let layout = st.layout();
        let mut dirty = Vec::new();
        for c in &st.header.clones {
            if which.is_some_and(|w| w != c.slot) {
                continue;
            }
            let Some(bits) = st.clone_bits.get_mut(&c.slot) else {
                continue;
            };
            for chunk in chunks.clone() {
                if !bit(bits, chunk) {
                    bits[(chunk / 8) as usize] |= 1 << (chunk % 8);
                    dirty.push((c.slot, chunk / 8 / UNIT));
                }
            }
        }
        dirty.dedup();
        for &(slot, unit) in &dirty {
            self.write_clone_unit(st, slot, unit, layout.clone_bitmap(slot))?;
        }
        if !dirty.is_empty() {
            self.pool.flush()?;
        }
        Ok(())
    }

    fn write_clone_unit(&self, st: &State, slot: u32, unit: u64, base: u64) -> Result<()> {
        if let Some(bits) = st.clone_bits.get(&slot) {
            let at = (unit * UNIT) as usize;
            self.pool
                .write_at(&bits[at..at + UNIT as usize], base + unit * UNIT)?;
        }
        Ok(())
    }

    /// A mirrored write failed: the clone is fractured (its log already names the chunk)
    /// so the source's write still succeeds. Not during a reverse sync, where the clone
    /// holds the source's contents of the chunks still to copy: the write fails instead.
    pub(crate) fn fracture_on_error(&self, name: &str, err: lun::LunError) -> Result<()> {
        let mut st = lock(&self.state);
        let Some(i) = st.header.clones.iter().position(|c| c.name == name) else {
            return Ok(());
        };
        if st.header.clones[i].state == CloneState::ReverseSyncing {
            return Err(err.into());
        }
        let mut next = st.header.clone();
        next.clones[i].state = CloneState::Fractured;
        if let Err(e) = self.persist_header(&mut st, next) {
            warn!(pool = self.pool_name(), clone = name, error = %e, "cannot record the fracture");
        }
        warn!(pool = self.pool_name(), clone = name, error = %err, "mirrored write failed: clone fractured");
        Ok(())
    }

    fn check_clone_lun(&self, pool: &str, lun: &dyn Lun) -> Result<()> {
        let src = &self.source;
        if lun.size() != src.size() || lun.sector_size() != src.sector_size() {
            return Err(SnapError::BadClone {
                pool: pool.to_string(),
                lun: lun.name().to_string(),
                reason: format!(
                    "{} bytes of {}-byte sectors, the source has {} of {}",
                    lun.size(),
                    lun.sector_size(),
                    src.size(),
                    src.sector_size()
                ),
            });
        }
        if lun.name() == src.name() || lun.name() == self.pool.name() || lun.is_read_only() {
            return Err(SnapError::BadClone {
                pool: pool.to_string(),
                lun: lun.name().to_string(),
                reason: "the clone must be another writable LUN than the source and the pool"
                    .into(),
            });
        }
        Ok(())
    }

    pub fn add_clone(&self, name: &str, lun: Arc<dyn Lun>) -> Result<()> {
        let pool = self.pool_name().to_string();
        check_name(&pool, name)?;
        self.check_clone_lun(&pool, lun.as_ref())?;
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut st = lock(&self.state);
        if st.header.clones.iter().any(|c| c.name == name) {
            return Err(SnapError::CloneExists {
                pool,
                name: name.to_string(),
            });
        }
        let Some(slot) =
            (0..MAX_CLONES as u32).find(|s| !st.header.clones.iter().any(|c| c.slot == *s))
        else {
            return Err(SnapError::TooManyClones {
                pool,
                max: MAX_CLONES,
            });
        };
        let layout = st.layout();
        let mut bits = vec![0u8; layout.bitmap_len as usize];
        for c in 0..st.source_chunks() {
            bits[(c / 8) as usize] |= 1 << (c % 8);
        }
        self.pool.write_at(&bits, layout.clone_bitmap(slot))?;
        self.pool.flush()?;
        let mut next = st.header.clone();
        next.clones.push(CloneRecord {
            state: CloneState::Syncing,
            slot,
            name: name.to_string(),
            lun_name: lun.name().to_string(),
        });
        self.persist_header(&mut st, next)?;
        st.clone_bits.insert(slot, bits);
        st.clone_luns.insert(name.to_string(), lun);
        info!(pool = %pool, clone = name, "clone added, full copy pending");
        Ok(())
    }

    /// Attaches a clone's LUN after an open; it must be the LUN the clone was made on.
    pub fn attach_clone(&self, name: &str, lun: Arc<dyn Lun>) -> Result<()> {
        let pool = self.pool_name().to_string();
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut st = lock(&self.state);
        let i = st.clone_index(&pool, name)?;
        if st.header.clones[i].lun_name != lun.name() {
            return Err(SnapError::BadClone {
                pool,
                lun: lun.name().to_string(),
                reason: format!("clone {name:?} lives on {}", st.header.clones[i].lun_name),
            });
        }
        self.check_clone_lun(&pool, lun.as_ref())?;
        st.clone_luns.insert(name.to_string(), lun);
        Ok(())
    }

    pub fn remove_clone(&self, name: &str) -> Result<()> {
        let pool = self.pool_name().to_string();
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut st = lock(&self.state);
        let i = st.clone_index(&pool, name)?;
        if st.header.clones[i].state == CloneState::ReverseSyncing {
            return Err(SnapError::CloneBusy {
                pool,
                name: name.to_string(),
                reason: "a reverse sync is running".into(),
            });
        }
        let mut next = st.header.clone();
        let record = next.clones.remove(i);
        self.persist_header(&mut st, next)?;
        st.clone_bits.remove(&record.slot);
        st.clone_luns.remove(name);
        Ok(())
    }

    /// Stops mirroring: from now on both sides change independently, logged.
    pub fn fracture(&self, name: &str) -> Result<()> {
        let pool = self.pool_name().to_string();
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut st = lock(&self.state);
        let i = st.clone_index(&pool, name)?;
        if st.header.clones[i].state != CloneState::Synchronized {
            return Err(SnapError::CloneBusy {
                pool,
                name: name.to_string(),
                reason: format!(
                    "only a synchronized clone can be fractured (it is {:?})",
                    st.header.clones[i].state
                ),
            });
        }
        if let Some(lun) = st.clone_luns.get(name) {
            lun.flush()?;
        }
        let mut next = st.header.clone();
        next.clones[i].state = CloneState::Fractured;
        self.persist_header(&mut st, next)?;
        info!(pool = %pool, clone = name, "clone fractured");
        Ok(())
    }

    /// Starts copying the logged chunks: source to clone, or back (`reverse`).
    pub fn start_sync(&self, name: &str, reverse: bool) -> Result<()> {
        let pool = self.pool_name().to_string();
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut st = lock(&self.state);
        let i = st.clone_index(&pool, name)?;
        let busy = |reason: String| SnapError::CloneBusy {
            pool: pool.clone(),
            name: name.to_string(),
            reason,
        };
        if !st.clone_luns.contains_key(name) {
            return Err(busy("its LUN is not attached".into()));
        }
        let state = st.header.clones[i].state;
        if state == CloneState::ReverseSyncing {
            return Err(busy("a reverse sync is running".into()));
        }
        if reverse {
            if state != CloneState::Fractured {
                return Err(busy("only a fractured clone can be copied back".into()));
            }
            if let Some(p) = st.rollback_progress() {
                return Err(SnapError::RollbackInProgress {
                    pool,
                    name: p.session,
                });
            }
            if let Some(other) = st.reverse_syncing() {
                return Err(busy(format!("clone {:?} is being copied back", other.name)));
            }
        }
        let mut next = st.header.clone();
        next.clones[i].state = if reverse {
            CloneState::ReverseSyncing
        } else {
            CloneState::Syncing
        };
        self.persist_header(&mut st, next)?;
        Ok(())
    }

    /// Copies up to `max_chunks` logged chunks; `None` once the clone is synchronized.
    /// Source writes wait for the batch, so a copy never races a write to its chunk.
    pub fn sync_step(&self, name: &str, max_chunks: u64) -> Result<Option<CloneInfo>> {
        let pool = self.pool_name().to_string();
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut st = lock(&self.state);
        let i = st.clone_index(&pool, name)?;
        let record = st.header.clones[i].clone();
        let reverse = match record.state {
            CloneState::Syncing => false,
            CloneState::ReverseSyncing => true,
            _ => return Ok(None),
        };
        let Some(lun) = st.clone_luns.get(name).cloned() else {
            return Err(SnapError::CloneBusy {
                pool,
                name: name.to_string(),
                reason: "its LUN is not attached".into(),
            });
        };
        let total = st.source_chunks();
        let bits = st.clone_bits.get(&record.slot).cloned().unwrap_or_default();
        let batch: Vec<u64> = (0..total)
            .filter(|&c| bit(&bits, c))
            .take(max_chunks.max(1) as usize)
            .collect();
        let cs = st.chunk_size();
        for &c in &batch {
            let mut data = vec![0u8; st.chunk_len(c) as usize];
            if reverse {
                lun.read_at(&mut data, c * cs)?;
                if st.needs_copy(c) {
                    self.preserve(&mut st, c)?;
                }
                // Other clones learn of the change through their logs.
                self.log_changes(&mut st, c..=c, None)?;
                st.speculative.remove(&c);
                self.source.write_at(&data, c * cs)?;
            } else {
                self.source.read_at(&mut data, c * cs)?;
                lun.write_at(&data, c * cs)?;
            }
        }
        // Both sides, not just the destination: a chunk copied from unflushed data would
        // otherwise differ again after a power cut, with its bit already cleared.
        self.source.flush()?;
        lun.flush()?;
        let layout = st.layout();
        let mut units = Vec::new();
        if let Some(bits) = st.clone_bits.get_mut(&record.slot) {
            for &c in &batch {
                bits[(c / 8) as usize] &= !(1 << (c % 8));
                units.push(c / 8 / UNIT);
            }
        }
        units.dedup();
        for &unit in &units {
            self.write_clone_unit(&st, record.slot, unit, layout.clone_bitmap(record.slot))?;
        }
        self.pool.flush()?;
        let left = st
            .clone_bits
            .get(&record.slot)
            .is_some_and(|b| b.iter().any(|&x| x != 0));
        if left {
            return Ok(st.clone_infos().into_iter().nth(i));
        }
        let mut next = st.header.clone();
        next.clones[i].state = CloneState::Synchronized;
        self.persist_header(&mut st, next)?;
        info!(pool = %pool, clone = name, reverse, "clone synchronized");
        Ok(None)
    }

    /// Flushes the source and the clones that mirror it, then clears the logs of
    /// synchronized clones: every logged write is now durable on both sides. Source writes
    /// wait meanwhile, so none can be logged and then forgotten.
    pub fn flush_source(&self) -> Result<()> {
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        self.source.flush()?;
        let mut st = lock(&self.state);
        for (_, lun) in st.mirrors() {
            lun.flush()?;
        }
        let layout = st.layout();
        let synchronized: Vec<u32> = st
            .header
            .clones
            .iter()
            .filter(|c| c.state == CloneState::Synchronized && st.clone_luns.contains_key(&c.name))
            .map(|c| c.slot)
            .collect();
        let mut cleared = false;
        for slot in synchronized {
            let Some(bits) = st.clone_bits.get_mut(&slot) else {
                continue;
            };
            let dirty: Vec<u64> = bits
                .chunks(UNIT as usize)
                .enumerate()
                .filter(|(_, u)| u.iter().any(|&b| b != 0))
                .map(|(i, _)| i as u64)
                .collect();
            for &unit in &dirty {
                let at = (unit * UNIT) as usize;
                bits[at..at + UNIT as usize].fill(0);
            }
            for &unit in &dirty {
                self.write_clone_unit(&st, slot, unit, layout.clone_bitmap(slot))?;
                cleared = true;
            }
        }
        if cleared {
            self.pool.flush()?;
        }
        Ok(())
    }

    /// A write to a fractured clone through the engine, logged for the next sync.
    pub fn write_clone(&self, name: &str, buf: &[u8], offset: u64) -> Result<()> {
        let pool = self.pool_name().to_string();
        let lun = {
            let mut st = lock(&self.state);
            let i = st.clone_index(&pool, name)?;
            let record = st.header.clones[i].clone();
            if record.state != CloneState::Fractured {
                return Err(SnapError::CloneBusy {
                    pool,
                    name: name.to_string(),
                    reason: "it follows the source until fractured".into(),
                });
            }
            let Some(lun) = st.clone_luns.get(name).cloned() else {
                return Err(SnapError::CloneBusy {
                    pool,
                    name: name.to_string(),
                    reason: "its LUN is not attached".into(),
                });
            };
            let cs = st.chunk_size();
            let last = (offset + buf.len() as u64).saturating_sub(1) / cs;
            self.log_changes(&mut st, offset / cs..=last, Some(record.slot))?;
            lun
        };
        lun.write_at(buf, offset)?;
        Ok(())
    }

    pub fn clone_lun(&self, name: &str) -> Result<Arc<dyn Lun>> {
        let pool = self.pool_name().to_string();
        let st = lock(&self.state);
        st.clone_index(&pool, name)?;
        st.clone_luns
            .get(name)
            .cloned()
            .ok_or_else(|| SnapError::CloneBusy {
                pool,
                name: name.to_string(),
                reason: "its LUN is not attached".into(),
            })
    }
}
