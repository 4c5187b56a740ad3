//! The ACPI Generic Event Device, hardware-reduced ACPI's way to signal platform events; here
//! the power button, which is how a VMM asks a guest to shut down (Cloud Hypervisor does the
//! same). Pressing it sets a bit in the event register and raises the GED interrupt; the
//! guest's ACPI interpreter runs the DSDT's `_EVT` method, which reads (and so clears) the
//! register and notifies the power button device (PNP0C0C). Linux then reports KEY_POWER to
//! user space, where systemd-logind or acpid shut the system down.

use super::legacy::IrqLine;
use super::{BusDevice, Request};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// Bits of the event register (offset 0, 32 bits, read to clear).
pub(crate) const EVENT_POWER_BUTTON: u32 = 1 << 0;

pub(crate) struct Ged {
    events: u32,
    irq: IrqLine,
}

impl Ged {
    pub fn new(irq: EventFd) -> Self {
        Ged {
            events: 0,
            irq: IrqLine(irq),
        }
    }

    pub fn press_power_button(&mut self) -> std::io::Result<()> {
        self.events |= EVENT_POWER_BUTTON;
        self.irq.trigger()
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            let events = std::mem::take(&mut self.events).to_le_bytes();
            let n = data.len().min(events.len());
            data[..n].copy_from_slice(&events[..n]);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) -> Option<Request> {
        // The register is read-only: reading it acknowledges the events.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn a_press_raises_the_interrupt_and_reads_once() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut ged = Ged::new(irq.try_clone().unwrap());
        let mut word = [0u8; 4];
        ged.read(0, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0);
        ged.press_power_button().unwrap();
        assert_eq!(irq.read().unwrap(), 1, "interrupt raised");
        ged.read(0, &mut word);
        assert_eq!(u32::from_le_bytes(word), EVENT_POWER_BUTTON);
        ged.read(0, &mut word);
        assert_eq!(
            u32::from_le_bytes(word),
            0,
            "reading acknowledged the event"
        );
    }
}
