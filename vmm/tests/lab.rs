//! `holdfast lab` as a user meets it: scenario files checked before anything runs,
//! the shipped synthetic scenario reproducing the outage matrix, results folders,
//! and a failing exit when a strategy that promises to lose nothing loses.

use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;

fn holdfast(args: &[&str]) -> (i32, String, String) {
    common::holdfast_output(args)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Writes `json` as a scenario file in `dir` (with a kernel and a disk beside it).
fn scenario(dir: &Path, json: &str) -> PathBuf {
    std::fs::write(dir.join("vmlinuz"), b"not really a kernel").expect("kernel");
    std::fs::write(dir.join("data.img"), vec![0u8; 4096]).expect("disk");
    let path = dir.join("scenario.json");
    std::fs::write(&path, json).expect("scenario");
    path
}

/// A Linux-guest scenario that passes every check; `edit` changes it.
fn linux(edit: impl FnOnce(&mut Value)) -> String {
    let mut v: Value = serde_json::from_str(
        r#"{
        "name": "sqlite",
        "guest": {"kernel": "vmlinuz", "cmdline": "console=ttyS0", "disks": [{"id": "data", "image": "data.img"}]},
        "progress": {"ready": "WORKLOAD READY", "ack": "ACK "},
        "outages": [{"kind": "flush-eio", "when": {"at": "3s"}, "lasts": "10s"}],
        "verify": {"host": {"command": ["sh", "-c", "true"], "have": "HAVE "}},
        "hosts": ["simulated:xfs"],
        "strategies": ["holdfast", "retry-flush"]
    }"#,
    )
    .expect("json");
    edit(&mut v);
    v.to_string()
}

fn synthetic(strategies: &[&str], outages: &str) -> String {
    format!(
        r#"{{"name": "small", "seed": 7, "guest": {{"synthetic": {{"rounds": 6}}}},
            "outages": {outages},
            "hosts": ["simulated:ext4-ordered", "simulated:freebsd"],
            "strategies": {}}}"#,
        serde_json::to_string(strategies).expect("json")
    )
}

/// Runs `holdfast lab --check` and the lab itself on a bad scenario: both must fail
/// with exit 2 naming `field`, and the lab must not create its results folder.
fn refused(json: &str, field: &str, words: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = scenario(dir.path(), json);
    let p = path.to_str().expect("utf-8");
    let (code, _, err) = holdfast(&["lab", "--check", p]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{field}: ")) && err.contains(words),
        "want `{field}: ...{words}...`, got: {err}"
    );
    let out = dir.path().join("out");
    let (code, stdout, _) = holdfast(&["lab", "--out", out.to_str().expect("utf-8"), p]);
    assert_eq!(code, 2);
    assert!(!out.exists() && stdout.is_empty(), "nothing runs: {stdout}");
}

