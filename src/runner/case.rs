//! One model's cases: the reference outputs (computed once), then per scheme the
//! quantized model and every measurement the plan asks for.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::measure::divergence::{self, Reference};
use crate::measure::embedding::{self, EncoderOutputs};
use crate::measure::latency::{self, Clock, ClockSource, Stats};
use crate::measure::memory::{self, RssWindow};
use crate::measure::reference_cache::{self, CacheKey};
use crate::measure::results::{
    BatchInvariance, CaseResult, DeviceLatency, Disk, Generation, InputLimit, Latency, LayerDivergence,
    Memory, ReferenceCacheRecord,
};
use crate::measure::MetricGroup;
use crate::model::generate::greedy;
use crate::model::weights::WeightStore;
use crate::model::{
    ArchKind, CausalLm, DeviceReport, Encoder, Logits, Model, QuantizeFactory, ReloadFactory,
};
use crate::scheme::{self, Scheme, StoredTensor, TensorRole};
use crate::suite::{Plan, PlannedModel, PlannedScheme};
use crate::tensor;

use super::calibrate::{self, LayerInputs, LayerProbe};
use super::progress::Progress;

/// Most sentences an encoder is scored on when the suite sets no `max_chunks`.
const DEFAULT_SENTENCES: usize = 64;

/// The reference model's outputs, by kind.
enum References {
    Causal {
        eval_tokens: Vec<u32>,
        prompt_ids: Vec<Vec<u32>>,
        logprobs: Option<Box<Reference>>,
        generations: Vec<Vec<u32>>,
    },
    Encoder {
        sentences: Vec<Vec<u32>>,
        outputs: Option<EncoderOutputs>,
    },
}

/// Everything shared by the cases of one model.
pub struct ModelRunner<'p> {
    plan: &'p Plan,
    model: &'p PlannedModel,
    references: References,
    /// Each layer's inputs on the calibration text, when a scheme needs them.
    calibration: Option<LayerInputs>,
    /// The stored reference pass, when divergence is measured.
    pub reference_cache: Option<ReferenceCacheRecord>,
    /// The full-precision layers' inputs, outputs and block states on one sequence, when
    /// divergence is measured.
    layer_probe: Option<LayerProbe>,
    /// An encoder's input limit and how many inputs were cut to it.
    pub input_limit: Option<InputLimit>,
    /// Where the cases' timings come from.
    clock: RefCell<Box<dyn Clock>>,
}

/// How far the saved file's size may stray from the in-memory byte account (header,
/// metadata and alignment) before the case warns.
const DISK_AGREEMENT: f64 = 0.005;

/// Most tokens of the sequence the per-layer comparison runs on.
const LAYER_PROBE_TOKENS: usize = 64;

/// Where a case's files go and whether they stay.
pub struct CaseOutput<'a> {
    /// The run's output folder.
    pub dir: &'a Path,
    /// Keep the saved quantized model.
    pub keep_models: bool,
}

impl<'p> ModelRunner<'p> {
    /// Build the reference model (the checkpoint at the model's dtype, or the model the
    /// suite names as `reference:`) and record its outputs on the workload; the
    /// divergence reference is read from `reference_folder` (a run's `OUT/references/`, or the
    /// folder `--references` names) when an earlier run stored it there, else stored there.
    /// `judge_sha256` is the hash of the reference model's files (keys the stored reference).
    pub fn new(plan: &'p Plan, index: usize, judge_sha256: &str, reference_folder: &Path) -> Result<Self> {
        let model = &plan.models[index];
        let judge_model = &plan.models[model.reference.unwrap_or(index)];
        let metrics = &plan.metrics;
        let tokenizer = &model.files.tokenizer;
        let mut reference_cache = None;
        let mut input_limit = None;
        let references = match judge_model.files.arch.kind {
            ArchKind::Causal => {
                let eval_tokens = tokenizer.encode(&plan.workload.eval_text)?;
                let prompt_ids =
                    plan.workload.prompts.iter().map(|p| tokenizer.encode(p)).collect::<Result<Vec<_>>>()?;
                // Only the accuracy metrics read the full-precision model: a speed and memory
                // suite never builds it (at 7B shapes it is 27 GB of f32).
                let wants_judge =
                    metrics.contains(&MetricGroup::Divergence) || metrics.contains(&MetricGroup::Generation);
                let judge = if wants_judge { Some(full_precision(judge_model)?) } else { None };
                let lm = match &judge {
                    Some(Model::Causal(lm)) => Some(lm.as_ref()),
                    Some(Model::Encoder(_)) => {
                        return Err(Error::Workload(format!(
                            "the reference model {} built as an encoder, expected a causal LM",
                            judge_model.name
                        )))
                    }
                    None => None,
                };
                let logprobs = match lm {
                    Some(lm) if metrics.contains(&MetricGroup::Divergence) => {
                        let (reference, record) = cached_reference(
                            plan,
                            judge_model,
                            judge_sha256,
                            lm,
                            &eval_tokens,
                            reference_folder,
                        )?;
                        reference_cache = Some(record);
                        Some(Box::new(reference))
                    }
                    _ => None,
                };
                let generations = match lm {
                    Some(lm) if metrics.contains(&MetricGroup::Generation) => {
                        let gen =
                            |ids: &Vec<u32>| greedy(lm, ids, plan.workload.gen_len, false).map(|g| g.ids);
                        prompt_ids.iter().map(gen).collect::<Result<_>>()?
                    }
                    _ => Vec::new(),
                };
                References::Causal { eval_tokens, prompt_ids, logprobs, generations }
            }
            ArchKind::Encoder => {
                let Model::Encoder(encoder) = full_precision(judge_model)? else {
                    return Err(Error::Workload(format!(
                        "the reference model {} built as a causal LM, expected an encoder",
                        judge_model.name
                    )));
                };
                let (sentences, limit) = encoder_sentences(plan, model, encoder.as_ref())?;
                input_limit = Some(limit);
                let outputs = if metrics.contains(&MetricGroup::Divergence) {
                    Some(embedding::encode_all(
                        encoder.as_ref(),
                        &sentences,
                        model.files.pad_id(),
                        embedding::GROUP,
                    )?)
                } else {
                    None
                };
                References::Encoder { sentences, outputs }
            }
        };
        let calibration = match &plan.calibration {
            Some(data) if plan.schemes.iter().any(|s| s.info.needs_calibration) => {
                Some(calibrate::record(&model.files, model.dtype, data, plan.workload.context)?)
            }
            _ => None,
        };
        let layer_probe = if metrics.contains(&MetricGroup::Divergence) {
            let tokens = match &references {
                References::Causal { eval_tokens, .. } => eval_tokens
                    [..eval_tokens.len().min(plan.workload.context.min(LAYER_PROBE_TOKENS))]
                    .to_vec(),
                References::Encoder { sentences, .. } => sentences.first().cloned().unwrap_or_default(),
            };
            Some(calibrate::record_probe(&model.files, model.dtype, tokens)?)
        } else {
            None
        };
        Ok(ModelRunner {
            plan,
            model,
            references,
            calibration,
            reference_cache,
            layer_probe,
            input_limit,
            clock: RefCell::new(latency::wall_clock()),
        })
    }

