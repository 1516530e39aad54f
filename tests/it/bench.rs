//! `pgspool bench` (issue 6): every scenario runs against a real PostgreSQL and ends
//! with its exact check; the exact check itself fails when a row is missing, twice, or
//! dead-lettered.

use std::path::Path;
use std::process::Output;

use serde_json::Value;

use crate::harness::{Pg, short_tempdir};

async fn pgspool(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_pgspool"))
        .args(args)
        .env_remove("PGSPOOL_DATABASE_URL")
        .output()
        .await
        .expect("run pgspool")
}

fn said(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_runs_every_scenario_checks_it_and_cleans_up() {
    let pg = Pg::start().await;
    let dir = short_tempdir();
    let json = dir.path().join("bench.json");
    let markdown = dir.path().join("bench.md");
    // The daemons run with the given config: small batches, so each load commits several.
    let config = dir.path().join("pgspool.toml");
    std::fs::write(&config, "[batch]\nmax_rows = 500\n").unwrap();
    let url = pg.url();
    let out = pgspool(&[
        "bench",
        "--database-url",
        &url,
        "--config",
        path(&config),
        "--rows",
        "3000",
        "--duration",
        "2",
        "--clients",
        "2,8",
        "--rows-per-request",
        "100,1",
        "--backlog-rows",
        "5000",
        "--json",
        path(&json),
        "--markdown",
        path(&markdown),
    ])
    .await;
    assert!(out.status.success(), "bench failed: {}", said(&out));

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let scenarios = report["scenarios"].as_array().expect("scenarios");
    let names: Vec<String> = scenarios
        .iter()
        .map(|s| {
            let mut name = s["name"].as_str().unwrap().to_string();
            if let (Some(ack), "pgspool") = (s["ack"].as_str(), name.as_str()) {
                name = format!("{name} {ack} {}x{}", s["clients"], s["rows_per_request"]);
            }
            name
        })
        .collect();
    assert_eq!(
        names,
        [
            "ceiling",
            "floor",
            "batching",
            "pgspool durable 2x100",
            "pgspool committed 2x100",
            "pgspool durable 8x1",
            "pgspool committed 8x1",
            "drain",
            "restart"
        ],
        "{report:#}"
    );
    for s in scenarios {
        assert_eq!(s["check"], "ok", "{s:#}");
        assert!(s["rows"].as_u64().unwrap() > 0, "{s:#}");
        assert!(s["rows_per_second"].as_f64().unwrap() > 0.0, "{s:#}");
        assert!(s["ratio_to_ceiling"].as_f64().unwrap() > 0.0, "{s:#}");
    }
    for s in &scenarios[3..] {
        assert!(s["daemon_peak_rss_mib"].as_f64().unwrap() > 0.0, "{s:#}");
        assert!(s["committed_seconds"].as_f64().unwrap() > 0.0, "{s:#}");
    }
    assert_eq!(scenarios[0]["rows"], 3000, "the ceiling copies every row");
    assert_eq!(scenarios[7]["rows"], 5000, "the drain's backlog");
    assert!(scenarios[8]["ready_seconds"].as_f64().unwrap() > 0.0);
    assert!(scenarios[8]["backlog_bytes"].as_u64().unwrap() > 0);
    assert_eq!(scenarios[3]["latency_cdf"].as_array().unwrap().len(), 9);
    assert_eq!(report["goals"].as_array().unwrap().len(), 4);
    assert_eq!(report["machine"]["postgresql"]["fsync"], "on");
    let p50 = report["machine"]["fdatasync_p50_ms"].as_f64().unwrap();
    let p99 = report["machine"]["fdatasync_p99_ms"].as_f64().unwrap();
    assert!(
        0.0 < p50 && p50 <= p99,
        "fdatasync p50 {p50} ms, p99 {p99} ms"
    );

    let md = std::fs::read_to_string(&markdown).unwrap();
    assert!(
        md.contains("| scenario | clients×rows/request | rows | rows/s |"),
        "{md}"
    );
    assert!(md.contains("| pgspool durable | 2×100 |"), "{md}");
    assert!(md.contains("; fdatasync of 4 KiB: p50 "), "{md}");
    assert_eq!(md.matches("xychart-beta").count(), 2, "{md}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("goals:"), "{stdout}");

    // The schema is gone, and so are the rows of the bench's spools in pgspool's tables.
    let schemas = pg
        .count("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'pgspool_bench_%'")
        .await;
    assert_eq!(schemas, 0);
    for table in ["watermarks", "dead_letters", "held_tables"] {
        let rows = pg
            .count(&format!("SELECT count(*) FROM pgspool.{table}"))
            .await;
        assert_eq!(rows, 0, "pgspool.{table}");
    }

    // The report is drawn again from the JSON alone, the same.
    let again = dir.path().join("again.md");
    let out = pgspool(&[
        "bench",
        "--from-json",
        path(&json),
        "--markdown",
        path(&again),
    ])
    .await;
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(std::fs::read_to_string(&again).unwrap(), md);
}

#[tokio::test]
async fn mismatched_lists_are_a_usage_error() {
    let out = pgspool(&["bench", "--clients", "1,2,3", "--rows-per-request", "10,20"]).await;
    assert_eq!(out.status.code(), Some(64), "{}", said(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--clients has 3 values and --rows-per-request 2"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_config_that_does_not_load_is_a_usage_error() {
    let dir = short_tempdir();
    let config = dir.path().join("pgspool.toml");
    std::fs::write(&config, "[batch]\nmax_rows = 0\n").unwrap();
    let out = pgspool(&["bench", "--config", path(&config)]).await;
    assert_eq!(out.status.code(), Some(64), "{}", said(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--config") && stderr.contains("max_rows"),
        "{stderr}"
    );
    let missing = dir.path().join("missing.toml");
    let out = pgspool(&["bench", "--config", path(&missing)]).await;
    assert_eq!(out.status.code(), Some(64), "{}", said(&out));
}

#[tokio::test]
async fn the_exact_check_finds_missing_duplicate_and_dead_lettered_rows() {
    use pgspool::bench::check_exact;
    let pg = Pg::start().await;
    pg.exec("CREATE TABLE t (id bigint NOT NULL); INSERT INTO t VALUES (1), (2), (3)")
        .await;
    check_exact(&pg.client, "t", None, 3).await.expect("exact");

    pg.exec("DELETE FROM t WHERE id = 2").await;
    let err = check_exact(&pg.client, "t", None, 3).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "PostgreSQL holds 2 rows with 2 distinct ids, ids 1 to 3, where 3 rows with ids 1 to 3 \
         were sent"
    );
    pg.exec("INSERT INTO t VALUES (2), (2)").await;
    let err = check_exact(&pg.client, "t", None, 3).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("PostgreSQL holds 4 rows with 3 distinct ids"),
        "{err}"
    );
    let err = check_exact(&pg.client, "t", None, 4).await.unwrap_err();
    assert!(
        err.to_string().contains("4 rows with ids 1 to 4 were sent"),
        "{err}"
    );

    pg.exec("TRUNCATE t").await;
    check_exact(&pg.client, "t", None, 0)
        .await
        .expect("nothing sent, nothing held");
    pg.exec("INSERT INTO t VALUES (1)").await;
    pgspool::flush::transaction::bootstrap(&pg.client)
        .await
        .expect("pgspool's tables");
    let spool = uuid::Uuid::new_v4();
    check_exact(&pg.client, "t", Some(spool), 1)
        .await
        .expect("no dead letters");
    pg.client
        .execute(
            "INSERT INTO pgspool.dead_letters (spool_id, lsn, table_name, row, message) \
             VALUES ($1, 2, 'public.t', '{\"id\": 2}', 'refused')",
            &[&spool],
        )
        .await
        .unwrap();
    let err = check_exact(&pg.client, "t", Some(spool), 1)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("dead_letters holds 1 row of spool"),
        "{err}"
    );
}
