//! Weight factories: where an architecture gets each tensor and linear layer from, either
//! quantizing a full-precision checkpoint with a scheme or reloading a saved quantized model.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::scheme::{
    Calibration, DenseWeight, FloatLinear, FloatStorage, FloatValues, Linear, Scheme, StoredSource,
};

use super::embedding::Embedding;
use super::weights::WeightStore;

/// Canonical name of an untied output head.
pub const HEAD: &str = "lm_head";

/// One linear layer an architecture asks for.
#[derive(Debug, Clone, Copy)]
pub struct LinearSpec<'a> {
    /// Name; the weight is `{name}.weight`, the bias `{name}.bias`.
    pub name: &'a str,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Whether the layer has a bias.
    pub bias: bool,
    /// The checkpoint stores the weight as `[in, out]` (GPT-2's Conv1D); it is transposed
    /// on load, and saved quantized models always hold `[out, in]`.
    pub stored_in_out: bool,
}

impl<'a> LinearSpec<'a> {
    /// A layer `name` with a `[rows, cols]` weight and an optional bias.
    pub fn new(name: &'a str, rows: usize, cols: usize, bias: bool) -> Self {
        LinearSpec { name, rows, cols, bias, stored_in_out: false }
    }

    /// The same layer, stored `[in, out]` in the checkpoint.
    pub fn stored_in_out(self) -> Self {
        LinearSpec { stored_in_out: true, ..self }
    }
}

/// Supplies an architecture's tensors and linear layers while it is built.
pub trait WeightFactory {
    /// A full-precision tensor (embedding, norm) of `shape`.
    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    /// The token embedding table `name` (`[vocab, width]`), at the model's precision.
    fn embedding(&mut self, name: &str, vocab: usize, width: usize) -> Result<Embedding>;
    /// The linear layer `name` (`[rows, cols]` weight at `{name}.weight`), in the scheme's
    /// representation.
    fn linear(&mut self, spec: LinearSpec) -> Result<Box<dyn Linear>>;
    /// The output head. `tied_to` names the embedding when the head shares it. `None`
    /// means: use the embedding matrix as is (tied and not quantized).
    fn head(&mut self, tied_to: Option<&str>, rows: usize, cols: usize) -> Result<Option<Box<dyn Linear>>>;
}

/// Each linear layer's calibration inputs, by layer name.
pub type CalibrationLookup<'a> = &'a dyn Fn(&str) -> Option<Calibration<'a>>;

/// Builds a model from a full-precision checkpoint, quantizing its linear layers.
pub struct QuantizeFactory<'a> {
    store: &'a WeightStore,
    precision: FloatStorage,
    scheme: &'a dyn Scheme,
    quantize_head: bool,
    calibration: Option<CalibrationLookup<'a>>,
}

impl<'a> QuantizeFactory<'a> {
    /// Every tensor is first rounded to `precision` (the reference model's dtype), then
    /// linear layers go through `scheme`.
    pub fn new(
        store: &'a WeightStore,
        precision: FloatStorage,
        scheme: &'a dyn Scheme,
        quantize_head: bool,
    ) -> Self {
        QuantizeFactory { store, precision, scheme, quantize_head, calibration: None }
    }

    /// Give each quantized layer its calibration inputs (for schemes that need them); a
    /// layer without recorded inputs is then an error.
    pub fn with_calibration(self, lookup: CalibrationLookup<'a>) -> Self {
        QuantizeFactory { calibration: Some(lookup), ..self }
    }

    fn calibration_of(&self, name: &str) -> Result<Option<Calibration<'a>>> {
        match self.calibration {
            None => Ok(None),
            Some(lookup) => lookup(name).map(Some).ok_or_else(|| {
                Error::Workload(format!("no calibration inputs were recorded for layer {name}"))
            }),
        }
    }

    /// The weight `name` at the model's precision, refused when a value is NaN or
    /// infinite, as stored or once rounded (a value beyond f16's range): such a weight
    /// makes every output NaN, which must never be scored.
    fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let mut data = self.store.f32(name, shape)?;
        non_finite_weight(name, &data, "")?;
        if self.precision != FloatStorage::F32 {
            let precision = self.precision;
            data.par_iter_mut().with_min_len(1 << 16).for_each(|v| *v = precision.round(*v));
            non_finite_weight(name, &data, &format!(" once rounded to {}", self.precision.name()))?;
        }
        Ok(data)
    }

    fn bias(&self, name: &str, rows: usize, present: bool) -> Result<Option<Vec<f32>>> {
        present.then(|| self.read(&format!("{name}.bias"), &[rows])).transpose()
    }
}

impl WeightFactory for QuantizeFactory<'_> {
    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.read(name, shape)
    }

    fn embedding(&mut self, name: &str, vocab: usize, width: usize) -> Result<Embedding> {
        if self.precision.half().is_none() {
            return Ok(Embedding::new(self.read(name, &[vocab, width])?, vocab, width, self.precision));
        }
        read_16_bit_embedding(self.store, name, vocab, width, self.precision)
    }

    fn linear(&mut self, spec: LinearSpec) -> Result<Box<dyn Linear>> {
        let LinearSpec { name, rows, cols, .. } = spec;
        let weight = format!("{name}.weight");
        let data = if spec.stored_in_out {
            transpose(&self.read(&weight, &[cols, rows])?, cols, rows)
        } else {
            self.read(&weight, &[rows, cols])?
        };
        let bias = self.bias(name, rows, spec.bias)?;
        let calibration = self.calibration_of(name)?;
        self.scheme.quantize(DenseWeight { name: name.to_string(), rows, cols, data }, bias, calibration)
    }

    fn head(&mut self, tied_to: Option<&str>, rows: usize, cols: usize) -> Result<Option<Box<dyn Linear>>> {
        let source = tied_to.map(String::from).unwrap_or(format!("{HEAD}.weight"));
        if !self.quantize_head && tied_to.is_some() {
            return Ok(None);
        }
        let data = self.read(&source, &[rows, cols])?;
        let weight = DenseWeight { name: HEAD.to_string(), rows, cols, data };
        Ok(Some(if self.quantize_head {
            self.scheme.quantize(weight, None, self.calibration_of(HEAD)?)?
        } else {
            Box::new(FloatLinear::unquantized(weight, None, self.precision))
        }))
    }
}

