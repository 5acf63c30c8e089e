//! Fault plans (files, --disk faults=) and rules (QMP's x-block-fault): parsed, and when valid,
//! armed and matched against host calls anywhere in the address space. Nothing may
//! panic (an overflowing range once killed the device thread).
#![no_main]

use holdfast_block::{Backend, FaultInjector, FaultPlan, FaultRule, MemBackend};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut rules: Vec<FaultRule> = Vec::new();
    if let Ok(plan) = FaultPlan::from_json(text) {
        rules.extend(plan.rules);
    }
    if let Ok(value) = serde_json::from_str(text) {
        if let Ok(rule) = FaultRule::from_json_value(value) {
            rules.push(rule);
        }
    }
    let mut injector = FaultInjector::new(MemBackend::new(1 << 16));
    let handle = injector.handle();
    // A hang rule makes a matching call wait until another thread clears it (by
    // design); here nobody would: it is parsed above and not armed. Delays are armed
    // at a millisecond at most, so that a plan cannot stall the fuzzer.
    for mut rule in rules.into_iter().filter(|r| !r.hang) {
        rule.delay_ms = rule.delay_ms.map(|d| d.min(1));
        handle.arm(rule);
    }
    let mut buf = [0u8; 512];
    for offset in [0, 4096, u64::MAX - 511, u64::MAX / 2] {
        let _ = injector.read_at(&mut buf, offset);
        let _ = injector.write_at(&buf, offset);
        let _ = injector.write_zeroes(offset, 512, true);
        let _ = injector.discard(offset, 512);
        let _ = injector.flush();
    }
    handle.clear_all();
});
