//! The fused decode kernels: the fixed-point 4-bit GEMV against the CPU's fixed-point GEMV,
//! the dense f32/f16/bf16 GEMV against the CPU product, every product's epilogue (bias,
//! activation, residual add) against the separate launches it replaces, and the merged
//! cache appends against split_qkv + kv_append, on random data into NaN-poisoned outputs.

use quantbench::backend::cuda::fuse::{self, AppendAt, DenseWeight, Fuse};
use quantbench::backend::cuda::ops::{self, CacheShape, DevicePacked4, FixedPointKernel, Unary};
use quantbench::backend::cuda::Gpu;
use quantbench::scheme::packed4::{Gemv, Packed4};

use super::{data, gpu, packed, poisoned, within, within_l2, ACTIVATION, EXACT};

/// The fixed-point GEMV against the CPU's fixed-point GEMV on the same inputs: the same
/// quantized activations and exact integer chunk sums; only the f32 scaling and summation
/// order differ (relative L2 about 1e-7).
const FIXED_VS_CPU_FIXED_L2: f64 = 1e-6;
/// The fixed-point GEMV against the exact f32 product: the activations' 16-bit rounding per
/// 32-value chunk (a relative step of 1/65534 of the chunk's largest magnitude). The tests'
/// one chunk holding 1e4 among unit values rounds those to steps of 0.15: measured up to
/// 5.3e-5 on an H200.
const FIXED_VS_EXACT_L2: f64 = 2e-4;
/// The dense GEMV against the CPU product of the same (for 16-bit weights: rounded)
/// activations, f32 sums in another order.
const DENSE_GEMV_L2: f64 = 1e-6;

fn fixed(p: Packed4) -> Packed4 {
    Packed4 { exact_gemv: false, ..p }
}

#[test]
fn the_fixed_point_packed4_gemv_matches_the_cpus_fixed_point_gemv() {
    let Some(gpu) = gpu() else { return };
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    // (rows, cols, block, offsets): int4-block's table (bf16 scales); slabs of 64 chunks
    // (2048 values), rows past a block of 16, blocks straddling rows.
    let cases = [
        (4096, 4096, 128, false),
        (37, 4096, 128, true),
        (16, 2048, 32, false),
        (19, 2080, 64, true),
        (5, 96, 32, false),
        (33, 6176, 256, false),
        (8, 32, 2048, true),
    ];
    for (i, &(rows, cols, block, offsets)) in cases.iter().enumerate() {
        let p = fixed(packed(rows, cols, block, 70 + i as u64, true, offsets));
        let d = DevicePacked4::upload(&gpu, &p).unwrap();
        assert!(d.fixed_point, "{rows}×{cols} block {block} should take the fixed-point GEMV");
        let mut deq = poisoned(&gpu, rows * cols);
        ops::packed4_dequant(&gpu, &d, Some(&mut deq), None).unwrap();
        within(
            "packed4_dequant (plain layout)",
            "EXACT",
            EXACT,
            &gpu.download(&deq).unwrap(),
            &p.dequantize(),
        );
        let ms: &[usize] = if rows * cols > 1 << 20 { &[1, 8] } else { &[1, 2, 3, 5, 8, 9] };
        for &m in ms {
            let mut x = data(m * cols, 80 + m as u64, 1.0);
            // A zero chunk and a chunk of one large value: d = 0 and a wide range.
            x[..32].fill(0.0);
            if let Some(v) = x.get_mut(40) {
                *v = 1e4;
            }
            let mut exact = vec![0.0f32; m * rows];
            p.gemv(&x, m, &mut exact, Gemv::Scalar);
            let mut cpu_fixed = vec![0.0f32; m * rows];
            p.gemv(&x, m, &mut cpu_fixed, Gemv::Avx2Fixed);
            let xd = gpu.upload(&x).unwrap();
            for kernel in [FixedPointKernel::Prequantized, FixedPointKernel::Slab] {
                let mut out = poisoned(&gpu, m * rows);
                ops::packed4_gemv_using(&gpu, &d, &xd, m, None, Fuse::NONE, &mut out, kernel).unwrap();
                let got = gpu.download(&out).unwrap();
                let name = format!(
                    "fixed-point packed4_gemv ({kernel:?}) m={m} {rows}×{cols} block {block} offsets {offsets}"
                );
                if avx2 {
                    within_l2(
                        &format!("{name} vs CPU fixed"),
                        "FIXED_VS_CPU_FIXED_L2",
                        FIXED_VS_CPU_FIXED_L2,
                        &got,
                        &cpu_fixed,
                    );
                } else {
                    eprintln!("{name}: no AVX2 here, so the CPU's fixed-point path is not compared");
                }
                within_l2(&format!("{name} vs exact"), "FIXED_VS_EXACT_L2", FIXED_VS_EXACT_L2, &got, &exact);
            }
        }
    }
}

