//! `holdfast qmp`: a QMP client on the command line (holdfast's QMP or QEMU's): one
//! command and its answer, the events as they come, or an interactive shell with
//! history.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use holdfast_qmp::client::{parse_arguments, split_words, Client, ClientError};
use serde_json::Value;

/// `holdfast qmp`'s arguments.
#[derive(Debug, Args)]
#[command(after_long_help = QMP_AFTER_HELP)]
pub struct QmpArgs {
    /// The QMP socket (holdfast run --qmp PATH, or QEMU's -qmp unix:PATH,server=on)
    #[arg(value_name = "SOCKET")]
    pub socket: PathBuf,
    /// A command (query-status, cont, x-block-fault, ...), or `events`; none: a shell
    #[arg(value_name = "COMMAND")]
    pub command: Option<String>,
    /// The command's arguments, KEY=VALUE each (below)
    #[arg(value_name = "KEY=VALUE", allow_hyphen_values = true)]
    pub arguments: Vec<String>,
    /// Seconds to wait for an answer (a command) or for events (`events`);
    /// 0: no limit. Default: 60 for a command, none for events
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// With `events`: leave after this many events
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

const QMP_AFTER_HELP: &str = "\
Examples:
  holdfast qmp /tmp/qmp.sock query-status
  holdfast qmp /tmp/qmp.sock x-block-fault device=data arm='{\"op\": \"flush\", \"errno\": 5}'
  holdfast qmp /tmp/qmp.sock events --count 1      (waits for the next event)
  holdfast qmp /tmp/qmp.sock                       (a shell: COMMAND KEY=VALUE... a line)

KEY=VALUE: a VALUE that is JSON (a number, true, false, null, \"a string\", an object,
an array) is sent as that JSON, any other as a string; a KEY with dots (a.b=1) makes
nested objects. A line of the shell may also be a whole QMP command in JSON.

Prints a command's answer (the value of \"return\") as JSON on stdout; `events` prints
each event on one line as it arrives. The shell prints the events that arrived before
each answer; Ctrl-D or `exit` leaves it (`quit` is QMP's quit: it ends the VM); its
history is kept in ~/.holdfast_qmp_history.

Exit status: 0 on an answer; 1 when the server answers with an error (class and
description on stderr); 2 on a bad command line; 3 when the socket is not there, is
not a QMP server, closes, or does not answer in time.";

/// What went wrong, and the status it exits with.
enum Failure {
    /// The server answered with an error.
    Refused(String),
    /// The command line is wrong.
    Usage(String),
    /// The server cannot be talked to.
    Server(ClientError),
}

impl Failure {
    fn report(self) -> ExitCode {
        let (text, status) = match self {
            Failure::Refused(t) => (t, 1),
            Failure::Usage(t) => (t, 2),
            Failure::Server(e) => (e.to_string(), 3),
        };
        eprintln!("holdfast qmp: {text}");
        ExitCode::from(status)
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        Failure::Server(e)
    }
}

/// `holdfast qmp SOCKET [COMMAND [KEY=VALUE...]]`.
pub fn main(args: QmpArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.report(),
    }
}

fn run(args: QmpArgs) -> Result<(), Failure> {
    let timeout = match args.timeout {
        Some(t) if !t.is_finite() || t < 0.0 => {
            return Err(Failure::Usage(format!("--timeout {t}: seconds, 0 or more")))
        }
        Some(0.0) => None,
        Some(t) => Some(Duration::from_secs_f64(t)),
        None => match args.command.as_deref() {
            Some("events") | None => None,
            Some(_) => Some(Duration::from_secs(60)),
        },
    };
    match args.command.as_deref() {
        Some("events") => {
            if !args.arguments.is_empty() {
                return Err(Failure::Usage("events takes no arguments".into()));
            }
            let mut client = Client::connect(&args.socket)?;
            events(&mut client, timeout, args.count)
        }
        Some(command) => {
            if args.count.is_some() {
                return Err(Failure::Usage("--count goes with events".into()));
            }
            let arguments = parse_arguments(&args.arguments).map_err(Failure::Usage)?;
            let mut client = Client::connect(&args.socket)?;
            let answer = execute(&mut client, command, arguments, timeout)?;
            print_json(&answer, true);
            Ok(())
        }
        None => {
            let mut client = Client::connect(&args.socket)?;
            shell(&mut client, &args.socket, timeout)
        }
    }
}

/// Runs one command; the answer, or the server's refusal as a [`Failure`].
fn execute(
    client: &mut Client,
    command: &str,
    arguments: serde_json::Map<String, Value>,
    timeout: Option<Duration>,
) -> Result<Value, Failure> {
    let arguments = (!arguments.is_empty()).then_some(arguments);
    match client.execute(command, arguments, timeout)? {
        Ok(answer) => Ok(answer),
        Err(refusal) => Err(Failure::Refused(format!("{command}: {refusal}"))),
    }
}

/// `events`: each event on a line as it comes, until the server closes, the count
/// is reached or the time is up.
fn events(
    client: &mut Client,
    timeout: Option<Duration>,
    count: Option<u64>,
) -> Result<(), Failure> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut seen = 0u64;
    while count.is_none_or(|c| seen < c) {
        match client.next_event(deadline) {
            Ok(Some(event)) => {
                print_json(&event, false);
                seen += 1;
            }
            Ok(None) => {
                return match count {
                    Some(c) => Err(Failure::Server(ClientError::Timeout {
                        command: format!("events --count {c} (saw {seen})"),
                        timeout: timeout.unwrap_or_default(),
                    })),
                    None => Ok(()),
                }
            }
            Err(ClientError::Closed { .. }) if count.is_none() => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The interactive shell: a command a line, events before each answer.
fn shell(
    client: &mut Client,
    socket: &std::path::Path,
    timeout: Option<Duration>,
) -> Result<(), Failure> {
    use rustyline::error::ReadlineError;
    let mut editor = rustyline::DefaultEditor::new()
        .map_err(|e| Failure::Usage(format!("cannot read the terminal: {e}")))?;
    let history = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".holdfast_qmp_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    println!(
        "Connected to {} at {}. COMMAND KEY=VALUE... a line (help: the commands); Ctrl-D leaves.",
        client.server(),
        socket.display()
    );
    let result = loop {
        for event in client.poll_events()? {
            print_json(&event, false);
        }
        let line = match editor.readline("(holdfast) ") {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break Ok(()),
            Err(e) => break Err(Failure::Usage(format!("cannot read the terminal: {e}"))),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        if line == "exit" {
            break Ok(());
        }
        match shell_line(client, line, timeout) {
            Ok(()) => {}
            Err(Failure::Server(e @ ClientError::Timeout { .. })) => eprintln!("error: {e}"),
            Err(Failure::Server(e)) => break Err(Failure::Server(e)),
            Err(Failure::Refused(t) | Failure::Usage(t)) => eprintln!("error: {t}"),
        }
    };
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    result
}

/// One line of the shell: `help`, a JSON command, or COMMAND KEY=VALUE...
fn shell_line(client: &mut Client, line: &str, timeout: Option<Duration>) -> Result<(), Failure> {
    let (command, arguments) = if line.starts_with('{') {
        let v: Value =
            serde_json::from_str(line).map_err(|e| Failure::Usage(format!("not JSON: {e}")))?;
        let command = v["execute"]
            .as_str()
            .ok_or(Failure::Usage("a JSON line needs \"execute\"".into()))?
            .to_owned();
        let arguments = match v.get("arguments") {
            None => serde_json::Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err(Failure::Usage("\"arguments\" is an object".into())),
        };
        (command, arguments)
    } else {
        let words = split_words(line).map_err(Failure::Usage)?;
        let (command, rest) = words.split_first().ok_or(Failure::Usage("empty".into()))?;
        if command == "help" {
            let answer = execute(client, "query-commands", Default::default(), timeout)?;
            let mut names: Vec<&str> = answer
                .as_array()
                .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
                .unwrap_or_default();
            names.sort_unstable();
            println!("{}", names.join(" "));
            return Ok(());
        }
        (
            command.clone(),
            parse_arguments(rest).map_err(Failure::Usage)?,
        )
    };
    let answer = execute(client, &command, arguments, timeout);
    for event in client.take_events() {
        print_json(&event, false);
    }
    print_json(&answer?, true);
    Ok(())
}

fn print_json(v: &Value, pretty: bool) {
    let text = if pretty {
        serde_json::to_string_pretty(v)
    } else {
        serde_json::to_string(v)
    }
    .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    // A closed stdout (| head) ends the output, not the process with a panic.
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}
