//! The TCP transport on 127.0.0.1: an authenticated primary replicates; a wrong secret,
//! garbage, a truncated frame, another protocol version, an unauthenticated frame and a
//! replica too small are all refused and leave the replica as it was.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use lun::Lun;
use replication::wire::{self, Message, SideInfo};
use replication::{
    Gens, LinkPolicy, LinkState, PrimaryLun, ReplError, Secondary, SecondaryServer, TcpPeer,
};

const MIB: u64 = 1 << 20;
const SECRET: &[u8] = b"correct horse battery staple";

struct Site {
    dir: tempfile::TempDir,
    replica: Arc<dyn Lun>,
    secondary: Arc<Secondary>,
    server: SecondaryServer,
}

/// A secondary listening on loopback, its replica filled with 0x5a so any change shows.
fn site_b(replica_size: u64) -> Site {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let replica = file_lun(dir.path(), "b.img", replica_size);
    fill(&*replica, 0x5a);
    let secondary = Arc::new(
        Secondary::create(
            replica.clone(),
            meta_lun(dir.path(), "b.meta", replica_size),
            None,
            small_geometry(),
        )
        .expect("secondary"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server =
        SecondaryServer::start(listener, secondary.clone(), SECRET.to_vec()).expect("server");
    Site {
        dir,
        replica,
        secondary,
        server,
    }
}

fn primary_to(
    addr: SocketAddr,
    secret: &[u8],
    size: u64,
) -> (tempfile::TempDir, Arc<dyn Lun>, PrimaryLun) {
    let dir = tempfile::tempdir().expect("tempdir");
    let local = file_lun(dir.path(), "a.img", size);
    let a = PrimaryLun::create(
        local.clone(),
        meta_lun(dir.path(), "a.meta", size),
        Box::new(TcpPeer::new(addr, secret.to_vec())),
        small_geometry(),
        LinkPolicy::Continue,
    )
    .expect("primary");
    (dir, local, a)
}

/// Nothing reached the replica or its generation.
fn assert_untouched(b: &Site) {
    assert!(
        read_all(&*b.replica).iter().all(|&c| c == 0x5a),
        "replica changed"
    );
    assert_eq!(
        b.secondary.gens(),
        Gens::default(),
        "replica metadata changed"
    );
    let _ = b.dir.path();
}

/// The server hangs up on us (EOF or reset), after at most an error frame.
fn assert_hung_up(s: &mut TcpStream) -> Option<String> {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reason = None;
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) => assert_ne!(
            e.kind(),
            std::io::ErrorKind::WouldBlock,
            "server kept the connection open"
        ),
    }
    if !rest.is_empty()
        && let Ok((_, Message::Error { reason: r })) = wire::read_frame(&mut &rest[..])
    {
        reason = Some(r);
    }
    reason
}

#[test]
fn an_authenticated_primary_replicates_over_tcp() {
    let b = site_b(4 * MIB);
    let (_d, local, a) = primary_to(b.server.local_addr(), SECRET, 4 * MIB);
    fill(&a, 0x33);
    assert_eq!(a.connect().expect("connect"), LinkState::Resyncing);
    a.resync().expect("initial sync");
    for seq in 1..=64u64 {
        a.write_at(&seq_block(seq), seq * 8192).expect("write");
    }
    a.flush().expect("flush");
    assert_eq!(read_all(&*local), read_all(&*b.replica));
    assert_eq!(b.secondary.gens().current, a.status().gens.current);
}

#[test]
fn a_wrong_secret_is_refused_and_changes_nothing() {
    let b = site_b(2 * MIB);
    let (_d, _local, a) = primary_to(b.server.local_addr(), b"not the secret", 2 * MIB);
    match a.connect() {
        Err(ReplError::AuthFailed { .. }) => {}
        other => panic!("expected an authentication failure, got {other:?}"),
    }
    a.write_at(&seq_block(1), 0)
        .expect("local write goes on, tracked");
    assert_untouched(&b);
}

