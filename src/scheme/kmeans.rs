//! The `kmeans` scheme (digest 003, weight sharing): one k-means code book per tensor
//! (default 16 clusters → 4-bit indices), every weight replaced by its centroid.
//!
//! k-means on scalars is solved on the sorted values: a cluster of the optimal assignment
//! is a contiguous run of sorted values cut at the midpoints between neighbouring
//! centroids, so one Lloyd iteration is `k` binary searches and prefix-sum means instead
//! of a pass over every weight. Seeding is deterministic: the centroids start at the
//! quantiles `(j + ½)/k` of the sorted values (of the distinct values when the first
//! choice repeats one); iterations stop when no cut moves or after `iterations`. A
//! tensor with at most `k` distinct values is its own code book (reproduced exactly).
//!
//! Storage: indices at `ceil(log2 k)` bits, packed most significant bit first (for 4
//! bits, exactly two per byte with the first value in the high nibble), and the f32 code
//! book (role scales) sorted ascending. With 16 or fewer clusters stored at 4 bits the
//! layer runs the shared fused lookup GEMV; otherwise it dequantizes to f32 per call and
//! runs the f32 GEMM.

use safetensors::tensor::Dtype;

use super::int4_block::read_raw;
use super::packed4::{Packed4, EXACT_GEMV_PARAM};
use super::{
    Calibration, DenseWeight, DeviceSupport, LayerParts, Linear, ParamInfo, ParamKind, Scheme, SchemeInfo,
    SchemeParams, StoredSource, StoredTensor, TensorRole, WeightParts,
};
use crate::error::{Error, Result};

/// The source article's cluster count.
const DEFAULT_CLUSTERS: usize = 16;
/// Lloyd iteration cap.
const DEFAULT_ITERATIONS: usize = 25;

/// Bits per index for `k` clusters: `ceil(log2 k)`, at least 1.
fn index_bits(k: usize) -> u32 {
    (usize::BITS - (k.max(2) - 1).leading_zeros()).max(1)
}

/// The k-means result on sorted values.
#[derive(Debug, Clone, PartialEq)]
struct Fit {
    /// Centroids, ascending.
    centroids: Vec<f32>,
    /// Sum of squared errors after each iteration (the first entry: the seeding).
    objective: Vec<f64>,
}

/// Prefix sums of a sorted slice, for range means and squared errors in O(1).
struct Prefix {
    sum: Vec<f64>,
    sq: Vec<f64>,
}

impl Prefix {
    fn new(sorted: &[f32]) -> Self {
        let (mut sum, mut sq) = (vec![0.0; sorted.len() + 1], vec![0.0; sorted.len() + 1]);
        for (i, &v) in sorted.iter().enumerate() {
            sum[i + 1] = sum[i] + v as f64;
            sq[i + 1] = sq[i] + v as f64 * v as f64;
        }
        Prefix { sum, sq }
    }

    /// Σ (v − c)² over sorted values `a..b`.
    fn sse(&self, a: usize, b: usize, c: f64) -> f64 {
        let (s, q, n) = (self.sum[b] - self.sum[a], self.sq[b] - self.sq[a], (b - a) as f64);
        (q - 2.0 * c * s + n * c * c).max(0.0)
    }
}

/// Cut points of the nearest-centroid assignment: cluster `j` holds sorted values
/// `cuts[j]..cuts[j + 1]`; a value on a midpoint goes to the lower centroid.
fn cuts(sorted: &[f32], centroids: &[f32]) -> Vec<usize> {
    let mut cuts = vec![0];
    for w in centroids.windows(2) {
        let mid = (w[0] as f64 + w[1] as f64) / 2.0;
        cuts.push(sorted.partition_point(|&v| (v as f64) <= mid));
    }
    cuts.push(sorted.len());
    cuts
}

fn objective(prefix: &Prefix, cuts: &[usize], centroids: &[f32]) -> f64 {
    centroids.iter().enumerate().map(|(j, &c)| prefix.sse(cuts[j], cuts[j + 1], c as f64)).sum()
}

