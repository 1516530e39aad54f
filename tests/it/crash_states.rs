//! Crash-atomic files: every state a crash can leave between two steps of creating a
//! segment, deleting segments or replacing a metadata file is a WAL that starts, with
//! every record intact and the next LSN where it was.

use std::path::Path;
use std::sync::Arc;

use pgspool::lsn::Lsn;
use pgspool::wal::segment::{self, SegmentFile};
use pgspool::wal::{AppendRecord, Wal, WalOptions, WalReader};

const SEGMENT_BYTES: u64 = 64 << 10;
/// Records of 40 kB: one per segment.
const RECORDS: u64 = 4;

fn options(dir: &Path) -> WalOptions {
    WalOptions {
        dir: dir.to_path_buf(),
        segment_bytes: SEGMENT_BYTES,
        observer: None,
    }
}

/// A WAL in `dir` holding `RECORDS` records of one row each, one per segment.
async fn write_wal(dir: &Path) -> Vec<SegmentFile> {
    let wal = Wal::open(&options(dir)).expect("open");
    for i in 0..RECORDS {
        let payload = vec![b'a' + i as u8; 40_000];
        let record = AppendRecord::new(1, payload);
        wal.appender().append(vec![record]).await.expect("append");
    }
    wal.close().await.expect("close");
    // The states below are those a crash leaves: no clean-stop record.
    std::fs::remove_file(dir.join("clean-stop")).expect("a clean stop was recorded");
    let segments = segment::list(dir).expect("list");
    assert_eq!(segments.len(), RECORDS as usize);
    segments
}

/// Opens the WAL in `dir`, checks that it reads every record from `from` on and continues
/// at the next LSN, and appends one more.
async fn assert_starts(dir: &Path, from: u64, state: &str) {
    let wal = Wal::open(&options(dir)).unwrap_or_else(|e| panic!("{state}: start failed: {e}"));
    assert_eq!(wal.recovery_report().next_lsn, Lsn(RECORDS + 1), "{state}");
    assert_eq!(wal.recovery_report().cut, None, "{state}: nothing to cut");
    let mut reader = WalReader::open(Arc::clone(wal.dir()), Lsn(from)).expect("reader");
    for lsn in from..=RECORDS {
        let record = reader.next(Lsn(RECORDS)).expect("read").expect("a record");
        assert_eq!(record.lsns.first, Lsn(lsn), "{state}");
        assert_eq!(record.payload[0], b'a' + (lsn - 1) as u8, "{state}");
    }
    let lsns = wal
        .appender()
        .append(vec![AppendRecord::new(1, vec![b'z'; 40_000])])
        .await
        .unwrap_or_else(|e| panic!("{state}: append failed: {e}"));
    assert_eq!(lsns.first, Lsn(RECORDS + 1), "{state}");
    wal.close().await.expect("close");
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{state}: {leftovers:?} left behind");
}

