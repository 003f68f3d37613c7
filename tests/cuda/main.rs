//! CUDA backend tests. `every_kernel_compiles_under_nvrtc` needs only NVRTC (no device):
//! it fails when `QUANTBENCH_REQUIRE_NVRTC=1` (CI) and NVRTC is missing, and prints a
//! skip otherwise. The op tests compare each CUDA op with its CPU reference under a named
//! error budget, on random data of odd sizes without zeros, into outputs poisoned with
//! NaN (or an impossible code), and print "skipped: no CUDA device" where there is none.
#![cfg(feature = "cuda")]

mod decoder;
mod fused;
mod linears;

use cudarc::driver::CudaSlice;
use quantbench::backend::cuda::blas::{self, Blas};
use quantbench::backend::cuda::fuse::Fuse;
use quantbench::backend::cuda::kernels::{self, CI_ARCHS, FILES};
use quantbench::backend::cuda::ops::{self, CacheShape, DeviceMasking, DevicePacked4, FakeQuant, Unary};
use quantbench::backend::cuda::Gpu;
use quantbench::backend::{cuda_probe, CudaProbe};
use quantbench::scheme::int8_outlier::split_columns;
use quantbench::scheme::kernels::int8_gemm::gemm_i8_reference;
use quantbench::scheme::packed4::{pack_nibbles, Packed4};
use quantbench::tensor::attention::{AttentionShape, KvCache, Masking};
use quantbench::tensor::{self, Rope, SeededRng};

// ---- error budgets (max |gpu − cpu| / max(1, max |cpu|) unless said otherwise) --------

/// Integer paths and pure data movement: bit-identical.
const EXACT: f64 = 0.0;
/// Norms: statistics summed in another order (f64), one f32 rounding apart.
const NORM: f64 = 2e-6;
/// Element-wise activations: CUDA's tanhf/expf/erf against Rust's, a few ulp.
const ACTIVATION: f64 = 4e-6;
/// Softmax and attention: sums in another order, expf against exp.
const ATTENTION: f64 = 1e-5;
/// Rotary: sincosf against sin_cos of the same f32 angle.
const ROTARY: f64 = 2e-6;
/// Fused 4-bit GEMV: the scale applied once per 32 values instead of per value
/// (relative L2 error of the output).
const PACKED4_GEMV_L2: f64 = 2e-6;
/// cuBLAS f32 GEMM (no TF32): relative L2.
const GEMM_F32_L2: f64 = 1e-6;
/// cuBLAS f16 / bf16 GEMM against the CPU product of the same rounded inputs, the
/// output rounded to the 16-bit type: relative L2.
const GEMM_F16_L2: f64 = 1e-3;
const GEMM_BF16_L2: f64 = 4e-3;

/// The device, or `None` after printing why the test is skipped.
fn gpu() -> Option<Gpu> {
    match cuda_probe() {
        CudaProbe::Ready { .. } => {
            Some(Gpu::new(0).unwrap_or_else(|e| panic!("a device was found but: {e}")))
        }
        other => {
            eprintln!("skipped: no CUDA device ({other:?})");
            None
        }
    }
}

/// Normal values with no exact zeros.
fn data(n: usize, seed: u64, std: f64) -> Vec<f32> {
    SeededRng::new(seed).normal_vec(n, std).into_iter().map(|v| if v == 0.0 { 0.375 } else { v }).collect()
}

fn poisoned(gpu: &Gpu, n: usize) -> CudaSlice<f32> {
    gpu.upload(&vec![f32::NAN; n]).unwrap()
}

/// max |a − b| / max(1, max |b|), NaN anywhere is infinite.
fn max_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths");
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs() as f64));
    a.iter()
        .zip(b)
        .map(
            |(x, y)| {
                if x.is_nan() || y.is_nan() {
                    f64::INFINITY
                } else {
                    (*x as f64 - *y as f64).abs() / scale
                }
            },
        )
        .fold(0.0, f64::max)
}

fn within(name: &str, budget_name: &str, budget: f64, got: &[f32], want: &[f32]) {
    let e = max_err(got, want);
    assert!(e <= budget, "{name}: error {e:e} over the budget {budget_name} = {budget:e}");
    eprintln!("{name}: max error {e:e} (budget {budget_name} = {budget:e})");
}

