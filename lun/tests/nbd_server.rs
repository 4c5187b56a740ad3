//! The NBD server (what `vapp export` runs) serving real files, driven by our client, by a
//! raw protocol client that sends what polite clients never do, and by fault-injecting
//! LUNs that prove where flushes and errors go.
#![allow(clippy::unwrap_used)]

mod nbd_support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lun::fault::{CrashMode, FaultLun};
use lun::nbd::{ExportConfig, ListenAddr, ServeError, ShutdownHandle};
use lun::{FileLun, IoRequest, Lun, LunError, NbdLun, NbdOptions, NbdServer, NbdTarget};
use nbd_support::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// A server running on its own thread, stopped when dropped.
struct Running {
    shutdown: ShutdownHandle,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
    target: NbdTarget,
}

impl Running {
    fn start(lun: Arc<dyn Lun>, config: ExportConfig, addr: ListenAddr) -> Running {
        let server = NbdServer::bind(lun, config, &addr).unwrap();
        let target = server.target();
        let shutdown = server.shutdown_handle();
        let thread = Some(std::thread::spawn(move || server.serve()));
        Running {
            shutdown,
            thread,
            target,
        }
    }

    fn tcp(lun: Arc<dyn Lun>, config: ExportConfig) -> Running {
        Running::start(lun, config, ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()))
    }

    fn addr(&self) -> SocketAddr {
        match &self.target {
            NbdTarget::Tcp { host, port } => format!("{host}:{port}").parse().unwrap(),
            NbdTarget::Unix(_) => panic!("not a TCP server"),
        }
    }

    fn client(&self, export: &str, options: NbdOptions) -> NbdLun {
        NbdLun::connect(self.target.clone(), export, options).unwrap()
    }

    fn stop(mut self) -> Result<(), ServeError> {
        self.shutdown.shutdown();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn file_lun(dir: &Path, size: u64) -> (std::path::PathBuf, Arc<dyn Lun>) {
    let path = sparse_file(dir, "export.raw", size);
    let lun: Arc<dyn Lun> = Arc::new(FileLun::open(&path, false).unwrap());
    (path, lun)
}

fn named(name: &str) -> ExportConfig {
    ExportConfig {
        name: name.into(),
        ..Default::default()
    }
}

#[test]
fn our_client_round_trips_through_our_server_over_tcp_and_unix_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let (path, lun) = file_lun(dir.path(), 32 * MIB);
    let mut shadow = vec![0u8; 32 * MIB as usize];
    {
        let server = Running::tcp(Arc::clone(&lun), named("disk"));
        let client = server.client("disk", NbdOptions::default());
        assert!(client.info().structured_replies && client.info().can_multi_conn);
        assert_eq!((client.size(), client.sector_size()), (32 * MIB, 512));
        exercise(&client, &mut shadow, 0..16 * MIB, 30);

        // Simple replies, by the default (empty) export name.
        let simple = server.client(
            "",
            NbdOptions {
                structured_replies: false,
                ..Default::default()
            },
        );
        assert!(!simple.info().structured_replies);
        exercise(&simple, &mut shadow, 16 * MIB..32 * MIB, 31);
    }
    let socket = dir.path().join("export.sock");
    let server = Running::start(
        Arc::clone(&lun),
        named("disk"),
        ListenAddr::Unix(socket.clone()),
    );
    let client = NbdLun::connect(
        NbdTarget::Unix(socket.clone()),
        "disk",
        NbdOptions::default(),
    )
    .unwrap();
    exercise(&client, &mut shadow, 0..32 * MIB, 32);
    drop(client);
    server.stop().unwrap();
    assert!(!socket.exists(), "the socket file is removed at exit");
    assert_file_holds(&path, &shadow);
}

