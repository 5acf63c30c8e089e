//! Runs of a Linux guest: `holdfast run` as a child process, driven over QMP the way
//! an operator drives it, its serial console read line by line.
//!
//! One run: copy the scenario's disk images into the run's folder; boot holdfast with
//! every disk on the run's host (`x-host=simulated:MODEL`) and strategy
//! (`x-strategy=NAME`); wait for the ready marker; count acknowledged units; start
//! the outage when its time or line comes (`x-block-fault`), end it after `lasts`;
//! when the VM stops, evict the host's clean pages (memory pressure) and `cont` every
//! `cont_after` until it resumes or `tries` `cont`s after the outage ended failed;
//! let the guest finish; then verify: boot the guest again on the same images (the
//! simulated cache is gone with the first process, as after a host reboot) or run
//! the host command, and compare what it finds with what was acknowledged.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use holdfast_block::sim::timeline::{HostState, Timeline, VmState};
use serde_json::{json, Value};

use super::error::{Error, QmpFailure, Unsupported};
use super::realhost::RealHost;
use super::report::RunRecord;
use super::scenario::{
    Host, LabStrategy, LinuxGuest, OutageKind, OutagePlan, Plan, Progress, Verify, When,
};

/// What the run's threads report, in arrival order.
enum Msg {
    Line(String),
    Event(String),
    ConsoleClosed,
}

/// A QMP connection: commands and their replies here, events to the run's channel.
struct Qmp {
    stream: UnixStream,
    replies: Receiver<Value>,
}

impl Qmp {
    /// Connects (the socket appears once holdfast started), negotiates, and passes
    /// every event on to `events`.
    fn connect(path: &Path, events: Sender<Msg>, child: &mut Child) -> Result<Qmp, Error> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let failed = |failure| Error::Qmp {
            command: "connect".into(),
            failure,
        };
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(source) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(Error::ExitedEarly {
                            vmm: "the VMM".into(),
                            status,
                        });
                    }
                    if Instant::now() > deadline {
                        return Err(failed(QmpFailure::NoSocket {
                            path: path.to_owned(),
                            source,
                        }));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let reader = stream.try_clone().map_err(|e| failed(QmpFailure::Io(e)))?;
        let (reply_tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Some(name) = v["event"].as_str() {
                    let _ = events.send(Msg::Event(name.to_string()));
                } else if v.get("QMP").is_none() && reply_tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut q = Qmp { stream, replies };
        q.call("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// Sends a command; `Ok` with its return value, or how it failed (the VMM's
    /// error is [`QmpFailure::Refused`]).
    fn call(&mut self, command: &str, args: Value) -> Result<Value, Error> {
        let failed = |failure| Error::Qmp {
            command: command.to_owned(),
            failure,
        };
        let line = json!({"execute": command, "arguments": args}).to_string() + "\n";
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| failed(QmpFailure::Io(e)))?;
        let reply = self
            .replies
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| failed(QmpFailure::NoAnswer))?;
        match reply.get("return") {
            Some(v) => Ok(v.clone()),
            None => Err(failed(QmpFailure::Refused(
                reply["error"]["desc"]
                    .as_str()
                    .unwrap_or("an error without a description")
                    .to_string(),
            ))),
        }
    }
}

/// Kills the child if the run ends early.
pub(super) struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn holdfast_exe() -> Result<PathBuf, Error> {
    std::env::current_exe().map_err(|source| Error::Start {
        program: "holdfast (this binary: not found)".into(),
        source,
    })
}

/// Copies `from` to `to`, leaving zeroed MiBs as holes (images are mostly empty).
pub(super) fn copy_image(from: &Path, to: &Path) -> Result<(), Error> {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let fail = |what: &Path, source| Error::File {
        path: what.to_owned(),
        source,
    };
    let mut src = std::fs::File::open(from).map_err(|e| fail(from, e))?;
    let dst = std::fs::File::create(to).map_err(|e| fail(to, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match src.read(&mut buf[n..]).map_err(|e| fail(from, e))? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], at).map_err(|e| fail(to, e))?;
        }
        at += n as u64;
    }
    dst.set_len(at).map_err(|e| fail(to, e))?;
    dst.sync_all().map_err(|e| fail(to, e))
}

/// The disks a run boots on: a copy in `dir` of each disk the guest writes, the
/// image itself of each it sees read-only (`guest.disks[].readonly`).
pub(super) fn run_disks(guest: &LinuxGuest, dir: &Path) -> Result<Vec<(String, PathBuf)>, Error> {
    let mut disks = Vec::new();
    for (id, image) in &guest.disks {
        if guest.is_read_only(id) {
            disks.push((id.clone(), image.clone()));
            continue;
        }
        let copy = dir.join(format!("{id}.img"));
        eprintln!("lab:   copying {} to {}", image.display(), copy.display());
        copy_image(image, &copy)?;
        disks.push((id.clone(), copy));
    }
    Ok(disks)
}