fn within_l2(name: &str, budget_name: &str, budget: f64, got: &[f32], want: &[f32]) {
    assert!(got.iter().all(|v| v.is_finite()), "{name}: non-finite output (unwritten element?)");
    let e = tensor::relative_l2(got, want);
    assert!(e <= budget, "{name}: relative L2 {e:e} over the budget {budget_name} = {budget:e}");
    eprintln!("{name}: relative L2 {e:e} (budget {budget_name} = {budget:e})");
}

// ---- NVRTC (no device needed) ---------------------------------------------------------

#[test]
fn every_kernel_compiles_under_nvrtc() {
    if let Err(e) = kernels::ensure_nvrtc() {
        if std::env::var("QUANTBENCH_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            panic!("QUANTBENCH_REQUIRE_NVRTC=1 but {e}");
        }
        eprintln!("skipped: NVRTC not found ({e}); scripts/fetch_nvrtc.sh installs it");
        return;
    }
    let version = kernels::nvrtc_version().unwrap();
    let mut failures = Vec::new();
    for arch in CI_ARCHS {
        for file in FILES {
            match kernels::compile_ptx(file, arch) {
                Ok(ptx) => eprintln!("kernels/{} for {arch}: {} bytes of PTX", file.name, ptx.len()),
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    assert!(failures.is_empty(), "NVRTC {version:?}:\n{}", failures.join("\n\n"));
}

// ---- int8 -----------------------------------------------------------------------------

/// CPU reference of per-row symmetric int8 quantization (int8_dynamic's numerics).
fn quantize_rows_cpu(x: &[f32], cols: usize, skip: &[usize]) -> (Vec<i8>, Vec<f32>) {
    let (mut q, mut s) = (Vec::new(), Vec::new());
    for row in x.chunks_exact(cols) {
        let row: Vec<f32> =
            row.iter().enumerate().map(|(c, &v)| if skip.contains(&c) { 0.0 } else { v }).collect();
        let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = if absmax > 0.0 { absmax / 127.0 } else { 1.0 };
        q.extend(row.iter().map(|&v| (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8));
        s.push(scale);
    }
    (q, s)
}

#[test]
fn int8_quantization_gemv_gemm_and_rescale_match_the_cpu_exactly() {
    let Some(gpu) = gpu() else { return };
    // k % 16 == 0 takes the fast kernel (rows per block 4: n = 4099, 517, 33 leave 3, 1, 1
    // rows over; m = 9 and 37 split into launches of 8), other k the general one.
    for &(m, n, k) in &[
        (1, 4099, 1029),
        (3, 517, 1024),
        (9, 33, 80),
        (37, 260, 516),
        (1, 4096, 4096),
        (8, 6, 4112),
        (5, 1, 16),
    ] {
        let x = data(m * k, 1, 1.5);
        let w = data(n * k, 2, 0.2);
        let bias = data(n, 3, 0.1);
        let (qx_cpu, sx_cpu) = quantize_rows_cpu(&x, k, &[]);
        let (qw, sw) = quantize_rows_cpu(&w, k, &[]);
        let xd = gpu.upload(&x).unwrap();
        let mut qx = gpu.upload(&vec![-128i8; m * k]).unwrap();
        let mut sx = poisoned(&gpu, m);
        ops::quantize_rows_i8(&gpu, &xd, None, m, k, &mut qx, &mut sx).unwrap();
        assert_eq!(gpu.download(&qx).unwrap(), qx_cpu, "quantize_rows_i8 codes ({m}×{k})");
        assert_eq!(gpu.download(&sx).unwrap(), sx_cpu, "quantize_rows_i8 scales");

        let mut acc_cpu = vec![0i32; m * n];
        gemm_i8_reference(&qx_cpu, m, k, &qw, n, &mut acc_cpu);
        let want: Vec<f32> =
            (0..m * n).map(|e| acc_cpu[e] as f32 * (sx_cpu[e / n] * sw[e % n]) + bias[e % n]).collect();
        let (wd, swd, bd) = (gpu.upload(&qw).unwrap(), gpu.upload(&sw).unwrap(), gpu.upload(&bias).unwrap());
        let mut out = poisoned(&gpu, m * n);
        ops::gemv_i8(&gpu, &qx, &sx, &wd, &swd, Some(&bd), Fuse::NONE, &mut out, (m, n, k)).unwrap();
        within(&format!("gemv_i8 {m}×{n}×{k}"), "EXACT", EXACT, &gpu.download(&out).unwrap(), &want);

        let mut acc = gpu.upload(&vec![i32::MIN; m * n]).unwrap();
        ops::gemm_i8_tiled(&gpu, &qx, &wd, &mut acc, (m, n, k)).unwrap();
        assert_eq!(gpu.download(&acc).unwrap(), acc_cpu, "gemm_i8_tiled {m}×{n}×{k}");
        if blas::lt_int8_supports(n, k) {
            let blas = Blas::new(&gpu).unwrap();
            let mut acc = gpu.upload(&vec![i32::MIN; m * n]).unwrap();
            blas.gemm_i8(&qx, &wd, &mut acc, (m, n, k)).unwrap();
            assert_eq!(gpu.download(&acc).unwrap(), acc_cpu, "cuBLASLt int8 {m}×{n}×{k}");
        }
        let mut out = poisoned(&gpu, m * n);
        ops::rescale_i32(&gpu, &acc, &sx, &swd, Some(&bd), &mut out, (m, n)).unwrap();
        within("rescale_i32", "EXACT", EXACT, &gpu.download(&out).unwrap(), &want);
    }
}

#[test]
fn per_tensor_quantization_uses_one_scale() {
    let Some(gpu) = gpu() else { return };
    let (rows, cols) = (5, 301);
    let x = data(rows * cols, 4, 2.0);
    let absmax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let s = absmax / 127.0;
    let want: Vec<i8> = x.iter().map(|&v| (v / s).round_ties_even().clamp(-127.0, 127.0) as i8).collect();
    let xd = gpu.upload(&x).unwrap();
    let mut q = gpu.upload(&vec![-128i8; rows * cols]).unwrap();
    let mut sd = poisoned(&gpu, rows);
    ops::quantize_tensor_i8(&gpu, &xd, rows, cols, &mut q, &mut sd).unwrap();
    assert_eq!(gpu.download(&q).unwrap(), want);
    assert_eq!(gpu.download(&sd).unwrap(), vec![s; rows]);
}

#[test]
fn llm_int8_split_and_outlier_product_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let (rows, cols, n) = (3, 1031, 259);
    let mut x = data(rows * cols, 5, 1.0);
    for &c in &[7usize, 500, 1030] {
        x[cols + c] = 9.5; // planted outlier columns
    }
    let w = data(n * cols, 6, 0.2);
    let (qw, sw) = quantize_rows_cpu(&w, cols, &[]);
    let outliers = split_columns(&x, cols, 6.0);
    assert_eq!(outliers, vec![7, 500, 1030]);
    let xd = gpu.upload(&x).unwrap();
    let mut mask = gpu.upload(&vec![7u8; cols]).unwrap();
    let mut idx = gpu.upload(&vec![-1i32; cols]).unwrap();
    let mut count = gpu.upload(&[-1i32]).unwrap();
    ops::outlier_columns(&gpu, &xd, (rows, cols), 6.0, &mut mask, &mut idx, &mut count).unwrap();
    let got_count = gpu.download(&count).unwrap()[0] as usize;
    assert_eq!(&gpu.download(&idx).unwrap()[..got_count], &[7, 500, 1030]);

    let (qx_cpu, _) = quantize_rows_cpu(&x, cols, &outliers);
    let mut qx = gpu.upload(&vec![-128i8; rows * cols]).unwrap();
    let mut sx = poisoned(&gpu, rows);
    ops::quantize_rows_i8(&gpu, &xd, Some(&mask), rows, cols, &mut qx, &mut sx).unwrap();
    assert_eq!(gpu.download(&qx).unwrap(), qx_cpu, "inlier codes");

    for bf16 in [false, true] {
        let round =
            |v: f32| if bf16 { half::bf16::from_f32(v).to_f32() } else { half::f16::from_f32(v).to_f32() };
        let base = data(rows * n, 7, 1.0);
        let want: Vec<f32> = (0..rows * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                let sum: f32 = outliers
                    .iter()
                    .map(|&c| round(x[i * cols + c]) * round(qw[j * cols + c] as f32 * sw[j]))
                    .sum();
                base[e] + sum
            })
            .collect();
        let mut out = gpu.upload(&base).unwrap();
        let (wd, swd) = (gpu.upload(&qw).unwrap(), gpu.upload(&sw).unwrap());
        ops::outlier_product(&gpu, &xd, (rows, cols, n), &idx, &count, &wd, &swd, bf16, &mut out).unwrap();
        within(&format!("outlier_product bf16={bf16}"), "EXACT", EXACT, &gpu.download(&out).unwrap(), &want);
    }
}

#[test]
fn fake_quantization_matches_the_cpu_formulas() {
    let Some(gpu) = gpu() else { return };
    let (rows, cols) = (7, 131);
    let x = data(rows * cols, 8, 1.0);
    let scales: Vec<f32> = (0..rows).map(|r| 0.01 + r as f32 * 0.003).collect();
    let want: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(e, &v)| {
            let s = scales[e / cols];
            (v / s).round_ties_even().clamp(-128.0, 127.0) * s
        })
        .collect();
    let xd = gpu.upload(&x).unwrap();
    let sd = gpu.upload(&scales).unwrap();
    let mut out = poisoned(&gpu, x.len());
    let weights = FakeQuant { zero_point: 0.0, qmin: -128.0, qmax: 127.0, reciprocal: false };
    ops::fake_quant(&gpu, &xd, cols, &sd, weights, &mut out).unwrap();
    within("fake_quant weights", "EXACT", EXACT, &gpu.download(&out).unwrap(), &want);

    let (s, zp) = (0.02f32, 113.0f32);
    let want: Vec<f32> = x
        .iter()
        .map(|&v| ((v * (1.0 / s)).round_ties_even() + zp).clamp(0.0, 255.0) - zp)
        .map(|q| q * s)
        .collect();
    let sd = gpu.upload(&[s]).unwrap();
    let mut out = poisoned(&gpu, x.len());
    let acts = FakeQuant { zero_point: zp, qmin: 0.0, qmax: 255.0, reciprocal: true };
    ops::fake_quant(&gpu, &xd, cols, &sd, acts, &mut out).unwrap();
    within("fake_quant activations", "EXACT", EXACT, &gpu.download(&out).unwrap(), &want);
}

// ---- 4-bit block format ---------------------------------------------------------------

/// A random Packed4 weight: int4-block style (signed table, bf16 scales) or NF4 style
/// (f32 scales), with or without offsets.
fn packed(rows: usize, cols: usize, block: usize, seed: u64, bf16: bool, offsets: bool) -> Packed4 {
    let n = rows * cols;
    let mut rng = SeededRng::new(seed);
    let codes: Vec<u8> = (0..n).map(|_| (rng.next_u64() % 16) as u8).collect();
    let nb = n.div_ceil(block);
    let scale = |v: f64| if bf16 { half::bf16::from_f64(v).to_f32() } else { v as f32 };
    let scales: Vec<f32> = (0..nb).map(|_| scale(0.01 + rng.uniform() * 0.05)).collect();
    let offs = offsets.then(|| (0..nb).map(|_| scale(rng.uniform() - 0.5)).collect());
    let table = if bf16 {
        [0., 1., 2., 3., 4., 5., 6., 7., -8., -7., -6., -5., -4., -3., -2., -1.]
    } else {
        std::array::from_fn(|_| rng.normal() as f32)
    };
    Packed4 { rows, cols, block, bytes: pack_nibbles(&codes), table, scales, offsets: offs, exact_gemv: true }
}

#[test]
fn packed4_dequantization_and_fused_gemv_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    // The fast kernel takes cols % 8 == 0 with a power-of-two block >= 8 (4 rows per
    // block, each warp 128 words of 8 values per row per iteration, then the row's last
    // words % 128 words; bytes uploaded in the tiled layout, which the dequantization
    // reads too); the general one the rest (plain layout).
    let cases = [
        (4096, 4096, 128, true, false), // int4-block, fast, one iteration per row
        (517, 1024, 64, false, false),  // nf4-like, f32 scales, 517 % 4 = 1 row over
        (33, 77, 128, true, true),      // odd cols: general path, asymmetric
        (31, 96, 50, false, true),      // block not a multiple of 32: general path
        (30, 200, 64, true, true),      // fast, blocks straddle rows, bf16 offsets
        (7, 1000, 128, false, true),    // fast, straddling, f32 offsets
        (13, 264, 8, false, false),     // fast, the smallest block
        (6, 4104, 256, true, false),    // fast, 513 words: a last, partial iteration
        (9, 8200, 32, false, true),     // fast, 1025 words: partial iteration, straddling
        (3, 96, 48, true, false),       // block a multiple of 8 but not a power of two
        (2, 24, 16, false, true),       // fast, fewer words than threads
        // The fast path's tiled layout: 128-word chunks (one uint4 per lane), then a tail.
        (5, 3128, 16, true, true), // 391 words: 3 chunks (a warp idle) + 7 tail words
        (11, 2080, 1024, false, true), // 260 words: 2 chunks + 4; a block spans 4 words of a lane
        (3, 1024, 512, true, false), // 128 words: exactly one chunk, no tail
        (6, 1032, 2048, false, false), // 129 words: 1 chunk + 1; blocks straddle rows
        (9, 10248, 64, true, false), // 1281 words: 10 chunks (uneven over 4 warps) + 1
    ];
    for (i, &(rows, cols, block, bf16, offsets)) in cases.iter().enumerate() {
        let p = packed(rows, cols, block, 10 + i as u64, bf16, offsets);
        let d = DevicePacked4::upload(&gpu, &p).unwrap();
        assert_eq!(d.param_type(), if bf16 { "bf16" } else { "f32" });
        // The bf16 cases use int4-block's table: the fast path's integer decode.
        assert_eq!(d.int_table.is_some(), bf16);
        let mut deq = poisoned(&gpu, rows * cols);
        ops::packed4_dequant(&gpu, &d, Some(&mut deq), None).unwrap();
        let name = format!("packed4_dequant {rows}×{cols} block {block}");
        within(&name, "EXACT", EXACT, &gpu.download(&deq).unwrap(), &p.dequantize());
        let ms: &[usize] =
            if rows * cols > 1 << 20 { &[1, 3, 8, 9] } else { &[1, 2, 3, 4, 5, 6, 7, 8, 9, 17] };
        for &m in ms {
            let x = data(m * cols, 20 + m as u64, 1.0);
            let mut want = vec![0.0f32; m * rows];
            p.gemv(&x, m, &mut want, quantbench::scheme::packed4::Gemv::Scalar);
            let xd = gpu.upload(&x).unwrap();
            let mut out = poisoned(&gpu, m * rows);
            ops::packed4_gemv(&gpu, &d, &xd, m, None, Fuse::NONE, &mut out).unwrap();
            let name = format!("packed4_gemv m={m} {rows}×{cols} block {block}");
            within_l2(&name, "PACKED4_GEMV_L2", PACKED4_GEMV_L2, &gpu.download(&out).unwrap(), &want);
        }
    }
}

