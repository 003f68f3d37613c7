//! Calibration: the full-precision model runs on the calibration text while every linear
//! layer records the inputs it sees, so calibrated schemes (int8-static, qat-sim) can fix
//! their activation ranges from real activations.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::measure::embedding;
use crate::model::{Logits, Model, ModelFiles, QuantizeFactory};
use crate::scheme::{
    Calibration, DenseWeight, FloatLinear, FloatStorage, Linear, Scheme, StoredSource, StoredTensor,
};
use crate::suite::CalibrationData;

/// Each layer's recorded inputs, row-major `[rows, in_features]`, by layer name, and
/// when asked the outputs those rows gave.
#[derive(Debug, Default)]
pub struct LayerInputs {
    inputs: BTreeMap<String, (usize, Vec<f32>)>,
    outputs: BTreeMap<String, Vec<f32>>,
}

impl LayerInputs {
    /// The recorded inputs of layer `name`.
    pub fn get(&self, name: &str) -> Option<Calibration<'_>> {
        self.inputs.get(name).map(|(cols, data)| Calibration { inputs: data, rows: data.len() / cols })
    }

    /// The outputs layer `name` gave for its recorded inputs (probe recordings only).
    pub fn outputs(&self, name: &str) -> Option<&[f32]> {
        self.outputs.get(name).map(Vec::as_slice)
    }

    /// Rows recorded per layer (the same for every layer).
    pub fn rows(&self) -> usize {
        self.inputs.values().map(|(cols, data)| data.len() / cols).min().unwrap_or(0)
    }
}

type Shared = Arc<Mutex<LayerInputs>>;

/// A full-precision layer that keeps the first `limit` input rows it sees (and, for a
/// probe, the outputs of those rows).
struct Recorder {
    name: String,
    inner: FloatLinear,
    limit: usize,
    keep_outputs: bool,
    store: Shared,
}

impl Linear for Recorder {
    fn in_features(&self) -> usize {
        self.inner.in_features()
    }

    fn out_features(&self) -> usize {
        self.inner.out_features()
    }

    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let cols = self.in_features();
        let mut store = self.store.lock().expect("recorder lock is never poisoned: no panics inside");
        let (_, data) = store.inputs.entry(self.name.clone()).or_insert_with(|| (cols, Vec::new()));
        let room = self.limit.saturating_sub(data.len() / cols).min(rows);
        data.extend_from_slice(&x[..room * cols]);
        drop(store);
        self.inner.forward(x, rows, out);
        if self.keep_outputs && room > 0 {
            let mut store = self.store.lock().expect("recorder lock is never poisoned: no panics inside");
            let kept = store.outputs.entry(self.name.clone()).or_default();
            kept.extend_from_slice(&out[..room * self.out_features()]);
        }
    }

    fn kernel(&self) -> &'static str {
        "f32-gemm (recording calibration inputs)"
    }

    fn parts(&self) -> crate::scheme::LayerParts<'_> {
        self.inner.parts()
    }

    fn export(&self, name: &str) -> Vec<StoredTensor> {
        self.inner.export(name)
    }
}

/// The scheme that builds [`Recorder`]s.
struct Recording {
    limit: usize,
    keep_outputs: bool,
    store: Shared,
    /// The model's precision: the recorded model holds its weights as the reference does
    /// (a bf16 model's 2 bytes a weight, not 4).
    precision: FloatStorage,
}

impl Scheme for Recording {
    fn quantize(
        &self,
        weight: DenseWeight,
        bias: Option<Vec<f32>>,
        _: Option<Calibration>,
    ) -> Result<Box<dyn Linear>> {
        let name = weight.name.clone();
        let inner = FloatLinear::new(weight, bias, self.precision);
        let (limit, keep_outputs, store) = (self.limit, self.keep_outputs, self.store.clone());
        Ok(Box::new(Recorder { name, inner, limit, keep_outputs, store }))
    }

    fn load(
        &self,
        name: &str,
        _: usize,
        _: usize,
        _: Option<Vec<f32>>,
        _: &dyn StoredSource,
    ) -> Result<Box<dyn Linear>> {
        Err(Error::Scheme {
            scheme: "calibration recorder".into(),
            message: format!("cannot reload layer {name}"),
        })
    }
}

