//! DR drills and failover through the real `vapp` binary (`$VAPP_BIN`, as the hv bench):
//! two "sites" on this machine, each with its own registry and runtime directory, the
//! replication link over loopback (sync mode), N test-guest VMs (`mode=wait`) on a
//! datastore replicated from A to B. Needs root and /dev/kvm (skips with a printed reason).
//!
//! - `dr_drill_rto_<N>vm` (N = 1, 4): `baseline` starts the same N VMs directly from a local
//!   datastore and waits for every ready line; `drill` is `vapp dr test` at B (copies at one
//!   point, resignature, start and verify the N VMs), whose wall time is the drill's RTO.
//!   `dr cleanup` runs between samples, untimed. The drill's parts of the last sample are
//!   figures: `snapshot_ms`, `open_ms`, `network_ms`, `boot_ms` (mean from `vm start` to
//!   running) and `verify_ms` (mean from running to verified).
//! - `dr_drill_rto_1vm_nic`: `baseline` is the drill of one VM without a NIC, `drill` as above
//!   of one VM with a NIC (`--net prod`, the test
//!   guest answering on 10.9.0.1, `verify.ping`): the drill creates its isolated network
//!   (`network_ms`, within the RTO), starts the copy's NIC on it and pings it there; cleanup
//!   deletes the network between samples. Also needs /dev/net/tun.
//! - `dr_failover_1vm`: `baseline` as above for one VM; `unplanned` is `vapp dr failover` at B
//!   after site A's daemon was killed; `planned_stop_at_a` is `vapp dr failover --planned` at
//!   B with the VM running at A: B asks A to stop it (its power button), ship its last writes
//!   and demote, then promotes and starts and verifies it. Each sample sets up a fresh pair
//!   (and starts A's VM), untimed.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkGroup, Criterion, SamplingMode, criterion_group, criterion_main, measurement::WallTime,
};

const MIB: u64 = 1 << 20;
static PORT: AtomicU16 = AtomicU16::new(17_900);

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .nresamples(10_000)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(5));
}

fn vapp_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("VAPP_BIN") {
        return Some(PathBuf::from(bin));
    }
    let bin = std::env::current_exe()
        .ok()?
        .parent()?
        .parent()?
        .join("vapp");
    bin.is_file().then_some(bin)
}

/// One site: a directory with its registry and runtime directory.
struct Site {
    bin: PathBuf,
    dir: PathBuf,
    name: &'static str,
}

impl Site {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env_remove("VAPP_DATASTORE")
            .env_remove("VAPP_KEEP_SIGNATURE")
            .env("VAPP_HOST_NAME", format!("site-{}", self.name))
            .env("VAPP_STATE_DIR", self.dir.join("state"))
            .env("VAPP_RUNTIME_DIR", self.dir.join("run"))
            .stdin(Stdio::null());
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "site {}: vapp {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `vapp ARGS` where `hide` (the other site's directory) cannot be seen, as from
    /// another machine.
    fn isolated(&self, hide: &Path, args: &[&str]) -> String {
        let script = format!(
            "mount -t tmpfs dr-hidden {} && exec \"$0\" \"$@\"",
            hide.display()
        );
        let c = self.command(&[]);
        let inner = c.get_program().to_owned();
        let mut u = Command::new("unshare");
        u.args(["-m", "sh", "-c", &script]).arg(inner).args(args);
        for (k, v) in c.get_envs() {
            match v {
                Some(v) => u.env(k, v),
                None => u.env_remove(k),
            };
        }
        u.stdin(Stdio::null());
        let out = u.output().unwrap();
        assert!(
            out.status.success(),
            "site {}: vapp {args:?}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn p(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }

    fn status(&self, lun: &str) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["replica", "status", lun, "--json"])).unwrap();
        v[0].clone()
    }
}

/// Sites A and B replicating A's datastore "prod" (with `vms` test guests) to B.
struct Pair {
    /// Removed when the pair is dropped, after its processes.
    _dir: tempfile::TempDir,
    a: Site,
    b: Site,
    lun_a: String,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for s in [&self.a, &self.b] {
            kill_site(&s.dir.join("state"));
        }
    }
}