/// Removes a run's copies of the disks the guest writes (never a read-only disk's
/// image: that is the scenario's own).
pub(super) fn remove_copies(guest: &LinuxGuest, disks: &[(String, PathBuf)]) {
    for (id, p) in disks {
        if !guest.is_read_only(id) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `holdfast run` for the guest with these disks and command line; with
/// `write_logs`, each disk the guest writes logs its writes and flushes to
/// `DIR/ID.wlog`; a read-only disk is `readonly=on`.
fn holdfast_command(
    guest: &LinuxGuest,
    cmdline: &str,
    disks: &[(String, PathBuf)],
    disk_options: &str,
    write_logs: Option<&Path>,
    dir: &Path,
    log_name: &str,
) -> Result<Command, Error> {
    let mut c = Command::new(holdfast_exe()?);
    c.arg("run")
        .arg("--kernel")
        .arg(&guest.kernel)
        .arg("--cmdline")
        .arg(cmdline)
        .arg("--mem")
        .arg(format!("{}K", guest.memory >> 10))
        .arg("--cpus")
        .arg(guest.cpus.to_string())
        .arg("--serial")
        .arg("stdio");
    if let Some(initrd) = &guest.initrd {
        c.arg("--initrd").arg(initrd);
    }
    for (id, path) in disks {
        let extra = if guest.is_read_only(id) {
            ",readonly=on".to_string()
        } else {
            write_logs
                .map(|d| format!(",write-log={}", write_log_path(d, id).display()))
                .unwrap_or_default()
        };
        c.arg("--disk").arg(format!(
            "path={},id={id}{disk_options}{extra}",
            path.display()
        ));
    }
    let log_path = dir.join(log_name);
    let log = std::fs::File::create(&log_path).map_err(Error::file(&log_path))?;
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
    Ok(c)
}

/// Where a power-cut run's disk `id` logs its writes and flushes.
pub(super) fn write_log_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.wlog"))
}

/// The VMM a run boots the guest under.
#[derive(Debug, Clone)]
pub(super) enum Vmm {
    /// `holdfast run` with these extra `--disk` options.
    Holdfast(String),
    /// QEMU 10 as Debian ships it: `werror=stop,rerror=stop`, its default cache or
    /// `cache=none`, virtio-blk on virtio-mmio (microvm with ACPI, as holdfast's guest
    /// expects its disks).
    Qemu { cache_none: bool },
}

fn qemu_command(
    guest: &LinuxGuest,
    disks: &[(String, PathBuf)],
    cache_none: bool,
    sock: &Path,
    dir: &Path,
) -> Result<Command, Error> {
    // QEMU: the one on PATH, or $QEMU (and $QEMU_DATA for its firmware, -L), as the
    // nested test host bundles it.
    let mut c = Command::new(std::env::var_os("QEMU").unwrap_or("qemu-system-x86_64".into()));
    if let Some(data) = std::env::var_os("QEMU_DATA") {
        c.arg("-L").arg(data);
    }
    c.args(["-M", "microvm,acpi=on", "-enable-kvm", "-cpu", "host"])
        .arg("-m")
        .arg(format!("{}M", guest.memory >> 20))
        .arg("-smp")
        .arg(guest.cpus.to_string())
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-append")
        .arg(&guest.cmdline)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()));
    if let Some(initrd) = &guest.initrd {
        c.arg("-initrd").arg(initrd);
    }
    let cache = if cache_none { ",cache=none" } else { "" };
    for (id, path) in disks {
        let ro = if guest.is_read_only(id) {
            ",readonly=on"
        } else {
            ""
        };
        c.arg("-drive")
            .arg(format!(
                "file={},if=none,id={id},format=raw,werror=stop,rerror=stop{cache}{ro}",
                path.display()
            ))
            .arg("-device")
            .arg(format!("virtio-blk-device,drive={id}"));
    }
    let log_path = dir.join("qemu.log");
    let log = std::fs::File::create(&log_path).map_err(Error::file(&log_path))?;
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
    Ok(c)
}

/// How a run breaks and mends the host storage.
pub(super) enum Breaker<'a> {
    /// Fault rules over QMP (`x-block-fault`) on the simulated host of this disk.
    Simulated { target: String },
    /// The real host's dm device.
    Real(&'a RealHost),
}

impl Breaker<'_> {
    fn start(&self, qmp: &mut Qmp, kind: OutageKind) -> Result<(), Error> {
        match self {
            Breaker::Simulated { target } => {
                for (layer, rule) in outage_rules(kind)? {
                    qmp.call(
                        "x-block-fault",
                        json!({"device": target, "layer": layer, "arm": rule}),
                    )?;
                }
                Ok(())
            }
            Breaker::Real(host) if kind == OutageKind::Hang => Ok(host.hang_device()?),
            Breaker::Real(host) if kind == OutageKind::WriteEnospc => {
                let took = host.fill_up()?;
                eprintln!(
                    "lab: host file system filled up (a file took its {} MiB free)",
                    took >> 20
                );
                Ok(())
            }
            // Every I/O of the host device fails: write-back, and so fdatasync.
            Breaker::Real(host) => Ok(host.break_device()?),
        }
    }

    fn end(&self, qmp: &mut Qmp, kind: OutageKind) -> Result<(), Error> {
        match self {
            Breaker::Simulated { target } => {
                for layer in ["calls", "writeback"] {
                    qmp.call(
                        "x-block-fault",
                        json!({"device": target, "layer": layer, "clear": "lab-outage"}),
                    )?;
                }
                Ok(())
            }
            Breaker::Real(host) if kind == OutageKind::Hang => Ok(host.resume_device()?),
            Breaker::Real(host) if kind == OutageKind::WriteEnospc => Ok(host.free_up()?),
            Breaker::Real(host) => Ok(host.repair_device()?),
        }
    }
}