// ---- model ops ------------------------------------------------------------------------

#[test]
fn norms_activations_softmax_and_rotary_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let (rows, dim) = (5, 1001);
    let x = data(rows * dim, 30, 2.0);
    let w = data(dim, 31, 1.0);
    let b = data(dim, 32, 0.5);
    let xd = gpu.upload(&x).unwrap();
    let (wd, bd) = (gpu.upload(&w).unwrap(), gpu.upload(&b).unwrap());

    let mut want = x.clone();
    tensor::rms_norm_rows(&mut want, &w, 1e-5);
    let mut out = poisoned(&gpu, x.len());
    ops::rms_norm(&gpu, &xd, &wd, rows, 1e-5, &mut out).unwrap();
    within("rms_norm", "NORM", NORM, &gpu.download(&out).unwrap(), &want);

    let mut want = x.clone();
    tensor::layer_norm_rows(&mut want, &w, &b, 1e-5);
    let mut out = poisoned(&gpu, x.len());
    ops::layer_norm(&gpu, &xd, &wd, &bd, rows, 1e-5, &mut out).unwrap();
    within("layer_norm", "NORM", NORM, &gpu.download(&out).unwrap(), &want);

    for (act, cpu) in [
        (Unary::GeluTanh, tensor::gelu_tanh_in_place as fn(&mut [f32])),
        (Unary::GeluErf, tensor::gelu_erf_in_place as fn(&mut [f32])),
    ] {
        let mut want = x.clone();
        cpu(&mut want);
        let mut out = poisoned(&gpu, x.len());
        ops::unary(&gpu, act, &xd, &mut out).unwrap();
        within(&format!("{act:?}"), "ACTIVATION", ACTIVATION, &gpu.download(&out).unwrap(), &want);
    }

    let up = data(x.len(), 33, 1.0);
    let mut want = x.clone();
    tensor::silu_mul_in_place(&mut want, &up);
    let mut out = poisoned(&gpu, x.len());
    ops::silu_mul(&gpu, &xd, &gpu.upload(&up).unwrap(), &mut out).unwrap();
    within("silu_mul", "ACTIVATION", ACTIVATION, &gpu.download(&out).unwrap(), &want);

    let mut want = x.clone();
    want.chunks_exact_mut(dim).for_each(tensor::softmax_in_place);
    let mut out = poisoned(&gpu, x.len());
    ops::softmax_rows(&gpu, &xd, (rows, dim), &mut out).unwrap();
    within("softmax_rows", "ATTENTION", ATTENTION, &gpu.download(&out).unwrap(), &want);

    let mut want = x.clone();
    tensor::add_in_place(&mut want, &up);
    let mut out = gpu.upload(&x).unwrap();
    ops::add_in_place(&gpu, &mut out, &gpu.upload(&up).unwrap()).unwrap();
    within("add_in_place", "EXACT", EXACT, &gpu.download(&out).unwrap(), &want);

    let mut want = x.clone();
    want.chunks_exact_mut(dim).for_each(|r| tensor::add_in_place(r, &b));
    let mut out = gpu.upload(&x).unwrap();
    ops::add_bias_rows(&gpu, &mut out, &bd, rows).unwrap();
    within("add_bias_rows", "EXACT", EXACT, &gpu.download(&out).unwrap(), &want);

    // Rotary: 7 tokens at scattered positions, 3 heads of 18.
    let (tokens, heads, hd) = (7, 3, 18);
    let q = data(tokens * heads * hd, 34, 1.0);
    let positions: Vec<i32> = vec![0, 1, 5, 17, 130, 1023, 2047];
    let rope = Rope::new(hd, 10000.0);
    let mut want = q.clone();
    for (t, row) in want.chunks_exact_mut(heads * hd).enumerate() {
        let pos = positions[t] as usize;
        let angles = rope.angles(pos..pos + 1);
        row.chunks_exact_mut(hd).for_each(|h| angles.apply(h, pos));
    }
    let inv_freq: Vec<f32> =
        (0..hd / 2).map(|i| (1.0 / 10000f64.powf((2 * i) as f64 / hd as f64)) as f32).collect();
    let mut qd = gpu.upload(&q).unwrap();
    ops::rotary(
        &gpu,
        &mut qd,
        &gpu.upload(&positions).unwrap(),
        &gpu.upload(&inv_freq).unwrap(),
        (tokens, heads, hd),
    )
    .unwrap();
    within("rotary", "ROTARY", ROTARY, &gpu.download(&qd).unwrap(), &want);
}

