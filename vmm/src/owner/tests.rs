//! Every (run state, input) pair through [`Owner::step`], on a fake machine: the
//! state after it (or how the machine ends), the events in order, what the owner
//! asked of the machine, and whether a command succeeded. No `/dev/kvm` needed.

use std::path::Path;
use std::sync::mpsc::channel;

use holdfast_block::{
    Disk, DiskConfig, DiskStatus, ErrorAction, FaultHandle, FaultOp, FaultRule, HostError, HostOp,
    IoErrorReport, MemBackend, Outstanding, Trigger,
};
use holdfast_qmp::EventSink;
use serde_json::Value;

use super::*;
use crate::disk::{DiskCall, Dropped, FaultPoints, Replayed};

/// How `resume` goes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Resume {
    Replays,
    Detached,
    ReplayFails,
    /// A host call hangs on the disk.
    Busy,
}

/// A machine that records what the owner asks of it.
struct Fake {
    calls: Vec<String>,
    resume: Resume,
    /// The clock `resume` was given.
    resumed_with: Option<SavedClock>,
    faults: FaultHandle,
    /// Host calls in progress (`Lifecycle::calls`).
    hanging: Vec<DiskCall>,
    /// Whether the disk is stopped (as it is when its error arrives, unless a
    /// `cont` replayed it first).
    stopped: bool,
}

const CLOCK: u64 = 42;

impl Fake {
    fn new(resume: Resume) -> Fake {
        Fake {
            calls: Vec::new(),
            resume,
            resumed_with: None,
            faults: FaultHandle::default(),
            hanging: Vec::new(),
            stopped: true,
        }
    }

    /// A flush on `data` outstanding for 31 s, with a hang-timeout of 30 s.
    fn with_hung_flush(mut self) -> Fake {
        self.hanging.push(DiskCall {
            disk: "data".into(),
            call: Outstanding {
                op: HostOp::Flush,
                since: Instant::now() - Duration::from_secs(31),
            },
            hang_timeout: Some(Duration::from_secs(30)),
        });
        self
    }
}

impl Lifecycle for Fake {
    fn name(&self) -> Option<String> {
        Some("fake".into())
    }

    fn cpu_threads(&self) -> Vec<i32> {
        vec![101, 102]
    }

    fn press_power_button(&mut self) -> Result<(), String> {
        self.calls.push("power button".into());
        Ok(())
    }

    fn pause(&mut self) -> SavedClock {
        self.calls.push("pause".into());
        Some(kvm_bindings::kvm_clock_data {
            clock: CLOCK,
            ..Default::default()
        })
    }

    fn resume(&mut self, clock: SavedClock) -> Result<Vec<Replayed>, ResumeFailure> {
        self.calls.push("resume".into());
        self.resumed_with = Some(clock);
        match self.resume {
            Resume::Replays => Ok(vec![Replayed {
                disk: "data".into(),
                bytes_rewritten: 4096,
                duration: Duration::from_millis(3),
            }]),
            Resume::Detached => Err(ResumeFailure::Detached {
                disk: "data".into(),
            }),
            Resume::ReplayFails => Err(ResumeFailure::Replay {
                disk: "data".into(),
                error: HostError::new(HostOp::Flush, libc::EIO),
            }),
            Resume::Busy => Err(ResumeFailure::Busy {
                disk: "data".into(),
                call: "a host flush has been outstanding for 31.0 s".into(),
            }),
        }
    }

    fn settle(&mut self) -> Vec<Dropped> {
        self.calls.push("settle".into());
        vec![Dropped {
            disk: "data".into(),
            bytes: 512,
            why: "EIO".into(),
        }]
    }

    fn disks(&self) -> Vec<DiskInfo> {
        vec![DiskInfo {
            id: "data".into(),
            path: "data.img".into(),
            direct: false,
            read_only: false,
            writeback: true,
            status: DiskStatus {
                stopped: self.stopped,
                ..Disk::new(MemBackend::new(4096), DiskConfig::default()).status()
            },
            outstanding: self.hanging.first().map(|c| c.call),
            hang_timeout: self.hanging.first().and_then(|c| c.hang_timeout),
            stats: holdfast_vmm_stats(),
        }]
    }

    fn calls(&self) -> Vec<DiskCall> {
        self.hanging.clone()
    }

