//! What a lab run found ([`RunRecord`]) and the results folder's files: the Markdown
//! table, the JSON record of every run, and one SVG timeline per run.

use std::fmt::Write;

use holdfast_block::sim::timeline::Timeline;
use serde_json::{json, Value};

use super::scenario::{Host, LabStrategy, OutageKind, Plan};

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
}

impl RunRecord {
    /// Whether this run broke a promise: a strategy that claims holdfast's guarantee
    /// lost, corrupted or failed verification.
    pub fn broke_promise(&self) -> bool {
        self.strategy.promises_no_loss() && (self.lost > 0 || self.corrupt > 0 || !self.verified)
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
            r.outage.as_str(),
            if r.resumed { "yes" } else { "no" },
            r.app_errors,
            r.acked,
            r.lost,
            r.corrupt,
            r.verdict
        );
    }
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
        })).collect::<Vec<_>>(),
    })
}
