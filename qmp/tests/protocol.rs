//! The QMP wire protocol over a real Unix socket, with a fake machine.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use holdfast_qmp::{Args, EventSink, Machine, QmpError, Server};
use serde_json::{json, Value};

/// Answers `query-status`, sleeps on `x-slow`, records what ran.
#[derive(Default)]
struct Fake {
    ran: Mutex<Vec<String>>,
}

impl Machine for Fake {
    fn commands(&self) -> Vec<&'static str> {
        vec!["query-status", "x-slow", "x-needs-device"]
    }
    fn execute(&self, command: &str, args: &Args) -> Result<Value, QmpError> {
        self.ran.lock().expect("lock").push(command.to_owned());
        match command {
            "query-status" => Ok(json!({"status": "running", "running": true})),
            "x-slow" => {
                std::thread::sleep(Duration::from_millis(300));
                Ok(Value::Null)
            }
            "x-needs-device" => {
                args.only(&["device"])?;
                let d = args.str("device")?;
                Err(QmpError::device_not_found(d))
            }
            _ => unreachable!("only listed commands arrive"),
        }
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    path: PathBuf,
    events: EventSink,
    machine: Arc<Fake>,
    _rt: tokio::runtime::Runtime,
}

fn start() -> Harness {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("qmp.sock");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let events = EventSink::new();
    let machine = Arc::new(Fake::default());
    let server = {
        let _guard = rt.enter();
        Server::bind(&path).expect("bind")
    };
    let m: Arc<dyn Machine> = machine.clone();
    rt.spawn(server.serve(m, events.clone()));
    Harness {
        _dir: dir,
        path,
        events,
        machine,
        _rt: rt,
    }
}

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn connect(path: &Path) -> (Client, Value) {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut c = Client {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
        };
        let greeting = c.recv();
        (c, greeting)
    }

    fn negotiated(path: &Path) -> Client {
        let (mut c, _) = Client::connect(path);
        assert_eq!(
            c.call(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
        c
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read a line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
    }

    fn call(&mut self, v: Value) -> Value {
        self.send_raw(format!("{v}\n").as_bytes());
        self.recv()
    }
}

fn class(v: &Value) -> &str {
    v["error"]["class"].as_str().unwrap_or("")
}

#[test]
fn greeting_and_negotiation() {
    let h = start();
    let (mut c, greeting) = Client::connect(&h.path);
    assert_eq!(greeting["QMP"]["capabilities"], json!([]));
    assert!(greeting["QMP"]["version"]["qemu"]["major"].is_u64());
    let before = c.call(json!({"execute": "query-status"}));
    assert_eq!(class(&before), "CommandNotFound");
    assert!(
        h.machine.ran.lock().expect("lock").is_empty(),
        "nothing runs before negotiation"
    );
    assert_eq!(
        c.call(json!({"execute": "qmp_capabilities", "id": 1})),
        json!({"return": {}, "id": 1})
    );
    let again = c.call(json!({"execute": "qmp_capabilities"}));
    assert_eq!(class(&again), "CommandNotFound");
    assert_eq!(
        c.call(json!({"execute": "query-status"}))["return"]["status"],
        "running"
    );
}

#[test]
fn ids_come_back_whatever_json_they_are() {
    let h = start();
    let mut c = Client::negotiated(&h.path);
    for id in [
        json!(7),
        json!("abc"),
        json!({"a": [1, 2]}),
        json!(null),
        json!(1.5),
    ] {
        let r = c.call(json!({"execute": "query-status", "id": id}));
        assert_eq!(r["id"], id);
        let r = c.call(json!({"execute": "nope", "id": id}));
        assert_eq!(r["id"], id);
    }
    let r = c.call(json!({"execute": "query-status"}));
    assert!(r.get("id").is_none());
}

#[test]
fn bad_input_gets_errors_and_the_connection_stays_usable() {
    let h = start();
    let mut c = Client::negotiated(&h.path);
    c.send_raw(b"{not json\n");
    assert!(c.recv()["error"]["desc"]
        .as_str()
        .unwrap_or("")
        .contains("JSON parse error"));
    assert_eq!(class(&c.call(json!([1, 2]))), "GenericError");
    assert!(c.call(json!({"arguments": {}}))["error"]["desc"]
        .as_str()
        .unwrap_or("")
        .contains("execute"));
    assert_eq!(class(&c.call(json!({"execute": 5}))), "GenericError");
    assert_eq!(
        class(&c.call(json!({"execute": "query-status", "arguments": [1]}))),
        "GenericError"
    );
    assert_eq!(
        class(&c.call(json!({"execute": "query-status", "bogus": 1}))),
        "GenericError"
    );
    let unknown = c.call(json!({"execute": "frobnicate"}));
    assert_eq!(class(&unknown), "CommandNotFound");
    assert!(unknown["error"]["desc"]
        .as_str()
        .unwrap_or("")
        .contains("frobnicate"));
    let wrong_type = c.call(json!({"execute": "x-needs-device", "arguments": {"device": 3}}));
    assert!(wrong_type["error"]["desc"]
        .as_str()
        .unwrap_or("")
        .contains("'device' expects string"));
    let missing = c.call(json!({"execute": "x-needs-device", "arguments": {}}));
    assert!(missing["error"]["desc"]
        .as_str()
        .unwrap_or("")
        .contains("missing"));
    assert_eq!(
        class(&c.call(json!({"execute": "x-needs-device", "arguments": {"device": "d"}}))),
        "DeviceNotFound"
    );
    // A line over 1 MiB: an error, the rest of it skipped, the next line fine.
    let mut huge = format!(
        "{{\"execute\": \"query-status\", \"id\": \"{}",
        "x".repeat(1 << 20 | 100)
    );
    huge.push_str("\"}\n");
    c.send_raw(huge.as_bytes());
    assert!(c.recv()["error"]["desc"]
        .as_str()
        .unwrap_or("")
        .contains("exceeds"));
    // Blank lines are ignored; so is the lack of newlines between values, as QEMU's
    // Python client sends them.
    c.send_raw(b"\n  \n");
    c.send_raw(b"{\"execute\":\"query-status\",\"id\":1}{\"execute\":\"query-status\",\"id\":2}");
    assert_eq!(c.recv()["id"], 1);
    assert_eq!(c.recv()["id"], 2);
    // One value split across writes.
    c.send_raw(b"{\"execute\": \"query-");
    std::thread::sleep(Duration::from_millis(50));
    c.send_raw(b"status\", \"id\": \"split\"}");
    assert_eq!(c.recv()["id"], "split");
    assert_eq!(
        c.call(json!({"execute": "query-status", "id": "after"}))["id"],
        "after"
    );
}

#[test]
fn events_reach_every_negotiated_client_only() {
    let h = start();
    let mut a = Client::negotiated(&h.path);
    let mut b = Client::negotiated(&h.path);
    let (mut shy, _) = Client::connect(&h.path);
    std::thread::sleep(Duration::from_millis(100));
    h.events.emit("STOP", Value::Null);
    h.events.emit(
        "BLOCK_IO_ERROR",
        json!({"device": "disk0", "operation": "write"}),
    );
    for c in [&mut a, &mut b] {
        let stop = c.recv();
        assert_eq!(stop["event"], "STOP");
        assert!(
            stop["timestamp"]["seconds"].is_u64() && stop["timestamp"]["microseconds"].is_u64()
        );
        assert!(stop.get("data").is_none());
        assert_eq!(c.recv()["data"]["device"], "disk0");
    }
    // The unnegotiated client saw no event: its next line is the answer to its command.
    assert_eq!(
        class(&shy.call(json!({"execute": "query-status"}))),
        "CommandNotFound"
    );
}

#[test]
fn a_client_that_vanishes_mid_command_hurts_nobody() {
    let h = start();
    let mut c = Client::negotiated(&h.path);
    c.send_raw(b"{\"execute\": \"x-slow\"}\n");
    drop(c);
    std::thread::sleep(Duration::from_millis(500));
    let mut d = Client::negotiated(&h.path);
    assert_eq!(
        d.call(json!({"execute": "query-status"}))["return"]["running"],
        true
    );
    assert!(h
        .machine
        .ran
        .lock()
        .expect("lock")
        .contains(&"x-slow".to_string()));
}

#[test]
fn query_commands_lists_everything() {
    let h = start();
    let mut c = Client::negotiated(&h.path);
    let r = c.call(json!({"execute": "query-commands"}));
    let names: Vec<&str> = r["return"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for n in [
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "query-status",
    ] {
        assert!(names.contains(&n), "{n}");
    }
    assert!(
        c.call(json!({"execute": "query-version"}))["return"]["package"]
            .as_str()
            .unwrap_or("")
            .contains("holdfast")
    );
}

#[test]
fn socket_rules() {
    let h = start();
    let mode = std::fs::metadata(&h.path)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let _g = rt.enter();
    // In use: refused.
    let e = Server::bind(&h.path).expect_err("in use");
    assert!(e.to_string().contains("listening"), "{e}");
    // A regular file: refused, and left alone.
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep").expect("file");
    assert!(Server::bind(&file)
        .expect_err("file")
        .to_string()
        .contains("not a socket"));
    assert_eq!(std::fs::read(&file).expect("still there"), b"keep");
    // A stale socket (nobody listening): replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    Server::bind(&stale).expect("stale socket replaced");
}

#[test]
fn the_rest_of_a_bad_line_is_never_run_even_across_writes() {
    let h = start();
    let mut c = Client::negotiated(&h.path);
    c.send_raw(b"xx");
    std::thread::sleep(Duration::from_millis(50));
    c.send_raw(b" {\"execute\":\"x-slow\"}\n");
    assert!(c.recv()["error"]["desc"]
        .as_str()
        .unwrap_or("")
        .contains("JSON parse error"));
    assert_eq!(
        c.call(json!({"execute": "query-status", "id": "next"}))["id"],
        "next"
    );
    assert_eq!(
        *h.machine.ran.lock().expect("lock"),
        ["query-status"],
        "the tail of the bad line ran"
    );
}

#[test]
fn the_server_s_own_commands_check_their_arguments() {
    let h = start();
    let (mut c, _) = Client::connect(&h.path);
    let e = c.call(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}));
    assert!(
        e["error"]["desc"]
            .as_str()
            .unwrap_or("")
            .contains("'oob' not available"),
        "{e}"
    );
    let e = c.call(json!({"execute": "qmp_capabilities", "arguments": {"enable": 1}}));
    assert!(
        e["error"]["desc"]
            .as_str()
            .unwrap_or("")
            .contains("expects array"),
        "{e}"
    );
    assert_eq!(
        c.call(json!({"execute": "qmp_capabilities", "arguments": {"enable": []}})),
        json!({"return": {}})
    );
    for command in ["query-version", "query-commands", "qmp_capabilities"] {
        let e = c.call(json!({"execute": command, "arguments": {"bogus": 1}}));
        assert_eq!(
            e["error"]["desc"], "Parameter 'bogus' is unexpected",
            "{command}"
        );
    }
}

