//! Models: loading checkpoints and tokenizers, the architecture registry, and the
//! weight factories that put a scheme's linear layers into an architecture.

pub mod bert;
pub mod bloom;
pub mod builtin;
pub mod config;
mod decoder;
pub mod embedding;
pub use decoder::check_batch;
mod factory;
pub mod generate;
pub mod gguf;
pub mod gpt2;
pub mod hub;
pub mod hub_download;
pub mod llama;
mod norm;
mod pages;
pub mod plan;
pub mod sentence;
pub mod tokenizer;
pub mod weights;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::scheme::{Linear, StoredTensor, TensorSink};
use crate::tensor::attention::KvCache;
pub use config::ConfigJson;
pub use factory::{LinearSpec, QuantizeFactory, ReloadFactory, WeightFactory};
use tokenizer::TextTokenizer;
use weights::WeightStore;

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position: `[batch, seq, vocab]` (evaluation).
    All,
    /// The last position of each sequence: `[batch, vocab]` (generation, prefill timing).
    Last,
}

/// A decoder-only language model, whatever its architecture and scheme.
pub trait CausalLm: Send + Sync {
    /// Vocabulary size (logits per position).
    fn vocab_size(&self) -> usize;
    /// An empty key/value cache for `batch` sequences of up to `capacity` positions.
    fn new_cache(&self, batch: usize, capacity: usize) -> KvCache;
    /// Run `tokens` (`[batch, seq]`, row-major) after what `cache` holds; returns logits.
    fn forward(&self, tokens: &[u32], batch: usize, cache: &mut KvCache, logits: Logits) -> Result<Vec<f32>> {
        self.forward_observed(tokens, batch, cache, logits, &mut |_, _| {})
    }
    /// [`CausalLm::forward`], calling `observe(block, hidden)` with the hidden states
    /// (`[batch·seq, hidden]`) after each block.
    fn forward_observed(
        &self,
        tokens: &[u32],
        batch: usize,
        cache: &mut KvCache,
        logits: Logits,
        observe: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Vec<f32>>;
    /// Every tensor of the model as stored, one at a time into `sink` (the byte account
    /// and the saved file take them as they come: no second copy of the model).
    fn export_to(&self, sink: &mut TensorSink);
    /// Every tensor of the model as stored, collected.
    fn export(&self) -> Vec<StoredTensor> {
        let mut out = Vec::new();
        self.export_to(&mut |t| out.push(t));
        out
    }
    /// Every linear layer with its name, the output head included when it is one.
    fn linears(&self) -> Vec<(&str, &dyn Linear)>;
    /// The kernel paths its forward passes take (recorded per case).
    fn kernels(&self) -> BTreeSet<&'static str> {
        self.linears().into_iter().map(|(_, l)| l.kernel()).collect()
    }
    /// What each linear layer observed while running (e.g. LLM.int8()'s outlier-column
    /// fraction), by layer name; layers with nothing to report are left out.
    fn layer_stats(&self) -> Vec<(String, Vec<(&'static str, f64)>)> {
        let layers = self.linears().into_iter().map(|(name, l)| (name.to_string(), l.stats()));
        layers.filter(|(_, s)| !s.is_empty()).collect()
    }
    /// The device hooks of a model whose forward passes run on a device; `None` on the CPU.
    fn device(&self) -> Option<&dyn DeviceLm> {
        None
    }
    /// The forward pass as a device-neutral description, for backends other than the
    /// CPU; `None` where the architecture has none yet.
    fn plan(&self) -> Option<plan::DecoderPlan<'_>> {
        None
    }
}

/// The hooks of a decoder whose forward passes run on a device (the CUDA backend's, or a
/// test's mock): what the device measured, and how decode steps are launched.
pub trait DeviceLm {
    /// What the model reports about itself.
    fn report(&self) -> DeviceReport;
    /// Capture decode steps (one token per sequence) in a graph and replay them (`on`), or
    /// launch each step's kernels one by one; returns the previous setting.
    fn set_decode_graph(&self, on: bool) -> bool;
}

/// What a model running on a device reports about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReport {
    /// Device milliseconds of the last forward pass, from the device's own events.
    pub last_forward_ms: Option<f64>,
    /// Why decode steps fell back to eager launches although the decode graph was on (its
    /// capture failed), when they did.
    pub decode_graph_failed: Option<String>,
    /// Bytes of weights a decode step reads: every linear layer's device representation
    /// and the output head (the tied embedding matrix when the head is tied).
    pub weight_bytes_per_token: u64,
}

