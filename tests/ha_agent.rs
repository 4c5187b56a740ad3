//! `vapp host run`: host agents as real processes with separate host identities on one
//! datastore file, running protected test-guest VMs. One agent and its VMs are killed with
//! -9; a survivor restarts the protected ones within the dead-host time plus a boot, never
//! two runners of one VM at a time, with the guest's disk a consistent prefix of its write
//! sequence; an unprotected VM stays down; a VM that cannot boot is retried a bounded number
//! of times. The API refuses malformed requests with 400 and other users by socket mode.
#![allow(clippy::unwrap_used)]

mod vm_support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hv::test_guest::counter_prefix;

const IO_TIMEOUT_MS: u64 = 250;
/// The cluster's dead-host time at that I/O timeout (8x, vmfs::cluster::Timing).
const DEAD_AFTER: Duration = Duration::from_millis(8 * IO_TIMEOUT_MS);
/// Longest a test guest may take to boot: its kernel code is emulated on PVM hosts.
const BOOT: Duration = Duration::from_secs(60);
const SECTORS: u64 = 8;

struct Cluster {
    dir: tempfile::TempDir,
    ds: String,
    guest: PathBuf,
}

struct Agent {
    name: String,
    runtime: PathBuf,
    child: Option<Child>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Runners this agent started, should the test have failed with them alive.
        for pid in vm_support::runners(&self.runtime.to_string_lossy()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn uuid_of(name: &str) -> String {
    let n = name.bytes().last().unwrap();
    format!("{n:02x}{n:02x}{n:02x}{n:02x}-0000-4000-8000-0000000000{n:02x}")
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        // Only the socket's own mode keeps other users out (see the API test).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let ds = dir.path().join("ds.vmfs").to_str().unwrap().to_string();
        let guest = dir.path().join("testguest.elf");
        let cluster = Cluster { dir, ds, guest };
        cluster.ok(
            "esx-a",
            &[
                "datastore",
                "format",
                &cluster.ds,
                "--name",
                "ha",
                "--size",
                "1G",
                "--io-timeout",
                &format!("{IO_TIMEOUT_MS}ms"),
            ],
        );
        cluster.ok(
            "esx-a",
            &["vm", "test-guest", cluster.guest.to_str().unwrap()],
        );
        cluster
    }

    fn runtime(&self, host: &str) -> PathBuf {
        self.dir.path().join(format!("run-{host}"))
    }

    fn command(&self, host: &str, args: &[&str]) -> Command {
        self.command_on(&self.ds, host, args)
    }

    fn command_on(&self, ds: &str, host: &str, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vapp"));
        command
            .arg("-d")
            .arg(ds)
            .args(args)
            .env_remove("VAPP_DATASTORE")
            .env_remove("VAPP_KVM_DEVICE")
            .env("VAPP_HOST_NAME", host)
            .env("VAPP_HOST_UUID", uuid_of(host))
            .env("VAPP_RUNTIME_DIR", self.runtime(host))
            .stdin(Stdio::null());
        command
    }

    fn ok(&self, host: &str, args: &[&str]) -> String {
        self.ok_on(&self.ds, host, args)
    }

    fn ok_on(&self, ds: &str, host: &str, args: &[&str]) -> String {
        let out = self.command_on(ds, host, args).output().unwrap();
        assert!(
            out.status.success(),
            "vapp {args:?} as {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn create_vm(&self, path: &str, cmdline: &str, ha: Option<&str>) {
        self.create_vm_on(&self.ds, path, cmdline, ha);
    }

    fn create_vm_on(&self, ds: &str, path: &str, cmdline: &str, ha: Option<&str>) {
        let mut args = vec![
            "vm",
            "create",
            path,
            "--kernel",
            self.guest.to_str().unwrap(),
            "--vcpus",
            "1",
            "--memory",
            "64M",
            "--cmdline",
            cmdline,
            "--disk",
            "1M",
        ];
        if let Some(priority) = ha {
            args.extend(["--ha", priority]);
        }
        self.ok_on(ds, "esx-a", &args);
    }

    fn agent(&self, name: &str) -> Agent {
        self.agent_with(name, "", &[])
    }

    /// An agent whose host.toml ends with `extra`, run with `env` set.
    fn agent_with(&self, name: &str, extra: &str, env: &[(&str, &Path)]) -> Agent {
        self.agent_on(name, &[&self.ds], extra, env)
    }

    fn agent_on(
        &self,
        name: &str,
        datastores: &[&str],
        extra: &str,
        env: &[(&str, &Path)],
    ) -> Agent {
        let runtime = self.runtime(name);
        std::fs::create_dir_all(&runtime).unwrap();
        let config = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "name = {name:?}\ndatastores = {datastores:?}\nruntime_dir = {:?}\n{extra}",
                runtime.to_str().unwrap()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = self
            .command(name, &["--log", "info", "host", "run", "--config"])
            .arg(&config)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let socket = runtime.join("agent.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "agent {name} never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Agent {
            name: name.to_string(),
            runtime,
            child: Some(child),
        }
    }

    /// `vm list --json`: each VM's state and host.
    fn placements(&self) -> HashMap<String, (String, Option<String>)> {
        let out = self.ok("esx-a", &["vm", "list", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|vm| {
                (
                    vm["path"].as_str().unwrap().to_string(),
                    (
                        vm["state"].as_str().unwrap().to_string(),
                        vm["host"].as_str().map(str::to_string),
                    ),
                )
            })
            .collect()
    }

    fn events(&self, agent: &Agent) -> Vec<serde_json::Value> {
        let out = self.ok(&agent.name, &["host", "events", "--json"]);
        serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
    }

    /// The first `SECTORS` sectors of a VM's disk, read through vmfs.
    fn disk(&self, vm: &str) -> Vec<u8> {
        let lun = lun::open(
            &self.ds,
            &lun::OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let ds = vmfs::Datastore::open(lun, &vmfs::OpenOptions::read_only()).unwrap();
        let ino = ds.resolve(&format!("{vm}/disk0.vdisk")).unwrap();
        let mut buf = vec![0u8; SECTORS as usize * 512];
        let n = ds.read(ino, 0, &mut buf).unwrap();
        assert_eq!(n, buf.len());
        buf
    }
}

/// The process holds a KVM VM (an `anon_inode:kvm-vm` descriptor): it runs a guest.
fn runs_a_guest(pid: i32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| target.to_string_lossy() == "anon_inode:kvm-vm")
    })
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn console(agent: &Agent, vm: &str) -> String {
    let name = vm.trim_start_matches('/').replace('/', "_");
    std::fs::read_to_string(agent.runtime.join("vms").join(format!("{name}.console")))
        .unwrap_or_default()
}

fn kind_count(events: &[serde_json::Value], kind: &str, vm: &str) -> usize {
    events
        .iter()
        .filter(|e| e["kind"] == kind && e["vm"] == vm)
        .count()
}

/// Stops a runner as `vm stop --force` would: a second signal powers the guest off.
fn power_off(pid: i32) {
    for _ in 0..2 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stop_agent(mut agent: Agent) {
    let mut child = agent.child.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "agent {} exited {status}", agent.name);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "agent {} ignored SIGTERM",
            agent.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn survivors_restart_a_killed_hosts_protected_vms_once_and_give_up_on_one_that_cannot_boot() {
    if !lun::prereq::require(
        lun::prereq::is_root(),
        "root (VM runners, /proc of all users)",
    ) || !lun::prereq::require(
        lun::prereq::have_device("/dev/kvm"),
        "/dev/kvm (read-write) for booting guests",
    ) {
        return;
    }
    let cluster = Cluster::new();
    let counter = format!("mode=counter counter_sectors={SECTORS}");
    cluster.create_vm("/vms/db", &counter, Some("high"));
    cluster.create_vm("/vms/web", &counter, Some("low"));
    cluster.create_vm("/vms/plain", &counter, None);
    cluster.create_vm("/vms/broken", &counter, Some("medium"));
    // web follows plain, which is not protected and so never restarts: web waits 2 s for it,
    // then restarts all the same, saying so.
    cluster.set_ha("/vms/web", "after = [\"/vms/plain\"]\nafter_timeout = 2");

    let a = cluster.agent("esx-a");
    let b = cluster.agent("esx-b");
    let c = cluster.agent("esx-c");
    let vms = ["/vms/db", "/vms/web", "/vms/plain", "/vms/broken"];
    for vm in vms {
        // Through esx-a's agent: `vm start` returns once the VM runs there.
        let out = cluster.ok("esx-a", &["vm", "start", vm]);
        assert!(
            out.contains(&format!("vm {vm}: running on host esx-a")),
            "{out}"
        );
    }
    for vm in vms {
        wait_for(&format!("{vm} counting on esx-a"), BOOT, || {
            console(&a, vm).contains("counter: 256")
        });
    }
    let placed = cluster.placements();
    for vm in vms {
        assert_eq!(placed[vm], ("running".into(), Some("esx-a".into())), "{vm}");
    }
    // /vms/broken cannot boot anywhere else: its kernel is replaced while it runs.
    cluster.ok("esx-a", &["rm", "/vms/broken/kernel"]);
    let junk = cluster.dir.path().join("junk");
    std::fs::write(&junk, vec![0x5a; 4096]).unwrap();
    cluster.ok(
        "esx-a",
        &["put", junk.to_str().unwrap(), "/vms/broken/kernel"],
    );

    // Never two processes running one VM's guest (holding a KVM VM), sampled all along. A
    // losing survivor's runner may wait for the VM's lock meanwhile: it runs no guest.
    let watching = Arc::new(AtomicBool::new(true));
    let worst = Arc::new(AtomicUsize::new(0));
    let twice = Arc::new(std::sync::Mutex::new(Vec::new()));
    // This cluster's runners only: other tests run VMs of the same names meanwhile.
    let ds = cluster.ds.clone();
    let sampler = {
        let (watching, worst, twice) = (watching.clone(), worst.clone(), twice.clone());
        std::thread::spawn(move || {
            while watching.load(Ordering::SeqCst) {
                for vm in vms {
                    let pids: Vec<i32> =
                        vm_support::runners(&format!("{ds} vm start --foreground {vm} "))
                            .into_iter()
                            .filter(|&pid| runs_a_guest(pid))
                            .collect();
                    if pids.len() > 1 {
                        let who: Vec<String> = pids
                            .iter()
                            .map(|pid| {
                                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                                    .unwrap_or_default();
                                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                                    .unwrap_or_default();
                                format!(
                                    "{stat} {}",
                                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                                )
                            })
                            .collect();
                        twice.lock().unwrap().push((vm, who));
                    }
                    worst.fetch_max(pids.len(), Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // esx-a dies: its agent and every VM runner it started, with -9.
    let mut a = a;
    let mut agent_a = a.child.take().unwrap();
    let killed_at = Instant::now();
    agent_a.kill().unwrap();
    for pid in vm_support::runners(&a.runtime.to_string_lossy()) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    agent_a.wait().unwrap();

    let mut restarted = HashMap::new();
    wait_for(
        "db and web running on a survivor",
        DEAD_AFTER * 4 + BOOT,
        || {
            let placed = cluster.placements();
            for vm in ["/vms/db", "/vms/web"] {
                if let (state, Some(host)) = &placed[vm] {
                    if state == "running" && host != "esx-a" {
                        restarted
                            .entry(vm)
                            .or_insert((host.clone(), killed_at.elapsed()));
                    }
                }
            }
            restarted.len() == 2
        },
    );
    for (vm, (host, after)) in &restarted {
        eprintln!(
            "{vm} runs on {host} {:.2} s after esx-a was killed ({:.2}x the dead-host time)",
            after.as_secs_f64(),
            after.as_secs_f64() / DEAD_AFTER.as_secs_f64()
        );
    }
    // The guests count again on their new hosts.
    for (vm, (host, _)) in &restarted {
        let agent = if host == "esx-b" { &b } else { &c };
        wait_for(&format!("{vm} counting on {host}"), BOOT, || {
            console(agent, vm).contains("counter: 256")
        });
    }

    // The VM that cannot boot is tried a bounded number of times (3 per agent), then left.
    wait_for("/vms/broken given up", DEAD_AFTER * 4 + BOOT, || {
        [&b, &c]
            .iter()
            .any(|agent| kind_count(&cluster.events(agent), "vm-failed", "/vms/broken") > 0)
    });
    let attempts = || {
        [&b, &c]
            .iter()
            .map(|agent| {
                let events = cluster.events(agent);
                kind_count(&events, "vm-crashed", "/vms/broken")
                    + kind_count(&events, "vm-failed", "/vms/broken")
            })
            .sum::<usize>()
    };
    // The survivor that gave up shows it in `vm list`, with its tries.
    let gave_up = [&b, &c]
        .into_iter()
        .find(|agent| kind_count(&cluster.events(agent), "vm-failed", "/vms/broken") > 0)
        .unwrap();
    let out = cluster.ok(&gave_up.name, &["vm", "list", "--json"]);
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let broken = list.iter().find(|vm| vm["path"] == "/vms/broken").unwrap();
    assert_eq!(
        (&broken["state"], &broken["failures"]),
        (&"failed".into(), &3.into()),
        "{out}"
    );
    let text = cluster.ok(&gave_up.name, &["vm", "list"]);
    assert!(text.contains("failed after 3 tries"), "{text}");
    let settled = attempts();
    std::thread::sleep(Duration::from_secs(10));
    let later = attempts();
    assert!(
        later == settled || later <= 6,
        "/vms/broken retried without end: {settled} then {later} attempts"
    );
    assert!(later <= 6, "{later} attempts for /vms/broken");
    let placed = cluster.placements();
    assert_eq!(placed["/vms/broken"].0, "stopped", "{placed:?}");
    // An unprotected VM stays down.
    assert_eq!(placed["/vms/plain"].0, "stopped", "{placed:?}");

    watching.store(false, Ordering::SeqCst);
    sampler.join().unwrap();
    assert_eq!(
        worst.load(Ordering::SeqCst),
        1,
        "two runners of one VM at once: {:?}",
        twice.lock().unwrap()
    );

    // Power the restarted guests off, and their disks hold one consistent counter sequence:
    // one writer at a time, nothing torn.
    for vm in ["/vms/db", "/vms/web"] {
        for pid in vm_support::runners(&format!("{} vm start --foreground {vm} ", cluster.ds)) {
            power_off(pid);
        }
    }
    wait_for(
        "the restarted runners gone",
        Duration::from_secs(30),
        || vm_support::runners(&format!("{} vm start --foreground /vms/", cluster.ds)).is_empty(),
    );
    for vm in ["/vms/db", "/vms/web"] {
        let writes =
            counter_prefix(&[cluster.disk(vm)], SECTORS).unwrap_or_else(|e| panic!("{vm}: {e}"));
        assert!(writes >= 256, "{vm}: {writes} writes");
    }
    // A survivor says why it restarted the VMs: it declared esx-a dead, by its heartbeat or
    // (a crashed process of this same machine is recovered at once by the next host that
    // opens the datastore, a VM's runner included) by finding its locks already stale. And
    // an agent that restarted both VMs did so high priority first; web said it went ahead
    // without plain.
    let survivors = [cluster.events(&b), cluster.events(&c)];
    assert!(
        survivors
            .iter()
            .flatten()
            .any(|e| e["kind"] == "host-dead" && e["host"] == "esx-a"),
        "{survivors:?}"
    );
    for events in &survivors {
        let deaths = events
            .iter()
            .filter(|e| e["kind"] == "host-dead" && e["host"] == "esx-a")
            .count();
        assert!(deaths <= 1, "esx-a found dead {deaths} times: {events:?}");
    }
    assert!(
        survivors
            .iter()
            .flatten()
            .any(|e| e["kind"] == "order-timeout"
                && e["vm"] == "/vms/web"
                && e["detail"].as_str().unwrap().contains("/vms/plain")),
        "{survivors:?}"
    );
    for events in &survivors {
        let at = |vm: &str| {
            events
                .iter()
                .position(|e| e["kind"] == "vm-restarted" && e["vm"] == vm)
        };
        if let (Some(db), Some(web)) = (at("/vms/db"), at("/vms/web")) {
            assert!(db < web, "web (low) restarted before db (high): {events:?}");
        }
    }
    stop_agent(b);
    stop_agent(c);
    let fsck = Command::new(env!("CARGO_BIN_EXE_vapp"))
        .args(["datastore", "fsck", &cluster.ds])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// Sends raw bytes to the agent's socket; the status code and body of the answer.
fn raw(socket: &Path, request: &[u8]) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(request).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn post(path: &str) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

#[test]
fn the_api_refuses_malformed_requests_and_other_users() {
    if !lun::prereq::require(
        lun::prereq::is_root(),
        "root (to try the socket as another user)",
    ) {
        return;
    }
    let cluster = Cluster::new();
    let a = cluster.agent("esx-a");
    let socket = a.runtime.join("agent.sock");
    std::fs::set_permissions(&a.runtime, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let (status, body) = raw(&socket, &post("/vms/start"));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("expected /vms/<folder>/start"), "{body}");
    let (status, body) = raw(&socket, &post("/vms/../etc/start"));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a VM folder"), "{body}");
    let (status, body) = raw(&socket, &post("/vms/vms/x/reboot-now"));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown action"), "{body}");
    let (status, body) = raw(
        &socket,
        b"GET /vms/vms/x/start HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 405, "{body}");
    let (status, body) = raw(&socket, &post("/vms/nowhere/start"));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("/nowhere: no VM here"), "{body}");
    let (status, _) = raw(&socket, b"this is not HTTP\r\n\r\n");
    assert_eq!(status, 400);
    // Nothing was started by any of it.
    let (status, body) = raw(
        &socket,
        b"GET /vms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((status, body.trim()), (200, "[]"));

    // Another user cannot even connect.
    let out = cluster
        .command("esx-a", &["host", "events"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Permission denied"), "{stderr}");

    // A second agent of the same name on the datastore is refused, naming the first.
    let again = cluster.dir.path().join("esx-a-again.toml");
    std::fs::write(
        &again,
        format!(
            "name = \"esx-a\"\ndatastores = [{:?}]\nruntime_dir = {:?}\n",
            cluster.ds,
            cluster.dir.path().join("run-again").to_str().unwrap()
        ),
    )
    .unwrap();
    let out = cluster
        .command("esx-a", &["host", "run", "--config"])
        .arg(&again)
        .env("VAPP_HOST_UUID", uuid_of("esx-z"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another agent named \"esx-a\" runs on this datastore"),
        "{stderr}"
    );
    stop_agent(a);
}

fn have_kvm_and_root() -> bool {
    lun::prereq::require(
        lun::prereq::is_root(),
        "root (VM runners, /proc of all users)",
    ) && lun::prereq::require(
        lun::prereq::have_device("/dev/kvm"),
        "/dev/kvm (read-write) for booting guests",
    )
}

/// Kills `agent` and every VM runner it started with -9, as a host dies.
fn kill_host(agent: &mut Agent) -> Instant {
    let mut child = agent.child.take().unwrap();
    let killed_at = Instant::now();
    child.kill().unwrap();
    for pid in vm_support::runners(&agent.runtime.to_string_lossy()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    child.wait().unwrap();
    killed_at
}

impl Cluster {
    /// Appends `lines` to the `[ha]` table of a VM's vm.toml (its last table).
    fn set_ha(&self, vm: &str, lines: &str) {
        let path = format!("{vm}/vm.toml");
        let text = self.ok("esx-a", &["cat", &path]);
        let ha = text.find("[ha]").expect("a protected VM");
        assert!(!text[ha + 4..].contains("\n["), "[ha] is not last: {text}");
        let local = self.dir.path().join("vm.toml");
        std::fs::write(&local, format!("{}\n{lines}\n", text.trim_end())).unwrap();
        self.ok("esx-a", &["rm", &path]);
        self.ok("esx-a", &["put", local.to_str().unwrap(), &path]);
    }

    /// Starts each VM through `agent` and waits until its guest counts.
    fn start_counting(&self, agent: &Agent, vms: &[&str]) {
        for vm in vms {
            let out = self.ok(&agent.name, &["vm", "start", vm]);
            assert!(
                out.contains(&format!("vm {vm}: running on host {}", agent.name)),
                "{out}"
            );
        }
        for vm in vms {
            wait_for(&format!("{vm} counting on {}", agent.name), BOOT, || {
                console(agent, vm).contains("counter: 256")
            });
        }
    }

    /// Waits until each VM runs on a host other than `dead`; where each landed.
    fn wait_restarted(&self, dead: &str, vms: &[&str]) -> HashMap<String, String> {
        let mut landed = HashMap::new();
        wait_for(
            &format!("{vms:?} running again after {dead} died"),
            DEAD_AFTER * 4 + BOOT,
            || {
                let placed = self.placements();
                for vm in vms {
                    if let (state, Some(host)) = &placed[*vm] {
                        if state == "running" && host != dead {
                            landed.insert(vm.to_string(), host.clone());
                        }
                    }
                }
                landed.len() == vms.len()
            },
        );
        landed
    }
}

#[test]
fn a_dead_hosts_vms_land_on_the_host_with_most_free_capacity_and_spread_when_it_fills() {
    if !have_kvm_and_root() {
        return;
    }
    let cluster = Cluster::new();
    let counter = format!("mode=counter counter_sectors={SECTORS}");
    // 64 MiB and one vCPU each; restarted in this order (priority).
    let vms = ["/vms/one", "/vms/two", "/vms/three"];
    for (vm, priority) in vms.iter().zip(["high", "medium", "low"]) {
        cluster.create_vm(vm, &counter, Some(priority));
    }
    let mut a = cluster.agent_with("esx-a", "memory_mib = 4096\ncpus = 8\n", &[]);
    // esx-b offers the most: the first two go there, after which it has less free than
    // esx-c (64 MiB against 96 MiB), so the third goes to esx-c.
    let b = cluster.agent_with("esx-b", "memory_mib = 192\ncpus = 8\n", &[]);
    let c = cluster.agent_with("esx-c", "memory_mib = 96\ncpus = 8\n", &[]);
    cluster.start_counting(&a, &vms);

    kill_host(&mut a);
    let landed = cluster.wait_restarted("esx-a", &vms);
    let events = [cluster.events(&b), cluster.events(&c)];
    let on = |host: &str| {
        let mut vms: Vec<&str> = landed
            .iter()
            .filter(|(_, h)| *h == host)
            .map(|(vm, _)| vm.as_str())
            .collect();
        vms.sort_unstable();
        vms
    };
    // Placed by priority when the survivors see all three orphaned at once; a VM seen
    // later than the others is placed after them whatever its priority.
    assert_eq!(
        (on("esx-b").len(), on("esx-c").len()),
        (2, 1),
        "{landed:?} {events:?}"
    );
    // Each was started once, by the host chosen for it: no survivor raced another for it.
    // (A survivor records its restart once the runner holds the lock `vm list` shows.)
    wait_for(
        "the survivors' restart events",
        Duration::from_secs(10),
        || {
            let events = [cluster.events(&b), cluster.events(&c)];
            vms.iter().all(|vm| {
                events
                    .iter()
                    .map(|e| kind_count(e, "vm-restarted", vm))
                    .sum::<usize>()
                    >= 1
            })
        },
    );
    let events = [cluster.events(&b), cluster.events(&c)];
    for vm in vms {
        let starts: usize = events
            .iter()
            .map(|e| kind_count(e, "vm-restarted", vm))
            .sum();
        let lost: usize = events
            .iter()
            .map(|e| kind_count(e, "restart-lost", vm))
            .sum();
        assert_eq!((starts, lost), (1, 0), "{vm}: {events:?}");
    }
    for vm in vms {
        let agent = if landed[vm] == "esx-b" { &b } else { &c };
        wait_for(&format!("{vm} counting on {}", agent.name), BOOT, || {
            console(agent, vm).contains("counter: 256")
        });
    }
    stop_agent(b);
    stop_agent(c);
}

#[test]
fn a_vm_restarts_only_once_the_vm_it_follows_runs_even_on_another_host() {
    if !have_kvm_and_root() {
        return;
    }
    let cluster = Cluster::new();
    let counter = format!("mode=counter counter_sectors={SECTORS}");
    // The order comes from `after` alone: web's priority would put it first.
    cluster.create_vm("/vms/db", &counter, Some("low"));
    cluster.create_vm("/vms/web", &counter, Some("high"));
    cluster.set_ha("/vms/web", "after = [\"/vms/db\"]");
    let mut a = cluster.agent_with("esx-a", "memory_mib = 4096\n", &[]);
    // db goes to esx-b (most free); then esx-c has more free than esx-b, so web goes there.
    let b = cluster.agent_with("esx-b", "memory_mib = 192\n", &[]);
    let c = cluster.agent_with("esx-c", "memory_mib = 160\n", &[]);
    cluster.start_counting(&a, &["/vms/db", "/vms/web"]);

    // When a survivor's runner of each VM first exists.
    let survivors = [b.runtime.clone(), c.runtime.clone()];
    let watching = Arc::new(AtomicBool::new(true));
    let sampler = {
        let watching = watching.clone();
        std::thread::spawn(move || {
            let mut first: HashMap<&str, Instant> = HashMap::new();
            while watching.load(Ordering::SeqCst) {
                for vm in ["/vms/db", "/vms/web"] {
                    let there = survivors.iter().any(|runtime| {
                        !vm_support::runners(&format!(
                            "--foreground {vm} --console-log {}",
                            runtime.display()
                        ))
                        .is_empty()
                    });
                    if there {
                        first.entry(vm).or_insert_with(Instant::now);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            first
        })
    };
    kill_host(&mut a);
    let landed = cluster.wait_restarted("esx-a", &["/vms/db", "/vms/web"]);
    watching.store(false, Ordering::SeqCst);
    let first = sampler.join().unwrap();
    let events = [cluster.events(&b), cluster.events(&c)];
    assert!(
        first["/vms/db"] < first["/vms/web"],
        "web's runner started before db's: {events:?}"
    );
    assert_eq!(
        (landed["/vms/db"].as_str(), landed["/vms/web"].as_str()),
        ("esx-b", "esx-c"),
        "{events:?}"
    );
    assert!(
        events.iter().flatten().any(|e| e["kind"] == "vm-waiting"
            && e["vm"] == "/vms/web"
            && e["detail"].as_str().unwrap().contains("/vms/db")),
        "{events:?}"
    );
    wait_for("web counting on esx-c", BOOT, || {
        console(&c, "/vms/web").contains("counter: 256")
    });
    stop_agent(b);
    stop_agent(c);
}

#[test]
fn host_run_tells_systemd_it_is_ready_and_stopping_and_events_follow_streams_new_ones() {
    if !lun::prereq::require(lun::prereq::is_root(), "root (as the other agent tests)") {
        return;
    }
    let cluster = Cluster::new();
    let notify = cluster.dir.path().join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let a = cluster.agent_with("esx-a", "", &[("NOTIFY_SOCKET", &notify)]);
    let mut message = [0u8; 256];
    let n = systemd.recv(&mut message).unwrap();
    assert_eq!(String::from_utf8_lossy(&message[..n]).trim(), "READY=1");
    // Ready means the API answers.
    let socket = a.runtime.join("agent.sock");
    let (status, _) = raw(
        &socket,
        b"GET /vms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);

    let mut follow = cluster
        .command("esx-a", &["host", "events", "--follow", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, printed) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let next = || -> serde_json::Value {
        let line = printed
            .recv_timeout(Duration::from_secs(20))
            .expect("host events --follow printed nothing new");
        serde_json::from_str(&line).unwrap()
    };
    assert_eq!(next()["kind"], "agent-started");
    // Something happens after it started following: it prints it.
    let (status, _) = raw(&socket, &post("/vms/nowhere/start"));
    assert_eq!(status, 409);
    let event = next();
    assert_eq!(
        (&event["kind"], &event["vm"]),
        (&"vm-start-failed".into(), &"/nowhere".into()),
        "{event}"
    );
    assert!(follow.try_wait().unwrap().is_none(), "--follow ended");
    follow.kill().unwrap();
    follow.wait().unwrap();

    stop_agent(a);
    let n = systemd.recv(&mut message).unwrap();
    assert_eq!(String::from_utf8_lossy(&message[..n]).trim(), "STOPPING=1");
}

#[test]
fn one_agent_hosts_two_datastores_and_restarts_the_vms_of_both() {
    if !have_kvm_and_root() {
        return;
    }
    let cluster = Cluster::new();
    let ds2 = cluster.dir.path().join("ds2.vmfs");
    let ds2 = ds2.to_str().unwrap();
    cluster.ok_on(
        ds2,
        "esx-a",
        &[
            "datastore",
            "format",
            ds2,
            "--name",
            "ha2",
            "--size",
            "1G",
            "--io-timeout",
            &format!("{IO_TIMEOUT_MS}ms"),
        ],
    );
    let counter = format!("mode=counter counter_sectors={SECTORS}");
    // The same folder on both: two VMs all the same.
    cluster.create_vm("/vms/db", &counter, Some("high"));
    cluster.create_vm_on(ds2, "/vms/db", &counter, Some("high"));
    let both = [cluster.ds.as_str(), ds2];
    let mut a = cluster.agent_on("esx-a", &both, "", &[]);
    let b = cluster.agent_on("esx-b", &both, "", &[]);
    for ds in both {
        let out = cluster.ok_on(ds, "esx-a", &["vm", "start", "/vms/db"]);
        assert!(
            out.contains("vm /vms/db: running on host esx-a")
                && out.contains(&format!("datastore {ds} (")),
            "{out}"
        );
    }
    // The API says which datastore each runs from.
    let (status, body) = raw(
        &a.runtime.join("agent.sock"),
        b"GET /vms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    let vms: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let mut on: Vec<&str> = vms
        .iter()
        .map(|vm| vm["datastore_path"].as_str().unwrap())
        .collect();
    on.sort_unstable();
    assert_eq!(on, both, "{body}");
    let consoles = ["vms_db.console", "ds2-vms_db.console"];
    for name in consoles {
        wait_for(&format!("{name} counting on esx-a"), BOOT, || {
            std::fs::read_to_string(a.runtime.join("vms").join(name))
                .is_ok_and(|c| c.contains("counter: 256"))
        });
    }

    kill_host(&mut a);
    for ds in both {
        wait_for(
            &format!("/vms/db of {ds} running on esx-b"),
            DEAD_AFTER * 4 + BOOT,
            || {
                let out = cluster.ok_on(ds, "esx-b", &["vm", "list", "--json"]);
                let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
                list.iter().any(|vm| {
                    vm["path"] == "/vms/db" && vm["state"] == "running" && vm["host"] == "esx-b"
                })
            },
        );
    }
    // Its events say which datastore's /vms/db each restart was.
    for ds in both {
        wait_for(&format!("esx-b's event for /vms/db of {ds}"), BOOT, || {
            cluster.events(&b).iter().any(|e| {
                e["kind"] == "vm-restarted" && e["vm"] == "/vms/db" && e["datastore"] == ds
            })
        });
    }
    for name in consoles {
        wait_for(&format!("{name} counting on esx-b"), BOOT, || {
            std::fs::read_to_string(b.runtime.join("vms").join(name))
                .is_ok_and(|c| c.contains("counter: 256"))
        });
    }
    stop_agent(b);
}

#[test]
fn an_agent_kills_its_runner_that_lost_the_vms_lock_and_a_survivor_runs_the_vm() {
    if !have_kvm_and_root() {
        return;
    }
    let cluster = Cluster::new();
    let counter = format!("mode=counter counter_sectors={SECTORS}");
    cluster.create_vm("/vms/db", &counter, Some("high"));
    // esx-b has more room, so the placement goes there rather than back to esx-a.
    let a = cluster.agent_with("esx-a", "memory_mib = 128\n", &[]);
    let b = cluster.agent_with("esx-b", "memory_mib = 1024\n", &[]);
    cluster.start_counting(&a, &["/vms/db"]);
    let runner = vm_support::runners(&format!(
        "{} vm start --foreground /vms/db --console-log {}",
        cluster.ds,
        a.runtime.display()
    ));
    assert_eq!(runner.len(), 1);
    // The runner hangs: its heartbeat stops, so the cluster declares its slot dead and its
    // lock may be broken, while esx-a's agent lives on.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(runner[0]),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    wait_for(
        "esx-a saying db's lock is lost",
        DEAD_AFTER * 4 + BOOT,
        || kind_count(&cluster.events(&a), "lock-lost", "/vms/db") == 1,
    );
    wait_for("the hung runner killed", Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{}/stat", runner[0]))
            .map_or(true, |stat| stat.contains(") Z "))
    });
    let landed = cluster.wait_restarted("esx-a", &["/vms/db"]);
    assert_eq!(landed["/vms/db"], "esx-b");
    wait_for("db counting on esx-b", BOOT, || {
        console(&b, "/vms/db").contains("counter: 256")
    });
    stop_agent(b);
    stop_agent(a);
}
