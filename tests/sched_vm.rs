//! The resource scheduler with real VMs (`vm start` of the test guest on KVM): admission
//! control refuses what the host cannot guarantee, a disk limit and disk shares hold between
//! VM processes, CPU shares and a CPU limit hold through the VMs' cgroups, the vCPUs of an SMP
//! VM land on distinct cores, and a memory reservation is resident.
#![allow(clippy::unwrap_used)]

mod vm_support;

use vm_support::{Fixture, kvm_available};

/// Root, for cgroups, pinning and locking memory.
fn root_and_kvm() -> bool {
    kvm_available()
        && lun::prereq::require(
            nix::unistd::geteuid().is_root(),
            "root for cgroups, vCPU pinning and mlock",
        )
}

/// `vm create` of the test guest, then `[resources]` (and other fields) appended to vm.toml.
fn create(fx: &Fixture, path: &str, vcpus: u32, cmdline: &str, extra_toml: &str) {
    fx.create_vm(path, vcpus, cmdline, &["1M"]);
    let toml_path = format!("{path}/vm.toml");
    let config = String::from_utf8(fx.run(&["cat", &toml_path]).stdout).unwrap();
    let local = fx.dir.path().join("vm.toml.new");
    std::fs::write(&local, format!("{config}\n{extra_toml}")).unwrap();
    fx.ok(&["rm", &toml_path]);
    fx.ok(&["put", local.to_str().unwrap(), &toml_path]);
}

/// `host resources --json` over `secs`: the VM entries by folder.
fn resources(fx: &Fixture, secs: f64) -> Vec<serde_json::Value> {
    let out = fx.ok(&[
        "host",
        "resources",
        "--json",
        "--interval",
        &secs.to_string(),
    ]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    report["vms"].as_array().unwrap().clone()
}

fn field(vms: &[serde_json::Value], vm: &str, name: &str) -> f64 {
    let entry = vms
        .iter()
        .find(|v| v["vm"] == vm)
        .unwrap_or_else(|| panic!("{vm} not in {vms:?}"));
    entry[name]
        .as_f64()
        .unwrap_or_else(|| panic!("{vm}: no {name} in {entry}"))
}

#[test]
fn admission_refuses_a_cpu_reservation_the_host_no_longer_has() {
    if !root_and_kvm() {
        return;
    }
    let fx = Fixture::new();
    let cpus = std::thread::available_parallelism().unwrap().get();
    // Each reserves more than half of what the host can guarantee: the second cannot fit.
    let pct = (cpus * 100 - 10) / 2 + 5;
    let cpu = format!("[resources.cpu]\nreservation = \"{pct}%\"\n");
    create(&fx, "/vms/first", cpus as u32, "mode=wait", &cpu);
    create(&fx, "/vms/second", cpus as u32, "mode=wait", &cpu);
    let first = fx.start("/vms/first", &[]);
    first.expect_console("waiting to be stopped");
    fx.fails(
        &["vm", "start", "/vms/second"],
        &[
            "cannot power on /vms/second: its CPU reservation of",
            &format!("{pct}% of a core does not fit"),
            &format!("{pct}% of a core reserved by running VMs"),
        ],
    );
    drop(first);
    // The first VM's reservation went with its process.
    let second = fx.start("/vms/second", &[]);
    second.expect_console("waiting to be stopped");
}

#[test]
fn admission_refuses_more_memory_than_the_host_has() {
    if !root_and_kvm() {
        return;
    }
    let fx = Fixture::new();
    let host_mib = sched::host_memory().unwrap() >> 20;
    fx.create_vm("/vms/huge", 1, "mode=wait", &[]);
    let config = String::from_utf8(fx.run(&["cat", "/vms/huge/vm.toml"]).stdout).unwrap();
    let local = fx.dir.path().join("huge.toml");
    let wanted = host_mib + 1024;
    std::fs::write(
        &local,
        format!(
            "{}\n[resources.memory]\nreservation = \"{wanted}MiB\"\n",
            config.replace("memory_mib = 64", &format!("memory_mib = {wanted}"))
        ),
    )
    .unwrap();
    fx.ok(&["rm", "/vms/huge/vm.toml"]);
    fx.ok(&["put", local.to_str().unwrap(), "/vms/huge/vm.toml"]);
    fx.fails(
        &["vm", "start", "/vms/huge"],
        &[
            &format!("its memory reservation of {wanted} MiB does not fit"),
            &format!("the host has {host_mib} MiB"),
        ],
    );
}

#[test]
fn a_disk_limit_holds() {
    if !root_and_kvm() {
        return;
    }
    let fx = Fixture::new();
    create(
        &fx,
        "/vms/capped",
        1,
        "mode=diskio",
        "[resources.disk]\nlimit = \"200 IOPS\"\n",
    );
    let vm = fx.start("/vms/capped", &[]);
    vm.expect_console("diskio: started");
    let vms = resources(&fx, 3.0);
    let iops = field(&vms, "/vms/capped", "disk_iops");
    assert!(
        (180.0..=220.0).contains(&iops),
        "{iops:.0} IOPS under a 200 IOPS limit"
    );
}

#[test]
fn two_to_one_disk_shares_give_two_to_one_iops_and_a_reservation_is_met() {
    if !root_and_kvm() {
        return;
    }
    let fx = Fixture::new();
    create(
        &fx,
        "/vms/high",
        1,
        "mode=diskio",
        "[resources.disk]\nshares = \"high\"\n",
    );
    create(
        &fx,
        "/vms/normal",
        1,
        "mode=diskio",
        "[resources.disk]\nshares = \"normal\"\n",
    );
    create(
        &fx,
        "/vms/reserved",
        1,
        "mode=diskio",
        "[resources.disk]\nshares = 10\nreservation = \"100 IOPS\"\nlimit = \"400 IOPS\"\n",
    );
    let high = fx.start("/vms/high", &[]);
    let normal = fx.start("/vms/normal", &[]);
    high.expect_console("diskio: started");
    normal.expect_console("diskio: started");
    let vms = resources(&fx, 3.0);
    let (h, n) = (
        field(&vms, "/vms/high", "disk_iops"),
        field(&vms, "/vms/normal", "disk_iops"),
    );
    let ratio = h / n;
    assert!(
        (1.8..=2.2).contains(&ratio),
        "high {h:.0} IOPS, normal {n:.0}: {ratio:.2}"
    );

    let reserved = fx.start("/vms/reserved", &[]);
    reserved.expect_console("diskio: started");
    let vms = resources(&fx, 3.0);
    let r = field(&vms, "/vms/reserved", "disk_iops");
    assert!(
        r >= 90.0,
        "the 100 IOPS reservation got {r:.0} IOPS: {vms:?}"
    );
}

/// Runs `f` with this thread (and so the VM processes it starts) on CPU `cpu` only.
fn on_cpu<T>(cpu: usize, f: impl FnOnce() -> T) -> T {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).unwrap();
    let old = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
    let out = f();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &old).unwrap();
    out
}