/// A bidirectional encoder (BERT): hidden states for every position, pooled into
/// sentence embeddings by the caller.
pub trait Encoder: Send + Sync {
    /// Width of the hidden states.
    fn hidden_size(&self) -> usize;
    /// Longest sequence the position embeddings cover.
    fn max_positions(&self) -> usize;
    /// Last hidden states `[batch, seq, hidden]` of `tokens` (`[batch, seq]`), where `mask`
    /// (`[batch, seq]`) is 1 for real tokens and 0 for padding.
    fn encode(&self, tokens: &[u32], mask: &[u8], batch: usize) -> Result<Vec<f32>> {
        self.encode_observed(tokens, mask, batch, &mut |_, _| {})
    }
    /// [`Encoder::encode`], calling `observe(layer, hidden)` after each layer.
    fn encode_observed(
        &self,
        tokens: &[u32],
        mask: &[u8],
        batch: usize,
        observe: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Vec<f32>>;
    /// Every tensor of the model as stored, one at a time into `sink`.
    fn export_to(&self, sink: &mut TensorSink);
    /// Every tensor of the model as stored, collected.
    fn export(&self) -> Vec<StoredTensor> {
        let mut out = Vec::new();
        self.export_to(&mut |t| out.push(t));
        out
    }
    /// Every linear layer with its name.
    fn linears(&self) -> Vec<(&str, &dyn Linear)>;
}

/// A built model of either kind.
pub enum Model {
    /// A decoder: next-token logits, a KV cache, generation.
    Causal(Box<dyn CausalLm>),
    /// An encoder: hidden states and sentence embeddings.
    Encoder(Box<dyn Encoder>),
}

impl Model {
    /// Every tensor of the model as stored, collected.
    pub fn export(&self) -> Vec<StoredTensor> {
        match self {
            Model::Causal(m) => m.export(),
            Model::Encoder(m) => m.export(),
        }
    }

    /// Every tensor of the model as stored, one at a time into `sink`.
    pub fn export_to(&self, sink: &mut TensorSink) {
        match self {
            Model::Causal(m) => m.export_to(sink),
            Model::Encoder(m) => m.export_to(sink),
        }
    }

    /// Every linear layer with its name.
    pub fn linears(&self) -> Vec<(&str, &dyn Linear)> {
        match self {
            Model::Causal(m) => m.linears(),
            Model::Encoder(m) => m.linears(),
        }
    }

    /// What each linear layer observed while running, by layer name (see
    /// [`CausalLm::layer_stats`]).
    pub fn layer_stats(&self) -> Vec<(String, Vec<(&'static str, f64)>)> {
        match self {
            Model::Causal(m) => m.layer_stats(),
            Model::Encoder(m) => {
                let layers = m.linears().into_iter().map(|(name, l)| (name.to_string(), l.stats()));
                layers.filter(|(_, s)| !s.is_empty()).collect()
            }
        }
    }

    /// The kernel paths its layers run.
    pub fn kernels(&self) -> BTreeSet<&'static str> {
        match self {
            Model::Causal(m) => m.kernels(),
            Model::Encoder(m) => m.linears().into_iter().map(|(_, l)| l.kernel()).collect(),
        }
    }

    /// The decoder, or an error naming what was asked of an encoder.
    pub fn causal(&self, for_what: &str) -> Result<&dyn CausalLm> {
        match self {
            Model::Causal(m) => Ok(m.as_ref()),
            Model::Encoder(_) => Err(Error::Workload(format!(
                "{for_what} needs a causal language model; this model is an encoder (use `bench embed`)"
            ))),
        }
    }

    /// The encoder, or an error naming what was asked of a decoder.
    pub fn encoder(&self, for_what: &str) -> Result<&dyn Encoder> {
        match self {
            Model::Encoder(m) => Ok(m.as_ref()),
            Model::Causal(_) => Err(Error::Workload(format!(
                "{for_what} needs an encoder; this model is a causal language model (use `bench generate`)"
            ))),
        }
    }
}

/// Whether an architecture is a decoder or an encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchKind {
    /// Next-token prediction.
    Causal,
    /// Bidirectional encoding.
    Encoder,
}

/// What a tensor of an architecture is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorKind {
    /// Kept in full precision (embeddings, norms).
    Dense,
    /// The weight of a linear layer that schemes quantize.
    Linear,
    /// The output head's weight (quantized only when asked).
    Head,
    /// The bias of a linear layer.
    Bias,
}

/// One tensor an architecture expects in a checkpoint.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    /// Canonical name (Hugging Face's, with the `model.` prefix where it has one).
    pub name: String,
    /// Expected shape.
    pub shape: Vec<usize>,
    /// Role at the quantization boundary.
    pub kind: TensorKind,
}