    /// The same runner, timing with a clock from `source`.
    pub fn with_clock(self, source: ClockSource) -> Self {
        ModelRunner { clock: RefCell::new(source()), ..self }
    }

    /// Seconds on the runner's clock, from an arbitrary origin.
    fn now_s(&self) -> f64 {
        self.clock.borrow_mut().now_ms() / 1e3
    }

    /// A built model on the plan's device.
    fn place(&self, model: Model) -> Result<Model> {
        let w = &self.plan.workload;
        crate::backend::place(model, self.plan.device, w.batch_size * w.prompt_len)
    }

    /// Quantize with `planned` and measure everything the plan asks for.
    pub fn run_case(
        &self,
        planned: &PlannedScheme,
        id: &str,
        spec: String,
        output: &CaseOutput,
        progress: &mut Progress,
    ) -> Result<CaseResult> {
        let started = self.now_s();
        let rss = RssWindow::open();
        let metrics = &self.plan.metrics;
        let scheme = (planned.info.build)(&planned.params)?;
        let quantize_head = planned.params.bool("quantize_head", false);
        progress.step("quantize");
        let t = self.now_s();
        let files = &self.model.files;
        let lookup = |name: &str| self.calibration.as_ref().and_then(|c| c.get(name));
        let mut factory =
            QuantizeFactory::new(&files.store, self.model.dtype, scheme.as_ref(), quantize_head);
        let calibrated = planned.info.needs_calibration;
        if calibrated {
            factory = factory.with_calibration(&lookup);
        }
        crate::backend::reset_device_peak(self.plan.device);
        let model = self.place(files.build(&mut factory)?)?;
        let quantize_s = self.now_s() - t;
        // What stays resident once the model is built (the staging copies freed).
        let built_rss = rss.and_then(|w| w.now());
        let mut warnings = Vec::new();
        if let Some(limit) = self.input_limit.as_ref().filter(|l| l.truncated > 0) {
            warnings.push(format!(
                "{} input(s) were longer than {} tokens ({}) and were cut to it",
                limit.truncated, limit.tokens, limit.source
            ));
        }
        // Timing first: the peak resident size is read right after it, so it covers
        // building (quantizing) and running the model, not the save-and-reload check or
        // the evaluation passes, which hold extra copies of their own.
        let mut latency = if metrics.contains(&MetricGroup::Latency) {
            progress.step("latency");
            Some(self.latency(&model, quantize_s, &mut warnings)?)
        } else {
            None
        };
        let peak_rss = rss.and_then(|w| w.peak());
        let peak_device = crate::backend::device_peak_bytes(self.plan.device);

        let mut memory = self.memory(&model)?;
        let (disk, load_s, model) = if metrics.contains(&MetricGroup::Disk) {
            progress.step("save and reload");
            let (disk, seconds, model) =
                self.disk(model, planned, scheme.as_ref(), id, output, &memory, &mut warnings)?;
            (Some(disk), Some(seconds), model)
        } else {
            (None, None, model)
        };
        if let Some(latency) = latency.as_mut() {
            latency.load_s = load_s;
        }
        if let Some(d) = disk.as_ref().filter(|d| (d.bytes_over_memory - 1.0).abs() > DISK_AGREEMENT) {
            warnings.push(format!(
                "the saved file is {:.2}% off the in-memory byte account (allowed {:.1}%): a tensor is \
                 stored in a form the account does not count; report it",
                100.0 * (d.bytes_over_memory - 1.0),
                100.0 * DISK_AGREEMENT
            ));
        }
        let (mut divergence, mut embedding, mut generation) = (None, None, None);
        match (&self.references, &model) {
            (References::Causal { eval_tokens, logprobs, .. }, Model::Causal(lm)) => {
                if let Some(reference) = logprobs {
                    progress.step("divergence");
                    let w = &self.plan.workload;
                    let chunks = divergence::chunks(eval_tokens, w.context, w.max_chunks);
                    divergence = Some(divergence::measure(lm.as_ref(), &chunks, reference)?);
                }
                if metrics.contains(&MetricGroup::Generation) {
                    progress.step("generation");
                    generation = Some(self.generation(lm.as_ref())?);
                }
            }
            (References::Encoder { sentences, outputs: Some(reference) }, Model::Encoder(encoder)) => {
                progress.step("divergence");
                let outputs =
                    embedding::encode_all(encoder.as_ref(), sentences, files.pad_id(), embedding::GROUP)?;
                embedding = Some(embedding::compare(reference, &outputs));
            }
            _ => {}
        }
        let (layer_stats, stats_mean) = layer_stats(&model);
        // After the layer statistics: the probe's extra forward passes must not count.
        let layers = match &self.layer_probe {
            Some(probe) => {
                progress.step("layers");
                layer_divergence(probe, &model)?
            }
            None => Vec::new(),
        };
        let batch_invariance = match self.plan.workload.batch_invariance {
            Some(rows) => {
                progress.step("batch invariance");
                Some(self.batch_invariance(&model, rows)?)
            }
            None => None,
        };
        let kernels = model.kernels().into_iter().map(String::from).collect();
        drop(model);
        memory.rss_start_bytes = rss.map(|w| w.start);
        memory.peak_rss_bytes = peak_rss;
        memory.built_rss_bytes = built_rss;
        memory.peak_device_bytes = peak_device;
        Ok(CaseResult {
            id: id.to_string(),
            model: self.model.name.clone(),
            scheme: planned.info.name.to_string(),
            label: planned.label.clone(),
            params: planned.params.0.clone(),
            device: self.plan.device.to_string(),
            kernels,
            spec_sha256: spec,
            git_revision: crate::measure::results::git_revision().to_string(),
            elapsed_s: self.now_s() - started,
            memory: metrics.contains(&MetricGroup::Memory).then_some(memory),
            disk,
            latency,
            divergence,
            embedding,
            generation,
            layers,
            batch_invariance,
            layer_stats,
            stats_mean,
            calibration_rows: if calibrated {
                self.calibration.as_ref().map(LayerInputs::rows)
            } else {
                None
            },
            warnings,
        })
    }