#[test]
fn unknown_export_names_are_refused_and_listed_names_are_ours() {
    let dir = tempfile::tempdir().unwrap();
    let (_, lun) = file_lun(dir.path(), MIB);
    let server = Running::tcp(lun, named("disk"));
    let error = NbdLun::connect(server.target.clone(), "other", NbdOptions::default()).unwrap_err();
    assert!(matches!(error, LunError::Open { .. }), "{error}");
    assert!(
        error.to_string().contains("\"other\" does not exist"),
        "{error}"
    );

    let mut stream = std::net::TcpStream::connect(server.addr()).unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    stream.write_all(&1u32.to_be_bytes()).unwrap();
    send_option(&mut stream, OPT_LIST, &[]);
    let (kind, data) = read_option_reply(&mut stream);
    assert_eq!((kind, &data[4..]), (2, &b"disk"[..]));
    assert_eq!(read_option_reply(&mut stream).0, 1);

    // NBD_OPT_EXPORT_NAME cannot fail politely: an unknown name is a hang-up.
    assert!(RawClient::connect_by_export_name(server.addr(), "other", true).is_err());
    for no_zeroes in [true, false] {
        let client = RawClient::connect_by_export_name(server.addr(), "disk", no_zeroes).unwrap();
        assert_eq!(client.size, MIB);
    }
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let (path, lun) = file_lun(dir.path(), MIB);
    lun.write_at(&[0x5au8; 4096], 0).unwrap();
    let server = Running::tcp(
        lun,
        ExportConfig {
            read_only: true,
            ..Default::default()
        },
    );
    for structured in [false, true] {
        let mut raw = RawClient::connect(server.addr(), "", structured);
        assert_ne!(raw.flags & FLAG_READ_ONLY, 0);
        raw.write(1, 0, &[0xffu8; 4096]);
        assert_eq!(raw.reply().errno, EPERM);
        raw.request(CMD_WRITE_ZEROES, 0, 2, 0, 4096);
        assert_eq!(raw.reply().errno, EPERM);
        raw.request(CMD_TRIM, 0, 3, 0, 4096);
        assert_eq!(raw.reply().errno, EPERM);
        raw.request(CMD_READ, 0, 4, 0, 4096);
        let reply = raw.reply();
        assert_eq!((reply.handle, reply.errno), (4, 0));
        assert!(reply.data.iter().all(|&b| b == 0x5a));
    }
    let client = server.client("", NbdOptions::default());
    assert!(client.is_read_only());
    let on_disk = std::fs::read(&path).unwrap();
    assert!(
        on_disk[..4096].iter().all(|&b| b == 0x5a),
        "a refused write changed the file"
    );
}

#[test]
fn bad_requests_get_errors_and_the_connection_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (_, lun) = file_lun(dir.path(), 4 * MIB);
    let server = Running::tcp(lun, ExportConfig::default());
    for structured in [false, true] {
        let mut raw = RawClient::connect(server.addr(), "", structured);
        let expect = |raw: &mut RawClient, handle: u64, errno: u32, what: &str| {
            let reply = raw.reply();
            assert_eq!(
                (reply.handle, reply.errno),
                (handle, errno),
                "{what} (structured {structured})"
            );
        };
        raw.request(CMD_READ, 0, 1, 0, 33 << 20);
        expect(&mut raw, 1, EINVAL, "read above the 32 MiB maximum");
        raw.write(2, 0, &vec![7u8; (32 << 20) + 4096]);
        expect(
            &mut raw,
            2,
            EINVAL,
            "write above the maximum, payload skipped",
        );
        raw.request(CMD_READ, 0, 3, 4 * MIB - 512, 1024);
        expect(&mut raw, 3, EINVAL, "read past the end");
        raw.write(4, 4 * MIB, &[1u8; 512]);
        expect(&mut raw, 4, ENOSPC, "write past the end");
        raw.request(CMD_WRITE_ZEROES, 0, 5, u64::MAX - 511, 512);
        expect(&mut raw, 5, ENOSPC, "offset + length overflowing");
        raw.request(CMD_READ, 0, 6, 0, 0);
        expect(&mut raw, 6, EINVAL, "zero-length read");
        raw.request(42, 0, 7, 0, 512);
        expect(&mut raw, 7, EINVAL, "unknown command");
        raw.request(CMD_READ, 1 << 6, 8, 0, 512);
        expect(&mut raw, 8, EINVAL, "unknown command flag");
        raw.request(CMD_TRIM, 0, 12, 4 * MIB - 512, 1024);
        expect(&mut raw, 12, EINVAL, "trim past the end");

        // After all that, the same connection still reads and writes correctly.
        raw.write(9, 8192, &[0xabu8; 1024]);
        expect(&mut raw, 9, 0, "normal write");
        raw.request(CMD_FLUSH, 0, 10, 0, 0);
        expect(&mut raw, 10, 0, "flush");
        raw.request(CMD_READ, 0, 11, 8192, 1024);
        let reply = raw.reply();
        assert_eq!((reply.handle, reply.errno), (11, 0));
        assert!(reply.data == vec![0xabu8; 1024]);
    }
}

