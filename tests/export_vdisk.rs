//! `vapp -d DATASTORE export PATH`: a virtual disk of a datastore served over NBD. Tools we
//! did not write (qemu-img, qemu-io) read exactly the disk's bytes and their writes land
//! in the datastore; the export holds the disk's lock against other hosts; TRIM gives thin
//! blocks back; a server killed mid-write loses nothing it flushed and leaves the datastore
//! clean.
#![allow(clippy::unwrap_used)]

mod export_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use export_support::{Datastore, Export, assert_same, random_bytes, require_tools, run};
use lun::{Lun, LunError, LunSpec, NbdLun, NbdOptions, NbdTarget};

const MIB: u64 = 1 << 20;
const DISK: &str = "/vms/x/disk.vdisk";

/// Our client, with its NBD-specific calls (trim, what was negotiated).
fn nbd_client(url: &str) -> NbdLun {
    let (target, export) = match LunSpec::parse(url).unwrap() {
        LunSpec::NbdTcp { host, port, export } => (NbdTarget::Tcp { host, port }, export),
        LunSpec::NbdUnix { socket, export } => (NbdTarget::Unix(socket), export),
        LunSpec::Path(_) => panic!("{url} is not an NBD URL"),
    };
    NbdLun::connect(target, &export, NbdOptions::default()).unwrap()
}

fn listen() -> [&'static str; 2] {
    ["--listen", "127.0.0.1:0"]
}

#[test]
fn qemu_tools_read_the_disk_and_their_writes_land_in_the_datastore() {
    if !require_tools(&[("qemu-img", "qemu-utils"), ("qemu-io", "qemu-utils")]) {
        return;
    }
    let ds = Datastore::format("1G");
    let size = 24 * MIB;
    ds.vdisk(DISK, size, false);

    // Some data through our own client, leaving most of the thin disk unallocated.
    let mut expected = vec![0u8; size as usize];
    let export = ds.export(1, DISK, &listen()).unwrap();
    let client = lun::open(&export.url, &Default::default()).unwrap();
    for (at, len, seed) in [
        (0, 3 * MIB, 1),
        (9 * MIB + 4096, 512 * 1024, 2),
        (size - MIB, MIB, 3),
    ] {
        let data = random_bytes(len as usize, seed);
        client.write_at(&data, at).unwrap();
        expected[at as usize..(at + len) as usize].copy_from_slice(&data);
    }
    client.flush().unwrap();
    drop(client);
    export.stop();
    let stored = ds.get(DISK);
    assert_same(
        &stored,
        &expected,
        "vapp get after writes through the export",
    );

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("disk.sock");
    let export = ds
        .export(
            1,
            DISK,
            &["--socket", socket.to_str().unwrap(), "--name", "disk"],
        )
        .unwrap();
    let info = run("qemu-img", &["info", "--output=json", &export.url]);
    assert!(
        info.contains(&format!("\"virtual-size\": {size}")),
        "{info}"
    );
    let copy = dir.path().join("copy.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &export.url,
            copy.to_str().unwrap(),
        ],
    );
    assert_same(
        &std::fs::read(&copy).unwrap(),
        &stored,
        "qemu-img convert vs vapp get",
    );

    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 20000 3000",
            "-c",
            "write -P 0xef 16M 64k",
            "-c",
            "flush",
            &export.url,
        ],
    );
    assert!(out.contains("wrote 3000/3000"), "{out}");
    export.stop();
    expected[..MIB as usize].fill(0xab);
    expected[20000..23000].fill(0xcd);
    expected[16 * MIB as usize..(16 * MIB + 65536) as usize].fill(0xef);
    assert_same(&ds.get(DISK), &expected, "qemu-io writes seen through vmfs");
    let cat = ds.vapp(&["cat", DISK]);
    assert!(cat.status.success());
    assert_same(&cat.stdout, &expected, "vapp cat after qemu-io");

    // Every stop released the lock and the host slot, with the journal committed.
    ds.assert_no_live_host();
    ds.assert_clean();
}

