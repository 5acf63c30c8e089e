//! virtio devices of the machine. Transport-independent: a device sees guest memory
//! and its queues; the virtio-mmio transport (to come) owns registers and interrupts.

pub mod block;

/// `VIRTIO_F_VERSION_1`: every holdfast device is a modern (virtio 1.x) device.
pub const FEATURE_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