    /// The byte account of `model`, from its tensors as exported one at a time.
    fn memory(&self, model: &Model) -> Result<Memory> {
        let parameters = self.model.files.summary()?.parameters;
        let mut by_role: BTreeMap<String, u64> =
            TensorRole::ALL.iter().map(|r| (r.name().to_string(), 0)).collect();
        let (mut weight_bytes, mut quantized_weights) = (0u64, 0u64);
        model.export_to(&mut |t: StoredTensor| {
            *by_role.get_mut(t.role.name()).expect("every role listed") += t.bytes.len() as u64;
            if t.role.is_weight_representation() {
                weight_bytes += t.bytes.len() as u64;
                quantized_weights += t.represents as u64;
            }
        });
        let total_bytes: u64 = by_role.values().sum();
        Ok(Memory {
            bytes_by_role: by_role,
            total_bytes,
            quantized_weights,
            bits_per_weight: 8.0 * weight_bytes as f64 / quantized_weights.max(1) as f64,
            bytes_per_parameter: total_bytes as f64 / parameters.max(1) as f64,
            rss_start_bytes: None,
            peak_rss_bytes: None,
            built_rss_bytes: None,
            peak_device_bytes: None,
        })
    }

    /// Outputs that must be bit-identical between a model and its saved-and-reloaded copy:
    /// the logits of the first evaluation chunk, or the hidden states of the first sentences.
    fn probe(&self, model: &Model) -> Result<Vec<f32>> {
        match (&self.references, model) {
            (References::Causal { eval_tokens, .. }, Model::Causal(lm)) => {
                let probe = &eval_tokens[..self.plan.workload.context.min(eval_tokens.len())];
                lm.forward(probe, 1, &mut lm.new_cache(1, probe.len()), Logits::All)
            }
            (References::Encoder { sentences, .. }, Model::Encoder(encoder)) => {
                let first = &sentences[..sentences.len().min(embedding::GROUP)];
                let outputs = embedding::encode_all(
                    encoder.as_ref(),
                    first,
                    self.model.files.pad_id(),
                    embedding::GROUP,
                )?;
                Ok(outputs.hidden.concat())
            }
            _ => Err(Error::Workload("the reloaded model is of another kind than the reference".into())),
        }
    }

