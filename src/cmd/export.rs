//! `vapp export`: serve a LUN, or one file of a datastore, over NBD until Ctrl-C or SIGTERM.
//!
//! Prints the URL clients use on stdout once listening, so scripts can wait for it.
//! The first SIGINT/SIGTERM stops accepting, lets in-flight requests finish, flushes and
//! exits 0; a second one exits at once.
//!
//! With `-d DATASTORE`, the file is opened through the datastore's lock like a VM's disk:
//! exclusive for a writable export, read-only shared with `--read-only`, so a disk in use
//! cannot be exported for writing behind its user's back, and the export keeps anyone else
//! from writing it. Either way the datastore is mounted as a host: a lock lives on disk,
//! and only a host (heartbeat slot, journal) can hold one; a read-only mount could not
//! keep a VM from starting on a disk being copied. At shutdown the disk is flushed (data
//! and metadata committed), its lock released and the datastore closed cleanly; after a
//! second signal or a crash the next mount by this host replays its journal.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use lun::Lun;
use lun::nbd::{ExportConfig, ListenAddr, NbdServer, ShutdownHandle};
use nix::sys::signal::{SigSet, Signal};
use vmfs::{Access, Datastore};

#[derive(Args)]
pub struct ExportArgs {
    /// The LUN to serve: a file, a block device or an nbd:// URL. With -d DATASTORE, the path
    /// of a file inside that datastore (a virtual disk).
    pub lun: String,
    /// TCP address to listen on, HOST[:PORT] [default: 127.0.0.1:10809].
    #[arg(long, conflicts_with = "socket")]
    pub listen: Option<String>,
    /// Listen on this Unix domain socket instead of TCP.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Export name clients ask for (the default, empty name is always accepted too).
    #[arg(long, default_value = "")]
    pub name: String,
    /// Refuse writes (clients get EPERM). With -d, the file is opened read-only shared.
    #[arg(long)]
    pub read_only: bool,
    /// Allow listening on an address other than loopback. The NBD protocol has no
    /// authentication here: anyone who can reach the port can read and write the LUN.
    #[arg(long)]
    pub allow_remote: bool,
    /// Clients served at once.
    #[arg(long, default_value_t = 64)]
    pub max_clients: usize,
    /// With -d: this export's identity in the datastore's cluster.
    #[command(flatten)]
    pub host: super::HostIdentity,
}

pub fn run(datastore: Option<&str>, args: ExportArgs) -> anyhow::Result<ExitCode> {
    let addr = listen_addr(&args)?;
    // Before any thread exists, so every thread inherits the mask and the signals wait
    // for the one thread that handles them.
    let signals = termination_signals();
    signals
        .thread_block()
        .context("cannot block SIGINT/SIGTERM for orderly shutdown")?;
    match datastore {
        Some(spec) => export_datastore_file(spec, &args, &addr, signals)?,
        None => super::snapshot::export(&args.lun, args.read_only, |lun| {
            let trim = file_trim_granularity(&args.lun, &*lun);
            serve(lun, &args, &addr, signals, trim, None)
        })?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Why the host serving a datastore file fenced itself, if it did.
type FenceCheck<'a> = &'a (dyn Fn() -> Option<String> + Sync);

/// Serves `lun` until a signal stops the server, or until `fenced` reports that the host
/// fenced itself: then every write would fail, and a client is better told by a closed
/// connection than by an export that answers EIO forever. Returns once it is flushed.
fn serve(
    lun: Arc<dyn Lun>,
    args: &ExportArgs,
    addr: &ListenAddr,
    signals: SigSet,
    trim_granularity: Option<u32>,
    fenced: Option<FenceCheck<'_>>,
) -> anyhow::Result<()> {
    let name = lun.name().to_string();
    let config = ExportConfig {
        name: args.name.clone(),
        read_only: args.read_only,
        max_clients: args.max_clients,
        trim_granularity,
        ..Default::default()
    };
    let server = NbdServer::bind(lun, config, addr)?;
    spawn_signal_handler(signals, server.shutdown_handle())?;

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", server.url()).context("cannot write to stdout")?;
    stdout.flush().context("cannot write to stdout")?;
    drop(stdout);

    let Some(fenced) = fenced else {
        return server
            .serve()
            .with_context(|| format!("serving {name} failed"));
    };
    let shutdown = server.shutdown_handle();
    let served = AtomicBool::new(false);
    let fence = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            while !served.load(Ordering::Acquire) {
                if let Some(why) = fenced() {
                    tracing::error!(lun = %name, reason = %why, "host fenced: stopping the export");
                    shutdown.shutdown();
                    return Some(why);
                }
                std::thread::sleep(FENCE_POLL);
            }
            None
        });
        let result = server.serve();
        served.store(true, Ordering::Release);
        (result, watcher.join().ok().flatten())
    });
    match fence {
        (_, Some(why)) => bail!(
            "stopped serving {name}: this host fenced itself ({why}), so it may not write \
             the datastore any more; clients were disconnected"
        ),
        (result, None) => result.with_context(|| format!("serving {name} failed")),
    }
}

/// How often a datastore export checks whether its host fenced itself: well inside the
/// renewal interval, so clients are cut off soon after the host stops writing.
const FENCE_POLL: Duration = Duration::from_millis(100);

