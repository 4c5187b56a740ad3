//! Three host agents in three network namespaces over one datastore served by qemu-nbd in
//! the root namespace, each running a protected `mode=heartbeat` test-guest VM. A sampler
//! reads every VM's heartbeat ring from the datastore every 100 ms for the whole test and
//! checks that no VM's history ever forks or goes backwards: no VM runs twice.
//!
//! - esx-b's link goes down: its agent fences and powers its VM off (`isolated`,
//!   `vm-powered-off`), the VM restarts elsewhere and continues its counter; when the link
//!   comes back esx-b rejoins and does not start the VM again.
//! - esx-c (isolation response `keep`) loses its link: its VM stays up but cannot write; it
//!   restarts elsewhere all the same, still without a fork; back on the datastore, esx-c powers
//!   its fenced copy off.
//! - esx-a is killed with -9 with its VMs: the survivors restart them and every counter goes on.
//!
//! A second test gives one agent two datastores, one over NBD through a link that goes down
//! and one a local file: only the first one's VM is powered off, and the agent rejoins it.
//!
//! Namespaces, links and processes are created by the test and always removed.
#![allow(clippy::unwrap_used)]

mod vm_support;

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hv::test_guest::{HEARTBEAT_SECTORS, HeartbeatHistory};

const IO_TIMEOUT_MS: u64 = 250;
/// The cluster's dead-host time at that I/O timeout (8x, vmfs::cluster::Timing).
const DEAD_AFTER: Duration = Duration::from_millis(8 * IO_TIMEOUT_MS);
/// Longest a test guest may take to boot: its kernel code is emulated on PVM hosts.
const BOOT: Duration = Duration::from_secs(60);
const VMS: [&str; 3] = ["/vms/a1", "/vms/b1", "/vms/c1"];

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn vapp(args: &[&str], envs: &[(&str, &Path)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vapp"));
    command
        .args(args)
        .env_remove("VAPP_DATASTORE")
        .env_remove("VAPP_KVM_DEVICE")
        .stdin(Stdio::null());
    for (k, v) in envs {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "vapp {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One namespace per host, each joined to the root namespace by a veth pair; removed on drop.
struct Links {
    namespaces: Vec<String>,
    veths: Vec<String>,
    /// Per host: its namespace, the veth end inside it, the server's address on its link.
    ends: Vec<(String, String, String)>,
}

impl Links {
    fn new(tag: u32, hosts: usize) -> Links {
        let mut links = Links {
            namespaces: Vec::new(),
            veths: Vec::new(),
            ends: Vec::new(),
        };
        let octet = 20 + tag % 200;
        for i in 0..hosts {
            let side = char::from(b'a' + i as u8);
            let ns = format!("vapph{tag}{side}");
            let outer = format!("vh{tag}{side}0");
            let inner = format!("vh{tag}{side}1");
            sh(&["ip", "netns", "add", &ns]);
            links.namespaces.push(ns.clone());
            sh(&[
                "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            links.veths.push(outer.clone());
            sh(&["ip", "link", "set", &inner, "netns", &ns]);
            let server = format!("10.{octet}.{}.1", 40 + i);
            let client = format!("10.{octet}.{}.2", 40 + i);
            sh(&["ip", "addr", "add", &format!("{server}/30"), "dev", &outer]);
            sh(&["ip", "link", "set", &outer, "up"]);
            let exec = ["ip", "netns", "exec", ns.as_str()];
            let client = format!("{client}/30");
            for cmd in [
                &["ip", "addr", "add", client.as_str(), "dev", inner.as_str()][..],
                &["ip", "link", "set", inner.as_str(), "up"],
                &["ip", "link", "set", "lo", "up"],
            ] {
                sh(&[&exec[..], cmd].concat());
            }
            links.ends.push((ns, inner, server));
        }
        links
    }

    /// Takes host `i`'s link down (a failed NIC or switch port) or brings it back up.
    fn set(&self, i: usize, up: bool) {
        let (ns, inner, _) = &self.ends[i];
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "ip",
            "link",
            "set",
            inner,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        for veth in &self.veths {
            let _ = Command::new("ip")
                .args(["link", "delete", veth])
                .stderr(Stdio::null())
                .status();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// qemu-nbd serving the datastore file on every address of the root namespace.
struct QemuNbd(Child);

impl QemuNbd {
    fn start(file: &Path, port: u16) -> QemuNbd {
        let child = Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "--persistent",
                "--shared=32",
                "-x",
                "ds",
                "-b",
                "0.0.0.0",
            ])
            .args(["-p", &port.to_string()])
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd(child)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Agent {
    name: String,
    runtime: PathBuf,
    child: Option<Child>,
}

impl Agent {
    fn env(&self) -> [(&'static str, &Path); 1] {
        [("VAPP_RUNTIME_DIR", self.runtime.as_path())]
    }

    fn events(&self) -> Vec<serde_json::Value> {
        let out = vapp(&["host", "events", "--json"], &self.env());
        serde_json::from_str(&out).unwrap()
    }

    fn has_event(&self, kind: &str, vm: Option<&str>) -> bool {
        self.events()
            .iter()
            .any(|e| e["kind"] == kind && vm.is_none_or(|vm| e["vm"] == vm))
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in vm_support::runners(&self.runtime.to_string_lossy()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the sampler has seen of every VM's heartbeat ring, and the first fork it found.
#[derive(Default)]
struct Seen {
    histories: HashMap<&'static str, HeartbeatHistory>,
    fork: Option<String>,
}

/// Reads every VM's ring every 100 ms from the datastore file until `stop` is set.
fn sampler(file: PathBuf, seen: Arc<Mutex<Seen>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let sample = (|| -> Result<Vec<(&'static str, Vec<u8>)>, String> {
            let lun = lun::open(
                file.to_str().unwrap(),
                &lun::OpenOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .map_err(|e| e.to_string())?;
            let ds = vmfs::Datastore::open(lun, &vmfs::OpenOptions::read_only())
                .map_err(|e| e.to_string())?;
            let mut rings = Vec::new();
            for vm in VMS {
                let ino = ds
                    .resolve(&format!("{vm}/disk0.vdisk"))
                    .map_err(|e| e.to_string())?;
                let mut ring = vec![0u8; HEARTBEAT_SECTORS as usize * 512];
                ds.read(ino, 0, &mut ring).map_err(|e| e.to_string())?;
                rings.push((vm, ring));
            }
            Ok(rings)
        })();
        match sample {
            Ok(rings) => {
                let mut seen = seen.lock().unwrap();
                for (vm, ring) in rings {
                    if let Err(e) = seen.histories.entry(vm).or_default().observe(&ring) {
                        seen.fork.get_or_insert(format!("{vm}: {e}"));
                    }
                }
            }
            // A read-only open can meet a transaction in flight; the next sample will do.
            Err(e) => eprintln!("sampler: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn history(seen: &Mutex<Seen>, vm: &str) -> (usize, u64) {
    let seen = seen.lock().unwrap();
    assert!(
        seen.fork.is_none(),
        "{}",
        seen.fork.as_deref().unwrap_or("")
    );
    seen.histories
        .get(vm)
        .map_or((0, 0), |h| (h.boots().len(), h.last()))
}

/// Waits until `vm` has at least `boots` boots and writes past `beyond`.
fn wait_counting(seen: &Mutex<Seen>, vm: &str, boots: usize, beyond: u64, timeout: Duration) {
    wait_for(
        &format!("{vm}: boot {boots} counting past {beyond}"),
        timeout,
        || {
            let (b, last) = history(seen, vm);
            b >= boots && last > beyond
        },
    );
}

#[test]
fn isolated_hosts_power_off_or_keep_their_vms_and_no_vm_ever_runs_twice() {
    use lun::prereq::{have_command, have_device, is_root, require};
    if !require(
        is_root() && have_command("ip") && have_command("qemu-nbd"),
        "root, ip and qemu-nbd (network namespaces and an NBD server)",
    ) || !require(
        have_device("/dev/kvm"),
        "/dev/kvm (read-write) for booting guests",
    ) {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ds.vmfs");
    let f = file.to_str().unwrap();
    let guest = dir.path().join("testguest.elf");
    let setup = [("VAPP_RUNTIME_DIR", dir.path())];
    vapp(
        &[
            "datastore",
            "format",
            f,
            "--name",
            "ha",
            "--size",
            "1G",
            "--lock-protocol",
            "paxos",
            "--io-timeout",
            &format!("{IO_TIMEOUT_MS}ms"),
        ],
        &setup,
    );
    vapp(&["vm", "test-guest", guest.to_str().unwrap()], &setup);
    for vm in VMS {
        vapp(
            &[
                "-d",
                f,
                "vm",
                "create",
                vm,
                "--kernel",
                guest.to_str().unwrap(),
                "--vcpus",
                "1",
                "--memory",
                "64M",
                "--cmdline",
                "mode=heartbeat",
                "--disk",
                "1M",
                "--ha",
                "high",
            ],
            &setup,
        );
    }

    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = QemuNbd::start(&file, port);
    let links = Links::new(std::process::id() % 100_000, 3);
    let responses = ["power-off", "power-off", "keep"];
    let mut agents: Vec<Agent> = ["esx-a", "esx-b", "esx-c"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let (ns, _, addr) = &links.ends[i];
            let runtime = dir.path().join(format!("run-{name}"));
            std::fs::create_dir_all(&runtime).unwrap();
            let config = dir.path().join(format!("{name}.toml"));
            std::fs::write(
                &config,
                format!(
                    "name = {name:?}\ndatastores = [\"nbd://{addr}:{port}/ds\"]\n\
                     runtime_dir = {:?}\nisolation_response = {:?}\n",
                    runtime.to_str().unwrap(),
                    responses[i]
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
            let child = Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(env!("CARGO_BIN_EXE_vapp"))
                .args(["--log", "info", "host", "run", "--config"])
                .arg(&config)
                .env_remove("VAPP_DATASTORE")
                .env_remove("VAPP_KVM_DEVICE")
                .env("VAPP_HOST_NAME", name)
                .env(
                    "VAPP_HOST_UUID",
                    format!("0000000{i}-0000-4000-8000-00000000000{i}"),
                )
                .env("VAPP_RUNTIME_DIR", &runtime)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            let socket = runtime.join("agent.sock");
            wait_for(
                &format!("agent {name} listening"),
                Duration::from_secs(30),
                || socket.exists(),
            );
            Agent {
                name: name.to_string(),
                runtime,
                child: Some(child),
            }
        })
        .collect();
    for (agent, vm) in agents.iter().zip(VMS) {
        let out = vapp(&["-d", f, "vm", "start", vm], &agent.env());
        assert!(
            out.contains(&format!("running on host {}", agent.name)),
            "{out}"
        );
    }

    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampling = {
        let (file, seen, stop) = (file.clone(), seen.clone(), stop.clone());
        std::thread::spawn(move || sampler(file, seen, stop))
    };
    for vm in VMS {
        wait_counting(&seen, vm, 1, 20, BOOT);
    }

    // (b) esx-b loses its link: it fences and powers its VM off, which restarts elsewhere.
    let (_, before) = history(&seen, "/vms/b1");
    let cut = Instant::now();
    links.set(1, false);
    wait_for("esx-b powering off /vms/b1", DEAD_AFTER * 4, || {
        agents[1].has_event("vm-powered-off", Some("/vms/b1"))
    });
    assert!(agents[1].has_event("isolated", None));
    let console_b1 = agents[1].runtime.join("vms").join("vms_b1.console");
    assert!(
        vm_support::runners(&console_b1.to_string_lossy()).is_empty(),
        "esx-b's runner of /vms/b1 still runs"
    );
    wait_counting(&seen, "/vms/b1", 2, before, DEAD_AFTER * 4 + BOOT);
    eprintln!(
        "/vms/b1 counting again {:.2} s after esx-b's link went down",
        cut.elapsed().as_secs_f64()
    );
    links.set(1, true);
    wait_for("esx-b rejoining", Duration::from_secs(30), || {
        agents[1].has_event("rejoined", None)
    });
    // Back on the datastore, esx-b does not start the VM another host took from it.
    std::thread::sleep(DEAD_AFTER * 2);
    assert!(!agents[1].has_event("vm-restarted", Some("/vms/b1")));

    // (c) esx-c keeps its VM: it stays up unable to write, and restarts elsewhere all the same.
    let (boots_c, before) = history(&seen, "/vms/c1");
    let console_c1 = agents[2].runtime.join("vms").join("vms_c1.console");
    let kept = vm_support::runners(&console_c1.to_string_lossy());
    assert_eq!(kept.len(), 1, "esx-c runs /vms/c1");
    links.set(2, false);
    wait_for("esx-c keeping /vms/c1", DEAD_AFTER * 4, || {
        agents[2].has_event("vm-kept", Some("/vms/c1"))
    });
    wait_counting(&seen, "/vms/c1", boots_c + 1, before, DEAD_AFTER * 4 + BOOT);
    assert!(
        Path::new(&format!("/proc/{}", kept[0])).exists(),
        "esx-c's runner of /vms/c1 did not stay up"
    );
    assert!(!agents[2].has_event("vm-powered-off", Some("/vms/c1")));
    links.set(2, true);
    wait_for("esx-c rejoining", Duration::from_secs(30), || {
        agents[2].has_event("rejoined", None)
    });
    // Its kept copy was fenced and lost the VM's lock: esx-c powers it off once back.
    wait_for(
        "esx-c powering off its fenced copy of /vms/c1",
        Duration::from_secs(30),
        || !Path::new(&format!("/proc/{}", kept[0])).exists(),
    );
    // The runner is reaped inside the power-off, which records its event once it returns.
    let recorded = Instant::now();
    while !agents[2].has_event("vm-powered-off", Some("/vms/c1")) {
        assert!(
            recorded.elapsed() < Duration::from_secs(10),
            "{:#?}",
            agents[2].events()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // (a) esx-a dies with its VMs: the survivors restart them, every counter goes on.
    let on_a: Vec<&str> = VMS
        .into_iter()
        .filter(|vm| {
            let console = format!("{}.console", vm.trim_start_matches('/').replace('/', "_"));
            !vm_support::runners(
                &agents[0]
                    .runtime
                    .join("vms")
                    .join(console)
                    .to_string_lossy(),
            )
            .is_empty()
        })
        .collect();
    assert!(on_a.contains(&"/vms/a1"), "esx-a runs {on_a:?}");
    let lasts: Vec<(usize, u64)> = VMS.iter().map(|vm| history(&seen, vm)).collect();
    let killed = Instant::now();
    agents[0].kill9();
    for (vm, (boots, last)) in VMS.iter().zip(&lasts) {
        // esx-a's VMs go on in a new boot on a survivor (a write esx-a had in flight may
        // still land first); the others go on in the boot they had.
        let boots = boots + usize::from(on_a.contains(vm));
        wait_for(
            &format!("{vm} counting after esx-a died"),
            DEAD_AFTER * 4 + BOOT,
            || {
                let (b, l) = history(&seen, vm);
                l > *last && b >= boots
            },
        );
    }
    eprintln!(
        "every VM counting {:.2} s after esx-a was killed",
        killed.elapsed().as_secs_f64()
    );
    // Let the sampler see the survivors run a while longer: still no fork.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    sampling.join().unwrap();
    for vm in VMS {
        let (boots, last) = history(&seen, vm);
        eprintln!("{vm}: {boots} boots, counter {last}");
    }
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
    drop(agents);
    drop(links);
    drop(server);
}

/// What `vm`'s heartbeat ring on the datastore file says last, read as a survivor would
/// (a read-only open can meet a transaction in flight: then it reads again).
fn heartbeat_of(file: &Path, vm: &str) -> u64 {
    for _ in 0..20 {
        let read = (|| -> Result<Vec<u8>, String> {
            let lun = lun::open(
                file.to_str().unwrap(),
                &lun::OpenOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .map_err(|e| e.to_string())?;
            let ds = vmfs::Datastore::open(lun, &vmfs::OpenOptions::read_only())
                .map_err(|e| e.to_string())?;
            let ino = ds
                .resolve(&format!("{vm}/disk0.vdisk"))
                .map_err(|e| e.to_string())?;
            let mut ring = vec![0u8; HEARTBEAT_SECTORS as usize * 512];
            ds.read(ino, 0, &mut ring).map_err(|e| e.to_string())?;
            Ok(ring)
        })();
        match read {
            Ok(ring) => {
                let mut history = HeartbeatHistory::default();
                history.observe(&ring).unwrap();
                return history.last();
            }
            Err(e) => eprintln!("reading {vm}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{vm}: its heartbeat ring could not be read");
}

/// This host's record on the datastore file, `/.vapp/hosts/<name>`, as JSON.
fn host_record(file: &Path, name: &str) -> serde_json::Value {
    for _ in 0..20 {
        let read = (|| -> Result<serde_json::Value, String> {
            let lun = lun::open(
                file.to_str().unwrap(),
                &lun::OpenOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .map_err(|e| e.to_string())?;
            let ds = vmfs::Datastore::open(lun, &vmfs::OpenOptions::read_only())
                .map_err(|e| e.to_string())?;
            let ino = ds
                .resolve(&format!("/.vapp/hosts/{name}"))
                .map_err(|e| e.to_string())?;
            let mut bytes = vec![0u8; 4096];
            let n = ds.read(ino, 0, &mut bytes).map_err(|e| e.to_string())?;
            bytes.truncate(n);
            serde_json::from_slice(bytes.trim_ascii_end()).map_err(|e| e.to_string())
        })();
        match read {
            Ok(record) => return record,
            Err(e) => eprintln!("reading {name}'s record: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{name}: its host record could not be read");
}

/// One agent of two datastores: one over NBD through a link that goes down, one a local file.
/// Isolated from the first, it powers off that datastore's VM only; the other VM runs on
/// untouched, and once the link is back the agent rejoins the first datastore with a new host
/// slot incarnation and a fresh host record there, and restarts the protected VM it lost.
#[test]
fn an_agent_isolated_from_one_of_its_datastores_powers_off_that_datastores_vms_only() {
    use lun::prereq::{have_command, have_device, is_root, require};
    if !require(
        is_root() && have_command("ip") && have_command("qemu-nbd"),
        "root, ip and qemu-nbd (network namespaces and an NBD server)",
    ) || !require(
        have_device("/dev/kvm"),
        "/dev/kvm (read-write) for booting guests",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("testguest.elf");
    let setup = [("VAPP_RUNTIME_DIR", dir.path())];
    vapp(&["vm", "test-guest", guest.to_str().unwrap()], &setup);
    let remote = dir.path().join("remote.vmfs");
    let local = dir.path().join("local.vmfs");
    for (file, vm) in [(&remote, "/vms/r1"), (&local, "/vms/l1")] {
        let f = file.to_str().unwrap();
        vapp(
            &[
                "datastore",
                "format",
                f,
                "--name",
                "two",
                "--size",
                "256M",
                "--lock-protocol",
                "paxos",
                "--io-timeout",
                &format!("{IO_TIMEOUT_MS}ms"),
            ],
            &setup,
        );
        vapp(
            &[
                "-d",
                f,
                "vm",
                "create",
                vm,
                "--kernel",
                guest.to_str().unwrap(),
                "--vcpus",
                "1",
                "--memory",
                "64M",
                "--cmdline",
                "mode=heartbeat",
                "--disk",
                "1M",
                "--ha",
                "high",
            ],
            &setup,
        );
    }
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = QemuNbd::start(&remote, port);
    let links = Links::new(std::process::id() % 100_000 + 1, 1);
    let (ns, _, addr) = &links.ends[0];
    let name = "esx-m";
    let runtime = dir.path().join("run-esx-m");
    std::fs::create_dir_all(&runtime).unwrap();
    let config = dir.path().join("esx-m.toml");
    std::fs::write(
        &config,
        format!(
            "name = {name:?}\ndatastores = [\"nbd://{addr}:{port}/ds\", {:?}]\nruntime_dir = {:?}\n",
            local.to_str().unwrap(),
            runtime.to_str().unwrap(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("esx-m.log")).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(env!("CARGO_BIN_EXE_vapp"))
        .args(["--log", "info", "host", "run", "--config"])
        .arg(&config)
        .env_remove("VAPP_DATASTORE")
        .env_remove("VAPP_KVM_DEVICE")
        .env("VAPP_HOST_NAME", name)
        .env("VAPP_RUNTIME_DIR", &runtime)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let socket = runtime.join("agent.sock");
    wait_for("agent esx-m listening", Duration::from_secs(30), || {
        socket.exists()
    });
    let agent = Agent {
        name: name.to_string(),
        runtime: runtime.clone(),
        child: Some(child),
    };
    for (file, vm) in [(&remote, "/vms/r1"), (&local, "/vms/l1")] {
        let out = vapp(
            &["-d", file.to_str().unwrap(), "vm", "start", vm],
            &agent.env(),
        );
        assert!(out.contains("running on host esx-m"), "{out}");
    }
    wait_for("both VMs counting", BOOT, || {
        heartbeat_of(&remote, "/vms/r1") > 20 && heartbeat_of(&local, "/vms/l1") > 20
    });
    let local_runner = vm_support::runners(&local.to_string_lossy());
    assert_eq!(local_runner.len(), 1, "esx-m runs /vms/l1");
    let record = host_record(&remote, name);

    links.set(0, false);
    wait_for("esx-m powering off /vms/r1", DEAD_AFTER * 4, || {
        agent.has_event("vm-powered-off", Some("/vms/r1"))
    });
    let events = agent.events();
    let isolated: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["kind"] == "isolated").collect();
    assert_eq!(isolated.len(), 1, "{events:?}");
    assert_eq!(isolated[0]["datastore"], format!("nbd://{addr}:{port}/ds"));
    assert!(!agent.has_event("vm-powered-off", Some("/vms/l1")));
    // The local datastore's VM runs on in the same runner and goes on writing.
    let before = heartbeat_of(&local, "/vms/l1");
    wait_for(
        "/vms/l1 counting while esx-m is isolated",
        Duration::from_secs(10),
        || heartbeat_of(&local, "/vms/l1") > before + 20,
    );
    assert_eq!(vm_support::runners(&local.to_string_lossy()), local_runner);

    links.set(0, true);
    wait_for("esx-m rejoining", Duration::from_secs(30), || {
        agent.has_event("rejoined", None)
    });
    wait_for(
        "esx-m's record on the rejoined datastore naming its new incarnation",
        Duration::from_secs(30),
        || {
            let now = host_record(&remote, name);
            (now["slot"].clone(), now["generation"].clone())
                != (record["slot"].clone(), record["generation"].clone())
        },
    );
    assert_eq!(vm_support::runners(&local.to_string_lossy()), local_runner);
    // Back on the datastore, the agent finds /vms/r1 orphaned (its fenced runner's slot is
    // dead) and, the only live host there, restarts it: the protected VM runs again.
    let after = heartbeat_of(&remote, "/vms/r1");
    wait_for("esx-m restarting /vms/r1", DEAD_AFTER * 4 + BOOT, || {
        agent.has_event("vm-restarted", Some("/vms/r1"))
    });
    wait_for("/vms/r1 counting after the rejoin", BOOT, || {
        heartbeat_of(&remote, "/vms/r1") > after + 20
    });
    assert_eq!(vm_support::runners(&local.to_string_lossy()), local_runner);
    drop(agent);
    drop(links);
    drop(server);
}