#[test]
fn a_good_linux_scenario_passes_the_checks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = scenario(dir.path(), &linux(|_| {}));
    let (code, out, err) = holdfast(&["lab", "--check", path.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok, 2 runs"), "{out}");
}

#[test]
fn unknown_keys_and_wrong_types_are_named() {
    refused(
        &linux(|v| v["guest"]["kernal"] = "vmlinuz".into()),
        "guest.kernal",
        "unknown field `kernal`",
    );
    refused(
        &linux(|v| v["guest"]["cpus"] = "two".into()),
        "guest.cpus",
        "invalid type",
    );
    refused(
        &linux(|v| v["outages"][0]["when"]["nth"] = (-1).into()),
        "outages[0].when.nth",
        "invalid value",
    );
    refused("{\"name\": ", "", "not valid JSON");
}

#[test]
fn a_missing_kernel_is_named() {
    refused(
        &linux(|v| {
            v["guest"].as_object_mut().expect("guest").remove("kernel");
        }),
        "guest.kernel",
        "missing",
    );
    refused(
        &linux(|v| v["guest"]["kernel"] = "nowhere/vmlinuz".into()),
        "guest.kernel",
        "No such file",
    );
}

#[test]
fn an_outage_before_the_guest_is_ready_is_refused() {
    refused(
        &linux(|v| v["outages"][0]["when"] = serde_json::json!({"at": "-5s"})),
        "outages[0].when.at",
        "before the guest is ready",
    );
    refused(
        &linux(|v| v["outages"][0]["when"] = serde_json::json!({"line": "READY"})),
        "outages[0].when.line",
        "before the guest is ready",
    );
    refused(
        &synthetic(
            &["holdfast"],
            r#"[{"kind": "flush-eio", "when": {"line": "round 0"}}]"#,
        ),
        "outages[0].when.line",
        "rounds 1 to 6",
    );
}

#[test]
fn an_impossible_verification_is_refused() {
    refused(
        &linux(|v| {
            v["verify"]["host"]["command"] = serde_json::json!(["no-such-checker-xyz", "--all"])
        }),
        "verify.host.command",
        "not an executable file or a command on PATH",
    );
    refused(
        &linux(|v| v["verify"]["host"]["command"] = serde_json::json!([])),
        "verify.host.command",
        "empty",
    );
    refused(
        &linux(|v| {
            v.as_object_mut().expect("scenario").remove("verify");
        }),
        "verify",
        "missing",
    );
}

#[test]
fn names_and_combinations_are_checked() {
    refused(
        &linux(|v| v["hosts"][0] = "simulated:zfs".into()),
        "hosts[0]",
        "zfs",
    );
    refused(
        &linux(|v| v["strategies"][1] = "qemu".into()),
        "strategies[1]",
        "real",
    );
    refused(
        &linux(|v| v["outages"][0]["kind"] = "meteor".into()),
        "outages[0].kind",
        "meteor",
    );
    refused(
        &linux(|v| v["outages"][0]["disk"] = "root".into()),
        "outages[0].disk",
        "no disk `root`",
    );
    refused(
        &linux(|v| v["outages"][0]["kind"] = "fs-down".into()),
        "outages[0].kind",
        "needs a host file system",
    );
    // A hang runs on simulated hosts too (their cache's device stops answering).
    let dir = tempfile::tempdir().expect("tempdir");
    let hang = scenario(
        dir.path(),
        &linux(|v| v["outages"][0]["kind"] = "hang".into()),
    );
    let (code, _, err) = holdfast(&["lab", "--check", hang.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{err}");
    refused(
        &synthetic(&["holdfast"], r#"[{"kind": "hang", "when": {"at": "1s"}}]"#),
        "outages[0].kind",
        "needs a real guest",
    );
}

fn run_lab(dir: &Path, json: &str) -> (i32, String, String, PathBuf) {
    let path = scenario(dir, json);
    let out = dir.join("results");
    let (code, stdout, stderr) = holdfast(&[
        "lab",
        "--out",
        out.to_str().expect("utf-8"),
        path.to_str().expect("utf-8"),
    ]);
    (code, stdout, stderr, out)
}

#[test]
fn the_shipped_matrix_scenario_reproduces_the_outage_matrix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = std::fs::read_to_string(repo().join("images/lab/matrix.json")).expect("shipped");
    let (code, stdout, stderr, out) = run_lab(dir.path(), &json);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout.lines().next(),
        Some(format!("holdfast lab: results in {}", out.display()).as_str())
    );
    assert_eq!(
        stderr.matches("lab: [").count(),
        90,
        "a progress line per run"
    );
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).expect("json"))
            .expect("parse");
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 90);
    // The same cells as holdfast_block::sim::matrix, read the same way.
    use holdfast_block::sim::matrix::{run_cell, Outage};
    use holdfast_block::sim::strategy::Strategy;
    for r in runs {
        let strategy: Strategy = r["strategy"]
            .as_str()
            .expect("s")
            .parse()
            .expect("strategy");
        let host = r["host"]
            .as_str()
            .expect("h")
            .trim_start_matches("simulated:");
        let outage: Outage = r["outage"].as_str().expect("o").parse().expect("outage");
        let cell = run_cell(strategy, host.parse().expect("model"), outage);
        assert_eq!(r["acked"], cell.acked_writes, "{r}");
        assert_eq!(r["lost"], cell.acked_writes_lost, "{r}");
        assert_eq!(r["resumed"], cell.resumed, "{r}");
        assert_eq!(r["corrupt"], cell.stale_reads, "{r}");
        let svg = out.join(r["timeline_svg"].as_str().expect("svg"));
        assert!(std::fs::read_to_string(svg)
            .expect("svg")
            .starts_with("<svg "));
    }
    let md = std::fs::read_to_string(out.join("results.md")).expect("md");
    assert_eq!(
        md.lines().filter(|l| l.starts_with("| simulated:")).count(),
        90
    );
    // retry-flush loses on Linux-like hosts; holdfast nowhere.
    assert!(runs
        .iter()
        .any(|r| r["strategy"] == "retry-flush" && r["lost"].as_u64() > Some(0)));
    assert!(runs
        .iter()
        .filter(|r| r["strategy"] == "holdfast")
        .all(|r| r["lost"] == 0));
}