#[test]
fn a_disk_in_use_is_not_exported_again_and_the_refusal_names_the_holder() {
    let ds = Datastore::format("1G");
    ds.vdisk(DISK, 4 * MIB, false);

    let writer = ds.export(1, DISK, &listen()).unwrap();
    for args in [&listen()[..], &["--listen", "127.0.0.1:0", "--read-only"]] {
        let refusal = ds.export(2, DISK, args).err().unwrap_or_else(|| {
            panic!("a second host exported {DISK} {args:?} while host 1 had it open")
        });
        assert!(
            refusal.contains(DISK) && refusal.contains("test-host-1"),
            "the refusal must name the disk and its holder: {refusal}"
        );
    }
    // The writer was not disturbed.
    let client = lun::open(&writer.url, &Default::default()).unwrap();
    client.write_at(&[0x42u8; 4096], 0).unwrap();
    client.flush().unwrap();
    drop(client);
    writer.stop();

    // Readers share the disk, and together keep writers out.
    let readers: Vec<Export> = [2, 3]
        .into_iter()
        .map(|n| {
            ds.export(n, DISK, &["--listen", "127.0.0.1:0", "--read-only"])
                .unwrap()
        })
        .collect();
    for reader in &readers {
        let client = nbd_client(&reader.url);
        assert!(client.info().read_only);
        let mut buf = vec![0u8; 4096];
        client.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0x42), "a reader sees other bytes");
        assert!(matches!(
            client.write_at(&buf, 0),
            Err(LunError::ReadOnly { .. })
        ));
    }
    let refusal = ds.export(1, DISK, &listen()).err().unwrap_or_else(|| {
        panic!("host 1 exported {DISK} for writing while two hosts had it read-only")
    });
    assert!(refusal.contains("test-host-"), "{refusal}");
    for reader in readers {
        reader.stop();
    }
    ds.assert_no_live_host();
    ds.assert_clean();
}

#[test]
fn trim_frees_whole_blocks_of_a_thin_disk_only() {
    let ds = Datastore::format("1G");
    ds.vdisk(DISK, 8 * MIB, false);
    let thick = "/vms/x/thick.vdisk";
    ds.vdisk(thick, 2 * MIB, true);

    let export = ds.export(1, DISK, &listen()).unwrap();
    let client = nbd_client(&export.url);
    assert!(client.info().can_trim, "a thin disk's export takes trims");
    let mut expected = random_bytes(8 * MIB as usize, 7);
    client.write_at(&expected, 0).unwrap();
    client.flush().unwrap();
    // Two whole 1 MiB blocks inside, ragged 4 KiB edges on either side.
    client.trim(MIB - 4096, 2 * MIB + 8192).unwrap();
    client.flush().unwrap();
    expected[MIB as usize..3 * MIB as usize].fill(0);
    let mut back = vec![0u8; 8 * MIB as usize];
    client.read_at(&mut back, 0).unwrap();
    assert_same(&back, &expected, "read back after the trim");
    drop(client);
    export.stop();
    assert_eq!(ds.stat(DISK)["allocated"], 6 * MIB, "two blocks given back");
    assert_same(&ds.get(DISK), &expected, "vapp get after the trim");

    // A thick disk keeps its blocks: no trim on offer, and write-zeroes writes zeroes.
    let export = ds.export(1, thick, &listen()).unwrap();
    let client = nbd_client(&export.url);
    assert!(
        !client.info().can_trim,
        "a thick disk's export must not take trims"
    );
    client.write_at(&vec![0x77u8; 2 * MIB as usize], 0).unwrap();
    client.write_zeroes(0, MIB).unwrap();
    client.flush().unwrap();
    drop(client);
    export.stop();
    assert_eq!(ds.stat(thick)["allocated"], 2 * MIB);
    let data = ds.get(thick);
    assert!(data[..MIB as usize].iter().all(|&b| b == 0));
    assert!(data[MIB as usize..].iter().all(|&b| b == 0x77));
    ds.assert_clean();
}

fn pattern(block: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&((block << 32) | i as u64 | (1 << 63)).to_le_bytes());
    }
    data
}

