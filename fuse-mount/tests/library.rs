//! The library as the benchmarks and the `vapp` daemon use it: mount a datastore, serve it on
//! background threads, unmount, and find everything in the datastore afterwards.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use fuse_mount::{Error, MountOptions};
use lun::Lun;
use vmfs::{Datastore, FormatOptions, OpenOptions};

fn fuse_available() -> bool {
    lun::prereq::require(
        lun::prereq::have_device("/dev/fuse") && lun::prereq::is_root(),
        "/dev/fuse and root (mount(2))",
    )
}

fn datastore(path: &Path) -> Arc<dyn Lun> {
    let lun = lun::open(
        path.to_str().unwrap(),
        &lun::OpenOptions {
            create_size: Some(512 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    vmfs::format(
        lun.clone(),
        &FormatOptions {
            label: "library".into(),
            ..Default::default()
        },
    )
    .unwrap();
    lun
}

#[test]
fn mount_serve_unmount_and_the_data_is_in_the_datastore() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lun = datastore(&dir.path().join("ds.vmfs"));
    let mp = dir.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let ds = Datastore::open(lun.clone(), &OpenOptions::read_write()).unwrap();
    let options = MountOptions {
        source: "library-test".into(),
        threads: 2,
        ..Default::default()
    };
    let mounted = fuse_mount::mount(ds, &mp, &options)
        .unwrap()
        .spawn()
        .unwrap();
    let entry = fuse_mount::find_mount(&mp).unwrap().unwrap();
    assert_eq!(
        (entry.fstype.as_str(), entry.source.as_str()),
        (fuse_mount::FSTYPE, "library-test")
    );

    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::create_dir(mp.join("dir")).unwrap();
    std::fs::write(mp.join("dir/file"), &data).unwrap();
    assert_eq!(std::fs::read(mp.join("dir/file")).unwrap(), data);

    // A second mount on the same point is refused, and closes the datastore it was given.
    let again = Datastore::open(lun.clone(), &OpenOptions::read_only()).unwrap();
    match fuse_mount::mount(again, &mp, &options) {
        Err(Error::MountpointBusy { what, .. }) => assert!(what.contains("library-test"), "{what}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("mounted twice on one mount point"),
    }

    mounted.unmount().unwrap();
    assert!(fuse_mount::find_mount(&mp).unwrap().is_none());
    let ds = Datastore::open(lun, &OpenOptions::read_only()).unwrap();
    let attr = ds.stat_path("/dir/file").unwrap();
    let mut back = vec![0u8; data.len()];
    assert_eq!(ds.read(attr.ino, 0, &mut back).unwrap(), data.len());
    assert_eq!(back, data);
}

#[test]
fn dropping_a_background_mount_unmounts_it() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lun = datastore(&dir.path().join("ds.vmfs"));
    let mp = dir.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let ds = Datastore::open(lun.clone(), &OpenOptions::read_write()).unwrap();
    let mounted = fuse_mount::mount(ds, &mp, &MountOptions::default())
        .unwrap()
        .spawn()
        .unwrap();
    let held = std::fs::File::create(mp.join("open-at-drop")).unwrap();
    drop(mounted);
    assert!(
        fuse_mount::find_mount(&mp).unwrap().is_none(),
        "still mounted after drop"
    );
    drop(held);
    // The datastore was closed: a read-write open finds no live host left behind.
    let ds = Datastore::open(lun, &OpenOptions::read_write()).unwrap();
    let live = ds
        .info()
        .unwrap()
        .hosts
        .iter()
        .filter(|h| h.state == "live")
        .count();
    assert_eq!(live, 1, "only this open should be live");
    ds.close().unwrap();
}