#[test]
fn a_server_with_a_wrong_secret_is_not_trusted() {
    // The client checks the server's proof too: a listener that does not know the
    // secret learns nothing and gets nothing.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        wire::server_handshake(&mut s, b"some other secret").is_ok()
    });
    let (_d, _local, a) = primary_to(addr, SECRET, MIB);
    assert!(matches!(a.connect(), Err(ReplError::AuthFailed { .. })));
    assert!(!fake.join().expect("join"));
}

#[test]
fn garbage_bytes_are_disconnected_and_change_nothing() {
    let b = site_b(2 * MIB);
    let mut s = TcpStream::connect(b.server.local_addr()).expect("connect");
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let _ = s.write_all(&garbage);
    assert_hung_up(&mut s);
    assert_untouched(&b);
    // The server survived and serves the next, good, primary.
    let (_d, local, a) = primary_to(b.server.local_addr(), SECRET, 2 * MIB);
    a.connect().expect("connect after garbage");
    a.resync().expect("sync");
    assert_eq!(read_all(&*local), read_all(&*b.replica));
}

#[test]
fn a_data_frame_before_authentication_is_refused() {
    let b = site_b(MIB);
    let mut s = TcpStream::connect(b.server.local_addr()).expect("connect");
    let frame = wire::encode(
        1,
        &Message::Write {
            offset: 0,
            data: vec![0xee; 4096],
        },
    );
    s.write_all(&frame).expect("send");
    assert_hung_up(&mut s);
    assert_untouched(&b);
}

fn authenticated(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    wire::client_handshake(&mut s, SECRET).expect("handshake");
    s
}

#[test]
fn a_truncated_frame_writes_nothing() {
    let b = site_b(MIB);
    let mut s = authenticated(b.server.local_addr());
    let side = SideInfo {
        lun_size: MIB,
        region_size: small_geometry().region_size,
        flags: 1,
        gens: Gens::default(),
        dirty_regions: 0,
    };
    s.write_all(&wire::encode(1, &Message::Connect(side)))
        .expect("send");
    assert!(matches!(
        wire::read_frame(&mut s).expect("state").1,
        Message::State(_)
    ));
    let frame = wire::encode(
        2,
        &Message::Write {
            offset: 0,
            data: vec![0xee; 65536],
        },
    );
    s.write_all(&frame[..frame.len() / 2]).expect("send half");
    drop(s);
    // Give the server time to see the cut.
    std::thread::sleep(Duration::from_millis(300));
    assert_untouched(&b);
}

#[test]
fn a_corrupted_frame_is_disconnected_and_writes_nothing() {
    let b = site_b(MIB);
    let mut s = authenticated(b.server.local_addr());
    let side = SideInfo {
        lun_size: MIB,
        region_size: small_geometry().region_size,
        flags: 1,
        gens: Gens::default(),
        dirty_regions: 0,
    };
    s.write_all(&wire::encode(1, &Message::Connect(side)))
        .expect("send");
    wire::read_frame(&mut s).expect("state");
    let mut frame = wire::encode(
        2,
        &Message::Write {
            offset: 0,
            data: vec![0xee; 4096],
        },
    );
    frame[wire::HEADER_LEN + 10] ^= 0x40;
    s.write_all(&frame).expect("send");
    let reason = assert_hung_up(&mut s).expect("an error frame says why");
    assert!(reason.contains("checksum"), "{reason}");
    assert_untouched(&b);
}

#[test]
fn a_peer_speaking_another_version_is_disconnected() {
    let b = site_b(MIB);
    let mut s = TcpStream::connect(b.server.local_addr()).expect("connect");
    let mut hello = wire::encode(0, &Message::Hello { nonce: [7; 32] });
    hello[4..6].copy_from_slice(&2u16.to_le_bytes());
    hello[20..24].fill(0);
    let crc = crc32c(&hello);
    hello[20..24].copy_from_slice(&crc.to_le_bytes());
    s.write_all(&hello).expect("send");
    let reason = assert_hung_up(&mut s).expect("an error frame says why");
    assert!(reason.contains("version 2"), "{reason}");
    assert_untouched(&b);
}

