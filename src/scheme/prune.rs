//! The `prune` scheme (digest 003): L1 unstructured magnitude pruning of a fraction of
//! every layer (default 30%, the source article's), or 2:4 structured sparsity.
//!
//! Storage is honest and simple: the dense f32 weight with its zeros (no compressed
//! sparse format), computed with the dense f32 GEMM; the sparsity is reported through
//! [`Linear::stats`]. Pruning therefore saves no memory or time here — it measures what
//! zeroing the weights does to the outputs.

use super::float::{FloatLinear, FloatStorage};
use super::{
    Calibration, DenseWeight, DeviceSupport, LayerParts, Linear, ParamInfo, ParamKind, Scheme, SchemeInfo,
    SchemeParams, StoredSource, StoredTensor, WeightParts,
};
use crate::error::{Error, Result};

/// The source article's fraction.
const DEFAULT_FRACTION: f64 = 0.3;

/// How weights are chosen for pruning.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pattern {
    /// The `round(fraction · n)` smallest |w| of the layer; among equal |w| the lower
    /// flattened index goes first.
    Unstructured(f64),
    /// In every group of 4 consecutive input weights of a row, keep the 2 largest |w| (a
    /// tie keeps the lower index); a last partial group keeps at most 2.
    TwoFour,
}

/// Zero the `round(fraction · n)` smallest magnitudes of `w` in place.
fn prune_unstructured(w: &mut [f32], fraction: f64) {
    let k = (fraction * w.len() as f64).round() as usize;
    if k == 0 {
        return;
    }
    let mut mags: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    let (_, &mut threshold, _) = mags.select_nth_unstable_by(k - 1, f32::total_cmp);
    // Everything below the threshold goes; of the values equal to it, the first ones in
    // index order fill up to k.
    let below = w.iter().filter(|v| v.abs().total_cmp(&threshold).is_lt()).count();
    let mut ties = k - below;
    for v in w.iter_mut() {
        match v.abs().total_cmp(&threshold) {
            std::cmp::Ordering::Less => *v = 0.0,
            std::cmp::Ordering::Equal if ties > 0 => {
                *v = 0.0;
                ties -= 1;
            }
            _ => {}
        }
    }
}

/// Keep the 2 largest |w| of every group of 4 consecutive values of each row.
fn prune_two_four(w: &mut [f32], cols: usize) {
    for row in w.chunks_mut(cols.max(1)) {
        for group in row.chunks_mut(4) {
            let mut order: Vec<usize> = (0..group.len()).collect();
            // Largest magnitude first; a tie keeps the lower index.
            order.sort_by(|&a, &b| group[b].abs().total_cmp(&group[a].abs()).then(a.cmp(&b)));
            for &i in order.iter().skip(2) {
                group[i] = 0.0;
            }
        }
    }
}

/// A pruned layer: dense f32 with zeros.
struct PrunedLinear {
    inner: FloatLinear,
    sparsity: f64,
}

impl PrunedLinear {
    fn new(weight: DenseWeight, bias: Option<Vec<f32>>) -> Self {
        let zeros = weight.data.iter().filter(|v| **v == 0.0).count();
        let sparsity = zeros as f64 / weight.data.len().max(1) as f64;
        PrunedLinear { inner: FloatLinear::new(weight, bias, FloatStorage::F32), sparsity }
    }
}

impl Linear for PrunedLinear {
    fn in_features(&self) -> usize {
        self.inner.in_features()
    }

    fn out_features(&self) -> usize {
        self.inner.out_features()
    }

    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        self.inner.forward(x, rows, out);
    }

    fn kernel(&self) -> &'static str {
        "dense-f32-gemm (pruned)"
    }

    fn export(&self, name: &str) -> Vec<StoredTensor> {
        self.inner.export(name)
    }

    fn parts(&self) -> LayerParts<'_> {
        let bias = self.inner.parts().bias;
        LayerParts {
            weights: WeightParts::Dense {
                weight: self.inner.f32_weight().expect("prune holds f32 weights"),
                pruned: true,
            },
            bias,
        }
    }

    fn stats(&self) -> Vec<(&'static str, f64)> {
        vec![("sparsity", self.sparsity)]
    }
}

struct Prune(Pattern);

impl Scheme for Prune {
    fn quantize(
        &self,
        mut weight: DenseWeight,
        bias: Option<Vec<f32>>,
        _: Option<Calibration>,
    ) -> Result<Box<dyn Linear>> {
        match self.0 {
            Pattern::Unstructured(fraction) => prune_unstructured(&mut weight.data, fraction),
            Pattern::TwoFour => prune_two_four(&mut weight.data, weight.cols),
        }
        Ok(Box::new(PrunedLinear::new(weight, bias)))
    }

    fn load(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        bias: Option<Vec<f32>>,
        source: &dyn StoredSource,
    ) -> Result<Box<dyn Linear>> {
        let data = source.f32(&format!("{name}.weight"), &[rows, cols])?;
        Ok(Box::new(PrunedLinear::new(DenseWeight { name: name.to_string(), rows, cols, data }, bias)))
    }
}

fn scheme_error(message: String) -> Error {
    Error::Scheme { scheme: PRUNE.name.to_string(), message }
}

