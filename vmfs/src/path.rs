//! Path helpers on top of the inode operations: resolve, mkdir -p, rm -r, put, list.
//! Errors name the path the caller gave.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use crate::datastore::{Attr, Creds, Datastore, NewFile};
use crate::error::{Error, Result};
use crate::inode::Kind;
use crate::layout::ROOT_INO;

/// Symbolic links followed while resolving one path.
const MAX_SYMLINKS: u32 = 40;

/// Where the snapshot pool of the virtual disk at `path` lives: a hidden file beside it,
/// `/vms/a/disk0.vdisk` -> `/vms/a/.disk0.vdisk.snap`.
pub fn snapshot_pool_path(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    let (dir, name) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
    format!("{dir}/.{name}.snap")
}

/// The virtual disk a pool path belongs to, the inverse of [`snapshot_pool_path`].
pub fn snapshot_source_path(pool: &str) -> Option<String> {
    let (dir, name) = pool.trim_end_matches('/').rsplit_once('/')?;
    let disk = name.strip_prefix('.')?.strip_suffix(".snap")?;
    (!disk.is_empty()).then(|| format!("{dir}/{disk}"))
}

fn components(path: &str) -> Result<Vec<&OsStr>> {
    if !path.starts_with('/') {
        return Err(Error::Invalid {
            object: path.to_string(),
            reason: "datastore paths are absolute (start with '/')".into(),
        });
    }
    Ok(path_parts(path))
}

/// The components of a path, absolute or relative, without empty ones and ".".
fn path_parts(path: &str) -> Vec<&OsStr> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(OsStr::new)
        .collect()
}

/// Options for [`Datastore::put`].
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    pub new: NewFile,
    /// Replace an existing file instead of failing.
    pub overwrite: bool,
    /// The input's length when known up front (a regular file), for the message of a copy
    /// that runs out of space.
    pub expected_size: Option<u64>,
}

/// What [`Datastore::put`] names the file while it copies: hidden, recognisable, and
/// unique per host slot (a dead host's copy is removed before its slot is free again).
fn staging_name(name: &OsStr, host: &str) -> OsString {
    let suffix = format!(".vapp-put.{host}");
    let room = crate::dir::NAME_MAX.saturating_sub(1 + suffix.len());
    let mut staged = b".".to_vec();
    staged.extend(name.as_bytes().iter().take(room));
    staged.extend(suffix.as_bytes());
    OsString::from_vec(staged)
}

