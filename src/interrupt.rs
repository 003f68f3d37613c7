//! SIGINT and SIGTERM: the run stops cleanly. A dedicated thread waits for either signal;
//! when one comes it lets the file being written finish (writes are atomic, see
//! [`crate::files`]), removes the temporary files, says what was kept, and exits with
//! 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as shells expect.

use std::path::PathBuf;
use std::sync::Mutex;

/// What the run has written so far: the results file and its finished cases.
static KEPT: Mutex<Option<(PathBuf, usize)>> = Mutex::new(None);

/// Record that `results` now holds `cases` finished cases, for the interruption message.
pub fn record_kept(results: PathBuf, cases: usize) {
    *KEPT.lock().unwrap_or_else(|p| p.into_inner()) = Some((results, cases));
}

/// Take over SIGINT and SIGTERM for the whole process. Call first in `main`, before any
/// other thread starts: the signals are blocked in the calling thread, every thread
/// started later inherits that, and only the waiting thread receives them.
pub fn install() {
    let set = signal_set();
    // SAFETY: `set` is a valid, initialised signal set; a null old-set pointer is allowed.
    let blocked = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if blocked != 0 {
        // Without the mask the default action (exit without cleanup) still applies.
        return;
    }
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut signal = 0;
        // SAFETY: `set` is valid and `signal` is a valid out-pointer.
        while unsafe { libc::sigwait(&set, &mut signal) } != 0 {}
        stop(signal)
    });
    if spawned.is_err() {
        // Nobody would receive the signals: give them back their default action.
        // SAFETY: as above.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set; both signal numbers are valid.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Finish the write under way, remove temporaries, report, and exit.
fn stop(signal: i32) -> ! {
    let name = if signal == libc::SIGINT { "SIGINT" } else { "SIGTERM" };
    // Held until the exit: no write starts after this one.
    let _writes = crate::files::hold_writes();
    let removed = crate::files::remove_temporaries();
    let kept = KEPT.lock().unwrap_or_else(|p| p.into_inner()).clone();
    eprintln!("\ninterrupted by {name}");
    match kept {
        Some((path, cases)) => eprintln!("kept {cases} finished cases in {}", path.display()),
        None => eprintln!("no results were written"),
    }
    for path in &removed {
        eprintln!("removed temporary {}", path.display());
    }
    std::process::exit(128 + signal)
}
