//! holdfast's machine: the KVM VM, guest memory, vCPUs, boot, ACPI, serial console,
//! the virtio-mmio transport and the virtio-blk frontend over `holdfast-block`, and
//! the run-state owner that pauses vCPUs on a disk error and resumes them after a
//! replay.
//!
//! Following a failed fdatasync: the guest's request arrives on a virtqueue
//! ([`virtio::block::BlockDevice::process_queue`], device thread) -> the disk engine
//! parks it and reports the error -> [`vm::VmEvent::DiskError`] to the run-state
//! owner -> [`vm::Vm::pause`]; on `cont`, [`vm::Vm::resume`] replays the disk
//! before any vCPU runs.

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod devices;
pub mod host_signals;
pub mod lab;
pub mod layout;
pub mod logging;
pub mod owner;
pub mod panics;
pub mod vcpu;
pub mod virtio;
pub mod vm;