/// A `NoSpace` error about `path` that says what it needed and what was free.
fn with_space(err: Error, path: &str, needed: &str, free: u64) -> Error {
    match err {
        Error::NoSpace { lun, resource, .. } => Error::NoSpace {
            lun,
            what: format!("{path}: it needs {needed}, {} free", human(free)),
            resource,
        },
        other => other.at(path),
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

impl Datastore {
    /// The inode at `path`. Symbolic links in the middle of a path are followed (relative
    /// to their directory); the last component is not.
    pub fn resolve(&self, path: &str) -> Result<u64> {
        let parts = components(path)?;
        self.walk(ROOT_INO, &parts, false, 0)
            .map_err(|e| e.at(path))
    }

    /// Walks `parts` from the directory `at`, following every symbolic link on the way, the
    /// last component's too when `follow_last`. A link's target is walked from the link's
    /// directory (from the root when absolute), counting towards [`MAX_SYMLINKS`], so a
    /// loop of links ends in an error.
    fn walk(&self, mut at: u64, parts: &[&OsStr], follow_last: bool, depth: u32) -> Result<u64> {
        for (i, part) in parts.iter().enumerate() {
            if part.as_bytes() == b".." {
                if self.getattr(at)?.kind != Kind::Dir {
                    return Err(Error::NotADirectory {
                        object: format!("inode {at}"),
                    });
                }
                at = self.parent_of(at)?;
                continue;
            }
            let attr = self.lookup(at, part)?;
            let last = i + 1 == parts.len();
            if attr.kind != Kind::Symlink || (last && !follow_last) {
                at = attr.ino;
                continue;
            }
            if depth >= MAX_SYMLINKS {
                return Err(Error::Invalid {
                    object: part.to_string_lossy().into_owned(),
                    reason: "too many levels of symbolic links".into(),
                });
            }
            let target = self.readlink(attr.ino)?.to_string_lossy().into_owned();
            let from = if target.starts_with('/') {
                ROOT_INO
            } else {
                at
            };
            at = self.walk(from, &path_parts(&target), true, depth + 1)?;
        }
        Ok(at)
    }

    fn parent_of(&self, ino: u64) -> Result<u64> {
        if ino == ROOT_INO {
            return Ok(ROOT_INO);
        }
        self.readdir(ino, 1)?
            .into_iter()
            .find(|e| e.cookie == 2)
            .map(|e| e.ino)
            .ok_or_else(|| Error::NotFound {
                object: format!("parent of inode {ino}"),
            })
    }

    /// The directory that holds `path`'s last component, and that component.
    pub fn split_parent(&self, path: &str) -> Result<(u64, OsString)> {
        let parts = components(path)?;
        let Some((last, dirs)) = parts.split_last() else {
            return Err(Error::Invalid {
                object: path.to_string(),
                reason: "the root directory has no parent".into(),
            });
        };
        if last.as_bytes() == b".." {
            return Err(Error::Invalid {
                object: path.to_string(),
                reason: "path ends in '..'".into(),
            });
        }
        let parent = self.walk(ROOT_INO, dirs, true, 0).map_err(|e| e.at(path))?;
        Ok((parent, last.to_os_string()))
    }

    pub fn stat_path(&self, path: &str) -> Result<Attr> {
        let ino = self.resolve(path)?;
        self.getattr(ino).map_err(|e| e.at(path))
    }

    pub fn mkdir_path(&self, path: &str, mode: u32, creds: Creds) -> Result<Attr> {
        let (parent, name) = self.split_parent(path)?;
        self.mkdir(parent, &name, mode, creds)
            .map_err(|e| e.at(path))
    }

    /// mkdir -p: creates missing parents; an existing directory is fine.
    pub fn mkdir_all(&self, path: &str, mode: u32, creds: Creds) -> Result<Attr> {
        let mut at = ROOT_INO;
        let mut so_far = String::new();
        for part in components(path)? {
            so_far.push('/');
            so_far.push_str(&part.to_string_lossy());
            at = match self.lookup(at, part) {
                Ok(a) if a.kind == Kind::Dir => a.ino,
                Ok(_) => return Err(Error::NotADirectory { object: so_far }),
                Err(Error::NotFound { .. }) => match self.mkdir(at, part, mode, creds) {
                    Ok(made) => made.ino,
                    // Another host made it since the lookup: `mkdir -p` takes theirs.
                    Err(Error::Exists { .. }) => match self.lookup(at, part) {
                        Ok(a) if a.kind == Kind::Dir => a.ino,
                        Ok(_) => return Err(Error::NotADirectory { object: so_far }),
                        Err(e) => return Err(e.at(&so_far)),
                    },
                    Err(e) => return Err(e.at(&so_far)),
                },
                Err(e) => return Err(e.at(&so_far)),
            };
        }
        self.getattr(at)
    }

    pub fn create_path(&self, path: &str, new: &NewFile) -> Result<Attr> {
        let (parent, name) = self.split_parent(path)?;
        self.create(parent, &name, new).map_err(|e| e.at(path))
    }

    /// Creates a raw device mapping at `path` (see [`Datastore::create_rdm`]), mode 0600
    /// as a virtual disk.
    pub fn create_rdm_path(
        &self,
        path: &str,
        record: &crate::RdmRecord,
        creds: Creds,
    ) -> Result<Attr> {
        let (parent, name) = self.split_parent(path)?;
        self.create_rdm(parent, &name, record, 0o600, creds)
            .map_err(|e| e.at(path))
    }

    /// Removes a file, a symlink or an empty directory; with `recursive`, a whole tree.
    pub fn remove_path(&self, path: &str, recursive: bool) -> Result<()> {
        let (parent, name) = self.split_parent(path)?;
        let attr = self.lookup(parent, &name).map_err(|e| e.at(path))?;
        if attr.kind == Kind::Dir {
            if recursive {
                // Refused before anything is removed: a tree holding a disk with snapshots
                // (or a pool) stays whole.
                if let Some(e) = self.find_protected(attr.ino, path.trim_end_matches('/'))? {
                    return Err(e);
                }
                self.remove_tree(attr.ino).map_err(|e| e.at(path))?;
            }
            self.rmdir(parent, &name).map_err(|e| e.at(path))
        } else {
            self.unlink(parent, &name).map_err(|e| e.at(path))
        }
    }

    /// The refusal for the first disk with snapshots or pool below directory `dir`.
    fn find_protected(&self, dir: u64, path: &str) -> Result<Option<Error>> {
        let mut entries = Vec::new();
        let mut after = 2;
        loop {
            let batch = self.readdir(dir, after)?;
            let Some(last) = batch.last() else { break };
            after = last.cookie;
            entries.extend(batch.into_iter().filter(|e| e.cookie > 2));
        }
        for e in entries {
            let (name, attr) = (e.name, self.getattr(e.ino)?);
            let child = format!("{path}/{}", name.to_string_lossy());
            if attr.kind == Kind::Dir {
                if let Some(e) = self.find_protected(attr.ino, &child)? {
                    return Ok(Some(e));
                }
            } else if attr.snapshot_source || attr.snapshot_pool {
                return Ok(Some(Error::SnapshotProtected {
                    object: child,
                    pool: attr.snapshot_pool,
                }));
            }
        }
        Ok(None)
    }

    fn remove_tree(&self, dir: u64) -> Result<()> {
        loop {
            let entries: Vec<_> = self
                .readdir(dir, 2)?
                .into_iter()
                .filter(|e| e.cookie > 2)
                .collect();
            if entries.is_empty() {
                return Ok(());
            }
            for e in entries {
                if e.kind == Kind::Dir {
                    self.remove_tree(e.ino)?;
                    self.rmdir(dir, &e.name)?;
                } else {
                    self.unlink(dir, &e.name)?;
                }
            }
        }
    }

    pub fn rename_path(&self, from: &str, to: &str) -> Result<()> {
        let (p1, n1) = self.split_parent(from)?;
        let (p2, n2) = self.split_parent(to)?;
        self.rename(p1, &n1, p2, &n2, false).map_err(|e| match e {
            Error::NotFound { .. } => e.at(from),
            Error::SnapshotProtected { .. }
                if self
                    .stat_path(from)
                    .is_ok_and(|a| a.snapshot_source || a.snapshot_pool) =>
            {
                e.at(from)
            }
            other => other.at(to),
        })
    }

    /// Every entry of a directory (without "." and ".."), with attributes.
    pub fn list(&self, path: &str) -> Result<Vec<(OsString, Attr)>> {
        let ino = self.resolve(path)?;
        let mut out = Vec::new();
        let mut after = 2;
        loop {
            let batch = self.readdir(ino, after).map_err(|e| e.at(path))?;
            let Some(last) = batch.last() else { break };
            after = last.cookie;
            for e in batch {
                if e.cookie > 2 {
                    let attr = self.getattr(e.ino)?;
                    out.push((e.name, attr));
                }
            }
        }
        Ok(out)
    }

    /// Streams `reader` into a new file at `path` with large aligned writes. Blocks that
    /// are entirely zero are skipped on thin files, so sparse input stays thin. `progress`
    /// gets the bytes copied so far.
    ///
    /// The copy is made under a temporary name in the same directory (see
    /// [`staging_name`]) and renamed over `path` at the end, so `path` holds the old file
    /// or the whole new one, never part of it. The temporary file is listed in this host's
    /// orphan list until the rename: if the copy fails it is removed at once, and if this
    /// process dies the host that recovers it removes it.
    pub fn put(
        &self,
        reader: &mut dyn Read,
        path: &str,
        options: &PutOptions,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64> {
        let (parent, name) = self.split_parent(path)?;
        match self.lookup(parent, &name) {
            // Replacing it would drop the mapping, not write to its LUN.
            Ok(a) if a.kind == Kind::Rdm => {
                return Err(Error::Invalid {
                    object: path.into(),
                    reason: "is a raw device mapping; its data is on the mapped LUN (remove the mapping first to put a file in its place)".into(),
                });
            }
            Ok(a) if a.kind != Kind::File => {
                return Err(Error::IsADirectory {
                    object: path.into(),
                });
            }
            Ok(_) if !options.overwrite => {
                return Err(Error::Exists {
                    object: path.into(),
                });
            }
            Ok(a) if a.snapshot_source || a.snapshot_pool => {
                return Err(Error::SnapshotProtected {
                    object: path.into(),
                    pool: a.snapshot_pool,
                });
            }
            Ok(_) | Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e.at(path)),
        }
        let host = self.host_tag().ok_or_else(|| Error::ReadOnly {
            lun: self.lun().name().to_string(),
        })?;
        let free = self.free_bytes()?;
        let staged = staging_name(&name, &host);
        let attr = self
            .create_file(parent, &staged, &options.new, true)
            .map_err(|e| e.at(path))?;
        let mut read = 0;
        let copied = self
            .copy_into(attr.ino, reader, path, options, progress, &mut read)
            .and_then(|total| {
                self.fsync(attr.ino)?;
                self.rename_staged(parent, &staged, &name, attr.ino)
                    .map_err(|e| e.at(path))?;
                self.fsync(attr.ino)?;
                Ok(total)
            });
        let err = match copied {
            Ok(total) => return Ok(total),
            Err(e) => e,
        };
        if let Err(cleanup) = self.discard_staged(attr.ino, parent, attr.generation as u32) {
            tracing::warn!(path, ino = attr.ino, error = %cleanup,
                "cannot remove the temporary file of a failed copy; the next mount removes it");
        }
        let needed = match options.expected_size {
            Some(size) => human(size),
            None => format!("more than {}", human(read)),
        };
        Err(with_space(err, path, &needed, free))
    }

    /// Free bytes for files, as `statfs` counts them.
    fn free_bytes(&self) -> Result<u64> {
        let free = self.statfs()?;
        Ok(free.blocks_free * u64::from(free.block_size))
    }

    /// A tag unique among this datastore's hosts: the host UUID's first group and its slot.
    fn host_tag(&self) -> Option<String> {
        let host = self.host()?;
        let uuid = host.uuid.simple().to_string();
        Some(format!("{}-{}", &uuid[..8], host.slot))
    }

    /// The copy loop of [`Datastore::put`]; `read` counts the input bytes taken so far.
    fn copy_into(
        &self,
        ino: u64,
        reader: &mut dyn Read,
        path: &str,
        options: &PutOptions,
        progress: &mut dyn FnMut(u64),
        read: &mut u64,
    ) -> Result<u64> {
        const CHUNK: usize = 8 << 20;
        let mut buf = vec![0u8; CHUNK];
        let mut total: u64 = 0;
        loop {
            let mut filled = 0;
            while filled < CHUNK {
                let n = reader
                    .read(&mut buf[filled..])
                    .map_err(|e| Error::Invalid {
                        object: format!("input for {path}"),
                        reason: format!("read failed: {e}"),
                    })?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            *read = total + filled as u64;
            if filled == 0 {
                break;
            }
            self.write_skipping_zero_blocks(ino, total, &buf[..filled], options.new.thick)
                .map_err(|e| e.at(path))?;
            total += filled as u64;
            progress(total);
            if filled < CHUNK {
                break;
            }
        }
        // Trailing zero chunks were skipped: the size still covers them.
        if self.getattr(ino)?.size < total {
            self.truncate(ino, total).map_err(|e| e.at(path))?;
        }
        Ok(total)
    }

    /// Writes `data` at `off` (a multiple of the block size), leaving whole zero blocks of a
    /// thin file unwritten so they stay holes.
    fn write_skipping_zero_blocks(
        &self,
        ino: u64,
        off: u64,
        data: &[u8],
        thick: bool,
    ) -> Result<()> {
        if thick {
            self.write(ino, off, data)?;
            return Ok(());
        }
        let bs = self.superblock().block_size as usize;
        let mut run: Option<usize> = None;
        for (i, block) in data.chunks(bs).enumerate() {
            let start = i * bs;
            match (block.iter().all(|&b| b == 0), run) {
                (false, None) => run = Some(start),
                (true, Some(r)) => {
                    self.write(ino, off + r as u64, &data[r..start])?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(r) = run {
            self.write(ino, off + r as u64, &data[r..])?;
        }
        Ok(())
    }

    /// Creates a virtual disk of `size` bytes (a multiple of 512): thin, or eager-zeroed
    /// thick with every block allocated and zeroed now.
    pub fn create_vdisk(&self, path: &str, size: u64, thick: bool, creds: Creds) -> Result<Attr> {
        if size == 0 || size % 512 != 0 {
            return Err(Error::Invalid {
                object: path.to_string(),
                reason: format!("virtual disk size {size} must be a non-zero multiple of 512"),
            });
        }
        let free = self.free_bytes()?;
        let attr = self.create_path(
            path,
            &NewFile {
                mode: 0o600,
                creds,
                thick,
                vdisk: true,
            },
        )?;
        let sized = self
            .truncate(attr.ino, size)
            .and_then(|()| self.fsync(attr.ino));
        if let Err(e) = sized {
            // Do not leave a disk of the wrong size behind.
            let _ = self.remove_path(path, false);
            return Err(with_space(e, path, &human(size), free));
        }
        self.getattr(attr.ino)
    }
}
