//! The kernel sources (`kernels/*.cu`, embedded in the binary so a carried binary needs
//! no source tree), and their compilation with NVRTC to PTX for one architecture, cached
//! on disk by the hash of source, options and NVRTC version.
//!
//! Each file is compiled as `kernels/common.cuh` followed by the file, with `#line`
//! markers so NVRTC's messages name the right file and line. No include path is needed.

use std::path::PathBuf;

use cudarc::nvrtc::{self, CompileError, CompileOptions};
use sha2::{Digest, Sha256};

use super::{guard, libs, CudaError};

/// Helpers prepended to every file.
pub const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// One `.cu` file and the kernels it defines.
#[derive(Debug)]
pub struct KernelFile {
    /// File name under `kernels/`.
    pub name: &'static str,
    /// Its text.
    pub source: &'static str,
    /// The `extern "C"` kernels it defines (each must appear in its PTX), in groups: single
    /// kernels, and the per-row-count variants the launchers index.
    pub kernels: &'static [&'static [&'static str]],
}

impl KernelFile {
    /// Every kernel name of the file.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kernels.iter().flat_map(|group| group.iter().copied())
    }
}

/// Activation-row counts with a kernel variant each (`_m1` .. `_m8`): what one GEMV launch
/// takes.
pub const ROW_VARIANTS: usize = 8;

/// The fast int8 GEMV per activation-row count (index: rows − 1).
pub const GEMV_I8_BY_ROWS: [&str; ROW_VARIANTS] = [
    "gemv_i8_m1",
    "gemv_i8_m2",
    "gemv_i8_m3",
    "gemv_i8_m4",
    "gemv_i8_m5",
    "gemv_i8_m6",
    "gemv_i8_m7",
    "gemv_i8_m8",
];

/// The fast f32 4-bit GEMV (tiled layout) per activation-row count.
pub const PACKED4_GEMV_BY_ROWS: [&str; ROW_VARIANTS] = [
    "packed4_gemv_m1",
    "packed4_gemv_m2",
    "packed4_gemv_m3",
    "packed4_gemv_m4",
    "packed4_gemv_m5",
    "packed4_gemv_m6",
    "packed4_gemv_m7",
    "packed4_gemv_m8",
];

/// The one-launch fixed-point 4-bit GEMV per activation-row count.
pub const PACKED4_GEMV_FIXED_BY_ROWS: [&str; ROW_VARIANTS] = [
    "packed4_gemv_fixed_m1",
    "packed4_gemv_fixed_m2",
    "packed4_gemv_fixed_m3",
    "packed4_gemv_fixed_m4",
    "packed4_gemv_fixed_m5",
    "packed4_gemv_fixed_m6",
    "packed4_gemv_fixed_m7",
    "packed4_gemv_fixed_m8",
];

/// The prequantized fixed-point 4-bit GEMV per activation-row count.
pub const PACKED4_GEMV_FIXEDQ_BY_ROWS: [&str; ROW_VARIANTS] = [
    "packed4_gemv_fixedq_m1",
    "packed4_gemv_fixedq_m2",
    "packed4_gemv_fixedq_m3",
    "packed4_gemv_fixedq_m4",
    "packed4_gemv_fixedq_m5",
    "packed4_gemv_fixedq_m6",
    "packed4_gemv_fixedq_m7",
    "packed4_gemv_fixedq_m8",
];

/// The dense f32/f16/bf16 GEMV per activation-row count.
pub const DENSE_GEMV_BY_ROWS: [&str; ROW_VARIANTS] = [
    "dense_gemv_m1",
    "dense_gemv_m2",
    "dense_gemv_m3",
    "dense_gemv_m4",
    "dense_gemv_m5",
    "dense_gemv_m6",
    "dense_gemv_m7",
    "dense_gemv_m8",
];

/// int8: activation quantization, GEMV (general, and fast per activation-row count),
/// fallback GEMM, rescale, LLM.int8, fake quant.
pub const QUANT: KernelFile = KernelFile {
    name: "quant.cu",
    source: include_str!("../../../kernels/quant.cu"),
    kernels: &[
        &["quantize_rows_i8", "absmax_bits", "quantize_tensor_i8", "gemv_i8"],
        &GEMV_I8_BY_ROWS,
        &["gemm_i8_tiled", "rescale_i32", "outlier_mask", "compact_mask", "outlier_product", "fake_quant"],
    ],
};

