//! Splits a client's byte stream into JSON messages, incrementally.
//!
//! QMP is a stream of JSON values, not of lines: QEMU's own Python client sends
//! compact JSON with no newline. The [`Splitter`] looks at every byte once, keeping
//! its place (nesting depth, inside a string, after a backslash) across reads, and
//! hands a message to serde_json only once it is complete, so a client trickling a
//! long string byte by byte costs what its bytes cost, not a parse per read.
//!
//! Bad input is skipped as QEMU's parser skips it: an invalid message, and a message
//! longer than [`MAX_MESSAGE`], are reported once and the rest of their line is
//! dropped, even if it arrives in later reads, so the tail of a bad line is never
//! taken for a new command.

use serde_json::Value;

/// Longest message accepted; a longer one is reported and skipped.
pub const MAX_MESSAGE: usize = 1 << 20;

/// One message, as the splitter saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Value(Value),
    Invalid(String),
    TooLong,
}

/// Where the splitter is in the stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between messages: white space is dropped.
    #[default]
    Between,
    /// Inside an object or array (`depth` open), or a top-level string.
    Structure,
    /// A top-level scalar (`true`, `12`, or garbage) up to a delimiter.
    Scalar,
    /// Dropping the rest of a bad line, up to and including its newline.
    Skipping,
}

/// The incremental splitter of one connection.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
    state: State,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Bytes looked at so far (each once).
    scanned: u64,
}

