//! `vapp export` of a plain file, used by NBD tools we did not write: qemu-img, qemu-io and
//! nbdinfo must see exactly the file's bytes, and their writes must land in the file.
#![allow(clippy::unwrap_used)]

mod export_support;

use export_support::{Export, random_bytes, require_tools, run};

const MIB: usize = 1 << 20;

fn random_file(
    dir: &std::path::Path,
    name: &str,
    len: usize,
    seed: u64,
) -> (std::path::PathBuf, Vec<u8>) {
    let data = random_bytes(len, seed);
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

#[test]
fn qemu_img_info_and_convert_in_both_directions() {
    if !require_tools(&[("qemu-img", "qemu-utils")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (file, data) = random_file(dir.path(), "disk.raw", 24 * MIB, 1);
    let export = Export::start(&file, &["--listen", "127.0.0.1:0", "--name", "disk"]);
    assert!(export.url.starts_with("nbd://127.0.0.1:") && export.url.ends_with("/disk"));

    let info = run("qemu-img", &["info", "--output=json", &export.url]);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 24 * MIB)),
        "{info}"
    );

    // Out through the export: a byte-identical copy.
    let copy = dir.path().join("copy.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &export.url,
            copy.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&copy).unwrap() == data,
        "qemu-img convert from the export differs"
    );

    // In through the export: the exported file becomes the source.
    let (source, new_data) = random_file(dir.path(), "source.raw", 24 * MIB, 2);
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            source.to_str().unwrap(),
            &export.url,
        ],
    );
    assert!(
        std::fs::read(&file).unwrap() == new_data,
        "qemu-img convert to the export differs"
    );
}

#[test]
fn qemu_io_writes_and_reads_through_a_unix_socket() {
    if !require_tools(&[("qemu-io", "qemu-utils")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (file, mut expected) = random_file(dir.path(), "disk.raw", 4 * MIB, 3);
    let socket = dir.path().join("export.sock");
    let export = Export::start(
        &file,
        &["--socket", socket.to_str().unwrap(), "--name", "disk"],
    );
    assert_eq!(
        export.url,
        format!("nbd+unix:///disk?socket={}", socket.display())
    );

    // Aligned and unaligned writes, then a flush; qemu-io verifies its own reads (-P).
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 65536 131072",
            "-c",
            "write -P 0xcd 1000 3000",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 65536 131072",
            "-c",
            "read -P 0xcd 1000 3000",
            &export.url,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    expected[65536..65536 + 131072].fill(0xab);
    expected[1000..4000].fill(0xcd);
    assert!(
        std::fs::read(&file).unwrap() == expected,
        "qemu-io writes did not land as written"
    );
}

#[test]
fn nbdinfo_describes_the_export_and_lists_it() {
    if !require_tools(&[("nbdinfo", "libnbd-bin")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = random_file(dir.path(), "disk.raw", 3 * MIB, 4);
    let export = Export::start(&file, &["--listen", "127.0.0.1:0", "--name", "vol1"]);
    let info = run("nbdinfo", &["--json", &export.url]);
    for needle in [
        "\"export-name\": \"vol1\"",
        &format!("\"export-size\": {}", 3 * MIB),
        "\"is_read_only\": false",
        "\"can_flush\": true",
        "\"can_multi_conn\": true",
        "\"block_size_minimum\": 512",
        "\"block_size_maximum\": 33554432",
    ] {
        assert!(info.contains(needle), "nbdinfo lacks {needle}: {info}");
    }
    let list = run("nbdinfo", &["--list", &export.url]);
    assert!(list.contains("export=\"vol1\""), "{list}");
    drop(export);

    let export = Export::start(&file, &["--listen", "127.0.0.1:0", "--read-only"]);
    let info = run("nbdinfo", &["--json", &export.url]);
    assert!(info.contains("\"is_read_only\": true"), "{info}");
}

#[test]
fn read_only_export_serves_reads_and_refuses_writers() {
    if !require_tools(&[("qemu-io", "qemu-utils")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, vec![0x5au8; MIB]).unwrap();
    let export = Export::start(&path, &["--listen", "127.0.0.1:0", "--read-only"]);

    // qemu honours the read-only flag: opening for writing is refused outright.
    let output = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x11 0 4096", &export.url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a read-only export was opened for writing: {text}"
    );
    assert!(text.contains("Permission denied"), "{text}");

    let out = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5a 0 65536", &export.url],
    );
    assert!(out.contains("read 65536/65536"), "{out}");
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0x5a));
}
