//! Writing files safely, for every layer: atomic replacement, and the temporary files an
//! interrupted run removes before it exits (see [`crate::interrupt`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

/// Held while an atomic write is under way, so an interruption waits for it to finish.
static WRITING: Mutex<()> = Mutex::new(());

/// Files that are incomplete or not meant to outlive the run, removed on interruption.
static TEMPORARIES: Registry = Registry(Mutex::new(Vec::new()));

/// A list of files to remove on interruption.
struct Registry(Mutex<Vec<PathBuf>>);

impl Registry {
    fn register(&'static self, path: &Path) -> Temporary {
        lock(&self.0).push(path.to_path_buf());
        Temporary { registry: self, path: path.to_path_buf() }
    }

    fn remove_all(&self) -> Vec<PathBuf> {
        let list = std::mem::take(&mut *lock(&self.0));
        list.into_iter().filter(|p| std::fs::remove_file(p).is_ok()).collect()
    }
}

/// A file registered for removal on interruption while this value lives.
#[must_use = "the file is only registered while the guard lives"]
pub struct Temporary {
    registry: &'static Registry,
    path: PathBuf,
}

impl std::fmt::Debug for Temporary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Temporary").field(&self.path).finish()
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        let mut list = lock(&self.registry.0);
        if let Some(i) = list.iter().rposition(|p| *p == self.path) {
            list.remove(i);
        }
    }
}

/// Register `path` for removal if the run is interrupted before the guard is dropped.
pub fn temporary(path: &Path) -> Temporary {
    TEMPORARIES.register(path)
}

/// Wait for the atomic write under way, if any, and keep new ones from starting while the
/// guard lives (an interrupted run exits holding it).
pub fn hold_writes() -> MutexGuard<'static, ()> {
    lock(&WRITING)
}

/// Remove every registered temporary file; returns those that existed.
pub fn remove_temporaries() -> Vec<PathBuf> {
    TEMPORARIES.remove_all()
}

/// A mutex that a panic elsewhere must not make unusable: the data is a plain list.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Largest text file read whole (an evaluation, calibration or prompts file): far above
/// any real evaluation text, far below what would exhaust memory.
pub const MAX_TEXT_BYTES: u64 = 1 << 30;

/// Read the text file `path` whole: refused, before reading, when it is not a regular
/// file (a device such as /dev/zero never ends, a FIFO blocks until a writer comes) or is
/// larger than [`MAX_TEXT_BYTES`].
pub fn read_text(path: &Path) -> std::io::Result<String> {
    use std::io::{Error as IoError, ErrorKind, Read};
    // Looked at before opening: opening a FIFO blocks until a writer comes.
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(IoError::new(ErrorKind::InvalidInput, "not a regular file, expected a text file"));
    }
    if meta.len() > MAX_TEXT_BYTES {
        return Err(IoError::new(
            ErrorKind::InvalidInput,
            format!("{} bytes, expected at most {MAX_TEXT_BYTES}", meta.len()),
        ));
    }
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    // `take`: a file that grows while it is read still stops at the limit.
    file.take(MAX_TEXT_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_TEXT_BYTES {
        return Err(IoError::new(ErrorKind::InvalidInput, format!("more than {MAX_TEXT_BYTES} bytes")));
    }
    Ok(text)
}

/// The quantbench cache folder: `$QUANTBENCH_CACHE`, else `$XDG_CACHE_HOME/quantbench`,
/// else `~/.cache/quantbench`; `None` without a home folder. An empty variable counts as
/// unset, as the XDG base-directory specification says, so `QUANTBENCH_CACHE=""` never
/// means the working directory.
pub fn cache_root() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("QUANTBENCH_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("quantbench")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("quantbench")))
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, flushed to
/// disk, then renamed over the target, so a crash or an interruption never leaves a
/// half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, &mut |w| w.write_all(bytes))
}

/// [`write_atomic`] for contents written piece by piece (a model saved tensor by tensor,
/// never whole in memory): `write` fills a buffered writer on the temporary file.
pub fn write_atomic_with(
    path: &Path,
    write: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("output");
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let _writing = hold_writes();
    let _temporary = temporary(&tmp);
    let result = (|| {
        let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        write(&mut file)?;
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("cannot write", path, e)
    })
}

/// Whether `a` and `b` name one folder (compared resolved when both exist, else as
/// written).
pub fn same_folder(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("r.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("r.json")]);
    }

    #[test]
    fn text_files_must_be_regular_files() {
        let err = read_text(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // No writer ever comes: reading it would block forever.
        assert!(read_text(&fifo).unwrap_err().to_string().contains("not a regular file"));
        let text = dir.path().join("t.txt");
        std::fs::write(&text, "hello").unwrap();
        assert_eq!(read_text(&text).unwrap(), "hello");
    }

    #[test]
    fn registered_temporaries_are_removed_and_dropped_guards_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, removed) = (dir.path().join("kept"), dir.path().join("removed"));
        std::fs::write(&kept, b"k").unwrap();
        std::fs::write(&removed, b"r").unwrap();
        // A registry of its own: the global one belongs to concurrent tests' writes.
        static LOCAL: Registry = Registry(Mutex::new(Vec::new()));
        drop(LOCAL.register(&kept));
        let _guard = LOCAL.register(&removed);
        let gone = LOCAL.remove_all();
        assert!(gone.contains(&removed), "{gone:?}");
        assert!(kept.exists() && !removed.exists());
    }
}
