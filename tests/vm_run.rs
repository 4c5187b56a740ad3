//! `vapp vm create/start/stop/list` with the test guest (hv/guest) on a datastore: every vCPU
//! reports, the guest's disk writes read back through vmfs, two VMs side by side, a VM runs
//! once (on this host and across hosts), stop through the power button or by force, resets,
//! crashes and signals end the run with the documented exit status.
#![allow(clippy::unwrap_used)]

mod vm_support;

use std::time::Duration;

use hv::test_guest::{GUEST_PATTERN_OFFSET, PATTERN_BYTES, guest_pattern};
use vm_support::{Fixture, kvm_available};

#[test]
fn one_vcpu_boots_checks_its_disk_and_powers_off() {
    if !kvm_available() {
        return;
    }
    let fx = Fixture::new();
    let created = fx.create_vm("/vms/one", 1, "mode=test", &["1M"]);
    assert!(
        created.contains("created vm /vms/one (one): 1 vCPU(s), 64 MiB, ELF kernel"),
        "{created}"
    );
    fx.write_host_pattern("/vms/one/disk0.vdisk", 0);

    let (status, console, messages) = fx.start("/vms/one", &[]).wait();
    assert_eq!(status.code(), Some(0), "{console}\n{messages}");
    assert!(console.contains("cpu 0 up (apic id 0)"), "{console}");
    assert!(console.contains("1 of 1 cpus up"), "{console}");
    assert!(console.contains("disk 0: host pattern ok"), "{console}");
    assert!(
        messages.contains("vm /vms/one: powered off (status 0x0)"),
        "{messages}"
    );

    // What the guest wrote and flushed is in the virtual disk, read through vmfs.
    let written = fx.read("/vms/one/disk0.vdisk", GUEST_PATTERN_OFFSET, PATTERN_BYTES);
    assert_eq!(written, guest_pattern(0));
    // And through the CLI.
    let out = fx.run(&["cat", "/vms/one/disk0.vdisk"]);
    assert!(out.status.success());
    let at = GUEST_PATTERN_OFFSET as usize;
    assert_eq!(out.stdout[at..at + PATTERN_BYTES], guest_pattern(0)[..]);
    fx.assert_fsck_clean();
}

#[test]
fn every_vcpu_of_a_4_vcpu_vm_reports_and_both_disks_work() {
    if !kvm_available() {
        return;
    }
    let fx = Fixture::new();
    fx.ok(&["mkdir", "-p", "/vms/shared"]);
    fx.ok(&["vdisk", "create", "/vms/shared/data.vdisk", "--size", "1M"]);
    fx.create_vm(
        "/vms/smp",
        4,
        "mode=test",
        &["1M", "/vms/shared/data.vdisk"],
    );
    fx.write_host_pattern("/vms/smp/disk0.vdisk", 0);
    fx.write_host_pattern("/vms/shared/data.vdisk", 1);

    let (status, console, messages) = fx.start("/vms/smp", &[]).wait();
    assert_eq!(status.code(), Some(0), "{console}\n{messages}");
    for id in 0..4 {
        assert!(
            console.contains(&format!("cpu {id} up (apic id {id})")),
            "{console}"
        );
    }
    assert!(console.contains("4 of 4 cpus up"), "{console}");
    assert!(console.contains("disk 1: host pattern ok"), "{console}");
    assert_eq!(
        fx.read(
            "/vms/shared/data.vdisk",
            GUEST_PATTERN_OFFSET,
            PATTERN_BYTES
        ),
        guest_pattern(1)
    );
}

