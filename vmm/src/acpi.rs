//! ACPI tables for a hardware-reduced platform (the guest learns its CPUs, its
//! interrupt controller and its devices from them): RSDP -> XSDT -> FADT (-> DSDT),
//! MADT. The DSDT describes the serial port, pvpanic, and each virtio-mmio device as
//! `LNRO0005` with a memory and an interrupt resource, which is how a kernel without
//! virtio-mmio command-line devices finds them.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

const OEM_ID: [u8; 6] = *b"HLDFST";
const OEM_TABLE: [u8; 8] = *b"HOLDFAST";

/// A virtio-mmio device as the DSDT announces it.
#[derive(Debug, Clone, Copy)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ACPI tables do not fit between {ACPI_START:#x} and {ACPI_END:#x}")]
    TooBig,
    #[error("cannot write ACPI tables into guest memory")]
    Memory,
}

/// AML already serialized (so devices can be built in a loop).
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let mut children: Vec<Raw> = vec![
        Raw(bytes(&aml::Device::new(
            "COM1".into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::IO::new(COM1, COM1, 1, 8),
                        &aml::Interrupt::new(true, true, false, false, SERIAL_IRQ),
                    ]),
                ),
            ],
        ))),
        Raw(bytes(&aml::Device::new(
            "PEVT".into(),
            vec![
                &aml::Name::new("_HID".into(), &"QEMU0001"),
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![&aml::IO::new(PVPANIC, PVPANIC, 1, 1)]),
                ),
            ],
        ))),
        // The power button, a control-method device (the FADT's PWR_BUTTON flag), which
        // the Generic Event Device notifies when its interrupt fires (system_powerdown).
        Raw(bytes(&aml::Device::new(
            "PWRB".into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
                &aml::Name::new("_UID".into(), &aml::ZERO),
            ],
        ))),
        Raw(bytes(&aml::Device::new(
            "GED_".into(),
            vec![
                &aml::Name::new("_HID".into(), &"ACPI0013"),
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                        true, true, false, false, GED_IRQ,
                    )]),
                ),
                // Its one event: the power button was pressed (Notify 0x80).
                &aml::Method::new(
                    "_EVT".into(),
                    1,
                    true,
                    vec![&aml::Notify::new(&aml::Path::new("\\_SB_.PWRB"), &0x80u8)],
                ),
            ],
        ))),
    ];
    for (i, d) in devices.iter().enumerate() {
        let uid = i as u32;
        children.push(Raw(bytes(&aml::Device::new(
            format!("VR{i:02X}").as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, d.base as u32, d.size as u32),
                        &aml::Interrupt::new(true, true, false, false, d.irq),
                    ]),
                ),
            ],
        ))));
    }
    let child_refs: Vec<&dyn Aml> = children.iter().map(|c| c as &dyn Aml).collect();
    let sb = aml::Scope::new("_SB_".into(), child_refs);
    // \_S5: the sleep type the guest writes to power off.
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&5u8, &0u8, &0u8, &0u8]),
    );
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    table.append_slice(&bytes(&sb));
    table.append_slice(&bytes(&s5));
    table.as_slice().to_vec()
}

/// FADT IAPC_BOOT_ARCH: "VGA Not Present" (ACPI 6.5, table 5.11).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// FADT IAPC_BOOT_ARCH: "CMOS RTC Not Present".
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, 1);
    f.dsdt = (dsdt_addr as u32).into();
    f.x_dsdt = dsdt_addr.into();
    f.sci_int = SCI_IRQ.into();
    f.flags =
        ((Flags::HwReducedAcpi as u32) | (Flags::ResetRegSup as u32) | (Flags::PwrButton as u32))
            .into();
    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    // No VGA, no CMOS RTC (IA-PC boot architecture flags, bits 2 and 5): a guest
    // kernel that thinks it has an RTC probes ports 0x70/0x71 until it gives up,
    // 3.6 s of a 12 s boot in the nested test host (one exit a port read).
    f.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    f.reset_reg = io(ACPI_RESET);
    f.reset_value = ACPI_RESET_VALUE;
    f.sleep_control_reg = io(ACPI_SLEEP_CONTROL);
    f.sleep_status_reg = io(ACPI_SLEEP_STATUS);
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"HOLDFAST").into();
    bytes(&f.finalize())
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(LAPIC as u32),
    );
    for id in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC as u32, 0));
    bytes(&m)
}

/// Writes every table and the RSDP (at [`ACPI_START`], where the zero page points).
pub fn write(mem: &GuestMemoryMmap, cpus: u8, devices: &[MmioDevice]) -> Result<(), Error> {
    let mut at = ACPI_START + 64; // the RSDP goes first
    let mut place = |table: &[u8]| -> Result<u64, Error> {
        let addr = at;
        if addr + table.len() as u64 > ACPI_END {
            return Err(Error::TooBig);
        }
        mem.write_slice(table, GuestAddress(addr))
            .map_err(|_| Error::Memory)?;
        at = (addr + table.len() as u64 + 15) & !15;
        Ok(addr)
    };
    let dsdt_addr = place(&dsdt(devices))?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(cpus))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&bytes(&xsdt))?;
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(&bytes(&rsdp), GuestAddress(ACPI_START))
        .map_err(|_| Error::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_well_formed() {
        let devices = [MmioDevice {
            base: VIRTIO_MMIO_BASE,
            size: 0x1000,
            irq: 5,
        }];
        for t in [dsdt(&devices), fadt(0x1234), madt(2)] {
            let len = u32::from_le_bytes(t[4..8].try_into().expect("4 bytes")) as usize;
            assert_eq!(len, t.len(), "{:?}", std::str::from_utf8(&t[..4]));
            assert!(checksum_ok(&t), "{:?}", std::str::from_utf8(&t[..4]));
        }
        let d = dsdt(&devices);
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"LNRO0005") && has(b"QEMU0001") && has(b"_S5_"));
        assert!(
            has(b"ACPI0013") && has(b"_EVT") && has(b"PWRB"),
            "the GED and the power button"
        );
        let f = fadt(0x1234);
        let boot_arch = u16::from_le_bytes([f[109], f[110]]);
        assert_eq!(
            boot_arch,
            (1 << 2) | (1 << 5),
            "IAPC_BOOT_ARCH (offset 109): no VGA, no CMOS RTC"
        );
        let m = madt(2);
        assert_eq!(m.len(), 44 + 2 * 8 + 12, "header, 2 local APICs, 1 IOAPIC");
    }
}