/// Deterministic seeding: quantiles of the sorted values, or of the distinct values when
/// two quantiles coincide.
fn seed(sorted: &[f32], k: usize) -> Vec<f32> {
    let quantiles =
        |v: &[f32]| -> Vec<f32> { (0..k).map(|j| v[((2 * j + 1) * v.len()) / (2 * k)]).collect() };
    let first = quantiles(sorted);
    if first.windows(2).all(|w| w[0] < w[1]) {
        return first;
    }
    let mut distinct = sorted.to_vec();
    distinct.dedup();
    quantiles(&distinct)
}

/// k-means of the values of `data` (not sorted) with `k` clusters.
fn fit(data: &[f32], k: usize, iterations: usize) -> Fit {
    let mut sorted = data.to_vec();
    sorted.sort_by(f32::total_cmp);
    let mut distinct = sorted.clone();
    distinct.dedup();
    if distinct.len() <= k {
        // The values are their own code book; pad with copies of the largest.
        let mut centroids = distinct;
        centroids.resize(k, *centroids.last().unwrap_or(&0.0));
        return Fit { centroids, objective: vec![0.0] };
    }
    let prefix = Prefix::new(&sorted);
    let mut centroids = seed(&sorted, k);
    let mut current = cuts(&sorted, &centroids);
    let mut history = vec![objective(&prefix, &current, &centroids)];
    for _ in 0..iterations {
        for j in 0..k {
            let (a, b) = (current[j], current[j + 1]);
            if b > a {
                // An empty cluster keeps its centroid.
                centroids[j] = ((prefix.sum[b] - prefix.sum[a]) / (b - a) as f64) as f32;
            }
        }
        let next = cuts(&sorted, &centroids);
        history.push(objective(&prefix, &next, &centroids));
        if next == current {
            break;
        }
        current = next;
    }
    Fit { centroids, objective: history }
}

/// Midpoints between neighbouring centroids (ascending), the assignment's cut values.
fn midpoints(centroids: &[f32]) -> Vec<f64> {
    centroids.windows(2).map(|w| (w[0] as f64 + w[1] as f64) / 2.0).collect()
}

/// The index of the nearest centroid given [`midpoints`] (a midpoint goes lower).
fn assign_with(mids: &[f64], v: f32) -> usize {
    mids.partition_point(|&m| (v as f64) > m)
}

/// The index of the nearest centroid (ascending centroids; a midpoint goes lower).
#[cfg(test)]
fn assign(centroids: &[f32], v: f32) -> usize {
    assign_with(&midpoints(centroids), v)
}

/// Pack `indices` at `bits` bits each, most significant bit first, zero-padded.
fn pack_bits(indices: &[u16], bits: u32) -> Vec<u8> {
    let mut out = vec![0u8; (indices.len() * bits as usize).div_ceil(8)];
    for (i, &v) in indices.iter().enumerate() {
        for b in 0..bits {
            if v >> (bits - 1 - b) & 1 == 1 {
                let pos = i * bits as usize + b as usize;
                out[pos / 8] |= 0x80 >> (pos % 8);
            }
        }
    }
    out
}

/// Index `i` of [`pack_bits`] output.
fn unpack_bit_index(bytes: &[u8], bits: u32, i: usize) -> u16 {
    (0..bits as usize).fold(0u16, |acc, b| {
        let pos = i * bits as usize + b;
        acc << 1 | ((bytes[pos / 8] >> (7 - pos % 8)) & 1) as u16
    })
}

/// A `kmeans` layer.
struct KMeansLinear {
    rows: usize,
    cols: usize,
    bits: u32,
    bytes: Vec<u8>,
    codebook: Vec<f32>,
    /// The fused lookup path for 4-bit indices.
    packed: Option<Packed4>,
    bias: Option<Vec<f32>>,
}