#[test]
fn a_strategy_that_promises_no_loss_and_loses_fails_the_lab() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = synthetic(
        &["holdfast", "x-lying-flush"],
        r#"[{"kind": "flush-eio", "when": {"line": "round 3"}}]"#,
    );
    let (code, stdout, stderr, out) = run_lab(dir.path(), &json);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains(
            "x-lying-flush on simulated:ext4-ordered (flush-eio) promised to lose nothing"
        ),
        "{stderr}"
    );
    assert!(
        !stderr.contains("holdfast on"),
        "holdfast kept everything: {stderr}"
    );
    // The results are written all the same.
    let md = std::fs::read_to_string(out.join("results.md")).expect("md");
    assert!(
        md.contains("| simulated:ext4-ordered | x-lying-flush | flush-eio |"),
        "{md}"
    );
}

#[test]
fn the_same_scenario_and_seed_give_the_same_runs() {
    let json = synthetic(
        &["holdfast", "retry-flush"],
        r#"[{"kind": "flush-eio", "when": {"at": "700ms"}}, {"kind": "writeback-eio", "when": {"line": "round 2"}}]"#,
    );
    let results = |dir: &Path, json: &str| {
        let (code, _, err, out) = run_lab(dir, json);
        assert_eq!(code, 0, "{err}");
        std::fs::read_to_string(out.join("results.json")).expect("json")
    };
    let (a, b, c) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
        tempfile::tempdir().expect("c"),
    );
    let first = results(a.path(), &json);
    assert_eq!(first, results(b.path(), &json));
    let reseeded = json.replace("\"seed\": 7", "\"seed\": 8");
    assert_ne!(first, results(c.path(), &reseeded), "the seed matters");
}

#[test]
fn an_existing_results_folder_is_not_overwritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("results")).expect("mkdir");
    let (code, _, err, _) = run_lab(
        dir.path(),
        &synthetic(
            &["holdfast"],
            r#"[{"kind": "flush-eio", "when": {"line": "round 2"}}]"#,
        ),
    );
    assert_eq!(code, 2);
    assert!(err.contains("exists already"), "{err}");
}

#[test]
fn help_documents_the_format() {
    let (code, out, _) = holdfast(&["lab", "--help"]);
    assert_eq!(code, 0);
    for key in [
        "progress",
        "outages",
        "operator",
        "verify",
        "hosts",
        "strategies",
        "seed",
        "simulated:MODEL",
    ] {
        assert!(out.contains(key), "{key} in {out}");
    }
}

#[test]
fn every_shipped_scenario_parses() {
    let dir = repo().join("images/lab");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("images/lab") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).expect("read");
            if let Err(e) = holdfast_vmm::lab::scenario::parse(&text) {
                panic!("{}: {e}", path.display());
            }
            n += 1;
        }
    }
    assert!(n >= 4, "matrix, sqlite, postgresql, redis: {n}");
}

