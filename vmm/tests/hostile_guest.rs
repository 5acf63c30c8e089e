//! A hostile guest on real KVM: a tiny guest performs the MMIO writes the test
//! posts in a mailbox (so the accesses are the guest's, trapped by KVM, and the
//! queue notifications go through the real ioeventfd to the device thread), while
//! the test lays malformed descriptor chains and rings in guest memory. After each
//! mistake: holdfast's owner still answers, the VM is not in `io-error` for the
//! guest's own mistakes, and a second, well-behaved disk in the same VM completes a
//! write and a flush.

use std::time::{Duration, Instant};

use holdfast_block::{Backend, Disk, DiskConfig, FaultInjector, MemBackend};
use holdfast_vmm::disk::DiskSpec;
use holdfast_vmm::layout::VIRTIO_MMIO_BASE;
use holdfast_vmm::owner::Exit;
use holdfast_vmm::vm::Vm;
use serde_json::json;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

mod common;

/// The guest's mailbox: seq, done, address, value (u64 each).
const MAILBOX: u64 = 0x300_0000;
/// A page directory mapping guest-physical 3..4 GiB (the MMIO hole) 1:1.
const MMIO_PD: u64 = 0x400_0000;
/// The boot page tables' PDPT (vm's layout), whose entry 3 maps 3..4 GiB.
const PDPT: u64 = 0xa000;

/// `loop: if [seq] != [done] { *(u32*)[addr] = [value]; [done] = [seq] } goto loop`
fn mailbox_guest() -> Vec<u8> {
    let d = |off: u64| ((MAILBOX + off) as u32).to_le_bytes();
    let mut c = Vec::new();
    c.extend([0x48, 0x8b, 0x04, 0x25]); // mov rax, [seq]
    c.extend(d(0));
    c.extend([0x48, 0x3b, 0x04, 0x25]); // cmp rax, [done]
    c.extend(d(8));
    c.extend([0x74, 0xee]); // je loop
    c.extend([0x48, 0x8b, 0x1c, 0x25]); // mov rbx, [addr]
    c.extend(d(16));
    c.extend([0x8b, 0x0c, 0x25]); // mov ecx, [value]
    c.extend(d(24));
    c.extend([0x89, 0x0b]); // mov [rbx], ecx
    c.extend([0x48, 0x89, 0x04, 0x25]); // mov [done], rax
    c.extend(d(8));
    c.extend([0xeb, 0xd3]); // jmp loop
    assert_eq!(c.len(), 45);
    common::elf(&c)
}

struct Guest {
    mem: GuestMemoryMmap,
    seq: u64,
}

impl Guest {
    /// The guest writes `value` at `addr` (a 32-bit MMIO write).
    fn write(&mut self, addr: u64, value: u32) {
        self.seq += 1;
        self.mem
            .write_obj(addr, GuestAddress(MAILBOX + 16))
            .expect("addr");
        self.mem
            .write_obj(u64::from(value), GuestAddress(MAILBOX + 24))
            .expect("value");
        self.mem
            .write_obj(self.seq, GuestAddress(MAILBOX))
            .expect("seq");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self
            .mem
            .read_obj::<u64>(GuestAddress(MAILBOX + 8))
            .expect("done")
            != self.seq
        {
            assert!(
                Instant::now() < deadline,
                "the guest did not perform its write"
            );
            std::thread::yield_now();
        }
    }

    fn reg(&mut self, disk: u64, reg: u32, value: u32) {
        self.write(VIRTIO_MMIO_BASE + disk * 0x1000 + u64::from(reg), value);
    }

    fn put<T: vm_memory::ByteValued>(&self, at: u64, v: T) {
        self.mem
            .write_obj(v, GuestAddress(at))
            .expect("guest memory");
    }

    fn get<T: vm_memory::ByteValued>(&self, at: u64) -> T {
        self.mem.read_obj(GuestAddress(at)).expect("guest memory")
    }
}

