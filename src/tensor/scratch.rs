//! Recycled f32 buffers for the activations of a forward pass, so that each layer does not
//! ask the allocator for fresh, zero-filled megabytes.
//!
//! Why: a MiniLM encoder pass (8 × 128 tokens) allocates about 80 MB of layer outputs;
//! zero-filling them was a tenth of the int8 pass's time, for values every product then
//! overwrites. [`take`] hands out a recycled buffer as it was left (every value
//! initialised, but unspecified), for outputs written in full; [`recycle`] gives one back.
//! The pool is bounded (32 buffers, 256 MiB) and [`release`] empties it, which
//! the memory measurement does before each case.

use std::sync::Mutex;

/// Buffers kept at most.
const MAX_BUFFERS: usize = 32;

/// Bytes kept at most, over all buffers; a larger buffer is never kept.
const MAX_BYTES: usize = 256 << 20;

static FREE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

fn free_list() -> std::sync::MutexGuard<'static, Vec<Vec<f32>>> {
    FREE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer of `len` values for an output written in full: a recycled one when one is
/// large enough (its values left as they were), else a fresh zero-filled one.
pub fn take(len: usize) -> Vec<f32> {
    let recycled = {
        let mut free = free_list();
        // The smallest buffer that holds `len` values.
        let best = (0..free.len()).filter(|&i| free[i].capacity() >= len).min_by_key(|&i| free[i].capacity());
        best.map(|i| free.swap_remove(i))
    };
    match recycled {
        Some(mut v) => {
            if v.len() >= len {
                v.truncate(len);
            } else {
                v.resize(len, 0.0);
            }
            v
        }
        None => vec![0.0; len],
    }
}

/// Give a buffer back for a later [`take`]; dropped instead when the pool is full.
pub fn recycle(v: Vec<f32>) {
    let bytes = |v: &Vec<f32>| v.capacity() * std::mem::size_of::<f32>();
    if v.capacity() == 0 || bytes(&v) > MAX_BYTES {
        return;
    }
    let mut free = free_list();
    let held: usize = free.iter().map(bytes).sum();
    if free.len() < MAX_BUFFERS && held + bytes(&v) <= MAX_BYTES {
        free.push(v);
    }
}

/// Drop every kept buffer.
pub fn release() {
    free_list().clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test: the pool is global.
    #[test]
    fn buffers_come_back_at_the_asked_length_and_the_pool_stays_bounded() {
        release();
        let mut a = take(1000);
        assert_eq!(a.len(), 1000);
        assert!(a.iter().all(|&v| v == 0.0));
        a.fill(7.0);
        let ptr = a.as_ptr();
        recycle(a);
        // Smaller: the same buffer, truncated; its values left as they were.
        let b = take(10);
        assert_eq!((b.len(), b.as_ptr()), (10, ptr));
        assert!(b.iter().all(|&v| v == 7.0));
        recycle(b);
        // Larger than any kept buffer: a fresh zero-filled one.
        let c = take(5000);
        assert!(c.len() == 5000 && c.iter().all(|&v| v == 0.0));
        // Grown within capacity: the new tail is zero.
        let mut d = take(10);
        assert_eq!(d.as_ptr(), ptr);
        d.resize(10, 0.0);
        recycle(d);
        let e = take(1000);
        assert_eq!(e.as_ptr(), ptr);
        assert!(e[..10].iter().all(|&v| v == 7.0) && e[10..].iter().all(|&v| v == 0.0));
        for _ in 0..2 * MAX_BUFFERS {
            recycle(vec![0.0; 4]);
        }
        assert_eq!(free_list().len(), MAX_BUFFERS);
        recycle(vec![0.0; MAX_BYTES / 4 + 1]);
        assert_eq!(free_list().len(), MAX_BUFFERS);
        release();
        assert!(free_list().is_empty());
        drop((c, e));
    }
}
