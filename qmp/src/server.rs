//! The socket, its connections, and the protocol state of each.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::stream::{Input, Splitter, MAX_MESSAGE};
use crate::{Args, ErrorClass, EventSink, Machine, QmpError, END_OF_EVENTS};

/// Client sessions open at once; one more is told so and closed.
pub const MAX_CLIENTS: usize = 128;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("--qmp {0}: exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("--qmp {0}: another process is listening there")]
    InUse(PathBuf),
    #[error("--qmp {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A listening QMP socket.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Server {
    /// Binds `path` with mode 0600. A stale socket (nobody listening) is replaced;
    /// anything else at `path` is refused.
    pub fn bind(path: &Path) -> Result<Server, ServerError> {
        let io = |source| ServerError::Io {
            path: path.to_owned(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(ServerError::NotASocket(path.to_owned()))
            }
            // Only a socket nobody listens on is stale; any other failure to
            // connect (EACCES: someone else's socket) leaves it alone.
            Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::InUse(path.to_owned())),
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    std::fs::remove_file(path).map_err(io)?
                }
                Err(e) => return Err(io(e)),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        // Create it private from the start: no window where others could connect.
        // And listening before it appears at `path`: bound under a name of its own
        // beside it, then renamed into place (a client that waits for the path and
        // connects at once was refused when it came between bind and listen, under
        // load). A path too long for that name is bound in place.
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let staged = name
            .map(|n| path.with_file_name(format!(".{n}.{}", std::process::id())))
            .filter(|p| p.as_os_str().len() < 100);
        let at = staged.as_deref().unwrap_or(path);
        let _ = staged.as_deref().map(std::fs::remove_file);
        // SAFETY: umask only changes this process's file-creation mask; restored below.
        let old = unsafe { libc::umask(0o177) };
        let listener = std::os::unix::net::UnixListener::bind(at);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = listener.map_err(io)?;
        std::fs::set_permissions(at, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        if at != path {
            std::fs::rename(at, path).map_err(|e| {
                let _ = std::fs::remove_file(at);
                io(e)
            })?;
        }
        listener.set_nonblocking(true).map_err(io)?;
        let listener = UnixListener::from_std(listener).map_err(io)?;
        Ok(Server {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts clients until the task is dropped.
    pub async fn serve(self, machine: Arc<dyn Machine>, events: EventSink) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(client(stream, Arc::clone(&machine), events.clone()));
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads the client's stream and sends on each message the [`Splitter`] completes.
async fn read_messages(read: tokio::net::unix::OwnedReadHalf, out: mpsc::Sender<Input>) {
    use tokio::io::AsyncReadExt;
    let mut reader = read;
    let mut splitter = Splitter::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for input in splitter.push(&chunk[..n]) {
            if out.send(input).await.is_err() {
                return;
            }
        }
    }
}

fn error(class: ErrorClass, desc: impl Into<String>) -> QmpError {
    QmpError {
        class,
        desc: desc.into(),
    }
}

/// One client's session.
async fn client(stream: UnixStream, machine: Arc<dyn Machine>, events: EventSink) {
    let (read, mut write) = stream.into_split();
    let Some(session) = events.open_session(MAX_CLIENTS) else {
        let e = QmpError::generic(format!(
            "too many QMP clients ({MAX_CLIENTS} are connected)"
        ));
        let _ = write_json(&mut write, &reply_err(None, e)).await;
        return;
    };
    let (tx, mut lines) = mpsc::channel(16);
    tokio::spawn(read_messages(read, tx));
    let mut subscription = events.subscribe();
    let greeting = json!({"QMP": {
        "version": {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": format!("holdfast {}", env!("CARGO_PKG_VERSION"))},
        "capabilities": [],
    }});
    if write_json(&mut write, &greeting).await.is_err() {
        return;
    }
    // Held until this client has written every event up to the end of the stream
    // (EventSink::finish); the connection itself stays open, as QEMU's does, until
    // the process ends.
    let mut session = Some(session);
    let mut negotiated = false;
    loop {
        tokio::select! {
            line = lines.recv() => {
                let Some(line) = line else { return };
                let reply = match line {
                    Input::TooLong => Some(reply_err(None, error(ErrorClass::GenericError, format!("QMP input exceeds {MAX_MESSAGE} bytes")))),
                    Input::Invalid(e) => Some(reply_err(None, QmpError::generic(format!("JSON parse error, {e}")))),
                    Input::Value(v) => respond(v, &mut negotiated, &machine).await,
                };
                if let Some(reply) = reply {
                    // Events the command raised go first, as QEMU sends them.
                    let mut ending = false;
                    while let Ok(text) = subscription.try_recv() {
                        if text == END_OF_EVENTS {
                            ending = true;
                            break;
                        }
                        if negotiated && write.write_all(format!("{text}\r\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    if write_json(&mut write, &reply).await.is_err() {
                        return;
                    }
                    if ending {
                        session = None;
                    }
                }
            }
            event = subscription.recv(), if session.is_some() => {
                match event {
                    Ok(text) if text == END_OF_EVENTS => session = None,
                    Ok(text) => {
                        if negotiated && write.write_all(format!("{text}\r\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        log::warn!(
                            "a QMP client fell {n} events behind (it does not read); \
                             disconnecting it rather than let it miss events"
                        );
                        return;
                    }
                    Err(_) => return,
                }
            }
        }
    }
}

async fn write_json(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    v: &Value,
) -> std::io::Result<()> {
    write.write_all(format!("{v}\r\n").as_bytes()).await
}

fn reply_ok(id: Option<Value>, ret: Value) -> Value {
    let mut r = json!({"return": ret});
    if let Some(id) = id {
        r["id"] = id;
    }
    r
}

fn reply_err(id: Option<Value>, e: QmpError) -> Value {
    let mut r = json!({"error": {"class": e.class.as_str(), "desc": e.desc}});
    if let Some(id) = id {
        r["id"] = id;
    }
    r
}

/// One message in, one reply out: what each connection runs for each message its
/// [`Splitter`] completes (public for the fuzz target, which feeds it hostile input).
pub async fn respond(
    value: Value,
    negotiated: &mut bool,
    machine: &Arc<dyn Machine>,
) -> Option<Value> {
    let Value::Object(mut obj) = value else {
        return Some(reply_err(
            None,
            QmpError::generic("QMP input must be a JSON object"),
        ));
    };
    let id = obj.remove("id");
    let command = match obj.remove("execute") {
        Some(Value::String(c)) => c,
        Some(_) => {
            return Some(reply_err(
                id,
                QmpError::generic("QMP input member 'execute' must be a string"),
            ))
        }
        None => {
            return Some(reply_err(
                id,
                QmpError::generic("QMP input lacks member 'execute'"),
            ))
        }
    };
    let args = match obj.remove("arguments") {
        None => Args::default(),
        Some(Value::Object(a)) => Args(a),
        Some(_) => {
            return Some(reply_err(
                id,
                QmpError::generic("QMP input member 'arguments' must be an object"),
            ))
        }
    };
    if let Some(k) = obj.keys().next() {
        return Some(reply_err(
            id,
            QmpError::generic(format!("QMP input member '{k}' is unexpected")),
        ));
    }
    if !*negotiated {
        if command != "qmp_capabilities" {
            let e = error(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
            return Some(reply_err(id, e));
        }
        if let Err(e) = args.only(&["enable"]) {
            return Some(reply_err(id, e));
        }
        // holdfast offers no capabilities (no 'oob'): enabling one is an error.
        match args.get("enable") {
            None => {}
            Some(Value::Array(caps)) if caps.is_empty() => {}
            Some(Value::Array(caps)) => {
                let name = caps[0]
                    .as_str()
                    .map_or_else(|| caps[0].to_string(), str::to_owned);
                let e = QmpError::generic(format!("Capability '{name}' not available"));
                return Some(reply_err(id, e));
            }
            Some(_) => {
                return Some(reply_err(
                    id,
                    QmpError::generic("Parameter 'enable' expects array"),
                ))
            }
        }
        *negotiated = true;
        return Some(reply_ok(id, json!({})));
    }
    let own = ["qmp_capabilities", "query-version", "query-commands"];
    if own.contains(&command.as_str()) {
        if let Err(e) = args.only(&[]) {
            return Some(reply_err(id, e));
        }
    }
    let result = match command.as_str() {
        "qmp_capabilities" => Err(error(
            ErrorClass::CommandNotFound,
            "Capabilities negotiation is already complete, command ignored",
        )),
        "query-version" => Ok(
            json!({"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": format!("holdfast {}", env!("CARGO_PKG_VERSION"))}),
        ),
        "query-commands" => {
            let mut names = own.to_vec();
            names.extend(machine.commands());
            Ok(Value::Array(
                names.into_iter().map(|n| json!({"name": n})).collect(),
            ))
        }
        name if machine.commands().contains(&name) => {
            let m = Arc::clone(machine);
            let name = name.to_owned();
            match tokio::task::spawn_blocking(move || m.execute(&name, &args)).await {
                Ok(r) => r,
                Err(_) => Err(QmpError::generic("the command failed inside holdfast")),
            }
        }
        other => Err(QmpError::command_not_found(other)),
    };
    Some(match result {
        Ok(v) => reply_ok(
            id,
            if v.is_null() {
                Value::Object(Map::new())
            } else {
                v
            },
        ),
        Err(e) => reply_err(id, e),
    })
}
