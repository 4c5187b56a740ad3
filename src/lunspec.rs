//! The one way the command line opens a LUN: a path, a block device or an nbd:// URL, with
//! an optional `@SESSION` naming a snapshot session of it.
//!
//! A LUN that has a snapshot pool is written only through the snapshot engine, by one
//! process at a time (the array's storage processor). That process holds the LUN's claim:
//! an exclusive `flock` on `luns/<key>.lock` in the runtime directory (`$VAPP_RUNTIME_DIR`,
//! `/run/vapp` for root), which holds a JSON [`ClaimRecord`] naming it, and it may serve
//! `luns/<key>.sock`, where snapshot commands reach it and where other processes ask for a
//! session, which it then serves over NBD (`luns/<hash>.<session>.nbd`). The kernel drops
//! the lock when the holder dies, however it dies, so a lock file nobody holds is never a
//! stale claim. Processes that write a LUN without snapshots directly share
//! `luns/<key>.users`, which the first snapshot needs alone.
//!
//! A replicated LUN is held by its replication daemon (`vapp replica run`). A primary's
//! names in its record the socket where it serves the LUN over NBD (`writers`), and every
//! writer opens the LUN there, so no write bypasses replication; a secondary's names why
//! writers are refused (`refuse`). While a replicated LUN's daemon is down, writers are
//! refused: nothing would record what they change.
//!
//! Where a LUN's pool is: a pool named with `--pool` is recorded in this host's registry
//! (`$VAPP_STATE_DIR`, default `/var/lib/vapp`, file `pools/<key>.toml`); a file LUN with no
//! entry uses the file beside it ([`snapshot::pool_beside`]). Either way the pool's header
//! names its source, so a pool of another LUN is refused.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use lun::Lun;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use snapshot::Snapshots;

use crate::cmd::snapshot::{InUse, Service};

pub const STATE_DIR_ENV: &str = "VAPP_STATE_DIR";

/// A LUN spec split into the source and the session it names, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The source as the user typed it.
    pub typed: String,
    /// The source: a canonical absolute path for files and devices, the URL otherwise.
    pub source: String,
    pub session: Option<String>,
}

fn valid_session_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl Spec {
    /// Splits a final `@NAME`. A file that exists under the whole name wins, and an `@` in
    /// an nbd:// URL's user part is never followed by a valid session name (it has `/`
    /// or `:` after it), so only a real session suffix is taken.
    pub fn parse(typed: &str) -> Spec {
        let (base, session) = match typed.rsplit_once('@') {
            Some((base, name))
                if !base.is_empty() && valid_session_name(name) && !Path::new(typed).exists() =>
            {
                (base, Some(name.to_string()))
            }
            _ => (typed, None),
        };
        Spec {
            typed: base.to_string(),
            source: canonical(base),
            session,
        }
    }

    /// The key of this source in the registry and the runtime directory.
    pub fn key(&self) -> String {
        key(&self.source)
    }

    /// Whether the source is a regular file (its default pool lies beside it).
    pub fn is_file(&self) -> bool {
        fs::metadata(&self.source).is_ok_and(|m| m.is_file())
    }
}

fn canonical(spec: &str) -> String {
    match lun::LunSpec::parse(spec) {
        Ok(lun::LunSpec::Path(path)) => fs::canonicalize(&path)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| spec.to_string()),
        _ => spec.to_string(),
    }
}

fn key_hash(source: &str) -> String {
    let key = key(source);
    key[key.len().saturating_sub(16)..].to_string()
}

/// FNV-1a of the source name, with a readable tail so an operator can tell the files apart.
pub fn key(source: &str) -> String {
    let hash = source.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let tail: String = source
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(32)
        .collect();
    format!("{tail}-{hash:016x}")
}

pub fn state_dir() -> PathBuf {
    std::env::var_os(STATE_DIR_ENV)
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/var/lib/vapp"), PathBuf::from)
}

/// A registry entry: which pool serves a source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolEntry {
    pub source: String,
    pub pool: String,
}

fn pool_entry_path(spec: &Spec) -> PathBuf {
    state_dir()
        .join("pools")
        .join(format!("{}.toml", spec.key()))
}