/// Kills every process that runs with `state` as its registry (daemons, VMs).
fn kill_site(state: &Path) {
    let needle = format!("VAPP_STATE_DIR={}", state.display());
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// `nic`: each VM has a NIC on network `prod` and is verified by ping on the drill's network.
fn pair(bin: &Path, guest: &Path, vms: usize, nic: bool) -> Pair {
    let dir = tempfile::Builder::new()
        .prefix("vapp-dr-bench-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let site = |name: &'static str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        Site {
            bin: bin.to_path_buf(),
            dir: d,
            name,
        }
    };
    let (a, b) = (site("a"), site("b"));
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "dr bench secret\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let secret = secret.to_str().unwrap().to_string();
    let (lun_a, lun_b) = (a.p("a.lun"), b.p("b.lun"));
    for l in [&lun_a, &lun_b] {
        std::fs::File::create(l)
            .unwrap()
            .set_len(256 * MIB)
            .unwrap();
    }
    let port = PORT.fetch_add(2, Ordering::Relaxed);
    let (addr_a, addr_b) = (
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{}", port + 1),
    );
    b.ok(&[
        "replica",
        "create",
        &lun_b,
        "--role",
        "secondary",
        "--listen",
        &addr_b,
        "--peer",
        &addr_a,
        "--secret-file",
        &secret,
        "--mode",
        "sync",
    ]);
    a.ok(&[
        "replica",
        "create",
        &lun_a,
        "--role",
        "primary",
        "--listen",
        &addr_a,
        "--peer",
        &addr_b,
        "--secret-file",
        &secret,
        "--mode",
        "sync",
    ]);
    a.ok(&["datastore", "format", &lun_a, "--name", "prod"]);
    let guest = guest.to_str().unwrap();
    for i in 0..vms {
        let (path, cmdline) = (
            format!("/vms/vm{i}"),
            format!("mode=test net_ip=10.9.0.{}", i + 1),
        );
        let mut args = vec![
            "-d",
            &lun_a,
            "vm",
            "create",
            &path,
            "--kernel",
            guest,
            "--vcpus",
            "1",
            "--memory",
            "64M",
            "--cmdline",
            "mode=wait",
        ];
        if nic {
            args.pop();
            args.extend([cmdline.as_str(), "--net", "prod"]);
        }
        a.ok(&args);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while {
        let s = a.status(&lun_a);
        s["link"] != "connected" || s["out_of_sync_bytes"] != 0
    } {
        assert!(Instant::now() < deadline, "replication never in sync");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut plan = format!(
        "name = \"bench\"\ntest_network = \"bench\"\n[[replica]]\nlun = \"{lun_b}\"\n[[datastore]]\nname = \"prod\"\nlun = \"{lun_b}\"\n"
    );
    for i in 0..vms {
        let verify = if nic {
            format!("verify.ping = \"10.9.0.{}\"", i + 1)
        } else {
            "verify.ready = true".to_string()
        };
        plan.push_str(&format!(
            "[[vm]]\npath = \"/vms/vm{i}\"\ndatastore = \"prod\"\n{verify}\n"
        ));
    }
    std::fs::write(b.p("plan.toml"), plan).unwrap();
    Pair {
        _dir: dir,
        a,
        b,
        lun_a,
    }
}

/// A local datastore with the same N VMs: what starting them costs without DR.
fn local(bin: &Path, guest: &Path, dir: &Path, tag: &str, vms: usize) -> (Site, String) {
    let site = Site {
        bin: bin.to_path_buf(),
        dir: dir.join(format!("l{tag}{vms}")),
        name: "local",
    };
    std::fs::create_dir_all(&site.dir).unwrap();
    let ds = site.p("local.vmfs");
    site.ok(&[
        "datastore",
        "format",
        &ds,
        "--name",
        "local",
        "--size",
        "256M",
    ]);
    for i in 0..vms {
        site.ok(&[
            "-d",
            &ds,
            "vm",
            "create",
            &format!("/vms/vm{i}"),
            "--kernel",
            guest.to_str().unwrap(),
            "--vcpus",
            "1",
            "--memory",
            "64M",
            "--cmdline",
            "mode=wait",
        ]);
    }
    (site, ds)
}

/// Starts the N VMs of `ds` at once and waits for every ready line; stops them untimed.
fn start_direct(site: &Site, ds: &str, vms: usize) -> Duration {
    let started = Instant::now();
    let mut children: Vec<(Child, String)> = (0..vms)
        .map(|i| {
            let console = site.p(&format!("vm{i}.console"));
            let _ = std::fs::remove_file(&console);
            let child = site
                .command(&[
                    "-d",
                    ds,
                    "vm",
                    "start",
                    &format!("/vms/vm{i}"),
                    "--foreground",
                    "--console-log",
                    &console,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            (child, console)
        })
        .collect();
    for (_, console) in &children {
        while !std::fs::read_to_string(console)
            .unwrap_or_default()
            .contains("waiting to be stopped")
        {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "a VM never got ready"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let took = started.elapsed();
    for (child, _) in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    took
}

/// `dr test` at `site`, timed; `dr cleanup` after it, untimed.
fn timed_drill(site: &Site, plan: &str) -> (Duration, serde_json::Value) {
    let t = Instant::now();
    let out = site.ok(&["dr", "test", plan, "--json"]);
    let took = t.elapsed();
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(record["passed"], true, "{record:#}");
    site.ok(&["dr", "cleanup", plan]);
    (took, record)
}

fn drill(c: &mut Criterion, bin: &Path, guest: &Path, dir: &Path) {
    let tun = std::path::Path::new("/dev/net/tun").exists();
    if !tun {
        eprintln!("dr_drill_rto_1vm_nic skipped: needs /dev/net/tun");
    }
    for (vms, nic) in [(1usize, false), (4, false), (1, true)] {
        if nic && !tun {
            continue;
        }
        let p = pair(bin, guest, vms, nic);
        let plan = p.b.p("plan.toml");
        let mut last = serde_json::Value::Null;
        let group_name = format!("dr_drill_rto_{vms}vm{}", if nic { "_nic" } else { "" });
        let mut group = c.benchmark_group(&group_name);
        configure(&mut group);
        if nic {
            // The baseline is the same drill of the VM without a NIC: the ratio is what
            // the drill's network and the ping check cost.
            let plain = pair(bin, guest, vms, false);
            let plain_plan = plain.b.p("plan.toml");
            group.bench_function("baseline", |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| timed_drill(&plain.b, &plain_plan).0)
                        .sum()
                });
            });
        } else {
            let (local_site, ds) = local(bin, guest, dir, "d", vms);
            group.bench_function("baseline", |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| start_direct(&local_site, &ds, vms))
                        .sum()
                });
            });
        }
        group.bench_function("drill", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (took, record) = timed_drill(&p.b, &plan);
                    total += took;
                    last = record;
                }
                total
            });
        });
        group.finish();
        // Filtered out (`cargo bench --bench dr -- NAME`): no drill ran, no figures.
        if last.is_null() {
            continue;
        }
        let vms_done = last["vms"].as_array().cloned().unwrap_or_default();
        let mean = |f: &dyn Fn(&serde_json::Value) -> u64| {
            vms_done.iter().map(f).sum::<u64>() as f64 / vms_done.len().max(1) as f64
        };
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        let parts = [
            ("snapshot_ms", n(&last["snapshot_ms"]) as f64),
            ("open_ms", n(&last["open_ms"]) as f64),
            ("network_ms", n(&last["network_ms"]) as f64),
            (
                "boot_ms",
                mean(&|v| n(&v["running_ms"]).saturating_sub(n(&v["start_ms"]))),
            ),
            (
                "verify_ms",
                mean(&|v| n(&v["done_ms"]).saturating_sub(n(&v["running_ms"]))),
            ),
            ("rto_ms", n(&last["rto_ms"]) as f64),
        ];
        for (name, value) in parts {
            eprintln!("{group_name}: {name} {value:.0} ms");
            vapp_benches::write_figure(&group_name, name, value, "ms");
        }
    }
}

