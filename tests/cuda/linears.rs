//! Every scheme's layer on the device: `CudaLinear::from_linear` of the CPU layer against
//! the CPU layer's own `Linear::forward`, for decode (1, 3, 8 rows: the GEMV paths) and
//! prefill (40 rows), on two odd shapes with a bias, random inputs without zeros, into
//! NaN-poisoned outputs, under a named budget per case.

use std::collections::BTreeMap;

use quantbench::backend::cuda::blas::Blas;
use quantbench::backend::cuda::linear::CudaLinear;
use quantbench::scheme::{
    Calibration, DenseWeight, FloatLinear, FloatStorage, Linear, SchemeParams, WeightParts, SCHEMES,
};

use super::{data, gpu, max_err, poisoned, EXACT, GEMM_F32_L2};

/// cuBLAS f16 GEMM of f16-rounded activations against the CPU's f32 activations times the
/// same f16 weights: the activations' rounding (2⁻¹¹ relative at most, ≈ 2⁻¹³ RMS) shows
/// in the output as a relative L2 of about 2e-4.
const HALF_F16_L2: f64 = 1e-3;
/// As [`HALF_F16_L2`] for bf16 (2⁻⁸ relative at most, ≈ 1.6e-3 RMS).
const HALF_BF16_L2: f64 = 5e-3;
/// The 4-bit formats with the CPU's default GEMV, which rounds activations to 16-bit fixed
/// point per 32 values and code tables to fixed point (`packed4_gemv`); the device GEMV
/// keeps both in f32. Measured on an H100: up to 1.9e-4 (nf4, kmeans), 2e-5 (int4-block).
const PACKED4_FIXED_L2: f64 = 5e-4;
/// The 4-bit formats with `exact_gemv: true` (the CPU GEMV in f32): the scale applied once
/// per block piece instead of per value, and f32 sums in another order.
const PACKED4_EXACT_L2: f64 = 2e-6;

