//! The hypervisor against QEMU and the host, on the test guest (hv/guest).
//!
//! - `hv_boot`: VM creation to guest power-off, 2 vCPUs, 64 MiB, the guest bringing every CPU
//!   up through ACPI and INIT/SIPI (`mode=boot`). `baseline` is `qemu-system-x86_64 -M microvm`
//!   booting the same ELF through PVH (KVM when QEMU can use /dev/kvm, else TCG: said so on
//!   stderr), process start to exit. `hv` creates the VM in this process, as the host agent
//!   does; `hv_process` starts a fresh process per VM, as QEMU does.
//! - `hv_disk_read`: the guest reads 256 MiB of its virtio-blk disk sequentially, 1 MiB
//!   requests, 4 in flight into 4 buffers, timed between the guest's console markers (after
//!   one untimed batch that faults the buffers in); `baseline` reads the same page-cached file
//!   on the host with 1 MiB preads into 4 buffers in turn.
//! - `vm_start`: the same boot as a user runs it from a datastore: `vapp vm start` (process
//!   start to exit: datastore mount, the VM's locks, kernel read from the datastore, boot,
//!   power-off, unmount) against the same QEMU baseline. It needs the `vapp` binary: `$VAPP_BIN`
//!   or `vapp` next to this bench's target directory (`cargo build --release --bin vapp`).
//! - VMM memory overhead (printed, not a criterion group): RSS of a process running an idle
//!   2-vCPU guest minus the guest's RAM, for hv and for QEMU.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use hv::{Console, ConsoleBuffer, Disk, Vm, VmConfig, VmExit};
use lun::{FileLun, Lun};

const MIB: u64 = 1 << 20;
const GUEST_MEMORY: u64 = 64 * MIB;
const VCPUS: u32 = 2;
const READ_MIB: u64 = 256;
const REQUEST_KIB: u64 = 1024;
const DEPTH: u32 = 4;
/// Set in a child process of this binary to run one VM: "boot" or "memory".
const CHILD_ENV: &str = "HV_BENCH_CHILD";

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
}

fn guest_config(cmdline: &str, console: Console) -> VmConfig {
    let mut config = VmConfig::new("bench", hv::test_guest::image().unwrap().to_vec());
    config.vcpus = VCPUS;
    config.memory_bytes = GUEST_MEMORY;
    config.cmdline = cmdline.to_string();
    config.console = console;
    config
}

fn guest_image(dir: &Path) -> PathBuf {
    let path = dir.join("testguest.elf");
    std::fs::write(&path, hv::test_guest::image().unwrap()).unwrap();
    path
}

