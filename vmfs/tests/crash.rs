//! Crash consistency: run a mixed workload on a fault-injecting LUN that loses power after
//! the k-th write, for every k; remount (journal replay, orphan cleanup), then fsck must be
//! clean and every file synced before the crash must be intact. A put is all or nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::sync::Arc;

use common::*;
use lun::Lun;
use lun::fault::{CrashMode, FaultLun};
use vmfs::{Datastore, FormatOptions, Kind, NewFile, ROOT_INO};

type Durable = BTreeMap<String, Vec<u8>>;
type Phase<'a> = &'a dyn Fn(&Datastore, &str, &mut Durable) -> vmfs::Result<()>;

fn fresh() -> TestDs {
    fresh_of(96 << 20)
}

fn fresh_of(size: u64) -> TestDs {
    TestDs::in_memory(
        size,
        FormatOptions {
            label: "crash".into(),
            block_size: 64 << 10,
            max_files: Some(1024),
            journal_size: Some(1 << 20),
            // No heartbeat renewal or background commit during the workload: every run
            // issues the same writes, so "crash after write k" means the same thing.
            io_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        },
    )
}

/// The workload, in phases. Each phase touches only its own directory, then syncs; the
/// files of every synced phase are recorded in `durable`. Stops at the first error (after
/// the crash point the LUN serves stale data and the datastore may refuse it).
fn workload(lun: Arc<FaultLun>, durable: &mut Durable) -> vmfs::Result<()> {
    let ds = Datastore::open(lun.clone(), &host())?;
    let phases: [Phase<'_>; 4] = [
        &|ds, dir, out| {
            // Small files of every storage kind: inline, sub-block, blocks.
            for (i, size) in [0usize, 100, 5000, 70_000, 200_000].into_iter().enumerate() {
                let path = format!("{dir}/f{i}");
                let a = ds.create_path(&path, &NewFile::default())?;
                let data = pattern(size, i as u64);
                ds.write(a.ino, 0, &data)?;
                out.insert(path, data);
            }
            Ok(())
        },
        &|ds, dir, out| {
            // Overwrite, extend, truncate, rename over, unlink.
            let a = ds.create_path(&format!("{dir}/grow"), &NewFile::default())?;
            let mut data = pattern(3000, 9);
            ds.write(a.ino, 0, &data)?;
            let more = pattern(150_000, 10);
            ds.write(a.ino, 1000, &more)?;
            data.resize(1000, 0);
            data.extend_from_slice(&more);
            ds.truncate(a.ino, 90_000)?;
            data.truncate(90_000);
            let b = ds.create_path(&format!("{dir}/victim"), &NewFile::default())?;
            ds.write(b.ino, 0, &pattern(80_000, 11))?;
            ds.rename_path(&format!("{dir}/grow"), &format!("{dir}/victim"))?;
            out.insert(format!("{dir}/victim"), data);
            let c = ds.create_path(&format!("{dir}/gone"), &NewFile::default())?;
            ds.write(c.ino, 0, &pattern(100_000, 12))?;
            ds.remove_path(&format!("{dir}/gone"), false)?;
            // A FIFO, a device node, and a symlink whose target needs a sub-block (its
            // target reads back as the link's data).
            let d = ds.resolve(dir)?;
            ds.mknod(d, OsStr::new("fifo"), Kind::Fifo, 0o644, 0, creds())?;
            ds.mknod(d, OsStr::new("null"), Kind::CharDevice, 0o666, 259, creds())?;
            out.insert(format!("{dir}/fifo"), Vec::new());
            out.insert(format!("{dir}/null"), Vec::new());
            let target = "./".repeat(2000) + "victim";
            ds.symlink(d, OsStr::new("long"), OsStr::new(&target), creds())?;
            out.insert(format!("{dir}/long"), target.into_bytes());
            Ok(())
        },
        &|ds, dir, out| {
            // A thin virtual disk written sparsely through its LUN view, and many entries.
            ds.create_vdisk(&format!("{dir}/disk.vdisk"), 4 << 20, false, creds())?;
            let disk = ds.open_lun(&format!("{dir}/disk.vdisk"), vmfs::Access::Exclusive)?;
            let mut model = vec![0u8; 4 << 20];
            for (k, off) in [0u64, 65536 * 3, 4096 * 333].into_iter().enumerate() {
                let data = pattern(8192, 20 + k as u64);
                disk.write_at(&data, off).map_err(vmfs::Error::from)?;
                model[off as usize..off as usize + 8192].copy_from_slice(&data);
            }
            disk.flush().map_err(vmfs::Error::from)?;
            drop(disk);
            out.insert(format!("{dir}/disk.vdisk"), model);
            let d = ds.resolve(dir)?;
            for i in 0..40 {
                ds.create(
                    d,
                    OsStr::new(&format!("entry-with-a-longish-name-{i}")),
                    &NewFile::default(),
                )?;
            }
            for i in 0..40 {
                out.insert(format!("{dir}/entry-with-a-longish-name-{i}"), Vec::new());
            }
            Ok(())
        },
        &|ds, dir, out| {
            let a = ds.create_path(
                &format!("{dir}/thick"),
                &NewFile {
                    thick: true,
                    ..Default::default()
                },
            )?;
            ds.truncate(a.ino, 300_000)?;
            let data = pattern(1000, 30);
            ds.write(a.ino, 5000, &data)?;
            let mut model = vec![0u8; 300_000];
            model[5000..6000].copy_from_slice(&data);
            out.insert(format!("{dir}/thick"), model);
            ds.rmdir(ROOT_INO, OsStr::new("p1")).ok(); // not empty: refused, changes nothing
            Ok(())
        },
    ];
    for (n, phase) in phases.iter().enumerate() {
        let dir = format!("/p{n}");
        ds.mkdir_path(&dir, 0o755, creds())?;
        let mut files = Durable::new();
        phase(&ds, &dir, &mut files)?;
        ds.sync()?;
        // A sync the power cut interrupted promised nothing.
        if !lun.crashed() {
            durable.extend(files);
        }
    }
    ds.close()
}

