//! The Llama architecture (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU,
//! tied or untied head), written once against the linear-layer boundary.

use crate::error::Result;
use crate::scheme::{Linear, StoredTensor, TensorRole, TensorSink};
use crate::tensor::attention::{AttentionShape, KvCache, Masking};
use crate::tensor::{self, Rope, RopeAngles};

use super::decoder;
use super::embedding::Embedding;
use super::plan::{BlockPlan, DecoderPlan, MlpPlan, NormPlan, PositionPlan, QkvPlan};
use super::{
    ArchInfo, ArchKind, CausalLm, ConfigJson, LinearSpec, Logits, Model, TensorKind, TensorSpec,
    WeightFactory,
};

/// The table row for Llama.
pub const ARCH: ArchInfo = ArchInfo {
    name: "llama",
    model_types: &["llama"],
    kind: ArchKind::Causal,
    summary: "Llama / SmolLM2 / Mistral-style decoder: RMSNorm, RoPE, GQA, SwiGLU",
    quantizable: "q/k/v/o_proj, gate/up/down_proj (lm_head with quantize_head)",
    tensors: tensor_specs,
    build,
    gguf: Some(super::gguf::GgufFile::hf_config),
};

/// The table row for Qwen2: the Llama path with biases on q, k and v.
pub const QWEN2: ArchInfo = ArchInfo {
    name: "qwen2",
    model_types: &["qwen2"],
    kind: ArchKind::Causal,
    summary: "Qwen2 / DeepSeek-R1-Distill-Qwen decoder: Llama with q/k/v biases",
    quantizable: "q/k/v/o_proj, gate/up/down_proj (lm_head with quantize_head)",
    tensors: tensor_specs,
    build,
    // Qwen2 GGUFs name their metadata `qwen2.*`; the translation reads Llama's keys.
    gguf: None,
};

/// The hyper-parameters the forward pass needs.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Residual stream width.
    pub hidden: usize,
    /// SwiGLU inner width.
    pub intermediate: usize,
    /// Decoder blocks.
    pub layers: usize,
    /// Attention heads, key/value heads and head dimension.
    pub attention: AttentionShape,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// RoPE base.
    pub rope_theta: f64,
    /// Output head shares the embedding matrix.
    pub tied: bool,
    /// Biases on q, k and v (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o (Llama with `attention_bias`).
    pub o_bias: bool,
}

impl LlamaConfig {
    /// Read from config.json, accepting `rope_theta` at the top level or inside
    /// `rope_parameters` (newer transformers) and rejecting RoPE scaling it cannot do.
    pub fn parse(config: &ConfigJson) -> Result<Self> {
        let hidden = config.usize("hidden_size")?;
        let heads = config.usize("num_attention_heads")?;
        let kv_heads = config.usize_or("num_key_value_heads", heads)?;
        if heads % kv_heads != 0 {
            let found = config.get("num_key_value_heads").cloned().unwrap_or_default();
            return Err(config.unsupported(
                "num_key_value_heads",
                &found,
                &format!("a divisor of num_attention_heads ({heads})"),
            ));
        }
        let head_dim = config.usize_or("head_dim", hidden / heads)?;
        if head_dim % 2 != 0 {
            let found = serde_json::json!(head_dim);
            return Err(config.unsupported("head_dim", &found, "an even number (rotary pairs)"));
        }
        for key in ["rope_scaling.rope_type", "rope_scaling.type", "rope_parameters.rope_type"] {
            if let Some(kind) = config.get(key) {
                if kind.as_str() != Some("default") {
                    return Err(config.unsupported(key, kind, "\"default\" (no RoPE scaling)"));
                }
            }
        }
        let qwen2 = config.str("model_type") == Some("qwen2");
        if qwen2 && config.bool_or("use_sliding_window", false)? {
            let found = serde_json::json!(true);
            return Err(config.unsupported(
                "use_sliding_window",
                &found,
                "false (sliding-window attention is not implemented)",
            ));
        }
        let attention_bias = config.bool_or("attention_bias", false)?;
        Ok(LlamaConfig {
            vocab: config.usize("vocab_size")?,
            hidden,
            intermediate: config.usize("intermediate_size")?,
            layers: config.usize("num_hidden_layers")?,
            attention: AttentionShape { heads, kv_heads, head_dim },
            eps: config.epsilon_or("rms_norm_eps", 1e-6)?,
            rope_theta: config.f64_first(&["rope_theta", "rope_parameters.rope_theta"], 10000.0)?,
            tied: config.bool_or("tie_word_embeddings", false)?,
            qkv_bias: qwen2 || attention_bias,
            o_bias: attention_bias,
        })
    }

    fn q_width(&self) -> usize {
        self.attention.heads * self.attention.head_dim
    }

