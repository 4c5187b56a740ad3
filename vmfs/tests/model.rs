//! Model test: random sequences of create/write/truncate/rename/unlink/mkdir against an
//! in-memory model; after every step the datastore agrees with the model, and after a
//! remount too.
#![allow(clippy::unwrap_used, clippy::map_entry)]

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use vmfs::{Datastore, Error, FormatOptions, NewFile};

#[derive(Debug, Clone)]
enum Op {
    Create(u8, u8),
    Write(u8, u8, u32, u32, u8),
    Truncate(u8, u8, u32),
    Rename(u8, u8, u8, u8),
    Unlink(u8, u8),
    Mkdir(u8),
    Remount,
}

fn op() -> impl Strategy<Value = Op> {
    let dir = 0u8..3;
    let name = 0u8..6;
    prop_oneof![
        3 => (dir.clone(), name.clone()).prop_map(|(d, n)| Op::Create(d, n)),
        5 => (dir.clone(), name.clone(), 0u32..3_000_000, prop_oneof![1u32..200, 1u32..5000, 1u32..300_000], any::<u8>())
            .prop_map(|(d, n, o, l, s)| Op::Write(d, n, o, l, s)),
        2 => (dir.clone(), name.clone(), 0u32..3_000_000).prop_map(|(d, n, s)| Op::Truncate(d, n, s)),
        2 => (dir.clone(), name.clone(), dir.clone(), name.clone()).prop_map(|(a, b, c, d)| Op::Rename(a, b, c, d)),
        1 => (dir.clone(), name.clone()).prop_map(|(d, n)| Op::Unlink(d, n)),
        1 => dir.prop_map(Op::Mkdir),
        1 => Just(Op::Remount),
    ]
}

fn dir_path(d: u8) -> String {
    if d == 0 {
        String::new()
    } else {
        format!("/d{d}")
    }
}

fn path(d: u8, n: u8) -> String {
    format!("{}/f{n}", dir_path(d))
}

struct Model {
    dirs: Vec<bool>,
    files: BTreeMap<String, Vec<u8>>,
}

fn check(ds: &Datastore, m: &Model) {
    for (p, data) in &m.files {
        let a = ds.stat_path(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        assert_eq!(a.size, data.len() as u64, "{p}");
        let mut back = vec![0u8; data.len()];
        assert_eq!(ds.read(a.ino, 0, &mut back).unwrap(), data.len());
        assert!(back == *data, "{p} content");
    }
    for d in 0..3u8 {
        if d > 0 && !m.dirs[d as usize] {
            assert!(ds.stat_path(&dir_path(d)).is_err());
            continue;
        }
        let dp = if d == 0 { "/".to_string() } else { dir_path(d) };
        let listed = ds.list(&dp).unwrap();
        let files = listed
            .iter()
            .filter(|(_, a)| a.kind == vmfs::Kind::File)
            .count();
        let expected = m
            .files
            .keys()
            .filter(|p| p.rsplit_once('/').unwrap().0 == dir_path(d))
            .count();
        assert_eq!(files, expected, "entries of dir {d}");
    }
}

fn run(ops: Vec<Op>) {
    let t = TestDs::in_memory(
        96 << 20,
        FormatOptions {
            label: "model".into(),
            block_size: 64 << 10,
            max_files: Some(1024),
            ..Default::default()
        },
    );
    let mut ds = Some(t.open());
    let mut m = Model {
        dirs: vec![true, false, false],
        files: BTreeMap::new(),
    };
    for op in ops {
        let d = ds.as_ref().unwrap();
        match op {
            Op::Create(dir, n) => {
                let p = path(dir, n);
                let r = d.create_path(&p, &NewFile::default());
                if !m.dirs[dir as usize] {
                    assert!(matches!(r, Err(Error::NotFound { .. })), "{p}: {r:?}");
                } else if m.files.contains_key(&p) {
                    assert!(matches!(r, Err(Error::Exists { .. })), "{p}: {r:?}");
                } else {
                    r.unwrap();
                    m.files.insert(p, Vec::new());
                }
            }
            Op::Write(dir, n, off, len, seed) => {
                let p = path(dir, n);
                if let Some(data) = m.files.get_mut(&p) {
                    let bytes = pattern(len as usize, u64::from(seed));
                    let ino = d.resolve(&p).unwrap();
                    d.write(ino, u64::from(off), &bytes).unwrap();
                    let end = off as usize + len as usize;
                    if data.len() < end {
                        data.resize(end, 0);
                    }
                    data[off as usize..end].copy_from_slice(&bytes);
                }
            }
            Op::Truncate(dir, n, size) => {
                let p = path(dir, n);
                if let Some(data) = m.files.get_mut(&p) {
                    d.truncate(d.resolve(&p).unwrap(), u64::from(size)).unwrap();
                    data.resize(size as usize, 0);
                }
            }
            Op::Rename(d1, n1, d2, n2) => {
                let (a, b) = (path(d1, n1), path(d2, n2));
                let r = d.rename_path(&a, &b);
                if m.files.contains_key(&a) && m.dirs[d2 as usize] {
                    r.unwrap_or_else(|e| panic!("rename {a} {b}: {e}"));
                    let data = m.files.remove(&a).unwrap();
                    m.files.insert(b, data);
                } else {
                    assert!(r.is_err(), "rename {a} {b} should fail");
                }
            }
            Op::Unlink(dir, n) => {
                let p = path(dir, n);
                let r = d.remove_path(&p, false);
                if m.files.remove(&p).is_some() {
                    r.unwrap();
                } else {
                    assert!(r.is_err());
                }
            }
            Op::Mkdir(dir) => {
                if dir > 0 {
                    let r = d.mkdir_path(&dir_path(dir), 0o755, creds());
                    if m.dirs[dir as usize] {
                        assert!(matches!(r, Err(Error::Exists { .. })));
                    } else {
                        r.unwrap();
                        m.dirs[dir as usize] = true;
                    }
                }
            }
            Op::Remount => {
                ds.take().unwrap().close().unwrap();
                ds = Some(t.open());
            }
        }
        check(ds.as_ref().unwrap(), &m);
    }
    ds.take().unwrap().close().unwrap();
    check(&t.open_ro(), &m);
    t.assert_clean();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn datastore_agrees_with_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops);
    }
}
