//! `holdfast qmp` against holdfast's own QMP (a tiny counting guest on real KVM),
//! against QEMU 10's (`qemu-system-x86_64 -machine none`), and against sockets that
//! are not there or are not QMP servers: answers, error answers, events, the shell,
//! and one clear line with a non-zero status for everything else, never a hang.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

fn qmp(socket: &Path, args: &[&str]) -> Output {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .arg("qmp")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run holdfast qmp");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "holdfast qmp {args:?} took {:?}",
        start.elapsed()
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Exit status, stdout, stderr.
fn qmp_status(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let o = qmp(socket, args);
    (
        o.status.code().unwrap_or(-1),
        text(&o.stdout),
        text(&o.stderr),
    )
}

/// A server process, killed if the test ends before it does.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(path: &Path, server: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Ok(Some(status)) = server.try_wait() {
            panic!(
                "the server exited ({status}) before making {}",
                path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The checks that hold against any QMP server at `socket`: an answer, an error
/// answer, a bad command line, events as they come (read on `events_socket`: QEMU
/// serves one client a socket at a time), and the shell.
fn common_checks(socket: &Path, events_socket: &Path, home: &Path) {
    let (status, out, err) = qmp_status(socket, &["query-status"]);
    assert_eq!(status, 0, "query-status: {err}");
    let answer: serde_json::Value = serde_json::from_str(&out).expect("the answer is JSON");
    assert!(answer.get("status").is_some(), "{answer}");

    let (status, _, err) = qmp_status(socket, &["query-no-such-command"]);
    assert_eq!(status, 1, "an error answer exits 1");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("CommandNotFound"), "{err}");

    let (status, _, err) = qmp_status(socket, &["query-status", "bogus=1"]);
    assert_eq!(status, 1, "an argument the command does not take: {err}");
    assert!(err.contains("query-status: GenericError"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    let (status, _, err) = qmp_status(socket, &["query-status", "no-equals-sign"]);
    assert_eq!(
        status, 2,
        "a word that is not KEY=VALUE is a bad command line"
    );
    assert!(
        err.contains("`no-equals-sign`: an argument is KEY=VALUE"),
        "{err}"
    );

    // Events: a listener waits for one; stop and cont until it has seen it.
    let mut listener = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .arg("qmp")
        .arg(events_socket)
        .args(["events", "--count", "1", "--timeout", "25"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("events");
    let deadline = Instant::now() + Duration::from_secs(25);
    while listener.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "events saw nothing");
        assert_eq!(qmp_status(socket, &["stop"]).0, 0);
        assert_eq!(qmp_status(socket, &["cont"]).0, 0);
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = listener.wait_with_output().expect("events");
    assert!(out.status.success(), "events: {}", text(&out.stderr));
    let event: serde_json::Value =
        serde_json::from_str(text(&out.stdout).trim()).expect("one event, one JSON line");
    assert!(
        ["STOP", "RESUME"].contains(&event["event"].as_str().unwrap_or("")),
        "{event}"
    );

    // The shell, from a pipe: commands, an error, a JSON line, events, exit.
    let mut shell = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .arg("qmp")
        .arg(socket)
        .env("HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("shell");
    shell
        .stdin
        .take()
        .expect("stdin")
        .write_all(
            b"query-status\nquery-nothing\nstop\n{\"execute\": \"query-status\"}\ncont\nhelp\nexit\n",
        )
        .expect("write");
    let out = shell.wait_with_output().expect("shell");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "shell: {stderr}");
    assert!(stdout.contains("Connected to "), "{stdout}");
    assert!(stdout.contains("\"running\": false"), "stopped: {stdout}");
    assert!(
        stdout.contains("\"event\":\"STOP\""),
        "events printed: {stdout}"
    );
    assert!(
        stdout.contains("query-status"),
        "help lists the commands: {stdout}"
    );
    assert!(
        stderr.contains("error: query-nothing: CommandNotFound"),
        "{stderr}"
    );
    let history = std::fs::read_to_string(home.join(".holdfast_qmp_history")).expect("history");
    assert!(history.contains("query-nothing"), "{history}");
}

#[test]
fn holdfast_qmp_talks_to_holdfast() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let kernel = dir.path().join("counting.elf");
    std::fs::write(&kernel, common::counting_guest()).expect("guest");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    let socket = dir.path().join("qmp.sock");
    let vm = common::holdfast_run(&kernel)
        .arg("--disk")
        .arg(format!("path={},id=data", disk.display()))
        .arg("--qmp")
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()
        .expect("holdfast run");
    let mut vm = Server(vm);
    wait_for_socket(&socket, &mut vm.0);
    common_checks(&socket, &socket, dir.path());

    // holdfast's own commands, arguments as KEY=VALUE with JSON values.
    let (status, out, err) = qmp_status(
        &socket,
        &[
            "x-block-fault",
            "device=data",
            r#"arm={"op": "flush", "errno": 5}"#,
        ],
    );
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("\"id\""), "{out}");
    let (status, out, err) =
        qmp_status(&socket, &["x-block-fault", "device=data", "clear-all=true"]);
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("\"cleared\": 1"), "one rule cleared: {out}");
    let (status, _, err) = qmp_status(&socket, &["x-block-detach", "device=nope"]);
    assert_eq!(status, 1);
    assert!(err.contains("DeviceNotFound"), "{err}");

    let (status, _, err) = qmp_status(&socket, &["quit"]);
    assert_eq!(status, 0, "{err}");
    let exit = vm.0.wait().expect("holdfast ends");
    assert!(exit.success(), "{exit}");
}

#[test]
fn holdfast_qmp_talks_to_qemu() {
    let Some(qemu) = qemu() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("qemu-qmp.sock");
    let events = dir.path().join("qemu-events.sock");
    let vm = Command::new(&qemu)
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", events.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu");
    let mut vm = Server(vm);
    wait_for_socket(&socket, &mut vm.0);
    wait_for_socket(&events, &mut vm.0);
    common_checks(&socket, &events, dir.path());
    let (status, out, _) = qmp_status(&socket, &["query-version"]);
    assert_eq!(status, 0);
    assert!(out.contains("\"major\""), "{out}");
    let (status, _, err) = qmp_status(&socket, &["quit"]);
    assert_eq!(status, 0, "{err}");
    let exit = vm.0.wait().expect("qemu ends");
    assert!(exit.success(), "{exit}");
}