pub fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<Option<T>> {
    match fs::read_to_string(path) {
        Ok(text) => {
            Ok(Some(toml::from_str(&text).with_context(|| {
                format!("{}: unreadable", path.display())
            })?))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes through a temporary file and a rename, so a crash leaves the old entry or the new.
pub fn write_toml<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let dir = path.parent().context("registry path without a directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("toml.tmp");
    fs::write(&tmp, toml::to_string(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Where the pool of `spec` is (whether or not it exists yet), or `None` for a device or
/// an NBD LUN that has none recorded.
pub fn pool_location(spec: &Spec) -> anyhow::Result<Option<String>> {
    if let Some(entry) = read_toml::<PoolEntry>(&pool_entry_path(spec))? {
        return Ok(Some(entry.pool));
    }
    if spec.is_file() {
        return Ok(Some(
            snapshot::pool_beside(Path::new(&spec.source))
                .display()
                .to_string(),
        ));
    }
    Ok(None)
}

/// The existing pool of `spec`, if it has one.
pub fn existing_pool(spec: &Spec) -> anyhow::Result<Option<String>> {
    Ok(pool_location(spec)?.filter(|p| pool_exists(p)))
}

fn pool_exists(pool: &str) -> bool {
    match lun::LunSpec::parse(pool) {
        Ok(lun::LunSpec::Path(path)) => path.exists(),
        _ => true,
    }
}

/// Records `pool` as the pool of `spec` (not needed for the pool beside a file).
pub fn record_pool(spec: &Spec, pool: &str) -> anyhow::Result<()> {
    let beside = spec.is_file()
        && canonical(pool)
            == snapshot::pool_beside(Path::new(&spec.source))
                .display()
                .to_string();
    if beside {
        return Ok(());
    }
    write_toml(
        &pool_entry_path(spec),
        &PoolEntry {
            source: spec.source.clone(),
            pool: canonical(pool),
        },
    )
}

/// Opens a LUN without the snapshot engine.
pub fn open_raw(spec: &str, read_only: bool) -> anyhow::Result<Arc<dyn Lun>> {
    crate::cmd::datastore::open_raw_lun(spec, read_only)
}

/// Opens `typed` for a command: its source through the snapshot engine when it has a pool,
/// or the session it names. Opening a LUN that has a pool for writing, or one of its
/// sessions, claims it for this process, which then takes snapshot commands for it; when
/// another process holds it, a session is served by that process and anything else is
/// refused, naming it. Read-only opens of a source read it directly.
pub fn open(typed: &str, write: bool) -> anyhow::Result<Arc<dyn Lun>> {
    let spec = Spec::parse(typed);
    if write
        && spec.session.is_none()
        && let Some(entry) = crate::cmd::clone::lookup(&spec)?
    {
        return open_clone(typed, &entry);
    }
    if spec.session.is_none() && !write {
        return open_raw(&spec.typed, true);
    }
    // A replicated LUN is written through its replication daemon, never around it.
    if spec.session.is_none()
        && let Some(holder) = Claim::holder(&spec)?
        && let Some(lun) = through_holder(&spec, &holder, write)?
    {
        return Ok(lun);
    }
    if spec.session.is_none() {
        crate::cmd::replica::refuse_write_without_daemon(&spec)?;
    }
    if spec.session.is_none() && existing_pool(&spec)?.is_none() {
        let users = Users::shared(&spec)?;
        // A replication daemon checks for direct writers after it claims the LUN, so
        // one that claimed it while this waited is seen here.
        if let Some(holder) = Claim::holder(&spec)?
            && let Some(lun) = through_holder(&spec, &holder, write)?
        {
            return Ok(lun);
        }
        // The pool may have been made while this waited: then the engine path applies.
        if existing_pool(&spec)?.is_none() {
            let inner = open_raw(&spec.typed, false)?;
            return Ok(Arc::new(lun::Keeping::new(
                inner,
                Hold::Users { _users: users },
            )));
        }
    }
    let Some(pool) = existing_pool(&spec)? else {
        bail!(
            "{typed}: {} has no snapshot pool, so no session {:?}",
            spec.typed,
            spec.session.unwrap_or_default()
        );
    };
    let mut claim = match (Claim::take(&spec)?, &spec.session) {
        (Ok(claim), _) => claim,
        // The holder serves its sessions to other processes.
        (Err(holder), Some(name)) if holder.socket.is_some() => {
            return crate::cmd::snapshot::session_through(&spec, &holder, name, write);
        }
        (Err(holder), _) => match through_holder(&spec, &holder, write)? {
            Some(lun) => return Ok(lun),
            None => bail!("{typed}: {}", holder.refusal(&spec.typed)),
        },
    };
    let source = open_raw(&spec.source, false)?;
    let reach = source.reach();
    let snaps = open_engine(&spec, source.clone(), &pool)?;
    // Snapshot commands on the LUN reach this process while it uses the LUN.
    let listener = claim.listen()?;
    let user = InUse {
        who: format!("vapp {}", this_command()),
        advice: "stop it first".into(),
    };
    Arc::new(Service::in_use(spec.clone(), source, snaps.clone(), user)).serve(listener);
    let inner: Arc<dyn Lun> = match &spec.session {
        None => snaps.source(),
        Some(name) => {
            let session = open_session(&snaps, typed, name)?;
            if write && session.is_read_only() {
                bail!(
                    "{typed}: a read-only snapshot session; open it read-only, or take a \
                     session with --writable to write to it"
                );
            }
            session
        }
    };
    Ok(Arc::new(
        lun::Keeping::new(
            inner,
            Hold::Engine {
                _snaps: snaps,
                _claim: claim,
            },
        )
        // Where the source really is: the engine's view says nothing about it.
        .reached(reach),
    ))
}

/// A clone LUN written through its source's engine, which logs the writes for the next sync.
fn open_clone(typed: &str, entry: &crate::cmd::clone::CloneEntry) -> anyhow::Result<Arc<dyn Lun>> {
    let src = Spec::parse(&entry.source);
    let pool = existing_pool(&src)?
        .with_context(|| format!("{typed}: its source {}'s pool is gone", entry.source))?;
    let claim = match Claim::take(&src)? {
        Ok(claim) => claim,
        Err(holder) => bail!(
            "{typed}: a clone of {}: {}",
            entry.source,
            holder.refusal(&entry.source)
        ),
    };
    let source = open_raw(&src.source, false)?;
    let reach = source.reach();
    let snaps = open_engine(&src, source, &pool)?;
    let inner: Arc<dyn Lun> = snaps
        .clone_view(&entry.name)
        .with_context(|| format!("{typed}: cannot open the clone"))?;
    Ok(Arc::new(
        lun::Keeping::new(
            inner,
            Hold::Engine {
                _snaps: snaps,
                _claim: claim,
            },
        )
        // Where the source really is: the engine's view says nothing about it.
        .reached(reach),
    ))
}

/// Session `name` of `snaps`, or an error naming the sessions that exist.
pub fn open_session(snaps: &Snapshots, typed: &str, name: &str) -> anyhow::Result<Arc<dyn Lun>> {
    match snaps.session(name) {
        Ok(lun) => Ok(lun),
        Err(snapshot::SnapError::UnknownSession { .. }) => {
            let names: Vec<String> = snaps.list().into_iter().map(|s| s.name).collect();
            let have = if names.is_empty() {
                "it has no sessions".to_string()
            } else {
                format!("its sessions: {}", names.join(", "))
            };
            bail!("{typed}: no snapshot session {name:?}; {have}")
        }
        Err(e) => Err(e).with_context(|| format!("{typed}: cannot open the session")),
    }
}

/// Opens the engine of `spec` on its existing `pool` and attaches the clones recorded for it.
pub fn open_engine(
    spec: &Spec,
    source: Arc<dyn Lun>,
    pool: &str,
) -> anyhow::Result<Arc<Snapshots>> {
    let pool_lun = open_raw(pool, false)?;
    let snaps = Snapshots::open(source, pool_lun)
        .with_context(|| format!("{}: cannot open its snapshot pool {pool}", spec.typed))?;
    for info in snaps.clones() {
        let Some(path) = info.lun.strip_prefix("file:") else {
            continue;
        };
        match open_raw(path, false) {
            Ok(lun) => {
                if let Err(e) = snaps.attach_clone(&info.name, lun) {
                    tracing::warn!(clone = %info.name, error = %e, "cannot attach a clone");
                }
            }
            Err(e) => tracing::warn!(clone = %info.name, error = %e, "cannot open a clone"),
        }
    }
    Ok(Arc::new(snaps))
}

/// This process's command line after `vapp`, for the claim record: what a refused user is
/// told to stop.
pub fn this_command() -> String {
    let words: Vec<String> = std::env::args().skip(1).take(6).collect();
    words.join(" ")
}

/// Who holds a LUN's claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    pub source: String,
    pub pid: u32,
    /// The holder's command line after `vapp`.
    pub command: String,
    /// Where snapshot commands reach it, if it takes them.
    pub socket: Option<PathBuf>,
    /// A replication primary's daemon: where writers reach the LUN through it (NBD), so
    /// nothing written bypasses replication.
    #[serde(default)]
    pub writers: Option<PathBuf>,
    /// Why every writer is refused, after "LUN is" (a replication secondary: only its
    /// primary writes it).
    #[serde(default)]
    pub refuse: Option<String>,
}

impl ClaimRecord {
    /// The error for a command that may not open the LUN while this process holds it.
    pub fn refusal(&self, lun: &str) -> String {
        if let Some(why) = &self.refuse {
            return format!("{lun} is {why}");
        }
        if self.writers.is_some() {
            return format!(
                "{lun} is written through its replication daemon `vapp {}` (pid {}), which \
                 takes snapshot commands only in synchronous mode (in asynchronous mode its \
                 delta sets own the snapshot engine)",
                self.command, self.pid
            );
        }
        format!(
            "{lun} is in use by `vapp {}` (pid {}): only that process writes it while it has \
             snapshots; stop it first",
            self.command, self.pid
        )
    }
}

/// Where a replication primary's daemon serves writers of `spec` over NBD.
pub fn writers_socket(spec: &Spec) -> PathBuf {
    claims_dir().join(format!("{}.writers.nbd", key_hash(&spec.source)))
}

/// A LUN opened through the process holding it, when that process serves writers (a
/// replication primary); an error when it refuses them (a secondary); `None` otherwise.
fn through_holder(
    spec: &Spec,
    holder: &ClaimRecord,
    write: bool,
) -> anyhow::Result<Option<Arc<dyn Lun>>> {
    let typed = &spec.typed;
    if holder.refuse.is_some() {
        bail!("{}", holder.refusal(typed));
    }
    let Some(socket) = &holder.writers else {
        return Ok(None);
    };
    let lun = lun::NbdLun::connect(
        lun::NbdTarget::Unix(socket.clone()),
        "",
        lun::NbdOptions {
            read_only: !write,
            ..Default::default()
        },
    )
    .with_context(|| {
        format!(
            "{typed}: cannot reach `vapp {}` (pid {}), which writes it for replication",
            holder.command, holder.pid
        )
    })?;
    Ok(Some(Arc::new(crate::cmd::replica::Routed::new(spec, lun)?)))
}

/// Where the holder of `spec` serves its session `name` over NBD.
pub fn session_socket(spec: &Spec, name: &str) -> PathBuf {
    // Unix socket paths are short: the hash part of the key only.
    claims_dir().join(format!("{}.{name}.nbd", key_hash(&spec.source)))
}

fn claims_dir() -> PathBuf {
    crate::cmd::vm::runtime::runtime_root().join("luns")
}

/// This process's claim on a LUN, released when dropped.
pub struct Claim {
    lock: Flock<File>,
    record: ClaimRecord,
    lock_path: PathBuf,
    socket_path: PathBuf,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("record", &self.record)
            .finish()
    }
}

impl Claim {
    /// Claims `spec`'s source for this process, or returns the holder's record.
    pub fn take(spec: &Spec) -> anyhow::Result<Result<Claim, ClaimRecord>> {
        let dir = claims_dir();
        let lock_path = dir.join(format!("{}.lock", spec.key()));
        let socket_path = dir.join(format!("{}.sock", spec.key()));
        // A holder unlinks its file on exit: retry until the file locked is the one at the path.
        for attempt in 0..100 {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .with_context(|| format!("creating the runtime directory {}", dir.display()))?;
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&lock_path)
            {
                Ok(file) => file,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("opening {}", lock_path.display()));
                }
            };
            let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((file, Errno::EWOULDBLOCK)) => match read_record(file, spec) {
                    Some(record) => return Ok(Err(record)),
                    // A holder between its lock and its record, or another process
                    // looking ([`Claim::holder`]) for an instant: look again.
                    None if attempt < 99 => {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        continue;
                    }
                    None => {
                        return Ok(Err(ClaimRecord {
                            source: spec.source.clone(),
                            pid: 0,
                            command: "(starting)".into(),
                            socket: None,
                            writers: None,
                            refuse: None,
                        }));
                    }
                },
                Err((_, errno)) => {
                    return Err(errno).with_context(|| format!("locking {}", lock_path.display()));
                }
            };
            let same = fs::metadata(&lock_path)
                .is_ok_and(|m| lock.metadata().is_ok_and(|l| l.ino() == m.ino()));
            if !same {
                continue;
            }
            let mut claim = Claim {
                lock,
                record: ClaimRecord {
                    source: spec.source.clone(),
                    pid: std::process::id(),
                    command: this_command(),
                    socket: None,
                    writers: None,
                    refuse: None,
                },
                lock_path,
                socket_path,
            };
            claim.publish()?;
            return Ok(Ok(claim));
        }
        bail!(
            "{}: the claim file keeps changing under us",
            lock_path.display()
        )
    }

    fn publish(&mut self) -> anyhow::Result<()> {
        let json = serde_json::to_vec(&self.record)?;
        self.lock.set_len(0)?;
        self.lock.rewind()?;
        self.lock.write_all(&json)?;
        Ok(())
    }

    /// Who holds `spec`'s claim, if anyone does; takes nothing.
    pub fn holder(spec: &Spec) -> anyhow::Result<Option<ClaimRecord>> {
        let lock_path = claims_dir().join(format!("{}.lock", spec.key()));
        let file = match File::open(&lock_path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {}", lock_path.display())),
        };
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            // Nobody holds it; the shared lock goes with the file.
            Ok(_) => Ok(None),
            Err((file, Errno::EWOULDBLOCK)) => {
                Ok(Some(read_record(file, spec).unwrap_or(ClaimRecord {
                    source: spec.source.clone(),
                    pid: 0,
                    command: "(starting)".into(),
                    socket: None,
                    writers: None,
                    refuse: None,
                })))
            }
            Err((_, errno)) => {
                Err(errno).with_context(|| format!("locking {}", lock_path.display()))
            }
        }
    }

    /// Tells other processes that writers reach the LUN through `socket` (or no longer).
    pub fn serve_writers(&mut self, socket: Option<PathBuf>) -> anyhow::Result<()> {
        self.record.writers = socket;
        self.publish()
    }

    /// Refuses every other writer with `why` (or no longer).
    pub fn refuse_writers(&mut self, why: Option<String>) -> anyhow::Result<()> {
        self.record.refuse = why;
        self.publish()
    }

    /// Serves snapshot commands on this LUN's control socket from now on.
    pub fn listen(&mut self) -> anyhow::Result<std::os::unix::net::UnixListener> {
        match fs::remove_file(&self.socket_path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing {}", self.socket_path.display()));
            }
        }
        let listener = std::os::unix::net::UnixListener::bind(&self.socket_path)
            .with_context(|| format!("binding {}", self.socket_path.display()))?;
        self.record.socket = Some(self.socket_path.clone());
        self.publish()?;
        Ok(listener)
    }
}