#[test]
fn embedding_refuses_a_token_outside_the_vocabulary() {
    let Some(gpu) = gpu() else { return };
    let (vocab, dim) = (101, 19);
    let table = data(vocab * dim, 40, 1.0);
    let tokens = [0u32, 100, 7, 7, 55];
    let want: Vec<f32> = tokens.iter().flat_map(|&t| table[t as usize * dim..][..dim].to_vec()).collect();
    let td = gpu.upload(&table).unwrap();
    let mut out = poisoned(&gpu, tokens.len() * dim);
    ops::embedding(&gpu, &td, (vocab, dim), &tokens, &mut out).unwrap();
    within("embedding", "EXACT", EXACT, &gpu.download(&out).unwrap(), &want);
    let e = ops::embedding(&gpu, &td, (vocab, dim), &[101], &mut out).unwrap_err().to_string();
    assert!(e.contains("token id 101, expected below the vocabulary size 101"), "{e}");
}

#[test]
fn attention_with_a_kv_cache_matches_the_cpu_for_prefill_then_decode() {
    let Some(gpu) = gpu() else { return };
    let (batch, heads, kv_heads, hd, prefill, steps) = (2, 6, 2, 40, 13, 3);
    let shape = CacheShape { batch, heads, kv_heads, head_dim: hd, capacity: prefill + steps };
    let slopes = tensor::alibi_slopes(heads);
    for alibi in [false, true] {
        let masking = Masking { causal: true, alibi: alibi.then_some(slopes.as_slice()), key_mask: None };
        let mut cpu =
            KvCache::new(1, batch, AttentionShape { heads, kv_heads, head_dim: hd }, prefill + steps);
        let mut kc = gpu.zeros::<f32>(shape.len()).unwrap();
        let mut vc = gpu.zeros::<f32>(shape.len()).unwrap();
        let slopes_d = gpu.upload(&slopes).unwrap();
        let mut start = 0;
        for (step, seq) in std::iter::once(prefill).chain(std::iter::repeat_n(1, steps)).enumerate() {
            let seed = 50 + step as u64 * 3;
            let q = data(batch * seq * heads * hd, seed, 1.0);
            let k = data(batch * seq * kv_heads * hd, seed + 1, 1.0);
            let v = data(batch * seq * kv_heads * hd, seed + 2, 1.0);
            cpu.append(0, &k, &v, seq);
            let mut want = vec![0.0f32; q.len()];
            cpu.attend(0, &q, seq, masking, &mut want);
            cpu.advance(seq);
            ops::kv_append(&gpu, &gpu.upload(&k).unwrap(), &mut kc, shape, (start, seq)).unwrap();
            ops::kv_append(&gpu, &gpu.upload(&v).unwrap(), &mut vc, shape, (start, seq)).unwrap();
            let mut out = poisoned(&gpu, q.len());
            let dm = DeviceMasking { causal: true, alibi: alibi.then_some(&slopes_d), key_mask: None };
            ops::attention(&gpu, &gpu.upload(&q).unwrap(), &kc, &vc, shape, (start, seq), dm, &mut out)
                .unwrap();
            let name = format!("attention alibi={alibi} step {step} (seq {seq}, start {start})");
            within(&name, "ATTENTION", ATTENTION, &gpu.download(&out).unwrap(), &want);
            start += seq;
        }
    }
}

