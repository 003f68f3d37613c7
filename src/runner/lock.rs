//! One run per output folder: `OUT/.bench.lock`, held with `flock` for the whole run, so
//! a second run into the same folder fails at once, naming the first one's pid, instead of
//! overwriting its results. The kernel releases the lock when the process ends, however it
//! ends, so a crashed run never leaves the folder locked.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The lock file's name inside the output folder.
pub const LOCK_FILE: &str = ".bench.lock";

/// The held lock; released (and its file removed) when dropped.
#[derive(Debug)]
pub struct OutputLock {
    /// Open for as long as the lock is held: closing it releases the lock.
    _file: File,
    path: PathBuf,
    /// An interrupted run removes the lock file too.
    _temporary: crate::files::Temporary,
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Remove while still holding the lock: a waiting run then finds the file gone
        // (see the inode check in `lock`) and starts over with a fresh one.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Check that `out` is, or can become, a writable folder: an error naming it otherwise.
/// Runs before any work (and in `bench validate`), so a bad `--out` is found first.
pub fn check_output_folder(out: &Path) -> Result<()> {
    let bad = |message: String| Error::Results { path: out.to_path_buf(), message };
    let mut existing = out;
    while !existing.exists() {
        match existing.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => existing = parent,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        return Err(bad(format!(
            "the output folder cannot be made: {} is a file, expected a folder",
            existing.display()
        )));
    }
    let c_path = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes())
        .map_err(|_| bad("the path holds a NUL byte".to_string()))?;
    // SAFETY: `c_path` is a valid NUL-terminated string.
    if unsafe { libc::access(c_path.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(bad(format!(
            "{} is not writable, expected a folder this user can write",
            existing.display()
        )));
    }
    Ok(())
}

/// Take the lock of the output folder `out` (created if needed).
pub fn lock(out: &Path) -> Result<OutputLock> {
    check_output_folder(out)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io("cannot create", out, e))?;
    let path = out.join(LOCK_FILE);
    loop {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("cannot open", &path, e))?;
        // SAFETY: the descriptor is open for the duration of the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another bench run".to_string()
            } else {
                format!("bench pid {holder}")
            };
            return Err(Error::Results {
                path: out.to_path_buf(),
                message: format!(
                    "the output folder is in use by {who} (lock {}); wait for it to finish, or pass \
                     another --out",
                    path.display()
                ),
            });
        }
        // The holder before us may have removed the file between our open and our lock:
        // then we hold a lock on a file nobody else can see, and must start over.
        let same = match (file.metadata(), std::fs::metadata(&path)) {
            (Ok(held), Ok(named)) => held.ino() == named.ino() && held.dev() == named.dev(),
            _ => false,
        };
        if !same {
            continue;
        }
        let written = file.set_len(0).and_then(|_| file.rewind()).and_then(|_| {
            write!(file, "{}", std::process::id())?;
            file.flush()
        });
        written.map_err(|e| Error::io("cannot write", &path, e))?;
        let _temporary = crate::files::temporary(&path);
        return Ok(OutputLock { _file: file, path, _temporary });
    }
}

impl OutputLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_fails_naming_the_holder_and_a_released_one_can_be_taken() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let first = lock(&out).unwrap();
        assert_eq!(std::fs::read_to_string(first.path()).unwrap(), std::process::id().to_string());
        let err = lock(&out).unwrap_err().to_string();
        assert!(err.contains(&format!("in use by bench pid {}", std::process::id())), "{err}");
        drop(first);
        assert!(!out.join(LOCK_FILE).exists(), "the lock file goes with the lock");
        lock(&out).unwrap();
    }

    #[test]
    fn an_output_path_through_a_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = check_output_folder(&file.join("out")).unwrap_err().to_string();
        assert!(err.contains("is a file, expected a folder"), "{err}");
        assert!(lock(&file).is_err());
    }
}
