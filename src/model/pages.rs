//! Giving back a mapped checkpoint's pages once a tensor has been copied out of them.

use memmap2::Mmap;

/// Drop this process's mapping of a tensor's pages once the tensor is copied out: they
/// would otherwise stay in the resident set beside the copy, doubling a model's memory
/// while it loads (the kernel keeps the bytes in its page cache, where they are shared and
/// reclaimable). Only tensors of 64 KiB or more: the call costs more than smaller ones
/// hold (a small model's 4-bit GGUF is made of 200 KiB tensors, 98 MB in all).
pub fn release(mmap: &Mmap, offset: usize, len: usize) {
    if len < RELEASE_MIN_BYTES {
        return;
    }
    #[cfg(unix)]
    // SAFETY: the mapping is a private, read-only view of a file this process does not
    // write; after MADV_DONTNEED a read of these pages faults them in again from the file,
    // with the same bytes. A failure only leaves the pages resident.
    let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
}

/// Tensors smaller than this keep their pages mapped.
const RELEASE_MIN_BYTES: usize = 64 << 10;
