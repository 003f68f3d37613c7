//! The one integration-test binary: golden logits against Hugging Face transformers, the
//! command line end to end, and the errors bad inputs get.

mod bad_input;
mod cli;
mod distributed;
mod golden;
mod hub;
mod layers;
mod measure;
mod precision;
mod real;
mod report;
mod support;
mod torch_dynamic;
mod trust;
