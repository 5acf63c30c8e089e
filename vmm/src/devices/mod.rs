//! The buses vCPUs reach devices through: port I/O ([`legacy`]: the 16550 serial
//! console (vm-superio), the hardware-reduced ACPI sleep and reset registers,
//! pvpanic, and enough of the i8042 for its reset line) and MMIO ([`mmio`]: the
//! virtio-blk disks' registers, [`crate::disk`]).

pub mod legacy;
pub mod mmio;
