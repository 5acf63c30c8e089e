//! `holdfast lab`: rerun storage outages from a scenario file and report what the
//! guest's applications kept.
//!
//! A scenario ([`scenario`]) names a guest, how it reports progress, the outages,
//! the operator, the verification, the hosts and the strategies to compare; the lab
//! checks all of it before anything runs, runs every host x strategy x outage, and
//! writes a results folder ([`report`]): a Markdown table, a JSON record of every
//! run, an SVG timeline per run ([`svg`]). The synthetic guest ([`synthetic`]) is the
//! outage matrix's workload in virtual time.

pub mod error;
pub mod guest;
pub mod powercut;
pub mod realhost;
pub mod report;
pub mod scenario;
pub mod svg;
pub mod synthetic;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub use error::Error;
use error::Unsupported;
use report::RunRecord;
use scenario::{Guest, OutageKind, Plan};

/// What `holdfast lab --help` says after the options (before the format).
pub const HELP: &str = "\
Reruns host storage outages from a scenario file, against holdfast and QEMU-like
strategies, and reports what the guest kept.

The first line printed names the results folder. It gets results.md (a table: one row
per host x strategy x outage: resumed, app-visible errors, acknowledged units, lost,
corrupt, the verification's verdict), results.json (every run, with its timeline) and
one SVG timeline per run (acknowledged units per second; the host's storage state
ok/broken/hung/down; the VM's state running/paused/io-error; QMP events and the
operator's commands as markers). A progress line per run goes to standard error.

Exit status: 0 when every run of a strategy that promises to lose nothing (holdfast)
kept every acknowledged unit, intact, and its verification passed; 1 if one did not
(the runs that broke the promise are named), or a power cut's control lost
nothing; 2 when the scenario file is wrong (before anything runs; the message names
the field) or the results cannot be written.
Other strategies' losses are findings, not failures.
";

/// The scenario file's format (printed after [`HELP`]).
pub const FORMAT_HELP: &str = r#"
Scenario files (JSON; unknown keys are errors; relative paths are relative to the
file's folder; durations like 500ms, 5s, 2m; sizes like 512M). Examples: images/lab/.

  name        letters, digits, - _ . (names the results folder)
  seed        a number (default 1): the same scenario and seed give the same fault
              timing on a simulated host
  guest       either {"synthetic": {...}}: the outage matrix's workload, in virtual
                time, on a simulated disk:
                  rounds (10), writes_per_round (8): 4 KiB writes to random blocks,
                  a FLUSH per round, every write read back; disk_size ("1M");
                  request_time ("20ms", virtual); it prints `round N` as round N starts
              or a Linux guest:
                kernel (required), initrd, cmdline, memory ("512M"), cpus (1),
                disks: [{"id": "data", "image": "data.img"}, ...]; a disk with
                  "readonly": true is readonly=on to the guest, booted as it is
                  (no copy, no write log) in every run and crash state, and never
                  the one an outage hits (images/lab/power-cut.json: the root)
  progress    (Linux guests) how the guest reports on its serial console:
                ready: a text; the line containing it says the workload runs
                ack: a prefix; each line starting with it acknowledges one unit, the
                     first word after the prefix being its key
                error: a prefix (optional); each line starting with it is an error
                     the application saw (the table's app-visible errors)
  outages     a list; each one is a separate run per host and strategy:
                kind: flush-eio (the host's write-back fails, fdatasync reports it)
                      | write-eio | write-enospc (pwrite fails) | flush-enospc;
                      on the real host flush-eio and write-eio are both the host
                      device failing every I/O (a dm table swapped for `error`);
                      write-enospc fills the host file system (a file takes its
                      free blocks), so a write into a hole of the image fails; the
                      outage ends by deleting that file (flush-enospc: simulated
                      hosts only); synthetic guest also: writeback-eio |
                      repeat-in-replay.
                      | fs-down (real host only: the device fails until the kernel
                      says the host file system went down, at most `lasts`; then
                      the device works again but the file system stays down; with
                      operator.detach the operator detaches the disks, unmounts,
                      e2fscks, mounts and attaches them before `cont`; a run whose
                      file system never went down fails).
                      | hang (Linux guests: the storage under the host's page cache
                      stops answering for `lasts`: write-back, fdatasync and reads
                      of uncached pages wait; on the real host a dm device suspended
                      with --noflush; without hang_timeout the guest waits with
                      it)
                      | power-cut (Linux guests; holdfast's strategies: the machine
                      stops dead at `when`, no flush, no shutdown; every disk kept a
                      write log (write-log=FILE, dm-log-writes format) of what the
                      guest was told is done. Each crash state rebuilds the disks
                      from their images and logs as a power cut could leave them:
                      everything a completed FLUSH covered is there; of the writes
                      after the last one, `modes` choose. The check then boots on
                      them (its file system and application recover) and counts the
                      acknowledged units it finds. The states come from the log,
                      not the host: the same on simulated and real hosts, and the
                      same log, mode and seed give the same state. No `lasts`.)
                modes: (power-cut) crash states to try, in turn (default all):
                      none (none of the writes after the last flush), all, prefix
                      (those before a point the seed picks), subset (each or not,
                      by the seed), torn (subset, and a write of several sectors
                      may land sector by sector)
                from_run: (power-cut) an earlier power-cut run's folder
                      (results/runs/...): its write logs (DISK.wlog) and acked.txt
                      give the crash states without booting the first run again;
                      the guest's images must be those that run started from
                control: (power-cut) true: the application is set up unsafely
                      (SQLite synchronous=OFF, fsync=off...); some crash state must
                      lose, else the lab fails: an unsafe setting that never loses
                      means the power cut is not testing
                when: {"at": "5s"} after the ready marker, or
                      {"line": "TEXT", "nth": 3}: the 3rd console line after the ready
                      marker that contains TEXT (synthetic guest: "round N"), or
                      {"line": "TEXT", "nth_between": [10, 90]}: one of those, picked
                      by the seed (the same for every host and strategy);
                      with "after": "300ms" (Linux guests), that long after the
                      line (images/lab/power-cut.json: the power goes in the
                      middle of the application's work, not at its
                      acknowledgement, right after its flush).
                      Line triggers meet the guest at the same point on every rerun;
                      `at` depends on how fast the guest runs
                lasts: how long the storage stays broken (Linux guests; the synthetic
                       guest's outage ends once the operator's first cont is refused)
                disk: which guest disk (default: the first the guest writes)
  operator    cont_after (2s; synthetic 1s): when the VM has paused, the operator
              waits this long before each `cont`; tries (3): `cont`s after the outage
              ended before giving up; detach (false): detach the image during the
              outage and attach it again before `cont` (host file system down)
  verify      (Linux guests) what survived, after the run:
                {"boot": {"cmdline": ..., "ok": TEXT, "have": PREFIX}}: boot the guest
                  again on the same disk with this command line (holdfast's own disk,
                  no simulated cache: what reached the image, as after a host reboot;
                  werror=report,rerror=report: a host I/O error reaches the check);
                  it prints TEXT if its check passed and PREFIX KEY for every unit it
                  finds; "corrupt": PREFIX (optional) for every unit found damaged
                {"host": {"command": [PROGRAM, ARGS...], "have": PREFIX}}: run on the
                  host with the disk images' paths appended; exit 0 means the check
                  passed; PREFIX KEY for every unit it finds; "corrupt" as above
              An acknowledged unit the check does not find is lost.
              (the synthetic guest is checked by its oracle, with no verify)
  hosts       a list of simulated:MODEL ({MODELS}:
              the engine's simulated page cache with that file system's behaviour after
              a failed write-back, between the disk and the image; while the VM is
              paused the operator's host evicts its clean pages) and real: needs
              root; per run the lab makes a sparse file in the run's folder, a loop
              device over it, a dm device over that and ext4 on it with its default
              options, mounted in the run's folder, and says so; the images are
              copied there (a read-only disk's stays where it is); an outage
              swaps the dm table for `error`; after the run the file system is
              unmounted (its page cache goes), repaired with e2fsck if it went
              down, and mounted again for the check; at the end everything it
              made is removed
  strategies  a list of holdfast | retry-flush (QEMU's werror=stop: re-issue only the
              parked requests) | sticky (QEMU's default file backend: every flush fails
              after the first failure) | qemu | qemu-cache-none (QEMU 10 itself, real
              host only) | x-lying-flush (deliberately broken: FLUSH completes without
              reaching the host; it claims holdfast's promise, for testing the lab).
              qemu and qemu-cache-none run on the `real` host only (QEMU 10:
              -M microvm,acpi=on, virtio-blk-device, werror=stop,rerror=stop)
  timeout     longest one run may take (default 10m)
  hang_timeout  holdfast's hang-timeout on every disk, whole seconds (like "3s"):
              a host call outstanding longer pauses the guest (io-error) until it
              returns (holdfast run --help); default none

Each Linux-guest run has a folder, runs/HOST_STRATEGY_N-OUTAGE/, with the consoles
and holdfast's logs of both boots; the disk images are kept there only when the run
lost or damaged something, or its check failed. A power cut's folder has the write
logs (DISK.wlog: `replay-log --log DISK.wlog --replay DEV --limit N` from the
dm-log-writes userspace rebuilds the disk after its first N entries, on a copy of
the image it started from), acked.txt, and a state-NN folder per crash state (its
check's console; its images only if it lost something). results.md then has one row
per crash state (outage `power-cut MODE seed S`; resumed: the check passed) and a
"Power cuts" table: states tried, recovered, states that lost acknowledged units.
Rerun one state alone: --seed S --runs 1 with `modes` [MODE] and `from_run`.

Example (the outage matrix's cells for two hosts):
  {"name": "matrix", "seed": 24301, "guest": {"synthetic": {}},
   "outages": [{"kind": "flush-eio", "when": {"line": "round 5"}}],
   "hosts": ["simulated:xfs", "simulated:freebsd"],
   "strategies": ["holdfast", "retry-flush", "sticky"]}
"#;

/// `holdfast lab`'s command line.
#[derive(Debug, clap::Args)]
#[command(after_long_help = lab_after_help())]
pub struct LabArgs {
    /// The scenario file (JSON; the format below)
    #[arg(value_name = "SCENARIO.json")]
    pub scenario: PathBuf,
    /// The results folder (default: holdfast-lab/NAME-YYYYMMDD-HHMMSS in the current
    /// directory); it must not exist yet
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Check the scenario file and list the runs; run nothing
    #[arg(long)]
    pub check: bool,
    /// Run only this host of the scenario's (repeatable; the others are not checked
    /// either: a user without root can run the simulated ones)
    #[arg(long = "host", value_name = "H")]
    pub hosts: Vec<String>,
    /// Run only this strategy of the scenario's (repeatable)
    #[arg(long = "strategy", value_name = "S")]
    pub strategies: Vec<String>,
    /// Crash states per power cut (default 10): the i-th (from 0) has seed SEED + i
    /// and the i-th of the outage's modes, round
    #[arg(long, value_name = "N")]
    pub runs: Option<usize>,
    /// The seed (default: the scenario's): fault timing on a simulated host, the
    /// line a `nth_between` picks, a power cut's crash states
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
}

/// `holdfast lab --help`'s text after the options: the results, the exit status and
/// the scenario file's format.
pub fn lab_after_help() -> String {
    let models = holdfast_block::sim::HostModel::names();
    format!("{HELP}{}", FORMAT_HELP.replace("{MODELS}", &models))
}

/// `holdfast lab ARGS`.
pub fn main(args: LabArgs) -> ExitCode {
    let mut plan = match scenario::load_only(&args.scenario, &args.hosts, &args.strategies) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("holdfast lab: {}: {e}", args.scenario.display());
            return ExitCode::from(2);
        }
    };
    if let Some(seed) = args.seed {
        plan.seed = seed;
    }
    match args.runs {
        Some(0) => {
            eprintln!("holdfast lab: --runs: 0 crash states explore nothing; give 1 or more");
            return ExitCode::from(2);
        }
        Some(n) if plan.outages.iter().all(|o| o.kind != OutageKind::PowerCut) => {
            eprintln!(
                "holdfast lab: --runs {n}: the scenario has no power-cut outage (only a power cut has crash states)"
            );
            return ExitCode::from(2);
        }
        Some(n) => plan.crash_states = n,
        None => {}
    }
    let runs = combinations(&plan).len() * plan.outages.len();
    if args.check {
        println!(
            "{}: ok, {runs} runs ({} hosts x {} strategies x {} outages, QEMU on the real host only)",
            args.scenario.display(),
            plan.hosts.len(),
            plan.strategies.len(),
            plan.outages.len()
        );
        for (i, o) in plan.outages.iter().enumerate() {
            let when = match &o.when {
                scenario::When::At(d) => format!("{} s after the ready marker", d.as_secs_f64()),
                scenario::When::Line { text, nth, after } => format!(
                    "{} the {nth}. line with `{text}` after the ready marker",
                    if after.is_zero() {
                        "at".to_string()
                    } else {
                        format!("{} s after", after.as_secs_f64())
                    }
                ),
            };
            println!("  outage {}: {} {when}", i + 1, o.kind.as_str());
            if let Some(c) = &o.cut {
                println!(
                    "    {} crash states (seeds {} to {}), modes {}{}{}",
                    plan.crash_states,
                    plan.seed,
                    plan.seed.wrapping_add(plan.crash_states as u64 - 1),
                    c.modes
                        .iter()
                        .map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    c.from_run
                        .as_ref()
                        .map(|d| format!(", from the logs of {}", d.display()))
                        .unwrap_or_default(),
                    if c.control {
                        ", a control (must lose)"
                    } else {
                        ""
                    }
                );
            }
        }
        return ExitCode::SUCCESS;
    }
    let out = args.out.unwrap_or_else(|| default_out(&plan.name));
    if out.exists() {
        eprintln!(
            "holdfast lab: {} exists already; name a new folder with --out",
            out.display()
        );
        return ExitCode::from(2);
    }
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("holdfast lab: cannot create {}: {e}", out.display());
        return ExitCode::from(2);
    }
    println!("holdfast lab: results in {}", out.display());
    // A run that could not run (the machine's fault: a full disk, a VMM that did
    // not start) ends the lab; what ran before it is written all the same.
    let (records, failure) = run_all(&plan, &out);
    if let Err(e) = write_results(&out, &plan, &records) {
        eprintln!("holdfast lab: writing {}: {e}", out.display());
        return ExitCode::from(2);
    }
    if let Some(e) = failure {
        eprintln!(
            "holdfast lab: {e} (stopped after {} of the runs; their results are in {})",
            records.len(),
            out.display()
        );
        return ExitCode::from(2);
    }
    print!("\n{}", report::markdown(&plan, &records));
    let broken: Vec<&RunRecord> = records.iter().filter(|r| r.broke_promise()).collect();
    let idle_controls = report::control_never_lost(&records);
    for c in &idle_controls {
        eprintln!(
            "holdfast lab: the control {c} lost nothing in any of its {} crash states: an \
             unsafe setting that never loses means the power cut is not testing",
            plan.crash_states
        );
    }
    if broken.is_empty() && idle_controls.is_empty() {
        println!(
            "\nEvery run of a strategy that promises to lose nothing kept every acknowledged unit."
        );
        ExitCode::SUCCESS
    } else {
        for r in &broken {
            eprintln!(
                "holdfast lab: {} on {} ({}) promised to lose nothing: {} lost, {} corrupt, {}",
                r.strategy,
                r.host,
                r.outage_label(),
                r.lost,
                r.corrupt,
                r.verdict
            );
        }
        ExitCode::FAILURE
    }
}

/// `holdfast-lab/NAME-YYYYMMDD-HHMMSS` (UTC).
fn default_out(name: &str) -> PathBuf {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, secs) = ((now / 86_400) as i64, now % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    PathBuf::from("holdfast-lab").join(format!(
        "{name}-{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    ))
}

/// The host x strategy pairs that run: QEMU itself only on the real host.
fn combinations(plan: &Plan) -> Vec<(scenario::Host, scenario::LabStrategy)> {
    let mut pairs = Vec::new();
    for &host in &plan.hosts {
        for &strategy in &plan.strategies {
            let qemu = matches!(strategy, scenario::LabStrategy::Qemu { .. });
            if !qemu || host == scenario::Host::Real {
                pairs.push((host, strategy));
            }
        }
    }
    pairs
}

/// Every host x strategy x outage, with a progress line per run; stops at the first
/// run that cannot run, returning what ran and why it stopped.
pub fn run_all(plan: &Plan, out: &Path) -> (Vec<RunRecord>, Option<Error>) {
    let mut records = Vec::new();
    let failure = run_into(plan, out, &mut records).err();
    (records, failure)
}

fn run_into(plan: &Plan, out: &Path, records: &mut Vec<RunRecord>) -> Result<(), Error> {
    let total = combinations(plan).len() * plan.outages.len();
    for (host, strategy) in combinations(plan) {
        for index in 0..plan.outages.len() {
            let outage = plan.outages[index].kind;
            let kind = outage.as_str();
            let n = records.len() + 1;
            // A Linux guest's run says what happens while it lasts (a line each); a
            // synthetic one takes no time.
            match &plan.guest {
                Guest::Synthetic(_) => eprint!("lab: [{n}/{total}] {host} {strategy} {kind} ... "),
                Guest::Linux(_) => eprintln!("lab: [{n}/{total}] {host} {strategy} {kind}"),
            }
            if let (Guest::Linux(g), OutageKind::PowerCut) = (&plan.guest, outage) {
                let states = powercut::run(plan, g, host, strategy, index, out)?;
                let lost = states.iter().filter(|r| r.lost_something()).count();
                eprintln!(
                    "lab: [{n}/{total}] {} crash states: {} recovered, {lost} lost or damaged something",
                    states.len(),
                    states.iter().filter(|r| r.verified).count()
                );
                records.extend(states);
                continue;
            }
            let record = match &plan.guest {
                Guest::Synthetic(g) => synthetic::run(plan, g, host, strategy, index).ok_or(
                    Unsupported::Synthetic {
                        host,
                        strategy,
                        outage,
                    },
                )?,
                Guest::Linux(g) => {
                    let r = guest::run(plan, g, host, strategy, index, out)?;
                    eprint!("lab: [{n}/{total}] ");
                    r
                }
            };
            eprintln!(
                "{}, {} acked, {} lost, {} corrupt, {}",
                if record.resumed {
                    "resumed"
                } else {
                    "never resumed"
                },
                record.acked,
                record.lost,
                record.corrupt,
                record.verdict
            );
            records.push(record);
        }
    }
    Ok(())
}

fn write_results(out: &Path, plan: &Plan, records: &[RunRecord]) -> std::io::Result<()> {
    std::fs::write(out.join("results.md"), report::markdown(plan, records))?;
    let json = serde_json::to_string_pretty(&report::json(plan, records))
        .map_err(std::io::Error::other)?;
    std::fs::write(out.join("results.json"), json + "\n")?;
    for r in records {
        let title = format!(
            "{}: {} on {}, {} (outage {})",
            plan.name,
            r.strategy,
            r.host,
            r.outage.as_str(),
            r.outage_index + 1
        );
        let picture = match &r.crash {
            None => svg::timeline(&title, &r.timeline),
            Some(c) => svg::crash_state(&title, &r.timeline, c),
        };
        std::fs::write(out.join(&r.svg), picture)?;
    }
    Ok(())
}
