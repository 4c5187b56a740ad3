//! Two-site replication as an operator runs it: site A and site B are network namespaces
//! joined by one veth pair, each with its own vapp registry and runtime directory, and
//! every step is a `vapp replica` command run inside its site. Writers reach site A's LUN
//! through `vapp export`, so their writes go through the primary daemon; the replica is
//! judged by what a user cares about: the bytes at site B, the status the CLI prints,
//! fsck of a datastore on it.
#![allow(clippy::unwrap_used)]

mod replica_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lun::Lun;
use rand::{Rng, SeedableRng, rngs::StdRng};
use replica_support::*;

/// Two sites with a LUN of `size` at each, the same secret, B a secondary and A its
/// primary (`extra` given to both creates), connected and in sync.
struct Pair {
    sites: Sites,
    a: String,
    b: String,
}

fn pair(size: u64, extra: &[&str]) -> Pair {
    let sites = Sites::new();
    let a = sites.a.lun("a.lun", size);
    let b = sites.b.lun("b.lun", size);
    sites.a.secret("secret", "replication secret of the pair");
    sites.b.secret("secret", "replication secret of the pair");
    sites.b.create(&b, "secondary", &sites.a, extra);
    sites.a.create(&a, "primary", &sites.b, extra);
    sites.a.wait_in_sync(&a, Duration::from_secs(60));
    Pair { sites, a, b }
}

fn random_blocks(seed: u64, span: u64) -> impl FnMut(u64) -> u64 + Send + 'static {
    let mut rng = StdRng::seed_from_u64(seed);
    move |_| rng.random_range(0..span / BLOCK) * BLOCK
}

/// `replica promote` at B, with --force only when B still believes a primary is there.
fn promote(site: &Site, lun: &str) {
    let out = site.vapp(&["replica", "promote", lun]);
    if !out.status.success() {
        site.ok(&["replica", "promote", lun, "--force"]);
    }
    site.wait(lun, "a running primary", Duration::from_secs(30), |s| {
        s["role"] == "primary" && s["running"] == true
    });
}

fn bytes_resynced(site: &Site, lun: &str) -> u64 {
    u(&site.status(lun)["bytes_resynced"])
}

#[test]
fn sync_primary_killed_mid_write_loses_no_acknowledged_write() {
    if !prerequisites() {
        return;
    }
    let p = pair(32 * MIB, &["--mode", "sync"]);
    let (a, b) = (&p.sites.a, &p.sites.b);
    let export = a.export(&p.a, &[]);
    let client: Arc<dyn Lun> = Arc::new(export.client());
    let writer = SeqWriter::start(client, 1, Duration::ZERO, 0, random_blocks(1, 16 * MIB));
    writer.wait_acked(300, Duration::from_secs(60));

    a.kill9_daemon(&p.a);
    writer.wait_error(Duration::from_secs(60));
    let (_, acked) = writer.stop();
    assert!(acked.len() >= 300);

    promote(b, &p.b);
    let image = read_blocks(&p.b, acked.iter().map(|(_, off)| *off));
    assert_acked_present(&image, &acked);
}

/// The blocks of the first `span` bytes of a stopped secondary's point in time.
fn point_in_time(
    site: &Site,
    lun: &str,
    span: u64,
) -> (std::collections::BTreeMap<u64, Option<u64>>, bool) {
    let list: serde_json::Value =
        serde_json::from_str(&site.ok(&["snapshot", "list", lun, "--json"])).unwrap();
    let gold = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "gold");
    if !gold {
        return (
            read_blocks(lun, (0..span / BLOCK).map(|i| i * BLOCK)),
            false,
        );
    }
    let export = site.export(&format!("{lun}@gold"), &["--read-only"]);
    let c = export.client();
    let mut out = std::collections::BTreeMap::new();
    let mut buf = vec![0u8; BLOCK as usize];
    for off in (0..span / BLOCK).map(|i| i * BLOCK) {
        c.read_at(&mut buf, off).unwrap();
        out.insert(off, block_seq(&buf, off));
    }
    (out, true)
}

#[test]
fn async_replica_is_always_a_write_order_consistent_point_in_time() {
    if !prerequisites() {
        return;
    }
    let p = pair(16 * MIB, &["--mode", "async", "--period", "1s"]);
    let (a, b) = (&p.sites.a, &p.sites.b);
    let export = a.export(&p.a, &[]);
    let client: Arc<dyn Lun> = Arc::new(export.client());
    // Few offsets, so blocks are overwritten and an out-of-order replica shows.
    let span = 2 * MIB;
    let writer = SeqWriter::start(
        client,
        1,
        Duration::from_millis(2),
        0,
        random_blocks(2, span),
    );
    writer.wait_acked(100, Duration::from_secs(30));
    a.wait(&p.a, "showing an RPO", Duration::from_secs(20), |s| {
        s["rpo_ms"].is_u64()
    });

    let mut last = 0;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(2500));
        // After a restart B resyncs from live regions (inconsistent meanwhile, its point
        // in time the pre-resync snapshot): sample once delta sets flow again.
        a.wait(&p.a, "connected", Duration::from_secs(30), |s| {
            s["link"] == "connected"
        });
        // B's site dies. Its point in time is what a promote would give: the gold copy
        // when a delta set was being applied, the LUN itself otherwise.
        b.kill9_daemon(&p.b);
        let sb = b.status(&p.b);
        assert_eq!(sb["running"], false, "{sb:#}");
        assert!(
            sb["point_in_time_ms"].is_u64(),
            "a stopped async secondary shows no point in time: {sb:#}"
        );
        let (image, gold) = point_in_time(b, &p.b, span);
        let issued = writer.issued.lock().unwrap().clone();
        let n = assert_write_order(&image, &issued);
        eprintln!(
            "B's point in time: writes 1..={n} of {} issued (read from {})",
            issued.len(),
            if gold { "the gold copy" } else { "the LUN" }
        );
        assert!(n >= last, "the replica went back from write {last} to {n}");
        last = n;
        b.ok(&["replica", "resume", &p.b]);
    }
    let (issued, _) = writer.stop();
    assert!(last > 0, "no delta set reached B");
    assert!(
        last < issued.len() as u64,
        "async B held every write the moment it was sampled"
    );
}

