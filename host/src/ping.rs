//! ICMP echo to a VM from a port of its own on one of this host's networks: a tap on the
//! network's bridge through which this process speaks ARP and ICMP itself. The host's IP
//! stack, addresses and routes play no part, so a probe on an isolated network (a DR
//! drill's) reaches that network and nothing else, whatever addresses its VMs share with
//! production.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use hv::net::{MacAddr, Tap};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::network::{self, NetworkError};

const ETH_HLEN: usize = 14;
const ETHERTYPE_IP: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const BROADCAST: [u8; 6] = [0xff; 6];
/// The echo identifier of this prober's requests ("vp").
const ECHO_ID: u16 = 0x7670;
/// How often an unanswered ARP request or echo request is sent again.
const RESEND: Duration = Duration::from_millis(200);

/// A VM's answer to [`Prober::ping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The MAC that answered ARP for the address and then the echo request.
    pub mac: MacAddr,
    /// From the echo request sent to its reply.
    pub rtt: Duration,
}

/// A port of this process on a network; it leaves the network when dropped.
pub struct Prober {
    tap: Tap,
    mac: MacAddr,
    network: String,
    seq: u16,
}

impl Prober {
    /// Attaches tap `tap` with a fresh MAC to `network` (recorded as a port of `owner`).
    pub fn attach(network: &str, tap: &str, owner: &str) -> Result<Prober, NetworkError> {
        let mac = MacAddr::random();
        let tap = network::attach(network, owner, mac, tap)?;
        Ok(Prober {
            tap,
            mac,
            network: network.to_string(),
            seq: 0,
        })
    }

    pub fn network(&self) -> &str {
        &self.network
    }

    pub fn tap(&self) -> &str {
        self.tap.name()
    }

