//! Resource pools with real VMs: a pool file on the host, VMs in it (`[resources] pool`), its
//! reservation dividing among them at admission, its CPU limit and memory limit on the nested
//! cgroup its VMs' groups sit in, and `host resources` showing the tree.
//! Needs root (cgroups) and KVM.
#![allow(clippy::unwrap_used)]

mod vm_support;

use std::path::Path;

use vm_support::{Fixture, kvm_available};

fn create(fx: &Fixture, path: &str, cmdline: &str, extra_toml: &str) {
    fx.create_vm(path, 1, cmdline, &[]);
    let toml_path = format!("{path}/vm.toml");
    let config = fx.ok(&["cat", &toml_path]);
    let local = fx.dir.path().join("vm.toml.new");
    std::fs::write(&local, format!("{config}\n{extra_toml}")).unwrap();
    fx.ok(&["rm", &toml_path]);
    fx.ok(&["put", local.to_str().unwrap(), &toml_path]);
}

#[test]
fn a_pool_divides_its_reservation_limits_its_vms_together_and_shows_as_a_tree() {
    if !kvm_available()
        || !lun::prereq::require(
            lun::prereq::is_root() && Path::new("/sys/fs/cgroup/cpu/cpu.shares").exists(),
            "root and cgroup v1 cpu for the pool's group",
        )
    {
        return;
    }
    let mut fx = Fixture::new();
    let state = fx.dir.path().join("state");
    // The pool's name is host-wide in the cgroup tree: unique per test run.
    let pool = format!("t{}", std::process::id());
    std::fs::create_dir_all(state.join("resource-pools")).unwrap();
    std::fs::write(
        state.join(format!("resource-pools/{pool}.toml")),
        "[cpu]\nshares = 2000\nreservation = \"20%\"\nlimit = \"50%\"\n\
         [memory]\nlimit = \"512MiB\"\n",
    )
    .unwrap();
    fx.env.push((
        "VAPP_STATE_DIR".to_string(),
        state.to_str().unwrap().to_string(),
    ));
    let in_pool = |cpu: &str| format!("[resources]\npool = \"{pool}\"\n{cpu}");
    create(
        &fx,
        "/vms/a",
        "mode=spin",
        &in_pool("[resources.cpu]\nreservation = \"15%\"\n"),
    );
    create(
        &fx,
        "/vms/b",
        "mode=wait",
        &in_pool("[resources.cpu]\nreservation = \"10%\"\n"),
    );
    create(
        &fx,
        "/vms/lost",
        "mode=wait",
        "[resources]\npool = \"nope\"\n",
    );

    let a = fx.start("/vms/a", &[]);
    a.expect_console("spin: started");
    fx.fails(
        &["vm", "start", "/vms/b"],
        &[&format!(
            "cannot power on /vms/b: its CPU reservation of 10% of a core does not fit in pool {pool}: the pool reserves 20% of a core and its running VMs have 15% of a core of it, leaving 5% of a core"
        )],
    );
    fx.fails(
        &["vm", "start", "/vms/lost"],
        &["pool \"nope\": this host has no such pool"],
    );

    // The pool's group holds the VM's, with the pool's shares and limits on it.
    let group = format!("/sys/fs/cgroup/cpu/vapp/pool-{pool}");
    let read = |f: &str| std::fs::read_to_string(f).unwrap().trim().to_string();
    assert_eq!(read(&format!("{group}/cpu.shares")), "2000");
    assert_eq!(read(&format!("{group}/cpu.cfs_quota_us")), "50000");
    assert_eq!(
        read(&format!(
            "/sys/fs/cgroup/memory/vapp/pool-{pool}/memory.limit_in_bytes"
        )),
        (512u64 << 20).to_string()
    );
    assert!(
        Path::new(&format!("{group}/_vms_a-{}", a.pid())).is_dir(),
        "the VM's group is not inside the pool's"
    );

    let out = fx.ok(&["host", "resources", "--json", "--interval", "2"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pools = report["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 1, "{report}");
    assert_eq!(pools[0]["name"], pool.as_str());
    assert_eq!(pools[0]["vms"], serde_json::json!(["/vms/a"]));
    // The spinning VM is held to the pool's half core.
    let used = pools[0]["cpu_used_permille"].as_u64().unwrap();
    assert!(
        (1..=550).contains(&used),
        "the pool used {used} per mille of a core under a 50% limit"
    );
    let text = fx.ok(&["host", "resources", "--interval", "0.2"]);
    assert!(
        text.contains(&format!(
            "  pool {pool}: CPU shares 2000, res 20%, limit 50%"
        )) && text.contains("    /vms/a"),
        "{text}"
    );

    // The pool's last VM takes the pool's group with it.
    fx.ok(&["vm", "stop", "--force", "/vms/a"]);
    a.wait();
    assert!(
        !Path::new(&group).exists(),
        "{group} outlived the pool's last VM"
    );
}
