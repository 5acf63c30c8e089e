//! A disk's worker: serves its queue off the vCPU threads, apart from every other
//! disk, hands what may run beside others to the I/O threads ([`super::io_threads`])
//! and runs what needs the engine alone itself; puts completions in the used ring and
//! tells the owner about host errors ([`DiskEvent`]).

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use holdfast_block::{Begun, Call, Outcome, Request};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{BlockTransport, DiskEvent, DiskEvents, Slot};
use crate::error_chain;
use crate::virtio::block::{GuestWrite, Next, Pending, QueueRun};

/// The prefix of a disk's I/O worker thread's name (`disk-ID`; a panic there is the
/// device's failure).
pub const WORKER_PREFIX: &str = "disk-";

/// A disk's I/O worker: waits on its queue's ioeventfd and serves the queue, off the
/// vCPU threads and apart from every other disk. Ends when `stop` is signalled.
pub fn spawn_worker(
    mem: GuestMemoryMmap,
    slot: Arc<Slot>,
    stop: Arc<EventFd>,
    events: DiskEvents,
) -> std::io::Result<JoinHandle<()>> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        slot.notify.as_raw_fd(),
        EpollEvent::new(EventSet::IN, 0),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, 1),
    )?;
    std::thread::Builder::new()
        .name(format!("{WORKER_PREFIX}{}", slot.id))
        .spawn(move || {
            let mut ready = [EpollEvent::default(); 2];
            loop {
                let n = match epoll.wait(-1, &mut ready) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                // `stop` stays readable: every worker sees it.
                if ready[..n].iter().any(|ev| ev.data() == 1) {
                    slot.stop_io_threads();
                    return;
                }
                let _ = slot.notify.read();
                serve(&slot, &mem, &events);
            }
        })
}

/// Serves one disk's queue (its worker) until it is empty or the disk stops:
/// reads and write-back writes go to the disk's I/O threads and run beside each
/// other; what needs the disk alone (a FLUSH, zeroes, a discard, ...) waits for them
/// and runs here, and the worker takes nothing more off the queue meanwhile.
/// Completions raise a used-buffer interrupt, a host error goes to the run-state
/// owner, a broken queue makes the device ask for a reset.
pub fn serve(slot: &Arc<Slot>, mem: &GuestMemoryMmap, events: &DiskEvents) {
    let _serving = crate::logging::ServingDisk::new(&slot.id);
    loop {
        {
            let disk = slot.engine();
            slot.remember(&**disk);
            if disk.is_stopped() {
                return;
            }
        }
        let next = {
            let mut t = slot.transport();
            if !t.live() {
                return;
            }
            let (device, queues) = t.device_and_queues();
            match device.next(mem, &mut queues[0]) {
                Ok(next) => next,
                Err(e) => return queue_broken(slot, &mut t, &e, events),
            }
        };
        let (req, pending) = match next {
            Next::Empty => return,
            Next::Refused => {
                used_interrupt(slot, &mut slot.transport(), mem);
                continue;
            }
            Next::Request(req, pending) => (req, pending),
            Next::GuestWrite(write, pending) => {
                match begin_guest_write(slot, mem, events, write, pending) {
                    None => continue,
                    Some(req) => (req, Pending::default()),
                }
            }
        };
        let (begun, ahead, ticket) = {
            let mut disk = slot.engine();
            pending.apply(&mut **disk);
            let begun = disk.begin(req);
            let ticket = match (&begun, &slot.log_order) {
                (Begun::Done(outcome), Some(order)) => order.ticket(outcome),
                _ => None,
            };
            let ahead = disk.flush_ahead();
            slot.remember(&**disk);
            (begun, ahead, ticket)
        };
        if let Some(flush) = ahead {
            slot.run_apart(Job::Call(flush), mem, events);
        }
        let (outcome, ticket) = match begun {
            Begun::Done(outcome) => (outcome, ticket),
            Begun::Call(call) => {
                slot.run_apart(Job::Call(call), mem, events);
                continue;
            }
            // The host call, with only the disk locked.
            Begun::Alone(req) => {
                let mut disk = slot.disk_alone();
                let outcome = disk.submit(req);
                let ticket = slot.log_order.as_ref().and_then(|o| o.ticket(&outcome));
                slot.remember(&**disk);
                (outcome, ticket)
            }
        };
        answer(slot, mem, events, outcome, ticket);
    }
}

