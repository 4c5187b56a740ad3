//! `vapp replica` as a user runs it on one machine: two "sites" (each its own registry and
//! runtime directory) replicating two files over 127.0.0.1, their daemons real detached
//! processes, killed with -9 where a crash is the point.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The smallest datastore vapp formats fits.
const LUN_SIZE: u64 = 128 << 20;

/// One site: its own state and runtime directories in the test's directory.
struct Site {
    root: PathBuf,
    name: &'static str,
}

impl Site {
    fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vapp"));
        c.env_remove("VAPP_DATASTORE")
            .env_remove("VAPP_HOST_NAME")
            .env_remove("VAPP_HOST_UUID")
            .env(
                "VAPP_STATE_DIR",
                self.root.join(format!("state-{}", self.name)),
            )
            .env(
                "VAPP_RUNTIME_DIR",
                self.root.join(format!("run-{}", self.name)),
            );
        c
    }

    fn vapp(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.vapp(args);
        assert!(
            out.status.success(),
            "site {}: vapp {args:?} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.vapp(args);
        assert!(
            !out.status.success(),
            "site {}: vapp {args:?} succeeded: {}",
            self.name,
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    fn status(&self, lun: &str) -> serde_json::Value {
        let all: serde_json::Value =
            serde_json::from_str(&self.ok(&["replica", "status", lun, "--json"])).unwrap();
        assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
        all[0].clone()
    }

    /// The last lines of this site's daemon logs, for a failure's message.
    fn log_tail(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.registry())
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.path().extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                out += &lines[lines.len().saturating_sub(40)..].join("\n");
            }
        }
        out
    }

    fn registry(&self) -> PathBuf {
        self.root
            .join(format!("state-{}", self.name))
            .join("replicas")
    }
}

