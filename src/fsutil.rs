//! File-system steps the WAL's durability rests on, all through std (the C library), so
//! LD_PRELOAD fault injectors such as libfiu reach them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Suffix of files being created; leftovers are removed at start.
pub const TMP_SUFFIX: &str = ".tmp";

/// fsyncs a directory, making creations, renames and unlinks in it durable.
///
/// # Errors
/// When the directory cannot be opened or synced.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `dir/name` with `bytes` crash-atomically: write `name.tmp`, fdatasync it,
/// rename it over `name`, fsync the directory. After a crash the file holds either the old
/// or the new bytes, never a mix.
///
/// # Errors
/// Any I/O error; the temporary file is removed on failure.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_data()?;
        fs::rename(&tmp, dir.join(name))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
#[must_use]
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}