fn failover(c: &mut Criterion, bin: &Path, guest: &Path, dir: &Path) {
    let (local_site, ds) = local(bin, guest, dir, "f", 1);
    let mut group = c.benchmark_group("dr_failover_1vm");
    configure(&mut group);
    group.bench_function("baseline", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| start_direct(&local_site, &ds, 1)).sum());
    });
    for planned in [false, true] {
        let name = if planned {
            "planned_stop_at_a"
        } else {
            "unplanned"
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let p = pair(bin, guest, 1, false);
                    let plan = p.b.p("plan.toml");
                    let hide = p.a.dir.clone();
                    let t;
                    if planned {
                        let mut at_a = start_at_a(&p);
                        t = Instant::now();
                        p.b.isolated(
                            &hide,
                            &["dr", "failover", &plan, "--planned", "--stop-timeout", "30"],
                        );
                        let _ = at_a.wait();
                    } else {
                        kill_site(&p.a.dir.join("state"));
                        t = Instant::now();
                        p.b.isolated(&hide, &["dr", "failover", &plan]);
                    }
                    total += t.elapsed();
                    drop(p);
                }
                total
            });
        });
    }
    group.finish();
}

/// Starts the pair's VM at site A and waits until it is ready.
fn start_at_a(p: &Pair) -> Child {
    let console = p.a.p("vm0.console");
    let child =
        p.a.command(&[
            "-d",
            &p.lun_a,
            "vm",
            "start",
            "/vms/vm0",
            "--foreground",
            "--console-log",
            &console,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("waiting to be stopped")
    {
        assert!(Instant::now() < deadline, "site A's VM never got ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

fn benches(c: &mut Criterion) {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("dr bench skipped: needs root (mount namespaces for the isolated site)");
        return;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("dr bench skipped: needs /dev/kvm");
        return;
    }
    let Some(bin) = vapp_binary() else {
        eprintln!(
            "dr bench skipped: no vapp binary (cargo build --release --bin vapp, or set VAPP_BIN)"
        );
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("vapp-dr-bench-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let guest = dir.path().join("guest.elf");
    let out = Command::new(&bin)
        .args(["vm", "test-guest", guest.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "vapp vm test-guest");
    drill(c, &bin, &guest, dir.path());
    failover(c, &bin, &guest, dir.path());
}

criterion_group!(dr_benches, benches);
criterion_main!(dr_benches);
