//! The verdict: one judgement of a status report, the same for the daemon's live view
//! and for a WAL directory read without it (see [`crate::status`] for the rules).

use serde::{Deserialize, Serialize};

use super::{Connection, Live, WalStatus, rows};

/// How things stand, worst first when several reasons apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Nothing wrong: exit code 0.
    Healthy,
    /// The daemon runs but something keeps rows from PostgreSQL: exit code 1.
    Degraded,
    /// No daemon answers on the socket: exit code 2.
    Unreachable,
    /// The WAL is damaged: exit code 2.
    Corrupt,
}

impl State {
    /// The exit code of `pgspool status` in this state.
    #[must_use]
    pub fn exit_code(self) -> u8 {
        match self {
            State::Healthy => 0,
            State::Degraded => 1,
            State::Unreachable | State::Corrupt => 2,
        }
    }
}

/// What is wrong, by severity: the first reason of a verdict names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Acknowledged data is damaged or missing.
    CorruptWal,
    /// No daemon answers on the socket (the report was read from the WAL directory).
    DaemonNotRunning,
    /// The flusher's last session with PostgreSQL failed, and none has succeeded since.
    PostgresDown,
    /// PostgreSQL refuses every row of some tables; their rows wait in the WAL.
    TablesHeld,
    /// More rows arrived than were flushed over the last minute, and the oldest pending
    /// row is older than the backlog age limit.
    BacklogGrowing,
    /// The daemon is stopping and accepts no writes.
    Stopping,
}

impl Kind {
    /// The words the one-line verdict starts with.
    #[must_use]
    pub fn headline(self) -> &'static str {
        match self {
            Kind::CorruptWal => "corrupt WAL",
            Kind::DaemonNotRunning => "daemon not running",
            Kind::PostgresDown => "PostgreSQL down",
            Kind::TablesHeld => "tables held",
            Kind::BacklogGrowing => "backlog growing",
            Kind::Stopping => "stopping",
        }
    }

    fn state(self) -> State {
        match self {
            Kind::CorruptWal => State::Corrupt,
            Kind::DaemonNotRunning => State::Unreachable,
            _ => State::Degraded,
        }
    }
}

/// One thing wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    /// What.
    pub kind: Kind,
    /// The details.
    pub message: String,
}

/// The judgement of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// How things stand: the state of the worst reason, or healthy.
    pub state: State,
    /// The exit code of `pgspool status`: 0 healthy, 1 degraded, 2 unreachable or corrupt.
    pub exit_code: u8,
    /// The one-line verdict: `healthy: ...`, or the worst reason's headline and message.
    pub summary: String,
    /// Every reason found, worst first.
    pub reasons: Vec<Reason>,
}

