//! The termination signals' thread. SIGTERM, SIGINT and SIGHUP end holdfast the way
//! QMP `quit` does: the run-state owner pauses the vCPUs, settles every disk (replays and flushes what it can, says
//! how many bytes it must drop) and sends `SHUTDOWN` with reason `host-signal`.
//!
//! The signals are blocked in every thread ([`block_termination_signals`], called
//! before any thread starts, so all inherit the mask) and taken synchronously by one
//! thread ([`forward_termination_signals`]) that turns them into
//! [`Input::HostSignal`]s: nothing runs in a signal handler.

use std::sync::mpsc::Sender;

use crate::owner::Input;

const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// A signal's name, as `kill -l` spells it with the `SIG` prefix.
fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in SIGNALS {
        // SAFETY: as above; `s` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Blocks the termination signals in the calling thread and every thread it starts
/// afterwards. Call it before starting any thread.
pub fn block_termination_signals() -> std::io::Result<()> {
    let set = termination_set();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(r))
    }
}

/// Starts the thread that waits for the blocked termination signals and forwards
/// each to the run-state owner. It ends when the owner is gone.
pub fn forward_termination_signals(
    owner: Sender<Input>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let set = termination_set();
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` is initialised and `signal` is a valid place to store
            // the number; the signals are blocked in every thread (see above).
            let r = unsafe { libc::sigwait(&set, &mut signal) };
            if r != 0 {
                continue;
            }
            let name = signal_name(signal);
            if owner.send(Input::HostSignal { name }).is_err() {
                return;
            }
        })
}
