//! Progress on stderr while a suite runs.

use std::io::{IsTerminal, Write};
use std::time::Instant;

/// Progress on stderr: a live line with the current case and an ETA on a terminal,
/// plain log lines otherwise (CI logs).
pub struct Progress {
    total: usize,
    finished: usize,
    measured: usize,
    started: Instant,
    case: String,
    tty: bool,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        Progress {
            total,
            finished: 0,
            measured: 0,
            started: Instant::now(),
            case: String::new(),
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn eta(&self) -> String {
        if self.measured == 0 {
            return String::new();
        }
        let per_case = self.started.elapsed().as_secs_f64() / self.measured as f64;
        format!(" · ETA {:.0}s", per_case * (self.total - self.finished) as f64)
    }

    fn line(&self, text: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{text}");
        } else {
            let _ = writeln!(err, "{text}");
        }
        let _ = err.flush();
    }

    pub fn note(&self, text: &str) {
        self.line(&format!("[{}/{}] {text}", self.finished, self.total));
    }

    pub fn start(&mut self, id: &str) {
        self.case = id.to_string();
        self.step("start");
    }

    pub fn step(&mut self, what: &str) {
        let bar = if self.tty { self.bar() } else { String::new() };
        self.line(&format!(
            "{bar}[{}/{}] {} · {what}{}",
            self.finished + 1,
            self.total,
            self.case,
            self.eta()
        ));
    }

    /// `▕████░░░░░░▏ ` with one cell per 5% of the cases finished.
    fn bar(&self) -> String {
        const CELLS: usize = 20;
        let full = CELLS * self.finished / self.total.max(1);
        format!("▕{}{}▏ ", "█".repeat(full), "░".repeat(CELLS - full))
    }

    pub fn skip(&mut self, id: &str) {
        self.finished += 1;
        self.line(&format!(
            "[{}/{}] {id} · already in results.json (--resume), skipped",
            self.finished, self.total
        ));
        if self.tty {
            eprintln!();
        }
    }

    pub fn finish(&mut self, id: &str) {
        self.finished += 1;
        self.measured += 1;
        self.line(&format!(
            "[{}/{}] {id} · done in {:.1}s total",
            self.finished,
            self.total,
            self.started.elapsed().as_secs_f64()
        ));
        if self.tty {
            eprintln!();
        }
    }

    pub fn done(&self) {
        if self.tty {
            self.line("");
        }
    }
}
