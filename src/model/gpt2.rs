//! The GPT-2 architecture: learned position embeddings, Conv1D weights stored
//! `[in, out]`, a fused `c_attn` (all q, then all k, then all v), tied head.

use crate::error::{Error, Result};
use crate::scheme::{Linear, StoredTensor, TensorRole, TensorSink};
use crate::tensor;
use crate::tensor::attention::{AttentionShape, KvCache, Masking};

use super::decoder::{self, FusedBlock, FusedBlockOps};
use super::embedding::Embedding;
use super::norm::Norm;
use super::plan::{DecoderPlan, PositionPlan};
use super::{ArchInfo, ArchKind, CausalLm, ConfigJson, Logits, Model, TensorKind, TensorSpec, WeightFactory};

/// The table row for GPT-2.
pub const ARCH: ArchInfo = ArchInfo {
    name: "gpt2",
    model_types: &["gpt2"],
    kind: ArchKind::Causal,
    summary: "GPT-2 decoder: learned positions, Conv1D [in, out] weights, fused c_attn, tied head",
    quantizable: "c_attn, attn.c_proj, c_fc, mlp.c_proj (tied head with quantize_head)",
    tensors: tensor_specs,
    build,
    gguf: None,
};

const EMBED: &str = "wte.weight";
const POSITIONS: &str = "wpe.weight";
const FINAL_NORM: &str = "ln_f";

#[derive(Debug, Clone)]
struct Gpt2Config {
    vocab: usize,
    hidden: usize,
    inner: usize,
    layers: usize,
    heads: usize,
    positions: usize,
    eps: f32,
    /// `gelu_new`/`gelu_pytorch_tanh` (tanh form) or `gelu` (erf form).
    tanh_gelu: bool,
}

impl Gpt2Config {
    fn parse(config: &ConfigJson) -> Result<Self> {
        let hidden = config.usize_first(&["n_embd", "hidden_size"])?;
        let heads = config.usize_first(&["n_head", "num_attention_heads"])?;
        if hidden % heads != 0 {
            let found = serde_json::json!(heads);
            return Err(config.unsupported("n_head", &found, &format!("a divisor of n_embd ({hidden})")));
        }
        let tanh_gelu = match config.str("activation_function").unwrap_or("gelu_new") {
            "gelu_new" | "gelu_pytorch_tanh" => true,
            "gelu" => false,
            _ => {
                let found = config.get("activation_function").cloned().unwrap_or_default();
                return Err(config.unsupported(
                    "activation_function",
                    &found,
                    "gelu_new, gelu_pytorch_tanh or gelu",
                ));
            }
        };
        for (key, supported) in [
            ("scale_attn_weights", true),
            ("scale_attn_by_inverse_layer_idx", false),
            ("reorder_and_upcast_attn", false),
        ] {
            if config.bool_or(key, supported)? != supported {
                let found = serde_json::json!(!supported);
                return Err(config.unsupported(key, &found, &supported.to_string()));
            }
        }
        Ok(Gpt2Config {
            vocab: config.usize("vocab_size")?,
            hidden,
            inner: config.usize_or("n_inner", 4 * hidden)?,
            layers: config.usize_first(&["n_layer", "num_hidden_layers"])?,
            heads,
            positions: config.usize_first(&["n_positions", "max_position_embeddings"])?,
            eps: config.epsilon_or("layer_norm_epsilon", 1e-5)?,
            tanh_gelu,
        })
    }

    /// (name, out features, in features) of block `i`'s layers; the checkpoint stores
    /// each weight as `[in, out]`.
    fn linears(&self, i: usize) -> Vec<(String, usize, usize)> {
        let (p, h, m) = (format!("h.{i}"), self.hidden, self.inner);
        vec![
            (format!("{p}.attn.c_attn"), 3 * h, h),
            (format!("{p}.attn.c_proj"), h, h),
            (format!("{p}.mlp.c_fc"), m, h),
            (format!("{p}.mlp.c_proj"), h, m),
        ]
    }

    fn norms(&self, i: usize) -> [String; 2] {
        [format!("h.{i}.ln_1"), format!("h.{i}.ln_2")]
    }
}

fn tensor_specs(config: &ConfigJson) -> Result<Vec<TensorSpec>> {
    let c = Gpt2Config::parse(config)?;
    let dense =
        |name: &str, shape: Vec<usize>| TensorSpec { name: name.into(), shape, kind: TensorKind::Dense };
    let mut specs =
        vec![dense(EMBED, vec![c.vocab, c.hidden]), dense(POSITIONS, vec![c.positions, c.hidden])];
    for i in 0..c.layers {
        for norm in c.norms(i) {
            specs.extend(Norm::specs(&norm, c.hidden));
        }
        for (name, rows, cols) in c.linears(i) {
            // Conv1D: stored [in, out].
            specs.extend(TensorSpec::linear(&name, [cols, rows], rows, true));
        }
    }
    specs.extend(Norm::specs(FINAL_NORM, c.hidden));
    Ok(specs)
}