/// Reads the child's console into `tx` (and into `log`), line by line. Text without
/// its newline at the end is not a line: a power cut can stop the guest in the middle
/// of `ACK 31`, and `ACK 3` is not an acknowledgement (the log keeps it).
fn read_console(child: &mut Child, tx: Sender<Msg>, log: PathBuf) -> Result<(), Error> {
    let out = child.stdout.take().ok_or(Error::NoConsole)?;
    let mut file = std::fs::File::create(&log).map_err(Error::file(&log))?;
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                // read_until stops short of a newline only at the end.
                Ok(_) if raw.last() != Some(&b'\n') => {
                    let _ = file.write_all(&raw);
                    break;
                }
                Ok(_) => {
                    let _ = file.write_all(&raw);
                    let line = String::from_utf8_lossy(&raw).trim_end().to_string();
                    if tx.send(Msg::Line(line)).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(Msg::ConsoleClosed);
    });
    Ok(())
}

/// The `x-block-fault` rules that start an outage: (layer, op, errno).
fn outage_rules(kind: OutageKind) -> Result<Vec<(&'static str, Value)>, Unsupported> {
    let fail = |op: &str, errno: &str| json!({"name": "lab-outage", "op": op, "errno": errno});
    Ok(match kind {
        // Write-back of the host's cache fails: the next fdatasync reports it.
        OutageKind::FlushEio => vec![("writeback", fail("write", "EIO"))],
        OutageKind::FlushEnospc => vec![("writeback", fail("write", "ENOSPC"))],
        OutageKind::WriteEio => vec![("calls", fail("write", "EIO"))],
        OutageKind::WriteEnospc => vec![("calls", fail("write", "ENOSPC"))],
        // The device below the cache stops answering: write-back waits, and so do
        // fdatasync and reads of pages not in the cache; writes into the cache go on
        // (as with a suspended dm table under a host file system).
        OutageKind::Hang => vec![(
            "writeback",
            json!({"name": "lab-outage", "op": "any", "hang": true}),
        )],
        other => return Err(Unsupported::OutageOnSimulatedHost(other)),
    })
}

/// Records an event in the timeline and says it on stderr (progress while a run
/// lasts; a test host's watchdog counts silence).
fn note(timeline: &mut Timeline, at: u64, what: impl Into<String>) {
    let what = what.into();
    eprintln!("lab:   {:>6.1} s  {what}", at as f64 / 1000.0);
    timeline.event(at, what);
}

/// What the workload run saw.
#[derive(Default)]
pub(super) struct Seen {
    pub(super) acked: Vec<String>,
    app_errors: usize,
    paused: usize,
    resumed_after_pause: bool,
    pub(super) outage_started: bool,
    fs_went_down: bool,
    repaired: bool,
    gave_up: bool,
    pub(super) timed_out: bool,
    exit: Option<std::process::ExitStatus>,
}

/// The workload part of a run: boot, outage, operator, until the guest ends. Each
/// turn of its loop takes the steps below in order ([`Workload::turn`]), then one
/// console line or QMP event.
pub(super) struct Workload<'a> {
    plan: &'a Plan,
    progress: &'a Progress,
    outage: &'a OutagePlan,
    disks: &'a [(String, PathBuf)],
    vmm: &'a Vmm,
    breaker: &'a Breaker<'a>,
    timeline: &'a mut Timeline,
    child: Reap,
    qmp: Qmp,
    messages: Receiver<Msg>,
    start: Instant,
    heartbeat: Instant,
    seen: Seen,
    /// When the guest printed its ready marker.
    ready: Option<Instant>,
    /// Console lines that matched the outage's `when.line` since then.
    matches: u32,
    /// When the `nth` of them came (the outage starts `after` it).
    line_met: Option<Instant>,
    /// The outage is on (since then).
    outage_since: Option<Instant>,
    outage_over: bool,
    /// The VM is stopped (since then), and the operator's last step.
    stopped_since: Option<Instant>,
    last_step: Option<Instant>,
    /// `cont`s since the outage ended.
    tries_after: usize,
    console_open: bool,
}

/// Whether the loop goes on.
enum Turn {
    Next,
    Done,
}

