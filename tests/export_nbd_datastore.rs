//! A datastore whose LUN is an NBD export of a server we did not write: qemu-nbd and
//! nbdkit serve a plain file, and the `vapp` commands reach it through `nbd+unix://`.
//! Formatting, files in and out (same sha256), fsck, several clients at once, and a
//! virtual disk on that datastore exported onwards by `vapp export` while others read.
#![allow(clippy::unwrap_used)]

mod export_support;

use std::path::Path;

use export_support::{Datastore, Peer, assert_same, random_bytes, require_tools, run, sha256};

const MIB: u64 = 1 << 20;

fn backing_file(dir: &Path) -> std::path::PathBuf {
    let file = dir.join("lun.raw");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(256 * MIB)
        .unwrap();
    file
}

/// What every peer must support: format, put/get, fsck, two readers at once.
fn datastore_lives_on(peer: &Peer, backing: &Path) {
    let ds = Datastore::format_on(&peer.url);
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::open(backing).unwrap(), &mut magic).unwrap();
    assert_eq!(&magic, b"VMSB", "the format did not reach the peer's file");

    let dir = tempfile::tempdir().unwrap();
    let big = random_bytes(5 * MIB as usize + 1234, 11);
    let small = b"hello from a datastore on NBD\n".to_vec();
    ds.ok(&["mkdir", "/files"]);
    for (name, data) in [("big.bin", &big), ("small.txt", &small)] {
        let local = dir.path().join(name);
        std::fs::write(&local, data).unwrap();
        ds.ok(&["put", local.to_str().unwrap(), &format!("/files/{name}")]);
    }
    for (name, data) in [("big.bin", &big), ("small.txt", &small)] {
        let back = ds.get(&format!("/files/{name}"));
        assert_eq!(sha256(&back), sha256(data), "{name} came back different");
    }
    ds.assert_clean();

    // Two clients at once, each with its own connections to the peer.
    let listing = ds.ok(&["ls", "-l", "/files"]);
    assert!(
        listing.contains("big.bin") && listing.contains("small.txt"),
        "{listing}"
    );
    std::thread::scope(|scope| {
        let readers: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    for _ in 0..3 {
                        assert_eq!(ds.ok(&["ls", "-l", "/files"]), listing);
                        assert!(ds.get("/files/big.bin") == big, "a reader got other bytes");
                    }
                })
            })
            .collect();
        for reader in readers {
            reader.join().unwrap();
        }
    });
}

#[test]
fn a_datastore_on_qemu_nbd() {
    if !require_tools(&[("qemu-nbd", "qemu-utils")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = backing_file(dir.path());
    let peer = Peer::qemu_nbd(&backing, &dir.path().join("qemu-nbd.sock"));
    datastore_lives_on(&peer, &backing);
}

#[test]
fn a_datastore_on_nbdkit() {
    if !require_tools(&[("nbdkit", "nbdkit")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = backing_file(dir.path());
    let peer = Peer::nbdkit(&backing, &dir.path().join("nbdkit.sock"));
    datastore_lives_on(&peer, &backing);
}

/// qemu-nbd → datastore → `vapp export` of a disk on it → qemu-io: one host writes the
/// disk through the chain while other clients read the datastore.
#[test]
fn a_disk_on_a_datastore_on_qemu_nbd_is_exported_onwards() {
    if !require_tools(&[("qemu-nbd", "qemu-utils"), ("qemu-io", "qemu-utils")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = backing_file(dir.path());
    let peer = Peer::qemu_nbd(&backing, &dir.path().join("qemu-nbd.sock"));
    let ds = Datastore::format_on(&peer.url);
    let disk = "/vms/a/disk.vdisk";
    ds.vdisk(disk, 16 * MIB, false);
    let note = dir.path().join("note.txt");
    std::fs::write(&note, "unchanged while the disk is written\n").unwrap();
    ds.ok(&["put", note.to_str().unwrap(), "/vms/note.txt"]);

    let socket = dir.path().join("disk.sock");
    let export = ds
        .export(1, disk, &["--socket", socket.to_str().unwrap()])
        .unwrap();
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            run(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0x5a 0 6M",
                    "-c",
                    "write -P 0xa5 10M 2M",
                    "-c",
                    "flush",
                    &export.url,
                ],
            )
        });
        while !writer.is_finished() {
            assert!(ds.ok(&["ls", "/"]).contains("vms"));
            assert_eq!(
                ds.ok(&["cat", "/vms/note.txt"]),
                "unchanged while the disk is written\n"
            );
        }
        let out = writer.join().unwrap();
        assert!(out.contains("wrote 2097152/2097152"), "{out}");
    });
    export.stop();

    let mut expected = vec![0u8; 16 * MIB as usize];
    expected[..6 * MIB as usize].fill(0x5a);
    expected[10 * MIB as usize..12 * MIB as usize].fill(0xa5);
    assert_same(
        &ds.get(disk),
        &expected,
        "the disk written through two NBD hops",
    );
    ds.assert_no_live_host();
    ds.assert_clean();
}

/// A datastore export whose host loses its LUN (the NBD server stops answering) fences
/// itself and exits with an error naming the fence, instead of serving EIO forever; once
/// the LUN is back, another host recovers it and exports the disk.
#[test]
fn an_export_whose_host_fences_itself_exits() {
    if !require_tools(&[("qemu-nbd", "qemu-utils")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = backing_file(dir.path());
    let peer = Peer::qemu_nbd(&backing, &dir.path().join("qemu-nbd.sock"));
    let ds = Datastore::format_on(&peer.url);
    let disk = "/vms/a/disk.vdisk";
    ds.vdisk(disk, 16 * MIB, false);
    let socket = dir.path().join("disk.sock");
    let mut export = ds
        .export(1, disk, &["--socket", socket.to_str().unwrap()])
        .unwrap();

    peer.signal(libc::SIGSTOP);
    let stopped = std::time::Instant::now();
    let status = export.wait(std::time::Duration::from_secs(30));
    let exited_after = stopped.elapsed();
    peer.signal(libc::SIGCONT);
    assert!(!status.success(), "a fenced export exited with {status}");
    let log = export.stderr_text();
    assert!(
        log.contains("fenced itself") && log.contains(disk),
        "the export's error does not say it fenced: {log}"
    );
    eprintln!("LUN stopped answering at 0; the export exited after {exited_after:?}");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    let second = loop {
        match ds.export(2, disk, &["--socket", socket.to_str().unwrap()]) {
            Ok(export) => break export,
            Err(why) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no other host could export the disk of the fenced one: {why}"
                );
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
    };
    second.stop();
    ds.assert_clean();
}

/// Closing its own connections is not a lost connection: commands on a datastore served by
/// qemu-nbd (which closes at once on a disconnect request) print nothing on stderr.
#[test]
fn commands_on_qemu_nbd_print_no_warning_when_they_close_their_connections() {
    if !require_tools(&[("qemu-nbd", "qemu-utils")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = backing_file(dir.path());
    let peer = Peer::qemu_nbd(&backing, &dir.path().join("qemu-nbd.sock"));
    let ds = Datastore::format_on(&peer.url);
    // The race between our disconnect and the server's close is lost most of the time, but
    // not every time: a few commands of each kind.
    for i in 0..4 {
        let dir = format!("/d{i}");
        for args in [&["mkdir", dir.as_str()][..], &["ls", "/"], &["stat", &dir]] {
            let out = ds.vapp(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "vapp {args:?}: {stderr}");
            assert!(stderr.is_empty(), "vapp {args:?} printed: {stderr}");
        }
    }
}
