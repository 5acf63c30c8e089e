//! The outage matrix must show holdfast keeping every acked byte, and must be able to
//! show loss: the QEMU-like peers lose data where real hosts make them.

use holdfast_block::sim::matrix::{run_all, run_cell, Outage, Start, Synthetic};
use holdfast_block::sim::strategy::Strategy;
use holdfast_block::sim::timeline::{HostState, VmState};
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

#[test]
fn the_deliberately_broken_strategy_loses_acked_writes() {
    let r = run_cell(Strategy::XLyingFlush, HostModel::Xfs, Outage::FlushEio);
    assert!(r.acked_writes_lost > 0, "{r:?}");
    assert!(Strategy::XLyingFlush.promises_no_loss());
    assert!(
        !Strategy::ALL.contains(&Strategy::XLyingFlush),
        "not in the table"
    );
}

#[test]
fn a_synthetic_run_is_the_same_every_time_and_its_timeline_shows_the_outage() {
    let spec = Synthetic::cell(Strategy::Holdfast, HostModel::Ext4Data, Outage::FlushEio);
    let a = spec.run();
    assert_eq!(a, spec.run(), "same spec, same run");
    let t = &a.timeline;
    assert_eq!(t.acks.len(), a.result.acked_writes);
    assert!(t.acks.windows(2).all(|w| w[0] <= w[1]));
    let hosts: Vec<HostState> = t.host.iter().map(|&(_, s)| s).collect();
    assert_eq!(hosts, [HostState::Ok, HostState::Broken, HostState::Ok]);
    let vms: Vec<VmState> = t.vm.iter().map(|&(_, s)| s).collect();
    assert_eq!(vms, [VmState::Running, VmState::IoError, VmState::Running]);
    let names: Vec<&str> = t.events.iter().map(|(_, e)| e.as_str()).collect();
    assert_eq!(
        names[..4],
        ["BLOCK_IO_ERROR", "STOP", "cont", "cont failed"],
        "{names:?}"
    );
    assert_eq!(names.last(), Some(&"RESUME"));
    // The outage starts at round 5 of 10: before it, 4 rounds of 8 acked writes.
    let broken_at = t.host[1].0;
    assert_eq!(t.acks.iter().filter(|&&a| a < broken_at).count(), 32);

    // A later start by time, and a different seed, change the run.
    let mut later = spec.clone();
    later.start = Start::AtMs(1000);
    assert_ne!(later.run().timeline.host[1].0, broken_at);
}
