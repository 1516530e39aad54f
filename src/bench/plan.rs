//! What a run of `pgspool bench` does, from its command line: the scenarios, the load
//! configurations (`--clients` zipped with `--rows-per-request`) and the sizes.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

use crate::cli::{BenchArgs, BenchScenario};
use crate::config::{Config, ConfigError};
use crate::send::AckLevel;

/// Bad usage of `pgspool bench` (the binary exits with 64).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// One load configuration of the pgspool scenario: so many clients, each sending so many
/// rows per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LoadConfig {
    /// Concurrent clients, each with its own keep-alive connection.
    pub clients: u32,
    /// Rows in each request's body.
    pub rows_per_request: u32,
}

/// Everything a run needs to know, checked.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Rows of the ceiling, of the INSERT scenarios and of each pgspool load.
    pub rows: u64,
    /// Rows of the drain and restart backlogs.
    pub backlog_rows: u64,
    /// The cap on each load scenario's sending time.
    pub duration: Duration,
    /// PostgreSQL connections of the floor and batching scenarios.
    pub connections: u32,
    /// The pgspool load configurations, in the order given.
    pub loads: Vec<LoadConfig>,
    /// The ack levels of the pgspool loads, in the order given, each once.
    pub acks: Vec<AckLevel>,
    /// The scenarios to run (they run in the order of [`BenchScenario`]).
    pub scenarios: BTreeSet<BenchScenario>,
    /// The daemons' config file (`--config`), checked to load; `None` for the defaults.
    pub daemon_config: Option<PathBuf>,
}

impl Plan {
    /// The plan of `args`.
    ///
    /// # Errors
    /// When `--clients` and `--rows-per-request` cannot be zipped, or the `--config`
    /// file does not load.
    pub fn from_args(args: &BenchArgs) -> Result<Plan, UsageError> {
        let mut acks = Vec::new();
        for ack in &args.ack {
            if !acks.contains(ack) {
                acks.push(*ack);
            }
        }
        let scenarios: BTreeSet<BenchScenario> = if args.scenario.is_empty() {
            BenchScenario::value_variants().iter().copied().collect()
        } else {
            args.scenario.iter().copied().collect()
        };
        if let Some(path) = &args.config {
            let usage = |e: ConfigError| UsageError(format!("--config: {e}"));
            let mut config = Config::load(path).map_err(usage)?;
            // The daemons get the bench's database URL on their command line.
            config
                .postgres
                .url
                .get_or_insert_with(|| "postgresql://".into());
            config.validate().map_err(usage)?;
        }
        Ok(Plan {
            rows: args.rows,
            backlog_rows: args.backlog_rows.unwrap_or(args.rows),
            duration: Duration::from_secs(args.duration),
            connections: args.connections,
            loads: zip_loads(&args.clients, &args.rows_per_request)?,
            acks,
            scenarios,
            daemon_config: args.config.clone(),
        })
    }

    /// Whether `scenario` is to run.
    pub fn runs(&self, scenario: BenchScenario) -> bool {
        self.scenarios.contains(&scenario)
    }
}

/// The name of an ack level as it goes into the query string (`durable`, ...).
pub fn ack_name(ack: AckLevel) -> String {
    ack.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// Zips the two lists pairwise into load configurations; a list of one value applies to
/// every value of the other.
///
/// # Errors
/// When both lists have more than one value and their lengths differ, or one is empty.
pub fn zip_loads(clients: &[u32], rows_per_request: &[u32]) -> Result<Vec<LoadConfig>, UsageError> {
    let pair = |c: u32, r: u32| LoadConfig {
        clients: c,
        rows_per_request: r,
    };
    match (clients, rows_per_request) {
        ([], _) | (_, []) => Err(UsageError(
            "--clients and --rows-per-request need at least one value each".to_string(),
        )),
        ([c], rs) => Ok(rs.iter().map(|&r| pair(*c, r)).collect()),
        (cs, [r]) => Ok(cs.iter().map(|&c| pair(c, *r)).collect()),
        (cs, rs) if cs.len() == rs.len() => {
            Ok(cs.iter().zip(rs).map(|(&c, &r)| pair(c, r)).collect())
        }
        (cs, rs) => Err(UsageError(format!(
            "--clients has {} values and --rows-per-request {}: they are paired one to one \
             (4,64 with 1000,1 runs 4 clients x 1000 rows and 64 clients x 1 row), so give \
             both the same number of values, or one value to apply to all",
            cs.len(),
            rs.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(loads: &[LoadConfig]) -> Vec<(u32, u32)> {
        loads
            .iter()
            .map(|l| (l.clients, l.rows_per_request))
            .collect()
    }

    #[test]
    fn lists_zip_pairwise_and_broadcast() {
        assert_eq!(
            pairs(&zip_loads(&[4, 64], &[1000, 1]).unwrap()),
            [(4, 1000), (64, 1)]
        );
        assert_eq!(
            pairs(&zip_loads(&[1, 2, 8], &[100]).unwrap()),
            [(1, 100), (2, 100), (8, 100)]
        );
        assert_eq!(
            pairs(&zip_loads(&[16], &[1, 10]).unwrap()),
            [(16, 1), (16, 10)]
        );
        assert_eq!(pairs(&zip_loads(&[3], &[7]).unwrap()), [(3, 7)]);
    }

    #[test]
    fn mismatched_lists_are_a_usage_error() {
        let err = zip_loads(&[1, 2, 3], &[10, 20]).unwrap_err();
        assert!(
            err.0
                .contains("--clients has 3 values and --rows-per-request 2"),
            "{err}"
        );
        assert!(zip_loads(&[], &[1]).is_err());
    }

    #[test]
    fn ack_names_are_the_query_values() {
        assert_eq!(ack_name(AckLevel::Durable), "durable");
        assert_eq!(ack_name(AckLevel::Committed), "committed");
    }
}
