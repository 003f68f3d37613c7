//! Fused int4-block GEMV against measured memory bandwidth, and the fused GEMV against
//! dequantize-then-GEMM at several activation row counts (the prefill crossover).
//!
//! The weights are larger than L2 and rotate over enough matrices that their total
//! exceeds the L3 cache, so every GEMV streams its weights from memory. Bandwidth is a
//! multi-threaded sum over a 1 GiB buffer, measured in the same run.
//!
//! Everything runs on a thread of the compute pool, as `bench run` does
//! (`quantbench::tensor::on_pool`): called from outside it, each GEMV would also pay
//! about 20 µs of thread hand-over.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use quantbench::scheme::packed4::{block_count, pack_nibbles, Gemv, Packed4};
use quantbench::tensor::{on_pool, SeededRng};
use rayon::prelude::*;

/// The int4-block symmetric code table: nibble `u` means `(u + 8) % 16 - 8`.
const SIGNED: [f32; 16] = [0., 1., 2., 3., 4., 5., 6., 7., -8., -7., -6., -5., -4., -3., -2., -1.];

/// bitsandbytes' NF4 code book (a table that is not integers), as the scheme uses it.
const NF4: [f32; 16] = quantbench::scheme::NF4_CODE;

/// The article's block size.
const BLOCK: usize = 128;

/// Bytes streamed for the bandwidth reference.
const BANDWIDTH_BYTES: usize = 1 << 30;

/// Alternating rounds of the bandwidth reference and a GEMV.
const ROUNDS: usize = 5;

/// Rotated matrices: enough that their packed bytes exceed the L3 cache (32 MiB here).
fn matrix_count(rows: usize, cols: usize) -> usize {
    let l3 = 32usize << 20;
    (2 * l3).div_ceil(rows * cols / 2).max(2)
}

fn random_packed(rows: usize, cols: usize, seed: u64) -> Packed4 {
    let mut rng = SeededRng::new(seed);
    let n = rows * cols;
    let codes: Vec<u8> = (0..n).map(|_| (rng.next_u64() & 15) as u8).collect();
    let scales = (0..block_count(n, BLOCK)).map(|_| 0.01 + rng.uniform() as f32).collect();
    Packed4 {
        rows,
        cols,
        block: BLOCK,
        bytes: pack_nibbles(&codes),
        table: SIGNED,
        scales,
        offsets: None,
        exact_gemv: false,
    }
}

/// Bytes one GEMV reads from the weight: packed codes and the in-memory f32 scales.
fn weight_bytes(p: &Packed4) -> u64 {
    (p.bytes.len() + 4 * p.scales.len()) as u64
}

fn sum_u64(buf: &[u64]) -> u64 {
    buf.par_chunks(1 << 16)
        .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
        .reduce(|| 0, u64::wrapping_add)
}

