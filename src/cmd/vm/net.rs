//! A running VM's NICs: MACs kept in vm.toml, taps on this host's networks.

use anyhow::Context;
use tracing::info;
use vmfs::FileHandle;

use super::spec::VmSpec;

/// Gives every NIC without a MAC a fresh one and writes vm.toml back through `identity` (the
/// VM's exclusive handle on it), so the MAC is chosen once and kept on every host.
pub fn assign_macs(
    folder: &str,
    spec: &mut VmSpec,
    identity: &FileHandle,
    config_path: &str,
) -> anyhow::Result<()> {
    if spec.nets.iter().all(|n| n.mac.is_some()) {
        return Ok(());
    }
    for i in 0..spec.nets.len() {
        if spec.nets[i].mac.is_some() {
            continue;
        }
        let mac = loop {
            let mac = hv::net::MacAddr::random().to_string();
            if !spec
                .nets
                .iter()
                .any(|n| n.mac.as_deref() == Some(mac.as_str()))
            {
                break mac;
            }
        };
        info!(vm = %folder, nic = i, %mac, "MAC assigned");
        spec.nets[i].mac = Some(mac);
    }
    let text = spec.render().map_err(anyhow::Error::msg)?;
    let write = || -> vmfs::Result<()> {
        identity.truncate(0)?;
        identity.write_at(text.as_bytes(), 0)?;
        identity.sync()
    };
    write().with_context(|| format!("{config_path}: cannot record the NICs' MACs"))
}

/// A tap per NIC on its network, named after this process (unique on the host, and gone
/// with it).
/// `clock` is the VM's network scheduler slot, shared by all its NICs.
pub fn attach_nics(
    folder: &str,
    spec: &VmSpec,
    clock: &std::sync::Arc<sched::Clock>,
) -> anyhow::Result<Vec<hv::Nic>> {
    let mut nics = Vec::new();
    for (i, net) in spec.nets.iter().enumerate() {
        let mac = net
            .mac()
            .with_context(|| format!("vm {folder}: net {i} has no MAC"))?;
        let tap = format!("vapp{:x}n{i}", std::process::id());
        let tap = host::network::attach(&net.network, folder, mac, &tap)
            .with_context(|| format!("vm {folder}: net {i}"))?;
        nics.push(hv::Nic {
            tap,
            mac,
            rx: net.rx_limits(),
            tx: net.tx_limits(),
            clock: Some(clock.clone()),
        });
    }
    Ok(nics)
}