// ---- cuBLAS ---------------------------------------------------------------------------

#[test]
fn cublas_gemms_match_the_cpu_product_of_the_same_inputs() {
    let Some(gpu) = gpu() else { return };
    let blas = Blas::new(&gpu).unwrap();
    let (m, n, k) = (7, 301, 129);
    let x = data(m * k, 60, 1.0);
    let w = data(n * k, 61, 0.1);
    let want = tensor::matmul_nt_reference(&x, m, k, &w, n);
    let mut out = poisoned(&gpu, m * n);
    blas.gemm(&gpu.upload(&x).unwrap(), &gpu.upload(&w).unwrap(), &mut out, (m, n, k)).unwrap();
    within_l2("cublas f32", "GEMM_F32_L2", GEMM_F32_L2, &gpu.download(&out).unwrap(), &want);

    let xb: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let want = tensor::matmul_nt_reference(
        &xb.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
        m,
        k,
        &wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
        n,
    );
    let mut out = gpu.upload(&vec![half::bf16::NAN; m * n]).unwrap();
    blas.gemm(&gpu.upload(&xb).unwrap(), &gpu.upload(&wb).unwrap(), &mut out, (m, n, k)).unwrap();
    let got: Vec<f32> = gpu.download(&out).unwrap().iter().map(|v| v.to_f32()).collect();
    within_l2("cublas bf16", "GEMM_BF16_L2", GEMM_BF16_L2, &got, &want);

    let xh: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
    let wh: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
    let want = tensor::matmul_nt_reference(
        &xh.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
        m,
        k,
        &wh.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
        n,
    );
    let mut out = gpu.upload(&vec![half::f16::NAN; m * n]).unwrap();
    blas.gemm(&gpu.upload(&xh).unwrap(), &gpu.upload(&wh).unwrap(), &mut out, (m, n, k)).unwrap();
    let got: Vec<f32> = gpu.download(&out).unwrap().iter().map(|v| v.to_f32()).collect();
    within_l2("cublas f16", "GEMM_F16_L2", GEMM_F16_L2, &got, &want);
}