    fn fault_points(&self, disk: &str) -> Option<FaultPoints> {
        (disk == "data").then(|| FaultPoints {
            calls: Some(self.faults.clone()),
            simulated: None,
        })
    }

    fn detach(&mut self, disk: &str) -> Result<(), AttachFailure> {
        self.calls.push(format!("detach {disk}"));
        Ok(())
    }

    fn attach(&mut self, disk: &str, _path: Option<&Path>) -> Result<(), AttachFailure> {
        self.calls.push(format!("attach {disk}"));
        Ok(())
    }
}

/// Every kind of input, with the variants of `cont` that the machine decides.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Case {
    Poweroff,
    Reboot,
    GuestPanic,
    GuestStatus,
    BootTimeout,
    EmulationFailure,
    VcpuFailed,
    DeviceFailed,
    DeviceNeedsReset,
    DiskErrorStop,
    /// Under `stop`, but a `cont` replayed the disk before the error arrived.
    DiskErrorStopReplayed,
    DiskErrorReport,
    ThreadPanicked,
    HostSignal,
    TickQuiet,
    TickHung,
    QueryStatus,
    Stop,
    ContReplays,
    ContDetached,
    ContReplayFails,
    ContBusy,
    Quit,
    QueryBlock,
    QueryBlockstats,
    QueryName,
    QueryCpusFast,
    SystemReset,
    SystemPowerdown,
    XQueryUnflushed,
    XQueryTimings,
    XBlockFault,
    XBlockDetach,
    XBlockAttach,
}

const CASES: [Case; 34] = [
    Case::Poweroff,
    Case::Reboot,
    Case::GuestPanic,
    Case::GuestStatus,
    Case::BootTimeout,
    Case::EmulationFailure,
    Case::VcpuFailed,
    Case::DeviceFailed,
    Case::DeviceNeedsReset,
    Case::DiskErrorStop,
    Case::DiskErrorStopReplayed,
    Case::DiskErrorReport,
    Case::ThreadPanicked,
    Case::HostSignal,
    Case::TickQuiet,
    Case::TickHung,
    Case::QueryStatus,
    Case::Stop,
    Case::ContReplays,
    Case::ContDetached,
    Case::ContReplayFails,
    Case::ContBusy,
    Case::Quit,
    Case::QueryBlock,
    Case::QueryBlockstats,
    Case::QueryName,
    Case::QueryCpusFast,
    Case::SystemReset,
    Case::SystemPowerdown,
    Case::XQueryUnflushed,
    Case::XQueryTimings,
    Case::XBlockFault,
    Case::XBlockDetach,
    Case::XBlockAttach,
];

/// Which case an input is. Exhaustive: a new input or command does not compile
/// until it has a case here (and so an expectation below).
fn case_of(input: &Input, resume: Resume, hanging: bool, stopped: bool) -> Case {
    match input {
        Input::Poweroff => Case::Poweroff,
        Input::Reboot => Case::Reboot,
        Input::GuestPanic => Case::GuestPanic,
        Input::GuestStatus(_) => Case::GuestStatus,
        Input::BootTimeout { .. } => Case::BootTimeout,
        Input::EmulationFailure { .. } => Case::EmulationFailure,
        Input::VcpuFailed { .. } => Case::VcpuFailed,
        Input::DeviceFailed { .. } => Case::DeviceFailed,
        Input::Disk(DiskEvent::NeedsReset { .. }) => Case::DeviceNeedsReset,
        Input::Disk(DiskEvent::Error { report, .. }) => match report.action {
            ErrorAction::Stop if stopped => Case::DiskErrorStop,
            ErrorAction::Stop => Case::DiskErrorStopReplayed,
            ErrorAction::Report | ErrorAction::Ignore => Case::DiskErrorReport,
        },
        Input::ThreadPanicked { .. } => Case::ThreadPanicked,
        Input::HostSignal { .. } => Case::HostSignal,
        Input::Tick if hanging => Case::TickHung,
        Input::Tick => Case::TickQuiet,
        Input::Qmp { command, .. } => match command {
            Command::QueryStatus => Case::QueryStatus,
            Command::Stop => Case::Stop,
            Command::Cont => match resume {
                Resume::Replays => Case::ContReplays,
                Resume::Detached => Case::ContDetached,
                Resume::ReplayFails => Case::ContReplayFails,
                Resume::Busy => Case::ContBusy,
            },
            Command::Quit => Case::Quit,
            Command::QueryBlock => Case::QueryBlock,
            Command::QueryBlockstats => Case::QueryBlockstats,
            Command::QueryName => Case::QueryName,
            Command::QueryCpusFast => Case::QueryCpusFast,
            Command::SystemReset => Case::SystemReset,
            Command::SystemPowerdown => Case::SystemPowerdown,
            Command::XQueryUnflushed => Case::XQueryUnflushed,
            Command::XQueryTimings => Case::XQueryTimings,
            Command::XBlockFault { .. } => Case::XBlockFault,
            Command::XBlockDetach { .. } => Case::XBlockDetach,
            Command::XBlockAttach { .. } => Case::XBlockAttach,
        },
    }
}

