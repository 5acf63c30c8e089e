//! Runs of the synthetic guest: the outage matrix's workload (holdfast-block's
//! `sim::matrix::Synthetic`) as a lab scenario, in virtual time, so the same scenario
//! and seed give the same run on every machine.

use holdfast_block::sim::matrix::{Start, Synthetic};
use holdfast_block::sim::HostModel;

use super::report::RunRecord;
use super::scenario::{Host, LabStrategy, OutagePlan, Plan, SyntheticGuest, When};

/// The seed of one run: the scenario's, mixed with the host and the outage, so that
/// every strategy meets the same workload on a host and outage (the outage matrix's
/// rule: its seed is 0x5EED).
fn seed(plan_seed: u64, model: HostModel, outage: OutagePlan) -> u64 {
    let kind = outage.kind.synthetic().map(|o| o as u64).unwrap_or(0);
    plan_seed ^ ((model as u64) << 8) ^ kind
}

/// Runs one host x strategy x outage; `None` for combinations the synthetic guest
/// cannot run (the plan's checks rule them out first).
pub fn run(
    plan: &Plan,
    guest: &SyntheticGuest,
    host: Host,
    strategy: LabStrategy,
    index: usize,
) -> Option<RunRecord> {
    let outage = plan.outages[index].clone();
    let (Host::Simulated(model), LabStrategy::Engine(engine), Some(kind)) =
        (host, strategy, outage.kind.synthetic())
    else {
        return None;
    };
    let start = match &outage.when {
        When::At(d) => Start::AtMs(d.as_millis() as u64),
        When::Line { text, .. } => Start::Round(text["round ".len()..].trim().parse().ok()?),
    };
    let spec = Synthetic {
        strategy: engine,
        host: model,
        outage: kind,
        rounds: guest.rounds,
        writes_per_round: guest.writes_per_round,
        disk_size: guest.disk_size,
        start,
        cont_tries: plan.operator.tries,
        seed: seed(plan.seed, model, outage.clone()),
        request_ms: guest.request_ms,
        cont_after_ms: plan.operator.cont_after.as_millis() as u64,
    };
    let run = spec.run();
    let r = run.result;
    let verified = r.acked_writes_lost == 0 && r.stale_reads == 0;
    let verdict = if verified {
        "oracle: ok".to_string()
    } else {
        format!(
            "oracle: {} acked writes lost, {} stale reads",
            r.acked_writes_lost, r.stale_reads
        )
    };
    let mut record = RunRecord {
        host,
        strategy,
        outage: outage.kind,
        outage_index: index,
        resumed: r.resumed,
        app_errors: r.failed_requests,
        acked: r.acked_writes,
        lost: r.acked_writes_lost,
        corrupt: r.stale_reads,
        verdict,
        verified,
        svg: String::new(),
        timeline: run.timeline,
        crash: None,
    };
    record.svg = format!("{}.svg", record.slug());
    Some(record)
}
