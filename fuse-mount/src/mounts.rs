//! The mount as the host sees it: the mount table, unmounting (cleanly, lazily, or by aborting
//! the connection of a dead or stopped daemon), and the registry through which `umount` waits
//! until the daemon has closed the datastore.
//!
//! Nothing here touches a file inside the mount: on a hung daemon any such access would hang
//! the caller too. The mount point is found by its path in `/proc/self/mountinfo`, and the
//! daemon by a lock file it holds in the runtime directory.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::mount::{MntFlags, MsFlags};

use crate::error::{Error, Result};

/// File system type of a vapp mount in the mount table (`fuse` with subtype `vapp`).
pub const FSTYPE: &str = "fuse.vapp";

const FUSECTL: &str = "/sys/fs/fuse/connections";

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    /// What was mounted: for vapp, the datastore LUN.
    pub source: String,
    /// Device number; for FUSE the minor names the connection in the fusectl file system.
    pub major: u32,
    pub minor: u32,
}

/// The mounts visible to this process, in mount order.
pub fn mount_table() -> io::Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

/// `36 35 0:52 / /mnt rw,relatime shared:1 - fuse.vapp /srv/ds.vmfs rw,user_id=0,...`
fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let mut right = right.split(' ');
    let (major, minor) = left.get(2)?.split_once(':')?;
    Some(MountEntry {
        mountpoint: PathBuf::from(OsString::from_vec(unescape(left.get(4)?))),
        fstype: String::from_utf8_lossy(&unescape(right.next()?)).into_owned(),
        source: String::from_utf8_lossy(&unescape(right.next()?)).into_owned(),
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
    })
}

/// The kernel writes space, tab, newline and backslash in mount table fields as `\ooo`.
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// The absolute path under which `path` appears in the mount table, resolving symbolic links
/// in its parent directories but never looking at `path` itself (it may be a hung mount).
pub fn mountpoint_path(path: &Path) -> io::Result<PathBuf> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut lexical = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::ParentDir => {
                lexical.pop();
            }
            Component::CurDir => {}
            other => lexical.push(other),
        }
    }
    match (lexical.parent(), lexical.file_name()) {
        (Some(parent), Some(name)) => Ok(parent.canonicalize()?.join(name)),
        _ => Ok(lexical),
    }
}

/// The topmost mount at `path`, if any.
pub fn find_mount(path: &Path) -> io::Result<Option<MountEntry>> {
    let at = mountpoint_path(path)?;
    let table = mount_table()?;
    if let Some(found) = table.iter().rev().find(|m| m.mountpoint == at) {
        return Ok(Some(found.clone()));
    }
    // The last component may itself be a symbolic link to the mount point. Following it is
    // safe here: nothing is mounted at `at`, so it is not a hung mount.
    match path.canonicalize() {
        Ok(real) if real != at => Ok(table.into_iter().rev().find(|m| m.mountpoint == real)),
        _ => Ok(None),
    }
}

/// How an unmount went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Unmounted; the daemon sees the session end and closes the datastore.
    Clean,
    /// Files were still open: the mount left the namespace and the daemon keeps serving the
    /// open files; it closes the datastore when the last one is closed.
    Detached,
    /// The daemon was dead or stopped (or `force` was given): its connection was aborted, so
    /// requests in flight fail with ENOTCONN, and the mount was detached.
    Aborted,
}

/// State of the process serving a mount, from its registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    Running(u32),
    /// Stopped or traced: it answers nothing until continued.
    Stopped(u32),
    /// It registered and has exited (e.g. killed): the mount is dead.
    Gone,
    /// No registration found (mounted by an older vapp, or the runtime directory was lost).
    Unknown,
}

