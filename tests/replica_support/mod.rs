//! Two replication sites on one machine: each site is a network namespace (joined to the
//! other by one veth pair) with its own `VAPP_STATE_DIR` and `VAPP_RUNTIME_DIR`, and runs
//! `vapp` under `ip netns exec`. Everything a site started (replica daemons, exports) is
//! killed, and the namespaces removed, when [`Sites`] is dropped.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lun::Lun;
use serde_json::Value;

pub const MIB: u64 = 1 << 20;
pub const BLOCK: u64 = 4096;
/// The engine's default region (one dirty-bitmap bit).
pub const REGION: u64 = 64 << 10;
pub const PORT: u16 = 7788;

/// Root, `ip` and `nft` are needed; prints why the test is skipped otherwise.
pub fn prerequisites() -> bool {
    lun::prereq::require(lun::prereq::is_root(), "root (network namespaces)")
        && lun::prereq::require(
            Command::new("ip")
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "the ip command (iproute2)",
        )
        && lun::prereq::require(lun::prereq::have_command("nft"), "nft (nftables)")
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One site: a namespace, its address on the link, its own state and runtime directories.
pub struct Site {
    pub name: &'static str,
    pub ns: String,
    pub ip: String,
    pub dir: PathBuf,
}

impl Site {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn p(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    /// This site's replication address on `port`.
    pub fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }

    fn state(&self) -> PathBuf {
        self.path("state")
    }

    /// `vapp` run inside this site's namespace with its own registry and runtime dir.
    pub fn command(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, env!("CARGO_BIN_EXE_vapp")]);
        self.site_env(&mut c);
        c
    }

    /// `vapp` with this site's registry and runtime dir in the test's own namespaces:
    /// for a FUSE mount, which `ip netns exec` would hide in a mount namespace of its own.
    pub fn host_command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vapp"));
        self.site_env(&mut c);
        c
    }

    fn site_env(&self, c: &mut Command) {
        c.env_remove("VAPP_DATASTORE")
            .env_remove("VAPP_KEEP_SIGNATURE")
            .env("VAPP_HOST_NAME", format!("site-{}", self.name))
            .env("VAPP_STATE_DIR", self.state())
            .env("VAPP_RUNTIME_DIR", self.path("run"))
            .stdin(Stdio::null());
    }

    pub fn vapp(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// Runs `vapp ARGS`, which must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.vapp(args);
        assert!(
            out.status.success(),
            "site {}: vapp {args:?} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `vapp ARGS`, which must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.vapp(args);
        assert!(
            !out.status.success(),
            "site {}: vapp {args:?} succeeded: {}",
            self.name,
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// A secret file owned by root, mode 0600.
    pub fn secret(&self, name: &str, secret: &str) -> String {
        let path = self.path(name);
        std::fs::write(&path, format!("{secret}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path.to_str().unwrap().to_string()
    }

    /// A sparse LUN file of `size` bytes (zeros).
    pub fn lun(&self, name: &str, size: u64) -> String {
        let path = self.path(name);
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        path.to_str().unwrap().to_string()
    }

    /// `replica create LUN --role ROLE` towards `other`, with the same port both ways.
    pub fn create(&self, lun: &str, role: &str, other: &Site, extra: &[&str]) -> String {
        self.create_on(lun, role, other, PORT, extra)
    }

    /// [`Site::create`] with `port` at both ends.
    pub fn create_on(
        &self,
        lun: &str,
        role: &str,
        other: &Site,
        port: u16,
        extra: &[&str],
    ) -> String {
        let mut args = vec!["replica", "create", lun, "--role", role, "--secret-file"];
        let secret = self.p("secret");
        let listen = self.addr(port);
        let peer = other.addr(port);
        args.extend([secret.as_str(), "--listen", &listen, "--peer", &peer]);
        args.extend(extra);
        self.ok(&args)
    }

    /// `replica status LUN --json`: this LUN's object.
    pub fn status(&self, lun: &str) -> Value {
        let text = self.ok(&["replica", "status", lun, "--json"]);
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("status --json of {lun} is not JSON ({e}): {text}"));
        let list = v.as_array().expect("status --json prints an array");
        assert_eq!(list.len(), 1, "status {lun} --json: {text}");
        list[0].clone()
    }

    /// Polls the status of `lun` until `pred` holds; panics with the last status and the
    /// daemon logs after `timeout`.
    pub fn wait(
        &self,
        lun: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(lun);
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "site {}: {lun} not {what} within {timeout:?}; status: {s:#}{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until a primary is connected with nothing left to copy.
    pub fn wait_in_sync(&self, lun: &str, timeout: Duration) -> Value {
        self.wait(lun, "connected and in sync", timeout, |s| {
            s["link"] == "connected" && s["out_of_sync_bytes"] == 0
        })
    }

    /// The pid of the daemon of `lun`, which must be running.
    pub fn daemon_pid(&self, lun: &str) -> i32 {
        let s = self.status(lun);
        assert_eq!(
            s["running"], true,
            "site {}: {lun} daemon not running: {s:#}",
            self.name
        );
        s["pid"].as_i64().expect("a running daemon has a pid") as i32
    }

    /// kill -9 of the daemon of `lun`; returns once the process is gone.
    pub fn kill9_daemon(&self, lun: &str) {
        let pid = self.daemon_pid(lun);
        kill9(pid);
    }

    /// Every daemon log of this site, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(dir) = std::fs::read_dir(self.state().join("replicas")) {
            for e in dir.flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    out.push_str(&format!(
                        "\n--- site {} log {}:\n",
                        self.name,
                        e.path().display()
                    ));
                    for l in tail.iter().rev() {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }

    /// Starts `vapp export SPEC --socket S` in this site and waits until it listens.
    pub fn export(&self, spec: &str, extra: &[&str]) -> Export {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let socket = self.path(&format!("nbd-{n}.sock"));
        let mut child = self
            .command()
            .args(["export", spec, "--socket", socket.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if !line.starts_with("nbd") {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            let _ = child.wait();
            panic!(
                "site {}: vapp export {spec} did not start: {err}{}",
                self.name,
                self.logs()
            );
        }
        Export {
            child,
            socket,
            url: line.trim().to_string(),
        }
    }
}

/// kill -9 of a process that is not our child; returns once it is gone (or a zombie).
pub fn kill9(pid: i32) {
    let p = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "pid {pid} survived kill -9");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Processes whose environment names `state_dir` as their VAPP_STATE_DIR: the daemons and
/// exports a site started (they are detached, so not our children).
fn processes_of(state_dir: &Path) -> Vec<i32> {
    let needle = format!("VAPP_STATE_DIR={}", state_dir.display());
    let mut pids = Vec::new();
    let me = std::process::id() as i32;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// Two sites A (10.N.0.1) and B (10.N.0.2) joined by one veth pair; removed on drop.
pub struct Sites {
    pub a: Site,
    pub b: Site,
    veth: String,
    _dir: tempfile::TempDir,
}

impl Sites {
    pub fn new() -> Sites {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let dir = tempfile::Builder::new()
            .prefix("vapp-replica-")
            .tempdir_in(if Path::new("/dev/shm").is_dir() {
                "/dev/shm"
            } else {
                "/tmp"
            })
            .unwrap();
        let site = |name: &'static str, ip: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            Site {
                name,
                ns: format!("vapprepl{tag}{name}"),
                ip: ip.to_string(),
                dir: d,
            }
        };
        // The addresses live only inside the two namespaces, so every test can use the same.
        let sites = Sites {
            a: site("a", "10.77.0.1"),
            b: site("b", "10.77.0.2"),
            veth: format!("vr{tag}a"),
            _dir: dir,
        };
        let peer_end = format!("vr{tag}b");
        for s in [&sites.a, &sites.b] {
            sh(&["ip", "netns", "add", &s.ns]);
        }
        sh(&[
            "ip",
            "link",
            "add",
            &sites.veth,
            "netns",
            &sites.a.ns,
            "type",
            "veth",
            "peer",
            "name",
            &peer_end,
            "netns",
            &sites.b.ns,
        ]);
        for (s, dev) in [(&sites.a, &sites.veth), (&sites.b, &peer_end)] {
            let cidr = format!("{}/30", s.ip);
            sh(&["ip", "-n", &s.ns, "addr", "add", &cidr, "dev", dev]);
            sh(&["ip", "-n", &s.ns, "link", "set", dev, "up"]);
            sh(&["ip", "-n", &s.ns, "link", "set", "lo", "up"]);
        }
        sites
    }

    /// Drops every packet between the sites (nftables inside site A's namespace).
    pub fn cut(&self) {
        let rules = format!(
            "table inet vapp_cut {{\n chain in {{ type filter hook input priority 0; policy accept; ip saddr {b} drop; }}\n chain out {{ type filter hook output priority 0; policy accept; ip daddr {b} drop; }}\n}}\n",
            b = self.b.ip
        );
        self.rules(&rules);
    }

    /// Cuts what goes to or comes from `port` at site B (nftables inside site A's
    /// namespace; new connections are reset): one link of several is lost, the others
    /// stay up.
    pub fn cut_port(&self, port: u16) {
        let rules = format!(
            "table inet vapp_cut {{\n chain in {{ type filter hook input priority 0; policy accept; ip saddr {b} tcp sport {port} drop; }}\n chain out {{ type filter hook output priority 0; policy accept; ip daddr {b} tcp dport {port} reject with tcp reset; }}\n}}\n",
            b = self.b.ip
        );
        self.rules(&rules);
    }

    /// Drops every packet of more than 100 bytes to or from `port` at site B: TCP
    /// connections still open, nothing that carries data gets through.
    pub fn cut_port_large(&self, port: u16) {
        self.rules(&format!(
            "table inet vapp_cut {{\n chain in {{ type filter hook input priority 0; policy accept; ip saddr {b} tcp sport {port} ip length > 100 drop; }}\n chain out {{ type filter hook output priority 0; policy accept; ip daddr {b} tcp dport {port} ip length > 100 drop; }}\n}}\n",
            b = self.b.ip
        ));
    }

    fn rules(&self, rules: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.a.ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(
            child.wait().unwrap().success(),
            "nft rules not added: {rules}"
        );
    }

    /// Removes the rule of [`Sites::cut`] or [`Sites::cut_port`].
    pub fn restore(&self) {
        sh(&[
            "ip", "netns", "exec", &self.a.ns, "nft", "delete", "table", "inet", "vapp_cut",
        ]);
    }

    /// Runs `f` on a thread inside site `site`'s network namespace.
    pub fn in_site<T: Send + 'static>(site: &Site, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = format!("/run/netns/{}", site.ns);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&ns).unwrap();
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        for s in [&self.a, &self.b] {
            for pid in processes_of(&s.state()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for s in [&self.a, &self.b] {
            let deadline = Instant::now() + Duration::from_secs(5);
            while processes_of(&s.state()).into_iter().any(alive) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for s in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["-n", &s.ns, "link", "delete", &self.veth])
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("ip").args(["netns", "delete", &s.ns]).status();
        }
    }
}

/// A running `vapp export`, killed when dropped.
pub struct Export {
    pub child: Child,
    pub socket: PathBuf,
    pub url: String,
}

impl Export {
    pub fn client(&self) -> lun::NbdLun {
        lun::NbdLun::connect(
            lun::NbdTarget::Unix(self.socket.clone()),
            "",
            lun::NbdOptions {
                connections: 1,
                io_timeout: Duration::from_secs(60),
                ..lun::NbdOptions::default()
            },
        )
        .unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.kill();
    }
}

const SEQ_MAGIC: u64 = 0x5641_5050_5345_5131; // "VAPPSEQ1"

/// A 4 KiB block that says where it belongs and which write put it there.
pub fn seq_block(offset: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![(seq % 251) as u8; BLOCK as usize];
    b[0..8].copy_from_slice(&SEQ_MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b
}

/// The seq of a block written by [`seq_block`] for `offset`; None for a block never
/// written (zeros); panics on anything else (a torn or misplaced block).
pub fn block_seq(block: &[u8], offset: u64) -> Option<u64> {
    if block.iter().all(|b| *b == 0) {
        return None;
    }
    let get = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().unwrap());
    assert_eq!(
        get(0),
        SEQ_MAGIC,
        "block at {offset} is neither zero nor a sequence block"
    );
    assert_eq!(
        get(8),
        offset,
        "block at {offset} holds the block of another offset"
    );
    let seq = get(16);
    assert!(
        block[24..].iter().all(|b| *b == (seq % 251) as u8),
        "block at {offset} (seq {seq}) is torn"
    );
    Some(seq)
}

/// Writes as (seq, offset), in the order they were sent.
pub type Writes = Vec<(u64, u64)>;

/// A writer thread: one write at a time, each a [`seq_block`] at an offset chosen by
/// `next`, seq counting from 1. `issued` holds every write sent, `acked` the ones the
/// export acknowledged; it stops at the first error (kept in `error`). With `flush_every`
/// above zero it flushes after that many writes, as a real workload does (a replica is
/// durable only up to the last flush), and `flushed` counts the issued writes the last
/// successful flush covered.
pub struct SeqWriter {
    pub issued: Arc<Mutex<Vec<(u64, u64)>>>,
    pub acked: Arc<Mutex<Vec<(u64, u64)>>>,
    pub error: Arc<Mutex<Option<String>>>,
    pub flushed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl SeqWriter {
    pub fn start(
        lun: Arc<dyn Lun>,
        first_seq: u64,
        pace: Duration,
        flush_every: u64,
        mut next: impl FnMut(u64) -> u64 + Send + 'static,
    ) -> SeqWriter {
        let issued = Arc::new(Mutex::new(Vec::new()));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let error = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let flushed = Arc::new(AtomicUsize::new(0));
        let f = flushed.clone();
        let (i, a, e, s) = (issued.clone(), acked.clone(), error.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut seq = first_seq;
            while !s.load(Ordering::SeqCst) {
                let offset = next(seq);
                i.lock().unwrap().push((seq, offset));
                match lun.write_at(&seq_block(offset, seq), offset) {
                    Ok(()) => a.lock().unwrap().push((seq, offset)),
                    Err(err) => {
                        *e.lock().unwrap() = Some(err.to_string());
                        return;
                    }
                }
                if flush_every > 0 && seq % flush_every == 0 {
                    let covered = i.lock().unwrap().len();
                    if let Err(err) = lun.flush() {
                        *e.lock().unwrap() = Some(format!("flush: {err}"));
                        return;
                    }
                    f.store(covered, Ordering::SeqCst);
                }
                seq += 1;
                if !pace.is_zero() {
                    std::thread::sleep(pace);
                }
            }
        });
        SeqWriter {
            issued,
            acked,
            error,
            flushed,
            stop,
            handle: Some(handle),
        }
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `n` writes were acknowledged (panics after `timeout`).
    pub fn wait_acked(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.acked_count() < n {
            let error = self.error.lock().unwrap().clone();
            assert!(
                Instant::now() < deadline,
                "only {} writes acknowledged within {timeout:?} (error: {error:?})",
                self.acked_count(),
            );
            assert!(error.is_none(), "writer failed: {error:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the writer stopped on an error; returns it.
    pub fn wait_error(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.error.lock().unwrap().clone() {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "writes still succeed after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the writer and returns (issued, acknowledged) writes as (seq, offset).
    pub fn stop(mut self) -> (Writes, Writes) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        (
            self.issued.lock().unwrap().clone(),
            self.acked.lock().unwrap().clone(),
        )
    }
}

impl Drop for SeqWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Reads the block at every offset in `offsets` from a LUN file.
pub fn read_blocks(
    path: &str,
    offsets: impl IntoIterator<Item = u64>,
) -> BTreeMap<u64, Option<u64>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; BLOCK as usize];
    for off in offsets {
        f.read_exact_at(&mut buf, off).unwrap();
        out.insert(off, block_seq(&buf, off));
    }
    out
}

/// Every acknowledged write is in `image`: at each offset the latest seq there is at least
/// the latest acknowledged one.
pub fn assert_acked_present(image: &BTreeMap<u64, Option<u64>>, acked: &[(u64, u64)]) {
    let mut latest: BTreeMap<u64, u64> = BTreeMap::new();
    for (seq, off) in acked {
        let e = latest.entry(*off).or_default();
        *e = (*e).max(*seq);
    }
    let mut lost = Vec::new();
    for (off, seq) in &latest {
        match image.get(off).copied().flatten() {
            Some(have) if have >= *seq => {}
            have => lost.push(format!(
                "offset {off}: acknowledged seq {seq}, replica has {have:?}"
            )),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged blocks lost, e.g. {:?}",
        lost.len(),
        latest.len(),
        &lost[..lost.len().min(5)]
    );
}

/// `image` is the state after exactly the writes up to some seq n (in issue order) and
/// none after: write-order consistent. Returns n (0 when nothing arrived).
pub fn assert_write_order(image: &BTreeMap<u64, Option<u64>>, issued: &[(u64, u64)]) -> u64 {
    let n = image.values().flatten().copied().max().unwrap_or(0);
    let mut expect: BTreeMap<u64, Option<u64>> = image.keys().map(|k| (*k, None)).collect();
    for (seq, off) in issued {
        if *seq <= n {
            expect.insert(*off, Some(*seq));
        }
    }
    let bad: Vec<String> = expect
        .iter()
        .filter(|(off, want)| image.get(off) != Some(want))
        .map(|(off, want)| {
            format!(
                "offset {off}: expected {want:?}, replica has {:?}",
                image[off]
            )
        })
        .collect();
    assert!(
        bad.is_empty(),
        "replica holds write {n} but not the state after writes 1..={n}: {} blocks differ, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    n
}

/// Byte-for-byte equality of two LUN files, reporting the first differing MiB.
pub fn assert_same_bytes(a: &str, b: &str) {
    use std::os::unix::fs::FileExt;
    let (fa, fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    assert_eq!(la, lb, "{a} and {b} differ in size");
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut off = 0;
    let mut differing = Vec::new();
    while off < la {
        let n = (la - off).min(MIB) as usize;
        fa.read_exact_at(&mut ba[..n], off).unwrap();
        fb.read_exact_at(&mut bb[..n], off).unwrap();
        if ba[..n] != bb[..n] {
            differing.push(off / MIB);
        }
        off += n as u64;
    }
    assert!(
        differing.is_empty(),
        "{a} and {b} differ in {} MiB, first at MiB {:?}",
        differing.len(),
        &differing[..differing.len().min(8)]
    );
}

/// sha256 of a whole file.
pub fn file_sha(path: &str) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

/// Distinct regions the writes touch.
pub fn regions_of(writes: &[(u64, u64)]) -> u64 {
    let set: std::collections::BTreeSet<u64> = writes.iter().map(|(_, off)| off / REGION).collect();
    set.len() as u64
}

/// Fills a LUN file with a pattern so a replica that got nothing is told apart from one
/// that got zeros.
pub fn fill_pattern(path: &str, seed: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let chunk: Vec<u8> = (0..MIB as usize)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect();
    let mut off = 0;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        f.write_all_at(&chunk[..n], off).unwrap();
        off += n as u64;
    }
}

pub fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}
