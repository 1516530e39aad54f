//! The human-readable report: the verdict, aligned key/value lines, a table per table, the
//! last errors and the problems, no line wider than [`WIDTH`] columns. Nothing is cut: long
//! text wraps onto indented lines (a word wider than a line, such as a path, is broken
//! across lines), and a table name wider than its column gets a line of its own, before
//! its numbers.

use std::fmt::Write;

use super::{Connection, Report, Source, duration, rows};
use crate::fsutil;

/// The widest line, in characters.
pub const WIDTH: usize = 100;

/// The report for people (see the module docs).
#[must_use]
pub fn render(report: &Report) -> String {
    let (s, live) = (&report.wal, &report.live);
    let flusher = s.flusher.clone().unwrap_or_default();
    let mut out = String::new();
    wrap(&mut out, "", "    ", &report.verdict.summary);
    let mut lines: Vec<(&str, String)> = Vec::new();
    match report.source {
        Source::Daemon => {
            let ready = if live.ready == Some(false) {
                "stopping, accepts no writes"
            } else {
                "accepting writes"
            };
            let up = duration(live.uptime_seconds.unwrap_or_default());
            lines.push(("daemon", format!("up {up}, {ready}")));
        }
        Source::WalDir => {
            lines.push(("daemon", "not answering; the WAL directory was read".into()))
        }
    }
    lines.push(("wal dir", s.wal_dir.display().to_string()));
    lines.push(("spool id", s.spool_id.to_string()));
    lines.push(("segments", format!("{} ({} bytes)", s.segments, s.bytes)));
    let lsns = if s.segments == 0 {
        "none (no segments)".to_string()
    } else if s.last_lsn < s.first_lsn {
        format!("none held (the next is {})", s.last_lsn.next())
    } else {
        format!("{} .. {}", s.first_lsn, s.last_lsn)
    };
    lines.push(("LSNs", lsns));
    if let Some(durable) = live.durable_lsn {
        lines.push(("durable LSN", durable.to_string()));
    }
    let flushed = if s.flushed_lsn < s.watermark_lsn {
        format!(
            "{} (held tables' rows: from {})",
            s.watermark_lsn,
            s.flushed_lsn.next()
        )
    } else {
        s.watermark_lsn.to_string()
    };
    lines.push(("flushed LSN", flushed));
    let pending = match report.counted_at_us {
        None => format!(
            "{} (the LSNs above the watermark; the WAL is being counted)",
            rows(s.pending_rows)
        ),
        Some(at) => {
            let ago = fsutil::now_us().saturating_sub(at) as f64 / 1e6;
            let ago = if report.source == Source::Daemon && ago >= 1.0 {
                format!(" (bytes and tables counted {} ago)", duration(ago))
            } else {
                String::new()
            };
            format!("{}, {} bytes{ago}", rows(s.pending_rows), s.pending_bytes)
        }
    };
    lines.push(("pending", pending));
    let oldest = match (s.oldest_pending_age_seconds, report.counted_at_us) {
        (Some(age), _) => duration(age),
        (None, None) => COUNTING.to_string(),
        (None, Some(_)) => "-".to_string(),
    };
    lines.push(("oldest pending", oldest));
    if let Some(rates) = &live.rates {
        for (key, w) in [
            ("ingest rate", rates.ingest_rows_per_s),
            ("flush rate", rates.flush_rows_per_s),
        ] {
            lines.push((
                key,
                format!(
                    "{:.1} rows/s over 10 s, {:.1} rows/s over 1 min",
                    w.last_10s, w.last_1m
                ),
            ));
        }
    }
    if let Some(pg) = &live.postgres {
        let since = duration(pg.for_seconds());
        lines.push((
            "PostgreSQL",
            match pg.state {
                Connection::Connecting => format!("connecting (for {since})"),
                Connection::Connected => format!("connected (for {since})"),
                Connection::Down => format!(
                    "down (for {since}): {}",
                    pg.error.as_deref().unwrap_or_default()
                ),
            },
        ));
    } else if let Some(error) = &flusher.postgres_error {
        lines.push(("PostgreSQL", format!("last failure: {error}")));
    }
    lines.push(("torn tail", format!("{} bytes", s.torn_tail_bytes)));
    lines.push(("quarantined", rows(s.quarantined_rows)));
    let dead_letters: u64 = flusher.tables.values().map(|t| t.dead_letters).sum();
    lines.push(("dead letters", rows(dead_letters)));
    for (key, value) in lines {
        wrap(&mut out, &format!("  {key:<15} "), &" ".repeat(18), &value);
    }
    let mut names: Vec<&String> = s.tables.keys().chain(flusher.tables.keys()).collect();
    names.sort();
    names.dedup();
    if !names.is_empty() {
        let rows: Vec<[String; 5]> = names
            .iter()
            .map(|name| {
                let backlog = s.tables.get(*name).cloned().unwrap_or_default();
                let table = flusher.tables.get(*name).cloned().unwrap_or_default();
                let count = |n: Option<u64>| match (n, report.counted_at_us) {
                    (Some(n), _) => n.to_string(),
                    (None, None) => COUNTING.to_string(),
                    (None, Some(_)) => "0".to_string(),
                };
                [
                    count(backlog.pending_rows),
                    count(backlog.pending_bytes),
                    backlog
                        .flushed_rows
                        .map_or_else(|| "-".to_string(), |n| n.to_string()),
                    table.dead_letters.to_string(),
                    table.held_after_lsn.map_or_else(
                        || "flowing".to_string(),
                        |lsn| format!("held from LSN {}", lsn.next()),
                    ),
                ]
            })
            .collect();
        // The name column takes the room the numbers and the widest state leave.
        let state = rows.iter().map(|r| r[4].chars().count()).max().unwrap_or(0);
        let room = WIDTH.saturating_sub(2 + (2 + 12) + (2 + 13) + (2 + 12) + (2 + 12) + 2 + state);
        let longest = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
        let width = longest.min(room).max(5);
        let _ = writeln!(
            out,
            "\n  {:<width$}  {:>12}  {:>13}  {:>12}  {:>12}  state",
            "table", "pending rows", "pending bytes", "flushed rows", "dead letters"
        );
        for (name, [pending, bytes, flushed, dead, state]) in names.iter().zip(&rows) {
            let shown = if name.chars().count() > width {
                wrap(&mut out, "  ", "  ", name);
                ""
            } else {
                name.as_str()
            };
            let _ = writeln!(
                out,
                "  {shown:<width$}  {pending:>12}  {bytes:>13}  {flushed:>12}  {dead:>12}  {state}"
            );
        }
    }
    let errors: Vec<_> = flusher
        .tables
        .iter()
        .filter_map(|(name, t)| t.last_error.as_ref().map(|e| (name, e)))
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(out, "\n  last errors");
        for (name, e) in errors {
            let code = e.sqlstate.as_deref().unwrap_or("pgspool");
            let line = format!("{name} (LSN {}, {code}): {}", e.lsn, e.message);
            wrap(&mut out, "  ", "    ", &line);
        }
    }
    if !s.problems.is_empty() {
        let _ = writeln!(out, "\n  problems");
        for problem in &s.problems {
            wrap(&mut out, "  ", "    ", problem);
        }
    }
    out
}

