//! Keeps the pool's other threads awake, stealing work, while a forward pass runs.
//!
//! Why: a rayon worker that finds no work yields a few dozen times and then sleeps; the
//! next parallel loop must wake it, which on the virtual machines this crate is measured
//! on costs about 18 µs (the hypervisor parks an idle vCPU). A decode step runs about
//! 200 GEMVs of 10–60 µs each, separated by serial work (norms, the attention of one
//! token, small products) long enough for the workers to fall asleep: SmolLM2-135M's
//! 4-bit `o_proj`, the first parallel loop after two serial ones, took 33 µs against
//! 15 µs for the same shape right after another parallel loop, and the 4-bit linears of
//! a step reached 12 GB/s where two independent single-thread processes reached 18.
//! OpenMP, which PyTorch uses, keeps its threads spinning for a while after each
//! parallel region for the same reason.
//!
//! [`keep_awake`] starts a spinner on every other thread of the pool, once; each
//! spinner runs whatever work appears ([`rayon::yield_now`]) and returns to rayon's own
//! sleep after [`IDLE_LIMIT`] without any. Calling it again while they spin costs one
//! atomic load. The thread that called it runs no spinner of its own (it has the
//! forward pass to run), so nothing it waits for can sit under a spinner.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a spinner waits for work before letting its thread sleep. Long enough to
/// span the serial stretches of a forward pass (the longest, a decode step's attention
/// at long context, is well under a millisecond), short enough that an idle program
/// stops using the cores at once.
pub const IDLE_LIMIT: Duration = Duration::from_millis(2);

/// Spinners running now.
static SPINNING: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread runs a spinner (a second one on the same thread returns).
    static IS_SPINNER: Cell<bool> = const { Cell::new(false) };
}

/// Make sure the other threads of the pool are spinning for work; call before (or
/// throughout) a stretch of many small parallel loops. Does nothing outside the pool or
/// with one thread.
pub fn keep_awake() {
    let threads = rayon::current_num_threads();
    let Some(caller) = rayon::current_thread_index() else { return };
    if threads < 2 || SPINNING.load(Ordering::Relaxed) >= threads - 1 {
        return;
    }
    rayon::spawn_broadcast(move |ctx| {
        if ctx.index() != caller {
            spin();
        }
    });
}

/// Run pool work as it appears, until none has come for [`IDLE_LIMIT`].
fn spin() {
    if IS_SPINNER.with(|s| s.replace(true)) {
        return;
    }
    SPINNING.fetch_add(1, Ordering::Relaxed);
    let mut idle_since = Instant::now();
    loop {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle_since = Instant::now(),
            _ if idle_since.elapsed() >= IDLE_LIMIT => break,
            _ => std::hint::spin_loop(),
        }
    }
    SPINNING.fetch_sub(1, Ordering::Relaxed);
    IS_SPINNER.with(|s| s.set(false));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
    }

    #[test]
    fn with_spinners_the_parallel_work_is_all_done() {
        let total = pool(2).install(|| {
            keep_awake();
            let sum: u64 = (0..100_000u64).into_par_iter().map(|v| v % 7).sum();
            keep_awake();
            sum
        });
        assert_eq!(total, (0..100_000u64).map(|v| v % 7).sum::<u64>());
    }

    #[test]
    fn a_spinner_without_work_gives_its_thread_back() {
        let started = Instant::now();
        pool(1).install(spin);
        let took = started.elapsed();
        assert!(took >= IDLE_LIMIT && took < Duration::from_secs(5), "{took:?}");
    }

    #[test]
    fn outside_the_pool_it_does_nothing() {
        keep_awake();
    }
}
