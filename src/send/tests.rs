//! Unit tests of the readers, the batches and the retry pacing.

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::deliver::{MAX_BACKOFF, backoff};
use super::*;

/// Rows as a reader hands them over.
impl RowSink for Vec<String> {
    fn push(&mut self, row: &[u8]) -> anyhow::Result<()> {
        self.push(String::from_utf8(row.to_vec())?);
        Ok(())
    }
}

/// Runs `read` on a batcher of `rows_per_request` rows in `layout`, and returns the
/// batches' bodies as text, or the error.
fn batches(
    layout: Layout,
    rows_per_request: u64,
    read: impl FnOnce(&mut Batcher) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<String>> {
    let (tx, mut rx) = mpsc::channel(1000);
    let mut batcher = Batcher::new("t", rows_per_request, layout, ProgressUnit::Rows, tx);
    read(&mut batcher)?;
    batcher.finish()?;
    drop(batcher);
    let mut bodies = Vec::new();
    while let Ok(batch) = rx.try_recv() {
        bodies.push(String::from_utf8(batch.body.to_vec())?);
    }
    Ok(bodies)
}

#[test]
fn the_format_follows_the_extension() {
    let format = |name: &str| InputFormat::from_path(Path::new(name));
    assert_eq!(format("a/rows.ndjson"), Some(InputFormat::Ndjson));
    assert_eq!(format("rows.JSONL.gz"), Some(InputFormat::Ndjson));
    assert_eq!(format("rows.json"), Some(InputFormat::Json));
    assert_eq!(format("flights.csv.gz"), Some(InputFormat::Csv));
    assert_eq!(format("rows.txt"), None);
    assert_eq!(format("rows"), None);
    assert_eq!(format("-"), None);
}

#[test]
fn ndjson_is_cut_into_batches_without_blank_lines() {
    let input = "{\"a\":1}\n\n  {\"a\":2}\r\n{\"a\":3}\n{\"a\":4}";
    let bodies = batches(Layout::Ndjson, 3, |b| read_ndjson(input.as_bytes(), b));
    assert_eq!(
        bodies.expect("read"),
        ["{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n", "{\"a\":4}\n"]
    );
}

#[test]
fn a_json_array_is_streamed_element_by_element() {
    let input = " \n[{\"a\": \"],[\"}, {\"b\": [1, {\"c\": null}]},\n {\"d\": 1e400}]\n";
    let bodies = batches(Layout::JsonArray, 2, |b| read_json(input.as_bytes(), b));
    assert_eq!(
        bodies.expect("read"),
        [
            "[{\"a\": \"],[\"},{\"b\": [1, {\"c\": null}]}]",
            "[{\"d\": 1e400}]"
        ]
    );
}

#[test]
fn json_values_one_after_another_are_rows() {
    let input = "{\n  \"a\": 1\n}\n{\"a\": 2} {\"a\": 3}";
    let bodies = batches(Layout::JsonArray, 10, |b| read_json(input.as_bytes(), b));
    assert_eq!(
        bodies.expect("read"),
        ["[{\n  \"a\": 1\n},{\"a\": 2},{\"a\": 3}]"]
    );
}

#[test]
fn malformed_json_is_an_error_after_the_rows_before_it() {
    let mut read = Vec::new();
    let error = read_json(&b"[{\"a\": 1}, {\"a\": ]"[..], &mut read).expect_err("malformed");
    assert_eq!(read, ["{\"a\": 1}"]);
    assert!(
        format!("{error:#}").contains("the JSON input is malformed"),
        "{error:#}"
    );
    let error = batches(Layout::JsonArray, 10, |b| read_json(&b"[{}] x"[..], b))
        .expect_err("trailing characters");
    assert!(format!("{error:#}").contains("trailing"), "{error:#}");
}

#[test]
fn csv_fields_are_strings_and_the_null_marker_is_null() {
    let input = "id,\"odd \"\"name\"\"\"\n1,\"a, b\"\n2,\n3,\"\"\n4,NA\n";
    let with_empty_null = batches(Layout::Ndjson, 10, |b| read_csv(input.as_bytes(), "", b));
    assert_eq!(
        with_empty_null.expect("read"),
        ["{\"id\":\"1\",\"odd \\\"name\\\"\":\"a, b\"}\n\
          {\"id\":\"2\",\"odd \\\"name\\\"\":null}\n\
          {\"id\":\"3\",\"odd \\\"name\\\"\":null}\n\
          {\"id\":\"4\",\"odd \\\"name\\\"\":\"NA\"}\n"]
    );
    let with_na = batches(Layout::Ndjson, 10, |b| read_csv(input.as_bytes(), "NA", b));
    let with_na = with_na.expect("read").concat();
    assert!(
        with_na.contains("{\"id\":\"2\",\"odd \\\"name\\\"\":\"\"}"),
        "{with_na}"
    );
    assert!(
        with_na.contains("{\"id\":\"4\",\"odd \\\"name\\\"\":null}"),
        "{with_na}"
    );
}

#[test]
fn a_csv_header_naming_a_column_twice_is_refused() {
    let error = batches(Layout::Ndjson, 10, |b| {
        read_csv(&b"a,b,a\n1,2,3\n"[..], "", b)
    })
    .expect_err("duplicate column");
    assert_eq!(error.to_string(), "the CSV header names column \"a\" twice");
}

#[test]
fn gzip_is_recognised_by_its_first_bytes() {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, b"{\"a\":1}\n").expect("gzip");
    let gz = gz.finish().expect("gzip");
    let mut text = String::new();
    maybe_gunzip(io::Cursor::new(gz))
        .expect("open")
        .read_to_string(&mut text)
        .expect("gunzip");
    assert_eq!(text, "{\"a\":1}\n");
    let mut plain = String::new();
    maybe_gunzip(io::Cursor::new(b"{}".to_vec()))
        .expect("open")
        .read_to_string(&mut plain)
        .expect("read");
    assert_eq!(plain, "{}");
}

