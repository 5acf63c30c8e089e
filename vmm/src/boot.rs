//! Loading a Linux kernel and preparing the boot CPU for the 64-bit boot protocol
//! (Documentation/x86/boot.rst): bzImage or ELF vmlinux through linux-loader, the
//! initrd, the command line, the zero page with its e820 map, identity-mapped page
//! tables and a GDT.

use std::fs::File;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open --kernel {path}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--kernel {path} is neither a bzImage nor an ELF vmlinux")]
    KernelFormat { path: PathBuf },
    #[error("cannot read --initrd {path}")]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("--cmdline is too long or has a character the kernel cannot take")]
    Cmdline,
    #[error("cannot write boot data into guest memory")]
    Memory,
}

/// What the boot CPU starts with.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub rip: u64,
}

/// Loads kernel, initrd and command line, and writes the zero page.
pub fn load(
    mem: &GuestMemoryMmap,
    ram: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<Entry, Error> {
    let mut file = File::open(kernel).map_err(|source| Error::OpenKernel {
        path: kernel.into(),
        source,
    })?;
    let highmem = Some(GuestAddress(HIMEM));
    let (loaded, entry, header) = match BzImage::load(mem, None, &mut file, highmem) {
        // The 64-bit entry point sits 0x200 into the protected-mode kernel.
        Ok(r) => (r.kernel_load, r.kernel_load.0 + 0x200, r.setup_header),
        Err(_) => {
            let r = Elf::load(mem, None, &mut file, highmem).map_err(|_| Error::KernelFormat {
                path: kernel.into(),
            })?;
            (r.kernel_load, r.kernel_load.0, None)
        }
    };
    let _ = loaded;

    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }

    let mut line = Cmdline::new(CMDLINE_MAX).map_err(|_| Error::Cmdline)?;
    line.insert_str(cmdline).map_err(|_| Error::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE), &line).map_err(|_| Error::Cmdline)?;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;

    let lowmem_top = ram.min(LOWMEM_END);
    if let Some(path) = initrd {
        let bytes = std::fs::read(path).map_err(|source| Error::ReadInitrd {
            path: path.into(),
            source,
        })?;
        let size = bytes.len() as u64;
        let limit = match params.hdr.initrd_addr_max {
            0 => lowmem_top,
            max => lowmem_top.min(u64::from(max) + 1),
        };
        let too_big = || Error::InitrdTooBig {
            path: path.into(),
            size,
            limit,
        };
        let at = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
        if at < HIMEM + 16 * (1 << 20) {
            return Err(too_big());
        }
        mem.write_slice(&bytes, GuestAddress(at))
            .map_err(|_| Error::Memory)?;
        params.hdr.ramdisk_image = at as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut e820 = vec![
        (0, EBDA, E820_RAM),
        (EBDA, ACPI_END - EBDA, E820_RESERVED),
        (HIMEM, lowmem_top - HIMEM, E820_RAM),
    ];
    if ram > LOWMEM_END {
        e820.push((HIGHMEM_START, ram - LOWMEM_END, E820_RAM));
    }
    for (i, (addr, size, kind)) in e820.into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
        params.e820_entries = i as u8 + 1;
    }
    params.acpi_rsdp_addr = ACPI_START;

    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|_| Error::Memory)?;
    write_page_tables(mem)?;
    write_reset_stub(mem)?;
    Ok(Entry { rip: entry })
}

/// What firmware would do at the reset vector, in 16-bit real mode: write the ACPI
/// reset register. Linux on a hardware-reduced ACPI platform without EFI reboots by
/// jumping here (BOOT_EFI falls back to BOOT_BIOS).
fn write_reset_stub(mem: &GuestMemoryMmap) -> Result<(), Error> {
    let port = ACPI_RESET.to_le_bytes();
    let stub = [
        0xb0,
        ACPI_RESET_VALUE, // mov al, reset value
        0xba,
        port[0],
        port[1], // mov dx, reset port
        0xee,    // out dx, al
        0xf4,    // hlt
        0xeb,
        0xfd, // jmp back to hlt
    ];
    mem.write_slice(&stub, GuestAddress(RESET_VECTOR))
        .map_err(|_| Error::Memory)
}

/// Identity-maps the first GiB with 2 MiB pages: enough for the kernel, the zero
/// page and the command line until the kernel builds its own tables.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    let w = |v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|_| Error::Memory)
    };
    w(PDPT | 0x03, PML4)?;
    w(PD | 0x03, PDPT)?;
    for i in 0..512u64 {
        w((i << 21) | 0x83, PD + i * 8)?;
    }
    Ok(())
}

/// A GDT entry from flags, base and limit (the usual x86 packing).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (u64::from(base & 0xff00_0000) << 32)
        | (u64::from(flags & 0xf0ff) << 40)
        | (u64::from(limit & 0x000f_0000) << 32)
        | (u64::from(base & 0x00ff_ffff) << 16)
        | u64::from(limit & 0x0000_ffff)
}

fn segment(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With 4 KiB granularity the limit counts pages.
        limit: if g == 1 {
            ((limit as u32) << 12) | 0xfff
        } else {
            limit as u32
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: 0,
    }
}

/// Long mode with the identity map, flat 64-bit code and data segments.
pub fn boot_sregs(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), Error> {
    let table = [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff), // code: 64-bit, present, execute/read
        gdt_entry(0xc093, 0, 0xfffff), // data: present, read/write
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT + i as u64 * 8))
            .map_err(|_| Error::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT))
        .map_err(|_| Error::Memory)?;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = IDT;
    sregs.idt.limit = 7;
    let code = segment(table[1], 1);
    let data = segment(table[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(table[3], 3);
    const CR0_PE: u64 = 1;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr3 = PML4;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

pub fn boot_regs(entry: Entry) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.rip,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_back() {
        let code = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (
                code.selector,
                code.type_,
                code.l,
                code.db,
                code.present,
                code.s
            ),
            (8, 0xb, 1, 0, 1, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.selector, data.type_, data.l, data.db), (16, 3, 0, 1));
    }
}