/// Reads events until the server closes the connection.
fn events_until_closed(c: &mut Client) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        match c.reader.read_line(&mut line) {
            Ok(0) => return seen,
            Ok(_) => seen.push(serde_json::from_str(&line).expect("JSON")),
            Err(e) => panic!("the server neither wrote nor closed: {e}"),
        }
    }
}

#[test]
fn finish_waits_until_every_client_has_its_last_events() {
    let h = start();
    let mut a = Client::negotiated(&h.path);
    let mut b = Client::negotiated(&h.path);
    h.events.emit(
        "X_UNFLUSHED_DROPPED",
        json!({"device": "data", "bytes": 512}),
    );
    h.events.emit(
        "SHUTDOWN",
        json!({"guest": false, "reason": "host-qmp-quit"}),
    );
    assert!(
        h.events.finish(Duration::from_secs(5)),
        "a client did not finish"
    );
    for c in [&mut a, &mut b] {
        assert_eq!(c.recv()["event"], "X_UNFLUSHED_DROPPED");
        assert_eq!(c.recv()["event"], "SHUTDOWN");
        // The connection stays open, as QEMU's does, until the process ends.
        assert_eq!(c.call(json!({"execute": "query-status", "id": 1}))["id"], 1);
    }
}

#[test]
fn finish_does_not_wait_forever_for_a_client_that_does_not_read() {
    let h = start();
    let _deaf = Client::negotiated(&h.path);
    let big = "x".repeat(8192);
    for n in 0..200 {
        h.events.emit("X_BIG", json!({"n": n, "pad": big}));
    }
    assert!(!h.events.finish(Duration::from_millis(300)));
}

