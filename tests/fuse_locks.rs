//! Two mounts of one datastore are two hosts of the cluster: a file one host holds open for
//! writing (exclusive, like a running VM's disk) cannot be opened for writing on the other,
//! which gets EBUSY and logs the holder; shared readers coexist; a read-only mount reads
//! while another host writes.
//!
//! These need vmfs to enforce locks across hosts (the cluster work of issue 4).
#![allow(clippy::unwrap_used)]

mod fuse_support;

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use fuse_support::{Fixture, Mounted, fuse_available, wait_until};

const HOST_A: &str = "6a1f2c3e-0000-4000-8000-00000000000a";
const HOST_B: &str = "6a1f2c3e-0000-4000-8000-00000000000b";

fn host(fx: &Fixture, name: &str, uuid: &str, extra: &[&str]) -> Mounted {
    let mut args = vec!["--host-name", name, "--host-uuid", uuid];
    args.extend_from_slice(extra);
    Mounted::new(fx, name, &args)
}

fn open_for_write(path: &Path) -> std::io::Result<File> {
    File::options().write(true).open(path)
}

/// Another host's change becomes visible after caches expire; wait for it, boundedly.
fn eventually(what: &str, cond: impl FnMut() -> bool) {
    wait_until(Duration::from_secs(10), what, cond);
}

#[test]
fn exclusive_holder_refuses_writers_on_other_hosts_and_shared_readers_coexist() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new("1G");
    let a = host(&fx, "host-a", HOST_A, &[]);
    let b = host(&fx, "host-b", HOST_B, &[]);
    assert_eq!(fx.live_hosts(), 2);

    std::fs::create_dir(a.path("vm")).unwrap();
    let data = vec![0x5au8; 3 << 20];
    let mut held = File::create(a.path("vm/disk.img")).unwrap();
    held.write_all(&data).unwrap();
    held.sync_all().unwrap();
    eventually("host b to see the file", || b.path("vm/disk.img").exists());

    // Host A holds it for writing: host B may not write, and says who holds it.
    let refused = open_for_write(&b.path("vm/disk.img")).unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EBUSY), "{refused}");
    let log = b.log_text();
    assert!(
        log.contains("EBUSY") && log.contains("host-a"),
        "holder not logged: {log}"
    );
    // Reading is still possible, and sees what A made durable.
    assert_eq!(std::fs::read(b.path("vm/disk.img")).unwrap(), data);

    // Once A closes, B can write, and then A is the one refused.
    drop(held);
    let mut held_b = None;
    eventually("host b to get the write lock", || {
        held_b = open_for_write(&b.path("vm/disk.img")).ok();
        held_b.is_some()
    });
    let refused = open_for_write(&a.path("vm/disk.img")).unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EBUSY));
    assert!(a.log_text().contains("host-b"));
    drop(held_b);

    // Read-only opens on both hosts together; a writer is refused while they read (B's own
    // reader does not stand in its way, A's does).
    let ra = File::open(a.path("vm/disk.img")).unwrap();
    let rb = File::open(b.path("vm/disk.img")).unwrap();
    let refused = open_for_write(&b.path("vm/disk.img")).unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EBUSY));
    drop((ra, rb));

    a.unmount();
    b.unmount();
    fx.assert_clean();
}

#[test]
fn read_only_mount_reads_while_another_host_writes() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new("1G");
    let a = host(&fx, "host-a", HOST_A, &[]);
    let ro = Mounted::new(&fx, "reader", &["--read-only"]);
    assert_eq!(fx.live_hosts(), 1);

    let mut f = File::create(a.path("log.txt")).unwrap();
    for round in 0..3u8 {
        f.write_all(&[b'a' + round; 100_000]).unwrap();
        f.sync_all().unwrap();
        let want = (round as usize + 1) * 100_000;
        eventually("the read-only mount to see the new data", || {
            std::fs::read(ro.path("log.txt"))
                .is_ok_and(|d| d.len() == want && d[want - 1] == b'a' + round && d[0] == b'a')
        });
    }
    drop(f);
    ro.unmount();
    a.unmount();
    fx.assert_clean();
}
