//! Criterion micro-benchmark: our int8×int8→int32 GEMM against the f32 GEMM of the
//! forward pass (`tensor::matmul_nt`, the `gemm` crate) on the shapes of SmolLM2-135M's
//! layers (576×576, 1536×576, 576×1536 as `n×k`) and a 2048×2048 one, for decode (m = 1)
//! and prefill (m = 64, 512). The int8 side is the bare product on already quantized
//! operands (activation quantization and the rescale are not included).
//!
//! Before the criterion groups it prints one `summary:` line per shape with the int8/f32
//! speed ratio, each side timed as the fastest of several interleaved runs (the machine
//! is shared with other builds, and interference only adds time).
//!
//! Both sides run on a thread of the compute pool, as `bench run` does
//! (`quantbench::tensor::on_pool`).

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use quantbench::scheme::kernels::int8_gemm::gemm_i8;
use quantbench::tensor::{matmul_nt, on_pool, SeededRng};

/// `(n, k)`: output features × input features.
const LAYERS: [(usize, usize); 4] = [(576, 576), (1536, 576), (576, 1536), (2048, 2048)];
const ROWS: [usize; 3] = [1, 64, 512];

fn random_i8(len: usize, seed: u64) -> Vec<i8> {
    let mut rng = SeededRng::new(seed);
    (0..len).map(|_| (rng.next_u64() % 255) as i8).collect()
}

/// Fastest seconds of `f` over `reps` runs.
fn best_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// The int8/f32 speed ratio of every shape, the two sides timed in alternating rounds.
fn summary(_: &mut Criterion) {
    for &(n, k) in &LAYERS {
        let (w32, w8) = (SeededRng::new(1).normal_vec(n * k, 1.0), random_i8(n * k, 2));
        for &m in &ROWS {
            let (a32, a8) = (SeededRng::new(3).normal_vec(m * k, 1.0), random_i8(m * k, 4));
            let (mut out32, mut out8) = (vec![0.0f32; m * n], vec![0i32; m * n]);
            let reps = (2_000_000_000 / (m * n * k)).clamp(3, 200);
            let (mut t32, mut t8) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..5 {
                t32 = t32.min(best_secs(reps, || {
                    matmul_nt(black_box(&a32), m, k, black_box(&w32), n, &mut out32)
                }));
                t8 = t8.min(best_secs(reps, || gemm_i8(black_box(&a8), m, k, black_box(&w8), n, &mut out8)));
            }
            println!(
                "summary: gemm m={m} n={n} k={k}: f32 {:.1} us, int8 {:.1} us, int8 is {:.2}x f32 ({} threads)",
                t32 * 1e6,
                t8 * 1e6,
                t32 / t8,
                rayon::current_num_threads()
            );
        }
    }
}

fn products(c: &mut Criterion) {
    for &(n, k) in &LAYERS {
        let mut group = c.benchmark_group(format!("gemm_{n}x{k}"));
        let (w32, w8) = (SeededRng::new(1).normal_vec(n * k, 1.0), random_i8(n * k, 2));
        for &m in &ROWS {
            let (a32, a8) = (SeededRng::new(3).normal_vec(m * k, 1.0), random_i8(m * k, 4));
            group.throughput(Throughput::Elements((m * n * k) as u64));
            let mut out32 = vec![0.0f32; m * n];
            group.bench_with_input(BenchmarkId::new("f32", m), &m, |b, &m| {
                b.iter(|| matmul_nt(black_box(&a32), m, k, black_box(&w32), n, &mut out32))
            });
            let mut out8 = vec![0i32; m * n];
            group.bench_with_input(BenchmarkId::new("int8", m), &m, |b, &m| {
                b.iter(|| gemm_i8(black_box(&a8), m, k, black_box(&w8), n, &mut out8))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, summary, products);
/// `criterion_main!`, on a thread of the compute pool (see the module documentation).
fn main() {
    on_pool(|| {
        benches();
        Criterion::default().configure_from_args().final_summary();
    });
}