impl TensorSpec {
    /// The tensors of linear layer `name`: its weight as the checkpoint stores it
    /// (`stored_shape`), and its bias of `rows` values when it has one.
    pub fn linear(name: &str, stored_shape: [usize; 2], rows: usize, bias: bool) -> Vec<TensorSpec> {
        let weight = TensorSpec {
            name: format!("{name}.weight"),
            shape: stored_shape.to_vec(),
            kind: TensorKind::Linear,
        };
        let bias = bias.then(|| TensorSpec {
            name: format!("{name}.bias"),
            shape: vec![rows],
            kind: TensorKind::Bias,
        });
        std::iter::once(weight).chain(bias).collect()
    }
}

/// One row of the architecture table.
pub struct ArchInfo {
    /// Name in `bench list archs`.
    pub name: &'static str,
    /// `model_type` values of config.json that select it.
    pub model_types: &'static [&'static str],
    /// Decoder or encoder.
    pub kind: ArchKind,
    /// One line for `bench list`.
    pub summary: &'static str,
    /// Which tensors schemes quantize, for the list and the docs.
    pub quantizable: &'static str,
    /// Every tensor the config implies.
    pub tensors: fn(&ConfigJson) -> Result<Vec<TensorSpec>>,
    /// Build the model, taking each tensor from the factory.
    pub build: fn(&ConfigJson, &mut dyn WeightFactory) -> Result<Model>,
    /// How a GGUF file whose `general.architecture` is one of `model_types` becomes a
    /// config.json; `None`: GGUF files of this architecture are refused.
    pub gguf: Option<fn(&gguf::GgufFile) -> Result<serde_json::Value>>,
}

/// Every architecture the harness runs.
pub static ARCHS: &[ArchInfo] = &[llama::ARCH, llama::QWEN2, bloom::ARCH, gpt2::ARCH, bert::ARCH];

/// The architecture whose `model_type` is `model_type`.
pub fn arch_for(config: &ConfigJson) -> Result<&'static ArchInfo> {
    let model_type = config.get("model_type").cloned().unwrap_or(serde_json::Value::Null);
    let name = model_type.as_str().unwrap_or("");
    ARCHS.iter().find(|a| a.model_types.contains(&name)).ok_or_else(|| {
        let known: Vec<_> = ARCHS.iter().flat_map(|a| a.model_types.iter().copied()).collect();
        config.unsupported("model_type", &model_type, &format!("one of: {}", known.join(", ")))
    })
}

/// A model on disk, opened and checked but not yet built: config, architecture,
/// memory-mapped weights and tokenizer.
pub struct ModelFiles {
    /// The model directory.
    pub dir: PathBuf,
    /// Its config.json.
    pub config: ConfigJson,
    /// Its architecture.
    pub arch: &'static ArchInfo,
    /// Its weights.
    pub store: WeightStore,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// sentence-transformers' settings beside it (`sentence_bert_config.json`), if any.
    pub sentence: Option<sentence::SentenceConfig>,
}

/// Summary of a model for `inspect` and results.json.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    /// Architecture name.
    pub arch: String,
    /// Parameters in the tensors the architecture uses.
    pub parameters: usize,
    /// Parameters inside the quantization boundary (linear layers).
    pub linear_parameters: usize,
    /// Stored dtypes and how many tensors use each.
    pub dtypes: Vec<(String, usize)>,
    /// Bytes as stored, by tensor kind.
    pub stored_bytes: Vec<(String, usize)>,
    /// Tensors in the checkpoint the architecture does not use (skipped by name).
    pub skipped: Vec<String>,
    /// Vocabulary size of the tokenizer.
    pub tokenizer_vocab: usize,
}

/// The models `scripts/fetch_models.sh` installs under `.cache/models/NAME`.
const FETCHABLE_MODELS: [&str; 2] = ["smollm2", "minilm"];

/// The name `scripts/fetch_models.sh` knows a missing model path by, when the path lies in
/// its `.cache/models/NAME` folder.
fn fetchable_model(path: &Path) -> Option<&'static str> {
    let parts: Vec<_> = path.components().map(|c| c.as_os_str().to_string_lossy()).collect();
    parts.windows(3).find_map(|w| {
        (w[0] == ".cache" && w[1] == "models")
            .then(|| FETCHABLE_MODELS.iter().find(|&&m| w[2] == m))
            .flatten()
            .copied()
    })
}