fn check_after_crash(t: &TestDs, durable: &Durable, what: &str) {
    let ds =
        Datastore::open(t.lun(), &host()).unwrap_or_else(|e| panic!("{what}: remount failed: {e}"));
    for (path, data) in durable {
        let attr = ds
            .stat_path(path)
            .unwrap_or_else(|e| panic!("{what}: synced file lost: {e}"));
        assert_eq!(attr.size, data.len() as u64, "{what}: {path} size");
        let mut back = vec![0u8; data.len()];
        ds.read(attr.ino, 0, &mut back).unwrap();
        assert!(back == *data, "{what}: {path} content differs");
    }
    ds.close().unwrap();
    let report = vmfs::fsck(t.lun_ro(), &vmfs::FsckOptions::default()).unwrap();
    assert!(
        report.clean,
        "{what}: fsck after remount: {:#?}",
        report.findings
    );
}

fn crash_everywhere(mode: CrashMode, tear: bool) {
    // Count the workload's writes once, without a crash.
    let t = fresh();
    let counter = Arc::new(FaultLun::new(t.lun()));
    let mut all = Durable::new();
    workload(counter.clone(), &mut all).unwrap();
    let total = counter.writes();
    assert!(total > 50, "workload too small: {total} writes");
    check_after_crash(&t, &all, "no crash");

    for k in 0..total {
        let t = fresh();
        let fault = Arc::new(FaultLun::new(t.lun()));
        fault.set_crash_mode(mode);
        fault.tear_writes(tear);
        fault.crash_after_writes(k);
        let mut durable = Durable::new();
        let _ = workload(fault.clone(), &mut durable);
        assert!(fault.crashed(), "crash point {k} of {total} not reached");
        check_after_crash(
            &t,
            &durable,
            &format!("{mode:?} tear={tear}, crash after write {k} of {total}"),
        );
    }
}

#[test]
fn crash_after_every_write_keeping_earlier_writes() {
    crash_everywhere(CrashMode::DropLater, true);
}

#[test]
fn crash_after_every_write_losing_the_volatile_cache() {
    crash_everywhere(CrashMode::DropUnflushed, false);
}

/// `Datastore::put`'s copy chunk.
const PUT_CHUNK: usize = 8 << 20;