/// A long write: where the disk would run it beside others, its host write goes to
/// an I/O thread, from guest memory, while this thread copies it for the buffer
/// (so the copy does not delay the host write); else it comes back copied, as a
/// request to begin as usual.
fn begin_guest_write(
    slot: &Arc<Slot>,
    mem: &GuestMemoryMmap,
    events: &DiskEvents,
    write: GuestWrite,
    pending: Pending,
) -> Option<Request> {
    // With a write log, the copy the engine keeps is made first and the log records
    // it (the bytes a replay would write), not guest memory at completion, which the
    // guest may have changed meanwhile.
    let logged_copy = slot.log_order.as_ref().map(|_| write.copy());
    if let Some(copy) = &logged_copy {
        slot.transport()
            .device_mut()
            .log_copy(write.tag, copy.clone());
    }
    let (call, ahead) = {
        let mut disk = slot.engine();
        pending.apply(&mut **disk);
        let call = disk.begin_borrowed_write(write.tag, write.offset, write.bytes());
        let ahead = disk.flush_ahead();
        slot.remember(&**disk);
        (call, ahead)
    };
    if let Some(flush) = ahead {
        slot.run_apart(Job::Call(flush), mem, events);
    }
    let Some(call) = call else {
        return Some(match logged_copy {
            Some(data) => Request::new(
                write.tag,
                holdfast_block::RequestOp::Write {
                    offset: write.offset,
                    data,
                },
            ),
            None => write.into_request(),
        });
    };
    let write = Arc::new(write);
    let (copied, copy) = std::sync::mpsc::sync_channel(1);
    let job = Job::Borrowed(Box::new(BorrowedWrite {
        call,
        write: Arc::clone(&write),
        copy,
    }));
    let copy = || logged_copy.clone().unwrap_or_else(|| write.copy());
    match slot.hand_over(job, mem, events) {
        Ok(()) => {
            let _ = copied.send(copy());
        }
        Err(job) => {
            let _ = copied.send(copy());
            run_job(slot, mem, events, job);
        }
    }
    None
}

/// What a disk's I/O threads run.
pub(super) enum Job {
    Call(Call),
    /// A long write's host call, from guest memory; the worker sends the copy that
    /// the buffer keeps on `copy` meanwhile ([`begin_guest_write`]).
    Borrowed(Box<BorrowedWrite>),
}

pub(super) struct BorrowedWrite {
    call: Call,
    write: Arc<GuestWrite>,
    copy: std::sync::mpsc::Receiver<holdfast_block::Bytes>,
}

/// Runs a job's host call (with no lock held), ends it on the disk and answers it.
pub(super) fn run_job(slot: &Slot, mem: &GuestMemoryMmap, events: &DiskEvents, job: Job) {
    let call = match job {
        Job::Call(call) => call,
        Job::Borrowed(job) => {
            let BorrowedWrite {
                mut call,
                write,
                copy,
            } = *job;
            call.run_borrowed(write.runs());
            // The worker copies meanwhile; were it gone, the copy is made here.
            call.supply(copy.recv().unwrap_or_else(|_| write.copy()));
            // A driver that reset the device meanwhile may have reused the memory
            // while the host write read it: the host gets the buffer's copy again.
            if slot.transport().device().resets() != write.resets {
                call.rerun_from_copy();
            }
            call
        }
    };
    end_call(slot, mem, events, call);
}

