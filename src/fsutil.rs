//! File-system steps the WAL's durability rests on, all through std (the C library), so
//! LD_PRELOAD fault injectors such as libfiu reach them.
//!
//! Everything pgspool writes under its WAL directory holds rows or facts about them, in
//! clear text: files are created with [`FILE_MODE`] and directories with [`DIR_MODE`],
//! whatever the umask, so only pgspool's user (and root) can read them (SECURITY.md).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Suffix of files being created; leftovers are removed at start.
pub const TMP_SUFFIX: &str = ".tmp";

/// Mode of the files pgspool creates in its WAL directory: read and write for its user.
pub const FILE_MODE: u32 = 0o600;

/// Mode of the directories pgspool creates: its user's only.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` and any parents missing, each with [`DIR_MODE`]; an existing directory is
/// left as it is.
///
/// # Errors
/// When a directory cannot be created.
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Opens `path` for writing, created with [`FILE_MODE`] if missing, and truncated.
///
/// # Errors
/// When the file cannot be opened or created.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)
}

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
/// Any I/O error; the temporary file is removed on failure. [`write_atomic_steps`] tells
/// which step failed.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    write_atomic_steps(dir, name, bytes).map_err(io::Error::from)
}

/// Which step of a crash-atomic write failed.
#[derive(Debug, thiserror::Error)]
pub enum AtomicWriteError {
    /// Creating, writing or renaming the file failed (a full disk, say): the old file, if
    /// any, stands.
    #[error("{0}")]
    Write(io::Error),
    /// fdatasync of the file or fsync of the directory failed: after a failed sync the page
    /// cache no longer says what is on disk.
    #[error("{0}")]
    Sync(io::Error),
}

impl From<AtomicWriteError> for io::Error {
    fn from(e: AtomicWriteError) -> io::Error {
        match e {
            AtomicWriteError::Write(e) | AtomicWriteError::Sync(e) => e,
        }
    }
}

/// [`write_atomic`], telling a failed write from a failed sync.
///
/// # Errors
/// See [`AtomicWriteError`]; the temporary file is removed on failure.
pub fn write_atomic_steps(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), AtomicWriteError> {
    use AtomicWriteError::{Sync, Write};
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let result = (|| {
        let mut file = create_private_file(&tmp).map_err(Write)?;
        file.write_all(bytes).map_err(Write)?;
        file.sync_data().map_err(Sync)?;
        fs::rename(&tmp, dir.join(name)).map_err(Write)?;
        sync_dir(dir).map_err(Sync)
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
