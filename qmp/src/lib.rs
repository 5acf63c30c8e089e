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

pub mod client;
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

    pub fn command_not_found(command: &str) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: format!("The command {command} has not been found"),
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
///
/// Each client has a queue of [`EVENT_BACKLOG`] events; a client that falls
/// further behind (it does not read) is disconnected, with a line on stderr,
/// rather than silently miss an event the contract says it gets.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: tokio::sync::broadcast::Sender<String>,
    clients: std::sync::Arc<Clients>,
}

/// Events a client may be behind before it is disconnected.
pub const EVENT_BACKLOG: usize = 1024;

/// What a client's queue carries last: write what you have, then close.
pub(crate) const END_OF_EVENTS: &str = "";

/// How many client sessions are open.
#[derive(Debug, Default)]
struct Clients {
    open: std::sync::Mutex<usize>,
    changed: std::sync::Condvar,
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Held by a client session while it is open.
#[derive(Debug)]
pub(crate) struct ClientSession(std::sync::Arc<Clients>);

impl Drop for ClientSession {
    fn drop(&mut self) {
        *self.0.lock() -= 1;
        self.0.changed.notify_all();
    }
}

impl EventSink {
    pub fn new() -> Self {
        EventSink {
            tx: tokio::sync::broadcast::channel(EVENT_BACKLOG).0,
            clients: std::sync::Arc::default(),
        }
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
        let _ = self.tx.send(event.to_string());
    }

    /// A receiver of every event sent from now on (serialized JSON).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.tx.subscribe()
    }

    /// Ends the stream before holdfast exits: every client writes the replies and
    /// events it has (a `quit`'s reply, `X_UNFLUSHED_DROPPED`, `SHUTDOWN`) and
    /// closes. Waits until all did or `within` passed (a client that does not read
    /// cannot hold holdfast up); returns whether all did.
    pub fn finish(&self, within: std::time::Duration) -> bool {
        let _ = self.tx.send(END_OF_EVENTS.to_owned());
        let deadline = std::time::Instant::now() + within;
        let mut open = self.clients.lock();
        while *open > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            open = self
                .clients
                .changed
                .wait_timeout(open, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Opens a client session, unless `max` are open already.
    pub(crate) fn open_session(&self, max: usize) -> Option<ClientSession> {
        let mut open = self.clients.lock();
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(ClientSession(std::sync::Arc::clone(&self.clients)))
    }
}

impl Default for EventSink {
    fn default() -> Self {
        Self::new()
    }
}