type Reply = std::sync::mpsc::Receiver<Result<Value, holdfast_qmp::QmpError>>;

/// The input of a case, the machine it meets, and where a command's answer goes.
fn input(case: Case) -> (Input, Fake, Option<Reply>) {
    let (input, resume, reply) = input_and_resume(case);
    let mut fake = Fake::new(resume);
    if case == Case::TickHung {
        fake = fake.with_hung_flush();
    }
    fake.stopped = case != Case::DiskErrorStopReplayed;
    (input, fake, reply)
}

fn input_and_resume(case: Case) -> (Input, Resume, Option<Reply>) {
    let disk_error = |action| {
        Input::Disk(DiskEvent::Error {
            disk: "data".into(),
            report: IoErrorReport {
                error: HostError::new(HostOp::Flush, libc::EIO),
                action,
            },
            at: Instant::now(),
        })
    };
    let qmp = |command, resume| {
        let (reply, answer) = channel();
        (Input::Qmp { command, reply }, resume, Some(answer))
    };
    let plain = |input| (input, Resume::Replays, None);
    match case {
        Case::Poweroff => plain(Input::Poweroff),
        Case::Reboot => plain(Input::Reboot),
        Case::GuestPanic => plain(Input::GuestPanic),
        Case::GuestStatus => plain(Input::GuestStatus(7)),
        Case::BootTimeout => plain(Input::BootTimeout { seconds: 0 }),
        Case::EmulationFailure => plain(Input::EmulationFailure { cpu: 0 }),
        Case::VcpuFailed => plain(Input::VcpuFailed {
            cpu: 0,
            message: "KVM_RUN: EFAULT".into(),
        }),
        Case::DeviceFailed => plain(Input::DeviceFailed {
            device: "virtio-blk".into(),
            message: "overflow".into(),
        }),
        Case::DeviceNeedsReset => plain(Input::Disk(DiskEvent::NeedsReset {
            disk: "data".into(),
            reason: "used ring out of memory".into(),
        })),
        Case::DiskErrorStop | Case::DiskErrorStopReplayed => plain(disk_error(ErrorAction::Stop)),
        Case::DiskErrorReport => plain(disk_error(ErrorAction::Report)),
        Case::ThreadPanicked => plain(Input::ThreadPanicked {
            thread: "qmp".into(),
            message: "boom".into(),
        }),
        Case::HostSignal => plain(Input::HostSignal { name: "SIGTERM" }),
        Case::TickQuiet | Case::TickHung => plain(Input::Tick),
        Case::QueryStatus => qmp(Command::QueryStatus, Resume::Replays),
        Case::Stop => qmp(Command::Stop, Resume::Replays),
        Case::ContReplays => qmp(Command::Cont, Resume::Replays),
        Case::ContDetached => qmp(Command::Cont, Resume::Detached),
        Case::ContReplayFails => qmp(Command::Cont, Resume::ReplayFails),
        Case::ContBusy => qmp(Command::Cont, Resume::Busy),
        Case::Quit => qmp(Command::Quit, Resume::Replays),
        Case::QueryBlock => qmp(Command::QueryBlock, Resume::Replays),
        Case::QueryBlockstats => qmp(Command::QueryBlockstats, Resume::Replays),
        Case::QueryName => qmp(Command::QueryName, Resume::Replays),
        Case::QueryCpusFast => qmp(Command::QueryCpusFast, Resume::Replays),
        Case::SystemReset => qmp(Command::SystemReset, Resume::Replays),
        Case::SystemPowerdown => qmp(Command::SystemPowerdown, Resume::Replays),
        Case::XQueryUnflushed => qmp(Command::XQueryUnflushed, Resume::Replays),
        Case::XQueryTimings => qmp(Command::XQueryTimings, Resume::Replays),
        Case::XBlockFault => qmp(
            Command::XBlockFault {
                device: "data".into(),
                fault: Fault::Arm(
                    Layer::Calls,
                    Box::new(FaultRule::new(FaultOp::Flush, libc::EIO, Trigger::Once)),
                ),
            },
            Resume::Replays,
        ),
        Case::XBlockDetach => qmp(
            Command::XBlockDetach {
                device: "data".into(),
            },
            Resume::Replays,
        ),
        Case::XBlockAttach => qmp(
            Command::XBlockAttach {
                device: "data".into(),
                filename: None,
            },
            Resume::Replays,
        ),
    }
}