/// How a case is compared.
#[derive(Debug, Clone, Copy)]
enum Budget {
    /// max |gpu − cpu| / max(1, max |cpu|) at most this (0: equal values).
    Max(&'static str, f64),
    /// Relative L2 at most this.
    L2(&'static str, f64),
}

/// One layer configuration.
struct Case {
    label: &'static str,
    /// The registry name, or `head` for the unquantized head.
    scheme: &'static str,
    params: &'static [(&'static str, &'static str)],
    budget: Budget,
}

const fn case(
    label: &'static str,
    scheme: &'static str,
    params: &'static [(&'static str, &'static str)],
    budget: Budget,
) -> Case {
    Case { label, scheme, params, budget }
}

const INT8_EXACT: Budget = Budget::Max("EXACT (integer paths, same f32 rescale)", EXACT);
const F32: Budget = Budget::L2("GEMM_F32_L2", GEMM_F32_L2);

/// Every scheme, and the options that take another device path. Param values are JSON.
const CASES: &[Case] = &[
    case("fp32", "fp32", &[], F32),
    case("fp16", "fp16", &[], Budget::L2("HALF_F16_L2", HALF_F16_L2)),
    case("bf16", "bf16", &[], Budget::L2("HALF_BF16_L2", HALF_BF16_L2)),
    case("head (unquantized)", "head", &[], F32),
    case("int8-dynamic", "int8-dynamic", &[], INT8_EXACT),
    case("int8-dynamic per-tensor", "int8-dynamic", &[("per_tensor_activations", "true")], INT8_EXACT),
    case("int8-dynamic torch_compat", "int8-dynamic", &[("torch_compat", "true")], INT8_EXACT),
    case("int8-static minmax", "int8-static", &[], INT8_EXACT),
    case(
        "int8-static percentile",
        "int8-static",
        &[("observer", "\"percentile\""), ("percentile", "99.0")],
        INT8_EXACT,
    ),
    case("int8-outlier f16", "int8-outlier", &[], INT8_EXACT),
    case(
        "int8-outlier bf16 t=2.5",
        "int8-outlier",
        &[("outlier_dtype", "\"bf16\""), ("threshold", "2.5")],
        INT8_EXACT,
    ),
    case("qat-sim", "qat-sim", &[], F32),
    case("int4-block", "int4-block", &[], Budget::L2("PACKED4_FIXED_L2", PACKED4_FIXED_L2)),
    case(
        "int4-block asym exact",
        "int4-block",
        &[("asymmetric", "true"), ("exact_gemv", "true")],
        Budget::L2("PACKED4_EXACT_L2", PACKED4_EXACT_L2),
    ),
    case("nf4", "nf4", &[], Budget::L2("PACKED4_FIXED_L2", PACKED4_FIXED_L2)),
    case(
        "nf4 double-quant exact",
        "nf4",
        &[("double_quant", "true"), ("exact_gemv", "true")],
        Budget::L2("PACKED4_EXACT_L2", PACKED4_EXACT_L2),
    ),
    case("fp4", "fp4", &[("exact_gemv", "true")], Budget::L2("PACKED4_EXACT_L2", PACKED4_EXACT_L2)),
    case("prune", "prune", &[], F32),
    case("prune 2:4", "prune", &[("pattern", "\"2:4\"")], F32),
    case(
        "kmeans 16 (4-bit)",
        "kmeans",
        &[("iterations", "5")],
        Budget::L2("PACKED4_FIXED_L2", PACKED4_FIXED_L2),
    ),
    case("kmeans 8 (3-bit)", "kmeans", &[("clusters", "8"), ("iterations", "5")], F32),
    case("kmeans 40 (6-bit)", "kmeans", &[("clusters", "40"), ("iterations", "5")], F32),
];

/// `(in, out)` features: odd, and a cuBLASLt-friendly shape.
const SHAPES: [(usize, usize); 2] = [(517, 99), (1024, 516)];

/// Activation rows: the GEMV paths (1, 3, 8) and prefill (40).
const ROWS: [usize; 4] = [1, 3, 8, 40];

/// The CPU layer of `case` for `(k, n)`.
fn cpu_layer(case: &Case, (k, n): (usize, usize)) -> Box<dyn Linear> {
    let seed = 100 + k as u64 + n as u64;
    let weight = DenseWeight { name: "layer.weight".into(), rows: n, cols: k, data: data(n * k, seed, 0.2) };
    let bias = Some(data(n, seed + 1, 0.1));
    if case.scheme == "head" {
        return Box::new(FloatLinear::unquantized(weight, bias, FloatStorage::F32));
    }
    let info = SCHEMES.iter().find(|s| s.name == case.scheme).unwrap_or_else(|| panic!("{}", case.scheme));
    let raw: BTreeMap<String, serde_json::Value> =
        case.params.iter().map(|(k, v)| (k.to_string(), serde_json::from_str(v).unwrap())).collect();
    let params: SchemeParams = info.validate_params(raw).unwrap_or_else(|e| panic!("{}: {e}", case.label));
    let scheme = (info.build)(&params).unwrap();
    let calib_rows = 64;
    let inputs = data(calib_rows * k, seed + 2, 1.0);
    let calibration = info.needs_calibration.then_some(Calibration { inputs: &inputs, rows: calib_rows });
    scheme.quantize(weight, bias, calibration).unwrap_or_else(|e| panic!("{}: {e}", case.label))
}

/// Inputs `[m, k]`; for LLM.int8 a few columns get one value of magnitude 9 (outliers at
/// the default threshold 6), in one row each.
fn input(case: &Case, m: usize, k: usize) -> Vec<f32> {
    let mut x = data(m * k, 7 + m as u64 + k as u64, 1.0);
    if case.scheme == "int8-outlier" {
        for c in (0..k).filter(|c| c % 61 == 7) {
            let r = c % m;
            x[r * k + c] = if c % 2 == 0 { 9.0 } else { -9.0 };
        }
    }
    x
}

#[test]
fn every_scheme_in_the_registry_has_a_device_case() {
    for info in SCHEMES {
        assert!(
            CASES.iter().any(|c| c.scheme == info.name),
            "scheme {} has no case in tests/cuda/linears.rs, expected one (and a CUDA path in CudaLinear)",
            info.name
        );
    }
}

#[test]
fn every_case_builds_on_the_cpu_with_consistent_parts() {
    for case in CASES {
        for shape in SHAPES {
            let layer = cpu_layer(case, shape);
            let parts = layer.parts();
            let (k, n) = shape;
            assert_eq!(parts.bias.map(<[f32]>::len), Some(n), "{}", case.label);
            let values = match parts.weights {
                WeightParts::Dense { weight, .. } | WeightParts::FakeQuant { weight, .. } => weight.len(),
                WeightParts::Half { bits, .. } => bits.len(),
                WeightParts::Int8Dynamic { weight, .. } => weight.len(),
                WeightParts::Int8Static { weight, .. } | WeightParts::Int8Outlier { weight, .. } => {
                    weight.len()
                }
                WeightParts::Packed4(p) => p.rows * p.cols,
                WeightParts::Codebook { indices, bits, .. } => indices.len() * 8 / bits as usize,
            };
            assert!(values >= n * k && values < n * k + 8, "{}: {values} weights for {n}×{k}", case.label);
        }
    }
}

#[test]
fn every_scheme_on_the_device_matches_its_cpu_layer() {
    let Some(gpu) = gpu() else { return };
    let blas = Blas::new(&gpu).unwrap();
    let mut failures = Vec::new();
    for case in CASES {
        for (k, n) in SHAPES {
            let cpu = cpu_layer(case, (k, n));
            let dev = match CudaLinear::from_linear(&gpu, cpu.as_ref()) {
                Ok(d) => d,
                Err(e) => {
                    failures.push(format!("{} {k}→{n}: from_linear: {e}", case.label));
                    continue;
                }
            };
            assert_eq!((dev.in_features(), dev.out_features()), (k, n));
            eprintln!("{} {k}→{n}: {} device bytes", case.label, dev.device_bytes());
            for m in ROWS {
                let x = input(case, m, k);
                let mut want = vec![0.0f32; m * n];
                cpu.forward(&x, m, &mut want);
                let mut out = poisoned(&gpu, m * n);
                let path = match dev.forward(&gpu, &blas, &gpu.upload(&x).unwrap(), m, &mut out) {
                    Ok(p) => p,
                    Err(e) => {
                        failures.push(format!("{} {k}→{n} m={m}: forward: {e}", case.label));
                        continue;
                    }
                };
                assert_eq!(path, dev.kernel(m));
                let got = gpu.download(&out).unwrap();
                let name = format!("{} {k}→{n} m={m} via {path}", case.label);
                let (budget_name, budget, e) = match case.budget {
                    Budget::Max(b, v) => (b, v, max_err(&got, &want)),
                    Budget::L2(b, v) => {
                        let finite = got.iter().all(|v| v.is_finite());
                        let e =
                            if finite { quantbench::tensor::relative_l2(&got, &want) } else { f64::INFINITY };
                        (b, v, e)
                    }
                };
                eprintln!("{name}: error {e:e} (budget {budget_name} = {budget:e})");
                if e > budget || e.is_nan() {
                    failures.push(format!("{name}: error {e:e} over the budget {budget_name} = {budget:e}"));
                }
            }
            let (cpu_stats, dev_stats) = (cpu.stats(), dev.stats(&gpu).unwrap());
            if case.scheme == "int8-outlier" {
                let (a, b) = (cpu_stats[0], dev_stats.first().copied().unwrap_or(("none", f64::NAN)));
                eprintln!("{} {k}→{n}: {} cpu {} device {}", case.label, a.0, a.1, b.1);
                if a.0 != b.0 || (a.1 - b.1).abs() > 1e-12 {
                    failures.push(format!("{} {k}→{n}: stats cpu {a:?}, device {b:?}", case.label));
                }
            } else if !dev_stats.is_empty() {
                failures.push(format!("{}: unexpected device stats {dev_stats:?}", case.label));
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// Device time per call at batch 1 of a 4096×4096 layer (no bias) for the paths a decode
/// step compares: printed, not asserted (timings belong to the benchmark).
#[test]
fn decode_timings_of_llm_int8_against_bf16_are_printed() {
    let Some(gpu) = gpu() else { return };
    let blas = Blas::new(&gpu).unwrap();
    let (k, n) = (4096usize, 4096usize);
    let weight = DenseWeight { name: "w".into(), rows: n, cols: k, data: data(n * k, 5, 0.02) };
    let mut x = data(k, 6, 1.0);
    x[17] = 20.0; // one outlier column, as in real activations
    let xd = gpu.upload(&x).unwrap();
    for name in ["bf16", "int8-dynamic", "int8-outlier", "int4-block"] {
        let info = SCHEMES.iter().find(|s| s.name == name).unwrap();
        let layer =
            (info.build)(&SchemeParams::default()).unwrap().quantize(weight.clone(), None, None).unwrap();
        let dev = CudaLinear::from_linear(&gpu, layer.as_ref()).unwrap();
        let mut out = poisoned(&gpu, n);
        for _ in 0..10 {
            dev.forward(&gpu, &blas, &xd, 1, &mut out).unwrap();
        }
        let iters = 200;
        let ms = gpu
            .time_ms(|| {
                for _ in 0..iters {
                    dev.forward(&gpu, &blas, &xd, 1, &mut out)?;
                }
                Ok(())
            })
            .unwrap();
        eprintln!(
            "{name} 4096x4096 m=1 via {}: {:.2} us per call",
            dev.kernel(1),
            ms * 1000.0 / iters as f32
        );
    }
}
