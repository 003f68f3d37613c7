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
    SuiteSyntax {
        /// The file or folder concerned.
        path: PathBuf,
        /// What is wrong, and what was expected.
        message: String,
    },
    /// The suite parsed but a value is not acceptable.
    #[error("suite {path}, line {line}: {message}")]
    SuiteValue {
        /// The file or folder concerned.
        path: PathBuf,
        /// The line in the suite file (1-based).
        line: u64,
        /// What is wrong, and what was expected.
        message: String,
    },

    // ---- model loading --------------------------------------------------------------
    /// A model directory or file is missing.
    #[error("model {what} not found at {path}: {hint}")]
    ModelMissing {
        /// What is missing (a folder, a file).
        what: &'static str,
        /// The file or folder concerned.
        path: PathBuf,
        /// How to provide it.
        hint: String,
    },
    /// Downloading a model from the hub failed.
    #[error("hub repository {repo} at {endpoint}: {message}")]
    Hub {
        /// The repository id (`org/name`).
        repo: String,
        /// The hub endpoint asked.
        endpoint: String,
        /// What is wrong, and what was expected.
        message: String,
    },
    /// A model file exists but its content is not what was expected.
    #[error("model file {path}: {message}")]
    ModelFormat {
        /// The file or folder concerned.
        path: PathBuf,
        /// What is wrong, and what was expected.
        message: String,
    },
    /// A tensor is missing, or has the wrong shape or dtype for the config.
    #[error("tensor {name}: {message}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// What is wrong, and what was expected.
        message: String,
    },
    /// config.json holds a value the architecture cannot use.
    #[error("config {path}: {message}")]
    Config {
        /// The file or folder concerned.
        path: PathBuf,
        /// What is wrong, and what was expected.
        message: String,
    },
    /// The tokenizer could not be loaded or used.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The file or folder concerned.
        path: PathBuf,
        /// What is wrong, and what was expected.
        message: String,
    },

    // ---- schemes ----------------------------------------------------------------------
    /// A scheme name or parameter is unknown or out of range.
    #[error("scheme {scheme}: {message}")]
    Scheme {
        /// The scheme's name.
        scheme: String,
        /// What is wrong, and what was expected.
        message: String,
    },

    // ---- running and measuring ------------------------------------------------------
    /// A check made while running failed (e.g. a reloaded model disagrees with the original).
    #[error("case {case}: {message}")]
    Case {
        /// The case's id.
        case: String,
        /// What is wrong, and what was expected.
        message: String,
    },
    /// A tensor computed while running holds a NaN or an infinity.
    #[error(
        "non-finite value in {tensor} at {position}: found {value}, expected a finite number \
         (the forward pass overflowed, or a weight or norm epsilon makes it divide by zero)"
    )]
    NonFinite {
        /// The tensor (layer output, logits) that holds it.
        tensor: String,
        /// Where in the tensor.
        position: String,
        /// The value found.
        value: f32,
    },
    /// A prompt or sentence file that does not hold what its extension says.
    #[error("input file {path}: {message}")]
    Inputs {
        /// The file or folder concerned.
        path: PathBuf,
        /// What is wrong, and what was expected.
        message: String,
    },
    /// A workload cannot be run (too few tokens, empty prompt list, ...).
    #[error("workload: {0}")]
    Workload(String),
    /// The compute device failed (a CUDA call, a kernel launch, device memory).
    #[error("device {device}: {message}")]
    Device {
        /// The device (`cuda`).
        device: &'static str,
        /// What is wrong, and what was expected.
        message: String,
    },
    /// A CUDA call failed: its error (`backend::cuda::CudaError`) is the source, so the
    /// printed chain keeps it.
    #[error("device cuda")]
    Cuda(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A report could not be rendered.
    #[error("report: {0}")]
    Render(String),
    /// Shards cannot be merged (`bench merge`).
    #[error("merge: {0}")]
    Merge(String),
    /// An existing results file cannot be resumed.
    #[error("results file {path}: {message}")]
    Results {
        /// The file or folder concerned.
        path: PathBuf,
        /// What is wrong, and what was expected.
        message: String,
    },
    /// A stored reference (`references/NAME.qbref`) cannot be used.
    #[error("stored reference {path}: {message}")]
    Reference {
        /// The file or folder concerned.
        path: PathBuf,
        /// What is wrong, and what was expected.
        message: String,
    },

    // ---- plumbing ---------------------------------------------------------------------
    /// An I/O operation on a named path failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done (`reading`, `writing`, ...).
        action: &'static str,
        /// The file or folder concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON document could not be read or written.
    #[error("json {path}")]
    Json {
        /// The file or folder concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// Outer context around an inner error.
    #[error("{context}")]
    Context {
        /// The line of context printed before the inner error.
        context: String,
        /// The underlying error.
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
