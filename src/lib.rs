//! quantbench: what a quantization scheme costs and buys, for one model on one machine.
//!
//! A YAML suite names models, schemes, a workload and metrics; [`runner`] loads each
//! model, applies each scheme, and measures memory, disk size, latency and divergence from
//! the full-precision reference; [`report`] writes results.json and renders tables. See
//! ARCHITECTURE.md in the repository for the data flow, the layers and their rules.

#![warn(missing_docs)]

pub mod backend;
pub mod cli;
pub mod error;
pub mod files;
pub mod hash;
pub mod inputs;
pub mod interrupt;
pub mod measure;
pub mod model;
pub mod profile;
pub mod report;
pub mod runner;
pub mod scheme;
pub mod suite;
pub mod tensor;

pub use error::{Error, Result};