/// A built GPT-2 model.
pub struct Gpt2 {
    config: Gpt2Config,
    embed: Embedding,
    positions: Vec<f32>,
    blocks: Vec<FusedBlock>,
    final_norm: Norm,
    head: Option<Box<dyn Linear>>,
}

fn build(config: &ConfigJson, factory: &mut dyn WeightFactory) -> Result<Model> {
    let c = Gpt2Config::parse(config)?;
    let h = c.hidden;
    let embed = factory.embedding(EMBED, c.vocab, h)?;
    let positions = factory.dense(POSITIONS, &[c.positions, h])?;
    // Conv1D: every weight is stored [in, out].
    let blocks = (0..c.layers)
        .map(|i| FusedBlock::load(factory, c.norms(i), h, c.linears(i), true))
        .collect::<Result<_>>()?;
    let final_norm = Norm::load(factory, FINAL_NORM, h)?;
    let head = factory.head(Some(EMBED), c.vocab, h)?;
    Ok(Model::Causal(Box::new(Gpt2 { config: c, embed, positions, blocks, final_norm, head })))
}

impl Gpt2 {
    fn ops(&self) -> FusedBlockOps<'static> {
        FusedBlockOps {
            eps: self.config.eps,
            // Per token: [q (all heads) | k | v].
            qkv_run: self.config.hidden,
            masking: Masking::CAUSAL,
            gelu: if self.config.tanh_gelu { tensor::gelu_tanh_in_place } else { tensor::gelu_erf_in_place },
        }
    }
}

impl CausalLm for Gpt2 {
    fn vocab_size(&self) -> usize {
        self.config.vocab
    }

    fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        let c = &self.config;
        let shape = AttentionShape { heads: c.heads, kv_heads: c.heads, head_dim: c.hidden / c.heads };
        KvCache::new(c.layers, batch, shape, capacity)
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
        let (start, h) = (cache.len(), self.config.hidden);
        if start + seq > self.config.positions {
            return Err(Error::Workload(format!(
                "position {} is beyond GPT-2's {} learned positions (n_positions)",
                start + seq - 1,
                self.config.positions
            )));
        }
        let mut hidden = self.embed.rows(tokens)?;
        for (row, x) in hidden.chunks_exact_mut(h).enumerate() {
            let pos = start + row % seq;
            tensor::add_in_place(x, &self.positions[pos * h..(pos + 1) * h]);
        }
        let ops = self.ops();
        for (i, block) in self.blocks.iter().enumerate() {
            block.forward(i, &mut hidden, rows, seq, cache, &ops);
            observe(i, &hidden);
        }
        cache.advance(seq);
        let mut hidden = decoder::select_rows(hidden, seq, h, logits);
        self.final_norm.apply(&mut hidden, self.config.eps);
        Ok(decoder::head_logits(&hidden, self.head.as_deref(), &self.embed))
    }

    fn export_to(&self, sink: &mut TensorSink) {
        let c = &self.config;
        sink(self.embed.stored(EMBED));
        sink(StoredTensor::f32(
            POSITIONS,
            TensorRole::Unquantized,
            vec![c.positions, c.hidden],
            &self.positions,
        ));
        for block in &self.blocks {
            block.export(sink);
        }
        self.final_norm.export(sink);
        if let Some(head) = &self.head {
            head.export(super::factory::HEAD).into_iter().for_each(&mut *sink);
        }
    }

    fn linears(&self) -> Vec<(&str, &dyn Linear)> {
        let blocks = self.blocks.iter().flat_map(FusedBlock::linears);
        blocks.chain(self.head.iter().map(|h| (super::factory::HEAD, h.as_ref()))).collect()
    }

    fn plan(&self) -> Option<DecoderPlan<'_>> {
        let c = &self.config;
        Some(DecoderPlan {
            vocab: c.vocab,
            hidden: c.hidden,
            attention: AttentionShape { heads: c.heads, kv_heads: c.heads, head_dim: c.hidden / c.heads },
            eps: c.eps,
            embed: self.embed.f32_values(),
            embed_norm: None,
            positions: PositionPlan::Learned { table: &self.positions },
            blocks: self.blocks.iter().map(|b| b.plan(c.hidden, c.tanh_gelu)).collect(),
            final_norm: self.final_norm.plan(),
            head: self.head.as_deref(),
        })
    }
}
