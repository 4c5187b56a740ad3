//! The `vm_*` tests run VMs as a user does: the real `vapp` binary, a datastore in a sparse
//! file, real KVM. Each fixture has its own runtime directory (where `vm start` registers), so
//! tests run in parallel, and can act as a second host sharing the datastore file.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Longest a test guest may take to reach a marker: its kernel code is emulated on PVM hosts.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

pub fn kvm_available() -> bool {
    lun::prereq::require(
        lun::prereq::have_device("/dev/kvm"),
        "/dev/kvm (read-write) for booting guests",
    )
}

/// Who runs a command: a host name and UUID, and that host's runtime directory.
#[derive(Clone)]
pub struct Host {
    pub name: String,
    uuid: String,
    runtime: PathBuf,
}

/// A formatted datastore in a sparse file, and the test guest kernel next to it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub ds: String,
    pub guest: PathBuf,
    pub here: Host,
    /// More environment for every command, e.g. `VAPP_STATE_DIR`.
    pub env: Vec<(String, String)>,
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture::with_size("2G")
    }

    /// A datastore of `size` (e.g. "128M", about the smallest, with 27 MiB free).
    pub fn with_size(size: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("ds.vmfs").to_str().unwrap().to_string();
        let here = Host {
            name: "esx-a".to_string(),
            uuid: "aaaaaaaa-0000-4000-8000-000000000001".to_string(),
            runtime: dir.path().join("run-a"),
        };
        let fixture = Fixture {
            guest: dir.path().join("testguest.elf"),
            dir,
            ds,
            here,
            env: Vec::new(),
        };
        fixture.ok(&[
            "datastore",
            "format",
            &fixture.ds,
            "--name",
            "vmtest",
            "--size",
            size,
        ]);
        fixture.ok(&["vm", "test-guest", fixture.guest.to_str().unwrap()]);
        fixture
    }

    /// Another host sharing the datastore file: its own name, UUID and runtime directory.
    pub fn other_host(&self) -> Host {
        Host {
            name: "esx-b".to_string(),
            uuid: "bbbbbbbb-0000-4000-8000-000000000002".to_string(),
            runtime: self.dir.path().join("run-b"),
        }
    }

    pub fn command_as(&self, host: &Host, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vapp"));
        command
            .arg("-d")
            .arg(&self.ds)
            .args(args)
            .env_remove("VAPP_DATASTORE")
            .env_remove("VAPP_KVM_DEVICE")
            .env("VAPP_HOST_NAME", &host.name)
            .env("VAPP_HOST_UUID", &host.uuid)
            .env("VAPP_RUNTIME_DIR", &host.runtime)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        command
    }

    pub fn command(&self, args: &[&str]) -> Command {
        self.command_as(&self.here, args)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vapp {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Fails with exit status 1 and an error on stderr mentioning every needle.
    pub fn fails(&self, args: &[&str], needles: &[&str]) -> String {
        fails(self.run(args), args, needles)
    }

    /// `vm create` of the test guest with `cmdline`, `vcpus`, 64 MiB and `disks`.
    pub fn create_vm(&self, path: &str, vcpus: u32, cmdline: &str, disks: &[&str]) -> String {
        let disks: Vec<(&str, &str)> = disks.iter().map(|d| ("--disk", *d)).collect();
        self.create_vm_with(path, vcpus, cmdline, &disks)
    }

    /// `vm create` of the test guest, 1 vCPU, with a NIC on each of `networks`.
    pub fn create_vm_on(&self, path: &str, cmdline: &str, networks: &[&str]) -> String {
        let nics: Vec<(&str, &str)> = networks.iter().map(|n| ("--net", *n)).collect();
        self.create_vm_with(path, 1, cmdline, &nics)
    }

    fn create_vm_with(
        &self,
        path: &str,
        vcpus: u32,
        cmdline: &str,
        options: &[(&str, &str)],
    ) -> String {
        let vcpus = vcpus.to_string();
        let mut args = vec![
            "vm",
            "create",
            path,
            "--kernel",
            self.guest.to_str().unwrap(),
            "--vcpus",
            &vcpus,
            "--memory",
            "64M",
            "--cmdline",
            cmdline,
        ];
        for (option, value) in options {
            args.extend([*option, *value]);
        }
        self.ok(&args)
    }

    fn open_datastore(&self, read_only: bool) -> vmfs::Datastore {
        let lun = lun::open(
            &self.ds,
            &lun::OpenOptions {
                read_only,
                ..Default::default()
            },
        )
        .unwrap();
        let options = if read_only {
            vmfs::OpenOptions::read_only()
        } else {
            vmfs::OpenOptions::read_write()
        };
        vmfs::Datastore::open(lun, &options).unwrap()
    }

    /// Writes the test guest's host pattern for disk `index` at the start of `vdisk`.
    pub fn write_host_pattern(&self, vdisk: &str, index: u32) {
        let ds = self.open_datastore(false);
        {
            let disk = ds.open_lun(vdisk, vmfs::Access::Exclusive).unwrap();
            disk.write_at(
                &hv::test_guest::host_pattern(index),
                hv::test_guest::HOST_PATTERN_OFFSET,
            )
            .unwrap();
            disk.flush().unwrap();
        }
        ds.close().unwrap();
    }

    /// Bytes of a file on the datastore, read through vmfs.
    pub fn read(&self, path: &str, offset: u64, len: usize) -> Vec<u8> {
        let ds = self.open_datastore(true);
        let mut buf = vec![0u8; len];
        let ino = ds.resolve(path).unwrap();
        let n = ds.read(ino, offset, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    /// `vapp datastore fsck` finds nothing wrong.
    pub fn assert_fsck_clean(&self) {
        let out = Command::new(env!("CARGO_BIN_EXE_vapp"))
            .args(["datastore", "fsck", &self.ds])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fsck: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `vm start` in the background, its console (stdout) and messages (stderr) captured.
    pub fn start(&self, path: &str, extra: &[&str]) -> Running {
        self.start_as(&self.here, path, extra)
    }

    pub fn start_as(&self, host: &Host, path: &str, extra: &[&str]) -> Running {
        self.spawn_start(host, path, extra, Stdio::null())
    }

    /// `vm start` with a pipe for its standard input (see [`Running::type_keys`]).
    pub fn start_with_input(&self, path: &str, extra: &[&str]) -> Running {
        self.spawn_start(&self.here, path, extra, Stdio::piped())
    }

    fn spawn_start(&self, host: &Host, path: &str, extra: &[&str], stdin: Stdio) -> Running {
        let mut args = vec!["vm", "start", path];
        args.extend(extra);
        let mut child = self
            .command_as(host, &args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = Captured::from(child.stdout.take().unwrap());
        let stderr = Captured::from(child.stderr.take().unwrap());
        Running {
            child: Some(child),
            stdout,
            stderr,
        }
    }
}

pub fn fails(out: Output, args: &[&str], needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "vapp {args:?}: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "vapp {args:?}: stderr {stderr:?} lacks {needle:?}"
        );
    }
    stderr
}

/// Output of a child collected by a thread, which tests can wait on.
#[derive(Clone, Default)]
pub struct Captured {
    inner: Arc<(Mutex<Vec<u8>>, Condvar)>,
}

impl Captured {
    fn from(mut pipe: impl Read + Send + 'static) -> Captured {
        let captured = Captured::default();
        let sink = captured.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let (lock, changed) = &*sink.inner;
                lock.lock().unwrap().extend_from_slice(&buf[..n]);
                changed.notify_all();
            }
        });
        captured
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.inner.0.lock().unwrap()).into_owned()
    }

    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, changed) = &*self.inner;
        let mut bytes = lock.lock().unwrap();
        loop {
            if String::from_utf8_lossy(&bytes).contains(needle) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            bytes = changed.wait_timeout(bytes, deadline - now).unwrap().0;
        }
    }
}