/// Rebuilds a model from a saved quantized checkpoint.
pub struct ReloadFactory<'a> {
    store: &'a WeightStore,
    scheme: &'a dyn Scheme,
    quantize_head: bool,
}

impl<'a> ReloadFactory<'a> {
    /// Read `store` (written by saving a model quantized with `scheme`).
    pub fn new(store: &'a WeightStore, scheme: &'a dyn Scheme, quantize_head: bool) -> Self {
        ReloadFactory { store, scheme, quantize_head }
    }

    fn bias(&self, name: &str, rows: usize, present: bool) -> Result<Option<Vec<f32>>> {
        present.then(|| self.store.f32(&format!("{name}.bias"), &[rows])).transpose()
    }
}

impl WeightFactory for ReloadFactory<'_> {
    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.store.f32(name, shape)
    }

    fn embedding(&mut self, name: &str, vocab: usize, width: usize) -> Result<Embedding> {
        // Saved at the model's precision: reloaded at the same one.
        let precision = self.store.entry(name)?.stored.precision();
        if precision.half().is_some() {
            return read_16_bit_embedding(self.store, name, vocab, width, precision);
        }
        Ok(Embedding::new(self.store.f32(name, &[vocab, width])?, vocab, width, precision))
    }

    fn linear(&mut self, spec: LinearSpec) -> Result<Box<dyn Linear>> {
        let bias = self.bias(spec.name, spec.rows, spec.bias)?;
        self.scheme.load(spec.name, spec.rows, spec.cols, bias, self.store)
    }

    fn head(&mut self, tied_to: Option<&str>, rows: usize, cols: usize) -> Result<Option<Box<dyn Linear>>> {
        if self.quantize_head {
            return self.scheme.load(HEAD, rows, cols, None, self.store).map(Some);
        }
        if tied_to.is_some() {
            return Ok(None);
        }
        let name = format!("{HEAD}.weight");
        // Saved at the model's precision: reloaded at the same one.
        let precision = self.store.entry(&name)?.stored.precision();
        let data = self.store.f32(&name, &[rows, cols])?;
        let weight = DenseWeight { name: HEAD.to_string(), rows, cols, data };
        Ok(Some(Box::new(FloatLinear::unquantized(weight, None, precision))))
    }
}

/// An error naming weight `name` and its first NaN or infinite element (`how`: how the
/// values were made, e.g. " once rounded to f16").
pub(crate) fn non_finite_weight(name: &str, data: &[f32], how: &str) -> Result<()> {
    non_finite_weight_at(name, data, 0, how)
}

/// [`non_finite_weight`] for a part of the weight starting at element `offset`.
fn non_finite_weight_at(name: &str, data: &[f32], offset: usize, how: &str) -> Result<()> {
    match crate::tensor::first_non_finite(data) {
        None => Ok(()),
        Some((i, value)) => Err(Error::Tensor {
            name: name.to_string(),
            message: format!("element {} is {value}{how}, expected finite weights", offset + i),
        }),
    }
}

/// The embedding table `name` at the 16-bit `precision`, read and rounded a chunk of rows
/// at a time, so the f32 table (twice the 16-bit one) is never whole. A value that is not
/// finite, as stored or once rounded, is an error naming it.
fn read_16_bit_embedding(
    store: &WeightStore,
    name: &str,
    vocab: usize,
    width: usize,
    precision: FloatStorage,
) -> Result<Embedding> {
    let ty = precision.half().expect("a 16-bit precision");
    let how = format!(" once rounded to {}", precision.name());
    let mut bits = Vec::with_capacity(vocab * width);
    store.f32_chunks(name, &[vocab, width], EMBEDDING_CHUNK_ROWS, &mut |chunk| {
        non_finite_weight_at(name, chunk, bits.len(), "")?;
        let encoded = ty.encode(chunk);
        if let Some(i) = encoded.iter().position(|&b| !ty.to_f32(b).is_finite()) {
            non_finite_weight_at(name, &[ty.to_f32(encoded[i])], bits.len() + i, &how)?;
        }
        bits.extend_from_slice(&encoded);
        Ok(())
    })?;
    Ok(Embedding::from_values(FloatValues::Half(bits, ty), vocab, width, precision))
}

/// Rows of an embedding table read and rounded at a time (4096 × a 4096-wide row is 64 MiB
/// of f32).
const EMBEDDING_CHUNK_ROWS: usize = 4096;

/// `[rows, cols]` row-major → `[cols, rows]` row-major.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

impl StoredSource for WeightStore {
    fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        WeightStore::f32(self, name, shape)
    }

    fn raw(&self, name: &str, shape: &[usize]) -> Result<(safetensors::Dtype, Vec<u8>)> {
        WeightStore::raw(self, name, shape)
    }
}
