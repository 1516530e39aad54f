//! The edge-case corpus (tests/data/edge_cases): every accepted row lands exactly as
//! PostgreSQL's own `jsonb_populate_record` stores it; rejected rows get a 4xx and leave
//! nothing behind by default, and with `?invalid=dead_letter` end in dead letters while
//! the valid rows sent with them land.

use pgspool::dataset::compare;
use serde_json::Value;

use crate::dead_letters::{RawClient, dead_letters, lsn_range, refused};
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
            continue; // refused by PostgreSQL itself, after the 202: see the dead-letter test below
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

/// What becomes of each reject row (by its line of reject.why) sent with
/// `?invalid=dead_letter`: refused by pgspool's encoder at ingest (listed in the answer's
/// `refused`, dead-lettered with SQLSTATE NULL), or accepted and refused by PostgreSQL
/// (dead-lettered with its SQLSTATE).
const REJECT_FATE: [(&str, Option<&str>); 10] = [
    ("text cannot hold a NUL character", None),
    ("out of range for bigint", Some("22003")),
    ("invalid timestamp", Some("22007")),
    ("invalid uuid", Some("22P02")),
    ("unique violation", Some("23505")),
    ("not-null violation", Some("23502")),
    ("unknown column", None),
    ("a row must be a JSON object", None),
    ("invalid integer in array", Some("22P02")),
    ("jsonb cannot hold \\u0000", None),
];

fn fate(why: &str) -> Option<&'static str> {
    REJECT_FATE
        .iter()
        .find(|(w, _)| *w == why)
        .unwrap_or_else(|| panic!("reject.why has a reason this test does not know: {why}"))
        .1
}

fn valid_row(id: i64) -> String {
    format!("{{\"id\":{id},\"note\":\"valid {id}\",\"big\":{id}}}")
}

/// Every reject row of the corpus sent between two valid rows in one NDJSON request with
/// `?invalid=dead_letter`, then all of them interleaved with valid rows in one JSON array:
/// each request gets 202, `refused` lists exactly the rows pgspool's encoder refuses (by
/// index from 0), the valid rows land, and each reject row is dead-lettered once: with
/// SQLSTATE NULL and the row as sent when pgspool refused it, with PostgreSQL's SQLSTATE
/// and the row as column -> text when PostgreSQL did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_rows_mixed_with_valid_ones_end_in_dead_letters() {
    let pg = Pg::start().await;
    pg.exec(SCHEMA).await;
    // The row the "unique violation" reject collides with.
    pg.exec("INSERT INTO edge_cases (id, note) VALUES (1, 'there before')")
        .await;
    let dir = short_tempdir();
    let daemon = start_daemon(config(dir.path(), &pg.url())).await;
    let mut c = RawClient::connect(daemon.socket()).await;

    let rejects: Vec<(&str, &str)> = REJECT.lines().zip(REJECT_WHY.lines()).collect();
    assert_eq!(rejects.len(), REJECT_FATE.len());
    let mut valid_ids = Vec::new();
    // (why, line, fate, first LSN, last LSN) per request of one reject row.
    let mut sent = Vec::new();
    for (k, (line, why)) in rejects.iter().enumerate() {
        let fate = fate(why);
        let (before, after) = (1000 + 2 * k as i64, 1001 + 2 * k as i64);
        let body = format!("{}\n{line}\n{}\n", valid_row(before), valid_row(after));
        let reply = c
            .post_dead_letter("edge_cases", "application/x-ndjson", body)
            .await;
        assert_eq!(reply.status, 202, "{why}: {}", reply.body);
        let refused = refused(&reply);
        match fate {
            None => assert_eq!(
                refused.iter().map(|r| r.0).collect::<Vec<_>>(),
                [1],
                "{why}: pgspool refuses the reject row, and only it: {}",
                reply.body
            ),
            Some(_) => assert!(
                refused.is_empty(),
                "{why}: pgspool lets it through to PostgreSQL: {}",
                reply.body
            ),
        }
        let (first, last) = lsn_range(&reply);
        sent.push((*why, *line, fate, first, last));
        valid_ids.extend([before, after]);
    }

    // All of them in one JSON array, each after a valid row.
    let mut elements = Vec::new();
    let mut expected_refused = Vec::new();
    for (k, (line, why)) in rejects.iter().enumerate() {
        let id = 2000 + k as i64;
        elements.push(valid_row(id));
        valid_ids.push(id);
        if fate(why).is_none() {
            expected_refused.push(elements.len() as u64);
        }
        elements.push(line.to_string());
    }
    let reply = c
        .post_dead_letter(
            "edge_cases",
            "application/json",
            format!("[{}]", elements.join(",")),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let mut indexes: Vec<u64> = refused(&reply).iter().map(|r| r.0).collect();
    indexes.sort_unstable();
    assert_eq!(indexes, expected_refused, "{}", reply.body);
    let (array_first, array_last) = lsn_range(&reply);
    flushed(&daemon).await;

    // The valid rows land, the reject rows do not.
    let landed = pg
        .ids("SELECT id::bigint FROM edge_cases WHERE id >= 1000")
        .await;
    valid_ids.sort_unstable();
    assert_eq!(landed, valid_ids, "the valid rows land");
    assert_eq!(
        pg.count("SELECT count(*) FROM edge_cases WHERE id < 1000")
            .await,
        1,
        "no reject row landed"
    );
    assert_eq!(
        pg.count("SELECT count(*) FROM edge_cases WHERE id = 1 AND note = 'there before'")
            .await,
        1
    );

    let dead = dead_letters(&pg).await;
    for d in &dead {
        assert_eq!(d.table_name, "public.edge_cases", "{d:?}");
        assert_eq!(d.spool_id, daemon.spool_id(), "{d:?}");
        assert!(!d.message.is_empty(), "{d:?}");
    }
    for (why, line, fate, first, last) in &sent {
        let mine: Vec<_> = dead
            .iter()
            .filter(|d| (*first..=*last).contains(&d.lsn))
            .collect();
        assert_eq!(mine.len(), 1, "{why}: one dead letter: {mine:#?}");
        let d = mine[0];
        assert_eq!(d.sqlstate.as_deref(), *fate, "{why}: {d:#?}");
        let sent_json: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        match fate {
            // Kept as JSON: the row as the client sent it.
            None => assert_eq!(d.row, *line, "{why}: the row as sent: {d:#?}"),
            // Stored as COPY text: column -> value as text (null for NULL).
            Some(_) => {
                let id = match &sent_json["id"] {
                    Value::Null => Value::Null,
                    id => Value::String(id.to_string()),
                };
                assert_eq!(
                    d.json()["id"],
                    id,
                    "{why}: the row as column -> text: {d:#?}"
                );
                assert!(
                    d.columns.is_some() && d.copy_line.is_some(),
                    "{why}: {d:#?}"
                );
            }
        }
    }
    let in_array: Vec<_> = dead
        .iter()
        .filter(|d| (array_first..=array_last).contains(&d.lsn))
        .collect();
    let mut states: Vec<Option<&str>> = in_array.iter().map(|d| d.sqlstate.as_deref()).collect();
    let mut expected: Vec<Option<&str>> = rejects.iter().map(|(_, why)| fate(why)).collect();
    states.sort_unstable();
    expected.sort_unstable();
    assert_eq!(states, expected, "the array's reject rows: {in_array:#?}");
    assert_eq!(
        dead.len(),
        sent.len() + rejects.len(),
        "nothing else is dead-lettered"
    );
    daemon.stop().await.expect("stop");
}
