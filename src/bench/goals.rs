//! The goals of issue 6, judged on one run's results. Speed is reported, not asserted: a
//! goal not met does not change the exit code.

use serde::{Deserialize, Serialize};

use super::results::ScenarioResult;

/// Largest ratio of the 4×1000 load's commit time to the ceiling's.
const COMMIT_TIME_RATIO: f64 = 1.25;
/// Smallest ratio of the 64×1 load's ack rows/s to the floor's.
const FLOOR_MULTIPLE: f64 = 5.0;
/// Largest p99 ack latency of the 64×1 load, in ms.
const P99_MS: f64 = 5.0;
/// Smallest ratio of the drain's rows/s to the ceiling's.
const DRAIN_RATIO: f64 = 0.9;
/// Largest peak RSS of the restarted daemon, in MiB.
const RSS_MIB: f64 = 128.0;
/// Longest time until the restarted daemon is ready, in seconds.
const READY_SECONDS: f64 = 2.0;
/// The backlog of the restart goal, in bytes.
const GOAL_BACKLOG: u64 = 2 << 30;

/// One goal and how the run measured up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goal {
    /// What is asked.
    pub goal: String,
    /// `met`, `not met` or `not measured`.
    pub status: String,
    /// The measured ratio the goal is judged on (see `measured` for its meaning).
    pub ratio: Option<f64>,
    /// What was measured, in words.
    pub measured: String,
}

impl Goal {
    fn judged(goal: &str, met: bool, ratio: f64, measured: String) -> Goal {
        Goal {
            goal: goal.to_string(),
            status: if met { "met" } else { "not met" }.to_string(),
            ratio: Some(ratio),
            measured,
        }
    }

    fn not_measured(goal: &str, why: &str) -> Goal {
        Goal {
            goal: goal.to_string(),
            status: "not measured".to_string(),
            ratio: None,
            measured: why.to_string(),
        }
    }
}

/// The four goals, judged on `results` (a failed scenario does not count as measured).
pub fn judge(results: &[ScenarioResult]) -> Vec<Goal> {
    let passed = |f: &dyn Fn(&ScenarioResult) -> bool| results.iter().find(|r| r.passed() && f(r));
    let ceiling = passed(&|r| r.name == "ceiling");
    let floor = passed(&|r| r.name == "floor");
    let bulk = passed(&|r| r.is_load(4, 1000, "durable"));
    let single = passed(&|r| r.is_load(64, 1, "durable"));
    let drain = passed(&|r| r.name == "drain");
    let restart = passed(&|r| r.name == "restart");
    vec![
        commit_time(ceiling, bulk),
        single_rows(floor, single),
        drain_rate(ceiling, drain),
        restart_goal(restart),
    ]
}

fn commit_time(ceiling: Option<&ScenarioResult>, bulk: Option<&ScenarioResult>) -> Goal {
    const GOAL: &str = "pgspool durable 4×1000: all rows committed in at most 1.25× the \
                        ceiling's time (end-to-end rows/s ≥ ceiling rows/s ÷ 1.25)";
    let (Some(ceiling), Some(end_to_end)) =
        (ceiling, bulk.and_then(|b| b.end_to_end_rows_per_second))
    else {
        return Goal::not_measured(
            GOAL,
            "needs the ceiling and the pgspool durable 4×1000 load",
        );
    };
    // The ratio of times for the same number of rows.
    let ratio = ceiling.rows_per_second / end_to_end;
    Goal::judged(
        GOAL,
        ratio <= COMMIT_TIME_RATIO,
        ratio,
        format!(
            "{ratio:.2}× the ceiling's time: {end_to_end:.0} rows/s end to end against the \
             ceiling's {:.0}",
            ceiling.rows_per_second
        ),
    )
}

fn single_rows(floor: Option<&ScenarioResult>, single: Option<&ScenarioResult>) -> Goal {
    const GOAL: &str = "pgspool durable 64×1: ack rows/s at least 5× the floor's, p99 ack \
                        latency under 5 ms";
    let (Some(floor), Some(single)) = (floor, single) else {
        return Goal::not_measured(GOAL, "needs the floor and the pgspool durable 64×1 load");
    };
    let p99 = single.latency_ms.map_or(f64::INFINITY, |l| l.p99);
    let ratio = single.rows_per_second / floor.rows_per_second;
    Goal::judged(
        GOAL,
        ratio >= FLOOR_MULTIPLE && p99 < P99_MS,
        ratio,
        format!(
            "{ratio:.2}× the floor's rows/s ({:.0} against {:.0}), p99 {p99:.2} ms",
            single.rows_per_second, floor.rows_per_second
        ),
    )
}

