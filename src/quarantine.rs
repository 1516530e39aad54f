//! `pgspool quarantine`: the operator's explicit choice to go on without damaged records
//! (see [`crate::wal::damage`] for what it does to the WAL directory).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use crate::cli::QuarantineArgs;
use crate::status::progress_bar;
use crate::wal::damage::{self, QuarantineReport};

/// Runs `pgspool quarantine` and prints what it moved.
///
/// # Errors
/// When the config file cannot be read, the daemon holds the directory, or the directory
/// cannot be read or rewritten.
pub fn run(args: &QuarantineArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.resolve()?;
    let bar = progress_bar(&dir, "scanning");
    let report = damage::quarantine(&dir, &mut |done| {
        if let Some(bar) = &bar {
            bar.set_position(done);
        }
    })
    .with_context(|| format!("cannot quarantine damage in {}", dir.display()))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    print!("{}", render(&dir, &report));
    Ok(ExitCode::SUCCESS)
}

/// What the command did, one line per damaged range, and what follows.
#[must_use]
pub fn render(dir: &Path, report: &QuarantineReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for q in &report.moved {
        let _ = match &q.saved_to {
            Some(saved_to) => writeln!(
                out,
                "moved aside: {}; the bytes are in {}",
                q.damage,
                saved_to.display()
            ),
            None => writeln!(out, "passed over: {}", q.damage),
        };
    }
    if let Some(cleared) = &report.cleared {
        let _ = writeln!(
            out,
            "cleared the damage the daemon recorded while flushing ({cleared}){}",
            if report.moved.is_empty() {
                ": every record reads cleanly now (a failed read, not damaged bytes?)"
            } else {
                ""
            }
        );
    }
    if report.moved.is_empty() && report.cleared.is_none() {
        let _ = writeln!(
            out,
            "no damaged records in {}; nothing moved",
            dir.display()
        );
    } else if !report.moved.is_empty() {
        let rows: u64 = report.moved.iter().filter_map(|q| q.damage.rows()).sum();
        let _ = writeln!(
            out,
            "{rows} acknowledged rows will not be loaded; the daemon can start again"
        );
    }
    if report.torn_tail_bytes > 0 {
        let _ = writeln!(
            out,
            "a torn write of {} bytes ends the log: the daemon cuts it at its next start",
            report.torn_tail_bytes
        );
    }
    out
}
