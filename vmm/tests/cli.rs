//! The `holdfast` command line as a user meets it.

mod common;

fn holdfast(args: &[&str]) -> (i32, String, String) {
    common::holdfast_output(args)
}

#[test]
fn help_explains_what_works() {
    let (code, out, _) = holdfast(&["--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Usage: holdfast") && out.contains("holdfast lab images/lab/matrix.json"),
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
fn run_checks_its_options_before_touching_kvm() {
    let (code, _, err) = holdfast(&["run", "--kernel", "/nonexistent/vmlinuz"]);
    assert_eq!(code, 2);
    assert!(err.contains("--kernel: /nonexistent/vmlinuz"), "{err}");
    let (code, _, err) = holdfast(&["run", "--kernel", "/proc/self/exe", "--mem", "12"]);
    assert_eq!(code, 2);
    assert!(err.contains("--mem"), "{err}");
}

#[test]
fn run_help_documents_every_option() {
    let (code, out, _) = holdfast(&["run", "--help"]);
    assert_eq!(code, 0);
    for option in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--cpus",
        "--mem",
        "--disk",
        "--serial",
        "--qmp",
        "werror=",
        "unflushed-limit=",
        "x-block-detach",
        "x-block-attach",
        "docs/durability.md",
    ] {
        assert!(out.contains(option), "{option} missing from run --help");
    }
}