/// The shared 4-bit block format: dequantization and the fused GEMVs (general, fast f32 and
/// fixed-point in one launch or after `q16_quantize_chunks`, per activation-row count).
pub const PACKED4: KernelFile = KernelFile {
    name: "packed4.cu",
    source: include_str!("../../../kernels/packed4.cu"),
    kernels: &[
        &["packed4_dequant", "packed4_gemv", "q16_quantize_chunks"],
        &PACKED4_GEMV_BY_ROWS,
        &PACKED4_GEMV_FIXED_BY_ROWS,
        &PACKED4_GEMV_FIXEDQ_BY_ROWS,
    ],
};

/// Model ops.
pub const OPS: KernelFile = KernelFile {
    name: "ops.cu",
    source: include_str!("../../../kernels/ops.cu"),
    kernels: &[&[
        "rms_norm",
        "layer_norm",
        "gelu_tanh",
        "gelu_erf",
        "silu_mul",
        "add_in_place",
        "add_bias_rows",
        "bias_act_rows",
        "softmax_rows",
        "rotary",
        "embedding",
        "kv_append",
        "kv_append_pair",
        "split_qkv_append",
        "attention",
        "split_qkv",
        "last_rows",
    ]],
};

/// f32 ↔ bf16/f16 conversions.
pub const CAST: KernelFile = KernelFile {
    name: "cast.cu",
    source: include_str!("../../../kernels/cast.cu"),
    kernels: &[&["f32_to_bf16_kernel", "bf16_to_f32_kernel", "f32_to_f16_kernel", "f16_to_f32_kernel"]],
};

/// The device linear layers' own kernels: LLM.int8's fused decode split and GEMV,
/// int8-static, torch-compatible int8-dynamic, 16-bit rounding, the dense decode GEMV,
/// kmeans dequantization.
pub const LINEAR: KernelFile = KernelFile {
    name: "linear.cu",
    source: include_str!("../../../kernels/linear.cu"),
    kernels: &[
        &[
            "llm_int8_prepare",
            "record_outliers",
            "gemv_i8_outlier",
            "quantize_static_i8",
            "gemv_i8_static",
            "rescale_static",
            "torch_quantize_i8",
            "gemv_i8_torch",
            "rescale_torch",
            "round_to_16",
            "codebook_dequant",
        ],
        &DENSE_GEMV_BY_ROWS,
    ],
};

/// Every kernel file (a test checks this list against the `kernels/` folder).
pub const FILES: [&KernelFile; 5] = [&QUANT, &PACKED4, &OPS, &CAST, &LINEAR];

/// The architectures CI compiles every file for (no device needed): A100 and H100/H200.
pub const CI_ARCHS: [&str; 2] = ["compute_80", "compute_90"];

/// The text NVRTC compiles for `file`.
pub fn full_source(file: &KernelFile) -> String {
    format!("#line 1 \"kernels/common.cuh\"\n{COMMON}\n#line 1 \"kernels/{}\"\n{}", file.name, file.source)
}

/// NVRTC options for a virtual architecture such as `compute_90`.
pub fn options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()]
}

/// Make NVRTC loadable: by name through the loader path, else from a known folder
/// (see [`libs`]). Must be called before any other NVRTC call: cudarc panics when the
/// library is missing.
pub fn ensure_nvrtc() -> Result<(), CudaError> {
    // SAFETY: only tries to open the library by its candidate names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    let opened = libs::preload(&libs::NVRTC).map_err(|e| CudaError::Library { lib: "nvrtc", message: e })?;
    // SAFETY: as above.
    if opened.is_some() && unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    Err(CudaError::Library {
        lib: "nvrtc",
        message: format!("not found: looked for {}", libs::searched(&libs::NVRTC)),
    })
}

/// NVRTC's version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    ensure_nvrtc()?;
    guard("nvrtc version", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out pointers.
        let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(CudaError::Compile {
                file: "-",
                arch: "-".into(),
                log: format!("nvrtcVersion failed: {status:?}"),
            });
        }
        Ok((major, minor))
    })
}

