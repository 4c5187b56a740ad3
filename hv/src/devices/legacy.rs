//! Port-I/O devices of the platform: the COM1 8250 UART (vm-superio) feeding the console sink,
//! the i8042 controller (its CPU-reset command is how Linux reboots with `reboot=k`), the
//! hardware-reduced ACPI sleep and reset registers the FADT points at, and the exit-status port.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::warn;
use vm_superio::serial::NoEvents;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, Request};
use crate::layout::{ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP, ACPI_SLEEP_CONTROL_PORT};

/// Raises a guest interrupt line through a KVM irqfd.
pub(crate) struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub(crate) struct SerialPort {
    vm: String,
    uart: Serial<IrqLine, NoEvents, Box<dyn Write + Send>>,
}

impl SerialPort {
    pub fn new(vm: &str, irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialPort {
            vm: vm.to_string(),
            uart: Serial::new(IrqLine(irq), out),
        }
    }

    /// Queues bytes for the guest to read, as typed on the console; returns how many fitted.
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<Request> {
        if let Err(error) = self.uart.write(offset as u8, data[0]) {
            // The guest cannot be told; losing console output must not stop the VM.
            warn!(vm = %self.vm, %error, "serial console output lost");
        }
        None
    }
}

/// Set by the i8042 when the guest pulses the CPU reset line.
#[derive(Default)]
pub(crate) struct ResetLine(AtomicBool);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Relaxed);
        Ok(())
    }
}

pub(crate) struct I8042(I8042Device<ResetLine>);

impl I8042 {
    pub fn new() -> Self {
        I8042(I8042Device::new(ResetLine::default()))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.0.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<Request> {
        let _ = self.0.write(offset as u8, data[0]);
        self.0
            .reset_evt()
            .0
            .swap(false, Ordering::Relaxed)
            .then_some(Request::Reset)
    }
}

/// The FADT's sleep control, sleep status and reset registers, at consecutive ports.
pub(crate) struct AcpiRegisters;

impl BusDevice for AcpiRegisters {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never asleep, no wake pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<Request> {
        const SLP_EN: u8 = 1 << 5;
        let port = ACPI_SLEEP_CONTROL_PORT + offset as u16;
        let value = data[0];
        if port == ACPI_SLEEP_CONTROL_PORT
            && value & SLP_EN != 0
            && (value >> 2) & 0x7 == ACPI_S5_SLP_TYP
        {
            Some(Request::PowerOff { status: 0 })
        } else if port == ACPI_RESET_PORT && value == ACPI_RESET_VALUE {
            Some(Request::Reset)
        } else {
            None
        }
    }
}

/// A write of up to 4 bytes powers the VM off with that value as its status (the same port and
/// meaning as QEMU's isa-debug-exit, so a test guest can report a result from either VMM).
pub(crate) struct ExitStatusPort;

impl BusDevice for ExitStatusPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> Option<Request> {
        let mut status = [0u8; 4];
        let n = data.len().min(4);
        status[..n].copy_from_slice(&data[..n]);
        Some(Request::PowerOff {
            status: u32::from_le_bytes(status),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_s5_powers_off_and_reset_register_resets() {
        let mut acpi = AcpiRegisters;
        assert_eq!(
            acpi.write(0, &[(5 << 2) | (1 << 5)]),
            Some(Request::PowerOff { status: 0 })
        );
        assert_eq!(acpi.write(0, &[5 << 2]), None, "SLP_EN not set");
        assert_eq!(
            acpi.write(0, &[(3 << 2) | (1 << 5)]),
            None,
            "S3 is not supported"
        );
        assert_eq!(acpi.write(2, &[ACPI_RESET_VALUE]), Some(Request::Reset));
    }

    #[test]
    fn i8042_reset_command_resets() {
        let mut i8042 = I8042::new();
        assert_eq!(i8042.write(4, &[0xfe]), Some(Request::Reset));
        assert_eq!(i8042.write(4, &[0x20]), None);
    }

    #[test]
    fn exit_port_reports_the_written_status() {
        assert_eq!(
            ExitStatusPort.write(0, &0x1234_5678u32.to_le_bytes()),
            Some(Request::PowerOff {
                status: 0x1234_5678
            })
        );
        assert_eq!(
            ExitStatusPort.write(0, &[3]),
            Some(Request::PowerOff { status: 3 })
        );
    }

    #[test]
    fn serial_output_reaches_the_sink_and_input_the_guest() {
        let sink = crate::ConsoleBuffer::new();
        let mut port = SerialPort::new("t", EventFd::new(0).unwrap(), Box::new(sink.clone()));
        for b in b"hi\n" {
            port.write(0, &[*b]);
        }
        assert_eq!(sink.contents(), "hi\n");
        assert_eq!(port.input(b"x"), 1);
        let mut byte = [0u8];
        port.read(0, &mut byte);
        assert_eq!(&byte, b"x");
    }
}