/// Runs a call in flight (with no lock held), ends it on the disk and answers it.
fn end_call(slot: &Slot, mem: &GuestMemoryMmap, events: &DiskEvents, mut call: Call) {
    call.run();
    // From here this completion counts for the shared interrupt (see `answer`).
    slot.answering.fetch_add(1, Ordering::SeqCst);
    let (outcome, ticket) = {
        let mut disk = slot.engine();
        let outcome = disk.end(call);
        let ticket = slot.log_order.as_ref().and_then(|o| o.ticket(&outcome));
        slot.remember(&**disk);
        if disk.in_flight() == 0 {
            slot.idle.notify_all();
        }
        (outcome, ticket)
    };
    answered(slot, mem, events, outcome, ticket);
}

/// Puts what the disk did with a request in the used ring (with an interrupt) and
/// tells the owner about a host error. Completions that reach the used ring at the
/// same time share one interrupt: the last thread to leave raises it for all.
pub(super) fn answer(
    slot: &Slot,
    mem: &GuestMemoryMmap,
    events: &DiskEvents,
    outcome: Outcome,
    ticket: Option<u64>,
) {
    slot.answering.fetch_add(1, Ordering::SeqCst);
    answered(slot, mem, events, outcome, ticket);
}

/// [`answer`], for a completion already counted in `answering` (an I/O thread
/// counts its own from the moment its host call returned).
/// With a write log, `ticket` is the completion's place in the engine's order: it
/// waits for its turn ([`super::LogOrder`]).
pub(super) fn answered(
    slot: &Slot,
    mem: &GuestMemoryMmap,
    events: &DiskEvents,
    outcome: Outcome,
    ticket: Option<u64>,
) {
    let order = slot.log_order.as_ref().zip(ticket);
    if let Some((order, ticket)) = order {
        order.wait(ticket);
    }
    let mut run = QueueRun::default();
    {
        let mut t = slot.transport();
        let (device, queues) = t.device_and_queues();
        match device.finish(mem, &mut queues[0], &mut run, outcome) {
            Ok(0) => {}
            Ok(_) => slot.unsignalled.store(true, Ordering::SeqCst),
            Err(e) => queue_broken(slot, &mut t, &e, events),
        }
        let last = slot.answering.fetch_sub(1, Ordering::SeqCst) == 1;
        // `used_interrupt` clears `unsignalled`.
        if last && slot.unsignalled.load(Ordering::SeqCst) {
            used_interrupt(slot, &mut t, mem);
        }
    }
    if let Some((order, ticket)) = order {
        order.done(ticket);
    }
    if let Some(report) = run.error {
        events.send(DiskEvent::Error {
            disk: slot.id.clone(),
            report,
            at: run.error_at.unwrap_or_else(Instant::now),
        });
    }
}

/// After the device put entries in the used ring: a used-buffer interrupt, unless
/// the driver asked for none yet (with event indexes, its `used_event`; one the
/// device cannot read gets the interrupt: a missing one would leave the guest
/// waiting).
pub(super) fn used_interrupt(slot: &Slot, t: &mut BlockTransport, mem: &GuestMemoryMmap) {
    let (_, queues) = t.device_and_queues();
    slot.unsignalled.store(false, Ordering::SeqCst);
    if queues[0].needs_notification(mem).unwrap_or(true) {
        t.interrupt_status()
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        let _ = slot.irq.write(1);
    }
}

/// The guest broke a disk's queue: DEVICE_NEEDS_RESET, a config interrupt, and the
/// owner is told (stderr and QMP). Nothing else stops.
pub(super) fn queue_broken(
    slot: &Slot,
    t: &mut BlockTransport,
    error: &dyn std::error::Error,
    events: &DiskEvents,
) {
    t.needs_reset();
    let _ = slot.irq.write(1);
    events.send(DiskEvent::NeedsReset {
        disk: slot.id.clone(),
        reason: error_chain(error),
    });
}
