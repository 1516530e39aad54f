//! Integration tests of the bundled nycflights13 data: line counts, loading
//! every table through PostgreSQL with `load_reference`, and exact
//! comparison with `compare`, against a real server.

use std::time::Instant;

use crate::harness::connect;
use pgspool::dataset::{
    Comparison, NYCFLIGHTS13, NYCFLIGHTS13_SCHEMA, compare, create_tables, load_reference,
};
use pgspool::pgtemp::TempPostgres;

#[test]
fn every_table_has_its_documented_row_count() {
    for table in &NYCFLIGHTS13 {
        let t = Instant::now();
        let mut lines = 0;
        for line in table.lines() {
            let line = line.unwrap_or_else(|e| panic!("{}: {e}", table.name));
            assert!(
                line.starts_with('{') && line.ends_with('}'),
                "{} line {}: {line}",
                table.name,
                lines + 1
            );
            lines += 1;
        }
        assert_eq!(lines, table.rows, "{}", table.name);
        assert!(
            NYCFLIGHTS13_SCHEMA.contains(&format!("CREATE TABLE {} (", table.name)),
            "{} is in schema.sql",
            table.name
        );
        eprintln!(
            "{}: {} lines decompressed in {:?}",
            table.name,
            lines,
            t.elapsed()
        );
    }
}

#[tokio::test]
async fn reference_load_and_exact_comparison() {
    let pg = TempPostgres::start().expect("start");
    let client = connect(&pg.url()).await;

    create_tables(&client, "ref").await.expect("create tables");
    let search_path: String = client
        .query_one("SHOW search_path", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        search_path, "\"$user\", public",
        "session search_path is left alone"
    );

    for table in &NYCFLIGHTS13 {
        let target = format!("ref.{}", table.name);
        let t = Instant::now();
        let loaded = load_reference(&client, table, &target).await.expect("load");
        eprintln!(
            "load_reference {}: {loaded} rows in {:?}",
            table.name,
            t.elapsed()
        );
        assert_eq!(loaded, table.rows as u64, "{}", table.name);
        let count: i64 = client
            .query_one(&format!("SELECT count(*) FROM {target}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(count, table.rows as i64, "{}", table.name);

        let t = Instant::now();
        let same = compare(&client, &target, &target).await.expect("compare");
        eprintln!(
            "compare {} with itself: {same} in {:?}",
            table.name,
            t.elapsed()
        );
        assert!(same.is_equal(), "{}: {same}", table.name);
        assert_eq!(same.left_rows, table.rows as i64);
    }

    // Spot checks that values went through PostgreSQL's input functions.
    let row = client
        .query_one(
            "SELECT dep_delay, time_hour::text FROM ref.flights \
             WHERE year = 2013 AND month = 1 AND day = 1 AND flight = 1545 AND carrier = 'UA'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<i32>>(0), Some(2));
    assert_eq!(row.get::<_, String>(1), "2013-01-01 10:00:00+00");
    let nulls: i64 = client
        .query_one(
            "SELECT count(*) FROM ref.flights WHERE dep_delay IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(nulls > 0, "JSON null became SQL NULL");

    // A copy missing one row.
    create_tables(&client, "copy")
        .await
        .expect("create copy tables");
    client
        .batch_execute(
            "INSERT INTO copy.flights SELECT * FROM ref.flights; \
             DELETE FROM copy.flights WHERE ctid = (SELECT min(ctid) FROM copy.flights);",
        )
        .await
        .unwrap();
    let t = Instant::now();
    let missing = compare(&client, "ref.flights", "copy.flights")
        .await
        .unwrap();
    eprintln!(
        "compare flights with a copy missing one row: {missing} in {:?}",
        t.elapsed()
    );
    assert_eq!(
        missing,
        Comparison {
            left_rows: 336_776,
            right_rows: 336_775,
            only_left: 1,
            only_right: 0
        }
    );
    assert!(!missing.is_equal());
    let reversed = compare(&client, "copy.flights", "ref.flights")
        .await
        .unwrap();
    assert_eq!((reversed.only_left, reversed.only_right), (0, 1));

    // A copy with one changed row (a float, compared exactly).
    client
        .batch_execute(
            "INSERT INTO copy.weather SELECT * FROM ref.weather; \
             UPDATE copy.weather SET temp = temp + 1e-9 \
             WHERE ctid = (SELECT min(ctid) FROM copy.weather WHERE temp IS NOT NULL);",
        )
        .await
        .unwrap();
    let changed = compare(&client, "ref.weather", "copy.weather")
        .await
        .unwrap();
    assert_eq!(
        changed,
        Comparison {
            left_rows: 26_115,
            right_rows: 26_115,
            only_left: 1,
            only_right: 1
        }
    );
    assert_eq!(
        changed.to_string(),
        "differ: left 26115 rows, right 26115 rows; 1 only in left, 1 only in right"
    );

    // A duplicated row is a difference too (multisets, not sets).
    client
        .batch_execute(
            "INSERT INTO copy.airlines SELECT * FROM ref.airlines; \
             ALTER TABLE copy.airlines DROP CONSTRAINT airlines_pkey; \
             INSERT INTO copy.airlines SELECT * FROM ref.airlines WHERE carrier = 'AA';",
        )
        .await
        .unwrap();
    let duplicated = compare(&client, "ref.airlines", "copy.airlines")
        .await
        .unwrap();
    assert_eq!(
        duplicated,
        Comparison {
            left_rows: 16,
            right_rows: 17,
            only_left: 0,
            only_right: 1
        }
    );

    // Queries compare as well as tables.
    let projected = compare(
        &client,
        "(SELECT carrier, name FROM ref.airlines)",
        "(SELECT DISTINCT carrier, name FROM copy.airlines)",
    )
    .await
    .unwrap();
    assert!(projected.is_equal(), "{projected}");

    // compare's SET LOCAL work_mem does not outlive its query.
    let work_mem: String = client.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(work_mem, "4MB");
}

#[tokio::test]
async fn failures_are_clean() {
    let pg = TempPostgres::start().expect("start");
    let client = connect(&pg.url()).await;
    create_tables(&client, "ref").await.expect("create tables");

    let err = create_tables(&client, "ref")
        .await
        .expect_err("tables exist");
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");

    // A target whose column cannot take the data: the error says why, the
    // target stays empty and no staging table is left behind.
    client
        .batch_execute("CREATE TABLE public.bad_airlines (carrier text, name integer)")
        .await
        .unwrap();
    let err = load_reference(&client, &NYCFLIGHTS13[0], "public.bad_airlines")
        .await
        .expect_err("name is not an integer");
    let message = format!("{err:#}");
    assert!(
        message.contains("invalid input syntax for type integer"),
        "{message}"
    );
    let staging: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'pgspool_reference%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(staging, 0, "staging tables are dropped");
    let rows: i64 = client
        .query_one("SELECT count(*) FROM public.bad_airlines", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);

    // The session is still usable, and loading twice into one table works
    // (staging names do not collide).
    let airlines = &NYCFLIGHTS13[0];
    assert_eq!(
        load_reference(&client, airlines, "ref.airlines")
            .await
            .unwrap(),
        16
    );
    client.batch_execute("TRUNCATE ref.airlines").await.unwrap();
    assert_eq!(
        load_reference(&client, airlines, "ref.airlines")
            .await
            .unwrap(),
        16
    );

    let err = compare(&client, "ref.airlines", "ref.airports")
        .await
        .expect_err("columns differ");
    assert!(
        format!("{err:#}").contains("comparing ref.airlines with ref.airports"),
        "{err:#}"
    );
}
