//! Bad input to `vapp vm create` and `vapp vm start`: each is refused before any guest code
//! runs, with one error naming the object, and leaves the datastore as it was.
#![allow(clippy::unwrap_used)]

mod vm_support;

use rand::RngCore;
use vm_support::{Fixture, kvm_available};

/// `ls -l` of the whole datastore, to show nothing changed.
fn tree(fx: &Fixture) -> String {
    let mut listing = String::new();
    let mut dirs = vec!["/".to_string()];
    while let Some(dir) = dirs.pop() {
        let out = fx.ok(&["ls", "-l", &dir]);
        for line in out.lines() {
            let name = line.rsplit(' ').next().unwrap();
            let path = format!("{}/{name}", dir.trim_end_matches('/'));
            // Times change with every access; kind, size and name do not.
            let fields: Vec<&str> = line.split_whitespace().collect();
            listing.push_str(&format!("{} {} {path}\n", fields[0], fields[4]));
            if line.starts_with('d') {
                dirs.push(path);
            }
        }
    }
    listing
}

fn create_args<'a>(fx: &'a Fixture, path: &'a str) -> Vec<&'a str> {
    vec![
        "vm",
        "create",
        path,
        "--kernel",
        fx.guest.to_str().unwrap(),
        "--vcpus",
        "1",
        "--memory",
        "64M",
    ]
}

fn with<'a>(mut args: Vec<&'a str>, flag: &'a str, value: &'a str) -> Vec<&'a str> {
    match args.iter().position(|a| *a == flag) {
        Some(at) => args[at + 1] = value,
        None => args.extend([flag, value]),
    }
    args
}

#[test]
fn create_refuses_bad_input_and_changes_nothing() {
    let fx = Fixture::new();
    fx.create_vm("/vms/taken", 1, "mode=test", &["1M"]);
    let before = tree(&fx);
    let not_a_kernel = fx.dir.path().join("notes.txt");
    std::fs::write(&not_a_kernel, "#!/bin/sh\necho not a kernel\n").unwrap();
    let missing = fx.dir.path().join("no-such-kernel");
    let ok = create_args(&fx, "/vms/new");

    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            with(ok.clone(), "--kernel", missing.to_str().unwrap()),
            vec!["kernel", "no-such-kernel", "No such file"],
        ),
        (
            with(ok.clone(), "--kernel", not_a_kernel.to_str().unwrap()),
            vec!["notes.txt", "neither a bzImage nor an x86-64 ELF"],
        ),
        (
            with(ok.clone(), "--memory", "64T"),
            vec!["vm /vms/new", "more than this host has"],
        ),
        (
            with(ok.clone(), "--memory", "1000K"),
            vec!["whole number of MiB"],
        ),
        (
            with(ok.clone(), "--vcpus", "0"),
            vec!["vm /vms/new", "at least one vCPU"],
        ),
        (
            with(ok.clone(), "--disk", "/vms/nope.vdisk"),
            vec!["disk 0", "/vms/nope.vdisk", "no such file"],
        ),
        (
            with(ok.clone(), "--disk", "lots"),
            vec!["--disk lots", "neither a size"],
        ),
        (
            with(ok.clone(), "--disk", "/vms/taken/vm.toml"),
            vec!["/vms/taken/vm.toml", "not a virtual disk"],
        ),
        (
            create_args(&fx, "/vms/taken"),
            vec!["/vms/taken already exists"],
        ),
        (
            create_args(&fx, "vms/relative"),
            vec!["absolute datastore path"],
        ),
    ];
    for (args, needles) in cases {
        fx.fails(&args, &needles);
        assert_eq!(tree(&fx), before, "vapp {args:?} changed the datastore");
    }
    fx.assert_fsck_clean();
}

#[test]
fn a_create_that_runs_out_of_space_removes_what_it_wrote() {
    let fx = Fixture::with_size("128M");
    let before = tree(&fx);
    // An ELF "kernel" of 40 MiB that does not compress into holes: more than the 27 MiB free.
    let huge = fx.dir.path().join("huge.elf");
    let mut image = std::fs::read(&fx.guest).unwrap();
    let mut noise = vec![0u8; 40 << 20];
    rand::rng().fill_bytes(&mut noise);
    image.extend_from_slice(&noise);
    std::fs::write(&huge, &image).unwrap();
    let args = with(
        create_args(&fx, "/vms/big/web"),
        "--kernel",
        huge.to_str().unwrap(),
    );
    let out = fx.run(&args);
    let stderr = vm_support::fails(out, &args, &["create failed, nothing kept"]);
    assert!(stderr.contains("no space"), "{stderr}");
    assert_eq!(tree(&fx), before);
    fx.assert_fsck_clean();
}

