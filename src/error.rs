//! The library's one error type, sectioned by the stage that failed.
//!
//! Messages are lowercase, name the thing that is wrong (file, key, tensor) and say what
//! was expected. Context is added at the edges by wrapping an inner error as `source`,
//! so `main` prints the whole chain once.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, grouped by stage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- suite parsing and validation -------------------------------------------------
    /// The suite file is not valid YAML or does not match the schema.
    #[error("suite {path}: {message}")]
    SuiteSyntax { path: PathBuf, message: String },
    /// The suite parsed but a value is not acceptable.
    #[error("suite {path}, line {line}: {message}")]
    SuiteValue { path: PathBuf, line: u64, message: String },

    // ---- model loading --------------------------------------------------------------
    /// A model directory or file is missing.
    #[error("model {what} not found at {path}: {hint}")]
    ModelMissing { what: &'static str, path: PathBuf, hint: String },
    /// Downloading a model from the hub failed.
    #[error("hub repository {repo} at {endpoint}: {message}")]
    Hub { repo: String, endpoint: String, message: String },
    /// A model file exists but its content is not what was expected.
    #[error("model file {path}: {message}")]
    ModelFormat { path: PathBuf, message: String },
    /// A tensor is missing, or has the wrong shape or dtype for the config.
    #[error("tensor {name}: {message}")]
    Tensor { name: String, message: String },
    /// config.json holds a value the architecture cannot use.
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },
    /// The tokenizer could not be loaded or used.
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    // ---- schemes ----------------------------------------------------------------------
    /// A scheme name or parameter is unknown or out of range.
    #[error("scheme {scheme}: {message}")]
    Scheme { scheme: String, message: String },

    // ---- running and measuring ------------------------------------------------------
    /// A check made while running failed (e.g. a reloaded model disagrees with the original).
    #[error("case {case}: {message}")]
    Case { case: String, message: String },
    /// A tensor computed while running holds a NaN or an infinity.
    #[error(
        "non-finite value in {tensor} at {position}: found {value}, expected a finite number \
         (the forward pass overflowed, or a weight or norm epsilon makes it divide by zero)"
    )]
    NonFinite { tensor: String, position: String, value: f32 },
    /// A prompt or sentence file that does not hold what its extension says.
    #[error("input file {path}: {message}")]
    Inputs { path: PathBuf, message: String },
    /// A workload cannot be run (too few tokens, empty prompt list, ...).
    #[error("workload: {0}")]
    Workload(String),
    /// The compute device failed (a CUDA call, a kernel launch, device memory).
    #[error("device {device}: {message}")]
    Device { device: &'static str, message: String },
    /// A report could not be rendered.
    #[error("report: {0}")]
    Render(String),
    /// Shards cannot be merged (`bench merge`).
    #[error("merge: {0}")]
    Merge(String),
    /// An existing results file cannot be resumed.
    #[error("results file {path}: {message}")]
    Results { path: PathBuf, message: String },
    /// A stored reference (`references/NAME.qbref`) cannot be used.
    #[error("stored reference {path}: {message}")]
    Reference { path: PathBuf, message: String },

    // ---- plumbing ---------------------------------------------------------------------
    /// An I/O operation on a named path failed.
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON document could not be read or written.
    #[error("json {path}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Outer context around an inner error.
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// Wrap an I/O error with the action and the path it concerned.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { action, path: path.into(), source }
    }

    /// Add a line of context that is printed before this error.
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context { context: context.into(), source: Box::new(self) }
    }

    /// The error and its causes, one per line, the way `main` prints them.
    pub fn chain(&self) -> String {
        let mut out = format!("error: {self}");
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            out.push_str(&format!("\n  caused by: {cause}"));
            source = cause.source();
        }
        out
    }
}

/// Adds `.context(..)` to results of this crate.
pub trait ResultExt<T> {
    /// Wrap the error, if any, in a line of context computed lazily.
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| e.context(f()))
    }
}

/// A shape as `[2, 3]`, for messages.
pub(crate) fn dims_text<T: std::fmt::Display>(dims: &[T]) -> String {
    use std::fmt::Write;
    let mut text = String::from("[");
    for (i, d) in dims.iter().enumerate() {
        let _ = write!(text, "{}{d}", if i == 0 { "" } else { ", " });
    }
    text.push(']');
    text
}
