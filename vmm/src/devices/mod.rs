//! Devices: those a vCPU reaches through port I/O (the 16550 serial console
//! (vm-superio), the hardware-reduced ACPI sleep and reset registers, pvpanic, and
//! enough of the i8042 for its reset line), and the virtio-blk disks on the MMIO bus.

pub mod disks;
pub mod legacy;
