//! The run-state owner's contract with QMP (docs/durability.md, "When a host write or flush fails"): a host
//! error under `stop` sends BLOCK_IO_ERROR then STOP and leaves the VM in io-error;
//! `cont` while storage is broken fails naming the disk and errno, re-sends
//! BLOCK_IO_ERROR and stays paused; a `cont` that replays sends X_BLOCK_REPLAY then
//! RESUME; `quit` with bytes it cannot flush says how many it drops. And "When the
//! host file system itself fails": `x-block-detach` and `x-block-attach`, every
//! refusal with nothing changed, `cont` refused while a disk is detached, replay after
//! an attach. Driven with the events the device thread sends, on a real VM running a
//! tiny guest.

use holdfast_block::{
    Backend, Disk, DiskConfig, ErrorAction, FaultHandle, FaultInjector, FaultOp, FaultRule,
    FileBackend, FileOptions, HostError, HostOp, IoErrorReport, MemBackend, Request, RequestOp,
    Trigger,
};
use holdfast_vmm::disk::{DiskEvent, DiskSpec};
use holdfast_vmm::owner;
use holdfast_vmm::owner::{Exit, Input};
use holdfast_vmm::vm::Vm;
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
                data: vec![7; 512].into()
            }
        ))
        .is_parked());
    faults.arm(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Always).named("outage"));
    assert!(disk.submit(Request::new(2, RequestOp::Flush)).is_parked());
    (disk, faults)
}

