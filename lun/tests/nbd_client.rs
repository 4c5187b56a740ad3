//! The `nbd://` LUN against servers we did not write: qemu-nbd and nbdkit (memory and file
//! plugins), plus scripted servers that misbehave in ways real ones rarely do on cue.
#![allow(clippy::unwrap_used)]

mod nbd_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use lun::{Lun, LunError, NbdLun, NbdOptions, NbdTarget};
use nbd_support::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

fn connect(socket: &std::path::Path, export: &str, options: NbdOptions) -> NbdLun {
    NbdLun::connect(NbdTarget::Unix(socket.to_path_buf()), export, options).unwrap()
}

#[test]
fn random_io_against_qemu_nbd_lands_in_the_file() {
    if !have_qemu_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "disk.raw", 64 * MIB);
    let server = qemu_nbd(&file, "disk", dir.path());
    let lun = connect(&server.socket, "disk", NbdOptions::default());
    assert_eq!(lun.size(), 64 * MIB);
    assert_eq!(lun.sector_size(), 512, "qemu-nbd's minimum block size is 1");
    assert!(lun.info().structured_replies && lun.info().can_multi_conn);
    assert_eq!(lun.info().connections, 4);
    assert_eq!(
        lun.name(),
        format!("nbd+unix:///disk?socket={}", server.socket.display())
    );

    let mut shadow = vec![0u8; 64 * MIB as usize];
    exercise(&lun, &mut shadow, 0..64 * MIB, 1);
    // A read larger than the 32 MiB request limit is split and reassembled.
    let mut big = vec![0u8; 40 * MIB as usize];
    lun.read_at(&mut big, 8 * MIB).unwrap();
    assert!(big[..] == shadow[8 * MIB as usize..48 * MIB as usize]);
    drop(lun);
    assert_file_holds(&file, &shadow);
}

#[test]
fn simple_replies_and_a_single_connection_work_too() {
    if !have_qemu_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "disk.raw", 16 * MIB);
    let server = qemu_nbd(&file, "disk", dir.path());
    let options = NbdOptions {
        structured_replies: false,
        connections: 1,
        ..Default::default()
    };
    let lun = connect(&server.socket, "disk", options);
    assert!(!lun.info().structured_replies);
    assert_eq!(lun.info().connections, 1);
    let mut shadow = vec![0u8; 16 * MIB as usize];
    exercise(&lun, &mut shadow, 0..16 * MIB, 2);
    drop(lun);
    assert_file_holds(&file, &shadow);
}

#[test]
fn random_io_against_nbdkit_memory_and_file_plugins() {
    if !have_nbdkit() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    {
        let server = nbdkit(dir.path(), &["memory", "size=32M"]);
        let lun = connect(&server.socket, "", NbdOptions::default());
        assert_eq!(lun.size(), 32 * MIB);
        let mut shadow = vec![0u8; 32 * MIB as usize];
        exercise(&lun, &mut shadow, 0..32 * MIB, 3);
    }
    let file = sparse_file(dir.path(), "disk.raw", 32 * MIB);
    let server = nbdkit(dir.path(), &["file", file.to_str().unwrap()]);
    let lun = connect(&server.socket, "", NbdOptions::default());
    let mut shadow = vec![0u8; 32 * MIB as usize];
    exercise(&lun, &mut shadow, 0..32 * MIB, 4);
    drop(lun);
    assert_file_holds(&file, &shadow);
}

#[test]
fn two_clients_share_one_export_on_qemu_nbd_and_nbdkit() {
    if !have_qemu_nbd() || !have_nbdkit() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "disk.raw", 32 * MIB);
    {
        let server = qemu_nbd(&file, "disk", dir.path());
        two_clients(&server.socket, "disk");
    }
    let server = nbdkit(dir.path(), &["file", file.to_str().unwrap()]);
    two_clients(&server.socket, "");
}

