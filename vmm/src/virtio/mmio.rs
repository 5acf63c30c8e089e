//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2), as register
//! logic: a vCPU's MMIO access comes in through [`MmioTransport::read`] and
//! [`MmioTransport::write`]; a write may ask the owner to act ([`Action`]).
//!
//! Device status handshake, as the transport enforces it:
//!
//! ```text
//!   0 --ACKNOWLEDGE--> ACK --DRIVER--> DRIVER --FEATURES_OK--> FEATURES_OK --DRIVER_OK--> live
//!   ^                                   (driver features       (refused unless    (queues ready:
//!   |                                    writable here)         VERSION_1 acked)   Action::Activate)
//!   +-------------------- write 0: Action::Reset, from any state --------------------------+
//! ```
//!
//! Queue registers are writable until DRIVER_OK. The driver's
//! `VIRTIO_RING_F_EVENT_IDX` (if the device offers it) goes to the queues at
//! FEATURES_OK; a reset clears it. Interrupt status is shared with the device
//! thread, which sets bits as it completes requests.
//!
//! A device that finds its queue broken (a used ring outside guest memory, a head
//! index past the queue's size) sets DEVICE_NEEDS_RESET and raises a config
//! interrupt ([`MmioTransport::needs_reset`], virtio 1.2 section 2.1.2); it serves
//! nothing more until the driver resets it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};

use super::{VirtioDevice, FEATURE_VERSION_1};

/// Bytes of MMIO space one device takes.
pub const MMIO_SIZE: u64 = 0x1000;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "HLDF": holdfast's vendor ID.
const VENDOR: u32 = 0x4644_4c48;

/// What the owner must do after a register write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    /// The driver set DRIVER_OK with every ready queue set up: start the device.
    Activate,
    /// The driver wrote 0 to Status: stop the device and drop in-flight requests.
    Reset,
    /// The driver notified a queue (when no ioeventfd caught the write).
    Notify(u16),
}

/// One virtio device behind virtio-mmio registers.
#[derive(Debug)]
pub struct MmioTransport<D> {
    device: D,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: Arc<AtomicU32>,
    config_generation: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue sizes of our devices are powers of two"))
            .collect();
        MmioTransport {
            device,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: Arc::new(AtomicU32::new(0)),
            config_generation: 0,
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device and its queues at once (the device thread serves one with the other).
    pub fn device_and_queues(&mut self) -> (&mut D, &mut [Queue]) {
        (&mut self.device, &mut self.queues)
    }

    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    pub fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    /// The interrupt status word, for the device thread to set
    /// `VIRTIO_MMIO_INT_VRING` before it signals the guest.
    pub fn interrupt_status(&self) -> Arc<AtomicU32> {
        Arc::clone(&self.interrupt_status)
    }

    /// The device's config changed (e.g. its capacity): bump the generation and
    /// raise a config interrupt (the caller signals the guest).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt_status
            .fetch_or(VIRTIO_MMIO_INT_CONFIG, Ordering::SeqCst);
    }

    /// The queue can no longer be served: set DEVICE_NEEDS_RESET and raise a
    /// config interrupt (the caller signals the guest).
    pub fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.config_changed();
    }

    /// Whether the device serves its queues: the driver set DRIVER_OK and the
    /// device did not ask for a reset since.
    pub fn live(&self) -> bool {
        self.has_status(VIRTIO_CONFIG_S_DRIVER_OK) && !self.has_status(VIRTIO_CONFIG_S_NEEDS_RESET)
    }

    fn has_status(&self, bit: u32) -> bool {
        self.status & bit != 0
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A vCPU read `data.len()` bytes at `offset` into the device's MMIO window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        // Registers are 32 bits wide and read whole; anything else reads as zero.
        data.fill(0);
        if data.len() != 4 {
            return;
        }
        let queue = self.queues.get(self.queue_sel as usize);
        let value = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A vCPU wrote `data` at `offset` into the device's MMIO window.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            if self.has_status(VIRTIO_CONFIG_S_DRIVER) {
                self.device
                    .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            }
            return Action::None;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return Action::None;
        };
        let value = u32::from_le_bytes(bytes);
        let queues_writable = self.has_status(VIRTIO_CONFIG_S_FEATURES_OK)
            && !self.has_status(VIRTIO_CONFIG_S_DRIVER_OK);
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES
                if self.has_status(VIRTIO_CONFIG_S_DRIVER)
                    && !self.has_status(VIRTIO_CONFIG_S_FEATURES_OK) =>
            {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xFFFF_FFFF) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xFFFF_FFFF) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM if queues_writable => {
                if let Some(q) = self.selected() {
                    q.set_size(value as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY if queues_writable => {
                if let Some(q) = self.selected() {
                    q.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW if queues_writable => {
                self.with_queue(|q| q.set_desc_table_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if queues_writable => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if queues_writable => {
                self.with_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if queues_writable => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if queues_writable => {
                self.with_queue(|q| q.set_used_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if queues_writable => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_NOTIFY
                if self.has_status(VIRTIO_CONFIG_S_DRIVER_OK)
                    && (value as usize) < self.queues.len() =>
            {
                return Action::Notify(value as u16);
            }
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            VIRTIO_MMIO_STATUS => return self.set_status(value),
            _ => {}
        }
        Action::None
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected() {
            f(q);
        }
    }

    fn set_status(&mut self, value: u32) -> Action {
        if value == 0 {
            self.reset();
            return Action::Reset;
        }
        // Bits are only ever added (FAILED aside); anything else is a driver bug we
        // ignore. DEVICE_NEEDS_RESET is the device's: the driver need not echo it.
        let value = value | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
        if value & self.status != self.status {
            return Action::None;
        }
        let added = value & !self.status;
        let mut new = value;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            // Only modern drivers: without VERSION_1 FEATURES_OK does not stick, which
            // is how the spec has a device refuse a feature set.
            if self.driver_features & FEATURE_VERSION_1 == 0 {
                new &= !VIRTIO_CONFIG_S_FEATURES_OK;
            } else {
                let acked = self.driver_features & self.device.features();
                self.device.ack_features(acked);
                // A ring feature: the queues keep the driver's event indexes.
                let event_idx = acked & 1 << VIRTIO_RING_F_EVENT_IDX != 0;
                for q in &mut self.queues {
                    q.set_event_idx(event_idx);
                }
            }
        }
        let activate = added & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && new & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.queues.iter().any(|q| q.ready());
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !activate {
            new &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        self.status = new;
        if activate {
            Action::Activate
        } else {
            Action::None
        }
    }

    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status.store(0, Ordering::SeqCst);
        for q in &mut self.queues {
            q.reset();
        }
    }
}
