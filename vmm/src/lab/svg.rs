//! One run's timeline as an SVG picture: acknowledged units per second as bars, the
//! host's storage state and the VM's run state as coloured bands, QMP events and the
//! operator's commands as marked lines. Plain SVG 1.1, no scripts, no external files.

use std::fmt::Write;

use holdfast_block::sim::timeline::{HostState, Timeline, VmState};

use super::report::{CrashInfo, LogMark};

const WIDTH: f64 = 900.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const BARS_TOP: f64 = 40.0;
const BARS_HEIGHT: f64 = 140.0;
const BAND_HEIGHT: f64 = 18.0;
const HOST_TOP: f64 = BARS_TOP + BARS_HEIGHT + 30.0;
const VM_TOP: f64 = HOST_TOP + BAND_HEIGHT + 8.0;
const EVENTS_TOP: f64 = VM_TOP + BAND_HEIGHT + 14.0;
const HEIGHT: f64 = EVENTS_TOP + 130.0;

fn host_colour(s: HostState) -> &'static str {
    match s {
        HostState::Ok => "#4caf50",
        HostState::Broken => "#e53935",
        HostState::Hung => "#fb8c00",
        HostState::Down => "#212121",
    }
}

fn vm_colour(s: VmState) -> &'static str {
    match s {
        VmState::Running => "#4caf50",
        VmState::Paused => "#9e9e9e",
        VmState::IoError => "#e53935",
    }
}

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Draws `t` with `title` above it.
pub fn timeline(title: &str, t: &Timeline) -> String {
    let seconds = (t.end as f64 / 1000.0).max(1.0);
    let plot = WIDTH - LEFT - RIGHT;
    let x = |ms: u64| LEFT + plot * (ms as f64 / 1000.0) / seconds;
    let per = t.acks_per_second();
    let top = per.iter().copied().max().unwrap_or(0).max(1);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{}</text>"##,
        esc(title)
    );
    // Acknowledged units per second.
    let _ = writeln!(
        s,
        r##"<text x="4" y="{}" >acked/s</text><text x="{}" y="{}" text-anchor="end">{top}</text><text x="{}" y="{}" text-anchor="end">0</text>"##,
        BARS_TOP + BARS_HEIGHT / 2.0,
        LEFT - 4.0,
        BARS_TOP + 8.0,
        LEFT - 4.0,
        BARS_TOP + BARS_HEIGHT
    );
    for (sec, &n) in per.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let x0 = x(sec as u64 * 1000);
        let x1 = x((sec as u64 + 1) * 1000).min(WIDTH - RIGHT);
        let h = BARS_HEIGHT * n as f64 / top as f64;
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#1e88e5"><title>second {sec}: {n} acked</title></rect>"##,
            BARS_TOP + BARS_HEIGHT - h,
            (x1 - x0 - 1.0).max(1.0)
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{0}" x2="{1}" y2="{0}" stroke="#000"/>"##,
        BARS_TOP + BARS_HEIGHT,
        WIDTH - RIGHT
    );
    // Seconds axis.
    let step = ((seconds / 10.0).ceil() as u64).max(1);
    let mut sec = 0;
    while sec as f64 <= seconds {
        let xs = x(sec * 1000);
        let _ = writeln!(
            s,
            r##"<text x="{xs:.1}" y="{}" text-anchor="middle">{sec}s</text>"##,
            BARS_TOP + BARS_HEIGHT + 14.0
        );
        sec += step;
    }
    // State bands.
    band(&mut s, "host", HOST_TOP, &t.host, t.end, &x, |st| {
        (host_colour(st), st.as_str())
    });
    band(&mut s, "VM", VM_TOP, &t.vm, t.end, &x, |st| {
        (vm_colour(st), st.as_str())
    });
    // Events: a line down from the VM band, the names of those at the same time in
    // one label, rotated beside it.
    let mut i = 0;
    while i < t.events.len() {
        let at = t.events[i].0;
        let same: Vec<&str> = t.events[i..]
            .iter()
            .take_while(|(a, _)| *a == at)
            .map(|(_, e)| e.as_str())
            .collect();
        i += same.len();
        let label = esc(&same.join(", "));
        let xe = x(at);
        let _ = writeln!(
            s,
            r##"<line x1="{xe:.1}" y1="{HOST_TOP}" x2="{xe:.1}" y2="{EVENTS_TOP}" stroke="#6a1b9a" stroke-dasharray="2,2"/>"##
        );
        let xt = xe + 3.0;
        let _ = writeln!(
            s,
            r##"<text x="{xt:.1}" y="{EVENTS_TOP}" transform="rotate(60 {xt:.1} {EVENTS_TOP})" fill="#6a1b9a">{label}<title>{:.1} s: {label}</title></text>"##,
            at as f64 / 1000.0,
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A power cut's crash state: the first run's timeline (up to the cut), and below
/// it the write log of the first disk the guest writes, entry by entry in the order the device
/// completed them: flushes as black ticks, writes before the last flush (on the disk
/// in every state) grey, and of the writes after it those that landed green, torn
/// orange, lost red. A log longer than the strip is drawn a column per group of
/// entries, coloured by the group's worst (lost, torn, landed, flushed, stable).
pub fn crash_state(title: &str, t: &Timeline, crash: &CrashInfo) -> String {
    let inner = timeline(title, t);
    let strip_top = HEIGHT + 30.0;
    let strip_height = 30.0;
    let total = strip_top + strip_height + 60.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{total}" viewBox="0 0 {WIDTH} {total}" font-family="sans-serif" font-size="11">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    s.push_str(&inner);
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="{:.1}">write log, in completion order ({} entries): state {} ({} seed {}): {}</text>"##,
        strip_top - 8.0,
        crash.picture.len(),
        crash.state,
        crash.mode,
        crash.seed,
        esc(&crash.landed.chars().take(110).collect::<String>())
    );
    let plot = WIDTH - LEFT - RIGHT;
    let n = crash.picture.len().max(1);
    let columns = n.min(plot as usize);
    let rank = |m: LogMark| match m {
        LogMark::Stable => 0,
        LogMark::Flush => 1,
        LogMark::Landed => 2,
        LogMark::Torn => 3,
        LogMark::Lost => 4,
    };
    for c in 0..columns {
        let (from, to) = (
            c * n / columns,
            ((c + 1) * n / columns).max(c * n / columns + 1),
        );
        let Some(worst) = crash.picture[from..to.min(crash.picture.len())]
            .iter()
            .copied()
            .max_by_key(|m| rank(*m))
        else {
            continue;
        };
        let colour = match worst {
            LogMark::Stable => "#9e9e9e",
            LogMark::Flush => "#000000",
            LogMark::Landed => "#43a047",
            LogMark::Torn => "#fb8c00",
            LogMark::Lost => "#e53935",
        };
        let w = plot / columns as f64;
        let _ = writeln!(
            s,
            r##"<rect x="{:.2}" y="{strip_top}" width="{:.2}" height="{strip_height}" fill="{colour}"/>"##,
            LEFT + c as f64 * w,
            w.max(0.5)
        );
    }
    let legend = [
        ("#9e9e9e", "before the last flush"),
        ("#000000", "flush"),
        ("#43a047", "landed"),
        ("#fb8c00", "torn"),
        ("#e53935", "lost"),
    ];
    let mut x = LEFT;
    for (colour, name) in legend {
        let y = strip_top + strip_height + 20.0;
        let _ = writeln!(
            s,
            r##"<rect x="{x}" y="{:.1}" width="10" height="10" fill="{colour}"/><text x="{:.1}" y="{y:.1}">{name}</text>"##,
            y - 9.0,
            x + 14.0
        );
        x += 150.0;
    }
    s.push_str("</svg>\n");
    s
}

fn band<S: Copy>(
    s: &mut String,
    label: &str,
    y: f64,
    states: &[(u64, S)],
    end: u64,
    x: &dyn Fn(u64) -> f64,
    look: impl Fn(S) -> (&'static str, &'static str),
) {
    let _ = writeln!(
        s,
        r##"<text x="4" y="{:.1}">{label}</text>"##,
        y + BAND_HEIGHT - 5.0
    );
    for (i, &(from, st)) in states.iter().enumerate() {
        let to = states.get(i + 1).map(|&(t, _)| t).unwrap_or(end).max(from);
        let (colour, name) = look(st);
        let (x0, x1) = (x(from), x(to));
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{y}" width="{:.1}" height="{BAND_HEIGHT}" fill="{colour}"><title>{label} {name} from {:.1} s to {:.1} s</title></rect>"##,
            (x1 - x0).max(0.5),
            from as f64 / 1000.0,
            to as f64 / 1000.0
        );
        if x1 - x0 > 40.0 {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" fill="#ffffff">{name}</text>"##,
                x0 + 4.0,
                y + BAND_HEIGHT - 5.0
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_part_and_escapes_text() {
        let mut t = Timeline {
            acks: vec![100, 200, 1500],
            ..Default::default()
        };
        t.host(1200, HostState::Broken);
        t.vm(1300, VmState::IoError);
        t.event(1300, "BLOCK_IO_ERROR");
        t.event(1300, "a<b");
        t.end = 3000;
        let svg = timeline("xfs & holdfast", &t);
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("xfs &amp; holdfast"));
        assert!(svg.contains("second 0: 2 acked") && svg.contains("second 1: 1 acked"));
        assert!(svg.contains("host broken from 1.2 s to 3.0 s"));
        assert!(svg.contains("VM io-error from 1.3 s"));
        assert!(
            svg.contains(">BLOCK_IO_ERROR, a&lt;b<"),
            "one label at one time"
        );
        assert!(!svg.contains("a<b"));
    }

    #[test]
    fn a_crash_state_shows_its_log() {
        let t = Timeline {
            end: 2000,
            ..Default::default()
        };
        let mut picture = vec![
            LogMark::Stable,
            LogMark::Flush,
            LogMark::Landed,
            LogMark::Torn,
        ];
        picture.extend(std::iter::repeat_n(LogMark::Lost, 5000));
        let crash = CrashInfo {
            state: 3,
            mode: super::super::scenario::CutMode::Torn,
            seed: 9,
            landed: "data: torn seed 9: ...".into(),
            control: false,
            picture,
        };
        let svg = crash_state("cut", &t, &crash);
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("5004 entries): state 3 (torn seed 9)"));
        for colour in ["#9e9e9e", "#43a047", "#fb8c00", "#e53935"] {
            assert!(svg.contains(colour), "{colour}");
        }
        let columns = svg.matches(r#"height="30" fill"#).count();
        assert!(columns <= 810, "one column per pixel at most: {columns}");
    }
}