/// After a step: a run state, or the end.
#[derive(Debug, Clone, PartialEq)]
enum After {
    State(RunState),
    /// How it ended; `Failed`'s message starts with the text given.
    End(Exit),
}

#[derive(Debug, PartialEq)]
struct Expect {
    after: After,
    events: Vec<&'static str>,
    calls: Vec<&'static str>,
    /// A command's answer: Ok or an error.
    ok: Option<bool>,
}

/// What each (state, input) pair must do.
fn expect(state: RunState, case: Case) -> Expect {
    use RunState::*;
    let running = state == Running;
    let same = After::State(state);
    let e = |after, events: &[&'static str], calls: &[&'static str], ok| Expect {
        after,
        events: events.to_vec(),
        calls: calls.to_vec(),
        ok,
    };
    // The host's end: pause if running, settle (one disk drops 512 bytes), SHUTDOWN.
    let host_end = |exit, ok| {
        let calls: &[&str] = if running {
            &["pause", "settle"]
        } else {
            &["settle"]
        };
        e(
            After::End(exit),
            &["X_UNFLUSHED_DROPPED", "SHUTDOWN"],
            calls,
            ok,
        )
    };
    match case {
        Case::Poweroff => e(After::End(Exit::Poweroff), &["SHUTDOWN"], &[], None),
        Case::Reboot => e(After::End(Exit::Reboot), &["SHUTDOWN"], &[], None),
        Case::GuestStatus => e(After::End(Exit::GuestStatus(7)), &["SHUTDOWN"], &[], None),
        // Past the limit it ends a running guest; a paused one waits (running time).
        Case::BootTimeout if running => host_end(Exit::BootTimeout { seconds: 0 }, None),
        Case::BootTimeout => e(same, &[], &[], None),
        Case::GuestPanic => e(
            After::End(Exit::GuestPanic),
            &["GUEST_PANICKED", "SHUTDOWN"],
            &[],
            None,
        ),
        Case::EmulationFailure => e(
            After::End(Exit::EmulationFailure { cpu: 0 }),
            &[],
            &[],
            None,
        ),
        Case::VcpuFailed => e(After::End(Exit::Failed("vCPU 0".into())), &[], &[], None),
        Case::DeviceFailed => host_end(Exit::Failed("device virtio-blk failed".into()), None),
        Case::ThreadPanicked => host_end(Exit::Failed("thread qmp panicked".into()), None),
        Case::HostSignal => host_end(Exit::Signal("SIGTERM"), None),
        Case::Quit => host_end(Exit::Quit, Some(true)),
        Case::SystemReset => host_end(Exit::Reboot, Some(true)),
        // In any state: a paused guest sees the press when it runs again.
        Case::SystemPowerdown => e(same, &["POWERDOWN"], &["power button"], Some(true)),
        Case::DeviceNeedsReset => e(same, &["X_DEVICE_NEEDS_RESET"], &[], None),
        Case::DiskErrorStop if running => e(
            After::State(IoError),
            &["BLOCK_IO_ERROR", "STOP"],
            &["pause"],
            None,
        ),
        Case::DiskErrorStop => e(After::State(IoError), &["BLOCK_IO_ERROR"], &[], None),
        // The event tells what happened; nothing holds the VM any more.
        Case::DiskErrorStopReplayed => e(same, &["BLOCK_IO_ERROR"], &[], None),
        Case::DiskErrorReport => e(same, &["BLOCK_IO_ERROR"], &[], None),
        Case::Stop if running => e(After::State(Paused), &["STOP"], &["pause"], Some(true)),
        Case::Stop => e(same, &[], &[], Some(true)),
        Case::TickQuiet => e(same, &[], &[], None),
        Case::TickHung if running => e(
            After::State(IoError),
            &["BLOCK_IO_ERROR", "STOP"],
            &["pause"],
            None,
        ),
        Case::TickHung => e(After::State(IoError), &["BLOCK_IO_ERROR"], &[], None),
        Case::ContReplays | Case::ContDetached | Case::ContReplayFails | Case::ContBusy
            if running =>
        {
            e(same, &[], &[], Some(true))
        }
        Case::ContReplays => e(
            After::State(Running),
            &["X_BLOCK_REPLAY", "RESUME"],
            &["resume"],
            Some(true),
        ),
        Case::ContDetached | Case::ContBusy => e(same, &[], &["resume"], Some(false)),
        Case::ContReplayFails => e(
            After::State(IoError),
            &["X_BLOCK_REPLAY", "BLOCK_IO_ERROR"],
            &["resume"],
            Some(false),
        ),
        Case::QueryStatus
        | Case::QueryBlock
        | Case::QueryBlockstats
        | Case::QueryName
        | Case::QueryCpusFast
        | Case::XQueryUnflushed
        | Case::XQueryTimings
        | Case::XBlockFault => e(same, &[], &[], Some(true)),
        Case::XBlockDetach if running => e(same, &[], &[], Some(false)),
        Case::XBlockDetach => e(same, &[], &["detach data"], Some(true)),
        Case::XBlockAttach => e(same, &[], &["attach data"], Some(true)),
    }
}