/// Two clients at once, each writing its own half from its own thread; then each must
/// see the other's flushed writes.
fn two_clients(socket: &std::path::Path, export: &str) {
    let a = Arc::new(connect(socket, export, NbdOptions::default()));
    let b = Arc::new(connect(socket, export, NbdOptions::default()));
    let workers: Vec<_> = [(Arc::clone(&a), 0u64, 5u64), (Arc::clone(&b), 16 * MIB, 6)]
        .into_iter()
        .map(|(lun, start, seed)| {
            std::thread::spawn(move || {
                let mut shadow = vec![0u8; 32 * MIB as usize];
                lun.read_at(
                    &mut shadow[start as usize..(start + 16 * MIB) as usize],
                    start,
                )
                .unwrap();
                exercise(&*lun, &mut shadow, start..start + 16 * MIB, seed);
                shadow[start as usize..(start + 16 * MIB) as usize].to_vec()
            })
        })
        .collect();
    let halves: Vec<Vec<u8>> = workers.into_iter().map(|w| w.join().unwrap()).collect();

    let mut seen_by_a = vec![0u8; 16 * MIB as usize];
    a.read_at(&mut seen_by_a, 16 * MIB).unwrap();
    assert!(
        seen_by_a == halves[1],
        "{}: client A does not see client B's writes",
        a.name()
    );
    let mut seen_by_b = vec![0u8; 16 * MIB as usize];
    b.read_at(&mut seen_by_b, 0).unwrap();
    assert!(
        seen_by_b == halves[0],
        "{}: client B does not see client A's writes",
        b.name()
    );
}

