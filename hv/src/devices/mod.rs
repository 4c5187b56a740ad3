//! Emulated devices and the buses that route vCPU port and memory accesses to them.
//!
//! Devices run on the vCPU thread that touched them, under a per-device lock: a guest's disk
//! request is served synchronously inside its QUEUE_NOTIFY write.

pub(crate) mod ged;
pub(crate) mod legacy;
pub(crate) mod virtio_blk;
pub(crate) mod virtio_mmio;
pub(crate) mod virtio_net;

use std::sync::{Arc, Mutex, PoisonError};

/// What a device asks of the VM after an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    PowerOff { status: u32 },
    Reset,
}

pub(crate) trait BusDevice: Send {
    /// Fills `data` from the register at `offset` within the device's window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` to the register at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<Request>;
}

struct Mapping {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// An address space (port I/O or MMIO) of non-overlapping device windows.
#[derive(Default)]
pub(crate) struct Bus {
    mappings: Vec<Mapping>,
}

impl Bus {
    /// Adds `device` at `[base, base + len)`; windows must not overlap (a VMM bug otherwise).
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) {
        debug_assert!(
            self.mappings
                .iter()
                .all(|m| base + len <= m.base || m.base + m.len <= base),
            "overlapping device windows at {base:#x}"
        );
        let at = self.mappings.partition_point(|m| m.base < base);
        self.mappings.insert(at, Mapping { base, len, device });
    }

    fn find(&self, addr: u64) -> Option<(&Mapping, u64)> {
        let at = self.mappings.partition_point(|m| m.base <= addr);
        let mapping = self.mappings.get(at.checked_sub(1)?)?;
        (addr < mapping.base + mapping.len).then(|| (mapping, addr - mapping.base))
    }

    /// Reads from the device at `addr`; false (and all-ones data, a floating bus) if none.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((m, offset)) => {
                m.device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; `Err(())` if there is none.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<Option<Request>, ()> {
        let (m, offset) = self.find(addr).ok_or(())?;
        Ok(m.device
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(offset, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Register(u8);

    impl BusDevice for Register {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) -> Option<Request> {
            self.0 = data[0];
            None
        }
    }

    #[test]
    fn routes_by_window_and_floats_elsewhere() {
        let mut bus = Bus::default();
        bus.insert(0x100, 8, Arc::new(Mutex::new(Register(10))));
        bus.insert(0x10, 4, Arc::new(Mutex::new(Register(20))));
        let mut byte = [0u8];
        assert!(bus.read(0x103, &mut byte));
        assert_eq!(byte, [13]);
        assert!(bus.read(0x10, &mut byte));
        assert_eq!(byte, [20]);
        assert!(!bus.read(0x108, &mut byte));
        assert_eq!(byte, [0xff]);
        assert!(bus.write(0x14, &[1]).is_err());
        assert_eq!(bus.write(0x101, &[7]), Ok(None));
        bus.read(0x100, &mut byte);
        assert_eq!(byte, [7]);
    }
}
