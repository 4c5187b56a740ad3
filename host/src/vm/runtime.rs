//! This host's registry of running VMs, and the control socket of each.
//!
//! A running `vapp vm start` holds an exclusive `flock` on `<key>.lock` in a private runtime
//! directory keyed by the datastore's UUID (so the same datastore reached as a file or over
//! NBD is one key), and serves `<key>.sock`, where `vm stop` and `vm list` reach it. The key
//! is a hash of the VM's folder path (unix socket paths are short); the lock file holds a JSON
//! [`Record`] naming the VM, so a collision is detected rather than trusted. The kernel drops
//! the `flock` when the process dies, however it dies: a lock file nobody holds is a VM that
//! is not running here, never a stale claim.
//!
//! The runtime directory is `$VAPP_RUNTIME_DIR`, else `/run/vapp` for root, else
//! `$XDG_RUNTIME_DIR/vapp`; it is created mode 0700, so only its owner can stop the VMs.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{BufRead, BufReader, ErrorKind, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::{Context, Result, bail};

pub const RUNTIME_DIR_ENV: &str = "VAPP_RUNTIME_DIR";
/// Longest a control request may take; the VM process answers at once.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the VM process may take to answer: a first snapshot makes the disks' pools.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What a running VM process publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The VM folder on the datastore.
    pub vm: String,
    pub datastore_uuid: String,
    pub lun: String,
    pub host: String,
    pub pid: u32,
    pub started_ns: i64,
}

/// Whether a VM runs on this host.
#[derive(Debug)]
pub enum Presence {
    Stopped,
    /// Running; the record is `None` for the instant between taking the lock and writing it.
    Running(Option<Record>),
}

/// The registry of one datastore on this host.
pub struct Registry {
    dir: PathBuf,
}

/// This process's claim on a VM: held until dropped, which removes its files.
pub struct Claim {
    /// Held until the claim is dropped, after its files are unlinked.
    _lock: Flock<File>,
    lock_path: PathBuf,
    socket_path: PathBuf,
}

/// A control request, one JSON line; the answer is one [`Reply`] line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// Press the ACPI power button.
    Shutdown,
    /// Power the VM off now.
    Kill,
    /// Take snapshot `name` of every writable disk at one point in time.
    Snapshot {
        name: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub message: String,
}

pub fn runtime_root() -> PathBuf {
    if let Some(dir) = std::env::var_os(RUNTIME_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/vapp");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("vapp"),
        None => std::env::temp_dir().join(format!("vapp-{}", nix::unistd::geteuid())),
    }
}

/// FNV-1a, 64 bits: a stable short name for a folder path.
fn key(vm: &str) -> String {
    let hash = vm.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

impl Registry {
    pub fn for_datastore(uuid: &str) -> Registry {
        Registry::under(&runtime_root(), uuid)
    }

    /// The registry of runtime directory `root` (a host agent's, for the runners it starts).
    pub fn under(root: &Path, uuid: &str) -> Registry {
        Registry {
            dir: root.join("vms").join(uuid),
        }
    }

    fn lock_path(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{}.lock", key(vm)))
    }

    pub fn socket_path(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{}.sock", key(vm)))
    }

    /// Claims `record.vm` for this process, or returns who runs it here.
    pub fn claim(&self, record: &Record) -> Result<Result<Claim, Presence>> {
        let lock_path = self.lock_path(&record.vm);
        // The previous holder unlinks the file on exit: retry until the file we locked is the
        // one at the path.
        for _ in 0..100 {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .with_context(|| {
                    format!("creating the runtime directory {}", self.dir.display())
                })?;
            // Whoever can write here can stop our VMs: it must be ours alone.
            let meta = fs::metadata(&self.dir)?;
            if meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
                bail!(
                    "{}: not a private directory of this user (owner uid {}, mode {:o})",
                    self.dir.display(),
                    meta.uid(),
                    meta.mode() & 0o7777
                );
            }
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&lock_path)
            {
                Ok(file) => file,
                // The directory was removed by a holder that just left: make it again.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("opening {}", lock_path.display()));
                }
            };
            let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((file, Errno::EWOULDBLOCK)) => {
                    return Ok(Err(Presence::Running(read_record(file, &record.vm))));
                }
                Err((_, errno)) => {
                    return Err(errno).with_context(|| format!("locking {}", lock_path.display()));
                }
            };
            let same = match fs::metadata(&lock_path) {
                Ok(at_path) => at_path.ino() == lock.metadata()?.ino(),
                Err(_) => false,
            };
            if !same {
                continue;
            }
            let json = serde_json::to_vec(record)?;
            lock.set_len(0)?;
            lock.write_all(&json)?;
            let socket_path = self.socket_path(&record.vm);
            // Ours now: a socket file left by a process that died is stale.
            match fs::remove_file(&socket_path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("removing {}", socket_path.display()));
                }
            }
            return Ok(Ok(Claim {
                _lock: lock,
                lock_path,
                socket_path,
            }));
        }
        bail!(
            "{}: the lock file keeps changing under us (another vapp starting and stopping the same VM?)",
            lock_path.display()
        )
    }

    /// Whether `vm` runs on this host, and the record of the process that runs it.
    pub fn presence(&self, vm: &str) -> Result<Presence> {
        let lock_path = self.lock_path(vm);
        let file = match File::open(&lock_path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Presence::Stopped),
            Err(e) => return Err(e).with_context(|| format!("opening {}", lock_path.display())),
        };
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(_unlocked_on_drop) => Ok(Presence::Stopped),
            Err((file, Errno::EWOULDBLOCK)) => Ok(Presence::Running(read_record(file, vm))),
            Err((_, errno)) => {
                Err(errno).with_context(|| format!("locking {}", lock_path.display()))
            }
        }
    }
}

