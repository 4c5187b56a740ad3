//! Checking and repairing a datastore.
//!
//! Raw checks first (superblock copies, Disk Paxos lease areas, heartbeat slots, journal
//! headers and pending transactions, orphan lists), then a walk of the whole tree from the
//! root that verifies every metadata unit and rebuilds, in memory, which resources are in
//! use, how many names each inode has and which directory holds each directory, then every
//! descriptor (one read per resource cluster). Everything found is compared with the bitmaps
//! and inodes. The unfinished work of a host that holds its slot is reported as pending, not
//! as damage. Repair applies the safe fixes through the journal and checks again; what is
//! still wrong is reported as remaining.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use lun::Lun;
use serde::Serialize;

use crate::cluster::heartbeat::{self, Heartbeat, SlotState};
use crate::cluster::{LockRecord, LockTarget};
use crate::codec::*;
use crate::datastore::{Datastore, OpenOptions, SuperblockSource, read_superblock};
use crate::dir;
use crate::error::{Error, Result};
use crate::inode::{self, AddrMode, Inode, InodeView, Kind};
use crate::journal::{self, Header, Orphan, TX_START};
use crate::layout::{POINTER_BLOCK_SIZE, PTR_UNITS, ROOT_INO, ResourceKind, Superblock};
use crate::state::State;
use crate::store;

#[derive(Debug, Clone, Default)]
pub struct FsckOptions {
    /// Fix what can be fixed safely. The datastore must not be in use by another host.
    pub repair: bool,
    /// Identity for the repairing open (defaults to this machine's).
    pub open: Option<OpenOptions>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// An inconsistency: the datastore is not clean until it is repaired.
    Error,
    /// Worth knowing, not a problem (e.g. a host slot still marked live).
    Info,
    /// Unfinished work of a host that holds its slot (a running one, or one that died):
    /// its journal or orphan list. Not damage: the host itself, or whoever recovers it,
    /// finishes it.
    Pending,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// The object, e.g. "inode 1234" or "file blocks bitmap of cluster 3".
    pub object: String,
    pub offset: Option<u64>,
    pub problem: String,
    /// What repair does (or did) about it; None when it cannot be fixed safely.
    pub repair: Option<String>,
    pub repaired: bool,
}

/// Findings of one kind: the same severity, outcome and problem on objects of one sort.
#[derive(Debug, Clone, Serialize)]
pub struct FindingGroup {
    pub severity: Severity,
    /// The sort of object with its numbers left out, e.g. "inode N".
    pub kind: String,
    /// The problem; with more than one finding, its words holding numbers read "N".
    pub problem: String,
    pub repair: Option<String>,
    pub repaired: bool,
    pub count: usize,
    /// The first few objects, e.g. "inode 12".
    pub examples: Vec<String>,
}

/// How many objects a group names.
const GROUP_EXAMPLES: usize = 5;