#[test]
fn many_threads_pipeline_over_several_connections() {
    if !have_nbdkit() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit(dir.path(), &["memory", "size=64M"]);
    let lun = Arc::new(connect(
        &server.socket,
        "",
        NbdOptions {
            connections: 3,
            ..Default::default()
        },
    ));
    assert_eq!(lun.info().connections, 3);
    let threads: Vec<_> = (0..6u64)
        .map(|i| {
            let lun = Arc::clone(&lun);
            std::thread::spawn(move || {
                let mut shadow = vec![0u8; 64 * MIB as usize];
                let start = i * 8 * MIB;
                exercise(&*lun, &mut shadow, start..start + 8 * MIB, 10 + i);
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

#[test]
fn sector_size_and_request_size_follow_the_server_block_sizes() {
    if !have_nbdkit() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The filter fails any request that breaks the advertised constraints.
    let server = nbdkit(
        dir.path(),
        &[
            "--filter=blocksize-policy",
            "memory",
            "size=16M",
            "blocksize-minimum=4096",
            "blocksize-preferred=65536",
            "blocksize-maximum=1M",
            "blocksize-error-policy=error",
        ],
    );
    let lun = connect(&server.socket, "", NbdOptions::default());
    assert_eq!(lun.sector_size(), 4096);
    let sizes = lun.info().block_sizes.unwrap();
    assert_eq!(
        (sizes.minimum, sizes.preferred, sizes.maximum),
        (4096, 65536, 1 << 20)
    );

    let misaligned = lun.write_at(&[1u8; 512], 512).unwrap_err();
    assert!(
        matches!(
            misaligned,
            LunError::Misaligned {
                sector_size: 4096,
                ..
            }
        ),
        "{misaligned}"
    );

    // 5 MiB in one call: only correct if split into requests of at most 1 MiB.
    let mut rng = StdRng::seed_from_u64(20);
    let data = random_bytes(&mut rng, 5 * MIB as usize);
    lun.write_at(&data, 4096).unwrap();
    let mut back = vec![0u8; data.len()];
    lun.read_at(&mut back, 4096).unwrap();
    assert!(back == data);
}

#[test]
fn write_zeroes_trim_and_fua_reach_the_server() {
    if !have_qemu_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "disk.raw", 8 * MIB);
    let server = qemu_nbd(&file, "disk", dir.path());
    let lun = connect(&server.socket, "disk", NbdOptions::default());
    assert!(lun.info().can_write_zeroes && lun.info().can_trim && lun.info().can_fua);

    lun.write_at(&vec![0xeeu8; 4 * MIB as usize], 0).unwrap();
    lun.write_zeroes(MIB, 2 * MIB).unwrap();
    lun.write_fua(&[0x11u8; 4096], 6 * MIB).unwrap();
    lun.trim(7 * MIB, MIB).unwrap();
    lun.flush().unwrap();

    let mut expected = vec![0u8; 8 * MIB as usize];
    expected[..4 * MIB as usize].fill(0xee);
    expected[MIB as usize..3 * MIB as usize].fill(0);
    expected[6 * MIB as usize..][..4096].fill(0x11);
    let mut back = vec![0xffu8; 7 * MIB as usize];
    lun.read_at(&mut back, 0).unwrap();
    assert!(back[..] == expected[..7 * MIB as usize]);
    let on_disk = std::fs::read(&file).unwrap();
    assert!(on_disk[..7 * MIB as usize] == expected[..7 * MIB as usize]);
}

#[test]
fn read_only_client_and_read_only_export_refuse_writes() {
    if !have_nbdkit() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit(dir.path(), &["--readonly", "memory", "size=1M"]);
    let lun = connect(&server.socket, "", NbdOptions::default());
    assert!(lun.is_read_only());
    assert!(matches!(
        lun.write_at(&[0u8; 512], 0),
        Err(LunError::ReadOnly { .. })
    ));
    let mut buf = [1u8; 512];
    lun.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0u8; 512]);
    drop((lun, server));

    let server = nbdkit(dir.path(), &["memory", "size=1M"]);
    let options = NbdOptions {
        read_only: true,
        ..Default::default()
    };
    let lun = connect(&server.socket, "", options);
    assert!(matches!(
        lun.write_zeroes(0, 512),
        Err(LunError::ReadOnly { .. })
    ));
}

#[test]
fn missing_export_and_missing_server_are_clear_errors() {
    if !have_qemu_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "disk.raw", MIB);
    let server = qemu_nbd(&file, "disk", dir.path());
    let error = NbdLun::connect(
        NbdTarget::Unix(server.socket.clone()),
        "nope",
        NbdOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(error, LunError::Open { .. }), "{error}");
    assert!(
        error.to_string().contains("\"nope\" does not exist"),
        "{error}"
    );

    let gone = dir.path().join("nobody.sock");
    let error = NbdLun::connect(NbdTarget::Unix(gone), "disk", NbdOptions::default()).unwrap_err();
    assert!(matches!(error, LunError::Open { .. }), "{error}");
    assert!(error.to_string().contains("cannot connect"), "{error}");

    // A TCP port nobody listens on: bind one, learn its number, free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let error =
        lun::open(&format!("nbd://127.0.0.1:{port}/disk"), &Default::default()).unwrap_err();
    assert!(error.to_string().contains("Connection refused"), "{error}");
}

#[test]
fn tls_only_server_is_refused_with_a_reason() {
    if !have_nbdkit() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let psk = dir.path().join("keys.psk");
    std::fs::write(&psk, "alice:0123456789abcdef0123456789abcdef\n").unwrap();
    let psk_arg = format!("--tls-psk={}", psk.display());
    let server = nbdkit(
        dir.path(),
        &["--tls=require", &psk_arg, "memory", "size=1M"],
    );
    let error = NbdLun::connect(
        NbdTarget::Unix(server.socket.clone()),
        "",
        NbdOptions::default(),
    )
    .unwrap_err();
    assert!(error.to_string().contains("requires TLS"), "{error}");
}

#[test]
fn a_slow_server_times_out_and_the_next_request_reconnects() {
    if !have_nbdkit() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit(
        dir.path(),
        &["--filter=delay", "memory", "size=1M", "delay-read=3"],
    );
    let options = NbdOptions {
        io_timeout: Duration::from_millis(600),
        connections: 1,
        ..Default::default()
    };
    let lun = connect(&server.socket, "", options);
    lun.write_at(&[0x77u8; 4096], 0).unwrap();

    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let error = lun.read_at(&mut buf, 0).unwrap_err();
    assert!(matches!(error, LunError::Timeout { .. }), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "timeout took {:?}",
        started.elapsed()
    );
    assert_eq!(
        buf, [0u8; 4096],
        "a timed-out read must leave no data behind"
    );

    // Writes are not delayed: the LUN reconnects and carries on.
    lun.write_at(&[0x78u8; 4096], 4096).unwrap();
}

#[test]
fn server_killed_mid_io_fails_requests_and_keeps_flushed_data() {
    if !have_qemu_nbd() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), "disk.raw", 16 * MIB);
    let mut server = qemu_nbd(&file, "disk", dir.path());
    let lun = Arc::new(connect(&server.socket, "disk", NbdOptions::default()));

    let flushed = vec![0x42u8; 4 * MIB as usize];
    lun.write_at(&flushed, 0).unwrap();
    lun.flush().unwrap();

    // Writes keep going while the server dies under them.
    let writer = {
        let lun = Arc::clone(&lun);
        std::thread::spawn(move || {
            let data = vec![0x99u8; 256 * 1024];
            let mut offset = 4 * MIB;
            for _ in 0..100_000 {
                match lun.write_at(&data, offset) {
                    Ok(()) => offset = 4 * MIB + (offset + 256 * 1024) % (8 * MIB),
                    Err(error) => return error,
                }
            }
            panic!("writes kept succeeding with the server dead");
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    server.kill();
    let error = writer.join().unwrap();
    assert!(
        matches!(error, LunError::Disconnected { .. }),
        "a killed server must surface as a lost connection, got {error}"
    );
    let mut buf = vec![0u8; 4096];
    assert!(
        lun.read_at(&mut buf, 0).is_err(),
        "a read with the server gone must fail"
    );

    // Restarted on the same file and socket: the same LUN reconnects, flushed data is there.
    let _server = qemu_nbd(&file, "disk", dir.path());
    let mut back = vec![0u8; flushed.len()];
    lun.read_at(&mut back, 0).unwrap();
    assert!(back == flushed, "data flushed before the crash is gone");
}

#[test]
fn garbage_and_hang_ups_during_the_handshake_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = scripted_server(dir.path(), |mut stream| {
        use std::io::Write;
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let error = connect_err(&socket);
    assert!(matches!(error, LunError::Protocol { .. }), "{error}");
    assert!(error.to_string().contains("not an NBD server"), "{error}");
    server.join().unwrap();
    std::fs::remove_file(&socket).unwrap();

    let (socket, server) = scripted_server(dir.path(), drop);
    let error = connect_err(&socket);
    assert!(matches!(error, LunError::Disconnected { .. }), "{error}");
    server.join().unwrap();
}

fn connect_err(socket: &std::path::Path) -> LunError {
    NbdLun::connect(
        NbdTarget::Unix(socket.to_path_buf()),
        "",
        NbdOptions::default(),
    )
    .unwrap_err()
}

fn scripted_lun(socket: &std::path::Path, structured: bool) -> NbdLun {
    let options = NbdOptions {
        structured_replies: structured,
        io_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    connect(socket, "", options)
}

#[test]
fn a_reply_cut_short_fails_the_read() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = scripted_server(dir.path(), |mut stream| {
        scripted_handshake(&mut stream, MIB, false);
        let (command, handle, _, len) = scripted_request(&mut stream);
        assert_eq!((command, len), (CMD_READ, 8192));
        // Success header, then half the data, then the server dies.
        simple_reply(&mut stream, 0, handle, &[0x33u8; 4096]);
    });
    let lun = scripted_lun(&socket, false);
    let mut buf = vec![0u8; 8192];
    let error = lun.read_at(&mut buf, 0).unwrap_err();
    assert!(matches!(error, LunError::Disconnected { .. }), "{error}");
    server.join().unwrap();
}

#[test]
fn a_structured_reply_with_a_gap_is_never_returned_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = scripted_server(dir.path(), |mut stream| {
        scripted_handshake(&mut stream, MIB, true);
        let (command, handle, offset, len) = scripted_request(&mut stream);
        assert_eq!((command, len), (CMD_READ, 8192));
        // Claims success after covering only the second half of the read.
        let mut payload = (offset + 4096).to_be_bytes().to_vec();
        payload.extend_from_slice(&[0x44u8; 4096]);
        chunk(&mut stream, 1, 1, handle, &payload);
        std::thread::sleep(Duration::from_millis(200));
    });
    let lun = scripted_lun(&socket, true);
    assert!(lun.info().structured_replies);
    let mut buf = vec![0u8; 8192];
    let error = lun.read_at(&mut buf, 0).unwrap_err();
    assert!(matches!(error, LunError::Protocol { .. }), "{error}");
    assert!(error.to_string().contains("gap"), "{error}");
    server.join().unwrap();
}

#[test]
fn structured_holes_errors_and_out_of_order_chunks_are_understood() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = scripted_server(dir.path(), |mut stream| {
        scripted_handshake(&mut stream, MIB, true);
        // Read 1: a data chunk for the second half, a hole for the first, then NONE.
        let (_, handle, offset, _) = scripted_request(&mut stream);
        let mut data = (offset + 4096).to_be_bytes().to_vec();
        data.extend_from_slice(&[0x55u8; 4096]);
        chunk(&mut stream, 0, 1, handle, &data);
        let mut hole = offset.to_be_bytes().to_vec();
        hole.extend_from_slice(&4096u32.to_be_bytes());
        chunk(&mut stream, 0, 2, handle, &hole);
        chunk(&mut stream, 1, 0, handle, &[]);
        // Read 2: an error chunk with a message; the connection stays usable.
        let (_, handle, _, _) = scripted_request(&mut stream);
        let mut error = EIO.to_be_bytes().to_vec();
        error.extend_from_slice(&(5u16).to_be_bytes());
        error.extend_from_slice(b"bad!!");
        chunk(&mut stream, 1, 0x8001, handle, &error);
        // Read 3: plain success.
        let (_, handle, offset, len) = scripted_request(&mut stream);
        let mut data = offset.to_be_bytes().to_vec();
        data.extend_from_slice(&vec![0x66u8; len as usize]);
        chunk(&mut stream, 1, 1, handle, &data);
        let (command, _, _, _) = scripted_request(&mut stream);
        assert_eq!(command, CMD_DISC, "the client says goodbye when dropped");
    });
    let lun = scripted_lun(&socket, true);
    let mut buf = vec![0xffu8; 8192];
    lun.read_at(&mut buf, 65536).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 0x55));
    let error = lun.read_at(&mut buf, 0).unwrap_err();
    assert!(
        matches!(&error, LunError::Io { source, .. } if source.raw_os_error() == Some(5)),
        "{error}"
    );
    lun.read_at(&mut buf[..512], 0).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 0x66));
    drop(lun);
    server.join().unwrap();
}