#[test]
fn partial_sector_requests_are_served_by_read_modify_write() {
    let dir = tempfile::tempdir().unwrap();
    let (path, lun) = file_lun(dir.path(), MIB);
    let server = Running::tcp(lun, ExportConfig::default());
    let mut rng = StdRng::seed_from_u64(40);
    let mut expected = vec![0u8; MIB as usize];

    // Two clients writing different bytes of the same sectors at the same time.
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let addr = server.addr();
            let writes: Vec<(u64, Vec<u8>)> = (0..200u64)
                .map(|i| (i * 1024 + w * 300 + 1, random_bytes(&mut rng, 100)))
                .collect();
            for (offset, data) in &writes {
                expected[*offset as usize..][..data.len()].copy_from_slice(data);
            }
            std::thread::spawn(move || {
                let mut raw = RawClient::connect(addr, "", w == 0);
                for (i, (offset, data)) in writes.iter().enumerate() {
                    raw.write(i as u64, *offset, data);
                }
                for _ in 0..writes.len() {
                    assert_eq!(raw.reply().errno, 0);
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let mut raw = RawClient::connect(server.addr(), "", true);
    raw.request(CMD_READ, 0, 1, 333, 70_001);
    assert!(raw.reply().data[..] == expected[333..333 + 70_001]);
    raw.request(CMD_WRITE_ZEROES, 0, 2, 1000, 5000);
    assert_eq!(raw.reply().errno, 0);
    expected[1000..6000].fill(0);
    raw.request(CMD_FLUSH, 0, 3, 0, 0);
    assert_eq!(raw.reply().errno, 0);
    assert_file_holds(&path, &expected);
}

/// True when every byte of `range` in the file is a hole (SEEK_DATA finds nothing in it).
fn is_hole(path: &Path, range: std::ops::Range<u64>) -> bool {
    use nix::unistd::{Whence, lseek};
    let file = std::fs::File::open(path).unwrap();
    match lseek(&file, range.start as i64, Whence::SeekData) {
        Ok(data) => data as u64 >= range.end,
        Err(nix::errno::Errno::ENXIO) => true,
        Err(e) => panic!("SEEK_DATA on {}: {e}", path.display()),
    }
}

/// True when every byte of `range` in the file is allocated (SEEK_HOLE finds none in it).
fn is_allocated(path: &Path, range: std::ops::Range<u64>) -> bool {
    use nix::unistd::{Whence, lseek};
    let file = std::fs::File::open(path).unwrap();
    lseek(&file, range.start as i64, Whence::SeekHole).unwrap() as u64 >= range.end
}

#[test]
fn trim_frees_whole_granules_and_no_hole_zeroes_stay_allocated() {
    const GRANULE: u64 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.raw");
    let mut expected = random_bytes(&mut StdRng::seed_from_u64(60), 2 * MIB as usize);
    std::fs::write(&path, &expected).unwrap();
    let lun: Arc<dyn Lun> = Arc::new(FileLun::open(&path, false).unwrap());
    let config = ExportConfig {
        trim_granularity: Some(GRANULE as u32),
        ..Default::default()
    };
    let server = Running::tcp(Arc::clone(&lun), config);
    let mut raw = RawClient::connect(server.addr(), "", true);
    assert!(raw.flags & FLAG_SEND_TRIM != 0, "TRIM is not offered");

    // Three whole granules inside, a sector of ragged edge on each side.
    raw.request(
        CMD_TRIM,
        CMD_FLAG_FUA,
        1,
        GRANULE - 512,
        (3 * GRANULE + 1024) as u32,
    );
    assert_eq!(raw.reply().errno, 0);
    assert!(
        is_hole(&path, GRANULE..4 * GRANULE),
        "the granules were not freed"
    );
    assert!(is_allocated(&path, 0..GRANULE) && is_allocated(&path, 4 * GRANULE..2 * MIB));
    expected[GRANULE as usize..4 * GRANULE as usize].fill(0);
    assert_file_holds(&path, &expected);

    // A trim smaller than a granule changes nothing.
    raw.request(CMD_TRIM, 0, 2, 5 * GRANULE + 512, (GRANULE - 1024) as u32);
    assert_eq!(raw.reply().errno, 0);
    assert_file_holds(&path, &expected);

    // NO_HOLE: zeroes that are provisioned, even over a hole; without it, a hole is fine.
    raw.request(
        CMD_WRITE_ZEROES,
        CMD_FLAG_NO_HOLE,
        3,
        GRANULE,
        GRANULE as u32,
    );
    assert_eq!(raw.reply().errno, 0);
    assert!(
        is_allocated(&path, GRANULE..2 * GRANULE),
        "NO_HOLE left a hole"
    );
    raw.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 4, MIB, GRANULE as u32);
    assert_eq!(raw.reply().errno, 0);
    assert!(
        is_allocated(&path, MIB..MIB + GRANULE),
        "NO_HOLE deallocated"
    );
    raw.request(CMD_WRITE_ZEROES, 0, 5, MIB + GRANULE, GRANULE as u32);
    assert_eq!(raw.reply().errno, 0);
    assert!(is_hole(&path, MIB + GRANULE..MIB + 2 * GRANULE));
    expected[MIB as usize..(MIB + 2 * GRANULE) as usize].fill(0);
    assert_file_holds(&path, &expected);
    drop(raw);
    server.stop().unwrap();

    // Without a granularity the export offers no TRIM and ignores one sent anyway.
    let server = Running::tcp(lun, ExportConfig::default());
    let mut raw = RawClient::connect(server.addr(), "", false);
    assert_eq!(
        raw.flags & FLAG_SEND_TRIM,
        0,
        "TRIM offered without a granularity"
    );
    raw.request(CMD_TRIM, 0, 1, 0, MIB as u32);
    assert_eq!(raw.reply().errno, 0);
    assert!(is_allocated(&path, 0..GRANULE));
    assert_file_holds(&path, &expected);
}

#[test]
fn garbage_and_hang_ups_do_not_disturb_other_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (path, lun) = file_lun(dir.path(), 8 * MIB);
    let server = Running::tcp(lun, ExportConfig::default());
    let client = Arc::new(server.client("", NbdOptions::default()));
    let busy = {
        let client = Arc::clone(&client);
        std::thread::spawn(move || {
            let mut shadow = vec![0u8; 8 * MIB as usize];
            for round in 0..4 {
                exercise(&*client, &mut shadow, 0..8 * MIB, 50 + round);
            }
            shadow
        })
    };

    // Garbage instead of a handshake: the server hangs up on that connection alone.
    let mut garbage = std::net::TcpStream::connect(server.addr()).unwrap();
    garbage
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 18];
    garbage.read_exact(&mut greeting).unwrap();
    garbage
        .write_all(&random_bytes(&mut StdRng::seed_from_u64(51), 4096))
        .unwrap();
    let mut rest = Vec::new();
    let _ = garbage.read_to_end(&mut rest);
    assert!(
        rest.len() < 4096,
        "the server kept talking to a garbage client"
    );

    // A write request whose payload never fully arrives.
    let mut torn = RawClient::connect(server.addr(), "", false);
    torn.request(CMD_WRITE, 0, 1, 0, 1 << 20);
    torn.stream.write_all(&[0xeeu8; 1000]).unwrap();
    drop(torn);

    // A big read whose asker leaves before the answer.
    let mut impatient = RawClient::connect(server.addr(), "", true);
    impatient.request(CMD_READ, 0, 1, 0, 8 << 20);
    drop(impatient);

    // Garbage in the middle of transmission.
    let mut confused = RawClient::connect(server.addr(), "", true);
    confused.stream.write_all(&[0x42u8; 28]).unwrap();
    let mut rest = Vec::new();
    let _ = confused.stream.read_to_end(&mut rest);
    assert!(rest.is_empty());

    let shadow = busy.join().unwrap();
    drop(client);
    server.stop().unwrap();
    assert_file_holds(&path, &shadow);
}

