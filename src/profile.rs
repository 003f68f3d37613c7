//! Time per op kind inside a forward pass (`bench profile`): the forward passes open a
//! [`span`] around each op (a linear layer, attention, a norm, an activation, activation
//! quantization, dequantization); while profiling is on, each span adds its own time (its
//! children's excluded), its calls, and the floating-point operations and bytes it declares
//! to a table keyed by kind. Off (the default), a span is one relaxed atomic load.
//!
//! A leaf module: every layer may call it.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<(&'static str, &'static str), Totals>> = Mutex::new(BTreeMap::new());

thread_local! {
    /// Seconds spent in finished child spans of the innermost open span on this thread.
    static CHILDREN: Cell<f64> = const { Cell::new(0.0) };
}

/// What one op kind accumulated.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    /// Spans closed.
    pub calls: u64,
    /// Seconds inside them, nested spans excluded.
    pub seconds: f64,
    /// Floating-point (or integer multiply-add) operations declared, two per multiply-add.
    pub ops: f64,
    /// Bytes of memory declared as read or written (weights, activations).
    pub bytes: f64,
}

/// Work an op declares, for achieved rates.
#[derive(Debug, Clone, Copy, Default)]
pub struct Work {
    /// Operations (two per multiply-add).
    pub ops: f64,
    /// Bytes moved.
    pub bytes: f64,
}

/// An open span; closing it (drop) records it.
#[must_use = "a span records when dropped"]
pub struct Span {
    key: (&'static str, &'static str),
    work: Work,
    start: Instant,
    /// The enclosing span's children time, restored on close.
    outer_children: f64,
}

/// Open a span of kind `category` / `detail` (e.g. `"linear"`, `"int8-vnni-gemm"`) doing
/// the work `work` computes; `None`, with nothing computed or recorded, unless profiling
/// is on. Open spans only on the thread that runs the op, never inside a parallel loop.
#[inline]
pub fn span(category: &'static str, detail: &'static str, work: impl FnOnce() -> Work) -> Option<Span> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    let work = work();
    let outer_children = CHILDREN.with(|c| c.replace(0.0));
    Some(Span { key: (category, detail), work, start: Instant::now(), outer_children })
}

/// The work of an element-wise pass over `values` f32 values read and written, `ops` per
/// value.
pub fn elementwise(values: usize, ops: f64) -> Work {
    Work { ops: values as f64 * ops, bytes: values as f64 * 8.0 }
}

impl Drop for Span {
    fn drop(&mut self) {
        let total = self.start.elapsed().as_secs_f64();
        let children = CHILDREN.with(|c| c.replace(self.outer_children + total));
        let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
        let t = table.entry(self.key).or_default();
        t.calls += 1;
        t.seconds += (total - children).max(0.0);
        t.ops += self.work.ops;
        t.bytes += self.work.bytes;
    }
}

/// Turn recording on (clearing what was recorded) or off.
pub fn set_enabled(on: bool) {
    if on {
        TABLE.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
    ENABLED.store(on, Ordering::Relaxed);
}

/// What was recorded since [`set_enabled`]`(true)`, by `(category, detail)`.
pub fn take() -> BTreeMap<(&'static str, &'static str), Totals> {
    std::mem::take(&mut *TABLE.lock().unwrap_or_else(|e| e.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A nested span's time counts for it alone; work and calls add up; off records
    /// nothing. One test, since the table is global.
    #[test]
    fn spans_record_self_time_work_and_calls_only_when_on() {
        set_enabled(false);
        drop(span("a", "off", Work::default));
        set_enabled(true);
        {
            let _outer = span("outer", "x", || Work { ops: 10.0, bytes: 4.0 });
            std::thread::sleep(std::time::Duration::from_millis(20));
            for _ in 0..2 {
                let _inner = span("inner", "y", || Work { ops: 1.0, bytes: 2.0 });
                std::thread::sleep(std::time::Duration::from_millis(30));
            }
        }
        set_enabled(false);
        let t = take();
        assert!(!t.contains_key(&("a", "off")));
        let (outer, inner) = (t[&("outer", "x")], t[&("inner", "y")]);
        assert_eq!((outer.calls, outer.ops, outer.bytes), (1, 10.0, 4.0));
        assert_eq!((inner.calls, inner.ops, inner.bytes), (2, 2.0, 4.0));
        assert!(inner.seconds >= 0.06, "{inner:?}");
        // The outer span slept 20 ms itself; its children's 60 ms are not its own.
        assert!(outer.seconds >= 0.02 && outer.seconds < 0.05, "{outer:?}");
    }
}
