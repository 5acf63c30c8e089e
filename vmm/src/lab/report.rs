//! What a lab run found ([`RunRecord`]) and the results folder's files: the Markdown
//! table, the JSON record of every run, and one SVG timeline per run.

use std::fmt::Write;

use holdfast_block::sim::timeline::Timeline;
use serde_json::{json, Value};

use super::scenario::{CutMode, Host, LabStrategy, OutageKind, Plan};

/// One run: a host, a strategy, an outage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub host: Host,
    pub strategy: LabStrategy,
    pub outage: OutageKind,
    /// The outage's place in the scenario's list (two outages may share a kind).
    pub outage_index: usize,
    /// The guest ran again after the outage and its workload finished.
    pub resumed: bool,
    /// Errors the guest's software saw (failed requests, failed commits).
    pub app_errors: usize,
    pub acked: usize,
    /// Acknowledged units missing afterwards.
    pub lost: usize,
    /// Units present with the wrong content, or reads that returned stale bytes.
    pub corrupt: usize,
    /// The verification's verdict in a few words, and whether it passed.
    pub verdict: String,
    pub verified: bool,
    /// The SVG timeline's file name in the results folder.
    pub svg: String,
    pub timeline: Timeline,
    /// A power cut's crash state (one record per state).
    pub crash: Option<CrashInfo>,
}

/// One crash state of a power cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashInfo {
    /// Its number in the run (from 1), its mode and its seed.
    pub state: usize,
    pub mode: CutMode,
    pub seed: u64,
    /// What landed, per disk (`CrashState::describe`).
    pub landed: String,
    /// The application is configured unsafely: its losses are expected.
    pub control: bool,
    /// The write log's entries (and, of those after its last flush, which landed),
    /// for the picture.
    pub picture: Vec<LogMark>,
}

/// One entry of the write log in a crash state's picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMark {
    /// A write (or discard) before the last flush: on the disk.
    Stable,
    Flush,
    /// After the last flush: landed whole, in part, or not.
    Landed,
    Torn,
    Lost,
}

impl RunRecord {
    /// A run before it ran: nothing seen, nothing verified.
    pub fn new(host: Host, strategy: LabStrategy, outage: OutageKind, index: usize) -> Self {
        RunRecord {
            host,
            strategy,
            outage,
            outage_index: index,
            resumed: false,
            app_errors: 0,
            acked: 0,
            lost: 0,
            corrupt: 0,
            verdict: String::new(),
            verified: false,
            svg: String::new(),
            timeline: Timeline::default(),
            crash: None,
        }
    }

    /// Whether this run broke a promise: a strategy that claims holdfast's guarantee
    /// lost, corrupted or failed verification.
    pub fn broke_promise(&self) -> bool {
        // A power cut's control loses by design; its run fails only if no state
        // lost ([`control_never_lost`]).
        if self.crash.as_ref().is_some_and(|c| c.control) {
            return false;
        }
        self.strategy.promises_no_loss() && (self.lost > 0 || self.corrupt > 0 || !self.verified)
    }

    /// Whether this state lost or damaged something, or its check failed.
    pub fn lost_something(&self) -> bool {
        self.lost > 0 || self.corrupt > 0 || !self.verified
    }

    /// Whether acknowledged units are missing or damaged (a check that fails for
    /// another reason is not a control's loss).
    pub fn lost_units(&self) -> bool {
        self.lost > 0 || self.corrupt > 0
    }

    /// `simulated-xfs_holdfast_1-flush-eio`: the run's name in file names.
    pub fn slug(&self) -> String {
        format!(
            "{}_{}_{}-{}",
            self.host.to_string().replace(':', "-"),
            self.strategy,
            self.outage_index + 1,
            self.outage.as_str()
        )
    }

    /// The outage as the table names it: a power cut with its state's mode and seed.
    pub fn outage_label(&self) -> String {
        match &self.crash {
            None => self.outage.as_str().to_string(),
            Some(c) => format!(
                "power-cut {} seed {}{}",
                c.mode,
                c.seed,
                if c.control { " (control)" } else { "" }
            ),
        }
    }
}

/// The power cuts' controls (host, strategy, outage) of which no crash state lost
/// anything: the cut was not testing.
pub fn control_never_lost(runs: &[RunRecord]) -> Vec<String> {
    let mut groups: Vec<(String, bool)> = Vec::new();
    for r in runs
        .iter()
        .filter(|r| r.crash.as_ref().is_some_and(|c| c.control))
    {
        let key = format!(
            "{} on {} (outage {})",
            r.strategy,
            r.host,
            r.outage_index + 1
        );
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, lost)) => *lost |= r.lost_units(),
            None => groups.push((key, r.lost_units())),
        }
    }
    groups
        .into_iter()
        .filter(|(_, lost)| !lost)
        .map(|(k, _)| k)
        .collect()
}