/// Copies the files of `from` into a new directory under `root` named `state`.
fn copy_of(from: &Path, root: &Path, state: &str) -> std::path::PathBuf {
    let to = root.join(state);
    std::fs::create_dir(&to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("list") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
    to
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_state_between_two_steps_of_rotation_or_deletion_starts() {
    let root = tempfile::tempdir().expect("tempdir");
    let pristine = root.path().join("pristine");
    write_wal(&pristine).await;
    let next = segment::file_name(Lsn(RECORDS + 1));

    // Rotation: the next segment's header written to its temporary name, in part or in
    // whole, then renamed into place before any record went into it.
    for partial in [0, 10, 64] {
        let state = format!("rotation-tmp-{partial}");
        let dir = copy_of(&pristine, root.path(), &state);
        std::fs::write(dir.join(format!("{next}.tmp")), vec![7u8; partial]).expect("tmp");
        assert_starts(&dir, 1, &state).await;
    }
    let dir = copy_of(&pristine, root.path(), "rotation-renamed");
    {
        let wal = Wal::open(&options(&dir)).expect("open");
        // A request that does not fit the active segment: the writer rotates first.
        wal.appender()
            .append(vec![AppendRecord::new(1, vec![b'q'; 40_000])])
            .await
            .expect("append");
        wal.close().await.expect("close");
        std::fs::remove_file(dir.join("clean-stop")).expect("a clean stop was recorded");
    }
    let rotated = segment::list(&dir).expect("list").pop().expect("segment");
    // Back to the instant after the rename: the new segment holds its header only.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&rotated.path)
        .and_then(|f| f.set_len(64))
        .expect("truncate");
    assert_starts(&dir, 1, "rotation-renamed").await;

    // Deletion, oldest first: any prefix of the segments gone, with or without the
    // checkpoint written after it, and a checkpoint replaced half-way.
    let checkpoint = |dir: &Path, lsn: u64| {
        std::fs::write(
            dir.join("checkpoint"),
            format!("{{\"flushed_lsn\":{lsn}}}\n"),
        )
        .expect("checkpoint");
    };
    for deleted in 1..RECORDS as usize {
        for checkpointed in [false, true] {
            let state = format!("deleted-{deleted}-checkpointed-{checkpointed}");
            let dir = copy_of(&pristine, root.path(), &state);
            let segments = segment::list(&dir).expect("list");
            for seg in &segments[..deleted] {
                std::fs::remove_file(&seg.path).expect("delete");
            }
            if checkpointed {
                checkpoint(&dir, deleted as u64);
            }
            std::fs::write(dir.join("checkpoint.tmp"), b"{\"flushed_l").expect("tmp");
            assert_starts(&dir, deleted as u64 + 1, &state).await;
        }
    }

    // Metadata files being replaced: the old file stays whole beside a partial new one.
    let dir = copy_of(&pristine, root.path(), "metadata");
    checkpoint(&dir, 0);
    for name in ["spool_id.tmp", "checkpoint.tmp", "schema-cache.json.tmp"] {
        std::fs::write(dir.join(name), b"half-writ").expect("tmp");
    }
    assert_starts(&dir, 1, "metadata").await;

    // An unreadable checkpoint is advisory: ignored. An unreadable damage record is not:
    // the start is refused until `pgspool quarantine` has read every segment again.
    let dir = copy_of(&pristine, root.path(), "garbage-metadata");
    std::fs::write(dir.join("checkpoint"), b"\x00garbage").expect("checkpoint");
    assert_starts(&dir, 1, "garbage checkpoint").await;
    let dir = copy_of(&pristine, root.path(), "garbage-damage-record");
    std::fs::write(dir.join("damage.json"), b"{\"segm").expect("damage record");
    let err = Wal::open(&options(&dir)).expect_err("refused").to_string();
    assert!(err.contains("pgspool quarantine --wal-dir"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgspool"))
        .args(["quarantine", "--wal-dir"])
        .arg(&dir)
        .output()
        .expect("run quarantine");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("an unreadable damage.json"), "{report}");
    assert_starts(&dir, 1, "damage record cleared").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_or_garbled_spool_id_is_refused_and_the_id_to_restore_named() {
    let root = tempfile::tempdir().expect("tempdir");
    let pristine = root.path().join("pristine");
    write_wal(&pristine).await;
    let id = std::fs::read_to_string(pristine.join("spool_id")).expect("spool id");
    let dir = copy_of(&pristine, root.path(), "spool-id");
    let restore = format!("of spool {} (echo {} >", id.trim(), id.trim());
    std::fs::remove_file(dir.join("spool_id")).expect("remove");
    let err = Wal::open(&options(&dir)).expect_err("refused").to_string();
    assert!(
        err.contains("is missing") && err.contains(&restore),
        "{err}"
    );
    std::fs::write(dir.join("spool_id"), b"\xff garbage").expect("garble");
    let err = Wal::open(&options(&dir)).expect_err("refused").to_string();
    assert!(
        err.contains("not a spool id") && err.contains(&restore),
        "{err}"
    );
    std::fs::write(dir.join("spool_id"), &id).expect("restore");
    assert_starts(&dir, 1, "restored spool id").await;
}