impl ModelFiles {
    /// Open the model directory `dir` and check every tensor the config implies against
    /// the checkpoint (names, shapes, float types), without reading tensor data.
    pub fn open(dir: &Path) -> Result<Self> {
        if dir.is_file() && dir.extension().is_some_and(|e| e == "gguf") {
            return Self::open_gguf(dir);
        }
        if !dir.is_dir() {
            let expected = format!(
                "expected a Hugging Face model directory (config.json, model.safetensors, \
                 tokenizer.json), a .gguf file, or a built-in model ({})",
                builtin::names().join(", ")
            );
            let hint = match fetchable_model(dir) {
                Some(name) => {
                    format!("{expected}; this is where `scripts/fetch_models.sh {name}` puts it: run that")
                }
                None => expected,
            };
            return Err(Error::ModelMissing { what: "directory", path: dir.to_path_buf(), hint });
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::ModelMissing {
                what: "config",
                path: config_path,
                hint: "expected config.json in the model directory".into(),
            });
        }
        let config = ConfigJson::read(&config_path)?;
        let arch = arch_for(&config)?;
        let store = WeightStore::open_dir(dir)?;
        let tokenizer = TextTokenizer::load(&dir.join("tokenizer.json"))?;
        let sentence = sentence::read(dir)?;
        let files = ModelFiles { dir: dir.to_path_buf(), config, arch, store, tokenizer, sentence };
        files.check_tensors()?;
        Ok(files)
    }

    /// Open a GGUF file: config, tokenizer and tensors all come from it.
    fn open_gguf(path: &Path) -> Result<Self> {
        let gguf = gguf::GgufFile::open(path)?;
        let found = gguf.architecture().unwrap_or_default();
        let readable = || ARCHS.iter().filter(|a| a.gguf.is_some());
        let (arch, translate) =
            readable().find(|a| a.model_types.contains(&found)).and_then(|a| Some((a, a.gguf?))).ok_or_else(
                || {
                    let names: Vec<_> = readable().flat_map(|a| a.model_types.iter().copied()).collect();
                    Error::ModelFormat {
                        path: path.to_path_buf(),
                        message: format!(
                            "general.architecture is {found:?}, expected one this reader translates from GGUF: {}",
                            names.join(", ")
                        ),
                    }
                },
            )?;
        let config = ConfigJson::from_value(path.to_path_buf(), translate(&gguf)?);
        let tokenizer = TextTokenizer::from_text(&gguf.tokenizer_json()?.to_string(), path)?;
        let store = WeightStore::open_gguf(gguf);
        let files = ModelFiles { dir: path.to_path_buf(), config, arch, store, tokenizer, sentence: None };
        files.check_tensors()?;
        Ok(files)
    }

    /// The tensors the architecture expects, each checked against the checkpoint.
    pub fn check_tensors(&self) -> Result<Vec<TensorSpec>> {
        let specs = (self.arch.tensors)(&self.config)?;
        for spec in &specs {
            let entry = self.store.entry(&spec.name)?;
            if entry.shape != spec.shape {
                return Err(Error::Tensor {
                    name: spec.name.clone(),
                    message: format!(
                        "shape {} does not match {} (expected {})",
                        crate::error::dims_text(&entry.shape),
                        self.config.path().display(),
                        crate::error::dims_text(&spec.shape)
                    ),
                });
            }
            if !entry.stored.is_computable() {
                return Err(Error::Tensor {
                    name: spec.name.clone(),
                    message: format!("dtype {}, expected F32, F16 or BF16", entry.stored.name()),
                });
            }
        }
        let vocab = self.config.usize("vocab_size")?;
        if self.tokenizer.vocab_size() > vocab {
            return Err(Error::Tokenizer {
                path: self.tokenizer.path().to_path_buf(),
                message: format!(
                    "{} tokens, more than the model's vocab_size {vocab}",
                    self.tokenizer.vocab_size()
                ),
            });
        }
        Ok(specs)
    }

    /// The longest sequence the model is made for, with the config key that says so
    /// (`max_position_embeddings`, GPT-2's `n_positions`, BLOOM's `seq_length`); `None`
    /// when the config names no limit.
    pub fn max_positions(&self) -> Option<(usize, &'static str)> {
        ["max_position_embeddings", "n_positions", "seq_length"]
            .into_iter()
            .find_map(|key| self.config.get(key).and_then(|v| v.as_u64()).map(|n| (n as usize, key)))
    }

    /// The most tokens an encoder input keeps, special tokens included, and why: the
    /// sentence-transformers `max_seq_length` when the folder has one (what users of the
    /// library get), else the encoder's position embeddings.
    pub fn encoder_limit(&self, max_positions: usize) -> (usize, String) {
        match &self.sentence {
            Some(s) if s.max_seq_length <= max_positions => {
                (s.max_seq_length, format!("max_seq_length in {}", s.source.display()))
            }
            _ => (max_positions, "max_position_embeddings".into()),
        }
    }

    /// An error when `positions` tokens (`what`: where they come from) exceed
    /// [`ModelFiles::max_positions`].
    pub fn check_positions(&self, positions: usize, what: &str) -> Result<()> {
        match self.max_positions() {
            Some((limit, key)) if positions > limit => Err(Error::Config {
                path: self.config.path().to_path_buf(),
                message: format!("{what} is {positions} positions, more than the model's {key} ({limit})"),
            }),
            _ => Ok(()),
        }
    }

    /// Every float tensor checked for NaN and infinity, one at a time (at most the largest
    /// tensor as f32 in memory): `bench validate` finds what building the model would.
    pub fn check_finite_weights(&self) -> Result<()> {
        for (name, entry) in self.store.entries() {
            if entry.stored.is_computable() {
                factory::non_finite_weight(name, &self.store.f32(name, &entry.shape)?, "")?;
            }
        }
        Ok(())
    }

    /// The padding token id (`pad_token_id` of config.json, else 0).
    pub fn pad_id(&self) -> u32 {
        self.config.get("pad_token_id").and_then(|v| v.as_u64()).unwrap_or(0) as u32
    }

    /// Build the model through `factory`.
    pub fn build(&self, factory: &mut dyn WeightFactory) -> Result<Model> {
        (self.arch.build)(&self.config, factory)
    }

    /// The precision the checkpoint stores its linear weights in: `BF16` or `F16` when
    /// every one is that type, else `F32` (f32, mixed, or block-quantized GGUF weights).
    /// A suite's `dtype: auto` (the default) holds the reference at this precision.
    pub fn stored_precision(&self) -> Result<crate::scheme::FloatStorage> {
        use crate::scheme::FloatStorage;
        let mut found = None;
        for spec in self.check_tensors()?.iter().filter(|s| s.kind == TensorKind::Linear) {
            let precision = self.store.entry(&spec.name)?.stored.precision();
            if precision == FloatStorage::F32 {
                return Ok(FloatStorage::F32);
            }
            if found.is_some_and(|f| f != precision) {
                return Ok(FloatStorage::F32);
            }
            found = Some(precision);
        }
        Ok(found.unwrap_or(FloatStorage::F32))
    }

    /// Parameter counts, dtypes and stored bytes.
    pub fn summary(&self) -> Result<ModelSummary> {
        let specs = self.check_tensors()?;
        let mut dtypes = std::collections::BTreeMap::<String, usize>::new();
        let mut bytes = std::collections::BTreeMap::<String, usize>::new();
        let (mut parameters, mut linear_parameters) = (0, 0);
        for spec in &specs {
            let entry = self.store.entry(&spec.name)?;
            let count: usize = spec.shape.iter().product();
            parameters += count;
            if spec.kind == TensorKind::Linear {
                linear_parameters += count;
            }
            *dtypes.entry(entry.stored.name()).or_default() += 1;
            let kind = format!("{:?}", spec.kind).to_lowercase();
            *bytes.entry(kind).or_default() += entry.bytes as usize;
        }
        let used: BTreeSet<&str> = specs.iter().filter_map(|s| self.store.resolve(&s.name)).collect();
        let skipped = self.store.names().filter(|n| !used.contains(n)).map(String::from).collect();
        Ok(ModelSummary {
            arch: self.arch.name.to_string(),
            parameters,
            linear_parameters,
            dtypes: dtypes.into_iter().collect(),
            stored_bytes: bytes.into_iter().collect(),
            skipped,
            tokenizer_vocab: self.tokenizer.vocab_size(),
        })
    }
}

/// Resolve a suite's or command line's model path: a built-in name (`builtin:NAME`) is
/// generated into the cache on first use; an existing path is used as is; `org/name`
/// that is no path is a Hugging Face hub model (see [`hub`]).
pub fn resolve_model_path(spec: &str, base: &Path) -> Result<PathBuf> {
    if let Some(name) = spec.strip_prefix(builtin::PREFIX) {
        return builtin::ensure(name);
    }
    let path = Path::new(spec);
    let path = if path.is_absolute() { path.to_path_buf() } else { base.join(path) };
    if !path.exists() && hub::looks_like_repo(spec) {
        // `models/x` may be a folder that is missing as well as a hub id: say both.
        return hub::resolve(spec).map_err(|e| {
            e.context(format!("no folder {} exists, so `{spec}` was read as a hub id", path.display()))
        });
    }
    Ok(path)
}