#[test]
fn servers_without_nbd_opt_go_are_served_through_export_name() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, server) = scripted_server(dir.path(), |mut stream| {
        use std::io::{Read, Write};
        // An old server: fixed newstyle, but no NO_ZEROES and no NBD_OPT_GO.
        let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
        greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
        greeting.extend_from_slice(&1u16.to_be_bytes());
        stream.write_all(&greeting).unwrap();
        let mut flags = [0u8; 4];
        stream.read_exact(&mut flags).unwrap();
        assert_eq!(
            u32::from_be_bytes(flags),
            1,
            "NO_ZEROES asked of a server without it"
        );
        loop {
            let mut header = [0u8; 16];
            stream.read_exact(&mut header).unwrap();
            let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
            let mut data = vec![0u8; u32::from_be_bytes(header[12..].try_into().unwrap()) as usize];
            stream.read_exact(&mut data).unwrap();
            if option == 1 {
                assert_eq!(data, b"old");
                let mut reply = (MIB).to_be_bytes().to_vec();
                reply.extend_from_slice(&1u16.to_be_bytes());
                reply.extend_from_slice(&[0u8; 124]);
                stream.write_all(&reply).unwrap();
                break;
            }
            let mut reply = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
            reply.extend_from_slice(&option.to_be_bytes());
            reply.extend_from_slice(&((1u32 << 31) | 1).to_be_bytes());
            reply.extend_from_slice(&0u32.to_be_bytes());
            stream.write_all(&reply).unwrap();
        }
        let (command, handle, _, len) = scripted_request(&mut stream);
        assert_eq!(command, CMD_READ);
        simple_reply(&mut stream, 0, handle, &vec![0x77u8; len as usize]);
        let (command, _, _, _) = scripted_request(&mut stream);
        assert_eq!(command, CMD_DISC);
    });
    let lun = connect(&socket, "old", NbdOptions::default());
    assert_eq!((lun.size(), lun.sector_size()), (MIB, 512));
    assert!(!lun.info().structured_replies && !lun.info().can_flush);
    assert_eq!(lun.info().block_sizes, None);
    let mut buf = vec![0u8; 4096];
    lun.read_at(&mut buf, 8192).unwrap();
    assert!(buf.iter().all(|&b| b == 0x77));
    drop(lun);
    server.join().unwrap();
}

#[test]
fn oldstyle_servers_are_refused_with_a_reason() {
    if !have_nbdkit() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("old.sock");
    let mut child = std::process::Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "--oldstyle", "-U"])
        .arg(&socket)
        .args(["memory", "size=1M"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "nbdkit did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let error = connect_err(&socket);
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(error, LunError::Protocol { .. }), "{error}");
    assert!(error.to_string().contains("oldstyle"), "{error}");
}