fn qemu(accel: &str, guest: &Path, cmdline: &str) -> Command {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-M", "microvm", "-accel", accel, "-m"])
        .arg(format!("{}M", GUEST_MEMORY / MIB))
        .args(["-smp", &VCPUS.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-kernel")
        .arg(guest)
        .args(["-append", cmdline]);
    qemu
}

/// Boots the guest once under QEMU; true if it powered off with status 0 (exit code 1 from
/// isa-debug-exit).
fn qemu_boot(accel: &str, guest: &Path) -> bool {
    qemu(accel, guest, "mode=boot")
        .args(["-serial", "null"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.code() == Some(1))
}

/// The fastest way QEMU runs here: KVM if it can use /dev/kvm, else TCG.
fn qemu_accel(guest: &Path) -> Option<&'static str> {
    if qemu_boot("kvm", guest) {
        return Some("kvm");
    }
    eprintln!("hv bench: QEMU cannot boot the test guest with KVM here; baseline uses TCG");
    qemu_boot("tcg", guest).then_some("tcg")
}

fn boot(c: &mut Criterion, guest: &Path, accel: &str) {
    let mut group = c.benchmark_group("hv_boot");
    configure(&mut group);
    group.bench_function("baseline", |b| {
        b.iter(|| assert!(qemu_boot(accel, guest)));
    });
    group.bench_function("hv", |b| {
        b.iter(|| {
            let exit = Vm::create(guest_config("mode=boot", Console::Null))
                .unwrap()
                .run()
                .unwrap();
            assert_eq!(exit, VmExit::PowerOff { status: 0 });
        });
    });
    let me = std::env::current_exe().unwrap();
    group.bench_function("hv_process", |b| {
        b.iter(|| {
            let status = Command::new(&me).env(CHILD_ENV, "boot").status().unwrap();
            assert!(status.success());
        });
    });
    group.finish();
}

/// The `vapp` binary: `$VAPP_BIN`, or target/<profile>/vapp next to this bench (cargo does not
/// build binaries for a bench run: `make bench` builds the release binary first).
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

fn vapp(bin: &Path, dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(bin);
    command
        .args(args)
        .env("VAPP_RUNTIME_DIR", dir.join("run"))
        .env_remove("VAPP_DATASTORE")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command
}

fn vm_start(c: &mut Criterion, dir: &Path, accel: &str) {
    let Some(bin) = vapp_binary() else {
        eprintln!(
            "hv bench: vm_start skipped: no vapp binary (cargo build --release --bin vapp, or set VAPP_BIN)"
        );
        return;
    };
    let guest = guest_image(dir);
    let ds = dir.join("vm-bench.vmfs");
    let ds = ds.to_str().unwrap();
    let memory = format!("{}M", GUEST_MEMORY / MIB);
    let vcpus = VCPUS.to_string();
    for args in [
        vec!["datastore", "format", ds, "--name", "bench", "--size", "1G"],
        vec![
            "-d",
            ds,
            "vm",
            "create",
            "/vms/bench",
            "--kernel",
            guest.to_str().unwrap(),
            "--vcpus",
            &vcpus,
            "--memory",
            &memory,
            "--cmdline",
            "mode=boot",
        ],
    ] {
        let status = vapp(&bin, dir, &args).status().unwrap();
        assert!(status.success(), "vapp {args:?}");
    }
    let mut group = c.benchmark_group("vm_start");
    configure(&mut group);
    group.bench_function("baseline", |b| {
        b.iter(|| assert!(qemu_boot(accel, &guest)));
    });
    group.bench_function("vapp_vm_start", |b| {
        b.iter(|| {
            let status = vapp(&bin, dir, &["-d", ds, "vm", "start", "/vms/bench"])
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "vapp vm start: {status}");
        });
    });
    group.finish();
}

/// Records when the guest prints its read markers.
#[derive(Clone, Default)]
struct Markers {
    line: Arc<Mutex<Vec<u8>>>,
    start: Arc<Mutex<Option<Instant>>>,
    done: Arc<Mutex<Option<Instant>>>,
}

impl Write for Markers {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut line = self.line.lock().unwrap();
        for &byte in buf {
            if byte != b'\n' {
                line.push(byte);
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            if text.ends_with("read start") {
                *self.start.lock().unwrap() = Some(Instant::now());
            } else if text.contains("read done") {
                *self.done.lock().unwrap() = Some(Instant::now());
            }
            line.clear();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn disk_read(c: &mut Criterion, dir: &Path) {
    let path = dir.join("read.img");
    {
        let file = File::create(&path).unwrap();
        let chunk: Vec<u8> = (0..MIB).map(|i| (i * 7 + 3) as u8).collect();
        for i in 0..READ_MIB {
            file.write_all_at(&chunk, i * MIB).unwrap();
        }
    }
    let lun: Arc<dyn Lun> = Arc::new(FileLun::open(&path, false).unwrap());
    let cmdline = format!("mode=read read_mib={READ_MIB} req_kib={REQUEST_KIB} depth={DEPTH}");

    let mut group = c.benchmark_group("hv_disk_read");
    configure(&mut group);
    group.throughput(Throughput::Bytes(READ_MIB * MIB));
    group.bench_function("baseline", |b| {
        // The guest's access pattern: 1 MiB reads into DEPTH buffers in turn, already touched.
        let file = File::open(&path).unwrap();
        let request = (REQUEST_KIB * 1024) as usize;
        let mut buffers = vec![0u8; request * DEPTH as usize];
        b.iter(|| {
            for (i, offset) in (0..READ_MIB * MIB).step_by(request).enumerate() {
                let slot = i % DEPTH as usize;
                file.read_exact_at(&mut buffers[slot * request..(slot + 1) * request], offset)
                    .unwrap();
            }
        });
    });
    group.bench_function("hv", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let markers = Markers::default();
                let mut config = guest_config(&cmdline, Console::Writer(Box::new(markers.clone())));
                config.disks.push(Disk::new(lun.clone()));
                let exit = Vm::create(config).unwrap().run().unwrap();
                assert_eq!(exit, VmExit::PowerOff { status: 0 });
                let start = markers.start.lock().unwrap().unwrap();
                let done = markers.done.lock().unwrap().unwrap();
                total += done - start;
            }
            total
        });
    });
    group.finish();
}

