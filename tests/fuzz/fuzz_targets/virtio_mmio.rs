//! The virtio-mmio register interface under any sequence of reads and writes
//! (offsets, widths and values from the input), the block device served whenever
//! the transport asks, as the device thread does, over guest memory the input
//! fills. Nothing may panic.
#![no_main]

use holdfast_block::{Disk, DiskConfig, MemBackend};
use holdfast_vmm::virtio::block::BlockDevice;
use holdfast_vmm::virtio::mmio::{Action, MmioTransport};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 << 10;

fn run(u: &mut Unstructured) -> Result<()> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let fill_len = u.int_in_range(0..=4096usize)?.min(u.len());
    let fill = u.bytes(fill_len)?;
    let at = u.int_in_range(0..=(MEM - fill.len()) as u64)?;
    mem.write_slice(fill, GuestAddress(at)).expect("fill");
    let device = BlockDevice::new(Disk::new(MemBackend::new(1 << 20), DiskConfig::default()));
    let mut t = MmioTransport::new(device);
    let steps = u.int_in_range(0..=128u8)?;
    for _ in 0..steps {
        let offset: u64 = match u.int_in_range(0..=7u8)? {
            0 => u.arbitrary()?,
            _ => u.int_in_range(0..=0x1ffu64)? & !3,
        };
        let width = [1usize, 2, 4, 8][u.int_in_range(0..=3usize)?];
        if u.arbitrary()? {
            let mut buf = vec![0u8; width];
            t.read(offset, &mut buf);
        } else {
            let value = u.bytes(width)?.to_vec();
            match t.write(offset, &value) {
                Action::Activate | Action::Notify(_) => {
                    if t.live() {
                        let (device, queues) = t.device_and_queues();
                        if device.process_queue(&mem, &mut queues[0]).is_err() {
                            t.needs_reset();
                        }
                    }
                }
                Action::Reset => {
                    t.device_mut().reset();
                }
                Action::None => {}
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
