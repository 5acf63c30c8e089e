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

#[test]
fn version_man_page_and_completions_come_from_one_definition() {
    let (code, out, _) = holdfast(&["--version"]);
    assert_eq!(
        (code, out.trim()),
        (0, concat!("holdfast ", env!("CARGO_PKG_VERSION")))
    );
    let (code, man, _) = holdfast(&["man"]);
    assert_eq!(code, 0);
    assert!(
        man.contains(".TH holdfast 1") && man.contains("run"),
        "{man}"
    );
    let (code, man, _) = holdfast(&["man", "run"]);
    assert_eq!(code, 0);
    assert!(
        man.contains(".TH holdfast-run 1") && man.contains("kernel") && man.contains("werror="),
        "the run page has the options and the disk keys"
    );
    let (code, _, err) = holdfast(&["man", "nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("no command `nope`"), "{err}");
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = holdfast(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(
            out.contains("holdfast") && out.contains("kernel"),
            "{shell}"
        );
    }
    let (code, _, err) = holdfast(&["completions", "tcsh"]);
    assert_eq!(code, 2);
    assert!(err.contains("tcsh"), "{err}");
}

#[test]
fn disks_take_qemu_spellings_and_refuse_other_formats() {
    let dir = tempfile::tempdir().expect("dir");
    let img = dir.path().join("d.img");
    std::fs::write(&img, vec![0u8; 4096]).expect("image");
    let img = img.to_str().expect("utf-8");
    let opts = holdfast_vmm::cli::parse_run(&[
        "--kernel".into(),
        img.into(),
        "--disk".into(),
        format!("file={img},format=raw,id=d"),
    ])
    .expect("QEMU's file= and format=raw")
    .expect("not help");
    assert_eq!(opts.disks[0].path.to_str(), Some(img));
    let (code, _, err) = holdfast(&[
        "run",
        "--kernel",
        img,
        "--disk",
        &format!("file={img},format=qcow2"),
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--disk: format: `qcow2` is not supported") && err.contains("raw"),
        "{err}"
    );
}

#[test]
fn a_fault_plan_is_checked_before_anything_boots() {
    let dir = tempfile::tempdir().expect("dir");
    let img = dir.path().join("d.img");
    std::fs::write(&img, vec![0u8; 4096]).expect("image");
    let plan = dir.path().join("plan.json");
    std::fs::write(
        &plan,
        r#"{"rules": [{"op": "flush", "errno": "EIO", "probability": 2}]}"#,
    )
    .expect("plan");
    let (img, plan) = (img.to_str().expect("utf-8"), plan.to_str().expect("utf-8"));
    let (code, _, err) = holdfast(&[
        "run",
        "--kernel",
        img,
        "--disk",
        &format!("path={img},faults={plan}"),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--disk: faults: fault plan field `rules[0].probability`")
            && err.contains("from 0 to 1"),
        "{err}"
    );
    let (code, _, err) = holdfast(&["faults", plan]);
    assert_eq!(code, 2);
    assert!(err.contains("rules[0].probability"), "{err}");
    std::fs::write(
        plan,
        r#"{"seed": 5, "rules": [{"op": ["read", "flush"], "errno": "EIO", "probability": 0.5},
                                 {"op": "write", "delay_ms": 20, "active": {"from_call": 10, "for_calls": 5}}]}"#,
    )
    .expect("plan");
    let (code, out, err) = holdfast(&["faults", plan]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok, 2 rule(s), seed 5"), "{out}");
    assert!(out.contains("read+flush: fails EIO, 50% (seed 5)"), "{out}");
    assert!(
        out.contains("write: waits 20 ms, goes on, on from call 10 for 5 calls"),
        "{out}"
    );
    let (code, help, _) = holdfast(&["faults", "--help"]);
    assert_eq!(code, 0);
    for key in [
        "probability",
        "delay_ms",
        "active",
        "from_s",
        "every_calls",
        "seed",
        "Examples",
    ] {
        assert!(
            help.contains(key),
            "{key} missing from holdfast faults --help"
        );
    }
}
