//! The guest's serial console as holdfast watches it on its way out: its last lines
//! (printed when a run ends badly), whether the kernel started the guest's init
//! (`--boot-timeout`), and whether the kernel panicked (a guest without pvpanic).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// How many of the console's last lines are kept.
pub const LAST_LINES: usize = 20;
/// The longest line kept whole; the rest of a longer one is dropped.
const MAX_LINE: usize = 512;

/// What the console showed so far; shared with the [`Tap`] that writes it.
#[derive(Debug, Default)]
pub struct Watch {
    last: Mutex<Lines>,
    init_started: AtomicBool,
    panicked: AtomicBool,
}

#[derive(Debug, Default)]
struct Lines {
    done: VecDeque<String>,
    partial: Vec<u8>,
}

impl Watch {
    /// The kernel said it runs the guest's init ("Run /init as init process").
    pub fn init_started(&self) -> bool {
        self.init_started.load(Ordering::SeqCst)
    }

    /// The kernel said it panicked ("Kernel panic - not syncing").
    pub fn panicked(&self) -> bool {
        self.panicked.load(Ordering::SeqCst)
    }

    /// The last lines, oldest first, the unfinished one last.
    pub fn last_lines(&self) -> Vec<String> {
        let l = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<String> = l.done.iter().cloned().collect();
        if !l.partial.is_empty() {
            out.push(String::from_utf8_lossy(&l.partial).into_owned());
        }
        let skip = out.len().saturating_sub(LAST_LINES);
        out.split_off(skip)
    }

    fn take(&self, bytes: &[u8]) {
        let mut l = self.last.lock().unwrap_or_else(|p| p.into_inner());
        for &b in bytes {
            match b {
                b'\n' => {
                    let line = String::from_utf8_lossy(&l.partial)
                        .trim_end_matches('\r')
                        .to_owned();
                    l.partial.clear();
                    self.look_at(&line);
                    if l.done.len() == LAST_LINES {
                        l.done.pop_front();
                    }
                    l.done.push_back(line);
                }
                _ if l.partial.len() < MAX_LINE => l.partial.push(b),
                _ => {}
            }
        }
    }

    fn look_at(&self, line: &str) {
        // init/main.c: "Run %s as init process"; panic.c: "Kernel panic - not syncing".
        // With `quiet` the kernel keeps its "Run" line to itself (KERN_INFO): then the
        // first line that is not the kernel's says that user space runs.
        if (line.contains("Run ") && line.contains(" as init process")) || from_user_space(line) {
            self.init_started.store(true, Ordering::SeqCst);
        }
        if line.contains("Kernel panic - not syncing") {
            self.panicked.store(true, Ordering::SeqCst);
        }
    }
}

/// Whether a console line was written by the guest's user space: it is not empty,
/// does not start with the kernel's printk timestamp (`[    1.234567] `, on in the
/// kernels distributions build) and is not one of the lines the x86 decompressor
/// prints before the kernel's own (with `earlyprintk`). A kernel built without printk
/// timestamps reads as user space: the boot timeout then never fires, rather than
/// end a guest that runs.
fn from_user_space(line: &str) -> bool {
    let line = line.trim();
    if line.is_empty() {
        return false;
    }
    if let Some(rest) = line.strip_prefix('[') {
        if let Some((stamp, _)) = rest.split_once(']') {
            let stamp = stamp.trim();
            if !stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.') {
                return false;
            }
        }
    }
    const DECOMPRESSOR: [&str; 5] = [
        "early console in",
        "Decompressing Linux",
        "Parsing ELF",
        "Performing relocations",
        "Booting the kernel",
    ];
    !DECOMPRESSOR.iter().any(|p| line.starts_with(p))
}

/// The console's writer: passes every byte on and shows it to its [`Watch`].
pub struct Tap {
    inner: Box<dyn Write + Send>,
    watch: Arc<Watch>,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap").field("watch", &self.watch).finish()
    }
}

impl Tap {
    pub fn new(inner: Box<dyn Write + Send>) -> (Tap, Arc<Watch>) {
        let watch = Arc::new(Watch::default());
        (
            Tap {
                inner,
                watch: watch.clone(),
            },
            watch,
        )
    }
}

impl Write for Tap {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.watch.take(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_and_sees_init_and_panics() {
        let (mut tap, watch) = Tap::new(Box::new(std::io::sink()));
        for i in 0..30 {
            write!(tap, "[    0.{i:06}] line {i}\r\n").expect("write");
        }
        assert!(!watch.init_started() && !watch.panicked());
        tap.write_all(b"[    1.0] Run /init as init process\n")
            .expect("write");
        assert!(watch.init_started());
        tap.write_all(b"[    2.0] Kernel panic - not syncing: Attempted to kill init!\nhalf")
            .expect("write");
        assert!(watch.panicked());
        let last = watch.last_lines();
        assert_eq!(last.len(), LAST_LINES);
        assert_eq!(last[LAST_LINES - 1], "half");
        assert_eq!(last[0], "[    0.000013] line 13");
        assert!(last[LAST_LINES - 3].ends_with("as init process"));
    }

    #[test]
    fn with_quiet_the_first_line_of_user_space_says_init_runs() {
        let kernel = [
            "",
            "\r",
            "Decompressing Linux... Parsing ELF... done.",
            "Booting the kernel.",
            "[    0.533129] PCI: Fatal: No config space access function found",
            "[12345.000001] a late one",
        ];
        for line in kernel {
            let (mut tap, watch) = Tap::new(Box::new(std::io::sink()));
            writeln!(tap, "{line}").expect("write");
            assert!(!watch.init_started(), "{line:?} is the kernel's");
        }
        for line in [
            "GUEST INIT",
            "Welcome to Debian!",
            "[  OK  ] Started udev",
            "[] x",
        ] {
            let (mut tap, watch) = Tap::new(Box::new(std::io::sink()));
            writeln!(tap, "{line}").expect("write");
            assert!(watch.init_started(), "{line:?} is user space's");
        }
    }

    #[test]
    fn a_line_without_an_end_is_cut_not_kept_whole() {
        let (mut tap, watch) = Tap::new(Box::new(std::io::sink()));
        tap.write_all(&vec![b'x'; 10 * MAX_LINE]).expect("write");
        assert_eq!(watch.last_lines()[0].len(), MAX_LINE);
    }
}