fn names(rx: &mut tokio::sync::broadcast::Receiver<String>) -> Vec<String> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .map(|t| {
            let v: Value = serde_json::from_str(&t).expect("JSON");
            v["event"].as_str().expect("event").to_owned()
        })
        .collect()
}

/// One step of `case` from `state`: what happened, as an [`Expect`].
fn run(state: RunState, case: Case) -> (Expect, Owner, Fake, Option<Value>) {
    let events = EventSink::new();
    let mut rx = events.subscribe();
    let mut owner = Owner::in_state(state, events);
    let (input, mut fake, answer) = input(case);
    assert_eq!(
        case_of(&input, fake.resume, !fake.hanging.is_empty(), fake.stopped),
        case
    );
    let step = owner.step(&mut fake, input);
    let after = match step {
        Step::Go => After::State(owner.state()),
        Step::End(Exit::Failed(message)) => {
            // Compared by how the message starts.
            let want = match expect(state, case).after {
                After::End(Exit::Failed(prefix)) if message.starts_with(&prefix) => prefix,
                _ => message,
            };
            After::End(Exit::Failed(want))
        }
        Step::End(exit) => After::End(exit),
    };
    let reply = answer.map(|a| a.try_recv().expect("a command is answered"));
    let got = Expect {
        after,
        events: names(&mut rx).into_iter().map(|n| &*n.leak()).collect(),
        calls: fake.calls.iter().map(|c| &*c.clone().leak()).collect(),
        ok: reply.as_ref().map(Result::is_ok),
    };
    let value = reply.and_then(Result::ok);
    (got, owner, fake, value)
}

/// A QMP command through `step`, and its answer.
fn ask(
    owner: &mut Owner,
    fake: &mut Fake,
    command: Command,
) -> Result<Value, holdfast_qmp::QmpError> {
    let (reply, answer) = channel();
    owner.step(fake, Input::Qmp { command, reply });
    answer.recv().expect("answered in the step")
}

#[test]
fn every_state_and_input() {
    let mut pairs = 0;
    for state in RunState::ALL {
        for case in CASES {
            let (got, _, _, _) = run(state, case);
            assert_eq!(got, expect(state, case), "{state:?} + {case:?}");
            pairs += 1;
        }
    }
    assert_eq!(pairs, 3 * CASES.len());
}