    #[allow(clippy::too_many_arguments)]
    /// Save the model, reload it and check the reloaded model's outputs equal the
    /// original's bit for bit; returns the file's account, the load time and the model the
    /// case goes on with. When a second copy would not fit in the memory left
    /// ([`memory::available_bytes`]), the original is freed before the reload and the case
    /// goes on with the reloaded model (identical, as just checked), with a warning.
    #[allow(clippy::too_many_arguments)]
    fn disk(
        &self,
        model: Model,
        planned: &PlannedScheme,
        scheme: &dyn Scheme,
        id: &str,
        output: &CaseOutput,
        memory: &Memory,
        warnings: &mut Vec<String>,
    ) -> Result<(Disk, f64, Model)> {
        let dir = output.dir.join("models");
        let path = dir.join(format!("{}.safetensors", id.replace('/', "__")));
        let metadata = BTreeMap::from([
            ("quantbench.format_version".to_string(), "1".to_string()),
            ("quantbench.scheme".to_string(), planned.info.name.to_string()),
            (
                "quantbench.params".to_string(),
                serde_json::to_string(&planned.params).expect("params serialise"),
            ),
            ("quantbench.arch".to_string(), self.model.files.arch.name.to_string()),
        ]);
        // Removed if the run is interrupted before the reload check has passed.
        let temporary = crate::files::temporary(&path);
        // Written tensor by tensor: saving holds one tensor beside the model, not a copy of it.
        let bytes = crate::model::weights::save_streaming(&path, &|sink| model.export_to(sink), metadata)?;
        let a = self.probe(&model)?;
        let free_original =
            memory::available_bytes().is_some_and(|free| memory.total_bytes.saturating_mul(3) / 2 > free);
        let original = if free_original {
            warnings.push(format!(
                "a second copy of the model ({:.2} GB) would not fit in the memory left, so the original \
                 was freed before the reload check and the case went on with the reloaded model: the \
                 layer statistics cover only the passes after the reload",
                memory.total_bytes as f64 / 1e9
            ));
            drop(model);
            None
        } else {
            Some(model)
        };
        let t = self.now_s();
        let store = WeightStore::open_files(std::slice::from_ref(&path))?;
        let quantize_head = planned.params.bool("quantize_head", false);
        let reloaded =
            self.place(self.model.files.build(&mut ReloadFactory::new(&store, scheme, quantize_head))?)?;
        let load_s = self.now_s() - t;
        let b = self.probe(&reloaded)?;
        let identical = a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        drop(store);
        let model = match original {
            Some(original) => {
                drop(reloaded);
                original
            }
            None => reloaded,
        };
        if !output.keep_models {
            std::fs::remove_file(&path).map_err(|e| Error::io("cannot remove", &path, e))?;
            let _ = std::fs::remove_dir(&dir);
        }
        drop(temporary);
        if !identical {
            let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            return Err(Error::Case {
                case: id.to_string(),
                message: format!(
                    "the model reloaded from {} differs from the original (max |Δ| {diff})",
                    path.display()
                ),
            });
        }
        let disk = Disk {
            bytes,
            bytes_over_memory: bytes as f64 / memory.total_bytes as f64,
            reload_identical: true,
        };
        Ok((disk, load_s, model))
    }

    /// Latency input: the workload's prompts (or sentences) tokenized, concatenated and
    /// cycled to `prompt_len` tokens, each sequence of the batch starting elsewhere.
    fn latency_tokens(&self) -> Vec<u32> {
        let all: Vec<u32> = match &self.references {
            References::Causal { prompt_ids, .. } => prompt_ids.concat(),
            References::Encoder { sentences, .. } => sentences.concat(),
        };
        let w = &self.plan.workload;
        let n = all.len();
        (0..w.batch_size)
            .flat_map(|b| (0..w.prompt_len).map(move |i| (b * 7 + i) % n))
            .map(|i| all[i])
            .collect()
    }

    /// The device's own timings of a GPU case, with the decode step's weight-bytes floor.
    fn device_latency(
        &self,
        model: &Model,
        prefill_ms: Vec<f64>,
        decode_ms: Vec<f64>,
        eager_decode_ms: Vec<f64>,
    ) -> Result<Option<DeviceLatency>> {
        let Model::Causal(lm) = model else { return Ok(None) };
        let Some(report) = lm.device().map(|d| d.report()) else { return Ok(None) };
        if prefill_ms.is_empty() {
            return Ok(None);
        }
        let floor = crate::backend::decode_floor(report.weight_bytes_per_token)?;
        let batch = self.plan.workload.batch_size;
        Ok(device_timings(batch, &report, floor, prefill_ms, decode_ms, eager_decode_ms))
    }

    /// Timings; `load_s` is filled in by the save-and-reload check, which runs after.
    fn latency(&self, model: &Model, quantize_s: f64, warnings: &mut Vec<String>) -> Result<Latency> {
        let w = &self.plan.workload;
        let tokens = self.latency_tokens();
        let timings = time_runs(
            model,
            &tokens,
            w,
            self.plan.warmup,
            self.plan.repeats,
            &mut **self.clock.borrow_mut(),
        )?;
        warnings.extend(timings.warnings);
        // A GPU decoder's decode steps replay a CUDA graph; the eager ones are timed too.
        let eager_ms = match model {
            Model::Causal(lm) if !timings.device_decode_ms.is_empty() => {
                if let Some(why) = lm.device().and_then(|d| d.report().decode_graph_failed) {
                    warnings.push(format!(
                        "the decode graph could not be captured, decode steps ran eagerly: {why}"
                    ));
                }
                eager_decode_ms(lm.as_ref(), &tokens, w, self.plan.repeats, &mut **self.clock.borrow_mut())?
            }
            _ => Vec::new(),
        };
        let device =
            self.device_latency(model, timings.device_prefill_ms, timings.device_decode_ms, eager_ms)?;
        let (prefill_ms, decode_ms) = (timings.prefill_ms, timings.decode_ms);
        let prefill = Stats::of(&prefill_ms).expect("repeats ≥ 1");
        let decode = Stats::of(&decode_ms);
        Ok(Latency {
            device,
            quantize_s,
            load_s: None,
            decode_tokens_per_s: decode.as_ref().map(|d| w.batch_size as f64 * 1e3 / d.median),
            prefill_ms,
            prefill,
            decode_ms,
            decode,
            batch_size: w.batch_size,
            prompt_len: w.prompt_len,
            gen_len: if matches!(model, Model::Causal(_)) { w.gen_len } else { 0 },
        })
    }