impl Splitter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes looked at so far: every byte of input is looked at exactly once.
    pub fn scanned(&self) -> u64 {
        self.scanned
    }

    /// Takes the next bytes of the stream; returns the messages they completed.
    pub fn push(&mut self, data: &[u8]) -> Vec<Input> {
        let mut out = Vec::new();
        for &b in data {
            self.scanned += 1;
            self.byte(b, &mut out);
        }
        out
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Input>) {
        match self.state {
            State::Skipping => {
                if b == b'\n' {
                    self.state = State::Between;
                }
                return;
            }
            State::Between => match b {
                b' ' | b'\t' | b'\r' | b'\n' => return,
                b'{' | b'[' => {
                    self.state = State::Structure;
                    self.depth = 1;
                }
                b'"' => {
                    self.state = State::Structure;
                    self.in_string = true;
                }
                _ => self.state = State::Scalar,
            },
            State::Scalar => {
                if matches!(
                    b,
                    b' ' | b'\t' | b'\r' | b'\n' | b'{' | b'[' | b'"' | b'}' | b']'
                ) {
                    self.finish(out);
                    // The delimiter belongs to what follows.
                    self.byte(b, out);
                    return;
                }
            }
            State::Structure => {
                if self.in_string {
                    if b < 0x20 {
                        return self.invalid(b, "a control character in a string", out);
                    } else if self.escaped {
                        self.escaped = false;
                    } else if b == b'\\' {
                        self.escaped = true;
                    } else if b == b'"' {
                        self.in_string = false;
                    }
                } else {
                    match b {
                        b'"' => self.in_string = true,
                        b'{' | b'[' => self.depth += 1,
                        b'}' | b']' => self.depth = self.depth.saturating_sub(1),
                        // What JSON may have between strings: the rest is garbage,
                        // and reported now rather than when the structure closes.
                        b' ' | b'\t' | b'\r' | b'\n' | b',' | b':' | b'-' | b'+' | b'.' => {}
                        b'0'..=b'9' | b'e' | b'E' | b't' | b'r' | b'u' | b'f' | b'a' | b'l' => {}
                        b's' | b'n' => {}
                        _ => return self.invalid(b, "an unexpected character", out),
                    }
                }
            }
        }
        self.buf.push(b);
        if self.buf.len() > MAX_MESSAGE {
            out.push(Input::TooLong);
            self.reset_and_skip(b);
            return;
        }
        if self.state == State::Structure && !self.in_string && self.depth == 0 {
            self.finish(out);
        }
    }

    /// A message ended: parse it.
    fn finish(&mut self, out: &mut Vec<Input>) {
        let parsed = serde_json::from_slice::<Value>(&self.buf);
        let last = self.buf.last().copied().unwrap_or(b'\n');
        match parsed {
            Ok(v) => {
                out.push(Input::Value(v));
                self.reset();
            }
            Err(e) => {
                out.push(Input::Invalid(e.to_string()));
                self.reset_and_skip(last);
            }
        }
    }

    /// A byte no JSON message can have where it stands.
    fn invalid(&mut self, b: u8, what: &str, out: &mut Vec<Input>) {
        out.push(Input::Invalid(format!(
            "{what} ({:?}) at byte {} of the message",
            char::from(b),
            self.buf.len() + 1
        )));
        self.reset_and_skip(b);
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.state = State::Between;
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
    }

    /// Drops the message so far and the rest of its line (`last` was its last byte).
    fn reset_and_skip(&mut self, last: u8) {
        self.reset();
        if last != b'\n' {
            self.state = State::Skipping;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn values(inputs: Vec<Input>) -> Vec<Value> {
        inputs
            .into_iter()
            .map(|i| match i {
                Input::Value(v) => v,
                Input::Invalid(_) => json!("INVALID"),
                Input::TooLong => json!("TOOLONG"),
            })
            .collect()
    }

    fn split(chunks: &[&[u8]]) -> Vec<Value> {
        let mut s = Splitter::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(s.push(c));
        }
        values(out)
    }

    #[test]
    fn compact_and_newline_separated_messages() {
        assert_eq!(
            split(&[b"{\"a\":1}{\"b\":[2,{\"c\":\"}]\\\"\"}]}\n  {\"d\":3}\r\n"]),
            [
                json!({"a": 1}),
                json!({"b": [2, {"c": "}]\""}]}),
                json!({"d": 3})
            ]
        );
    }

    #[test]
    fn a_message_split_anywhere_is_the_same_message() {
        let msg = br#"{"execute": "x", "arguments": {"s": "a\"b{[\\", "n": [1, 2]}}"#;
        let whole = split(&[msg]);
        for cut in 0..msg.len() {
            assert_eq!(split(&[&msg[..cut], &msg[cut..]]), whole, "cut at {cut}");
        }
    }

    #[test]
    fn the_tail_of_a_bad_line_is_not_a_command() {
        // `xx` then, in a second write, a valid command on the same line.
        assert_eq!(
            split(&[b"xx ", b"{\"execute\":\"stop\"}\n", b"{\"ok\":1}\n"]),
            [json!("INVALID"), json!({"ok": 1})]
        );
        assert_eq!(
            split(&[b"{\"a\": nope}", b" {\"execute\":\"stop\"}\n{\"ok\":2}"]),
            [json!("INVALID"), json!({"ok": 2})]
        );
    }

    #[test]
    fn garbage_inside_a_structure_is_reported_at_once() {
        assert_eq!(
            split(&[b"{not json\n", b"{\"ok\":1}\n"]),
            [json!("INVALID"), json!({"ok": 1})]
        );
        // A raw newline cannot be in a string: the line ends there.
        assert_eq!(
            split(&[b"{\"a\": \"open\n{\"ok\":2}\n"]),
            [json!("INVALID"), json!({"ok": 2})]
        );
        // Every byte of valid JSON between strings is let through.
        assert_eq!(
            split(&[b"{\"n\": [-1.5e+3, 2E-1, true, false, null]}"]),
            [json!({"n": [-1500.0, 0.2, true, false, null]})]
        );
    }

    #[test]
    fn scalars_are_values_and_garbage_is_invalid() {
        assert_eq!(
            split(&[b"12 true\n\"s\" null\n"]),
            [json!(12), json!(true), json!("s"), json!(null)]
        );
        assert_eq!(
            split(&[b"]\n{\"x\":1}\n"]),
            [json!("INVALID"), json!({"x": 1})]
        );
    }

    #[test]
    fn too_long_is_reported_once_and_its_line_skipped() {
        let mut s = Splitter::new();
        let mut out = s.push(b"{\"s\": \"");
        for _ in 0..(MAX_MESSAGE / 4096 + 2) {
            out.extend(s.push(&[b'a'; 4096]));
        }
        out.extend(s.push(b"\"} {\"execute\":\"stop\"}\n{\"ok\":1}\n"));
        assert_eq!(values(out), [json!("TOOLONG"), json!({"ok": 1})]);
    }

    #[test]
    fn a_trickled_megabyte_is_looked_at_once() {
        let mut s = Splitter::new();
        let mut msg = b"{\"s\": \"".to_vec();
        msg.extend(std::iter::repeat_n(b'z', MAX_MESSAGE - 100));
        msg.extend_from_slice(b"\"}\n");
        let mut out = Vec::new();
        for b in &msg {
            out.extend(s.push(std::slice::from_ref(b)));
        }
        assert_eq!(out.len(), 1);
        assert!(
            matches!(&out[0], Input::Value(v) if v["s"].as_str().map(str::len) == Some(MAX_MESSAGE - 100))
        );
        assert_eq!(s.scanned(), msg.len() as u64);
    }

    #[test]
    fn nesting_past_serde_json_limits_is_invalid_not_a_crash() {
        let deep = format!("{}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(split(&[deep.as_bytes()]), [json!("INVALID")]);
    }
}