#[test]
fn the_daemons_row_is_named_by_its_place_in_the_input() {
    let batch = |content_type| Batch {
        table: Arc::from("t"),
        first_row: 1001,
        rows: 100,
        content_type,
        body: Bytes::new(),
        progress: 0,
    };
    let ndjson = batch("application/x-ndjson");
    assert_eq!(ndjson.input_position("line 5: bad"), "row 1005: bad");
    assert_eq!(
        ndjson.input_position("the body holds no rows"),
        "the body holds no rows"
    );
    let json = batch("application/json");
    assert_eq!(
        json.input_position("row at index 0: bad: x"),
        "row 1001: bad: x"
    );
    assert_eq!(json.rows_label(), "rows 1001-1100");
}

#[test]
fn backoff_doubles_honours_retry_after_and_is_capped() {
    assert_eq!(backoff(0, None), Duration::from_millis(250));
    assert_eq!(backoff(2, None), Duration::from_secs(1));
    assert_eq!(
        backoff(0, Some(Duration::from_secs(3))),
        Duration::from_secs(3)
    );
    assert_eq!(backoff(40, None), MAX_BACKOFF);
    assert_eq!(backoff(0, Some(Duration::from_secs(600))), MAX_BACKOFF);
}

#[test]
fn a_byte_order_mark_is_skipped_in_every_format() {
    let skipped = |input: &[u8]| {
        let mut bytes = Vec::new();
        skip_bom(Box::new(io::Cursor::new(input.to_vec())))
            .expect("read")
            .read_to_end(&mut bytes)
            .expect("read");
        bytes
    };
    assert_eq!(skipped(b"\xef\xbb\xbf{\"a\":1}\n"), b"{\"a\":1}\n");
    assert_eq!(skipped(b"\xef\xbb\xbf"), b"");
    assert_eq!(skipped(b"{}"), b"{}");
    assert_eq!(skipped(b"\xef\xbbx"), b"\xef\xbbx");
    assert_eq!(skipped(b"\xef"), b"\xef");
    let mut rows = Vec::new();
    let input = skip_bom(Box::new(io::Cursor::new(
        b"\xef\xbb\xbf[{\"a\":1}]".to_vec(),
    )));
    read_json(input.expect("read"), &mut rows).expect("a JSON array after the mark");
    assert_eq!(rows, ["{\"a\":1}"]);
}

