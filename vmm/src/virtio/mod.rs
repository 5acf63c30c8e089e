//! virtio devices of the machine. Transport-independent: a device sees guest memory
//! and its queues; the virtio-mmio transport ([`mmio`]) owns registers, feature
//! negotiation and queue set-up, and tells its owner when to activate or reset.

pub mod block;
pub mod mmio;

/// `VIRTIO_F_VERSION_1`: every holdfast device is a modern (virtio 1.x) device.
pub const FEATURE_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// What a transport needs from a device.
pub trait VirtioDevice {
    /// The virtio device ID (2 for a block device).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Features the driver accepted (a subset of [`VirtioDevice::features`]).
    fn ack_features(&mut self, features: u64);
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
}
