//! The CPU kernels the schemes run: int8 products (a scalar reference, AVX2, and AVX-512
//! VNNI on prepacked panels), symmetric int8 quantization, and the 4-bit GEMV. Each fast
//! path is checked against its scalar reference; the schemes choose among them.
//!
//! Imports point one way inside: `int8_gemm` dispatches to `int8_gemm_panel` and
//! `int8_gemm_vnni`, which share `int8_common`; `int8_panels` builds on `int8_gemm_vnni`
//! and `int8_quant`; `packed4_gemv` runs on the format of `scheme::packed4`; its child `packed4_gemv::vnni`
//! takes whole-pair weights where the CPU has AVX-512 VNNI.

pub(crate) mod int8_common;
pub mod int8_gemm;
#[cfg(target_arch = "x86_64")]
mod int8_gemm_panel;
#[cfg(target_arch = "x86_64")]
mod int8_gemm_vnni;
#[cfg(target_arch = "x86_64")]
pub(crate) mod int8_panels;
pub(crate) mod int8_quant;
pub mod packed4_gemv;