impl KMeansLinear {
    fn new(
        rows: usize,
        cols: usize,
        bits: u32,
        bytes: Vec<u8>,
        codebook: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Self {
        let packed = (bits == 4).then(|| {
            let mut table = [0.0f32; 16];
            table[..codebook.len()].copy_from_slice(&codebook);
            // One block over the whole tensor, scale 1: the value is the centroid.
            Packed4 {
                rows,
                cols,
                block: (rows * cols).max(1),
                bytes: bytes.clone(),
                table,
                scales: vec![1.0],
                offsets: None,
                exact_gemv: false,
            }
        });
        KMeansLinear { rows, cols, bits, bytes, codebook, packed, bias }
    }

    /// Keep the fused GEMV of 4-bit indices exact (no effect on other widths).
    fn with_exact_gemv(mut self, exact: bool) -> Self {
        if let Some(p) = &mut self.packed {
            p.exact_gemv = exact;
        }
        self
    }

    fn dequantize(&self) -> Vec<f32> {
        (0..self.rows * self.cols)
            .map(|i| self.codebook[unpack_bit_index(&self.bytes, self.bits, i) as usize])
            .collect()
    }
}

impl Linear for KMeansLinear {
    fn in_features(&self) -> usize {
        self.cols
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        match &self.packed {
            Some(p) => p.matmul(x, rows, out),
            None => crate::tensor::matmul_nt(x, rows, self.cols, &self.dequantize(), self.rows, out),
        }
        super::add_bias(out, self.bias.as_deref());
    }

    fn kernel(&self) -> &'static str {
        match &self.packed {
            Some(p) => p.kernel(),
            None => "kmeans-dequant/f32-gemm",
        }
    }

    fn parts(&self) -> LayerParts<'_> {
        let weights = match &self.packed {
            Some(p) => WeightParts::Packed4(p),
            None => WeightParts::Codebook { bits: self.bits, indices: &self.bytes, codebook: &self.codebook },
        };
        LayerParts { weights, bias: self.bias.as_deref() }
    }

    fn export(&self, name: &str) -> Vec<StoredTensor> {
        let mut out = vec![
            StoredTensor {
                name: format!("{name}.weight"),
                role: TensorRole::PackedWeights,
                dtype: Dtype::U8,
                shape: vec![self.bytes.len()],
                bytes: self.bytes.clone(),
                represents: self.rows * self.cols,
            },
            StoredTensor::f32(
                format!("{name}.codebook"),
                TensorRole::Scales,
                vec![self.codebook.len()],
                &self.codebook,
            ),
        ];
        out.extend(super::bias_tensor(name, self.bias.as_deref()));
        out
    }
}

struct KMeans {
    clusters: usize,
    iterations: usize,
    /// Keep the 4-bit fused GEMV exact ([`Packed4::exact_gemv`]).
    exact_gemv: bool,
}

impl Scheme for KMeans {
    fn quantize(
        &self,
        weight: DenseWeight,
        bias: Option<Vec<f32>>,
        _: Option<Calibration>,
    ) -> Result<Box<dyn Linear>> {
        let fit = fit(&weight.data, self.clusters, self.iterations);
        let mids = midpoints(&fit.centroids);
        let indices: Vec<u16> = weight.data.iter().map(|&v| assign_with(&mids, v) as u16).collect();
        let bits = index_bits(self.clusters);
        let bytes = pack_bits(&indices, bits);
        let layer = KMeansLinear::new(weight.rows, weight.cols, bits, bytes, fit.centroids, bias);
        Ok(Box::new(layer.with_exact_gemv(self.exact_gemv)))
    }

    fn load(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        bias: Option<Vec<f32>>,
        source: &dyn StoredSource,
    ) -> Result<Box<dyn Linear>> {
        let bits = index_bits(self.clusters);
        let len = (rows * cols * bits as usize).div_ceil(8);
        let bytes = read_raw(source, &format!("{name}.weight"), &[len], Dtype::U8)?;
        let codebook = source.f32(&format!("{name}.codebook"), &[self.clusters])?;
        Ok(Box::new(
            KMeansLinear::new(rows, cols, bits, bytes, codebook, bias).with_exact_gemv(self.exact_gemv),
        ))
    }
}