impl Claim {
    fn record_key_hash(&self) -> String {
        key_hash(&self.record.source)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Unlinked while still locked, so a newcomer never locks a file that is going away.
        if self.record.socket.is_some() {
            let _ = fs::remove_file(&self.socket_path);
            // The sessions this process served to others.
            let hash = self.record_key_hash();
            if let Ok(entries) = fs::read_dir(claims_dir()) {
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with(&format!("{hash}.")) && name.ends_with(".nbd") {
                        let _ = fs::remove_file(entry.path());
                    }
                }
            }
        }
        if let Some(writers) = &self.record.writers {
            let _ = fs::remove_file(writers);
        }
        let _ = fs::remove_file(&self.lock_path);
    }
}

/// The processes that write a LUN without snapshots directly (a `flock` on
/// `luns/<key>.users`): each holds it shared, and the first snapshot, which puts the
/// engine under the LUN, needs it exclusive, so it is refused while another process could
/// still write around the engine.
#[derive(Debug)]
pub struct Users {
    lock: Flock<File>,
    path: PathBuf,
}

impl Drop for Users {
    fn drop(&mut self) {
        // The last user removes the file, still locked, so nobody locks a file going away.
        if self.lock.relock(FlockArg::LockExclusiveNonblock).is_ok() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Users {
    fn open(spec: &Spec, arg: FlockArg) -> anyhow::Result<Result<Users, Errno>> {
        let dir = claims_dir();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating the runtime directory {}", dir.display()))?;
        let path = dir.join(format!("{}.users", spec.key()));
        // The last user unlinks the file: retry until the file locked is the one at the path.
        for _ in 0..100 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            let lock = match Flock::lock(file, arg) {
                Ok(lock) => lock,
                Err((_, e)) => return Ok(Err(e)),
            };
            let same = fs::metadata(&path)
                .is_ok_and(|m| lock.metadata().is_ok_and(|l| l.ino() == m.ino()));
            if same {
                return Ok(Ok(Users { lock, path }));
            }
        }
        bail!("{}: the users file keeps changing under us", path.display())
    }

    /// A share for a direct writer. The exclusive holders are brief (the last user leaving,
    /// a first snapshot being taken), so this waits for them a little.
    pub fn shared(spec: &Spec) -> anyhow::Result<Users> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Users::open(spec, FlockArg::LockSharedNonblock)? {
                Ok(users) => return Ok(users),
                Err(Errno::EWOULDBLOCK) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(Errno::EWOULDBLOCK) => bail!(
                    "{}: its first snapshot is being taken; open it again in a moment",
                    spec.typed
                ),
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("{}: locking its users file", spec.typed));
                }
            }
        }
    }

    /// Makes sure no other process writes the LUN directly; `own` is this process's share.
    pub fn alone(spec: &Spec, own: Option<&Users>) -> anyhow::Result<Option<Users>> {
        let refused = || {
            anyhow::anyhow!(
                "{}: another vapp process writes it directly (a mount, an export or a command \
                 on it); its first snapshot puts the snapshot engine under it, so stop the \
                 others first",
                spec.typed
            )
        };
        match own {
            Some(users) => match users.lock.relock(FlockArg::LockExclusiveNonblock) {
                Ok(()) => Ok(None),
                Err(Errno::EWOULDBLOCK) => Err(refused()),
                Err(e) => Err(e).with_context(|| format!("{}: locking its users file", spec.typed)),
            },
            None => match Users::open(spec, FlockArg::LockExclusiveNonblock)? {
                Ok(users) => Ok(Some(users)),
                Err(Errno::EWOULDBLOCK) => Err(refused()),
                Err(e) => Err(e).with_context(|| format!("{}: locking its users file", spec.typed)),
            },
        }
    }
}