/// Judges the WAL directory's state `wal` with what the daemon reported live (`live`;
/// every field `None` when the directory was read without it, and `not_running` then says
/// why no daemon answered).
#[must_use]
pub fn judge(wal: &WalStatus, live: &Live, not_running: Option<&str>) -> Verdict {
    let mut reasons = Vec::new();
    let mut add = |kind, message: String| reasons.push(Reason { kind, message });
    if !wal.intact {
        let first = wal.problems.first().map_or("", String::as_str);
        let more = match wal.problems.len() {
            0 | 1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        add(
            Kind::CorruptWal,
            format!("acknowledged data is damaged or missing: {first}{more}"),
        );
    }
    if let Some(why) = not_running {
        add(Kind::DaemonNotRunning, why.to_string());
    }
    if let Some(pg) = &live.postgres
        && pg.state == Connection::Down
    {
        add(
            Kind::PostgresDown,
            format!(
                "for {}: {}; rows wait in the WAL",
                super::duration(pg.for_seconds()),
                pg.error.as_deref().unwrap_or("no error recorded")
            ),
        );
    }
    let held: Vec<&str> = wal
        .flusher
        .iter()
        .flat_map(|r| &r.tables)
        .filter(|(_, t)| t.held_after_lsn.is_some())
        .map(|(name, _)| name.as_str())
        .collect();
    if !held.is_empty() {
        add(
            Kind::TablesHeld,
            format!(
                "PostgreSQL refuses every row of {}; those rows wait in the WAL (see the last \
                 errors)",
                held.join(", ")
            ),
        );
    }
    if let (Some(rates), Some(limit), Some(age)) = (
        &live.rates,
        live.backlog_age_limit_seconds,
        wal.oldest_pending_age_seconds,
    ) && age > limit
    {
        let (ingest, flushed) = (
            rates.ingest_rows_per_s.last_1m,
            rates.flush_rows_per_s.last_1m,
        );
        // Growing, or not draining at all (a flusher stuck on a lock, say).
        let why = if flushed == 0.0 {
            Some("nothing was flushed in the last minute".to_string())
        } else if ingest > flushed {
            Some(format!(
                "in the last minute {ingest:.1} rows/s in, {flushed:.1} rows/s flushed"
            ))
        } else {
            None
        };
        if let Some(why) = why {
            add(
                Kind::BacklogGrowing,
                format!(
                    "{} pending, the oldest for {}; {why}",
                    rows(wal.pending_rows),
                    super::duration(age),
                ),
            );
        }
    }
    if live.ready == Some(false) {
        add(
            Kind::Stopping,
            "the daemon is stopping and accepts no writes".into(),
        );
    }
    reasons.sort_by_key(|r| r.kind);
    let state = reasons.first().map_or(State::Healthy, |r| r.kind.state());
    let summary = match reasons.as_slice() {
        [] if wal.pending_rows == 0 => "healthy: nothing pending".to_string(),
        [] => format!("healthy: {} pending", rows(wal.pending_rows)),
        [only] => format!("{}: {}", only.kind.headline(), only.message),
        [first, rest @ ..] => format!(
            "{} (also {}): {}",
            first.kind.headline(),
            rest.iter()
                .map(|r| r.kind.headline())
                .collect::<Vec<_>>()
                .join(", "),
            first.message
        ),
    };
    Verdict {
        state,
        exit_code: state.exit_code(),
        summary,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flush::report::{FlushReport, TableReport};
    use crate::lsn::Lsn;
    use crate::status::{PostgresState, Rates, Window};

    fn wal(pending_rows: u64, oldest: Option<f64>) -> WalStatus {
        WalStatus {
            wal_dir: "/w".into(),
            spool_id: uuid::Uuid::nil(),
            segments: 1,
            bytes: 64,
            first_lsn: Lsn(1),
            last_lsn: Lsn(pending_rows),
            flushed_lsn: Lsn::ZERO,
            watermark_lsn: Lsn::ZERO,
            pending_rows,
            pending_bytes: pending_rows * 10,
            oldest_pending_age_seconds: oldest,
            intact: true,
            checksums_ok: true,
            torn_tail_bytes: 0,
            quarantined_rows: 0,
            problems: Vec::new(),
            tables: Default::default(),
            flusher: None,
        }
    }

    fn live(ingest: f64, flush: f64) -> Live {
        let window = |r| Window {
            last_10s: r,
            last_1m: r,
        };
        Live {
            ready: Some(true),
            postgres: Some(PostgresState {
                state: Connection::Connected,
                ..PostgresState::default()
            }),
            rates: Some(Rates {
                ingest_rows_per_s: window(ingest),
                flush_rows_per_s: window(flush),
            }),
            backlog_age_limit_seconds: Some(2.0),
            ..Live::default()
        }
    }

    fn kinds(v: &Verdict) -> Vec<Kind> {
        v.reasons.iter().map(|r| r.kind).collect()
    }

    #[test]
    fn a_backlog_grows_only_when_more_arrives_than_leaves_and_the_oldest_row_is_old() {
        let growing = judge(&wal(500, Some(3.0)), &live(100.0, 10.0), None);
        assert_eq!((growing.state, growing.exit_code), (State::Degraded, 1));
        assert_eq!(kinds(&growing), [Kind::BacklogGrowing]);
        assert!(
            growing
                .summary
                .starts_with("backlog growing: 500 rows pending")
        );
        for (oldest, ingest) in [(1.0, 100.0), (3.0, 10.0)] {
            let v = judge(&wal(500, Some(oldest)), &live(ingest, 10.0), None);
            assert_eq!((v.state, v.exit_code), (State::Healthy, 0), "{v:?}");
            assert_eq!(v.summary, "healthy: 500 rows pending");
        }
        // Nothing arrives and nothing leaves: a stuck flusher, not a healthy spool.
        let stuck = judge(&wal(29, Some(105.0)), &live(0.0, 0.0), None);
        assert_eq!((stuck.state, stuck.exit_code), (State::Degraded, 1));
        assert!(
            stuck
                .summary
                .ends_with("nothing was flushed in the last minute"),
            "{}",
            stuck.summary
        );
    }

    #[test]
    fn the_worst_reason_decides_the_state_and_names_the_others() {
        let mut w = wal(2, Some(60.0));
        w.flusher = Some(FlushReport {
            tables: [(
                "public.t".to_string(),
                TableReport {
                    held_after_lsn: Some(Lsn(1)),
                    ..TableReport::default()
                },
            )]
            .into(),
            ..FlushReport::default()
        });
        let mut l = live(1.0, 0.0);
        l.postgres = Some(PostgresState {
            state: Connection::Down,
            since_us: 0,
            error: Some("cannot connect".into()),
        });
        let v = judge(&w, &l, None);
        assert_eq!(
            kinds(&v),
            [Kind::PostgresDown, Kind::TablesHeld, Kind::BacklogGrowing]
        );
        assert!(
            v.summary
                .starts_with("PostgreSQL down (also tables held, backlog growing): for "),
            "{}",
            v.summary
        );
        w.intact = false;
        w.problems = vec!["segment x: bad".into()];
        let v = judge(&w, &Live::default(), Some("nothing answers"));
        assert_eq!((v.state, v.exit_code), (State::Corrupt, 2));
        assert_eq!(
            kinds(&v),
            [Kind::CorruptWal, Kind::DaemonNotRunning, Kind::TablesHeld]
        );
        w.intact = true;
        let v = judge(&w, &Live::default(), Some("nothing answers"));
        assert_eq!((v.state, v.exit_code), (State::Unreachable, 2));
    }
}
