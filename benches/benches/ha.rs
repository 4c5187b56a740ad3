//! HA failover with real host agents (`vapp host run`) and test-guest VMs under KVM.
//!
//! - `ha_failover`: a host dies (kill -9 of its agent and of its VM's runner) until the
//!   protected VM's guest runs again on the surviving agent (its console shows the guest
//!   started writing its disk): `kill-9`. Baseline: 1.2 x the configured dead-host time plus
//!   the guest's own boot, measured in the same run by starting the same VM directly
//!   (`vm start --foreground`) until the same console line. The ratio printed by `make bench`
//!   is baseline / failover, so the goal (back within 1.2 x the dead-host time plus the
//!   boot) is >= 1.0.
//! - `ha_agent_at_rest`: the agent's resident memory and CPU use over 10 s while it runs
//!   3 VMs and watches one other agent (figures, not times).
//!
//! It needs root, /dev/kvm and the `vapp` binary: `$VAPP_BIN`, or target/<profile>/vapp
//! (`make bench` builds the release binary first).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};

/// The datastore's I/O timeout: the dead-host time is 8 x this.
const IO_TIMEOUT: Duration = Duration::from_millis(500);
const BOOTED: &str = "counter: started";
const COUNTER: &str = "mode=counter counter_sectors=8";

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

struct Bench {
    bin: PathBuf,
    dir: tempfile::TempDir,
    ds: String,
}

/// A running agent and where it keeps its runtime files.
struct Agent {
    child: Child,
    runtime: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_runners(&self.runtime);
    }
}

/// Kills, with -9, the VM runners an agent started (their command line names its runtime).
fn kill_runners(runtime: &Path) {
    let needle = runtime.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("vm start --foreground") && cmdline.contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn uuid_of(name: &str) -> String {
    let n = name
        .bytes()
        .fold(0u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    format!("{n:02x}{n:02x}{n:02x}{n:02x}-0000-4000-8000-0000000000{n:02x}")
}

impl Bench {
    fn new(bin: PathBuf) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("ha.vmfs").to_str().unwrap().to_string();
        let bench = Bench { bin, dir, ds };
        let timeout = format!("{}ms", IO_TIMEOUT.as_millis());
        bench.ok(
            "bench",
            &[
                "datastore",
                "format",
                &bench.ds,
                "--name",
                "ha",
                "--size",
                "1G",
                "--io-timeout",
                &timeout,
            ],
        );
        let guest = bench.dir.path().join("guest.elf");
        bench.ok("bench", &["vm", "test-guest", guest.to_str().unwrap()]);
        for vm in ["/vms/a", "/vms/b", "/vms/c"] {
            bench.ok(
                "bench",
                &[
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
                    COUNTER,
                    "--disk",
                    "1M",
                    "--ha",
                    "high",
                ],
            );
        }
        bench
    }

    fn runtime(&self, host: &str) -> PathBuf {
        self.dir.path().join(format!("run-{host}"))
    }

    fn command(&self, host: &str, args: &[&str]) -> Command {
        let mut command = Command::new(&self.bin);
        command
            .arg("-d")
            .arg(&self.ds)
            .args(args)
            .env_remove("VAPP_DATASTORE")
            .env("VAPP_HOST_NAME", host)
            .env("VAPP_HOST_UUID", uuid_of(host))
            .env("VAPP_RUNTIME_DIR", self.runtime(host))
            .stdin(Stdio::null());
        command
    }

    fn ok(&self, host: &str, args: &[&str]) {
        let out = self.command(host, args).output().unwrap();
        assert!(
            out.status.success(),
            "vapp {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn agent(&self, name: &str) -> Agent {
        let runtime = self.runtime(name);
        std::fs::create_dir_all(&runtime).unwrap();
        let config = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "name = {name:?}\ndatastores = [{:?}]\nruntime_dir = {:?}\n",
                self.ds,
                runtime.to_str().unwrap()
            ),
        )
        .unwrap();
        let child = self
            .command(name, &["host", "run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let socket = runtime.join("agent.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "agent {name} never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        Agent { child, runtime }
    }
}

/// Waits until `file` holds `marker` past byte `from`.
fn wait_console(file: &Path, from: usize, marker: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read(file).unwrap_or_default();
        if text.len() > from && String::from_utf8_lossy(&text[from..]).contains(marker) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: no {marker:?} within {timeout:?}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn console(agent: &Agent, vm: &str) -> PathBuf {
    agent.runtime.join("vms").join(format!(
        "{}.console",
        vm.trim_start_matches('/').replace('/', "_")
    ))
}

fn len(path: &Path) -> usize {
    std::fs::metadata(path).map_or(0, |m| usize::try_from(m.len()).unwrap_or(usize::MAX))
}

/// Starts `/vms/a` directly and times it until the guest writes its disk.
fn boot_once(bench: &Bench) -> Duration {
    let log = bench.dir.path().join("direct.console");
    let _ = std::fs::remove_file(&log);
    let start = Instant::now();
    let mut runner = bench
        .command(
            "direct",
            &["vm", "start", "--foreground", "/vms/a", "--console-log"],
        )
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_console(&log, 0, BOOTED, Duration::from_secs(120));
    let took = start.elapsed();
    // Power off (a second SIGTERM), so the VM's lock is free for the next start.
    for _ in 0..2 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(runner.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    runner.wait().unwrap();
    took
}

fn failover(c: &mut Criterion, bench: &Bench) {
    let dead_after = IO_TIMEOUT * 8;
    let survivor = bench.agent("survivor");
    let mut group = c.benchmark_group("ha_failover");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(10));
    let mut boots = Vec::new();
    group.bench_function("baseline", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let boot = boot_once(bench);
                boots.push(boot);
                total += dead_after.mul_f64(1.2) + boot;
            }
            total
        })
    });
    let mut failovers = Vec::new();
    let mut round = 0;
    group.bench_function("kill-9", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                round += 1;
                let name = format!("doomed-{round}");
                let mut doomed = bench.agent(&name);
                bench.ok(&name, &["vm", "start", "/vms/a"]);
                wait_console(
                    &console(&doomed, "/vms/a"),
                    0,
                    BOOTED,
                    Duration::from_secs(120),
                );
                // Let the survivor see the doomed host's VM lock before it dies.
                std::thread::sleep(IO_TIMEOUT * 2);
                let there = console(&survivor, "/vms/a");
                let from = len(&there);
                let killed = Instant::now();
                doomed.child.kill().unwrap();
                kill_runners(&doomed.runtime);
                let _ = doomed.child.wait();
                wait_console(
                    &there,
                    from,
                    BOOTED,
                    dead_after * 4 + Duration::from_secs(120),
                );
                let took = killed.elapsed();
                failovers.push(took);
                total += took;
                drop(doomed);
                bench.ok("survivor", &["vm", "stop", "--force", "/vms/a"]);
            }
            total
        })
    });
    group.finish();
    if !failovers.is_empty() && !boots.is_empty() {
        let mean =
            |d: &[Duration]| d.iter().map(Duration::as_secs_f64).sum::<f64>() / d.len() as f64;
        let boot = mean(&boots);
        let back = mean(&failovers);
        eprintln!(
            "ha_failover: kill -9 to the guest running on the survivor = {back:.2} s on average over {} kills: {:.2} x the dead-host time ({dead_after:?}) plus the guest's boot ({boot:.2} s, started directly) (goal <= 1.2)",
            failovers.len(),
            (back - boot) / dead_after.as_secs_f64()
        );
    }
    drop(survivor);
}