/// B dies while a delta set is being applied: restarted, it holds the point in time
/// before that set (its gold copy), not part of it. A set written in descending offsets
/// and applied in ascending ones would show as out of order if any of it stayed. The
/// second set is larger than B's default snapshot pool.
#[test]
fn async_secondary_killed_mid_delta_set_returns_to_its_gold_copy() {
    if !prerequisites() {
        return;
    }
    let p = pair(16 * MIB, &["--mode", "async", "--period", "1s"]);
    let (a, b) = (&p.sites.a, &p.sites.b);
    let export = a.export(&p.a, &[]);
    let c = export.client();
    let mut issued = Vec::new();
    let mut seq = 0;
    // B is killed once region `watch` of the set landed: early in a set its pool holds,
    // late in one it does not (the gold copy then needs more chunks than the pool has).
    for (regions, watch) in [(48u64, 0u64), (160, 120)] {
        let mut caught = false;
        for attempt in 0..6u64 {
            a.wait_in_sync(&p.a, Duration::from_secs(30));
            let pid = b.daemon_pid(&p.b);
            let block = (attempt % 16) * BLOCK;
            for r in (0..regions).rev() {
                seq += 1;
                let off = r * REGION + block;
                c.write_at(&seq_block(off, seq), off).unwrap();
                issued.push((seq, off));
            }
            // Regions are applied in ascending order; kill B the moment `watch` lands.
            let at = watch * REGION + block;
            let want = seq - watch;
            let deadline = Instant::now() + Duration::from_secs(15);
            while read_blocks(&p.b, [at])[&at] != Some(want) {
                assert!(Instant::now() < deadline, "the delta set never reached B");
            }
            kill9(pid);
            let list: serde_json::Value =
                serde_json::from_str(&b.ok(&["snapshot", "list", &p.b, "--json"])).unwrap();
            caught = list["sessions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == "gold");
            // A stays away while B restarts, so what B holds is what it returned to.
            a.ok(&["replica", "fracture", &p.a]);
            b.ok(&["replica", "resume", &p.b]);
            b.wait(&p.b, "running again", Duration::from_secs(30), |s| {
                s["running"] == true
            });
            let image = read_blocks(&p.b, issued.iter().map(|(_, off)| *off));
            let n = assert_write_order(&image, &issued);
            eprintln!(
                "set of {regions} regions, B killed {} it: B holds writes 1..={n} of {seq}; sessions {}",
                if caught { "mid-way through" } else { "after" },
                list["sessions"]
            );
            a.ok(&["replica", "resume", &p.a]);
            if caught {
                break;
            }
        }
        assert!(
            caught,
            "B was never killed while applying a set of {regions} regions"
        );
    }
    a.wait_in_sync(&p.a, Duration::from_secs(30));
    drop(c);
    drop(export);
    b.wait(&p.b, "connected", Duration::from_secs(10), |s| {
        s["link"] == "connected"
    });
    a.ok(&["replica", "fracture", &p.a]);
    assert_same_bytes(&p.a, &p.b);
}

/// The primary dies mid-way through a resync: B, inconsistent, is promoted back to the
/// point in time it held before the resync began (its pre-resync snapshot), first with a
/// resync its default snapshot pool holds, then with one it does not.
#[test]
fn primary_killed_mid_resync_leaves_b_promotable_at_its_last_point_in_time() {
    if !prerequisites() {
        return;
    }
    // A 64 MiB LUN gets a 13 MiB pool (about 200 chunks) beside its replica.
    for (regions, watch) in [(160u64, 8u64), (600, 400)] {
        let p = pair(64 * MIB, &[]);
        let (a, b) = (&p.sites.a, &p.sites.b);
        let before: Vec<u64> = (0..8).map(|i| i * 2 * MIB + BLOCK).collect();
        let s0 = write_through_export(a, &p.a, &before, 1);
        a.wait_in_sync(&p.a, Duration::from_secs(30));
        a.ok(&["replica", "fracture", &p.a]);
        let apart: Vec<u64> = (0..regions).map(|r| r * REGION).collect();
        let written = write_through_export(a, &p.a, &apart, 100);
        let pid = a.daemon_pid(&p.a);
        a.ok(&["replica", "resume", &p.a]);
        // Resyncs go in ascending region order: kill A once region `watch` reached B.
        let at = watch * REGION;
        let want = written[watch as usize].0;
        let deadline = Instant::now() + Duration::from_secs(15);
        while read_blocks(&p.b, [at])[&at] != Some(want) {
            assert!(Instant::now() < deadline, "the resync never reached B");
        }
        kill9(pid);
        let s = b.status(&p.b);
        assert_eq!(
            s["inconsistent"], true,
            "the resync of {regions} regions ended before A died: {s:#}"
        );
        promote(b, &p.b);
        let image = read_blocks(&p.b, before.iter().chain(&apart).copied());
        assert_acked_present(&image, &s0);
        let got: Vec<u64> = apart
            .iter()
            .filter(|o| image[o].is_some())
            .copied()
            .collect();
        assert!(
            got.is_empty(),
            "after a promote B holds {} of the {regions} regions of the unfinished resync",
            got.len()
        );
        eprintln!("a resync of {regions} regions cut short: B promoted at its pre-resync point");
    }
}

/// The primary dies mid-way through a resync; restarted, it goes on from where it was,
/// not from the start, and the sites end equal.
#[test]
fn a_resync_cut_short_by_a_primary_crash_resumes_where_it_was() {
    if !prerequisites() {
        return;
    }
    let p = pair(32 * MIB, &[]);
    let a = &p.sites.a;
    a.ok(&["replica", "fracture", &p.a]);
    let regions = 320u64;
    let apart: Vec<u64> = (0..regions).map(|r| r * REGION).collect();
    let written = write_through_export(a, &p.a, &apart, 100);
    let pid = a.daemon_pid(&p.a);
    a.ok(&["replica", "resume", &p.a]);
    let watch = 240usize;
    let at = apart[watch];
    let deadline = Instant::now() + Duration::from_secs(15);
    while read_blocks(&p.b, [at])[&at] != Some(written[watch].0) {
        assert!(Instant::now() < deadline, "the resync never reached B");
    }
    kill9(pid);
    a.ok(&["replica", "resume", &p.a]);
    let s = a.wait_in_sync(&p.a, Duration::from_secs(60));
    let resynced = u(&s["bytes_resynced"]);
    eprintln!(
        "a resync of {regions} regions killed after {watch}: {resynced} bytes copied after the restart"
    );
    assert!(
        resynced < regions * REGION / 2,
        "the restarted resync copied {resynced} bytes of {} ({regions} regions, {watch} done before the crash)",
        regions * REGION
    );
    assert_same_bytes(&p.a, &p.b);
}

/// Site B's daemon dies under writes: the primary goes on (policy continue) without a
/// writer waiting long, and once B is resumed it copies only what B missed.
#[test]
fn secondary_crash_under_writes_and_resume_resyncs_only_what_changed() {
    if !prerequisites() {
        return;
    }
    let p = pair(32 * MIB, &[]);
    let (a, b) = (&p.sites.a, &p.sites.b);
    let export = a.export(&p.a, &[]);
    let client: Arc<dyn Lun> = Arc::new(export.client());
    let writer = SeqWriter::start(
        client,
        1,
        Duration::from_millis(2),
        16,
        random_blocks(9, 16 * MIB),
    );
    writer.wait_acked(100, Duration::from_secs(30));
    let resynced_before = bytes_resynced(a, &p.a);
    let cut_at = writer.flushed.load(std::sync::atomic::Ordering::SeqCst);
    b.kill9_daemon(&p.b);
    a.wait(&p.a, "disconnected", Duration::from_secs(30), |s| {
        s["link"] == "disconnected"
    });
    let (went_on, stall) = writes_for(&writer, 300, Duration::from_secs(20));
    let (issued, acked) = writer.stop();
    b.ok(&["replica", "resume", &p.b]);
    let s = a.wait_in_sync(&p.a, Duration::from_secs(60));
    let resynced = u(&s["bytes_resynced"]) - resynced_before;
    let bound = 4 * regions_of(&issued[cut_at..]) * REGION + REGION;
    assert!(
        resynced <= bound,
        "B's return copied {resynced} bytes for {} regions written while it was down (bound {bound})",
        regions_of(&issued[cut_at..])
    );
    let image = read_blocks(&p.b, acked.iter().map(|(_, off)| *off));
    assert_acked_present(&image, &acked);
    assert_same_bytes(&p.a, &p.b);
    assert!(
        went_on >= 300 && stall < Duration::from_secs(2),
        "with B down only {went_on} writes were acknowledged in 20 s, one waiting {stall:?}"
    );
}

/// The link is cut while writes go on: the primary keeps writing (policy continue) and
/// counts what B misses; once the link is back it copies only that.
#[test]
fn link_cut_continues_writing_and_resyncs_only_what_changed() {
    if !prerequisites() {
        return;
    }
    let p = pair(32 * MIB, &["--on-link-loss", "continue"]);
    let (a, b) = (&p.sites.a, &p.sites.b);
    let export = a.export(&p.a, &[]);
    let client: Arc<dyn Lun> = Arc::new(export.client());
    let writer = SeqWriter::start(
        client,
        1,
        Duration::from_millis(3),
        16,
        random_blocks(3, 16 * MIB),
    );
    writer.wait_acked(50, Duration::from_secs(30));
    let resynced_before = bytes_resynced(a, &p.a);

    // What the last flush before the cut covered is durable at B; the rest may not be.
    let cut_at = writer.flushed.load(std::sync::atomic::Ordering::SeqCst);
    p.sites.cut();
    let s1 = a.wait(&p.a, "disconnected", Duration::from_secs(40), |s| {
        s["link"] == "disconnected"
    });
    let oos1 = u(&s1["out_of_sync_bytes"]);
    // Writes go on while apart. How they went is judged after the resync, so that a
    // stall does not hide what the resync does.
    let (went_on, stall) = writes_for(&writer, 200, Duration::from_secs(30));
    a.wait(&p.a, "further out of sync", Duration::from_secs(30), |s| {
        u(&s["out_of_sync_bytes"]) > oos1
    });
    assert!(writer.error.lock().unwrap().is_none());
    let (issued, _) = writer.stop();
    let apart = &issued[cut_at..];

    p.sites.restore();
    let s = a.wait_in_sync(&p.a, Duration::from_secs(60));
    let resynced = u(&s["bytes_resynced"]) - resynced_before;
    let bound = 4 * regions_of(apart) * REGION + REGION;
    assert!(
        resynced > 0 && resynced <= bound,
        "resync copied {resynced} bytes for {} regions written apart (bound {bound})",
        regions_of(apart)
    );
    b.wait(&p.b, "connected", Duration::from_secs(10), |s| {
        s["link"] == "connected"
    });
    assert_same_bytes(&p.a, &p.b);
    assert!(
        went_on >= 200 && stall < Duration::from_secs(2),
        "with the link down under policy continue only {went_on} writes were acknowledged \
         in 30 s, one waiting {stall:?}"
    );
}

/// Waits up to `limit` for `n` more acknowledged writes; returns how many came and the
/// longest time without one.
fn writes_for(writer: &SeqWriter, n: usize, limit: Duration) -> (usize, Duration) {
    let start = Instant::now();
    let first = writer.acked_count();
    let (mut seen, mut since, mut stall) = (first, Instant::now(), Duration::ZERO);
    while seen < first + n && start.elapsed() < limit && writer.error.lock().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(10));
        let now = writer.acked_count();
        if now != seen {
            seen = now;
            since = Instant::now();
        }
        stall = stall.max(since.elapsed());
    }
    (seen - first, stall)
}