#[test]
fn start_refuses_bad_vms_before_the_guest_runs() {
    if !kvm_available() {
        return;
    }
    let fx = Fixture::new();
    fx.create_vm("/vms/x", 1, "mode=test", &["1M"]);
    let replace = |path: &str, contents: &[u8]| {
        let local = fx.dir.path().join("replacement");
        std::fs::write(&local, contents).unwrap();
        // Gone already in some cases.
        let _ = fx.run(&["rm", path]);
        fx.ok(&["put", local.to_str().unwrap(), path]);
    };
    let config = String::from_utf8(fx.run(&["cat", "/vms/x/vm.toml"]).stdout).unwrap();

    // No KVM on this "host".
    let out = fx
        .command(&["vm", "start", "/vms/x"])
        .env("VAPP_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .unwrap();
    vm_support::fails(out, &["vm", "start"], &["/nonexistent/kvm", "No such file"]);

    fx.fails(&["vm", "start", "/vms/none"], &["/vms/none: no VM here"]);

    replace(
        "/vms/x/vm.toml",
        config
            .replace("memory_mib = 64", "memory_mib = 67108864")
            .as_bytes(),
    );
    fx.fails(
        &["vm", "start", "/vms/x"],
        &["bytes of guest memory requested, the host can give"],
    );
    replace(
        "/vms/x/vm.toml",
        config.replace("vcpus = 1", "vcpus = 0").as_bytes(),
    );
    fx.fails(
        &["vm", "start", "/vms/x"],
        &["/vms/x/vm.toml", "at least one vCPU"],
    );
    replace("/vms/x/vm.toml", b"version = 1\nvcpus = [");
    fx.fails(&["vm", "start", "/vms/x"], &["/vms/x/vm.toml"]);
    replace("/vms/x/vm.toml", config.as_bytes());

    replace("/vms/x/kernel", b"MZ this is not a kernel");
    fx.fails(
        &["vm", "start", "/vms/x"],
        &["neither a bzImage nor an x86-64 ELF"],
    );
    fx.ok(&["rm", "/vms/x/kernel"]);
    fx.fails(
        &["vm", "start", "/vms/x"],
        &["kernel /vms/x/kernel", "no such file"],
    );
    replace("/vms/x/kernel", &std::fs::read(&fx.guest).unwrap());

    fx.ok(&["rm", "/vms/x/disk0.vdisk"]);
    fx.fails(
        &["vm", "start", "/vms/x"],
        &["disk 0 (/vms/x/disk0.vdisk)", "no such file"],
    );
    let listed = fx.ok(&["vm", "list"]);
    assert!(listed.contains("stopped"), "{listed}");
    fx.assert_fsck_clean();
}

#[test]
fn a_disk_in_use_by_a_running_vm_is_refused_naming_its_holder() {
    if !kvm_available() {
        return;
    }
    let fx = Fixture::new();
    fx.create_vm("/vms/owner", 1, "mode=wait", &["1M"]);
    fx.create_vm("/vms/intruder", 1, "mode=wait", &["/vms/owner/disk0.vdisk"]);
    let owner = fx.start("/vms/owner", &[]);
    owner.expect_console("waiting to be stopped");
    fx.fails(
        &["vm", "start", "/vms/intruder"],
        &[
            "disk 0 (/vms/owner/disk0.vdisk)",
            "busy, held exclusive by host esx-a",
        ],
    );
    fx.ok(&["vm", "stop", "/vms/owner"]);
    let (status, _, messages) = owner.wait();
    assert_eq!(status.code(), Some(0), "{messages}");
    // Free once its owner is gone.
    let intruder = fx.start("/vms/intruder", &[]);
    intruder.expect_console("waiting to be stopped");
    fx.ok(&["vm", "stop", "/vms/intruder"]);
    let (status, console, messages) = intruder.wait();
    assert_eq!(status.code(), Some(0), "{console}\n{messages}");
}
