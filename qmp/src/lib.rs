//! holdfast's QMP server: the QEMU Machine Protocol over a Unix socket, as QEMU's
//! `docs/interop/qmp-spec` describes it, so QEMU's own clients (Python `qemu.qmp`,
//! `qmp-shell`) work unchanged.
//!
//! Protocol, per connection:
//!
//! ```text
//!   server: {"QMP": {"version": ..., "capabilities": []}}
//!   client: {"execute": "qmp_capabilities"}     (anything else first: CommandNotFound)
//!   server: {"return": {}}
//!   client: {"execute": NAME, "arguments": {...}, "id": ANY}    one JSON object a line
//!   server: {"return": ..., "id": ANY} | {"error": {"class", "desc"}, "id": ANY}
//!   server: {"event": NAME, "data": {...}, "timestamp": {"seconds", "microseconds"}}
//! ```
//!
//! The server owns the wire: negotiation, `query-version`, `query-commands`, input
//! errors. Everything else goes to a [`Machine`], whose answers come back in order.
//! Events reach every negotiated client through an [`EventSink`]. Bad input never
//! takes a connection down unless QEMU's would go down too.

pub mod server;
pub mod stream;

use serde_json::{json, Map, Value};

pub use server::{Server, ServerError};

/// QMP's error classes (QEMU's `ErrorClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotFound,
    DeviceNotActive,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
        }
    }
}

/// An error a command answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {desc}", class.as_str())]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    pub fn device_not_found(device: &str) -> Self {
        QmpError {
            class: ErrorClass::DeviceNotFound,
            desc: format!("Device '{device}' not found"),
        }
    }
}

/// A command's arguments with QEMU-style type errors.
#[derive(Debug, Clone, Default)]
pub struct Args(pub Map<String, Value>);

impl Args {
    pub fn str(&self, name: &str) -> Result<&str, QmpError> {
        match self.0.get(name) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(QmpError::generic(format!(
                "Parameter '{name}' expects string"
            ))),
            None => Err(QmpError::generic(format!("Parameter '{name}' is missing"))),
        }
    }

    pub fn opt_str(&self, name: &str) -> Result<Option<&str>, QmpError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(_) => self.str(name).map(Some),
        }
    }

    pub fn opt_bool(&self, name: &str) -> Result<Option<bool>, QmpError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(QmpError::generic(format!(
                "Parameter '{name}' expects boolean"
            ))),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    /// Rejects members the command does not know, as QEMU does.
    pub fn only(&self, known: &[&str]) -> Result<(), QmpError> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }
}

/// What the server asks of the machine. Called from a blocking thread: it may wait
/// for the run-state owner.
pub trait Machine: Send + Sync + 'static {
    /// The commands the machine executes (beyond the server's own).
    fn commands(&self) -> Vec<&'static str>;
    fn execute(&self, command: &str, args: &Args) -> Result<Value, QmpError>;
}

/// Sends events to every negotiated client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EventSink(tokio::sync::broadcast::Sender<String>);

impl EventSink {
    pub fn new() -> Self {
        EventSink(tokio::sync::broadcast::channel(1024).0)
    }

    /// Sends `{"event": name, "data": data, "timestamp": now}`; `data` may be null.
    pub fn emit(&self, name: &str, data: Value) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut event = json!({
            "event": name,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        if !data.is_null() {
            event["data"] = data;
        }
        // No client connected is not an error.
        let _ = self.0.send(event.to_string());
    }

    /// A receiver of every event sent from now on (serialized JSON).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.0.subscribe()
    }
}

impl Default for EventSink {
    fn default() -> Self {
        Self::new()
    }
}
