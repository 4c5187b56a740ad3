//! Random file system work through real syscalls on a mount, checked step by step against an
//! in-memory model: open (create, truncate, exclusive, read-only), pwrite, pread, truncate,
//! rename (over files, over empty directories, into itself), unlink, mkdir, rmdir, readdir.
//! Then everything again after unmount and mount, and fsck.
//!
//! The seed is printed; `VAPP_FUSE_SEED=N` replays a run.
#![allow(clippy::unwrap_used)]

mod fuse_support;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fuse_support::{Fixture, Mounted, fuse_available};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const STEPS: usize = 600;
const NAMES: &[&str] = &["a", "b", "c", "d", "e"];
const MAX_OPEN: usize = 6;
const MAX_OFFSET: u64 = 3 << 20;
const MAX_WRITE: usize = 300 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Dir,
    File(u64),
}

/// What the file system should look like.
#[derive(Default)]
struct Model {
    /// Every path below the root (relative, no leading '/').
    tree: BTreeMap<PathBuf, Entry>,
    /// Contents by file identity; unlinked files stay while descriptors may use them.
    files: HashMap<u64, Vec<u8>>,
    next_id: u64,
}

impl Model {
    fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![PathBuf::new()];
        dirs.extend(
            self.tree
                .iter()
                .filter(|(_, e)| **e == Entry::Dir)
                .map(|(p, _)| p.clone()),
        );
        dirs
    }

    fn children(&self, dir: &Path) -> Vec<(String, Entry)> {
        self.tree
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir) && p.as_os_str() != dir.as_os_str())
            .map(|(p, e)| (p.file_name().unwrap().to_str().unwrap().to_string(), *e))
            .collect()
    }

    fn is_empty_dir(&self, dir: &Path) -> bool {
        self.children(dir).is_empty()
    }

    fn new_file(&mut self) -> u64 {
        self.next_id += 1;
        self.files.insert(self.next_id, Vec::new());
        self.next_id
    }
}

struct Fd {
    file: File,
    id: u64,
    writable: bool,
}

/// The expected outcome of a step, compared with what the syscall did.
fn check<T>(step: usize, what: &str, got: std::io::Result<T>, want: Result<(), i32>) -> Option<T> {
    match (got, want) {
        (Ok(v), Ok(())) => Some(v),
        (Err(e), Err(errno)) => {
            assert_eq!(e.raw_os_error(), Some(errno), "step {step}: {what}: {e}");
            None
        }
        (Ok(_), Err(errno)) => panic!("step {step}: {what}: succeeded, expected errno {errno}"),
        (Err(e), Ok(())) => panic!("step {step}: {what}: failed with {e}, expected success"),
    }
}

struct Run {
    rng: StdRng,
    model: Model,
    fds: Vec<Fd>,
    root: PathBuf,
}

