//! On a host whose KVM emulates guest kernel code (no VT-x/AMD-V, as this project's
//! machines), a guest instruction the emulator cannot do must end holdfast with a
//! message that says so and points to the nested test host, not a register dump.

mod common;

fn hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.split_whitespace().any(|w| w == "vmx" || w == "svm"))
        .unwrap_or(true)
}

#[test]
fn emulation_failure_is_explained() {
    if hardware_virtualization() || !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: this host runs guest kernel code natively (or has no KVM): nothing fails to emulate");
        return;
    }
    // `lock cmpxchg16b [0x2000000]`, then spin: KVM's emulator cannot do the first.
    let code = [
        0xf0, 0x48, 0x0f, 0xc7, 0x0c, 0x25, 0x00, 0x00, 0x00, 0x02, 0xeb, 0xfe,
    ];
    let dir = tempfile::tempdir().expect("dir");
    let kernel = dir.path().join("cmpxchg16b.elf");
    std::fs::write(&kernel, common::elf(&code)).expect("guest");
    let out = common::holdfast_run(&kernel)
        .output()
        .expect("run holdfast");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("emulation failure") && err.contains("nested test host"),
        "{err}"
    );
    assert!(!err.contains("RAX="), "no register dump: {err}");
}