#[test]
fn host_and_strategy_options_pick_runs_from_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = scenario(dir.path(), &linux(|_| {}));
    let p = path.to_str().expect("utf-8");
    let (code, out, err) = holdfast(&["lab", "--check", "--strategy", "retry-flush", p]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok, 1 runs"), "{out}");
    let (code, _, err) = holdfast(&["lab", "--check", "--host", "real", p]);
    assert_eq!(code, 2);
    assert!(
        err.contains("hosts: --host: `real` is not one of the scenario's"),
        "{err}"
    );
    // A host the user leaves out is not checked: its needs (root, QEMU) do not matter.
    let with_real = linux(|v| {
        v["hosts"] = serde_json::json!(["simulated:xfs", "real"]);
        v["strategies"] = serde_json::json!(["holdfast", "qemu"]);
    });
    let path = scenario(dir.path(), &with_real);
    let (code, out, err) = holdfast(&[
        "lab",
        "--check",
        "--host",
        "simulated:xfs",
        "--strategy",
        "holdfast",
        path.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok, 1 runs"), "{out}");
}

#[test]
fn the_seed_picks_the_line_the_outage_meets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |seed: u64| {
        let json = linux(|v| {
            v["seed"] = seed.into();
            v["outages"][0]["when"] = serde_json::json!({"line": "ACK", "nth_between": [10, 90]});
        });
        let path = scenario(dir.path(), &json);
        let (code, out, err) = holdfast(&["lab", "--check", path.to_str().expect("utf-8")]);
        assert_eq!(code, 0, "{err}");
        let line = out
            .lines()
            .find(|l| l.contains("outage 1:"))
            .expect("outage line")
            .to_string();
        let nth: u32 = line
            .split("at the ")
            .nth(1)
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse().ok())
            .expect("nth");
        assert!((10..=90).contains(&nth), "{line}");
        nth
    };
    assert_eq!(check(5), check(5), "same seed, same line");
    assert!((1..20).any(|s| check(s) != check(5)), "the seed matters");
    refused(
        &linux(|v| {
            v["outages"][0]["when"] = serde_json::json!({"line": "ACK", "nth_between": [0, 9]})
        }),
        "outages[0].when.nth_between",
        "counting from 1",
    );
}

#[test]
fn an_outage_can_start_a_while_after_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = linux(|v| {
        v["outages"][0]["when"] = serde_json::json!({"line": "ACK", "nth": 3, "after": "500ms"});
    });
    let path = scenario(dir.path(), &json);
    let (code, out, err) = holdfast(&["lab", "--check", path.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("0.5 s after the 3. line with `ACK` after the ready marker"),
        "{out}"
    );
    let plan = holdfast_vmm::lab::scenario::load(&path).expect("plan");
    assert_eq!(
        plan.outages[0].when,
        holdfast_vmm::lab::scenario::When::Line {
            text: "ACK".into(),
            nth: 3,
            after: std::time::Duration::from_millis(500)
        }
    );
    refused(
        &linux(|v| v["outages"][0]["when"] = serde_json::json!({"at": "5s", "after": "1s"})),
        "outages[0].when.after",
        "goes with `line`",
    );
    refused(
        &linux(|v| v["outages"][0]["when"] = serde_json::json!({"line": "ACK", "after": "soon"})),
        "outages[0].when.after",
        "soon",
    );
    refused(
        &synthetic(
            &["holdfast"],
            r#"[{"kind": "flush-eio", "when": {"line": "round 2", "after": "1s"}}]"#,
        ),
        "outages[0].when.after",
        "Linux guests",
    );
}