#[test]
fn the_fixed_point_gemv_turns_a_non_finite_activation_into_nan() {
    let Some(gpu) = gpu() else { return };
    let p = fixed(packed(20, 256, 128, 90, true, false));
    let d = DevicePacked4::upload(&gpu, &p).unwrap();
    for (bad, kernel) in [f32::NAN, f32::INFINITY]
        .into_iter()
        .flat_map(|bad| [FixedPointKernel::Prequantized, FixedPointKernel::Slab].map(|k| (bad, k)))
    {
        let mut x = data(2 * 256, 91, 1.0);
        x[256 + 70] = bad;
        // Zeros, not NaN, before the call: row 0 must come back finite, row 1 all NaN.
        let mut out = gpu.upload(&[0.0f32; 40]).unwrap();
        ops::packed4_gemv_using(&gpu, &d, &gpu.upload(&x).unwrap(), 2, None, Fuse::NONE, &mut out, kernel)
            .unwrap();
        let got = gpu.download(&out).unwrap();
        assert!(got[..20].iter().all(|v| v.is_finite()), "{kernel:?}: row 0 {got:?}");
        assert!(got[20..].iter().all(|v| v.is_nan()), "{kernel:?}: {bad} in row 1 gave {:?}", &got[20..]);
    }
}

/// CPU reference of the dense GEMV: `x` rounded as the weights' type.
fn dense_reference(
    w: &[f32],
    x: &[f32],
    (m, rows, cols): (usize, usize, usize),
    round: fn(f32) -> f32,
) -> Vec<f32> {
    let mut out = vec![0.0f32; m * rows];
    for i in 0..m {
        for r in 0..rows {
            let s: f64 = (0..cols).map(|c| w[r * cols + c] as f64 * round(x[i * cols + c]) as f64).sum();
            out[i * rows + r] = s as f32;
        }
    }
    out
}

/// A label, the device weight, its values as the CPU sees them, the activations' rounding.
type DenseCase<'a> = (&'static str, DenseWeight<'a>, &'a [f32], fn(f32) -> f32);

#[test]
fn the_dense_gemv_matches_the_cpu_for_f32_f16_and_bf16_weights() {
    let Some(gpu) = gpu() else { return };
    for &(rows, cols) in &[(37, 528), (16, 8), (300, 1032), (3, 4096)] {
        let w = data(rows * cols, 100, 0.1);
        let bias = data(rows, 101, 1.0);
        let bd = gpu.upload(&bias).unwrap();
        let f16: Vec<u16> = w.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
        let bf16: Vec<u16> = w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        let w16: Vec<f32> = f16.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect();
        let wb16: Vec<f32> = bf16.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
        let (wd, f16d, bf16d) =
            (gpu.upload(&w).unwrap(), gpu.upload(&f16).unwrap(), gpu.upload(&bf16).unwrap());
        for m in [1, 2, 5, 8] {
            let x = data(m * cols, 102 + m as u64, 1.0);
            let xd = gpu.upload(&x).unwrap();
            let cases: [DenseCase; 3] = [
                ("f32", DenseWeight::F32(&wd), &w, |v| v),
                ("f16", DenseWeight::Half(&f16d, false), &w16, |v| half::f16::from_f32(v).to_f32()),
                ("bf16", DenseWeight::Half(&bf16d, true), &wb16, |v| half::bf16::from_f32(v).to_f32()),
            ];
            for (label, weight, wf, round) in cases {
                if cols % if label == "f32" { 4 } else { 8 } != 0 {
                    continue;
                }
                let mut want = dense_reference(wf, &x, (m, rows, cols), round);
                want.iter_mut().enumerate().for_each(|(e, v)| *v += bias[e % rows]);
                let mut out = poisoned(&gpu, m * rows);
                fuse::dense_gemv(&gpu, weight, (rows, cols), &xd, m, Some(&bd), Fuse::NONE, &mut out)
                    .unwrap();
                let name = format!("dense_gemv {label} m={m} {rows}×{cols}");
                within_l2(&name, "DENSE_GEMV_L2", DENSE_GEMV_L2, &gpu.download(&out).unwrap(), &want);
            }
        }
    }
    let e = fuse::dense_gemv(
        &gpu,
        DenseWeight::F32(&gpu.upload(&[0.0f32; 6]).unwrap()),
        (2, 3),
        &gpu.upload(&[0.0f32; 3]).unwrap(),
        1,
        None,
        Fuse::NONE,
        &mut gpu.upload(&[0.0f32; 2]).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("cols = 3") && e.contains("multiple of 4"), "{e}");
}

