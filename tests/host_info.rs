//! `vapp host info`: the KVM backend and limits, and the host's CPUs and memory, as text and
//! as JSON that agrees with what the kernel reports.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn vapp(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vapp"))
        .args(args)
        .output()
        .unwrap()
}

fn kvm_available() -> bool {
    lun::prereq::require(
        lun::prereq::have_device("/dev/kvm"),
        "/dev/kvm (read-write) for host info",
    )
}

fn meminfo_total_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

fn online_cpus() -> u64 {
    let out = Command::new("getconf")
        .arg("_NPROCESSORS_ONLN")
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn json_reports_the_kvm_backend_and_the_host() {
    if !kvm_available() {
        return;
    }
    let out = vapp(&["host", "info", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["kvm"]["api_version"], 12);
    assert_eq!(info["kvm"]["path"], "/dev/kvm");
    let backend = info["kvm"]["backend"].as_str().unwrap();
    let module = info["kvm"]["backend_module"].as_str().unwrap();
    assert!(["vmx", "svm", "pvm"].contains(&backend), "{backend}");
    assert!(
        std::path::Path::new("/sys/module").join(module).is_dir(),
        "{module} is not loaded"
    );
    assert_eq!(info["kvm"]["guest_kernel_emulated"], backend == "pvm");
    let kvm_max = info["vcpus"]["kvm_max"].as_u64().unwrap();
    let per_vm = info["vcpus"]["max_per_vm"].as_u64().unwrap();
    assert!(
        per_vm >= 1 && per_vm <= kvm_max.min(254),
        "{per_vm} of {kvm_max}"
    );
    assert_eq!(info["host"]["cpus"].as_u64().unwrap(), online_cpus());
    assert_eq!(
        info["host"]["memory_bytes"].as_u64().unwrap(),
        meminfo_total_bytes()
    );
    let available = info["host"]["memory_available_bytes"].as_u64().unwrap();
    assert!(available > 0 && available <= meminfo_total_bytes());
}

#[test]
fn text_names_the_backend_and_its_limits() {
    if !kvm_available() {
        return;
    }
    let out = vapp(&["host", "info"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("API version 12"), "{text}");
    assert!(text.contains("Backend:"), "{text}");
    assert!(text.contains("vCPUs per VM: up to"), "{text}");
    assert!(
        text.contains(&format!("Host CPUs:    {}", online_cpus())),
        "{text}"
    );
}

/// Distinct values of a topology file over the online CPUs, read here independently of vapp.
fn distinct_topology(file: &str) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    for cpu in 0..online_cpus() {
        let path = format!("/sys/devices/system/cpu/cpu{cpu}/topology/{file}");
        seen.insert(std::fs::read_to_string(path).unwrap().trim().to_string());
    }
    seen.len()
}

#[test]
fn the_cpu_topology_counts_packages_cores_and_threads() {
    if !kvm_available() {
        return;
    }
    let out = vapp(&["host", "info", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &info["topology"];
    let (packages, cores, threads) = (
        distinct_topology("physical_package_id") as u64,
        distinct_topology("core_cpus_list") as u64,
        online_cpus(),
    );
    assert_eq!(t["packages"].as_u64(), Some(packages), "{t}");
    assert_eq!(t["cores"].as_u64(), Some(cores), "{t}");
    assert_eq!(t["threads"].as_u64(), Some(threads), "{t}");
    assert_eq!(t["cpus"].as_array().unwrap().len() as u64, threads, "{t}");
    let text = String::from_utf8(vapp(&["host", "info"]).stdout).unwrap();
    assert!(
        text.contains(&format!(
            "Topology:     {packages} package(s), {cores} core(s), {threads} thread(s)"
        )),
        "{text}"
    );
}
