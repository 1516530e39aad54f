//! Torn writes: a WAL whose last record was cut at any byte, with nothing, zeroes or
//! garbage after the cut, starts; the partial record is cut off, counted and kept beside
//! the WAL; every record before it is intact.

use std::path::Path;
use std::sync::Arc;

use pgspool::lsn::Lsn;
use pgspool::wal::{AppendRecord, Wal, WalOptions, WalReader};

const PAYLOADS: [&[u8]; 3] = [b"first\n", b"second\n", &[b'x'; 100]];

/// Writes the three records of `PAYLOADS` (one request each) to a new WAL in `dir`;
/// returns the segment's bytes and the offset where the last record starts.
async fn write_wal(dir: &Path) -> (Vec<u8>, usize) {
    let wal = Wal::open(&options(dir)).expect("open");
    let mut last_start = 0;
    for payload in PAYLOADS {
        last_start = segment_bytes(dir).len();
        let record = AppendRecord::new(1, payload.to_vec());
        wal.appender().append(vec![record]).await.expect("append");
    }
    wal.close().await.expect("close");
    (segment_bytes(dir), last_start)
}

fn options(dir: &Path) -> WalOptions {
    WalOptions {
        dir: dir.to_path_buf(),
        segment_bytes: 1 << 20,
        observer: None,
    }
}

fn segment_path(dir: &Path) -> std::path::PathBuf {
    let mut segments = pgspool::wal::segment::list(dir).expect("list");
    assert_eq!(segments.len(), 1);
    segments.pop().expect("one segment").path
}

fn segment_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(segment_path(dir)).expect("read")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_record_cut_at_any_byte_is_cut_off_kept_and_the_rest_is_intact() {
    let root = tempfile::tempdir().expect("tempdir");
    let pristine = root.path().join("pristine");
    let (whole, last_start) = write_wal(&pristine).await;
    let spool_id = std::fs::read(pristine.join("spool_id")).expect("spool id");
    let garbage: Vec<u8> = (0..200u32).map(|i| (i * 7919 % 251) as u8).collect();
    let tails: [(&str, &[u8]); 3] = [
        ("nothing", &[]),
        ("zeroes", &[0; 300]),
        ("garbage", &garbage),
    ];
    let mut cases = 0;
    for (kind, after) in tails {
        for cut in last_start..whole.len() {
            let dir = root.path().join(format!("{kind}-{cut}"));
            std::fs::create_dir(&dir).expect("mkdir");
            std::fs::write(dir.join("spool_id"), &spool_id).expect("spool id");
            let mut torn = whole[..cut].to_vec();
            torn.extend_from_slice(after);
            let name = segment_path(&pristine);
            std::fs::write(dir.join(name.file_name().expect("name")), &torn).expect("write");

            let wal = Wal::open(&options(&dir))
                .unwrap_or_else(|e| panic!("{kind} after byte {cut}: start failed: {e}"));
            let report = wal.recovery_report().clone();
            assert_eq!(report.next_lsn, Lsn(3), "{kind} after byte {cut}");
            let dropped = torn.len() - last_start;
            match report.cut {
                None => assert_eq!(dropped, 0, "{kind} after byte {cut}: nothing was cut"),
                Some(cut_tail) => {
                    assert_eq!(
                        cut_tail.offset, last_start as u64,
                        "{kind} after byte {cut}"
                    );
                    assert_eq!(cut_tail.bytes, dropped as u64, "{kind} after byte {cut}");
                    let saved = std::fs::read(cut_tail.saved_to.expect("a copy"))
                        .expect("the cut bytes are kept");
                    assert_eq!(saved, torn[last_start..], "{kind} after byte {cut}");
                }
            }
            assert_eq!(
                segment_bytes(&dir),
                whole[..last_start],
                "{kind} after byte {cut}"
            );
            let mut reader = WalReader::open(Arc::clone(wal.dir()), Lsn(1)).expect("reader");
            for (i, payload) in PAYLOADS[..2].iter().enumerate() {
                let record = reader.next(Lsn(2)).expect("read").expect("a record");
                assert_eq!(record.lsns.first, Lsn(i as u64 + 1));
                assert_eq!(&record.payload, payload, "{kind} after byte {cut}");
            }
            wal.close().await.expect("close");
            std::fs::remove_dir_all(&dir).expect("clean up");
            cases += 1;
        }
    }
    assert_eq!(cases, 3 * (whole.len() - last_start));
}
