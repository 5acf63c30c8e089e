//! The virtio-mmio transport driven the way Linux's virtio_mmio driver drives it.

use std::sync::atomic::Ordering;

use holdfast_vmm::virtio::mmio::{Action, MmioTransport};
use holdfast_vmm::virtio::VirtioDevice;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;

/// A device that records what the transport told it.
#[derive(Debug, Default)]
struct Fake {
    acked: Option<u64>,
    config: [u8; 8],
    /// Ring features offered besides the others.
    ring: u64,
}

impl VirtioDevice for Fake {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 64]
    }
    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | 0b1010 | self.ring
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = self.config.get_mut(offset as usize + i) {
                *slot = *b;
            }
        }
    }
}

fn rd(t: &MmioTransport<Fake>, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(reg), &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport<Fake>, reg: u32, value: u32) -> Action {
    t.write(u64::from(reg), &value.to_le_bytes())
}

/// Probe, negotiate, set up queue 0: everything up to DRIVER_OK.
fn negotiate(t: &mut MmioTransport<Fake>, driver_high: u32) {
    assert_eq!(rd(t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(rd(t, VIRTIO_MMIO_DEVICE_ID), 2);
    wr(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    wr(
        t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    wr(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(t, VIRTIO_MMIO_DEVICE_FEATURES), 0b1010);
    wr(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES, 0b1000);
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES, driver_high);
    wr(
        t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
}

fn setup_queue0(t: &mut MmioTransport<Fake>) {
    wr(t, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(rd(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
    wr(t, VIRTIO_MMIO_QUEUE_NUM, 128);
    wr(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
    wr(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 1);
    wr(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
    wr(t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
    wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
}

const UP_TO_FEATURES_OK: u32 =
    VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;

#[test]
fn handshake_activates_with_the_queues_the_driver_set_up() {
    let mut t = MmioTransport::new(Fake::default());
    negotiate(&mut t, 1);
    assert_eq!(rd(&t, VIRTIO_MMIO_STATUS), UP_TO_FEATURES_OK);
    assert_eq!(t.device().acked, Some((1 << 32) | 0b1000));
    setup_queue0(&mut t);
    assert_eq!(
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            UP_TO_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
        ),
        Action::Activate
    );
    let q = &t.queues()[0];
    assert_eq!((q.size(), q.ready()), (128, true));
    assert_eq!(q.desc_table(), 0x1_0000_1000);
    assert_eq!((q.avail_ring(), q.used_ring()), (0x2000, 0x3000));
    assert!(!t.queues()[1].ready());
    assert_eq!(wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0), Action::Notify(0));
    assert_eq!(
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7),
        Action::None,
        "no such queue"
    );
}

#[test]
fn a_legacy_driver_is_refused_at_features_ok() {
    let mut t = MmioTransport::new(Fake::default());
    negotiate(&mut t, 0);
    assert_eq!(rd(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    assert_eq!(t.device().acked, None);
}

#[test]
fn queues_and_features_freeze_at_the_right_steps() {
    let mut t = MmioTransport::new(Fake::default());
    // Queue registers before FEATURES_OK are ignored.
    wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
    assert_eq!(t.queues()[0].size(), 256);
    negotiate(&mut t, 1);
    // Driver features after FEATURES_OK are ignored.
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0b10);
    assert_eq!(t.device().acked, Some((1 << 32) | 0b1000));
    setup_queue0(&mut t);
    wr(
        &mut t,
        VIRTIO_MMIO_STATUS,
        UP_TO_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    // Queue registers after DRIVER_OK are ignored.
    wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
    assert_eq!(t.queues()[0].size(), 128);
    // Clearing bits other than by reset is ignored.
    wr(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_eq!(
        rd(&t, VIRTIO_MMIO_STATUS),
        UP_TO_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
    );
}

#[test]
fn driver_ok_without_a_ready_queue_does_not_activate() {
    let mut t = MmioTransport::new(Fake::default());
    negotiate(&mut t, 1);
    assert_eq!(
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            UP_TO_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
        ),
        Action::None
    );
    assert_eq!(rd(&t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK, 0);
}

#[test]
fn reset_returns_to_the_start() {
    let mut t = MmioTransport::new(Fake::default());
    negotiate(&mut t, 1);
    setup_queue0(&mut t);
    wr(
        &mut t,
        VIRTIO_MMIO_STATUS,
        UP_TO_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    t.interrupt_status()
        .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
    assert_eq!(wr(&mut t, VIRTIO_MMIO_STATUS, 0), Action::Reset);
    assert_eq!(rd(&t, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(rd(&t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert!(!t.queues()[0].ready());
    assert_eq!(t.queues()[0].size(), 256);
}

#[test]
fn event_indexes_reach_the_queues_only_where_offered_and_taken() {
    const EVENT_IDX: u32 = 1 << VIRTIO_RING_F_EVENT_IDX;
    // (offered, taken by the driver, in the queues)
    for (offered, taken, on) in [
        (true, true, true),
        (true, false, false),
        (false, true, false),
    ] {
        let ring = if offered { u64::from(EVENT_IDX) } else { 0 };
        let mut t = MmioTransport::new(Fake {
            ring,
            ..Fake::default()
        });
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(
            &mut t,
            VIRTIO_MMIO_DRIVER_FEATURES,
            if taken { EVENT_IDX } else { 0 },
        );
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        assert!(
            t.queues().iter().all(|q| !q.event_idx_enabled()),
            "before FEATURES_OK"
        );
        wr(&mut t, VIRTIO_MMIO_STATUS, UP_TO_FEATURES_OK);
        assert_eq!(rd(&t, VIRTIO_MMIO_STATUS), UP_TO_FEATURES_OK);
        let label = format!("offered {offered}, taken {taken}");
        assert!(
            t.queues().iter().all(|q| q.event_idx_enabled() == on),
            "{label}"
        );
        assert_eq!(wr(&mut t, VIRTIO_MMIO_STATUS, 0), Action::Reset);
        assert!(
            t.queues().iter().all(|q| !q.event_idx_enabled()),
            "{label}: after a reset"
        );
    }
}

#[test]
fn interrupts_are_acked_bit_by_bit() {
    let mut t = MmioTransport::new(Fake::default());
    let shared = t.interrupt_status();
    shared.fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
    t.config_changed();
    assert_eq!(
        rd(&t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(rd(&t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
    wr(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(rd(&t, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
}

#[test]
fn config_space_and_odd_accesses() {
    let mut t = MmioTransport::new(Fake::default());
    t.device_mut().config = [1, 2, 3, 4, 5, 6, 7, 8];
    let mut b = [0u8; 2];
    t.read(0x100 + 3, &mut b);
    assert_eq!(b, [4, 5]);
    // Config writes before DRIVER are ignored; after, they reach the device.
    t.write(0x100, &[9]);
    assert_eq!(t.device().config[0], 1);
    wr(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    wr(
        &mut t,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    t.write(0x100, &[9]);
    assert_eq!(t.device().config[0], 9);
    // Registers are 32-bit: narrow reads see zero, narrow writes do nothing.
    let mut narrow = [0xFFu8; 2];
    t.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut narrow);
    assert_eq!(narrow, [0, 0]);
    assert_eq!(t.write(u64::from(VIRTIO_MMIO_STATUS), &[0]), Action::None);
    // Unknown registers read zero; a selector past the queues reads QueueNumMax 0.
    assert_eq!(rd(&t, 0x0C8), 0);
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 9);
    assert_eq!(rd(&t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
}

#[test]
fn block_device_behind_the_transport() {
    use holdfast_block::{Disk, DiskConfig, MemBackend};
    use holdfast_vmm::virtio::block::BlockDevice;
    let t = MmioTransport::new(BlockDevice::new(&Disk::new(
        MemBackend::new(1 << 20),
        DiskConfig::default(),
    )));
    let mut b = [0u8; 4];
    t.read(u64::from(VIRTIO_MMIO_DEVICE_ID), &mut b);
    assert_eq!(u32::from_le_bytes(b), 2);
    let mut cap = [0u8; 8];
    t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
}