/// In asynchronous mode writes are acknowledged locally: a lost link makes the RPO grow;
/// once the link is back the replica catches up. A delta set being shipped when the link
/// goes silent holds writers until the link timeout (6 s) declares it dead, once: the
/// shipping step runs under the engine's lock (a known limit), never longer.
#[test]
fn async_writes_wait_at_most_the_link_timeout_for_a_lost_link_and_the_rpo_shows_the_lag() {
    if !prerequisites() {
        return;
    }
    let p = pair(16 * MIB, &["--mode", "async", "--period", "1s"]);
    let a = &p.sites.a;
    let export = a.export(&p.a, &[]);
    let client: Arc<dyn Lun> = Arc::new(export.client());
    let writer = SeqWriter::start(
        client,
        1,
        Duration::from_millis(3),
        0,
        random_blocks(8, 8 * MIB),
    );
    writer.wait_acked(100, Duration::from_secs(30));
    p.sites.cut();
    let (went_on, stall) = writes_for(&writer, 100_000, Duration::from_secs(15));
    let s = a.status(&p.a);
    let rpo = s["rpo_ms"].as_u64().unwrap_or(0);
    let (issued, _) = writer.stop();
    p.sites.restore();
    a.wait_in_sync(&p.a, Duration::from_secs(60));
    assert_same_bytes(&p.a, &p.b);
    assert!(
        rpo >= 5_000,
        "15 s after the link was cut the RPO shows {rpo} ms: {s:#}"
    );
    assert!(
        stall < Duration::from_secs(8),
        "an asynchronous write waited {stall:?} for the lost link ({went_on} writes in 15 s, {} in all)",
        issued.len()
    );
}

