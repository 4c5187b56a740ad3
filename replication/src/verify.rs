//! Online verify: the crc32c of every region is compared across the link, a batch at a
//! time, while writers go on (a batch holds the write lock, so no write is half-way
//! through it). Regions that differ are marked dirty and resynced. The state machine
//! is persisted in the primary's header (`FLAG_VERIFY`, the cursor and the count of
//! differences), so a restart resumes where it stopped.

use lun::Lun;
use tracing::{info, warn};

use crate::error::{ReplError, Result};
use crate::meta::FLAG_VERIFY;
use crate::primary::PrimaryLun;
use crate::wire::Message;
use crate::{LinkState, Mode};

/// How far a verify has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyProgress {
    pub regions_done: u64,
    pub regions_total: u64,
    /// Regions found different so far (now dirty, to be resynced).
    pub differences: u64,
    pub running: bool,
}

impl VerifyProgress {
    pub fn fraction(&self) -> f64 {
        if self.regions_total == 0 {
            return 1.0;
        }
        self.regions_done as f64 / self.regions_total as f64
    }
}

/// crc32c of `len` bytes at `offset`, read a region at a time.
pub(crate) fn region_crc(lun: &dyn Lun, offset: u64, len: u64) -> lun::Result<u32> {
    let mut data = vec![0u8; len as usize];
    lun.read_at(&mut data, offset)?;
    Ok(crc32c::crc32c(&data))
}

/// Regions compared per exchange.
const BATCH: u64 = 256;

impl PrimaryLun {
    /// Compares up to `max_regions` more regions with the secondary, starting a verify
    /// if none runs. Needs a connected link.
    pub fn verify_step(&self, max_regions: u64) -> Result<VerifyProgress> {
        // A write in flight would show as a difference that is none.
        let mut g = self.quiesce(self.lock());
        if g.link != LinkState::Connected {
            return Err(ReplError::WrongState {
                lun: self.name.clone(),
                reason: "verify needs a connected link that is not resyncing".into(),
            });
        }
        if g.meta.flags() & FLAG_VERIFY == 0 {
            g.meta.set_flag(FLAG_VERIFY, true);
            g.meta.header.verify_cursor = 0;
            g.meta.header.verify_diffs = 0;
            g.meta.write_header()?;
            info!(lun = %self.name, regions = g.meta.regions(), "verify started");
        }
        let regions = g.meta.regions();
        let rs = g.meta.region_size();
        let size = self.local.size();
        let mut left = max_regions.max(1);
        while left > 0 && g.meta.header.verify_cursor < regions {
            let first = g.meta.header.verify_cursor;
            let count = left.min(BATCH).min(regions - first);
            let reply = g.peer.call(&Message::ChecksumRequest {
                first,
                count: count as u32,
            });
            let crcs = match reply {
                Ok(Message::Checksums { crcs }) if crcs.len() as u64 == count => crcs,
                Ok(Message::Error { reason }) => {
                    return Err(ReplError::Refused {
                        peer: g.peer.name().to_string(),
                        reason,
                    });
                }
                Ok(other) => {
                    return Err(ReplError::Protocol {
                        peer: g.peer.name().to_string(),
                        reason: format!("expected {count} checksums, got {}", other.kind()),
                    });
                }
                Err(e) => {
                    self.lose_link(&mut g, 0..0, &e)?;
                    return Err(e);
                }
            };
            let mut found = Vec::new();
            for (i, remote) in crcs.iter().enumerate() {
                let r = first + i as u64;
                // A dirty region is known to differ and already on its way.
                if g.meta.is_dirty(r) {
                    continue;
                }
                let offset = r * rs;
                if region_crc(&*self.local, offset, rs.min(size - offset))? != *remote {
                    found.push(r);
                }
            }
            for &r in &found {
                warn!(lun = %self.name, region = r, offset = r * rs, "verify: region differs at the secondary; marked for resync");
                g.meta.mark(r..r + 1);
                if let Mode::Async { .. } = g.mode {
                    g.interval.insert(r);
                }
            }
            g.meta.persist_bitmap()?;
            g.meta.header.verify_cursor = first + count;
            g.meta.header.verify_diffs += found.len() as u64;
            g.meta.write_header()?;
            left -= count;
        }
        if g.meta.header.verify_cursor >= regions {
            let diffs = g.meta.header.verify_diffs;
            g.meta.set_flag(FLAG_VERIFY, false);
            if diffs > 0 && g.mode == Mode::Sync {
                self.begin_resync(&mut g)?;
            }
            g.meta.write_header()?;
            info!(lun = %self.name, differences = diffs, "verify complete");
            return Ok(VerifyProgress {
                regions_done: regions,
                regions_total: regions,
                differences: diffs,
                running: false,
            });
        }
        Ok(verify_progress(&g))
    }

    /// Runs a verify (or the one a restart interrupted) to its end.
    pub fn verify(&self) -> Result<VerifyProgress> {
        loop {
            let p = self.verify_step(BATCH)?;
            if !p.running {
                return Ok(p);
            }
        }
    }

    pub fn verify_progress(&self) -> VerifyProgress {
        verify_progress(&self.lock())
    }
}

fn verify_progress(g: &crate::primary::Inner) -> VerifyProgress {
    VerifyProgress {
        regions_done: g.meta.header.verify_cursor,
        regions_total: g.meta.regions(),
        differences: g.meta.header.verify_diffs,
        running: g.meta.flags() & FLAG_VERIFY != 0,
    }
}
