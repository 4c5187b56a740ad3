//! `vapp host network ...`: the networks of this host that VMs name in vm.toml (`[[net]]
//! network = "NAME"`), each a Linux bridge the host owns (see `host::network`).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum NetworkCommand {
    /// Create network NAME: a bridge vb-NAME this host owns, with an optional uplink.
    Create(CreateArgs),
    /// This host's networks, their bridges, uplinks and the running VMs' NICs on them.
    List(ListArgs),
    /// Delete a network no running VM uses.
    Delete(DeleteArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// 1 to 12 lowercase letters, digits, '-' or '_'.
    name: String,
    /// An interface enslaved to the bridge so VMs reach the outside (it should carry no
    /// address of the host's: the bridge takes it over).
    #[arg(long, value_name = "IFACE")]
    uplink: Option<String>,
    /// A network of its own that nothing else reaches (e.g. one per DR drill): no uplink,
    /// never bridged to another.
    #[arg(long, conflicts_with = "uplink")]
    isolated: bool,
}

#[derive(Args)]
pub struct ListArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct DeleteArgs {
    name: String,
}

pub fn run(command: NetworkCommand) -> anyhow::Result<ExitCode> {
    match command {
        NetworkCommand::Create(args) => {
            let network = host::network::create(&args.name, args.uplink.as_deref(), args.isolated)?;
            let uplink = match (&network.uplink, network.isolated) {
                (Some(uplink), _) => format!("uplink {uplink}"),
                (None, true) => "isolated".to_string(),
                (None, false) => "no uplink".to_string(),
            };
            crate::outln!(
                "network {}: bridge {}, {uplink}",
                network.name,
                network.bridge
            )?;
        }
        NetworkCommand::List(args) => {
            let networks = host::network::list()?;
            if args.json {
                crate::outln!("{}", serde_json::to_string_pretty(&networks)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            crate::outln!(
                "{:<13} {:<16} {:<16} {:<8} NICS",
                "NETWORK",
                "BRIDGE",
                "UPLINK",
                "STATE"
            )?;
            for n in networks {
                let uplink = match (&n.network.uplink, n.network.isolated) {
                    (Some(uplink), _) => uplink.clone(),
                    (None, true) => "(isolated)".to_string(),
                    (None, false) => "-".to_string(),
                };
                let nics = n
                    .ports
                    .iter()
                    .map(|p| format!("{} {} ({})", p.vm, p.mac, p.tap))
                    .collect::<Vec<_>>()
                    .join(", ");
                crate::outln!(
                    "{:<13} {:<16} {:<16} {:<8} {}",
                    n.network.name,
                    n.network.bridge,
                    uplink,
                    if n.present { "up" } else { "missing" },
                    if nics.is_empty() { "-" } else { &nics }
                )?;
            }
        }
        NetworkCommand::Delete(args) => {
            host::network::delete(&args.name)
                .with_context(|| format!("cannot delete network {:?}", args.name))?;
            crate::outln!("network {}: deleted", args.name)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