    fn kv_width(&self) -> usize {
        self.attention.kv_heads * self.attention.head_dim
    }

    /// (name, rows, cols, bias) of every linear layer of block `i`.
    fn block_linears(&self, i: usize) -> Vec<(String, usize, usize, bool)> {
        let p = format!("model.layers.{i}");
        let (h, q, kv, m) = (self.hidden, self.q_width(), self.kv_width(), self.intermediate);
        let (b, ob) = (self.qkv_bias, self.o_bias);
        vec![
            (format!("{p}.self_attn.q_proj"), q, h, b),
            (format!("{p}.self_attn.k_proj"), kv, h, b),
            (format!("{p}.self_attn.v_proj"), kv, h, b),
            (format!("{p}.self_attn.o_proj"), h, q, ob),
            (format!("{p}.mlp.gate_proj"), m, h, false),
            (format!("{p}.mlp.up_proj"), m, h, false),
            (format!("{p}.mlp.down_proj"), h, m, false),
        ]
    }
}

const EMBED: &str = "model.embed_tokens.weight";
const FINAL_NORM: &str = "model.norm.weight";

fn tensor_specs(config: &ConfigJson) -> Result<Vec<TensorSpec>> {
    let c = LlamaConfig::parse(config)?;
    let spec = |name: String, shape: Vec<usize>, kind| TensorSpec { name, shape, kind };
    let mut specs = vec![spec(EMBED.into(), vec![c.vocab, c.hidden], TensorKind::Dense)];
    for i in 0..c.layers {
        let p = format!("model.layers.{i}");
        specs.push(spec(format!("{p}.input_layernorm.weight"), vec![c.hidden], TensorKind::Dense));
        specs.push(spec(format!("{p}.post_attention_layernorm.weight"), vec![c.hidden], TensorKind::Dense));
        for (name, rows, cols, bias) in c.block_linears(i) {
            specs.extend(TensorSpec::linear(&name, [rows, cols], rows, bias));
        }
    }
    specs.push(spec(FINAL_NORM.into(), vec![c.hidden], TensorKind::Dense));
    if !c.tied {
        specs.push(spec("lm_head.weight".into(), vec![c.vocab, c.hidden], TensorKind::Head));
    }
    Ok(specs)
}

struct Block {
    attn_norm: Vec<f32>,
    mlp_norm: Vec<f32>,
    /// q, k, v, o, gate, up, down, with their names.
    linears: Vec<(String, Box<dyn Linear>)>,
}

/// A built Llama model.
pub struct Llama {
    config: LlamaConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    final_norm: Vec<f32>,
    /// `None`: the head is the embedding matrix.
    head: Option<Box<dyn Linear>>,
    rope: Rope,
}

fn build(config: &ConfigJson, factory: &mut dyn WeightFactory) -> Result<Model> {
    let c = LlamaConfig::parse(config)?;
    let embed = factory.embedding(EMBED, c.vocab, c.hidden)?;
    let mut blocks = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        let p = format!("model.layers.{i}");
        let attn_norm = factory.dense(&format!("{p}.input_layernorm.weight"), &[c.hidden])?;
        let mlp_norm = factory.dense(&format!("{p}.post_attention_layernorm.weight"), &[c.hidden])?;
        let linears = c
            .block_linears(i)
            .into_iter()
            .map(|(name, rows, cols, bias)| {
                let layer = factory.linear(LinearSpec::new(&name, rows, cols, bias))?;
                Ok((name, layer))
            })
            .collect::<Result<_>>()?;
        blocks.push(Block { attn_norm, mlp_norm, linears });
    }
    let final_norm = factory.dense(FINAL_NORM, &[c.hidden])?;
    let head = factory.head(c.tied.then_some(EMBED), c.vocab, c.hidden)?;
    let rope = Rope::new(c.attention.head_dim, c.rope_theta);
    Ok(Model::Causal(Box::new(Llama { config: c, embed, blocks, final_norm, head, rope })))
}

impl Llama {
    /// The parsed hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Rotate every head of `x` (`[batch, seq, heads · head_dim]`) for its position.
    fn rotate(&self, x: &mut [f32], heads: usize, seq: usize, start: usize, angles: &RopeAngles) {
        let hd = self.config.attention.head_dim;
        for (row, chunk) in x.chunks_exact_mut(heads * hd).enumerate() {
            let pos = start + row % seq;
            chunk.chunks_exact_mut(hd).for_each(|head| angles.apply(head, pos));
        }
    }

