//! Two hosts in separate network namespaces share one LUN served by qemu-nbd over veth
//! links (Disk Paxos locking: NBD has no compare-and-write) and contend for the same lock.
//! Cutting one host's link (an nftables drop rule inside its namespace) makes it fence
//! itself; the other host declares it dead, replays its journal and takes the lock over.
//! The namespaces, links and rules are created by the test and always removed.
#![allow(clippy::unwrap_used)]

mod cluster_support;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster_support::*;
use vmfs::{Access, Datastore, Error, NewFile, OpenOptions};

const TEST: &str = "cut_off_host_fences_itself_and_the_other_takes_over";
const IO_TIMEOUT_MS: u64 = 250;

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces, each joined to the root namespace by a veth pair; removed on drop.
struct Links {
    namespaces: Vec<String>,
    veths: Vec<String>,
}

impl Links {
    fn new(tag: u32) -> (Links, Vec<(String, String)>) {
        let mut links = Links {
            namespaces: Vec::new(),
            veths: Vec::new(),
        };
        let octet = 20 + tag % 200;
        let mut ends = Vec::new();
        for (i, side) in ["a", "b"].iter().enumerate() {
            let ns = format!("vappc{tag}{side}");
            let outer = format!("vc{tag}{side}0");
            let inner = format!("vc{tag}{side}1");
            sh(&["ip", "netns", "add", &ns]);
            links.namespaces.push(ns.clone());
            sh(&[
                "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            links.veths.push(outer.clone());
            sh(&["ip", "link", "set", &inner, "netns", &ns]);
            let server = format!("10.{octet}.{}.1", i + 1);
            let client = format!("10.{octet}.{}.2", i + 1);
            sh(&["ip", "addr", "add", &format!("{server}/30"), "dev", &outer]);
            sh(&["ip", "link", "set", &outer, "up"]);
            sh(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{client}/30"),
                "dev",
                &inner,
            ]);
            sh(&[
                "ip", "netns", "exec", &ns, "ip", "link", "set", &inner, "up",
            ]);
            sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
            ends.push((ns, server));
        }
        (links, ends)
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        // A namespace outlives `ip netns delete` while a socket (the cut-off host's
        // unacknowledged TCP connection) still lives in it: delete the links explicitly.
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
    fn start(file: &str, port: u16) -> QemuNbd {
        let child = Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "--persistent",
                "--shared=16",
                "-x",
                "ds",
                "-b",
                "0.0.0.0",
            ])
            .args(["-p", &port.to_string(), file])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not start listening"
            );
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A host over NBD: takes /lockfile exclusively again and again (holding it `HOLD_MS`),
/// creating a file in /shared each time, until told to stop or fenced.
fn contend() {
    init_host_logging();
    let io_timeout = Duration::from_millis(IO_TIMEOUT_MS);
    let lun = lun::NbdLun::connect(
        lun::NbdTarget::Tcp {
            host: var("SERVER"),
            port: var("PORT").parse().unwrap(),
        },
        "ds",
        lun::NbdOptions {
            connections: 1,
            io_timeout,
            connect_timeout: io_timeout * 2,
            ..Default::default()
        },
    )
    .unwrap();
    let ds = Datastore::open(std::sync::Arc::new(lun), &OpenOptions::default()).unwrap();
    let me = var("VAPP_HOST_NAME");
    let hold = Duration::from_millis(var("HOLD_MS").parse().unwrap());
    report(format!("JOINED {}", ds.host_slot().unwrap()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        wait_for_stdin_eof();
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let step = (|| -> vmfs::Result<bool> {
            let h = match ds.open_path("/lockfile", Access::Exclusive) {
                Ok(h) => h,
                Err(Error::Busy { .. }) => return Ok(false),
                Err(e) => return Err(e),
            };
            h.write_at(format!("{me}:{n}\n").as_bytes(), 0)?;
            h.sync()?;
            ds.create_path(&format!("/shared/{me}-{n}"), &NewFile::default())?;
            report(format!("GOT {n}"));
            let until = Instant::now() + hold;
            while Instant::now() < until && ds.fenced().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            // A fenced host notices at its next write.
            h.write_at(b"still here?", 64)?;
            Ok(true)
        })();
        match step {
            // Give the other host a turn before asking again.
            Ok(true) => {
                n += 1;
                std::thread::sleep(Duration::from_millis(150));
            }
            Ok(false) => std::thread::sleep(Duration::from_millis(20)),
            Err(e @ Error::HostFenced { .. }) => {
                report(format!("FENCED {e}"));
                // Stay up without writing: the others must not need our cooperation.
                wait_for_stdin_eof();
                return;
            }
            Err(e) => {
                report(format!("ERROR {e}"));
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    ds.close().unwrap();
    report("CLOSED");
}

#[test]
fn cut_off_host_fences_itself_and_the_other_takes_over() {
    if role().is_some() {
        contend();
        return;
    }
    use lun::prereq::{have_command, is_root, require};
    if !require(
        is_root() && have_command("ip") && have_command("nft") && have_command("qemu-nbd"),
        "root, ip, nft and qemu-nbd (network namespaces and an NBD server)",
    ) {
        return;
    }
    let dir = scratch_dir();
    let file = format_datastore(dir.path(), "paxos", &format!("{IO_TIMEOUT_MS}ms"));
    let file = file.to_str().unwrap().to_string();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    for args in [
        vec!["-d", &file, "mkdir", "/shared"],
        vec!["-d", &file, "put", empty.to_str().unwrap(), "/lockfile"],
    ] {
        let (ok, _, err) = run_vapp(&args, &[]);
        assert!(ok, "{err}");
    }
    let port = free_port();
    let server = QemuNbd::start(&file, port);
    let (links, ends) = Links::new(std::process::id() % 100_000);
    let host = |name: &str, (ns, addr): &(String, String), hold_ms: u64| {
        spawn(
            TEST,
            "contend",
            name,
            &[
                ("SERVER", addr.clone()),
                ("PORT", port.to_string()),
                ("HOLD_MS", hold_ms.to_string()),
            ],
            &["ip", "netns", "exec", ns],
        )
    };
    // b takes the lock for short turns; a, once it has it, keeps it for a long time.
    let mut b = host("net-b", &ends[1], 50);
    b.expect("JOINED", Duration::from_secs(30));
    b.expect("GOT", Duration::from_secs(30));
    let mut a = host("net-a", &ends[0], 60_000);
    a.expect("JOINED", Duration::from_secs(30));
    a.expect("GOT", Duration::from_secs(30));
    // a holds the lock now; b keeps asking for it.
    std::thread::sleep(Duration::from_millis(500));
    b.drain();

    let cut = Instant::now();
    sh(&[
        "ip",
        "netns",
        "exec",
        &ends[0].0,
        "nft",
        "add table inet vappcut; \
         add chain inet vappcut out { type filter hook output priority 0; policy drop; }; \
         add chain inet vappcut in { type filter hook input priority 0; policy drop; }",
    ]);
    let fenced = a.expect("FENCED", Duration::from_secs(20));
    let fenced_after = cut.elapsed();
    assert!(fenced.contains("host fenced"), "{fenced}");
    let taken = b.expect("GOT", Duration::from_secs(20));
    let taken_after = cut.elapsed();
    let io = Duration::from_millis(IO_TIMEOUT_MS);
    eprintln!(
        "cut at 0: net-a fenced after {fenced_after:?}, net-b took the lock after {taken_after:?} ({taken})"
    );
    assert!(
        taken_after >= io * 8 - io,
        "net-b took the lock {taken_after:?} after the cut: before net-a could be declared dead"
    );
    assert!(
        taken_after <= io * 8 + Duration::from_secs(3),
        "net-b took {taken_after:?} to take over"
    );
    assert!(
        a.stderr_text().contains("host fenced"),
        "{}",
        a.stderr_text()
    );
    let log = b.stderr_text();
    assert!(
        log.contains("recovering a dead host") && log.contains("dead_host=net-a"),
        "{log}"
    );

    b.finish(Duration::from_secs(30));
    b.expect("CLOSED", Duration::from_secs(5));
    drop(a);
    drop(links);
    drop(server);
    assert_fsck_clean(&file);
    let (ok, out, err) = run_vapp(&["-d", &file, "cat", "/lockfile"], &[]);
    assert!(ok && out.starts_with("net-b:"), "{out}{err}");
}
