//! Bad input gets a clear error naming the object and changes nothing.

mod common;

use std::sync::Arc;

use common::*;
use lun::{FileLun, Lun};
use replication::{Geometry, LinkPolicy, LocalPeer, PrimaryLun, ReplError, Secondary};

const MIB: u64 = 1 << 20;

#[test]
fn metadata_that_is_too_small_exists_or_belongs_to_another_lun_is_refused() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let replica = file_lun(dir.path(), "b.img", 4 * MIB);
    let tiny = file_lun(dir.path(), "tiny.meta", 8192);
    match Secondary::create(replica.clone(), tiny.clone(), None, small_geometry()) {
        Err(e @ ReplError::MetadataTooSmall { .. }) => {
            assert!(e.to_string().contains("tiny.meta"), "{e}")
        }
        other => panic!("expected too small, got {other:?}"),
    }
    assert!(
        read_all(&*tiny).iter().all(|&b| b == 0),
        "a refused format wrote"
    );

    let bad = Geometry {
        region_size: 3000,
        ..small_geometry()
    };
    let meta = meta_lun(dir.path(), "b.meta", 4 * MIB);
    assert!(matches!(
        Secondary::create(replica.clone(), meta.clone(), None, bad),
        Err(ReplError::BadConfig { .. })
    ));
    let b = Arc::new(
        Secondary::create(replica.clone(), meta.clone(), None, small_geometry())
            .expect("secondary"),
    );
    let formatted = read_all(&*meta);
    assert!(matches!(
        Secondary::create(replica.clone(), meta.clone(), None, small_geometry()),
        Err(ReplError::AlreadyFormatted { .. })
    ));
    assert_eq!(
        read_all(&*meta),
        formatted,
        "a refused format changed the metadata"
    );

    // A primary's metadata opened on a LUN of another size.
    let local = file_lun(dir.path(), "a.img", 4 * MIB);
    let ameta = meta_lun(dir.path(), "a.meta", 4 * MIB);
    drop(
        PrimaryLun::create(
            local,
            ameta.clone(),
            Box::new(LocalPeer::new(b.clone())),
            small_geometry(),
            LinkPolicy::Continue,
        )
        .expect("primary"),
    );
    let other = file_lun(dir.path(), "other.img", 2 * MIB);
    let before = read_all(&*ameta);
    match PrimaryLun::open(
        other,
        ameta.clone(),
        Box::new(LocalPeer::new(b.clone())),
        LinkPolicy::Continue,
    ) {
        Err(e @ ReplError::BadConfig { .. }) => assert!(e.to_string().contains("other.img"), "{e}"),
        other => panic!("expected a size mismatch, got {other:?}"),
    }
    // A primary's metadata is not a secondary's.
    assert!(matches!(
        Secondary::open(replica, ameta.clone(), None),
        Err(ReplError::WrongState { .. })
    ));
    assert_eq!(
        read_all(&*ameta),
        before,
        "a refused open changed the metadata"
    );
    // Garbage is not metadata.
    let junk: Arc<dyn Lun> =
        Arc::new(FileLun::create(&dir.path().join("junk.meta"), MIB).expect("junk"));
    junk.write_at(&vec![0xab; MIB as usize], 0)
        .expect("fill junk");
    assert!(matches!(
        PrimaryLun::open(
            file_lun(dir.path(), "c.img", 4 * MIB),
            junk,
            Box::new(LocalPeer::new(b)),
            LinkPolicy::Continue
        ),
        Err(ReplError::BadMetadata { .. })
    ));
}
