//! What `pgspool bench` measured: one [`ScenarioResult`] per scenario run, the
//! [`BenchReport`] that holds them (the `--json` file), and the latency statistics.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::goals::Goal;
use super::machine::Machine;

/// The percentiles of the latency CDF, in percent.
pub const CDF_PERCENTILES: [f64; 9] = [10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 100.0];

/// The value `check` holds when a scenario passed.
pub const CHECK_OK: &str = "ok";

/// Everything one run measured: the `--json` file, and what `--from-json` reads back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    /// The version of the pgspool that ran the bench.
    pub pgspool_version: String,
    /// When the run started (RFC 3339, UTC).
    pub started_at: String,
    /// The command line (argv) of the run.
    pub command: Vec<String>,
    /// The machine and the PostgreSQL server.
    pub machine: Machine,
    /// Each scenario run, in order.
    pub scenarios: Vec<ScenarioResult>,
    /// The goals of issue 6 with what was measured.
    pub goals: Vec<Goal>,
}

/// Ack latencies at three percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
}

/// The result of one scenario. Fields that do not apply to it are `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// `ceiling`, `floor`, `batching`, `pgspool`, `drain` or `restart`.
    pub name: String,
    /// Concurrent clients (pgspool) or PostgreSQL connections (floor, batching).
    pub clients: Option<u32>,
    /// Rows per request (pgspool) or per statement (floor, batching).
    pub rows_per_request: Option<u32>,
    /// The ack level of a pgspool scenario (`durable`, `committed`).
    pub ack: Option<String>,
    /// Rows sent and checked.
    pub rows: u64,
    /// The measured time, in seconds: the COPY (ceiling), the sending (floor, batching,
    /// pgspool: until the last ack), the drain from the lock's release (drain), from the
    /// new daemon's start until every row is committed (restart).
    pub seconds: f64,
    /// `rows` / `seconds`.
    pub rows_per_second: f64,
    /// `rows_per_second` / the ceiling's, when the ceiling ran.
    pub ratio_to_ceiling: Option<f64>,
    /// Latency of each statement (floor, batching) or request (pgspool), in ms.
    pub latency_ms: Option<LatencySummary>,
    /// `[percentile, ms]` at each of [`CDF_PERCENTILES`].
    pub latency_cdf: Vec<(f64, f64)>,
    /// Seconds from the first request (or the lock's release, or the restart) until
    /// PostgreSQL held every row.
    pub committed_seconds: Option<f64>,
    /// `rows` / `committed_seconds` of a pgspool load.
    pub end_to_end_rows_per_second: Option<f64>,
    /// The daemon's CPU time (user + system) per million rows, in seconds.
    pub daemon_cpu_seconds_per_million_rows: Option<f64>,
    /// The daemon's peak resident set (VmHWM), in MiB.
    pub daemon_peak_rss_mib: Option<f64>,
    /// Bytes of WAL segments on disk once the backlog was acknowledged (drain, restart).
    pub backlog_bytes: Option<u64>,
    /// Rows/s at which the backlog was acknowledged while PostgreSQL took none (drain,
    /// restart): the ingest path alone.
    pub backlog_ack_rows_per_second: Option<f64>,
    /// Seconds from the new daemon's start until `/healthz` answered 200 (restart).
    pub ready_seconds: Option<f64>,
    /// [`CHECK_OK`], or what went wrong.
    pub check: String,
}

impl ScenarioResult {
    /// A result named `name` with nothing measured yet.
    pub fn new(name: &str) -> ScenarioResult {
        ScenarioResult {
            name: name.to_string(),
            check: CHECK_OK.to_string(),
            ..ScenarioResult::default()
        }
    }

    /// Whether the scenario ran and passed its check.
    pub fn passed(&self) -> bool {
        self.check == CHECK_OK
    }

    /// Sets `rows`, `seconds` and `rows_per_second`.
    pub fn set_rate(&mut self, rows: u64, elapsed: Duration) {
        self.rows = rows;
        self.seconds = elapsed.as_secs_f64();
        self.rows_per_second = per_second(rows, elapsed);
    }

    /// Sets the latency summary and CDF.
    pub fn set_latencies(&mut self, latencies: &Latencies) {
        self.latency_ms = latencies.summary();
        self.latency_cdf = latencies.cdf();
    }

    /// Whether this is the pgspool load of `clients` × `rows_per_request` with `ack`.
    pub fn is_load(&self, clients: u32, rows_per_request: u32, ack: &str) -> bool {
        self.name == "pgspool"
            && self.clients == Some(clients)
            && self.rows_per_request == Some(rows_per_request)
            && self.ack.as_deref() == Some(ack)
    }
}