/// What a count not finished yet shows.
const COUNTING: &str = "counting…";

/// Appends `text` after `first`, wrapped at spaces onto lines that start with `indent`,
/// so that no line is wider than [`WIDTH`]; a word wider than a line is broken across
/// lines rather than cut.
fn wrap(out: &mut String, first: &str, indent: &str, text: &str) {
    let room = |lead: &str| WIDTH.saturating_sub(lead.chars().count()).max(20);
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        while !word.is_empty() {
            let lead = if lines.len() == 1 { first } else { indent };
            let line = lines.last_mut().expect("one line at least");
            let len = line.chars().count();
            let sep = usize::from(len > 0);
            let free = room(lead).saturating_sub(len + sep);
            if word.len() > free && len > 0 && (word.len() <= room(indent) || free < 8) {
                // On a line of its own: it fits there, or little of it fits here.
                lines.push(String::new());
                continue;
            }
            let take = word.len().min(free);
            if sep == 1 {
                line.push(' ');
            }
            line.extend(word.drain(..take));
            if !word.is_empty() {
                lines.push(String::new());
            }
        }
    }
    for (i, line) in lines.iter().enumerate() {
        let lead = if i == 0 { first } else { indent };
        let _ = writeln!(out, "{lead}{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_lines_fit_and_keep_every_word() {
        let mut out = String::new();
        let text = "word ".repeat(60) + &"x".repeat(150);
        wrap(&mut out, "  key             ", &" ".repeat(18), &text);
        assert!(out.lines().all(|l| l.chars().count() <= WIDTH), "{out}");
        assert_eq!(out.matches("word").count(), 60, "{out}");
        assert_eq!(
            out.matches('x').count(),
            150,
            "the long word is broken, not cut: {out}"
        );
        assert!(
            out.lines().skip(1).all(|l| l.starts_with(&" ".repeat(18))),
            "{out}"
        );
    }
}