fn crc32c(b: &[u8]) -> u32 {
    // Castagnoli, bitwise: the test does not trust the crate's own encoder for this.
    let mut crc = !0u32;
    for &byte in b {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn a_replica_too_small_is_refused_and_changes_nothing() {
    let b = site_b(MIB);
    let (_d, _local, a) = primary_to(b.server.local_addr(), SECRET, 2 * MIB);
    match a.connect() {
        Err(ReplError::Refused { reason, .. }) => assert!(reason.contains("too small"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_untouched(&b);
}

#[test]
fn the_bandwidth_limit_holds_a_resync_back() {
    let b = site_b(MIB);
    let dir = tempfile::tempdir().expect("tempdir");
    let local = file_lun(dir.path(), "a.img", MIB);
    // Data, not zeroes: zero regions cross as holes.
    fill(&*local, 0x77);
    let a = PrimaryLun::create(
        local,
        meta_lun(dir.path(), "a.meta", MIB),
        Box::new(TcpPeer::new(b.server.local_addr(), SECRET.to_vec()).with_bandwidth_limit(MIB)),
        small_geometry(),
        LinkPolicy::Continue,
    )
    .expect("primary");
    let t = Instant::now();
    a.connect().expect("connect");
    a.resync().expect("sync");
    // 1 MiB at 1 MiB/s: the first second's window lets little through early.
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "1 MiB at 1 MiB/s took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_link_cut_on_the_wire_is_noticed_and_reconnect_resyncs_what_changed() {
    let b = site_b(2 * MIB);
    let addr = b.server.local_addr();
    let (_d, local, a) = primary_to(addr, SECRET, 2 * MIB);
    a.connect().expect("connect");
    a.resync().expect("sync");
    let initial = a.status().bytes_resynced;
    drop(b.server);
    a.write_at(&seq_block(1), 65536)
        .expect("write while the peer is gone");
    assert_eq!(a.status().link, LinkState::Disconnected);
    assert_eq!(a.status().dirty_regions, 1);
    let listener = TcpListener::bind(addr).expect("rebind the same port");
    let _server =
        SecondaryServer::start(listener, b.secondary.clone(), SECRET.to_vec()).expect("server");
    a.connect().expect("reconnect");
    a.resync().expect("resync");
    assert_eq!(a.status().bytes_resynced - initial, 65536);
    assert_eq!(read_all(&*local), read_all(&*b.replica));
}

#[test]
fn a_reconnect_backs_off_until_the_secondary_listens() {
    init_tracing();
    // Reserve a port, then free it: nothing listens there for a while.
    let addr = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let replica = file_lun(dir.path(), "b.img", MIB);
    let secondary = Arc::new(
        Secondary::create(
            replica.clone(),
            meta_lun(dir.path(), "b.meta", MIB),
            None,
            small_geometry(),
        )
        .expect("secondary"),
    );
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        let listener = TcpListener::bind(addr).expect("bind late");
        SecondaryServer::start(listener, secondary, SECRET.to_vec()).expect("server")
    });
    let adir = tempfile::tempdir().expect("tempdir");
    let local = file_lun(adir.path(), "a.img", MIB);
    fill(&*local, 0x44);
    let a = PrimaryLun::create(
        local.clone(),
        meta_lun(adir.path(), "a.meta", MIB),
        Box::new(TcpPeer::new(addr, SECRET.to_vec()).with_retries(8, Duration::from_millis(50))),
        small_geometry(),
        LinkPolicy::Continue,
    )
    .expect("primary");
    let t = Instant::now();
    a.connect().expect("connect once the secondary listens");
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "connected before anything listened"
    );
    a.resync().expect("sync");
    let _server = late.join().expect("server thread");
    assert_eq!(read_all(&*local), read_all(&*replica));
}