/// QEMU's system emulator; missing, the test skips, unless CI is set (where
/// tests/run has installed it and a missing one is a failure).
fn qemu() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|q| q.exists())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-system-x86_64 is missing (tests/run installs it)"
        );
        eprintln!("skipped: no qemu-system-x86_64");
    }
    found
}

#[test]
fn a_socket_that_is_not_there_or_not_qmp_is_one_line_and_status_3() {
    let dir = tempfile::tempdir().expect("dir");
    let (status, _, err) = qmp_status(&dir.path().join("none.sock"), &["query-status"]);
    assert_eq!(status, 3);
    assert!(err.starts_with("holdfast qmp: cannot connect to "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // A server that accepts and says nothing; one that says something else.
    for (name, says, expect) in [
        ("silent", None, "sent no greeting within 5 s"),
        (
            "http",
            Some("HTTP/1.1 400 Bad Request\r\n\r\n"),
            "is not a QMP server: it sent",
        ),
        ("json", Some("{\"hello\": 1}\n"), "its greeting is"),
        (
            "closes",
            Some(""),
            "closed the connection without a greeting",
        ),
    ] {
        let path = dir.path().join(format!("{name}.sock"));
        let listener = UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            match says {
                Some(s) => {
                    conn.write_all(s.as_bytes()).expect("say");
                    drop(conn);
                }
                None => std::thread::sleep(Duration::from_secs(7)),
            }
        });
        let (status, _, err) = qmp_status(&path, &["query-status"]);
        assert_eq!(status, 3, "{name}: {err}");
        assert!(err.contains(expect), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        server.join().expect("server");
    }
}