#[test]
fn two_vms_run_side_by_side_and_list_shows_where() {
    if !kvm_available() {
        return;
    }
    let fx = Fixture::new();
    fx.create_vm("/vms/a", 2, "mode=wait", &["1M"]);
    fx.create_vm("/vms/b", 1, "mode=wait", &["1M"]);
    fx.write_host_pattern("/vms/a/disk0.vdisk", 0);
    fx.write_host_pattern("/vms/b/disk0.vdisk", 0);

    let listed = fx.ok(&["vm", "list"]);
    assert!(listed.contains("/vms/a"), "{listed}");
    assert_eq!(listed.matches("stopped").count(), 2, "{listed}");

    let a = fx.start("/vms/a", &[]);
    let b = fx.start("/vms/b", &[]);
    a.expect_console("waiting to be stopped");
    b.expect_console("waiting to be stopped");

    let json: serde_json::Value = serde_json::from_str(&fx.ok(&["vm", "list", "--json"])).unwrap();
    let vms = json.as_array().unwrap();
    assert_eq!(vms.len(), 2, "{json}");
    for (vm, running) in vms.iter().zip([&a, &b]) {
        assert_eq!(vm["state"], "running", "{json}");
        assert_eq!(vm["host"], "esx-a", "{json}");
        assert_eq!(vm["pid"], running.pid(), "{json}");
        assert_eq!(vm["memory_bytes"], 64 << 20);
        assert_eq!(vm["disks"][0]["size"], 1 << 20);
    }
    assert_eq!(vms[0]["vcpus"], 2);
    assert_eq!(vms[1]["vcpus"], 1);
    let text = fx.ok(&["vm", "list"]);
    assert!(
        text.contains(&format!("running on esx-a (pid {})", a.pid())),
        "{text}"
    );

    fx.ok(&["vm", "stop", "/vms/a"]);
    fx.ok(&["vm", "stop", "/vms/b"]);
    for vm in [a, b] {
        let (status, console, messages) = vm.wait();
        assert_eq!(status.code(), Some(0), "{console}\n{messages}");
        assert!(
            console.contains("power button pressed, shutting down"),
            "{console}"
        );
    }
    let listed = fx.ok(&["vm", "list"]);
    assert_eq!(listed.matches("stopped").count(), 2, "{listed}");
    fx.assert_fsck_clean();
}

