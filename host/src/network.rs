//! This host's networks: a name that `[[net]]` in vm.toml refers to, mapped to a Linux bridge
//! the host creates and owns, with an optional uplink. A VM restarted on another host lands
//! on the network of the same name there.
//!
//! What the host owns is recorded in `$VAPP_STATE_DIR/networks/` (default /var/lib/vapp):
//! `<name>.toml` per network, and `<name>.ports/<tap>` per running VM's NIC (its MAC and VM),
//! all changed under `<name>.lock`. A port whose tap is gone (its VM ended, even killed with
//! -9: taps are not persistent) is ignored and cleaned up. A bridge lost with a host reboot is
//! created again from its record when a VM needs it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use hv::net::{self as hvnet, MacAddr, NetError, Tap};
use serde::{Deserialize, Serialize};

pub const STATE_DIR_ENV: &str = "VAPP_STATE_DIR";
const DEFAULT_STATE_DIR: &str = "/var/lib/vapp";
/// Network names become bridge names `vb-<name>`, which Linux limits to 15 bytes.
pub const MAX_NAME: usize = hvnet::IFNAME_MAX - BRIDGE_PREFIX.len();
const BRIDGE_PREFIX: &str = "vb-";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network {name:?}: {reason}")]
    Invalid { name: String, reason: String },
    #[error(
        "network {name:?} does not exist on this host (`vapp host network list`; create it with \
         `vapp host network create {name}`)"
    )]
    Unknown { name: String },
    #[error("network {name:?} already exists")]
    Exists { name: String },
    #[error("network {name:?}: MAC {mac} is already used by {holder} on this network")]
    MacInUse {
        name: String,
        mac: MacAddr,
        holder: String,
    },
    #[error("network {name:?}: {vms} VM NIC(s) still attached ({ports}); stop them first")]
    Busy {
        name: String,
        vms: usize,
        ports: String,
    },
    #[error("network {name:?}: {source}")]
    Net {
        name: String,
        #[source]
        source: NetError,
    },
    #[error("{path}: {source}")]
    State {
        path: String,
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, NetworkError>;

/// A network as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub name: String,
    pub bridge: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    #[serde(default)]
    pub isolated: bool,
}

/// A network and what the kernel says of it now.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkStatus {
    #[serde(flatten)]
    pub network: Network,
    /// The bridge exists (false after a host reboot until a VM needs it).
    pub present: bool,
    /// Running VM NICs: (tap, MAC, VM).
    pub ports: Vec<Port>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub tap: String,
    pub mac: String,
    pub vm: String,
}

pub fn state_dir() -> PathBuf {
    std::env::var_os(STATE_DIR_ENV)
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from)
}

fn networks_dir() -> PathBuf {
    state_dir().join("networks")
}

fn state_error(path: &Path) -> impl FnOnce(io::Error) -> NetworkError + '_ {
    move |source| NetworkError::State {
        path: path.display().to_string(),
        source,
    }
}

fn check_name(name: &str) -> Result<()> {
    let bad = |reason: String| NetworkError::Invalid {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(bad(format!(
            "a network name has 1 to {MAX_NAME} characters"
        )));
    }
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    if !first_ok
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(bad(
            "use lowercase letters, digits, '-' and '_', starting with a letter or digit"
                .to_string(),
        ));
    }
    Ok(())
}

/// The exclusive lock of one network's records, held while they change; released on drop.
struct Lock {
    _guard: nix::fcntl::Flock<File>,
}

fn lock(name: &str) -> Result<Lock> {
    let dir = networks_dir();
    fs::create_dir_all(&dir).map_err(state_error(&dir))?;
    let path = dir.join(format!("{name}.lock"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(state_error(&path))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map(|guard| Lock { _guard: guard })
        .map_err(|(_, e)| state_error(&path)(e.into()))
}

fn record_path(name: &str) -> PathBuf {
    networks_dir().join(format!("{name}.toml"))
}

fn ports_dir(name: &str) -> PathBuf {
    networks_dir().join(format!("{name}.ports"))
}

fn read_record(name: &str) -> Result<Option<Network>> {
    let path = record_path(name);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_error(&path)(e)),
    };
    toml::from_str(&text).map(Some).map_err(|e| {
        state_error(&path)(io::Error::new(
            io::ErrorKind::InvalidData,
            e.message().to_string(),
        ))
    })
}

fn net_error(name: &str) -> impl FnOnce(NetError) -> NetworkError + '_ {
    move |source| NetworkError::Net {
        name: name.to_string(),
        source,
    }
}

/// Creates bridge `vb-NAME` (with `uplink` enslaved) and records it.
pub fn create(name: &str, uplink: Option<&str>, isolated: bool) -> Result<Network> {
    check_name(name)?;
    let invalid = |reason: String| NetworkError::Invalid {
        name: name.to_string(),
        reason,
    };
    if isolated && uplink.is_some() {
        return Err(invalid(
            "an isolated network has no uplink: give --isolated or --uplink, not both".into(),
        ));
    }
    if let Some(uplink) = uplink {
        hvnet::check_ifname(uplink).map_err(net_error(name))?;
        if !hvnet::interface_exists(uplink) {
            return Err(invalid(format!("uplink {uplink}: no such interface")));
        }
        if hvnet::bridge_exists(uplink).is_some() {
            return Err(invalid(format!(
                "uplink {uplink} is a bridge: networks are never bridged to each other"
            )));
        }
        let master = Path::new("/sys/class/net").join(uplink).join("master");
        if let Ok(target) = fs::read_link(&master) {
            let owner = target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            return Err(invalid(format!(
                "uplink {uplink} already belongs to {owner}"
            )));
        }
    }
    let _lock = lock(name)?;
    if read_record(name)?.is_some() {
        return Err(NetworkError::Exists {
            name: name.to_string(),
        });
    }
    let network = Network {
        name: name.to_string(),
        bridge: format!("{BRIDGE_PREFIX}{name}"),
        uplink: uplink.map(str::to_string),
        isolated,
    };
    if hvnet::interface_exists(&network.bridge) {
        return Err(invalid(format!(
            "interface {} already exists and is not a network of this host",
            network.bridge
        )));
    }
    bring_up(&network)?;
    let path = record_path(name);
    let text = toml::to_string(&network)
        .map_err(|e| state_error(&path)(io::Error::other(e.to_string())))?;
    if let Err(e) = write_atomic(&path, text.as_bytes()) {
        let _ = hvnet::delete_bridge(&network.bridge);
        return Err(e);
    }
    Ok(network)
}

