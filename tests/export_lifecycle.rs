//! `vapp export` as a process: orderly shutdown on signals, listening policy, the server
//! killed in the middle of writes and restarted, socket files.
#![allow(clippy::unwrap_used)]

mod export_support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use export_support::Export;
use lun::{Lun, LunError};

const BLOCK: usize = 4096;

fn pattern(block: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK];
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(block * 1000 + i as u64 + 1).to_le_bytes());
    }
    data
}

fn sparse(dir: &std::path::Path, len: u64) -> std::path::PathBuf {
    let path = dir.join("disk.raw");
    std::fs::File::create(&path).unwrap().set_len(len).unwrap();
    path
}

/// Waits until the writer got `count` blocks acknowledged, so a signal lands mid-stream.
fn wait_for(progress: &AtomicU64, count: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while progress.load(Ordering::SeqCst) < count {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer made no progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sigterm_and_sigint_finish_writes_and_exit_zero() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let dir = tempfile::tempdir().unwrap();
        let file = sparse(dir.path(), 8 << 20);
        let mut export = Export::start(&file, &["--listen", "127.0.0.1:0"]);
        let client = Arc::new(lun::open(&export.url, &Default::default()).unwrap());
        let acknowledged = Arc::new(AtomicU64::new(0));
        let writer = {
            let (client, acknowledged) = (Arc::clone(&client), Arc::clone(&acknowledged));
            std::thread::spawn(move || {
                for block in 0..2048u64 {
                    if client
                        .write_at(&pattern(block), block * BLOCK as u64)
                        .is_err()
                    {
                        return;
                    }
                    acknowledged.store(block + 1, Ordering::SeqCst);
                }
            })
        };
        wait_for(&acknowledged, 16);
        export.signal(signal);
        let status = export.wait(Duration::from_secs(20));
        assert_eq!(status.code(), Some(0), "signal {signal}: {status}");
        writer.join().unwrap();

        let done = acknowledged.load(Ordering::SeqCst);
        assert!(done > 0, "no write finished before the signal");
        let contents = std::fs::read(&file).unwrap();
        for block in 0..done {
            let at = block as usize * BLOCK;
            assert!(
                contents[at..at + BLOCK] == pattern(block)[..],
                "acknowledged block {block} missing after an orderly shutdown"
            );
        }
    }
}

#[test]
fn killed_mid_write_then_restarted_keeps_every_flushed_write() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse(dir.path(), 16 << 20);
    let socket = dir.path().join("export.sock");
    let socket_arg = socket.to_str().unwrap().to_string();
    let mut export = Export::start(&file, &["--socket", &socket_arg]);
    let client = Arc::new(lun::open(&export.url, &Default::default()).unwrap());

    let flushed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (client, flushed) = (Arc::clone(&client), Arc::clone(&flushed));
        std::thread::spawn(move || -> LunError {
            for block in 0..4096u64 {
                if let Err(error) = client.write_at(&pattern(block), block * BLOCK as u64) {
                    return error;
                }
                if block % 8 == 7 {
                    if let Err(error) = client.flush() {
                        return error;
                    }
                    flushed.store(block + 1, Ordering::SeqCst);
                }
            }
            panic!("every write succeeded: the server was never killed");
        })
    };
    wait_for(&flushed, 64);
    export.signal(libc::SIGKILL);
    let error = writer.join().unwrap();
    assert!(
        matches!(error, LunError::Disconnected { .. }),
        "the client must report the lost server, got: {error}"
    );
    export.wait(Duration::from_secs(10));
    // While it is down, reads fail rather than return anything.
    let mut buf = vec![0u8; BLOCK];
    assert!(client.read_at(&mut buf, 0).is_err());

    // Restarted on the same file and socket; the same LUN reconnects by itself.
    let _export = Export::start(&file, &["--socket", &socket_arg]);
    let flushed = flushed.load(Ordering::SeqCst);
    assert!(flushed > 0, "no flush completed before the kill");
    for block in 0..4096u64 {
        client.read_at(&mut buf, block * BLOCK as u64).unwrap();
        if block < flushed {
            assert!(buf == pattern(block), "flushed block {block} lost");
        } else {
            // Unacknowledged writes may or may not have landed, but never as anything else.
            assert!(
                buf == pattern(block) || buf.iter().all(|&b| b == 0),
                "block {block} holds neither its old nor its new contents"
            );
        }
    }
}

#[test]
fn listens_on_loopback_unless_remote_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse(dir.path(), 1 << 20);
    let output = Command::new(env!("CARGO_BIN_EXE_vapp"))
        .args(["export", file.to_str().unwrap(), "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--allow-remote"), "{stderr}");

    let export = Export::start(&file, &["--listen", "0.0.0.0:0", "--allow-remote"]);
    assert!(export.url.starts_with("nbd://0.0.0.0:"), "{}", export.url);
}

#[test]
fn missing_lun_is_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_vapp"))
        .args(["export", "/nonexistent/disk.raw", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/disk.raw"), "{stderr}");
}

#[test]
fn stale_socket_files_are_replaced_and_live_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse(dir.path(), 1 << 20);
    let socket = dir.path().join("export.sock");
    // What a crashed server leaves behind: a socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let socket_arg = socket.to_str().unwrap();
    let mut first = Export::start(&file, &["--socket", socket_arg]);

    let output = Command::new(env!("CARGO_BIN_EXE_vapp"))
        .args(["export", file.to_str().unwrap(), "--socket", socket_arg])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another server is listening"), "{stderr}");

    // The first server is unharmed, and removes its socket when it stops.
    let client = lun::open(&first.url, &Default::default()).unwrap();
    client.write_at(&[7u8; 512], 0).unwrap();
    drop(client);
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait(Duration::from_secs(10)).code(), Some(0));
    assert!(!socket.exists());
}
