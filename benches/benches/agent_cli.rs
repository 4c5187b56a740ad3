//! A file command through the host agent, against the same command on a local file.
//!
//! - `agent_cli_mkdir`: `vapp -d LUN mkdir /NEW` as a whole process. `baseline` runs it on a
//!   datastore in a local file, where the command mounts the datastore itself (a heartbeat
//!   slot taken with one compare-and-write). `through_agent_nbd` runs it on a datastore that
//!   qemu-nbd serves (Disk Paxos locking), with a `vapp host run` agent joined to it, so the
//!   command goes through the agent's slot instead of waiting two lease periods for one of
//!   its own (about 4 s at the default timing). The goal is at most 1.5x the local time.
//!
//! It needs the `vapp` binary (`$VAPP_BIN`, as `make bench` sets) and qemu-nbd. Both LUNs
//! live on tmpfs (/dev/shm) when there is one, so neither pays a disk's flush latency.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};

/// Sparse, and large enough for every directory a run makes (one sub-block each).
const SIZE: &str = "16G";

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

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// A child process stopped when the bench ends: SIGTERM, so the agent leaves its slot.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vapp(bin: &Path, runtime: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(bin);
    command
        .args(args)
        .env("VAPP_RUNTIME_DIR", runtime)
        .env_remove("VAPP_DATASTORE")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command
}

fn ok(bin: &Path, runtime: &Path, args: &[&str]) {
    let status = vapp(bin, runtime, args).status().unwrap();
    assert!(status.success(), "vapp {args:?}: {status}");
}

fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what} did not appear");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn agent_cli(c: &mut Criterion) {
    let Some(bin) = vapp_binary() else {
        eprintln!(
            "agent_cli bench skipped: no vapp binary (cargo build --release --bin vapp, or set VAPP_BIN)"
        );
        return;
    };
    if !have("qemu-nbd") {
        eprintln!("agent_cli bench skipped: no qemu-nbd (Debian package qemu-utils)");
        return;
    }
    let dir = scratch();
    let alone = dir.path().join("run-alone");
    let runtime = dir.path().join("run-agent");

    let local = dir.path().join("local.vmfs");
    let local = local.to_str().unwrap();
    ok(
        &bin,
        &alone,
        &[
            "datastore",
            "format",
            local,
            "--name",
            "local",
            "--size",
            SIZE,
        ],
    );

    let raw = dir.path().join("lun.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(16 << 30)
        .unwrap();
    let socket = dir.path().join("nbd.sock");
    let _nbd = Stopped(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "--cache=unsafe", "--persistent", "--shared=32"])
            .arg("-k")
            .arg(&socket)
            .arg(&raw)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&socket, "qemu-nbd's socket");
    let nbd = format!("nbd+unix:///?socket={}", socket.display());
    ok(
        &bin,
        &alone,
        &["datastore", "format", &nbd, "--name", "shared"],
    );
    let config = dir.path().join("host.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"bench-agent\"\ndatastores = [\"{nbd}\"]\nruntime_dir = \"{}\"\n",
            runtime.display()
        ),
    )
    .unwrap();
    let _agent = Stopped(
        vapp(
            &bin,
            &runtime,
            &["host", "run", "--config", config.to_str().unwrap()],
        )
        .spawn()
        .unwrap(),
    );
    wait_for(&runtime.join("agent.sock"), "the agent's socket");

    let next = AtomicU64::new(0);
    let mkdir = |lun: &str, runtime: &Path| {
        let path = format!("/d{}", next.fetch_add(1, Ordering::Relaxed));
        let status = vapp(&bin, runtime, &["-d", lun, "mkdir", &path])
            .status()
            .unwrap();
        assert!(status.success(), "vapp -d {lun} mkdir {path}: {status}");
    };
    let mut group = c.benchmark_group("agent_cli_mkdir");
    group
        .sample_size(20)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    group.bench_function("baseline", |b| b.iter(|| mkdir(local, &alone)));
    group.bench_function("through_agent_nbd", |b| b.iter(|| mkdir(&nbd, &runtime)));
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    agent_cli(&mut c);
    c.final_summary();
}
