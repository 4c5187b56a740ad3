//! Two sites for the DR tests: site A runs protected test-guest VMs on a datastore
//! replicated to site B, where the plans run.
#![allow(dead_code, clippy::unwrap_used)]

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub use crate::replica_support::*;

pub fn kvm() -> bool {
    lun::prereq::require(
        lun::prereq::have_device("/dev/kvm"),
        "/dev/kvm (read-write) for booting guests",
    )
}

/// Two sites replicating A's datastore LUN to B (`extra` given to both creates), a
/// datastore "prod" formatted at A through its daemon with the test guest VMs `db`
/// (counter mode, writing) and `web` (waiting), and `db` running at A.
pub struct Protected {
    pub sites: Sites,
    pub a: String,
    pub b: String,
    pub db_console: String,
    pub db: Child,
}

impl Drop for Protected {
    fn drop(&mut self) {
        let _ = self.db.kill();
        let _ = self.db.wait();
    }
}

pub fn protected(extra: &[&str]) -> Protected {
    let sites = Sites::new();
    let (sa, sb) = (&sites.a, &sites.b);
    let a = sa.lun("a.lun", 256 * MIB);
    let b = sb.lun("b.lun", 256 * MIB);
    sa.secret("secret", "dr test secret");
    sb.secret("secret", "dr test secret");
    sb.create(&b, "secondary", sa, extra);
    sa.create(&a, "primary", sb, extra);
    sa.wait_in_sync(&a, Duration::from_secs(60));
    sa.ok(&["datastore", "format", &a, "--name", "prod"]);
    let guest = sa.p("guest.elf");
    sa.ok(&["vm", "test-guest", &guest]);
    for (vm, cmdline) in [
        ("/vms/db", "mode=counter counter_sectors=64"),
        ("/vms/web", "mode=wait"),
    ] {
        sa.ok(&[
            "-d",
            &a,
            "vm",
            "create",
            vm,
            "--kernel",
            &guest,
            "--vcpus",
            "1",
            "--memory",
            "64M",
            "--cmdline",
            cmdline,
            "--disk",
            "4M",
        ]);
    }
    let db_console = sa.p("db.console");
    let db = sa
        .command()
        .args([
            "-d",
            &a,
            "vm",
            "start",
            "/vms/db",
            "--foreground",
            "--console-log",
            &db_console,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Protected {
        sites,
        a,
        b,
        db_console,
        db,
    };
    wait_counter(&p.db_console, 256);
    p
}

/// The last counter value A's `db` printed.
pub fn counter(console: &str) -> u64 {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("vapp-testguest: counter: "))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

pub fn wait_counter(console: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = counter(console);
        if n >= at_least {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "A's db VM wrote only {n} counters: {}",
            std::fs::read_to_string(console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn write_plan(p: &Protected, vms: &str) -> String {
    write_plan_at(&p.sites.b, &p.b, vms)
}

/// A plan named "prod" kept at `site`, protecting datastore "prod" replicated on `lun`.
pub fn write_plan_at(site: &Site, lun: &str, vms: &str) -> String {
    let plan = format!(
        r#"name = "prod"
rpo_target_s = 30
rto_target_s = 120
[[replica]]
lun = "{lun}"
[[datastore]]
name = "prod"
lun = "{lun}"
{vms}"#
    );
    let path = site.p("plan.toml");
    std::fs::write(&path, plan).unwrap();
    path
}

pub const VMS: &str = r#"
[[vm]]
path = "/vms/db"
datastore = "prod"
priority = 1
verify.console = "counter: started"
[[vm]]
path = "/vms/web"
datastore = "prod"
priority = 2
verify.ready = true
"#;

/// `vapp ARGS` at `site` in a mount namespace of its own where `other`'s directory is an
/// empty tmpfs: as on two real sites, this site cannot reach the other's LUNs (so a
/// replica stands in for its original with the original's signature).
pub fn isolated(site: &Site, other: &Site, args: &[&str]) -> std::process::Output {
    let script = format!(
        "mount -t tmpfs dr-hidden {} && exec \"$0\" \"$@\"",
        other.dir.display()
    );
    std::process::Command::new("ip")
        .args([
            "netns", "exec", &site.ns, "unshare", "-m", "sh", "-c", &script,
        ])
        .arg(env!("CARGO_BIN_EXE_vapp"))
        .args(args)
        .env_remove("VAPP_DATASTORE")
        .env_remove("VAPP_KEEP_SIGNATURE")
        .env("VAPP_HOST_NAME", format!("site-{}", site.name))
        .env("VAPP_STATE_DIR", site.path("state"))
        .env("VAPP_RUNTIME_DIR", site.path("run"))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}