fn drain_rate(ceiling: Option<&ScenarioResult>, drain: Option<&ScenarioResult>) -> Goal {
    const GOAL: &str = "drain after an outage: at least 0.9× the ceiling's rows/s";
    let (Some(ceiling), Some(drain)) = (ceiling, drain) else {
        return Goal::not_measured(GOAL, "needs the ceiling and the drain");
    };
    let ratio = drain.rows_per_second / ceiling.rows_per_second;
    Goal::judged(
        GOAL,
        ratio >= DRAIN_RATIO,
        ratio,
        format!(
            "{ratio:.2}× the ceiling's rows/s ({:.0} against {:.0})",
            drain.rows_per_second, ceiling.rows_per_second
        ),
    )
}

fn restart_goal(restart: Option<&ScenarioResult>) -> Goal {
    const GOAL: &str = "restart with a 2 GiB backlog: daemon peak RSS under 128 MiB, ready \
                        in under 2 s";
    let Some(restart) = restart else {
        return Goal::not_measured(GOAL, "needs the restart");
    };
    let (Some(rss), Some(ready)) = (restart.daemon_peak_rss_mib, restart.ready_seconds) else {
        return Goal::not_measured(GOAL, "the restart measured no RSS or ready time");
    };
    let backlog = restart.backlog_bytes.unwrap_or(0);
    let mut measured = format!(
        "peak RSS {rss:.1} MiB ({:.2}× the limit), ready after {ready:.2} s ({:.2}× the limit)",
        rss / RSS_MIB,
        ready / READY_SECONDS
    );
    if backlog < GOAL_BACKLOG {
        measured.push_str(&format!(
            "; backlog was {:.1} MiB, below the 2 GiB of the goal",
            backlog as f64 / f64::from(1 << 20)
        ));
    }
    // The goal holds when both fractions of their limits are below 1.
    let ratio = (rss / RSS_MIB).max(ready / READY_SECONDS);
    Goal::judged(
        GOAL,
        rss < RSS_MIB && ready < READY_SECONDS,
        ratio,
        measured,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, rows_per_second: f64) -> ScenarioResult {
        let mut r = ScenarioResult::new(name);
        r.rows_per_second = rows_per_second;
        r
    }

    #[test]
    fn goals_are_judged_on_ratios() {
        let mut bulk = result("pgspool", 90_000.0);
        (bulk.clients, bulk.rows_per_request, bulk.ack) =
            (Some(4), Some(1000), Some("durable".into()));
        bulk.end_to_end_rows_per_second = Some(80_000.0);
        let mut single = result("pgspool", 30_000.0);
        (single.clients, single.rows_per_request, single.ack) =
            (Some(64), Some(1), Some("durable".into()));
        single.latency_ms = Some(super::super::results::LatencySummary {
            p50: 1.0,
            p99: 6.0,
            p999: 9.0,
        });
        let mut restart = result("restart", 1.0);
        restart.daemon_peak_rss_mib = Some(40.0);
        restart.ready_seconds = Some(0.5);
        restart.backlog_bytes = Some(100 << 20);
        let results = [
            result("ceiling", 100_000.0),
            result("floor", 5_000.0),
            bulk,
            single,
            restart,
        ];
        let goals = judge(&results);
        assert_eq!(goals[0].status, "met", "{goals:?}");
        assert_eq!(goals[0].ratio, Some(1.25));
        assert_eq!(goals[1].status, "not met", "p99 is 6 ms: {goals:?}");
        assert_eq!(goals[1].ratio, Some(6.0));
        assert_eq!(goals[2].status, "not measured");
        assert_eq!(goals[3].status, "met");
        assert!(
            goals[3]
                .measured
                .contains("backlog was 100.0 MiB, below the 2 GiB"),
            "{goals:?}"
        );
    }
}