impl Run {
    fn on_disk(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.rng.random_range(0..items.len())].clone()
    }

    fn random_path(&mut self) -> PathBuf {
        let dir = self.pick(&self.model.dirs());
        let name = self.pick(NAMES);
        dir.join(name)
    }

    /// An existing path most of the time, sometimes a missing one.
    fn some_path(&mut self) -> PathBuf {
        let existing: Vec<PathBuf> = self.model.tree.keys().cloned().collect();
        if existing.is_empty() || self.rng.random_bool(0.2) {
            self.random_path()
        } else {
            self.pick(&existing)
        }
    }

    fn step(&mut self, n: usize) -> Vec<PathBuf> {
        match self.rng.random_range(0..100) {
            0..=14 => self.open_create(n),
            15..=19 => self.open_read_only(n),
            20..=39 => self.pwrite(n),
            40..=52 => self.pread(n),
            53..=60 => self.truncate(n),
            61..=70 => self.rename(n),
            71..=76 => self.unlink(n),
            77..=83 => self.mkdir(n),
            84..=87 => self.rmdir(n),
            88..=94 => self.readdir(n),
            _ => self.close(n),
        }
    }

    fn open_create(&mut self, n: usize) -> Vec<PathBuf> {
        if self.fds.len() >= MAX_OPEN {
            self.close(n);
        }
        let path = self.random_path();
        let trunc = self.rng.random_bool(0.3);
        let excl = self.rng.random_bool(0.2);
        let got = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(!excl)
            .create_new(excl)
            .truncate(trunc && !excl)
            .open(self.on_disk(&path));
        let (want, id) = match self.model.tree.get(&path).copied() {
            Some(Entry::Dir) => (Err(if excl { libc::EEXIST } else { libc::EISDIR }), None),
            Some(Entry::File(_)) if excl => (Err(libc::EEXIST), None),
            Some(Entry::File(id)) => {
                if trunc {
                    self.model.files.get_mut(&id).unwrap().clear();
                }
                (Ok(()), Some(id))
            }
            None => {
                let id = self.model.new_file();
                self.model.tree.insert(path.clone(), Entry::File(id));
                (Ok(()), Some(id))
            }
        };
        let what = format!("open {path:?} create trunc={trunc} excl={excl}");
        if let (Some(file), Some(id)) = (check(n, &what, got, want), id) {
            self.fds.push(Fd {
                file,
                id,
                writable: true,
            });
        }
        vec![path]
    }

    fn open_read_only(&mut self, n: usize) -> Vec<PathBuf> {
        let files: Vec<(PathBuf, u64)> = self
            .model
            .tree
            .iter()
            .filter_map(|(p, e)| match e {
                Entry::File(id) => Some((p.clone(), *id)),
                Entry::Dir => None,
            })
            .collect();
        if files.is_empty() || self.fds.len() >= MAX_OPEN {
            return self.close(n);
        }
        let (path, id) = self.pick(&files);
        let file = File::open(self.on_disk(&path)).unwrap();
        self.fds.push(Fd {
            file,
            id,
            writable: false,
        });
        vec![path]
    }

    fn pwrite(&mut self, n: usize) -> Vec<PathBuf> {
        if self.fds.is_empty() {
            return self.open_create(n);
        }
        let i = self.rng.random_range(0..self.fds.len());
        let off = self.rng.random_range(0..MAX_OFFSET);
        let len = self.rng.random_range(1..MAX_WRITE);
        let mut data = vec![0u8; len];
        self.rng.fill_bytes(&mut data);
        let fd = &self.fds[i];
        let got = fd.file.write_all_at(&data, off);
        let want = if fd.writable {
            let content = self.model.files.get_mut(&fd.id).unwrap();
            let end = off as usize + len;
            if content.len() < end {
                content.resize(end, 0);
            }
            content[off as usize..end].copy_from_slice(&data);
            Ok(())
        } else {
            Err(libc::EBADF)
        };
        check(
            n,
            &format!("pwrite {len} at {off} (file {})", fd.id),
            got,
            want,
        );
        Vec::new()
    }

    fn pread(&mut self, n: usize) -> Vec<PathBuf> {
        if self.fds.is_empty() {
            return self.open_read_only(n);
        }
        let i = self.rng.random_range(0..self.fds.len());
        let off = self.rng.random_range(0..MAX_OFFSET + (1 << 20));
        let len = self.rng.random_range(1..MAX_WRITE);
        let fd = &self.fds[i];
        let mut buf = vec![0u8; len];
        let mut got = 0;
        // pread may return short counts; read until EOF or the buffer is full.
        while got < len {
            match fd.file.read_at(&mut buf[got..], off + got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("step {n}: pread: {e}"),
            }
        }
        let content = &self.model.files[&fd.id];
        let start = (off as usize).min(content.len());
        let end = (off as usize + len).min(content.len());
        assert!(
            buf[..got] == content[start..end],
            "step {n}: pread {len} at {off} of file {} returned different bytes (got {got}, want {})",
            fd.id,
            end - start
        );
        Vec::new()
    }

    fn truncate(&mut self, n: usize) -> Vec<PathBuf> {
        let size = self.rng.random_range(0..MAX_OFFSET + (1 << 20));
        if !self.fds.is_empty() && self.rng.random_bool(0.5) {
            let i = self.rng.random_range(0..self.fds.len());
            let fd = &self.fds[i];
            let got = fd.file.set_len(size);
            let want = if fd.writable {
                self.model
                    .files
                    .get_mut(&fd.id)
                    .unwrap()
                    .resize(size as usize, 0);
                Ok(())
            } else {
                Err(libc::EINVAL)
            };
            check(n, &format!("ftruncate file {} to {size}", fd.id), got, want);
            return Vec::new();
        }
        let path = self.some_path();
        let got = std::fs::OpenOptions::new()
            .write(true)
            .open(self.on_disk(&path))
            .and_then(|f| f.set_len(size));
        let want = match self.model.tree.get(&path).copied() {
            None => Err(libc::ENOENT),
            Some(Entry::Dir) => Err(libc::EISDIR),
            Some(Entry::File(id)) => {
                self.model
                    .files
                    .get_mut(&id)
                    .unwrap()
                    .resize(size as usize, 0);
                Ok(())
            }
        };
        check(n, &format!("truncate {path:?} to {size}"), got, want);
        vec![path]
    }

    fn rename(&mut self, n: usize) -> Vec<PathBuf> {
        let from = self.some_path();
        let to = if self.rng.random_bool(0.5) {
            self.some_path()
        } else {
            self.random_path()
        };
        let got = std::fs::rename(self.on_disk(&from), self.on_disk(&to));
        let want = self.model_rename(&from, &to);
        check(n, &format!("rename {from:?} -> {to:?}"), got, want);
        let mut touched = vec![from, to];
        touched.retain(|p| p.parent().is_some());
        touched
    }

    fn model_rename(&mut self, from: &Path, to: &Path) -> Result<(), i32> {
        let Some(src) = self.model.tree.get(from).copied() else {
            return Err(libc::ENOENT);
        };
        if from == to {
            return Ok(());
        }
        // The kernel's checks, in its order: the source may not be an ancestor of the
        // target, nor the target an ancestor of the source.
        if src == Entry::Dir && to.starts_with(from) {
            return Err(libc::EINVAL);
        }
        if from.starts_with(to) {
            return Err(libc::ENOTEMPTY);
        }
        match (src, self.model.tree.get(to).copied()) {
            (Entry::File(_), Some(Entry::Dir)) => return Err(libc::EISDIR),
            (Entry::Dir, Some(Entry::File(_))) => return Err(libc::ENOTDIR),
            (Entry::Dir, Some(Entry::Dir)) if !self.model.is_empty_dir(to) => {
                return Err(libc::ENOTEMPTY);
            }
            _ => {}
        }
        self.model.tree.remove(to);
        let moved: Vec<(PathBuf, Entry)> = self
            .model
            .tree
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, e)| (p.clone(), *e))
            .collect();
        for (p, e) in moved {
            self.model.tree.remove(&p);
            let rest = p.strip_prefix(from).unwrap();
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            self.model.tree.insert(new, e);
        }
        Ok(())
    }

    fn unlink(&mut self, n: usize) -> Vec<PathBuf> {
        let path = self.some_path();
        let got = std::fs::remove_file(self.on_disk(&path));
        let want = match self.model.tree.get(&path).copied() {
            None => Err(libc::ENOENT),
            Some(Entry::Dir) => Err(libc::EISDIR),
            Some(Entry::File(_)) => {
                self.model.tree.remove(&path);
                Ok(())
            }
        };
        check(n, &format!("unlink {path:?}"), got, want);
        vec![path]
    }

    fn mkdir(&mut self, n: usize) -> Vec<PathBuf> {
        let path = self.random_path();
        let got = std::fs::create_dir(self.on_disk(&path));
        let want = if self.model.tree.contains_key(&path) {
            Err(libc::EEXIST)
        } else {
            self.model.tree.insert(path.clone(), Entry::Dir);
            Ok(())
        };
        check(n, &format!("mkdir {path:?}"), got, want);
        vec![path]
    }

    fn rmdir(&mut self, n: usize) -> Vec<PathBuf> {
        let path = self.some_path();
        let got = std::fs::remove_dir(self.on_disk(&path));
        let want = match self.model.tree.get(&path).copied() {
            None => Err(libc::ENOENT),
            Some(Entry::File(_)) => Err(libc::ENOTDIR),
            Some(Entry::Dir) if !self.model.is_empty_dir(&path) => Err(libc::ENOTEMPTY),
            Some(Entry::Dir) => {
                self.model.tree.remove(&path);
                Ok(())
            }
        };
        check(n, &format!("rmdir {path:?}"), got, want);
        vec![path]
    }

    fn readdir(&mut self, n: usize) -> Vec<PathBuf> {
        let dir = self.pick(&self.model.dirs());
        self.compare_dir(n, &dir);
        Vec::new()
    }

    fn close(&mut self, _n: usize) -> Vec<PathBuf> {
        if !self.fds.is_empty() {
            let i = self.rng.random_range(0..self.fds.len());
            self.fds.swap_remove(i);
        }
        Vec::new()
    }

    fn compare_dir(&self, n: usize, dir: &Path) {
        let mut got: Vec<(String, bool)> = std::fs::read_dir(self.on_disk(dir))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    e.file_type().unwrap().is_dir(),
                )
            })
            .collect();
        got.sort();
        let want: Vec<(String, bool)> = self
            .model
            .children(dir)
            .into_iter()
            .map(|(name, e)| (name, e == Entry::Dir))
            .collect();
        assert_eq!(got, want, "step {n}: listing of {dir:?}");
    }

    /// A path the step touched: what is there must match the model exactly.
    fn compare_path(&self, n: usize, path: &Path) {
        let on_disk = self.on_disk(path);
        match self.model.tree.get(path) {
            None => assert_eq!(
                std::fs::symlink_metadata(&on_disk)
                    .map(|_| ())
                    .unwrap_err()
                    .kind(),
                ErrorKind::NotFound,
                "step {n}: {path:?} should not exist"
            ),
            Some(Entry::Dir) => {
                assert!(on_disk.is_dir(), "step {n}: {path:?} should be a directory");
                self.compare_dir(n, path);
            }
            Some(Entry::File(id)) => {
                let content = std::fs::read(&on_disk).unwrap();
                let want = &self.model.files[id];
                assert_eq!(content.len(), want.len(), "step {n}: size of {path:?}");
                assert!(content == *want, "step {n}: contents of {path:?}");
            }
        }
        if let Some(parent) = path.parent() {
            if matches!(self.model.tree.get(parent), Some(Entry::Dir))
                || parent.as_os_str().is_empty()
            {
                self.compare_dir(n, parent);
            }
        }
    }

    fn compare_all(&self, n: usize) {
        self.compare_dir(n, Path::new(""));
        for path in self.model.tree.keys() {
            self.compare_path(n, path);
        }
    }
}

#[test]
fn random_syscalls_match_an_in_memory_model_and_survive_remount() {
    if !fuse_available() {
        return;
    }
    let seed = std::env::var("VAPP_FUSE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("fuse_model seed: {seed} (VAPP_FUSE_SEED={seed} replays this run)");
    let fx = Fixture::new("1G");
    let m = Mounted::new(&fx, "mnt", &[]);
    let mut run = Run {
        rng: StdRng::seed_from_u64(seed),
        model: Model::default(),
        fds: Vec::new(),
        root: m.mountpoint.clone(),
    };
    for n in 0..STEPS {
        for path in run.step(n) {
            run.compare_path(n, &path);
        }
        if n % 50 == 49 {
            run.compare_all(n);
        }
    }
    run.fds.clear();
    run.compare_all(STEPS);
    m.unmount();
    fx.assert_clean();

    let m = Mounted::new(&fx, "mnt", &[]);
    run.root = m.mountpoint.clone();
    run.compare_all(STEPS + 1);
    m.unmount();
    fx.assert_clean();
}
