//! The MMIO bus: vCPUs reach the disks' virtio-mmio registers through it, by address.

use std::sync::Arc;

use crate::disk::Slot;
use crate::virtio::mmio::MMIO_SIZE;

/// MMIO accesses from vCPUs, by address.
pub struct MmioBus {
    slots: Vec<Arc<Slot>>,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MmioBus({} devices)", self.slots.len())
    }
}

impl MmioBus {
    pub fn new(slots: Vec<Arc<Slot>>) -> MmioBus {
        MmioBus { slots }
    }

    fn slot(&self, addr: u64) -> Option<(&Arc<Slot>, u64)> {
        self.slots
            .iter()
            .find(|s| (s.base..s.base + MMIO_SIZE).contains(&addr))
            .map(|s| (s, addr - s.base))
    }

    /// A vCPU's read; nothing there reads as zeroes.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.slot(addr) {
            Some((slot, offset)) => slot.read_register(offset, data),
            None => data.fill(0),
        }
    }

    /// A vCPU's write; nothing there ignores it.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((slot, offset)) = self.slot(addr) {
            slot.write_register(offset, data);
        }
    }
}
