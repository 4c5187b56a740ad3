//! Engine selection at run time: when the kernel refuses io_uring (here: a seccomp filter, as
//! in a locked-down container), file LUNs fall back to pread/pwrite, say so once in the log
//! naming the reason, and keep working; asking for io_uring explicitly fails clearly.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use lun::{FileLun, IoEngine, IoRequest, Lun, OpenOptions};

/// Set in a re-executed copy of this test binary: the LUN file to use.
const CHILD_ENV: &str = "LUN_TEST_SECCOMP_CHILD";

/// Makes io_uring_setup fail with EPERM for the calling thread, the way container runtimes'
/// default seccomp profiles do.
#[cfg(target_arch = "x86_64")]
fn refuse_io_uring_setup() -> bool {
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let mut filter = [
        // seccomp_data.arch at offset 4, .nr at offset 0.
        stmt(load, 4),
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
        stmt(load, 0),
        jeq(libc::SYS_io_uring_setup as u32, 0, 1),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: plain prctl calls; the filter program outlives the call (the kernel copies it).
    unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog,
            ) == 0
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn refuse_io_uring_setup() -> bool {
    false
}

fn child(path: &Path) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    assert!(refuse_io_uring_setup(), "installing the seccomp filter");

    for _ in 0..3 {
        let lun = FileLun::open(path, false).unwrap();
        assert_eq!(lun.io_engine(), IoEngine::Sync);
        // Batches still work, through pread/pwrite.
        let data: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i + 1; 4096]).collect();
        let mut batch: Vec<IoRequest<'_>> = data
            .iter()
            .enumerate()
            .map(|(i, buf)| IoRequest::Write {
                buf,
                offset: i as u64 * 4096,
            })
            .collect();
        lun.submit(&mut batch).unwrap();
        let mut back = vec![0u8; 8 * 4096];
        lun.read_at(&mut back, 0).unwrap();
        assert!(back == data.concat());
    }

    let err = FileLun::open_with(
        path,
        &OpenOptions {
            engine: IoEngine::Uring,
            ..OpenOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("io_uring") && err.contains("Operation not permitted"),
        "{err}"
    );
    println!("CHILD OK");
}

#[test]
fn refused_io_uring_falls_back_to_pread_pwrite_and_logs_once() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        child(Path::new(&path));
        return;
    }
    if !cfg!(target_arch = "x86_64") {
        lun::prereq::require(false, "an x86_64 seccomp filter");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lun");
    FileLun::create(&path, 1 << 20).unwrap();
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "refused_io_uring_falls_back_to_pread_pwrite_and_logs_once",
            "--nocapture",
        ])
        .env(CHILD_ENV, &path)
        .env_remove(lun::IO_ENGINE_ENV)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("CHILD OK"),
        "child failed:\n{stdout}\n{stderr}"
    );
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("io_uring unavailable"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "logged exactly once across three opens:\n{stderr}"
    );
    assert!(
        warnings[0].contains("Operation not permitted"),
        "names the reason: {}",
        warnings[0]
    );
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
}