/// Fastest seconds of `f` over `reps` runs after one warm-up: the machine is shared
/// with other builds, and interference only ever adds time, so the minimum is the
/// figure that repeats (used for the bandwidth reference and the GEMVs alike).
fn best_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn bandwidth(c: &mut Criterion) {
    let buf: Vec<u64> = (0..BANDWIDTH_BYTES / 8).map(|i| i as u64).collect();
    let mut g = c.benchmark_group("memory");
    g.throughput(Throughput::Bytes(BANDWIDTH_BYTES as u64)).sample_size(10);
    g.bench_function("sum-1GiB", |b| b.iter(|| black_box(sum_u64(&buf))));
    g.finish();
    let stream = || {
        black_box(sum_u64(&buf));
    };
    let mem = BANDWIDTH_BYTES as f64 / best_secs(10, stream) / 1e9;
    println!(
        "summary: memory bandwidth (sum over 1 GiB, {} threads): {mem:.2} GB/s",
        rayon::current_num_threads()
    );
    // 512×2048 (512 KiB packed) stays in the two L2 caches: the compute ceiling of a path.
    for (rows, cols, rotate) in [(512, 2048, false), (4096, 4096, true), (2048, 8192, true)] {
        let count = if rotate { matrix_count(rows, cols) } else { 1 };
        let mut mats: Vec<Packed4> = (0..count).map(|s| random_packed(rows, cols, s as u64)).collect();
        let x = SeededRng::new(99).normal_vec(cols, 1.0);
        let mut out = vec![0.0f32; rows];
        // The signed int4 table (exact 16-bit codes), then NF4's (13-bit fixed point).
        for (table, tname) in [(SIGNED, "int4"), (NF4, "nf4")] {
            mats.iter_mut().for_each(|m| m.table = table);
            let default = mats[0].gemv_path();
            for (n, path) in [default, Gemv::Avx2Fixed, Gemv::Avx2, Gemv::Scalar].into_iter().enumerate() {
                // The default path, the 16-bit kernel beside the VNNI one, and for int4 the
                // exact f32 path; the scalar loop only where it is the default.
                let vnni_twin = path == Gemv::Avx2Fixed && default == Gemv::VnniFixed;
                let other =
                    n > 0 && path != default && (vnni_twin || (tname == "int4" && path == Gemv::Avx2));
                if n > 0 && !other {
                    continue;
                }
                // The bandwidth reference and the GEMV in alternating rounds, so a quiet
                // or a busy spell of the shared machine counts for both sides.
                let (mut mem_secs, mut secs, mut next) = (f64::INFINITY, f64::INFINITY, 0);
                for _ in 0..ROUNDS {
                    mem_secs = mem_secs.min(best_secs(2, stream));
                    secs = secs.min(best_secs(20, || {
                        mats[next % count].gemv(&x, 1, &mut out, path);
                        next += 1;
                    }));
                }
                let mem = BANDWIDTH_BYTES as f64 / mem_secs / 1e9;
                let gbs = weight_bytes(&mats[0]) as f64 / secs / 1e9;
                println!(
                    "summary: fused {tname} GEMV {path:?} {rows}x{cols} ({count} matrices rotated): {:.3} ms, {gbs:.2} GB/s = {:.0}% of memory bandwidth ({mem:.2} GB/s in the same rounds)",
                    secs * 1e3,
                    100.0 * gbs / mem
                );
            }
        }
    }
}

fn fused_gemv(c: &mut Criterion) {
    for (rows, cols) in [(4096, 4096), (2048, 8192)] {
        let count = matrix_count(rows, cols);
        let mats: Vec<Packed4> = (0..count).map(|s| random_packed(rows, cols, s as u64)).collect();
        let x = SeededRng::new(7).normal_vec(cols, 1.0);
        let mut out = vec![0.0f32; rows];
        let mut g = c.benchmark_group("int4-gemv-m1");
        g.throughput(Throughput::Bytes(weight_bytes(&mats[0])));
        let mut next = 0;
        let path = mats[0].gemv_path();
        g.bench_function(format!("{rows}x{cols}-{path:?}"), |b| {
            b.iter(|| {
                mats[next % count].gemv(black_box(&x), 1, &mut out, path);
                next += 1;
            })
        });
        g.finish();
    }
}

fn crossover(c: &mut Criterion) {
    let (rows, cols) = (4096, 4096);
    let count = matrix_count(rows, cols);
    let mats: Vec<Packed4> = (0..count).map(|s| random_packed(rows, cols, s as u64)).collect();
    let mut g = c.benchmark_group("int4-crossover-4096x4096");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for m in [1usize, 4, 16, 32, 64, 96, 128, 192] {
        let x = SeededRng::new(m as u64).normal_vec(m * cols, 1.0);
        let mut out = vec![0.0f32; m * rows];
        let mut next = 0;
        g.bench_with_input(BenchmarkId::new("fused", m), &m, |b, &m| {
            b.iter(|| {
                mats[next % count].gemv(&x, m, &mut out, mats[0].gemv_path());
                next += 1;
            })
        });
        g.bench_with_input(BenchmarkId::new("dequant-gemm", m), &m, |b, &m| {
            b.iter(|| {
                mats[next % count].dequant_gemm(&x, m, &mut out);
                next += 1;
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bandwidth, fused_gemv, crossover);
/// `criterion_main!`, on a thread of the compute pool (see the module documentation).
fn main() {
    on_pool(|| {
        benches();
        Criterion::default().configure_from_args().final_summary();
    });
}
