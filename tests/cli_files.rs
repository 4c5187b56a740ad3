//! What a user meets in the first hour with the file commands, run as a user runs them:
//! the real `vapp` binary on a datastore in a sparse file. A closed standard output, `-` and
//! non-regular local files, a full datastore, and a `vapp put` killed halfway.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

struct Fixture {
    dir: tempfile::TempDir,
    ds: String,
}

impl Fixture {
    /// A datastore of `size`; "128M" is about the smallest, with 24 MiB free for files.
    fn new(size: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("ds.vmfs").to_str().unwrap().to_string();
        let fx = Fixture { dir, ds };
        let out = Command::new(env!("CARGO_BIN_EXE_vapp"))
            .args([
                "datastore",
                "format",
                &fx.ds,
                "--name",
                "files",
                "--size",
                size,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        fx
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vapp"));
        command
            .arg("-d")
            .arg(&self.ds)
            .args(args)
            .env_remove("VAPP_DATASTORE")
            .env_remove("VAPP_LOG")
            .stdin(Stdio::null());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vapp {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn names(&self, dir: &str) -> Vec<String> {
        String::from_utf8(self.ok(&["ls", dir]))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Free space as `datastore info` reports it, as the error messages print it.
    fn free_mib(&self) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_vapp"))
            .args(["datastore", "info", &self.ds, "--json"])
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        format!(
            "{:.1} MiB",
            info["free_bytes"].as_u64().unwrap() as f64 / MIB as f64
        )
    }

    fn local(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn assert_fsck_clean(&self) {
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
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// `ls | head -1`, `stat | head -1`, ...: a reader that went away ends the command as it ends
/// coreutils, killed by SIGPIPE (141 to a shell), with nothing on stderr.
#[test]
fn a_closed_standard_output_ends_a_command_quietly_by_sigpipe() {
    let fx = Fixture::new("128M");
    fx.ok(&["mkdir", "/dir"]);
    std::fs::write(fx.local("f.bin"), pattern(3 * MIB, 1)).unwrap();
    fx.ok(&["put", fx.local("f.bin").to_str().unwrap(), "/dir/f.bin"]);
    // A VM, so that `vm list --json` writes lines.
    let kernel = fx.local("guest.elf");
    fx.ok(&["vm", "test-guest", kernel.to_str().unwrap()]);
    let kernel = kernel.to_str().unwrap();
    fx.ok(&[
        "vm", "create", "/vms/a", "--kernel", kernel, "--vcpus", "1", "--memory", "64M",
    ]);

    let ds = fx.ds.clone();
    let commands: [&[&str]; 8] = [
        &["vm", "list"],
        &["vm", "list", "--json"],
        &["ls", "/dir"],
        &["ls", "-l", "/"],
        &["stat", "/dir/f.bin"],
        &["cat", "/dir/f.bin"],
        &["get", "/dir/f.bin", "-"],
        &["datastore", "info", &ds],
    ];
    for args in commands {
        // Every write fails with EPIPE: the reading end is closed before the command starts.
        let (reader, writer): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
        drop(reader);
        let out = fx.command(args).stdout(writer).output().unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "vapp {args:?}: {:?}, stderr {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "vapp {args:?} printed {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `-` is standard input for put and standard output for get; a device or a pipe is a
/// destination like any file, and a pipe a source of unknown length.
#[test]
fn dash_means_standard_io_and_pipes_and_devices_just_work() {
    let fx = Fixture::new("128M");
    let data = pattern(9 * MIB + 4321, 2);

    // put - : standard input to its end, longer than one copy chunk.
    let mut put = fx
        .command(&["put", "-", "/in.bin"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    put.stdin.take().unwrap().write_all(&data).unwrap();
    let out = put.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!fx.local("-").exists(), "put - read a file named '-'");

    // get - : the same bytes on standard output, no file named '-'.
    let out = fx.run(&["get", "/in.bin", "-"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == data, "get - wrote other bytes");
    assert!(!Path::new("-").exists(), "get - wrote a file named '-'");

    // A character device.
    let out = fx.run(&["get", "/in.bin", "/dev/null"]);
    assert!(
        out.status.success(),
        "get to /dev/null: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A named pipe, both ways.
    let fifo = fx.local("fifo");
    mkfifo(&fifo);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    let out = fx.run(&["get", "/in.bin", fifo.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "get to a fifo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(reader.join().unwrap() == data, "the fifo got other bytes");

    let writer = {
        let (fifo, data) = (fifo.clone(), data.clone());
        std::thread::spawn(move || std::fs::write(fifo, data).unwrap())
    };
    fx.ok(&["put", fifo.to_str().unwrap(), "/from-fifo.bin"]);
    writer.join().unwrap();
    assert!(fx.ok(&["cat", "/from-fifo.bin"]) == data);

    // A regular file still gets its holes and its exact size.
    let back = fx.local("back.bin");
    fx.ok(&["get", "/in.bin", back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == data);
    fx.assert_fsck_clean();
}

/// ENOSPC names the path the user gave and the space needed and left; the datastore keeps
/// nothing of the failed copy.
#[test]
fn a_full_datastore_names_the_path_and_the_space_needed_and_free() {
    let fx = Fixture::new("128M");
    let big = fx.local("r5.bin");
    std::fs::write(&big, pattern(40 * MIB, 3)).unwrap();
    let before = fx.names("/");
    let free = fx.free_mib();

    let out = fx.run(&["put", big.to_str().unwrap(), "/r5.bin"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "no space left for /r5.bin: it needs 40.0 MiB, {free} free"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("inode"), "{stderr}");
    assert_eq!(fx.names("/"), before, "the failed copy left something");

    // From a pipe the size is not known up front: at least what was read is named.
    let mut put = fx
        .command(&["put", "-", "/r6.bin"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The copy stops reading when it fails: a broken pipe here is expected.
    let _ = put.stdin.take().unwrap().write_all(&pattern(40 * MIB, 4));
    let out = put.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no space left for /r6.bin: it needs more than ")
            && stderr.contains(&format!("MiB, {free} free")),
        "{stderr}"
    );
    assert_eq!(fx.names("/"), before, "the failed copy left something");

    // A thick virtual disk is all allocated up front: the same figures.
    let out = fx.run(&["vdisk", "create", "/big.vdisk", "--size", "100M", "--thick"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "no space left for /big.vdisk: it needs 100.0 MiB, {free} free"
        )),
        "{stderr}"
    );
    assert_eq!(fx.names("/"), before, "the failed create left something");

    // The space is really back: 20 MiB fit.
    std::fs::write(&big, pattern(20 * MIB, 5)).unwrap();
    fx.ok(&["put", big.to_str().unwrap(), "/r5.bin"]);
    fx.assert_fsck_clean();
}

/// Polls until `ls -l /` shows the copy to `name` in progress: a file of at least `size`
/// bytes under a name that contains `.vapp-put.`, or under `name` itself. Returns that name.
fn wait_for_copy(fx: &Fixture, name: &str, size: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listing = String::from_utf8(fx.ok(&["ls", "-l", "/"])).unwrap();
        let staged = listing.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let shown = fields.last()?;
            let bytes: u64 = fields.get(4)?.parse().ok()?;
            ((shown.contains(".vapp-put.") || *shown == name) && bytes >= size)
                .then(|| shown.to_string())
        });
        if let Some(name) = staged {
            return name;
        }
        assert!(
            Instant::now() < deadline,
            "no copy in progress showed up: {listing}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `vapp put` killed with -9 halfway: the final name keeps what it had (nothing, or the
/// old file), never part of the new one; the next command recovers the dead host, which
/// removes the temporary copy, and fsck is clean.
#[test]
fn a_put_killed_halfway_leaves_no_partial_file_and_recovery_removes_its_copy() {
    let fx = Fixture::new("256M");
    let old = pattern(MIB + 17, 6);
    std::fs::write(fx.local("old.bin"), &old).unwrap();
    fx.ok(&["put", fx.local("old.bin").to_str().unwrap(), "/old.bin"]);

    for target in ["/new.bin", "/old.bin"] {
        // A named pipe fed by hand makes "halfway" exact: 20 MiB in, then silence.
        let fifo = fx.local(&format!("fifo{}", &target[1..4]));
        mkfifo(&fifo);
        let mut put = fx
            .command(&["put", fifo.to_str().unwrap(), target])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut feed = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        feed.write_all(&pattern(20 * MIB, 7)).unwrap();
        let copy = wait_for_copy(&fx, &target[1..], 8 * MIB as u64);
        put.kill().unwrap();
        put.wait().unwrap();
        drop(feed);
        let mut stderr = String::new();
        put.stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();

        match target {
            "/new.bin" => assert!(
                !fx.names("/").iter().any(|n| n == "new.bin"),
                "a partial /new.bin is there: {:?} {stderr}",
                fx.names("/")
            ),
            _ => assert!(fx.ok(&["cat", "/old.bin"]) == old, "/old.bin changed"),
        }
        assert!(
            copy.starts_with(&format!(".{}.vapp-put.", &target[1..])),
            "copied under {copy}"
        );

        // The next read-write command recovers the dead host (same machine, dead pid).
        fx.ok(&["mkdir", &format!("/after{}", &target[1..4])]);
        let names = fx.names("/");
        assert!(
            !names.iter().any(|n| n.contains(".vapp-put.")),
            "the temporary copy survived recovery: {names:?}"
        );
        fx.assert_fsck_clean();
    }
}
