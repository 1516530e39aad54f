//! What a PostgreSQL error means for the rows that met it, by SQLSTATE.
//!
//! Sources: PostgreSQL 15 documentation, Appendix A "PostgreSQL Error Codes", and the
//! `line N` context COPY adds to errors raised for one of its rows
//! (`src/backend/commands/copyfrom.c`, `CopyFromErrorCallback`).
//!
//! | class | meaning | what the flusher does |
//! |---|---|---|
//! | [`Class::Row`] | 22 data exception, 23 integrity constraint, 54000, any error COPY reports with a `line N` context, and any other SQLSTATE not listed here (a trigger's `RAISE`, P0001, raised after the COPY's last row by an AFTER ROW trigger, names no line) | the row is found (by line number, or by bisection) and goes to `pgspool.dead_letters`; the rest of the batch commits |
//! | [`Class::Table`] | 42 syntax or access rule (missing table or column, no permission), 0A, 28, 3D, 3F | that table's rows are held in the WAL and retried with backoff; other tables flow |
//! | [`Class::Transient`] | 08 connection, 25006 read-only transaction, 40001, 40P01, 53 resources, 55P03, 55006, 57014, 57P0x, 58 system I/O, and errors without a SQLSTATE (I/O, timeouts, a closed connection) | reconnect and retry the batch with capped exponential backoff |

/// What an error says about the rows that met it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// One row's data is refused. `line` is COPY's 1-based line number of the row within
    /// the statement's data, when PostgreSQL gave one.
    Row {
        /// The failing line of the COPY data, from the error's context.
        line: Option<u64>,
    },
    /// The table (its existence, columns, privileges, triggers) refuses every row for now.
    Table,
    /// The server or the connection failed; the same statements may succeed later.
    Transient,
}

impl Class {
    /// Whether this error is PostgreSQL's `statement_timeout` (57014, `query_canceled`):
    /// a transient failure that a smaller batch avoids.
    #[must_use]
    pub fn is_timeout(e: &tokio_postgres::Error) -> bool {
        e.as_db_error()
            .is_some_and(|db| db.code().code() == "57014")
    }
}

/// Classifies `e`, raised while COPYing into the table named `relation` (its bare name, as
/// COPY's error context prints it), or by any other statement (see the module table).
#[must_use]
pub fn classify(e: &tokio_postgres::Error, relation: &str) -> Class {
    let Some(db) = e.as_db_error() else {
        return Class::Transient;
    };
    by_sqlstate(db.code().code(), db.where_(), relation)
}

/// Classifies a SQLSTATE and the error's context (`where`), as [`classify`] does.
#[must_use]
pub fn by_sqlstate(code: &str, context: Option<&str>, relation: &str) -> Class {
    const TRANSIENT: [&str; 8] = [
        "25006", "40001", "40P01", "55006", "55P03", "57014", "57P01", "57P02",
    ];
    let class = code.get(..2).unwrap_or("");
    if TRANSIENT.contains(&code) || matches!(class, "08" | "53" | "57" | "58") {
        return Class::Transient;
    }
    if matches!(class, "42" | "0A" | "28" | "3D" | "3F") {
        return Class::Table;
    }
    Class::Row {
        line: context.and_then(|c| copy_line(c, relation)),
    }
}

/// The line number in a COPY error context such as
/// `COPY flights, line 3, column dep_time: "abc"`: the context's `COPY <relation>, line N`
/// frame (a trigger's own frames come before it). The relation's name is matched exactly,
/// so a name or value holding ", line " cannot be taken for the number.
fn copy_line(context: &str, relation: &str) -> Option<u64> {
    let prefix = format!("COPY {relation}, line ");
    context.lines().rev().find_map(|frame| {
        let rest = frame.strip_prefix(&prefix)?;
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_fall_into_their_classes() {
        let row = |line| Class::Row { line };
        for (code, context, class) in [
            ("23505", None, row(None)),
            (
                "22P02",
                Some("COPY t, line 7, column x: \"a\""),
                row(Some(7)),
            ),
            ("54000", None, row(None)),
            (
                "P0001",
                Some("PL/pgSQL function f() line 3 at RAISE\nCOPY t, line 12"),
                row(Some(12)),
            ),
            ("P0001", None, row(None)),
            ("XX000", None, row(None)),
            ("42804", Some("COPY t, line 3"), Class::Table),
            ("42P01", None, Class::Table),
            ("42703", None, Class::Table),
            ("42501", None, Class::Table),
            ("0A000", None, Class::Table),
            ("08006", None, Class::Transient),
            ("25006", None, Class::Transient),
            ("40001", None, Class::Transient),
            ("53300", None, Class::Transient),
            ("57014", Some("COPY t, line 9000"), Class::Transient),
            ("57P01", None, Class::Transient),
            ("55P03", None, Class::Transient),
            ("58030", None, Class::Transient),
        ] {
            assert_eq!(by_sqlstate(code, context, "t"), class, "{code} {context:?}");
        }
    }

    #[test]
    fn line_numbers_come_from_the_copy_frame_only() {
        assert_eq!(copy_line("COPY a b, line 3: \"x\"", "a b"), Some(3));
        assert_eq!(
            copy_line("SQL statement \"SELECT 1\"\nCOPY t, line 41", "t"),
            Some(41)
        );
        assert_eq!(
            copy_line("COPY x, line 5, line 9, column c", "x, line 5"),
            Some(9)
        );
        assert_eq!(
            copy_line("PL/pgSQL function f() line 3 at RAISE", "t"),
            None
        );
        assert_eq!(copy_line("COPY t", "t"), None);
    }
}