#[test]
fn a_running_vm_cannot_be_started_again_here_or_on_another_host() {
    if !kvm_available() {
        return;
    }
    let fx = Fixture::new();
    fx.create_vm("/vms/once", 1, "mode=wait", &[]);
    let first = fx.start("/vms/once", &[]);
    first.expect_console("waiting to be stopped");

    // This host: refused at once, naming the process that runs it.
    let pid = first.pid().to_string();
    fx.fails(
        &["vm", "start", "/vms/once"],
        &["vm /vms/once is already running", "host esx-a", &pid],
    );
    // Another host sharing the datastore: the VM's lock on the datastore names its holder.
    let other = fx.other_host();
    let out = fx
        .command_as(&other, &["vm", "start", "/vms/once"])
        .output()
        .unwrap();
    vm_support::fails(
        out,
        &["vm", "start"],
        &["vm /vms/once is already running", "esx-a"],
    );
    // From there, the VM is seen running on esx-a, and stopping it says where it runs.
    let listed = String::from_utf8(
        fx.command_as(&other, &["vm", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        listed.contains(&format!("running on esx-a (pid {pid})")),
        "{listed}"
    );
    let out = fx
        .command_as(&other, &["vm", "stop", "/vms/once"])
        .output()
        .unwrap();
    vm_support::fails(
        out,
        &["vm", "stop"],
        &[
            "not running on this host (esx-b)",
            &format!("runs on host esx-a (pid {pid})"),
        ],
    );

    fx.ok(&["vm", "stop", "/vms/once"]);
    let (status, _, messages) = first.wait();
    assert_eq!(status.code(), Some(0), "{messages}");
    // Free again: it starts (and is stopped by force this time).
    let again = fx.start("/vms/once", &[]);
    again.expect_console("waiting to be stopped");
    fx.ok(&["vm", "stop", "--force", "/vms/once"]);
    let (status, _, messages) = again.wait();
    assert_eq!(status.code(), Some(4), "{messages}");
    assert!(messages.contains("vm /vms/once: stopped"), "{messages}");
}

#[test]
fn a_guest_that_ignores_the_power_button_is_stopped_only_by_force() {
    if !kvm_available() {
        return;
    }
    let fx = Fixture::new();
    fx.create_vm("/vms/stubborn", 2, "mode=wait power_button=ignore", &[]);
    let mut vm = fx.start("/vms/stubborn", &[]);
    vm.expect_console("waiting to be stopped");

    fx.fails(
        &["vm", "stop", "/vms/stubborn", "--timeout", "1"],
        &["did not power off within 1 s", "--force"],
    );
    vm.expect_console("power button pressed, ignored");
    assert!(vm.still_running(Duration::from_millis(100)));

    let out = fx.ok(&["vm", "stop", "--force", "/vms/stubborn"]);
    assert!(out.contains("powered off"), "{out}");
    let (status, _, messages) = vm.wait();
    assert_eq!(status.code(), Some(4), "{messages}");
    fx.fails(
        &["vm", "stop", "/vms/stubborn"],
        &["not running on this host (esx-a)"],
    );
}

#[test]
fn console_attaches_stdin_to_the_guest_and_ctrl_bracket_detaches() {
    if !kvm_available() {
        return;
    }
    let fx = Fixture::new();
    fx.create_vm("/vms/typed", 1, "mode=wait", &[]);
    let log = fx.dir.path().join("typed.log");
    let mut vm = fx.start_with_input(
        "/vms/typed",
        &["--console", "--console-log", log.to_str().unwrap()],
    );
    vm.expect_console("waiting to be stopped");
    vm.type_keys(b"uname -a\r");
    vm.expect_console("console input \"uname -a\"");
    vm.type_keys(b"ls\x1dnot for the guest\r");
    assert!(
        vm.stderr
            .wait_for("console detached", vm_support::GUEST_TIMEOUT),
        "{}",
        vm.stderr.text()
    );
    assert!(
        vm.still_running(Duration::from_millis(200)),
        "detaching stops nothing"
    );
    fx.ok(&["vm", "stop", "/vms/typed"]);
    let (status, console, messages) = vm.wait();
    assert_eq!(status.code(), Some(0), "{messages}");
    assert!(!console.contains("not for the guest"), "{console}");
    // --console prints the console and still appends it to the log.
    assert_eq!(std::fs::read_to_string(&log).unwrap(), console);
}

#[test]
fn sigterm_presses_the_power_button_and_a_second_one_powers_off() {
    if !kvm_available() {
        return;
    }
    let fx = Fixture::new();
    fx.create_vm("/vms/polite", 1, "mode=wait", &[]);
    fx.create_vm("/vms/deaf", 1, "mode=wait power_button=ignore", &[]);
    let polite = fx.start("/vms/polite", &[]);
    let deaf = fx.start("/vms/deaf", &[]);
    polite.expect_console("waiting to be stopped");
    deaf.expect_console("waiting to be stopped");

    let term = |pid: u32| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap()
    };
    term(polite.pid());
    let (status, console, messages) = polite.wait();
    assert_eq!(status.code(), Some(0), "{messages}");
    assert!(
        console.contains("power button pressed, shutting down"),
        "{console}"
    );

    term(deaf.pid());
    deaf.expect_console("power button pressed, ignored");
    term(deaf.pid());
    let (status, _, messages) = deaf.wait();
    assert_eq!(status.code(), Some(4), "{messages}");
    assert!(messages.contains("SIGTERM: powering off"), "{messages}");
}

#[test]
fn resets_reboot_or_end_the_run_as_vm_toml_says() {
    if !kvm_available() {
        return;
    }
    let fx = Fixture::new();
    fx.create_vm("/vms/rebooter", 1, "mode=reset", &[]);
    fx.ok(&[
        "vm",
        "create",
        "/vms/oneshot",
        "--kernel",
        fx.guest.to_str().unwrap(),
        "--vcpus",
        "1",
        "--memory",
        "64M",
        "--cmdline",
        "mode=reset",
        "--on-reset",
        "power-off",
    ]);
    let (status, console, messages) = fx.start("/vms/oneshot", &[]).wait();
    assert_eq!(status.code(), Some(0), "{messages}");
    assert_eq!(
        console
            .matches("reset through the ACPI reset register")
            .count(),
        1
    );
    assert!(messages.contains("reset by the guest"), "{messages}");

    let vm = fx.start("/vms/rebooter", &[]);
    assert!(
        vm.stderr.wait_for("rebooted", vm_support::GUEST_TIMEOUT),
        "{}",
        vm.stderr.text()
    );
    fx.ok(&["vm", "stop", "--force", "/vms/rebooter"]);
    let (status, console, _) = vm.wait();
    assert!(
        console.matches("vapp-testguest: booted").count() >= 2,
        "{console}"
    );
    // Stopped from the host, or (if the stop landed on a reset) ended by it.
    assert!(matches!(status.code(), Some(0) | Some(4)), "{status}");
}

#[test]
fn guest_status_and_crashes_become_exit_statuses_and_console_goes_to_the_log() {
    if !kvm_available() {
        return;
    }
    let fx = Fixture::new();
    // Disk 0 carries disk 1's pattern: the guest powers off with status 0x08.
    fx.create_vm("/vms/unhappy", 1, "mode=test", &["1M"]);
    fx.write_host_pattern("/vms/unhappy/disk0.vdisk", 1);
    let log = fx.dir.path().join("unhappy.log");
    let (status, console, messages) = fx
        .start("/vms/unhappy", &["--console-log", log.to_str().unwrap()])
        .wait();
    assert_eq!(status.code(), Some(3), "{messages}");
    assert!(messages.contains("powered off (status 0x8)"), "{messages}");
    assert!(console.is_empty(), "console went to the log: {console}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("disk 0: host pattern MISMATCH"), "{logged}");

    fx.create_vm("/vms/crasher", 1, "mode=fault", &[]);
    let (status, console, messages) = fx.start("/vms/crasher", &[]).wait();
    assert_eq!(status.code(), Some(5), "{console}\n{messages}");
    assert!(messages.contains("crashed on vCPU 0"), "{messages}");
}

#[test]
fn force_kills_a_hung_vm_process_and_the_vm_starts_again_at_once() {
    if !kvm_available() {
        return;
    }
    let fx = Fixture::new();
    fx.create_vm("/vms/hung", 1, "mode=wait", &["1M"]);
    fx.write_host_pattern("/vms/hung/disk0.vdisk", 0);
    let hung = fx.start("/vms/hung", &[]);
    hung.expect_console("waiting to be stopped");
    let pid = nix::unistd::Pid::from_raw(hung.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();

    let out = fx.run(&["vm", "stop", "--force", "/vms/hung"]);
    let messages = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{messages}");
    assert!(messages.contains("does not stop; killing it"), "{messages}");
    let (status, _, _) = hung.wait();
    assert_eq!(status.code(), None, "killed by a signal: {status}");
    // Its lock on vm.toml is still on disk, but its process is gone: not running.
    let listed = fx.ok(&["vm", "list"]);
    assert!(listed.contains("stopped"), "{listed}");

    // The dead process's datastore locks are broken by the cluster rules (its journal replayed
    // first), so the VM runs again, with what the guest wrote before intact.
    let again = fx.start("/vms/hung", &[]);
    again.expect_console("disk 0: host pattern ok");
    again.expect_console("waiting to be stopped");
    fx.ok(&["vm", "stop", "/vms/hung"]);
    let (status, _, messages) = again.wait();
    assert_eq!(status.code(), Some(0), "{messages}");
    assert_eq!(
        fx.read("/vms/hung/disk0.vdisk", GUEST_PATTERN_OFFSET, PATTERN_BYTES),
        guest_pattern(0)
    );
    fx.assert_fsck_clean();
}

/// `vm start` on one terminal or pipe (`2>&1`, as `make demo` runs it): its "started" line
/// comes before anything the guest prints, and no host message or log line lands inside a
/// guest console line, even one the guest left open (a getty's `login: ` prompt).
#[test]
fn host_messages_and_logs_never_land_inside_a_guest_console_line() {
    if !kvm_available() {
        return;
    }
    let fx = Fixture::new();
    fx.create_vm("/vms/mix", 2, "mode=wait prompt=login", &["1M"]);
    fx.write_host_pattern("/vms/mix/disk0.vdisk", 0);
    let terminal = fx.dir.path().join("terminal.txt");
    let file = std::fs::File::create(&terminal).unwrap();
    // Info logs: host lines written while the guest prints, and one at its prompt.
    let mut vm = fx
        .command(&["vm", "start", "/vms/mix"])
        .env("VAPP_LOG", "info")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let wait_for = |needle: &str| {
        let deadline = std::time::Instant::now() + vm_support::GUEST_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&terminal).unwrap();
            if text.contains(needle) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {needle:?} in {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let signal = |signal| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(vm.id() as i32), signal).unwrap()
    };
    wait_for("vapp-testguest login: ");
    // Logged at info, while the guest sits at its prompt.
    signal(nix::sys::signal::Signal::SIGHUP);
    wait_for("SIGHUP ignored");
    signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(vm.wait().unwrap().code(), Some(0));
    let text = std::fs::read_to_string(&terminal).unwrap();

    let started = text
        .find("vapp: vm /vms/mix (mix) started: 2 vCPU(s)")
        .unwrap_or_else(|| panic!("no started line: {text}"));
    let guest = text.find("vapp-testguest").unwrap();
    assert!(started < guest, "the guest printed first: {text}");
    assert!(
        text.contains("power button pressed, shutting down"),
        "{text}"
    );
    assert!(text.contains("vapp: vm /vms/mix: powered off"), "{text}");
    for line in text.lines() {
        // A host message starts its line; a log line starts with its timestamp.
        let host = ["vapp: ", " INFO ", " WARN ", " ERROR "]
            .iter()
            .filter_map(|needle| line.find(needle))
            .min();
        let guest = line.find("vapp-testguest");
        match (host, guest) {
            (Some(_), Some(_)) => panic!("host and guest output in one line: {line:?}\n{text}"),
            (Some(at), None) if line.starts_with("vapp: ") => assert_eq!(at, 0, "{line:?}"),
            (None, Some(at)) => assert_eq!(at, 0, "guest line broken: {line:?}\n{text}"),
            _ => {}
        }
    }
}
