//! Finding the CUDA libraries that cudarc opens by name (`libnvrtc.so.13`,
//! `libcublas.so.13`, ...), so a toolkit outside the loader's path (pip's
//! `nvidia/cu13/lib`, `/usr/local/cuda/lib64`) still works without `LD_LIBRARY_PATH`.
//!
//! The loader reads `LD_LIBRARY_PATH` once, at process start, so setting it later does
//! nothing. Instead a library found in a known folder is opened here by its full path and
//! kept open: when cudarc then asks for `libnvrtc.so.13`, the dynamic loader matches the
//! already-loaded object by its soname and returns it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Folders named by these variables are searched first (each may hold several folders
/// separated by `:`).
pub const DIR_VARIABLES: [&str; 2] = ["QUANTBENCH_CUDA_LIB_DIR", "QUANTBENCH_NVRTC_DIR"];

/// A CUDA library cudarc loads dynamically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaLib {
    /// Short name used in messages.
    pub name: &'static str,
    /// The file names tried in each folder, most specific first.
    pub files: &'static [&'static str],
    /// Libraries it opens itself at run time (NVRTC's builtins), loaded first from the
    /// same folder when present.
    pub companions: &'static [&'static str],
}

/// NVRTC, the run-time compiler (CUDA 13).
pub const NVRTC: CudaLib = CudaLib {
    name: "nvrtc",
    files: &["libnvrtc.so.13", "libnvrtc.so"],
    companions: &["libnvrtc-builtins.so.13.0", "libnvrtc-builtins.so"],
};

/// cuBLAS (CUDA 13).
pub const CUBLAS: CudaLib =
    CudaLib { name: "cublas", files: &["libcublas.so.13", "libcublas.so"], companions: &[] };

/// cuBLASLt (CUDA 13).
pub const CUBLASLT: CudaLib =
    CudaLib { name: "cublasLt", files: &["libcublasLt.so.13", "libcublasLt.so"], companions: &[] };

/// The folders searched for a library, in order: the variables of [`DIR_VARIABLES`],
/// `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`, the standard toolkit folders, and the NVRTC
/// wheel unpacked by `scripts/fetch_nvrtc.sh` under the quantbench cache.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for var in DIR_VARIABLES {
        if let Some(value) = std::env::var_os(var) {
            dirs.extend(std::env::split_paths(&value).filter(|p| !p.as_os_str().is_empty()));
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            dirs.push(Path::new(&root).join("lib64"));
            dirs.push(Path::new(&root).join("lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    dirs.push("/usr/local/cuda-13.0/lib64".into());
    if let Some(cache) = quantbench_cache() {
        dirs.push(
            cache.join("nvrtc").join(crate::backend::cuda::NVRTC_WHEEL_VERSION).join("nvidia/cu13/lib"),
        );
    }
    dirs
}

/// `$QUANTBENCH_CACHE`, else `$XDG_CACHE_HOME/quantbench`, else `~/.cache/quantbench`
/// (the folder `scripts/fetch_models.sh` and `scripts/fetch_nvrtc.sh` use).
fn quantbench_cache() -> Option<PathBuf> {
    crate::files::cache_root()
}

/// The first `lib` file found in `dirs`.
pub fn find_in(lib: &CudaLib, dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter().flat_map(|d| lib.files.iter().map(move |f| d.join(f))).find(|p| p.is_file())
}

/// Libraries opened by full path, kept open for the life of the process.
static OPENED: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());

/// Open `lib` (and its companions) by full path from the first folder of
/// [`search_dirs`] holding it. Returns the path opened, `None` when no folder holds it;
/// an error when a file exists but cannot be loaded.
pub fn preload(lib: &CudaLib) -> Result<Option<PathBuf>, String> {
    let Some(path) = find_in(lib, &search_dirs()) else {
        return Ok(None);
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut opened = OPENED.lock().unwrap_or_else(|e| e.into_inner());
    for companion in lib.companions {
        let c = dir.join(companion);
        if c.is_file() {
            // SAFETY: NVIDIA's libraries run no unsound initialisers; they stay loaded.
            let l = unsafe { libloading::Library::new(&c) }.map_err(|e| format!("{}: {e}", c.display()))?;
            opened.push(l);
            break;
        }
    }
    // SAFETY: as above.
    let l = unsafe { libloading::Library::new(&path) }.map_err(|e| format!("{}: {e}", path.display()))?;
    opened.push(l);
    Ok(Some(path))
}

/// A one-line description of where `lib` was looked for (for "not found" errors).
pub fn searched(lib: &CudaLib) -> String {
    let dirs: Vec<String> = search_dirs().iter().map(|d| d.display().to_string()).collect();
    format!(
        "{} by name through the loader path, then in {}; set QUANTBENCH_CUDA_LIB_DIR to the folder holding {}",
        lib.files.join(" / "),
        dirs.join(", "),
        lib.files[0]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_most_specific_file_in_the_first_folder_holding_it() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(b.path().join("libnvrtc.so"), b"").unwrap();
        std::fs::write(b.path().join("libnvrtc.so.13"), b"").unwrap();
        let dirs = vec![a.path().to_path_buf(), b.path().to_path_buf()];
        assert_eq!(find_in(&NVRTC, &dirs), Some(b.path().join("libnvrtc.so.13")));
        assert_eq!(find_in(&CUBLAS, &dirs), None);
    }

    #[test]
    fn the_not_found_message_names_the_files_and_the_variable() {
        let m = searched(&CUBLASLT);
        assert!(m.contains("libcublasLt.so.13") && m.contains("QUANTBENCH_CUDA_LIB_DIR"), "{m}");
    }
}
