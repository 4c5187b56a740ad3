//! A primary process killed with SIGKILL mid-stream over TCP: every write it
//! acknowledged is on the replica, and its restart resyncs only the hot extents.
//!
//! The primary runs in a child process: this test binary re-executed with
//! `REPL_CHILD_DIR` set, which makes `child_primary_process` the primary instead of a
//! no-op.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use lun::{FileLun, Lun};
use rand::{Rng, SeedableRng};
use replication::{LinkPolicy, PrimaryLun, Secondary, SecondaryServer, TcpPeer};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const SECRET: &[u8] = b"kill -9 secret";
const CHILD_ENV: &str = "REPL_CHILD_DIR";

fn open(dir: &Path, name: &str) -> Arc<dyn Lun> {
    Arc::new(FileLun::open(&dir.join(name), false).expect("open LUN"))
}

/// The child: a primary writing sequence-numbered 4 KiB blocks at random offsets,
/// printing each write once it is acknowledged, until it is killed.
#[test]
fn child_primary_process() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let addr: SocketAddr = std::env::var("REPL_CHILD_ADDR")
        .expect("address")
        .parse()
        .expect("parse address");
    let a = PrimaryLun::open(
        open(dir, "a.img"),
        open(dir, "a.meta"),
        Box::new(TcpPeer::new(addr, SECRET.to_vec())),
        LinkPolicy::Block,
    )
    .expect("open primary");
    a.connect().expect("connect");
    a.resync().expect("sync");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut out = std::io::stdout().lock();
    for seq in 1..=1_000_000u64 {
        let offset = rng.random_range(0..SIZE / 4096) * 4096;
        let mut block = vec![0u8; 4096];
        block[..512].copy_from_slice(&seq_block(seq));
        a.write_at(&block, offset).expect("write");
        writeln!(out, "acked {seq} {offset}").expect("stdout");
        out.flush().expect("flush stdout");
    }
}

#[test]
fn a_primary_killed_with_sigkill_lost_no_acknowledged_write_and_resyncs_little() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let a_img = file_lun(dir.path(), "a.img", SIZE);
    let a_meta = meta_lun(dir.path(), "a.meta", SIZE);
    let b_img = file_lun(dir.path(), "b.img", SIZE);
    let b = Arc::new(
        Secondary::create(
            b_img.clone(),
            meta_lun(dir.path(), "b.meta", SIZE),
            None,
            small_geometry(),
        )
        .expect("secondary"),
    );
    let server = SecondaryServer::start(
        TcpListener::bind("127.0.0.1:0").expect("bind"),
        b.clone(),
        SECRET.to_vec(),
    )
    .expect("server");
    // Made here, opened by the child.
    drop(
        PrimaryLun::create(
            a_img.clone(),
            a_meta,
            Box::new(TcpPeer::new(server.local_addr(), SECRET.to_vec())),
            small_geometry(),
            LinkPolicy::Block,
        )
        .expect("create primary"),
    );
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_primary_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .env("REPL_CHILD_ADDR", server.local_addr().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the primary");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut count = 0;
    while count < 400 {
        let line = lines
            .next()
            .expect("the primary stopped early")
            .expect("read line");
        if let Some(rest) = line.strip_prefix("acked ") {
            let mut it = rest.split(' ').map(|v| v.parse::<u64>().expect("number"));
            let (seq, offset) = (it.next().expect("seq"), it.next().expect("offset"));
            acked.insert(offset, seq);
            count += 1;
        }
    }
    child.kill().expect("SIGKILL the primary");
    child.wait().expect("reap");
    // Acknowledgements already printed before the kill count too.
    for line in lines.map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("acked ") {
            let mut it = rest.split(' ').map(|v| v.parse::<u64>().expect("number"));
            let (seq, offset) = (it.next().expect("seq"), it.next().expect("offset"));
            acked.insert(offset, seq);
        }
    }
    for (&offset, &seq) in &acked {
        let mut got = vec![0u8; 512];
        b_img.read_at(&mut got, offset).expect("read replica");
        let on_replica = u64::from_le_bytes(got[..8].try_into().expect("8 bytes"));
        assert!(
            on_replica >= seq,
            "acknowledged write {seq} at {offset} missing at the secondary (it holds {on_replica})"
        );
    }
    // The restart resyncs the hot extents (4 × 256 KiB), not 16 MiB.
    let a = PrimaryLun::open(
        open(dir.path(), "a.img"),
        open(dir.path(), "a.meta"),
        Box::new(TcpPeer::new(server.local_addr(), SECRET.to_vec())),
        LinkPolicy::Block,
    )
    .expect("restart the primary");
    let waiting = a.status().bytes_waiting;
    assert!(
        waiting > 0 && waiting <= MIB,
        "{waiting} bytes to resync after SIGKILL"
    );
    a.connect().expect("reconnect");
    a.resync().expect("resync");
    assert!(a.status().bytes_resynced <= MIB);
    assert_eq!(read_all(&*a_img), read_all(&*b_img));
}
