//! Peak host memory per case, from the kernel's resident-set high-water mark.
//!
//! Cases run one after another in this process rather than each in a child process: a
//! child would have to rebuild the reference model and re-read the checkpoint for every
//! case, and its peak would then include that reference rather than the case. Instead,
//! before a case starts, freed heap memory is handed back to the kernel (`malloc_trim`)
//! and the high-water mark is reset to the current resident size by writing `5` to
//! `/proc/self/clear_refs` (Linux ≥ 4.0). The peak read afterwards (`VmHWM`) is then the
//! case's own, on top of what was resident when it started (`VmRSS`), which is reported
//! beside it. Where either file is missing (not Linux, a locked-down container) both
//! figures are `None`, never a stale number.

use std::fs;

/// Resident-set figures of one case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssWindow {
    /// Resident bytes when the window opened.
    pub start: u64,
}

impl RssWindow {
    /// Return freed memory to the kernel, reset the high-water mark and note the
    /// resident size. `None` when the kernel does not offer the reset.
    pub fn open() -> Option<RssWindow> {
        release_free_heap();
        fs::write("/proc/self/clear_refs", "5").ok()?;
        Some(RssWindow { start: status_bytes("VmRSS:")? })
    }

    /// The peak resident size since [`RssWindow::open`], bytes.
    pub fn peak(&self) -> Option<u64> {
        status_bytes("VmHWM:")
    }

    /// The resident size now, after handing freed heap back to the kernel, bytes.
    pub fn now(&self) -> Option<u64> {
        release_free_heap();
        status_bytes("VmRSS:")
    }
}

/// Memory this process may still fill, bytes: `QUANTBENCH_MEMORY_LIMIT` (bytes) when set,
/// to run as if on a smaller machine, else the kernel's `MemAvailable`; `None` when
/// neither is known.
pub fn available_bytes() -> Option<u64> {
    if let Some(limit) = std::env::var("QUANTBENCH_MEMORY_LIMIT").ok().and_then(|v| v.trim().parse().ok()) {
        return Some(limit);
    }
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line["MemAvailable:".len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn status_bytes(field: &str) -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Largest buffer the heap serves itself (larger ones are mapped and unmapped by the
/// kernel on every allocation): glibc's own ceiling for its adaptive threshold.
const HEAP_BUFFER_LIMIT: i32 = 32 << 20;

/// Free heap kept for reuse before glibc hands it back to the kernel on its own.
const HEAP_KEEP_FREE: i32 = 512 << 20;

/// Let freed activation buffers (up to 32 MiB) be reused instead of handed
/// back to the kernel and faulted in again, zero-filled, by the next forward pass.
///
/// glibc maps buffers above 128 KiB fresh from the kernel until one of them is freed,
/// and trims the heap whenever its free top grows past twice that threshold: a forward
/// pass that allocates a few MiB per layer then spends a fifth of its time in page faults
/// (measured on all-MiniLM-L6-v2, int8, 8 × 128 tokens). Fixed limits end that. Memory
/// figures stay true: [`RssWindow`] trims the heap before each case, and a case's peak is
/// what it held at once. Call once, before threads start.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's tuning parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_BUFFER_LIMIT);
        libc::mallopt(libc::M_TRIM_THRESHOLD, HEAP_KEEP_FREE);
    }
}

/// Hand free heap pages, and the recycled activation buffers, back to the kernel so they
/// stop counting as resident.
pub fn release_free_heap() {
    crate::tensor::scratch::release();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Touch every page of a fresh `bytes`-long buffer so it is resident.
    fn resident(bytes: usize) -> Vec<u8> {
        let mut v = vec![0u8; bytes];
        v.iter_mut().step_by(4096).for_each(|b| *b = 1);
        v
    }

    #[test]
    fn a_small_window_after_a_large_one_reports_its_own_peak() {
        let Some(large) = RssWindow::open() else {
            eprintln!("skipped: /proc/self/clear_refs is not available here");
            return;
        };
        let big = resident(256 << 20);
        let large_peak = large.peak().unwrap();
        drop(big);
        let small = RssWindow::open().unwrap();
        let little = resident(16 << 20);
        let small_peak = small.peak().unwrap();
        drop(little);
        assert!(large_peak >= large.start + (250 << 20), "{large_peak} vs start {}", large.start);
        // Other tests of this binary run in parallel threads and allocate too; leave them
        // 96 MiB, far below the 256 MiB the large window held.
        assert!(small_peak < small.start + (112 << 20), "{small_peak} vs start {}", small.start);
        assert!(small_peak < large_peak, "{small_peak} vs {large_peak}");
    }
}
