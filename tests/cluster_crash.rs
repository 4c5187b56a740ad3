//! kill -9 of a host in the middle of metadata updates while it holds locks: another host
//! breaks them within the dead-host timeout plus a small margin, only after replaying the
//! dead host's journal; everything the dead host had synced is there and fsck is clean.
//!
//! The doomed host's kill -9 comes at the worst moment: right after a journal transaction
//! became durable and before any of it was written in place (its LUN handle sends SIGKILL
//! to its own process on the flush that commits the transaction). Its journal then holds a
//! rename the survivor must replay before it may touch the directory.
#![allow(clippy::unwrap_used)]

mod cluster_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cluster_support::*;
use lun::{IoRequest, Lun};
use vmfs::{Access, Datastore, Error, NewFile, OpenOptions};

const TEST: &str = "killed_host_locks_are_broken_after_journal_replay";

/// A LUN handle that kills its own process with SIGKILL once armed and a journal
/// transaction has been written and flushed.
#[derive(Debug)]
struct KillAfterCommit {
    inner: Arc<dyn Lun>,
    journals: std::ops::Range<u64>,
    armed: AtomicBool,
    journaled: AtomicBool,
}

impl Lun for KillAfterCommit {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn sector_size(&self) -> u32 {
        self.inner.sector_size()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> lun::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> lun::Result<()> {
        self.inner.write_at(buf, offset)?;
        // Transactions are single writes of more than one unit (descriptor and images).
        if self.armed.load(Ordering::SeqCst) && self.journals.contains(&offset) && buf.len() > 4096
        {
            self.journaled.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
    fn flush(&self) -> lun::Result<()> {
        self.inner.flush()?;
        if self.journaled.load(Ordering::SeqCst) {
            nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL)
                .unwrap();
        }
        Ok(())
    }
    fn supports_compare_and_write(&self) -> bool {
        self.inner.supports_compare_and_write()
    }
    fn compare_and_write_scope(&self) -> lun::CasScope {
        self.inner.compare_and_write_scope()
    }
    fn reach(&self) -> lun::Reach {
        self.inner.reach()
    }
    fn compare_and_write(
        &self,
        expected: &[u8],
        new: &[u8],
        offset: u64,
    ) -> lun::Result<lun::CompareAndWrite> {
        self.inner.compare_and_write(expected, new, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> lun::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn submit(&self, batch: &mut [IoRequest<'_>]) -> lun::Result<()> {
        self.inner.submit(batch)
    }
}

fn open_rw() -> Datastore {
    let lun = lun::open(&var("LUN"), &lun::OpenOptions::default()).unwrap();
    Datastore::open(lun, &OpenOptions::default()).unwrap()
}

/// Holds /victim open exclusively and changes metadata as fast as it can, syncing now and
/// then; after 40 rounds it renames a file and dies as that rename commits.
fn churn() {
    init_host_logging();
    let inner = lun::open(&var("LUN"), &lun::OpenOptions::default()).unwrap();
    let sb = vmfs::read_superblock(&*inner).unwrap().0;
    let journals =
        sb.journal_offset..sb.journal_offset + u64::from(sb.host_slots) * sb.journal_size;
    let lun = Arc::new(KillAfterCommit {
        inner,
        journals,
        armed: AtomicBool::new(false),
        journaled: AtomicBool::new(false),
    });
    let ds = Datastore::open(lun.clone(), &OpenOptions::default()).unwrap();
    let victim = ds.open_path("/victim", Access::Exclusive).unwrap();
    report(format!("HOLDING {}", ds.host_slot().unwrap()));
    for n in 0u64.. {
        if n == 40 {
            report("DYING");
            lun.armed.store(true, Ordering::SeqCst);
            ds.rename_path("/churn/g-0", "/churn/last-words").unwrap();
            ds.sync().unwrap();
            unreachable!("the commit flush kills this process");
        }
        let a = ds
            .create_path(&format!("/churn/f-{n}"), &NewFile::default())
            .unwrap();
        ds.write(a.ino, 0, &[n as u8; 5000]).unwrap();
        ds.rename_path(&format!("/churn/f-{n}"), &format!("/churn/g-{n}"))
            .unwrap();
        victim.write_at(&n.to_le_bytes(), 0).unwrap();
        if n % 8 == 7 {
            ds.sync().unwrap();
            report(format!("SYNCED {n}"));
        }
    }
}

/// A long-running host waiting for /victim.
fn waiter() {
    init_host_logging();
    let ds = open_rw();
    report("READY");
    let start = Instant::now();
    let handle = loop {
        match ds.open_path("/victim", Access::Exclusive) {
            Ok(h) => break h,
            Err(Error::Busy { .. }) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("{e}"),
        }
    };
    report(format!("TAKEN {}", start.elapsed().as_millis()));
    drop(handle);
    ds.close().unwrap();
    report("CLOSED");
}

#[test]
fn killed_host_locks_are_broken_after_journal_replay() {
    match role().as_deref() {
        Some("churn") => return churn(),
        Some("waiter") => return waiter(),
        _ => {}
    }
    let dir = scratch_dir();
    let lun = format_datastore(dir.path(), "cas", "200ms");
    let lun = lun.to_str().unwrap().to_string();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, [0u8; 8]).unwrap();
    for args in [
        vec!["-d", &lun, "mkdir", "/churn"],
        vec!["-d", &lun, "put", victim.to_str().unwrap(), "/victim"],
    ] {
        let (ok, _, err) = run_vapp(&args, &[]);
        assert!(ok, "{err}");
    }
    let vars = [("LUN", lun.clone())];
    let mut doomed = spawn(TEST, "churn", "doomed", &vars, &[]);
    doomed.expect("HOLDING", Duration::from_secs(30));
    let mut survivor = spawn(TEST, "waiter", "survivor", &vars, &[]);
    survivor.expect("READY", Duration::from_secs(30));
    doomed.expect("DYING", Duration::from_secs(60));
    let status = doomed.wait(Duration::from_secs(30));
    let killed_at = Instant::now();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "the doomed host died of SIGKILL");
    let synced: Option<u64> = doomed
        .drain()
        .iter()
        .filter_map(|l| l.strip_prefix("SYNCED ").map(|n| n.parse().unwrap()))
        .max();

    survivor.expect("TAKEN", Duration::from_secs(20));
    let took = killed_at.elapsed();
    let dead_after = Duration::from_millis(8 * 200);
    eprintln!(
        "lock broken {took:?} after kill -9 ({:.2} x the dead-host timeout)",
        took.as_secs_f64() / dead_after.as_secs_f64()
    );
    assert!(
        took >= dead_after - Duration::from_millis(250),
        "lock broken after {took:?}, before the dead-host timeout"
    );
    assert!(
        took <= dead_after + Duration::from_millis(1200),
        "lock broken only after {took:?} (dead-host timeout {dead_after:?})"
    );
    survivor.expect("CLOSED", Duration::from_secs(20));
    assert!(survivor.wait(Duration::from_secs(20)).success());
    let log = survivor.stderr_text();
    let recovering = log
        .find("recovering a dead host")
        .unwrap_or_else(|| panic!("{log}"));
    let recovered = log
        .find("dead host recovered")
        .unwrap_or_else(|| panic!("{log}"));
    assert!(recovering < recovered, "{log}");
    assert!(log.contains("dead_host=doomed"), "{log}");
    let replayed: u64 = log[recovered..]
        .split("replayed=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        replayed > 0,
        "the dead host's journal had nothing to replay:\n{log}"
    );

    // Everything the dead host synced before the kill survived recovery, and so did the
    // rename it had only journaled.
    let ro = lun::open(
        &lun,
        &lun::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let ds = Datastore::open(ro, &OpenOptions::read_only()).unwrap();
    ds.stat_path("/churn/last-words")
        .expect("the journaled rename was replayed");
    assert!(ds.stat_path("/churn/g-0").is_err());
    for n in 1..=synced.unwrap_or(0) {
        let a = ds
            .stat_path(&format!("/churn/g-{n}"))
            .unwrap_or_else(|e| panic!("synced change {n} lost: {e}"));
        let mut b = vec![0u8; 5000];
        ds.read(a.ino, 0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == n as u8), "g-{n} content");
    }
    drop(ds);
    assert_fsck_clean(&lun);
}