/// Run the model at `dtype` on the calibration text (chunks of `context` tokens for
/// decoders, sentences for encoders) until every layer has recorded `samples` input rows,
/// or the text is used up.
pub fn record(
    files: &ModelFiles,
    dtype: FloatStorage,
    data: &CalibrationData,
    context: usize,
) -> Result<LayerInputs> {
    let store: Shared = Arc::default();
    let recording =
        Recording { limit: data.samples, keep_outputs: false, store: store.clone(), precision: dtype };
    // The head records too, for schemes asked to quantize it.
    let model = files.build(&mut QuantizeFactory::new(&files.store, dtype, &recording, true))?;
    let tokenizer = &files.tokenizer;
    let mut seen = 0;
    match &model {
        Model::Causal(lm) => {
            let tokens = tokenizer.encode(&data.text)?;
            for chunk in tokens.chunks(context.max(1)) {
                if seen >= data.samples {
                    break;
                }
                // All positions: the head must see every row too, not only the last.
                lm.forward(chunk, 1, &mut lm.new_cache(1, chunk.len()), Logits::All)?;
                seen += chunk.len();
            }
        }
        Model::Encoder(encoder) => {
            for sentence in embedding::split_sentences(&data.text) {
                if seen >= data.samples {
                    break;
                }
                let mut ids = tokenizer.encode_with_special(&sentence)?;
                embedding::truncate_keeping_last(&mut ids, context.min(encoder.max_positions()));
                seen += ids.len();
                embedding::encode_all(encoder.as_ref(), &[ids], files.pad_id(), 1)?;
            }
        }
    }
    drop(model);
    let inputs =
        std::mem::take(&mut *store.lock().expect("recorder lock is never poisoned: no panics inside"));
    if inputs.rows() == 0 {
        return Err(Error::Workload(format!("calibration text {} has no tokens", data.source)));
    }
    Ok(inputs)
}

/// The reference's side of the per-layer comparison: every linear layer's inputs and
/// outputs, and every block's hidden states, for one sequence `tokens` (a decoder's
/// evaluation tokens, or one encoder sentence with its special tokens).
pub struct LayerProbe {
    /// The sequence.
    pub tokens: Vec<u32>,
    /// Each linear layer's inputs and outputs on it.
    pub linears: LayerInputs,
    /// Hidden states after each block, `[tokens, hidden]`.
    pub blocks: Vec<Vec<f32>>,
}

/// Record a [`LayerProbe`] of the model at `dtype` on `tokens`.
pub fn record_probe(files: &ModelFiles, dtype: FloatStorage, tokens: Vec<u32>) -> Result<LayerProbe> {
    let store: Shared = Arc::default();
    let recording =
        Recording { limit: tokens.len(), keep_outputs: true, store: store.clone(), precision: dtype };
    // The head records too, for cases that quantize it.
    let model = files.build(&mut QuantizeFactory::new(&files.store, dtype, &recording, true))?;
    let blocks = block_states(&model, &tokens)?;
    drop(model);
    let linears =
        std::mem::take(&mut *store.lock().expect("recorder lock is never poisoned: no panics inside"));
    Ok(LayerProbe { tokens, linears, blocks })
}

/// Hidden states after each block of `model` on one sequence.
pub fn block_states(model: &Model, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
    let mut blocks = Vec::new();
    let mut keep = |_: usize, hidden: &[f32]| blocks.push(hidden.to_vec());
    match model {
        Model::Causal(lm) => {
            // All positions, so the head sees (and a probe records) every row.
            lm.forward_observed(tokens, 1, &mut lm.new_cache(1, tokens.len()), Logits::All, &mut keep)?;
        }
        Model::Encoder(encoder) => {
            encoder.encode_observed(tokens, &vec![1; tokens.len()], 1, &mut keep)?;
        }
    }
    for (i, hidden) in blocks.iter().enumerate() {
        let width = hidden.len() / tokens.len().max(1);
        let row = |pos: usize| format!("position {pos}");
        crate::tensor::check_finite(
            &format!("the hidden state after block {i}"),
            hidden,
            width,
            row,
            "channel",
        )?;
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layer_records_its_own_inputs_up_to_the_sample_count() {
        let dir = tempfile::tempdir().unwrap();
        crate::model::builtin::write_to("tiny-llama", dir.path()).unwrap();
        let files = ModelFiles::open(dir.path()).unwrap();
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/suites/data/eval.txt")).unwrap();
        let data = CalibrationData { text, source: "eval.txt".into(), samples: 40, sha256: String::new() };
        let inputs = record(&files, FloatStorage::F32, &data, 32).unwrap();
        assert_eq!(inputs.rows(), 40, "two chunks of 32 tokens, cut at 40 rows");
        let layer = |n: &str| inputs.get(&format!("model.layers.1.{n}")).unwrap();
        assert_eq!((layer("self_attn.q_proj").rows, layer("self_attn.q_proj").inputs.len()), (40, 40 * 256));
        assert_eq!(layer("mlp.down_proj").inputs.len(), 40 * 688, "down_proj sees the 688-wide activations");
        // Layers fed the same normalised hidden state record the same rows.
        assert_eq!(layer("self_attn.q_proj").inputs, layer("self_attn.v_proj").inputs);
        assert_eq!(layer("mlp.gate_proj").inputs, layer("mlp.up_proj").inputs);
        assert_ne!(layer("self_attn.q_proj").inputs, layer("mlp.gate_proj").inputs);
        assert!(inputs.get("lm_head").is_some(), "the head records for quantize_head");
        // The planted outlier channel 7 of layer 1's input norm shows in the recorded inputs.
        let q = layer("self_attn.q_proj").inputs;
        let channel_7_max = q.chunks(256).map(|row| row[7].abs()).fold(0.0f32, f32::max);
        assert!(channel_7_max > 6.0, "outlier channel magnitude {channel_7_max}");
    }
}