#[test]
fn killed_mid_write_keeps_every_flushed_write_and_the_datastore_clean() {
    const BLOCK: usize = 64 * 1024;
    const BLOCKS: u64 = 512;
    let ds = Datastore::format("1G");
    ds.vdisk(DISK, BLOCKS * BLOCK as u64, false);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("disk.sock");
    let args = ["--socket", socket.to_str().unwrap()];
    let mut export = ds.export(1, DISK, &args).unwrap();
    let client = Arc::new(lun::open(&export.url, &Default::default()).unwrap());

    // Thin: every 16th write allocates a block, so the kill lands among metadata updates.
    let flushed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (client, flushed) = (Arc::clone(&client), Arc::clone(&flushed));
        std::thread::spawn(move || -> LunError {
            for block in 0..BLOCKS {
                let at = block * BLOCK as u64;
                if let Err(error) = client.write_at(&pattern(block, BLOCK), at) {
                    return error;
                }
                if block % 4 == 3 {
                    if let Err(error) = client.flush() {
                        return error;
                    }
                    flushed.store(block + 1, Ordering::SeqCst);
                }
            }
            panic!("every write succeeded: the server was never killed");
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while flushed.load(Ordering::SeqCst) < 40 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer made no progress"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    export.signal(libc::SIGKILL);
    let error = writer.join().unwrap();
    assert!(
        matches!(error, LunError::Disconnected { .. }),
        "the client must report the lost server, got: {error}"
    );
    export.wait(Duration::from_secs(10));
    let flushed = flushed.load(Ordering::SeqCst);

    // The same host comes back on the same socket, replays its journal, and the client
    // reconnects by itself.
    let export = ds.export(1, DISK, &args).unwrap();
    let check = |read: &dyn Fn(u64, &mut [u8])| {
        let mut buf = vec![0u8; BLOCK];
        for block in 0..BLOCKS {
            read(block, &mut buf);
            if block < flushed {
                assert!(buf == pattern(block, BLOCK), "flushed block {block} lost");
            } else {
                assert!(
                    buf == pattern(block, BLOCK) || buf.iter().all(|&b| b == 0),
                    "block {block} holds neither its old nor its new contents"
                );
            }
        }
    };
    check(&|block, buf| client.read_at(buf, block * BLOCK as u64).unwrap());
    drop(client);
    export.stop();
    ds.assert_clean();
    ds.assert_no_live_host();
    let stored = ds.get(DISK);
    check(&|block, buf| {
        let at = block as usize * BLOCK;
        buf.copy_from_slice(&stored[at..at + BLOCK]);
    });
}

#[test]
fn bad_requests_are_refused_naming_the_object_and_change_nothing() {
    let ds = Datastore::format("1G");
    ds.vdisk(DISK, MIB, false);
    let odd = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(odd.path(), [1u8; 1000]).unwrap();
    ds.ok(&["put", odd.path().to_str().unwrap(), "/vms/x/odd.bin"]);

    for (path, needle) in [
        ("/vms/x/missing.vdisk", "/vms/x/missing.vdisk"),
        ("/vms/x", "directory"),
        ("/vms/x/odd.bin", "multiple of 512"),
    ] {
        let refusal = ds.export(1, path, &listen()).err().unwrap_or_else(|| {
            panic!("exporting {path} was accepted");
        });
        assert!(refusal.contains(needle), "exporting {path}: {refusal}");
        assert_eq!(refusal.trim_end().lines().count(), 1, "one line: {refusal}");
    }
    let refusal = ds
        .export(1, DISK, &["--socket", "/nonexistent/disk.sock"])
        .err()
        .unwrap();
    assert!(refusal.contains("/nonexistent/disk.sock"), "{refusal}");
    let missing = Datastore::existing("/nonexistent/ds.vmfs");
    let refusal = missing.export(1, DISK, &listen()).err().unwrap();
    assert!(refusal.contains("/nonexistent/ds.vmfs"), "{refusal}");

    // The failed attempts left no host mounted and nothing changed.
    ds.assert_no_live_host();
    ds.assert_clean();
    assert_eq!(ds.stat(DISK)["allocated"], 0);
}
