//! The QMP client's deadlines against servers that keep sending bytes but never end
//! a line (found by an adversarial review): a trickle and an enormous line both end
//! at the greeting's deadline, not minutes later.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use holdfast_qmp::client::{Client, ClientError, GREETING_TIMEOUT};

/// Connects to a server that `serve` plays; how long it took and what came of it.
fn connect_to(
    serve: impl FnOnce(std::os::unix::net::UnixStream) + Send + 'static,
) -> (Duration, String) {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("server.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().expect("accept");
        serve(conn);
    });
    let (done, finished) = channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let r = match Client::connect(&path) {
            Ok(_) => "connected".to_owned(),
            Err(e @ ClientError::NotQmp { .. }) => e.to_string(),
            Err(e) => format!("other: {e}"),
        };
        let _ = done.send(r);
    });
    let r = finished
        .recv_timeout(GREETING_TIMEOUT * 4)
        .unwrap_or_else(|_| {
            panic!(
                "Client::connect still waiting after {:?}",
                started.elapsed()
            )
        });
    (started.elapsed(), r)
}

#[test]
fn a_greeting_that_trickles_forever_ends_at_the_deadline() {
    let (took, r) = connect_to(|mut conn| {
        let _ = conn.write_all(b"{\"QMP\": ");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if conn.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    });
    assert!(r.contains("sent no greeting within 5 s"), "{r}");
    assert!(took < GREETING_TIMEOUT * 2, "took {took:?}");
}

#[test]
fn an_enormous_line_ends_at_the_deadline() {
    let (took, r) = connect_to(|mut conn| {
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..80 {
            if conn.write_all(&chunk).is_err() {
                return;
            }
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    assert!(r.contains("is not a QMP server"), "{r}");
    assert!(took < GREETING_TIMEOUT * 2, "took {took:?}");
}