/// Unmounts the vapp mount at `path`. A busy mount is detached lazily; the connection is
/// aborted first when the daemon is dead or stopped, or when `force` is set.
pub fn unmount(path: &Path, force: bool) -> Result<Unmounted> {
    let entry = find_mount(path)
        .map_err(|e| Error::io(path, "reading the mount table", e))?
        .ok_or_else(|| Error::NotMounted {
            mountpoint: path.to_path_buf(),
        })?;
    if entry.fstype != FSTYPE {
        return Err(Error::NotAVappMount {
            mountpoint: entry.mountpoint,
            fstype: entry.fstype,
        });
    }
    let mp = entry.mountpoint.as_path();
    let daemon = daemon_state(mp);
    let hung = matches!(daemon, Daemon::Stopped(_) | Daemon::Gone);
    if force || hung {
        // Aborting first makes every request in flight fail at once, so a plain unmount can
        // succeed where processes were stuck inside the mount.
        abort_connection(entry.minor);
    }
    match nix::mount::umount2(mp, MntFlags::empty()) {
        Ok(()) => Ok(if force || hung {
            Unmounted::Aborted
        } else {
            Unmounted::Clean
        }),
        Err(Errno::EBUSY) => {
            nix::mount::umount2(mp, MntFlags::MNT_DETACH)
                .map_err(|e| Error::io(mp, "lazy unmount", e.into()))?;
            tracing::warn!(mountpoint = %mp.display(), ?daemon, "mount busy: detached lazily");
            Ok(if force || hung {
                Unmounted::Aborted
            } else {
                Unmounted::Detached
            })
        }
        Err(Errno::EPERM) => fusermount_unmount(mp),
        Err(e) => Err(Error::io(mp, "unmount", e.into())),
    }
}

/// Unprivileged users unmount through the setuid helper from fuse3.
fn fusermount_unmount(mp: &Path) -> Result<Unmounted> {
    let run = |lazy: bool| -> Result<bool> {
        let mut cmd = Command::new("fusermount3");
        cmd.arg("-u").arg("-q");
        if lazy {
            cmd.arg("-z");
        }
        let status = cmd
            .arg("--")
            .arg(mp)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| Error::io(mp, "running fusermount3", e))?;
        Ok(status.success())
    };
    if run(false)? {
        return Ok(Unmounted::Clean);
    }
    if run(true)? {
        return Ok(Unmounted::Detached);
    }
    Err(Error::io(
        mp,
        "unmount",
        io::Error::other("fusermount3 -u failed (not the owner of the mount?)"),
    ))
}

/// Makes the kernel fail every pending and future request of FUSE connection `minor`.
fn abort_connection(minor: u32) {
    let dir = Path::new(FUSECTL).join(minor.to_string());
    if !dir.exists() {
        // systemd mounts fusectl at boot; minimal systems and containers may not have it.
        if let Err(e) = nix::mount::mount(
            Some("fusectl"),
            FUSECTL,
            Some("fusectl"),
            MsFlags::empty(),
            None::<&str>,
        ) {
            tracing::warn!(error = %e, "cannot mount fusectl to abort the FUSE connection");
            return;
        }
    }
    match std::fs::write(dir.join("abort"), b"1") {
        Ok(()) => tracing::info!(connection = minor, "FUSE connection aborted"),
        Err(e) => {
            tracing::warn!(connection = minor, error = %e, "aborting the FUSE connection failed")
        }
    }
}

// ---- registry ------------------------------------------------------------------------------

/// Where daemons register: root's is system-wide, other users' are private.
fn runtime_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/vapp/mounts");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("vapp/mounts"),
        _ => PathBuf::from(format!("/tmp/vapp-{}/mounts", nix::unistd::geteuid())),
    }
}

/// FNV-1a: a stable name for a mount point path (names are limited to 255 bytes, paths are
/// not; the file records the full path, so a collision is detected, not trusted).
fn registry_file(mountpoint: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in mountpoint.as_os_str().as_bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    runtime_dir().join(format!("{h:016x}.lock"))
}

/// A daemon's claim on a mount point, held (as an exclusive flock) for as long as it serves
/// the mount and until the datastore is closed. The kernel drops it if the daemon dies.
#[derive(Debug)]
pub struct Registration {
    path: PathBuf,
    _lock: Flock<File>,
}