#[test]
fn requests_of_one_client_run_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let (_, file) = file_lun(dir.path(), MIB);
    let slow = Arc::new(FaultLun::new(file));
    slow.set_latency(Duration::from_millis(200));
    let server = Running::tcp(slow, ExportConfig::default());
    let client = server.client(
        "",
        NbdOptions {
            connections: 1,
            ..Default::default()
        },
    );
    // FaultLun runs a submitted batch one request after another; once the server has seen
    // how slow the LUN is, it spreads batches over its workers.
    let mut warm_up = vec![0u8; 4096];
    client.read_at(&mut warm_up, 0).unwrap();
    let mut bufs = vec![vec![0u8; 4096]; 8];
    let mut batch: Vec<IoRequest<'_>> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, buf)| IoRequest::Read {
            buf,
            offset: i as u64 * 4096,
        })
        .collect();
    let started = Instant::now();
    client.submit(&mut batch).unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(800),
        "8 reads of 200 ms took {elapsed:?}: serialised"
    );
}

#[test]
fn flush_and_fua_are_durable_before_their_reply() {
    let dir = tempfile::tempdir().unwrap();
    let (path, file) = file_lun(dir.path(), MIB);
    let disk = Arc::new(FaultLun::new(file));
    let server = Running::tcp(Arc::clone(&disk) as Arc<dyn Lun>, ExportConfig::default());
    let client = server.client("", NbdOptions::default());
    let block = |at: usize| std::fs::read(&path).unwrap()[at..at + 4096].to_vec();

    // A power cut loses what was not flushed; the flushed write must survive it.
    disk.set_crash_mode(CrashMode::DropUnflushed);
    client.write_at(&[0x11u8; 4096], 0).unwrap();
    client.flush().unwrap();
    client.write_at(&[0x22u8; 4096], 4096).unwrap();
    disk.crash().unwrap();
    assert!(
        block(0) == [0x11u8; 4096],
        "flushed write lost in the crash"
    );
    assert!(
        block(4096) == [0u8; 4096],
        "unflushed write survived: the crash model is not armed"
    );

    // Power back; a FUA write is durable on its own.
    disk.clear_faults();
    disk.set_crash_mode(CrashMode::DropUnflushed);
    client.write_fua(&[0x33u8; 4096], 8192).unwrap();
    client.write_at(&[0x44u8; 4096], 12288).unwrap();
    disk.crash().unwrap();
    assert!(block(8192) == [0x33u8; 4096], "FUA write lost in the crash");
    assert!(
        block(12288) == [0u8; 4096],
        "unflushed write survived: the crash model is not armed"
    );
}