#[test]
fn conversions_round_like_the_half_crate() {
    let Some(gpu) = gpu() else { return };
    let mut x = data(1001, 70, 3.0);
    // The f16 maximum, a subnormal-range value, a huge value and a bf16 tie (1 + 2⁻⁸).
    x.extend([65504.0, 1e-8, -2.5e38, f32::from_bits(0x3F80_8000)]);
    let xd = gpu.upload(&x).unwrap();
    let mut b = gpu.upload(&vec![half::bf16::NAN; x.len()]).unwrap();
    ops::to_half(&gpu, &xd, &mut b).unwrap();
    let want: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
    assert_eq!(gpu.download(&b).unwrap(), want, "f32 → bf16");
    let mut h = gpu.upload(&vec![half::f16::NAN; x.len()]).unwrap();
    ops::to_half(&gpu, &xd, &mut h).unwrap();
    let want: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
    assert_eq!(gpu.download(&h).unwrap(), want, "f32 → f16");
    let mut back = poisoned(&gpu, x.len());
    ops::from_half(&gpu, &b, &mut back).unwrap();
    let want: Vec<f32> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
    within("bf16 → f32", "EXACT", EXACT, &gpu.download(&back).unwrap(), &want);
}

// ---- linear layers at the scheme boundary (unverified on hardware) --------------------

