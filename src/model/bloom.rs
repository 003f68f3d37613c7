//! The BLOOM architecture: embedding LayerNorm, ALiBi attention biases, a fused
//! `query_key_value` with per-head interleaved q/k/v, tanh GELU, a tied head.

use crate::error::Result;
use crate::scheme::{Linear, TensorSink};
use crate::tensor;
use crate::tensor::attention::{AttentionShape, KvCache, Masking};

use super::decoder::{self, FusedBlock, FusedBlockOps};
use super::embedding::Embedding;
use super::norm::Norm;
use super::plan::{DecoderPlan, PositionPlan};
use super::{ArchInfo, ArchKind, CausalLm, ConfigJson, Logits, Model, TensorKind, TensorSpec, WeightFactory};

/// The table row for BLOOM.
pub const ARCH: ArchInfo = ArchInfo {
    name: "bloom",
    model_types: &["bloom"],
    kind: ArchKind::Causal,
    summary: "BLOOM decoder: ALiBi, fused per-head q/k/v, LayerNorm, tanh GELU, tied head",
    quantizable: "query_key_value, dense, dense_h_to_4h, dense_4h_to_h (tied head with quantize_head)",
    tensors: tensor_specs,
    build,
    gguf: None,
};

const EMBED: &str = "word_embeddings.weight";
const EMBED_NORM: &str = "word_embeddings_layernorm";
const FINAL_NORM: &str = "ln_f";

#[derive(Debug, Clone)]
struct BloomConfig {
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    eps: f32,
}

impl BloomConfig {
    fn parse(config: &ConfigJson) -> Result<Self> {
        let hidden = config.usize_first(&["hidden_size", "n_embed"])?;
        let heads = config.usize_first(&["n_head", "num_attention_heads"])?;
        if hidden % heads != 0 {
            let found = serde_json::json!(heads);
            return Err(config.unsupported(
                "n_head",
                &found,
                &format!("a divisor of hidden_size ({hidden})"),
            ));
        }
        if config.bool_or("apply_residual_connection_post_layernorm", false)? {
            let found = serde_json::json!(true);
            return Err(config.unsupported("apply_residual_connection_post_layernorm", &found, "false"));
        }
        Ok(BloomConfig {
            vocab: config.usize("vocab_size")?,
            hidden,
            layers: config.usize_first(&["n_layer", "num_hidden_layers"])?,
            heads,
            eps: config.epsilon_or("layer_norm_epsilon", 1e-5)?,
        })
    }

    fn linears(&self, i: usize) -> Vec<(String, usize, usize)> {
        let (p, h) = (format!("h.{i}"), self.hidden);
        vec![
            (format!("{p}.self_attention.query_key_value"), 3 * h, h),
            (format!("{p}.self_attention.dense"), h, h),
            (format!("{p}.mlp.dense_h_to_4h"), 4 * h, h),
            (format!("{p}.mlp.dense_4h_to_h"), h, 4 * h),
        ]
    }

    fn norms(&self, i: usize) -> [String; 2] {
        [format!("h.{i}.input_layernorm"), format!("h.{i}.post_attention_layernorm")]
    }
}

fn tensor_specs(config: &ConfigJson) -> Result<Vec<TensorSpec>> {
    let c = BloomConfig::parse(config)?;
    let mut specs =
        vec![TensorSpec { name: EMBED.into(), shape: vec![c.vocab, c.hidden], kind: TensorKind::Dense }];
    specs.extend(Norm::specs(EMBED_NORM, c.hidden));
    for i in 0..c.layers {
        for norm in c.norms(i) {
            specs.extend(Norm::specs(&norm, c.hidden));
        }
        for (name, rows, cols) in c.linears(i) {
            specs.extend(TensorSpec::linear(&name, [rows, cols], rows, true));
        }
    }
    specs.extend(Norm::specs(FINAL_NORM, c.hidden));
    Ok(specs)
}

/// A built BLOOM model.
pub struct Bloom {
    config: BloomConfig,
    embed: Embedding,
    embed_norm: Norm,
    blocks: Vec<FusedBlock>,
    final_norm: Norm,
    head: Option<Box<dyn Linear>>,
    slopes: Vec<f32>,
}

fn build(config: &ConfigJson, factory: &mut dyn WeightFactory) -> Result<Model> {
    let c = BloomConfig::parse(config)?;
    let h = c.hidden;
    let embed = factory.embedding(EMBED, c.vocab, h)?;
    let embed_norm = Norm::load(factory, EMBED_NORM, h)?;
    let blocks = (0..c.layers)
        .map(|i| FusedBlock::load(factory, c.norms(i), h, c.linears(i), false))
        .collect::<Result<_>>()?;
    let final_norm = Norm::load(factory, FINAL_NORM, h)?;
    let head = factory.head(Some(EMBED), c.vocab, h)?;
    let slopes = tensor::alibi_slopes(c.heads);
    Ok(Model::Causal(Box::new(Bloom { config: c, embed, embed_norm, blocks, final_norm, head, slopes })))
}

impl Bloom {
    fn ops(&self) -> FusedBlockOps<'_> {
        FusedBlockOps {
            eps: self.config.eps,
            // Per token the fused output is [head 0: q, k, v | head 1: q, k, v | ...].
            qkv_run: self.config.hidden / self.config.heads,
            masking: Masking { causal: true, alibi: Some(&self.slopes), key_mask: None },
            gelu: tensor::gelu_tanh_in_place,
        }
    }
}

impl CausalLm for Bloom {
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
        let mut hidden = self.embed.rows(tokens)?;
        self.embed_norm.apply(&mut hidden, self.config.eps);
        let ops = self.ops();
        for (i, block) in self.blocks.iter().enumerate() {
            block.forward(i, &mut hidden, rows, seq, cache, &ops);
            observe(i, &hidden);
        }
        cache.advance(seq);
        let mut hidden = decoder::select_rows(hidden, seq, self.config.hidden, logits);
        self.final_norm.apply(&mut hidden, self.config.eps);
        Ok(decoder::head_logits(&hidden, self.head.as_deref(), &self.embed))
    }

    fn export_to(&self, sink: &mut TensorSink) {
        sink(self.embed.stored(EMBED));
        self.embed_norm.export(sink);
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
        let head_dim = c.hidden / c.heads;
        Some(DecoderPlan {
            vocab: c.vocab,
            hidden: c.hidden,
            attention: AttentionShape { heads: c.heads, kv_heads: c.heads, head_dim },
            eps: c.eps,
            embed: self.embed.f32_values(),
            embed_norm: Some(self.embed_norm.plan()),
            positions: PositionPlan::Alibi { slopes: &self.slopes },
            blocks: self.blocks.iter().map(|b| b.plan(head_dim, true)).collect(),
            final_norm: self.final_norm.plan(),
            head: self.head.as_deref(),
        })
    }
}