/// With policy block a write is never acknowledged at one site only: writes fail while
/// the link is down and succeed again once it is back.
#[test]
fn link_cut_with_policy_block_fails_writes_until_the_link_is_back() {
    if !prerequisites() {
        return;
    }
    let p = pair(16 * MIB, &["--on-link-loss", "block"]);
    let a = &p.sites.a;
    let export = a.export(&p.a, &[]);
    let client: Arc<dyn Lun> = Arc::new(export.client());
    let writer = SeqWriter::start(
        client.clone(),
        1,
        Duration::from_millis(3),
        16,
        random_blocks(4, 8 * MIB),
    );
    writer.wait_acked(50, Duration::from_secs(30));

    p.sites.cut();
    writer.wait_error(Duration::from_secs(60));
    let (_, acked) = writer.stop();
    a.wait(&p.a, "disconnected", Duration::from_secs(30), |s| {
        s["link"] == "disconnected"
    });
    assert!(
        client.write_at(&seq_block(0, 1_000_000), 0).is_err(),
        "a write was acknowledged while the link is down under policy block"
    );

    p.sites.restore();
    a.wait_in_sync(&p.a, Duration::from_secs(60));
    client
        .write_at(&seq_block(BLOCK, 1_000_001), BLOCK)
        .unwrap();
    client.flush().unwrap();
    let image = read_blocks(&p.b, acked.iter().map(|(_, off)| *off));
    assert_acked_present(&image, &acked);
    assert_same_bytes(&p.a, &p.b);
}

/// A primary killed under random writes over a LUN far larger than its activity log
/// comes back with `replica resume` and copies at most the activity log, not the LUN.
#[test]
fn primary_crash_and_resume_resyncs_at_most_the_activity_log() {
    if !prerequisites() {
        return;
    }
    let p = pair(512 * MIB, &[]);
    let a = &p.sites.a;
    let mut export = a.export(&p.a, &[]);
    let client: Arc<dyn Lun> = Arc::new(export.client());
    let writer = SeqWriter::start(client, 1, Duration::ZERO, 64, random_blocks(5, 512 * MIB));
    writer.wait_acked(500, Duration::from_secs(60));
    a.kill9_daemon(&p.a);
    writer.wait_error(Duration::from_secs(60));
    let (_, acked) = writer.stop();
    export.kill();
    let s = a.status(&p.a);
    assert_eq!(
        (&s["running"], &s["pid"]),
        (&false.into(), &serde_json::Value::Null),
        "{s:#}"
    );

    a.ok(&["replica", "resume", &p.a]);
    let s = a.wait_in_sync(&p.a, Duration::from_secs(120));
    let resynced = u(&s["bytes_resynced"]);
    eprintln!(
        "restart after kill -9 under {} random writes: {resynced} bytes resynced",
        acked.len()
    );
    assert!(
        resynced <= 64 * MIB,
        "a restart after a crash copied {resynced} bytes, more than the 64 MiB activity log"
    );
    let image = read_blocks(&p.b, acked.iter().map(|(_, off)| *off));
    assert_acked_present(&image, &acked);
    assert_same_bytes(&p.a, &p.b);
}

/// A fracture splits the link at both sites: the secondary no longer shows a primary
/// connected, so an operator at B sees the split, and a promote needs no --force.
#[test]
fn fracture_splits_the_link_at_both_sites() {
    if !prerequisites() {
        return;
    }
    let p = pair(4 * MIB, &[]);
    let (a, b) = (&p.sites.a, &p.sites.b);
    b.wait(&p.b, "connected", Duration::from_secs(10), |s| {
        s["link"] == "connected"
    });
    a.ok(&["replica", "fracture", &p.a]);
    b.wait(
        &p.b,
        "waiting after the fracture",
        Duration::from_secs(15),
        |s| s["link"] == "waiting",
    );
    b.ok(&["replica", "promote", &p.b]);
}

/// Bytes that changed at B behind the engine's back (bit rot, a stray dd) are found by
/// `replica verify` at A, counted, and copied again.
#[test]
fn verify_finds_regions_changed_at_b_and_resyncs_them() {
    if !prerequisites() {
        return;
    }
    let p = pair(8 * MIB, &[]);
    let a = &p.sites.a;
    let blocks: Vec<u64> = (0..32).map(|i| i * 3 * BLOCK).collect();
    write_through_export(a, &p.a, &blocks, 1);
    a.wait_in_sync(&p.a, Duration::from_secs(30));
    assert_same_bytes(&p.a, &p.b);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&p.b).unwrap();
        for off in [100, 3 * MIB + 7, 5 * MIB] {
            f.write_all_at(b"rot", off).unwrap();
        }
    }
    let out = a.ok(&["replica", "verify", &p.a]);
    assert!(
        out.contains("3 of 128 regions differ"),
        "verify did not count the 3 changed regions: {out}"
    );
    a.wait_in_sync(&p.a, Duration::from_secs(30));
    assert_same_bytes(&p.a, &p.b);
    let out = a.ok(&["replica", "verify", &p.a]);
    assert!(out.contains("0 of 128 regions differ"), "{out}");
}

