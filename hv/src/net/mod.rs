//! Host side of VM networking: tap devices, the Linux bridges networks are made of, MAC
//! addresses and the token buckets that limit a VM's traffic.
//!
//! Everything here speaks to the kernel through the classic ioctls (TUNSETIFF, SIOCBRADDBR,
//! SIOCBRADDIF, SIOCSIFFLAGS), which need CAP_NET_ADMIN and nothing else.

mod bridge;
mod mac;
mod rate;
mod tap;

pub use bridge::{
    Bridge, add_interface, bridge_exists, create_bridge, delete_bridge, interface_exists, set_up,
};
pub use mac::MacAddr;
pub use rate::{RateLimit, TokenBucket};
pub use tap::Tap;

use std::io;

/// Linux's limit on an interface name, without the terminating NUL.
pub const IFNAME_MAX: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what} {name}{hint}", hint = permission_hint(source))]
    Os {
        what: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("interface name {name:?} is invalid: {reason}")]
    BadName { name: String, reason: String },
    #[error("MAC address {text:?} is invalid: {reason}")]
    BadMac { text: String, reason: String },
}

fn permission_hint(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => " (this needs CAP_NET_ADMIN: run vapp as root)",
        _ => "",
    }
}

/// Checks `name` is a usable interface name.
pub fn check_ifname(name: &str) -> Result<(), NetError> {
    let bad = |reason: &str| NetError::BadName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > IFNAME_MAX {
        return Err(bad(&format!("longer than {IFNAME_MAX} bytes")));
    }
    if name == "." || name == ".." {
        return Err(bad("reserved"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(bad("only letters, digits, '-', '_' and '.' are allowed"));
    }
    Ok(())
}

/// struct ifreq: a name and a 24-byte union of which we use a flags short or an int index.
#[repr(C)]
pub(crate) struct IfReq {
    pub name: [u8; 16],
    pub data: [u8; 24],
}

impl IfReq {
    pub fn new(name: &str) -> Result<IfReq, NetError> {
        check_ifname(name)?;
        let mut req = IfReq {
            name: [0; 16],
            data: [0; 24],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(req)
    }

    pub fn set_short(&mut self, value: i16) {
        self.data[..2].copy_from_slice(&value.to_ne_bytes());
    }

    pub fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    pub fn set_int(&mut self, value: i32) {
        self.data[..4].copy_from_slice(&value.to_ne_bytes());
    }
}