#[test]
fn cpu_shares_two_to_one_on_one_core_and_a_cpu_limit_holds() {
    if !root_and_kvm() {
        return;
    }
    let fx = Fixture::new();
    create(
        &fx,
        "/vms/high",
        1,
        "mode=spin",
        "[resources.cpu]\nshares = \"high\"\n",
    );
    create(
        &fx,
        "/vms/normal",
        1,
        "mode=spin",
        "[resources.cpu]\nshares = \"normal\"\n",
    );
    create(
        &fx,
        "/vms/capped",
        1,
        "mode=spin",
        "[resources.cpu]\nlimit = \"30%\"\n",
    );
    let (high, normal) = on_cpu(0, || {
        (fx.start("/vms/high", &[]), fx.start("/vms/normal", &[]))
    });
    high.expect_console("spin: started");
    normal.expect_console("spin: started");
    let vms = resources(&fx, 3.0);
    let (h, n) = (
        field(&vms, "/vms/high", "cpu_used_permille"),
        field(&vms, "/vms/normal", "cpu_used_permille"),
    );
    let ratio = h / n;
    assert!(
        (1.8..=2.2).contains(&ratio),
        "high {h}‰ of a core, normal {n}‰: {ratio:.2}"
    );
    drop((high, normal));

    let capped = fx.start("/vms/capped", &[]);
    capped.expect_console("spin: started");
    let vms = resources(&fx, 3.0);
    let used = field(&vms, "/vms/capped", "cpu_used_permille");
    assert!(
        (250.0..=330.0).contains(&used),
        "{used}‰ of a core under a 30% limit"
    );
}

#[test]
fn smp_vcpus_land_on_distinct_cores_and_the_memory_reservation_is_resident() {
    if !root_and_kvm() {
        return;
    }
    let fx = Fixture::new();
    let topology = sched::Topology::read().unwrap();
    let vcpus = topology.cores().min(4) as u32;
    if vcpus < 2 {
        eprintln!("skipped: one core, nothing to spread over");
        return;
    }
    create(
        &fx,
        "/vms/smp",
        vcpus,
        "mode=wait",
        "[resources.memory]\nreservation = \"48MiB\"\nlimit = \"96MiB\"\n",
    );
    let vm = fx.start("/vms/smp", &[]);
    vm.expect_console("waiting to be stopped");
    let pid = vm.pid();
    let mut cores = std::collections::BTreeSet::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap();
        if !comm.starts_with("vcpu") {
            continue;
        }
        let tid: i32 = task.file_name().unwrap().to_str().unwrap().parse().unwrap();
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(tid)).unwrap();
        let allowed: Vec<usize> = (0..1024)
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect();
        assert_eq!(
            allowed.len(),
            1,
            "{} is not pinned: {allowed:?}",
            comm.trim()
        );
        let cpu = topology.cpus.iter().find(|c| c.cpu == allowed[0]).unwrap();
        cores.insert((cpu.package, cpu.core));
    }
    assert_eq!(cores.len(), vcpus as usize, "vCPUs share a core: {cores:?}");

    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert!(
        kib("VmLck:") >= 48 << 10,
        "locked {} KiB of a 48 MiB reservation",
        kib("VmLck:")
    );
    let vms = resources(&fx, 0.2);
    assert_eq!(
        field(&vms, "/vms/smp", "memory_limit_bytes") as u64,
        96 << 20
    );
    let used = field(&vms, "/vms/smp", "memory_used_bytes") as u64;
    assert!(
        (48 << 20..=96 << 20).contains(&used),
        "{used} bytes charged: the 48 MiB reservation is resident, the limit 96 MiB"
    );
}