#[test]
fn lun_errors_reach_the_client_as_nbd_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_, file) = file_lun(dir.path(), MIB);
    let disk = Arc::new(FaultLun::new(file));
    disk.fail_reads(65536..65536 + 512);
    disk.fail_writes(131072..131072 + 512);
    let server = Running::tcp(disk, ExportConfig::default());
    for structured in [true, false] {
        let client = server.client(
            "",
            NbdOptions {
                structured_replies: structured,
                ..Default::default()
            },
        );
        let mut buf = vec![0u8; 4096];
        let error = client.read_at(&mut buf, 65536).unwrap_err();
        assert!(
            matches!(&error, LunError::Io { source, .. } if source.raw_os_error() == Some(5)),
            "{error}"
        );
        let error = client.write_at(&buf, 131072).unwrap_err();
        assert!(
            matches!(&error, LunError::Io { source, .. } if source.raw_os_error() == Some(5)),
            "{error}"
        );
        client.read_at(&mut buf, 0).unwrap();
    }
}

#[test]
fn shutdown_answers_requests_in_flight_then_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, file) = file_lun(dir.path(), MIB);
    let disk = Arc::new(FaultLun::new(file));
    disk.set_crash_mode(CrashMode::DropUnflushed);
    let server = Running::tcp(Arc::clone(&disk) as Arc<dyn Lun>, ExportConfig::default());
    let client = Arc::new(server.client("", NbdOptions::default()));
    // Slow enough that the write is surely still in the LUN when the shutdown comes.
    disk.set_latency(Duration::from_millis(1200));
    let writer = {
        let client = Arc::clone(&client);
        std::thread::spawn(move || client.write_at(&[0x61u8; 8192], 0))
    };
    std::thread::sleep(Duration::from_millis(400));
    server.stop().unwrap();
    writer
        .join()
        .unwrap()
        .expect("a write in flight at shutdown is answered");
    disk.crash().unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert!(
        on_disk[..8192].iter().all(|&b| b == 0x61),
        "the final flush did not happen"
    );
    // The server is gone; the client says so.
    let mut buf = [0u8; 512];
    assert!(client.read_at(&mut buf, 0).is_err());
}

