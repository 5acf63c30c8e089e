//! A QMP client's byte stream, cut anywhere, through the server's splitter and
//! its per-message dispatch, into holdfast's own command parser
//! (`owner::Command::parse`). Nothing may panic; every message gets one reply, a
//! `return` or an `error`; every byte is looked at once.
#![no_main]

use std::sync::Arc;

use holdfast_qmp::server::respond;
use holdfast_qmp::stream::{Input, Splitter};
use holdfast_qmp::{Args, Machine, QmpError};
use holdfast_vmm::owner::Command;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

/// holdfast's own command parser (the one the QMP bridge runs in front of the
/// run-state owner), answering `{}` for any command it accepts.
struct Owner;

impl Machine for Owner {
    fn commands(&self) -> Vec<&'static str> {
        Command::names()
    }

    fn execute(&self, command: &str, args: &Args) -> Result<Value, QmpError> {
        Command::parse(command, args)?;
        Ok(json!({}))
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut) % (stream.len() + 1);
    let mut splitter = Splitter::new();
    let mut inputs = splitter.push(&stream[..cut]);
    inputs.extend(splitter.push(&stream[cut..]));
    assert_eq!(splitter.scanned(), stream.len() as u64);
    let machine: Arc<dyn Machine> = Arc::new(Owner);
    let mut negotiated = false;
    RUNTIME.with(|rt| {
        for input in inputs {
            let Input::Value(v) = input else { continue };
            let reply = rt
                .block_on(respond(v, &mut negotiated, &machine))
                .expect("every message gets a reply");
            assert!(
                reply.get("return").is_some() != reply.get("error").is_some(),
                "{reply}"
            );
        }
    });
});
