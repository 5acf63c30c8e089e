//! The run-state owner's contract with QMP (SEMANTICS.md, "Host errors"): a host
//! error under `stop` sends BLOCK_IO_ERROR then STOP and leaves the VM in io-error;
//! `cont` while storage is broken fails naming the disk and errno, re-sends
//! BLOCK_IO_ERROR and stays paused; a `cont` that replays sends X_BLOCK_REPLAY then
//! RESUME; `quit` with bytes it cannot flush says how many it drops. Driven with the
//! events the device thread sends, on a real VM running a tiny guest.

use std::sync::mpsc::channel;
use std::time::Duration;

use holdfast_block::{
    Backend, Disk, DiskConfig, ErrorAction, FaultHandle, FaultInjector, FaultOp, FaultRule,
    HostError, HostOp, IoErrorReport, MemBackend, Request, RequestOp, Trigger,
};
use holdfast_qmp::{Args, EventSink, QmpError};
use holdfast_vmm::owner;
use holdfast_vmm::vm::{Exit, Vm, VmEvent};
use serde_json::{json, Value};

mod common;

/// A disk with 512 buffered bytes, stopped on a failing flush that stays armed.
fn stopped_disk() -> (Disk<Box<dyn Backend>>, FaultHandle) {
    let injector = FaultInjector::new(MemBackend::new(1 << 20));
    let faults = injector.handle();
    let backend: Box<dyn Backend> = Box::new(injector);
    let mut disk = Disk::new(backend, DiskConfig::default());
    assert!(!disk
        .submit(Request::new(
            1,
            RequestOp::Write {
                offset: 0,
                data: vec![7; 512]
            }
        ))
        .is_parked());
    faults.arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Always).named("outage"));
    assert!(disk.submit(Request::new(2, RequestOp::Flush)).is_parked());
    (disk, faults)
}

struct Running {
    tx: std::sync::mpsc::Sender<VmEvent>,
    events: tokio::sync::broadcast::Receiver<String>,
    owner: std::thread::JoinHandle<Exit>,
    faults: FaultHandle,
    _dir: tempfile::TempDir,
}

fn start() -> Option<Running> {
    if !common::kvm_available() {
        return None;
    }
    let dir = tempfile::tempdir().expect("dir");
    let (disk, faults) = stopped_disk();
    let config = common::counting_vm_config(dir.path(), disk, faults.clone());
    let mut vm = Vm::start(config).expect("start");
    let tx = vm.event_sender();
    let sink = EventSink::new();
    let events = sink.subscribe();
    let owner = std::thread::spawn(move || {
        let exit = owner::run(&mut vm, &sink);
        vm.shutdown();
        exit
    });
    Some(Running {
        tx,
        events,
        owner,
        faults,
        _dir: dir,
    })
}

impl Running {
    fn qmp(&self, command: &str) -> Result<Value, QmpError> {
        let (reply, answer) = channel();
        self.tx
            .send(VmEvent::Qmp {
                command: command.into(),
                args: Args::default(),
                reply,
            })
            .expect("owner alive");
        answer
            .recv_timeout(Duration::from_secs(20))
            .expect("an answer")
    }

    /// The names of the events sent so far, in order.
    fn event_names(&mut self) -> Vec<String> {
        let mut names = Vec::new();
        while let Ok(text) = self.events.try_recv() {
            let v: Value = serde_json::from_str(&text).expect("JSON");
            names.push(v["event"].as_str().unwrap_or("").to_owned());
        }
        names
    }

    /// What the device thread sends when the guest's flush hits the host error.
    fn disk_error(&self) {
        let report = IoErrorReport {
            error: HostError::new(HostOp::Flush, libc::EIO),
            action: ErrorAction::Stop,
        };
        self.tx
            .send(VmEvent::DiskError {
                disk: "data".into(),
                report,
                at: std::time::Instant::now(),
            })
            .expect("owner alive");
    }
}

