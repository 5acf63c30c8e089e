//! `holdfast run --qmp` driven over its socket, with a tiny counting guest on real
//! KVM (this project's machines emulate its kernel-mode loop; that is enough).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &std::path::Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("QMP socket never appeared: {e}"),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
            events: Vec::new(),
        };
        assert!(q.line().get("QMP").is_some(), "greeting");
        assert_eq!(q.call("qmp_capabilities", json!({})), json!({}));
        q
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("read");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
    }

    /// Sends a command; returns its `return` (or the whole error); keeps events.
    fn call(&mut self, command: &str, args: Value) -> Value {
        let msg = json!({"execute": command, "arguments": args, "id": command});
        self.writer
            .write_all(format!("{msg}\n").as_bytes())
            .expect("send");
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            assert_eq!(v["id"], command);
            return v.get("return").cloned().unwrap_or(v);
        }
    }

    fn saw(&mut self, event: &str) -> bool {
        self.events.iter().any(|e| e["event"] == event)
    }
}

/// Kills holdfast if the test fails before it exits.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tiny counting guest's files in `dir`, and `holdfast run` for it with one disk
/// (id `data`) and a QMP socket (`dir/qmp.sock`); stdout and stderr discarded.
fn holdfast(dir: &std::path::Path) -> Command {
    let kernel = dir.join("counting.elf");
    std::fs::write(&kernel, common::counting_guest()).expect("guest");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let mut c = common::holdfast_run(&kernel);
    c.arg("--disk")
        .arg(format!("path={},id=data", disk.display()))
        .arg("--qmp")
        .arg(dir.join("qmp.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// holdfast running a tiny counting guest with one disk, and a negotiated QMP
/// connection to it; `None` where there is no /dev/kvm and the tests may skip.
fn running_holdfast() -> Option<(tempfile::TempDir, Reap, Qmp)> {
    if !common::kvm_available() {
        return None;
    }
    let dir = tempfile::tempdir().expect("dir");
    let child = Reap(holdfast(dir.path()).spawn().expect("start holdfast"));
    let q = Qmp::connect(&dir.path().join("qmp.sock"));
    Some((dir, child, q))
}

#[test]
fn stop_cont_query_and_quit_over_qmp() {
    let Some((_dir, mut child, mut q)) = running_holdfast() else {
        return;
    };

    assert_eq!(q.call("query-status", json!({}))["status"], "running");
    assert_eq!(q.call("stop", json!({})), json!({}));
    assert!(q.saw("STOP"));
    assert_eq!(
        q.call("query-status", json!({})),
        json!({"status": "paused", "running": false, "singlestep": false})
    );

    let block = q.call("query-block", json!({}));
    assert_eq!(block[0]["device"], "data");
    assert_eq!(block[0]["io-status"], "ok");
    assert_eq!(block[0]["inserted"]["cache"]["writeback"], true);
    let unflushed = q.call("x-query-unflushed", json!({}));
    assert_eq!(
        (
            unflushed[0]["bytes"].as_u64(),
            unflushed[0]["parked"].as_u64()
        ),
        (Some(0), Some(0))
    );

    let armed = q.call(
        "x-block-fault",
        json!({"device": "data", "arm": {"name": "outage", "op": "flush", "errno": "EIO"}}),
    );
    assert!(armed["id"].is_u64(), "{armed}");
    let bad = q.call(
        "x-block-fault",
        json!({"device": "data", "arm": {"op": "flush", "errno": "EWHAT"}}),
    );
    assert!(
        bad["error"]["desc"]
            .as_str()
            .unwrap_or("")
            .contains("errno"),
        "{bad}"
    );
    let nodev = q.call(
        "x-block-fault",
        json!({"device": "nope", "clear-all": true}),
    );
    assert_eq!(nodev["error"]["class"], "DeviceNotFound");
    assert_eq!(
        q.call(
            "x-block-fault",
            json!({"device": "data", "clear": "outage"})
        ),
        json!({"cleared": 1})
    );

    assert_eq!(q.call("cont", json!({})), json!({}));
    assert!(q.saw("RESUME"));
    assert_eq!(q.call("query-status", json!({}))["status"], "running");

    assert_eq!(q.call("quit", json!({})), json!({}));
    let status = child.0.wait().expect("holdfast exits");
    assert_eq!(status.code(), Some(0));
    assert!(q.saw("SHUTDOWN") || q.line()["event"] == "SHUTDOWN");
}

#[test]
fn sigterm_ends_holdfast_like_quit() {
    let Some((_dir, mut child, mut q)) = running_holdfast() else {
        return;
    };
    assert_eq!(q.call("query-status", json!({}))["status"], "running");
    // SAFETY: kill(2) on the child's pid with a valid signal number.
    let r = unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(r, 0);
    let status = child.0.wait().expect("holdfast exits");
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM with nothing to drop exits 0"
    );
    let shutdown = loop {
        let v = q.line();
        if v["event"] == "SHUTDOWN" {
            break v;
        }
    };
    assert_eq!(
        shutdown["data"],
        json!({"guest": false, "reason": "host-signal"})
    );
}

#[test]
fn a_bad_qmp_path_fails_before_the_guest_starts() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"x").expect("file");
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["run", "--kernel", "/proc/self/exe", "--qmp"])
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
}