/// The record in a held lock file, if it is complete and names `vm`.
fn read_record(mut file: File, vm: &str) -> Option<Record> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    let record: Record = serde_json::from_str(&text).ok()?;
    if record.vm != vm {
        tracing::warn!(vm, other = %record.vm, "runtime key collision: another VM's record");
        return None;
    }
    Some(record)
}

impl Claim {
    pub fn listen(&self) -> Result<UnixListener> {
        UnixListener::bind(&self.socket_path)
            .with_context(|| format!("binding the control socket {}", self.socket_path.display()))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Unlinked while still locked, so a newcomer never locks a file that is going away.
        let _ = fs::remove_file(&self.socket_path);
        let _ = fs::remove_file(&self.lock_path);
        if let Some(dir) = self.lock_path.parent() {
            // Only succeeds when no other VM of the datastore runs here.
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Reads one request from a control connection.
pub fn read_request(stream: &UnixStream) -> Result<Request> {
    stream.set_read_timeout(Some(CONTROL_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(line.trim()).with_context(|| format!("bad control request {line:?}"))
}

pub fn write_reply(mut stream: &UnixStream, reply: &Reply) -> Result<()> {
    stream.set_write_timeout(Some(CONTROL_TIMEOUT))?;
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    Ok(())
}

/// Sends `request` to the VM process serving `socket` and returns its answer.
pub fn ask(socket: &Path, request: Request) -> Result<Reply> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the control socket {}", socket.display()))?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(CONTROL_TIMEOUT))?;
    let mut line = serde_json::to_vec(&request)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .with_context(|| format!("no answer on {}", socket.display()))?;
    serde_json::from_str(answer.trim())
        .with_context(|| format!("bad answer {answer:?} on {}", socket.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(vm: &str) -> Record {
        Record {
            vm: vm.to_string(),
            datastore_uuid: "u".into(),
            lun: "ds.vmfs".into(),
            host: "h".into(),
            pid: std::process::id(),
            started_ns: 1,
        }
    }

    #[test]
    fn one_claim_per_vm_and_it_goes_away_with_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry {
            dir: dir.path().join("vms/uuid"),
        };
        assert!(matches!(
            registry.presence("/vms/a").unwrap(),
            Presence::Stopped
        ));
        let claim = registry.claim(&record("/vms/a")).unwrap().unwrap();
        match registry.claim(&record("/vms/a")).unwrap() {
            Err(Presence::Running(Some(r))) => assert_eq!(r, record("/vms/a")),
            other => panic!("second claim: {:?}", other.err()),
        }
        match registry.presence("/vms/a").unwrap() {
            Presence::Running(Some(r)) => assert_eq!(r.vm, "/vms/a"),
            other => panic!("{other:?}"),
        }
        let other = registry.claim(&record("/vms/b")).unwrap().unwrap();
        drop(claim);
        assert!(matches!(
            registry.presence("/vms/a").unwrap(),
            Presence::Stopped
        ));
        assert!(registry.claim(&record("/vms/a")).unwrap().is_ok());
        drop(other);
    }

    #[test]
    fn keys_are_stable_and_short() {
        assert_eq!(key("/vms/a"), key("/vms/a"));
        assert_ne!(key("/vms/a"), key("/vms/b"));
        assert_eq!(key("/vms/a").len(), 16);
    }
}
