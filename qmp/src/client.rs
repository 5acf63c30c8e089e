//! A blocking QMP client: connects to a server (holdfast's or QEMU's), negotiates,
//! runs commands and reads events, with a deadline on every wait so that a socket
//! that is not a QMP server, or a server that stops answering, is an error and
//! never a hang.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// How long a server has to send its greeting and to answer `qmp_capabilities`.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest line the client takes from a server (QEMU's answers stay far below).
const MAX_LINE: usize = 64 << 20;

/// Why the client cannot go on with a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a QMP server: {why}", path.display())]
    NotQmp { path: PathBuf, why: String },
    #[error("no answer to `{command}` within {} s", timeout.as_secs_f64())]
    Timeout { command: String, timeout: Duration },
    #[error("the server closed the connection{}", while_.as_ref().map_or(String::new(), |c| format!(" before answering `{c}`")))]
    Closed { while_: Option<String> },
    #[error("the server sent what is not QMP: {0}")]
    Garbled(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// An error the server answered a command with (`{"error": {"class", "desc"}}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct Refusal {
    pub class: String,
    pub desc: String,
}

/// One connection to a QMP server, negotiated.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    /// Bytes read and not yet split into lines.
    unread: Vec<u8>,
    /// How much of `unread` is known to hold no newline.
    scanned: usize,
    /// Events read while waiting for an answer, in order.
    events: VecDeque<Value>,
    /// The server's `{"QMP": ...}` greeting.
    pub greeting: Value,
    next_id: u64,
}

