//! The link timeout comes from VAPP_REPL_TIMEOUT_MS, read in one place: each case runs
//! in a child process of this test binary with the variable set, since a process
//! reads it once.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use replication::{DEFAULT_LINK_TIMEOUT, LINK_TIMEOUT_ENV, Secondary, SecondaryServer, wire};

const CHILD: &str = "VAPP_TEST_LINK_TIMEOUT_CHILD";
const SECRET: &[u8] = b"timeout secret";

fn run_child(test: &str, value: &str) {
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args(["--exact", test, "--nocapture"])
        .env(CHILD, "1")
        .env(LINK_TIMEOUT_ENV, value)
        .output()
        .expect("run the child");
    assert!(
        out.status.success(),
        "child with {LINK_TIMEOUT_ENV}={value} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_secondary_drops_a_silent_primary_after_the_timeout_from_the_environment() {
    if std::env::var_os(CHILD).is_none() {
        run_child(
            "a_secondary_drops_a_silent_primary_after_the_timeout_from_the_environment",
            "300",
        );
        return;
    }
    assert_eq!(replication::link_timeout(), Duration::from_millis(300));
    let dir = tempfile::tempdir().expect("tempdir");
    let replica = file_lun(dir.path(), "b.img", 1 << 20);
    let secondary = Arc::new(
        Secondary::create(
            replica,
            meta_lun(dir.path(), "b.meta", 1 << 20),
            None,
            small_geometry(),
        )
        .expect("secondary"),
    );
    let server = SecondaryServer::start(
        TcpListener::bind("127.0.0.1:0").expect("bind"),
        secondary,
        SECRET.to_vec(),
    )
    .expect("server");
    // An authenticated primary that then says nothing, not even a keepalive.
    let mut s = TcpStream::connect(server.local_addr()).expect("connect");
    wire::client_handshake(&mut s, SECRET).expect("handshake");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let t = Instant::now();
    let mut b = [0u8; 1];
    let n = s.read(&mut b).unwrap_or(0);
    let took = t.elapsed();
    assert_eq!(n, 0, "the secondary hangs up");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "dropped after {took:?}"
    );
}

#[test]
fn a_bad_value_leaves_the_default() {
    if std::env::var_os(CHILD).is_none() {
        run_child("a_bad_value_leaves_the_default", "soon");
        run_child("a_bad_value_leaves_the_default", "0");
        return;
    }
    assert_eq!(replication::link_timeout(), DEFAULT_LINK_TIMEOUT);
}
