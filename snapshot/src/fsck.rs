//! `vapp snapshot fsck POOL`: checks a pool's metadata without its source.

use std::collections::HashMap;

use lun::Lun;

use crate::engine::{copy_landed, read_header, read_table};
use crate::error::Result;
use crate::format::{Kind, Layout, SESSION_INVALID};

/// What [`fsck`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsckReport {
    /// The source the pool belongs to.
    pub source: String,
    pub sessions: usize,
    pub invalid_sessions: usize,
    /// Slots holding a copy some valid session needs.
    pub used_slots: u64,
    pub total_slots: u64,
    pub rollback_in_progress: bool,
    /// Shared copies whose data does not match their entry's crc32c: cut short by a
    /// crash before their source write was issued, so not a problem; open discards them.
    pub unfinished_copies: u64,
    /// One line per inconsistency, naming the slot or session.
    pub problems: Vec<String>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the pool header (magic, version, crc32c, layout), every slot-table entry
/// (crc32c, kind, chunk inside the source), the data of every needed shared copy against
/// its entry (a mismatch is a copy a crash cut short, counted, unless the header vouches
/// for it: then it is damage), and that no
/// two copies claim the same chunk of the same session. A header that cannot be read at all is an error; everything else is
/// listed in the report. Reads only.
pub fn fsck(pool: &dyn Lun) -> Result<FsckReport> {
    let header = read_header(pool)?;
    let layout = header.layout;
    let mut report = FsckReport {
        source: header.source_name.clone(),
        sessions: header.sessions.len(),
        invalid_sessions: header
            .sessions
            .iter()
            .filter(|s| s.flags & SESSION_INVALID != 0)
            .count(),
        total_slots: layout.slots,
        rollback_in_progress: header.rollback.is_some(),
        ..FsckReport::default()
    };
    if Layout::compute(pool.size(), header.source_size, layout.chunk_size) != Some(layout) {
        report
            .problems
            .push("header layout does not match the pool's size".into());
        return Ok(report);
    }
    let mut names = HashMap::new();
    for s in &header.sessions {
        if s.generation >= header.next_gen {
            report.problems.push(format!(
                "session {:?}: generation {} not below the next generation {}",
                s.name, s.generation, header.next_gen
            ));
        }
        if names.insert(s.name.as_str(), s.generation).is_some() {
            report
                .problems
                .push(format!("session {:?}: name used twice", s.name));
        }
    }
    if let Some(g) = header.rollback
        && !header.sessions.iter().any(|s| s.generation == g)
    {
        report
            .problems
            .push(format!("rollback target generation {g} is not a session"));
    }
    let source_chunks = header.source_size.div_ceil(u64::from(layout.chunk_size));
    let valid = |g: u64| {
        header.rollback == Some(g)
            || header
                .sessions
                .iter()
                .any(|s| s.generation == g && s.flags & SESSION_INVALID == 0)
    };
    // (chunk, generation) -> slot, for every valid session a copy serves.
    let mut claims: HashMap<(u64, u64, bool), u64> = HashMap::new();
    let mut buf = vec![0u8; layout.chunk_size as usize];
    for (slot, entry) in read_table(pool, &layout)?.into_iter().enumerate() {
        let entry = match entry {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(reason) => {
                report.problems.push(format!("slot {slot}: {reason}"));
                continue;
            }
        };
        let served: Vec<u64> = header
            .sessions
            .iter()
            .map(|s| s.generation)
            .filter(|&g| entry.covers(g) && valid(g))
            .collect();
        if served.is_empty() {
            // A copy of a deleted session: free space, reused on demand.
            continue;
        }
        if !copy_landed(pool, &layout, slot as u64, &entry, &mut buf)? {
            if entry.seq <= header.verified_seq {
                report.problems.push(format!(
                    "slot {slot}: chunk {}'s copy does not match its checksum",
                    entry.chunk
                ));
            } else {
                report.unfinished_copies += 1;
            }
            continue;
        }
        report.used_slots += 1;
        if entry.chunk >= source_chunks {
            report.problems.push(format!(
                "slot {slot}: chunk {} is past the source's {source_chunks} chunks",
                entry.chunk
            ));
        }
        if entry.hi > header.next_gen {
            report.problems.push(format!(
                "slot {slot}: generations {}..{} reach past the next generation {}",
                entry.lo, entry.hi, header.next_gen
            ));
        }
        for g in served {
            let key = (entry.chunk, g, entry.kind == Kind::Private);
            if let Some(other) = claims.insert(key, slot as u64) {
                report.problems.push(format!(
                    "slots {other} and {slot} both hold chunk {} of generation {g}",
                    entry.chunk
                ));
            }
        }
    }
    Ok(report)
}
