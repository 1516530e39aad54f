//! The human-readable report: the one-line verdict, aligned key/value lines, a table per
//! table, the last errors and the problems, no line wider than [`WIDTH`] columns.

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
    let _ = writeln!(out, "{}", clip(&report.verdict.summary, WIDTH));
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
    let counted = fsutil::now_us().saturating_sub(report.counted_at_us) as f64 / 1e6;
    let counted = if report.source == Source::Daemon && counted >= 1.0 {
        format!(" (counted {} ago)", duration(counted))
    } else {
        String::new()
    };
    lines.push((
        "pending",
        format!(
            "{}, {} bytes{counted}",
            rows(s.pending_rows),
            s.pending_bytes
        ),
    ));
    lines.push((
        "oldest pending",
        s.oldest_pending_age_seconds
            .map_or_else(|| "-".to_string(), duration),
    ));
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
        wrap(&mut out, &format!("  {key:<15} "), &value);
    }
    let mut names: Vec<&String> = s.tables.keys().chain(flusher.tables.keys()).collect();
    names.sort();
    names.dedup();
    if !names.is_empty() {
        let width = names
            .iter()
            .map(|n| n.chars().count())
            .max()
            .unwrap_or(5)
            .clamp(5, 24);
        let _ = writeln!(
            out,
            "\n  {:<width$}  {:>12}  {:>13}  {:>12}  {:>12}  state",
            "table", "pending rows", "pending bytes", "flushed rows", "dead letters"
        );
        for name in &names {
            let backlog = s.tables.get(*name).cloned().unwrap_or_default();
            let table = flusher.tables.get(*name).cloned().unwrap_or_default();
            let state = table
                .held_after_lsn
                .map_or_else(|| "flowing".to_string(), |lsn| format!("held (LSN {lsn})"));
            let line = format!(
                "  {:<width$}  {:>12}  {:>13}  {:>12}  {:>12}  {state}",
                clip(name, width),
                backlog.pending_rows,
                backlog.pending_bytes,
                backlog
                    .flushed_rows
                    .map_or_else(|| "-".to_string(), |n| n.to_string()),
                table.dead_letters
            );
            let _ = writeln!(out, "{}", clip(&line, WIDTH));
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
            wrap(&mut out, "  ", &line);
        }
    }
    if !s.problems.is_empty() {
        let _ = writeln!(out, "\n  problems");
        for problem in &s.problems {
            wrap(&mut out, "  ", problem);
        }
    }
    out
}

/// Appends `text` after `first` (whose width the next lines are indented by), wrapped at
/// spaces so that no line is wider than [`WIDTH`] (a word wider than a line is cut).
fn wrap(out: &mut String, first: &str, text: &str) {
    let indent = first.chars().count();
    let room = WIDTH.saturating_sub(indent).max(20);
    let mut line = String::new();
    let mut lines = Vec::new();
    for word in text.split_whitespace() {
        let len = line.chars().count();
        if len > 0 && len + 1 + word.chars().count() > room {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    lines.push(line);
    for (i, line) in lines.iter().enumerate() {
        let lead = if i == 0 {
            first.to_string()
        } else {
            " ".repeat(indent)
        };
        let _ = writeln!(out, "{}", clip(&format!("{lead}{line}"), WIDTH));
    }
}

/// `text` cut to `width` characters, with an ellipsis when cut.
fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_lines_fit_and_keep_every_word() {
        let mut out = String::new();
        let text = "word ".repeat(60) + &"x".repeat(150);
        wrap(&mut out, "  key             ", &text);
        assert!(out.lines().all(|l| l.chars().count() <= WIDTH), "{out}");
        assert_eq!(out.matches("word").count(), 60, "{out}");
        assert!(
            out.lines().skip(1).all(|l| l.starts_with(&" ".repeat(18))),
            "{out}"
        );
    }
}
