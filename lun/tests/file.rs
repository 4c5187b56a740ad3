//! The file backend: round trips through every engine and cache mode, geometry, bad input,
//! read-only LUNs, thin zeroing, engine selection.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use lun::{FileLun, IoEngine, IoRequest, Lun, LunError, OpenOptions};

const MIB: u64 = 1 << 20;

/// Every engine × cache mode the file backend offers.
const CONFIGS: [(IoEngine, bool); 4] = [
    (IoEngine::Sync, false),
    (IoEngine::Sync, true),
    (IoEngine::Uring, false),
    (IoEngine::Uring, true),
];

fn options(engine: IoEngine, direct: bool) -> OpenOptions {
    OpenOptions {
        engine,
        direct,
        ..OpenOptions::default()
    }
}

/// Creates a file LUN, or returns None (skipping) when io_uring is refused on this machine.
fn create(path: &Path, size: u64, options: &OpenOptions) -> Option<FileLun> {
    match FileLun::create_with(path, size, options) {
        Err(LunError::Open { reason, .. }) if reason.contains("io_uring") => {
            let _ = std::fs::remove_file(path);
            lun::prereq::require(false, &format!("io_uring: {reason}"));
            None
        }
        other => Some(other.unwrap()),
    }
}

/// Deterministic, position-dependent bytes so misplaced data is caught.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) as u8 ^ (i >> 9) as u8)
        .collect()
}

/// A copy of `data` at an odd address, which O_DIRECT cannot use without a bounce buffer.
fn misaligned_copy(data: &[u8]) -> (Vec<u8>, usize) {
    let mut storage = vec![0u8; data.len() + 1];
    storage[1..].copy_from_slice(data);
    (storage, 1)
}

#[test]
fn round_trips_in_every_engine_and_cache_mode() {
    for (engine, direct) in CONFIGS {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lun.img");
        let Some(lun) = create(&path, 16 * MIB, &options(engine, direct)) else {
            continue;
        };
        let what = format!("{engine} direct={direct}");
        assert_eq!(lun.io_engine(), engine, "{what}");
        assert_eq!(lun.is_direct(), direct, "{what}");
        assert_eq!(lun.size(), 16 * MIB, "{what}");
        assert_eq!(lun.sector_size(), 512, "{what}");

        // Small, medium, and larger than one bounce buffer (so cut into pieces under
        // O_DIRECT); the last ends at the last sector.
        let cases = [
            (0u64, 512usize),
            (4096, 8 * 512),
            (MIB + 512, 3 * MIB as usize + 4096),
            (16 * MIB - 512, 512),
        ];
        for (i, &(offset, len)) in cases.iter().enumerate() {
            let data = pattern(len, i as u64);
            lun.write_at(&data, offset).unwrap();
            let mut back = vec![0u8; len];
            lun.read_at(&mut back, offset).unwrap();
            assert!(back == data, "{what}: round trip at {offset}+{len}");

            // Unaligned caller memory must work too (bounced under O_DIRECT).
            let data = pattern(len, 100 + i as u64);
            let (storage, at) = misaligned_copy(&data);
            lun.write_at(&storage[at..], offset).unwrap();
            let mut storage = vec![0u8; len + 1];
            lun.read_at(&mut storage[1..], offset).unwrap();
            assert!(
                storage[1..] == data[..],
                "{what}: misaligned round trip at {offset}"
            );
        }
        lun.flush().unwrap();
        drop(lun);

        // The bytes are in the file itself.
        let on_disk = std::fs::read(&path).unwrap();
        let (offset, len) = cases[2];
        assert!(
            on_disk[offset as usize..offset as usize + len] == pattern(len, 102)[..],
            "{what}: file contents after reopen"
        );
        assert_eq!(on_disk.len() as u64, 16 * MIB);
    }
}