#[test]
fn query_status_says_the_state() {
    for state in RunState::ALL {
        let (_, _, _, answer) = run(state, Case::QueryStatus);
        let answer = answer.expect("status");
        assert_eq!(answer["status"], state.as_str());
        assert_eq!(answer["running"], state == RunState::Running);
    }
}

#[test]
fn cont_restores_the_clock_the_pause_saved() {
    let events = EventSink::new();
    let mut owner = Owner::new(events);
    let mut fake = Fake::new(Resume::Replays);
    for command in [Command::Stop, Command::Cont] {
        let (reply, answer) = channel();
        assert_eq!(
            owner.step(&mut fake, Input::Qmp { command, reply }),
            Step::Go
        );
        answer.recv().expect("answer").expect("ok");
    }
    let clock = fake.resumed_with.expect("resumed").expect("a clock");
    assert_eq!(clock.clock, CLOCK);
    assert_eq!(owner.state(), RunState::Running);
}

#[test]
fn timings_cover_the_latest_error_and_cont() {
    let mut owner = Owner::new(EventSink::new());
    let mut fake = Fake::new(Resume::Replays);
    let (input, _, _) = input_and_resume(Case::DiskErrorStop);
    owner.step(&mut fake, input);
    ask(&mut owner, &mut fake, Command::Cont).expect("cont");
    let t = ask(&mut owner, &mut fake, Command::XQueryTimings).expect("timings");
    assert!(t["error-to-stopped-ns"].is_u64(), "{t}");
    assert!(t["cont-to-running-ns"].is_u64(), "{t}");
    assert_eq!(t["replay-bytes"], 4096);
}

#[test]
fn x_block_fault_arms_on_the_disks_fault_point_without_its_lock() {
    let (_, _, fake, answer) = run(RunState::Running, Case::XBlockFault);
    assert!(answer.expect("armed")["id"].is_u64());
    assert_eq!(fake.faults.rules().len(), 1);
}

#[test]
fn the_command_table_is_the_one_list() {
    let names = Command::names();
    assert_eq!(names.len(), command::TABLE.len());
    for name in &names {
        let e = Command::parse(name, &holdfast_qmp::Args(serde_json::Map::new()));
        // Those with required arguments refuse for the argument, never the name.
        if let Err(e) = e {
            assert_ne!(e.class, holdfast_qmp::ErrorClass::CommandNotFound, "{name}");
        }
    }
    let e = Command::parse("x-nope", &holdfast_qmp::Args::default()).expect_err("unknown");
    assert_eq!(e.class, holdfast_qmp::ErrorClass::CommandNotFound);
}

#[test]
fn a_hung_call_is_reported_once_saying_which_call_for_how_long() {
    let events = EventSink::new();
    let mut rx = events.subscribe();
    let mut owner = Owner::new(events);
    let mut fake = Fake::new(Resume::Busy).with_hung_flush();
    owner.step(&mut fake, Input::Tick);
    owner.step(&mut fake, Input::Tick);
    let all: Vec<Value> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|t| serde_json::from_str(&t).expect("JSON"))
        .collect();
    let names: Vec<&str> = all
        .iter()
        .map(|v| v["event"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["BLOCK_IO_ERROR", "STOP"]);
    let reason = all[0]["data"]["reason"].as_str().expect("reason");
    assert!(
        reason.starts_with("host flush outstanding for 31.")
            && reason.ends_with("(hang-timeout 30 s)"),
        "{reason}"
    );
    assert_eq!(owner.state(), RunState::IoError);
    // cont while it hangs: refused, naming it; the VM stays paused.
    let e = ask(&mut owner, &mut fake, Command::Cont).expect_err("refused");
    assert!(e.desc.contains("flush has been outstanding"), "{}", e.desc);
    assert_eq!(owner.state(), RunState::IoError);
    // The call returned: the next cont resumes.
    fake.hanging.clear();
    fake.resume = Resume::Replays;
    owner.step(&mut fake, Input::Tick);
    ask(&mut owner, &mut fake, Command::Cont).expect("cont");
    assert_eq!(owner.state(), RunState::Running);
}

