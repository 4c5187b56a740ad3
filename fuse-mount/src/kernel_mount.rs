//! Creating the FUSE mount: mount(2) as root, the setuid `fusermount3` otherwise.
//!
//! fuser can mount too, but the `Mount` it then keeps unmounts the path again when the
//! session ends, and in 0.18 its "is it still mounted" check is inverted: after an external
//! unmount it would unmount whatever is mounted there by then (a new mount of the same
//! datastore, say). Mounting here and handing fuser only the /dev/fuse descriptor leaves it
//! nothing to unmount; `mounts::unmount` is the one way out.

use std::fs::File;
use std::io::{self, IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::mount::MsFlags;
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, socketpair,
};

/// How the file system is mounted.
pub(crate) struct KernelOptions<'a> {
    /// The mount table's source column: the datastore LUN.
    pub source: &'a str,
    pub read_only: bool,
    pub allow_other: bool,
}

/// Mounts a FUSE file system of type `fuse.vapp` on `mountpoint` and returns the connection's
/// /dev/fuse descriptor; the kernel's INIT request is waiting on it.
pub(crate) fn mount(mountpoint: &Path, options: &KernelOptions<'_>) -> io::Result<OwnedFd> {
    if nix::unistd::geteuid().is_root() {
        mount_syscall(mountpoint, options)
    } else {
        mount_fusermount(mountpoint, options)
    }
}

fn mount_syscall(mountpoint: &Path, options: &KernelOptions<'_>) -> io::Result<OwnedFd> {
    let root_type = std::fs::metadata(mountpoint)?.mode() & libc::S_IFMT;
    let dev: OwnedFd = File::options()
        .read(true)
        .write(true)
        .open("/dev/fuse")?
        .into();
    // The kernel checks permissions against the mode, owner and group stored in vmfs.
    let mut data = format!(
        "fd={},rootmode={root_type:o},user_id={},group_id={},default_permissions",
        dev.as_raw_fd(),
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    if options.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME;
    if options.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(
        Some(options.source),
        mountpoint,
        Some("fuse.vapp"),
        flags,
        Some(data.as_str()),
    )?;
    Ok(dev)
}

/// fusermount3 opens /dev/fuse, mounts, and passes the descriptor back over a socket named
/// by `_FUSE_COMMFD` (libfuse's protocol).
fn mount_fusermount(mountpoint: &Path, options: &KernelOptions<'_>) -> io::Result<OwnedFd> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    // fusermount3 must inherit its end.
    fcntl(&theirs, FcntlArg::F_SETFD(FdFlag::empty()))?;
    let mut opts = format!(
        "{},nosuid,nodev,noatime,default_permissions,subtype=vapp,fsname={}",
        if options.read_only { "ro" } else { "rw" },
        escape_option(options.source)
    );
    if options.allow_other {
        opts.push_str(",allow_other");
    }
    let mut child = Command::new("fusermount3")
        .arg("-o")
        .arg(&opts)
        .arg("--")
        .arg(mountpoint)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("running fusermount3: {e}")))?;
    drop(theirs);
    let received = receive_fd(ours.as_raw_fd());
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let status = child.wait()?;
    match received {
        Ok(Some(fd)) if status.success() => Ok(fd),
        Ok(_) => Err(io::Error::other(format!(
            "fusermount3 failed ({status}): {}",
            stderr.trim()
        ))),
        Err(e) => Err(io::Error::other(format!(
            "fusermount3 passed no descriptor ({e}): {}",
            stderr.trim()
        ))),
    }
}

fn receive_fd(socket: RawFd) -> io::Result<Option<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        socket,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor in our table for us.
                return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
    }
    Ok(None)
}

/// libfuse's option syntax escapes commas and backslashes in values.
fn escape_option(value: &str) -> String {
    value.replace('\\', "\\\\").replace(',', "\\,")
}

/// Lets the kernel read ahead one datastore block instead of its 128 KiB default, which FUSE
/// cannot raise during INIT. Best effort: only root may, and only through sysfs.
pub(crate) fn set_read_ahead(major: u32, minor: u32, kib: u32) {
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, kib.to_string()) {
        tracing::debug!(%path, error = %e, "read-ahead left at the kernel default");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_escape_commas_and_backslashes() {
        assert_eq!(escape_option("/srv/a,b\\c"), "/srv/a\\,b\\\\c");
        assert_eq!(escape_option("nbd://h:1/x"), "nbd://h:1/x");
    }
}