/// Trims punch holes in a regular file: cheap, and the space goes back to its file
/// system. Block devices (zeroing may mean writing) and NBD LUNs keep their data.
fn file_trim_granularity(spec: &str, lun: &dyn Lun) -> Option<u32> {
    match lun::LunSpec::parse(spec) {
        Ok(lun::LunSpec::Path(path)) if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) => {
            Some(lun.sector_size().max(4096))
        }
        _ => None,
    }
}

fn export_datastore_file(
    spec: &str,
    args: &ExportArgs,
    addr: &ListenAddr,
    signals: SigSet,
) -> anyhow::Result<()> {
    let ds = super::datastore::open_datastore(spec, &args.host.open_options(false))?;
    let served = serve_datastore_file(&ds, spec, args, addr, signals);
    // Also after a failure: the host slot and the journal must be left clean.
    let closed = ds
        .close()
        .with_context(|| format!("{spec}: closing the datastore"));
    served.and(closed)
}

fn serve_datastore_file(
    ds: &Datastore,
    spec: &str,
    args: &ExportArgs,
    addr: &ListenAddr,
    signals: SigSet,
) -> anyhow::Result<()> {
    let path = args.lun.as_str();
    let cannot = || format!("cannot export {path} from datastore {spec}");
    let access = if args.read_only {
        Access::ReadOnly
    } else {
        Access::Exclusive
    };
    // Holds the file's lock until the server drops it, after the final flush. A disk
    // with snapshots is served through their engine; `PATH@NAME` is a snapshot.
    let (disk, attr) =
        super::vdisk_snapshot::open_for_serving(ds, path, access).with_context(cannot)?;
    tracing::info!(lun = spec, path, %access, size = attr.size, thick = attr.thick,
        "exporting a datastore file");
    // Trimming whole blocks of a thin disk frees them, a metadata-only change; on a thick
    // disk it would mean writing zeroes over them, and on a mapped device too (a device
    // without WRITE ZEROES falls back to writing them).
    let trim = (attr.kind == vmfs::Kind::File && !attr.thick).then_some(attr.block_size);
    serve(disk, args, addr, signals, trim, Some(&|| ds.fenced()))
}

fn termination_signals() -> SigSet {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
}

fn spawn_signal_handler(signals: SigSet, shutdown: ShutdownHandle) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            while let Ok(signal) = signals.wait() {
                seen += 1;
                if seen > 1 {
                    eprintln!("vapp export: {signal} again, exiting without waiting");
                    std::process::exit(130);
                }
                tracing::info!(%signal, "stopping: finishing requests in flight");
                shutdown.shutdown();
            }
        })
        .context("cannot start the signal handling thread")?;
    Ok(())
}

/// Where to listen; refuses anything but loopback unless `--allow-remote`.
fn listen_addr(args: &ExportArgs) -> anyhow::Result<ListenAddr> {
    if let Some(socket) = &args.socket {
        return Ok(ListenAddr::Unix(socket.clone()));
    }
    let spec = args.listen.as_deref().unwrap_or("127.0.0.1");
    let addr = parse_socket_addr(spec)?;
    if !addr.ip().is_loopback() && !args.allow_remote {
        bail!(
            "refusing to listen on {addr}: it is reachable from other hosts and NBD has no \
             authentication; pass --allow-remote if that is what you want"
        );
    }
    Ok(ListenAddr::Tcp(addr))
}

/// `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT`; the port defaults to 10809.
fn parse_socket_addr(spec: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bare = spec.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, lun::NBD_DEFAULT_PORT));
    }
    let with_port = if spec.contains(':') {
        spec.to_string()
    } else {
        format!("{spec}:{}", lun::NBD_DEFAULT_PORT)
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("invalid listen address {spec:?}"))?
        .next()
        .with_context(|| format!("listen address {spec:?} resolves to nothing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_with_default_port() {
        assert_eq!(
            parse_socket_addr("127.0.0.1").unwrap(),
            "127.0.0.1:10809".parse().unwrap()
        );
        assert_eq!(
            parse_socket_addr("[::1]").unwrap(),
            "[::1]:10809".parse().unwrap()
        );
        assert_eq!(parse_socket_addr("127.0.0.1:0").unwrap().port(), 0);
        assert!(
            parse_socket_addr("localhost:12345")
                .unwrap()
                .ip()
                .is_loopback()
        );
        assert!(parse_socket_addr("127.0.0.1:99999").is_err());
    }

    fn args(listen: Option<&str>, allow_remote: bool) -> ExportArgs {
        ExportArgs {
            lun: "disk.raw".into(),
            listen: listen.map(str::to_string),
            socket: None,
            name: String::new(),
            read_only: false,
            allow_remote,
            max_clients: 1,
            host: crate::cmd::HostIdentity {
                host_name: None,
                host_uuid: None,
            },
        }
    }

    #[test]
    fn loopback_by_default_and_remote_only_when_allowed() {
        let default = listen_addr(&args(None, false)).unwrap();
        assert_eq!(default, ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap()));
        let refused = listen_addr(&args(Some("0.0.0.0"), false)).unwrap_err();
        assert!(refused.to_string().contains("--allow-remote"), "{refused}");
        assert!(listen_addr(&args(Some("[::]:10809"), false)).is_err());
        assert!(listen_addr(&args(Some("0.0.0.0"), true)).is_ok());
        assert!(listen_addr(&args(Some("[::1]:10809"), false)).is_ok());
    }
}
