//! The virtio-mmio register interface under any sequence of reads and writes
//! (offsets, widths and values from the input), through the MMIO bus as a vCPU
//! reaches it; whenever the device is notified, its worker serves the queue (with
//! its I/O threads, as `holdfast run` has them, fewer of them), over guest memory
//! the input fills. Nothing may panic.
#![no_main]

use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;

use holdfast_block::{DiskConfig, MemBackend};
use holdfast_vmm::devices::mmio::MmioBus;
use holdfast_vmm::disk::{serve, DiskEvents, DiskSpec, Slot};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 64 << 10;

fn run(u: &mut Unstructured) -> Result<()> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let fill_len = u.int_in_range(0..=4096usize)?.min(u.len());
    let fill = u.bytes(fill_len)?;
    let at = u.int_in_range(0..=(MEM - fill.len()) as u64)?;
    mem.write_slice(fill, GuestAddress(at)).expect("fill");
    let mut spec = DiskSpec::new(
        "fuzz",
        Box::new(MemBackend::new(1 << 20)),
        DiskConfig::default(),
        "memory",
    );
    spec.io_threads = 4;
    let eventfd = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let slot = Arc::new(Slot::new(spec, 0, eventfd(), eventfd()));
    let bus = MmioBus::new(vec![Arc::clone(&slot)]);
    let (tx, _rx) = channel();
    let tx = DiskEvents::from(tx);
    let steps = u.int_in_range(0..=128u8)?;
    let result = (|| {
        for _ in 0..steps {
            let offset: u64 = match u.int_in_range(0..=7u8)? {
                0 => u.arbitrary()?,
                _ => u.int_in_range(0..=0x1ffu64)? & !3,
            };
            let width = [1usize, 2, 4, 8][u.int_in_range(0..=3usize)?];
            if u.arbitrary()? {
                let mut buf = vec![0u8; width];
                bus.read(offset, &mut buf);
            } else {
                let value = u.bytes(width)?.to_vec();
                bus.write(offset, &value);
                // The worker wakes on the device's notifier, as its epoll does.
                if slot.notify.read().is_ok() {
                    serve(&slot, &mem, &tx);
                    assert!(slot.wait_quiet(Duration::from_secs(5)), "the disk never went quiet");
                }
            }
        }
        Ok(())
    })();
    slot.join_io_threads();
    result
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
