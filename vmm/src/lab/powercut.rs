//! Power cuts of a Linux guest: the guest runs under holdfast with every disk keeping
//! a write log (`write-log=FILE`, the dm-log-writes format); at the outage's time or
//! line the lab kills holdfast outright (no flush, no shutdown). Then, for each crash
//! state (`--runs N`, the i-th with seed S + i and the i-th mode of the outage's
//! list), it rebuilds every disk from the scenario's image and its log as a power
//! cut could leave it (`holdfast_block::sim::powercut`), boots the guest's check on
//! it (its file system and application recover as after a real power cut), and
//! compares what the check finds with what the guest acknowledged before the cut.
//!
//! The crash states come from what the guest was told, not from the host: they are
//! the same on a simulated or a real host (the host's page cache, and whatever the
//! host kept, plays no part), and the same log, mode and seed give the same state.
//! An earlier run's folder (`from_run`) gives its logs and acknowledged units again,
//! without the first boot.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use holdfast_block::sim::powercut::{CrashState, Landed};
use holdfast_block::sim::timeline::Timeline;
use holdfast_block::writelog::{read_log, LogEntry};

use super::error::{Error, Unsupported};
use super::guest::{
    self, copy_image, remove_copies, run_disks, write_log_path, Breaker, Vmm, Workload,
};
use super::realhost::RealHost;
use super::report::{CrashInfo, LogMark, RunRecord};
use super::scenario::{Host, LabStrategy, LinuxGuest, OutageKind, Plan};

/// The acknowledged units of the run before its power cut, one key a line.
const ACKED: &str = "acked.txt";