/// The initial copy of a thin LUN sends its holes as holes: the replica stays as thin as
/// the original, as a 1 TiB thin LUN must not cost 1 TiB at the other site.
#[test]
fn a_thin_lun_stays_thin_at_the_replica() {
    if !prerequisites() {
        return;
    }
    let p = pair(256 * MIB, &[]);
    write_through_export(&p.sites.a, &p.a, &[0, 100 * MIB], 1);
    p.sites.a.wait_in_sync(&p.a, Duration::from_secs(30));
    let allocated = |path: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    };
    // What a site keeps for the LUN: the LUN, its replication metadata and, at B, the
    // snapshot pool that protects the replica.
    let site_total = |lun: &str| {
        [
            lun.to_string(),
            format!("{lun}.repl"),
            format!("{lun}.snap"),
        ]
        .iter()
        .filter(|f| std::path::Path::new(f).exists())
        .map(|f| allocated(f))
        .sum::<u64>()
    };
    eprintln!(
        "a 256 MiB thin LUN takes {} bytes at A and {} at B ({} in the LUN)",
        site_total(&p.a),
        site_total(&p.b),
        allocated(&p.b)
    );
    assert!(
        allocated(&p.b) <= allocated(&p.a) + 4 * MIB,
        "a 256 MiB LUN with {} bytes allocated became {} bytes allocated at B",
        allocated(&p.a),
        allocated(&p.b)
    );
    assert!(
        site_total(&p.b) <= site_total(&p.a) + 8 * MIB,
        "a 256 MiB thin LUN takes {} bytes at A and {} at B with its pool",
        site_total(&p.a),
        site_total(&p.b)
    );
    assert_same_bytes(&p.a, &p.b);
}

/// Writes the blocks `offsets` through a fresh export of `lun` at `site`.
fn write_through_export(
    site: &Site,
    lun: &str,
    offsets: &[u64],
    first_seq: u64,
) -> Vec<(u64, u64)> {
    let export = site.export(lun, &[]);
    let c = export.client();
    let mut done = Vec::new();
    for (i, off) in offsets.iter().enumerate() {
        let seq = first_seq + i as u64;
        c.write_at(&seq_block(*off, seq), *off).unwrap();
        done.push((seq, *off));
    }
    c.flush().unwrap();
    done
}