fn read_record(mut file: File, spec: &Spec) -> Option<ClaimRecord> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    let record: ClaimRecord = serde_json::from_str(&text).ok()?;
    (record.source == spec.source).then_some(record)
}

/// What a LUN opened here keeps for as long as it lives.
#[derive(Debug)]
enum Hold {
    /// The engine it is written through, and the claim that makes this process its one writer.
    Engine {
        _snaps: Arc<Snapshots>,
        _claim: Claim,
    },
    /// A direct writer's share of a LUN without snapshots.
    Users { _users: Users },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_final_session_name_is_split() {
        let s = Spec::parse("/nonexistent/disk.img@before-upgrade");
        assert_eq!(s.typed, "/nonexistent/disk.img");
        assert_eq!(s.session.as_deref(), Some("before-upgrade"));
        let s = Spec::parse("nbd://user@host:10809/disk");
        assert_eq!(s.session, None);
        let s = Spec::parse("nbd://host:10809/disk@s1");
        assert_eq!(s.typed, "nbd://host:10809/disk");
        assert_eq!(s.session.as_deref(), Some("s1"));
        assert_eq!(Spec::parse("@s1").session, None);
    }

    #[test]
    fn an_existing_file_named_with_an_at_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x@y");
        fs::write(&path, b"").unwrap();
        let s = Spec::parse(path.to_str().unwrap());
        assert_eq!(s.session, None);
    }
}