fn bring_up(network: &Network) -> Result<()> {
    hvnet::create_bridge(&network.bridge).map_err(net_error(&network.name))?;
    if let Some(uplink) = &network.uplink {
        let attached =
            hvnet::add_interface(&network.bridge, uplink).and_then(|()| hvnet::set_up(uplink));
        if let Err(e) = attached {
            let _ = hvnet::delete_bridge(&network.bridge);
            return Err(net_error(&network.name)(e));
        }
    }
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).map_err(state_error(&tmp))?;
    fs::rename(&tmp, path).map_err(state_error(path))
}

/// The live ports of `name`, removing the records of ports whose tap is gone.
fn live_ports(name: &str) -> Result<Vec<Port>> {
    let dir = ports_dir(name);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(state_error(&dir)(e)),
    };
    let mut ports = Vec::new();
    for entry in entries {
        let entry = entry.map_err(state_error(&dir))?;
        let path = entry.path();
        let Some(port) = fs::read_to_string(&path)
            .ok()
            .and_then(|text| toml::from_str::<Port>(&text).ok())
        else {
            let _ = fs::remove_file(&path);
            continue;
        };
        if hvnet::interface_exists(&port.tap) {
            ports.push(port);
        } else {
            let _ = fs::remove_file(&path);
        }
    }
    ports.sort_by(|a, b| a.tap.cmp(&b.tap));
    Ok(ports)
}

pub fn list() -> Result<Vec<NetworkStatus>> {
    let dir = networks_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(state_error(&dir)(e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            file.strip_suffix(".toml").map(str::to_string)
        })
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let Some(network) = read_record(&name)? else {
            continue;
        };
        out.push(NetworkStatus {
            present: hvnet::bridge_exists(&network.bridge).is_some(),
            ports: live_ports(&name)?,
            network,
        });
    }
    Ok(out)
}

/// Deletes the bridge and the record; refused while a VM's NIC is on it.
pub fn delete(name: &str) -> Result<()> {
    check_name(name)?;
    let _lock = lock(name)?;
    let Some(network) = read_record(name)? else {
        return Err(NetworkError::Unknown {
            name: name.to_string(),
        });
    };
    let ports = live_ports(name)?;
    if !ports.is_empty() {
        return Err(NetworkError::Busy {
            name: name.to_string(),
            vms: ports.len(),
            ports: ports
                .iter()
                .map(|p| format!("{} of {}", p.tap, p.vm))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    if hvnet::bridge_exists(&network.bridge).is_some() {
        hvnet::delete_bridge(&network.bridge).map_err(net_error(name))?;
    }
    let _ = fs::remove_dir_all(ports_dir(name));
    let path = record_path(name);
    fs::remove_file(&path).map_err(state_error(&path))?;
    let _ = fs::remove_file(networks_dir().join(format!("{name}.lock")));
    Ok(())
}

/// Checks that `name` exists and that no running VM on it has `mac`, then creates tap `tap`
/// on its bridge (bringing the bridge back first if the host lost it) and records the port.
/// The tap goes when its last descriptor closes; the record is cleaned up after that.
pub fn attach(name: &str, vm: &str, mac: MacAddr, tap: &str) -> Result<Tap> {
    check_name(name)?;
    let _lock = lock(name)?;
    let Some(network) = read_record(name)? else {
        return Err(NetworkError::Unknown {
            name: name.to_string(),
        });
    };
    let mac_text = mac.to_string();
    if let Some(port) = live_ports(name)?
        .into_iter()
        .find(|p| p.mac == mac_text && p.tap != tap)
    {
        return Err(NetworkError::MacInUse {
            name: name.to_string(),
            mac,
            holder: format!("vm {} (tap {})", port.vm, port.tap),
        });
    }
    if hvnet::bridge_exists(&network.bridge).is_none() {
        bring_up(&network)?;
    }
    let created = Tap::create(tap).map_err(net_error(name))?;
    hvnet::add_interface(&network.bridge, tap).map_err(net_error(name))?;
    let dir = ports_dir(name);
    fs::create_dir_all(&dir).map_err(state_error(&dir))?;
    let port = Port {
        tap: tap.to_string(),
        mac: mac_text,
        vm: vm.to_string(),
    };
    let path = dir.join(tap);
    let text =
        toml::to_string(&port).map_err(|e| state_error(&path)(io::Error::other(e.to_string())))?;
    write_atomic(&path, text.as_bytes())?;
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_a_bridge_name_and_are_plain() {
        assert!(check_name("prod").is_ok());
        assert!(check_name("drill-0_7").is_ok());
        assert!(check_name("abcdefghijkl").is_ok());
        assert!(check_name("abcdefghijklm").is_err());
        assert!(check_name("").is_err());
        assert!(check_name("-x").is_err());
        assert!(check_name("Prod").is_err());
        assert!(check_name("a/b").is_err());
    }
}