/// KSM's knobs, put back as they were when the test ends.
struct Ksm(Vec<(&'static str, String)>);

impl Ksm {
    fn start() -> Ksm {
        let dir = std::path::Path::new("/sys/kernel/mm/ksm");
        let saved = ["run", "pages_to_scan", "sleep_millisecs"]
            .into_iter()
            .map(|k| (k, std::fs::read_to_string(dir.join(k)).unwrap()))
            .collect();
        // Fast scanning, so a few seconds cover two small guests.
        std::fs::write(dir.join("pages_to_scan"), "4000").unwrap();
        std::fs::write(dir.join("sleep_millisecs"), "10").unwrap();
        std::fs::write(dir.join("run"), "1").unwrap();
        Ksm(saved)
    }
}

impl Drop for Ksm {
    fn drop(&mut self) {
        for (k, v) in &self.0 {
            let _ = std::fs::write(format!("/sys/kernel/mm/ksm/{k}"), v.trim());
        }
    }
}

#[test]
fn two_vms_from_one_image_share_pages_through_ksm() {
    if !root_and_kvm()
        || !lun::prereq::require(
            std::path::Path::new("/sys/kernel/mm/ksm/run").exists()
                && std::path::Path::new("/proc/self/ksm_merging_pages").exists(),
            "KSM with per-process counters (Linux 6.1+)",
        )
    {
        return;
    }
    let fx = Fixture::new();
    // The reservation faults the memory in: KSM merges only pages that exist.
    let memory = "[resources.memory]\nreservation = \"32MiB\"\n";
    create(&fx, "/vms/twin-a", 1, "mode=wait", memory);
    create(&fx, "/vms/twin-b", 1, "mode=wait", memory);
    let _ksm = Ksm::start();
    let a = fx.start("/vms/twin-a", &[]);
    let b = fx.start("/vms/twin-b", &[]);
    a.expect_console("waiting to be stopped");
    b.expect_console("waiting to be stopped");
    let guest_pages = 64.0 * 256.0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let vms = resources(&fx, 0.5);
        let (pa, pb) = (
            field(&vms, "/vms/twin-a", "ksm_merged_pages"),
            field(&vms, "/vms/twin-b", "ksm_merged_pages"),
        );
        // The 32 MiB each reserved (8192 pages) is identical between the two but for the
        // few pages each guest wrote itself (its stack, its console state).
        if pa >= 7168.0 && pb >= 7168.0 {
            eprintln!(
                "KSM: {:.0} % and {:.0} % of the two guests' 64 MiB merged",
                pa * 100.0 / guest_pages,
                pb * 100.0 / guest_pages
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after 30 s KSM merged {pa} and {pb} pages of the twins"
        );
    }
}

/// Kills the agent (and so stops serving) when the test ends, however it ends.
struct AgentProcess(std::process::Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

#[test]
fn the_host_agent_refuses_an_over_reservation_too() {
    if !root_and_kvm() {
        return;
    }
    let fx = Fixture::new();
    let host_mib = sched::host_memory().unwrap() >> 20;
    let wanted = host_mib + 1024;
    fx.create_vm("/vms/huge", 1, "mode=wait", &[]);
    let config = String::from_utf8(fx.run(&["cat", "/vms/huge/vm.toml"]).stdout).unwrap();
    let local = fx.dir.path().join("huge.toml");
    std::fs::write(
        &local,
        format!(
            "{}\n[resources.memory]\nreservation = \"{wanted}MiB\"\n",
            config.replace("memory_mib = 64", &format!("memory_mib = {wanted}"))
        ),
    )
    .unwrap();
    fx.ok(&["rm", "/vms/huge/vm.toml"]);
    fx.ok(&["put", local.to_str().unwrap(), "/vms/huge/vm.toml"]);

    let runtime = fx.dir.path().join("run-a");
    std::fs::create_dir_all(&runtime).unwrap();
    let agent_config = fx.dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "name = \"esx-a\"\ndatastores = [{:?}]\nruntime_dir = {:?}\n",
            fx.ds,
            runtime.to_str().unwrap()
        ),
    )
    .unwrap();
    let _agent = AgentProcess(
        fx.command(&["host", "run", "--config", agent_config.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !runtime.join("agent.sock").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never listened"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // `vm start` goes through the agent, which runs the VM's runner: the refusal comes back.
    let err = fx.fails(
        &["vm", "start", "/vms/huge"],
        &[&format!(
            "its memory reservation of {wanted} MiB does not fit"
        )],
    );
    // The agent says its runner did not start; a `vm start` on its own would not.
    assert!(
        err.contains("did not start"),
        "not refused through the agent: {err}"
    );
}