#[test]
fn submit_runs_mixed_batches_in_every_engine_and_cache_mode() {
    for (engine, direct) in CONFIGS {
        let dir = tempfile::tempdir().unwrap();
        let Some(lun) = create(&dir.path().join("lun"), 8 * MIB, &options(engine, direct)) else {
            continue;
        };
        let what = format!("{engine} direct={direct}");
        // More requests than the ring holds, laid out back to back, of mixed sizes; every
        // 50th is larger than one bounce buffer.
        let mut offset = 0;
        let writes: Vec<(u64, Vec<u8>)> = (0..150u64)
            .map(|i| {
                let len = if i % 50 == 0 { 1_200_128 } else { 4096 };
                let at = offset;
                offset += len as u64;
                (at, pattern(len, i))
            })
            .collect();
        assert!(offset <= lun.size());
        let mut batch: Vec<IoRequest<'_>> = writes
            .iter()
            .map(|(offset, data)| IoRequest::Write {
                buf: data,
                offset: *offset,
            })
            .collect();
        lun.submit(&mut batch).unwrap();

        let mut reads: Vec<Vec<u8>> = writes.iter().map(|(_, d)| vec![0u8; d.len()]).collect();
        let mut batch: Vec<IoRequest<'_>> = reads
            .iter_mut()
            .zip(&writes)
            .map(|(buf, (offset, _))| IoRequest::Read {
                buf,
                offset: *offset,
            })
            .collect();
        lun.submit(&mut batch).unwrap();
        for ((offset, data), back) in writes.iter().zip(&reads) {
            assert!(back == data, "{what}: batch read at {offset}");
        }
    }
}