/// Runs one host x strategy x power cut: the first run (or an earlier one's logs),
/// then `plan.crash_states` states, one record each.
pub fn run(
    plan: &Plan,
    guest: &LinuxGuest,
    host: Host,
    strategy: LabStrategy,
    index: usize,
    out: &Path,
) -> Result<Vec<RunRecord>, Error> {
    let outage = &plan.outages[index];
    let cut = outage
        .cut
        .as_ref()
        .expect("a power-cut outage has its plan (scenario::check_cut)");
    let LabStrategy::Engine(engine) = strategy else {
        return Err(Unsupported::QemuOnSimulatedHost(strategy).into());
    };
    let template = RunRecord::new(host, strategy, OutageKind::PowerCut, index);
    let dir = out.join("runs").join(template.slug());
    std::fs::create_dir_all(&dir).map_err(Error::file(&dir))?;
    let (logs_dir, acked, timeline) = match &cut.from_run {
        Some(from) => {
            eprintln!("lab:   crash states from {}", from.display());
            (from.clone(), read_acked(from)?, Timeline::default())
        }
        None => {
            let (acked, timeline) = first_run(plan, guest, host, engine, index, &dir)?;
            (dir.clone(), acked, timeline)
        }
    };
    let mut logs = Vec::new();
    for (id, _) in &guest.disks {
        if guest.is_read_only(id) {
            // Read-only: nothing to log, the same image in every state.
            logs.push(Vec::new());
            continue;
        }
        let path = write_log_path(&logs_dir, id);
        let bytes = std::fs::read(&path).map_err(Error::file(&path))?;
        let entries = read_log(&bytes).map_err(|e| Error::File {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        let flushes = entries.iter().filter(|e| **e == LogEntry::Flush).count();
        eprintln!(
            "lab:   disk {id}: {} log entries, {flushes} flushes",
            entries.len()
        );
        logs.push(entries);
    }
    let acked_set: BTreeSet<&String> = acked.iter().collect();
    let mut records = Vec::new();
    for i in 0..plan.crash_states {
        let mode = cut.modes[i % cut.modes.len()];
        let seed = plan.seed.wrapping_add(i as u64);
        let state_dir = dir.join(format!("state-{:02}", i + 1));
        std::fs::create_dir_all(&state_dir).map_err(Error::file(&state_dir))?;
        let mut disks = Vec::new();
        let mut landed = Vec::new();
        let mut picture = Vec::new();
        let mut first = true;
        for ((id, base), entries) in guest.disks.iter().zip(&logs) {
            if guest.is_read_only(id) {
                disks.push((id.clone(), base.clone()));
                continue;
            }
            // Each disk its own state, from the same seed.
            let state = CrashState::choose(entries, mode, seed);
            let image = state_dir.join(format!("{id}.img"));
            copy_image(base, &image)?;
            let file = std::fs::File::options()
                .write(true)
                .open(&image)
                .map_err(Error::file(&image))?;
            state
                .apply(entries, &file)
                .and_then(|()| file.sync_all())
                .map_err(Error::file(&image))?;
            landed.push(format!("{id}: {}", state.describe()));
            if first {
                picture = marks(entries, &state);
                first = false;
            }
            disks.push((id.clone(), image));
        }
        let landed = landed.join("; ");
        eprintln!("lab:   state {}: {landed}", i + 1);
        let found = guest::verify(plan, guest, &disks, &state_dir)?;
        let lost: Vec<&String> = acked_set
            .iter()
            .filter(|k| !found.have.contains(**k))
            .copied()
            .collect();
        let mut record = template.clone();
        record.acked = acked_set.len();
        record.lost = lost.len();
        record.corrupt = found.corrupt;
        record.resumed = found.passed;
        record.verified = found.passed;
        record.verdict = format!("state {}: {}", i + 1, found.verdict);
        if !lost.is_empty() {
            let some: Vec<&str> = lost.iter().take(8).map(|k| k.as_str()).collect();
            let more = if lost.len() > 8 { " ..." } else { "" };
            record.verdict = format!("{}; lost {}{more}", record.verdict, some.join(" "));
        }
        record.timeline = timeline.clone();
        record.crash = Some(CrashInfo {
            state: i + 1,
            mode,
            seed,
            landed,
            control: cut.control,
            picture,
        });
        record.svg = format!("{}-state-{:02}.svg", template.slug(), i + 1);
        eprintln!(
            "lab:   state {}: {} of {} acknowledged lost, {} damaged, {}",
            i + 1,
            record.lost,
            record.acked,
            record.corrupt,
            found.verdict
        );
        // The images are the largest part; keep a state's only where it lost.
        if !record.lost_something() {
            remove_copies(guest, &disks);
        }
        records.push(record);
    }
    Ok(records)
}

/// Boots the guest with write logs, cuts the power at the outage's time or line,
/// and keeps what the guest acknowledged before (`acked.txt`).
fn first_run(
    plan: &Plan,
    guest: &LinuxGuest,
    host: Host,
    engine: holdfast_block::sim::strategy::Strategy,
    index: usize,
    dir: &Path,
) -> Result<(Vec<String>, Timeline), Error> {
    let outage = &plan.outages[index];
    let progress = plan.progress.as_ref().ok_or(Unsupported::NoProgress)?;
    let real = match host {
        Host::Real => Some(RealHost::set_up(
            dir,
            guest
                .disks
                .iter()
                .filter(|(id, _)| !guest.is_read_only(id))
                .map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
                .sum::<u64>()
                + (256 << 20),
            &index.to_string(),
        )?),
        Host::Simulated(_) => None,
    };
    let images_dir: PathBuf = real
        .as_ref()
        .map(|r| r.mount_point().to_path_buf())
        .unwrap_or(dir.to_path_buf());
    let disks = run_disks(guest, &images_dir)?;
    let options = match host {
        Host::Simulated(model) => format!(",x-host=simulated:{model},x-strategy={engine}"),
        Host::Real => format!(",x-strategy={engine}"),
    };
    let vmm = Vmm::Holdfast(options);
    let breaker = match &real {
        Some(r) => Breaker::Real(r),
        None => Breaker::Simulated {
            target: guest.first_writable().to_string(),
        },
    };
    let mut timeline = Timeline::default();
    let seen = Workload::boot(
        plan,
        guest,
        progress,
        outage,
        &disks,
        &vmm,
        &breaker,
        dir,
        &mut timeline,
    )
    .and_then(Workload::run)?;
    // A log that stopped (its file system full) would give crash states that miss
    // what the guest was told: holdfast says so on its stderr.
    let said = std::fs::read_to_string(dir.join("holdfast.log")).unwrap_or_default();
    if let Some(line) = said
        .lines()
        .find(|l| l.contains("write log: cannot append"))
    {
        return Err(Error::WriteLogStopped(line.trim().to_string()));
    }
    // The images the guest wrote are not the crash states: those come from the logs.
    remove_copies(guest, &disks);
    drop(real);
    if !seen.outage_started {
        let why = if seen.timed_out {
            "the run timed out"
        } else {
            "the guest ended"
        };
        return Err(Error::NoPowerCut(format!(
            "{why} before the outage's time or line"
        )));
    }
    let path = dir.join(ACKED);
    let mut text = seen.acked.join("\n");
    text.push('\n');
    std::fs::write(&path, text).map_err(Error::file(&path))?;
    eprintln!(
        "lab:   {} units acknowledged before the power cut",
        seen.acked.len()
    );
    Ok((seen.acked, timeline))
}

fn read_acked(dir: &Path) -> Result<Vec<String>, Error> {
    let path = dir.join(ACKED);
    let text = std::fs::read_to_string(&path).map_err(Error::file(&path))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// The log's entries as the picture shows them.
fn marks(entries: &[LogEntry], state: &CrashState) -> Vec<LogMark> {
    let mut out = Vec::new();
    let mut tail = state.tail.iter();
    for (i, e) in entries.iter().enumerate() {
        match e {
            LogEntry::Flush => out.push(LogMark::Flush),
            LogEntry::Mark(_) => {}
            _ if i < state.stable => out.push(LogMark::Stable),
            _ => out.push(match tail.next() {
                Some(Landed::Whole) => LogMark::Landed,
                Some(Landed::Sectors(_)) => LogMark::Torn,
                _ => LogMark::Lost,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_block::sim::powercut::CutMode;

    #[test]
    fn the_picture_marks_what_landed() {
        let w = |o| LogEntry::Write {
            offset: o,
            data: vec![1; 1024],
        };
        let log = vec![w(0), LogEntry::Flush, w(512), w(1024), w(2048)];
        let state = CrashState::choose(&log, CutMode::All, 1);
        assert_eq!(
            marks(&log, &state),
            vec![
                LogMark::Stable,
                LogMark::Flush,
                LogMark::Landed,
                LogMark::Landed,
                LogMark::Landed
            ]
        );
        let none = CrashState::choose(&log, CutMode::None, 1);
        assert_eq!(marks(&log, &none)[2..], [LogMark::Lost; 3]);
    }
}
