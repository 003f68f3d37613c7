//! The f32 multiply-add peak of the pool's threads: independent fused multiply-add chains
//! on every thread at once, the ceiling no f32 kernel here can pass (`bench profile`'s
//! reference for products).
//!
//! Why not a GEMM's own rate: a measured GEMM is one shape of one library, and SmolLM2's
//! and MiniLM's products ran above the 512 × 1024 × 1024 product once used here (1.2× "the
//! peak"), which says nothing about how far they are from the hardware.

use std::time::Instant;

/// Independent chains per thread with AVX-512: enough to cover the multiply-add latency
/// on both ports (4 cycles × 2 ports, three times over), few enough for its 32 registers.
const CHAINS_512: usize = 24;
/// The same for AVX2's 16 registers.
const CHAINS_256: usize = 12;

/// Steps per timing (each step one multiply-add on every chain): about 5 ms at 2.7 GHz
/// with AVX-512.
const STEPS: usize = 1 << 20;

/// The multiply-add peak, GFLOP/s (two per multiply-add per lane): the best of three
/// timings of every pool thread running its chains at this CPU's widest vectors.
pub fn fma_peak_gflop_s() -> f64 {
    let (lanes, chain_count) = widest();
    let threads = rayon::current_num_threads();
    let best = (0..3)
        .map(|_| {
            let t = Instant::now();
            let sums = rayon::broadcast(|_| std::hint::black_box(chains(STEPS)));
            std::hint::black_box(sums);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    (2 * chain_count * lanes * STEPS * threads) as f64 / best / 1e9
}

/// f32 lanes of the vectors [`chains`] runs on this CPU, and how many chains.
fn widest() -> (usize, usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return (16, CHAINS_512);
        }
        if super::has_avx2_fma() {
            return (8, CHAINS_256);
        }
    }
    (1, CHAINS_256)
}

/// `steps` multiply-adds `x = x · A + B` on each chain of [`widest`]'s lanes and count, every lane starting at its chain's index; the sum of the last values (so the
/// work cannot be left out). The vector kernels sum their chains as vectors: summed one
/// chain at a time, the chains were kept in memory and the loop ran at two thirds of the
/// peak.
fn chains(steps: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected just above.
            return unsafe { x86::chains_512(steps) };
        }
        if super::has_avx2_fma() {
            // SAFETY: AVX2 and FMA were detected just above.
            return unsafe { x86::chains_256(steps) };
        }
    }
    chains_scalar::<CHAINS_256>(steps)
}

/// The multiplier and addend of every chain: the values stay near their start.
const A: f32 = 0.999_999;
const B: f32 = 1e-6;

/// [`chains`] one lane at a time, over `N` chains.
fn chains_scalar<const N: usize>(steps: usize) -> f32 {
    let mut x: [f32; N] = std::array::from_fn(|c| c as f32);
    for _ in 0..steps {
        for v in &mut x {
            *v = v.mul_add(A, B);
        }
    }
    x.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{A, B, CHAINS_256, CHAINS_512};

    /// [`super::chains`] on 16-lane vectors.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn chains_512(steps: usize) -> f32 {
        let (a, b) = (_mm512_set1_ps(A), _mm512_set1_ps(B));
        let mut x: [__m512; CHAINS_512] = std::array::from_fn(|c| _mm512_set1_ps(c as f32));
        for _ in 0..steps {
            for v in x.iter_mut() {
                *v = _mm512_fmadd_ps(a, *v, b);
            }
        }
        _mm512_reduce_add_ps(x.iter().fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v)))
    }

    /// [`super::chains`] on 8-lane vectors.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn chains_256(steps: usize) -> f32 {
        let (a, b) = (_mm256_set1_ps(A), _mm256_set1_ps(B));
        let mut x: [__m256; CHAINS_256] = std::array::from_fn(|c| _mm256_set1_ps(c as f32));
        for _ in 0..steps {
            for v in &mut x {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), x.iter().fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, *v)));
        lanes.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector chains compute what the scalar chains compute, once per lane: the work
    /// the peak counts is done, not folded away.
    #[test]
    fn the_vector_chains_do_the_counted_work() {
        let (lanes, chain_count) = widest();
        let scalar = match chain_count {
            CHAINS_512 => chains_scalar::<CHAINS_512>(1000),
            _ => chains_scalar::<CHAINS_256>(1000),
        } * lanes as f32;
        let fast = chains(1000);
        assert!((fast - scalar).abs() <= 1e-5 * scalar.abs(), "{fast} vs {scalar}");
        #[cfg(target_arch = "x86_64")]
        if crate::tensor::has_avx2_fma() {
            // SAFETY: AVX2 and FMA were detected just above.
            let narrow = unsafe { x86::chains_256(1000) };
            let want = chains_scalar::<CHAINS_256>(1000) * 8.0;
            assert!((narrow - want).abs() <= 1e-5 * want.abs(), "AVX2: {narrow} vs {want}");
        }
        // Each chain moved: x·A + B differs from x for these values.
        assert_ne!(chains_scalar::<CHAINS_256>(1000), chains_scalar::<CHAINS_256>(0));
    }

    #[test]
    fn the_peak_is_a_positive_rate() {
        let peak = fma_peak_gflop_s();
        assert!(peak.is_finite() && peak > 0.0, "{peak}");
    }
}