#[test]
fn many_threads_share_one_lun() {
    for (engine, direct) in CONFIGS {
        let dir = tempfile::tempdir().unwrap();
        let Some(lun) = create(&dir.path().join("lun"), 8 * MIB, &options(engine, direct)) else {
            continue;
        };
        let lun = Arc::new(lun);
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let lun = Arc::clone(&lun);
                std::thread::spawn(move || {
                    // Each thread owns 1 MiB and checks every write it makes.
                    for round in 0..20u64 {
                        let offset = t * MIB + (round % 16) * 65536;
                        let data = pattern(65536, t * 1000 + round);
                        lun.write_at(&data, offset).unwrap();
                        let mut back = vec![0u8; data.len()];
                        lun.read_at(&mut back, offset).unwrap();
                        assert!(back == data, "thread {t} round {round}");
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
    }
}

#[test]
fn chosen_sector_size_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lun4k");
    let lun = FileLun::create_with(
        &path,
        MIB,
        &OpenOptions {
            sector_size: Some(4096),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(lun.sector_size(), 4096);
    let err = lun.write_at(&[7u8; 512], 0).unwrap_err();
    assert!(
        matches!(
            err,
            LunError::Misaligned {
                sector_size: 4096,
                ..
            }
        ),
        "{err}"
    );
    let err = lun.read_at(&mut [0u8; 4096], 512).unwrap_err();
    assert!(matches!(err, LunError::Misaligned { .. }), "{err}");
    lun.write_at(&[7u8; 4096], 4096).unwrap();
    let mut back = [0u8; 4096];
    lun.read_at(&mut back, 4096).unwrap();
    assert_eq!(back, [7u8; 4096]);

    // Reopened through lun::open with the same sector size.
    drop(lun);
    let lun = lun::open(
        path.to_str().unwrap(),
        &OpenOptions {
            sector_size: Some(4096),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(lun.sector_size(), 4096);
}

#[test]
fn bad_sector_sizes_and_lengths_are_refused_without_creating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("never");
    for sector_size in [0, 256, 1000, 3072, 128 * 1024] {
        let err = FileLun::create_with(
            &path,
            MIB,
            &OpenOptions {
                sector_size: Some(sector_size),
                ..OpenOptions::default()
            },
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("never") && msg.contains(&format!("sector size {sector_size}")),
            "{msg}"
        );
        assert!(!path.exists());
    }
    for size in [0, 1000, MIB + 1] {
        let err = FileLun::create(&path, size).unwrap_err();
        assert!(err.to_string().contains(&format!("size {size}")), "{err}");
        assert!(!path.exists());
    }
}

#[test]
fn misaligned_and_out_of_range_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lun");
    let lun = FileLun::create(&path, MIB).unwrap();
    let size = lun.size();
    let cases: [(u64, usize); 5] = [
        (100, 512),
        (0, 100),
        (size, 512),
        (size - 512, 1024),
        (u64::MAX - 511, 512),
    ];
    for (offset, len) in cases {
        let buf = vec![0xEEu8; len];
        let write = lun.write_at(&buf, offset).unwrap_err();
        let read = lun.read_at(&mut vec![0u8; len], offset).unwrap_err();
        let zero = lun.write_zeroes(offset, len as u64).unwrap_err();
        let batch = lun
            .submit(&mut [
                IoRequest::Write {
                    buf: &buf,
                    offset: 0,
                },
                IoRequest::Write { buf: &buf, offset },
            ])
            .unwrap_err();
        for err in [write, read, zero, batch] {
            let msg = err.to_string();
            assert!(
                msg.contains("lun") && msg.contains(&offset.to_string()),
                "{msg}"
            );
            if offset % 512 != 0 || len % 512 != 0 {
                assert!(matches!(err, LunError::Misaligned { .. }), "{msg}");
            } else {
                assert!(matches!(err, LunError::OutOfRange { .. }), "{msg}");
            }
        }
    }
    // Not even the valid first request of the refused batch was carried out.
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn read_only_luns_refuse_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lun");
    let data = pattern(4096, 9);
    FileLun::create(&path, MIB)
        .unwrap()
        .write_at(&data, 0)
        .unwrap();

    for (engine, direct) in CONFIGS {
        let opts = OpenOptions {
            read_only: true,
            ..options(engine, direct)
        };
        let lun = match FileLun::open_with(&path, &opts) {
            Err(LunError::Open { reason, .. }) if reason.contains("io_uring") => continue,
            other => other.unwrap(),
        };
        assert!(lun.is_read_only());
        assert!(!lun.supports_compare_and_write());
        let errors = [
            lun.write_at(&[1u8; 512], 0).unwrap_err(),
            lun.write_zeroes(0, 4096).unwrap_err(),
            lun.compare_and_write(&data[..512], &[1u8; 512], 0)
                .unwrap_err(),
            lun.submit(&mut [IoRequest::Write {
                buf: &[1u8; 512],
                offset: 512,
            }])
            .unwrap_err(),
        ];
        for err in errors {
            assert!(matches!(err, LunError::ReadOnly { .. }), "{err}");
            assert!(err.to_string().contains("read-only"), "{err}");
        }
        let mut back = vec![0u8; 4096];
        lun.read_at(&mut back, 0).unwrap();
        assert_eq!(back, data, "reads still work and nothing changed");
        lun.flush().unwrap();
    }
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn write_zeroes_keeps_files_sparse() {
    for (engine, direct) in CONFIGS {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("thin");
        let Some(lun) = create(&path, 256 * MIB, &options(engine, direct)) else {
            continue;
        };
        assert!(allocated_bytes(&path) < MIB, "a new LUN file is sparse");

        let data = pattern(8 * MIB as usize, 3);
        lun.write_at(&data, 64 * MIB).unwrap();
        lun.flush().unwrap();
        assert!(allocated_bytes(&path) >= 8 * MIB);

        // Zero the middle 6 MiB: only the edges stay allocated.
        lun.write_zeroes(65 * MIB, 6 * MIB).unwrap();
        let allocated = allocated_bytes(&path);
        assert!(
            allocated <= 2 * MIB + 64 * 1024,
            "{engine} direct={direct}: {allocated} bytes still allocated"
        );

        let mut back = vec![0xFFu8; 8 * MIB as usize];
        lun.read_at(&mut back, 64 * MIB).unwrap();
        assert!(back[..MIB as usize] == data[..MIB as usize]);
        assert!(back[MIB as usize..7 * MIB as usize].iter().all(|&b| b == 0));
        assert!(back[7 * MIB as usize..] == data[7 * MIB as usize..]);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            256 * MIB,
            "size kept"
        );
    }
}

#[test]
fn create_refuses_to_replace_and_open_refuses_non_luns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("existing");
    std::fs::write(&path, vec![5u8; 4096]).unwrap();
    let err = FileLun::create(&path, MIB).unwrap_err();
    assert!(err.to_string().contains("existing"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        vec![5u8; 4096],
        "left untouched"
    );

    let err = FileLun::open(dir.path(), false).unwrap_err();
    assert!(
        err.to_string()
            .contains("not a regular file or a block device"),
        "{err}"
    );
    let err = lun::open(dir.path().to_str().unwrap(), &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, LunError::Open { .. }), "{err}");

    let missing = dir.path().join("missing");
    let err = FileLun::open(&missing, false).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(!missing.exists());
}

#[test]
fn open_creates_sparse_files_and_reopens_existing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.lun");
    let spec = path.to_str().unwrap();
    let create = OpenOptions {
        create_size: Some(64 * MIB),
        ..OpenOptions::default()
    };
    let lun = lun::open(spec, &create).unwrap();
    assert_eq!(lun.size(), 64 * MIB);
    assert!(lun.name().starts_with("file:") && lun.name().ends_with("new.lun"));
    assert!(lun.supports_compare_and_write());
    lun.write_at(&[9u8; 512], 512).unwrap();
    drop(lun);
    assert!(allocated_bytes(&path) < MIB);

    // An existing file keeps its size and contents; create_size is only for absent paths.
    let again = lun::open(
        spec,
        &OpenOptions {
            create_size: Some(MIB),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(again.size(), 64 * MIB);
    let mut back = [0u8; 512];
    again.read_at(&mut back, 512).unwrap();
    assert_eq!(back, [9u8; 512]);
}

#[test]
fn a_partial_trailing_sector_is_not_part_of_the_lun() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd");
    std::fs::write(&path, vec![1u8; 5000]).unwrap();
    let lun = FileLun::open(&path, false).unwrap();
    assert_eq!(lun.size(), 4608);
    assert!(matches!(
        lun.read_at(&mut [0u8; 512], 4608),
        Err(LunError::OutOfRange { .. })
    ));
}

/// Role of this test binary when re-executed by `io_engine_env_var_is_honoured`.
const CHILD_ENV: &str = "LUN_TEST_ENGINE_CHILD";

#[test]
fn io_engine_env_var_is_honoured() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        // Child: VAPP_IO_ENGINE was set by the parent.
        let expect = std::env::var(lun::IO_ENGINE_ENV).unwrap();
        let result = FileLun::open(Path::new(&path), false);
        match expect.as_str() {
            "sync" => assert_eq!(result.unwrap().io_engine(), IoEngine::Sync),
            "uring" => assert_eq!(result.unwrap().io_engine(), IoEngine::Uring),
            _ => {
                let err = result.unwrap_err().to_string();
                assert!(
                    err.contains(lun::IO_ENGINE_ENV) && err.contains(&expect),
                    "{err}"
                );
            }
        }
        // An explicit engine in the options wins over the environment.
        let explicit = FileLun::open_with(Path::new(&path), &options(IoEngine::Sync, false));
        assert_eq!(explicit.unwrap().io_engine(), IoEngine::Sync);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lun");
    FileLun::create(&path, MIB).unwrap();
    for value in ["sync", "uring", "bogus"] {
        let output = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "io_engine_env_var_is_honoured", "--nocapture"])
            .env(CHILD_ENV, &path)
            .env(lun::IO_ENGINE_ENV, value)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "child with {}={value} failed:\n{}",
            lun::IO_ENGINE_ENV,
            String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Unmounts a test mount point even when the test fails.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn file_systems_without_direct_io_are_refused_clearly() {
    if !lun::prereq::require(lun::prereq::is_root(), "root (to mount a ramfs)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("mount")
        .args(["-t", "ramfs", "ramfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "mount -t ramfs");
    let _mount = Mount(dir.path().to_path_buf());
    let path = dir.path().join("lun");
    let err = FileLun::create_with(&path, MIB, &options(IoEngine::Auto, true)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("lun") && msg.contains("O_DIRECT"), "{msg}");
    assert!(!path.exists(), "the refused LUN file is not left behind");

    // Buffered I/O on the same file system is fine.
    let lun = FileLun::create(&path, MIB).unwrap();
    lun.write_at(&[3u8; 512], 0).unwrap();
}

#[test]
fn direct_io_works_where_the_kernel_does_not_report_its_alignment() {
    // tmpfs accepts O_DIRECT (Linux 6.6+) without answering STATX_DIOALIGN, so the
    // alignment comes from the fallback.
    let shm = Path::new("/dev/shm");
    let probe = tempfile::NamedTempFile::new_in(shm);
    let accepts_direct = probe.as_ref().is_ok_and(|file| {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(file.path())
            .is_ok()
    });
    if !lun::prereq::require(accepts_direct, "a tmpfs at /dev/shm that accepts O_DIRECT") {
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    for engine in [IoEngine::Sync, IoEngine::Uring] {
        let path = dir.path().join(format!("lun-{engine}"));
        let Some(lun) = create(&path, 4 * MIB, &options(engine, true)) else {
            continue;
        };
        assert!(lun.is_direct());
        assert_eq!(lun.sector_size(), 512);
        let data = pattern(3 * 4096, 77);
        let (storage, at) = misaligned_copy(&data);
        lun.write_at(&storage[at..], 4096).unwrap();
        let mut back = vec![0u8; data.len()];
        lun.submit(&mut [
            IoRequest::Read {
                buf: &mut back,
                offset: 4096,
            },
            IoRequest::Read {
                buf: &mut [0u8; 512],
                offset: 0,
            },
        ])
        .unwrap();
        assert_eq!(back, data);
    }
}

#[test]
fn io_errors_name_the_lun_and_the_failing_range() {
    for (engine, direct) in CONFIGS {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shrinking");
        let Some(lun) = create(&path, MIB, &options(engine, direct)) else {
            continue;
        };
        // Someone truncates the file behind the LUN's back: reads past the new end fail.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(MIB / 2)
            .unwrap();
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        let mut batch = [
            IoRequest::Read {
                buf: &mut a,
                offset: 0,
            },
            IoRequest::Read {
                buf: &mut b,
                offset: 3 * MIB / 4,
            },
        ];
        let err = lun.submit(&mut batch).unwrap_err();
        let what = format!("{engine} direct={direct}: {err}");
        assert!(
            matches!(&err, LunError::Io { offset, .. } if *offset == 3 * MIB / 4),
            "{what}"
        );
        assert!(err.to_string().contains("shrinking"), "{what}");
        assert_eq!(err.errno(), libc::EIO, "{what}");
    }
}

#[test]
fn a_sparse_file_tells_its_holes_from_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("thin");
    let lun = FileLun::create(&path, 64 * MIB).unwrap();
    lun.write_at(&pattern(MIB as usize, 5), 8 * MIB).unwrap();
    lun.flush().unwrap();
    assert!(
        !lun.may_hold_data(0, 8 * MIB).unwrap(),
        "a hole before the data"
    );
    assert!(
        lun.may_hold_data(0, 8 * MIB + 4096).unwrap(),
        "reaches the data"
    );
    assert!(
        lun.may_hold_data(8 * MIB + MIB / 2, 4096).unwrap(),
        "inside it"
    );
    assert!(
        !lun.may_hold_data(9 * MIB, 55 * MIB).unwrap(),
        "a hole to the end"
    );
    lun.write_zeroes(8 * MIB, MIB).unwrap();
    assert!(
        !lun.may_hold_data(0, 64 * MIB).unwrap(),
        "zeroed: all holes again"
    );
    assert!(
        lun.may_hold_data(0, 64 * MIB + 512).is_err(),
        "past the end"
    );
}