/// A `vm start` process; killed if the test fails before it ends.
pub struct Running {
    child: Option<Child>,
    pub stdout: Captured,
    pub stderr: Captured,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits for `needle` on the console; panics with both outputs if it does not come.
    pub fn expect_console(&self, needle: &str) {
        assert!(
            self.stdout.wait_for(needle, GUEST_TIMEOUT),
            "no {needle:?} on the console:\n{}\nstderr:\n{}",
            self.stdout.text(),
            self.stderr.text()
        );
    }

    /// Waits for the process to end; panics (after killing it) if it does not in time.
    pub fn wait(mut self) -> (ExitStatus, String, String) {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + GUEST_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(50));
                return (status, self.stdout.text(), self.stderr.text());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "vm start did not end within {GUEST_TIMEOUT:?}; console:\n{}\nstderr:\n{}",
                    self.stdout.text(),
                    self.stderr.text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Writes `keys` to the process's standard input.
    pub fn type_keys(&mut self, keys: &[u8]) {
        let stdin = self.child.as_mut().unwrap().stdin.as_mut().unwrap();
        stdin.write_all(keys).unwrap();
        stdin.flush().unwrap();
    }

    /// Still running after `grace`?
    pub fn still_running(&mut self, grace: Duration) -> bool {
        std::thread::sleep(grace);
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Pids of the VM runners (`vm start --foreground`) whose command line mentions `needle`.
pub fn runners(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("vm start --foreground") && cmdline.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}