/// Each product kernel's epilogue equals its plain output then the separate launches, bit
/// for bit: gelu (tanh and erf) of product + bias, and a residual add.
#[test]
fn every_gemv_epilogue_equals_the_separate_launches() {
    let Some(gpu) = gpu() else { return };
    let (rows, cols) = (48, 512);
    let bias = gpu.upload(&data(rows, 110, 1.0)).unwrap();
    let residual = data(8 * rows, 111, 1.0);
    let int4 = DevicePacked4::upload(&gpu, &fixed(packed(rows, cols, 128, 112, true, false))).unwrap();
    let int4_f32 = DevicePacked4::upload(&gpu, &packed(rows, cols, 128, 112, true, false)).unwrap();
    let nf4 = DevicePacked4::upload(&gpu, &packed(rows, cols, 64, 113, false, true)).unwrap();
    let wf = gpu.upload(&data(rows * cols, 114, 0.1)).unwrap();
    let wh: Vec<u16> =
        data(rows * cols, 115, 0.1).iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
    let wh = gpu.upload(&wh).unwrap();
    let qw: Vec<i8> = (0..rows * cols).map(|i| (i * 37 % 255) as i8).collect();
    let qw = gpu.upload(&qw).unwrap();
    let sw = gpu.upload(&data(rows, 116, 0.01)).unwrap();
    type Product<'a> = Box<
        dyn Fn(&Gpu, usize, &cudarc::driver::CudaSlice<f32>, Fuse, &mut cudarc::driver::CudaSlice<f32>) + 'a,
    >;
    let products: Vec<(&str, Product)> = vec![
        (
            "packed4 fixed",
            Box::new(|g, m, x, f, o| ops::packed4_gemv(g, &int4, x, m, Some(&bias), f, o).unwrap()),
        ),
        (
            "packed4 f32",
            Box::new(|g, m, x, f, o| ops::packed4_gemv(g, &int4_f32, x, m, Some(&bias), f, o).unwrap()),
        ),
        ("nf4 f32", Box::new(|g, m, x, f, o| ops::packed4_gemv(g, &nf4, x, m, Some(&bias), f, o).unwrap())),
        (
            "dense f32",
            Box::new(|g, m, x, f, o| {
                fuse::dense_gemv(g, DenseWeight::F32(&wf), (rows, cols), x, m, Some(&bias), f, o).unwrap()
            }),
        ),
        (
            "dense bf16",
            Box::new(|g, m, x, f, o| {
                fuse::dense_gemv(g, DenseWeight::Half(&wh, true), (rows, cols), x, m, Some(&bias), f, o)
                    .unwrap()
            }),
        ),
        (
            "int8",
            Box::new(|g, m, x, f, o| {
                let mut q = g.zeros::<i8>(m * cols).unwrap();
                let mut sx = g.zeros::<f32>(m).unwrap();
                ops::quantize_rows_i8(g, x, None, m, cols, &mut q, &mut sx).unwrap();
                ops::gemv_i8(g, &q, &sx, &qw, &sw, Some(&bias), f, o, (m, rows, cols)).unwrap()
            }),
        ),
    ];
    for (label, product) in &products {
        for m in [1, 3, 8] {
            let x = gpu.upload(&data(m * cols, 117 + m as u64, 1.0)).unwrap();
            let mut plain = poisoned(&gpu, m * rows);
            product(&gpu, m, &x, Fuse::NONE, &mut plain);
            let plain_host = gpu.download(&plain).unwrap();
            for (act, cpu_name) in [(Unary::GeluTanh, "gelu_tanh"), (Unary::GeluErf, "gelu_erf")] {
                let mut want = poisoned(&gpu, m * rows);
                ops::unary(&gpu, act, &plain, &mut want).unwrap();
                let mut got = poisoned(&gpu, m * rows);
                product(&gpu, m, &x, Fuse::activation(act), &mut got);
                let name = format!("{label} m={m} with {cpu_name}");
                within(
                    &name,
                    "ACTIVATION",
                    ACTIVATION,
                    &gpu.download(&got).unwrap(),
                    &gpu.download(&want).unwrap(),
                );
            }
            let res = &residual[..m * rows];
            let mut got = gpu.upload(res).unwrap();
            product(&gpu, m, &x, Fuse::RESIDUAL, &mut got);
            let want: Vec<f32> = res.iter().zip(&plain_host).map(|(a, b)| a + b).collect();
            within(&format!("{label} m={m} + residual"), "EXACT", EXACT, &gpu.download(&got).unwrap(), &want);
        }
    }
    // bias_act_rows, the epilogue of the products that have none: add_bias_rows, gelu,
    // add_in_place.
    let (m, n) = (5, rows);
    let raw = data(m * n, 120, 1.0);
    let rawd = gpu.upload(&raw).unwrap();
    let mut biased = gpu.upload(&raw).unwrap();
    ops::add_bias_rows(&gpu, &mut biased, &bias, m).unwrap();
    let mut act = poisoned(&gpu, m * n);
    ops::unary(&gpu, Unary::GeluTanh, &biased, &mut act).unwrap();
    let mut want = gpu.upload(&residual[..m * n]).unwrap();
    ops::add_in_place(&gpu, &mut want, &act).unwrap();
    let mut got = gpu.upload(&residual[..m * n]).unwrap();
    let both = Fuse { act: Some(Unary::GeluTanh), accumulate: true };
    fuse::bias_act_rows(&gpu, &rawd, Some(&bias), both, &mut got, (m, n)).unwrap();
    within(
        "bias_act_rows",
        "ACTIVATION",
        ACTIVATION,
        &gpu.download(&got).unwrap(),
        &gpu.download(&want).unwrap(),
    );
}