    /// The first prompt alone, then as the first row of a batch of `rows` whose other rows
    /// are evaluation text of the same length; the outputs of the first row compared.
    fn batch_invariance(&self, model: &Model, rows: usize) -> Result<BatchInvariance> {
        let (first, others): (&[u32], Vec<u32>) = match &self.references {
            References::Causal { prompt_ids, eval_tokens, .. } => (&prompt_ids[0], eval_tokens.clone()),
            References::Encoder { sentences, .. } => (&sentences[0], sentences[1..].concat()),
        };
        let len = first.len();
        if others.len() < len {
            return Err(Error::Workload(format!(
                "the batch-invariance probe needs {len} tokens of other text per row, the workload has {}",
                others.len()
            )));
        }
        let mut batch = first.to_vec();
        for r in 1..rows {
            let start = (r * 13) % (others.len() - len + 1);
            batch.extend_from_slice(&others[start..start + len]);
        }
        let (alone, batched) = match model {
            Model::Causal(lm) => {
                let run =
                    |tokens: &[u32], n: usize| lm.forward(tokens, n, &mut lm.new_cache(n, len), Logits::All);
                (run(first, 1)?, run(&batch, rows)?)
            }
            Model::Encoder(encoder) => (
                encoder.encode(first, &vec![1; len], 1)?,
                encoder.encode(&batch, &vec![1; batch.len()], rows)?,
            ),
        };
        let batched = &batched[..alone.len()];
        let max_abs_diff = alone.iter().zip(batched).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
        let kld_mean = match model {
            Model::Causal(lm) => {
                let vocab = lm.vocab_size();
                let (mut p, mut q) = (Vec::new(), Vec::new());
                let total: f64 = alone
                    .chunks_exact(vocab)
                    .zip(batched.chunks_exact(vocab))
                    .map(|(a, b)| {
                        tensor::log_softmax(a, &mut p);
                        tensor::log_softmax(b, &mut q);
                        p.iter().zip(&q).map(|(lp, lq)| lp.exp() * (lp - lq)).sum::<f64>().max(0.0)
                    })
                    .sum();
                Some(total / len as f64)
            }
            Model::Encoder(_) => None,
        };
        Ok(BatchInvariance { batch_size: rows, positions: len, max_abs_diff, kld_mean })
    }

    fn generation(&self, model: &dyn CausalLm) -> Result<Vec<Generation>> {
        let References::Causal { prompt_ids, generations, .. } = &self.references else {
            return Ok(Vec::new());
        };
        let tokenizer = &self.model.files.tokenizer;
        prompt_ids
            .iter()
            .zip(generations)
            .zip(&self.plan.workload.prompts)
            .map(|((ids, reference), prompt)| {
                let ids = greedy(model, ids, self.plan.workload.gen_len, false)?.ids;
                Ok(Generation {
                    prompt: prompt.clone(),
                    text: tokenizer.decode(&ids)?,
                    reference_text: tokenizer.decode(reference)?,
                    first_divergent_token: ids.iter().zip(reference).position(|(a, b)| a != b),
                    ids,
                    reference_ids: reference.clone(),
                })
            })
            .collect()
    }
}

/// Every linear layer's output on the reference's recorded input, and every block's
/// hidden state, against the reference's.
fn layer_divergence(probe: &LayerProbe, model: &Model) -> Result<Vec<LayerDivergence>> {
    let compare = |name: String, kind: &str, reference: &[f32], got: &[f32]| LayerDivergence {
        name,
        kind: kind.to_string(),
        sqnr_db: divergence::sqnr_db(reference, got),
        cosine: divergence::cosine(reference, got),
    };
    let mut out = Vec::new();
    for (name, layer) in model.linears() {
        let (Some(input), Some(reference)) = (probe.linears.get(name), probe.linears.outputs(name)) else {
            continue;
        };
        let mut got = vec![0.0; input.rows * layer.out_features()];
        layer.forward(input.inputs, input.rows, &mut got);
        let row = |r: usize| format!("probe row {r}");
        crate::tensor::check_finite(
            &format!("the output of {name}"),
            &got,
            layer.out_features(),
            row,
            "channel",
        )?;
        out.push(compare(name.to_string(), "linear", reference, &got));
    }
    let blocks = calibrate::block_states(model, &probe.tokens)?;
    for (i, (reference, got)) in probe.blocks.iter().zip(&blocks).enumerate() {
        out.push(compare(format!("block.{i}"), "block", reference, got));
    }
    Ok(out)
}

