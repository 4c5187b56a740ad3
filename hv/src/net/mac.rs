use std::fmt;
use std::str::FromStr;

use super::NetError;

/// An Ethernet address. Generated ones are locally administered unicast addresses under
/// the 52:54:00 prefix QEMU and libvirt use, so tools recognise them as a VM's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random address under 52:54:00.
    pub fn random() -> MacAddr {
        let mut bytes = [0u8; 3];
        // getrandom(2) cannot fail for 3 bytes once the pool is initialised; if it did, the
        // address would still be valid, only less likely to be unique, which `vapp` checks.
        // SAFETY: the buffer is ours and 3 bytes long.
        unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        MacAddr([0x52, 0x54, 0x00, bytes[0], bytes[1], bytes[2]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = NetError;

    fn from_str(text: &str) -> Result<MacAddr, NetError> {
        let bad = |reason: &str| NetError::BadMac {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = text.split(':').collect();
        if parts.len() != 6 {
            return Err(bad("expected six hex bytes separated by ':'"));
        }
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(bad("expected six hex bytes separated by ':'"));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad("not hexadecimal"))?;
        }
        if mac[0] & 1 != 0 {
            return Err(bad("a multicast address cannot be a NIC's"));
        }
        if mac == [0; 6] {
            return Err(bad("all zeroes"));
        }
        Ok(MacAddr(mac))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prints_and_refuses_what_a_nic_cannot_have() {
        let mac: MacAddr = "52:54:00:ab:CD:01".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:01");
        assert!("01:00:5e:00:00:01".parse::<MacAddr>().is_err());
        assert!("00:00:00:00:00:00".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:0g".parse::<MacAddr>().is_err());
        let random = MacAddr::random();
        assert_eq!(random.0[..3], [0x52, 0x54, 0x00]);
        assert_eq!(random.to_string().parse::<MacAddr>().unwrap(), random);
    }
}
