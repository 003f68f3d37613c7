//! `cuda-kernels`: times the CUDA kernels with CUDA events and prints achieved GB/s and
//! TFLOP/s next to the device's measured peaks: device-to-device copy bandwidth for the
//! GEMVs (targets: ≥ 75% of it), the bf16 cuBLAS GEMM for the int8 cuBLASLt GEMM (target:
//! ≥ 1.5× its throughput). Weights are rotated through enough copies to exceed L2 three
//! times over (or L2 is flushed between calls when memory is short), so each call reads
//! from device memory. The GEMVs are timed as a decode step runs them, replayed from a
//! captured graph (no host launch cost between calls); cuBLAS's bf16 GEMV is the peer.
//!
//! Usage: `cuda-kernels [--samples N] [--iters N] [--json PATH]`. Needs a CUDA device;
//! see `scripts/gpu-run.sh`. The arithmetic lives in `quantbench::backend::bench`.

use std::process::ExitCode;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::CudaSlice;
use quantbench::backend::bench::{self, Shape, Stats};
use quantbench::backend::cuda::blas::{self, Blas};
use quantbench::backend::cuda::fuse::{self, DenseWeight, Fuse};
use quantbench::backend::cuda::ops::{self, DevicePacked4, FixedPointKernel};
use quantbench::backend::cuda::{CudaError, Gpu};
use quantbench::scheme::packed4::{pack_nibbles, Packed4};
use quantbench::tensor::SeededRng;

/// Options from the command line.
struct Options {
    samples: usize,
    iters: usize,
    json: Option<String>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options { samples: 30, iters: 20, json: None };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--samples" => o.samples = value("--samples")?.parse().map_err(|e| format!("--samples: {e}"))?,
            "--iters" => o.iters = value("--iters")?.parse().map_err(|e| format!("--iters: {e}"))?,
            "--json" => o.json = Some(value("--json")?),
            other => {
                return Err(format!(
                    "unknown argument `{other}`, expected --samples N, --iters N or --json PATH"
                ))
            }
        }
    }
    if o.samples == 0 || o.iters == 0 {
        return Err("--samples and --iters must be at least 1".into());
    }
    Ok(o)
}

/// One result line.
struct Row {
    kernel: String,
    shape: Shape,
    stats: Stats,
    gb_s: Option<f64>,
    tflop_s: f64,
    versus: String,
}

/// Time `call(i)` (`i` counts calls, for rotation): `samples` batches of `iters` calls
/// between two events; per-call milliseconds.
fn time(
    gpu: &Gpu,
    o: &Options,
    mut call: impl FnMut(usize) -> Result<(), CudaError>,
) -> Result<Stats, CudaError> {
    for i in 0..o.iters.min(5) {
        call(i)?;
    }
    gpu.synchronize()?;
    let mut samples = Vec::with_capacity(o.samples);
    let mut i = 0;
    for _ in 0..o.samples {
        let ms = gpu.time_ms(|| {
            for _ in 0..o.iters {
                call(i)?;
                i += 1;
            }
            Ok(())
        })?;
        samples.push(ms as f64 / o.iters as f64);
    }
    Stats::of(&samples).ok_or(CudaError::Shape { op: "timing", message: "no finite samples".into() })
}

/// Time `call(i)` as a decode graph runs it: `max(iters, rotate)` calls captured once
/// into a graph, `samples` replays between two events; per-call milliseconds.
fn time_graph(
    gpu: &Gpu,
    o: &Options,
    rotate: usize,
    mut call: impl FnMut(usize) -> Result<(), CudaError>,
) -> Result<Stats, CudaError> {
    for i in 0..5 {
        call(i)?;
    }
    gpu.synchronize()?;
    let calls = o.iters.max(rotate);
    let graph = gpu.capture(|| (0..calls).try_for_each(&mut call))?;
    let replay = || {
        graph.launch().map_err(|e| CudaError::Driver { op: "graph launch".into(), message: format!("{e:?}") })
    };
    replay()?;
    gpu.synchronize()?;
    let mut samples = Vec::with_capacity(o.samples);
    for _ in 0..o.samples {
        samples.push(gpu.time_ms(replay)? as f64 / calls as f64);
    }
    Stats::of(&samples).ok_or(CudaError::Shape { op: "timing", message: "no finite samples".into() })
}