/// Compile `file` to PTX for `arch` (`compute_XY`), without the disk cache.
pub fn compile_ptx(file: &KernelFile, arch: &str) -> Result<String, CudaError> {
    ensure_nvrtc()?;
    let src = full_source(file);
    let opts =
        CompileOptions { options: options(arch), name: Some(file.name.to_string()), ..Default::default() };
    let ptx = guard("nvrtc compile", || {
        nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| CudaError::Compile {
            file: file.name,
            arch: arch.to_string(),
            log: compile_log(&e),
        })
    })?;
    let text = ptx.to_src();
    for kernel in file.names() {
        if !text.contains(&format!(".entry {kernel}(")) {
            return Err(CudaError::Compile {
                file: file.name,
                arch: arch.to_string(),
                log: format!("kernel `{kernel}` is listed in kernels.rs but not in the compiled PTX"),
            });
        }
    }
    Ok(text)
}

/// NVRTC's log (or the error) as text.
fn compile_log(e: &CompileError) -> String {
    match e {
        CompileError::CompileError { nvrtc, log, .. } => {
            format!("{nvrtc:?}:\n{}", log.to_string_lossy().trim_end())
        }
        other => format!("{other:?}"),
    }
}

/// Where compiled PTX is cached: `$QUANTBENCH_CACHE/ptx` (else
/// `~/.cache/quantbench/ptx`); `None` when no home folder is known.
fn cache_dir() -> Option<PathBuf> {
    Some(crate::files::cache_root()?.join("ptx"))
}

/// The cache key of `file` compiled for `arch` by NVRTC `version`.
pub fn cache_key(file: &KernelFile, arch: &str, version: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(full_source(file).as_bytes());
    h.update(options(arch).join(" ").as_bytes());
    h.update(format!("nvrtc {}.{}", version.0, version.1).as_bytes());
    let digest = h.finalize();
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("{}-{arch}-{hex}.ptx", file.name.trim_end_matches(".cu"))
}

/// PTX of `file` for `arch`, from the disk cache when present, else compiled and stored
/// (a cache that cannot be written is skipped silently: it only saves time).
pub fn cached_ptx(file: &KernelFile, arch: &str) -> Result<String, CudaError> {
    let version = nvrtc_version()?;
    let path = cache_dir().map(|d| d.join(cache_key(file, arch, version)));
    if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        return Ok(text);
    }
    let text = compile_ptx(file, arch)?;
    if let Some(p) = &path {
        if let Some(dir) = p.parent() {
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            let written = std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&tmp, &text));
            if written.and_then(|_| std::fs::rename(&tmp, p)).is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cu_file_in_kernels_is_listed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.ends_with(".cu"))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = FILES.iter().map(|f| f.name.to_string()).collect();
        listed.sort();
        assert_eq!(on_disk, listed);
    }

    #[test]
    fn every_listed_kernel_is_defined_extern_c_in_its_file() {
        for file in FILES {
            for k in file.names() {
                // `extern "C" __global__ void name(`, or with `__launch_bounds__(..) ` before
                // the name.
                let defined = file.source.lines().any(|l| {
                    l.strip_prefix("extern \"C\" __global__ void ").is_some_and(|rest| {
                        let rest = rest
                            .strip_prefix("__launch_bounds__(")
                            .map_or(rest, |b| b.split_once(") ").map_or(b, |(_, name)| name));
                        rest.starts_with(&format!("{k}("))
                    })
                });
                assert!(defined, "{}: no `extern \"C\" __global__ void {k}(`", file.name);
            }
            let defined = file.source.matches("extern \"C\" __global__ void ").count();
            assert_eq!(defined, file.names().count(), "{}: kernels defined vs listed", file.name);
        }
    }

    #[test]
    fn sources_start_with_line_markers_and_cache_keys_change_with_the_arch() {
        let s = full_source(&OPS);
        assert!(s.starts_with("#line 1 \"kernels/common.cuh\""));
        assert!(s.contains("#line 1 \"kernels/ops.cu\""));
        let a = cache_key(&OPS, "compute_80", (13, 0));
        let b = cache_key(&OPS, "compute_90", (13, 0));
        assert_ne!(a, b);
        assert!(a.starts_with("ops-compute_80-") && a.ends_with(".ptx"), "{a}");
        assert_ne!(cache_key(&OPS, "compute_90", (13, 1)), b);
    }
}