struct Running {
    o: common::OwnerThread,
    faults: FaultHandle,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Running {
    type Target = common::OwnerThread;
    fn deref(&self) -> &common::OwnerThread {
        &self.o
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut common::OwnerThread {
        &mut self.o
    }
}

fn start() -> Option<Running> {
    if !common::kvm_available() {
        return None;
    }
    let dir = tempfile::tempdir().expect("dir");
    let (disk, faults) = stopped_disk();
    let config = common::counting_vm_config(dir.path(), disk, faults.clone());
    Some(start_vm(config, faults, dir))
}

fn start_vm(
    config: holdfast_vmm::vm::VmConfig,
    faults: FaultHandle,
    dir: tempfile::TempDir,
) -> Running {
    Running {
        o: common::OwnerThread::start(|inbox| Vm::start(config, inbox).expect("start")),
        faults,
        _dir: dir,
    }
}

impl Running {
    /// What the device thread sends when the guest's flush hits the host error.
    fn disk_error(&self) {
        self.disk_error_on("data", libc::EIO);
    }

    fn disk_error_on(&self, disk: &str, errno: i32) {
        let report = IoErrorReport {
            error: HostError::new(HostOp::Flush, errno),
            action: ErrorAction::Stop,
        };
        self.tx
            .send(Input::Disk(DiskEvent::Error {
                disk: disk.into(),
                report,
                at: std::time::Instant::now(),
            }))
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
    assert_eq!(r.join(), Exit::Quit);
}

#[test]
fn quit_with_bytes_it_cannot_flush_says_how_many() {
    let Some(mut r) = start() else { return };
    r.disk_error();
    assert_eq!(r.qmp("quit").expect("quit"), json!({}));
    assert_eq!(r.join(), Exit::Quit);
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
    r.tx.send(Input::HostSignal { name: "SIGTERM" })
        .expect("owner alive");
    assert_eq!(r.join(), Exit::Signal("SIGTERM"));
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

/// Two disks on real image files, each behind its own fault point: `a` stopped on a
/// flush that fails with EROFS (as on an ext4 whose journal aborted), with 4096
/// bytes buffered and the flush parked; `b` healthy, with 512 bytes buffered.
struct TwoDisks {
    r: Running,
    a_faults: FaultHandle,
    a: std::path::PathBuf,
    b: std::path::PathBuf,
}

fn image_disk(path: &std::path::Path) -> (Disk<Box<dyn Backend>>, FaultHandle) {
    std::fs::write(path, vec![0u8; 1 << 20]).expect("image");
    let file = FileBackend::open(path, FileOptions::default()).expect("open");
    let injector = FaultInjector::new(file);
    let faults = injector.handle();
    let backend: Box<dyn Backend> = Box::new(injector);
    (Disk::new(backend, DiskConfig::default()), faults)
}

fn spec(id: &str, path: &std::path::Path) -> (DiskSpec, FaultHandle) {
    let (disk, faults) = image_disk(path);
    let spec = DiskSpec {
        id: id.into(),
        engine: Box::new(disk),
        path: path.display().to_string(),
        direct: false,
        faults: Some(faults.clone()),
        simulated: None,
        watch: Default::default(),
        hang_timeout: None,
        io_threads: holdfast_vmm::disk::CALLS_PER_DISK,
        write_log: None,
    };
    (spec, faults)
}

fn two_disks() -> Option<TwoDisks> {
    if !common::kvm_available() {
        return None;
    }
    let dir = tempfile::tempdir().expect("dir");
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let (mut a_spec, a_faults) = spec("a", &a);
    let (mut b_spec, _) = spec("b", &b);
    let write = |tag, byte, len| {
        Request::new(
            tag,
            RequestOp::Write {
                offset: 8192,
                data: vec![byte; len].into(),
            },
        )
    };
    assert!(!a_spec.engine.submit(write(1, 0xA, 4096)).is_parked());
    a_faults.arm(FaultRule::new(FaultOp::Flush, libc::EROFS, Trigger::Always).named("ro"));
    assert!(a_spec
        .engine
        .submit(Request::new(2, RequestOp::Flush))
        .is_parked());
    assert!(!b_spec.engine.submit(write(1, 0xB, 512)).is_parked());
    let config = common::counting_vm_with_disks(dir.path(), vec![a_spec, b_spec]);
    let r = start_vm(config, a_faults.clone(), dir);
    Some(TwoDisks { r, a_faults, a, b })
}

/// How many of this process's descriptors (the VM runs in the test) are on `path`.
fn open_descriptors(path: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target == path)
        .count()
}

impl Running {
    fn desc(&self, command: &str, args: Value) -> String {
        self.call(command, args)
            .map(|v| panic!("{command} succeeded: {v}"))
            .unwrap_or_else(|e| e.desc)
    }

    /// What a refusal must leave alone: run state, and every disk as QMP shows it.
    fn snapshot(&self) -> Value {
        json!([
            self.qmp("query-status").expect("status"),
            self.qmp("query-block").expect("block"),
            self.qmp("x-query-unflushed").expect("unflushed"),
        ])
    }
}

#[test]
fn detach_is_refused_while_the_vm_runs_or_for_an_unknown_disk() {
    let Some(t) = two_disks() else { return };
    let r = &t.r;
    let before = r.snapshot();
    let e = r.desc("x-block-detach", json!({"device": "a"}));
    assert!(e.contains("disk a") && e.contains("running"), "{e}");
    for (command, args) in [
        ("x-block-detach", json!({"device": "nope"})),
        ("x-block-attach", json!({"device": "nope"})),
    ] {
        let e = r.call(command, args).expect_err("unknown disk");
        assert_eq!(
            e.class,
            holdfast_qmp::ErrorClass::DeviceNotFound,
            "{command}"
        );
    }
    let e = r.desc("x-block-detach", json!({"device": "a", "force": true}));
    assert!(e.contains("'force' is unexpected"), "{e}");
    let e = r.desc("x-block-attach", json!({"device": "a", "filename": 7}));
    assert!(e.contains("'filename' expects string"), "{e}");
    assert_eq!(r.snapshot(), before, "a refusal changed something");
    assert_eq!(open_descriptors(&t.a), 1);
}

#[test]
fn the_host_file_system_down_detach_repair_attach_cont() {
    let Some(mut t) = two_disks() else { return };
    t.r.disk_error_on("a", libc::EROFS);
    assert_eq!(
        t.r.qmp("query-status").expect("status")["status"],
        "io-error"
    );
    assert_eq!(t.r.event_names(), ["BLOCK_IO_ERROR", "STOP"]);

    // cont fails for good on a read-only host file system, and says what to do.
    let e = t.r.desc("cont", json!({}));
    for want in [
        "disk a",
        "EROFS",
        "x-block-detach",
        "x-block-attach",
        "docs/durability.md",
    ] {
        assert!(e.contains(want), "missing {want:?}: {e}");
    }
    assert_eq!(t.r.event_names(), ["X_BLOCK_REPLAY", "BLOCK_IO_ERROR"]);

    // Detach both disks, independently; the images are closed, the bytes kept.
    assert_eq!(open_descriptors(&t.a), 1);
    assert_eq!(
        t.r.call("x-block-detach", json!({"device": "a"}))
            .expect("detach a"),
        json!({})
    );
    assert_eq!(
        open_descriptors(&t.a),
        0,
        "a descriptor on a's image is left"
    );
    assert_eq!(open_descriptors(&t.b), 1, "b was not asked to let go");
    t.r.call("x-block-detach", json!({"device": "b"}))
        .expect("detach b");
    assert_eq!(open_descriptors(&t.b), 0);
    let block = t.r.qmp("query-block").expect("block");
    assert_eq!(block[0]["x-detached"], true);
    assert!(block[0].get("inserted").is_none(), "{block}");
    assert_eq!(block[0]["x-detached-from"], t.a.display().to_string());
    let unflushed = t.r.qmp("x-query-unflushed").expect("unflushed");
    assert_eq!(
        (
            &unflushed[0]["bytes"],
            &unflushed[0]["parked"],
            &unflushed[0]["detached"]
        ),
        (&json!(4096), &json!(1), &json!(true))
    );
    assert_eq!(unflushed[1]["bytes"], 512);
    assert_eq!(
        t.r.qmp("query-status").expect("status")["status"],
        "io-error"
    );

    // Refusals while detached: each changes nothing and sends nothing.
    let before = t.r.snapshot();
    let dir = t.a.parent().expect("dir").to_owned();
    let small = dir.join("small.img");
    std::fs::write(&small, vec![0u8; 4096]).expect("small");
    let ro = dir.join("ro.img");
    std::fs::write(&ro, vec![0u8; 1 << 20]).expect("ro");
    std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o444))
        .expect("chmod");
    let p = |path: &std::path::Path| path.display().to_string();
    let refusals = [
        (
            "x-block-detach",
            json!({"device": "a"}),
            "already detached".to_owned(),
        ),
        ("cont", json!({}), "disk a is detached".to_owned()),
        (
            "x-block-attach",
            json!({"device": "a", "filename": p(&small)}),
            "is 4096 bytes, but the disk is 1048576 bytes".to_owned(),
        ),
        (
            "x-block-attach",
            json!({"device": "a", "filename": p(&dir.join("gone.img"))}),
            "does not exist".to_owned(),
        ),
        (
            "x-block-attach",
            json!({"device": "a", "filename": p(&dir)}),
            "is a directory".to_owned(),
        ),
        (
            "x-block-attach",
            json!({"device": "a", "filename": p(&ro)}),
            "read-only (mode 444)".to_owned(),
        ),
    ];
    for (command, args, want) in refusals {
        let e = t.r.desc(command, args.clone());
        assert!(e.contains(&want), "{command} {args}: {e}");
        assert_eq!(t.r.snapshot(), before, "{command} {args} changed something");
        assert_eq!(
            t.r.event_names(),
            Vec::<String>::new(),
            "{command} {args} sent events"
        );
    }

    // Attach a to a file that is still broken: attached, but the replay fails and
    // the VM stays paused, as with any failed replay.
    t.r.call("x-block-attach", json!({"device": "a"}))
        .expect("attach a");
    assert_eq!(open_descriptors(&t.a), 1);
    let e = t.r.desc("x-block-attach", json!({"device": "a"}));
    assert!(e.contains("x-block-detach it first"), "{e}");
    let e = t.r.desc("cont", json!({}));
    assert!(e.contains("disk b is detached"), "b is still detached: {e}");
    t.r.call(
        "x-block-attach",
        json!({"device": "b", "filename": p(&t.b)}),
    )
    .expect("attach b");
    let e = t.r.desc("cont", json!({}));
    assert!(e.contains("disk a") && e.contains("EROFS"), "{e}");
    assert_eq!(
        t.r.qmp("query-status").expect("status")["status"],
        "io-error"
    );
    t.r.event_names();

    // The repaired file system lost what no flush covered; cont puts it back.
    std::fs::write(&t.a, vec![0u8; 1 << 20]).expect("repaired image");
    t.a_faults.clear_named("ro");
    assert_eq!(t.r.qmp("cont").expect("cont after the repair"), json!({}));
    assert_eq!(
        t.r.qmp("query-status").expect("status")["status"],
        "running"
    );
    let events = t.r.event_names();
    assert_eq!(
        events,
        ["X_BLOCK_REPLAY", "X_BLOCK_REPLAY", "RESUME"],
        "{events:?}"
    );
    let on_disk = std::fs::read(&t.a).expect("a");
    assert!(on_disk[8192..12288].iter().all(|&b| b == 0xA));
    let on_disk = std::fs::read(&t.b).expect("b");
    assert!(on_disk[8192..8704].iter().all(|&b| b == 0xB));
    assert_eq!(t.r.qmp("quit").expect("quit"), json!({}));
    assert_eq!(t.r.join(), Exit::Quit);
}

#[test]
fn quit_while_detached_says_what_it_drops() {
    let Some(mut t) = two_disks() else { return };
    t.r.disk_error_on("a", libc::EROFS);
    t.r.call("x-block-detach", json!({"device": "a"}))
        .expect("detach");
    assert_eq!(t.r.qmp("quit").expect("quit"), json!({}));
    assert_eq!(t.r.join(), Exit::Quit);
    let dropped: Vec<Value> = std::iter::from_fn(|| t.r.events.try_recv().ok())
        .map(|text| serde_json::from_str::<Value>(&text).expect("JSON"))
        .filter(|v| v["event"] == "X_UNFLUSHED_DROPPED")
        .map(|v| v["data"].clone())
        .collect();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(
        (&dropped[0]["device"], &dropped[0]["bytes"]),
        (&json!("a"), &json!(4096))
    );
    assert!(dropped[0]["reason"]
        .as_str()
        .unwrap_or("")
        .contains("detached"));
}

#[test]
fn a_disk_detached_after_a_user_stop_is_replayed_on_cont() {
    let Some(mut t) = two_disks() else { return };
    t.a_faults.clear_named("ro");
    assert_eq!(t.r.qmp("stop").expect("stop"), json!({}));
    t.r.call("x-block-detach", json!({"device": "b"}))
        .expect("detach");
    let e = t.r.desc("cont", json!({}));
    assert!(e.contains("disk b is detached"), "{e}");
    assert_eq!(t.r.qmp("query-status").expect("status")["status"], "paused");
    t.r.call("x-block-attach", json!({"device": "b"}))
        .expect("attach");
    assert_eq!(t.r.qmp("cont").expect("cont"), json!({}));
    assert_eq!(
        t.r.event_names(),
        ["STOP", "X_BLOCK_REPLAY", "X_BLOCK_REPLAY", "RESUME"]
    );
    let unflushed = t.r.qmp("x-query-unflushed").expect("unflushed");
    assert_eq!(
        (&unflushed[0]["bytes"], &unflushed[1]["bytes"]),
        (&json!(0), &json!(0))
    );
}

#[test]
fn every_command_refuses_an_argument_it_does_not_take() {
    let Some(mut r) = start() else { return };
    let before = r.qmp("query-status").expect("status");
    for command in owner::Command::names() {
        let e = r
            .call(command, json!({"bogus": 1}))
            .expect_err("bogus argument");
        assert_eq!(e.desc, "Parameter 'bogus' is unexpected", "{command}");
    }
    assert_eq!(r.qmp("query-status").expect("status"), before);
    assert_eq!(
        r.event_names(),
        Vec::<String>::new(),
        "a refused command did something"
    );
    let e = r
        .call(
            "x-block-fault",
            json!({"device": "data", "clear-all": "yes"}),
        )
        .expect_err("typed");
    assert_eq!(e.desc, "Parameter 'clear-all' expects boolean");
    assert_eq!(r.qmp("quit").expect("quit"), json!({}));
}

#[test]
fn a_panicking_thread_ends_holdfast_like_quit() {
    let Some(mut r) = start() else { return };
    r.tx.send(Input::ThreadPanicked {
        thread: "devices".into(),
        message: "attempt to add with overflow".into(),
    })
    .expect("owner alive");
    match r.join() {
        Exit::Failed(m) => assert!(m.contains("devices") && m.contains("overflow"), "{m}"),
        other => panic!("not a failure: {other:?}"),
    }
    let seen: Vec<Value> = std::iter::from_fn(|| r.events.try_recv().ok())
        .map(|text| serde_json::from_str::<Value>(&text).expect("JSON"))
        .collect();
    let names: Vec<&str> = seen
        .iter()
        .map(|v| v["event"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["X_UNFLUSHED_DROPPED", "SHUTDOWN"]);
    assert_eq!(seen[0]["data"]["bytes"], 512);
    assert_eq!(
        seen[1]["data"],
        json!({"guest": false, "reason": "host-error"})
    );
}