/// Sums the Rss of /proc/PID/smaps mappings, split into (inside `guest`, elsewhere); `guest`
/// decides by a mapping's (start, length).
fn rss_split(pid: u32, guest: impl Fn(usize, usize) -> bool) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut inside, mut outside, mut current) = (0, 0, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) {
                current = guest(start, end - start);
                continue;
            }
        }
        if let Some(kib) = line.strip_prefix("Rss:") {
            let bytes = kib
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap()
                * 1024;
            if current {
                inside += bytes;
            } else {
                outside += bytes;
            }
        }
    }
    (inside, outside)
}

/// In a child: runs an idle guest and prints "rss guest_rss" of this process.
fn child_memory() {
    let console = ConsoleBuffer::new();
    let handle = Vm::create(guest_config("mode=wait", Console::Buffer(console.clone())))
        .unwrap()
        .start()
        .unwrap();
    assert!(console.wait_for("waiting to be stopped", Duration::from_secs(60)));
    let ranges = handle.guest_memory_host_ranges();
    let (guest, vmm) = rss_split(std::process::id(), |start, len| {
        ranges
            .iter()
            .any(|&(s, l)| start >= s && start + len <= s + l)
    });
    println!("{} {}", guest + vmm, guest);
    handle.stop();
    handle.wait();
}

fn memory_overhead(guest_elf: &Path, accel: &str) {
    let me = std::env::current_exe().unwrap();
    let out = Command::new(&me).env(CHILD_ENV, "memory").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let numbers: Vec<u64> = text
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    if let [total, guest] = numbers[..] {
        println!(
            "hv_memory_overhead: hv       RSS {:6.2} MiB, guest RAM resident {:6.2} MiB, VMM overhead {:6.2} MiB",
            total as f64 / MIB as f64,
            guest as f64 / MIB as f64,
            (total - guest) as f64 / MIB as f64
        );
    }

    let mut child = qemu(accel, guest_elf, "mode=wait")
        .args(["-serial", "stdio"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let waiting = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains("waiting to be stopped"));
    if waiting {
        // QEMU's guest RAM is the one anonymous mapping of exactly the guest's size.
        let (guest, vmm) = rss_split(child.id(), |_, len| len as u64 == GUEST_MEMORY);
        println!(
            "hv_memory_overhead: qemu     RSS {:6.2} MiB, guest RAM resident {:6.2} MiB, VMM overhead {:6.2} MiB ({accel})",
            (guest + vmm) as f64 / MIB as f64,
            guest as f64 / MIB as f64,
            vmm as f64 / MIB as f64
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn main() {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        match mode.as_str() {
            "boot" => {
                let exit = Vm::create(guest_config("mode=boot", Console::Null))
                    .unwrap()
                    .run()
                    .unwrap();
                std::process::exit(if exit == (VmExit::PowerOff { status: 0 }) {
                    0
                } else {
                    1
                });
            }
            "memory" => child_memory(),
            other => panic!("unknown {CHILD_ENV} {other}"),
        }
        return;
    }
    if !Path::new("/dev/kvm").exists() || hv::test_guest::image().is_err() {
        eprintln!("hv bench: skipped, needs /dev/kvm and the test guest (gcc)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = guest_image(dir.path());
    let Some(accel) = qemu_accel(&guest) else {
        eprintln!("hv bench: skipped, qemu-system-x86_64 cannot boot the test guest");
        return;
    };
    memory_overhead(&guest, accel);
    let mut c = Criterion::default().configure_from_args();
    boot(&mut c, &guest, accel);
    vm_start(&mut c, dir.path(), accel);
    disk_read(&mut c, dir.path());
    c.final_summary();
}