/// Registers this process as the daemon of `mountpoint` (an absolute path as in the mount
/// table).
pub fn register(mountpoint: &Path, lun: &str) -> io::Result<Registration> {
    let path = registry_file(mountpoint);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    // `daemon_state` probes with a brief shared lock; a daemon holds it for good.
    let mut file = file;
    let mut attempts = 0;
    let mut lock = loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => break lock,
            Err((back, Errno::EWOULDBLOCK)) if attempts < 20 => {
                file = back;
                attempts += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((_, e)) => {
                return Err(io::Error::other(format!(
                    "{} is held by another daemon (a lazily detached mount still serving open files?): {e}",
                    path.display()
                )));
            }
        }
    };
    lock.set_len(0)?;
    write!(
        *lock,
        "pid {}\nmountpoint {}\nlun {lun}\n",
        std::process::id(),
        mountpoint.display()
    )?;
    lock.sync_data()?;
    Ok(Registration { path, _lock: lock })
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Removed while still locked: a waiter that opened it earlier gets the lock once we
        // exit, a later one finds no file; both learn that the daemon is done.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The registered daemon's pid and whether it still holds its registration.
fn registered(mountpoint: &Path) -> Option<(Option<u32>, bool)> {
    let path = registry_file(mountpoint);
    let mut file = File::open(&path).ok()?;
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    let recorded = text.lines().find_map(|l| l.strip_prefix("mountpoint "));
    if recorded.is_some_and(|m| Path::new(m) != mountpoint) {
        return None;
    }
    let pid = text
        .lines()
        .find_map(|l| l.strip_prefix("pid "))
        .and_then(|p| p.parse().ok());
    let held = match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => false,
        Err((_, Errno::EWOULDBLOCK)) => true,
        Err(_) => true,
    };
    Some((pid, held))
}

/// Whether the daemon of `mountpoint` runs, is stopped, or is gone.
pub fn daemon_state(mountpoint: &Path) -> Daemon {
    match registered(mountpoint) {
        None => Daemon::Unknown,
        Some((_, false)) => Daemon::Gone,
        Some((None, true)) => Daemon::Unknown,
        Some((Some(pid), true)) => {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state letter follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next());
            match state {
                Some('T' | 't') => Daemon::Stopped(pid),
                _ => Daemon::Running(pid),
            }
        }
    }
}

/// Waits until the daemon of `mountpoint` has closed the datastore and exited, at most
/// `timeout`. True when it has (or when none was registered).
pub fn wait_closed(mountpoint: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match registered(mountpoint) {
            None | Some((_, false)) => return true,
            Some((_, true)) if Instant::now() >= deadline => return false,
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes() {
        let line = "641 30 0:77 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:366 - fuse.vapp /srv/ds\\134x.vmfs rw,user_id=0,group_id=0";
        let m = parse_mountinfo_line(line).unwrap();
        assert_eq!(m.mountpoint, PathBuf::from("/tmp/a b"));
        assert_eq!(m.fstype, "fuse.vapp");
        assert_eq!(m.source, "/srv/ds\\x.vmfs");
        assert_eq!((m.major, m.minor), (0, 77));
        // No optional fields.
        let m = parse_mountinfo_line("1 0 8:3 / / rw - ext4 /dev/sda3 rw").unwrap();
        assert_eq!((m.mountpoint, m.minor), (PathBuf::from("/"), 3));
        assert!(parse_mountinfo_line("garbage").is_none());
    }

    #[test]
    fn mountpoint_path_does_not_resolve_the_last_component() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::fs::create_dir(real.join("d")).unwrap();
        std::os::unix::fs::symlink(real.join("d"), real.join("link")).unwrap();
        let through = mountpoint_path(&dir.path().join("d/../link/./")).unwrap();
        assert_eq!(through, real.join("link"));
        assert_eq!(
            mountpoint_path(&dir.path().join("missing")).unwrap(),
            real.join("missing")
        );
    }

    #[test]
    fn registration_is_seen_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let mp = dir.path().join("mnt");
        assert_eq!(daemon_state(&mp), Daemon::Unknown);
        let reg = register(&mp, "/srv/ds.vmfs").unwrap();
        assert_eq!(daemon_state(&mp), Daemon::Running(std::process::id()));
        assert!(!wait_closed(&mp, Duration::from_millis(50)));
        drop(reg);
        assert!(wait_closed(&mp, Duration::from_millis(50)));
        assert_eq!(daemon_state(&mp), Daemon::Unknown);
    }
}
