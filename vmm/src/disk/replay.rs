//! A disk's replay on `cont`: one at a time, on a thread of its own, so that a replay
//! whose host call hangs never holds the run-state owner.

use std::sync::{Arc, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

use super::worker::{queue_broken, used_interrupt, WORKER_PREFIX};
use super::{describe, Busy, DiskEvents, Replayed, ResumeFailure, Slot, HUNG_AFTER};

/// Where a disk's replay is. Only the owner starts one (`cont`), and only from
/// `Idle` or `Ended`: never two at once, and exactly one since the disk stopped
/// before the VM runs (docs/durability.md, "Requests in flight").
#[derive(Debug)]
pub(super) enum Replay {
    /// None under way, and no outcome the owner has not taken.
    Idle,
    /// A replay thread has the disk (a `cont` that was refused while it hung left it
    /// running).
    Running,
    /// It finished: a success has answered the parked requests already; the next
    /// `cont` takes the outcome, unless the disk was detached since (then it is
    /// stale, and dropped).
    Ended {
        outcome: Result<u64, holdfast_block::ReplayError>,
        took: Duration,
    },
}

impl Slot {
    /// Whether the disk can be resumed: no replay or host call of its hangs (a
    /// young one is waited for, up to [`HUNG_AFTER`]), and attached. Asked of every
    /// disk before any is replayed, so that a refused `cont` changes nothing.
    pub fn ready(&self) -> Result<(), ResumeFailure> {
        let busy = |Busy(call)| ResumeFailure::Busy {
            disk: self.id.clone(),
            call,
        };
        self.wait_for_replay().map_err(busy)?;
        let disk = self.disk_within(HUNG_AFTER, false, true).map_err(busy)?;
        if disk.is_detached() {
            return Err(ResumeFailure::Detached {
                disk: self.id.clone(),
            });
        }
        Ok(())
    }

    /// Resumes the disk (`cont`): replays it if it stopped, then lets it serve what
    /// the guest queued meanwhile. `Some` if a replay ran since the last `cont`.
    /// Refused while a host call of the disk is outstanding (one that is young is
    /// waited for, up to [`HUNG_AFTER`]): the guest must not run beside a call that
    /// may still change what it reads. The replay runs on a thread of its own: if
    /// one of its calls hangs, the owner is told (Busy) rather than held; the replay
    /// goes on, and the next `cont` waits for it (as long as its calls return) and
    /// takes its outcome, rather than start a second one.
    pub fn resume(
        self: &Arc<Self>,
        mem: &GuestMemoryMmap,
        events: &DiskEvents,
    ) -> Result<Option<Replayed>, ResumeFailure> {
        let busy = |Busy(call)| ResumeFailure::Busy {
            disk: self.id.clone(),
            call,
        };
        self.wait_for_replay().map_err(busy)?;
        let mut disk = self.disk_within(HUNG_AFTER, false, true).map_err(busy)?;
        // Disk, then transport: a worker never holds both, a vCPU never waits on the
        // disk.
        self.transport()
            .device_mut()
            .take_pending()
            .apply(&mut **disk);
        let ended = std::mem::replace(&mut *self.lock_replay(), Replay::Idle);
        if !disk.is_stopped() {
            drop(disk);
            // Requests the guest queued while the VM was paused.
            let _ = self.notify.write(1);
            return Ok(match ended {
                Replay::Ended {
                    outcome: Ok(bytes),
                    took,
                } => Some(self.replayed(bytes, took)),
                _ => None,
            });
        }
        if let Replay::Ended {
            outcome: Err(error),
            ..
        } = ended
        {
            // A replay a refused `cont` left running failed: this `cont` says so; the
            // next one replays again.
            return Err(ResumeFailure::Replay {
                disk: self.id.clone(),
                error: error.error,
            });
        }
        // The state changes with the disk held: no replay can start beside this one.
        *self.lock_replay() = Replay::Running;
        drop(disk);
        if let Err(e) = self.spawn_replay(mem.clone(), events.clone()) {
            *self.lock_replay() = Replay::Idle;
            return Err(busy(Busy(format!("cannot start its replay: {e}"))));
        }
        self.wait_for_replay().map_err(busy)?;
        match std::mem::replace(&mut *self.lock_replay(), Replay::Idle) {
            Replay::Ended {
                outcome: Ok(bytes),
                took,
            } => {
                let _ = self.notify.write(1);
                Ok(Some(self.replayed(bytes, took)))
            }
            Replay::Ended {
                outcome: Err(error),
                ..
            } => Err(ResumeFailure::Replay {
                disk: self.id.clone(),
                error: error.error,
            }),
            Replay::Idle | Replay::Running => unreachable!("wait_for_replay returned"),
        }
    }

    fn replayed(&self, bytes_rewritten: u64, duration: Duration) -> Replayed {
        Replayed {
            disk: self.id.clone(),
            bytes_rewritten,
            duration,
        }
    }

    /// Replays the disk on a thread of its own, once no call is in flight on it. A
    /// success answers the parked requests at once (the guest sees them when its
    /// vCPUs run); the outcome is kept for the owner ([`Replay::Ended`]).
    fn spawn_replay(
        self: &Arc<Self>,
        mem: GuestMemoryMmap,
        events: DiskEvents,
    ) -> std::io::Result<JoinHandle<()>> {
        let slot = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("{WORKER_PREFIX}{}", self.id))
            .spawn(move || {
                let started = Instant::now();
                let mut disk = slot.disk_alone();
                let outcome = disk.replay().map(|report| {
                    let bytes = report.bytes_rewritten;
                    slot.answer_replay(&mem, &events, report);
                    bytes
                });
                slot.remember(&**disk);
                // Ended with the disk still held, so that whoever takes the disk next
                // also finds the outcome.
                *slot.lock_replay() = Replay::Ended {
                    outcome,
                    took: started.elapsed(),
                };
                drop(disk);
                slot.replay_done.notify_all();
            })
    }

    /// Puts a successful replay's completions in the used ring, with an interrupt.
    fn answer_replay(
        &self,
        mem: &GuestMemoryMmap,
        events: &DiskEvents,
        report: holdfast_block::ReplayReport,
    ) {
        // (With a write log: after every completion the engine made before.)
        if let Some(order) = &self.log_order {
            order.wait_all();
        }
        let mut t = self.transport();
        let (device, queues) = t.device_and_queues();
        let resumed = device.complete_replay(mem, &mut queues[0], report);
        if resumed.used > 0 {
            used_interrupt(self, &mut t, mem);
        }
        // The bytes are on the host; only the guest's queue cannot take the
        // completions. That is the device's problem, not the VM's.
        if let Some(e) = &resumed.broken_queue {
            queue_broken(self, &mut t, e, events);
        }
    }

    /// Waits while a replay runs, as long as its host calls return; Busy once one
    /// hangs (the replay goes on).
    pub(super) fn wait_for_replay(&self) -> Result<(), Busy> {
        let mut replay = self.lock_replay();
        while matches!(*replay, Replay::Running) {
            let call = self.watch.outstanding();
            if call.is_some_and(|c| c.age() >= HUNG_AFTER) {
                return Err(Busy(format!("its replay is under way: {}", describe(call))));
            }
            replay = self
                .replay_done
                .wait_timeout(replay, Duration::from_millis(10))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        Ok(())
    }

    pub(super) fn lock_replay(&self) -> MutexGuard<'_, Replay> {
        self.replay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