/// `rows` per second over `elapsed`; zero over no time.
pub fn per_second(rows: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        rows as f64 / seconds
    } else {
        0.0
    }
}

/// Sets every result's `ratio_to_ceiling` from the ceiling's rows/s (a passed ceiling).
pub fn fill_ratios(results: &mut [ScenarioResult]) {
    let ceiling = results
        .iter()
        .find(|r| r.name == "ceiling" && r.passed() && r.rows_per_second > 0.0)
        .map(|r| r.rows_per_second);
    for result in results {
        result.ratio_to_ceiling = ceiling
            .filter(|_| result.passed())
            .map(|c| result.rows_per_second / c);
    }
}

/// Latencies, sorted, for percentiles.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    sorted: Vec<Duration>,
}

impl Latencies {
    /// Sorts `latencies`.
    pub fn new(mut latencies: Vec<Duration>) -> Latencies {
        latencies.sort_unstable();
        Latencies { sorted: latencies }
    }

    /// The latency at `percentile` (0 to 100) by the nearest-rank method: the smallest
    /// latency that at least `percentile` percent of all are at or below; `None` without
    /// latencies.
    pub fn percentile(&self, percentile: f64) -> Option<Duration> {
        let n = self.sorted.len();
        if n == 0 {
            return None;
        }
        // The small tolerance keeps 99.9 % of 1000 at rank 999, not 1000, despite
        // floating-point rounding.
        let rank = (percentile / 100.0 * n as f64 - 1e-9).ceil();
        let rank = (rank.max(1.0) as usize).min(n);
        Some(self.sorted[rank - 1])
    }

    /// p50, p99 and p99.9 in milliseconds; `None` without latencies.
    pub fn summary(&self) -> Option<LatencySummary> {
        Some(LatencySummary {
            p50: millis(self.percentile(50.0)?),
            p99: millis(self.percentile(99.0)?),
            p999: millis(self.percentile(99.9)?),
        })
    }

    /// `[percentile, ms]` at each of [`CDF_PERCENTILES`]; empty without latencies.
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        CDF_PERCENTILES
            .iter()
            .filter_map(|&p| Some((p, millis(self.percentile(p)?))))
            .collect()
    }
}

/// A duration in milliseconds.
fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: impl IntoIterator<Item = u64>) -> Latencies {
        Latencies::new(values.into_iter().map(Duration::from_millis).collect())
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let l = ms((1..=1000).rev());
        assert_eq!(l.percentile(50.0), Some(Duration::from_millis(500)));
        assert_eq!(l.percentile(99.0), Some(Duration::from_millis(990)));
        assert_eq!(l.percentile(99.9), Some(Duration::from_millis(999)));
        assert_eq!(l.percentile(100.0), Some(Duration::from_millis(1000)));
        assert_eq!(l.percentile(0.0), Some(Duration::from_millis(1)));

        let few = ms([30, 10, 20]);
        assert_eq!(few.percentile(10.0), Some(Duration::from_millis(10)));
        assert_eq!(few.percentile(50.0), Some(Duration::from_millis(20)));
        assert_eq!(few.percentile(99.9), Some(Duration::from_millis(30)));

        assert_eq!(Latencies::default().percentile(50.0), None);
        assert_eq!(Latencies::default().summary(), None);
        assert!(Latencies::default().cdf().is_empty());
    }

    #[test]
    fn summary_and_cdf_are_in_milliseconds() {
        let l = ms(1..=1000);
        let s = l.summary().unwrap();
        assert_eq!((s.p50, s.p99, s.p999), (500.0, 990.0, 999.0));
        let cdf = l.cdf();
        assert_eq!(cdf.len(), CDF_PERCENTILES.len());
        assert_eq!(cdf[0], (10.0, 100.0));
        assert_eq!(cdf[8], (100.0, 1000.0));
    }

    #[test]
    fn ratios_need_a_passed_ceiling() {
        let mut ceiling = ScenarioResult::new("ceiling");
        ceiling.set_rate(100, Duration::from_secs(1));
        let mut floor = ScenarioResult::new("floor");
        floor.set_rate(10, Duration::from_secs(1));
        let mut results = vec![ceiling, floor];
        fill_ratios(&mut results);
        assert_eq!(results[0].ratio_to_ceiling, Some(1.0));
        assert_eq!(results[1].ratio_to_ceiling, Some(0.1));
        results[0].check = "count differs".to_string();
        fill_ratios(&mut results);
        assert_eq!(results[1].ratio_to_ceiling, None);
    }
}