fn put_old() -> Vec<u8> {
    pattern(50_000, 40)
}

fn put_new() -> Vec<u8> {
    pattern(PUT_CHUNK + 200_000, 41)
}

/// Input for a put that commits the datastore once the copy is past its first chunk, so a
/// crash can fall between two committed parts of one put.
struct SyncingReader<'a> {
    ds: &'a Datastore,
    data: Vec<u8>,
    at: usize,
}

impl std::io::Read for SyncingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at == PUT_CHUNK {
            self.ds.sync().map_err(std::io::Error::other)?;
        }
        let end = if self.at < PUT_CHUNK {
            PUT_CHUNK
        } else {
            self.data.len()
        };
        let n = buf.len().min(end - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Puts a new file and one over a synced file, each in two committed parts.
fn put_workload(lun: Arc<FaultLun>) -> vmfs::Result<()> {
    let ds = Datastore::open(lun, &host())?;
    ds.mkdir_path("/p", 0o755, creds())?;
    let a = ds.create_path("/p/old", &NewFile::default())?;
    ds.write(a.ino, 0, &put_old())?;
    ds.sync()?;
    // Exists only if the sync above returned: then "old" is whole.
    ds.create_path("/p/old-synced", &NewFile::default())?;
    let options = vmfs::PutOptions {
        overwrite: true,
        ..Default::default()
    };
    for name in ["new", "old"] {
        let mut input = SyncingReader {
            ds: &ds,
            data: put_new(),
            at: 0,
        };
        ds.put(&mut input, &format!("/p/{name}"), &options, &mut |_| {})?;
    }
    ds.close()
}

/// After the remount: each target holds its old file (or none) or the whole new one, no
/// temporary file is left, and fsck is clean.
fn check_puts(t: &TestDs, what: &str) {
    let ds =
        Datastore::open(t.lun(), &host()).unwrap_or_else(|e| panic!("{what}: remount failed: {e}"));
    if let Ok(entries) = ds.list("/p") {
        for (name, _) in &entries {
            assert!(
                !name.to_string_lossy().contains(".vapp-put."),
                "{what}: {name:?} survived the remount"
            );
        }
        let synced = ds.stat_path("/p/old-synced").is_ok();
        for (path, before) in [("/p/new", None), ("/p/old", Some(put_old()))] {
            if path == "/p/old" && !synced {
                continue;
            }
            let Ok(attr) = ds.stat_path(path) else {
                assert!(before.is_none(), "{what}: {path} is gone");
                continue;
            };
            let mut back = vec![0u8; attr.size as usize];
            ds.read(attr.ino, 0, &mut back).unwrap();
            assert!(
                back == put_new() || Some(&back) == before.as_ref(),
                "{what}: {path} holds {} bytes of neither version",
                back.len()
            );
        }
    }
    ds.close().unwrap();
    let report = vmfs::fsck(t.lun_ro(), &vmfs::FsckOptions::default()).unwrap();
    assert!(
        report.clean,
        "{what}: fsck after remount: {:#?}",
        report.findings
    );
}

/// A put is all or nothing wherever the power is cut, and recovery removes its temporary
/// file. Most of a put's writes are data blocks, alike for this purpose: the crash points
/// are sampled (about 16 of some 350 writes, in both crash modes) to keep the test short.
#[test]
fn put_is_all_or_nothing_wherever_the_power_is_cut() {
    // Room for two copies of the new file and the old one.
    let fresh = || fresh_of(128 << 20);
    let t = fresh();
    let counter = Arc::new(FaultLun::new(t.lun()));
    put_workload(counter.clone()).unwrap();
    let total = counter.writes();
    check_puts(&t, "no crash");
    for mode in [CrashMode::DropLater, CrashMode::DropUnflushed] {
        for k in (0..total).step_by((total / 16).max(1) as usize) {
            let t = fresh();
            let fault = Arc::new(FaultLun::new(t.lun()));
            fault.set_crash_mode(mode);
            fault.crash_after_writes(k);
            let _ = put_workload(fault.clone());
            check_puts(&t, &format!("{mode:?}, crash after write {k} of {total}"));
        }
    }
}