#[test]
fn a_socket_it_may_not_connect_to_is_left_alone() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run holdfast as another user");
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let sock = dir.path().join("root-only.sock");
    // A socket of root's, mode 0600, nobody listening: another user gets EACCES.
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let out = {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(env!("CARGO_BIN_EXE_holdfast"));
        c.args(["run", "--kernel", "/proc/self/exe", "--qmp"])
            .arg(&sock);
        // SAFETY: setgid/setuid in the child before exec; no allocation happens.
        unsafe {
            c.pre_exec(|| {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c.output().expect("run as nobody")
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(
        sock.exists(),
        "holdfast deleted a socket it could not connect to"
    );
}

#[test]
fn quit_delivers_its_reply_and_shutdown_to_every_client_before_holdfast_exits() {
    for _ in 0..3 {
        let Some((dir, mut child, mut q)) = running_holdfast() else {
            return;
        };
        // Many clients: the QMP thread has the last events to write to each.
        let mut others: Vec<Qmp> = (0..40)
            .map(|_| Qmp::connect(&dir.path().join("qmp.sock")))
            .collect();
        let msg = json!({"execute": "quit", "id": "bye"});
        q.writer
            .write_all(format!("{msg}\n").as_bytes())
            .expect("send");
        let mut lines = until_closed(&mut q);
        assert!(lines.iter().any(|v| v["id"] == "bye"), "{lines:?}");
        for (i, o) in others.iter_mut().enumerate() {
            lines = until_closed(o);
            assert!(
                lines.iter().any(|v| v["event"] == "SHUTDOWN"),
                "client {i} missed SHUTDOWN: {lines:?}"
            );
        }
        assert_eq!(child.0.wait().expect("exit").code(), Some(0));
    }
}

/// Everything holdfast wrote to a client, until it closed the connection.
fn until_closed(q: &mut Qmp) -> Vec<Value> {
    let mut lines = std::mem::take(&mut q.events);
    loop {
        let mut l = String::new();
        match q.reader.read_line(&mut l) {
            Ok(0) => return lines,
            Ok(_) => lines.push(serde_json::from_str::<Value>(&l).expect("JSON")),
            Err(e) => panic!("holdfast neither wrote nor closed: {e}"),
        }
    }
}

/// holdfast's stderr while it runs: timestamped, levelled lines through the log
/// facade, naming the disk; RUST_LOG filters them.
#[test]
fn runtime_messages_are_timestamped_log_lines_that_rust_log_filters() {
    if !common::kvm_available() {
        return;
    }
    for (filter, want_detach_line) in [(None, true), (Some("warn"), false)] {
        let dir = tempfile::tempdir().expect("dir");
        let sock = dir.path().join("qmp.sock");
        let mut cmd = holdfast(dir.path());
        cmd.stderr(Stdio::piped()).env_remove("RUST_LOG");
        if let Some(f) = filter {
            cmd.env("RUST_LOG", f);
        }
        let child = cmd.spawn().expect("start holdfast");
        let mut q = Qmp::connect(&sock);
        q.call("stop", json!({}));
        assert_eq!(
            q.call("x-block-detach", json!({"device": "data"})),
            json!({})
        );
        q.call("quit", json!({}));
        let out = child.wait_with_output().expect("exit");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let detach = stderr.lines().find(|l| l.contains("data: detached from"));
        assert_eq!(
            detach.is_some(),
            want_detach_line,
            "RUST_LOG={filter:?}: {stderr}"
        );
        if let Some(line) = detach {
            // 2026-11-25T15:31:02.123Z INFO  holdfast: disk data: detached from ...
            let (ts, rest) = line.split_once(' ').expect("a timestamp");
            assert!(
                ts.len() >= 20 && ts.as_bytes()[4] == b'-' && ts.contains('T'),
                "{line}"
            );
            assert!(
                rest.starts_with("INFO  holdfast: disk data: detached from"),
                "{line}"
            );
        }
        // Nothing was buffered: quitting with the image detached drops nothing.
        assert!(!stderr.contains("dropped"), "{stderr}");
        assert_eq!(out.status.code(), Some(0), "{stderr}");
    }
}

/// A client that is slow to read when holdfast quits still gets SHUTDOWN: holdfast
/// waits (up to 2 s) for the QMP thread to hand every client its last events,
/// instead of exiting while a write to the slow client is blocked.
#[test]
fn a_slow_reader_gets_shutdown_too() {
    let Some((dir, mut child, mut driver)) = running_holdfast() else {
        return;
    };
    let mut slow = Qmp::connect(&dir.path().join("qmp.sock"));
    // About 500 small events: more than its socket holds, fewer than the backlog
    // past which a client is disconnected.
    for _ in 0..250 {
        driver.call("stop", json!({}));
        driver.call("cont", json!({}));
    }
    let msg = json!({"execute": "quit", "id": "bye"});
    driver
        .writer
        .write_all(format!("{msg}\n").as_bytes())
        .expect("send");
    std::thread::sleep(Duration::from_millis(300));
    let lines = until_closed(&mut slow);
    assert!(lines.len() > 500, "{} lines", lines.len());
    assert_eq!(
        lines.last().map(|v| v["event"].clone()),
        Some(json!("SHUTDOWN")),
        "the slow client's last line"
    );
    assert_eq!(child.0.wait().expect("exit").code(), Some(0));
}

/// `holdfast lab`'s hooks: a disk over a simulated host page cache, whose write-back
/// x-block-fault breaks (`layer: writeback`) and whose clean pages it evicts.
#[test]
fn a_simulated_host_disk_takes_writeback_faults_and_evictions() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let sim = dir.path().join("sim.img");
    std::fs::write(&sim, vec![0u8; 1 << 20]).expect("disk");
    let mut c = holdfast(dir.path());
    c.arg("--disk").arg(format!(
        "path={},id=sim,x-host=simulated:xfs,x-strategy=retry-flush",
        sim.display()
    ));
    let _child = Reap(c.spawn().expect("start holdfast"));
    let mut q = Qmp::connect(&dir.path().join("qmp.sock"));
    let armed = q.call(
        "x-block-fault",
        json!({"device": "sim", "layer": "writeback", "arm": {"name": "outage", "op": "write", "errno": "EIO"}}),
    );
    assert!(armed["id"].is_u64(), "{armed}");
    assert_eq!(
        q.call(
            "x-block-fault",
            json!({"device": "sim", "layer": "writeback", "clear": "outage"})
        ),
        json!({"cleared": 1})
    );
    assert_eq!(
        q.call("x-block-fault", json!({"device": "sim", "evict": true})),
        json!({})
    );
    let plain = q.call("x-block-fault", json!({"device": "data", "evict": true}));
    assert!(
        plain["error"]["desc"]
            .as_str()
            .unwrap_or("")
            .contains("no simulated host"),
        "{plain}"
    );
    let bad = q.call(
        "x-block-fault",
        json!({"device": "sim", "layer": "disk", "clear-all": true}),
    );
    assert!(
        bad["error"]["desc"]
            .as_str()
            .unwrap_or("")
            .contains("layer"),
        "{bad}"
    );
    assert_eq!(q.call("quit", json!({})), json!({}));
}