#[test]
fn host_error_stop_and_cont_send_what_semantics_says() {
    let Some(mut r) = start() else { return };
    r.disk_error();
    assert_eq!(r.qmp("query-status").expect("status")["status"], "io-error");
    assert_eq!(r.event_names(), ["BLOCK_IO_ERROR", "STOP"]);
    let timings = r.qmp("x-query-timings").expect("timings");
    assert!(timings["error-to-stopped-ns"].is_u64(), "{timings}");
    assert!(timings["cont-to-running-ns"].is_null(), "{timings}");

    let err = r.qmp("cont").expect_err("storage still broken");
    assert!(
        err.desc.contains("disk data") && err.desc.contains("EIO"),
        "{}",
        err.desc
    );
    assert_eq!(r.qmp("query-status").expect("status")["status"], "io-error");
    assert_eq!(
        r.event_names(),
        ["X_BLOCK_REPLAY", "BLOCK_IO_ERROR"],
        "a failed replay reports again"
    );

    r.faults.clear_named("outage");
    assert_eq!(r.qmp("cont").expect("storage back"), json!({}));
    let timings = r.qmp("x-query-timings").expect("timings");
    assert!(
        timings["cont-to-running-ns"].as_u64() > Some(0),
        "{timings}"
    );
    assert_eq!(timings["replay-bytes"], 512, "{timings}");
    assert_eq!(r.qmp("query-status").expect("status")["status"], "running");
    assert_eq!(r.event_names(), ["X_BLOCK_REPLAY", "RESUME"]);
    let unflushed = r.qmp("x-query-unflushed").expect("query");
    assert_eq!(
        (
            unflushed[0]["bytes"].as_u64(),
            unflushed[0]["parked"].as_u64()
        ),
        (Some(0), Some(0))
    );

    assert_eq!(r.qmp("quit").expect("quit"), json!({}));
    assert_eq!(r.event_names(), ["SHUTDOWN"]);
    assert_eq!(r.owner.join().expect("owner"), Exit::Quit);
}

#[test]
fn quit_with_bytes_it_cannot_flush_says_how_many() {
    let Some(mut r) = start() else { return };
    r.disk_error();
    assert_eq!(r.qmp("quit").expect("quit"), json!({}));
    assert_eq!(r.owner.join().expect("owner"), Exit::Quit);
    let mut dropped = None;
    while let Ok(text) = r.events.try_recv() {
        let v: Value = serde_json::from_str(&text).expect("JSON");
        if v["event"] == "X_UNFLUSHED_DROPPED" {
            dropped = Some(v["data"].clone());
        }
    }
    let dropped = dropped.expect("an X_UNFLUSHED_DROPPED event");
    assert_eq!(
        (dropped["device"].as_str(), dropped["bytes"].as_u64()),
        (Some("data"), Some(512))
    );
}

#[test]
fn sigterm_while_stopped_on_an_error_settles_and_says_what_it_drops() {
    let Some(mut r) = start() else { return };
    r.disk_error();
    r.tx.send(VmEvent::HostSignal {
        signal: libc::SIGTERM,
    })
    .expect("owner alive");
    assert_eq!(r.owner.join().expect("owner"), Exit::Signal("SIGTERM"));
    let mut seen = Vec::new();
    while let Ok(text) = r.events.try_recv() {
        let v: Value = serde_json::from_str(&text).expect("JSON");
        seen.push((v["event"].clone(), v["data"].clone()));
    }
    let names: Vec<_> = seen.iter().map(|(e, _)| e.as_str().unwrap_or("")).collect();
    assert_eq!(
        names,
        ["BLOCK_IO_ERROR", "STOP", "X_UNFLUSHED_DROPPED", "SHUTDOWN"]
    );
    assert_eq!(seen[2].1["bytes"], 512);
    assert_eq!(seen[3].1, json!({"guest": false, "reason": "host-signal"}));
}