/// Statistics the layers report, by layer, and each averaged over the layers reporting it.
fn layer_stats(model: &Model) -> (BTreeMap<String, BTreeMap<String, f64>>, BTreeMap<String, f64>) {
    let mut by_layer = BTreeMap::new();
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (name, stats) in model.layer_stats() {
        for (key, value) in &stats {
            let entry = sums.entry(key.to_string()).or_default();
            entry.0 += value;
            entry.1 += 1;
        }
        by_layer.insert(name, stats.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    }
    let means = sums.into_iter().map(|(k, (sum, n))| (k, sum / n as f64)).collect();
    (by_layer, means)
}

/// Timing samples of the measured runs (warm-up runs dropped) and what is wrong with them.
struct Timings {
    prefill_ms: Vec<f64>,
    decode_ms: Vec<f64>,
    /// The same runs timed by the device (GPU models), else empty.
    device_prefill_ms: Vec<f64>,
    device_decode_ms: Vec<f64>,
    warnings: Vec<String>,
}

/// One timed run: host milliseconds of the prefill and of each decode step, and the same
/// from the device's own events when the model runs on one.
#[derive(Default)]
struct RunTimes {
    prefill: f64,
    steps: Vec<f64>,
    device_prefill: Option<f64>,
    device_steps: Vec<f64>,
}

/// `warmup` untimed then `repeats` timed runs of `model` on `tokens`, read off `clock`.
fn time_runs(
    model: &Model,
    tokens: &[u32],
    w: &crate::suite::Workload,
    warmup: usize,
    repeats: usize,
    clock: &mut dyn Clock,
) -> Result<Timings> {
    let (mut prefill_ms, mut decode_ms, mut first_decode) = (Vec::new(), Vec::new(), None);
    let (mut device_prefill_ms, mut device_decode_ms) = (Vec::new(), Vec::new());
    for run in 0..warmup + repeats {
        let times = match model {
            Model::Causal(lm) => time_generation(lm.as_ref(), tokens, w.batch_size, w.gen_len, clock)?,
            Model::Encoder(encoder) => RunTimes {
                prefill: time_encoding(encoder.as_ref(), tokens, w.batch_size, clock)?,
                ..RunTimes::default()
            },
        };
        if run >= warmup {
            prefill_ms.push(times.prefill);
            let steps = times.steps;
            if run == warmup && !steps.is_empty() {
                first_decode = Some(steps.iter().sum::<f64>() / steps.len() as f64);
            }
            decode_ms.extend(steps);
            device_prefill_ms.extend(times.device_prefill);
            device_decode_ms.extend(times.device_steps);
        }
    }
    let mut warnings = latency::warnings("prefill", &prefill_ms, prefill_ms.first().copied());
    // The first run's decode steps are judged by their mean against the per-run means.
    let run_means: Vec<f64> =
        decode_ms.chunks(w.gen_len.max(1)).map(|c| c.iter().sum::<f64>() / c.len() as f64).collect();
    let mut decode_warnings = latency::warnings("decode", &decode_ms, None);
    if let Some(first) = first_decode {
        decode_warnings.extend(
            latency::warnings("decode", &run_means, Some(first))
                .into_iter()
                .filter(|w| w.contains("outlier")),
        );
    }
    warnings.extend(decode_warnings);
    Ok(Timings { prefill_ms, decode_ms, device_prefill_ms, device_decode_ms, warnings })
}

/// Device milliseconds of the decode steps of `repeats` more timed runs with the decode
/// graph off, so a GPU case reports eager launches next to the graph replays; empty for a
/// model without the mode or with it off already (its timings are the eager ones).
fn eager_decode_ms(
    lm: &dyn CausalLm,
    tokens: &[u32],
    w: &crate::suite::Workload,
    repeats: usize,
    clock: &mut dyn Clock,
) -> Result<Vec<f64>> {
    let Some(device) = lm.device() else { return Ok(Vec::new()) };
    if !device.set_decode_graph(false) {
        return Ok(Vec::new());
    }
    let mut ms = Vec::new();
    let timed = (0..repeats).try_for_each(|_| {
        ms.extend(time_generation(lm, tokens, w.batch_size, w.gen_len, clock)?.device_steps);
        Ok::<_, Error>(())
    });
    device.set_decode_graph(true);
    timed.map(|()| ms)
}

/// A GPU case's device timings from its samples and the decode step's floor (`None`
/// without prefill samples).
fn device_timings(
    batch: usize,
    report: &DeviceReport,
    floor: crate::backend::DecodeFloor,
    prefill_ms: Vec<f64>,
    decode_ms: Vec<f64>,
    eager_decode_ms: Vec<f64>,
) -> Option<DeviceLatency> {
    let prefill = Stats::of(&prefill_ms)?;
    let batch = batch as f64;
    let per_s = |s: &Option<Stats>| s.as_ref().map(|d| batch * 1e3 / d.median);
    let (decode, eager_decode) = (Stats::of(&decode_ms), Stats::of(&eager_decode_ms));
    Some(DeviceLatency {
        prefill_ms,
        prefill,
        decode_tokens_per_s: per_s(&decode),
        decode_ms,
        decode,
        eager_decode_tokens_per_s: per_s(&eager_decode),
        eager_decode_ms,
        eager_decode,
        weight_bytes_per_token: report.weight_bytes_per_token,
        copy_gb_s: floor.copy_gb_s,
        floor_ms: floor.floor_ms,
        floor_tokens_per_s: batch * 1e3 / floor.floor_ms,
    })
}

/// One timed generation run: the prefill and each decode step.
fn time_generation(
    lm: &dyn CausalLm,
    tokens: &[u32],
    batch: usize,
    steps: usize,
    clock: &mut dyn Clock,
) -> Result<RunTimes> {
    let vocab = lm.vocab_size();
    let device_ms = || lm.device().and_then(|d| d.report().last_forward_ms);
    let mut cache = lm.new_cache(batch, tokens.len() / batch + steps);
    let t = clock.now_ms();
    let mut logits = lm.forward(tokens, batch, &mut cache, Logits::Last)?;
    let mut times =
        RunTimes { prefill: clock.now_ms() - t, device_prefill: device_ms(), ..RunTimes::default() };
    for _ in 0..steps {
        let next: Vec<u32> = logits.chunks_exact(vocab).map(|row| tensor::argmax(row) as u32).collect();
        let t = clock.now_ms();
        logits = lm.forward(&next, batch, &mut cache, Logits::Last)?;
        times.steps.push(clock.now_ms() - t);
        times.device_steps.extend(device_ms());
    }
    Ok(times)
}

/// One timed encoder pass over `batch` unpadded sequences, milliseconds.
fn time_encoding(encoder: &dyn Encoder, tokens: &[u32], batch: usize, clock: &mut dyn Clock) -> Result<f64> {
    let mask = vec![1u8; tokens.len()];
    let t = clock.now_ms();
    encoder.encode(tokens, &mask, batch)?;
    Ok(clock.now_ms() - t)
}

/// The model at its reference precision with no quantization.
fn full_precision(model: &PlannedModel) -> Result<Model> {
    // Weights held at the model's precision: a bf16 reference takes 2 bytes a weight.
    let float = scheme::float_scheme(model.dtype);
    let files = &model.files;
    files.build(&mut QuantizeFactory::new(&files.store, model.dtype, float.as_ref(), false))
}

/// The divergence reference of `judge` on this run's evaluation tokens: read from
/// `folder/NAME.qbref` when an earlier run stored it for the same model, tokenizer and
/// workload, else computed and stored there (atomically: shards sharing a folder may
/// write the same file at once).
fn cached_reference(
    plan: &Plan,
    judge: &PlannedModel,
    judge_sha256: &str,
    lm: &dyn CausalLm,
    eval_tokens: &[u32],
    folder: &Path,
) -> Result<(Reference, ReferenceCacheRecord)> {
    let w = &plan.workload;
    let key = CacheKey {
        model_sha256: judge_sha256.to_string(),
        dtype: judge.dtype.name().to_string(),
        tokenizer_sha256: judge.files.tokenizer.fingerprint().to_string(),
        eval_sha256: crate::hash::sha256_hex(w.eval_text.as_bytes()),
        context: w.context,
        max_chunks: w.max_chunks,
        top_k: w.reference_top_k,
    };
    let path = folder.join(format!("{}.qbref", judge.name));
    let chunks = divergence::chunks(eval_tokens, w.context, w.max_chunks);
    let (reference, reused) = match reference_cache::read(&path, &key)? {
        Some(reference) => (reference, true),
        None => (divergence::reference(lm, &chunks, w.reference_top_k)?, false),
    };
    let bytes = if reused {
        std::fs::metadata(&path).map_err(|e| Error::io("cannot stat", &path, e))?.len()
    } else {
        reference_cache::write(&path, &key, &reference)?
    };
    let record = ReferenceCacheRecord {
        path: path.display().to_string(),
        bytes,
        top_k: reference.top_k(),
        tokens_scored: reference.len(),
        reused,
        llama_cpp_bytes: reference_cache::llama_cpp_bytes(
            reference.vocab,
            w.context,
            chunks.len(),
            reference.len(),
        ),
    };
    Ok((reference, record))
}

/// An encoder's workload: the prompts, then the evaluation text's sentences (at most
/// `max_chunks`, default 64), tokenized with special tokens and cut to `context` and to
/// the model's limit (sentence-transformers' `max_seq_length` where the folder has one),
/// with that limit and how many inputs it cut.
fn encoder_sentences(
    plan: &Plan,
    model: &PlannedModel,
    encoder: &dyn Encoder,
) -> Result<(Vec<Vec<u32>>, InputLimit)> {
    let w = &plan.workload;
    let (model_limit, source) = model.files.encoder_limit(encoder.max_positions());
    let (tokens, source) = if w.context < model_limit {
        (w.context, "workload.context".to_string())
    } else {
        (model_limit, source)
    };
    let texts = embedding::split_sentences(&w.eval_text);
    let eval = texts.iter().take(w.max_chunks.unwrap_or(DEFAULT_SENTENCES));
    let mut truncated = 0;
    let sentences = w
        .prompts
        .iter()
        .chain(eval)
        .map(|text| {
            let mut ids = model.files.tokenizer.encode_with_special(text)?;
            truncated += usize::from(ids.len() > tokens);
            embedding::truncate_keeping_last(&mut ids, tokens);
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    Ok((sentences, InputLimit { tokens, source, truncated }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::Linear;
    use crate::tensor::attention::{AttentionShape, KvCache};

    /// A decoder that does no work: the scripted clock alone decides the timings.
    struct Instant3;

    impl CausalLm for Instant3 {
        fn vocab_size(&self) -> usize {
            3
        }
        fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
            KvCache::new(1, batch, AttentionShape { heads: 1, kv_heads: 1, head_dim: 1 }, capacity)
        }
        fn forward_observed(
            &self,
            tokens: &[u32],
            batch: usize,
            _: &mut KvCache,
            _: Logits,
            _: &mut dyn FnMut(usize, &[f32]),
        ) -> Result<Vec<f32>> {
            Ok(vec![0.0; 3 * batch.min(tokens.len())])
        }
        fn export_to(&self, _: &mut crate::scheme::TensorSink) {}
        fn linears(&self) -> Vec<(&str, &dyn Linear)> {
            Vec::new()
        }
    }

    /// A clock whose successive intervals come from a script, cycled.
    struct Scripted {
        now: f64,
        reads: usize,
        intervals: Vec<f64>,
    }

    impl Clock for Scripted {
        fn now_ms(&mut self) -> f64 {
            // Reads come in start/stop pairs; every stop adds the next scripted interval.
            if self.reads % 2 == 1 {
                self.now += self.intervals[(self.reads / 2) % self.intervals.len()];
            }
            self.reads += 1;
            self.now
        }
    }

    fn workload() -> crate::suite::Workload {
        crate::suite::Workload {
            prompts: vec![],
            eval_text: String::new(),
            eval_source: String::new(),
            prompt_len: 4,
            gen_len: 3,
            batch_size: 1,
            context: 8,
            max_chunks: None,
            reference_top_k: None,
            batch_invariance: None,
        }
    }

    fn timings(intervals: Vec<f64>) -> Timings {
        let model = Model::Causal(Box::new(Instant3));
        let mut clock = Scripted { now: 0.0, reads: 0, intervals };
        time_runs(&model, &[1, 2, 3, 4], &workload(), 1, 6, &mut clock).unwrap()
    }

    #[test]
    fn a_steady_scripted_clock_gives_no_warning() {
        // Each run: prefill then three decode steps.
        let t = timings(vec![20.0, 5.0, 5.0, 5.0, 20.2, 5.02, 4.98, 5.0, 19.9, 5.01, 5.0, 4.99]);
        assert_eq!(t.prefill_ms.len(), 6, "warm-up dropped");
        assert_eq!(t.decode_ms.len(), 18);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    }

    #[test]
    fn a_noisy_scripted_clock_warns_and_says_what_to_change() {
        let t = timings(vec![20.0, 5.0, 9.0, 3.0, 31.0, 7.0, 4.0, 6.5, 14.0, 5.0, 2.5, 8.0]);
        let text = t.warnings.join("\n");
        assert!(text.contains("prefill timings vary") && text.contains("decode timings vary"), "{text}");
        assert!(text.contains("raise `repeats`"), "{text}");
    }

    #[test]
    fn a_slow_first_measured_run_is_called_an_outlier() {
        // 28 intervals: warm-up (4), then a slow first measured run, then five steady ones.
        let mut script = vec![20.0, 5.0, 5.0, 5.0, 26.0, 7.0, 7.0, 7.0];
        for i in 0..5 {
            let wobble = 0.01 * i as f64;
            script.extend([20.0 + wobble, 5.0 + wobble, 5.0, 5.0 - wobble]);
        }
        let t = timings(script);
        let text = t.warnings.join("\n");
        assert!(text.contains("first measured prefill run is an outlier"), "{text}");
        assert!(text.contains("first measured decode run is an outlier"), "{text}");
        assert!(text.contains("raise `warmup`"), "{text}");
    }

    /// A mock GPU decoder: no work, and device timings from a script — 3 ms for a prefill,
    /// 0.5 ms for a decode step replayed from a graph, 0.8 ms launched eagerly.
    struct MockGpu {
        graph: std::sync::atomic::AtomicBool,
        last_ms: std::sync::Mutex<Option<f64>>,
    }

    impl MockGpu {
        fn new() -> MockGpu {
            MockGpu { graph: true.into(), last_ms: None.into() }
        }
    }

    impl CausalLm for MockGpu {
        fn vocab_size(&self) -> usize {
            Instant3.vocab_size()
        }
        fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
            Instant3.new_cache(batch, capacity)
        }
        fn forward_observed(
            &self,
            tokens: &[u32],
            batch: usize,
            cache: &mut KvCache,
            logits: Logits,
            observe: &mut dyn FnMut(usize, &[f32]),
        ) -> Result<Vec<f32>> {
            let decode = tokens.len() == batch;
            let graph = self.graph.load(std::sync::atomic::Ordering::Relaxed);
            let ms = match (decode, graph) {
                (false, _) => 3.0,
                (true, true) => 0.5,
                (true, false) => 0.8,
            };
            *self.last_ms.lock().unwrap() = Some(ms);
            Instant3.forward_observed(tokens, batch, cache, logits, observe)
        }
        fn export_to(&self, _: &mut crate::scheme::TensorSink) {}
        fn linears(&self) -> Vec<(&str, &dyn Linear)> {
            Vec::new()
        }
        fn device(&self) -> Option<&dyn crate::model::DeviceLm> {
            Some(self)
        }
    }

    impl crate::model::DeviceLm for MockGpu {
        fn report(&self) -> DeviceReport {
            DeviceReport {
                last_forward_ms: *self.last_ms.lock().unwrap(),
                decode_graph_failed: None,
                weight_bytes_per_token: 2_000_000,
            }
        }
        fn set_decode_graph(&self, on: bool) -> bool {
            self.graph.swap(on, std::sync::atomic::Ordering::Relaxed)
        }
    }

    /// On a (mock) device the runner collects the device's own timings next to the host
    /// clock's, times the eager decode steps with the graph off and turns it back on, and
    /// sets both against the weight-read floor.
    #[test]
    fn a_mock_device_gives_device_timings_graph_and_eager_and_the_floor() {
        let model = Model::Causal(Box::new(MockGpu::new()));
        let mut clock = Scripted { now: 0.0, reads: 0, intervals: vec![10.0, 1.0, 1.0, 1.0] };
        let t = time_runs(&model, &[1, 2, 3, 4], &workload(), 1, 4, &mut clock).unwrap();
        assert_eq!((t.prefill_ms.clone(), t.decode_ms.len()), (vec![10.0; 4], 12), "host clock");
        assert_eq!((t.device_prefill_ms.clone(), t.device_decode_ms.clone()), (vec![3.0; 4], vec![0.5; 12]));
        let Model::Causal(lm) = &model else { unreachable!() };
        let eager = eager_decode_ms(lm.as_ref(), &[1, 2, 3, 4], &workload(), 2, &mut clock).unwrap();
        assert_eq!(eager, vec![0.8; 6], "two runs of three eager steps");
        assert!(lm.device().unwrap().set_decode_graph(true), "the graph is back on");
        let report = lm.device().unwrap().report();
        // 2 MB a step at 100 GB/s: a 0.02 ms floor, 50,000 tokens/s.
        let floor = crate::backend::DecodeFloor::of(report.weight_bytes_per_token, 100.0);
        let d = device_timings(1, &report, floor, t.device_prefill_ms, t.device_decode_ms, eager).unwrap();
        assert_eq!((d.decode_tokens_per_s, d.eager_decode_tokens_per_s), (Some(2000.0), Some(1250.0)));
        assert!((d.floor_ms - 0.02).abs() < 1e-12 && (d.floor_tokens_per_s - 50_000.0).abs() < 1e-6, "{d:?}");
        assert_eq!(d.prefill.median, 3.0);
        // A CPU model has no device timings.
        let cpu = Model::Causal(Box::new(Instant3));
        let Model::Causal(cpu_lm) = &cpu else { unreachable!() };
        assert!(cpu_lm.device().is_none());
        assert!(eager_decode_ms(cpu_lm.as_ref(), &[1, 2], &workload(), 1, &mut clock).unwrap().is_empty());
    }
}