/// The power cuts in a few lines a (host, strategy, outage): crash states tried,
/// recovered (the check passed), states that lost acknowledged units, the most lost.
fn power_cut_summary(runs: &[RunRecord]) -> String {
    let mut out = String::new();
    let mut keys: Vec<(String, String, usize, bool)> = Vec::new();
    for r in runs.iter().filter(|r| r.crash.is_some()) {
        let k = (
            r.host.to_string(),
            r.strategy.to_string(),
            r.outage_index,
            r.crash.as_ref().is_some_and(|c| c.control),
        );
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    if keys.is_empty() {
        return out;
    }
    out.push_str("\n## Power cuts\n\n| host | strategy | outage | crash states | recovered | states that lost acknowledged units | most units lost | damaged | verdict |\n|---|---|---|---:|---:|---:|---:|---:|---|\n");
    for (host, strategy, index, control) in keys {
        let states: Vec<&RunRecord> = runs
            .iter()
            .filter(|r| {
                r.crash.is_some()
                    && r.host.to_string() == host
                    && r.strategy.to_string() == strategy
                    && r.outage_index == index
            })
            .collect();
        let recovered = states.iter().filter(|r| r.verified).count();
        let losing = states.iter().filter(|r| r.lost > 0).count();
        let most = states.iter().map(|r| r.lost).max().unwrap_or(0);
        let damaged = states.iter().filter(|r| r.corrupt > 0).count();
        let any = if control {
            states.iter().any(|r| r.lost_units())
        } else {
            states.iter().any(|r| r.lost_something())
        };
        let verdict = match (control, any) {
            (false, false) => "kept every acknowledged unit",
            (false, true) => "LOST acknowledged units",
            (true, true) => "control: lost, as an unsafe setting should",
            (true, false) => "CONTROL NEVER LOST: the power cut is not testing",
        };
        let _ = writeln!(
            out,
            "| {host} | {strategy} | {}. power-cut{} | {} | {recovered} | {losing} | {most} | {damaged} | {verdict} |",
            index + 1,
            if control { " (control)" } else { "" },
            states.len()
        );
    }
    out
}

pub fn markdown(plan: &Plan, runs: &[RunRecord]) -> String {
    let mut out = format!(
        "# holdfast lab: {}\n\n| host | strategy | outage | resumed | app-visible errors | acked | lost | corrupt | verification |\n|---|---|---|---|---:|---:|---:|---:|---|\n",
        plan.name
    );
    for r in runs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.host,
            r.strategy,
            r.outage_label(),
            if r.resumed { "yes" } else { "no" },
            r.app_errors,
            r.acked,
            r.lost,
            r.corrupt,
            r.verdict
        );
    }
    out.push_str(&power_cut_summary(runs));
    out
}

fn timeline_json(t: &Timeline) -> Value {
    json!({
        "end_ms": t.end,
        "acks_ms": t.acks,
        "acks_per_second": t.acks_per_second(),
        "host": t.host.iter().map(|(at, s)| json!({"at_ms": at, "state": s.as_str()})).collect::<Vec<_>>(),
        "vm": t.vm.iter().map(|(at, s)| json!({"at_ms": at, "state": s.as_str()})).collect::<Vec<_>>(),
        "events": t.events.iter().map(|(at, e)| json!({"at_ms": at, "event": e})).collect::<Vec<_>>(),
    })
}

pub fn json(plan: &Plan, runs: &[RunRecord]) -> Value {
    json!({
        "scenario": plan.name,
        "seed": plan.seed,
        "runs": runs.iter().map(|r| json!({
            "host": r.host.to_string(),
            "strategy": r.strategy.to_string(),
            "outage": r.outage.as_str(),
            "outage_index": r.outage_index,
            "resumed": r.resumed,
            "app_visible_errors": r.app_errors,
            "acked": r.acked,
            "lost": r.lost,
            "corrupt": r.corrupt,
            "verification": r.verdict,
            "verified": r.verified,
            "promises_no_loss": r.strategy.promises_no_loss(),
            "broke_promise": r.broke_promise(),
            "timeline_svg": r.svg,
            "timeline": timeline_json(&r.timeline),
            "power_cut": r.crash.as_ref().map(|c| json!({
                "state": c.state,
                "mode": c.mode.as_str(),
                "seed": c.seed,
                "landed": c.landed,
                "control": c.control,
            })),
        })).collect::<Vec<_>>(),
    })
}