/// Text with every word that holds a digit (a number, a hex magic) replaced by "N" and
/// quoted names by "…", so findings that differ only in which object they are about, or in
/// the random bytes found, group together.
fn shape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let mut quoted = false;
    let flush = |word: &mut String, out: &mut String| {
        if word.chars().any(|c| c.is_ascii_digit()) {
            out.push('N');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if c == '"' {
            flush(&mut word, &mut out);
            if !quoted {
                out.push('…');
            }
            quoted = !quoted;
            continue;
        }
        if quoted {
            continue;
        }
        if c.is_ascii_alphanumeric() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn group(findings: &[Finding]) -> Vec<FindingGroup> {
    let mut groups: Vec<FindingGroup> = Vec::new();
    let mut index: HashMap<(u8, bool, String, String, Option<String>), usize> = HashMap::new();
    for f in findings {
        let kind = shape(&f.object);
        let key = (
            f.severity as u8,
            f.repaired,
            kind.clone(),
            shape(&f.problem),
            f.repair.as_deref().map(shape),
        );
        match index.get(&key) {
            Some(&i) => {
                let g = &mut groups[i];
                g.count += 1;
                if g.examples.len() < GROUP_EXAMPLES {
                    g.examples.push(f.object.clone());
                }
            }
            None => {
                index.insert(key, groups.len());
                groups.push(FindingGroup {
                    severity: f.severity,
                    kind,
                    problem: f.problem.clone(),
                    repair: f.repair.clone(),
                    repaired: f.repaired,
                    count: 1,
                    examples: vec![f.object.clone()],
                });
            }
        }
    }
    for g in &mut groups {
        if g.count > 1 {
            g.problem = shape(&g.problem);
        }
    }
    groups
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FsckStats {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    /// FIFOs, device nodes and sockets.
    pub special: u64,
    pub raw_device_mappings: u64,
    pub file_blocks_used: u64,
    pub sub_blocks_used: u64,
    pub pointer_blocks_used: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FsckReport {
    pub lun: String,
    pub label: String,
    pub uuid: String,
    /// No problems remain.
    pub clean: bool,
    /// Problems found (severity error).
    pub problems: usize,
    pub repaired: usize,
    pub remaining: usize,
    /// Unfinished work of hosts holding their slots (severity pending): not problems.
    pub pending: usize,
    /// The findings grouped by kind, in order of first appearance.
    pub groups: Vec<FindingGroup>,
    pub findings: Vec<Finding>,
    pub stats: FsckStats,
}

/// A change repair makes.
#[derive(Debug)]
enum Fix {
    /// Write this (already sealed) image through the journal.
    Unit {
        off: u64,
        image: Box<Unit>,
    },
    RemoveEntry {
        dir: u64,
        name: OsString,
    },
    LostFound {
        ino: u64,
        kind: Kind,
    },
}

fn finding(
    object: impl Into<String>,
    offset: Option<u64>,
    problem: impl Into<String>,
    repair: Option<&str>,
) -> Finding {
    Finding {
        severity: Severity::Error,
        object: object.into(),
        offset,
        problem: problem.into(),
        repair: repair.map(str::to_string),
        repaired: false,
    }
}

/// Work a host holding slot `hb` left unfinished; `by` says who finishes it.
fn pending(
    object: impl Into<String>,
    offset: u64,
    problem: impl Into<String>,
    by: &str,
) -> Finding {
    Finding {
        severity: Severity::Pending,
        object: object.into(),
        offset: Some(offset),
        problem: problem.into(),
        repair: Some(by.to_string()),
        repaired: false,
    }
}

/// Who finishes the unfinished work of the host holding slot `hb`, as fsck can tell
/// without joining: a process of this machine that is gone is dead for sure.
fn finisher(hb: &Heartbeat, sb: &Superblock) -> String {
    let who = format!(
        "host {} (slot {}, pid {}, uuid {})",
        hb.hostname, hb.slot, hb.pid, hb.host
    );
    if let Some(r) = hb.recoverer {
        return format!(
            "{who} is being recovered by the host in slot {}; it finishes it",
            r.slot
        );
    }
    if heartbeat::same_machine(hb) && !heartbeat::pid_alive(hb.pid) {
        return format!(
            "{who} is dead (same machine, process gone): the next read-write open of the datastore recovers it at once"
        );
    }
    format!(
        "{who} finishes it while it runs; if it died, any host recovers it {} ms after its heartbeat stopped",
        sb.timing().dead_after().as_millis()
    )
}

fn info(object: impl Into<String>, problem: impl Into<String>) -> Finding {
    Finding {
        severity: Severity::Info,
        object: object.into(),
        offset: None,
        problem: problem.into(),
        repair: None,
        repaired: false,
    }
}

/// Checks (and with `repair`, fixes) the datastore on `lun`.
pub fn fsck(lun: Arc<dyn Lun>, options: &FsckOptions) -> Result<FsckReport> {
    let (sb, source) = read_superblock(&*lun)?;
    if options.repair {
        if let Some(hb) = crate::cluster::survey::renewing_hosts(&*lun, &sb)?.first() {
            return Err(Error::Busy {
                object: format!("datastore {} on {}", sb.label, lun.name()),
                holder: format!(
                    "host {} (slot {}, pid {}, uuid {})",
                    hb.hostname, hb.slot, hb.pid, hb.host
                ),
                mode: "mounted read-write; repair needs every host unmounted".into(),
            });
        }
    }
    let mut findings = Vec::new();
    let mut truncating = Vec::new();
    let mut orphans = HashMap::new();
    raw_checks(
        &*lun,
        &sb,
        &source,
        options.repair,
        &mut findings,
        &mut truncating,
        &mut orphans,
    )?;
    if !options.repair {
        let ds = Datastore::open(lun.clone(), &OpenOptions::read_only())?;
        let scan = ds.read_op(|s| Scan::run(s, &orphans))?;
        findings.extend(scan.findings);
        return Ok(report(&lun, &sb, findings, scan.stats));
    }
    let open = options.open.clone().unwrap_or_default();
    let ds = Datastore::open(
        lun.clone(),
        &OpenOptions {
            read_only: false,
            ..open
        },
    )?;
    for (ino, size) in truncating {
        match ds.truncate(ino, size) {
            Ok(()) | Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let first = ds.read_op(|s| Scan::run(s, &HashMap::new()))?;
    let mut applied = false;
    if !first.fixes.is_empty() {
        apply(&ds, first.fixes)?;
        applied = true;
    }
    ds.sync()?;
    let second = ds.read_op(|s| {
        s.st.drop_clean_cache();
        s.forget_derived();
        Scan::run(s, &HashMap::new())
    })?;
    let still: HashSet<(String, String)> = second
        .findings
        .iter()
        .map(|f| (f.object.clone(), f.problem.clone()))
        .collect();
    for mut f in first.findings {
        if f.severity == Severity::Error
            && applied
            && f.repair.is_some()
            && !still.contains(&(f.object.clone(), f.problem.clone()))
        {
            f.repaired = true;
        }
        findings.push(f);
    }
    let known: HashSet<(String, String)> = findings
        .iter()
        .map(|f| (f.object.clone(), f.problem.clone()))
        .collect();
    for f in second.findings {
        if !known.contains(&(f.object.clone(), f.problem.clone())) {
            findings.push(f);
        }
    }
    ds.close()?;
    Ok(report(&lun, &sb, findings, second.stats))
}

fn report(
    lun: &Arc<dyn Lun>,
    sb: &Superblock,
    findings: Vec<Finding>,
    stats: FsckStats,
) -> FsckReport {
    let problems = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let repaired = findings
        .iter()
        .filter(|f| f.severity == Severity::Error && f.repaired)
        .count();
    let remaining = problems - repaired;
    let pending = findings
        .iter()
        .filter(|f| f.severity == Severity::Pending && !f.repaired)
        .count();
    FsckReport {
        lun: lun.name().to_string(),
        label: sb.label.clone(),
        uuid: sb.uuid.to_string(),
        clean: remaining == 0,
        problems,
        repaired,
        remaining,
        pending,
        groups: group(&findings),
        findings,
        stats,
    }
}

/// Superblock copies, heartbeat slots, journals and orphan lists: things checked and fixed
/// with plain LUN I/O before the datastore is opened.
fn raw_checks(
    lun: &dyn Lun,
    sb: &Superblock,
    source: &SuperblockSource,
    repair: bool,
    out: &mut Vec<Finding>,
    truncating: &mut Vec<(u64, u64)>,
    orphans: &mut HashMap<u64, String>,
) -> Result<()> {
    let fixed = |f: &mut Finding| {
        if repair {
            f.repaired = true;
        }
    };
    match source {
        SuperblockSource::Backup(why) => {
            let mut f = finding(
                "primary superblock",
                Some(0),
                why.clone(),
                Some("rewrite it from the backup"),
            );
            if repair {
                lun.write_at(&sb.encode(0)[..], 0)?;
                lun.flush()?;
            }
            fixed(&mut f);
            out.push(f);
        }
        SuperblockSource::Primary => {
            let at = sb.backup_offset();
            let mut u = zero_unit();
            lun.read_at(&mut u[..], at)?;
            let problem = match Superblock::decode(&u[..], at) {
                Ok(backup) if backup == *sb => None,
                Ok(_) => Some("differs from the primary".to_string()),
                Err(fault) => Some(fault.to_string()),
            };
            if let Some(problem) = problem {
                let mut f = finding(
                    "backup superblock",
                    Some(at),
                    problem,
                    Some("rewrite it from the primary"),
                );
                if repair {
                    lun.write_at(&sb.encode(at)[..], at)?;
                    lun.flush()?;
                }
                fixed(&mut f);
                out.push(f);
            }
        }
    }
    for index in 0..sb.lease_areas {
        for (object, off, why) in crate::cluster::paxos::check_area(lun, sb, index, repair)? {
            let mut f = finding(
                object,
                Some(off),
                why,
                Some("rewrite it free (no host holds a lease while none is mounted)"),
            );
            fixed(&mut f);
            out.push(f);
        }
    }
    let mut region = vec![0u8; sb.host_slots as usize * UNIT];
    lun.read_at(&mut region, sb.heartbeat_offset)?;
    for slot in 0..sb.host_slots {
        let at = slot as usize * UNIT;
        let off = sb.heartbeat_slot_offset(slot);
        let mut holder = None;
        match Heartbeat::decode(&region[at..at + UNIT], off, slot) {
            Ok(Some(hb)) if hb.state != SlotState::Free => {
                holder = Some(finisher(&hb, sb));
                out.push(info(
                    format!("heartbeat slot {slot}"),
                    format!(
                        "{} host {} ({}), pid {}, generation {}",
                        hb.state.name(),
                        hb.hostname,
                        hb.host,
                        hb.pid,
                        hb.generation
                    ),
                ));
                if repair {
                    // No host uses the datastore (checked before): the slot's journal is
                    // replayed below, so its locks may go.
                    let mut freed = hb.clone();
                    freed.state = SlotState::Free;
                    freed.recoverer = None;
                    freed.pid = 0;
                    crate::cluster::paxos::write_record(lun, &freed.encode(off), off)?;
                }
            }
            Ok(_) => {}
            Err(why) => {
                let mut f = finding(
                    format!("heartbeat slot {slot}"),
                    Some(off),
                    why,
                    Some("clear the slot"),
                );
                if repair {
                    lun.write_at(&zero_unit()[..], off)?;
                }
                fixed(&mut f);
                out.push(f);
            }
        }
        let area = sb.journal_area(slot);
        match store::read_journal(lun, sb, slot) {
            Ok(state) => {
                if !state.pending.is_empty() {
                    let n = state.pending.len();
                    let mut f = match &holder {
                        Some(by) => pending(
                            format!("journal of host slot {slot}"),
                            area,
                            format!("{n} committed transaction(s) to replay"),
                            by,
                        ),
                        None => finding(
                            format!("journal of host slot {slot}"),
                            Some(area),
                            format!(
                                "{n} committed transaction(s) not yet applied, yet the slot is free"
                            ),
                            Some("replay the journal"),
                        ),
                    };
                    if repair {
                        store::replay_read(lun, sb, slot, &state, state.header.host)?;
                    }
                    fixed(&mut f);
                    out.push(f);
                }
            }
            Err(e) => {
                let mut f = finding(
                    format!("journal header of host slot {slot}"),
                    Some(area),
                    e.to_string(),
                    Some("reset the journal"),
                );
                if repair {
                    let header = Header {
                        slot,
                        size: sb.journal_size,
                        checkpoint_seq: 0,
                        host: uuid::Uuid::nil(),
                    };
                    lun.write_at(&header.encode(area)[..], area)?;
                    lun.write_at(&zero_unit()[..], area + TX_START * UNIT_U64)?;
                }
                fixed(&mut f);
                out.push(f);
            }
        }
        let orphan_off = sb.orphan_offset(slot);
        let mut u = zero_unit();
        lun.read_at(&mut u[..], orphan_off)?;
        let list = match journal::decode_orphans(&u, orphan_off) {
            Ok(list) => list,
            Err(fault) => {
                let mut f = finding(
                    format!("orphan list of host slot {slot}"),
                    Some(orphan_off),
                    fault.to_string(),
                    Some("clear it"),
                );
                fixed(&mut f);
                out.push(f);
                vec![Orphan::Unlinked {
                    ino: 0,
                    generation: 0,
                }]
            }
        };
        let real: Vec<Orphan> = list.into_iter().filter(|o| o.ino() != 0).collect();
        if !real.is_empty() {
            let what = format!("{} interrupted delete/truncate(s) to finish", real.len());
            let mut f = match &holder {
                Some(by) => {
                    if !repair {
                        for o in &real {
                            if let Orphan::Unlinked { ino, .. } = *o {
                                orphans.insert(ino, by.clone());
                            }
                        }
                    }
                    pending(
                        format!("orphan list of host slot {slot}"),
                        orphan_off,
                        what,
                        by,
                    )
                }
                None => finding(
                    format!("orphan list of host slot {slot}"),
                    Some(orphan_off),
                    format!("{what}, yet the slot is free"),
                    Some("finish them"),
                ),
            };
            fixed(&mut f);
            out.push(f);
        }
        for o in &real {
            if let Orphan::Truncating { ino, size, .. } = *o {
                truncating.push((ino, size));
            }
        }
        if repair && (u.iter().any(|&b| b != 0)) {
            lun.write_at(&journal::encode_orphans(&[], orphan_off)[..], orphan_off)?;
        }
    }
    if repair {
        lun.flush()?;
    }
    Ok(())
}

struct Scan {
    findings: Vec<Finding>,
    fixes: Vec<Fix>,
    stats: FsckStats,
}

/// Resource use rebuilt by the walk.
struct Walk<'a> {
    s: &'a mut State,
    used: HashMap<ResourceKind, Vec<bool>>,
    refs: HashMap<u64, u32>,
    subdirs: HashMap<u64, u32>,
    dirs_seen: HashSet<u64>,
    inodes_seen: HashSet<u64>,
    /// The LUN each raw device mapping names (its identity without the path hint), and
    /// the mapping's inode: one LUN mapped twice would have two writers.
    mapped_luns: HashMap<String, u64>,
    /// Pending new images of inodes (link counts, parents, allocation).
    inode_fix: HashMap<u64, Inode>,
    orphans: &'a HashMap<u64, String>,
    /// Inodes the walk reached and found damaged (already reported).
    damaged: HashSet<u64>,
    root_rebuilt: bool,
    findings: Vec<Finding>,
    fixes: Vec<Fix>,
    stats: FsckStats,
}

impl Scan {
    /// `orphans`: unlinked inodes on the orphan list of a host that holds its slot, which
    /// that host (or its recoverer) frees.
    fn run(s: &mut State, orphans: &HashMap<u64, String>) -> Result<Scan> {
        let mut used = HashMap::new();
        for kind in ResourceKind::ALL {
            used.insert(kind, vec![false; s.sb().area(kind).count as usize]);
        }
        let mut w = Walk {
            s,
            used,
            refs: HashMap::new(),
            subdirs: HashMap::new(),
            dirs_seen: HashSet::new(),
            inodes_seen: HashSet::new(),
            mapped_luns: HashMap::new(),
            inode_fix: HashMap::new(),
            orphans,
            damaged: HashSet::new(),
            root_rebuilt: false,
            findings: Vec::new(),
            fixes: Vec::new(),
            stats: FsckStats::default(),
        };
        w.walk_from(ROOT_INO, ROOT_INO, None)?;
        w.descriptors()?;
        w.link_counts()?;
        w.bitmaps()?;
        w.lock_records()?;
        for (ino, i) in std::mem::take(&mut w.inode_fix) {
            let off = w.s.sb().inode_offset(ino);
            w.fixes.push(Fix::Unit {
                off,
                image: i.seal(off),
            });
        }
        Ok(Scan {
            findings: w.findings,
            fixes: w.fixes,
            stats: w.stats,
        })
    }
}

impl Walk<'_> {
    fn mark(&mut self, kind: ResourceKind, index: u64, owner: u64) -> bool {
        let Some(bits) = self.used.get_mut(&kind) else {
            return false;
        };
        let slot = &mut bits[index as usize];
        if *slot {
            self.findings.push(finding(
                format!("inode {owner}"),
                None,
                format!("{} {index} is also used by another file", kind.name()),
                None,
            ));
            return false;
        }
        *slot = true;
        true
    }

    fn fix_inode(&mut self, u: &Arc<Unit>) -> &mut Inode {
        self.inode_fix
            .entry(u.ino())
            .or_insert_with(|| Inode::from_unit(u))
    }

    /// Breadth-first walk of the tree below `start` (whose entry is in `parent`).
    fn walk_from(&mut self, start: u64, parent: u64, entry: Option<OsString>) -> Result<()> {
        let mut queue = VecDeque::new();
        queue.push_back((start, parent, entry));
        while let Some((ino, parent, name)) = queue.pop_front() {
            self.visit(ino, parent, name, &mut queue)?;
        }
        Ok(())
    }

    fn remove_entry_fix(&mut self, dir: u64, name: &Option<OsString>) -> Option<&'static str> {
        match name {
            Some(n) => {
                self.fixes.push(Fix::RemoveEntry {
                    dir,
                    name: n.clone(),
                });
                Some("remove the directory entry")
            }
            None => None,
        }
    }

    fn visit(
        &mut self,
        ino: u64,
        parent: u64,
        name: Option<OsString>,
        queue: &mut VecDeque<(u64, u64, Option<OsString>)>,
    ) -> Result<()> {
        let what = match &name {
            Some(n) => format!(
                "entry {:?} in directory inode {parent}",
                n.to_string_lossy()
            ),
            None => format!("inode {ino}"),
        };
        if ino == ROOT_INO && name.is_none() {
            let why = match self.s.inode_unit(ino) {
                Ok(u) if u.kind() == Some(Kind::Dir) => None,
                Ok(_) => Some("not a directory".to_string()),
                Err(Error::Corrupt { reason, .. }) => Some(reason),
                Err(e) => return Err(e),
            };
            if let Some(why) = why {
                self.rebuild_root(why);
                return Ok(());
            }
        }
        let u = match self.s.inode_unit(ino) {
            Ok(u) => u,
            Err(Error::Corrupt {
                object,
                offset,
                reason,
                ..
            }) => {
                self.damaged.insert(ino);
                let fix = self.remove_entry_fix(parent, &name);
                if fix.is_some() {
                    let off = self.s.sb().inode_offset(ino);
                    self.fixes.push(Fix::Unit {
                        off,
                        image: Inode::freed(ino, 1).seal(off),
                    });
                }
                self.findings.push(finding(
                    object,
                    Some(offset),
                    format!("{reason} (referenced by {what})"),
                    fix,
                ));
                return Ok(());
            }
            Err(Error::NotFound { .. }) => {
                let fix = self.remove_entry_fix(parent, &name);
                self.findings.push(finding(
                    what,
                    None,
                    format!("points to inode {ino}, which does not exist"),
                    fix,
                ));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if u.kind_code() == inode::KIND_FREE {
            let fix = self.remove_entry_fix(parent, &name);
            self.findings.push(finding(
                what,
                None,
                format!("points to free inode {ino}"),
                fix,
            ));
            return Ok(());
        }
        let kind = u.kind().unwrap_or(Kind::File);
        if self.inodes_seen.contains(&ino) {
            if kind == Kind::Dir {
                let fix = self.remove_entry_fix(parent, &name);
                self.findings.push(finding(
                    what,
                    None,
                    format!("second name for directory inode {ino}"),
                    fix,
                ));
            } else {
                *self.refs.entry(ino).or_default() += 1;
            }
            return Ok(());
        }
        self.inodes_seen.insert(ino);
        self.refs.insert(ino, 1);
        self.mark(ResourceKind::Inode, ino - 1, ino);
        match kind {
            Kind::File => self.stats.files += 1,
            Kind::Dir => self.stats.directories += 1,
            Kind::Symlink => self.stats.symlinks += 1,
            Kind::Rdm => {
                self.stats.raw_device_mappings += 1;
                self.check_rdm(&u);
            }
            Kind::Fifo | Kind::CharDevice | Kind::BlockDevice | Kind::Socket => {
                self.stats.special += 1
            }
        }
        let allocated = self.storage(&u)?;
        if allocated != u.allocated() {
            self.findings.push(finding(
                format!("inode {ino}"),
                Some(self.s.sb().inode_offset(ino)),
                format!(
                    "records {} bytes allocated, its storage is {allocated}",
                    u.allocated()
                ),
                Some("correct the count"),
            ));
            self.fix_inode(&u).set_allocated(allocated);
        }
        if kind == Kind::Dir {
            self.dirs_seen.insert(ino);
            if ino != ROOT_INO && name.is_some() && u.parent() != parent {
                self.findings.push(finding(
                    format!("directory inode {ino}"),
                    Some(self.s.sb().inode_offset(ino)),
                    format!(
                        "'..' is inode {}, but its entry is in inode {parent}",
                        u.parent()
                    ),
                    Some("point '..' at the containing directory"),
                ));
                self.fix_inode(&u).set_parent(parent);
            }
            if ino != ROOT_INO {
                *self.subdirs.entry(parent).or_default() += 1;
            }
            let mut children = Vec::new();
            for k in 0..u.size() / UNIT_U64 {
                let loc = match self.s.dir_unit_location(&u, k) {
                    Ok(loc) => loc,
                    Err(e) => {
                        self.findings.push(finding(
                            format!("directory inode {ino}"),
                            None,
                            e.to_string(),
                            None,
                        ));
                        break;
                    }
                };
                match self.s.dir_unit(&u, k) {
                    Ok((_, _, recs)) => {
                        for r in recs.into_iter().filter(|r| r.ino != 0) {
                            let child_name = OsStr::from_bytes(&r.name).to_os_string();
                            if r.ino > self.s.sb().inodes.count {
                                self.findings.push(finding(
                                    format!(
                                        "entry {:?} in directory inode {ino}",
                                        child_name.to_string_lossy()
                                    ),
                                    Some(loc),
                                    format!("points to inode {} outside the datastore", r.ino),
                                    Some("remove the directory entry"),
                                ));
                                self.fixes.push(Fix::RemoveEntry {
                                    dir: ino,
                                    name: child_name,
                                });
                                continue;
                            }
                            children.push((child_name.clone(), r.ino));
                            queue.push_back((r.ino, ino, Some(child_name)));
                        }
                    }
                    Err(Error::Corrupt {
                        object,
                        offset,
                        reason,
                        ..
                    }) => {
                        self.findings.push(finding(
                            object,
                            Some(offset),
                            reason,
                            Some("replace it with an empty unit (its entries go to lost+found)"),
                        ));
                        self.fixes.push(Fix::Unit {
                            off: loc,
                            image: dir::new_unit(ino, k, loc),
                        });
                    }
                    Err(e) => return Err(e),
                }
            }
            self.snapshot_pairs(ino, &children);
        }
        Ok(())
    }

    /// A virtual disk flagged as having snapshots needs its pool beside it (see
    /// "Snapshot sources and pools" in FORMAT.md); a pool without its flagged disk is the
    /// harmless leftover of a first snapshot cut short.
    fn snapshot_pairs(&mut self, dir: u64, children: &[(OsString, u64)]) {
        let flags_of = |w: &mut Self, ino: u64| {
            w.s.inode_unit(ino)
                .ok()
                .filter(|u| u.kind() == Some(Kind::File))
                .map(|u| (u.flags(), u))
        };
        for (name, ino) in children {
            let Some((flags, u)) = flags_of(self, *ino) else {
                continue;
            };
            let name = name.to_string_lossy();
            if flags & inode::FLAG_SNAP_SOURCE != 0 {
                let pool = format!(".{name}.snap");
                let paired = children
                    .iter()
                    .filter(|(n, _)| n.as_bytes() == pool.as_bytes())
                    .any(|&(_, p)| {
                        flags_of(self, p).is_some_and(|(f, _)| f & inode::FLAG_SNAP_POOL != 0)
                    });
                if !paired {
                    self.findings.push(finding(
                        format!("entry {name:?} in directory inode {dir}"),
                        Some(self.s.sb().inode_offset(*ino)),
                        format!(
                            "flagged as a virtual disk with snapshots, but its pool {pool} is missing: writers are refused and its snapshots are lost"
                        ),
                        Some("clear the flag (the disk is an ordinary file again)"),
                    ));
                    let i = self.fix_inode(&u);
                    i.set_flags(i.flags() & !inode::FLAG_SNAP_SOURCE);
                }
            }
            if flags & inode::FLAG_SNAP_POOL != 0 {
                let disk = name
                    .strip_prefix('.')
                    .and_then(|n| n.strip_suffix(".snap"))
                    .unwrap_or_default();
                let paired = children
                    .iter()
                    .filter(|(n, _)| !disk.is_empty() && n.as_bytes() == disk.as_bytes())
                    .any(|&(_, d)| {
                        flags_of(self, d).is_some_and(|(f, _)| f & inode::FLAG_SNAP_SOURCE != 0)
                    });
                if !paired {
                    self.findings.push(info(
                        format!("entry {name:?} in directory inode {dir}"),
                        "a snapshot pool whose virtual disk is not flagged (a first snapshot cut short): it holds no snapshot, and the next snapshot of that disk replaces it",
                    ));
                }
            }
        }
    }

    /// Marks an inode's storage used; returns the bytes it occupies.
    fn storage(&mut self, u: &Arc<Unit>) -> Result<u64> {
        let ino = u.ino();
        let sb = self.s.sb().clone();
        let bs = u64::from(sb.block_size);
        match u.addr_mode() {
            Some(AddrMode::SubBlock) => {
                match self
                    .s
                    .resource_index(ResourceKind::SubBlock, ino, u.sub_block())
                {
                    Ok(i) => {
                        self.mark(ResourceKind::SubBlock, i, ino);
                        self.stats.sub_blocks_used += 1;
                        if u.size() > u64::from(sb.sub_block_size) {
                            self.findings.push(finding(
                                format!("inode {ino}"),
                                None,
                                format!("size {} exceeds its sub-block", u.size()),
                                None,
                            ));
                        }
                        Ok(u64::from(sb.sub_block_size))
                    }
                    Err(e) => {
                        self.findings.push(finding(
                            format!("inode {ino}"),
                            None,
                            e.to_string(),
                            None,
                        ));
                        Ok(u.allocated())
                    }
                }
            }
            Some(AddrMode::Tree) => {
                let mut total = 0;
                let mut fixed = Inode::from_unit(u);
                let mut changed = false;
                for n in 0..crate::layout::DIRECT_ADDRS {
                    let a = u.direct(n);
                    if a == 0 {
                        continue;
                    }
                    match self.s.block_index(ino, a) {
                        Ok(b) => {
                            if self.mark(ResourceKind::FileBlock, b, ino) {
                                self.stats.file_blocks_used += 1;
                            }
                            total += bs;
                        }
                        Err(e) => {
                            self.bad_address(format!("inode {ino}"), None, &e);
                            fixed.set_direct(n, 0);
                            changed = true;
                        }
                    }
                }
                for level in 1..=3 {
                    let root = u.indirect(level);
                    if root == 0 {
                        continue;
                    }
                    match self.s.resource_index(ResourceKind::PointerBlock, ino, root) {
                        Ok(p) => total += self.walk_pointer_block(ino, p, level)?,
                        Err(e) => {
                            self.bad_address(format!("inode {ino}"), None, &e);
                            fixed.set_indirect(level, 0);
                            changed = true;
                        }
                    }
                }
                if changed {
                    let keep = self.fix_inode(u);
                    *keep = fixed;
                }
                Ok(total)
            }
            _ => Ok(0),
        }
    }

    /// An address outside its resource area: repair clears it (the block becomes a hole).
    fn bad_address(&mut self, object: String, offset: Option<u64>, e: &Error) {
        self.findings.push(finding(
            object,
            offset,
            e.to_string(),
            Some("clear the bad address (a hole)"),
        ));
    }

    fn walk_pointer_block(&mut self, ino: u64, p: u64, level: u32) -> Result<u64> {
        let bs = u64::from(self.s.sb().block_size);
        if self.mark(ResourceKind::PointerBlock, p, ino) {
            self.stats.pointer_blocks_used += 1;
        }
        let mut total = POINTER_BLOCK_SIZE;
        let base = self.s.sb().pointer_blocks.resource_offset(p);
        for k in 0..PTR_UNITS {
            let off = base + k * UNIT_U64;
            let object = format!("pointer block {p} unit {k} of inode {ino}");
            let checked = match self.s.st.load(off, MAGIC_POINTER, &|| object.clone()) {
                Ok(u) => inode::pointer_check(&u, p, k).map(|()| u),
                Err(Error::Corrupt { reason, .. }) => Err(reason),
                Err(e) => return Err(e),
            };
            let u = match checked {
                Ok(u) => u,
                Err(why) => {
                    self.findings.push(finding(
                        object,
                        Some(off),
                        why,
                        Some("clear it (its blocks become holes)"),
                    ));
                    self.fixes.push(Fix::Unit {
                        off,
                        image: inode::pointer_unit_new(p, k, off),
                    });
                    continue;
                }
            };
            let mut repaired = Box::new(*u);
            let mut changed = false;
            let mut s = 0;
            while let Some(hit) = inode::pointer_next(&u, s) {
                s = hit + 1;
                let a = inode::pointer_get(&u, hit);
                let kind = if level == 1 {
                    ResourceKind::FileBlock
                } else {
                    ResourceKind::PointerBlock
                };
                match self.s.resource_index(kind, ino, a) {
                    Ok(i) if level == 1 => {
                        if self.mark(ResourceKind::FileBlock, i, ino) {
                            self.stats.file_blocks_used += 1;
                        }
                        total += bs;
                    }
                    Ok(i) => total += self.walk_pointer_block(ino, i, level - 1)?,
                    Err(e) => {
                        self.bad_address(object.clone(), Some(off), &e);
                        inode::pointer_set(&mut repaired, hit, 0, off);
                        changed = true;
                    }
                }
            }
            if changed {
                self.fixes.push(Fix::Unit {
                    off,
                    image: repaired,
                });
            }
        }
        Ok(total)
    }

    /// Every descriptor, one resource cluster per read: lock records, damaged units of
    /// descriptors no file uses, and allocated inodes the walk did not reach. Unused
    /// descriptors are checked from that one read, so a damaged inode bitmap does not turn
    /// into a verified read of every unit it governs.
    fn descriptors(&mut self) -> Result<()> {
        let area = self.s.sb().inodes;
        let per = u64::from(area.per_cluster);
        let mut candidates: Vec<(u64, Kind, u64)> = Vec::new();
        for c in 0..area.clusters() {
            let n = area.in_cluster(c);
            let bits = self.s.bitmap(ResourceKind::Inode, c).ok().map(|u| {
                (0..n)
                    .map(|i| crate::bitmap::get(&u, i))
                    .collect::<Vec<_>>()
            });
            let first = c * per + 1;
            let base = self.s.sb().inode_lock_offset(first);
            let units = self.s.st.read_raw_range(base, 2 * n as usize)?;
            for (i, pair) in units.chunks_exact(2).enumerate() {
                let ino = first + i as u64;
                let lock_off = base + 2 * i as u64 * UNIT_U64;
                let off = lock_off + UNIT_U64;
                self.lock_record(LockTarget::Inode(ino), lock_off, &pair[0])?;
                if self.inodes_seen.contains(&ino) || self.damaged.contains(&ino) {
                    continue;
                }
                let mut u = pair[1].clone();
                let valid = match verify(&u[..], MAGIC_INODE, off, UNIT) {
                    Ok(()) => inode::check(&u, ino),
                    Err(UnitFault::Blank) => continue,
                    Err(fault) if !may_be_torn(&u[..], MAGIC_INODE) => Err(fault.to_string()),
                    // Its own magic: read it again the way a host reads a unit another host
                    // may be writing.
                    Err(_) => match self
                        .s
                        .st
                        .load_fresh(off, MAGIC_INODE, &|| format!("inode {ino}"))
                    {
                        Ok(fresh) => {
                            u = fresh;
                            inode::check(&u, ino)
                        }
                        Err(Error::Corrupt { reason, .. }) => Err(reason),
                        Err(e) => return Err(e),
                    },
                };
                if let Err(why) = valid {
                    self.findings.push(finding(
                        format!("inode {ino}"),
                        Some(off),
                        format!("{why}; no file uses it"),
                        Some("rewrite it as a free descriptor"),
                    ));
                    self.fixes.push(Fix::Unit {
                        off,
                        image: Inode::freed(ino, 1).seal(off),
                    });
                    continue;
                }
                let in_use = bits.as_ref().is_none_or(|b| b[i]);
                if u.kind_code() == inode::KIND_FREE || !in_use {
                    continue;
                }
                if u.nlink() == 0 {
                    self.unlinked(ino, &u)?;
                    continue;
                }
                candidates.push((ino, u.kind().unwrap_or(Kind::File), u.parent()));
            }
        }
        // Directories whose parent is lost too are reached through it: attach only the tops
        // of lost subtrees, then whatever is still unreached.
        let lost_dirs: HashSet<u64> = candidates
            .iter()
            .filter(|c| c.1 == Kind::Dir)
            .map(|c| c.0)
            .collect();
        let tops = candidates
            .iter()
            .filter(|c| c.1 == Kind::Dir && !lost_dirs.contains(&c.2));
        let order: Vec<(u64, Kind)> = tops
            .chain(candidates.iter().filter(|c| c.1 == Kind::Dir))
            .chain(candidates.iter().filter(|c| c.1 != Kind::Dir))
            .map(|c| (c.0, c.1))
            .collect();
        for (ino, kind) in order {
            if self.inodes_seen.contains(&ino) {
                continue;
            }
            self.findings.push(finding(
                format!("inode {ino}"),
                Some(self.s.sb().inode_offset(ino)),
                "allocated but not in any directory",
                Some("move it to /lost+found"),
            ));
            self.walk_from(ino, 0, None)?;
            self.refs.insert(ino, 1);
            self.fixes.push(Fix::LostFound { ino, kind });
        }
        Ok(())
    }

    /// An allocated inode with no names that the walk did not reach: pending when a host
    /// holding its slot has it on its orphan list, else never freed.
    fn unlinked(&mut self, ino: u64, u: &Arc<Unit>) -> Result<()> {
        let off = self.s.sb().inode_offset(ino);
        if let Some(by) = self.orphans.get(&ino) {
            // Its descriptor and storage stay in use until the delete is finished: not leaks.
            self.findings.push(pending(
                format!("inode {ino}"),
                off,
                "unlinked while open; its descriptor and storage are freed when the delete is finished",
                by,
            ));
            self.walk_from(ino, 0, None)?;
            self.refs.insert(ino, 0);
            match u.kind() {
                Some(Kind::Dir) => self.stats.directories -= 1,
                Some(Kind::Symlink) => self.stats.symlinks -= 1,
                Some(Kind::Rdm) => self.stats.raw_device_mappings -= 1,
                _ => self.stats.files -= 1,
            }
            return Ok(());
        }
        self.findings.push(finding(
            format!("inode {ino}"),
            Some(off),
            "unlinked but never freed",
            Some("free it"),
        ));
        self.fixes.push(Fix::Unit {
            off,
            image: Inode::freed(ino, u.generation()).seal(off),
        });
        Ok(())
    }

    /// A mapping's payload must decode and agree with its inode. The LUN it names is not
    /// looked for: fsck checks the datastore, `rdm verify` the device. Nothing is repaired,
    /// since only the user knows which LUN was meant; the mapping can be removed and made
    /// again.
    fn check_rdm(&mut self, u: &Arc<Unit>) {
        let ino = u.ino();
        let problem = match crate::rdm::RdmRecord::decode(&u[..]) {
            Err(reason) => format!("damaged mapping payload: {reason}"),
            Ok(r) if r.size != u.size() => format!(
                "mapping records a LUN of {} bytes but its size is {}",
                r.size,
                u.size()
            ),
            Ok(r) => {
                let lun = r
                    .identity
                    .split_once(' ')
                    .map_or(&*r.identity, |(key, _)| key);
                match self.mapped_luns.get(lun) {
                    Some(&first) => {
                        format!("maps the same LUN as raw device mapping inode {first} ({lun})")
                    }
                    None => {
                        self.mapped_luns.insert(lun.to_string(), ino);
                        return;
                    }
                }
            }
        };
        self.findings.push(finding(
            format!("raw device mapping inode {ino}"),
            Some(self.s.sb().inode_offset(ino)),
            problem,
            None,
        ));
    }

    /// A root that is damaged, free or not a directory is replaced by an empty one; what it
    /// held is then unreached and goes to /lost+found.
    fn rebuild_root(&mut self, why: String) {
        let off = self.s.sb().inode_offset(ROOT_INO);
        self.findings.push(finding(
            "root directory (inode 1)",
            Some(off),
            why,
            Some("rebuild it empty (what it held goes to /lost+found)"),
        ));
        let mut root = Inode::new(
            ROOT_INO,
            1,
            Kind::Dir,
            0o755,
            0,
            0,
            ROOT_INO,
            crate::state::now_ns(),
        );
        root.set_addr_mode(AddrMode::Tree);
        self.fixes.push(Fix::Unit {
            off,
            image: root.seal(off),
        });
        self.root_rebuilt = true;
        self.inodes_seen.insert(ROOT_INO);
        self.dirs_seen.insert(ROOT_INO);
        self.refs.insert(ROOT_INO, 1);
        self.mark(ResourceKind::Inode, ROOT_INO - 1, ROOT_INO);
        self.stats.directories += 1;
    }

    fn link_counts(&mut self) -> Result<()> {
        let seen: Vec<u64> = self.inodes_seen.iter().copied().collect();
        for ino in seen {
            if ino == ROOT_INO && self.root_rebuilt {
                continue;
            }
            let u = self.s.inode_unit(ino)?;
            let expected = if u.kind() == Some(Kind::Dir) {
                2 + self.subdirs.get(&ino).copied().unwrap_or(0)
            } else {
                self.refs.get(&ino).copied().unwrap_or(0)
            };
            if u.nlink() != expected {
                self.findings.push(finding(
                    format!("inode {ino}"),
                    Some(self.s.sb().inode_offset(ino)),
                    format!("link count {} but {expected} found", u.nlink()),
                    Some("correct the link count"),
                ));
                self.fix_inode(&u).set_nlink(expected);
            }
        }
        Ok(())
    }

    fn bitmaps(&mut self) -> Result<()> {
        for kind in ResourceKind::ALL {
            let area = *self.s.sb().area(kind);
            let per = u64::from(area.per_cluster);
            for c in 0..area.clusters() {
                let off = area.bitmap_offset(c);
                let object = format!("{} bitmap of cluster {c}", kind.name());
                let n = area.in_cluster(c);
                let bits = &self.used[&kind][(c * per) as usize..(c * per + n) as usize];
                let mut rebuilt = crate::bitmap::new(kind, c, n, off);
                for (i, &b) in bits.iter().enumerate() {
                    if b {
                        crate::bitmap::set(&mut rebuilt, i as u64, true, off);
                    }
                }
                let current = match self.s.bitmap(kind, c) {
                    Ok(u) => u,
                    Err(Error::Corrupt { reason, .. }) => {
                        self.findings.push(finding(
                            object,
                            Some(off),
                            reason,
                            Some("rebuild it from the files that use it"),
                        ));
                        self.fixes.push(Fix::Unit {
                            off,
                            image: rebuilt,
                        });
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let leaked = (0..n)
                    .filter(|&i| crate::bitmap::get(&current, i) && !bits[i as usize])
                    .count();
                let missing = (0..n)
                    .filter(|&i| !crate::bitmap::get(&current, i) && bits[i as usize])
                    .count();
                if leaked > 0 {
                    self.findings.push(finding(
                        object.clone(),
                        Some(off),
                        format!("{leaked} resource(s) marked in use but used by nothing (leaked)"),
                        Some("free them"),
                    ));
                }
                if missing > 0 {
                    self.findings.push(finding(
                        object.clone(),
                        Some(off),
                        format!("{missing} resource(s) in use but marked free"),
                        Some("mark them in use"),
                    ));
                }
                let count_bad = crate::bitmap::check(&current, kind, c, n).is_err();
                if count_bad && leaked == 0 && missing == 0 {
                    self.findings.push(finding(
                        object,
                        Some(off),
                        "free count disagrees with the bits",
                        Some("recount"),
                    ));
                }
                if leaked > 0 || missing > 0 || count_bad {
                    self.fixes.push(Fix::Unit {
                        off,
                        image: rebuilt,
                    });
                }
            }
        }
        Ok(())
    }

    /// Every cluster's lock record must decode (blank is free) and guard its own cluster
    /// (descriptors' are checked with the descriptors).
    fn lock_records(&mut self) -> Result<()> {
        let mut targets: Vec<LockTarget> = Vec::new();
        for kind in ResourceKind::ALL {
            let area = *self.s.sb().area(kind);
            for c in 0..area.clusters() {
                targets.push(LockTarget::Cluster(kind, c));
            }
        }
        for target in targets {
            let off = target.offset(self.s.sb());
            let u = self.s.st.read_raw(off)?;
            self.lock_record(target, off, &u)?;
        }
        Ok(())
    }

    /// Checks lock record `u` read at `off`; one that does not decode is read again as other
    /// hosts' records are (a read racing a write of the sector can return part of each)
    /// before it is reported.
    fn lock_record(&mut self, target: LockTarget, off: u64, u: &Unit) -> Result<()> {
        let Err(mut why) = LockRecord::decode(&u[..], off, target.code()) else {
            return Ok(());
        };
        if may_be_torn(&u[..], MAGIC_LOCK) {
            let again = crate::cluster::paxos::read_intact(&*self.s.st.lun, off, MAGIC_LOCK)?;
            match LockRecord::decode(&again, off, target.code()) {
                Ok(_) => return Ok(()),
                Err(w) => why = w,
            }
        }
        self.findings.push(finding(
            format!("lock record of {}", target.describe()),
            Some(off),
            why,
            Some("clear the lock record"),
        ));
        self.fixes.push(Fix::Unit {
            off,
            image: zero_unit(),
        });
        Ok(())
    }
}

/// Applies the fixes of one scan through the journal.
fn apply(ds: &Datastore, fixes: Vec<Fix>) -> Result<()> {
    let mut lost = Vec::new();
    let mut units = Vec::new();
    let mut removals = Vec::new();
    for fix in fixes {
        match fix {
            Fix::Unit { off, image } => units.push((off, image)),
            Fix::RemoveEntry { dir, name } => removals.push((dir, name)),
            Fix::LostFound { ino, kind } => lost.push((ino, kind)),
        }
    }
    for chunk in units.chunks(crate::state::MAX_OP_UNITS) {
        ds.write_op(|s| {
            for (off, image) in chunk {
                s.st.put(*off, Box::new(**image));
            }
            Ok(())
        })?;
    }
    ds.write_op(|s| {
        s.st.end_op(true);
        s.st.commit()?;
        s.st.drop_clean_cache();
        s.forget_derived();
        Ok(())
    })?;
    for (dir, name) in removals {
        ds.write_op(|s| {
            let d = s.inode(dir)?;
            match s.dir_remove(&d, &name) {
                Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })?;
    }
    if !lost.is_empty() {
        let lf = ds
            .mkdir_all("/lost+found", 0o700, crate::Creds::default())?
            .ino;
        for (ino, kind) in lost {
            let name = OsString::from(format!("#{ino}"));
            ds.write_op(|s| {
                let mut d = Inode::from_unit(&s.inode(lf)?);
                s.dir_insert(&mut d, &name, ino, kind)?;
                if kind == Kind::Dir {
                    d.set_nlink(d.nlink() + 1);
                    let mut child = Inode::from_unit(&s.inode(ino)?);
                    child.set_parent(lf);
                    s.put_inode(child);
                }
                s.put_inode(d);
                Ok(())
            })?;
        }
    }
    ds.sync()
}

impl Datastore {
    /// Checks this open datastore (read-only view of the same walk fsck does).
    pub fn check(&self) -> Result<Vec<Finding>> {
        Ok(self.read_op(|s| Scan::run(s, &HashMap::new()))?.findings)
    }
}
