//! The outage matrix must show holdfast keeping every acked byte, and must be able to
//! show loss: the QEMU-like peers lose data where real hosts make them.

use holdfast_block::sim::matrix::{run_all, run_cell, Outage, Strategy};
use holdfast_block::sim::HostModel;

#[test]
fn holdfast_loses_nothing_and_always_resumes() {
    let rows = run_all();
    assert_eq!(rows.len(), 3 * 5 * 6);
    for r in rows.iter().filter(|r| r.strategy == Strategy::Holdfast) {
        assert_eq!(r.acked_bytes_lost, 0, "{r:?}");
        assert!(r.resumed, "{r:?}");
        assert_eq!(r.stale_reads, 0, "{r:?}");
        assert_eq!(
            r.acked_writes, 80,
            "every write acked once the outage ended: {r:?}"
        );
        // A `cont` while storage is still broken must be refused...
        assert!(r.failed_conts >= 1, "{r:?}");
        // ...and so must one during which the outage comes back.
        if r.outage == Outage::RepeatDuringReplay {
            assert!(r.failed_conts >= 2, "{r:?}");
        }
    }
}

#[test]
fn retry_flush_loses_acked_writes_on_linux_hosts() {
    for host in [
        HostModel::Ext4Ordered,
        HostModel::Xfs,
        HostModel::Ext4Data,
        HostModel::Btrfs,
    ] {
        for outage in [Outage::FlushEio, Outage::WritebackEio, Outage::FlushEnospc] {
            let r = run_cell(Strategy::RetryFlush, host, outage);
            assert!(r.resumed, "{r:?}");
            assert!(
                r.acked_bytes_lost > 0,
                "QEMU's retry cannot recover what the host dropped: {r:?}"
            );
        }
        let r = run_cell(Strategy::RetryFlush, host, Outage::WriteEio);
        assert_eq!(
            r.acked_bytes_lost, 0,
            "a failed pwrite is retried whole: {r:?}"
        );
    }
    // FreeBSD keeps failed pages dirty, so a retried fsync really writes them.
    let r = run_cell(Strategy::RetryFlush, HostModel::FreeBsd, Outage::FlushEio);
    assert_eq!(r.acked_bytes_lost, 0, "{r:?}");
}

#[test]
fn sticky_cannot_resume_after_a_flush_failure() {
    for host in HostModel::ALL {
        let r = run_cell(Strategy::Sticky, host, Outage::FlushEio);
        assert!(!r.resumed, "{r:?}");
        let r = run_cell(Strategy::Sticky, host, Outage::WriteEio);
        assert!(r.resumed, "only flush failures are sticky: {r:?}");
    }
}