impl Drop for Site {
    /// Daemons outlive their commands by design: stop this site's.
    fn drop(&mut self) {
        let Ok(out) = self
            .command()
            .args(["replica", "status", "--json"])
            .output()
        else {
            return;
        };
        let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        for s in all.as_array().into_iter().flatten() {
            if let Some(pid) = s["pid"].as_i64() {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

/// Its sites drop (stopping their daemons) before the directory goes.
struct Pair {
    a: Site,
    b: Site,
    lun_a: String,
    lun_b: String,
    secret: String,
    port_a: u16,
    port_b: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Pair {
    /// Two sparse files, a secret only its owner reads, nothing replicated yet.
    fn new() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let path = dir.path().join(name);
            std::fs::File::create(&path)
                .unwrap()
                .set_len(LUN_SIZE)
                .unwrap();
            path.to_str().unwrap().to_string()
        };
        let (lun_a, lun_b) = (file("a.img"), file("b.img"));
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "correct horse battery staple\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let site = |name| Site {
            root: dir.path().to_path_buf(),
            name,
        };
        Pair {
            a: site("a"),
            b: site("b"),
            lun_a,
            lun_b,
            secret: secret.to_str().unwrap().to_string(),
            port_a: free_port(),
            port_b: free_port(),
            dir,
        }
    }

    fn addr(port: u16) -> String {
        format!("127.0.0.1:{port}")
    }

    /// `replica create` on both sites: b the secondary first, then a the primary.
    fn create(&self) {
        for (site, primary) in [(&self.b, false), (&self.a, true)] {
            let out = site.ok(&refs(&self.create_args(primary, &[])));
            assert_eq!(out.lines().count(), 1, "one line: {out}");
        }
    }

    /// `replica create` of site a (`primary`) or b, with `extra` flags.
    fn create_args(&self, primary: bool, extra: &[&str]) -> Vec<String> {
        let (a, b) = (Pair::addr(self.port_a), Pair::addr(self.port_b));
        let (lun, role, listen, peer) = if primary {
            (&self.lun_a, "primary", a, b)
        } else {
            (&self.lun_b, "secondary", b, a)
        };
        let mut args: Vec<String> = [
            "replica",
            "create",
            lun,
            "--role",
            role,
            "--listen",
            &listen,
            "--peer",
            &peer,
            "--secret-file",
            &self.secret,
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Waits until the primary (a) has nothing left to send.
    fn in_sync(&self) -> serde_json::Value {
        self.in_sync_from(&self.a, &self.lun_a)
    }

    fn in_sync_from(&self, site: &Site, lun: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = site.status(lun);
            if s["link"] == "connected" && s["out_of_sync_bytes"] == 0 {
                return s;
            }
            assert!(Instant::now() < deadline, "never in sync: {s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }
}

/// The whole LUN: a digest would cost seconds in a debug build.
fn bytes(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn same_bytes(a: &str, b: &str) -> bool {
    bytes(a) == bytes(b)
}

/// Writes `data` at `offset` of `lun` as another process would: through `vapp export`.
fn write_through_export(p: &Pair, site: &Site, lun: &str, data: &[u8], offset: u64) {
    let socket = p.path(&format!("export-{}.sock", free_port()));
    let mut export = site
        .command()
        .args(["export", lun, "--socket", &socket])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(export.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("nbd"), "the export did not start: {line}");
    let client = lun::NbdLun::connect(
        lun::NbdTarget::Unix(socket.into()),
        "",
        lun::NbdOptions::default(),
    )
    .unwrap();
    lun::Lun::write_at(&client, data, offset).unwrap();
    lun::Lun::flush(&client).unwrap();
    drop(client);
    Command::new("kill")
        .args(["-TERM", &export.id().to_string()])
        .status()
        .unwrap();
    assert!(export.wait().unwrap().success());
}

fn random_file(path: &str, len: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn a_datastore_written_through_the_primary_daemon_reaches_the_secondary_byte_for_byte() {
    let p = Pair::new();
    p.create();
    // Every writer of a goes through its daemon: format, mkdir and put as a user types them.
    p.a.ok(&["datastore", "format", "--name", "site-a", &p.lun_a]);
    p.a.ok(&["-d", &p.lun_a, "mkdir", "/vm"]);
    let src = p.path("disk.bin");
    let data = random_file(&src, 3 << 20);
    p.a.ok(&["-d", &p.lun_a, "put", &src, "/vm/disk.bin"]);

    let a = p.in_sync();
    // Through the daemon, the datastore keeps the compare-and-write locks of a local file.
    let info = p.a.ok(&["datastore", "info", &p.lun_a]);
    assert!(info.contains("compare-and-write"), "{info}");
    assert!(
        same_bytes(&p.lun_a, &p.lun_b),
        "the replica holds every byte of the primary"
    );
    // The replica reads back (read-only opens are not refused) as a copy of the datastore.
    let back = p.path("back.bin");
    p.b.ok(&["-d", &p.lun_b, "get", "/vm/disk.bin", &back]);
    assert_eq!(std::fs::read(&back).unwrap(), data);

    // status --json: the contract's fields.
    let pid = a["pid"].as_u64().unwrap();
    assert_eq!(a["lun"], p.lun_a);
    assert_eq!(a["role"], "primary");
    assert_eq!(a["running"], true);
    assert!(pid > 0);
    assert_eq!(a["mode"], "sync");
    assert_eq!(a["period_ms"], 5000);
    assert_eq!(a["peer"], Pair::addr(p.port_b));
    assert_eq!(a["listen"], Pair::addr(p.port_a));
    assert_eq!(a["policy"], "continue");
    assert!(a["group"].is_null());
    assert_eq!(
        a["rpo_ms"], 0,
        "a synchronous replica holds everything: {a}"
    );
    assert_eq!(a["resync"]["regions_left"], 0);
    assert_eq!(a["resync"]["fraction"], 1.0);
    // The initial sync ran on thin, empty LUNs, racing the format: holes cross unread
    // and uncounted, so at most what was written can have been copied.
    assert!(
        a["bytes_resynced"].as_u64().unwrap() < LUN_SIZE / 2,
        "the initial sync: {a}"
    );
    assert_eq!(a["peer_regions_discarded"], 0);
    assert!(a["last_error"].is_null(), "{a}");
    assert!(a["generation"]["current"].as_u64().unwrap() > 1);
    assert_eq!(a["generation"]["history"].as_array().unwrap().len(), 2);
    assert!(
        a.get("inconsistent").is_none(),
        "secondary-only fields: {a}"
    );

    let b = p.b.status(&p.lun_b);
    assert_eq!(b["role"], "secondary");
    assert_eq!(b["running"], true);
    assert_eq!(b["link"], "connected");
    assert_eq!(b["inconsistent"], false);
    assert!(
        b.get("delta_id").is_some() && b.get("point_in_time_ms").is_some(),
        "{b}"
    );
    assert_eq!(
        b["generation"]["current"], a["generation"]["current"],
        "both sides are at one generation"
    );
    // The table names both.
    let table = p.a.ok(&["replica", "status"]);
    assert!(
        table.contains(&p.lun_a) && table.contains("connected"),
        "{table}"
    );

    // verify finds nothing to resync.
    let out = p.a.ok(&["replica", "verify", &p.lun_a]);
    assert!(out.contains(" 0 of "), "{out}");

    // Snapshot commands reach the daemon, which puts the engine under the replicated write.
    p.a.ok(&["snapshot", "create", &p.lun_a, "before-rm"]);
    p.a.ok(&["-d", &p.lun_a, "rm", "/vm/disk.bin"]);
    let at = format!("{}@before-rm", p.lun_a);
    let kept = p.path("kept.bin");
    p.a.ok(&["-d", &at, "get", "/vm/disk.bin", &kept]);
    assert_eq!(
        std::fs::read(&kept).unwrap(),
        data,
        "the session kept the file"
    );
    p.in_sync();
    assert!(
        same_bytes(&p.lun_a, &p.lun_b),
        "writes after the snapshot still replicate"
    );
    assert_eq!(p.a.status(&p.lun_a)["pid"], a["pid"], "the same daemon");
}

#[test]
fn the_secondary_refuses_every_other_writer_and_changes_nothing() {
    let p = Pair::new();
    p.create();
    p.in_sync();
    // The initial sync of a replica that never held data keeps no snapshot of it, so the
    // pool beside it holds its tables only.
    let pool = std::fs::metadata(format!("{}.snap", p.lun_b)).unwrap();
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&pool) * 512 < 8 << 20,
        "{} bytes of the pool used by the initial sync",
        std::os::unix::fs::MetadataExt::blocks(&pool) * 512
    );
    let before = bytes(&p.lun_b);
    let err = p.b.fails(&[
        "datastore",
        "format",
        "--name",
        "rogue",
        "--force",
        &p.lun_b,
    ]);
    assert!(
        err.contains("replication secondary of") && err.contains("promote it first"),
        "{err}"
    );
    let err =
        p.b.fails(&["export", &p.lun_b, "--socket", &p.path("b.sock")]);
    assert!(err.contains("replication secondary of"), "{err}");
    assert_eq!(bytes(&p.lun_b), before, "the replica is unchanged");
    // Neither may a second replication of the same LUN start.
    let err = p.b.fails(&[
        "replica",
        "create",
        &p.lun_b,
        "--role",
        "primary",
        "--listen",
        "127.0.0.1:1",
        "--peer",
        "127.0.0.1:2",
        "--secret-file",
        &p.secret,
    ]);
    assert!(err.contains("already replicated"), "{err}");
}

#[test]
fn bad_input_to_create_is_refused_in_one_line_and_nothing_is_created() {
    let p = Pair::new();
    let before = bytes(&p.lun_a);
    let run = |extra: &[&str], secret: &str| {
        let mut args = vec![
            "replica",
            "create",
            &p.lun_a,
            "--secret-file",
            secret,
            "--role",
            "secondary",
        ];
        args.extend_from_slice(extra);
        let err = p.a.fails(&args);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        err
    };
    let addrs = ["--listen", "127.0.0.1:1", "--peer", "127.0.0.1:2"];

    std::fs::set_permissions(&p.secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = run(&addrs, &p.secret);
    assert!(
        err.contains(&p.secret) && err.contains("0644"),
        "names the file and its mode: {err}"
    );
    std::fs::set_permissions(&p.secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let empty = p.path("empty");
    std::fs::write(&empty, "\n").unwrap();
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = run(&addrs, &empty);
    assert!(err.contains("empty"), "{err}");

    let err = run(
        &["--listen", "127.0.0.1:1", "--peer", "no-such-host"],
        &p.secret,
    );
    assert!(
        err.contains("--peer") && err.contains("no-such-host"),
        "{err}"
    );
    // An address this machine does not have: the daemon's own error, and nothing left.
    let err = run(
        &["--listen", "192.0.2.1:7788", "--peer", "127.0.0.1:2"],
        &p.secret,
    );
    assert!(err.contains("cannot listen on 192.0.2.1:7788"), "{err}");
    let small = p.path("small.meta");
    std::fs::write(&small, [0u8; 4096]).unwrap();
    let mut with_meta = addrs.to_vec();
    with_meta.extend_from_slice(&["--meta", &small]);
    let err = run(&with_meta, &p.secret);
    assert!(
        err.contains("small.meta") && err.contains("too small"),
        "{err}"
    );
    assert_eq!(std::fs::read(&small).unwrap(), [0u8; 4096]);

    // The LUN held by another writer process.
    let socket = p.path("a.sock");
    let mut export =
        p.a.command()
            .args(["export", &p.lun_a, "--socket", &socket])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(export.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let err = run(&addrs, &p.secret);
    let _ = export.kill();
    let _ = export.wait();
    assert!(err.contains("vapp export"), "names the writer: {err}");

    let nothing = |path: &Path| !path.exists() || std::fs::read_dir(path).unwrap().next().is_none();
    assert!(nothing(&p.a.registry()), "no registry entry");
    for leftover in ["a.img.repl", "a.img.snap"] {
        assert!(!Path::new(&p.path(leftover)).exists(), "{leftover} left");
    }
    assert!(bytes(&p.lun_a) == before, "the LUN is unchanged");
    // An ordinary LUN still: a writer opens it directly.
    p.a.ok(&["datastore", "format", "--name", "plain", &p.lun_a]);
}

#[test]
fn resume_restarts_a_killed_daemon_and_nothing_written_around_it_is_lost() {
    let p = Pair::new();
    p.create();
    p.a.ok(&["datastore", "format", "--name", "site-a", &p.lun_a]);
    let live = p.in_sync();
    let pid = live["pid"].as_u64().unwrap();
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.a.status(&p.lun_a)["running"] == true {
        assert!(Instant::now() < deadline, "the killed daemon still answers");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = p.a.status(&p.lun_a);
    assert!(s["pid"].is_null(), "{s}");
    assert_eq!(
        s["generation"], live["generation"],
        "a stopped daemon's status reads its metadata"
    );
    // With the daemon gone, nothing writes the LUN around replication.
    let err = p.a.fails(&["-d", &p.lun_a, "mkdir", "/lost"]);
    assert!(
        err.contains("daemon is not running") && err.contains("vapp replica resume"),
        "{err}"
    );

    p.a.ok(&["replica", "resume", &p.lun_a]);
    let s = p.a.status(&p.lun_a);
    assert_eq!(s["running"], true);
    assert_ne!(s["pid"].as_u64().unwrap(), pid, "a new daemon");
    p.a.ok(&["-d", &p.lun_a, "mkdir", "/after-restart"]);

    // A fracture tracks writes, persisted, and resume resyncs them.
    p.a.ok(&["replica", "fracture", &p.lun_a]);
    p.a.ok(&["-d", &p.lun_a, "mkdir", "/while-fractured"]);
    let s = p.a.status(&p.lun_a);
    assert_eq!(s["link"], "fractured");
    assert!(s["out_of_sync_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(!same_bytes(&p.lun_a, &p.lun_b));
    // ...across a restart too: a daemon stopped by SIGTERM comes back still fractured.
    let pid = s["pid"].as_u64().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.a.status(&p.lun_a)["running"] == true {
        assert!(Instant::now() < deadline, "SIGTERM did not stop the daemon");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = p.a.status(&p.lun_a);
    assert_eq!(s["link"], "fractured", "read from the metadata: {s}");
    assert!(s["out_of_sync_bytes"].as_u64().unwrap() > 0, "{s}");
    p.a.ok(&["replica", "resume", &p.lun_a]);
    assert_eq!(p.a.status(&p.lun_a)["link"], "fractured");
    p.a.ok(&["replica", "resume", &p.lun_a]);
    p.in_sync();
    assert!(same_bytes(&p.lun_a, &p.lun_b));
}

#[test]
fn delete_stops_the_daemons_and_leaves_ordinary_luns() {
    let p = Pair::new();
    p.create();
    p.in_sync();
    let out = p.a.ok(&["replica", "delete", &p.lun_a]);
    assert!(out.contains("ordinary LUN"), "{out}");
    p.b.ok(&["replica", "delete", &p.lun_b]);
    for (site, lun) in [(&p.a, &p.lun_a), (&p.b, &p.lun_b)] {
        let err = site.fails(&["replica", "status", lun]);
        assert!(err.contains("not replicated"), "{err}");
        assert!(
            !Path::new(&format!("{lun}.repl")).exists(),
            "metadata removed"
        );
        assert!(
            !Path::new(&format!("{lun}.snap")).exists(),
            "the snapshot pool create made for the engine is removed"
        );
        let all = site.ok(&["replica", "status", "--json"]);
        assert_eq!(all.trim(), "[]");
    }
    // Writers open a directly again, and nothing reaches b.
    p.a.ok(&["datastore", "format", "--name", "plain", &p.lun_a]);
    p.a.ok(&["-d", &p.lun_a, "mkdir", "/local"]);
    assert!(!same_bytes(&p.lun_a, &p.lun_b));
    // The listener is gone with the secondary's daemon: its port is free again.
    std::net::TcpListener::bind(Pair::addr(p.port_b)).unwrap();
}

#[test]
fn demote_and_promote_swap_the_sites_and_writes_flow_the_other_way() {
    let p = Pair::new();
    p.create();
    p.in_sync();
    let err = p.b.fails(&["replica", "promote", &p.lun_b]);
    assert!(err.contains("connected") && err.contains("force"), "{err}");
    assert_eq!(p.b.status(&p.lun_b)["role"], "secondary");

    p.a.ok(&["replica", "demote", &p.lun_a]);
    p.b.ok(&["replica", "promote", &p.lun_b]);
    assert_eq!(p.a.status(&p.lun_a)["role"], "secondary");
    let b = p.in_sync_from(&p.b, &p.lun_b);
    assert_eq!(b["role"], "primary");
    let err =
        p.a.fails(&["datastore", "format", "--name", "x", "--force", &p.lun_a]);
    assert!(err.contains("replication secondary of"), "{err}");

    // A writer of b (here an NBD export) now reaches a through b's daemon.
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    write_through_export(&p, &p.b, &p.lun_b, &data, 5 << 20);
    p.in_sync_from(&p.b, &p.lun_b);
    let a = bytes(&p.lun_a);
    assert_eq!(&a[5 << 20..6 << 20], &data[..], "b's write reached a");
    assert!(same_bytes(&p.lun_a, &p.lun_b));
}

#[test]
fn a_group_runs_in_one_daemon_and_a_command_on_one_member_acts_on_all() {
    let p = Pair::new();
    let file = |name: &str| {
        let path = p.path(name);
        std::fs::File::create(&path)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        path
    };
    let (a2, b2) = (file("a2.img"), file("b2.img"));
    let (pa2, pb2) = (free_port(), free_port());
    let create = |site: &Site, lun: &str, role: &str, listen: u16, peer: u16| {
        site.ok(&[
            "replica",
            "create",
            lun,
            "--role",
            role,
            "--listen",
            &Pair::addr(listen),
            "--peer",
            &Pair::addr(peer),
            "--secret-file",
            &p.secret,
            "--group",
            "db",
        ]);
    };
    create(&p.b, &p.lun_b, "secondary", p.port_b, p.port_a);
    create(&p.b, &b2, "secondary", pb2, pa2);
    create(&p.a, &p.lun_a, "primary", p.port_a, p.port_b);
    create(&p.a, &a2, "primary", pa2, pb2);
    p.in_sync();
    let s2 = p.in_sync_from(&p.a, &a2);
    let s1 = p.a.status(&p.lun_a);
    assert_eq!(s1["pid"], s2["pid"], "one daemon for the group");
    assert_eq!(s1["group"], "db");
    assert_eq!(p.b.status(&p.lun_b)["pid"], p.b.status(&b2)["pid"]);

    // A fracture of one member fractures the group; both track their writes.
    p.a.ok(&["replica", "fracture", &a2]);
    for lun in [&p.lun_a, &a2] {
        assert_eq!(p.a.status(lun)["link"], "fractured");
    }
    p.a.ok(&["datastore", "format", "--name", "grouped", &p.lun_a]);
    assert!(p.a.status(&p.lun_a)["out_of_sync_bytes"].as_u64().unwrap() > 0);
    p.a.ok(&["replica", "resume", &p.lun_a]);
    p.in_sync();
    p.in_sync_from(&p.a, &a2);
    assert!(same_bytes(&p.lun_a, &p.lun_b));
    assert!(same_bytes(&a2, &b2));

    // A member deleted leaves the rest of the group replicating.
    p.a.ok(&["replica", "delete", &p.lun_a]);
    let s = p.in_sync_from(&p.a, &a2);
    assert_eq!(s["running"], true);
}

#[test]
fn asynchronous_mode_ships_delta_sets_until_the_replica_equals_the_primary() {
    let p = Pair::new();
    // Small LUNs keep the initial sync (and its pre-resync snapshot's copies) short.
    for lun in [&p.lun_a, &p.lun_b] {
        std::fs::File::options()
            .write(true)
            .open(lun)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
    }
    let (a, b) = (Pair::addr(p.port_a), Pair::addr(p.port_b));
    p.b.ok(&[
        "replica",
        "create",
        &p.lun_b,
        "--role",
        "secondary",
        "--listen",
        &b,
        "--peer",
        &a,
        "--secret-file",
        &p.secret,
        "--mode",
        "async",
    ]);
    p.a.ok(&[
        "replica",
        "create",
        &p.lun_a,
        "--role",
        "primary",
        "--listen",
        &a,
        "--peer",
        &b,
        "--secret-file",
        &p.secret,
        "--mode",
        "async",
        "--period",
        "200ms",
    ]);
    for lun in [&p.lun_a, &p.lun_b] {
        assert!(
            Path::new(&format!("{lun}.snap")).exists(),
            "async mode makes a snapshot pool beside each file"
        );
    }
    p.in_sync();
    // Writes go out in delta sets. One that fails (the link lost mid-set) leaves its
    // regions dirty for a resync instead, so writes go on until a set is applied whole.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0u8;
    let b = loop {
        write_through_export(&p, &p.a, &p.lun_a, &[n; 65536], u64::from(n % 16) << 20);
        n += 1;
        p.in_sync();
        let b = p.b.status(&p.lun_b);
        if b["delta_id"].as_u64().unwrap() > 0 {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "no delta set applied: {b}\n{}",
            p.a.log_tail()
        );
    };
    let s = p.in_sync();
    assert_eq!(s["mode"], "async");
    assert_eq!(s["period_ms"], 200);
    assert!(s["rpo_ms"].as_u64().is_some(), "{s}");
    assert!(b["point_in_time_ms"].as_u64().is_some(), "{b}");
    assert_eq!(b["inconsistent"], false);
    assert!(same_bytes(&p.lun_a, &p.lun_b));
}

#[test]
fn a_fracture_lets_the_secondary_take_over_and_split_brain_waits_for_resolve() {
    let p = Pair::new();
    p.create();
    p.in_sync();
    p.a.ok(&["replica", "fracture", &p.lun_a]);
    // The fracture drops the link: the secondary no longer has a primary.
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.b.status(&p.lun_b)["link"] != "waiting" {
        assert!(
            Instant::now() < deadline,
            "the secondary still sees its primary"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p.b.ok(&["replica", "promote", &p.lun_b]);

    // Both sides write: split brain.
    write_through_export(&p, &p.a, &p.lun_a, &[0xAA; 65536], 2 << 20);
    write_through_export(&p, &p.b, &p.lun_b, &[0xBB; 65536], 3 << 20);
    p.a.ok(&["replica", "demote", &p.lun_a]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let s = p.b.status(&p.lun_b);
        if s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("split brain"))
        {
            break s;
        }
        assert!(Instant::now() < deadline, "split brain never reported: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(refused["link"], "disconnected", "{refused}");
    // A refused primary does not stay connected (it retries now and then, briefly).
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.a.status(&p.lun_a)["link"] != "waiting" {
        assert!(
            Instant::now() < deadline,
            "a refused primary stays connected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!same_bytes(&p.lun_a, &p.lun_b));

    // a gives up what only it wrote; b's data wins everywhere.
    let err =
        p.b.fails(&["replica", "resolve", &p.lun_b, "--discard-local"]);
    assert!(err.contains("demote"), "a primary is not resolved: {err}");
    p.a.ok(&["replica", "resolve", &p.lun_a, "--discard-local"]);
    let s = p.in_sync_from(&p.b, &p.lun_b);
    assert!(s["peer_regions_discarded"].as_u64().unwrap() > 0, "{s}");
    let a = bytes(&p.lun_a);
    assert_eq!(&a[3 << 20..(3 << 20) + 65536], &[0xBB; 65536][..]);
    assert_eq!(
        &a[2 << 20..(2 << 20) + 65536],
        &[0u8; 65536][..],
        "a's own write is gone"
    );
    assert!(same_bytes(&p.lun_a, &p.lun_b));
}

#[test]
fn sites_with_different_secrets_never_replicate_and_say_why() {
    let p = Pair::new();
    let other = p.path("other-secret");
    std::fs::write(&other, "not the same secret\n").unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (a, b) = (Pair::addr(p.port_a), Pair::addr(p.port_b));
    p.b.ok(&[
        "replica",
        "create",
        &p.lun_b,
        "--role",
        "secondary",
        "--listen",
        &b,
        "--peer",
        &a,
        "--secret-file",
        &other,
    ]);
    p.a.ok(&[
        "replica",
        "create",
        &p.lun_a,
        "--role",
        "primary",
        "--listen",
        &a,
        "--peer",
        &b,
        "--secret-file",
        &p.secret,
    ]);
    let before = bytes(&p.lun_b);
    p.a.ok(&["datastore", "format", "--name", "unshipped", &p.lun_a]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let s = loop {
        let s = p.a.status(&p.lun_a);
        if s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("authentication"))
        {
            break s;
        }
        assert!(Instant::now() < deadline, "no authentication error: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(s["link"], "disconnected");
    assert!(s["out_of_sync_bytes"].as_u64().unwrap() > 0);
    assert_eq!(p.b.status(&p.lun_b)["link"], "waiting");
    assert!(bytes(&p.lun_b) == before, "nothing reached the other site");
}

#[test]
fn a_bandwidth_limit_paces_the_initial_sync() {
    let p = Pair::new();
    let data = random_file(&p.path("data.bin"), 2 << 20);
    write_at(&p.lun_a, &data, 1 << 20);
    p.b.ok(&refs(&p.create_args(false, &[])));
    let refused =
        p.a.vapp(&refs(&p.create_args(true, &["--bandwidth-limit", "0"])));
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--bandwidth-limit 0"), "{err}");
    let started = Instant::now();
    p.a.ok(&refs(&p.create_args(true, &["--bandwidth-limit", "1M"])));
    let status = p.in_sync();
    let took = started.elapsed();
    assert_eq!(status["bandwidth_limit"], 1 << 20, "{status}");
    // 2 MiB at 1 MiB/s: the first second's window lets a little through early.
    assert!(
        took >= Duration::from_millis(1200),
        "2 MiB at 1 MiB/s took {took:?}"
    );
    assert!(same_bytes(&p.lun_a, &p.lun_b));
}

#[test]
fn skip_matching_seeds_a_replica_from_a_copy_without_sending_it_again() {
    let p = Pair::new();
    let data = random_file(&p.path("data.bin"), 2 << 20);
    write_at(&p.lun_a, &data, 3 << 20);
    write_at(&p.lun_b, &data, 3 << 20);
    p.b.ok(&refs(&p.create_args(false, &[])));
    p.a.ok(&refs(&p.create_args(true, &["--skip-matching"])));
    let status = p.in_sync();
    assert_eq!(
        status["bytes_resynced"], 0,
        "the seeded copy matched: {status}"
    );
    assert!(same_bytes(&p.lun_a, &p.lun_b));
}

/// Writes `data` into the file `lun` at `offset`, before any replication.
fn write_at(lun: &str, data: &[u8], offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(lun).unwrap();
    f.write_all_at(data, offset).unwrap();
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}