/// Where a disk's queue and buffers live in guest memory.
#[derive(Clone, Copy)]
struct Rings {
    disk: u64,
    desc: u64,
    avail: u64,
    used: u64,
    data: u64,
    size: u16,
}

impl Rings {
    fn of(disk: u64) -> Self {
        let base = 0x500_0000 + disk * 0x10_0000;
        Rings {
            disk,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            data: base + 0x1_0000,
            size: 16,
        }
    }
}

/// Sets a disk up as a driver does, with the given features (VERSION_1 added).
fn set_up(g: &mut Guest, r: Rings, features: u32) {
    let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    g.reg(r.disk, VIRTIO_MMIO_STATUS, 0);
    g.reg(r.disk, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    g.reg(r.disk, VIRTIO_MMIO_STATUS, s);
    g.reg(r.disk, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    g.reg(r.disk, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    g.reg(r.disk, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    g.reg(r.disk, VIRTIO_MMIO_DRIVER_FEATURES, features);
    g.reg(r.disk, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
    for at in [r.desc, r.avail, r.used] {
        g.mem
            .write_slice(&[0u8; 0x1000], GuestAddress(at))
            .expect("clear");
    }
    g.reg(r.disk, VIRTIO_MMIO_QUEUE_SEL, 0);
    g.reg(r.disk, VIRTIO_MMIO_QUEUE_NUM, u32::from(r.size));
    let split = |v: u64| (v as u32, (v >> 32) as u32);
    for (low, high, at) in [
        (
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            VIRTIO_MMIO_QUEUE_DESC_HIGH,
            r.desc,
        ),
        (
            VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
            r.avail,
        ),
        (
            VIRTIO_MMIO_QUEUE_USED_LOW,
            VIRTIO_MMIO_QUEUE_USED_HIGH,
            r.used,
        ),
    ] {
        g.reg(r.disk, low, split(at).0);
        g.reg(r.disk, high, split(at).1);
    }
    g.reg(r.disk, VIRTIO_MMIO_QUEUE_READY, 1);
    g.reg(
        r.disk,
        VIRTIO_MMIO_STATUS,
        s | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
    );
}

/// One descriptor: address, length, flags, next.
type Desc = (u64, u32, u16, u16);

/// Lays `descs` at the start of the table and makes `heads` available (after
/// whatever was made available before); notifies the device.
fn offer(g: &mut Guest, r: Rings, descs: &[Desc], heads: &[u16]) {
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        let at = r.desc + i as u64 * 16;
        g.put(at, addr);
        g.put(at + 8, len);
        g.put(at + 12, flags);
        g.put(at + 14, next);
    }
    let mut idx: u16 = g.get(r.avail + 2);
    for &h in heads {
        g.put(r.avail + 4 + u64::from(idx % r.size) * 2, h);
        idx = idx.wrapping_add(1);
    }
    g.put(r.avail + 2, idx);
    g.reg(r.disk, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
}

fn used_idx(g: &Guest, r: Rings) -> u16 {
    g.get(r.used + 2)
}

/// A well-formed request: header, data (if any), status byte. Returns its status
/// byte's address.
fn request(g: &mut Guest, r: Rings, kind: u32, sector: u64, data: Option<(u32, bool)>) -> u64 {
    let hdr = r.data;
    g.put(hdr, kind);
    g.put(hdr + 4, 0u32);
    g.put(hdr + 8, sector);
    let status = r.data + 0x8000;
    g.put(status, 0xffu8);
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    let mut descs = vec![(hdr, 16, next, 1)];
    if let Some((len, device_writes)) = data {
        let flags = next | if device_writes { write } else { 0 };
        descs.push((r.data + 0x100, len, flags, 2));
    }
    let last = descs.len() as u16;
    descs.push((status, 1, write, 0));
    let _ = last;
    let before = used_idx(g, r);
    offer(g, r, &descs, &[0]);
    wait_used(g, r, before.wrapping_add(1));
    status
}

fn wait_used(g: &Guest, r: Rings, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while used_idx(g, r) != want {
        assert!(
            Instant::now() < deadline,
            "disk {}: used index stuck at {}, want {want}",
            r.disk,
            used_idx(g, r)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn disk(id: &str) -> DiskSpec {
    let backend: Box<dyn Backend> = Box::new(FaultInjector::new(MemBackend::new(1 << 20)));
    DiskSpec {
        id: id.into(),
        engine: Box::new(Disk::new(backend, DiskConfig::default())),
        path: "memory".into(),
        direct: false,
        faults: None,
        simulated: None,
        watch: Default::default(),
        hang_timeout: None,
        io_threads: holdfast_vmm::disk::CALLS_PER_DISK,
        write_log: None,
    }
}

fn start() -> Option<(Guest, common::OwnerThread, tempfile::TempDir)> {
    if !common::kvm_available() {
        return None;
    }
    let dir = tempfile::tempdir().expect("dir");
    let mut config = common::counting_vm_with_disks(dir.path(), vec![disk("bad"), disk("good")]);
    let kernel = dir.path().join("mailbox.elf");
    std::fs::write(&kernel, mailbox_guest()).expect("guest");
    config.kernel = kernel;
    let mut mem = None;
    let owner = common::OwnerThread::start(|inbox| {
        let vm = Vm::start(config, inbox).expect("start");
        mem = Some(vm.guest_memory().clone());
        vm
    });
    let mem = mem.expect("started");
    // Map the MMIO hole so that the guest can reach the devices.
    for i in 0..512u64 {
        mem.write_obj(
            (0xc000_0000 + (i << 21)) | 0x83,
            GuestAddress(MMIO_PD + i * 8),
        )
        .expect("pd");
    }
    mem.write_obj(MMIO_PD | 0x03, GuestAddress(PDPT + 3 * 8))
        .expect("pdpt");
    Some((Guest { mem, seq: 0 }, owner, dir))
}

/// The good disk writes a block and flushes it, both S_OK.
fn good_disk_works(g: &mut Guest, round: u8) {
    let r = Rings::of(1);
    g.mem
        .write_slice(&[round; 512], GuestAddress(r.data + 0x100))
        .expect("data");
    let s = request(g, r, VIRTIO_BLK_T_OUT, 0, Some((512, false)));
    assert_eq!(g.get::<u8>(s), 0, "the good disk's write, round {round}");
    let s = request(g, r, VIRTIO_BLK_T_FLUSH, 0, None);
    assert_eq!(g.get::<u8>(s), 0, "the good disk's flush, round {round}");
}

#[test]
fn malformed_requests_hurt_neither_the_vm_nor_the_other_disk() {
    let Some((mut g, mut o, _dir)) = start() else {
        return;
    };
    let bad = Rings::of(0);
    let good = Rings::of(1);
    let flush_feature = 1 << VIRTIO_BLK_F_FLUSH;
    // A request before DRIVER_OK, and queue registers written after it: ignored.
    g.reg(0, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    set_up(&mut g, good, flush_feature);
    set_up(&mut g, bad, flush_feature);
    g.reg(0, VIRTIO_MMIO_QUEUE_NUM, 4096);
    g.reg(0, VIRTIO_MMIO_QUEUE_DESC_LOW, 0xdead_0000);
    good_disk_works(&mut g, 1);

    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    let hdr = bad.data;
    let status = bad.data + 0x8000;
    let header = |g: &mut Guest, kind: u32, sector: u64| {
        g.put(hdr, kind);
        g.put(hdr + 8, sector);
    };
    // Each case: (what, descriptors, the status it must get, or None: used without one).
    header(&mut g, VIRTIO_BLK_T_OUT, 0);
    let cases: Vec<(&str, Vec<Desc>, Option<u8>)> = vec![
        (
            "data outside guest RAM",
            vec![
                (hdr, 16, next, 1),
                (0x7_0000_0000, 512, next, 2),
                (status, 1, write, 0),
            ],
            Some(1),
        ),
        (
            "a looping chain",
            vec![(hdr, 16, next, 1), (hdr, 16, next, 0)],
            None,
        ),
        ("no status byte", vec![(hdr, 16, 0, 0)], None),
        (
            "a zero-length data descriptor",
            vec![
                (hdr, 16, next, 1),
                (bad.data + 0x100, 0, next, 2),
                (status, 1, write, 0),
            ],
            Some(0),
        ),
        (
            "a 2 GiB length",
            vec![
                (hdr, 16, next, 1),
                (bad.data + 0x100, 0x8000_0000, next, 2),
                (status, 1, write, 0),
            ],
            Some(1),
        ),
        (
            "a chain over 4 GiB (virtio-queue ends it: no status)",
            vec![
                (hdr, 16, next, 1),
                (bad.data + 0x100, u32::MAX, next, 2),
                (status, 1, write, 0),
            ],
            None,
        ),
        (
            "device-writable header",
            vec![(hdr, 16, write | next, 1), (status, 1, write, 0)],
            Some(1),
        ),
        (
            "readable after writable",
            vec![
                (hdr, 16, next, 1),
                (status, 1, write | next, 2),
                (bad.data + 0x100, 512, 0, 0),
            ],
            Some(1),
        ),
        ("next past the table", vec![(hdr, 16, next, 200)], None),
    ];
    for (what, descs, want) in cases {
        g.put(status, 0xffu8);
        let before = used_idx(&g, bad);
        offer(&mut g, bad, &descs, &[0]);
        wait_used(&g, bad, before.wrapping_add(1));
        if let Some(want) = want {
            assert_eq!(g.get::<u8>(status), want, "{what}");
        }
        assert_eq!(
            o.qmp("query-status").expect("status")["status"],
            "running",
            "{what}"
        );
        good_disk_works(&mut g, 2);
    }

    // DISCARD without having negotiated it: S_UNSUPP.
    header(&mut g, VIRTIO_BLK_T_DISCARD, 0);
    let seg = bad.data + 0x100;
    g.put(seg, 0u64);
    g.put(seg + 8, 8u32);
    g.put(seg + 12, 0u32);
    g.put(status, 0xffu8);
    let before = used_idx(&g, bad);
    offer(
        &mut g,
        bad,
        &[
            (hdr, 16, next, 1),
            (seg, 16, next, 2),
            (status, 1, write, 0),
        ],
        &[0],
    );
    wait_used(&g, bad, before.wrapping_add(1));
    assert_eq!(g.get::<u8>(status), 2, "DISCARD not negotiated");

    // A head index past the queue's size: the device needs a reset; nothing else
    // stops.
    offer(&mut g, bad, &[], &[200]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let reset = loop {
        let events = o.events();
        if let Some(e) = events.iter().find(|e| e["event"] == "X_DEVICE_NEEDS_RESET") {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "no X_DEVICE_NEEDS_RESET");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(reset["data"]["device"], "bad");
    assert_eq!(o.qmp("query-status").expect("status")["status"], "running");
    good_disk_works(&mut g, 3);
    // The driver resets the device and sets it up again: it works.
    set_up(&mut g, bad, flush_feature);
    let s = request(&mut g, bad, VIRTIO_BLK_T_FLUSH, 0, None);
    assert_eq!(g.get::<u8>(s), 0, "the reset device works again");

    assert!(
        o.events()
            .iter()
            .all(|e| e["event"] != "BLOCK_IO_ERROR" && e["event"] != "STOP"),
        "a guest's mistake passed for a host error"
    );
    assert_eq!(o.qmp("quit").expect("quit"), json!({}));
    assert_eq!(o.join(), Exit::Quit);
}