#[test]
fn query_block_shows_the_outstanding_call() {
    let mut owner = Owner::new(EventSink::new());
    let mut fake = Fake::new(Resume::Replays).with_hung_flush();
    let answer = ask(&mut owner, &mut fake, Command::QueryBlock).expect("ok");
    let out = &answer[0]["x-outstanding"];
    assert_eq!(out["operation"], "flush");
    assert!(out["seconds"].as_f64().expect("seconds") >= 31.0, "{out}");
    assert_eq!(answer[0]["x-hang-timeout"], 30.0);
}

#[test]
fn query_blockstats_name_and_cpus_answer_as_qemu_does() {
    let mut owner = Owner::new(EventSink::new());
    let mut fake = Fake::new(Resume::Replays);
    let stats = ask(&mut owner, &mut fake, Command::QueryBlockstats).expect("stats");
    assert_eq!(stats[0]["device"], "data");
    assert_eq!(stats[0]["stats"]["rd_bytes"], 4096);
    assert_eq!(stats[0]["stats"]["rd_operations"], 1);
    assert_eq!(stats[0]["stats"]["flush_operations"], 2);
    assert_eq!(stats[0]["stats"]["failed_wr_operations"], 1);
    assert_eq!(stats[0]["stats"]["wr_bytes"], 0);
    assert_eq!(stats[0]["stats"]["rd_total_time_ns"], 1000);
    assert_eq!(stats[0]["stats"]["invalid_flush_operations"], 1);
    assert_eq!(stats[0]["stats"]["x-replays"], 1);
    assert_eq!(stats[0]["stats"]["x-replayed-bytes"], 512);
    assert!(stats[0]["stats"]["x-unflushed-bytes"].is_u64());
    // The fake's last request was 2 s ago.
    let idle = stats[0]["stats"]["idle_time_ns"]
        .as_u64()
        .expect("idle_time_ns");
    assert!((2_000_000_000..60_000_000_000).contains(&idle), "{idle}");
    let name = ask(&mut owner, &mut fake, Command::QueryName).expect("name");
    assert_eq!(name, serde_json::json!({"name": "fake"}));
    let cpus = ask(&mut owner, &mut fake, Command::QueryCpusFast).expect("cpus");
    assert_eq!(cpus[1]["cpu-index"], 1);
    assert_eq!(cpus[1]["thread-id"], 102);
    assert_eq!(cpus[1]["target"], "x86_64");
    // query-nodes: true asks for what holdfast does not have, and says so.
    let mut args = serde_json::Map::new();
    args.insert("query-nodes".into(), serde_json::json!(true));
    let e = Command::parse("query-blockstats", &holdfast_qmp::Args(args)).expect_err("refused");
    assert!(e.desc.contains("query-nodes"), "{e}");
}

#[test]
fn the_boot_timeout_counts_only_the_time_the_guest_runs() {
    let mut owner = Owner::new(EventSink::new());
    let mut fake = Fake::new(Resume::Replays);
    // Under the limit: nothing happens.
    assert_eq!(
        owner.step(&mut fake, Input::BootTimeout { seconds: 3600 }),
        Step::Go
    );
    ask(&mut owner, &mut fake, Command::Stop).expect("stop");
    let paused_at = owner.running_time();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(owner.running_time(), paused_at, "a pause does not count");
    // Past any limit, but paused: it waits.
    assert_eq!(
        owner.step(&mut fake, Input::BootTimeout { seconds: 0 }),
        Step::Go
    );
    ask(&mut owner, &mut fake, Command::Cont).expect("cont");
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(owner.running_time() > paused_at, "running counts again");
    assert_eq!(
        owner.step(&mut fake, Input::BootTimeout { seconds: 0 }),
        Step::End(Exit::BootTimeout { seconds: 0 })
    );
}

/// A disk's counters as the fake shows them.
fn holdfast_vmm_stats() -> crate::virtio::block::BlockStats {
    use crate::virtio::block::{BlockStats, KindStats};
    BlockStats {
        rd: KindStats {
            operations: 1,
            bytes: 4096,
            total_time_ns: 1000,
            ..Default::default()
        },
        flush: KindStats {
            operations: 2,
            invalid: 1,
            ..Default::default()
        },
        wr: KindStats {
            failed: 1,
            ..Default::default()
        },
        replays: 1,
        replayed_bytes: 512,
        last_io: std::time::Instant::now().checked_sub(std::time::Duration::from_secs(2)),
        ..Default::default()
    }
}