/// The batches of `rows` by a builder of at most 10 rows and `max_bytes`: their bodies.
fn cut(layout: Layout, max_bytes: u64, rows: &[&str]) -> Vec<String> {
    let mut builder = BatchBuilder::new("t", 10, max_bytes, layout, ProgressUnit::Rows);
    let mut batches: Vec<Batch> = rows
        .iter()
        .filter_map(|row| builder.push(row.as_bytes()))
        .collect();
    batches.extend(builder.take());
    batches
        .iter()
        .map(|batch| String::from_utf8(batch.body.to_vec()).expect("utf-8"))
        .collect()
}

#[test]
fn batches_are_cut_by_bytes_and_a_larger_row_goes_alone() {
    // Each row takes 8 bytes with its newline: two fit in 16, not three.
    let rows = [
        "{\"a\":1}",
        "{\"a\":2}",
        "{\"a\":3}",
        "{\"big\":\"xxxxxxxx\"}",
        "{}",
    ];
    assert_eq!(
        cut(Layout::Ndjson, 16, &rows),
        [
            "{\"a\":1}\n{\"a\":2}\n",
            "{\"a\":3}\n",
            "{\"big\":\"xxxxxxxx\"}\n",
            "{}\n"
        ]
    );
    // An array: brackets and commas count; `[{"a":1},{"a":2}]` is 17 bytes.
    assert_eq!(
        cut(Layout::JsonArray, 17, &rows[..3]),
        ["[{\"a\":1},{\"a\":2}]", "[{\"a\":3}]"]
    );
    assert_eq!(
        cut(Layout::JsonArray, 16, &rows[..2]),
        ["[{\"a\":1}]", "[{\"a\":2}]"]
    );
    // The row limit still holds, and the numbering follows the input.
    let mut builder = BatchBuilder::new("t", 2, 1 << 20, Layout::Ndjson, ProgressUnit::Rows);
    let mut batches: Vec<Batch> = (0..5).filter_map(|_| builder.push(b"{}")).collect();
    batches.extend(builder.take());
    let ranges: Vec<(u64, u64)> = batches
        .iter()
        .map(|b| (b.first_row, b.last_row()))
        .collect();
    assert_eq!(ranges, [(1, 2), (3, 4), (5, 5)]);
}

/// Rows handed to [`gather`] one by one from a stream that stays open: a partial batch goes
/// out once `max_wait` has passed since its first row, not before; an interruption hands
/// over what was received and ends, though the stream is still open.
#[tokio::test]
async fn a_partial_batch_goes_out_after_max_wait_and_an_interruption_ends_gathering() {
    let (rows, rows_rx) = mpsc::channel(16);
    let (batches, mut batches_rx) = mpsc::channel(16);
    let interrupted = tokio_util::sync::CancellationToken::new();
    let builder = BatchBuilder::new("t", 1000, 1 << 20, Layout::Ndjson, ProgressUnit::Rows);
    let wait = Duration::from_millis(300);
    let gathering = tokio::spawn(gather(rows_rx, builder, wait, batches, interrupted.clone()));
    let started = std::time::Instant::now();
    rows.send(b"{\"a\":1}".to_vec()).await.expect("send");
    tokio::time::sleep(wait / 2).await;
    rows.send(b"{\"a\":2}".to_vec()).await.expect("send");
    assert!(
        batches_rx.try_recv().is_err(),
        "a partial batch went out early"
    );
    let batch = tokio::time::timeout(Duration::from_secs(60), batches_rx.recv())
        .await
        .expect("the partial batch never went out")
        .expect("the partial batch");
    assert!(started.elapsed() >= wait, "{:?}", started.elapsed());
    assert_eq!((batch.first_row, batch.rows), (1, 2));

    rows.send(b"{\"a\":3}".to_vec()).await.expect("send");
    tokio::task::yield_now().await;
    interrupted.cancel();
    let gathered = gathering.await.expect("gather");
    let batch = batches_rx
        .recv()
        .await
        .expect("the batch of the interruption");
    assert_eq!((batch.first_row, batch.rows), (3, 1));
    assert_eq!(gathered.rows_read, 3);
    assert!(gathered.unsent.is_empty());
    assert!(
        mpsc::Sender::send(&rows, b"{}".to_vec()).await.is_err(),
        "rows are still taken"
    );
}