    /// Resolves `target` by ARP and sends it echo requests from `source` until one is
    /// answered or `timeout` passes (then `None`).
    pub fn ping(
        &mut self,
        target: Ipv4Addr,
        source: Ipv4Addr,
        timeout: Duration,
    ) -> io::Result<Option<Reply>> {
        let deadline = Instant::now() + timeout;
        let mut peer: Option<MacAddr> = None;
        let mut sent: Option<(Instant, u16)> = None;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            let due = sent.is_none_or(|(at, _)| at.elapsed() >= RESEND);
            if due {
                match peer {
                    None => self
                        .tap
                        .write_frame(&arp_request(self.mac, source, target))?,
                    Some(mac) => {
                        self.seq = self.seq.wrapping_add(1);
                        self.tap
                            .write_frame(&echo_request(self.mac, source, mac, target, self.seq))?
                    }
                };
                sent = Some((Instant::now(), self.seq));
            }
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(RESEND.saturating_sub(sent.map_or(Duration::ZERO, |(at, _)| at.elapsed())));
            self.wait_readable(wait)?;
            loop {
                let n = match self.tap.read_frame(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                };
                let frame = &buf[..n];
                // A guest that resolves the probe's address before it answers (Linux
                // does, unless our request already taught it) is told where it is.
                if let Some((mac, ip)) = arp_request_for(frame, source) {
                    self.tap
                        .write_frame(&arp_reply(self.mac, source, mac, ip))?;
                }
                match peer {
                    None => {
                        if let Some(mac) = arp_reply_from(frame, self.mac, target) {
                            peer = Some(mac);
                            // Echo at once rather than at the next resend.
                            sent = None;
                        }
                    }
                    Some(mac) => {
                        if let Some((at, seq)) = sent
                            && echo_reply_from(frame, self.mac, target, source, seq)
                        {
                            return Ok(Some(Reply {
                                mac,
                                rtt: at.elapsed(),
                            }));
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    fn wait_readable(&self, wait: Duration) -> io::Result<()> {
        let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.tap.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The address a probe of `target` speaks from when none is given: the last of the
/// target's /24 that is not the target (x.y.z.254, or .253 for .254), so a guest that
/// answers only its own subnet answers it.
pub fn default_source(target: Ipv4Addr) -> Ipv4Addr {
    let [a, b, c, d] = target.octets();
    Ipv4Addr::new(a, b, c, if d == 254 { 253 } else { 254 })
}

fn ethernet(dst: [u8; 6], src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len().max(46));
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    // Padded to the 60-byte minimum a NIC sends.
    f.resize(f.len().max(60), 0);
    f
}

fn arp(op: u16, mac: MacAddr, source: Ipv4Addr, dst: [u8; 6], target: Ipv4Addr) -> Vec<u8> {
    let mut a = Vec::with_capacity(28);
    a.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    a.extend_from_slice(&ETHERTYPE_IP.to_be_bytes());
    a.extend_from_slice(&[6, 4]);
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&mac.0);
    a.extend_from_slice(&source.octets());
    a.extend_from_slice(&if op == 1 { [0; 6] } else { dst });
    a.extend_from_slice(&target.octets());
    ethernet(dst, mac, ETHERTYPE_ARP, &a)
}

fn arp_request(mac: MacAddr, source: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    arp(1, mac, source, BROADCAST, target)
}

fn arp_reply(mac: MacAddr, source: Ipv4Addr, to: MacAddr, to_ip: Ipv4Addr) -> Vec<u8> {
    arp(2, mac, source, to.0, to_ip)
}

/// The asker's MAC and address if `frame` is an ARP request for `ip`.
fn arp_request_for(frame: &[u8], ip: Ipv4Addr) -> Option<(MacAddr, Ipv4Addr)> {
    let a = frame.get(ETH_HLEN..ETH_HLEN + 28)?;
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let op = u16::from_be_bytes([a[6], a[7]]);
    if ethertype != ETHERTYPE_ARP || op != 1 || a[24..28] != ip.octets() {
        return None;
    }
    let mut sender = [0u8; 6];
    sender.copy_from_slice(&a[8..14]);
    let sender_ip = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
    Some((MacAddr(sender), sender_ip))
}

/// The sender's MAC if `frame` is an ARP reply to `mac` saying where `target` is.
fn arp_reply_from(frame: &[u8], mac: MacAddr, target: Ipv4Addr) -> Option<MacAddr> {
    let a = frame.get(ETH_HLEN..ETH_HLEN + 28)?;
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let op = u16::from_be_bytes([a[6], a[7]]);
    if ethertype != ETHERTYPE_ARP || op != 2 || a[14..18] != target.octets() || a[18..24] != mac.0 {
        return None;
    }
    let mut sender = [0u8; 6];
    sender.copy_from_slice(&a[8..14]);
    Some(MacAddr(sender))
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn echo_request(
    mac: MacAddr,
    source: Ipv4Addr,
    dst: MacAddr,
    target: Ipv4Addr,
    seq: u16,
) -> Vec<u8> {
    let payload = b"vapp dr ping probe";
    let mut icmp = Vec::with_capacity(8 + payload.len());
    icmp.extend_from_slice(&[8, 0, 0, 0]);
    icmp.extend_from_slice(&ECHO_ID.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let total = u16::try_from(20 + icmp.len()).unwrap_or(u16::MAX);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]); // id, don't fragment, TTL, ICMP
    ip.extend_from_slice(&source.octets());
    ip.extend_from_slice(&target.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ethernet(dst.0, mac, ETHERTYPE_IP, &ip)
}

/// Whether `frame` is the echo reply from `target` to `source` (at `mac`) for `seq`.
fn echo_reply_from(
    frame: &[u8],
    mac: MacAddr,
    target: Ipv4Addr,
    source: Ipv4Addr,
    seq: u16,
) -> bool {
    let Some(ip) = frame.get(ETH_HLEN..) else {
        return false;
    };
    if frame[..6] != mac.0
        || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_IP
        || ip.len() < 28
        || ip[0] >> 4 != 4
        || ip[9] != 1
        || ip[12..16] != target.octets()
        || ip[16..20] != source.octets()
    {
        return false;
    }
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let Some(icmp) = ip.get(ihl..ihl + 8) else {
        return false;
    };
    icmp[0] == 0
        && u16::from_be_bytes([icmp[4], icmp[5]]) == ECHO_ID
        && u16::from_be_bytes([icmp[6], icmp[7]]) == seq
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_speaks_from_the_targets_subnet_but_never_as_the_target() {
        assert_eq!(
            default_source(Ipv4Addr::new(10, 9, 0, 1)),
            Ipv4Addr::new(10, 9, 0, 254)
        );
        assert_eq!(
            default_source(Ipv4Addr::new(10, 9, 0, 254)),
            Ipv4Addr::new(10, 9, 0, 253)
        );
    }

    #[test]
    fn the_probe_answers_arp_for_its_own_address_only() {
        let guest = MacAddr([0x52, 0x54, 0, 9, 9, 9]);
        let (probe_ip, guest_ip) = (Ipv4Addr::new(10, 0, 0, 254), Ipv4Addr::new(10, 0, 0, 1));
        let asked = arp_request(guest, guest_ip, probe_ip);
        assert_eq!(arp_request_for(&asked, probe_ip), Some((guest, guest_ip)));
        assert_eq!(arp_request_for(&asked, guest_ip), None);
        let probe = MacAddr([0x52, 0x54, 0, 1, 2, 3]);
        let reply = arp_reply(probe, probe_ip, guest, guest_ip);
        assert_eq!(arp_reply_from(&reply, guest, probe_ip), Some(probe));
        assert_eq!(arp_request_for(&reply, probe_ip), None);
    }

    #[test]
    fn an_echo_request_carries_valid_checksums() {
        let mac = MacAddr([0x52, 0x54, 0, 1, 2, 3]);
        let f = echo_request(
            mac,
            Ipv4Addr::new(10, 0, 0, 254),
            mac,
            Ipv4Addr::new(10, 0, 0, 1),
            7,
        );
        let ip = &f[ETH_HLEN..ETH_HLEN + 20];
        assert_eq!(checksum(ip), 0);
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        assert_eq!(checksum(&f[ETH_HLEN + 20..ETH_HLEN + total]), 0);
    }
}
