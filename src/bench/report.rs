//! How `pgspool bench` shows its results: a line per scenario as it ends, the table, the
//! goals, the `--json` file and the `--markdown` report with its Mermaid charts.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use super::results::{BenchReport, CDF_PERCENTILES, ScenarioResult};

/// The table's header.
const HEADER: [&str; 10] = [
    "scenario",
    "clients×rows/request",
    "rows",
    "rows/s",
    "ratio to ceiling",
    "ack p50 / p99 / p99.9 ms",
    "all committed after (s)",
    "daemon CPU s per M rows",
    "peak RSS MiB",
    "check",
];

/// The scenario's name in the table: `ceiling (COPY)`, `pgspool durable`, ...
pub fn label(r: &ScenarioResult) -> String {
    match r.name.as_str() {
        "ceiling" => "ceiling (COPY)".to_string(),
        "floor" => "floor (INSERT per row)".to_string(),
        "batching" => "app batching (multi-row INSERT)".to_string(),
        "pgspool" => format!("pgspool {}", r.ack.as_deref().unwrap_or("durable")),
        "drain" => "drain after an outage".to_string(),
        "restart" => "restart after SIGKILL".to_string(),
        other => other.to_string(),
    }
}

/// `4×1000`, `8 conn × 500`, `1 COPY`.
fn shape(r: &ScenarioResult) -> String {
    match (r.name.as_str(), r.clients, r.rows_per_request) {
        ("ceiling", _, _) => "1 COPY".to_string(),
        ("floor" | "batching", Some(c), Some(n)) => format!("{c} conn × {n}"),
        (_, Some(c), Some(n)) => format!("{c}×{n}"),
        _ => "-".to_string(),
    }
}

fn or_dash(value: Option<f64>, format: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| "-".to_string(), format)
}

/// The table's cells of one result.
fn cells(r: &ScenarioResult) -> [String; 10] {
    [
        label(r),
        shape(r),
        r.rows.to_string(),
        format!("{:.0}", r.rows_per_second),
        or_dash(r.ratio_to_ceiling, |x| format!("{x:.2}")),
        r.latency_ms.map_or_else(
            || "-".to_string(),
            |l| format!("{:.2} / {:.2} / {:.2}", l.p50, l.p99, l.p999),
        ),
        or_dash(r.committed_seconds, |x| format!("{x:.2}")),
        or_dash(r.daemon_cpu_seconds_per_million_rows, |x| format!("{x:.2}")),
        or_dash(r.daemon_peak_rss_mib, |x| format!("{x:.1}")),
        if r.passed() { "ok" } else { "FAILED" }.to_string(),
    ]
}

/// One line for a scenario that just ended.
pub fn progress_line(r: &ScenarioResult) -> String {
    format!(
        "{:<32} {:>14} {:>10} rows {:>10.0} rows/s  {}",
        label(r),
        shape(r),
        r.rows,
        r.rows_per_second,
        if r.passed() { "ok" } else { "FAILED" }
    )
}

/// What the table does not show: backlogs, restart times, failures.
fn notes(report: &BenchReport) -> Vec<String> {
    let mut notes = Vec::new();
    for r in &report.scenarios {
        if let (Some(bytes), Some(rate)) = (r.backlog_bytes, r.backlog_ack_rows_per_second) {
            let mut note = format!(
                "{}: a backlog of {} rows ({:.1} MiB of WAL) was acknowledged at {rate:.0} rows/s \
                 while a session held the table's ACCESS EXCLUSIVE lock (PostgreSQL took none)",
                label(r),
                r.rows,
                bytes as f64 / f64::from(1 << 20)
            );
            if let Some(ready) = r.ready_seconds {
                note.push_str(&format!(
                    "; after SIGKILL and the lock's release, the new daemon answered /healthz \
                     in {ready:.3} s"
                ));
            }
            notes.push(note);
        }
        if !r.passed() {
            notes.push(format!("{} {} FAILED: {}", label(r), shape(r), r.check));
        }
    }
    notes
}

