//! Tiny test guests for the machine's tests.

/// Where a tiny guest's code is loaded and starts.
pub const ENTRY: u64 = 0x100_0000;
/// Where the counting guest counts.
#[allow(dead_code)]
pub const COUNTER: u64 = 0x200_0000;

#[allow(dead_code)]
/// A static ELF whose code is `loop: inc qword [COUNTER]; jmp loop`.
pub fn counting_guest() -> Vec<u8> {
    let mut code = vec![0x48, 0xff, 0x04, 0x25];
    code.extend_from_slice(&(COUNTER as u32).to_le_bytes());
    code.extend_from_slice(&[0xeb, 0xf6]);
    elf(&code)
}

/// A static ELF loading `code` at ENTRY and starting there.
pub fn elf(code: &[u8]) -> Vec<u8> {
    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&ENTRY.to_le_bytes());
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers right after
    elf.extend_from_slice(&0u64.to_le_bytes());
    elf.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    elf.extend_from_slice(&120u64.to_le_bytes());
    elf.extend_from_slice(&ENTRY.to_le_bytes());
    elf.extend_from_slice(&ENTRY.to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    assert_eq!(elf.len(), 120);
    elf.extend_from_slice(code);
    elf
}
