//! The file commands through the host agent: a real `vapp host run` joined to a datastore
//! that qemu-nbd serves, and `vapp` commands on that datastore with the agent's runtime
//! directory. They must change the datastore exactly as the same commands run directly do,
//! fail with the same line and exit status, and take no heartbeat slot of their own; a
//! datastore the agent has not joined is worked on directly, as before.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Short, so the direct commands' wait for a heartbeat slot (2 x this over NBD) is short.
const IO_TIMEOUT: &str = "500ms";
/// The host name of every command line process, so its slot, if it takes one, is found.
const CLI_HOST: &str = "cli-host";
const AGENT_HOST: &str = "agent-a";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Setup {
    dir: tempfile::TempDir,
    /// The datastore over NBD, which the agent joins.
    ds: String,
    // The agent goes first, so it never sees its LUN vanish.
    _agent: Killed,
    _nbd: Killed,
}

fn vapp(runtime: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vapp"));
    command
        .args(args)
        .env_remove("VAPP_DATASTORE")
        .env_remove("VAPP_HOST_UUID")
        .env_remove("VAPP_KEEP_SIGNATURE")
        .env("VAPP_HOST_NAME", CLI_HOST)
        .env("VAPP_RUNTIME_DIR", runtime)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let pipe = child.stdin.take();
    std::thread::scope(|scope| {
        if let (Some(mut pipe), Some(bytes)) = (pipe, stdin) {
            // A command that refuses its input closes it unread: not the test's failure.
            scope.spawn(move || {
                let _ = pipe.write_all(bytes);
            });
        }
        child.wait_with_output().unwrap()
    })
}