#[test]
fn split_brain_is_refused_until_one_side_discards_its_writes() {
    if !prerequisites() {
        return;
    }
    let p = pair(32 * MIB, &[]);
    let (a, b) = (&p.sites.a, &p.sites.b);
    a.ok(&["replica", "fracture", &p.a]);
    a.wait(&p.a, "fractured", Duration::from_secs(30), |s| {
        s["link"] == "fractured"
    });
    b.ok(&["replica", "promote", &p.b, "--force"]);
    b.wait(&p.b, "a running primary", Duration::from_secs(30), |s| {
        s["role"] == "primary" && s["running"] == true
    });
    // Both sides write while apart, in regions of their own and in one they share.
    let at_a: Vec<u64> = (0..16).map(|i| i * 5 * REGION).chain([20 * MIB]).collect();
    let at_b: Vec<u64> = (0..8)
        .map(|i| 2 * MIB + i * 3 * REGION)
        .chain([20 * MIB + BLOCK])
        .collect();
    let written_a = write_through_export(a, &p.a, &at_a, 1);
    let written_b = write_through_export(b, &p.b, &at_b, 1000);

    // B goes back to being a secondary with its own writes; A reconnecting must refuse.
    b.ok(&["replica", "demote", &p.b]);
    b.wait(&p.b, "a running secondary", Duration::from_secs(30), |s| {
        s["role"] == "secondary" && s["running"] == true
    });
    let resynced_before = bytes_resynced(a, &p.a);
    let b_before = file_sha(&p.b);
    let _ = a.vapp(&["replica", "resume", &p.a]);
    let s = a.wait(
        &p.a,
        "reporting split brain",
        Duration::from_secs(40),
        |s| {
            s["last_error"]
                .as_str()
                .is_some_and(|e| e.to_lowercase().contains("split brain"))
        },
    );
    assert_ne!(s["link"], "connected", "{s:#}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(file_sha(&p.b), b_before, "a refused reconnect wrote to B");

    b.ok(&["replica", "resolve", &p.b, "--discard-local"]);
    a.ok(&["replica", "resume", &p.a]);
    let s = a.wait_in_sync(&p.a, Duration::from_secs(60));
    assert_same_bytes(&p.a, &p.b);
    let mut both = written_a.clone();
    both.extend(&written_b);
    let resynced = u(&s["bytes_resynced"]) - resynced_before;
    let bound = 4 * regions_of(&both) * REGION + REGION;
    assert!(
        resynced <= bound,
        "converging copied {resynced} bytes for {} regions written apart (bound {bound})",
        regions_of(&both)
    );
    let image = read_blocks(&p.b, at_a.iter().copied());
    assert_acked_present(&image, &written_a);
}

/// Split brain resolved the other way: the old primary is demoted losing what it wrote
/// while apart; the new primary copies its own changes and those regions over, and says
/// how many regions of the peer it overwrote.
#[test]
fn split_brain_resolved_by_demoting_the_old_primary_with_discard_local() {
    if !prerequisites() {
        return;
    }
    let p = pair(32 * MIB, &[]);
    let (a, b) = (&p.sites.a, &p.sites.b);
    a.ok(&["replica", "fracture", &p.a]);
    b.ok(&["replica", "promote", &p.b, "--force"]);
    b.wait(&p.b, "a running primary", Duration::from_secs(30), |s| {
        s["role"] == "primary" && s["running"] == true
    });
    let at_a: Vec<u64> = (0..6).map(|i| i * 5 * REGION).collect();
    let at_b: Vec<u64> = (0..4).map(|i| 8 * MIB + i * 3 * REGION).collect();
    write_through_export(a, &p.a, &at_a, 1);
    let written_b = write_through_export(b, &p.b, &at_b, 1000);

    a.ok(&["replica", "demote", &p.a, "--discard-local"]);
    let s = b.wait_in_sync(&p.b, Duration::from_secs(60));
    assert_same_bytes(&p.a, &p.b);
    let image = read_blocks(&p.a, at_a.iter().chain(&at_b).copied());
    assert_acked_present(&image, &written_b);
    assert!(
        at_a.iter().all(|o| image[o].is_none()),
        "A kept writes it was told to discard"
    );
    assert_eq!(
        u(&s["peer_regions_discarded"]),
        at_a.len() as u64,
        "B does not say it overwrote A's regions: {s:#}"
    );
    let bound = 4 * (at_a.len() + at_b.len()) as u64 * REGION + REGION;
    assert!(u(&s["bytes_resynced"]) <= bound, "{s:#}");
}

#[test]
fn failback_sends_the_old_primary_only_what_changed_at_the_new_one() {
    if !prerequisites() {
        return;
    }
    let p = pair(32 * MIB, &[]);
    let (a, b) = (&p.sites.a, &p.sites.b);
    let before: Vec<u64> = (0..64).map(|i| i * 97 * BLOCK).collect();
    write_through_export(a, &p.a, &before, 1);
    a.wait_in_sync(&p.a, Duration::from_secs(30));

    a.ok(&["replica", "fracture", &p.a]);
    a.wait(&p.a, "fractured", Duration::from_secs(30), |s| {
        s["link"] == "fractured"
    });
    promote(b, &p.b);
    let at_b: Vec<u64> = (0..40).map(|i| 20 * MIB + i * BLOCK * 7).collect();
    let written_b = write_through_export(b, &p.b, &at_b, 500);

    a.ok(&["replica", "demote", &p.a]);
    a.wait(&p.a, "a running secondary", Duration::from_secs(30), |s| {
        s["role"] == "secondary" && s["running"] == true
    });
    let s = b.wait_in_sync(&p.b, Duration::from_secs(60));
    let resynced = u(&s["bytes_resynced"]);
    let bound = 4 * regions_of(&written_b) * REGION + REGION;
    assert!(
        resynced > 0 && resynced <= bound,
        "failback copied {resynced} bytes for {} regions changed at B (bound {bound})",
        regions_of(&written_b)
    );
    assert_eq!(s["peer_regions_discarded"], 0, "{s:#}");
    assert_same_bytes(&p.a, &p.b);
}

/// Site A dies under writes; B takes over and is written; A comes back, is demoted and
/// receives what changed at B (and its own hot extents, which may hold writes B never
/// acknowledged), so both sites are equal again without a split brain.
#[test]
fn failback_after_the_primary_died_converges_without_split_brain() {
    if !prerequisites() {
        return;
    }
    let p = pair(64 * MIB, &[]);
    let (a, b) = (&p.sites.a, &p.sites.b);
    let export = a.export(&p.a, &[]);
    let client: Arc<dyn Lun> = Arc::new(export.client());
    let writer = SeqWriter::start(client, 1, Duration::ZERO, 0, random_blocks(6, 64 * MIB));
    writer.wait_acked(200, Duration::from_secs(60));
    a.kill9_daemon(&p.a);
    writer.wait_error(Duration::from_secs(60));
    writer.stop();
    drop(export);

    promote(b, &p.b);
    let at_b: Vec<u64> = (0..40).map(|i| 20 * MIB + i * BLOCK * 7).collect();
    let written_b = write_through_export(b, &p.b, &at_b, 1_000_000);

    a.ok(&["replica", "resume", &p.a]);
    a.ok(&["replica", "demote", &p.a]);
    let s = b.wait(
        &p.b,
        "in sync with the old primary",
        Duration::from_secs(60),
        |s| {
            (s["link"] == "connected" && s["out_of_sync_bytes"] == 0)
                || s["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("split brain"))
        },
    );
    assert_eq!(
        s["last_error"],
        serde_json::Value::Null,
        "failback refused: {s:#}"
    );
    let resynced = u(&s["bytes_resynced"]);
    assert!(
        resynced <= 64 * MIB + 4 * regions_of(&written_b) * REGION,
        "failback copied {resynced} bytes"
    );
    assert_same_bytes(&p.a, &p.b);
}

/// Two LUNs in one consistency group, written by one application whose writes depend on
/// each other (it alternates between them). Only the second LUN's link is lost; the group
/// splits both before another write is acknowledged, so when site A then dies, B's two
/// LUNs hold one point in time: no write to either without every earlier write to both.
#[test]
fn a_consistency_group_keeps_dependent_writes_in_order_across_its_luns() {
    if prerequisites() {
        group_keeps_dependent_writes_in_order(|sites| sites.cut_port(PORT + 1));
    }
}

/// As above, with the second link lost the way an MTU black hole loses it: connections
/// still open (small packets pass) but no replication frame gets through.
#[test]
fn a_consistency_group_keeps_dependent_writes_in_order_through_an_mtu_black_hole() {
    if prerequisites() {
        group_keeps_dependent_writes_in_order(|sites| sites.cut_port_large(PORT + 1));
    }
}

fn group_keeps_dependent_writes_in_order(cut: impl Fn(&Sites)) {
    const KEY: u64 = 1 << 40;
    let sites = Sites::new();
    let (a, b) = (&sites.a, &sites.b);
    a.secret("secret", "group secret");
    b.secret("secret", "group secret");
    let luns_a = [a.lun("a1.lun", 8 * MIB), a.lun("a2.lun", 8 * MIB)];
    let luns_b = [b.lun("b1.lun", 8 * MIB), b.lun("b2.lun", 8 * MIB)];
    let group = ["--group", "db"];
    for (i, port) in [PORT, PORT + 1].into_iter().enumerate() {
        b.create_on(&luns_b[i], "secondary", a, port, &group);
    }
    for (i, port) in [PORT, PORT + 1].into_iter().enumerate() {
        a.create_on(&luns_a[i], "primary", b, port, &group);
    }
    for lun in &luns_a {
        a.wait_in_sync(lun, Duration::from_secs(60));
    }
    let exports = [a.export(&luns_a[0], &[]), a.export(&luns_a[1], &[])];
    let clients = [exports[0].client(), exports[1].client()];
    let issued = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (log, halt) = (issued.clone(), stop.clone());
    let writer = std::thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(7);
        let mut seq = 0u64;
        while !halt.load(std::sync::atomic::Ordering::SeqCst) {
            seq += 1;
            let m = (seq % 2) as usize;
            let off = rng.random_range(0..(4 * MIB / BLOCK)) * BLOCK;
            let key = m as u64 * KEY + off;
            log.lock().unwrap().push((seq, key));
            if clients[m].write_at(&seq_block(key, seq), off).is_err() {
                return seq;
            }
        }
        seq
    });
    let count = || issued.lock().unwrap().len();
    let wait_for = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while count() < n {
            assert!(
                !writer.is_finished(),
                "the writer stopped after {} writes",
                count()
            );
            assert!(Instant::now() < deadline, "only {} writes in 60 s", count());
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(200);
    cut(&sites);
    let s = a.wait(&luns_a[1], "cut off", Duration::from_secs(30), |s| {
        s["link"] != "connected"
    });
    wait_for(count() + 200);
    let s1 = a.status(&luns_a[0]);
    assert_ne!(
        s1["link"], "connected",
        "the second member lost its link ({}) and the first still replicates",
        s["link"]
    );
    a.kill9_daemon(&luns_a[0]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    drop(exports);

    promote(b, &luns_b[0]);
    b.wait(
        &luns_b[1],
        "promoted with its group",
        Duration::from_secs(30),
        |s| s["role"] == "primary",
    );
    let issued = issued.lock().unwrap().clone();
    let mut image = std::collections::BTreeMap::new();
    let mut buf = vec![0u8; BLOCK as usize];
    let files = [
        std::fs::File::open(&luns_b[0]).unwrap(),
        std::fs::File::open(&luns_b[1]).unwrap(),
    ];
    for (_, key) in &issued {
        use std::os::unix::fs::FileExt;
        let (m, off) = ((key / KEY) as usize, key % KEY);
        files[m].read_exact_at(&mut buf, off).unwrap();
        image.insert(*key, block_seq(&buf, *key));
    }
    let n = assert_write_order(&image, &issued);
    assert!(n >= 200, "B holds only writes 1..={n}");
}

fn read_until_closed(mut s: TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// `replica create LUN --role primary` towards `other` on `port`, which the peer refuses:
/// either create fails saying why or the daemon's status does (with one of `words`), and
/// the link never comes up. Returns whether the replica was created.
fn create_or_refusal(site: &Site, lun: &str, other: &Site, port: u16, words: &[&str]) -> bool {
    let out = site.vapp(&[
        "replica",
        "create",
        lun,
        "--role",
        "primary",
        "--secret-file",
        &site.p("secret"),
        "--listen",
        &site.addr(port),
        "--peer",
        &other.addr(port),
    ]);
    let says = |text: &str| {
        let text = text.to_lowercase();
        words.iter().any(|w| text.contains(w))
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            says(&err),
            "create refused without saying why ({words:?}): {err}"
        );
        return false;
    }
    let s = site.wait(lun, "refused by its peer", Duration::from_secs(30), |s| {
        s["last_error"].is_string()
    });
    assert!(
        says(s["last_error"].as_str().unwrap()),
        "the error does not say why ({words:?}): {s:#}"
    );
    assert_ne!(s["link"], "connected", "{s:#}");
    true
}

#[test]
fn bad_peers_are_turned_away_and_change_nothing() {
    if !prerequisites() {
        return;
    }
    let sites = Sites::new();
    let (a, b) = (&sites.a, &sites.b);
    let lun_b = b.lun("b.lun", 16 * MIB);
    fill_pattern(&lun_b, 1);
    let lun_a = a.lun("a.lun", 16 * MIB);
    fill_pattern(&lun_a, 2);
    b.secret("secret", "the right secret");
    a.secret("secret", "a wrong secret");
    b.create(&lun_b, "secondary", a, &[]);
    let b_sha = file_sha(&lun_b);
    let b_pid = b.daemon_pid(&lun_b);

    // A primary that does not know the secret is refused before it sends anything
    // (create may already say so, or the daemon's status does).
    let created = create_or_refusal(a, &lun_a, b, PORT, &["auth", "secret"]);
    assert_eq!(
        file_sha(&lun_b),
        b_sha,
        "a peer with the wrong secret wrote to B"
    );
    if created {
        a.ok(&["replica", "delete", &lun_a]);
    }

    // Garbage, then a frame header promising more payload than ever comes.
    let target = b.addr(PORT);
    let closed = Sites::in_site(a, move || {
        let mut results = Vec::new();
        let mut s = TcpStream::connect(&target).unwrap();
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let _ = s.write_all(&garbage);
        results.push(read_until_closed(s));
        let mut s = TcpStream::connect(&target).unwrap();
        let mut frame = Vec::new();
        frame.extend_from_slice(b"VRPL");
        frame.extend_from_slice(&1u16.to_le_bytes());
        frame.extend_from_slice(&12u16.to_le_bytes());
        frame.extend_from_slice(&1u64.to_le_bytes());
        frame.extend_from_slice(&(4096u32 + 16).to_le_bytes());
        frame.extend_from_slice(&0u32.to_le_bytes());
        frame.extend_from_slice(&[0xab; 100]);
        let _ = s.write_all(&frame);
        let _ = s.shutdown(std::net::Shutdown::Write);
        results.push(read_until_closed(s));
        results
    });
    assert_eq!(closed, [true, true], "B kept a bad peer's connection open");
    let s = b.status(&lun_b);
    assert_eq!(s["running"], true, "{s:#}");
    assert_eq!(s["pid"], b_pid, "the secondary daemon restarted: {s:#}");
    assert_eq!(s["link"], "waiting", "{s:#}");
    assert_eq!(file_sha(&lun_b), b_sha, "a bad peer's bytes reached B");

    // A replica smaller than the primary's LUN is refused with a clear error.
    let small = b.lun("small.lun", 8 * MIB);
    fill_pattern(&small, 3);
    let small_sha = file_sha(&small);
    b.ok(&[
        "replica",
        "create",
        &small,
        "--role",
        "secondary",
        "--secret-file",
        &b.p("secret"),
        "--listen",
        &b.addr(PORT + 1),
        "--peer",
        &a.addr(PORT + 1),
    ]);
    a.secret("secret", "the right secret");
    let big = a.lun("big.lun", 16 * MIB);
    fill_pattern(&big, 4);
    create_or_refusal(a, &big, b, PORT + 1, &["size", "small", "bytes"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        file_sha(&small),
        small_sha,
        "a too-small replica was written"
    );
}

/// Runs `vapp -d URL put LOCAL PATH` as host `host` of the datastore.
fn put(site: &Site, url: &str, host: &str, local: &str, path: &str) -> std::process::Child {
    site.command()
        .env("VAPP_HOST_NAME", host)
        .env("VAPP_HOST_UUID", uuid_of(host))
        .args(["-d", url, "put", local, path])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn uuid_of(host: &str) -> String {
    let mut b = [0u8; 16];
    for (i, c) in host.bytes().enumerate() {
        b[i % 16] = b[i % 16].wrapping_mul(31).wrapping_add(c);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[test]
fn datastore_written_by_two_hosts_survives_failover_fsck_clean() {
    if prerequisites() {
        datastore_failover(&[]);
    }
}

/// As above in asynchronous mode: B's point in time is older, but still a crash-consistent
/// datastore, since delta sets keep the write order.
#[test]
fn async_datastore_written_by_two_hosts_survives_failover_fsck_clean() {
    if prerequisites() {
        datastore_failover(&["--mode", "async", "--period", "1s"]);
    }
}

fn datastore_failover(mode: &[&str]) {
    let p = pair(256 * MIB, mode);
    let (a, b) = (&p.sites.a, &p.sites.b);
    a.ok(&[
        "datastore",
        "format",
        &p.a,
        "--name",
        "replicated",
        "--block-size",
        "64K",
        "--io-timeout",
        "1s",
        "--lock-protocol",
        "paxos",
    ]);
    let export = a.export(&p.a, &[]);
    let small: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let local = a.p("small.bin");
    std::fs::write(&local, &small).unwrap();
    let big = a.p("big.bin");
    std::fs::write(&big, vec![0x5au8; 48 << 20]).unwrap();

    // Two hosts put files at once; each put returns only once its file is in place.
    for round in 0..3 {
        let mut children: Vec<_> = ["h1", "h2"]
            .iter()
            .map(|h| put(a, &export.url, h, &local, &format!("/{h}-{round}")))
            .collect();
        for c in &mut children {
            let out = c.wait().unwrap();
            let mut err = String::new();
            c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            assert!(out.success(), "put failed: {err}");
        }
    }
    a.wait_in_sync(&p.a, Duration::from_secs(30));
    // Both hosts are mid-way through large puts when site A dies.
    let mut dying: Vec<_> = ["h1", "h2"]
        .iter()
        .map(|h| put(a, &export.url, h, &big, &format!("/{h}-big")))
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    for c in &mut dying {
        assert!(
            c.try_wait().unwrap().is_none(),
            "a large put ended before site A died: the crash would test nothing"
        );
    }
    a.kill9_daemon(&p.a);
    for c in &mut dying {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(export);

    promote(b, &p.b);
    // Before recovery the dead hosts' unfinished work is pending, not damage.
    let out = b.vapp(&["datastore", "fsck", &p.b]);
    eprintln!(
        "fsck of B after failover: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    assert!(
        out.status.success(),
        "fsck of the promoted replica: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A copy gets its own signature; resignature replays every host's journal.
    b.ok(&["datastore", "resignature", &p.b]);
    let out = b.vapp(&["datastore", "fsck", &p.b]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "fsck after recovery: {text}");
    assert!(
        !text.contains("pending"),
        "recovery left work pending: {text}"
    );
    for h in ["h1", "h2"] {
        for round in 0..3 {
            let got = b.p(&format!("got-{h}-{round}"));
            b.ok(&["-d", &p.b, "get", &format!("/{h}-{round}"), &got]);
            assert_eq!(std::fs::read(&got).unwrap(), small, "/{h}-{round} at B");
        }
    }
    b.ok(&["-d", &p.b, "put", &local, "/written-at-b"]);
    b.ok(&["datastore", "fsck", &p.b]);

    if !lun::prereq::require(lun::prereq::have_device("/dev/fuse"), "/dev/fuse") {
        return;
    }
    let mountpoint = b.path("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let mp = mountpoint.to_str().unwrap();
    let out = b
        .host_command()
        .args(["-d", &p.b, "mount", mp])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount of the promoted replica: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _mounted = Unmount(mountpoint.clone());
    assert_eq!(std::fs::read(mountpoint.join("h2-2")).unwrap(), small);
    std::fs::write(mountpoint.join("through-fuse"), &small).unwrap();
    let out = b.host_command().args(["umount", mp]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.ok(&["datastore", "fsck", &p.b]);
    let got = b.p("got-through-fuse");
    b.ok(&["-d", &p.b, "get", "/through-fuse", &got]);
    assert_eq!(std::fs::read(&got).unwrap(), small);
}

/// Lazily unmounts a FUSE mount left behind by a failed test, before its site's
/// processes are killed.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if table.contains(&format!(" {} ", self.0.display())) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}