#[test]
fn a_client_too_far_behind_is_disconnected_not_silently_skipped() {
    let h = start();
    let mut slow = Client::negotiated(&h.path);
    let mut other = Client::negotiated(&h.path);
    let pad = "x".repeat(1024);
    let total = holdfast_qmp::EVENT_BACKLOG * 3;
    for n in 0..total {
        h.events.emit("X_N", json!({"n": n, "pad": pad}));
        // The other client keeps up: it reads as the events come.
        assert_eq!(other.recv()["data"]["n"], n);
    }
    // The slow one got a gap-free prefix, then was disconnected.
    let seen = events_until_closed(&mut slow);
    assert!(seen.len() < total, "it was not behind at all");
    for (i, e) in seen.iter().enumerate() {
        assert_eq!(e["data"]["n"], i, "a silent gap at {i}");
    }
    // A client that reads is served on: it gets a reply after all that.
    let mut fresh = Client::negotiated(&h.path);
    assert_eq!(
        fresh.call(json!({"execute": "query-status", "id": 1}))["id"],
        1
    );
}

#[test]
fn the_number_of_clients_is_bounded() {
    let h = start();
    let mut open: Vec<(Client, Value)> = (0..holdfast_qmp::server::MAX_CLIENTS)
        .map(|_| Client::connect(&h.path))
        .collect();
    assert!(open
        .iter()
        .all(|(_, greeting)| greeting.get("QMP").is_some()));
    let (_, refused) = Client::connect(&h.path);
    assert!(
        refused["error"]["desc"]
            .as_str()
            .unwrap_or("")
            .contains("too many QMP clients"),
        "{refused}"
    );
    drop(open.pop());
    // A closed session makes room (the server notices the close).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, greeting) = Client::connect(&h.path);
        if greeting.get("QMP").is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no room after a client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Hostile clients beside 100 well-behaved ones: one that never reads, one that
/// trickles a 1 MiB string byte by byte, one sending invalid UTF-8, one nesting
/// past 128 levels, one that disconnects in the middle of a command. The others
/// get every event and their answers within a second.
#[test]
fn hostile_clients_do_not_stop_the_server_from_serving_the_others() {
    let h = start();
    let mut good: Vec<Client> = (0..100).map(|_| Client::negotiated(&h.path)).collect();
    let _deaf = Client::negotiated(&h.path);
    let path = h.path.clone();
    let trickler = std::thread::spawn(move || {
        let mut c = Client::negotiated(&path);
        c.send_raw(b"{\"execute\": \"query-status\", \"id\": \"");
        for _ in 0..(1 << 20) / 4096 {
            for _ in 0..4096 {
                c.send_raw(b"x");
            }
        }
        c.send_raw(b"\"}\n");
        // Its answer, after the events sent meanwhile.
        loop {
            let v = c.recv();
            if v.get("event").is_none() {
                return v;
            }
        }
    });
    let mut utf8 = Client::negotiated(&h.path);
    utf8.send_raw(b"{\"execute\": \"\xff\xfe\xc3\"}\n");
    assert!(utf8.recv()["error"].is_object());
    let mut deep = Client::negotiated(&h.path);
    deep.send_raw(format!("{}{}\n", "[".repeat(200), "]".repeat(200)).as_bytes());
    assert!(deep.recv()["error"]["desc"]
        .as_str()
        .unwrap_or("")
        .contains("JSON parse error"));
    let mut quitter = Client::negotiated(&h.path);
    quitter.send_raw(b"{\"execute\": \"x-slow\"}\n");
    drop(quitter);

    let mut slowest = Duration::ZERO;
    for round in 0..5 {
        h.events.emit("X_ROUND", json!({"round": round}));
        for (i, c) in good.iter_mut().enumerate() {
            assert_eq!(
                c.recv()["data"]["round"],
                round,
                "client {i} missed an event"
            );
        }
        for c in good.iter_mut().step_by(10) {
            let asked = std::time::Instant::now();
            let reply = c.call(json!({"execute": "query-status", "id": round}));
            slowest = slowest.max(asked.elapsed());
            assert_eq!(reply["id"], round);
        }
    }
    println!("slowest answer beside the hostile clients: {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
    let long = trickler.join().expect("trickler");
    assert_eq!(
        long["id"].as_str().map(str::len),
        None,
        "over 1 MiB: {long}"
    );
    assert!(long["error"]["desc"]
        .as_str()
        .unwrap_or("")
        .contains("exceeds"));
}