#[test]
fn a_hang_timeout_is_whole_seconds_for_a_linux_guest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = scenario(dir.path(), &linux(|v| v["hang_timeout"] = "3s".into()));
    let (code, out, err) = holdfast(&["lab", "--check", path.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{out}{err}");
    let plan = holdfast_vmm::lab::scenario::load(&path).expect("plan");
    assert_eq!(plan.hang_timeout, Some(std::time::Duration::from_secs(3)));
    refused(
        &linux(|v| v["hang_timeout"] = "1500ms".into()),
        "hang_timeout",
        "whole seconds",
    );
    refused(
        &synthetic(
            &["holdfast"],
            r#"[{"kind": "flush-eio", "when": {"line": "round 3"}}]"#,
        )
        .replace(r#""seed": 7,"#, r#""seed": 7, "hang_timeout": "3s","#),
        "hang_timeout",
        "never hangs",
    );
}

#[test]
fn a_read_only_disk_is_never_the_one_an_outage_hits() {
    // A read-only root beside the data disk passes; the outage hits the data disk.
    let dir = tempfile::tempdir().expect("tempdir");
    let two = |v: &mut Value| {
        v["guest"]["disks"] = serde_json::json!([
            {"id": "root", "image": "data.img", "readonly": true},
            {"id": "data", "image": "data.img"}
        ])
    };
    let with_boot = |v: &mut Value| {
        two(v);
        v["verify"] =
            serde_json::json!({"boot": {"cmdline": "check", "ok": "CHECK OK", "have": "HAVE "}});
    };
    let path = scenario(dir.path(), &linux(with_boot));
    let (code, _, err) = holdfast(&["lab", "--check", path.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{err}");
    let plan = holdfast_vmm::lab::scenario::load(&path).expect("plan");
    let holdfast_vmm::lab::scenario::Guest::Linux(g) = &plan.guest else {
        panic!("a Linux guest")
    };
    assert!(g.is_read_only("root") && !g.is_read_only("data"));
    assert_eq!(g.first_writable(), "data");
    refused(
        &linux(|v| {
            with_boot(v);
            v["outages"][0]["disk"] = "root".into();
        }),
        "outages[0].disk",
        "disk `root` is read-only",
    );
    refused(
        &linux(|v| v["guest"]["disks"][0]["readonly"] = true.into()),
        "guest.disks",
        "every disk is read-only",
    );
    // A host command gets the images' paths: a read-only one's would be the
    // scenario's own.
    refused(&linux(two), "verify.host", "disk `root` is read-only");
}

#[test]
fn a_power_cut_that_cannot_be_is_refused_before_anything_boots() {
    let cut = |v: &mut Value, extra: Value| {
        let mut o = serde_json::json!({"kind": "power-cut", "when": {"at": "3s"}});
        if let (Some(o), Some(e)) = (o.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        v["outages"] = serde_json::json!([o]);
    };
    refused(
        &linux(|v| cut(v, serde_json::json!({"modes": ["half"]}))),
        "outages[0].modes[0]",
        "`half` is not a power-cut mode (none, all, prefix, subset, torn)",
    );
    refused(
        &linux(|v| cut(v, serde_json::json!({"modes": []}))),
        "outages[0].modes",
        "empty",
    );
    refused(
        &linux(|v| cut(v, serde_json::json!({"lasts": "3s"}))),
        "outages[0].lasts",
        "a power cut does not end",
    );
    refused(
        &linux(|v| cut(v, serde_json::json!({"disk": "data"}))),
        "outages[0].disk",
        "a power cut takes every disk",
    );
    refused(
        &linux(|v| {
            cut(v, serde_json::json!({"from_run": "nowhere"}));
            v["outages"][0]
                .as_object_mut()
                .expect("outage")
                .remove("when");
        }),
        "outages[0].from_run",
        "no acked.txt",
    );
    refused(
        &linux(|v| v["outages"][0]["modes"] = serde_json::json!(["all"])),
        "outages[0].modes",
        "goes with `power-cut`",
    );
    refused(
        &synthetic(
            &["holdfast"],
            r#"[{"kind": "power-cut", "when": {"line": "round 2"}}]"#,
        ),
        "outages[0].kind",
        "`power-cut` needs a real guest",
    );
    // A good one is listed with its states, seeds and modes; --runs 0 is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = scenario(
        dir.path(),
        &linux(|v| {
            cut(
                v,
                serde_json::json!({"modes": ["torn", "none"], "control": true}),
            )
        }),
    );
    let p = path.to_str().expect("utf-8");
    let (code, out, err) = holdfast(&["lab", "--check", "--runs", "4", "--seed", "9", p]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("4 crash states (seeds 9 to 12), modes torn, none, a control (must lose)"),
        "{out}"
    );
    let (code, _, err) = holdfast(&["lab", "--check", "--runs", "0", p]);
    assert_eq!(code, 2);
    assert!(err.contains("--runs: 0 crash states"), "{err}");
    let flush = scenario(dir.path(), &linux(|_| {}));
    let (code, _, err) = holdfast(&[
        "lab",
        "--check",
        "--runs",
        "3",
        flush.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("no power-cut outage"), "{err}");
}
