//! The `holdfast` command line as a user meets it.

use std::process::Command;

fn holdfast(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(args)
        .output()
        .expect("run holdfast");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_explains_what_works() {
    let (code, out, _) = holdfast(&["--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Usage: holdfast") && out.contains("outage-matrix"),
        "{out}"
    );
}

#[test]
fn unknown_command_is_named() {
    let (code, _, err) = holdfast(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(err.contains("frobnicate"), "{err}");
}

#[test]
fn run_says_it_is_not_there_yet() {
    let (code, _, err) = holdfast(&["run", "--kernel", "x"]);
    assert_eq!(code, 2);
    assert!(err.contains("not implemented"), "{err}");
}
