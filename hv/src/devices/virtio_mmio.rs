//! The virtio-mmio transport (version 2, "modern"): the register window a driver uses to
//! negotiate features, describe its split virtqueues (virtio-queue) and notify the device.

use std::sync::Arc;

use tracing::{debug, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
    VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, Request};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION_MODERN: u32 = 2;
const VENDOR_ID: u32 = u32::from_le_bytes(*b"VAPP");

/// A device behind the transport.
pub(crate) trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Feature bits offered, transport bits included.
    fn features(&self) -> u64;
    fn queue_max_sizes(&self) -> &[u16];
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Serves every available buffer of queue `index`; returns whether any was used.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
}

pub(crate) struct MmioTransport<D: VirtioDevice> {
    vm: String,
    name: String,
    device: D,
    mem: Arc<GuestMemoryMmap>,
    irq: EventFd,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(
        vm: &str,
        name: &str,
        device: D,
        mem: Arc<GuestMemoryMmap>,
        irq: EventFd,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&size| Queue::new(size))
            .collect::<Result<_, _>>()?;
        Ok(MmioTransport {
            vm: vm.to_string(),
            name: name.to_string(),
            device,
            mem,
            irq,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
        })
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for queue in &mut self.queues {
            queue.reset();
        }
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn interrupt(&mut self, reason: u32) {
        self.interrupt_status |= reason;
        if let Err(error) = self.irq.write(1) {
            warn!(vm = %self.vm, device = %self.name, %error, "cannot raise the interrupt");
        }
    }

    /// The driver's status write; FEATURES_OK only sticks when we can honour the features.
    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
        {
            let offered = self.device.features();
            let unknown = self.driver_features & !offered;
            let modern = self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if unknown != 0 || !modern {
                warn!(vm = %self.vm, device = %self.name, driver_features = self.driver_features,
                      offered, "driver features refused (legacy drivers are not supported)");
                value &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if value & VIRTIO_CONFIG_S_FAILED != 0 {
            warn!(vm = %self.vm, device = %self.name, "the guest driver gave up on the device");
        }
        self.status = value;
    }

    fn notify(&mut self, index: u32) {
        let index = index as usize;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            debug!(vm = %self.vm, device = %self.name, "notify before DRIVER_OK ignored");
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            warn!(vm = %self.vm, device = %self.name, queue = index, "notify of a queue that does not exist");
            return;
        };
        if !queue.ready() || !queue.is_valid(self.mem.as_ref()) {
            warn!(vm = %self.vm, device = %self.name, queue = index,
                  "notify of a queue that is not ready or lies outside guest memory");
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            self.interrupt(VIRTIO_MMIO_INT_CONFIG);
            return;
        }
        if self.device.process_queue(index, queue, self.mem.as_ref()) {
            self.interrupt(VIRTIO_MMIO_INT_VRING);
        }
    }

    /// Runs `work` on the device and its queues outside a guest access (a backend's data
    /// arrived, a rate limit expired), raising the vring interrupt when it says so. None
    /// until the driver is ready.
    pub fn device_event<R>(
        &mut self,
        work: impl FnOnce(&mut D, &mut [Queue], &GuestMemoryMmap) -> (bool, R),
    ) -> Option<R> {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
            || self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0
        {
            return None;
        }
        let mem = self.mem.clone();
        let (interrupt, result) = work(&mut self.device, &mut self.queues, mem.as_ref());
        if interrupt {
            self.interrupt(VIRTIO_MMIO_INT_VRING);
        }
        Some(result)
    }

    fn write_queue_register(&mut self, register: u32, value: u32) {
        let Some(queue) = self.queues.get_mut(self.queue_sel as usize) else {
            return;
        };
        if queue.ready() && register != VIRTIO_MMIO_QUEUE_READY {
            warn!(vm = %self.vm, device = %self.name, register,
                  "queue configuration changed while the queue is ready: ignored");
            return;
        }
        match register {
            VIRTIO_MMIO_QUEUE_NUM => queue.set_size(value as u16),
            VIRTIO_MMIO_QUEUE_READY => queue.set_ready(value == 1),
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.set_avail_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.set_avail_ring_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_USED_LOW => queue.set_used_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH => queue.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        data.fill(0);
        if data.len() != 4 {
            warn!(vm = %self.vm, device = %self.name, offset, len = data.len(),
                  "virtio-mmio registers are 32-bit; access ignored");
            return;
        }
        let value = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION_MODERN,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<Request> {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            debug!(vm = %self.vm, device = %self.name, offset, "config space is read-only");
            return None;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn!(vm = %self.vm, device = %self.name, offset, len = data.len(),
                  "virtio-mmio registers are 32-bit; access ignored");
            return None;
        };
        let value = u32::from_le_bytes(bytes);
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.set_status(value),
            register @ (VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH) => self.write_queue_register(register, value),
            _ => {
                debug!(vm = %self.vm, device = %self.name, offset, value, "write to unknown register")
            }
        }
        None
    }
}