#[test]
fn merged_cache_appends_equal_split_qkv_and_two_kv_appends() {
    let Some(gpu) = gpu() else { return };
    let (batch, heads, hd, capacity) = (2, 4, 16, 9);
    let shape = CacheShape { batch, heads, kv_heads: heads, head_dim: hd, capacity };
    let width = heads * hd;
    for (seq, start, run) in [(3, 0, hd), (1, 5, hd), (2, 7, width)] {
        let rows = batch * seq;
        let fused = gpu.upload(&data(rows * 3 * width, 130 + start as u64, 1.0)).unwrap();
        // Reference: split, then one append each.
        let (mut q, mut k, mut v) =
            (poisoned(&gpu, rows * width), poisoned(&gpu, rows * width), poisoned(&gpu, rows * width));
        ops::split_qkv(&gpu, &fused, (rows, width, run), &mut q, &mut k, &mut v).unwrap();
        let cache0 = data(shape.len(), 131, 1.0);
        let (mut kc, mut vc) = (gpu.upload(&cache0).unwrap(), gpu.upload(&cache0).unwrap());
        ops::kv_append(&gpu, &k, &mut kc, shape, (start, seq)).unwrap();
        ops::kv_append(&gpu, &v, &mut vc, shape, (start, seq)).unwrap();
        // One launch, the start on the host.
        let mut q2 = poisoned(&gpu, rows * width);
        let (mut kc2, mut vc2) = (gpu.upload(&cache0).unwrap(), gpu.upload(&cache0).unwrap());
        fuse::split_qkv_append(
            &gpu,
            &fused,
            run,
            &mut q2,
            (&mut kc2, &mut vc2),
            shape,
            seq,
            AppendAt::Host(start),
        )
        .unwrap();
        let name = format!("split_qkv_append seq {seq} start {start} run {run}");
        within(&format!("{name} q"), "EXACT", EXACT, &gpu.download(&q2).unwrap(), &gpu.download(&q).unwrap());
        within(
            &format!("{name} k"),
            "EXACT",
            EXACT,
            &gpu.download(&kc2).unwrap(),
            &gpu.download(&kc).unwrap(),
        );
        within(
            &format!("{name} v"),
            "EXACT",
            EXACT,
            &gpu.download(&vc2).unwrap(),
            &gpu.download(&vc).unwrap(),
        );
        // The pair append, the start on the device.
        let at = gpu.upload(&[start as i32]).unwrap();
        let at = at.slice(0..1);
        let (mut kc3, mut vc3) = (gpu.upload(&cache0).unwrap(), gpu.upload(&cache0).unwrap());
        fuse::kv_append_pair(&gpu, (&k, &v), (&mut kc3, &mut vc3), shape, seq, AppendAt::Device(&at))
            .unwrap();
        within(
            &format!("kv_append_pair {name} k"),
            "EXACT",
            EXACT,
            &gpu.download(&kc3).unwrap(),
            &gpu.download(&kc).unwrap(),
        );
        within(
            &format!("kv_append_pair {name} v"),
            "EXACT",
            EXACT,
            &gpu.download(&vc3).unwrap(),
            &gpu.download(&vc).unwrap(),
        );
    }
    // Past the capacity: an error naming the positions.
    let fused = gpu.upload(&data(batch * 3 * width, 140, 1.0)).unwrap();
    let mut q = poisoned(&gpu, batch * width);
    let (mut kc, mut vc) = (gpu.zeros::<f32>(shape.len()).unwrap(), gpu.zeros::<f32>(shape.len()).unwrap());
    let e = fuse::split_qkv_append(
        &gpu,
        &fused,
        hd,
        &mut q,
        (&mut kc, &mut vc),
        shape,
        1,
        AppendAt::Host(capacity),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("past the cache capacity 9"), "{e}");
}
