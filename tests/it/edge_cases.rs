//! The edge-case corpus (tests/data/edge_cases): every accepted row lands exactly as
//! PostgreSQL's own `jsonb_populate_record` stores it; rejected rows get a 4xx and leave
//! nothing behind.

use pgspool::dataset::compare;

use crate::harness::{Pg, client, config, flushed, post_ndjson, short_tempdir, start_daemon};

const SCHEMA: &str = include_str!("../data/edge_cases/schema.sql");
const ACCEPT: &str = include_str!("../data/edge_cases/accept.ndjson");
const REJECT: &str = include_str!("../data/edge_cases/reject.ndjson");
const REJECT_WHY: &str = include_str!("../data/edge_cases/reject.why");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_rows_land_exactly_as_jsonb_populate_record_stores_them() {
    let pg = Pg::start().await;
    pg.exec(SCHEMA).await;
    pg.exec(
        "CREATE TABLE edge_cases_array (LIKE edge_cases INCLUDING ALL);
         CREATE TABLE oracle (LIKE edge_cases INCLUDING ALL);",
    )
    .await;
    for line in ACCEPT.lines() {
        pg.client
            .execute(
                "INSERT INTO oracle SELECT * FROM jsonb_populate_record(NULL::edge_cases, $1::text::jsonb)",
                &[&line],
            )
            .await
            .unwrap_or_else(|e| panic!("oracle refused {line}: {e}"));
    }

    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;
    // Once as NDJSON, once as a JSON array.
    let reply = post_ndjson(&mut c, "edge_cases", ACCEPT).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(reply.body["rows"], 32);
    let array = format!("[{}]", ACCEPT.lines().collect::<Vec<_>>().join(","));
    let reply = c
        .post_rows("public.edge_cases_array", "application/json", array)
        .await
        .expect("request");
    assert_eq!(reply.status, 202, "{}", reply.body);
    flushed(&daemon).await;

    for table in ["edge_cases", "edge_cases_array"] {
        let comparison = compare(&pg.client, table, "oracle").await.expect("compare");
        assert!(comparison.is_equal(), "{table} vs oracle: {comparison}");
        assert_eq!(comparison.left_rows, 32);
    }
    // Spot checks the oracle itself must pass: nothing was rounded or turned into NULL.
    assert_eq!(
        pg.count("SELECT count(*) FROM edge_cases WHERE amount = 123456789012345678901234567890.123456789 AND note IS NULL").await,
        1
    );
    assert_eq!(
        pg.count(
            "SELECT count(*) FROM edge_cases WHERE id IN (4, 5, 6) AND note IN ('\\N', '\\.', '')"
        )
        .await,
        3
    );
    daemon.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_rows_get_their_4xx_and_leave_nothing_behind() {
    let pg = Pg::start().await;
    pg.exec(SCHEMA).await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = client(daemon.socket()).await;

    let expected = [
        ("text cannot hold a NUL character", 422, "NUL"),
        ("unknown column", 422, "\"nope\" does not exist"),
        ("a row must be a JSON object", 400, "must be a JSON object"),
        ("jsonb cannot hold \\u0000", 422, "NUL"),
    ];
    let mut checked = 0;
    for (line, why) in REJECT.lines().zip(REJECT_WHY.lines()) {
        let Some((_, status, says)) = expected.iter().find(|(w, _, _)| *w == why) else {
            continue; // refused by PostgreSQL itself: dead letters are a later issue
        };
        // Alone, and after a valid row in the same request: all or nothing.
        for body in [
            format!("{line}\n"),
            format!("{{\"id\":200,\"note\":\"valid\"}}\n{line}\n"),
        ] {
            let reply = post_ndjson(&mut c, "edge_cases", &body).await;
            assert_eq!(reply.status, *status, "{why}: {}", reply.body);
            let error = reply.body["error"].as_str().expect("error message");
            assert!(error.contains(says), "{why}: {error}");
            if body.starts_with("{\"id\":200") {
                assert!(
                    error.starts_with("line 2"),
                    "the error names the line: {error}"
                );
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 4, "every reason this test knows was exercised");

    let reply = post_ndjson(
        &mut c,
        "edge_cases",
        "{\"id\":201,\"note\":\"after the rejects\"}\n",
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    flushed(&daemon).await;
    assert_eq!(
        pg.count("SELECT count(*) FROM edge_cases WHERE id = 201")
            .await,
        1
    );
    assert_eq!(
        pg.count("SELECT count(*) FROM edge_cases").await,
        1,
        "nothing of a refused request landed"
    );
    daemon.stop().await.expect("stop");
}
