//! A run's verdict as holdfast's exit status, with tiny guests on real KVM: the
//! guest's own status through the debug-exit port (0x501), a panic its console shows
//! (status 3, the console's last lines printed), a boot that never starts init within
//! --boot-timeout (status 5), and one that does (no timeout).

use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;

/// `mov dx, PORT; mov al, BYTE; out dx, al` for each byte.
fn out_bytes(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut code = Vec::new();
    for &b in bytes {
        code.extend_from_slice(&[0x66, 0xba]);
        code.extend_from_slice(&port.to_le_bytes());
        code.extend_from_slice(&[0xb0, b, 0xee]);
    }
    code
}

/// `jmp $`.
const SPIN: [u8; 2] = [0xeb, 0xfe];

fn run(code: &[u8], extra: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().expect("dir");
    let kernel = dir.path().join("guest.elf");
    std::fs::write(&kernel, common::elf(code)).expect("guest");
    let out = common::holdfast_run(&kernel)
        .args(extra)
        .output()
        .expect("run holdfast");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_guest_status_on_the_debug_exit_port_is_the_exit_status() {
    if !common::kvm_available() {
        return;
    }
    for status in [0u8, 7, 200] {
        let mut code = out_bytes(0x501, &[status]);
        code.extend_from_slice(&SPIN);
        let (code, err) = run(&code, &[]);
        assert_eq!(code, i32::from(status), "{err}");
        assert!(
            err.contains(&format!("exiting {status}: the guest's status")),
            "{err}"
        );
    }
}

#[test]
fn a_panic_on_the_console_is_status_3_with_its_last_lines() {
    if !common::kvm_available() {
        return;
    }
    // A kernel without pvpanic, with panic=-1: it says so and resets the CPU.
    let mut code = out_bytes(
        0x3f8,
        b"booting\nKernel panic - not syncing: Attempted to kill init!\n",
    );
    code.extend(out_bytes(0x64, &[0xfe]));
    code.extend_from_slice(&SPIN);
    let (code, err) = run(&code, &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("the console's last lines:"), "{err}");
    assert!(
        err.contains("  | Kernel panic - not syncing: Attempted to kill init!"),
        "{err}"
    );
    assert!(err.contains("  | booting"), "{err}");
}

#[test]
fn a_boot_that_never_starts_init_ends_at_the_boot_timeout_with_status_5() {
    if !common::kvm_available() {
        return;
    }
    let mut code = out_bytes(0x3f8, b"[    0.000000] Linux version 6.1 (stuck)\n");
    code.extend_from_slice(&SPIN);
    let start = Instant::now();
    let (code, err) = run(&code, &["--boot-timeout", "1"]);
    assert_eq!(code, 5, "{err}");
    assert!(start.elapsed() < Duration::from_secs(20), "{err}");
    assert!(
        err.contains("did not start the guest's init within 1 s"),
        "{err}"
    );
    assert!(
        err.contains("  | [    0.000000] Linux version 6.1 (stuck)"),
        "{err}"
    );

    let (code, err) = run(&SPIN, &["--boot-timeout", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--boot-timeout: `0` is not a number of seconds"),
        "{err}"
    );
}

#[test]
fn a_boot_that_starts_init_runs_past_the_boot_timeout() {
    if !common::kvm_available() {
        return;
    }
    let mut code = out_bytes(0x3f8, b"[    0.9] Run /init as init process\n");
    code.extend_from_slice(&SPIN);
    let dir = tempfile::tempdir().expect("dir");
    let kernel = dir.path().join("guest.elf");
    std::fs::write(&kernel, common::elf(&code)).expect("guest");
    let mut child = common::holdfast_run(&kernel)
        .args(["--boot-timeout", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("holdfast");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "holdfast ended although init started"
    );
    // SAFETY: kill(2) on the child's pid with a valid signal number.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(r, 0);
    let out = child.wait_with_output().expect("exit");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_boot_timeout_waits_while_the_guest_is_paused() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let kernel = dir.path().join("guest.elf");
    std::fs::write(&kernel, common::elf(&SPIN)).expect("guest");
    let sock = dir.path().join("qmp.sock");
    let mut child = common::holdfast_run(&kernel)
        .args(["--boot-timeout", "2", "--qmp"])
        .arg(&sock)
        .stderr(Stdio::piped())
        .spawn()
        .expect("holdfast");
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no QMP socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut qmp = holdfast_qmp::client::Client::connect(&sock).expect("qmp");
    let mut ask = |command: &str| {
        qmp.execute(command, None, Some(Duration::from_secs(10)))
            .expect("answered")
            .expect("ok")
    };
    ask("stop");
    // Paused for twice the limit: the guest has not run 2 s, holdfast goes on.
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the boot timeout ended a paused guest"
    );
    assert_eq!(ask("query-status")["status"], "paused");
    ask("cont");
    let out = child.wait_with_output().expect("exit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
}

#[test]
fn a_failed_last_flush_with_nothing_buffered_is_not_dropped_bytes() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("image");
    let plan = dir.path().join("plan.json");
    std::fs::write(&plan, r#"{"rules": [{"op": "flush", "errno": "EIO"}]}"#).expect("plan");
    let mut code = out_bytes(0x501, &[0]);
    code.extend_from_slice(&SPIN);
    let disk = format!("path={},faults={}", img.display(), plan.display());
    let (code, err) = run(&code, &["--disk", &disk]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("no acknowledged bytes are at risk"), "{err}");
}