fn build(params: &SchemeParams) -> Result<Box<dyn Scheme>> {
    let error = |message: String| Error::Scheme { scheme: KMEANS.name.to_string(), message };
    let clusters = params.integer("clusters", DEFAULT_CLUSTERS as u64);
    if !(2..=65536).contains(&clusters) {
        return Err(error(format!(
            "parameter `clusters` is {clusters}, expected an integer from 2 to 65536"
        )));
    }
    let iterations = params.integer("iterations", DEFAULT_ITERATIONS as u64);
    if iterations == 0 || iterations > 100_000 {
        return Err(error(format!(
            "parameter `iterations` is {iterations}, expected an integer from 1 to 100000"
        )));
    }
    let exact_gemv = params.bool(EXACT_GEMV_PARAM.name, false);
    Ok(Box::new(KMeans { clusters: clusters as usize, iterations: iterations as usize, exact_gemv }))
}

pub(super) const KMEANS: SchemeInfo = SchemeInfo {
    name: "kmeans",
    summary: "per-tensor k-means code book (16 clusters: 4-bit indices + an f32 code book)",
    // 4-bit indices; the 16 f32 centroids per tensor are negligible.
    bits_per_weight: 4.0,
    block_size: None,
    needs_calibration: false,
    devices: DeviceSupport::CpuAndCuda,
    params: &[
        ParamInfo {
            name: "clusters",
            kind: ParamKind::Integer,
            default: "16",
            help: "centroids per tensor; indices take ceil(log2(clusters)) bits",
        },
        ParamInfo {
            name: "iterations",
            kind: ParamKind::Integer,
            default: "25",
            help: "cap on Lloyd iterations (they stop earlier when no assignment changes)",
        },
        EXACT_GEMV_PARAM,
    ],
    build,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::SeededRng;

    fn layer(data: Vec<f32>, rows: usize, cols: usize, clusters: usize) -> Box<dyn Linear> {
        let w = DenseWeight { name: "w".into(), rows, cols, data };
        KMeans { clusters, iterations: 25, exact_gemv: false }.quantize(w, None, None).unwrap()
    }

    #[test]
    fn exactly_k_distinct_values_are_reproduced_exactly() {
        let values = [-1.5f32, 0.25, 3.0, 7.0, 0.0, -0.125, 2.0, 9.5];
        let mut rng = SeededRng::new(1);
        let data: Vec<f32> = (0..6 * 11).map(|_| values[(rng.next_u64() % 8) as usize]).collect();
        let l = layer(data.clone(), 6, 11, 8);
        let mut out = vec![0.0; 6];
        // Multiplying by unit vectors reads the dequantized weights back column by column.
        for c in 0..11 {
            let mut x = vec![0.0; 11];
            x[c] = 1.0;
            l.forward(&x, 1, &mut out);
            for r in 0..6 {
                assert_eq!(out[r], data[r * 11 + c]);
            }
        }
    }

    #[test]
    fn objective_never_increases_and_the_fit_is_deterministic() {
        for seed in 0..5 {
            let data = SeededRng::new(seed).normal_vec(5000, 1.0);
            let a = fit(&data, 16, 25);
            for w in a.objective.windows(2) {
                assert!(w[1] <= w[0] * (1.0 + 1e-12), "seed {seed}: {:?}", a.objective);
            }
            assert!(a.objective.len() >= 2);
            assert_eq!(a, fit(&data, 16, 25));
            assert!(a.centroids.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn objective_matches_a_direct_sum() {
        let data = SeededRng::new(7).normal_vec(999, 2.0);
        let f = fit(&data, 16, 25);
        let direct: f64 = data
            .iter()
            .map(|&v| {
                let c = f.centroids[assign(&f.centroids, v)] as f64;
                (v as f64 - c).powi(2)
            })
            .sum();
        let last = *f.objective.last().unwrap();
        assert!((direct - last).abs() <= 1e-9 * direct, "{direct} vs {last}");
    }

    #[test]
    fn packing_round_trips_at_every_width() {
        for k in [2usize, 3, 16, 17, 200, 256, 1000] {
            let bits = index_bits(k);
            assert!(1u64 << bits >= k as u64 && (1u64 << (bits - 1)) < k as u64, "k {k}");
            let mut rng = SeededRng::new(k as u64);
            let idx: Vec<u16> = (0..77).map(|_| (rng.next_u64() % k as u64) as u16).collect();
            let bytes = pack_bits(&idx, bits);
            assert_eq!(bytes.len(), (77 * bits as usize).div_ceil(8));
            for (i, &v) in idx.iter().enumerate() {
                assert_eq!(unpack_bit_index(&bytes, bits, i), v);
            }
        }
        // 4 bits: two per byte, the first in the high nibble (the fused path's layout).
        assert_eq!(pack_bits(&[1, 2, 3], 4), vec![0x12, 0x30]);
    }

    #[test]
    fn fused_and_dequantized_paths_agree() {
        let data = SeededRng::new(3).normal_vec(13 * 37, 1.0);
        for clusters in [16, 5, 40] {
            let l = layer(data.clone(), 13, 37, clusters);
            let x = SeededRng::new(4).normal_vec(2 * 37, 1.0);
            let mut out = vec![0.0; 2 * 13];
            l.forward(&x, 2, &mut out);
            let t = l.export("l");
            let codebook: Vec<f32> =
                t[1].bytes.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            let bits = index_bits(clusters);
            let w: Vec<f32> =
                (0..13 * 37).map(|i| codebook[unpack_bit_index(&t[0].bytes, bits, i) as usize]).collect();
            let reference = crate::tensor::matmul_nt_reference(&x, 2, 37, &w, 13);
            assert!(crate::tensor::relative_l2(&out, &reference) < 1e-5, "clusters {clusters}");
            for (v, c) in data.iter().zip(&w) {
                let nearest = codebook.iter().map(|k| (k - v).abs()).fold(f32::INFINITY, f32::min);
                assert_eq!((c - v).abs(), nearest);
            }
        }
    }

    #[test]
    fn bad_clusters_name_the_parameter() {
        let mut p = SchemeParams::default();
        p.0.insert("clusters".into(), serde_json::json!(1));
        assert!(build(&p).err().unwrap().to_string().contains("`clusters` is 1"));
    }

    #[test]
    fn exact_gemv_keeps_the_fused_gemv_in_f32_and_changes_no_weight() {
        let data = SeededRng::new(4).normal_vec(8 * 64, 1.0);
        let w = |data: Vec<f32>| DenseWeight { name: "w".into(), rows: 8, cols: 64, data };
        let mut params = SchemeParams::default();
        params.0.insert("exact_gemv".into(), serde_json::json!(true));
        let exact = build(&params).unwrap().quantize(w(data.clone()), None, None).unwrap();
        let fast = build(&SchemeParams::default()).unwrap().quantize(w(data), None, None).unwrap();
        if super::super::packed4::has_avx2() {
            assert!(exact.kernel().contains("f32") && fast.kernel().contains("q15"), "{}", exact.kernel());
        }
        let x = SeededRng::new(5).normal_vec(64, 1.0);
        let (mut a, mut b) = (vec![0.0; 8], vec![0.0; 8]);
        exact.forward(&x, 1, &mut a);
        fast.forward(&x, 1, &mut b);
        // The same code book and indices: only the activations' rounding differs.
        let rel = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).sum::<f32>()
            / a.iter().map(|p| p.abs()).sum::<f32>();
        assert!(rel < 1e-3, "relative difference {rel}");
    }
}
