//! Criterion micro-benchmark: our int8×int8→int32 GEMM against the f32 GEMM of the
//! forward pass (`tensor::matmul_nt`, the `gemm` crate) on the shapes of SmolLM2-135M's
//! layers (576×576, 1536×576, 576×1536 as `n×k`) and a 2048×2048 one, for decode (m = 1)
//! and prefill (m = 64, 512). The int8 side is the bare product on already quantized
//! operands (activation quantization and the rescale are not included).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quantbench::scheme::int8_gemm::gemm_i8;
use quantbench::tensor::{matmul_nt, SeededRng};

/// `(n, k)`: output features × input features.
const LAYERS: [(usize, usize); 4] = [(576, 576), (1536, 576), (576, 1536), (2048, 2048)];
const ROWS: [usize; 3] = [1, 64, 512];

fn random_i8(len: usize, seed: u64) -> Vec<i8> {
    let mut rng = SeededRng::new(seed);
    (0..len).map(|_| (rng.next_u64() % 255) as i8).collect()
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

criterion_group!(benches, products);
criterion_main!(benches);