/// Relative L2 of the CUDA int8 layer against the CPU `Int8DynamicLinear`: the integer
/// paths are exact, so only the CPU's own GEMM path could differ (it does not).
const LINEAR_INT8_L2: f64 = 0.0;

#[test]
fn cuda_linears_match_the_cpu_layers_for_decode_and_prefill() {
    use quantbench::backend::cuda::linear::CudaLinear;
    use quantbench::scheme::int8_dynamic::{Int8DynamicLinear, Int8DynamicOptions};
    use quantbench::scheme::{DenseWeight, Linear};
    let Some(gpu) = gpu() else { return };
    let blas = Blas::new(&gpu).unwrap();
    for &(n, k) in &[(516usize, 1024usize), (257, 99)] {
        let w = data(n * k, 80, 0.2);
        let bias = data(n, 81, 0.1);
        let cpu = Int8DynamicLinear::new(
            DenseWeight { name: "w".into(), rows: n, cols: k, data: w },
            Some(bias.clone()),
            Int8DynamicOptions::default(),
        )
        .unwrap();
        let layer = CudaLinear::int8(&gpu, (n, k), &cpu.weight(), cpu.scales(), Some(&bias)).unwrap();
        for m in [1usize, 5, 40] {
            let x = data(m * k, 82 + m as u64, 1.0);
            let mut want = vec![0.0f32; m * n];
            cpu.forward(&x, m, &mut want);
            let mut out = poisoned(&gpu, m * n);
            let path = layer.forward(&gpu, &blas, &gpu.upload(&x).unwrap(), m, &mut out).unwrap();
            let name = format!("int8 linear {m}×{n}×{k} via {path}");
            within_l2(&name, "LINEAR_INT8_L2", LINEAR_INT8_L2, &gpu.download(&out).unwrap(), &want);
        }
    }
    let p = packed(300, 512, 128, 83, true, false);
    let bias = data(300, 84, 0.1);
    let layer = CudaLinear::packed4(&gpu, &p, Some(&bias)).unwrap();
    for m in [1usize, 3, 33] {
        let x = data(m * 512, 85 + m as u64, 1.0);
        let mut want = vec![0.0f32; m * 300];
        p.matmul(&x, m, &mut want);
        want.chunks_exact_mut(300).for_each(|r| tensor::add_in_place(r, &bias));
        let mut out = poisoned(&gpu, m * 300);
        let path = layer.forward(&gpu, &blas, &gpu.upload(&x).unwrap(), m, &mut out).unwrap();
        let name = format!("packed4 linear m={m} via {path}");
        within_l2(&name, "PACKED4_GEMV_L2", PACKED4_GEMV_L2, &gpu.download(&out).unwrap(), &want);
    }
}