    fn block(
        &self,
        index: usize,
        hidden: &mut [f32],
        (rows, seq): (usize, usize),
        cache: &mut KvCache,
        angles: &RopeAngles,
    ) {
        let c = &self.config;
        let block = &self.blocks[index];
        let layer = |i: usize| block.linears[i].1.as_ref();
        let run = |l: &dyn Linear, x: &[f32]| decoder::run_linear(l, x, rows);

        let mut x = tensor::scratch::take(hidden.len());
        x.copy_from_slice(hidden);
        tensor::rms_norm_rows(&mut x, &block.attn_norm, c.eps);
        let mut q = run(layer(0), &x);
        let mut k = run(layer(1), &x);
        let v = run(layer(2), &x);
        let start = cache.len();
        self.rotate(&mut q, c.attention.heads, seq, start, angles);
        self.rotate(&mut k, c.attention.kv_heads, seq, start, angles);
        cache.append(index, &k, &v, seq);
        let mut attn = tensor::scratch::take(q.len());
        cache.attend(index, &q, seq, Masking::CAUSAL, &mut attn);
        let projected = run(layer(3), &attn);
        tensor::add_in_place(hidden, &projected);

        let mut x2 = x;
        x2.copy_from_slice(hidden);
        tensor::rms_norm_rows(&mut x2, &block.mlp_norm, c.eps);
        let mut gate = run(layer(4), &x2);
        let up = run(layer(5), &x2);
        tensor::silu_mul_in_place(&mut gate, &up);
        let down = run(layer(6), &gate);
        tensor::add_in_place(hidden, &down);
        [q, k, v, attn, projected, x2, gate, up, down].into_iter().for_each(tensor::scratch::recycle);
    }
}

impl CausalLm for Llama {
    fn vocab_size(&self) -> usize {
        self.config.vocab
    }

    fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        KvCache::new(self.config.layers, batch, self.config.attention, capacity)
    }

    fn forward_observed(
        &self,
        tokens: &[u32],
        batch: usize,
        cache: &mut KvCache,
        logits: Logits,
        observe: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Vec<f32>> {
        let (rows, seq) = decoder::check_batch(tokens, batch, cache)?;
        let mut hidden = self.embed.rows(tokens)?;
        let angles = self.rope.angles(cache.len()..cache.len() + seq);
        for i in 0..self.blocks.len() {
            tensor::awake::keep_awake();
            self.block(i, &mut hidden, (rows, seq), cache, &angles);
            observe(i, &hidden);
        }
        cache.advance(seq);
        let mut hidden = decoder::select_rows(hidden, seq, self.config.hidden, logits);
        tensor::rms_norm_rows(&mut hidden, &self.final_norm, self.config.eps);
        Ok(decoder::head_logits(&hidden, self.head.as_deref(), &self.embed))
    }

    fn export_to(&self, sink: &mut TensorSink) {
        let c = &self.config;
        let dense = |name: String, shape: Vec<usize>, data: &[f32]| {
            StoredTensor::f32(name, TensorRole::Unquantized, shape, data)
        };
        sink(self.embed.stored(EMBED));
        for (i, block) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{i}");
            sink(dense(format!("{p}.input_layernorm.weight"), vec![c.hidden], &block.attn_norm));
            sink(dense(format!("{p}.post_attention_layernorm.weight"), vec![c.hidden], &block.mlp_norm));
            for (name, linear) in &block.linears {
                linear.export(name).into_iter().for_each(&mut *sink);
            }
        }
        sink(dense(FINAL_NORM.into(), vec![c.hidden], &self.final_norm));
        if let Some(head) = &self.head {
            head.export(super::factory::HEAD).into_iter().for_each(&mut *sink);
        }
    }

    fn linears(&self) -> Vec<(&str, &dyn Linear)> {
        let blocks = self.blocks.iter().flat_map(|b| b.linears.iter().map(|(n, l)| (n.as_str(), l.as_ref())));
        blocks.chain(self.head.iter().map(|h| (super::factory::HEAD, h.as_ref()))).collect()
    }

    fn plan(&self) -> Option<DecoderPlan<'_>> {
        let c = &self.config;
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                let layer = |i: usize| b.linears[i].1.as_ref();
                BlockPlan {
                    attn_norm: NormPlan::Rms { weight: &b.attn_norm },
                    qkv: QkvPlan::Separate { q: layer(0), k: layer(1), v: layer(2) },
                    out: layer(3),
                    mlp_norm: NormPlan::Rms { weight: &b.mlp_norm },
                    mlp: MlpPlan::GatedSilu { gate: layer(4), up: layer(5), down: layer(6) },
                }
            })
            .collect();
        Some(DecoderPlan {
            vocab: c.vocab,
            hidden: c.hidden,
            attention: c.attention,
            eps: c.eps,
            embed: self.embed.f32_values(),
            embed_norm: None,
            positions: PositionPlan::Rotary { inv_freq: self.rope.inv_freq_f32() },
            blocks,
            final_norm: NormPlan::Rms { weight: &self.final_norm },
            head: self.head.as_deref(),
        })
    }
}