/// CPU ticks (user + system) of `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

fn at_rest(bench: &Bench) {
    let _other = bench.agent("watcher");
    let agent = bench.agent("resting");
    for vm in ["/vms/a", "/vms/b", "/vms/c"] {
        bench.ok("resting", &["vm", "start", vm]);
        wait_console(&console(&agent, vm), 0, BOOTED, Duration::from_secs(120));
    }
    let pid = agent.child.id();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let window = Duration::from_secs(10);
    let before = cpu_ticks(pid);
    let start = Instant::now();
    let mut rss_max = 0;
    while start.elapsed() < window {
        rss_max = rss_max.max(rss_bytes(pid));
        std::thread::sleep(Duration::from_millis(500));
    }
    let cpu = (cpu_ticks(pid) - before) as f64 / hz / start.elapsed().as_secs_f64() * 100.0;
    eprintln!(
        "ha_agent_at_rest: the agent with 3 VMs uses {:.1} MiB resident and {cpu:.2} % of one CPU over {window:?}",
        rss_max as f64 / f64::from(1u32 << 20)
    );
    vapp_benches::write_figure("ha_agent_at_rest", "rss", rss_max as f64, "bytes");
    vapp_benches::write_figure("ha_agent_at_rest", "cpu", cpu, "% of one CPU");
}

fn main() {
    let Some(bin) = vapp_binary() else {
        eprintln!(
            "ha bench: skipped: no vapp binary (cargo build --release --bin vapp, or set VAPP_BIN)"
        );
        return;
    };
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/kvm").exists() {
        eprintln!("ha bench: skipped: needs root and /dev/kvm");
        return;
    }
    let bench = Bench::new(bin);
    let mut c = Criterion::default().configure_from_args();
    failover(&mut c, &bench);
    at_rest(&bench);
    c.final_summary();
}
