use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::{IfReq, NetError, check_ifname};

const SIOCBRADDBR: libc::c_ulong = 0x89a0;
const SIOCBRDELBR: libc::c_ulong = 0x89a1;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// A Linux bridge as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    /// The interfaces enslaved to it.
    pub ports: Vec<String>,
}

fn control_socket(what: &'static str, name: &str) -> Result<OwnedFd, NetError> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetError::Os {
            what,
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl_name(request: libc::c_ulong, what: &'static str, name: &str) -> Result<(), NetError> {
    check_ifname(name)?;
    let socket = control_socket(what, name)?;
    let mut bytes = [0u8; 16];
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: the bridge ioctls taking a name read a NUL-terminated string of at most 16 bytes.
    if unsafe { libc::ioctl(socket.as_raw_fd(), request as _, bytes.as_ptr()) } < 0 {
        return Err(NetError::Os {
            what,
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

pub fn create_bridge(name: &str) -> Result<(), NetError> {
    ioctl_name(SIOCBRADDBR, "cannot create bridge", name)?;
    set_up(name)
}

/// Deletes bridge `name`, taking it down first as the kernel requires.
pub fn delete_bridge(name: &str) -> Result<(), NetError> {
    set_flags(name, 0, libc::IFF_UP as i16, "cannot take down bridge")?;
    ioctl_name(SIOCBRDELBR, "cannot delete bridge", name)
}

/// Enslaves `interface` to `bridge`.
pub fn add_interface(bridge: &str, interface: &str) -> Result<(), NetError> {
    let index = ifindex(interface)?;
    let socket = control_socket("cannot add a port to bridge", bridge)?;
    let mut req = IfReq::new(bridge)?;
    req.set_int(index as i32);
    // SAFETY: SIOCBRADDIF reads a struct ifreq with ifr_ifindex set.
    if unsafe { libc::ioctl(socket.as_raw_fd(), SIOCBRADDIF as _, &mut req) } < 0 {
        return Err(NetError::Os {
            what: "cannot add a port to bridge",
            name: format!("{bridge} ({interface})"),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn set_flags(name: &str, set: i16, clear: i16, what: &'static str) -> Result<(), NetError> {
    let socket = control_socket(what, name)?;
    let mut req = IfReq::new(name)?;
    let os = |source| NetError::Os {
        what,
        name: name.to_string(),
        source,
    };
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write a struct ifreq.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(os(io::Error::last_os_error()));
    }
    let flags = (req.short() | set) & !clear;
    req.set_short(flags);
    // SAFETY: as above.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut req) } < 0 {
        return Err(os(io::Error::last_os_error()));
    }
    Ok(())
}

/// Brings interface `name` up.
pub fn set_up(name: &str) -> Result<(), NetError> {
    set_flags(name, libc::IFF_UP as i16, 0, "cannot bring up interface")
}

fn ifindex(name: &str) -> Result<u32, NetError> {
    check_ifname(name)?;
    let c_name = std::ffi::CString::new(name).map_err(|_| NetError::BadName {
        name: name.to_string(),
        reason: "contains NUL".to_string(),
    })?;
    // SAFETY: a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(NetError::Os {
            what: "no interface",
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(index)
}

pub fn interface_exists(name: &str) -> bool {
    check_ifname(name).is_ok() && Path::new("/sys/class/net").join(name).exists()
}

/// Whether `name` is a bridge; with its ports when it is.
pub fn bridge_exists(name: &str) -> Option<Bridge> {
    check_ifname(name).ok()?;
    let dir = Path::new("/sys/class/net").join(name);
    if !dir.join("bridge").is_dir() {
        return None;
    }
    let mut ports: Vec<String> = std::fs::read_dir(dir.join("brif"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    ports.sort();
    Some(Bridge {
        name: name.to_string(),
        ports,
    })
}