impl<'a> Workload<'a> {
    /// Boots the guest under `vmm` and connects to its QMP socket.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn boot(
        plan: &'a Plan,
        guest: &LinuxGuest,
        progress: &'a Progress,
        outage: &'a OutagePlan,
        disks: &'a [(String, PathBuf)],
        vmm: &'a Vmm,
        breaker: &'a Breaker<'a>,
        dir: &Path,
        timeline: &'a mut Timeline,
    ) -> Result<Workload<'a>, Error> {
        let sock = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        // A power cut's crash states come from the disks' write logs.
        let logs = (outage.kind == OutageKind::PowerCut).then_some(dir);
        let mut command = match vmm {
            Vmm::Holdfast(options) => {
                let mut c = holdfast_command(
                    guest,
                    &guest.cmdline,
                    disks,
                    options,
                    logs,
                    dir,
                    "holdfast.log",
                )?;
                c.arg("--qmp").arg(&sock);
                c
            }
            Vmm::Qemu { cache_none } => qemu_command(guest, disks, *cache_none, &sock, dir)?,
        };
        let mut child = Reap(command.spawn().map_err(|source| Error::Start {
            program: format!("{vmm:?}"),
            source,
        })?);
        let start = Instant::now();
        let (tx, messages) = mpsc::channel();
        read_console(&mut child.0, tx.clone(), dir.join("console.log"))?;
        let qmp = Qmp::connect(&sock, tx, &mut child.0)?;
        Ok(Workload {
            plan,
            progress,
            outage,
            disks,
            vmm,
            breaker,
            timeline,
            child,
            qmp,
            messages,
            start,
            heartbeat: start,
            seen: Seen::default(),
            ready: None,
            matches: 0,
            line_met: None,
            outage_since: None,
            outage_over: false,
            stopped_since: None,
            last_step: None,
            tries_after: 0,
            console_open: true,
        })
    }

    /// Milliseconds since the VMM started (the timeline's clock).
    fn ms(&self, at: Instant) -> u64 {
        at.duration_since(self.start).as_millis() as u64
    }

    fn note(&mut self, at: Instant, what: impl Into<String>) {
        let ms = self.ms(at);
        note(self.timeline, ms, what);
    }

    /// Runs the guest until it ends (or the plan's timeout); what it saw.
    pub(super) fn run(mut self) -> Result<Seen, Error> {
        while let Turn::Next = self.turn()? {}
        let end = self.ms(Instant::now());
        self.timeline.end = end;
        if self.outage_since.is_some() {
            self.timeline.host(end, HostState::Ok);
        }
        Ok(self.seen)
    }

    /// One turn: the steps that look at the clock and the host, then one message.
    fn turn(&mut self) -> Result<Turn, Error> {
        let now = Instant::now();
        self.say_progress(now);
        if now.duration_since(self.start) > self.plan.timeout {
            self.seen.timed_out = true;
            self.note(now, "timed out");
            return Ok(Turn::Done);
        }
        self.start_outage_when_due(now)?;
        self.watch_the_host_fs(now)?;
        self.end_outage_when_over(now)?;
        if let Some(since) = self.stopped_since {
            self.operate(now, since)?;
        }
        if !self.console_open {
            match self.child.0.try_wait() {
                Ok(Some(status)) => {
                    self.seen.exit = Some(status);
                    return Ok(Turn::Done);
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(Error::Wait {
                        vmm: format!("{:?}", self.vmm),
                        source,
                    })
                }
            }
        }
        match self.messages.recv_timeout(Duration::from_millis(50)) {
            Ok(Msg::Line(line)) => self.console_line(&line),
            Ok(Msg::Event(name)) => self.qmp_event(name),
            Ok(Msg::ConsoleClosed) | Err(RecvTimeoutError::Disconnected) => {
                self.console_open = false
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        Ok(Turn::Next)
    }

    /// Every 30 s, how many units were acknowledged (a test host's watchdog counts
    /// silence).
    fn say_progress(&mut self, now: Instant) {
        if now.duration_since(self.heartbeat) >= Duration::from_secs(30) {
            self.heartbeat = now;
            eprintln!(
                "lab:   {:>6.1} s  {} acknowledged so far",
                now.duration_since(self.start).as_secs_f64(),
                self.seen.acked.len()
            );
        }
    }

    /// Starts the outage when its time or line has come.
    fn start_outage_when_due(&mut self, now: Instant) -> Result<(), Error> {
        let due = match (&self.outage.when, self.ready) {
            (When::At(d), Some(r)) => now.duration_since(r) >= *d,
            (When::Line { after, .. }, Some(_)) => self
                .line_met
                .is_some_and(|met| now.duration_since(met) >= *after),
            _ => false,
        };
        if !due || self.outage_since.is_some() || self.outage_over {
            return Ok(());
        }
        if self.outage.kind == OutageKind::PowerCut {
            // The machine stops dead: no flush, no shutdown; what the disks' write
            // logs hold is all that was ever told done.
            let _ = self.child.0.kill();
            self.outage_since = Some(now);
            self.outage_over = true;
            self.seen.outage_started = true;
            let ms = self.ms(now);
            self.timeline.host(ms, HostState::Down);
            let at = match &self.outage.when {
                When::Line { text, nth, after } => line_and_after(text, *nth, *after),
                When::At(d) => format!(" {} s after ready", d.as_secs_f64()),
            };
            self.note(now, format!("power cut{at}"));
            return Ok(());
        }
        self.breaker.start(&mut self.qmp, self.outage.kind)?;
        self.outage_since = Some(now);
        self.seen.outage_started = true;
        let state = if self.outage.kind == OutageKind::Hang {
            HostState::Hung
        } else {
            HostState::Broken
        };
        let ms = self.ms(now);
        self.timeline.host(ms, state);
        let at = match &self.outage.when {
            When::Line { text, nth, after } => line_and_after(text, *nth, *after),
            When::At(d) => format!(" {} s after ready", d.as_secs_f64()),
        };
        let what = format!("outage: {}{at}", self.outage.kind.as_str());
        self.note(now, what);
        Ok(())
    }

    /// The real host's file system can go down in any outage that meets its journal
    /// (ext4 aborts it at its next commit). fs-down: the outage lasts until it does
    /// (the kernel says so), at most `lasts`; a run where it never does fails. Once
    /// down, the operator's recovery (with `detach`) runs in [`Workload::operate`].
    fn watch_the_host_fs(&mut self, now: Instant) -> Result<(), Error> {
        if let (false, Breaker::Real(host)) = (self.seen.fs_went_down, self.breaker) {
            let said = host.down_messages();
            if !said.is_empty() {
                self.seen.fs_went_down = true;
                self.note(now, "host fs down");
                eprintln!("lab: host file system down: {}", said.join("; "));
                if self.outage.kind == OutageKind::FsDown && self.outage_since.is_some() {
                    self.breaker.end(&mut self.qmp, self.outage.kind)?;
                    self.outage_since = None;
                    self.outage_over = true;
                }
            }
        }
        if self.seen.fs_went_down && !self.seen.repaired {
            // Down, and it stays so when the device works again.
            let ms = self.ms(now);
            self.timeline.host(ms, HostState::Down);
        }
        Ok(())
    }

    /// Ends the outage once it lasted `lasts`.
    fn end_outage_when_over(&mut self, now: Instant) -> Result<(), Error> {
        let (Some(since), Some(lasts)) = (self.outage_since, self.outage.lasts) else {
            return Ok(());
        };
        if now.duration_since(since) < lasts {
            return Ok(());
        }
        self.breaker.end(&mut self.qmp, self.outage.kind)?;
        self.outage_since = None;
        self.outage_over = true;
        if !self.seen.fs_went_down {
            let ms = self.ms(now);
            self.timeline.host(ms, HostState::Ok);
        }
        self.note(now, "outage over");
        Ok(())
    }

    /// The operator while the VM is stopped (since `since`): every `cont_after`,
    /// repair the host if it went down, let the host reclaim memory, `cont`; `quit`
    /// after `tries` `cont`s since the outage ended.
    fn operate(&mut self, now: Instant, since: Instant) -> Result<(), Error> {
        let from = self.last_step.unwrap_or(since);
        let plan = self.plan;
        let operator = &plan.operator;
        if now.duration_since(from) < operator.cont_after || self.seen.gave_up {
            return Ok(());
        }
        self.last_step = Some(now);
        if self.outage_over && self.tries_after >= operator.tries {
            // Every `cont` since the outage ended failed, or stopped again.
            self.seen.gave_up = true;
            self.note(now, "quit");
            let _ = self.qmp.call("quit", json!({}));
            return Ok(());
        }
        if self.outage_over {
            self.tries_after += 1;
        }
        self.repair_the_host(now)?;
        let hanging = self.outage.kind == OutageKind::Hang && self.outage_since.is_some();
        if matches!(self.breaker, Breaker::Simulated { .. }) && !hanging {
            // (Not during a hang: the cache waits on the device below it.)
            // The guest is paused; the host reclaims memory.
            for (id, _) in self.disks {
                self.qmp
                    .call("x-block-fault", json!({"device": id, "evict": true}))?;
            }
        }
        self.note(now, "cont");
        if let Err(e) = self.qmp.call("cont", json!({})) {
            self.note(now, "cont failed");
            log::debug!("lab: cont refused: {e}");
        }
        Ok(())
    }

    /// The operator's steps once the real host's file system went down and its
    /// device works again (docs/durability.md): detach, unmount, repair, mount,
    /// attach; `cont` follows.
    fn repair_the_host(&mut self, now: Instant) -> Result<(), Error> {
        let due = self.seen.fs_went_down && self.outage_over && !self.seen.repaired;
        let (true, Breaker::Real(host), Vmm::Holdfast(_)) = (due, self.breaker, self.vmm) else {
            return Ok(());
        };
        if !self.plan.operator.detach {
            return Ok(());
        }
        for (id, _) in self.disks {
            self.qmp.call("x-block-detach", json!({"device": id}))?;
        }
        self.note(now, "detach");
        let said = host.remount()?;
        self.note(Instant::now(), format!("repaired: {said}"));
        for (id, path) in self.disks {
            self.qmp
                .call("x-block-attach", json!({"device": id, "filename": path}))?;
        }
        self.note(Instant::now(), "attach");
        let ms = self.ms(Instant::now());
        self.timeline.host(ms, HostState::Ok);
        self.seen.repaired = true;
        Ok(())
    }

    /// A console line: the ready marker, an acknowledged unit, an application error,
    /// a line the outage waits for.
    fn console_line(&mut self, line: &str) {
        let at = Instant::now();
        if self.ready.is_none() {
            if line.contains(&self.progress.ready) {
                self.ready = Some(at);
                self.note(at, "ready");
            }
            return;
        }
        if let Some(rest) = line.strip_prefix(self.progress.ack.as_str()) {
            let key = rest.split_whitespace().next().unwrap_or("").to_string();
            self.seen.acked.push(key);
            let ms = self.ms(at);
            self.timeline.acks.push(ms);
        }
        if let Some(e) = &self.progress.error {
            if line.starts_with(e.as_str()) {
                self.seen.app_errors += 1;
            }
        }
        if let When::Line { text, nth, .. } = &self.outage.when {
            if line.contains(text.as_str()) {
                self.matches += 1;
                if self.matches == *nth {
                    self.line_met = Some(at);
                }
            }
        }
    }

    /// A QMP event: the VM's state on the timeline; a stop starts the operator.
    fn qmp_event(&mut self, name: String) {
        let at = Instant::now();
        self.note(at, name.clone());
        let ms = self.ms(at);
        match name.as_str() {
            "STOP" => {
                let io_error = self
                    .timeline
                    .events
                    .iter()
                    .rev()
                    .nth(1)
                    .is_some_and(|(_, e)| e == "BLOCK_IO_ERROR");
                let state = if io_error {
                    VmState::IoError
                } else {
                    VmState::Paused
                };
                self.timeline.vm(ms, state);
                self.seen.paused += 1;
                self.stopped_since = Some(at);
                self.last_step = None;
            }
            "RESUME" => {
                self.timeline.vm(ms, VmState::Running);
                if self.seen.paused > 0 {
                    self.seen.resumed_after_pause = true;
                }
                self.stopped_since = None;
            }
            _ => {}
        }
    }
}

/// What the verification found: the units present, the check's verdict.
pub(super) struct Found {
    pub(super) have: BTreeSet<String>,
    pub(super) corrupt: usize,
    pub(super) passed: bool,
    pub(super) verdict: String,
}

impl Found {
    /// What a check printed: `have` and `corrupt` lines, and whether it passed (`why`
    /// says how it failed).
    fn from_output(
        text: &str,
        have: &str,
        corrupt: Option<&str>,
        passed: bool,
        why: String,
    ) -> Found {
        Found {
            have: keys(text, have),
            corrupt: corrupt.map(|c| keys(text, c).len()).unwrap_or(0),
            passed,
            verdict: if passed {
                "check ok".into()
            } else {
                format!("check failed ({why})")
            },
        }
    }
}

fn keys(text: &str, prefix: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The check boot's disk options: a host I/O error reaches its guest (`report`)
/// instead of pausing it (the default `stop`), so an image the host can no longer
/// read (a host file system whose outage broke the image's extents, as QEMU's run
/// of lab-real once left it) fails the check at once; with `stop` the check's VM
/// paused with no one to `cont` it, and the check waited for its whole timeout.
const VERIFY_DISK_OPTIONS: &str = ",werror=report,rerror=report";

pub(super) fn verify(
    plan: &Plan,
    guest: &LinuxGuest,
    disks: &[(String, PathBuf)],
    dir: &Path,
) -> Result<Found, Error> {
    match &plan.verify {
        Verify::Boot(b) => {
            let mut command = holdfast_command(
                guest,
                &b.cmdline,
                disks,
                VERIFY_DISK_OPTIONS,
                None,
                dir,
                "verify-holdfast.log",
            )?;
            let mut child = Reap(command.spawn().map_err(|source| Error::Start {
                program: "holdfast run (the check boot)".into(),
                source,
            })?);
            let (tx, rx) = mpsc::channel();
            read_console(&mut child.0, tx, dir.join("verify-console.log"))?;
            let started = Instant::now();
            let deadline = started + plan.timeout;
            let mut heartbeat = started;
            let mut text = String::new();
            let mut console_open = true;
            // Until the check's holdfast has exited (never a blocking wait: the lab
            // keeps saying how long it has waited, and gives up at the deadline).
            loop {
                if console_open {
                    match rx.recv_timeout(Duration::from_millis(200)) {
                        Ok(Msg::Line(l)) => {
                            text.push_str(&l);
                            text.push('\n');
                        }
                        Ok(Msg::ConsoleClosed) | Err(RecvTimeoutError::Disconnected) => {
                            console_open = false
                        }
                        Ok(Msg::Event(_)) | Err(RecvTimeoutError::Timeout) => {}
                    }
                } else {
                    match child.0.try_wait() {
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) => std::thread::sleep(Duration::from_millis(200)),
                    }
                }
                if heartbeat.elapsed() >= Duration::from_secs(30) {
                    heartbeat = Instant::now();
                    eprintln!(
                        "lab:   the check boot has run {:.0} s, {} lines so far{}",
                        started.elapsed().as_secs_f64(),
                        text.lines().count(),
                        if console_open {
                            ""
                        } else {
                            "; its console closed, holdfast has not exited yet"
                        }
                    );
                }
                if Instant::now() > deadline {
                    // What it last said, and its holdfast's log: a check boot that
                    // stops talking is otherwise a mystery once the run's files go
                    // (inside a test host they do).
                    let show = |what: &str, all: &str| {
                        eprintln!("lab:   {what}");
                        let lines: Vec<&str> = all.lines().collect();
                        for l in &lines[lines.len().saturating_sub(8)..] {
                            eprintln!("lab:     | {l}");
                        }
                    };
                    show("the check boot timed out; its console's last lines:", &text);
                    let log = std::fs::read_to_string(dir.join("verify-holdfast.log"));
                    show("its holdfast's log's last lines:", &log.unwrap_or_default());
                    // Reap kills it when `child` goes.
                    return Ok(Found {
                        have: keys(&text, &b.have),
                        corrupt: 0,
                        passed: false,
                        verdict: "the check boot timed out".into(),
                    });
                }
            }
            let passed = text.lines().any(|l| l.contains(&b.ok));
            let why = format!("no `{}`", b.ok);
            Ok(Found::from_output(
                &text,
                &b.have,
                b.corrupt.as_deref(),
                passed,
                why,
            ))
        }
        Verify::Host {
            command,
            have,
            corrupt,
        } => {
            let out = Command::new(&command[0])
                .args(&command[1..])
                .args(disks.iter().map(|(_, p)| p))
                .stdin(Stdio::null())
                .output()
                .map_err(|source| Error::Start {
                    program: command[0].clone(),
                    source,
                })?;
            let text = String::from_utf8_lossy(&out.stdout);
            let _ = std::fs::write(dir.join("verify.out"), out.stdout.as_slice());
            let passed = out.status.success();
            let why = out.status.to_string();
            Ok(Found::from_output(
                &text,
                have,
                corrupt.as_deref(),
                passed,
                why,
            ))
        }
        Verify::Oracle => Err(Unsupported::OracleForLinux.into()),
    }
}

/// Runs one host x strategy x outage with a Linux guest; its files go to
/// `out/runs/SLUG/`.
pub fn run(
    plan: &Plan,
    guest: &LinuxGuest,
    host: Host,
    strategy: LabStrategy,
    index: usize,
    out: &Path,
) -> Result<RunRecord, Error> {
    let outage = &plan.outages[index];
    let progress = plan.progress.as_ref().ok_or(Unsupported::NoProgress)?;
    let mut record = RunRecord::new(host, strategy, outage.kind, index);
    record.svg = format!("{}.svg", record.slug());
    let dir = out.join("runs").join(record.slug());
    std::fs::create_dir_all(&dir).map_err(Error::file(&dir))?;
    // The real host: a file system of its own for the run's images.
    let mut real = match host {
        Host::Real => {
            let images: u64 = guest
                .disks
                .iter()
                .filter(|(id, _)| !guest.is_read_only(id))
                .map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
                .sum();
            Some(RealHost::set_up(
                &dir,
                images + images / 4 + (256 << 20),
                &index.to_string(),
            )?)
        }
        Host::Simulated(_) => None,
    };
    let images_dir = real
        .as_ref()
        .map(|r| r.mount_point().to_path_buf())
        .unwrap_or(dir.clone());
    let disks = run_disks(guest, &images_dir)?;
    let hang = plan
        .hang_timeout
        .map(|t| format!(",hang-timeout={}", t.as_secs()))
        .unwrap_or_default();
    let vmm = match (host, strategy) {
        (Host::Simulated(model), LabStrategy::Engine(s)) => {
            // holdfast as its operator would set it up on such a host (the matrix does
            // the same): an extra flush where the host reports failures late.
            let extra = if model.reports_late() && s.is_holdfast() {
                ",extra-flush=on"
            } else {
                ""
            };
            Vmm::Holdfast(format!(
                ",x-host=simulated:{model},x-strategy={s}{extra}{hang}"
            ))
        }
        (Host::Real, LabStrategy::Engine(s)) => Vmm::Holdfast(format!(",x-strategy={s}{hang}")),
        (Host::Real, LabStrategy::Qemu { cache_none }) => Vmm::Qemu { cache_none },
        (Host::Simulated(_), LabStrategy::Qemu { .. }) => {
            return Err(Unsupported::QemuOnSimulatedHost(strategy).into())
        }
    };
    let breaker = match &real {
        Some(r) => Breaker::Real(r),
        None => Breaker::Simulated {
            target: outage
                .disk
                .clone()
                .unwrap_or_else(|| guest.first_writable().to_string()),
        },
    };
    let mut timeline = Timeline::default();
    let seen = Workload::boot(
        plan,
        guest,
        progress,
        outage,
        &disks,
        &vmm,
        &breaker,
        &dir,
        &mut timeline,
    )
    .and_then(Workload::run);
    // Whatever happened, the host storage works again before anything else.
    if let Some(r) = &real {
        let _ = r.resume_device();
        let _ = r.repair_device();
    }
    let seen = seen?;
    let mut host_note = String::new();
    if let Some(r) = &real {
        // Unmount (the host's page cache goes), repair if it went down, mount again:
        // the check reads what reached the device.
        eprintln!(
            "lab:   unmounting the host file system (its page cache goes) and mounting it again"
        );
        host_note = r.remount()?;
    }
    eprintln!("lab:   checking what survived");
    let found = verify(plan, guest, &disks, &dir)?;
    let acked: BTreeSet<&String> = seen.acked.iter().collect();
    record.acked = acked.len();
    record.lost = acked.iter().filter(|k| !found.have.contains(**k)).count();
    record.corrupt = found.corrupt;
    record.app_errors = seen.app_errors;
    let finished = seen.exit.is_some_and(|s| s.success()) && !seen.gave_up && !seen.timed_out;
    // No outage, nothing to resume from: the row must not say it resumed.
    record.resumed =
        seen.outage_started && finished && (seen.paused == 0 || seen.resumed_after_pause);
    record.verified = found.passed && seen.outage_started;
    let fs_down_missing = outage.kind == OutageKind::FsDown && !seen.fs_went_down;
    record.verified = record.verified && !fs_down_missing;
    record.verdict = if !seen.outage_started {
        "outage never started".into()
    } else if fs_down_missing {
        format!("the host file system never went down; {}", found.verdict)
    } else {
        found.verdict
    };
    if seen.timed_out {
        record.verdict.push_str("; timed out");
    }
    if !host_note.is_empty() {
        record.verdict = format!("{}; {host_note}", record.verdict);
    }
    record.timeline = timeline;
    // The images are the largest part of a run; keep them only where something was lost.
    if record.lost == 0 && record.corrupt == 0 && record.verified {
        remove_copies(guest, &disks);
    } else if let Some(r) = &mut real {
        r.keep();
    }
    Ok(record)
}

/// How a line trigger is told in the run's notes: " at line 3 with `ACK`", and
/// " 0.5 s after" it.
fn line_and_after(text: &str, nth: u32, after: Duration) -> String {
    if after.is_zero() {
        format!(" at line {nth} with `{text}`")
    } else {
        format!(" {} s after line {nth} with `{text}`", after.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_the_power_cut_cut_short_is_not_a_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = std::process::Command::new("sh")
            .args(["-c", "printf 'ACK 30\\nACK 3'"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = dir.path().join("console.log");
        read_console(&mut child, tx, log.clone()).expect("reader");
        let mut lines = Vec::new();
        for m in rx.iter() {
            match m {
                Msg::Line(l) => lines.push(l),
                Msg::ConsoleClosed => break,
                Msg::Event(_) => {}
            }
        }
        child.wait().expect("wait");
        assert_eq!(lines, ["ACK 30"]);
        let kept = std::fs::read_to_string(&log).expect("log");
        assert_eq!(
            kept, "ACK 30\nACK 3",
            "the log keeps what the guest printed"
        );
    }

    #[test]
    fn keys_are_the_first_word_after_the_prefix() {
        let text = "HAVE 1\nHAVE 2 extra\nxHAVE 3\nHAVE\nCORRUPT 4\nHAVE 2\n";
        let want: BTreeSet<String> = ["1", "2"].map(String::from).into();
        assert_eq!(keys(text, "HAVE "), want);
        assert_eq!(keys(text, "CORRUPT ").len(), 1);
    }

    #[test]
    fn every_outage_a_simulated_host_can_have_has_rules() {
        use holdfast_block::FaultRule;
        let rules = |kind| {
            let rules = outage_rules(kind).expect("rules");
            // Each is a rule x-block-fault takes.
            for (_, rule) in &rules {
                FaultRule::from_json_value(rule.clone()).expect("a valid rule");
            }
            rules
        };
        let flush = rules(OutageKind::FlushEio);
        assert_eq!(flush[0].0, "writeback");
        assert_eq!(
            (&flush[0].1["op"], &flush[0].1["errno"]),
            (&json!("write"), &json!("EIO"))
        );
        let full = rules(OutageKind::WriteEnospc);
        assert_eq!(
            (full[0].0, &full[0].1["errno"]),
            ("calls", &json!("ENOSPC"))
        );
        let hang = rules(OutageKind::Hang);
        assert_eq!((hang[0].0, &hang[0].1["hang"]), ("writeback", &json!(true)));
        rules(OutageKind::FlushEnospc);
        rules(OutageKind::WriteEio);
        assert!(outage_rules(OutageKind::FsDown).is_err());
    }

    /// A 256 MiB, one-CPU guest with these disks (and these of them read-only).
    fn test_guest(
        kernel: PathBuf,
        disks: Vec<(String, PathBuf)>,
        read_only: Vec<String>,
    ) -> LinuxGuest {
        LinuxGuest {
            kernel,
            initrd: None,
            cmdline: "console=ttyS0".into(),
            memory: 256 << 20,
            cpus: 1,
            disks,
            read_only,
        }
    }

    /// A `holdfast run` command's arguments as `holdfast run` parses them.
    fn parsed(command: &Command) -> crate::cli::RunOpts {
        let args: Vec<String> = command
            .get_args()
            .skip(1)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        crate::cli::parse_run(&args)
            .expect("parses")
            .expect("not --help")
    }

    #[test]
    fn the_check_boot_reports_host_io_errors_to_its_guest() {
        use holdfast_block::ErrorPolicy;
        let dir = tempfile::tempdir().expect("dir");
        let (kernel, image) = (dir.path().join("vmlinuz"), dir.path().join("disk.img"));
        std::fs::write(&kernel, b"k").expect("kernel");
        std::fs::write(&image, b"d").expect("image");
        let guest = test_guest(kernel, vec![], vec![]);
        let disks = [("data".to_string(), image)];
        let command = holdfast_command(
            &guest,
            "check",
            &disks,
            VERIFY_DISK_OPTIONS,
            Some(dir.path()),
            dir.path(),
            "verify-holdfast.log",
        )
        .expect("command");
        let opts = parsed(&command);
        let config = &opts.disks[0].config;
        assert_eq!(
            (config.werror, config.rerror),
            (ErrorPolicy::Report, ErrorPolicy::Report)
        );
        assert_eq!(
            opts.disks[0].write_log.as_deref(),
            Some(dir.path().join("data.wlog").as_path()),
            "a power cut's run logs each disk's writes beside its files"
        );
    }

    #[test]
    fn a_read_only_disk_is_readonly_on_and_keeps_no_log() {
        let dir = tempfile::tempdir().expect("dir");
        let (kernel, root, data) = (
            dir.path().join("vmlinuz"),
            dir.path().join("root.img"),
            dir.path().join("data.img"),
        );
        for p in [&kernel, &root, &data] {
            std::fs::write(p, b"x").expect("file");
        }
        let guest = test_guest(
            kernel,
            vec![("root".into(), root.clone()), ("data".into(), data)],
            vec!["root".into()],
        );
        let runs = dir.path().join("run");
        std::fs::create_dir(&runs).expect("dir");
        let disks = run_disks(&guest, &runs).expect("disks");
        assert_eq!(disks[0].1, root, "the read-only image itself, no copy");
        assert_eq!(
            disks[1].1,
            runs.join("data.img"),
            "a copy of the one it writes"
        );
        let command = holdfast_command(
            &guest,
            "check",
            &disks,
            "",
            Some(&runs),
            &runs,
            "holdfast.log",
        )
        .expect("command");
        let opts = parsed(&command);
        assert!(opts.disks[0].config.read_only && opts.disks[0].write_log.is_none());
        assert!(!opts.disks[1].config.read_only && opts.disks[1].write_log.is_some());
        remove_copies(&guest, &disks);
        assert!(root.exists(), "the scenario's read-only image stays");
        assert!(!disks[1].1.exists(), "the run's copy goes");
    }

    #[test]
    fn image_copies_are_exact_and_sparse() {
        let dir = tempfile::tempdir().expect("dir");
        let (from, to) = (dir.path().join("a"), dir.path().join("b"));
        let mut bytes = vec![0u8; 5 << 20];
        bytes[3] = 1;
        bytes[(4 << 20) + 17] = 2;
        bytes.push(9); // a partial last MiB
        std::fs::write(&from, &bytes).expect("write");
        copy_image(&from, &to).expect("copy");
        assert_eq!(std::fs::read(&to).expect("read"), bytes);
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&to).expect("meta").blocks();
        assert!(
            blocks * 512 < 3 << 20,
            "zeroed MiBs are holes: {blocks} blocks"
        );
    }
}
