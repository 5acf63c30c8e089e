//! holdfast's machine: the KVM VM, guest memory, vCPUs, boot, ACPI, serial console,
//! the virtio-mmio transport and the virtio-blk frontend over `holdfast-block`, and
//! the run-state owner that pauses vCPUs on a disk error and resumes them after a
//! replay.
//!
//! Built so far: the virtio-blk frontend ([`virtio::block`]) and the virtio-mmio
//! transport ([`virtio::mmio`]), tested on virtio-queue's
//! mock queues. The rest arrives with the issue "vmm/ + images/: boot a stock Linux
//! guest".

pub mod virtio;