fn run(o: &Options) -> Result<Vec<Row>, CudaError> {
    let gpu = Gpu::new(0)?;
    let blas = Blas::new(&gpu)?;
    let l2 = gpu
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .map_err(|e| CudaError::Driver { op: "L2 size".into(), message: format!("{e:?}") })?
        as usize;
    let (free, total) = gpu.memory()?;
    println!(
        "device: {} (sm_{}{}), L2 {} MiB, memory {} / {} MiB free",
        gpu.name(),
        gpu.capability().0,
        gpu.capability().1,
        l2 >> 20,
        free >> 20,
        total >> 20
    );
    let mut rows = Vec::new();

    // Peak: device-to-device copy of 1 GiB (read + write counted).
    let copy_bytes = 1usize << 30;
    let src = gpu.zeros::<u8>(copy_bytes)?;
    let mut dst = gpu.zeros::<u8>(copy_bytes)?;
    let stream = gpu.stream().clone();
    let copy = time(&gpu, o, |_| {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| CudaError::Driver { op: "memcpy dtod".into(), message: format!("{e:?}") })
    })?;
    drop((src, dst));
    let peak_gb_s = bench::gb_per_s(2.0 * copy_bytes as f64, copy.median);
    println!(
        "peak: device-to-device copy {peak_gb_s:.0} GB/s (median of {} × {} copies of 1 GiB)",
        o.samples, o.iters
    );
    rows.push(Row {
        kernel: "memcpy dtod".into(),
        shape: Shape { m: 0, n: 0, k: 0 },
        stats: copy,
        gb_s: Some(peak_gb_s),
        tflop_s: 0.0,
        versus: "peak".into(),
    });

    let mut rng = SeededRng::new(1);
    let bandwidth_row = |kernel: String, s: Shape, st: Stats, bytes: f64, beyond_l2: bool| {
        let gb = bench::gb_per_s(bytes, st.median);
        let (f, ok) = bench::verdict(gb, peak_gb_s, bench::GEMV_BANDWIDTH_TARGET);
        Row {
            kernel,
            shape: s,
            stats: st,
            gb_s: Some(gb),
            tflop_s: bench::tflop_per_s(s.ops(), st.median),
            versus: format!(
                "{:.0}% of copy bandwidth ({}){}",
                100.0 * f,
                if ok { "meets 75%" } else { "below 75%" },
                if beyond_l2 { "" } else { "; working set not beyond L2: inflated" }
            ),
        }
    };
    for s in bench::DECODE_SHAPES {
        // int4-block: signed table, bf16 scales, block 128; nf4-like: the same codes, a
        // code book and an f32 scale per block of 64.
        let codes: Vec<u8> = (0..s.n * s.k).map(|_| (rng.next_u64() % 16) as u8).collect();
        let int4 = Packed4 {
            rows: s.n,
            cols: s.k,
            block: 128,
            bytes: pack_nibbles(&codes),
            table: [0., 1., 2., 3., 4., 5., 6., 7., -8., -7., -6., -5., -4., -3., -2., -1.],
            scales: (0..(s.n * s.k).div_ceil(128))
                .map(|i| half::bf16::from_f32(0.01 + (i % 7) as f32 * 0.001).to_f32())
                .collect(),
            offsets: None,
            // The device kernels keep f32 activations: compare like with like.
            exact_gemv: true,
        };
        let nf4 = Packed4 {
            block: 64,
            table: int4.table.map(|v| v / 8.0 + 0.01),
            scales: (0..(s.n * s.k).div_ceil(64)).map(|i| 0.01 + (i % 11) as f32 * 0.0007).collect(),
            ..int4.clone()
        };
        let x = gpu.upload(&rng.normal_vec(s.m * s.k, 1.0))?;
        let mut out = gpu.zeros::<f32>(s.m * s.n)?;
        // int4-block as users run it (the CPU's default fixed-point numerics), then with
        // f32 activations (exact_gemv), and nf4 (f32: its table is not integers).
        let fixed = Packed4 { exact_gemv: false, ..int4.clone() };
        // The fixed-point GEMV twice: the default one-launch kernel that quantizes x in every
        // block, and x quantized once, then the GEMV (both launches timed).
        for (label, w, bf16, kernel) in [
            ("int4-block fixed-point", &fixed, true, FixedPointKernel::Slab),
            ("int4-block fixed-point prequantized", &fixed, true, FixedPointKernel::Prequantized),
            ("int4-block f32", &int4, true, FixedPointKernel::Prequantized),
            ("nf4 f32", &nf4, false, FixedPointKernel::Prequantized),
        ] {
            let bytes = bench::packed4_gemv_bytes(s, w.block, bf16);
            let (count, beyond_l2) = bench::rotation(bytes as usize, l2, gpu.memory()?.0);
            let copies: Vec<DevicePacked4> =
                (0..count).map(|_| DevicePacked4::upload(&gpu, w)).collect::<Result<_, _>>()?;
            let st = time_graph(&gpu, o, count, |i| {
                ops::packed4_gemv_using(&gpu, &copies[i % count], &x, s.m, None, Fuse::NONE, &mut out, kernel)
            })?;
            drop(copies);
            rows.push(bandwidth_row(format!("{label} gemv"), s, st, bytes, beyond_l2));
        }

        // int8 GEMV.
        let w: Vec<i8> = (0..s.n * s.k).map(|_| (rng.next_u64() % 255) as i8).collect();
        let bytes = bench::int8_gemv_bytes(s);
        let (count, beyond_l2) = bench::rotation(bytes as usize, l2, gpu.memory()?.0);
        let ws: Vec<CudaSlice<i8>> = (0..count).map(|_| gpu.upload(&w)).collect::<Result<_, _>>()?;
        let sw = gpu.upload(&vec![0.01f32; s.n])?;
        let qx = gpu.upload(&(0..s.m * s.k).map(|i| (i % 251) as i8 - 125).collect::<Vec<i8>>())?;
        let sx = gpu.upload(&vec![0.02f32; s.m])?;
        let st = time_graph(&gpu, o, count, |i| {
            ops::gemv_i8(&gpu, &qx, &sx, &ws[i % count], &sw, None, Fuse::NONE, &mut out, (s.m, s.n, s.k))
        })?;
        drop(ws);
        rows.push(bandwidth_row("int8 gemv".into(), s, st, bytes, beyond_l2));

        // 16-bit weights: our GEMV (f32 activations rounded in registers) and cuBLAS's
        // bf16 GEMV (bf16 activations and output), the peer PyTorch calls.
        let halves: Vec<u16> =
            (0..s.n * s.k).map(|_| half::bf16::from_f64(rng.normal() * 0.05).to_bits()).collect();
        let bytes = bench::dense_gemv_bytes(s, 2);
        let (count, beyond_l2) = bench::rotation(bytes as usize, l2, gpu.memory()?.0);
        let ws: Vec<CudaSlice<u16>> = (0..count).map(|_| gpu.upload(&halves)).collect::<Result<_, _>>()?;
        for (label, bf16) in [("f16", false), ("bf16", true)] {
            let st = time_graph(&gpu, o, count, |i| {
                let w = DenseWeight::Half(&ws[i % count], bf16);
                fuse::dense_gemv(&gpu, w, (s.n, s.k), &x, s.m, None, Fuse::NONE, &mut out)
            })?;
            rows.push(bandwidth_row(format!("{label} gemv"), s, st, bytes, beyond_l2));
        }
        drop(ws);
        let wb: Vec<half::bf16> = halves.iter().map(|&b| half::bf16::from_bits(b)).collect();
        let wbs: Vec<CudaSlice<half::bf16>> =
            (0..count).map(|_| gpu.upload(&wb)).collect::<Result<_, _>>()?;
        let xb = gpu.upload(
            &rng.normal_vec(s.m * s.k, 1.0).iter().map(|&v| half::bf16::from_f32(v)).collect::<Vec<_>>(),
        )?;
        let mut ob = gpu.zeros::<half::bf16>(s.m * s.n)?;
        let st = time_graph(&gpu, o, count, |i| blas.gemm(&xb, &wbs[i % count], &mut ob, (s.m, s.n, s.k)))?;
        drop(wbs);
        rows.push(bandwidth_row("cublas bf16 gemv (peer)".into(), s, st, bytes, beyond_l2));
    }

    for s in bench::PREFILL_SHAPES {
        let xb = gpu.upload(&vec![half::bf16::from_f32(0.5); s.m * s.k])?;
        let wb = gpu.upload(&vec![half::bf16::from_f32(0.25); s.n * s.k])?;
        let mut ob = gpu.zeros::<half::bf16>(s.m * s.n)?;
        let bf = time(&gpu, o, |_| blas.gemm(&xb, &wb, &mut ob, (s.m, s.n, s.k)))?;
        drop((xb, wb, ob));
        let bf_t = bench::tflop_per_s(s.ops(), bf.median);
        rows.push(Row {
            kernel: "cublas bf16 gemm".into(),
            shape: s,
            stats: bf,
            gb_s: None,
            tflop_s: bf_t,
            versus: "reference".into(),
        });
        if blas::lt_int8_supports(s.n, s.k) {
            let qx = gpu.upload(&vec![3i8; s.m * s.k])?;
            let w = gpu.upload(&vec![-2i8; s.n * s.k])?;
            let mut acc = gpu.zeros::<i32>(s.m * s.n)?;
            let st = time(&gpu, o, |_| blas.gemm_i8(&qx, &w, &mut acc, (s.m, s.n, s.k)))?;
            let t = bench::tflop_per_s(s.ops(), st.median);
            let (f, ok) = bench::verdict(t, bf_t, bench::INT8_GEMM_SPEEDUP_TARGET);
            rows.push(Row {
                kernel: "cublasLt int8 gemm".into(),
                shape: s,
                stats: st,
                gb_s: None,
                tflop_s: t,
                versus: format!("{f:.2}× bf16 ({})", if ok { "meets 1.5×" } else { "below 1.5×" }),
            });
        }
    }
    Ok(rows)
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rows = match run(&o) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    println!(
        "{:<32} {:>20} {:>10} {:>10} {:>9} {:>9}  versus",
        "kernel", "m×n×k", "median µs", "σ µs", "GB/s", "TFLOP/s"
    );
    for r in &rows {
        let shape = format!("{}×{}×{}", r.shape.m, r.shape.n, r.shape.k);
        let gb = r.gb_s.map_or("-".into(), |g| format!("{g:.0}"));
        println!(
            "{:<32} {:>20} {:>10.1} {:>10.1} {:>9} {:>9.2}  {}",
            r.kernel,
            shape,
            r.stats.median * 1e3,
            r.stats.stdev * 1e3,
            gb,
            r.tflop_s,
            r.versus
        );
    }
    if let Some(path) = &o.json {
        let json: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "kernel": r.kernel, "m": r.shape.m, "n": r.shape.n, "k": r.shape.k,
                    "median_ms": r.stats.median, "mean_ms": r.stats.mean, "stdev_ms": r.stats.stdev,
                    "min_ms": r.stats.min, "p90_ms": r.stats.p90, "samples": r.stats.n,
                    "gb_per_s": r.gb_s, "tflop_per_s": r.tflop_s, "versus": r.versus,
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&json).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("error: write {path}: {e}");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}
