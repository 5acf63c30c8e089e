//! Where things live in guest physical memory and I/O space. One place, so boot,
//! ACPI and the device buses agree.

/// GDT and IDT for the 64-bit boot protocol.
pub const GDT: u64 = 0x500;
pub const IDT: u64 = 0x520;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity-mapping page tables for the first GiB: PML4, PDPT, PD.
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
pub const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Extended BIOS data area start: RAM below it is usable.
pub const EBDA: u64 = 0x9fc00;
/// ACPI tables live in the BIOS area, where Linux scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// The x86 reset vector (F000:FFF0), where a BIOS reboot lands.
pub const RESET_VECTOR: u64 = 0xffff0;
/// The kernel's protected-mode part is loaded here.
pub const HIMEM: u64 = 0x100000;
/// RAM below 4 GiB ends here; the rest of the 32-bit space is for devices.
pub const LOWMEM_END: u64 = 0xc000_0000;
pub const HIGHMEM_START: u64 = 0x1_0000_0000;
/// virtio-mmio devices, one page each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const IOAPIC: u64 = 0xfec0_0000;
pub const LAPIC: u64 = 0xfee0_0000;

/// Legacy interrupt lines (IOAPIC pins).
pub const SERIAL_IRQ: u32 = 4;
/// The first virtio device's line; the next ones follow.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// The ACPI Generic Event Device's line (the power button, `system_powerdown`): the
/// last IOAPIC pin, so the disks have 5..=22.
pub const GED_IRQ: u32 = 23;
/// The most disks a machine takes (one interrupt line each, below the GED's).
pub const MAX_DISKS: usize = (GED_IRQ - VIRTIO_IRQ_BASE) as usize;
/// ACPI's SCI (unused by a hardware-reduced platform, but declared).
pub const SCI_IRQ: u16 = 9;

/// I/O ports.
pub const COM1: u16 = 0x3f8;
pub const I8042: u16 = 0x60;
/// Hardware-reduced ACPI: sleep control and status, and the reset register.
pub const ACPI_SLEEP_CONTROL: u16 = 0x600;
pub const ACPI_SLEEP_STATUS: u16 = 0x601;
pub const ACPI_RESET: u16 = 0x604;
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// The PCI reset control register.
pub const PCI_RESET: u16 = 0xcf9;
/// QEMU's isa-debug-exit port (its default iobase): the guest writes its status
/// here to end the run; holdfast exits with that status.
pub const DEBUG_EXIT: u16 = 0x501;
/// QEMU's pvpanic port: the guest writes here when it panics.
pub const PVPANIC: u16 = 0x505;
