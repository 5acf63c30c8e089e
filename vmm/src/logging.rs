//! holdfast's log: what happens while the guest runs (host errors, pauses, detach
//! and attach, broken queues, QMP clients dropped, the end) goes to stderr through
//! the `log` facade, so that the rust-vmm crates' own messages (virtio-queue's, for
//! one) are seen too. Each line has a timestamp and a level; a line logged by the
//! device thread while it serves a disk names that disk, whichever crate logged it.
//! `RUST_LOG` filters as env_logger documents (`RUST_LOG=warn`, `RUST_LOG=debug`);
//! the default is `info`.

use std::cell::RefCell;
use std::io::Write;

thread_local! {
    static SERVING: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// While alive, lines this thread logs are about disk `id`.
#[derive(Debug)]
pub struct ServingDisk(Option<String>);

impl ServingDisk {
    pub fn new(id: &str) -> Self {
        ServingDisk(SERVING.with(|s| s.replace(Some(id.to_owned()))))
    }
}

impl Drop for ServingDisk {
    fn drop(&mut self) {
        let previous = self.0.take();
        SERVING.with(|s| *s.borrow_mut() = previous);
    }
}

/// One log line, without its timestamp: `LEVEL holdfast: [disk ID: ]message`, the
/// target named when it is another crate's.
pub fn line(level: log::Level, target: &str, message: &std::fmt::Arguments<'_>) -> String {
    let mut text = message.to_string();
    if let Some(disk) = SERVING.with(|s| s.borrow().clone()) {
        if !text.starts_with("disk ") {
            text = format!("disk {disk}: {text}");
        }
    }
    if target.starts_with("holdfast") {
        format!("{level:<5} holdfast: {text}")
    } else {
        format!("{level:<5} holdfast: {target}: {text}")
    }
}

/// Starts the logger (once; later calls do nothing).
pub fn init() {
    let env = env_logger::Env::default().default_filter_or("info");
    let _ = env_logger::Builder::from_env(env)
        .format(|buf, record| {
            let ts = buf.timestamp_millis();
            writeln!(
                buf,
                "{ts} {}",
                line(record.level(), record.target(), record.args())
            )
        })
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_about_a_disk_name_it_whoever_logs_them() {
        let plain = line(
            log::Level::Info,
            "holdfast_vmm::owner",
            &format_args!("ending"),
        );
        assert_eq!(plain, "INFO  holdfast: ending");
        let _serving = ServingDisk::new("data");
        let foreign = line(
            log::Level::Error,
            "virtio_queue::queue",
            &format_args!("attempted to add out of bounds descriptor to used ring: 300"),
        );
        assert_eq!(
            foreign,
            "ERROR holdfast: virtio_queue::queue: disk data: attempted to add out of bounds descriptor to used ring: 300"
        );
        let ours = line(
            log::Level::Warn,
            "holdfast_vmm::vm",
            &format_args!("disk data: x"),
        );
        assert_eq!(ours, "WARN  holdfast: disk data: x", "not named twice");
        drop(_serving);
        let after = line(log::Level::Info, "holdfast_vmm::vm", &format_args!("y"));
        assert_eq!(after, "INFO  holdfast: y");
    }
}
