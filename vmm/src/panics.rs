//! holdfast's panic hook. A panic in any holdfast thread is reported and ends
//! holdfast the way `quit` does, never silently: the hook prints the thread's name
//! and the panic's message on stderr and tells the run-state owner
//! ([`Input::ThreadPanicked`], or [`Input::DeviceFailed`] for a disk's I/O worker),
//! which pauses the vCPUs, settles every disk (writes and flushes what it can, says
//! how many bytes it drops) and sends `SHUTDOWN`. A vCPU thread that died counts as
//! parked, so the pause does not wait for it. A panic in the owner's own thread is
//! caught around the owner in `main`, whose `Vm::shutdown` settles the disks.

use std::sync::mpsc::Sender;
use std::sync::{Mutex, OnceLock};

use crate::owner::Input;

static OWNER: OnceLock<Mutex<Sender<Input>>> = OnceLock::new();

/// The panic's message and where it happened.
fn describe(info: &std::panic::PanicHookInfo<'_>) -> String {
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    match info.location() {
        Some(at) => format!("{message} (at {}:{})", at.file(), at.line()),
        None => message,
    }
}

/// Installs the hook; panics from now on go to `owner` (the first call's).
pub fn report_panics_to(owner: Sender<Input>) {
    if OWNER.set(Mutex::new(owner)).is_err() {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned();
        let message = describe(info);
        log::error!("thread {thread} panicked: {message}");
        if let Some(owner) = OWNER.get() {
            let owner = owner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = owner.send(input_for(thread, message));
        }
    }));
}

/// A panic in a disk's I/O worker is that device's failure; any other thread's is
/// that thread's.
fn input_for(thread: String, message: String) -> Input {
    match thread.strip_prefix(crate::disk::WORKER_PREFIX) {
        Some(disk) => Input::DeviceFailed {
            device: format!("virtio-blk disk {disk} (its I/O worker)"),
            message,
        },
        None => Input::ThreadPanicked { thread, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_the_device_thread_reaches_the_owner_as_the_devices_failure() {
        let (tx, rx) = std::sync::mpsc::channel();
        report_panics_to(tx);
        let r = std::thread::Builder::new()
            .name(format!("{}data", crate::disk::WORKER_PREFIX))
            .spawn(|| panic!("an overflowing fault rule"))
            .expect("spawn")
            .join();
        assert!(r.is_err());
        // Other tests of this binary panic in their threads too (the hook is the
        // process's): find this one's.
        loop {
            match rx.recv_timeout(std::time::Duration::from_secs(5)) {
                Ok(Input::DeviceFailed { device, message }) => {
                    assert!(device.contains("virtio-blk disk data"), "{device}");
                    assert!(message.contains("an overflowing fault rule"), "{message}");
                    assert!(message.contains("panics.rs"), "{message}");
                    break;
                }
                Ok(Input::ThreadPanicked { .. }) => continue,
                other => panic!("no DeviceFailed: {other:?}"),
            }
        }
    }
}
