//! `vapp clone` as a user runs it: a full copy, a synchronized clone following its source,
//! fracture, writes on both sides, sync copying only what changed, reverse sync.
#![allow(clippy::unwrap_used)]

mod snapshot_support;

use lun::Lun;
use snapshot_support::*;

const SIZE: u64 = 8 * MIB;

fn write(env: &Env, spec: &str, at: u64, byte: u8) {
    let export = env.export(spec, &[]);
    let c = export.client();
    c.write_at(&[byte; 65536], at).unwrap();
    c.flush().unwrap();
    drop(c);
    export.stop();
}

fn status(env: &Env, dest: &str) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["clone", "status", dest, "--json"])).unwrap()
}

#[test]
fn a_clone_is_a_full_copy_and_a_synchronized_one_follows_its_source() {
    let env = Env::new();
    let src = env.file("src.img", SIZE, 1);
    let copy = env.p("copy.img");
    env.ok(&["clone", "create", &src, &copy]);
    assert_eq!(file_sha(&copy), file_sha(&src), "a full copy");
    assert_eq!(status(&env, &copy)["state"], "fractured");

    let mirror = env.p("mirror.img");
    env.ok(&["clone", "create", &src, &mirror, "--synchronized"]);
    assert_eq!(status(&env, &mirror)["state"], "synchronized");
    let point_in_time = file_sha(&copy);
    write(&env, &src, MIB, 0x11);
    assert_eq!(
        file_sha(&mirror),
        file_sha(&src),
        "the write reached the clone"
    );
    assert_eq!(
        file_sha(&copy),
        point_in_time,
        "a fractured clone keeps its bytes"
    );
    assert_eq!(status(&env, &copy)["logged_chunks"], 1);

    let err = env.fails(&["clone", "create", &src, &copy]);
    assert!(err.contains("already a clone"), "{err}");
    let err = env.fails(&["clone", "status", &env.p("nothing.img")]);
    assert!(err.contains("not a clone"), "{err}");
}

#[test]
fn fracture_then_sync_copies_only_the_changed_chunks_and_reverse_sync_restores_the_source() {
    let env = Env::new();
    let src = env.file("src.img", SIZE, 2);
    let dest = env.p("dest.img");
    env.ok(&["clone", "create", &src, &dest, "--synchronized"]);
    env.ok(&["clone", "fracture", &dest]);
    assert_eq!(status(&env, &dest)["state"], "fractured");

    // Both sides change: one chunk on the source, two on the clone.
    write(&env, &src, 0, 0x22);
    write(&env, &dest, 2 * MIB, 0x33);
    write(&env, &dest, 4 * MIB, 0x44);
    assert_ne!(file_sha(&dest), file_sha(&src));
    assert_eq!(
        status(&env, &dest)["logged_chunks"],
        3,
        "sync copies these only"
    );

    env.ok(&["clone", "sync", &dest]);
    assert_eq!(file_sha(&dest), file_sha(&src));
    let s = status(&env, &dest);
    assert_eq!(s["state"], "synchronized");
    assert_eq!(s["logged_chunks"], 0);

    env.ok(&["clone", "fracture", &dest]);
    write(&env, &dest, 6 * MIB, 0x55);
    let wanted = file_sha(&dest);
    env.ok(&["clone", "reverse-sync", &dest]);
    assert_eq!(
        file_sha(&src),
        wanted,
        "the source took the clone's contents"
    );
    assert_eq!(file_sha(&dest), wanted);
}

#[test]
fn a_clone_of_an_exported_lun_is_made_by_the_export_while_its_client_writes() {
    let env = Env::new();
    let src = env.file("src.img", SIZE, 3);
    let export = env.export(&src, &[]);
    let c = export.client();
    c.write_at(&[0x66; 65536], 0).unwrap();
    c.flush().unwrap();
    let dest = env.p("dest.img");
    env.ok(&["clone", "create", &src, &dest, "--synchronized"]);
    // Mirrored from now on, through the same client connection.
    c.write_at(&[0x77; 65536], 3 * MIB).unwrap();
    c.flush().unwrap();
    assert_eq!(sha(&std::fs::read(&dest).unwrap()), sha(&export.read_all()));
    let s = status(&env, &dest);
    assert_eq!(s["state"], "synchronized");
    assert_eq!(s["logged_chunks"], 0);
    env.ok(&["clone", "fracture", &dest]);
    c.write_at(&[0x88; 65536], 5 * MIB).unwrap();
    c.flush().unwrap();
    assert_eq!(status(&env, &dest)["logged_chunks"], 1);
    drop(c);
    export.stop();
}
