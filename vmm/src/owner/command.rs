//! QMP commands, parsed at the edge: a client's command name and arguments become a
//! [`Command`] in the QMP server's thread, so the owner only ever sees well-formed
//! commands. [`TABLE`] is the one list of commands: `query-commands`, the parser and
//! the fuzz target all read it.

use holdfast_block::FaultRule;
use holdfast_qmp::{Args, QmpError};

/// A command for the run-state owner.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    QueryStatus,
    Stop,
    Cont,
    Quit,
    QueryBlock,
    QueryBlockstats,
    QueryName,
    QueryCpusFast,
    SystemReset,
    SystemPowerdown,
    XQueryUnflushed,
    XQueryTimings,
    XBlockFault {
        device: String,
        fault: Fault,
    },
    XBlockDetach {
        device: String,
    },
    XBlockAttach {
        device: String,
        filename: Option<String>,
    },
}

/// What `x-block-fault` does.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Arm a rule on a layer; answers its id.
    Arm(Layer, Box<FaultRule>),
    /// Clear a layer's rules of this name; answers how many.
    Clear(Layer, String),
    /// Clear every rule of a layer; answers how many.
    ClearAll(Layer),
    /// The simulated host drops its clean pages.
    Evict,
}

/// Where `x-block-fault` acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// The host calls the disk makes (`pwrite`, `fdatasync`, ...).
    Calls,
    /// The simulated host cache's write-back to the image.
    Writeback,
}

type Parse = fn(&Args) -> Result<Command, QmpError>;

/// Every command the owner answers: its name and how its arguments are read. Each
/// parser refuses arguments it does not know, naming them (as QEMU does).
pub const TABLE: &[(&str, Parse)] = &[
    ("query-status", |a| bare(a, Command::QueryStatus)),
    ("stop", |a| bare(a, Command::Stop)),
    ("cont", |a| bare(a, Command::Cont)),
    ("quit", |a| bare(a, Command::Quit)),
    ("query-block", |a| bare(a, Command::QueryBlock)),
    ("query-blockstats", |a| {
        // QEMU's arguments: per node (query-nodes) is not what holdfast has.
        a.only(&["query-nodes"])?;
        match a.opt_bool("query-nodes")? {
            Some(true) => Err(QmpError::generic(
                "query-blockstats: holdfast has no block nodes beyond its disks (query-nodes: false)",
            )),
            _ => Ok(Command::QueryBlockstats),
        }
    }),
    ("query-name", |a| bare(a, Command::QueryName)),
    ("query-cpus-fast", |a| bare(a, Command::QueryCpusFast)),
    ("system_reset", |a| bare(a, Command::SystemReset)),
    ("system_powerdown", |a| bare(a, Command::SystemPowerdown)),
    ("x-query-unflushed", |a| bare(a, Command::XQueryUnflushed)),
    ("x-query-timings", |a| bare(a, Command::XQueryTimings)),
    ("x-block-fault", block_fault),
    ("x-block-detach", |a| {
        a.only(&["device"])?;
        Ok(Command::XBlockDetach {
            device: a.str("device")?.to_owned(),
        })
    }),
    ("x-block-attach", |a| {
        a.only(&["device", "filename"])?;
        Ok(Command::XBlockAttach {
            device: a.str("device")?.to_owned(),
            filename: a.opt_str("filename")?.map(str::to_owned),
        })
    }),
];

fn bare(args: &Args, command: Command) -> Result<Command, QmpError> {
    args.only(&[])?;
    Ok(command)
}

fn block_fault(args: &Args) -> Result<Command, QmpError> {
    args.only(&["device", "layer", "arm", "clear", "clear-all", "evict"])?;
    let device = args.str("device")?.to_owned();
    let layer = match args.opt_str("layer")? {
        None | Some("calls") => Layer::Calls,
        Some("writeback") => Layer::Writeback,
        Some(other) => {
            return Err(QmpError::generic(format!(
                "layer: `{other}` is not calls or writeback"
            )))
        }
    };
    let fault = if args.opt_bool("evict")? == Some(true) {
        Fault::Evict
    } else if let Some(rule) = args.get("arm") {
        let rule = FaultRule::from_json_value(rule.clone())
            .map_err(|e| QmpError::generic(format!("arm: {e}")))?;
        Fault::Arm(layer, Box::new(rule))
    } else if let Some(name) = args.opt_str("clear")? {
        Fault::Clear(layer, name.to_owned())
    } else if args.opt_bool("clear-all")? == Some(true) {
        Fault::ClearAll(layer)
    } else {
        return Err(QmpError::generic(
            "x-block-fault needs one of 'arm', 'clear', 'clear-all': true or 'evict': true",
        ));
    };
    Ok(Command::XBlockFault { device, fault })
}

impl Command {
    /// Every command's name, in [`TABLE`]'s order.
    pub fn names() -> Vec<&'static str> {
        TABLE.iter().map(|(name, _)| *name).collect()
    }

    /// Reads a client's command. An unknown name is `CommandNotFound`.
    pub fn parse(name: &str, args: &Args) -> Result<Command, QmpError> {
        match TABLE.iter().find(|(n, _)| *n == name) {
            Some((_, parse)) => parse(args),
            None => Err(QmpError::command_not_found(name)),
        }
    }
}
