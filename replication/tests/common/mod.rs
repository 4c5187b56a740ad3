#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use lun::{FileLun, Lun};
use replication::{Geometry, metadata_size};

pub const SECTOR: usize = 512;

/// A small geometry so tests see many regions and extents on a few MiB.
pub fn small_geometry() -> Geometry {
    Geometry {
        region_size: 64 * 1024,
        al_extent_size: 256 * 1024,
        al_capacity: 4,
    }
}

pub fn file_lun(dir: &Path, name: &str, size: u64) -> Arc<dyn Lun> {
    Arc::new(FileLun::create(&dir.join(name), size).expect("create file LUN"))
}

pub fn meta_lun(dir: &Path, name: &str, lun_size: u64) -> Arc<dyn Lun> {
    file_lun(dir, name, metadata_size(lun_size, small_geometry()))
}

pub fn read_all(lun: &dyn Lun) -> Vec<u8> {
    let mut b = vec![0u8; lun.size() as usize];
    lun.read_at(&mut b, 0).expect("read LUN");
    b
}

/// A sector whose contents say which write it was, so a missing or stale write shows.
pub fn seq_block(seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; SECTOR];
    for (i, c) in b.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&(seq ^ (i as u64) << 48).to_le_bytes());
    }
    b[0..8].copy_from_slice(&seq.to_le_bytes());
    b
}

pub fn fill(lun: &dyn Lun, byte: u8) {
    let b = vec![byte; lun.size() as usize];
    lun.write_at(&b, 0).expect("fill LUN");
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("replication=info")
        .try_init();
}