/// The table, the notes and the goals, as text for a terminal.
pub fn text(report: &BenchReport) -> String {
    let rows: Vec<[String; 10]> = report.scenarios.iter().map(cells).collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            let pad = " ".repeat(w.saturating_sub(cell.chars().count()));
            if i == 0 {
                out.push_str(&format!("{cell}{pad}"));
            } else {
                out.push_str(&format!("  {pad}{cell}"));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}", line(&HEADER.map(String::from)));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row));
    }
    let notes = notes(report);
    if !notes.is_empty() {
        out.push('\n');
    }
    for note in notes {
        let _ = writeln!(out, "{note}");
    }
    let _ = writeln!(out, "\ngoals:");
    for goal in &report.goals {
        let _ = writeln!(
            out,
            "  [{}] {}\n      {}",
            goal.status, goal.goal, goal.measured
        );
    }
    out
}

/// The Markdown report: machine, command, table, goals and two Mermaid charts.
pub fn markdown(report: &BenchReport) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## pgspool bench\n");
    let _ = writeln!(
        md,
        "Run at {} with pgspool {}.\n",
        report.started_at, report.pgspool_version
    );
    let _ = writeln!(md, "- Machine: {}", report.machine.summary());
    let _ = writeln!(md, "- PostgreSQL: {}", report.machine.postgres_summary());
    let _ = writeln!(md, "- Command: `{}`\n", report.command.join(" "));
    let _ = writeln!(md, "| {} |", HEADER.join(" | "));
    let _ = writeln!(md, "|---|{}", "---:|".repeat(HEADER.len() - 1));
    for r in &report.scenarios {
        let _ = writeln!(md, "| {} |", cells(r).join(" | "));
    }
    let notes = notes(report);
    if !notes.is_empty() {
        md.push('\n');
        for note in notes {
            let _ = writeln!(md, "- {note}");
        }
    }
    let _ = writeln!(md, "\n### Goals\n");
    for goal in &report.goals {
        let _ = writeln!(
            md,
            "- **{}**: {}. Measured: {}.",
            goal.status, goal.goal, goal.measured
        );
    }
    throughput_chart(report, &mut md);
    latency_chart(report, &mut md);
    md
}

/// Chart 1: durable ack and end-to-end rows/s of each load configuration, in client
/// order, with the ceiling and the floor as reference lines.
fn throughput_chart(report: &BenchReport, md: &mut String) {
    let mut loads: Vec<&ScenarioResult> = report
        .scenarios
        .iter()
        .filter(|r| r.name == "pgspool" && r.ack.as_deref() == Some("durable") && r.passed())
        .collect();
    if loads.is_empty() {
        return;
    }
    loads.sort_by_key(|r| (r.clients, r.rows_per_request));
    let reference = |name: &str| {
        report
            .scenarios
            .iter()
            .find(|r| r.name == name && r.passed())
            .map(|r| r.rows_per_second)
    };
    let series = |values: Vec<f64>| {
        let numbers: Vec<String> = values.iter().map(|v| format!("{v:.0}")).collect();
        format!("[{}]", numbers.join(", "))
    };
    let mut lines = vec![(
        "end-to-end rows/s (until all committed)",
        series(
            loads
                .iter()
                .map(|r| r.end_to_end_rows_per_second.unwrap_or(0.0))
                .collect(),
        ),
    )];
    for (name, what) in [
        ("ceiling", "the ceiling (COPY)"),
        ("floor", "the floor (INSERT per row)"),
    ] {
        if let Some(rate) = reference(name) {
            lines.push((what, series(vec![rate; loads.len()])));
        }
    }
    let categories: Vec<String> = loads.iter().map(|r| format!("\"{}\"", shape(r))).collect();
    let _ = writeln!(md, "\n### Throughput against clients (pgspool durable)\n");
    let described: Vec<&str> = lines.iter().map(|(what, _)| *what).collect();
    let _ = writeln!(
        md,
        "Bars: acknowledged rows/s. Lines, in this order: {}.\n",
        described.join("; ")
    );
    let _ = writeln!(md, "```mermaid\nxychart-beta");
    let _ = writeln!(
        md,
        "    title \"rows/s against clients × rows per request\""
    );
    let _ = writeln!(
        md,
        "    x-axis \"clients × rows per request\" [{}]",
        categories.join(", ")
    );
    let _ = writeln!(md, "    y-axis \"rows/s\"");
    let _ = writeln!(
        md,
        "    bar {}",
        series(loads.iter().map(|r| r.rows_per_second).collect())
    );
    for (_, values) in &lines {
        let _ = writeln!(md, "    line {values}");
    }
    let _ = writeln!(md, "```");
}