fn ok(runtime: &Path, args: &[&str]) -> String {
    let out = vapp(runtime, args, None);
    assert!(
        out.status.success(),
        "vapp {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn format(runtime: &Path, lun: &str) {
    ok(
        runtime,
        &[
            "datastore",
            "format",
            lun,
            "--name",
            "agentcli",
            "--io-timeout",
            IO_TIMEOUT,
        ],
    );
}

/// Names of the hosts that ever held a heartbeat slot on `lun` (live or since freed).
fn slot_holders(runtime: &Path, lun: &str) -> Vec<String> {
    let info: serde_json::Value =
        serde_json::from_str(&ok(runtime, &["datastore", "info", lun, "--json"])).unwrap();
    info["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["host_name"].as_str().unwrap().to_string())
        .collect()
}

fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Setup {
    /// qemu-nbd serving a fresh datastore file, and an agent that joined it; `None` when a
    /// tool is missing (and not under CI).
    fn new() -> Option<Setup> {
        if !lun::prereq::require(
            lun::prereq::have_command("qemu-nbd"),
            "qemu-nbd (Debian package qemu-utils)",
        ) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lun.raw");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        let socket = dir.path().join("nbd.sock");
        let nbd = Killed(
            Command::new("qemu-nbd")
                .args(["-f", "raw", "--cache=unsafe", "--persistent", "--shared=32"])
                .arg("-k")
                .arg(&socket)
                .arg(&file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_for("qemu-nbd listening", Duration::from_secs(15), || {
            socket.exists()
        });
        let ds = format!("nbd+unix:///?socket={}", socket.display());
        let runtime = dir.path().join("agent-run");
        format(&runtime, &ds);
        let config = dir.path().join("host.toml");
        std::fs::write(
            &config,
            format!(
                "name = \"{AGENT_HOST}\"\ndatastores = [\"{ds}\"]\nruntime_dir = \"{}\"\n",
                runtime.display()
            ),
        )
        .unwrap();
        let agent = Killed(
            Command::new(env!("CARGO_BIN_EXE_vapp"))
                .args(["host", "run", "--config"])
                .arg(&config)
                .env_remove("VAPP_DATASTORE")
                .env_remove("VAPP_HOST_UUID")
                .env("VAPP_RUNTIME_DIR", &runtime)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let sock = runtime.join("agent.sock");
        wait_for("the agent's API socket", Duration::from_secs(60), || {
            sock.exists()
        });
        Some(Setup {
            dir,
            ds,
            _agent: agent,
            _nbd: nbd,
        })
    }

    /// The runtime directory where the agent serves its socket.
    fn agent_runtime(&self) -> PathBuf {
        self.dir.path().join("agent-run")
    }

    /// A runtime directory with no agent in it: the commands run by themselves.
    fn no_agent_runtime(&self) -> PathBuf {
        self.dir.path().join("no-agent-run")
    }
}

/// The same commands under `root`, with their exit status, standard output and error
/// (with `root` written as ROOT, so two roots compare).
fn script(setup: &Setup, runtime: &Path, root: &str, local: &Path, data: &[u8]) -> Vec<String> {
    let ds = setup.ds.as_str();
    let local = local.to_str().unwrap();
    let sub = format!("{root}/sub");
    let steps: Vec<(Vec<String>, Option<&[u8]>)> = vec![
        (vec!["mkdir".into(), root.into()], None),
        // Exists already: an error, and nothing changes.
        (vec!["mkdir".into(), root.into()], None),
        (
            vec!["mkdir".into(), "-p".into(), format!("{sub}/deep")],
            None,
        ),
        (vec!["put".into(), local.into(), format!("{root}/")], None),
        (
            vec!["put".into(), "-".into(), format!("{root}/stdin.bin")],
            Some(data),
        ),
        // Standard input has no name to copy under into a directory.
        (
            vec!["put".into(), "-".into(), format!("{root}/")],
            Some(data),
        ),
        // The input cannot be read: the error names the read's own cause.
        (
            vec![
                "put".into(),
                setup.dir.path().to_str().unwrap().into(),
                format!("{root}/a-directory"),
            ],
            None,
        ),
        (
            vec!["mv".into(), format!("{root}/data.bin"), sub.clone()],
            None,
        ),
        (
            vec!["mv".into(), format!("{root}/missing"), sub.clone()],
            None,
        ),
        (
            vec![
                "vdisk".into(),
                "create".into(),
                format!("{root}/disk.vdisk"),
                "--size".into(),
                "1M".into(),
            ],
            None,
        ),
        (vec!["rm".into(), root.into()], None),
        (vec!["rm".into(), format!("{root}/stdin.bin")], None),
    ];
    let mut transcript = Vec::new();
    for (args, stdin) in steps {
        let mut full = vec!["-d", ds];
        full.extend(args.iter().map(String::as_str));
        let out = vapp(runtime, &full, stdin);
        transcript.push(
            format!(
                "{args:?} -> {:?}\nout: {}err: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .replace(root, "ROOT"),
        );
    }
    transcript
}

fn get(runtime: &Path, ds: &str, path: &str) -> Vec<u8> {
    let out = vapp(runtime, &["-d", ds, "get", path, "-"], None);
    assert!(
        out.status.success(),
        "get {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn file_commands_through_the_agent_do_what_direct_ones_do_without_a_slot_of_their_own() {
    let Some(setup) = Setup::new() else { return };
    let local = setup.dir.path().join("data.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&local, &data).unwrap();
    let agent = setup.agent_runtime();
    let direct = setup.no_agent_runtime();

    let through = script(&setup, &agent, "/via-agent", &local, &data);
    assert!(
        !slot_holders(&agent, &setup.ds).contains(&CLI_HOST.to_string()),
        "a command run through the agent took a heartbeat slot of its own: {:?}",
        slot_holders(&agent, &setup.ds)
    );
    let by_itself = script(&setup, &direct, "/direct", &local, &data);
    assert_eq!(through, by_itself, "through the agent vs by itself");
    assert!(
        slot_holders(&agent, &setup.ds).contains(&CLI_HOST.to_string()),
        "the direct commands should have taken a slot (the test would prove nothing)"
    );
    // Spot checks that the transcript is what a user expects, not only equal.
    assert!(through[1].contains("Some(1)") && through[1].contains("ROOT: already exists"));
    assert!(
        through[5].contains("standard input has no name"),
        "{}",
        through[5]
    );
    assert!(
        through[6].contains("read failed: Is a directory (os error 21)"),
        "{}",
        through[6]
    );
    assert!(through[10].contains("Some(1)") && through[10].contains("not empty"));

    // The bytes read back (by either way) are the bytes put.
    for root in ["/via-agent", "/direct"] {
        assert_eq!(
            get(&direct, &setup.ds, &format!("{root}/sub/data.bin")),
            data
        );
        let listing = ok(&direct, &["-d", &setup.ds, "ls", root]);
        assert_eq!(listing, "disk.vdisk\nsub\n", "{root}");
        let stat: serde_json::Value = serde_json::from_str(&ok(
            &direct,
            &[
                "-d",
                &setup.ds,
                "stat",
                &format!("{root}/disk.vdisk"),
                "--json",
            ],
        ))
        .unwrap();
        assert_eq!(stat["vdisk"], true);
        assert_eq!(stat["size"], 1 << 20);
    }
    // What the agent did is seen at once by another reader, and rm -r through it removes.
    let out = vapp(&agent, &["-d", &setup.ds, "rm", "-r", "/via-agent"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = vapp(&direct, &["-d", &setup.ds, "ls", "/via-agent"], None);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "vapp: /via-agent: no such file or directory\n"
    );
}

#[test]
fn a_datastore_the_agent_has_not_joined_is_worked_on_directly() {
    let Some(setup) = Setup::new() else { return };
    let agent = setup.agent_runtime();
    let other = setup.dir.path().join("other.vmfs");
    let other = other.to_str().unwrap();
    ok(
        &agent,
        &[
            "datastore",
            "format",
            other,
            "--name",
            "other",
            "--size",
            "256M",
        ],
    );
    ok(&agent, &["-d", other, "mkdir", "/x"]);
    assert_eq!(ok(&agent, &["-d", other, "ls", "/"]), "x\n");
    assert_eq!(
        slot_holders(&agent, other),
        vec![CLI_HOST.to_string()],
        "the command should have mounted the datastore itself"
    );
    assert!(!ok(&agent, &["-d", &setup.ds, "ls", "/"]).contains('x'));
}

#[test]
fn a_put_through_the_agent_whose_command_is_killed_leaves_no_file() {
    let Some(setup) = Setup::new() else { return };
    let agent = setup.agent_runtime();
    let mut put = Command::new(env!("CARGO_BIN_EXE_vapp"))
        .args(["-d", &setup.ds, "put", "-", "/cut.bin"])
        .env_remove("VAPP_DATASTORE")
        .env("VAPP_HOST_NAME", CLI_HOST)
        .env("VAPP_RUNTIME_DIR", &agent)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = put.stdin.take().unwrap();
    input.write_all(&vec![7u8; 1 << 20]).unwrap();
    // The agent is copying once its temporary file exists.
    wait_for(
        "the temporary file of the copy",
        Duration::from_secs(30),
        || ok(&agent, &["-d", &setup.ds, "ls", "/"]).contains(".cut.bin.vapp-put."),
    );
    put.kill().unwrap();
    put.wait().unwrap();
    drop(input);
    // Only the agents' host records (`/.vapp/hosts/<name>`) may remain at the root.
    wait_for("the temporary file removed", Duration::from_secs(5), || {
        ok(&agent, &["-d", &setup.ds, "ls", "/"])
            .lines()
            .all(|name| name == ".vapp")
    });
    assert!(
        !slot_holders(&agent, &setup.ds).contains(&CLI_HOST.to_string()),
        "the put should have run in the agent"
    );
}

#[test]
fn concurrent_puts_of_one_file_name_through_the_agent_all_succeed() {
    let Some(setup) = Setup::new() else { return };
    let agent = setup.agent_runtime();
    ok(&agent, &["-d", &setup.ds, "mkdir", "/in"]);
    let local = setup.dir.path().join("same.bin");
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(&local, &data).unwrap();
    let local = local.to_str().unwrap();
    // Into the directory and by full path: both land on /in/same.bin.
    let outputs: Vec<Output> = std::thread::scope(|scope| {
        let runs: Vec<_> = ["/in/", "/in/same.bin", "/in/", "/in/same.bin"]
            .into_iter()
            .map(|to| scope.spawn(|| vapp(&agent, &["-d", &setup.ds, "put", local, to], None)))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for out in outputs {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(ok(&agent, &["-d", &setup.ds, "ls", "/in"]), "same.bin\n");
    assert_eq!(get(&agent, &setup.ds, "/in/same.bin"), data);
}