/// The int8 GEMV for every activation-row count of one launch and past it, on the fast
/// path (k % 16 == 0) and the general one, bit-exact against the CPU.
#[test]
fn int8_gemv_matches_the_cpu_for_every_row_count() {
    let Some(gpu) = gpu() else { return };
    for &(n, k) in &[(37, 528), (10, 100)] {
        for m in 1..=17 {
            let x = data(m * k, 40 + m as u64, 1.0);
            let w = data(n * k, 41, 0.3);
            let (qx, sx) = quantize_rows_cpu(&x, k, &[]);
            let (qw, sw) = quantize_rows_cpu(&w, k, &[]);
            let mut acc = vec![0i32; m * n];
            gemm_i8_reference(&qx, m, k, &qw, n, &mut acc);
            let want: Vec<f32> = (0..m * n).map(|e| acc[e] as f32 * (sx[e / n] * sw[e % n])).collect();
            let (qxd, sxd) = (gpu.upload(&qx).unwrap(), gpu.upload(&sx).unwrap());
            let (wd, swd) = (gpu.upload(&qw).unwrap(), gpu.upload(&sw).unwrap());
            let mut out = poisoned(&gpu, m * n);
            ops::gemv_i8(&gpu, &qxd, &sxd, &wd, &swd, None, Fuse::NONE, &mut out, (m, n, k)).unwrap();
            within(&format!("gemv_i8 {m}×{n}×{k}"), "EXACT", EXACT, &gpu.download(&out).unwrap(), &want);
        }
    }
}