/// Chart 2: the ack latency CDF of every pgspool run.
fn latency_chart(report: &BenchReport, md: &mut String) {
    let runs: Vec<&ScenarioResult> = report
        .scenarios
        .iter()
        .filter(|r| r.name == "pgspool" && r.latency_cdf.len() == CDF_PERCENTILES.len())
        .collect();
    if runs.is_empty() {
        return;
    }
    let names: Vec<String> = runs
        .iter()
        .map(|r| format!("{} {}", label(r), shape(r)))
        .collect();
    let categories: Vec<String> = CDF_PERCENTILES
        .iter()
        .map(|p| format!("\"p{p}\""))
        .collect();
    let _ = writeln!(md, "\n### Ack latency (ms) at percentiles\n");
    let _ = writeln!(md, "Lines, in this order: {}.\n", names.join("; "));
    let _ = writeln!(md, "```mermaid\nxychart-beta");
    let _ = writeln!(md, "    title \"ack latency (ms) at percentiles\"");
    let _ = writeln!(md, "    x-axis \"percentile\" [{}]", categories.join(", "));
    let _ = writeln!(md, "    y-axis \"ms\"");
    for r in runs {
        let values: Vec<String> = r
            .latency_cdf
            .iter()
            .map(|(_, ms)| format!("{ms:.3}"))
            .collect();
        let _ = writeln!(md, "    line [{}]", values.join(", "));
    }
    let _ = writeln!(md, "```");
}

/// Writes the report as JSON to `path`.
///
/// # Errors
/// When the file cannot be written.
pub fn write_json(report: &BenchReport, path: &Path) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
}

/// Writes the Markdown report to `path`.
///
/// # Errors
/// When the file cannot be written.
pub fn write_markdown(report: &BenchReport, path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, markdown(report)).with_context(|| format!("writing {}", path.display()))
}

/// Reads the JSON file of an earlier run.
///
/// # Errors
/// When the file cannot be read or is not such a report.
pub fn read_json(path: &Path) -> anyhow::Result<BenchReport> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not the JSON of pgspool bench", path.display()))
}

#[cfg(test)]
mod tests {
    use super::super::results::{Latencies, LatencySummary};
    use super::*;

    fn report() -> BenchReport {
        let mut ceiling = ScenarioResult::new("ceiling");
        ceiling.rows = 100;
        ceiling.rows_per_second = 1000.0;
        let mut load = ScenarioResult::new("pgspool");
        (load.clients, load.rows_per_request, load.ack) =
            (Some(4), Some(1000), Some("durable".into()));
        load.rows_per_second = 800.0;
        load.end_to_end_rows_per_second = Some(700.0);
        load.latency_ms = Some(LatencySummary {
            p50: 1.0,
            p99: 2.0,
            p999: 3.0,
        });
        load.set_latencies(&Latencies::new(vec![
            std::time::Duration::from_millis(2);
            10
        ]));
        let mut failed = ScenarioResult::new("drain");
        failed.check = "PostgreSQL holds 9 rows".to_string();
        BenchReport {
            pgspool_version: "0.1.0".into(),
            started_at: "2025-01-01T00:00:00Z".into(),
            command: vec!["pgspool".into(), "bench".into()],
            machine: super::super::machine::Machine::default(),
            scenarios: vec![ceiling, load, failed],
            goals: super::super::goals::judge(&[]),
        }
    }

    #[test]
    fn the_markdown_holds_the_table_goals_and_charts() {
        let md = markdown(&report());
        assert!(md.contains("| scenario | clients×rows/request |"), "{md}");
        assert!(
            md.contains("| pgspool durable | 4×1000 | 0 | 800 |"),
            "{md}"
        );
        assert!(
            md.contains("drain after an outage - FAILED: PostgreSQL holds 9 rows"),
            "{md}"
        );
        assert_eq!(md.matches("xychart-beta").count(), 2, "{md}");
        assert!(
            md.contains("bar [800]\n    line [700]\n    line [1000]"),
            "{md}"
        );
        assert!(md.contains("**not measured**"), "{md}");
        let text = text(&report());
        assert!(text.contains("FAILED"), "{text}");
    }
}
