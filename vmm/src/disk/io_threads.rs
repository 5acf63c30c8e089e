//! A disk's I/O threads: the host calls its worker hands over run here, beside each
//! other ([`super::CALLS_PER_DISK`] at most), holding no lock while they run.

use std::collections::VecDeque;
use std::sync::{Arc, MutexGuard};

use vm_memory::GuestMemoryMmap;

use super::worker::{run_job, Job};
use super::{DiskEvents, Slot, WORKER_PREFIX};

/// The calls handed to a disk's I/O threads, in order.
#[derive(Default)]
pub(super) struct Calls {
    /// Handed over, not yet taken by a thread.
    pub(super) waiting: VecDeque<Job>,
    /// The threads were started.
    started: bool,
    /// The worker ended: the threads run what is queued and end.
    ending: bool,
    /// The threads, for [`Slot::join_io_threads`].
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Slot {
    /// Gives a call to the disk's I/O threads (one wakes for it), starting them with
    /// the first; the call back if none could start or they are ending.
    pub(super) fn hand_over(
        self: &Arc<Self>,
        call: Job,
        mem: &GuestMemoryMmap,
        events: &DiskEvents,
    ) -> Result<(), Job> {
        let mut calls = self.lock_calls();
        if calls.ending {
            return Err(call);
        }
        if !calls.started {
            let mut started = 0;
            for _ in 0..self.io_threads {
                let (slot, mem, events) = (Arc::clone(self), mem.clone(), events.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("{WORKER_PREFIX}{}", self.id))
                    .spawn(move || io_thread(&slot, &mem, &events));
                if let Ok(handle) = spawned {
                    calls.threads.push(handle);
                    started += 1;
                }
            }
            if started == 0 {
                return Err(call);
            }
            calls.started = true;
        }
        calls.waiting.push_back(call);
        drop(calls);
        self.call_ready.notify_one();
        Ok(())
    }

    pub(super) fn lock_calls(&self) -> MutexGuard<'_, Calls> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs a job on the disk's I/O threads, or here if none could start.
    pub(super) fn run_apart(
        self: &Arc<Self>,
        job: Job,
        mem: &GuestMemoryMmap,
        events: &DiskEvents,
    ) {
        if let Err(job) = self.hand_over(job, mem, events) {
            run_job(self, mem, events, job);
        }
    }

    /// Lets the disk's I/O threads end once the calls they have are done.
    pub fn stop_io_threads(&self) {
        self.lock_calls().ending = true;
        self.call_ready.notify_all();
    }

    /// [`Slot::stop_io_threads`], then waits until they have ended (their
    /// thread-local state freed: a fuzz target's leak check after each input found
    /// the threads of the last one still ending).
    pub fn join_io_threads(&self) {
        self.stop_io_threads();
        let threads = std::mem::take(&mut self.lock_calls().threads);
        let me = std::thread::current().id();
        for t in threads {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

/// One of a disk's I/O threads: runs the calls the worker hands over, one at a
/// time, until the worker ends.
fn io_thread(slot: &Slot, mem: &GuestMemoryMmap, events: &DiskEvents) {
    let _serving = crate::logging::ServingDisk::new(&slot.id);
    let mut calls = slot.lock_calls();
    loop {
        if let Some(job) = calls.waiting.pop_front() {
            drop(calls);
            run_job(slot, mem, events, job);
            calls = slot.lock_calls();
        } else if calls.ending {
            return;
        } else {
            calls = slot
                .call_ready
                .wait(calls)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}