impl Client {
    /// Connects to the server at `path` and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let mut client = Client {
            stream,
            unread: Vec::new(),
            scanned: 0,
            events: VecDeque::new(),
            greeting: Value::Null,
            next_id: 0,
        };
        let not_qmp = |why: String| ClientError::NotQmp {
            path: path.to_owned(),
            why,
        };
        let deadline = Instant::now() + GREETING_TIMEOUT;
        let greeting = match client.read_message(Some(deadline)) {
            Ok(Some(v)) => v,
            Ok(None) => {
                return Err(not_qmp(
                    "it closed the connection without a greeting".into(),
                ))
            }
            Err(ClientError::Timeout { .. }) => {
                return Err(not_qmp(format!(
                    "it sent no greeting within {} s",
                    GREETING_TIMEOUT.as_secs()
                )))
            }
            Err(ClientError::Garbled(what)) => return Err(not_qmp(format!("it sent {what}"))),
            Err(e) => return Err(e),
        };
        if greeting.get("QMP").is_none() {
            return Err(not_qmp(format!(
                "its greeting is {greeting}, not {{\"QMP\": ...}}"
            )));
        }
        client.greeting = greeting;
        match client.execute_until("qmp_capabilities", None, Some(deadline)) {
            Ok(Ok(_)) => Ok(client),
            Ok(Err(refusal)) => Err(not_qmp(format!("qmp_capabilities was refused: {refusal}"))),
            Err(ClientError::Timeout { .. }) => Err(not_qmp(format!(
                "it did not answer qmp_capabilities within {} s",
                GREETING_TIMEOUT.as_secs()
            ))),
            Err(e) => Err(e),
        }
    }

    /// The server as its greeting names it: `holdfast 0.1.0`, or `QEMU 10.0.2`.
    pub fn server(&self) -> String {
        let v = &self.greeting["QMP"]["version"];
        let q = &v["qemu"];
        match v["package"].as_str().map(str::trim) {
            Some(p) if p.starts_with("holdfast") => p.to_owned(),
            _ => format!("QEMU {}.{}.{}", q["major"], q["minor"], q["micro"]),
        }
    }

    /// Runs `command` with `arguments`; the answer, or the server's refusal. Events
    /// that arrive meanwhile are kept for [`Client::take_events`].
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Map<String, Value>>,
        timeout: Option<Duration>,
    ) -> Result<Result<Value, Refusal>, ClientError> {
        self.execute_until(command, arguments, timeout.map(|t| Instant::now() + t))
    }

    fn execute_until(
        &mut self,
        command: &str,
        arguments: Option<Map<String, Value>>,
        deadline: Option<Instant>,
    ) -> Result<Result<Value, Refusal>, ClientError> {
        self.next_id += 1;
        let id = json!(format!("holdfast-qmp-{}", self.next_id));
        let mut request = json!({"execute": command, "id": id});
        if let Some(a) = arguments {
            request["arguments"] = Value::Object(a);
        }
        let mut line = request.to_string();
        line.push('\n');
        if let Err(e) = self.stream.write_all(line.as_bytes()) {
            return Err(match e.kind() {
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => ClientError::Closed {
                    while_: Some(command.to_owned()),
                },
                _ => ClientError::Io(e),
            });
        }
        loop {
            let message = match self.read_message(deadline) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    return Err(ClientError::Closed {
                        while_: Some(command.to_owned()),
                    })
                }
                Err(ClientError::Timeout { timeout, .. }) => {
                    return Err(ClientError::Timeout {
                        command: command.to_owned(),
                        timeout,
                    })
                }
                Err(e) => return Err(e),
            };
            if message.get("event").is_some() {
                self.events.push_back(message);
                continue;
            }
            // An answer without our id answers what the server could not read as a
            // command (QEMU sends such errors without an id).
            if message.get("id").is_some_and(|i| *i != id) {
                continue;
            }
            if let Some(r) = message.get("return") {
                return Ok(Ok(r.clone()));
            }
            if let Some(e) = message.get("error") {
                return Ok(Err(Refusal {
                    class: e["class"].as_str().unwrap_or("?").to_owned(),
                    desc: e["desc"].as_str().unwrap_or("").to_owned(),
                }));
            }
            return Err(ClientError::Garbled(format!("{message}")));
        }
    }

    /// The events read so far and not yet taken.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// The next event, waiting until `deadline` (none: for ever); `None` when the
    /// deadline passes, [`ClientError::Closed`] when the server closes the connection.
    pub fn next_event(&mut self, deadline: Option<Instant>) -> Result<Option<Value>, ClientError> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            match self.read_message(deadline) {
                Ok(Some(m)) if m.get("event").is_some() => return Ok(Some(m)),
                Ok(Some(_)) => continue,
                Ok(None) => return Err(ClientError::Closed { while_: None }),
                Err(ClientError::Timeout { .. }) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Events the server has already sent, without waiting.
    pub fn poll_events(&mut self) -> Result<Vec<Value>, ClientError> {
        loop {
            match self.read_message(Some(Instant::now())) {
                Ok(Some(m)) if m.get("event").is_some() => self.events.push_back(m),
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return if self.events.is_empty() {
                        Err(ClientError::Closed { while_: None })
                    } else {
                        Ok(self.take_events())
                    }
                }
                Err(ClientError::Timeout { .. }) => return Ok(self.take_events()),
                Err(e) => return Err(e),
            }
        }
    }

    /// One JSON object from the server; `None` at the end of the connection.
    fn read_message(&mut self, deadline: Option<Instant>) -> Result<Option<Value>, ClientError> {
        // One read is always tried, so that a deadline of now takes what has come.
        let mut tried = false;
        loop {
            let newline = self.unread[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| self.scanned + i);
            self.scanned = if newline.is_some() {
                0
            } else {
                self.unread.len()
            };
            if let Some(end) = newline {
                let line: Vec<u8> = self.unread.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                return match serde_json::from_str::<Value>(text) {
                    Ok(v) if v.is_object() => Ok(Some(v)),
                    _ => Err(ClientError::Garbled(quote(text))),
                };
            }
            if self.unread.len() > MAX_LINE {
                return Err(ClientError::Garbled(format!(
                    "a line longer than {} MiB",
                    MAX_LINE >> 20
                )));
            }
            // Checked before every read, not only when one times out: a server that
            // keeps sending without ever ending a line must not outlast the deadline.
            let timed_out = || ClientError::Timeout {
                command: String::new(),
                timeout: Duration::ZERO,
            };
            if tried && deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(timed_out());
            }
            tried = true;
            let wait = match deadline {
                None => None,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // A zero read timeout means none: wait at least a millisecond.
                    Some(left.max(Duration::from_millis(1)))
                }
            };
            self.stream.set_read_timeout(wait)?;
            let mut buf = [0u8; 8192];
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    if self.unread.iter().any(|b| !b.is_ascii_whitespace()) {
                        let rest = String::from_utf8_lossy(&self.unread).into_owned();
                        self.unread.clear();
                        return Err(ClientError::Garbled(quote(&rest)));
                    }
                    return Ok(None);
                }
                Ok(n) => self.unread.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(ClientError::Io(e)),
            }
        }
    }
}