#[test]
fn many_clients_at_once_and_extra_ones_turned_away() {
    let dir = tempfile::tempdir().unwrap();
    let (path, lun) = file_lun(dir.path(), 16 * MIB);
    let server = Running::tcp(Arc::clone(&lun), ExportConfig::default());
    let target = server.target.clone();
    let clients: Vec<_> = (0..8u64)
        .map(|i| {
            let target = target.clone();
            std::thread::spawn(move || {
                let lun = NbdLun::connect(
                    target,
                    "",
                    NbdOptions {
                        connections: 1,
                        ..Default::default()
                    },
                )
                .unwrap();
                let mut shadow = vec![0u8; 16 * MIB as usize];
                let range = i * 2 * MIB..(i + 1) * 2 * MIB;
                exercise(&lun, &mut shadow, range.clone(), 60 + i);
                shadow[range.start as usize..range.end as usize].to_vec()
            })
        })
        .collect();
    let expected: Vec<u8> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    server.stop().unwrap();
    assert_file_holds(&path, &expected);

    let server = Running::tcp(
        Arc::clone(&lun),
        ExportConfig {
            max_clients: 2,
            ..Default::default()
        },
    );
    let first = server.client(
        "",
        NbdOptions {
            connections: 1,
            ..Default::default()
        },
    );
    let _second = server.client(
        "",
        NbdOptions {
            connections: 1,
            ..Default::default()
        },
    );
    let error = NbdLun::connect(server.target.clone(), "", NbdOptions::default()).unwrap_err();
    assert!(matches!(error, LunError::Disconnected { .. }), "{error}");
    let mut buf = [0u8; 512];
    first.read_at(&mut buf, 0).unwrap();
    drop((first, _second, server));

    // A client that wants more connections than the server takes makes do with fewer.
    let server = Running::tcp(
        lun,
        ExportConfig {
            max_clients: 2,
            ..Default::default()
        },
    );
    let client = server.client("", NbdOptions::default());
    assert_eq!(client.info().connections, 2);
    let mut shadow = std::fs::read(&path).unwrap();
    exercise(&client, &mut shadow, 0..2 * MIB, 70);
}