fn build(params: &SchemeParams) -> Result<Box<dyn Scheme>> {
    let pattern = match (params.text("pattern"), params.0.contains_key("fraction")) {
        (Some("2:4"), false) => Pattern::TwoFour,
        (Some("2:4"), true) => {
            return Err(scheme_error(
                "parameters `fraction` and `pattern` were both given, expected one".into(),
            ))
        }
        (Some(other), _) => {
            return Err(scheme_error(format!("parameter `pattern` is \"{other}\", expected \"2:4\"")))
        }
        (None, _) => {
            let fraction = params.number("fraction", DEFAULT_FRACTION);
            if !(0.0..=1.0).contains(&fraction) {
                return Err(scheme_error(format!(
                    "parameter `fraction` is {fraction}, expected a number in [0, 1]"
                )));
            }
            Pattern::Unstructured(fraction)
        }
    };
    Ok(Box::new(Prune(pattern)))
}

pub(super) const PRUNE: SchemeInfo = SchemeInfo {
    name: "prune",
    summary: "L1 magnitude pruning (30% per layer) or 2:4 sparsity; dense f32 storage and compute",
    // Dense f32 with zeros: pruning saves nothing in this storage.
    bits_per_weight: 32.0,
    block_size: None,
    needs_calibration: false,
    devices: DeviceSupport::CpuAndCuda,
    params: &[
        ParamInfo {
            name: "fraction",
            kind: ParamKind::Number,
            default: "0.3",
            help: "fraction of each layer's weights set to zero, smallest magnitudes first",
        },
        ParamInfo {
            name: "pattern",
            kind: ParamKind::Text,
            default: "none (unstructured)",
            help: "\"2:4\": keep the 2 largest of every 4 consecutive input weights (instead of fraction)",
        },
    ],
    build,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::SeededRng;

    #[test]
    fn unstructured_zeroes_exactly_the_rounded_fraction_of_smallest_weights() {
        for (seed, &(n, fraction)) in
            [(10, 0.3), (7, 0.5), (1001, 0.3), (64, 0.0), (5, 1.0), (333, 0.77)].iter().enumerate()
        {
            let original = SeededRng::new(seed as u64).normal_vec(n, 1.0);
            let mut w = original.clone();
            prune_unstructured(&mut w, fraction);
            let k = (fraction * n as f64).round() as usize;
            assert_eq!(w.iter().filter(|v| **v == 0.0).count(), k, "n {n} fraction {fraction}");
            let kept_min = w.iter().filter(|v| **v != 0.0).fold(f32::INFINITY, |m, v| m.min(v.abs()));
            for (a, b) in original.iter().zip(&w) {
                if *b != 0.0 {
                    assert_eq!(a, b, "a kept weight changed");
                } else {
                    assert!(a.abs() <= kept_min, "pruned {a} while keeping {kept_min}");
                }
            }
        }
    }

    #[test]
    fn ties_are_pruned_in_index_order() {
        let mut w = vec![1.0, -1.0, 1.0, 2.0, 1.0];
        prune_unstructured(&mut w, 0.4);
        assert_eq!(w, vec![0.0, 0.0, 1.0, 2.0, 1.0]);
    }

    #[test]
    fn two_four_keeps_two_of_every_four_including_odd_columns() {
        for cols in [4, 7, 9, 10] {
            let original = SeededRng::new(cols as u64).normal_vec(3 * cols, 1.0);
            let mut w = original.clone();
            prune_two_four(&mut w, cols);
            for (row, orig) in w.chunks(cols).zip(original.chunks(cols)) {
                for (g, o) in row.chunks(4).zip(orig.chunks(4)) {
                    assert_eq!(g.iter().filter(|v| **v != 0.0).count(), g.len().min(2), "cols {cols}");
                    let kept_min = g.iter().filter(|v| **v != 0.0).fold(f32::INFINITY, |m, v| m.min(v.abs()));
                    for (a, b) in o.iter().zip(g) {
                        assert!(*b == *a || (*b == 0.0 && a.abs() <= kept_min));
                    }
                }
            }
        }
        let mut tie = vec![1.0, 1.0, 1.0, 1.0];
        prune_two_four(&mut tie, 4);
        assert_eq!(tie, vec![1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn layer_reports_sparsity_and_the_dense_kernel() {
        let w =
            DenseWeight { name: "w".into(), rows: 4, cols: 8, data: SeededRng::new(1).normal_vec(32, 1.0) };
        let layer = Prune(Pattern::TwoFour).quantize(w, None, None).unwrap();
        assert_eq!(layer.stats(), vec![("sparsity", 0.5)]);
        assert_eq!(layer.kernel(), "dense-f32-gemm (pruned)");
    }

    #[test]
    fn bad_parameters_name_the_parameter() {
        let with = |k: &str, v: serde_json::Value| {
            let mut p = SchemeParams::default();
            p.0.insert(k.into(), v);
            build(&p).err().map(|e| e.to_string())
        };
        assert!(with("fraction", serde_json::json!(1.5)).unwrap().contains("`fraction` is 1.5"));
        assert!(with("pattern", serde_json::json!("4:8")).unwrap().contains("`pattern` is \"4:8\""));
        assert!(with("pattern", serde_json::json!("2:4")).is_none());
    }
}