/// A server's bytes for a message: at most 80 characters of them, quoted.
fn quote(text: &str) -> String {
    let mut t: String = text.chars().take(80).collect();
    if t.len() < text.len() {
        t.push_str("...");
    }
    format!("{t:?}")
}

/// `KEY=VALUE` words as QMP arguments, as QEMU's qmp-shell reads them: a VALUE that
/// is JSON (a number, true, false, null, "a string", an object, an array) is that
/// JSON, any other is a string; a KEY with dots (`a.b=1`) makes nested objects.
pub fn parse_arguments<S: AsRef<str>>(words: &[S]) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for word in words {
        let word = word.as_ref();
        let Some((key, raw)) = word.split_once('=') else {
            return Err(format!("`{word}`: an argument is KEY=VALUE"));
        };
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(format!("`{word}`: an argument is KEY=VALUE, with a key"));
        }
        let value = match serde_json::from_str::<Value>(raw) {
            Ok(v) => v,
            Err(_) if raw.starts_with(['{', '[', '"']) => {
                return Err(format!("`{word}`: the value is not valid JSON"))
            }
            Err(_) => Value::String(raw.to_owned()),
        };
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap_or(key);
        let mut map = &mut out;
        for p in parts {
            let next = map
                .entry(p.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            map = match next {
                Value::Object(m) => m,
                _ => return Err(format!("`{word}`: `{p}` is already a value, not an object")),
            };
        }
        if map.contains_key(last) {
            return Err(format!("`{word}`: `{key}` is given twice"));
        }
        map.insert(last.to_owned(), value);
    }
    Ok(out)
}

/// A shell line split into words: at white space, except inside quotes or JSON
/// brackets, so that `x-block-fault device=d arm={"op": "flush"}` is three words.
pub fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in line.chars() {
        if let Some(q) = quote {
            word.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => {
                quote = Some(c);
                word.push(c);
            }
            '{' | '[' => {
                depth += 1;
                word.push(c);
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                word.push(c);
            }
            c if c.is_whitespace() && depth == 0 => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if quote.is_some() {
        return Err("a quote is not closed".into());
    }
    if depth > 0 {
        return Err("a bracket is not closed".into());
    }
    if !word.is_empty() {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_json_when_they_can_be_and_strings_otherwise() {
        let a = parse_arguments(&[
            "device=data",
            "n=3",
            "on=true",
            r#"arm={"op": "flush", "errno": 5}"#,
            "layer.kind=calls",
            "layer.n=1",
            "empty=",
            r#"quoted="5""#,
        ])
        .expect("parses");
        assert_eq!(
            Value::Object(a),
            json!({"device": "data", "n": 3, "on": true, "arm": {"op": "flush", "errno": 5},
                   "layer": {"kind": "calls", "n": 1}, "empty": "", "quoted": "5"})
        );
    }

    #[test]
    fn bad_arguments_are_refused_naming_the_word() {
        for (words, says) in [
            (vec!["device"], "`device`: an argument is KEY=VALUE"),
            (vec!["=x"], "with a key"),
            (vec!["a..b=1"], "with a key"),
            (vec!["a=1", "a=2"], "given twice"),
            (vec!["a=1", "a.b=2"], "already a value"),
            (vec![r#"arm={"op": "#], "not valid JSON"),
        ] {
            let e = parse_arguments(&words).expect_err("refused");
            assert!(e.contains(says), "{words:?}: {e}");
        }
    }

    #[test]
    fn shell_lines_split_at_spaces_outside_json_and_quotes() {
        assert_eq!(
            split_words(r#"  x-block-fault device=d arm={"op": "flush", "a": [1, 2]} s="a b" "#)
                .expect("splits"),
            vec![
                "x-block-fault",
                "device=d",
                r#"arm={"op": "flush", "a": [1, 2]}"#,
                r#"s="a b""#
            ]
        );
        assert!(split_words(r#"a b="x"#).is_err());
        assert!(split_words("a b={").is_err());
        assert_eq!(split_words("   ").expect("empty"), Vec::<String>::new());
    }
}
